"""The sparse first layer of the fused bf16 MLP step (csrc/sparse.c through
vaelab.native.sparse_first_layer): the same numbers as the dense bf16 products, taken only for
batches that are mostly zeros, and skipped cleanly where the CPU has no AVX512-BF16."""

import pytest
import torch

import vaelab.fused_elbo as fused_elbo
from vaelab import native
from vaelab.config import ModelConfig, ObjectiveConfig
from vaelab.fused_elbo import fused_elbo_for
from vaelab.model import build_model

KERNELS = native.sparse_first_layer()
needs_kernels = pytest.mark.skipif(
    KERNELS is None, reason=f"no sparse kernels here ({native.why_not('sparse')})"
)


def _sparse(shape, density, seed):
    """Uniform values in [0, 1), each kept with probability ``density`` (the rest 0)."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) * (torch.rand(shape, generator=g) < density)


def _bf16(t):
    return t.to(torch.bfloat16).double()


@needs_kernels
@pytest.mark.parametrize("rows, k, h", [(7, 48, 32), (128, 784, 400), (1, 16, 16)])
def test_kernels_match_the_dense_bf16_products(rows, k, h):
    g = torch.Generator().manual_seed(rows + k)
    w, b = torch.randn(h, k, generator=g) * 0.1, torch.randn(h, generator=g) * 0.1
    x = _sparse((rows, k), 0.2, seed=k)
    x[0] = 0.0  # a row with no input at all: relu(b)
    assert KERNELS.count_nonzero(x) == int(torch.count_nonzero(x))
    pairs = torch.empty(k // 2, h, dtype=torch.int32)
    KERNELS.pairs(w, pairs, 1)
    # pairs[p, u] holds w[u, 2p] (low half) and w[u, 2p + 1] (high half), rounded to bf16
    unpaired = pairs.view(torch.bfloat16).reshape(k // 2, h, 2).permute(1, 0, 2).reshape(h, k)
    assert torch.equal(unpaired, w.to(torch.bfloat16))

    out = torch.empty(rows, h, dtype=torch.bfloat16)
    KERNELS.forward(x, pairs, b, out, 1)
    want = torch.relu(b.double() + _bf16(x) @ _bf16(w).t())
    # float32 sums in another order, then one rounding to bf16: within a bf16 step (2^-8)
    torch.testing.assert_close(out.double(), want, rtol=2**-7, atol=1e-6)
    assert torch.equal(out[0], torch.relu(b).to(torch.bfloat16))

    dh = (torch.randn(rows, h, generator=g) * (want > 0)).to(torch.bfloat16)
    grad = torch.empty(h, k)
    scratch = torch.empty((rows + 1) // 2 * h, dtype=torch.int32)
    KERNELS.weight_grad(x, dh, grad, scratch, 1)
    torch.testing.assert_close(grad.double(), dh.double().t() @ _bf16(x), rtol=1e-5, atol=1e-5)

    # two threads of torch's OpenMP pool split the rows and pixels: the very same numbers
    out2, grad2 = torch.empty_like(out), torch.empty_like(grad)
    pairs2 = torch.empty_like(pairs)
    KERNELS.pairs(w, pairs2, 2)
    KERNELS.forward(x, pairs2, b, out2, 2)
    KERNELS.weight_grad(x, dh, grad2, scratch, 2)
    assert torch.equal(pairs2, pairs) and torch.equal(out2, out) and torch.equal(grad2, grad)


@needs_kernels
def test_a_nan_weight_reaches_the_output():
    """The fused ReLU keeps NaN (as torch.relu does), so a diverged weight is not hidden as 0."""
    k, h = 32, 16
    w, b = torch.randn(h, k) * 0.1, torch.zeros(h)
    w[3, 5] = float("nan")
    x = torch.zeros(2, k)
    x[0, 5] = 0.5  # row 0 uses the NaN weight, row 1 does not
    x[1, 9] = 0.5
    pairs = torch.empty(k // 2, h, dtype=torch.int32)
    KERNELS.pairs(w, pairs, 1)
    out = torch.empty(2, h, dtype=torch.bfloat16)
    KERNELS.forward(x, pairs, b, out, 1)
    assert torch.isnan(out[0, 3]) and torch.isfinite(out[1]).all()


def _mnist_like_model(seed=0):
    torch.manual_seed(seed)
    cfg = ModelConfig(arch="mlp", hidden=(64,), latent_dim=4, activation="relu")
    return build_model(cfg, (1, 8, 8))  # 64 inputs, 64 hidden units: multiples of 16


def _grads(model, loss):
    for p in model.parameters():
        p.grad = None
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


@needs_kernels
def test_fused_bf16_step_takes_it_for_sparse_batches_with_the_same_gradients(monkeypatch):
    model, obj = _mnist_like_model(), ObjectiveConfig(n_samples=2)
    x = _sparse((33, 1, 8, 8), 0.2, seed=1)  # odd batch: the last row pair is half empty
    eps = torch.randn(2, 33, 4, generator=torch.Generator().manual_seed(2))
    low = fused_elbo_for(model, obj, torch.bfloat16)
    assert low.sparse is not None
    out = low(x, eps, 0.7)
    assert low.sparse_now
    sparse_grads = _grads(model, out.loss)

    monkeypatch.setattr(fused_elbo, "SPARSE_MAX_DENSITY", 0.0)  # every batch dense
    dense = low(x, eps, 0.7)
    assert not low.sparse_now
    dense_grads = _grads(model, dense.loss)
    for name in ("loss", "elbo", "log_px_z", "kl"):
        a, b = getattr(out, name).detach(), getattr(dense, name).detach()
        torch.testing.assert_close(a, b, rtol=1e-2, atol=0.02, msg=name)
    for (name, _), a, b in zip(model.named_parameters(), sparse_grads, dense_grads):
        assert a.dtype == torch.float32
        # the same bf16 products summed in another order (the dense path also rounds its
        # float32 sums to bf16 before widening): close, not equal
        assert float((a - b).norm() / b.norm()) < 0.02, name

    exact = fused_elbo_for(model, obj)(x, eps, 0.7)  # float32 throughout
    for a, b in zip(sparse_grads, _grads(model, exact.loss)):
        assert float((a - b).norm() / b.norm()) < 0.05


@needs_kernels
def test_dense_batches_and_other_layers_keep_the_dense_products():
    model, obj = _mnist_like_model(seed=3), ObjectiveConfig()
    low = fused_elbo_for(model, obj, torch.bfloat16)
    x = torch.rand(16, 1, 8, 8) + 0.01  # no zeros
    eps = torch.randn(1, 16, 4)
    low(x, eps)
    assert not low.sparse_now
    assert fused_elbo_for(model, obj).sparse is None  # float32: its own products
    torch.manual_seed(0)
    odd = build_model(ModelConfig(arch="mlp", hidden=(40,), latent_dim=4), (1, 8, 8))
    assert fused_elbo_for(odd, obj, torch.bfloat16).sparse is None  # 40 units: not x16
    tanh = build_model(ModelConfig(arch="mlp", hidden=(64,), activation="tanh"), (1, 8, 8))
    assert fused_elbo_for(tanh, obj, torch.bfloat16).sparse is None  # the kernel fuses ReLU


def test_unavailable_kernels_say_why(monkeypatch, tmp_path):
    monkeypatch.setenv("VAELAB_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("VAELAB_NATIVE", "0")
    native._reset()
    try:
        assert native.sparse_first_layer() is None
        assert "VAELAB_NATIVE" in native.why_not("sparse")
        model = _mnist_like_model()
        assert fused_elbo_for(model, ObjectiveConfig(), torch.bfloat16).sparse is None
    finally:
        native._reset()


@needs_kernels
def test_a_fit_on_sparse_images_says_it_took_the_sparse_layer():
    from vaelab import fit, load_preset, override
    from vaelab.data.base import DataInfo, DataSplits, ImageSet

    info = DataInfo("sparse-8x8", (1, 8, 8), "8bit")
    g = torch.Generator().manual_seed(0)
    keep = torch.rand(640, 1, 8, 8, generator=g) < 0.15
    images = (torch.randint(1, 256, (640, 1, 8, 8), generator=g) * keep).to(torch.uint8)
    data = DataSplits(
        info,
        ImageSet(images[:512], None, info),
        ImageSet(images[512:576], None, info),
        ImageSet(images[576:], None, info),
    )
    cfg = override(
        load_preset("pytorch-examples"),
        ["model.hidden=64", "model.latent_dim=4", "train.batch_size=64", "train.max_steps=12",
         "train.bf16=true", "train.figures=false", "train.report=false"],
    )  # fmt: skip
    result = fit(cfg, data=data, out_dir=None, progress=False)
    assert "sparse first layer (csrc/sparse.c) in 12 of 12 steps" in result.summary["precision"]
    assert all(torch.isfinite(p).all() for p in result.model.parameters())
