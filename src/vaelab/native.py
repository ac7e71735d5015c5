"""Small C kernels for hot loops, compiled on first use and called through ctypes.

Optional by design: with no C compiler, with ``VAELAB_NATIVE=0``, or when compiling fails,
:func:`load` returns ``None`` and callers use their PyTorch formula instead (same numbers up to
float rounding). The sources live in ``vaelab/csrc/``; each is compiled once per machine into
the cache (``$VAELAB_CACHE_DIR``, else ``$XDG_CACHE_HOME/vaelab``, else ``~/.cache/vaelab``)
under a name hashing the source, the shared headers (``csrc/*.h``), the flags, the compiler and the CPU, and written atomically
(temporary file, then rename), so concurrent processes never load a half-written library.

Compiled with ``-O3 -march=native -ffast-math`` (vectorised ``expf``/``logf`` from glibc's
libmvec) but linked without ``-ffast-math``: linking with it would add ``crtfastmath.o``, which
switches the whole process to flush-to-zero on load.

ctypes releases the GIL while a kernel runs, so worker threads run kernels in parallel.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from importlib import resources
from pathlib import Path

import torch

# Flag sets tried in order (the first that compiles and links wins).
_FLAG_SETS = (
    (["-O3", "-march=native", "-mprefer-vector-width=512", "-ffast-math"], ["-lmvec", "-lm"]),
    (["-O3", "-march=native", "-ffast-math"], ["-lmvec", "-lm"]),
    (["-O3", "-ffast-math"], ["-lm"]),
)

_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}
_why_not: dict[str, str] = {}
_functions: dict[str, object] = {}


def cache_dir() -> Path:
    """Where compiled kernels are kept."""
    if os.environ.get("VAELAB_CACHE_DIR"):
        return Path(os.environ["VAELAB_CACHE_DIR"]) / "native"
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "vaelab" / "native"


def enabled() -> bool:
    """False when ``VAELAB_NATIVE`` is ``0``/``false``/``no``/``off``."""
    return os.environ.get("VAELAB_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def _cpu_id() -> str:
    """The CPU's model and feature flags (``-march=native`` code is only valid on the same)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))]
        return "\n".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _compiler() -> str | None:
    cc = os.environ.get("CC")
    if cc:
        return cc
    return shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")


def _headers() -> dict[str, str]:
    """The headers of ``vaelab/csrc`` (file name -> text), shared by the kernels' sources."""
    folder = resources.files("vaelab").joinpath("csrc")
    return {f.name: f.read_text() for f in folder.iterdir() if f.name.endswith(".h")}


def _build(name: str, source: str, cc: str) -> Path:
    """Compile ``source`` (with the headers of ``csrc`` beside it) into the cache (if not there
    yet) and return the library's path."""
    headers = _headers()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    except OSError as err:
        raise RuntimeError(f"cannot run the C compiler {cc!r}: {err}") from err
    out_dir = cache_dir()
    errors = []
    for cflags, libs in _FLAG_SETS:
        parts = [source, *(headers[h] for h in sorted(headers)), " ".join(cflags + libs)]
        key = "\0".join([*parts, version, platform.machine(), _cpu_id()])
        lib = out_dir / f"{name}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.so"
        if lib.exists():
            return lib
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
            src, obj, so = Path(tmp, f"{name}.c"), Path(tmp, f"{name}.o"), Path(tmp, f"{name}.so")
            src.write_text(source)
            for header, text in headers.items():
                Path(tmp, header).write_text(text)
            steps = [
                [cc, *cflags, "-fPIC", "-c", str(src), "-o", str(obj)],
                [cc, "-shared", str(obj), "-o", str(so), *libs],
            ]
            for cmd in steps:
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode != 0:
                    errors.append(f"{' '.join(cmd)}: {res.stderr.strip()[-300:]}")
                    break
            else:
                os.replace(so, lib)  # atomic: other processes see all of it or nothing
                return lib
    raise RuntimeError("could not compile " + name + ":\n" + "\n".join(errors))


def _set_pool(lib: ctypes.CDLL) -> None:
    """Give a library that shares work between threads (``csrc/pool.h``) the OpenMP runtime
    torch uses: its kernels then run in torch's own thread pool."""
    from vaelab.cpu import _openmp_library

    omp = _openmp_library() if hasattr(lib, "vaelab_set_pool") else None
    if omp is not None and hasattr(omp, "omp_get_thread_num"):
        lib.vaelab_set_pool(
            ctypes.cast(omp.GOMP_parallel, ctypes.c_void_p),
            ctypes.cast(omp.omp_get_thread_num, ctypes.c_void_p),
        )


