"""Prototype of :mod:`vaelab.sharded` (``train.sharded``): the MLP VAE step split by layer
halves across two single-thread worker processes, timed against vaelab's fused two-thread step
in one run (the built version runs one half in the training process itself).

Why (docs/benchmarks.md, seventh session): on the 2-core VM the two cores sometimes sit far
apart (a cache line written by one core and read by the other takes ~330 ns instead of ~85),
and then two threads run vaelab's fused step hardly faster than one, because every step both
threads touch the same weights, bf16 copies and gradients (oneDNN splits each product one way,
the casts and Adam split the tensors another). Here each worker *owns* half of every layer
(Megatron-style): the encoder's hidden units and the decoder's hidden units are split
(column-parallel), the Gaussian heads take half of their input each (row-parallel, partial
sums added; their bias is kept on both), the output layer's pixels are split (column-parallel after gathering the decoder's
hidden layer); the weights, their bf16 copies, gradients and Adam moments stay on one core.
Per step only activations cross: the heads' partial sums (B x 2Z), the decoder's hidden layer
(B x H/2 each way), its gradient (B x H/2) and dz (B x Z), through shared memory with spin
barriers. The latent layer runs on both workers (same noise), the batch is drawn by both.

The script first checks the gradients of one step against :class:`vaelab.fused_elbo.FusedElbo`
(float32) on the same weights, batch and noise, then alternates blocks of steps of the two
(random order each round) and prints ms per step for each and their per-round ratios.

    VAELAB_DATA_DIR=../shared/data python benchmarks/sharded_step_prototype.py [--rounds 10]

Limits: the pytorch-examples network only (784-400-20, ReLU, Bernoulli, batch 128), the bf16
products of ``train.bf16`` on a CPU with native bf16, Linux (``sched_setaffinity``), no
training loop around it (no logging, validation, checkpoints). What it would take to make
this vaelab's training path is listed in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import statistics
import time
from multiprocessing import shared_memory

import numpy as np

B, D, H, Z = 128, 784, 400, 20
HH, DD = H // 2, D // 2
NAMES = ("W1", "b1", "Wh", "bh", "Wd1", "bd1", "Wo", "bo")


def _layout(buf, torch):
    """Shared tensors: counters, heads partials, decoder hidden halves, dg halves, dz partials."""
    views, off = [], 0
    for shape, dtype in (
        ((2, 16), torch.int64),
        ((2, B, 2 * Z), torch.float32),
        ((2, B, HH), torch.bfloat16),
        ((2, B, HH), torch.float32),
        ((2, B, Z), torch.float32),
    ):
        n = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
        views.append(buf[off : off + n].view(dtype).view(*shape))
        off += n
    return views, off


def shards(full: dict, r: int) -> dict:
    """Worker r's halves of the full model's weights (the names of NAMES)."""
    u = slice(r * HH, (r + 1) * HH)  # hidden units
    p = slice(r * DD, (r + 1) * DD)  # output pixels
    return {
        "W1": full["W1"][u].clone(), "b1": full["b1"][u].clone(),
        "Wh": full["Wh"][:, u].contiguous(), "bh": full["bh"].clone(),  # bh on both
        "Wd1": full["Wd1"][u].clone(), "bd1": full["bd1"][u].clone(),
        "Wo": full["Wo"][p].clone(), "bo": full["bo"][p].clone(),
    }  # fmt: skip


def worker(r: int, shm_name: str, full: dict, data_dir: str | None, cmd, out) -> None:
    import torch

    torch.set_num_threads(1)
    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > 1:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[r]})
    from vaelab import native
    from vaelab.cpu import denormals_flushed
    from vaelab.data import load_dataset

    shm = shared_memory.SharedMemory(name=shm_name)
    (cnt, heads_x, g_x, dg_x, dz_x), _ = _layout(
        torch.frombuffer(shm.buf, dtype=torch.uint8), torch
    )
    cnt_np, o, seq = cnt.numpy(), 1 - r, [0]

    def barrier() -> None:  # spin until the other worker has passed the same point
        seq[0] += 1
        cnt_np[r, 0] = seq[0]
        while cnt_np[o, 0] < seq[0]:
            pass

    imgs = load_dataset("mnist", data_dir, download=False).train.images.flatten(1)
    gen = torch.Generator().manual_seed(0)  # the same draws in both workers
    P = {k: v.requires_grad_() for k, v in shards(full, r).items()}
    opt = torch.optim.Adam([P[k] for k in NAMES], lr=1e-3, fused=True)
    copies = {k: P[k].detach().bfloat16() for k in NAMES}
    kernel = None
    own_px = slice(r * DD, (r + 1) * DD)

    def step(idx=None, eps=None, update=True) -> dict:
        nonlocal kernel
        for k in NAMES:
            copies[k].copy_(P[k].detach())
        if idx is None:
            idx = torch.randint(0, len(imgs), (B,), generator=gen)
            eps = torch.randn(B, Z, generator=gen)
        xf = imgs.index_select(0, idx).float().div_(255)
        x = xf.bfloat16()
        c = copies
        h = torch.addmm(c["b1"], x, c["W1"].t()).relu_()
        heads_x[r].copy_(h @ c["Wh"].t())
        barrier()
        heads = heads_x[0] + heads_x[1] + P["bh"].detach()  # the same sum on both workers
        mu, logvar = heads[:, :Z], heads[:, Z:]
        std = torch.exp(0.5 * logvar)
        zb = torch.addcmul(mu, std, eps).bfloat16()
        g_own = torch.addmm(c["bd1"], zb, c["Wd1"].t()).relu_()
        g_x[r].copy_(g_own)
        barrier()
        g = torch.cat([g_x[0], g_x[1]], 1)
        logits = torch.addmm(c["bo"], g, c["Wo"].t())
        xr = xf[:, own_px].contiguous()
        kernel = kernel or native.bernoulli_rows_grad_bf16(logits, xr)
        dlog, log_p = torch.empty_like(logits), torch.empty(B)
        kernel(logits.data_ptr(), xr.data_ptr(), B, DD, log_p.data_ptr(), dlog.data_ptr(), 1.0 / B)
        grads = {"Wo": dlog.t() @ g, "bo": dlog.float().sum(0)}
        dg_part = dlog @ c["Wo"]  # (B, H): this worker's pixels' share of dL/dg
        dg_x[o].copy_(dg_part[:, o * HH : (o + 1) * HH])
        barrier()
        dg = dg_part[:, r * HH : (r + 1) * HH].float() + dg_x[r]
        dg = torch.ops.aten.threshold_backward(dg.bfloat16(), g_own, 0)
        grads["Wd1"], grads["bd1"] = dg.t() @ zb, dg.float().sum(0)
        dz_x[r].copy_(dg @ c["Wd1"])
        barrier()
        dz = dz_x[0] + dz_x[1]
        dmu = dz + mu / B
        dlogvar = dz * eps * std * 0.5 + 0.5 * (std * std - 1.0) / B
        dheads = torch.cat([dmu, dlogvar], 1)
        grads["bh"] = dheads.sum(0)  # both workers keep (and step) the same bh
        dhb = dheads.bfloat16()
        grads["Wh"] = dhb.t() @ h
        dh = torch.ops.aten.threshold_backward(dhb @ c["Wh"], h, 0)
        grads["W1"], grads["b1"] = dh.t() @ x, dh.float().sum(0)
        for k in NAMES:
            P[k].grad = grads[k].float()
        if update:
            opt.step()
        barrier()  # the shared buffers may be written again
        return grads

    with torch.no_grad(), denormals_flushed():
        while True:
            msg = cmd.get()
            if msg[0] == "grads":
                g = step(msg[1], msg[2], update=False)
                out.put((r, {k: v.float() for k, v in g.items()}))
            elif msg[0] == "run":
                t = time.perf_counter()
                for _ in range(msg[1]):
                    step()
                out.put((r, time.perf_counter() - t))
            else:
                break
    shm.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps", type=int, default=50, help="steps per block")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--data-dir", default=None)
    args = p.parse_args()

    import torch
    from _common import data_dir

    from vaelab import load_preset
    from vaelab.cpu import denormals_flushed
    from vaelab.data import load_dataset
    from vaelab.fused_elbo import fused_elbo_for
    from vaelab.model import build_model
    from vaelab.optim import FusedAdam

    ddir = data_dir(args.data_dir)  # None: vaelab reads $VAELAB_DATA_DIR
    torch.set_num_threads(2)
    torch.manual_seed(0)
    cfg = load_preset("pytorch-examples")
    model = build_model(cfg.model, (1, 28, 28))
    enc_body = [m for m in model.encoder.body if isinstance(m, torch.nn.Linear)]
    dec = [m for m in model.decoder if isinstance(m, torch.nn.Linear)]
    lin = {"1": enc_body[0], "h": model.encoder.heads.linear, "d1": dec[0], "o": dec[1]}
    full = {}
    for key, m in lin.items():
        full["W" + key], full["b" + key] = m.weight.detach().clone(), m.bias.detach().clone()

    size = _layout(torch.zeros(1 << 22, dtype=torch.uint8), torch)[1] + 4096
    shm = shared_memory.SharedMemory(create=True, size=size)
    np.frombuffer(shm.buf, dtype=np.uint8)[:] = 0
    ctx = mp.get_context("spawn")
    cmds, out = [ctx.Queue(), ctx.Queue()], ctx.Queue()
    procs = [
        ctx.Process(target=worker, args=(r, shm.name, full, ddir, cmds[r], out)) for r in (0, 1)
    ]
    for pr in procs:
        pr.start()
    try:
        # 1. gradients of one step against the fused ELBO in float32 (same weights, batch, eps)
        imgs = load_dataset("mnist", ddir, download=False).train.images
        idx = torch.arange(B)
        eps = torch.randn(B, Z, generator=torch.Generator().manual_seed(1))
        for c in cmds:
            c.put(("grads", idx, eps))
        got = dict(out.get() for _ in procs)
        fused32 = fused_elbo_for(model, cfg.objective)
        x = imgs[:B].float().div(255)
        model.zero_grad()
        fused32(x, eps[None], 1.0).loss.backward()
        gathered = {
            "W1": torch.cat([got[0]["W1"], got[1]["W1"]]), "b1": torch.cat([got[0]["b1"], got[1]["b1"]]),
            "Wh": torch.cat([got[0]["Wh"], got[1]["Wh"]], 1), "bh": got[0]["bh"],
            "Wd1": torch.cat([got[0]["Wd1"], got[1]["Wd1"]]), "bd1": torch.cat([got[0]["bd1"], got[1]["bd1"]]),
            "Wo": torch.cat([got[0]["Wo"], got[1]["Wo"]]), "bo": torch.cat([got[0]["bo"], got[1]["bo"]]),
        }  # fmt: skip
        print("gradient check against FusedElbo (float32), |g - g_ref| / |g_ref| per tensor:")
        worst = 0.0
        for key, m in lin.items():
            for name, ref in (("W" + key, m.weight.grad), ("b" + key, m.bias.grad)):
                rel = float((gathered[name] - ref).norm() / ref.norm())
                worst = max(worst, rel)
                print(f"  {name:4s} {tuple(ref.shape)!s:11s} {rel:.4f}")
        print(f"  worst {worst:.4f} (bf16 products: expect ~0.01)")

        # 2. timing: blocks of the fused two-thread step and the two-worker step, alternating
        opt = FusedAdam(model.parameters(), lr=1e-3)
        fused16 = fused_elbo_for(model, cfg.objective, torch.bfloat16)
        gen = torch.Generator().manual_seed(2)
        flat = imgs.flatten(1)

        def fused_block(n: int) -> float:
            t = time.perf_counter()
            for _ in range(n):
                xb = flat.index_select(0, torch.randint(0, len(flat), (B,), generator=gen))
                e = torch.randn(1, B, Z, generator=gen)
                loss = fused16(xb.float().div_(255).view(B, 1, 28, 28), e, 1.0).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            return time.perf_counter() - t

        def workers_block(n: int) -> float:
            for c in cmds:
                c.put(("run", n))
            return max(out.get()[1] for _ in procs)

        with denormals_flushed():
            fused_block(args.warmup)
            workers_block(args.warmup)
            times = {"fused": [], "workers": []}
            for _ in range(args.rounds):
                order = ["fused", "workers"]
                random.shuffle(order)
                for name in order:
                    blk = fused_block if name == "fused" else workers_block
                    times[name].append(blk(args.steps) / args.steps * 1e3)
        ratios = [w / f for f, w in zip(times["fused"], times["workers"])]
        print(f"ms per step, {args.rounds} rounds of {args.steps} steps (random order each round):")
        for name in times:
            print(f"  {name:8s} median {statistics.median(times[name]):.3f}  "
                  + " ".join(f"{t:.2f}" for t in times[name]))  # fmt: skip
        print(f"  two workers / fused two-thread step: median {statistics.median(ratios):.3f} "
              f"(rounds {' '.join(f'{q:.2f}' for q in ratios)})")  # fmt: skip
    finally:
        for c in cmds:
            c.put(("stop",))
        for pr in procs:
            pr.join(timeout=30)
        shm.close()
        shm.unlink()


if __name__ == "__main__":
    main()
