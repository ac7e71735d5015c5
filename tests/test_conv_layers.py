"""vaelab.nets.common.Conv2d / ConvTranspose2d: torch's layers with the CPU weight gradient of
bfloat16 training as one matrix product over im2col columns (csrc/im2col.c), and float32
transposed convolutions to at most 4 channels (forward and backward) in csrc/convt.c. Results
must be torch's: the same numbers in float32, within bfloat16 rounding under autocast."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vaelab import load_preset, native, override
from vaelab.model import build_model
from vaelab.nets.common import Conv2d, ConvTranspose2d, columns

CL = torch.channels_last
HAVE_IM2COL = native.im2col_kernel() is not None
HAVE_CONVT = native.convt_forward() is not None


def _pair(kind, cin, cout, k, s, p, op=0, bias=True):
    """A torch layer and vaelab's with the same weights."""
    torch.manual_seed(0)
    if kind == "conv":
        ref, ours = nn.Conv2d(cin, cout, k, s, p, bias=bias), Conv2d(cin, cout, k, s, p, bias=bias)
    else:
        ref = nn.ConvTranspose2d(cin, cout, k, s, p, op, bias=bias)
        ours = ConvTranspose2d(cin, cout, k, s, p, op, bias=bias)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _run(layer, x, g, bf16):
    """Output and gradients (input, weight, bias) of one forward/backward pass."""
    x = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = layer(x)
    params = [t for t in (layer.weight, layer.bias) if t is not None]
    grads = torch.autograd.grad(y, [x, *params], g.to(y.dtype))
    return y, grads


def _rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


LAYERS = [
    ("conv", 32, 64, 4, 2, 1, 0, 16),  # dcgan encoder
    ("conv", 32, 64, 3, 2, 1, 0, 14),  # conv encoder
    ("conv", 16, 24, 3, 1, 1, 0, 7),  # resnet block
    ("conv", 8, 16, 5, 3, 2, 0, 11),
    ("convT", 256, 128, 4, 2, 1, 0, 2),  # dcgan decoder
    ("convT", 64, 32, 3, 2, 1, 1, 7),  # conv decoder, output padding
    ("convT", 16, 8, 5, 3, 2, 2, 4),
    ("convT", 32, 1, 4, 2, 1, 0, 16),  # dcgan output layer (grey levels)
    ("convT", 32, 1, 3, 1, 1, 0, 9),  # conv output layer
    ("convT", 16, 1, 5, 3, 2, 1, 5),
    ("convT", 32, 3, 4, 2, 1, 0, 8),  # dcgan output layer (RGB)
    ("convT", 16, 4, 3, 2, 1, 1, 5),
    ("convT", 32, 5, 4, 2, 1, 0, 8),  # five channels: torch's forward
    ("convT", 8, 1, 4, 2, 1, 0, 8),  # 8 input channels: torch's forward
]


@pytest.mark.parametrize("kind,cin,cout,k,s,p,op,h", LAYERS)
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("bias", [True, False])
def test_float32_results_are_torchs(kind, cin, cout, k, s, p, op, h, layout, bias):
    ref, ours = _pair(kind, cin, cout, k, s, p, op, bias)
    if layout == "nhwc":
        ref, ours = ref.to(memory_format=CL), ours.to(memory_format=CL)
    x = torch.randn(3, cin, h, h + 1)
    if layout == "nhwc":
        x = x.contiguous(memory_format=CL)
    g = torch.randn_like(ref(x))
    y_ref, g_ref = _run(ref, x, g, False)
    y, grads = _run(ours, x, g, False)
    assert y.shape == y_ref.shape
    assert _rel(y, y_ref) < 1e-5
    for a, b in zip(grads, g_ref):
        assert a.shape == b.shape and _rel(a, b) < 1e-5


