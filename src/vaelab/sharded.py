"""The MLP VAE training step split across two CPU cores by layer halves (``train.sharded``).

On a 2-core machine whose cores are far apart (a cache line moving between them costs ~330 ns
instead of ~85; docs/benchmarks.md), two threads run vaelab's fused step hardly faster than
one, because every step both threads touch the same weights, bf16 copies and gradients. Here
each core *owns* half of every layer, Megatron-style: the encoder's and the decoder's hidden
units are split (column-parallel), the Gaussian heads take half of their input each
(row-parallel: partial sums added), the output layer's pixels are split (column-parallel,
after gathering the decoder's hidden layer). Weights, their bf16 copies, gradients and Adam
moments stay on one core; per step only activations cross (the heads' partial sums, the
decoder's hidden layer and its gradient, dz) through shared memory and spin barriers.

Shard 0 runs in the training process itself (pinned to the first core, one torch thread),
shard 1 in a worker process started with the run (pinned to the second core). The float32
weights and both Adam moments live in one shared-memory block, and the training model's
parameters and its optimizer's state are views of that block, so validation, callbacks,
checkpoints and resume see current values without copying. Per step the training process
writes the batch, the noise, beta, the learning rate and the step count into the block and
bumps a step counter; the worker, spinning on that counter (or asleep on a pipe after ~2 ms
without a step, e.g. during validation), starts its half; both meet at four barriers; the
training process then reads the partial loss sums. :meth:`ShardedStep.close` stops the
worker and gives the model private copies of its weights again.

Covers exactly the network of the ``pytorch-examples`` preset and its kin: an encoder with one
ReLU hidden layer and a linear Gaussian head, a decoder with one ReLU hidden layer and a linear
output, even widths, Bernoulli likelihood, the ELBO with one sample (beta or warm-up allowed),
bf16 products, Adam; Linux with two usable cores. :func:`why_not_sharded` says why anything
else does not qualify. The numbers equal the fused bf16 step's up to the order of bf16
roundings (tested).
"""

from __future__ import annotations

import json
import math
import os
import select
import signal
import subprocess
import sys
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np
import torch
from torch import nn

# Parameter names, in the order of the model's parameters (encoder hidden, heads, decoder
# hidden, decoder output; weight then bias).
NAMES = ("W1", "b1", "Wh", "bh", "Wd1", "bd1", "Wo", "bo")
_CTL = 16  # control slots (float64): see _Shared
_TIMEOUT_S = 120.0  # a worker that does not start in this long is taken for dead
_SPIN_BEFORE_SLEEP = 20_000  # polls of the step counter (~2 ms) before the worker sleeps
# int64 slots of the counters row of each shard: barrier count, steps started (row 0: the main
# process), steps done (row 1: the worker), the worker is asleep on its pipe
_BARRIER, _GO, _DONE, _SLEEPING = 0, 8, 9, 10


def _layers(model: nn.Module) -> list[nn.Linear] | None:
    """[encoder hidden, heads, decoder hidden, decoder output] Linear layers, or None."""
    from vaelab.fused_elbo import _linear_plan
    from vaelab.nets.common import GaussianHeads, Reshape
    from vaelab.nets.mlp import MLPEncoder

    enc, dec = getattr(model, "encoder", None), getattr(model, "decoder", None)
    if type(enc) is not MLPEncoder or not isinstance(enc.heads, GaussianHeads):
        return None
    body = list(enc.body)
    if len(body) != 3 or not isinstance(body[0], nn.Flatten):
        return None
    encoder = _linear_plan(body[1:] + [enc.heads.linear])
    if not isinstance(dec, nn.Sequential):
        return None
    dec_layers = [m for m in dec if not isinstance(m, (Reshape, nn.Unflatten))]
    decoder = _linear_plan(dec_layers)
    if encoder is None or decoder is None or len(encoder) != 2 or len(decoder) != 2:
        return None
    if [a for _, a in encoder + decoder] != [nn.ReLU, None, nn.ReLU, None]:
        return None
    return [lin for lin, _ in encoder + decoder]


