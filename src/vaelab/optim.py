"""Fused Adam with a lean step: torch's one fused kernel, without its per-step Python.

``torch.optim.Adam(fused=True)`` updates every parameter in one kernel, but around it each step
rebuilds the lists of parameters, gradients and moments, groups them by device and dtype, and
adds 1 to the per-parameter step counters with a ``foreach`` call that takes a slow path for
0-d CPU tensors. On the CPU that costs ~0.15 ms a step: ~3% of a training step of the
784-400-20 MNIST MLP at batch 128 (measured in ``benchmarks/bench_train.py``'s setting).

:class:`FusedAdam` *is* ``torch.optim.Adam(fused=True)`` -- same state, ``state_dict``, hooks,
schedulers, checkpoints and numbers, bit for bit -- except that once its state exists, the plain
case (one parameter group, plain Adam with L2 weight decay, every gradient present, no gradient
scaler) calls the fused kernel directly with cached lists. Anything else goes through
``torch.optim.Adam.step`` unchanged.

:meth:`FusedAdam.step_bf16` is the mixed-precision variant used by :mod:`vaelab.fused_elbo`:
the same Adam update and state, from bfloat16 gradients, writing each parameter's bfloat16
copy in the same pass (one C kernel, :mod:`vaelab.native`), instead of widening the gradients,
stepping, and narrowing the weights again.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Iterable, Sequence

import torch

from vaelab import native


class FusedAdam(torch.optim.Adam):
    """``torch.optim.Adam(params, fused=True, ...)`` with the lean step described above.

    Raises what ``torch.optim.Adam(fused=True)`` raises where the fused kernel does not
    support the parameters' device or dtype.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        self._lean: tuple | None = None
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, fused=True)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._lean = None

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._lean = None  # the state tensors were replaced

    def _lean_lists(self) -> tuple | None:
        """(params, exp_avgs, exp_avg_sqs, steps) when the plain case holds, else None."""
        if len(self.param_groups) != 1:
            return None
        group = self.param_groups[0]
        plain = not (
            group["amsgrad"]
            or group["maximize"]
            or group["differentiable"]
            or group["capturable"]
            or group.get("decoupled_weight_decay", False)
            or torch.is_tensor(group["lr"])
        )
        params = group["params"]
        states = [self.state.get(p, {}) for p in params]
        if not plain or not params or not all("step" in s for s in states):
            return None  # the first step initialises the state the usual way
        first = params[0]
        if any(p.device != first.device or p.dtype != first.dtype for p in params):
            return None
        return (
            list(params),
            [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states],
            [s["step"] for s in states],
        )

    def step_bf16(
        self,
        grads: Sequence[torch.Tensor],
        copies: Sequence[torch.Tensor],
        threads: int = 1,
    ) -> bool:
        """One Adam step of the (single group's) parameters from bfloat16 ``grads``, also
        writing each updated parameter, rounded to bfloat16, into ``copies``.

        Same update and state as :meth:`step` (``state_dict``, checkpoints and schedulers see
        no difference; the arithmetic is float32, in a different order, so results agree to
        float rounding); the optimizer's step hooks do not run. ``threads``: POSIX threads
        for the kernel, 1 by default: torch's OpenMP workers keep spinning for a while after
        each parallel region, and on a small machine a second thread only competes with them
        (measured slower on the 2-core development VM). Returns False, changing nothing, where it does not apply: no C kernel, not the plain case of
        :meth:`step`, or tensors that are not contiguous CPU float32 parameters with bfloat16
        gradients and copies of the same shapes. The caller then steps another way.
        """
        fn = native.adam_bf16_many()
        if fn is None or len(self.param_groups) != 1:
            return False
        group = self.param_groups[0]
        params = group["params"]
        if len(grads) != len(params) or len(copies) != len(params):
            return False
        plain = not (
            group["amsgrad"]
            or group["maximize"]
            or group["differentiable"]
            or group["capturable"]
            or group.get("decoupled_weight_decay", False)
            or torch.is_tensor(group["lr"])
        )
        ok = plain and all(
            p.device.type == "cpu"
            and p.dtype == torch.float32
            and p.is_contiguous()
            and g.dtype == c.dtype == torch.bfloat16
            and g.shape == c.shape == p.shape
            and g.is_contiguous()
            and c.is_contiguous()
            and g.device.type == c.device.type == "cpu"
            for p, g, c in zip(params, grads, copies)
        )
        if not ok:
            return False
        states = []
        for p in params:  # the state torch.optim.Adam(fused=True) would create
            st = self.state[p]
            if "step" not in st:
                st["step"] = torch.tensor(0.0, dtype=torch.float32, device=p.device)
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if not (st["exp_avg"].is_contiguous() and st["exp_avg_sq"].is_contiguous()):
                return False
            states.append(st)
        steps = [st["step"] for st in states]
        with torch.no_grad():
            torch._foreach_add_(steps, 1)
        t = float(steps[0])
        beta1, beta2 = group["betas"]
        n = len(params)
        ptrs = ctypes.c_void_p * n
        fn(
            n,
            ptrs(*(p.data_ptr() for p in params)),
            ptrs(*(g.data_ptr() for g in grads)),
            ptrs(*(st["exp_avg"].data_ptr() for st in states)),
            ptrs(*(st["exp_avg_sq"].data_ptr() for st in states)),
            ptrs(*(c.data_ptr() for c in copies)),
            (ctypes.c_int64 * n)(*(p.numel() for p in params)),
            group["lr"] / (1.0 - beta1**t),
            beta1,
            beta2,
            group["eps"],
            group["weight_decay"],
            math.sqrt(1.0 - beta2**t),
            threads,
        )
        self._opt_called = True  # what torch's LR schedulers look for after a step
        return True

    def step(self, closure=None):
        """One Adam step (see the module docstring); returns the closure's loss, if given."""
        if closure is None and getattr(self, "grad_scale", None) is None:
            if self._lean is None:
                self._lean = self._lean_lists() or ()
            if self._lean:
                params, exp_avgs, exp_avg_sqs, steps = self._lean
                grads = [p.grad for p in params]
                if all(g is not None and not g.is_sparse for g in grads):
                    group = self.param_groups[0]
                    beta1, beta2 = group["betas"]
                    with torch.no_grad():
                        torch._foreach_add_(steps, 1)
                        torch._fused_adam_(
                            params,
                            grads,
                            exp_avgs,
                            exp_avg_sqs,
                            [],
                            steps,
                            amsgrad=False,
                            lr=group["lr"],
                            beta1=beta1,
                            beta2=beta2,
                            weight_decay=group["weight_decay"],
                            eps=group["eps"],
                            maximize=False,
                        )
                    return None
        self._lean = None  # the general step may create or change state
        return super().step(closure)