def load(name: str) -> ctypes.CDLL | None:
    """The compiled kernel library ``vaelab/csrc/NAME.c``, or ``None`` when unavailable
    (:func:`why_not` says why). Compiled at most once per process and machine."""
    with _lock:
        if name in _loaded:
            return _loaded[name]
        lib = None
        if not enabled():
            _why_not[name] = "disabled by VAELAB_NATIVE"
        elif (cc := _compiler()) is None:
            _why_not[name] = "no C compiler (set CC or install gcc/clang)"
        else:
            try:
                source = resources.files("vaelab").joinpath("csrc", f"{name}.c").read_text()
                lib = ctypes.CDLL(str(_build(name, source, cc)))
                _set_pool(lib)
            except (OSError, RuntimeError) as err:
                _why_not[name] = str(err)
        _loaded[name] = lib
        return lib


def function(name: str, symbol: str, argtypes: list, restype=None):
    """The C function ``symbol`` of library ``name`` with its ctypes signature, or ``None``
    when the library is unavailable."""
    key = f"{name}:{symbol}"
    fn = _functions.get(key, False)
    if fn is False:
        lib = load(name)
        fn = None
        if lib is not None:
            fn = getattr(lib, symbol)
            fn.argtypes, fn.restype = argtypes, restype
        _functions[key] = fn
    return fn


def _cpu_float32(*tensors, dtype=torch.float32) -> bool:
    return all(t.device.type == "cpu" and t.dtype == dtype and t.is_contiguous() for t in tensors)


def _cpu_bf16(*tensors) -> bool:
    return _cpu_float32(*tensors, dtype=torch.bfloat16)


_PTR, _I64 = ctypes.c_void_p, ctypes.c_int64


def bernoulli_rows(logits):
    """``vaelab_bernoulli_rows(logits, rows, d, out)`` of ``csrc/bernoulli.c`` if it applies to
    ``logits`` (contiguous float32 on the CPU) and is available, else None."""
    if not _cpu_float32(logits):
        return None
    return function("bernoulli", "vaelab_bernoulli_rows", [_PTR, _I64, _I64, _PTR])


def bernoulli_rows_grad(logits, x):
    """``vaelab_bernoulli_rows_grad(logits, x, rows, d, log_p, grad)`` of ``csrc/bernoulli.c``
    if it applies to ``logits`` and ``x`` (contiguous float32 on the CPU), else None."""
    if not _cpu_float32(logits, x):
        return None
    return function("bernoulli", "vaelab_bernoulli_rows_grad", [_PTR, _PTR, _I64, _I64, _PTR, _PTR])


def bernoulli_rows_grad_bf16(logits, x):
    """``vaelab_bernoulli_rows_grad_bf16(logits, x, rows, d, log_p, grad, scale)`` of
    ``csrc/bernoulli.c`` (bfloat16 logits in, float32 log p(x|z) and bfloat16 scaled gradient
    out) if it applies (contiguous CPU tensors: ``logits`` bfloat16, ``x`` float32), else None."""
    if not (_cpu_float32(x) and _cpu_bf16(logits)):
        return None
    return function(
        "bernoulli",
        "vaelab_bernoulli_rows_grad_bf16",
        [_PTR, _PTR, _I64, _I64, _PTR, _PTR, ctypes.c_float],
    )


def gaussian_sample(head, eps):
    """``vaelab_gaussian_sample[_f32](head, eps, b, z, mu, sigma, kl_dim, kl, z_out)`` of
    ``csrc/gaussian.c`` (a diagonal Gaussian's one sample and KL; ``z_out`` in ``head``'s dtype)
    if it applies (contiguous CPU tensors: ``head`` (B, 2Z) bfloat16 or float32, ``eps`` (B, Z)
    float32), else None."""
    if not _cpu_float32(eps):
        return None
    suffix = "" if _cpu_bf16(head) else "_f32" if _cpu_float32(head) else None
    if suffix is None:
        return None
    return function(
        "gaussian",
        "vaelab_gaussian_sample" + suffix,
        [_PTR, _PTR, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR],
    )