def why_not_sharded(model: nn.Module, cfg, device: torch.device, bf16_fused: bool) -> str | None:
    """Why ``train.sharded`` cannot run this model and config here (None when it can)."""
    from vaelab import native
    from vaelab.fused_elbo import fused_elbo_for

    tc, oc = cfg.train, cfg.objective
    if device.type != "cpu":
        return f"it runs on the CPU only (device {device})"
    if not sys.platform.startswith("linux") or not hasattr(os, "sched_getaffinity"):
        return "it needs Linux (processes pinned to cores)"
    if len(os.sched_getaffinity(0)) < 2:
        return "it needs two usable CPU cores"
    if fused_elbo_for(model, oc) is None:
        return "the model/objective does not take the fused MLP path (train.fused)"
    if not bf16_fused:
        return "it runs the bf16 products of train.bf16 (on a CPU with native bf16)"
    if oc.n_samples != 1:
        return "it takes one sample per image (objective.n_samples = 1)"
    if tc.grad_clip > 0 or tc.max_bad_steps > 0 or tc.compile:
        return "train.grad_clip, train.max_bad_steps and train.compile are not supported"
    layers = _layers(model)
    if layers is None:
        return "it covers one ReLU hidden layer in the encoder and in the decoder"
    if any(lin.out_features % 2 for lin in (layers[0], layers[2], layers[3])):
        return "the hidden widths and the number of pixels must be even"
    if native.load("bernoulli") is None:
        return f"the C Bernoulli kernel is unavailable ({native.why_not('bernoulli')})"
    return None


