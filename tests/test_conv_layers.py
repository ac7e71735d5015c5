"""vaelab.nets.common.Conv2d / ConvTranspose2d: torch's layers with the CPU weight gradient of
bfloat16 training as one matrix product over im2col columns (csrc/im2col.c), and the forward
pass of float32 transposed convolutions to at most 4 channels in csrc/convt.c. Results must be
torch's: the same numbers in float32, within bfloat16 rounding under autocast."""

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


@pytest.mark.skipif(not HAVE_CONVT, reason=f"no kernel: {native.why_not('convt')}")
def test_one_channel_kernel_is_torchs_transposed_convolution():
    """csrc/convt.c for kernels, strides, paddings, output paddings, input channels (multiples
    of 16, odd vector counts too), output channels (the kernel takes any count) and thread
    counts."""
    forward = native.convt_forward()
    for ci, co, k, s, p, op in [
        (16, 1, 4, 2, 1, 0),
        (32, 1, 3, 1, 1, 0),
        (48, 2, 3, 2, 1, 1),
        (16, 3, 5, 3, 2, 2),
        (32, 1, 2, 2, 0, 0),
        (32, 4, 4, 2, 1, 0),
        (16, 6, 3, 2, 1, 1),  # two groups of channels (4 + 2)
    ]:
        x = torch.randn(3, ci, 5, 6).contiguous(memory_format=CL)
        weight, bias = torch.randn(ci, co, k, k), torch.randn(co)
        want = F.conv_transpose2d(x, weight, bias, s, p, op)
        wt = weight.permute(2, 3, 1, 0).contiguous()
        n, _, hi, wi = x.shape
        outs = []
        for threads in (1, 2, 3):  # rows shared by threads: the same numbers
            got = torch.empty(want.shape).contiguous(memory_format=CL)
            forward(
                x.data_ptr(), n, hi, wi, ci, wt.data_ptr(), co, k, k, s, s, p, p,
                *want.shape[2:], bias.data_ptr(), got.data_ptr(), threads,
            )  # fmt: skip
            outs.append(got)
        assert _rel(outs[0], want) < 1e-5, (ci, co, k, s, p, op)
        assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


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
