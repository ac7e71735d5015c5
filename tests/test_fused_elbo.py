"""The hand-written ELBO gradient for MLP VAEs equals autograd's, and only qualifying models
and objectives take it."""

import pytest
import torch

from vaelab.config import ModelConfig, ObjectiveConfig
from vaelab.fused_elbo import fused_elbo_for
from vaelab.model import build_model
from vaelab.objectives import elbo


def _model(hidden=(16, 8), act="relu", z=3, likelihood="bernoulli", arch="mlp", seed=0, **kw):
    torch.manual_seed(seed)
    cfg = ModelConfig(
        arch=arch, hidden=hidden, latent_dim=z, activation=act, likelihood=likelihood, **kw
    )
    return build_model(cfg, (1, 6, 5))


def _grads(model, loss):
    for p in model.parameters():
        p.grad = None
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize(
    "hidden, act, n_samples, beta, grey",
    [
        ((16, 8), "relu", 1, 1.0, False),
        ((16,), "tanh", 3, 0.25, True),
        ((12, 10, 6), "tanh", 2, 4.0, False),
        ((), "relu", 1, torch.tensor(0.5), True),  # no hidden layer
    ],
)
def test_fused_gradients_equal_autograd(hidden, act, n_samples, beta, grey):
    model = _model(hidden, act, arch="mlp" if hidden else "linear").double()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(7, 1, 6, 5, generator=g, dtype=torch.float64)
    if not grey:
        x = torch.bernoulli(x, generator=g)
    eps = torch.randn(n_samples, 7, 3, generator=g, dtype=torch.float64)
    fused = fused_elbo_for(model, ObjectiveConfig(n_samples=n_samples))
    assert fused is not None
    ref = elbo(model, x, n_samples=n_samples, beta=beta, eps=eps)
    want = _grads(model, ref.loss)
    out = fused(x, eps, beta)
    got = _grads(model, out.loss)
    assert torch.allclose(out.loss, ref.loss, rtol=1e-12, atol=1e-10)
    for name in ("elbo", "log_px_z", "kl", "kl_per_dim", "bound"):
        assert torch.allclose(getattr(out, name), getattr(ref, name), rtol=1e-12, atol=1e-10)
    for (name, _), w, gr in zip(model.named_parameters(), want, got):
        assert torch.allclose(gr, w, rtol=1e-9, atol=1e-12), name
    assert not out.elbo.requires_grad and out.loss.requires_grad


