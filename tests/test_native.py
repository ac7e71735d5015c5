"""The optional C kernels (vaelab.native): compiled once into the cache, numerically equal to
the PyTorch formulas, harmless to the process, and skipped cleanly when unavailable."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vaelab import native
from vaelab.metrics.fused import bernoulli_log_prob
from vaelab.metrics.likelihood import importance_sampled_log_likelihood

HAVE_CC = native._compiler() is not None


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VAELAB_CACHE_DIR", str(tmp_path))
    native._reset()
    yield tmp_path / "native"
    native._reset()


def _bce(logits, x):
    return -F.binary_cross_entropy_with_logits(
        logits.double(), x.double().unsqueeze(1).expand_as(logits), reduction="none"
    ).sum(-1)


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
@pytest.mark.parametrize("d", [784, 3072, 1025, 16, 7, 1])
def test_bernoulli_kernel_matches_the_exact_value(fresh_cache, d):
    g = torch.Generator().manual_seed(d)
    logits = torch.randn(3, 40, d, generator=g) * 6
    logits[0, 0, : min(d, 5)] = torch.tensor([80.0, -80.0, 0.0, 1e-4, -1e-30])[: min(d, 5)]
    x = torch.bernoulli(torch.full((3, d), 0.5), generator=g)
    x[2] = torch.rand(d, generator=g)  # grey levels: the same formula
    ref = _bce(logits, x)
    got = bernoulli_log_prob(logits.clone(), x)
    assert native.why_not("bernoulli") is None, native.why_not("bernoulli")
    # float32 over d pixels: the PyTorch passes carry the same rounding
    torch_path = bernoulli_log_prob(logits.clone(), x, native=False)
    tol = 2e-3 + 4e-7 * d * 6
    assert (got.double() - ref).abs().max() < tol
    assert (got - torch_path).abs().max() < tol
    assert got.dtype == torch.float32 and got.shape == (3, 40)


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
def test_compiled_once_into_the_cache_and_reused(fresh_cache):
    assert native.load("bernoulli") is not None
    libs = sorted(fresh_cache.glob("bernoulli-*.so"))
    assert len(libs) == 1
    assert [p for p in fresh_cache.iterdir() if p.is_dir()] == []  # no temporary leftovers
    stamp = libs[0].stat().st_mtime_ns
    native._reset()
    assert native.load("bernoulli") is not None
    assert libs[0].stat().st_mtime_ns == stamp  # loaded, not rebuilt


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
def test_a_changed_shared_header_rebuilds_the_kernels(fresh_cache, monkeypatch):
    """The sources include csrc/bf16.h; a library built against another version of a header
    is not reused."""
    headers = native._headers()
    assert "bf16.h" in headers
    assert native.load("gaussian") is not None
    assert len(list(fresh_cache.glob("gaussian-*.so"))) == 1
    native._reset()
    changed = {**headers, "bf16.h": headers["bf16.h"] + "\n/* another version */\n"}
    monkeypatch.setattr(native, "_headers", lambda: changed)
    assert native.load("gaussian") is not None
    assert len(list(fresh_cache.glob("gaussian-*.so"))) == 2


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
def test_loading_the_kernel_keeps_subnormal_floats(fresh_cache):
    # a library linked with -ffast-math would switch the process to flush-to-zero on load
    code = (
        "import torch\nfrom vaelab import native\nassert native.load('bernoulli') is not None\n"
        "t = torch.tensor([1e-40]); print(float((t * 1.0)[0]) != 0.0)\n"
    )
    src = str(Path(native.__file__).parents[1])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    assert out.stdout.strip() == "True"


def test_disabled_or_no_compiler_falls_back_to_torch(fresh_cache, monkeypatch):
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 30) * 4
    x = torch.bernoulli(torch.full((2, 30), 0.5))
    want = _bce(logits, x)

    monkeypatch.setenv("VAELAB_NATIVE", "0")
    assert native.load("bernoulli") is None
    assert "VAELAB_NATIVE" in native.why_not("bernoulli")
    assert (bernoulli_log_prob(logits.clone(), x).double() - want).abs().max() < 1e-3

    native._reset()
    monkeypatch.setenv("VAELAB_NATIVE", "1")
    monkeypatch.setenv("CC", str(fresh_cache / "no-such-cc"))
    assert native.load("bernoulli") is None
    assert "no-such-cc" in native.why_not("bernoulli")
    assert (bernoulli_log_prob(logits.clone(), x).double() - want).abs().max() < 1e-3


def test_a_failing_compiler_is_reported_not_raised(fresh_cache, monkeypatch, tmp_path):
    bad = tmp_path / "bad-cc"
    bad.write_text("#!/bin/sh\necho 'broken compiler' >&2\nexit 1\n")
    bad.chmod(0o755)
    monkeypatch.setenv("CC", str(bad))
    assert native.load("bernoulli") is None
    assert "broken compiler" in native.why_not("bernoulli")
    assert not list(fresh_cache.glob("*.so"))


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
@pytest.mark.parametrize("hidden", [(32,), (100, 20)])  # x . logits folded in C / not
def test_importance_sampling_same_with_and_without_the_kernels(fresh_cache, monkeypatch, hidden):
    from vaelab.config import ModelConfig
    from vaelab.model import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(arch="mlp", hidden=hidden, latent_dim=4, likelihood="bernoulli")
    model = build_model(cfg, (1, 10, 10)).eval()
    x = torch.bernoulli(torch.full((6, 1, 10, 10), 0.3))
    with_c = importance_sampled_log_likelihood(model, [x], k=200, seed=1, rows=100).log_px
    assert native.why_not("bernoulli") is None and native.why_not("mlp") is None
    assert native.load("mlp") is not None  # the first-layer kernel ran
    native._reset()
    monkeypatch.setenv("VAELAB_NATIVE", "0")
    without = importance_sampled_log_likelihood(model, [x], k=200, seed=1, rows=100).log_px
    assert native.why_not("bernoulli") is not None and native.why_not("mlp") is not None
    assert torch.allclose(with_c, without, atol=1e-4)


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
@pytest.mark.parametrize("h_out", [1, 7, 16, 64, 100, 400, 401])
@pytest.mark.parametrize("k_in", [1, 20])
def test_linear_relu_kernel_matches_torch(fresh_cache, h_out, k_in):
    """h = [relu(z W^T + b), 1] with row stride H + 1, and h . v per group of rows, for widths
    that exercise the 64-wide blocks, the 16-wide vectors and the scalar tail."""
    g = torch.Generator().manual_seed(h_out * 100 + k_in)
    rows, per, zs = 12, 4, k_in + 1
    zbuf = torch.randn(rows, zs, generator=g)  # a strided view: the last column is not read
    weight, bias = torch.randn(h_out, k_in, generator=g), torch.randn(h_out, generator=g)
    v = torch.randn(rows // per, h_out + 1, generator=g)
    wt = weight.t().contiguous()
    kernel = native.linear_relu(zbuf, v, wt, bias)
    assert kernel is not None, native.why_not("mlp")
    ref = torch.relu(zbuf[:, :k_in].double() @ weight.double().t() + bias.double())
    ref = torch.cat([ref, torch.ones(rows, 1, dtype=torch.float64)], 1)
    ref_dot = (ref.view(rows // per, per, -1) * v.double().unsqueeze(1)).sum(-1).flatten()
    for with_dot in (True, False):
        h, dot = torch.full((rows, h_out + 1), float("nan")), torch.full((rows,), float("nan"))
        kernel(
            zbuf.data_ptr(), zs, rows, wt.data_ptr(), bias.data_ptr(), k_in, h_out,
            h.data_ptr(), v.data_ptr() if with_dot else None, per,
            dot.data_ptr() if with_dot else None,
        )  # fmt: skip
        assert torch.allclose(h.double(), ref, atol=1e-5)
        if with_dot:
            assert torch.allclose(dot.double(), ref_dot, rtol=1e-5, atol=1e-4)
        else:
            assert dot.isnan().all()  # untouched
    assert native.linear_relu(zbuf.t(), v, wt, bias) is None  # not contiguous: not applicable
    assert native.linear_relu(zbuf.double(), v, wt, bias) is None


@pytest.mark.skipif(not HAVE_CC, reason="no C compiler")
@pytest.mark.parametrize("d", [784, 1025, 7])
def test_bf16_bernoulli_gradient_kernel_matches_the_float32_one(fresh_cache, d):
    """bf16 logits in: log p(x|z) as the float32 kernel gives for the same (widened) logits,
    and the gradient scale * (sigmoid(l) - x) rounded to the nearest bf16."""
    g = torch.Generator().manual_seed(d)
    rows = 9
    logits = (torch.randn(rows, d, generator=g) * 6).to(torch.bfloat16)
    logits[0, :3] = torch.tensor([80.0, -80.0, 0.0])
    x = torch.bernoulli(torch.full((rows, d), 0.4), generator=g)
    x[1] = torch.rand(d, generator=g)  # grey levels
    wide = logits.float()
    f32 = native.bernoulli_rows_grad(wide, x)
    f16 = native.bernoulli_rows_grad_bf16(logits, x)
    assert f32 is not None and f16 is not None, native.why_not("bernoulli")
    lp32, gr32 = torch.empty(rows), torch.empty(rows, d)
    lp16, gr16 = torch.empty(rows), torch.empty(rows, d, dtype=torch.bfloat16)
    f32(wide.data_ptr(), x.data_ptr(), rows, d, lp32.data_ptr(), gr32.data_ptr())
    f16(logits.data_ptr(), x.data_ptr(), rows, d, lp16.data_ptr(), gr16.data_ptr(), 0.25)
    assert torch.equal(lp16, lp32)  # same arithmetic on the same values
    assert torch.equal(gr16, (gr32 * 0.25).to(torch.bfloat16))  # round to nearest even
    assert native.bernoulli_rows_grad_bf16(wide, x) is None  # float32 logits: not this kernel
