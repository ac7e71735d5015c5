"""vaelab.nets.common.Dropout: torch's dropout semantics (keep 1 - p, scale 1 / (1 - p), the same
mask forwards and backwards), drawn by csrc/dropout.c on the CPU; torch's own elsewhere."""

from __future__ import annotations

import ctypes

import pytest
import torch
from torch import nn

from vaelab import load_preset, native, override
from vaelab.model import build_model
from vaelab.nets.common import Dropout

HAVE_KERNEL = native.dropout_kernel(torch.float32) is not None
needs_kernel = pytest.mark.skipif(not HAVE_KERNEL, reason=f"no kernel: {native.why_not('dropout')}")


def _kept(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Which elements survived (x has no zeros)."""
    assert (x != 0).all()
    return y != 0


@needs_kernel
@pytest.mark.parametrize("n", [1, 15, 16, 17, 1000, 4099])
def test_vector_mask_equals_the_scalar_reference(n):
    """The AVX-512 path (where the CPU has it) draws the same bits as the one-element-at-a-time
    definition, tails included."""
    scalar = native.function(
        "dropout",
        "vaelab_dropout_mask_scalar",
        [ctypes.c_int64, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_void_p],
    )
    fwd = native.dropout_kernel(torch.float32)
    x = torch.randn(n)
    for seed in (0, 1, 2**61 + 12345):
        out, got = torch.empty_like(x), torch.empty((n + 15) // 16, dtype=torch.int16)
        want = torch.empty_like(got)
        fwd(x.data_ptr(), n, seed, 3 << 30, 4.0 / 3.0, out.data_ptr(), got.data_ptr())
        scalar(n, seed, 3 << 30, want.data_ptr())
        assert torch.equal(got, want)
        bits = ((got.int().unsqueeze(1) >> torch.arange(16)) & 1).flatten()[:n]
        assert bits.sum() > 0 or n < 16
        assert torch.equal(out, x * (bits * torch.tensor(4.0 / 3.0)))


@needs_kernel
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_and_gradient_are_the_masked_scaled_input(layout, dtype):
    torch.manual_seed(0)
    x = (torch.rand(6, 5, 7, 9) + 0.5).to(dtype)
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    d = Dropout(0.3)
    y = d(x)
    assert y.grad_fn is not None and "NativeDropout" in type(y.grad_fn).__name__
    assert y.dtype == dtype and y.stride() == x.stride()
    keep = _kept(y, x)
    scale = torch.tensor(1 / 0.7, dtype=torch.float32)
    want = (x.detach().float() * (keep * scale)).to(dtype)
    assert torch.equal(y, want)
    g = torch.randn(x.shape).to(dtype)  # NCHW: for the nhwc input, a gradient in another layout
    y.backward(g)
    assert torch.equal(x.grad, (g.float() * (keep * scale)).to(dtype))


@needs_kernel
@pytest.mark.parametrize("p", [0.1, 0.25, 0.5, 0.9])
def test_keep_rate_is_one_minus_p_and_the_mean_is_kept(p):
    torch.manual_seed(1)
    n = 1 << 20
    x = torch.ones(n)
    y = Dropout(p)(x)
    kept = (y != 0).double()
    sd = (p * (1 - p) / n) ** 0.5
    assert abs(kept.mean().item() - (1 - p)) < 5 * sd
    assert abs(y.double().mean().item() - 1.0) < 5 * sd / (1 - p)
    # neighbouring elements (and elements 16 apart: one uint16 of the mask) are uncorrelated
    k = kept - kept.mean()
    for lag in (1, 16, 4096):
        corr = (k[:-lag] * k[lag:]).mean() / k.var()
        assert abs(corr.item()) < 5 / n**0.5


@needs_kernel
def test_masks_follow_torch_manual_seed_and_differ_between_calls():
    x = torch.rand(4, 3000) + 0.5
    d = Dropout(0.5)
    torch.manual_seed(3)
    a, b = d(x) != 0, d(x) != 0
    torch.manual_seed(3)
    assert torch.equal(d(x) != 0, a)
    assert (a != b).float().mean() > 0.4  # a fresh draw each call: half the elements differ


@needs_kernel
def test_nan_stays_nan_where_dropped_as_in_torch():
    x = torch.full((64,), float("nan"))
    assert torch.isnan(Dropout(0.5)(x)).all()


def test_eval_p0_p1_and_inplace_behave_as_torch():
    x = torch.rand(3, 40) + 0.5
    d = Dropout(0.4).eval()
    assert d(x) is x or torch.equal(d(x), x)
    assert torch.equal(Dropout(0.0)(x), x)
    assert torch.equal(Dropout(1.0)(x), torch.zeros_like(x))
    y = x.clone()
    torch.manual_seed(0)
    out = Dropout(0.5, inplace=True)(y)
    assert out.data_ptr() == y.data_ptr()  # torch's in-place dropout
    assert isinstance(Dropout(0.5), nn.Dropout) and repr(Dropout(0.5)) == repr(nn.Dropout(0.5))


def test_without_the_kernel_it_is_torchs_dropout(monkeypatch):
    monkeypatch.setenv("VAELAB_NATIVE", "0")
    native._reset()
    try:
        x = (torch.rand(8, 50) + 0.5).requires_grad_()
        torch.manual_seed(5)
        y = Dropout(0.5)(x)
        torch.manual_seed(5)
        assert torch.equal(y, nn.functional.dropout(x, 0.5, True))
        assert "NativeDropout" not in type(y.grad_fn).__name__
    finally:
        monkeypatch.delenv("VAELAB_NATIVE")
        native._reset()


@pytest.mark.parametrize("arch", ["conv", "mlp", "resnet"])
def test_the_architectures_dropout_layers_are_vaelabs(arch):
    sets = [f"model.arch={arch}", "model.hidden=", "model.dropout=0.2"]
    model = build_model(override(load_preset("pytorch-examples"), sets).model, (1, 28, 28))
    drops = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert drops and all(type(m) is Dropout and m.p == 0.2 for m in drops)
