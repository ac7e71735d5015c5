"""The C kernels of vaelab's fused bf16 MLP step, each against what it replaces, in one run.

Two parts, on the pytorch-examples network (784-400-20, batch 128, MNIST, Adam 1e-3):

* ``layer``: the sparse first layer (``csrc/sparse.c``: the weight's pairs, the forward
  product with its ReLU, the weight gradient) against the dense bf16 products and casts it
  replaces, on MNIST batches and on inputs with zeros scattered at random (10-50% non-zero);
  best of 3 blocks of 40 calls each.
* ``step``: a whole training step (batch indexing, noise, the fused ELBO and its gradient,
  fused Adam) with every kernel, without the sparse first layer, and without the Gaussian
  kernel (``csrc/gaussian.c``), in blocks of ``--steps`` steps in random order each round;
  prints ms per step and the median per-round ratio to the full step.

Needs a CPU with AVX512-BF16 and a C compiler (else it says which kernel is missing).

    VAELAB_DATA_DIR=../shared/data python benchmarks/bench_fused_step.py [--rounds 20]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from _common import best_seconds, data_dir

import vaelab.fused_elbo as fused_elbo
from vaelab import load_preset, native
from vaelab.cpu import denormals_flushed
from vaelab.data import load_dataset
from vaelab.fused_elbo import fused_elbo_for
from vaelab.model import build_model
from vaelab.optim import FusedAdam

B, Z, H, K = 128, 20, 400, 784


def best_us(fn, calls: int = 40, blocks: int = 3) -> float:
    return best_seconds(fn, calls, blocks) * 1e6


def layer_part(images: torch.Tensor, threads: int) -> None:
    kernels = native.sparse_first_layer()
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(H, K, generator=g) * 0.05, torch.randn(H, generator=g) * 0.1
    wb, bb = w.to(torch.bfloat16), b.to(torch.bfloat16)
    pairs = torch.empty(K // 2, H, dtype=torch.int32)
    scratch = torch.empty(B // 2 * H, dtype=torch.int32)
    out, grad = torch.empty(B, H, dtype=torch.bfloat16), torch.empty(H, K)
    dh = torch.randn(B, H, generator=g).to(torch.bfloat16)
    mnist = images[:B].reshape(B, K).float().div_(255)
    inputs = [("MNIST", mnist)] + [
        (f"random {d:.0%}", torch.rand(B, K, generator=g) * (torch.rand(B, K, generator=g) < d))
        for d in (0.1, 0.2, 0.3, 0.4, 0.5)
    ]
    print(f"first layer 784 -> 400 + ReLU and its weight gradient, batch {B}, {threads} threads")
    print(f"{'input':>12} {'non-zero':>8} {'sparse us':>10} {'dense us':>9} {'ratio':>6}")
    for name, x in inputs:

        def sparse(x=x):
            kernels.pairs(w, pairs, threads)
            kernels.forward(x, pairs, b, out, threads)
            kernels.weight_grad(x, dh, grad, scratch, threads)

        def dense(x=x):
            wb.copy_(w)
            xb = x.to(torch.bfloat16)
            torch.addmm(bb, xb, wb.t()).relu_()
            (dh.t() @ xb).float()

        s, d = best_us(sparse), best_us(dense)
        share = float((x != 0).float().mean())
        print(f"{name:>12} {share:>8.1%} {s:>10.0f} {d:>9.0f} {s / d:>6.2f}")


def step_part(images: torch.Tensor, rounds: int, steps: int, warmup: int) -> None:
    cfg = load_preset("pytorch-examples")
    torch.manual_seed(0)
    model = build_model(cfg.model, (1, 28, 28))
    opt = FusedAdam(model.parameters())
    fused = fused_elbo_for(model, cfg.objective, torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    gaussian = native.gaussian_sample

    def step() -> None:
        idx = torch.randint(0, len(images), (B,), generator=gen)
        x = images.index_select(0, idx).float().div_(255)
        out = fused(x, torch.randn(1, B, Z, generator=gen), 1.0)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    variants = {
        "all kernels": (fused_elbo.SPARSE_MAX_DENSITY, gaussian),
        "no sparse first layer": (0.0, gaussian),
        "no Gaussian kernel": (fused_elbo.SPARSE_MAX_DENSITY, lambda *a: None),
    }
    times: dict[str, list[float]] = {v: [] for v in variants}
    order = random.Random(0)
    try:
        for _ in range(warmup):
            step()
        for _ in range(rounds):
            names = list(variants)
            order.shuffle(names)
            for name in names:
                fused_elbo.SPARSE_MAX_DENSITY, native.gaussian_sample = variants[name]
                step()
                t = time.perf_counter()
                for _ in range(steps):
                    step()
                times[name].append((time.perf_counter() - t) / steps * 1e3)
    finally:
        fused_elbo.SPARSE_MAX_DENSITY, native.gaussian_sample = variants["all kernels"]
    full = times["all kernels"]
    print(f"\ntraining step, {rounds} rounds of {steps} steps, {torch.get_num_threads()} threads")
    for name, ts in times.items():
        ratio = statistics.median(a / b for a, b in zip(ts, full))
        print(f"{name:>22}: {statistics.median(ts):.3f} ms (median), {ratio:.3f}x the full step")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["layer", "step", "both"], default="both")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--steps", type=int, default=100, help="steps per block")
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--data-dir", default=None)
    args = p.parse_args()
    if native.sparse_first_layer() is None:
        raise SystemExit(f"no sparse first layer here: {native.why_not('sparse')}")
    if native.load("gaussian") is None:
        raise SystemExit(f"no Gaussian kernel here: {native.why_not('gaussian')}")
    images = load_dataset("mnist", data_dir(args.data_dir), download=False).train.images
    print(time.strftime("%Y-%m-%d %H:%M %Z"), torch.__version__)
    with denormals_flushed():
        if args.part in ("layer", "both"):
            layer_part(images, torch.get_num_threads())
        if args.part in ("step", "both"):
            step_part(images, args.rounds, args.steps, args.warmup)


if __name__ == "__main__":
    main()