def test_fused_gradients_in_float32_and_scaled_loss():
    model = _model((32,), "relu")
    x = torch.bernoulli(torch.full((16, 1, 6, 5), 0.4))
    eps = torch.randn(1, 16, 3)
    fused = fused_elbo_for(model, ObjectiveConfig())
    want = _grads(model, 3.0 * elbo(model, x, eps=eps).loss)
    got = _grads(model, 3.0 * fused(x, eps).loss)  # a non-unit incoming gradient
    for w, gr in zip(want, got):
        assert torch.allclose(gr, w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n_samples", [1, 3])
def test_c_kernel_and_torch_bernoulli_terms_agree(monkeypatch, tmp_path, n_samples):
    from vaelab import native

    model = _model((24, 12), "tanh")
    g = torch.Generator().manual_seed(2)
    x = torch.rand(9, 1, 6, 5, generator=g)  # grey levels
    x[:4] = torch.bernoulli(x[:4], generator=g)
    eps = torch.randn(n_samples, 9, 3, generator=g)
    fused = fused_elbo_for(model, ObjectiveConfig(n_samples=n_samples))
    ref = elbo(model, x, n_samples=n_samples, beta=0.7, eps=eps)
    want = _grads(model, ref.loss)
    runs = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("VAELAB_NATIVE", flag)
        monkeypatch.setenv("VAELAB_CACHE_DIR", str(tmp_path))
        native._reset()
        out = fused(x, eps, 0.7)
        runs[flag] = (out, _grads(model, out.loss))
        if flag == "1" and native._compiler():
            assert native.why_not("bernoulli") is None  # the kernel ran
        if flag == "0":
            assert "VAELAB_NATIVE" in native.why_not("bernoulli")
    native._reset()
    for out, grads in runs.values():
        assert torch.allclose(out.log_px_z, ref.log_px_z, rtol=1e-5, atol=1e-3)
        assert torch.allclose(out.loss, ref.loss, rtol=1e-5, atol=1e-4)
        for w, gr in zip(want, grads):
            assert torch.allclose(gr, w, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "model_kw, objective",
    [
        ({"likelihood": "gaussian"}, ObjectiveConfig()),
        ({"act": "gelu"}, ObjectiveConfig()),
        ({"dropout": 0.1}, ObjectiveConfig()),
        ({"arch": "conv", "hidden": (4, 4, 4)}, ObjectiveConfig()),
        ({}, ObjectiveConfig(name="iwae", k=5)),
        ({}, ObjectiveConfig(free_bits=0.5)),
        ({}, ObjectiveConfig(capacity=25.0)),
    ],
)
def test_other_models_and_objectives_do_not_qualify(model_kw, objective):
    kw = {"hidden": (16, 8), **model_kw}
    torch.manual_seed(0)
    if kw.get("arch") == "conv":
        cfg = ModelConfig(arch="conv", hidden=kw["hidden"], latent_dim=3)
        model = build_model(cfg, (1, 8, 8))
    else:
        model = _model(**kw)
    assert fused_elbo_for(model, objective) is None
    assert fused_elbo_for(_model(), ObjectiveConfig()) is not None


def test_fit_takes_the_fused_path_and_matches_autograd(tmp_path, monkeypatch):
    from vaelab import fused_elbo
    from vaelab.config import load_preset, override
    from vaelab.data import load_dataset
    from vaelab.train import fit

    data = load_dataset("digits", binarize="dynamic")
    calls = []
    real_call = fused_elbo.FusedElbo.__call__
    monkeypatch.setattr(
        fused_elbo.FusedElbo,
        "__call__",
        lambda self, *a, **k: calls.append(1) or real_call(self, *a, **k),
    )
    sets = [
        "model.hidden=32",
        "model.activation=tanh",
        "train.epochs=2",
        "train.figures=false",
        "train.report=false",
        "objective.warmup=linear",
        "objective.warmup_steps=30",
        "objective.n_samples=2",
        "train.bf16=false",  # float32 on both paths (auto takes bf16 on native-bf16 CPUs)
    ]
    results = {}
    for fused in ("true", "false"):
        cfg = override(load_preset("quickstart"), sets + [f"train.fused={fused}"])
        results[fused] = fit(cfg, data=data, out_dir=tmp_path / fused, progress=False)
    assert len(calls) == 2 * 22  # every step of the fused run, none of the other
    a, b = (results[f].model.state_dict() for f in ("true", "false"))
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-4, atol=1e-5), name
    valid = {f: [h["elbo"] for h in r.history if h["split"] == "valid"] for f, r in results.items()}
    assert valid["true"] == pytest.approx(valid["false"], abs=1e-3)


# ------------------------------------------------------------------ bfloat16 products


def _bf16_setup(seed=0):
    model = _model((32, 16), "relu", z=4, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.bernoulli(torch.full((24, 1, 6, 5), 0.4), generator=g)
    eps = torch.randn(2, 24, 4, generator=g)
    return model, x, eps, ObjectiveConfig(n_samples=2)


@pytest.mark.parametrize("kernels", [True, False])  # False: the torch path (CUDA, no compiler)
def test_bf16_products_give_float32_gradients_close_to_float32(monkeypatch, kernels):
    if not kernels:
        from vaelab import native

        monkeypatch.setattr(native, "bernoulli_rows_grad_bf16", lambda *a: None)
        monkeypatch.setattr(native, "bernoulli_rows_grad", lambda *a: None)
    model, x, eps, obj = _bf16_setup()
    exact = fused_elbo_for(model, obj)(x, eps, 0.5)
    want = _grads(model, exact.loss)
    low = fused_elbo_for(model, obj, torch.bfloat16)
    assert low is not None and low.lowp
    out = low(x, eps, 0.5)
    got = _grads(model, out.loss)
    for name in ("loss", "elbo", "log_px_z", "kl"):  # float32 sums of bf16-rounded networks
        a, b = getattr(out, name).detach(), getattr(exact, name).detach()
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=2e-2, atol=0.05, msg=name)
    errors = []
    for (name, p), w, gr in zip(model.named_parameters(), want, got):
        assert gr.dtype == torch.float32 and gr.shape == p.shape
        errors.append(float((gr - w).norm() / w.norm()))
        # bf16 rounding (8-bit mantissas), worst where sums cancel: ~0.1 at most, not ~1 (a bug)
        assert errors[-1] < 0.15, name
    assert sum(errors) / len(errors) < 0.05
    assert any(not torch.equal(a, b) for a, b in zip(want, got))  # bf16 really ran