class _Shared:
    """Views of one shared-memory block (in both the main process and the workers)."""

    def __init__(self, buf, dims: dict) -> None:
        """``buf=None``: only lay the block out (``self.off`` is then its size)."""
        b, d, h, z, h2 = dims["B"], dims["D"], dims["H"], dims["Z"], dims["H2"]
        self.shapes = {
            "W1": (h, d), "b1": (h,), "Wh": (2 * z, h), "bh": (2 * z,),
            "Wd1": (h2, z), "bd1": (h2,), "Wo": (d, h2), "bo": (d,),
        }  # fmt: skip
        raw = None if buf is None else torch.frombuffer(buf, dtype=torch.uint8)
        self.off = 0

        def take(shape, dtype=torch.float32):
            n = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
            self.off = (self.off + 63) // 64 * 64  # every tensor on its own cache lines
            t = None if raw is None else raw[self.off : self.off + n].view(dtype).view(*shape)
            self.off += n
            return t

        self.counters = take((2, 16), torch.int64)  # spin barrier counters, a cache line each
        # control (float64): 0 command (1 step, 2 stop), 1 batch size, 2 beta, 3 lr, 4 step count,
        # 5 want grad norm, 6 weight decay, 7 adam eps, 8 beta1, 9 beta2
        self.ctl = take((_CTL,), torch.float64)
        self.out = take((2, 4), torch.float64)  # per worker: sum log p part, sum kl, gnorm^2, bad
        self.param = {k: take(s) for k, s in self.shapes.items()}
        self.m = {k: take(s) for k, s in self.shapes.items()}
        self.v = {k: take(s) for k, s in self.shapes.items()}
        self.x = take((b, d))
        self.eps = take((b, z))
        self.heads = take((2, b, 2 * z))
        self.g = take((2, b, h2 // 2), torch.bfloat16)
        self.dg = take((2, b, h2 // 2), torch.bfloat16)
        self.dz = take((2, b, z))

    @staticmethod
    def size(dims: dict) -> int:
        return _Shared(None, dims).off + 64


def _worker_main() -> None:
    """Entry point of the worker process: ``python -c ... SHM DIMS WAKE_FD READY_FD PARENT``."""
    name, dims, wake_fd, ready_fd, parent = sys.argv[1:6]
    _worker(name, json.loads(dims), int(wake_fd), int(ready_fd), int(parent))


def _worker(shm_name: str, dims: dict, wake_fd: int, ready_fd: int, parent: int) -> None:
    """Shard 1: waits for a step, computes its halves, steps Adam on what it owns."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides when to stop
    torch.set_num_threads(1)
    try:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[1]})
    except OSError:
        pass
    torch.set_flush_denormal(True)
    from vaelab import native

    shm = shared_memory.SharedMemory(name=shm_name)
    try:  # the main process owns the block: this process's tracker must not unlink it at exit
        from multiprocessing import resource_tracker

        resource_tracker.unregister(shm._name, "shared_memory")
    except (ImportError, AttributeError, KeyError):
        pass
    sh = _Shared(shm.buf, dims)
    flags = sh.counters.numpy()
    alive = lambda: os.getppid() == parent  # noqa: E731
    shard = _Shard(1, sh, dims, native, alive)
    os.write(ready_fd, b"r")  # imports done, block attached
    seen = 0
    try:
        while True:
            # the next step: spin ~2 ms (steps follow each other closely), then sleep on the
            # pipe (epoch ends: validation wants both cores) -- re-checking after each wake-up
            spins = 0
            while flags[0, _GO] <= seen:
                spins += 1
                if spins < _SPIN_BEFORE_SLEEP:
                    continue
                flags[1, _SLEEPING] = 1
                if flags[0, _GO] > seen:
                    flags[1, _SLEEPING] = 0
                    break
                if not os.read(wake_fd, 1) or not alive():
                    return
                flags[1, _SLEEPING] = 0
                spins = 0
            seen = int(flags[0, _GO])
            if int(sh.ctl[0]) != 1:
                return
            shard.step()
            flags[1, _DONE] = seen
    finally:
        del shard, sh, flags
        shm.close()


def _adam_(p, m, v, g, step, lr, beta1, beta2, eps, wd) -> None:
    """torch.optim.Adam's update of p with moments m, v and gradient g, elementwise (works on
    strided views)."""
    if wd != 0:
        g = g.add(p, alpha=wd)
    m.mul_(beta1).add_(g, alpha=1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (v.sqrt() / math.sqrt(1 - beta2**step)).add_(eps)
    p.addcdiv_(m, denom, value=-lr / (1 - beta1**step))


class _Shard:
    """Half r of every layer: its views of the block, bf16 copies, and one training step."""

    def __init__(self, r: int, sh: _Shared, dims: dict, native, alive) -> None:
        self.r, self.o, self.sh, self.dims, self.native, self.alive = (
            r,
            1 - r,
            sh,
            dims,
            native,
            alive,
        )
        d, h, h2 = dims["D"], dims["H"], dims["H2"]
        self.u = slice(r * h // 2, (r + 1) * h // 2)  # its encoder hidden units
        self.u2 = slice(r * h2 // 2, (r + 1) * h2 // 2)  # its decoder hidden units
        self.ou2 = slice(self.o * h2 // 2, (self.o + 1) * h2 // 2)
        self.px = slice(r * d // 2, (r + 1) * d // 2)  # its output pixels
        P, M, V = sh.param, sh.m, sh.v
        u, u2, px = self.u, self.u2, self.px
        # owned contiguous views (rows) for the fused Adam kernel; Wh's half is strided
        self.own = {
            "W1": (P["W1"][u], M["W1"][u], V["W1"][u]), "b1": (P["b1"][u], M["b1"][u], V["b1"][u]),
            "Wd1": (P["Wd1"][u2], M["Wd1"][u2], V["Wd1"][u2]),
            "bd1": (P["bd1"][u2], M["bd1"][u2], V["bd1"][u2]),
            "Wo": (P["Wo"][px], M["Wo"][px], V["Wo"][px]), "bo": (P["bo"][px], M["bo"][px], V["bo"][px]),
        }  # fmt: skip
        self.keys = ("W1", "b1", "Wd1", "bd1", "Wo", "bo")
        self.wh = (P["Wh"][:, u], M["Wh"][:, u], V["Wh"][:, u])
        self.bh = (P["bh"], M["bh"], V["bh"])
        self.copies = {k: self.own[k][0].to(torch.bfloat16) for k in self.keys}
        self.copies["Wh"] = self.wh[0].to(torch.bfloat16).contiguous()
        self.flags = sh.counters.numpy()
        self.seq = int(self.flags[r, _BARRIER])
        self.kernel = None
        self.step_t = torch.zeros(())

    def barrier(self) -> None:
        """Spin until the other shard has passed the same point (checking it still lives)."""
        self.seq += 1
        flags, r, o, seq = self.flags, self.r, self.o, self.seq
        flags[r, _BARRIER] = seq
        spins = 0
        while flags[o, _BARRIER] < seq:
            spins += 1
            if spins % 200_000 == 0 and not self.alive():
                raise RuntimeError(f"train.sharded: shard {o}'s process has gone")

    @torch.no_grad()
    def step(self) -> None:
        sh, r, o, c, own, barrier = self.sh, self.r, self.o, self.copies, self.own, self.barrier
        d, z = self.dims["D"], self.dims["Z"]
        b = int(sh.ctl[1])
        beta, lr, t = float(sh.ctl[2]), float(sh.ctl[3]), float(sh.ctl[4])
        want_norm, wd, adam_eps = sh.ctl[5] > 0, float(sh.ctl[6]), float(sh.ctl[7])
        beta1, beta2 = float(sh.ctl[8]), float(sh.ctl[9])
        for k in self.keys:
            c[k].copy_(own[k][0])
        c["Wh"].copy_(self.wh[0])
        xf = sh.x[:b]
        x = xf.to(torch.bfloat16)
        eps = sh.eps[:b]
        hid = torch.addmm(c["b1"], x, c["W1"].t()).relu_()
        sh.heads[r, :b].copy_(hid @ c["Wh"].t())
        barrier()
        heads = sh.heads[0, :b] + sh.heads[1, :b] + sh.param["bh"]
        mu, logvar = heads[:, :z], heads[:, z:]
        std = torch.exp(0.5 * logvar)
        zb = torch.addcmul(mu, std, eps).to(torch.bfloat16)
        g_own = torch.addmm(c["bd1"], zb, c["Wd1"].t()).relu_()
        sh.g[r, :b].copy_(g_own)
        barrier()
        gcat = torch.cat([sh.g[0, :b], sh.g[1, :b]], 1)
        logits = torch.addmm(c["bo"], gcat, c["Wo"].t())
        xr = xf[:, self.px].contiguous()
        self.kernel = self.kernel or self.native.bernoulli_rows_grad_bf16(logits, xr)
        dlog, log_p = torch.empty_like(logits), torch.empty(b)
        self.kernel(logits.data_ptr(), xr.data_ptr(), b, d // 2, log_p.data_ptr(),
                    dlog.data_ptr(), 1.0 / b)  # fmt: skip
        grads = {"Wo": dlog.t() @ gcat, "bo": dlog.float().sum(0)}
        dg_part = dlog @ c["Wo"]  # (b, h2): this shard's pixels' share of dL/dg
        sh.dg[o, :b].copy_(dg_part[:, self.ou2])
        barrier()
        dg = dg_part[:, self.u2].float() + sh.dg[r, :b].float()
        dg = torch.ops.aten.threshold_backward(dg.to(torch.bfloat16), g_own, 0)
        grads["Wd1"], grads["bd1"] = dg.t() @ zb, dg.float().sum(0)
        sh.dz[r, :b].copy_(dg @ c["Wd1"])
        barrier()
        dz = sh.dz[0, :b] + sh.dz[1, :b]
        kl_dim = 0.5 * (mu * mu + std * std - 1.0 - logvar)
        sb = beta / b
        dmu = dz + sb * mu
        dlogvar = dz * eps * std * 0.5 + (0.5 * sb) * (std * std - 1.0)
        dheads = torch.cat([dmu, dlogvar], 1)
        g_bh = dheads.sum(0)
        dhb = dheads.to(torch.bfloat16)
        g_wh = (dhb.t() @ hid).float()
        dh = torch.ops.aten.threshold_backward(dhb @ c["Wh"], hid, 0)
        grads["W1"], grads["b1"] = dh.t() @ x, dh.float().sum(0)
        gl = [grads[k].float() for k in self.keys]
        sh.out[r, 0] = float(log_p.sum())
        sh.out[r, 1] = float(kl_dim.sum()) if r == 0 else 0.0
        if want_norm:
            norm2 = sum(float(g.pow(2).sum()) for g in gl) + float(g_wh.pow(2).sum())
            sh.out[r, 2] = norm2 + (float(g_bh.pow(2).sum()) if r == 0 else 0.0)
        # Updating now is safe: the other shard read bh and the shared activations before the
        # last barrier, and the next step starts only after both are done.
        self.step_t.fill_(t)
        torch._fused_adam_(
            [own[k][0] for k in self.keys], gl, [own[k][1] for k in self.keys],
            [own[k][2] for k in self.keys], [], [self.step_t] * len(gl), amsgrad=False,
            lr=lr, beta1=beta1, beta2=beta2, weight_decay=wd, eps=adam_eps, maximize=False,
        )  # fmt: skip
        _adam_(*self.wh, g_wh, t, lr, beta1, beta2, adam_eps, wd)
        if r == 0:  # bh: one copy, stepped by shard 0 (both computed the same gradient)
            _adam_(*self.bh, g_bh, t, lr, beta1, beta2, adam_eps, wd)


class ShardedStep:
    """Runs shard 0 in this process and shard 1 in a worker process; the training model's
    parameters and its optimizer's Adam state are views of the shared block until
    :meth:`close`."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, batch_size: int):
        from vaelab import native

        layers = _layers(model)
        if layers is None:
            raise ValueError("train.sharded: the model is not a one-hidden-layer MLP VAE")
        self.optimizer = optimizer
        d, h = layers[0].in_features, layers[0].out_features
        z, h2 = layers[2].in_features, layers[2].out_features
        self.dims = {"B": batch_size, "D": d, "H": h, "Z": z, "H2": h2}
        self.shm = shared_memory.SharedMemory(create=True, size=_Shared.size(self.dims))
        self.sh = _Shared(self.shm.buf, self.dims)
        self.sh.counters.zero_()
        self.flags = self.sh.counters.numpy()
        self.params = [p for lin in layers for p in (lin.weight, lin.bias)]
        self._point_at_shared()
        self.closed, self.proc, self.affinity = False, None, None
        # The worker is a fresh interpreter (not multiprocessing's spawn, which would re-run a
        # user's script that has no __main__ guard); a pipe wakes it when it sleeps between
        # epochs, another says it has started.
        self.wake_w = None
        wake_r, self.wake_w = os.pipe()
        ready_r, ready_w = os.pipe()
        code = "from vaelab.sharded import _worker_main; _worker_main()"
        args = [self.shm.name, json.dumps(self.dims), str(wake_r), str(ready_w), str(os.getpid())]
        env = dict(os.environ)  # the worker imports this vaelab, however this process found it
        here = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [here, env.get("PYTHONPATH")]))
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", code, *args],
                pass_fds=(wake_r, ready_w),
                close_fds=True,
                env=env,
            )
        except BaseException:
            os.close(ready_r)
            self.close()
            raise
        finally:
            os.close(wake_r)
            os.close(ready_w)
        try:
            self.affinity = os.sched_getaffinity(0)  # shard 0 on the first core, 1 on the second
            os.sched_setaffinity(0, {sorted(self.affinity)[0]})
        except OSError:
            self.affinity = None
        try:  # wait for it to start (importing torch takes a second or two)
            ready, _, _ = select.select([ready_r], [], [], _TIMEOUT_S)
            if not ready or not os.read(ready_r, 1):
                try:
                    code = self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    code = None
                raise RuntimeError(
                    f"train.sharded: the worker process did not start (exit code {code})"
                )
        except BaseException:
            self.close()
            raise
        finally:
            os.close(ready_r)
        self.shard = _Shard(0, self.sh, self.dims, native, lambda: self.proc.poll() is None)

    def _point_at_shared(self) -> None:
        """Copy the parameters and Adam moments into the block and make them views of it."""
        state = self.optimizer.state
        for name, p in zip(NAMES, self.params):
            self.sh.param[name].copy_(p.detach())
            st = state.setdefault(p, {})
            if "exp_avg" in st:
                self.sh.m[name].copy_(st["exp_avg"])
                self.sh.v[name].copy_(st["exp_avg_sq"])
            else:
                self.sh.m[name].zero_()
                self.sh.v[name].zero_()
                st["step"] = torch.zeros((), dtype=torch.float32)
            p.data = self.sh.param[name]
            st["exp_avg"], st["exp_avg_sq"] = self.sh.m[name], self.sh.v[name]
        if hasattr(self.optimizer, "_lean"):
            self.optimizer._lean = None

    def __call__(self, x: torch.Tensor, eps: torch.Tensor, beta: float, want_norm: bool):
        """One step on images x (B, C, H, W) and noise eps (1, B, Z): returns (loss, sum of
        log p(x|z), sum of KL, gradient norm or None), loss the batch mean of beta KL - log p."""
        b = x.shape[0]
        group = self.optimizer.param_groups[0]
        steps = [self.optimizer.state[p]["step"] for p in self.params]
        torch._foreach_add_(steps, 1)
        sh, flags = self.sh, self.flags
        sh.x[:b].copy_(x.reshape(b, -1))
        sh.eps[:b].copy_(eps[0])
        beta1, beta2 = group["betas"]
        sh.ctl[:10] = torch.tensor(
            [1, b, float(beta), float(group["lr"]), float(steps[0]), float(want_norm),
             group["weight_decay"], group["eps"], beta1, beta2], dtype=torch.float64,
        )  # fmt: skip
        code = self.proc.poll()
        if code is not None:
            raise RuntimeError(f"train.sharded: shard 1's process has gone (exit code {code})")
        go = int(flags[0, _GO]) + 1
        flags[0, _GO] = go
        if flags[1, _SLEEPING]:
            try:
                os.write(self.wake_w, b"g")
            except BrokenPipeError:
                raise RuntimeError("train.sharded: shard 1's process has gone") from None
        self.shard.step()
        spins = 0
        while flags[1, _DONE] < go:  # the worker ends its Adam step about when this one does
            spins += 1
            if spins % 200_000 == 0 and self.proc.poll() is not None:
                raise RuntimeError(f"train.sharded: worker exited with code {self.proc.poll()}")
        log_p = float(sh.out[0, 0] + sh.out[1, 0])
        kl = float(sh.out[0, 1])
        loss = (beta * kl - log_p) / b
        norm = math.sqrt(float(sh.out[0, 2] + sh.out[1, 2])) if want_norm else None
        return loss, log_p, kl, norm

    def close(self) -> None:
        """Stop the worker and give the model and optimizer private copies of their values."""
        if self.closed:
            return
        self.closed = True
        if self.proc is not None:
            self.sh.ctl[0] = 2.0
            self.flags[0, _GO] += 1
            try:
                os.write(self.wake_w, b"s")
            except OSError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.wake_w is not None:
            os.close(self.wake_w)
        if self.affinity is not None:
            os.sched_setaffinity(0, self.affinity)
        state = self.optimizer.state
        for p in self.params:
            p.data = p.data.clone()
            st = state.get(p, {})
            if "exp_avg" in st:
                st["exp_avg"], st["exp_avg_sq"] = st["exp_avg"].clone(), st["exp_avg_sq"].clone()
        if hasattr(self.optimizer, "_lean"):
            self.optimizer._lean = None
        self.shard = None
        del self.sh, self.flags
        self.shm.close()
        self.shm.unlink()
