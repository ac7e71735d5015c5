"""Layer and allocator costs of the conv networks' training step, each against plain PyTorch.

* ``dropout``: vaelab's ``Dropout`` (``csrc/dropout.c``) against ``torch.nn.Dropout``, forward
  and backward, float32 and bfloat16, at the shapes of the ``conv`` network's two dropout
  layers (batch 128, MNIST and 3x64x64) in NHWC; best of 3 blocks; inside
  ``freed_memory_kept()`` for both, as in ``fit()``, so the figures are the layers' own.
* ``conv``: every convolution of the ``dcgan`` and ``conv`` networks (batch 128, MNIST and
  3x64x64 inputs, channels-last), vaelab's ``Conv2d`` / ``ConvTranspose2d`` against torch's
  with the same weights, forward + backward (input and weight gradients) as ``fit()`` runs
  them: hidden layers under bf16 autocast, the decoder's output layer in float32; best of 3.
* ``batchnorm``: batch norm + ReLU in training (batch statistics), forward + backward, at the
  shapes of the ``dcgan`` network (batch 128, MNIST and 3x64x64, channels-last): vaelab's
  ``BatchNormReLU2d`` against torch's ``BatchNorm2d`` then ``relu``, bfloat16 and float32.
* ``allocator``: one training step (forward, backward, fused Adam) of the ``conv`` and
  ``dcgan`` networks in NHWC float32, the steps' page faults and milliseconds with glibc's
  default malloc and inside ``vaelab.cpu.freed_memory_kept()`` (as ``fit()`` runs), alternated
  in fresh processes.

    python benchmarks/bench_layers.py [--part dropout|conv|batchnorm|allocator] [--steps 20]
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
from vaelab.nets.common import BatchNormReLU2d, Conv2d, ConvTranspose2d, Dropout


def best_ms(fn, calls: int = 10, blocks: int = 3) -> float:
    return best_seconds(fn, calls, blocks) * 1e3


def _layer_table(title: str, shapes, dtypes, pair) -> None:
    """torch's layer against vaelab's (``pair(shape)``), forward + backward on a channels-last
    batch of each shape and dtype: a table of best-of-3 milliseconds."""
    print(title)
    print(f"{'shape':>20} {'dtype':>9} {'torch':>8} {'vaelab':>8} {'ratio':>6}")
    for shape in shapes:
        for dtype in dtypes:
            x = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last)
            x.requires_grad_()
            g = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last)
            times = []
            for layer in pair(shape):

                def step(layer=layer, x=x, g=g):
                    layer(x).backward(g)
                    x.grad = None
                    layer.zero_grad()

                times.append(best_ms(step))
            name = "x".join(map(str, shape))
            print(
                f"{name:>20} {str(dtype)[6:]:>9} {times[0]:8.2f} {times[1]:8.2f} "
                f"{times[0] / times[1]:5.2f}x"
            )


def dropout_part() -> None:
    _layer_table(
        "dropout p = 0.25, forward + backward, NHWC (ms, best of 3 x 10 calls)",
        [(128, 64, 7, 7), (128, 32, 28, 28), (128, 64, 16, 16), (128, 32, 64, 64)],
        (torch.float32, torch.bfloat16),
        lambda shape: (nn.Dropout(0.25), Dropout(0.25)),
    )


# (network, input, kind, in, out, kernel, stride, padding, output padding, input side, output layer)
CONV_LAYERS = [
    ("dcgan", "mnist", "conv", 1, 32, 4, 2, 1, 0, 32, False),
    ("dcgan", "mnist", "conv", 32, 64, 4, 2, 1, 0, 16, False),
    ("dcgan", "mnist", "conv", 64, 128, 4, 2, 1, 0, 8, False),
    ("dcgan", "mnist", "conv", 128, 256, 4, 2, 1, 0, 4, False),
    ("dcgan", "mnist", "convT", 256, 128, 4, 2, 1, 0, 2, False),
    ("dcgan", "mnist", "convT", 128, 64, 4, 2, 1, 0, 4, False),
    ("dcgan", "mnist", "convT", 64, 32, 4, 2, 1, 0, 8, False),
    ("dcgan", "mnist", "convT", 32, 1, 4, 2, 1, 0, 16, True),
    ("dcgan", "3x64x64", "conv", 3, 32, 4, 2, 1, 0, 64, False),
    ("dcgan", "3x64x64", "conv", 32, 64, 4, 2, 1, 0, 32, False),
    ("dcgan", "3x64x64", "conv", 64, 128, 4, 2, 1, 0, 16, False),
    ("dcgan", "3x64x64", "conv", 128, 256, 4, 2, 1, 0, 8, False),
    ("dcgan", "3x64x64", "convT", 256, 128, 4, 2, 1, 0, 4, False),
    ("dcgan", "3x64x64", "convT", 128, 64, 4, 2, 1, 0, 8, False),
    ("dcgan", "3x64x64", "convT", 64, 32, 4, 2, 1, 0, 16, False),
    ("dcgan", "3x64x64", "convT", 32, 3, 4, 2, 1, 0, 32, True),
    ("conv", "mnist", "conv", 1, 32, 3, 2, 1, 0, 28, False),
    ("conv", "mnist", "conv", 32, 64, 3, 2, 1, 0, 14, False),
    ("conv", "mnist", "convT", 64, 64, 3, 2, 1, 1, 7, False),
    ("conv", "mnist", "convT", 64, 32, 3, 2, 1, 1, 14, False),
    ("conv", "mnist", "convT", 32, 1, 3, 1, 1, 0, 28, True),
]


def conv_part() -> None:
    print("convolutions, forward + backward, batch 128, channels-last (ms, best of 3 x 10 calls)")
    print(
        f"{'network':>8} {'input':>8} {'layer':>26} {'dtype':>9} {'torch':>8} {'vaelab':>8} {'ratio':>6}"
    )
    cl = torch.channels_last
    for arch, data, kind, cin, cout, k, s, p, op, h, last in CONV_LAYERS:
        torch.manual_seed(0)
        if kind == "conv":
            pair = (nn.Conv2d(cin, cout, k, s, p), Conv2d(cin, cout, k, s, p))
        else:
            pair = (
                nn.ConvTranspose2d(cin, cout, k, s, p, op),
                ConvTranspose2d(cin, cout, k, s, p, op),
            )
        pair[1].load_state_dict(pair[0].state_dict())
        ref, ours = (m.to(memory_format=cl) for m in pair)
        x = torch.randn(128, cin, h, h).contiguous(memory_format=cl)
        x.requires_grad_(cin > 3)  # an encoder's first layer has no input gradient
        bf16 = not last  # vaelab keeps the decoder's output layer in float32
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16), torch.no_grad():
            g = torch.randn_like(ref(x)).contiguous(memory_format=cl)
        times = []
        for layer in (ref, ours):

            def step(layer=layer, x=x, g=g, bf16=bf16):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    y = layer(x)
                y.backward(g)
                layer.weight.grad = layer.bias.grad = x.grad = None

            times.append(best_ms(step))
        name = f"{kind} {cin}->{cout} k{k}s{s} {h}x{h}"
        dtype = "bfloat16" if bf16 else "float32"
        print(
            f"{arch:>8} {data:>8} {name:>26} {dtype:>9} {times[0]:8.2f} {times[1]:8.2f} "
            f"{times[0] / times[1]:5.2f}x"
        )


def batchnorm_part() -> None:
    shapes = [(128, 32, 16, 16), (128, 64, 8, 8), (128, 128, 4, 4), (128, 256, 2, 2)]
    shapes += [(128, 32, 32, 32), (128, 64, 16, 16), (128, 128, 8, 8), (128, 256, 4, 4)]
    _layer_table(
        "batch norm + ReLU, training, forward + backward, NHWC (ms, best of 3 x 10 calls)",
        shapes,
        (torch.bfloat16, torch.float32),
        lambda shape: (
            nn.Sequential(nn.BatchNorm2d(shape[1]), nn.ReLU()),
            BatchNormReLU2d(shape[1]),
        ),
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
    p.add_argument(
        "--part", choices=("dropout", "conv", "batchnorm", "allocator", "all"), default="all"
    )
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.part in ("dropout", "all"):
        with freed_memory_kept():
            dropout_part()
    if args.part in ("conv", "all"):
        with freed_memory_kept():
            conv_part()
    if args.part in ("batchnorm", "all"):
        with freed_memory_kept():
            batchnorm_part()
    if args.part in ("allocator", "all"):
        allocator_part(args.steps, args.rounds)


if __name__ == "__main__":
    main()