def test_bf16_copies_follow_changes_to_the_weights():
    model, x, eps, obj = _bf16_setup(seed=5)
    low = fused_elbo_for(model, obj, torch.bfloat16)
    before = low(x, eps).loss.detach()
    with torch.no_grad():  # e.g. a checkpoint loaded into the model
        for p in model.parameters():
            p.mul_(0.5)
    after = low(x, eps).loss.detach()
    fresh = fused_elbo_for(model, obj, torch.bfloat16)(x, eps).loss.detach()
    assert torch.equal(after, fresh) and not torch.equal(after, before)
    assert all(
        torch.equal(c, p.detach().to(torch.bfloat16)) for c, p in zip(low.copies, low.params)
    )


def test_compute_dtype_is_checked():
    model, _, _, obj = _bf16_setup()
    with pytest.raises(ValueError, match="compute_dtype"):
        fused_elbo_for(model, obj, torch.float16)


def test_bf16_copies_follow_torch_fused_adam_which_keeps_version_counters():
    """torch.optim.Adam(fused=True) updates weights without moving their version counters,
    so the copies are re-rounded before every call."""
    model, x, eps, obj = _bf16_setup(seed=7)
    low = fused_elbo_for(model, obj, torch.bfloat16)
    opt = torch.optim.Adam(model.parameters(), lr=0.05, fused=True)
    _grads(model, low(x, eps).loss)
    versions = [p._version for p in model.parameters()]
    opt.step()
    assert [p._version for p in model.parameters()] == versions  # what makes this hard
    after = low(x, eps).loss.detach()
    fresh = fused_elbo_for(model, obj, torch.bfloat16)(x, eps).loss.detach()
    assert torch.equal(after, fresh)
    assert all(
        torch.equal(c, p.detach().to(torch.bfloat16)) for c, p in zip(low.copies, low.params)
    )


def test_bf16_gradient_of_a_scaled_loss():
    """The bf16 Bernoulli kernel pre-scales by 1/(B L) for d loss = 1; other upstream
    gradients still scale every weight's gradient."""
    model, x, eps, obj = _bf16_setup(seed=9)
    low = fused_elbo_for(model, obj, torch.bfloat16)
    one = _grads(model, low(x, eps).loss)
    three = _grads(model, 3.0 * low(x, eps).loss)
    for a, b in zip(one, three):  # the same up to bf16 rounding of the scaled products
        assert float((b - 3.0 * a).norm() / (3.0 * a).norm()) < 0.02


@pytest.mark.parametrize("batch", [24, 1])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gaussian_kernel_gives_the_torch_formulas_numbers(monkeypatch, batch, dtype):
    """csrc/gaussian.c (one sample, bf16 or float32 step): mu, sigma, z, KL and the head's
    gradient as the ~20 tensor operations it replaces compute them."""
    from vaelab import native

    if native.load("gaussian") is None:
        pytest.skip(f"no C kernels here ({native.why_not('gaussian')})")
    model, x, _, _ = _bf16_setup(seed=11)
    obj = ObjectiveConfig()
    x = x[:batch]
    eps = torch.randn(1, batch, 4, generator=torch.Generator().manual_seed(12)) * 2
    low = fused_elbo_for(model, obj, dtype)
    used, kernel = [], native.gaussian_sample
    monkeypatch.setattr(native, "gaussian_sample", lambda *a: used.append(kernel(*a)) or used[-1])
    out = low(x, eps, 0.3)
    got = _grads(model, out.loss)
    assert used and used[0] is not None  # the kernel ran
    monkeypatch.setattr(native, "gaussian_sample", lambda *a: None)  # the torch operations
    ref = low(x, eps, 0.3)
    want = _grads(model, ref.loss)
    for name in ("loss", "elbo", "log_px_z", "kl", "kl_per_dim"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), rtol=1e-5, atol=1e-5)
    for (name, _), a, b in zip(model.named_parameters(), got, want):
        # the same float32 arithmetic, rounded to bf16 the same way: equal but for the odd
        # value on a rounding boundary (expf against torch.exp differ in the last bit)
        assert float((a - b).norm()) <= 1e-3 * float(b.norm()) + 1e-6, name
