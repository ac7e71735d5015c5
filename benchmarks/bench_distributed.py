"""Benchmark: training throughput on 1 process against N data-parallel processes (torchrun).

    python benchmarks/bench_distributed.py                       # 784-400-20 MLP on MNIST, CPU
    python benchmarks/bench_distributed.py --nproc 2 --steps 300
    python benchmarks/bench_distributed.py --device cuda --nproc 4 --batch 512

Each configuration is a real ``vaelab train`` run (``--nproc N`` for the data-parallel one) of
``--steps`` optimizer steps at the same global batch; the figure is the training throughput,
``images_per_s`` of ``summary.json`` (images over the time spent in training steps; validation
excluded), and ``speedup`` is against the 1-process run with the same threads per process.
On the CPU each process gets ``--threads`` torch threads (default: cores / N), so 1 process
with all the cores is the baseline to beat. MNIST comes from ``--data-dir``,
``$VAELAB_DATA_DIR`` or ../shared/data beside the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import SHARED_DATA

SRC = Path(__file__).resolve().parents[1] / "src"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="pytorch-examples")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=128, help="the global batch")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", default=None)
    p.add_argument("overrides", nargs="*", help="more key=value config overrides")
    return p.parse_args()


def train(args, out: Path, nproc: int, threads: int) -> dict:
    cmd = [sys.executable, "-m", "vaelab", "train", args.preset, *args.overrides]
    cmd += [
        f"train.max_steps={args.steps}",
        f"train.batch_size={args.batch}",
        f"train.device={args.device}",
        f"train.threads={threads}",
        "train.log_every=100",
        "train.figures=false",
        "train.report=false",
        "--out",
        str(out),
        "--no-progress",
        "--nproc",
        str(nproc),
    ]
    env = dict(os.environ, PYTHONPATH=str(SRC))
    env.setdefault("VAELAB_DATA_DIR", args.data_dir or str(SHARED_DATA))
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    (run_dir,) = [p for p in out.iterdir() if p.is_dir()]
    return json.loads((run_dir / "summary.json").read_text())


def main() -> None:
    args = parse_args()
    cores = os.cpu_count() or 1
    rows = []
    plans = [(1, cores), (1, cores // args.nproc or 1), (args.nproc, cores // args.nproc or 1)]
    if args.device != "cpu":
        plans = [(1, 0), (args.nproc, 0)]
    for nproc, threads in dict.fromkeys(plans):
        with tempfile.TemporaryDirectory() as tmp:
            s = train(args, Path(tmp), nproc, threads)
        rows.append((nproc, threads, s["images_per_s"], s["hardware"]["device_name"]))
        print(
            f"{nproc} process(es) x {threads or 'default'} threads: "
            f"{s['images_per_s']:,.0f} images/s",
            flush=True,
        )
    best_one = max(ips for n, _, ips, _ in rows if n == 1)
    same = {t: ips for n, t, ips, _ in rows if n == 1}
    print(
        f"\n{args.preset}, global batch {args.batch}, {args.steps} steps, {args.device} "
        f"({rows[0][3]}, {cores} cores)"
    )
    print(
        "| processes | threads each | images/s | vs 1 process, same threads | vs best 1 process |"
    )
    print("|---:|---:|---:|---:|---:|")
    for n, t, ips, _ in rows:
        print(
            f"| {n} | {t or 'default'} | {ips:,.0f} | {ips / same[t]:.2f}x | {ips / best_one:.2f}x |"
        )


if __name__ == "__main__":
    main()
