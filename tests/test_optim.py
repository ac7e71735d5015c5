"""FusedAdam: torch.optim.Adam(fused=True) bit for bit, through schedules, resumes and gaps."""

from __future__ import annotations

import io

import pytest
import torch

from vaelab.optim import FusedAdam


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (7,), (3, 7), (3,)]
    return [torch.randn(s, generator=g).requires_grad_() for s in shapes]


def _grads(params, step):
    g = torch.Generator().manual_seed(100 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def _same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_matches_torch_fused_adam_exactly(weight_decay):
    pa, pb = _params(), _params()
    oa = torch.optim.Adam(pa, lr=3e-3, betas=(0.8, 0.99), weight_decay=weight_decay, fused=True)
    ob = FusedAdam(pb, lr=3e-3, betas=(0.8, 0.99), weight_decay=weight_decay)
    sa = torch.optim.lr_scheduler.LambdaLR(oa, lambda s: 1.0 / (1 + s))
    sb = torch.optim.lr_scheduler.LambdaLR(ob, lambda s: 1.0 / (1 + s))
    for step in range(6):
        _grads(pa, step)
        _grads(pb, step)
        oa.step()
        ob.step()
        sa.step()
        sb.step()
        assert _same(pa, pb)
    assert ob._lean  # the lean step ran (after the first, which creates the state)
    for p, q in zip(pa, pb):
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(oa.state[p][key], ob.state[q][key])


def test_state_dict_round_trip_continues_exactly():
    pa, pb = _params(), _params()
    oa, ob = FusedAdam(pa, lr=1e-2), FusedAdam(pb, lr=1e-2)
    for step in range(3):
        for ps, o in ((pa, oa), (pb, ob)):
            _grads(ps, step)
            o.step()
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in pb], "opt": ob.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    pc = [t.clone().requires_grad_() for t in saved["params"]]
    oc = FusedAdam(pc, lr=1e-2)
    oc.load_state_dict(saved["opt"])
    for step in range(3, 6):
        for ps, o in ((pa, oa), (pc, oc)):
            _grads(ps, step)
            o.step()
    assert _same(pa, pc)


def test_missing_gradient_and_closure_take_the_general_step():
    pa, pb = _params(), _params()
    oa = torch.optim.Adam(pa, lr=1e-2, fused=True)
    ob = FusedAdam(pb, lr=1e-2)
    for step in range(4):
        for ps, o in ((pa, oa), (pb, ob)):
            _grads(ps, step)
            if step == 2:
                ps[1].grad = None  # a parameter without a gradient this step is left alone
            o.step()
        assert _same(pa, pb)

    def closure():
        return torch.tensor(1.5)

    _grads(pb, 9)
    assert ob.step(closure).item() == 1.5


def test_lean_zero_grad_and_shared_step_counters():
    params = _params()
    opt = FusedAdam(params, lr=1e-2)
    for step in range(4):
        _grads(params, step)
        opt.step()
        opt.zero_grad()
        assert all(p.grad is None for p in params)
    steps = [opt.state[p]["step"] for p in params]
    assert opt._lean and all(float(s) == 4.0 and s.dim() == 0 for s in steps)
    # one tensor holds the counts: a save and load keeps them apart and exact
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    other = FusedAdam(_params(), lr=1e-2)
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert [float(other.state[p]["step"]) for p in other.param_groups[0]["params"]] == [4.0] * 4
    opt.zero_grad(set_to_none=False)  # the general path: nothing to zero, no error


@pytest.mark.parametrize("grad_layout", ["same", "nchw"])
def test_channels_last_parameters_take_flat_views(grad_layout, monkeypatch):
    """Channels-last weights (as fit() lays out conv networks) reach the fused kernel as flat
    views of their memory (no contiguous copies): the numbers of torch's fused Adam. A gradient
    in another layout is put in its parameter's layout first: the numbers of the plain
    (for-loop) Adam; torch 2.13's fused kernel mixes up such elements (checked below)."""
    cl = torch.channels_last

    def make():
        g = torch.Generator().manual_seed(3)
        w = torch.randn(6, 4, 3, 3, generator=g).contiguous(memory_format=cl).requires_grad_()
        return [w, torch.randn(6, generator=g).requires_grad_()]

    pa, pb, pc = make(), make(), make()
    fused = torch.optim.Adam(pa, lr=1e-2, fused=True)
    ours = FusedAdam(pb, lr=1e-2)
    plain = torch.optim.Adam(pc, lr=1e-2, foreach=False)
    calls = []
    kernel = torch._fused_adam_

    def spy(params, grads, *args, **kwargs):
        calls.append([t.is_contiguous() for t in params + grads])
        return kernel(params, grads, *args, **kwargs)

    monkeypatch.setattr(torch, "_fused_adam_", spy)
    for step in range(5):
        g = torch.Generator().manual_seed(50 + step)
        grads = [torch.randn(p.shape, generator=g) for p in pa]
        for ps in (pa, pb, pc):  # the first step creates the state: the parameters' layout
            for p, gr in zip(ps, grads):
                other = grad_layout == "nchw" and step > 0
                p.grad = gr.clone() if other or gr.dim() < 4 else gr.clone(memory_format=cl)
        fused.step()
        calls.clear()
        ours.step()
        plain.step()
        if step > 0:  # the lean step: no contiguous copies
            assert calls and all(all(c) for c in calls)
        assert pb[0].is_contiguous(memory_format=cl)
        if grad_layout == "same":
            assert _same(pa, pb)
        else:
            assert all(torch.allclose(q, r, rtol=1e-6, atol=1e-7) for q, r in zip(pb, pc))
    if grad_layout == "nchw":
        assert not torch.allclose(pa[0], pc[0], rtol=1e-4)  # torch's kernel, mixed layouts
