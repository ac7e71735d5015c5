"""Benchmark: importance-sampled log-likelihood (k = 1000) on the MNIST test set for the
784-400-20 MLP VAE, against the time the machine's matrix-multiply throughput allows for the
decoder's FLOPs, both measured in this run.

    python benchmarks/bench_eval.py                 # 10,000 test images, k = 1000
    python benchmarks/bench_eval.py --images 1000   # quicker
    python benchmarks/bench_eval.py --k 100         # the pythae get_nll comparison point

Decoder FLOPs per importance sample: 2 * (Z*H + H*D) = 2 * (20*400 + 400*784) = 643,200 (the
bias adds and ReLU are not counted). The matmul-bound time is those FLOPs over the best fp32
throughput torch.addmm reaches at the decoder's own shapes in this process (the layer
(rows, 400) x (400, 784) at the evaluation's chunk size, with the threads in use); the
target is IS time <= 1.5x that bound. The model is trained for ``--train-epochs`` (default 1) on
dynamically binarized MNIST, so logits and weights look like a real run's (the timing does not
depend on them). MNIST comes from ``--data-dir``, ``$VAELAB_DATA_DIR`` or /work/shared/data.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import torch


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=10_000, help="test images (default all 10,000)")
    p.add_argument("--k", type=int, default=1000, help="importance samples per image")
    p.add_argument(
        "--rows", type=int, default=None, help="decoder rows per chunk (default: library's)"
    )
    p.add_argument(
        "--train-epochs", type=float, default=1.0, help="quick training first (0: fresh init)"
    )
    p.add_argument("--generic", action="store_true", help="also time the unfused generic path")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return p.parse_args()


def data_dir(arg: str | None) -> str | None:
    if arg:
        return arg
    if os.environ.get("VAELAB_DATA_DIR"):
        return None
    shared = Path("/work/shared/data")
    return str(shared) if (shared / "mnist").is_dir() else None


def build_and_train(data, epochs: float):
    from vaelab.config import ModelConfig
    from vaelab.data import BatchIterator
    from vaelab.model import build_model
    from vaelab.objectives import elbo

    torch.manual_seed(0)
    model = build_model(
        ModelConfig(arch="mlp", hidden=(400,), latent_dim=20, likelihood="bernoulli"), (1, 28, 28)
    )
    if epochs > 0:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        it = BatchIterator(data.train, 128, shuffle=True, seed=0)
        steps = int(epochs * len(it))
        g = torch.Generator().manual_seed(0)
        done = 0
        for e in range(math.ceil(epochs)):
            for x in it.epoch(e):
                loss = elbo(model, x, generator=g).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                done += 1
                if done >= steps:
                    break
    return model.eval()


def time_addmm(rows: int, k_in: int, n_out: int, reps: int = 7) -> float:
    """Best seconds of one fp32 addmm (rows, k_in) x (k_in, n_out) + bias, output preallocated."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(rows, k_in, generator=g)
    w = torch.randn(n_out, k_in, generator=g)
    b = torch.randn(n_out, generator=g)
    out = torch.empty(rows, n_out)
    inner = max(3, int(2e10 / (2 * rows * k_in * n_out)))  # ~0.15 s per rep
    for _ in range(3):
        torch.addmm(b, a, w.t(), out=out)
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(inner):
            torch.addmm(b, a, w.t(), out=out)
        best = min(best, (time.perf_counter() - t) / inner)
    return best


