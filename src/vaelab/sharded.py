"""The MLP VAE training step split across two CPU cores by layer halves (``train.sharded``).

On a 2-core machine whose cores are far apart (a cache line moving between them costs ~330 ns
instead of ~85; docs/benchmarks.md), two threads run vaelab's fused step hardly faster than
one, because every step both threads touch the same weights, bf16 copies and gradients. Here
two worker processes, each pinned to one core with one torch thread, each *own* half of every
layer, Megatron-style: the encoder's hidden units and the decoder's hidden units are split
(column-parallel), the Gaussian heads take half of their input each (row-parallel: partial
sums added), the output layer's pixels are split (column-parallel after gathering the
decoder's hidden layer). Weights, their bf16 copies, gradients and Adam moments stay on one
core; per step only activations cross (the heads' partial sums, the decoder's hidden layer
and its gradient, dz), through shared memory and spin barriers.

The float32 weights and both Adam moments live in one shared-memory block, and the training
model's parameters and its optimizer's state are views of that block, so validation,
callbacks, checkpoints and resume see current values without copying. Per step the main
process writes the batch, the noise, beta, the learning rate and the step count into the
block, wakes both workers and sleeps until both are done (it must not spin: three busy
processes on two cores would stall the barriers), then reads the partial loss sums.

Covers exactly the network of the ``pytorch-examples`` preset and its kin: an encoder with one
ReLU hidden layer and a linear Gaussian head, a decoder with one ReLU hidden layer and a linear
output, even widths, Bernoulli likelihood, the ELBO with one sample (beta or warm-up allowed),
bf16 products, plain Adam; Linux with two usable cores. :func:`sharded_step_for` says why
anything else does not qualify. The numbers equal the fused bf16 step's up to the order of
bf16 roundings (tested).
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

import numpy as np
import torch
from torch import nn

# Parameter names, in the order of the model's parameters (encoder hidden, heads, decoder
# hidden, decoder output; weight then bias).
NAMES = ("W1", "b1", "Wh", "bh", "Wd1", "bd1", "Wo", "bo")
_CTL = 16  # control slots (float64): see _Shared
_TIMEOUT_S = 120.0  # a worker that does not answer a step in this long is taken for dead


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
    if native.bernoulli_rows_grad_bf16(
        torch.zeros(1, 2, dtype=torch.bfloat16), torch.zeros(1, 2)
    ) is None:
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
    """Entry point of a worker process: ``python -c ... R SHM DIMS GO_FD DONE_FD``."""
    r, name, dims, go_fd, done_fd = sys.argv[1:6]
    _worker(int(r), name, json.loads(dims), int(go_fd), int(done_fd))


def _worker(r: int, shm_name: str, dims: dict, go_fd: int, done_fd: int) -> None:
    """Worker r: waits for a step, computes its halves, steps Adam on what it owns."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process decides when to stop
    torch.set_num_threads(1)
    try:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[r]})
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
    try:
        _worker_loop(r, _Shared(shm.buf, dims), dims, go_fd, done_fd, native)
    finally:
        del native
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


