"""vaelab.nets.common.BatchNormReLU2d: relu(BatchNorm2d(x)) -- outputs, gradients and running
statistics as torch's -- with the training pass in csrc/batchnorm.c on the CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from vaelab import load_preset, native, override
from vaelab.model import build_model
from vaelab.nets.common import BatchNormReLU2d

CL = torch.channels_last
HAVE_KERNEL = native.batchnorm_relu_kernels() is not None
needs_kernel = pytest.mark.skipif(
    not HAVE_KERNEL, reason=f"no kernel: {native.why_not('batchnorm')}"
)


def _pair(c, **kwargs):
    torch.manual_seed(0)
    ref, ours = nn.BatchNorm2d(c, **kwargs), BatchNormReLU2d(c, **kwargs)
    if ref.weight is not None:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-0.5, 0.5)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _step(layer, x, g, relu):
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    y = F.relu(y) if relu else y
    params = [p for p in (layer.weight, layer.bias) if p is not None]
    return (y, *torch.autograd.grad(y, [x, *params], g))


def _rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@needs_kernel
@pytest.mark.parametrize("shape", [(8, 32, 5, 5), (64, 16, 3, 7), (3, 48, 1, 2)])
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_pass_is_torchs(shape, layout, dtype):
    """Output, input/weight/bias gradients and running statistics over three steps."""
    ref, ours = _pair(shape[1])
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for step in range(3):
        x = (torch.randn(shape) * 3 + step).to(dtype)
        x = x.contiguous(memory_format=CL) if layout == "nhwc" else x
        g = torch.randn(shape).to(dtype)
        want, got = _step(ref, x, g, True), _step(ours, x, g, False)
        assert "NativeBatchNormReLU" in type(got[0].grad_fn).__name__
        for a, b in zip(got, want):
            assert a.shape == b.shape and a.dtype == b.dtype and _rel(a, b) < tol
    assert torch.allclose(ours.running_mean, ref.running_mean, rtol=1e-4, atol=1e-5)
    assert torch.allclose(ours.running_var, ref.running_var, rtol=1e-4, atol=1e-5)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 3


@needs_kernel
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine", [True, False])
def test_running_statistics_and_evaluation_are_torchs(momentum, affine):
    ref, ours = _pair(16, momentum=momentum, affine=affine)
    for step in range(4):
        x = (torch.randn(10, 16, 4, 4) * (step + 1) + step).requires_grad_()
        F.relu(ref(x)).sum().backward()
        ours(x).sum().backward()
    assert torch.allclose(ours.running_mean, ref.running_mean, rtol=1e-5, atol=1e-6)
    assert torch.allclose(ours.running_var, ref.running_var, rtol=1e-5, atol=1e-6)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 4
    ref.eval(), ours.eval()
    x = torch.randn(5, 16, 3, 3)
    assert torch.allclose(ours(x), F.relu(ref(x)), rtol=1e-5, atol=1e-6)  # running statistics


@needs_kernel
def test_without_running_statistics_batch_statistics_in_eval_too():
    ref, ours = _pair(16, track_running_stats=False)
    ref.eval(), ours.eval()
    x = torch.randn(6, 16, 3, 3)
    y = ours(x.requires_grad_())
    assert "NativeBatchNormReLU" in type(y.grad_fn).__name__
    assert _rel(y, F.relu(ref(x))) < 1e-5


@needs_kernel
def test_nan_reaches_the_output_and_thread_counts_agree():
    layer = BatchNormReLU2d(16)
    x = torch.randn(4, 16, 5, 5)
    x[1, 3, 2, 2] = float("nan")
    y = layer(x)
    assert torch.isnan(y[:, 3]).all() and not torch.isnan(y[:, :3]).any()
    x = torch.randn(128, 32, 9, 9).contiguous(memory_format=CL)
    before, outs = torch.get_num_threads(), []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(_step(BatchNormReLU2d(32), x, torch.ones_like(x), False))
    finally:
        torch.set_num_threads(before)
    for other in outs[1:]:  # the threads' partial sums add up in another order: last bits only
        assert all(_rel(a, b) < 1e-5 for a, b in zip(other, outs[0]))


def test_where_torchs_own_runs(monkeypatch):
    """Channels that are not a multiple of 16, float64, one value per channel (torch's error)
    and no kernel (VAELAB_NATIVE=0) are torch's batch norm + relu."""
    for layer, x in (
        (BatchNormReLU2d(8), torch.randn(4, 8, 3, 3)),
        (BatchNormReLU2d(16).double(), torch.randn(4, 16, 3, 3, dtype=torch.float64)),
    ):
        ref = nn.BatchNorm2d(layer.num_features).to(x.dtype)
        y = layer(x.requires_grad_())
        assert "NativeBatchNormReLU" not in type(y.grad_fn).__name__
        assert torch.allclose(y, F.relu(ref(x)))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        BatchNormReLU2d(16)(torch.randn(1, 16, 1, 1))
    monkeypatch.setenv("VAELAB_NATIVE", "0")
    native._reset()
    try:
        y = BatchNormReLU2d(16)(torch.randn(4, 16, 3, 3, requires_grad=True))
        assert "NativeBatchNormReLU" not in type(y.grad_fn).__name__
    finally:
        monkeypatch.delenv("VAELAB_NATIVE")
        native._reset()


def test_dcgan_keeps_its_state_dict_keys():
    """With ReLU the dcgan network's batch norm + activation pairs are BatchNormReLU2d +
    Identity: the same parameter and buffer names as with any other activation."""

    def keys(act):
        cfg = override(
            load_preset("pytorch-examples"),
            ["model.arch=dcgan", "model.hidden=", f"model.activation={act}"],
        )
        return list(build_model(cfg.model, (1, 28, 28)).state_dict())

    assert keys("relu") == keys("elu")
    relu = build_model(
        override(load_preset("pytorch-examples"), ["model.arch=dcgan", "model.hidden="]).model,
        (1, 28, 28),
    )
    assert sum(isinstance(m, BatchNormReLU2d) for m in relu.modules()) == 8