def matmul_throughput(rows: int) -> dict:
    """GFLOP/s of the decoder's two layers at ``rows`` rows, and of the big layer alone."""
    t1 = time_addmm(rows, 20, 400)
    t2 = time_addmm(rows, 400, 784)
    f1, f2 = 2 * rows * 20 * 400, 2 * rows * 400 * 784
    return {
        "rows": rows,
        "layer1_gflops": f1 / t1 / 1e9,
        "layer2_gflops": f2 / t2 / 1e9,
        "decoder_gflops": (f1 + f2) / (t1 + t2) / 1e9,
        "best_gflops": max(f1 / t1, f2 / t2) / 1e9,
    }


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from vaelab.data import load_dataset
    from vaelab.metrics.base import READ_BATCH
    from vaelab.metrics.likelihood import DEFAULT_ROWS, importance_sampled_log_likelihood

    rows = args.rows or DEFAULT_ROWS
    data = load_dataset("mnist", data_dir(args.data_dir), binarize="dynamic", download=False)
    t = time.perf_counter()
    model = build_and_train(data, args.train_epochs)
    train_s = time.perf_counter() - t
    test = data.test.subset(slice(0, args.images))
    n = len(test)

    def batches():
        from vaelab.data import BatchIterator

        return BatchIterator(test, READ_BATCH, shuffle=False, seed=0).epoch(0)

    before = matmul_throughput(rows)
    g = torch.Generator().manual_seed(0)
    res = importance_sampled_log_likelihood(model, batches(), k=args.k, generator=g, rows=rows)
    after = matmul_throughput(rows)

    per_sample = 2 * (20 * 400 + 400 * 784)
    flops = per_sample * n * args.k
    best = max(before["layer2_gflops"], after["layer2_gflops"]) * 1e9
    at_shapes = max(before["decoder_gflops"], after["decoder_gflops"]) * 1e9
    bound, bound_shapes = flops / best, flops / at_shapes
    out = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cpu": _cpu(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "model": "mlp 784-400-20, bernoulli, "
        + (
            f"trained {args.train_epochs:g} epoch(s) ({train_s:.0f} s)"
            if args.train_epochs
            else "fresh init"
        ),
        "images": n,
        "k": args.k,
        "rows_per_chunk": rows,
        "is_seconds": round(res.seconds, 2),
        "decoder_tflop": round(flops / 1e12, 3),
        "achieved_gflops": round(flops / res.seconds / 1e9, 1),
        "matmul_gflops_before": {k: round(v, 1) for k, v in before.items()},
        "matmul_gflops_after": {k: round(v, 1) for k, v in after.items()},
        "matmul_bound_s": round(bound, 2),
        "ratio": round(res.seconds / bound, 3),
        "matmul_bound_at_layer_shapes_s": round(bound_shapes, 2),
        "ratio_at_layer_shapes": round(res.seconds / bound_shapes, 3),
        "log_px_nats": round(res.mean, 3),
        "log_px_stderr": round(res.stderr or 0.0, 3),
        "mean_log_w_nats": round(res.mean_log_w.mean().item(), 3),
    }
    if args.generic:
        from vaelab.metrics import likelihood as lik

        sub = test.subset(slice(0, min(n, 200)))
        from vaelab.data import BatchIterator

        fast = lik._fast_bernoulli
        lik._fast_bernoulli = lambda m, d: False
        try:
            r2 = importance_sampled_log_likelihood(
                model,
                BatchIterator(sub, READ_BATCH, shuffle=False).epoch(0),
                k=args.k,
                generator=torch.Generator().manual_seed(0),
                rows=rows,
            )
        finally:
            lik._fast_bernoulli = fast
        out["generic_path_s_per_image"] = round(r2.seconds / len(sub), 5)
        out["fused_path_s_per_image"] = round(res.seconds / n, 5)
    print(
        f"IS log-likelihood, k={args.k}, {n} MNIST test images, 784-400-20 MLP, "
        f"{out['threads']} threads on {out['cpu']}\n"
        f"  time                 {res.seconds:8.2f} s   ({out['achieved_gflops']} GFLOP/s of decoder work)\n"
        f"  decoder FLOPs        {flops / 1e12:8.3f} TFLOP ({per_sample:,} per sample)\n"
        f"  matmul throughput    {best / 1e9:8.1f} GFLOP/s (addmm {rows}x400x784, best of before/after)\n"
        f"  matmul-bound time    {bound:8.2f} s\n"
        f"  ratio                {res.seconds / bound:8.3f}   (target <= 1.5)\n"
        f"  (bound at both layers' own shapes {bound_shapes:.2f} s, ratio {res.seconds / bound_shapes:.3f})\n"
        f"  log p(x)             {res.mean:8.3f} +- {res.stderr or 0:.3f} nats/image"
    )
    if args.generic:
        print(
            f"  generic (unfused) path {out['generic_path_s_per_image'] * 1e3:.2f} ms/image vs "
            f"fused {out['fused_path_s_per_image'] * 1e3:.2f} ms/image"
        )
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


def _cpu() -> str:
    try:
        from vaelab.devices import cpu_model

        return cpu_model()
    except ImportError:
        return platform.processor()


if __name__ == "__main__":
    main()