@pytest.mark.parametrize(
    "kind,cin,cout,k,s,p,op,h",
    [
        ("conv", 64, 128, 4, 2, 1, 0, 8),  # dcgan encoder
        ("conv", 64, 80, 3, 2, 0, 0, 7),
        ("conv", 96, 16, 5, 3, 2, 0, 11),
        ("convT", 256, 128, 4, 2, 1, 0, 2),  # dcgan decoder
        ("convT", 64, 32, 3, 2, 1, 1, 7),  # conv decoder, output padding
        ("convT", 16, 8, 5, 3, 2, 2, 4),
    ],
)
def test_bf16_autocast_takes_the_product_and_matches_torch(kind, cin, cout, k, s, p, op, h):
    """Under bf16 autocast strided convolutions from 64+ channels and transposed ones to 8+
    channels compute the weight gradient as one product: results within bf16 rounding of
    torch's."""
    ref, ours = (m.to(memory_format=CL) for m in _pair(kind, cin, cout, k, s, p, op))
    x = torch.randn(4, cin, h, h).contiguous(memory_format=CL)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ours(x.requires_grad_())
    assert type(y.grad_fn).__name__.startswith("_GemmConv")
    assert y.dtype == torch.bfloat16
    g = torch.randn(y.shape).contiguous(memory_format=CL)
    y_ref, g_ref = _run(ref, x, g, True)
    y, grads = _run(ours, x, g, True)
    assert torch.equal(y, y_ref)  # the forward pass is torch's
    for a, b in zip(grads, g_ref):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert _rel(a, b) < 2e-2  # bf16 products, float32 sums in another order
    # the weight gradient has the weight's (channels-last) layout
    assert grads[1].stride() == ours.weight.stride()


