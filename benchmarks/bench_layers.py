"""Layer and allocator costs of the conv networks' training step, each against plain PyTorch.

* ``dropout``: vaelab's ``Dropout`` (``csrc/dropout.c``) against ``torch.nn.Dropout``, forward
  and backward, float32 and bfloat16, at the shapes of the ``conv`` network's two dropout
  layers (batch 128, MNIST and 3x64x64) in NHWC; best of 3 blocks; inside
  ``freed_memory_kept()`` for both, as in ``fit()``, so the figures are the layers' own.
* ``allocator``: one training step (forward, backward, fused Adam) of the ``conv`` and
  ``dcgan`` networks in NHWC float32, the steps' page faults and milliseconds with glibc's
  default malloc and inside ``vaelab.cpu.freed_memory_kept()`` (as ``fit()`` runs), alternated
  in fresh processes.

    python benchmarks/bench_layers.py [--part dropout|allocator] [--steps 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

import torch
from _common import best_seconds
from torch import nn

from vaelab.cpu import freed_memory_kept
from vaelab.nets.common import Dropout


def best_ms(fn, calls: int = 10, blocks: int = 3) -> float:
    return best_seconds(fn, calls, blocks) * 1e3


def dropout_part() -> None:
    print("dropout p = 0.25, forward + backward, NHWC (ms, best of 3 x 10 calls)")
    print(f"{'shape':>20} {'dtype':>9} {'torch':>8} {'vaelab':>8} {'ratio':>6}")
    shapes = [(128, 64, 7, 7), (128, 32, 28, 28), (128, 64, 16, 16), (128, 32, 64, 64)]
    for shape in shapes:
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last)
            x.requires_grad_()
            g = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last)
            times = []
            for layer in (nn.Dropout(0.25), Dropout(0.25)):

                def step(layer=layer, x=x, g=g):
                    layer(x).backward(g)
                    x.grad = None

                times.append(best_ms(step))
            name = "x".join(map(str, shape))
            print(
                f"{name:>20} {str(dtype)[6:]:>9} {times[0]:8.2f} {times[1]:8.2f} "
                f"{times[0] / times[1]:5.1f}x"
            )


_STEP = """
import json, resource, sys, time
from contextlib import nullcontext
import torch
from vaelab import load_preset, override
from vaelab.cpu import freed_memory_kept
from vaelab.model import build_model
from vaelab.optim import FusedAdam

arch, kept, steps = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
torch.manual_seed(0)
cfg = override(load_preset("pytorch-examples"), [f"model.arch={arch}", "model.hidden="])
model = build_model(cfg.model, (1, 28, 28)).to(memory_format=torch.channels_last)
opt = FusedAdam(model.parameters(), lr=1e-3)
x = torch.rand(128, 1, 28, 28).contiguous(memory_format=torch.channels_last)

def step():
    opt.zero_grad()
    mu, logvar = model.encoder(x)
    model.decoder(mu).sum().backward()
    opt.step()

with freed_memory_kept() if kept else nullcontext():
    for _ in range(5):
        step()
    f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
    for _ in range(steps):
        step()
    t1, f1 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
print(json.dumps({"ms": (t1 - t0) / steps * 1e3, "faults": (f1 - f0) / steps}))
"""


def allocator_part(steps: int, rounds: int) -> None:
    print(
        f"one step, NHWC float32, batch 128, MNIST shape ({steps} steps after 5, {rounds} rounds)"
    )
    print(f"{'arch':>6} {'malloc':>8} {'faults/step':>12} {'ms/step':>8}")
    for arch in ("conv", "dcgan"):
        runs = {"default": [], "kept": []}
        for _ in range(rounds):
            for name, flag in (("default", "0"), ("kept", "1")):
                cmd = [sys.executable, "-c", _STEP, arch, flag, str(steps)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                runs[name].append(json.loads(out.stdout))
        for name, rs in runs.items():
            faults = statistics.median(r["faults"] for r in rs)
            ms = statistics.median(r["ms"] for r in rs)
            print(f"{arch:>6} {name:>8} {faults:12,.0f} {ms:8.1f}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("dropout", "allocator", "all"), default="all")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.part in ("dropout", "all"):
        with freed_memory_kept():
            dropout_part()
    if args.part in ("allocator", "all"):
        allocator_part(args.steps, args.rounds)


if __name__ == "__main__":
    main()
