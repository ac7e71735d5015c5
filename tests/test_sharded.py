"""train.sharded: the one-hidden-layer MLP step split across two pinned processes.

The split changes where the arithmetic runs, not what it computes: one step gives the loss,
log-likelihood, KL and gradient norm of the fused bf16 step, a sharded run trains and resumes
exactly, the model gets private weights back when training ends, and a dead worker or an
unsupported model fails or falls back clearly.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

from vaelab import native
from vaelab.config import load_preset, override
from vaelab.data import load_dataset
from vaelab.devices import native_bf16
from vaelab.fused_elbo import fused_elbo_for
from vaelab.model import build_model
from vaelab.optim import FusedAdam
from vaelab.sharded import ShardedStep, why_not_sharded
from vaelab.train import fit

CAN_SHARD = (
    sys.platform.startswith("linux")
    and len(os.sched_getaffinity(0)) >= 2
    and native_bf16(torch.device("cpu"))
    and native.load("bernoulli") is not None
)
needs_shard = pytest.mark.skipif(
    not CAN_SHARD, reason="needs Linux, two cores, native bf16 and a C compiler"
)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", binarize="dynamic")


def mlp_cfg(*overrides: str):
    """The pytorch-examples network made small for the 8x8 digits (64 pixels)."""
    base = [
        "data.name=digits",
        "model.hidden=32",
        "model.latent_dim=4",
        "train.batch_size=64",
        "train.bf16=true",
        "train.figures=false",
        "train.report=false",
    ]
    return override(load_preset("pytorch-examples"), base + list(overrides))


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_why_not_names_what_does_not_fit():
    cpu = torch.device("cpu")
    deep = mlp_cfg("model.hidden=32,32")
    model = build_model(deep.model, (1, 8, 8))
    assert "one ReLU hidden layer" in why_not_sharded(model, deep, cpu, True)
    cfg = mlp_cfg()
    model = build_model(cfg.model, (1, 8, 8))
    assert "bf16" in why_not_sharded(model, cfg, cpu, False)
    two = mlp_cfg("objective.n_samples=2")
    assert "one sample" in why_not_sharded(model, two, cpu, True)
    clip = mlp_cfg("train.grad_clip=1.0")
    assert "grad_clip" in why_not_sharded(model, clip, cpu, True)
    conv = mlp_cfg("model.arch=conv", "model.hidden=")
    assert "fused" in why_not_sharded(build_model(conv.model, (1, 8, 8)), conv, cpu, True)


@needs_shard
def test_a_sharded_step_computes_the_fused_bf16_step():
    cfg = load_preset("pytorch-examples")
    torch.manual_seed(0)
    model = build_model(cfg.model, (1, 28, 28))
    ref = build_model(cfg.model, (1, 28, 28))
    ref.load_state_dict(model.state_dict())
    opt, ref_opt = FusedAdam(model.parameters()), FusedAdam(ref.parameters())
    fused = fused_elbo_for(ref, cfg.objective, torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    sh = ShardedStep(model, opt, 128)
    try:
        for _ in range(3):
            x = (torch.rand(128, 1, 28, 28, generator=g) < 0.2).float()
            eps = torch.randn(1, 128, 20, generator=g)
            loss, log_p, kl, norm = sh(x, eps, 0.5, True)
            out = fused(x, eps, 0.5)
            ref_opt.zero_grad(set_to_none=True)
            out.loss.backward()
            ref_norm = torch.stack([p.grad.norm() for p in ref.parameters()]).norm()
            ref_opt.step()
            # the same sums, bf16 products rounded in another order
            assert loss == pytest.approx(out.loss.item(), rel=2e-3)
            assert log_p == pytest.approx(float(out.log_px_z.sum()), rel=2e-3)
            assert kl == pytest.approx(float(out.kl.sum()), rel=5e-3)
            assert norm == pytest.approx(float(ref_norm), rel=5e-3)
        # the model's parameters are the shared weights the workers update
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            moved = (p.detach() - q.detach()).abs()
            # Adam's first steps move a weight by ~lr whatever its gradient's size, so a
            # near-zero gradient of the other sign moves it the other way: rare, and by 2 lr
            assert float((moved > 1e-4).float().mean()) < 0.05, name
            assert float(moved.max()) < 7e-3, name
    finally:
        sh.close()
    assert all(p.data.untyped_storage().data_ptr() != 0 for p in model.parameters())
    model(torch.zeros(2, 1, 28, 28))  # private weights again: usable after the block is gone


@needs_shard
def test_sharded_fit_trains_and_resumes_exactly(digits, tmp_path):
    base = ("train.epochs=4", "seed=3")
    straight = fit(mlp_cfg(*base, "train.sharded=true"), out_dir=None, data=digits, progress=False)
    assert "2 pinned processes" in straight.summary["precision"]
    first = straight.history[0]["elbo"]
    assert straight.history[-1]["elbo"] > first + 2.0  # it trains
    plain = fit(mlp_cfg(*base), out_dir=None, data=digits, progress=False)
    assert abs(straight.history[-1]["elbo"] - plain.history[-1]["elbo"]) < 0.5

    half = mlp_cfg("train.epochs=2", "seed=3", "train.sharded=true", "name=half")
    fit(half, out_dir=tmp_path, data=digits, progress=False)
    resumed = fit(
        mlp_cfg(*base, "train.sharded=true", "name=half"),
        resume=tmp_path / "half",
        data=digits,
        progress=False,
    )
    a, b = state(straight.model), state(resumed.model)
    for k in a:  # the split step is deterministic: a resumed run ends where a straight one does
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-6, msg=k)


@needs_shard
def test_a_dead_worker_is_an_error_that_names_it():
    cfg = load_preset("pytorch-examples")
    model = build_model(cfg.model, (1, 28, 28))
    sh = ShardedStep(model, FusedAdam(model.parameters()), 128)
    try:
        sh.proc.kill()
        sh.proc.wait()
        with pytest.raises(RuntimeError, match="train.sharded: shard 1's process has gone"):
            sh(torch.zeros(128, 1, 28, 28), torch.zeros(1, 128, 20), 1.0, False)
    finally:
        sh.close()


def test_unsupported_models_warn_and_train_as_usual(digits):
    cfg = mlp_cfg("model.hidden=16,16", "train.max_steps=3", "train.sharded=true")
    with pytest.warns(UserWarning, match="train.sharded: it covers one ReLU hidden layer"):
        res = fit(cfg, out_dir=None, data=digits, progress=False)
    assert "pinned processes" not in res.summary["precision"]