def gaussian_sample_grad(dtype: torch.dtype = torch.bfloat16):
    """``vaelab_gaussian_sample_grad[_f32](dz, eps, mu, sigma, b, z, sb, dhead)`` of
    ``csrc/gaussian.c`` (the head's gradient; ``dz`` and ``dhead`` of ``dtype``, bfloat16 or
    float32), or None when unavailable."""
    return function(
        "gaussian",
        "vaelab_gaussian_sample_grad" + ("" if dtype == torch.bfloat16 else "_f32"),
        [_PTR, _PTR, _PTR, _PTR, _I64, _I64, ctypes.c_float, _PTR],
    )


def linear_relu(*tensors):
    """``vaelab_linear_relu(z, zs, rows, wt, bias, k_in, h_out, h, v, per, dot)`` of
    ``csrc/mlp.c`` (an MLP decoder's first layer + ReLU, optionally dotted with a per-group
    vector) if it applies to ``tensors`` (contiguous float32 on the CPU), else None."""
    if not _cpu_float32(*tensors):
        return None
    return function(
        "mlp",
        "vaelab_linear_relu",
        [_PTR, _I64, _I64, _PTR, _PTR, _I64, _I64, _PTR, _PTR, _I64, _PTR],
    )


def dropout_kernel(dtype: torch.dtype, apply: bool = False):
    """``vaelab_dropout_{f32,bf16}(x, n, seed, thr, scale, out, mask)`` of ``csrc/dropout.c``
    (keep/drop draw, scaling and a 1-bit-per-element mask in one pass), or with ``apply`` its
    ``vaelab_dropout_apply_*(g, n, mask, scale, out)`` (the backward pass), for float32 or
    bfloat16 arrays; None for other dtypes or when unavailable."""
    suffix = {torch.float32: "f32", torch.bfloat16: "bf16"}.get(dtype)
    if suffix is None:
        return None
    if apply:
        return function(
            "dropout", f"vaelab_dropout_apply_{suffix}", [_PTR, _I64, _PTR, ctypes.c_float, _PTR]
        )
    return function(
        "dropout",
        f"vaelab_dropout_{suffix}",
        [_PTR, _I64, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_float, _PTR, _PTR],
    )


def im2col_kernel():
    """``vaelab_im2col_nhwc(x, n, h, w, c_bytes, kh, kw, sh, sw, ph, pw, ho, wo, cols,
    threads)`` of ``csrc/im2col.c`` (the im2col columns of a channels-last image batch, any
    element type), or None when unavailable."""
    return function("im2col", "vaelab_im2col_nhwc", [_PTR, *[_I64] * 12, _PTR, _I64])


def convt_forward():
    """``vaelab_convt_forward(x, n, hi, wi, ci, w, co, kh, kw, sh, sw, ph, pw, ho, wo, bias, y,
    threads) -> 0 | -1`` of ``csrc/convt.c`` (a float32 channels-last transposed convolution to
    at most 4 channels; ``w`` is the weight as (ci, taps) padded to a multiple of 16 taps), or
    None when unavailable."""
    return function(
        "convt",
        "vaelab_convt_forward",
        [_PTR, *[_I64] * 4, _PTR, *[_I64] * 9, _PTR, _PTR, _I64],
        ctypes.c_int,
    )


def convt_backward():
    """``vaelab_convt_backward(x, gy, gy_strides, n, hi, wi, ci, wg, co, kh, kw, sh, sw, ph, pw,
    ho, wo, gx, gw, threads) -> 0 | -1`` of ``csrc/convt.c`` (the input and weight gradients
    of :func:`convt_forward`'s convolution; ``gx`` or ``gw`` may be NULL), or None when
    unavailable."""
    return function(
        "convt",
        "vaelab_convt_backward",
        [_PTR, _PTR, _PTR, *[_I64] * 4, _PTR, *[_I64] * 9, _PTR, _PTR, _I64],
        ctypes.c_int,
    )


def batchnorm_relu_kernels():
    """``(vaelab_bn_relu_forward, vaelab_bn_relu_backward)`` of ``csrc/batchnorm.c`` (batch
    normalisation with batch statistics followed by ReLU, channels-last float32 or bfloat16),
    or None when unavailable. Arguments: ``forward(bf16, x, rows, c, gamma, beta, eps, y,
    mean, var, invstd, threads)``, ``backward(bf16, x, gy, rows, c, gamma, beta, mean, invstd,
    dx, dgamma, dbeta, threads)``; each returns 0, or -1 (c not a multiple of 16, no memory)."""
    i32 = ctypes.c_int
    fwd = function(
        "batchnorm",
        "vaelab_bn_relu_forward",
        [i32, _PTR, _I64, _I64, _PTR, _PTR, ctypes.c_float, _PTR, _PTR, _PTR, _PTR, _I64],
        i32,
    )
    bwd = function(
        "batchnorm",
        "vaelab_bn_relu_backward",
        [i32, _PTR, _PTR, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _PTR, _I64],
        i32,
    )
    return None if fwd is None else (fwd, bwd)