def test_where_torchs_own_runs():
    """Few channels on the im2col side, float32 hidden layers, inference, and frozen weights
    are torch's; the few-channel float32 forward runs in inference too."""
    x = torch.randn(2, 3, 16, 16).contiguous(memory_format=CL).requires_grad_()
    first = Conv2d(3, 8, 4, 2, 1).to(memory_format=CL)
    narrow = Conv2d(32, 64, 4, 2, 1).to(memory_format=CL)
    x32 = torch.randn(2, 32, 8, 8).contiguous(memory_format=CL).requires_grad_()
    unstrided = Conv2d(64, 64, 3, 1, 1).to(memory_format=CL)  # the resnet blocks' layers
    x64 = torch.randn(2, 64, 8, 8).contiguous(memory_format=CL).requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "GemmConv" not in type(first(x).grad_fn).__name__
        assert "GemmConv" not in type(narrow(x32).grad_fn).__name__
        assert "GemmConv" not in type(unstrided(x64).grad_fn).__name__
    with pytest.raises(RuntimeError):  # bf16 input, float32 weight, no autocast: torch's error
        Conv2d(64, 8, 3)(torch.randn(2, 64, 8, 8, dtype=torch.bfloat16, requires_grad=True))
    hidden = ConvTranspose2d(16, 8, 4, 2, 1)
    h = torch.randn(2, 16, 4, 4, requires_grad=True)
    assert "GemmConv" not in type(hidden(h).grad_fn).__name__  # float32
    hidden.weight.requires_grad_(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "GemmConv" not in type(hidden(h).grad_fn).__name__
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert hidden(h).dtype == torch.bfloat16
    if HAVE_CONVT:  # float32 output layers to 1-4 channels from a multiple of 16: the kernel
        for cout, cin, taken in ((1, 16, True), (4, 32, True), (5, 16, False), (3, 8, False)):
            y = ConvTranspose2d(cin, cout, 4, 2, 1)(torch.randn(2, cin, 4, 4, requires_grad=True))
            assert ("FewChannel" in type(y.grad_fn).__name__) == taken, (cin, cout)
    out = ConvTranspose2d(16, 1, 4, 2, 1)
    ref = nn.ConvTranspose2d(16, 1, 4, 2, 1)
    ref.load_state_dict(out.state_dict())
    with torch.no_grad():
        assert _rel(out(h), ref(h)) < 1e-5
    with pytest.raises(RuntimeError):  # bad input: torch's own error
        Conv2d(3, 8, 3)(torch.randn(2, 4, 8, 8))


@pytest.mark.skipif(not HAVE_IM2COL, reason=f"no kernel: {native.why_not('im2col')}")
def test_im2col_kernel_equals_the_strided_view():
    """csrc/im2col.c (channels-last input) gives the torch gather of the same view, for
    kernels, strides, paddings (and 0 padding at the edges), sizes, element types and thread
    counts."""
    before = torch.get_num_threads()
    for c, h, w, k, s, p in itertools.product(
        [1, 3, 16], [1, 5], [2, 7], [1, 2, 3, 4], [1, 2, 3], [0, 1, 2]
    ):
        if k > h + 2 * p or k > w + 2 * p:
            continue
        ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(2, c, h, w).to(dtype)
            want = columns(x, (k, k), (s, s), (p, p), (ho, wo))  # NCHW: torch's gather
            for threads in (1, 2):  # output rows shared by threads
                torch.set_num_threads(threads)
                try:
                    got = columns(x.contiguous(memory_format=CL), (k, k), (s, s), (p, p), (ho, wo))
                finally:
                    torch.set_num_threads(before)
                assert got.dtype == dtype and torch.equal(got, want), (c, h, w, k, s, p, dtype)


def test_columns_times_weight_is_the_convolution():
    x = torch.randn(2, 5, 9, 8).contiguous(memory_format=CL)
    weight = torch.randn(7, 5, 3, 3)
    cols = columns(x, (3, 3), (2, 2), (1, 1), (5, 4))
    y = (cols @ weight.permute(0, 2, 3, 1).reshape(7, -1).t()).view(2, 5, 4, 7)
    assert _rel(y.permute(0, 3, 1, 2), F.conv2d(x, weight, stride=2, padding=1)) < 1e-5


CONVT_CASES = [  # in, out channels, kernel, stride, padding, output padding
    (16, 1, 4, 2, 1, 0),
    (32, 1, 3, 1, 1, 0),
    (48, 2, 3, 2, 1, 1),
    (16, 3, 5, 3, 2, 2),
    (32, 1, 2, 2, 0, 0),
    (32, 4, 4, 2, 1, 0),
    (80, 3, 4, 2, 1, 0),  # 5 vectors of input channels (4 + 1 in the input gradient)
    (16, 4, 5, 1, 2, 0),  # 100 taps: 7 vectors
    (16, 2, 8, 4, 2, 0),  # 128 taps, the most the kernels take
]


def _convt_args(x, co, k, s, p, shape):
    """The geometry arguments of csrc/convt.c's entry points."""
    n, ci, hi, wi = x.shape
    return (n, hi, wi, ci), (co, k, k, s, s, p, p, *shape)


@pytest.mark.skipif(not HAVE_CONVT, reason=f"no kernel: {native.why_not('convt')}")
def test_few_channel_kernels_are_torchs_transposed_convolution():
    """csrc/convt.c's forward pass and both gradients = torch's, for kernels, strides, paddings,
    output paddings, channel counts and tap counts up to the 128 it takes, and the same
    numbers for 1, 2 and 3 threads (images shared, the weight gradient summed image by
    image); the output gradient in any strides; a gradient not asked for is not written."""
    forward, backward = native.convt_forward(), native.convt_backward()
    for ci, co, k, s, p, op in CONVT_CASES:
        torch.manual_seed(ci + co + k)
        x = torch.randn(3, ci, 5, 6, dtype=torch.float64)
        weight, bias = torch.randn(ci, co, k, k, dtype=torch.float64), torch.randn(co).double()
        x.requires_grad_(), weight.requires_grad_()
        want = F.conv_transpose2d(x, weight, bias, s, p, op)
        gy = torch.randn_like(want)
        want_gx, want_gw = torch.autograd.grad(want, (x, weight), gy)
        x32 = x.detach().float().contiguous(memory_format=CL)
        taps = k * k * co
        w = torch.zeros(ci, -(-taps // 16) * 16)
        w[:, :taps] = weight.detach().float().permute(0, 2, 3, 1).reshape(ci, taps)
        wg = weight.detach().float().permute(2, 3, 1, 0).reshape(taps, ci).contiguous()
        image, geometry = _convt_args(x32, co, k, s, p, want.shape[2:])
        for layout in ("nhwc", "nchw", "sliced"):
            g = gy.float()
            if layout == "nhwc":
                g = g.contiguous(memory_format=CL)
            elif layout == "sliced":  # a view with a storage offset and padded rows
                g = F.pad(g, (1, 2, 0, 0))[..., 1:-2]
            strides = torch.tensor(g.stride(), dtype=torch.int64)
            outs = []
            for threads in (1, 2, 3):
                y = torch.empty(want.shape).contiguous(memory_format=CL)
                gx = torch.full_like(x32, float("nan"))
                gw = torch.full_like(w, float("nan"))
                assert (
                    forward(
                        x32.data_ptr(),
                        *image,
                        w.data_ptr(),
                        *geometry,
                        bias.float().data_ptr(),
                        y.data_ptr(),
                        threads,
                    )  # fmt: skip
                    == 0
                )
                assert (
                    backward(
                        x32.data_ptr(),
                        g.data_ptr(),
                        strides.data_ptr(),
                        *image,
                        wg.data_ptr(),
                        *geometry,
                        gx.data_ptr(),
                        gw.data_ptr(),
                        threads,
                    )  # fmt: skip
                    == 0
                )
                outs.append((y, gx, gw))
            y, gx, gw = outs[0]
            case = (ci, co, k, s, p, op, layout)
            assert _rel(y, want) < 1e-5, case
            assert _rel(gx, want_gx) < 1e-5, case
            assert _rel(gw[:, :taps].view(ci, k, k, co).permute(0, 3, 1, 2), want_gw) < 1e-5, case
            assert torch.equal(gw[:, taps:], torch.zeros_like(gw[:, taps:])), case
            for other in outs[1:]:
                assert all(torch.equal(a, b) for a, b in zip(outs[0], other)), case
        y, gx, gw = outs[0]  # either gradient alone (NULL for the other): the same numbers
        only_gx, only_gw = torch.empty_like(gx), torch.empty_like(gw)
        for a, b in ((only_gx, None), (None, only_gw)):
            assert backward(
                x32.data_ptr(), g.data_ptr(), strides.data_ptr(), *image, wg.data_ptr(),
                *geometry, a if a is None else a.data_ptr(), b if b is None else b.data_ptr(), 2,
            ) == 0  # fmt: skip
        assert torch.equal(only_gx, gx) and torch.equal(only_gw, gw)
    # sizes the kernels do not take: -1 (the layer then runs torch's own)
    x32 = torch.randn(2, 16, 3, 3).contiguous(memory_format=CL)
    image, geometry = _convt_args(x32, 5, 4, 2, 1, (6, 6))
    y = torch.empty(2, 6, 6, 5)
    assert forward(x32.data_ptr(), *image, y.data_ptr(), *geometry, None, y.data_ptr(), 1) == -1


@pytest.mark.skipif(not HAVE_CONVT, reason=f"no kernel: {native.why_not('convt')}")
def test_output_layer_gradients_are_torchs_in_training():
    """The layer end to end: with and without bias, frozen weight, input without gradient,
    an output gradient in NCHW (as a loss leaves it), and a second backward pass through a
    retained graph."""
    for bias in (True, False):
        ref, ours = _pair("convT", 32, 3, 4, 2, 1, 0, bias)
        ref, ours = ref.to(memory_format=CL), ours.to(memory_format=CL)
        x = torch.randn(4, 32, 6, 6).contiguous(memory_format=CL)
        g = torch.randn(4, 3, 12, 12)  # NCHW
        y_ref, g_ref = _run(ref, x, g, False)
        y, grads = _run(ours, x, g, False)
        assert "FewChannel" in type(ours(x.requires_grad_()).grad_fn).__name__
        assert _rel(y, y_ref) < 1e-5
        assert all(_rel(a, b) < 1e-5 for a, b in zip(grads, g_ref))
        xr = x.detach().requires_grad_()
        out = ours(xr)
        first = torch.autograd.grad(out, xr, g, retain_graph=True)[0]
        assert torch.equal(first, torch.autograd.grad(out, xr, g)[0])
    ours.weight.requires_grad_(False)  # a frozen weight: the input gradient alone
    xr = x.detach().requires_grad_()
    (gx,) = torch.autograd.grad(ours(xr), [xr], g)
    assert _rel(gx, g_ref[0]) < 1e-5
    ours.weight.requires_grad_(True)  # an input without gradient: the weight's alone
    (gw,) = torch.autograd.grad(ours(x.detach()), [ours.weight], g)
    assert _rel(gw, g_ref[1]) < 1e-5


@pytest.mark.skipif(not HAVE_CONVT, reason=f"no kernel: {native.why_not('convt')}")
def test_output_layer_falls_back_to_torch_when_a_kernel_fails(monkeypatch):
    """A kernel that returns -1 (out of memory) leaves the work to torch: the same results."""
    ref, ours = _pair("convT", 16, 1, 4, 2, 1)
    x = torch.randn(2, 16, 4, 4).contiguous(memory_format=CL)
    g = torch.randn(2, 1, 8, 8)
    y_ref, g_ref = _run(ref, x, g, False)
    for which in ("convt_forward", "convt_backward"):
        with monkeypatch.context() as m:
            m.setattr(native, which, lambda: lambda *args: -1)
            y, grads = _run(ours, x, g, False)
            assert "FewChannel" in type(ours(x.requires_grad_()).grad_fn).__name__
        assert _rel(y, y_ref) < 1e-5
        assert all(_rel(a, b) < 1e-5 for a, b in zip(grads, g_ref)), which


def test_without_the_kernels_the_layers_are_torchs(monkeypatch):
    monkeypatch.setenv("VAELAB_NATIVE", "0")
    native._reset()
    try:
        ref, ours = (m.to(memory_format=CL) for m in _pair("convT", 32, 16, 4, 2, 1))
        x = torch.randn(2, 32, 4, 4).contiguous(memory_format=CL)
        g = torch.randn(2, 16, 8, 8)
        _, g_ref = _run(ref, x, g, True)
        _, grads = _run(ours, x, g, True)  # the product over torch's gather
        assert all(_rel(a, b) < 2e-2 for a, b in zip(grads, g_ref))
        out = ConvTranspose2d(32, 1, 4, 2, 1)
        assert "FewChannel" not in type(out(x.requires_grad_()).grad_fn).__name__
    finally:
        monkeypatch.delenv("VAELAB_NATIVE")
        native._reset()


@pytest.mark.parametrize("arch", ["conv", "dcgan", "resnet"])
def test_the_architectures_convolutions_are_vaelabs(arch):
    model = build_model(
        override(load_preset("pytorch-examples"), [f"model.arch={arch}", "model.hidden="]).model,
        (1, 28, 28),
    )
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    assert convs and all(type(m) in (Conv2d, ConvTranspose2d) for m in convs)
    # checkpoints of torch's layers load unchanged
    plain = nn.ConvTranspose2d(4, 2, 3)
    ConvTranspose2d(4, 2, 3).load_state_dict(plain.state_dict())
