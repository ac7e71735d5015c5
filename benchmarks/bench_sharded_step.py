"""The step of ``train.sharded`` (:class:`vaelab.sharded.ShardedStep`) against vaelab's fused
two-thread bf16 step, alternated in one run.

Blocks of ``--steps`` steps of each on the pytorch-examples network (784-400-20, batch 128,
MNIST batches drawn at random, Adam 1e-3), in random order each round; prints ms per step of
each, their per-round ratios, and the median. Needs what ``train.sharded`` needs (Linux, two
cores, native bf16, a C compiler); the gradients' agreement is tested in
tests/test_sharded.py.

    VAELAB_DATA_DIR=../shared/data python benchmarks/bench_sharded_step.py [--rounds 10]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
from _common import data_dir

from vaelab import load_preset
from vaelab.cpu import denormals_flushed
from vaelab.data import load_dataset
from vaelab.fused_elbo import fused_elbo_for
from vaelab.model import build_model
from vaelab.optim import FusedAdam
from vaelab.sharded import ShardedStep

B, Z = 128, 20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps", type=int, default=50, help="steps per block")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--data-dir", default=None)
    args = p.parse_args()

    cfg = load_preset("pytorch-examples")
    images = load_dataset("mnist", data_dir(args.data_dir), download=False).train.images
    gen = torch.Generator().manual_seed(0)

    def batch() -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(images), (B,), generator=gen)
        return images.index_select(0, idx).float().div_(255), torch.randn(1, B, Z, generator=gen)

    torch.manual_seed(0)
    fused_model = build_model(cfg.model, (1, 28, 28))
    sharded_model = build_model(cfg.model, (1, 28, 28))
    sharded_model.load_state_dict(fused_model.state_dict())
    fused = fused_elbo_for(fused_model, cfg.objective, torch.bfloat16)
    fused_opt = FusedAdam(fused_model.parameters())
    threads = torch.get_num_threads()
    sharded = ShardedStep(sharded_model, FusedAdam(sharded_model.parameters()), B)

    def fused_block(n: int) -> float:
        torch.set_num_threads(threads)
        t = time.perf_counter()
        for _ in range(n):
            x, eps = batch()
            loss = fused(x, eps, 1.0).loss
            fused_opt.zero_grad(set_to_none=True)
            loss.backward()
            fused_opt.step()
        return time.perf_counter() - t

    def sharded_block(n: int) -> float:
        torch.set_num_threads(1)  # as fit() runs it: this process is shard 0
        t = time.perf_counter()
        for _ in range(n):
            x, eps = batch()
            sharded(x, eps, 1.0, False)
        return time.perf_counter() - t

    try:
        with denormals_flushed():
            fused_block(args.warmup)
            sharded_block(args.warmup)
            times: dict[str, list[float]] = {"fused": [], "sharded": []}
            for _ in range(args.rounds):
                order = list(times)
                random.shuffle(order)
                for name in order:
                    block = fused_block if name == "fused" else sharded_block
                    times[name].append(block(args.steps) / args.steps * 1e3)
    finally:
        sharded.close()
        torch.set_num_threads(threads)
    ratios = [s / f for f, s in zip(times["fused"], times["sharded"])]
    print(f"ms per step, {args.rounds} rounds of {args.steps} steps (random order each round), "
          f"fused path on {threads} threads:")  # fmt: skip
    for name, ts in times.items():
        print(
            f"  {name:8s} median {statistics.median(ts):.3f}  " + " ".join(f"{t:.2f}" for t in ts)
        )
    print(f"  sharded / fused: median {statistics.median(ratios):.3f} "
          f"(rounds {' '.join(f'{q:.2f}' for q in ratios)})")  # fmt: skip


if __name__ == "__main__":
    main()