def _worker_loop(r: int, sh: _Shared, dims: dict, go_fd: int, done_fd: int, native) -> None:
    o = 1 - r
    d, h, z, h2 = dims["D"], dims["H"], dims["Z"], dims["H2"]
    u = slice(r * h // 2, (r + 1) * h // 2)  # this worker's encoder hidden units
    u2 = slice(r * h2 // 2, (r + 1) * h2 // 2)  # its decoder hidden units
    px = slice(r * d // 2, (r + 1) * d // 2)  # its output pixels
    P, M, V = sh.param, sh.m, sh.v
    # owned contiguous views (rows) for the fused Adam kernel; Wh's half is strided
    own = {"W1": (P["W1"][u], M["W1"][u], V["W1"][u]), "b1": (P["b1"][u], M["b1"][u], V["b1"][u])}
    own["Wd1"] = (P["Wd1"][u2], M["Wd1"][u2], V["Wd1"][u2])
    own["bd1"] = (P["bd1"][u2], M["bd1"][u2], V["bd1"][u2])
    own["Wo"] = (P["Wo"][px], M["Wo"][px], V["Wo"][px])
    own["bo"] = (P["bo"][px], M["bo"][px], V["bo"][px])
    fused_keys = ("W1", "b1", "Wd1", "bd1", "Wo", "bo")
    wh = (P["Wh"][:, u], M["Wh"][:, u], V["Wh"][:, u])
    bh = (P["bh"], M["bh"], V["bh"])
    copies = {k: own[k][0].to(torch.bfloat16) for k in fused_keys}
    copies["Wh"] = wh[0].to(torch.bfloat16).contiguous()
    counters = sh.counters.numpy()
    seq = [int(counters[r, 0])]

    def barrier() -> None:
        seq[0] += 1
        counters[r, 0] = seq[0]
        while counters[o, 0] < seq[0]:
            pass

    kernel = None
    step_t = torch.zeros(())
    os.write(done_fd, b"r")  # ready: imports done, block attached
    while True:
        if not os.read(go_fd, 1):  # the main process has gone
            return
        cmd = int(sh.ctl[0])
        if cmd != 1:
            return
        b = int(sh.ctl[1])
        beta, lr, t = float(sh.ctl[2]), float(sh.ctl[3]), float(sh.ctl[4])
        want_norm, wd, adam_eps = sh.ctl[5] > 0, float(sh.ctl[6]), float(sh.ctl[7])
        beta1, beta2 = float(sh.ctl[8]), float(sh.ctl[9])
        with torch.no_grad():
            for k in fused_keys:
                copies[k].copy_(own[k][0])
            copies["Wh"].copy_(wh[0])
            xf = sh.x[:b]
            x = xf.to(torch.bfloat16)
            eps = sh.eps[:b]
            hid = torch.addmm(copies["b1"], x, copies["W1"].t()).relu_()
            sh.heads[r, :b].copy_(hid @ copies["Wh"].t())
            barrier()
            heads = sh.heads[0, :b] + sh.heads[1, :b] + P["bh"]
            mu, logvar = heads[:, :z], heads[:, z:]
            std = torch.exp(0.5 * logvar)
            zb = torch.addcmul(mu, std, eps).to(torch.bfloat16)
            g_own = torch.addmm(copies["bd1"], zb, copies["Wd1"].t()).relu_()
            sh.g[r, :b].copy_(g_own)
            barrier()
            gcat = torch.cat([sh.g[0, :b], sh.g[1, :b]], 1)
            logits = torch.addmm(copies["bo"], gcat, copies["Wo"].t())
            xr = xf[:, px].contiguous()
            kernel = kernel or native.bernoulli_rows_grad_bf16(logits, xr)
            dlog, log_p = torch.empty_like(logits), torch.empty(b)
            kernel(logits.data_ptr(), xr.data_ptr(), b, d // 2, log_p.data_ptr(),
                   dlog.data_ptr(), 1.0 / b)  # fmt: skip
            grads = {"Wo": dlog.t() @ gcat, "bo": dlog.float().sum(0)}
            dg_part = dlog @ copies["Wo"]  # (b, h2): this worker's pixels' share of dL/dg
            ou2 = slice(o * h2 // 2, (o + 1) * h2 // 2)
            sh.dg[o, :b].copy_(dg_part[:, ou2])
            barrier()
            dg = dg_part[:, u2].float() + sh.dg[r, :b].float()
            dg = torch.ops.aten.threshold_backward(dg.to(torch.bfloat16), g_own, 0)
            grads["Wd1"], grads["bd1"] = dg.t() @ zb, dg.float().sum(0)
            sh.dz[r, :b].copy_(dg @ copies["Wd1"])
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
            dh = torch.ops.aten.threshold_backward(dhb @ copies["Wh"], hid, 0)
            grads["W1"], grads["b1"] = dh.t() @ x, dh.float().sum(0)
            gl = [grads[k].float() for k in fused_keys]
            sh.out[r, 0] = float(log_p.sum())
            sh.out[r, 1] = float(kl_dim.sum()) if r == 0 else 0.0
            if want_norm:
                norm2 = sum(float(g.pow(2).sum()) for g in gl) + float(g_wh.pow(2).sum())
                sh.out[r, 2] = norm2 + (float(g_bh.pow(2).sum()) if r == 0 else 0.0)
            # Updating now is safe: the other worker read bh and the shared activations
            # before the last barrier, and the next step starts only after both are done.
            step_t.fill_(t)
            torch._fused_adam_(
                [own[k][0] for k in fused_keys], gl, [own[k][1] for k in fused_keys],
                [own[k][2] for k in fused_keys], [], [step_t] * len(gl), amsgrad=False,
                lr=lr, beta1=beta1, beta2=beta2, weight_decay=wd, eps=adam_eps, maximize=False,
            )  # fmt: skip
            _adam_(*wh, g_wh, t, lr, beta1, beta2, adam_eps, wd)
            if r == 0:  # bh: one copy, stepped by worker 0 (both computed the same gradient)
                _adam_(*bh, g_bh, t, lr, beta1, beta2, adam_eps, wd)
        os.write(done_fd, b"d")


class ShardedStep:
    """Owns the two workers and the shared block; the training model's parameters and its
    optimizer's Adam state become views of the block until :meth:`close`."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, batch_size: int):
        layers = _layers(model)
        if layers is None:
            raise ValueError("train.sharded: the model is not a one-hidden-layer MLP VAE")
        self.model, self.optimizer, self.layers = model, optimizer, layers
        d, h = layers[0].in_features, layers[0].out_features
        z, h2 = layers[2].in_features, layers[2].out_features
        self.dims = {"B": batch_size, "D": d, "H": h, "Z": z, "H2": h2}
        self.shm = shared_memory.SharedMemory(create=True, size=_Shared.size(self.dims))
        self.sh = _Shared(self.shm.buf, self.dims)
        self.sh.counters.zero_()
        self.params = [p for lin in layers for p in (lin.weight, lin.bias)]
        self._point_at_shared()
        # Workers are fresh interpreters (not multiprocessing's spawn, which would re-run a
        # user's script without a __main__ guard); pipes wake them and say when they are done.
        self.go, self.done, self.procs = [], [], []
        code = "from vaelab.sharded import _worker_main; _worker_main()"
        for r in (0, 1):
            go_r, go_w = os.pipe()
            done_r, done_w = os.pipe()
            args = [str(r), self.shm.name, json.dumps(self.dims), str(go_r), str(done_w)]
            proc = subprocess.Popen(
                [sys.executable, "-c", code, *args], pass_fds=(go_r, done_w), close_fds=True
            )
            os.close(go_r)
            os.close(done_w)
            self.go.append(go_w)
            self.done.append(done_r)
            self.procs.append(proc)
        self.closed = False
        try:  # wait for both to start (importing torch takes a second or two)
            for r, fd in enumerate(self.done):
                self._wait(r, fd)
        except BaseException:
            self.close()
            raise

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

    def refresh(self) -> None:
        """After the parameters or the optimizer's state were replaced (a resume): point them at
        the block again."""
        self._point_at_shared()

    def __call__(self, x: torch.Tensor, eps: torch.Tensor, beta: float, want_norm: bool):
        """One step on images x (B, C, H, W) and noise eps (1, B, Z): returns (loss, sum of
        log p(x|z), sum of KL, gradient norm or None), loss the batch mean of beta KL - log p."""
        b = x.shape[0]
        group = self.optimizer.param_groups[0]
        steps = [self.optimizer.state[p]["step"] for p in self.params]
        torch._foreach_add_(steps, 1)
        sh = self.sh
        sh.x[:b].copy_(x.reshape(b, -1))
        sh.eps[:b].copy_(eps[0])
        beta1, beta2 = group["betas"]
        sh.ctl[:10] = torch.tensor(
            [1, b, float(beta), float(group["lr"]), float(steps[0]), float(want_norm),
             group["weight_decay"], group["eps"], beta1, beta2], dtype=torch.float64,
        )  # fmt: skip
        for g in self.go:
            os.write(g, b"g")
        for r, fd in enumerate(self.done):
            self._wait(r, fd)
        log_p = float(sh.out[0, 0] + sh.out[1, 0])
        kl = float(sh.out[0, 1])
        loss = (beta * kl - log_p) / b
        norm = math.sqrt(float(sh.out[0, 2] + sh.out[1, 2])) if want_norm else None
        return loss, log_p, kl, norm

    def _wait(self, r: int, fd: int) -> None:
        """Block until worker r says it is done (checking every second that it lives)."""
        waited = 0.0
        while True:
            ready, _, _ = select.select([fd], [], [], 1.0)
            if ready and os.read(fd, 1):
                return
            code = self.procs[r].poll()
            waited += 1.0
            if code is not None or waited > _TIMEOUT_S:
                why = f"exited with code {code}" if code is not None else "stopped answering"
                raise RuntimeError(f"train.sharded: worker {r} {why} during a training step")

    def close(self) -> None:
        """Stop the workers and give the model and optimizer private copies of their values."""
        if self.closed:
            return
        self.closed = True
        self.sh.ctl[0] = 2.0
        for g in self.go:
            try:
                os.write(g, b"s")
            except OSError:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for fd in self.go + self.done:
            os.close(fd)
        state = self.optimizer.state
        for name, p in zip(NAMES, self.params):
            p.data = p.data.clone()
            st = state.get(p, {})
            if "exp_avg" in st:
                st["exp_avg"], st["exp_avg_sq"] = st["exp_avg"].clone(), st["exp_avg_sq"].clone()
        if hasattr(self.optimizer, "_lean"):
            self.optimizer._lean = None
        del self.sh
        self.shm.close()
        self.shm.unlink()