class SparseFirstLayer:
    """The kernels of ``csrc/sparse.c``: a first Linear + ReLU layer whose input is mostly zeros,
    in bfloat16 products with float32 sums (AVX512-BF16). Work is shared by ``threads`` threads
    of the process's OpenMP pool (torch's own). Arguments are tensors, checked by the caller
    (contiguous, on the CPU, of the dtypes named)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._lib = lib
        lib.vaelab_count_nonzero.argtypes = [_PTR, _I64]
        lib.vaelab_count_nonzero.restype = _I64
        for fn, args in (
            ("vaelab_pairs_bf16", [_PTR, _I64, _I64, _PTR, _I64]),
            ("vaelab_sparse_linear_relu", [_PTR, _I64, _I64, _PTR, _PTR, _I64, _PTR, _I64]),
            ("vaelab_sparse_weight_grad", [_PTR, _I64, _I64, _PTR, _I64, _PTR, _PTR, _I64]),
        ):
            getattr(lib, fn).argtypes = args

    @staticmethod
    def fits(in_features: int, out_features: int) -> bool:
        """Whether a layer of these sizes is covered (both multiples of 16)."""
        return in_features % 16 == 0 and out_features % 16 == 0

    def count_nonzero(self, x) -> int:
        """How many elements of the contiguous float32 tensor x are not 0 (one pass in C,
        5 us for a batch of 128 MNIST images against torch.count_nonzero's 33 us)."""
        return self._lib.vaelab_count_nonzero(x.data_ptr(), x.numel())

    def pairs(self, weight, out, threads: int) -> None:
        """``out`` (K/2, H) int32 := the float32 weight (H, K) rounded to bfloat16 and
        transposed in pairs: out[p, u] holds weight[u, 2p] (low half) and weight[u, 2p+1]."""
        h, k = weight.shape
        self._lib.vaelab_pairs_bf16(weight.data_ptr(), h, k, out.data_ptr(), threads)

    def forward(self, x, pairs, bias, out, threads: int) -> None:
        """``out`` (B, H) bfloat16 := relu(bias + x W^T) for float32 x (B, K), summing only
        the pairs of inputs that are not both 0 (x rounded to bfloat16, float32 sums)."""
        b, k = x.shape
        self._lib.vaelab_sparse_linear_relu(
            x.data_ptr(), b, k, pairs.data_ptr(), bias.data_ptr(), out.shape[1],
            out.data_ptr(), threads,
        )  # fmt: skip

    def weight_grad(self, x, dh, out, scratch, threads: int) -> None:
        """``out`` (H, K) float32 := dh^T x for bfloat16 dh (B, H) and float32 x (B, K)
        (rounded to bfloat16), over the inputs that are not 0; ``scratch``: int32,
        ceil(B/2) * H elements."""
        b, k = x.shape
        self._lib.vaelab_sparse_weight_grad(
            x.data_ptr(), b, k, dh.data_ptr(), dh.shape[1], out.data_ptr(),
            scratch.data_ptr(), threads,
        )  # fmt: skip


_sparse: list = []


def sparse_first_layer() -> SparseFirstLayer | None:
    """:class:`SparseFirstLayer` where ``csrc/sparse.c`` compiles with AVX512-BF16, else None."""
    if not _sparse:
        lib = load("sparse")
        ok = lib is not None and bool(lib.vaelab_sparse_available())
        if lib is not None and not ok:
            _why_not["sparse"] = "the CPU (or the compiler) has no AVX512-BF16"
        _sparse.append(SparseFirstLayer(lib) if ok else None)
    return _sparse[0]


def why_not(name: str) -> str | None:
    """Why :func:`load` returned ``None`` for ``name`` (``None`` if it loaded or was not tried)."""
    return _why_not.get(name)


def _reset() -> None:
    """Forget loaded libraries (tests)."""
    with _lock:
        _loaded.clear()
        _why_not.clear()
        _functions.clear()
        _sparse.clear()
