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


# ------------------------------------------------------------------ step_bf16 (C kernel)

native_adam = pytest.mark.skipif(
    __import__("vaelab.native", fromlist=["x"]).adam_bf16_many() is None,
    reason="no C compiler for vaelab's kernels",
)


def _big_params(seed=0):
    """Large enough (> 65,536 elements) for the kernel to split the work over threads."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(300, 250), (300,), (7, 300), (7,)]
    return [torch.randn(s, generator=g).requires_grad_() for s in shapes]


@native_adam
@pytest.mark.parametrize("weight_decay, threads, make", [
    (0.0, 1, _params), (0.1, 2, _params), (0.0, 2, _big_params), (0.05, 3, _big_params),
])  # fmt: skip
def test_step_bf16_is_adam_on_the_widened_gradients(weight_decay, threads, make):
    """Same update and state as Adam fed the bf16 gradients widened to float32, to float32
    rounding, with each parameter's bf16 copy exactly the parameter rounded."""
    pa, pb = make(), make()
    oa = torch.optim.Adam(pa, lr=3e-3, betas=(0.8, 0.99), weight_decay=weight_decay, fused=True)
    ob = FusedAdam(pb, lr=3e-3, betas=(0.8, 0.99), weight_decay=weight_decay)
    sa = torch.optim.lr_scheduler.LambdaLR(oa, lambda s: 1.0 / (1 + s))
    sb = torch.optim.lr_scheduler.LambdaLR(ob, lambda s: 1.0 / (1 + s))
    copies = [torch.empty_like(p, dtype=torch.bfloat16) for p in pb]
    for step in range(8):
        _grads(pa, step)
        grads = [p.grad.to(torch.bfloat16) for p in pa]
        for p, g in zip(pa, grads):
            p.grad = g.float()
        assert ob.step_bf16(grads, copies, threads=threads)
        oa.step()
        sa.step()
        sb.step()
        for p, q, c in zip(pa, pb, copies):
            torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-5, atol=1e-6)
            assert torch.equal(c, q.detach().to(torch.bfloat16))  # round to nearest even
    for p, q in zip(pa, pb):
        assert float(ob.state[q]["step"]) == float(oa.state[p]["step"]) == 8.0
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ob.state[q][key], oa.state[p][key], rtol=1e-4, atol=1e-7)
    # the state is torch's: a plain FusedAdam loads it and continues
    buf = io.BytesIO()
    torch.save(ob.state_dict(), buf)
    buf.seek(0)
    oc = FusedAdam([p.detach().clone().requires_grad_() for p in pb], lr=3e-3)
    oc.load_state_dict(torch.load(buf))
    assert float(oc.state_dict()["state"][0]["step"]) == 8.0


@native_adam
def test_step_bf16_keeps_nan_and_rounds_ties_to_even():
    p = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    opt = FusedAdam([p], lr=0.0)  # lr 0: the parameter stays, the copy is its rounding
    with torch.no_grad():  # 1 + 2^-8 is halfway between two bf16 numbers: ties go to even (1.0)
        p.copy_(torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, -(2**-130)]))
    copy = torch.empty(3, dtype=torch.bfloat16)
    assert opt.step_bf16([torch.zeros(3, dtype=torch.bfloat16)], [copy])
    assert torch.equal(copy, p.detach().to(torch.bfloat16))
    assert copy[0] == 1.0 and copy[1] == 1.0 + 4 * 2**-8
    opt2 = FusedAdam([p], lr=1e-3)
    nan = torch.tensor([float("nan"), 0.0, 1.0], dtype=torch.bfloat16)
    assert opt2.step_bf16([nan], [copy])
    assert torch.isnan(p[0]) and torch.isnan(copy[0].float()) and torch.isfinite(copy[1:]).all()


@native_adam
def test_step_bf16_declines_what_it_cannot_do():
    pa = _params()
    opt = FusedAdam(pa, lr=1e-3)
    bf = [torch.zeros_like(p, dtype=torch.bfloat16) for p in pa]
    copies = [torch.empty_like(p, dtype=torch.bfloat16) for p in pa]
    before = [p.detach().clone() for p in pa]
    assert not opt.step_bf16([g.float() for g in bf], copies)  # float32 gradients
    assert not opt.step_bf16(bf[:-1], copies)  # one missing
    assert not opt.step_bf16(bf, [c.t() if c.dim() == 2 else c for c in copies])  # strided
    amsgrad = FusedAdam(pa, lr=1e-3)
    amsgrad.param_groups[0]["amsgrad"] = True
    assert not amsgrad.step_bf16(bf, copies)
    assert _same(pa, before) and not opt.state  # nothing changed, no state made
