"""Benchmark: vaelab's fit() against a loop written the way pytorch/examples writes it, side by side.

    python benchmarks/bench_train.py                  # MLP 784-400-20 on MNIST, 10 epochs, 3 rounds
    python benchmarks/bench_train.py --quick          # 2 epochs, 2 rounds (a few minutes)
    python benchmarks/bench_train.py --arch conv      # conv: throughput on MNIST and 3x64x64
    python benchmarks/bench_train.py --arch dcgan --steps 30

Each contender trains in its own fresh process with ``--threads`` torch threads, over ``--rounds``
rounds; the table gives every round and the medians. MLP: one contender's run after the other's
(A B A B ...). conv/dcgan: in each round both processes start together and take turns of
``--turn`` seconds (A B A B ... within the round, each running only while the other waits on a
pipe), the reference taking the first turn in odd rounds and vaelab in even ones: on a VM whose
speed drifts by 10-30% over seconds, runs one after the other compare different moments
(``--sequential`` runs them so, as the tenth session did).

* reference (pytorch/examples ``vae/main.py``): a DataLoader over a TensorDataset of float
  images, shuffle=True, the model's decoder ending in a sigmoid, loss
  ``F.binary_cross_entropy(recon, x, reduction="sum")`` + the closed-form KL, ``loss.item()``
  every step, ``torch.optim.Adam(lr=1e-3)``. For conv/dcgan the same loop trains vaelab's own
  encoder and decoder modules (sigmoid on the decoder's output) with torch's own layers in
  place of vaelab's C-kernel ones (Dropout, Conv2d, ConvTranspose2d, BatchNormReLU2d: what
  those bring is part of what vaelab brings).
* vaelab: ``fit()`` on the ``pytorch-examples`` preset (MLP 784-400-20, Bernoulli, Adam 1e-3,
  batch 128) with its default train settings (``--vaelab-set`` adds overrides); conv/dcgan use
  the same preset with ``model.arch`` changed. On a CPU with native bf16 the defaults run the
  MLP's products in bfloat16 (``train.bf16 = "auto"``; the script prints what vaelab trained
  in); ``--vaelab-set train.bf16=false`` compares float32 with float32.

Both see the same data: MNIST grey levels in [0, 1] (vaelab's 50,000-image train split and the
10,000 test images), or random uint8 3x64x64 images for the conv/dcgan throughput runs.

Figures:

* images/s: training images over training seconds (data loading included, every evaluation
  and vaelab's per-epoch validation excluded).
* matmul cap: the matrix products of one training step of the network at this batch size
  (per Linear layer the forward ``addmm`` and the weight-gradient ``mm``, plus the
  input-gradient ``mm`` for every layer but the first, whose input is the data; convolutions
  likewise), each timed alone, best of several repeats, just before each contender runs; cap =
  batch / that time, share = images/s / cap. The issue's count, which also times the first
  layer's input gradient (a product no training step computes), is printed beside it.
* test ELBO after ``--epochs`` epochs: one estimator for both -- one z per test image,
  Bernoulli log-likelihood on the decoder's logits (the reference's ``fc4`` output) and the
  closed-form KL, nats per image, averaged over the 10,000 test images.
* seconds to ``--target`` nats: training seconds until that test -ELBO, checked every
  ``--check-every`` steps, first is <= target (the clock stops during each check).
* peak memory: the training process's resident-set high-water mark (VmHWM), data included.

``--device cuda`` (or ``auto``) trains both contenders on the GPU: the reference moves each
batch there as pytorch/examples does, vaelab keeps the data resident on the device; clocks and
the matmul cap synchronise with the device, and peak device memory is reported too.

MNIST comes from ``--data-dir``, ``$VAELAB_DATA_DIR`` or ../shared/data beside the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import data_dir
from torch import nn

ARCHS = ("mlp", "conv", "dcgan")
CONTENDERS = ("reference", "vaelab")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=ARCHS, default="mlp")
    p.add_argument("--epochs", type=int, default=10, help="MLP: epochs per run (default 10)")
    p.add_argument(
        "--rounds", type=int, default=None, help="A B rounds (default: MLP 3, conv/dcgan 4)"
    )
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="2 epochs (conv/dcgan: 10 steps), 2 rounds")
    p.add_argument("--target", type=float, default=110.0, help="test -ELBO target, nats")
    p.add_argument("--check-every", type=int, default=25, help="steps between target checks")
    p.add_argument(
        "--steps", type=int, default=None, help="conv/dcgan: timed steps per run (default 100)"
    )
    p.add_argument("--warmup", type=int, default=3, help="conv/dcgan: untimed first steps")
    p.add_argument(
        "--turn",
        type=float,
        default=1.5,
        help="conv/dcgan: seconds of steps per turn when the contenders take turns (default 1.5)",
    )
    p.add_argument(
        "--sequential",
        action="store_true",
        help="conv/dcgan: one contender's whole run after the other's (the tenth session's "
        "way), not turns of --turn seconds",
    )
    p.add_argument("--seed", type=int, default=0, help="round r uses seed + r (both contenders)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto: where both contenders train")
    p.add_argument(
        "--vaelab-set",
        nargs="*",
        default=[],
        help="extra overrides for vaelab (train.compile=true)",
    )
    p.add_argument("--only", choices=CONTENDERS, default=None, help="run one contender only")
    p.add_argument("--json", default=None, help="also write every figure to this JSON file")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one run
    p.add_argument("--shape", default="mnist", help=argparse.SUPPRESS)
    p.add_argument("--baton", default=None, help=argparse.SUPPRESS)  # internal: "read_fd,write_fd"
    args = p.parse_args(argv)
    if args.rounds is None:
        args.rounds = 3 if args.arch == "mlp" else 4
    if args.quick:
        args.epochs, args.rounds = min(args.epochs, 2), min(args.rounds, 2)
        args.steps = args.steps or 10
    args.steps = args.steps or 100
    if args.threads is None:
        args.threads = torch.get_num_threads()
    return args


# ------------------------------------------------------------------------------ the reference


class ReferenceVAE(nn.Module):
    """pytorch/examples vae/main.py, as written there (fc21/fc22 heads, sigmoid output)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(784, 400)
        self.fc21 = nn.Linear(400, 20)
        self.fc22 = nn.Linear(400, 20)
        self.fc3 = nn.Linear(20, 400)
        self.fc4 = nn.Linear(400, 784)

    def encode(self, x):
        h1 = F.relu(self.fc1(x))
        return self.fc21(h1), self.fc22(h1)

    def reparameterize(self, mu, logvar):
        std = torch.exp(0.5 * logvar)
        eps = torch.randn_like(std)
        return mu + eps * std

    def logits(self, z):
        return self.fc4(F.relu(self.fc3(z)))

    def decode(self, z):
        return torch.sigmoid(self.logits(z))

    def forward(self, x):
        mu, logvar = self.encode(x.view(-1, 784))
        z = self.reparameterize(mu, logvar)
        return self.decode(z), mu, logvar


class ReferenceOf(nn.Module):
    """The pytorch/examples loop's model around vaelab's encoder and decoder modules, in plain
    PyTorch: vaelab's layers that subclass torch's (Dropout, Conv2d, ConvTranspose2d, with C
    kernels on the CPU) become torch's own with the same state, and BatchNormReLU2d becomes
    torch's BatchNorm2d followed by ReLU."""

    def __init__(self, vae) -> None:
        super().__init__()
        self.encoder, self.decoder = vae.encoder, vae.decoder
        for module in (self.encoder, self.decoder):
            for parent in list(module.modules()):
                for name, child in list(parent.named_children()):
                    if isinstance(child, nn.BatchNorm2d) and type(child) is not nn.BatchNorm2d:
                        child.__class__ = nn.BatchNorm2d  # BatchNormReLU2d: the same state
                        setattr(parent, name, nn.Sequential(child, nn.ReLU()))
                    for base in (nn.Dropout, nn.Conv2d, nn.ConvTranspose2d):
                        if isinstance(child, base) and type(child) is not base:
                            child.__class__ = base  # vaelab's subclasses add no state

    def encode(self, x):
        return self.encoder(x)

    def logits(self, z):
        return self.decoder(z)

    def forward(self, x):
        mu, logvar = self.encoder(x)
        std = torch.exp(0.5 * logvar)
        z = mu + torch.randn_like(std) * std
        return torch.sigmoid(self.decoder(z)), mu, logvar


def loss_function(recon_x, x, mu, logvar):
    """pytorch/examples: reconstruction + KL summed over all elements and the batch."""
    bce = F.binary_cross_entropy(recon_x, x.view_as(recon_x), reduction="sum")
    kld = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp())
    return bce + kld


# ------------------------------------------------------------------------------ shared pieces


DEVICE = torch.device("cpu")  # set from --device in each worker


def sync() -> None:
    """Wait for the device's queued work (CUDA runs asynchronously), so a clock reads it."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


class Clock:
    """Training seconds, with the clock stopped while evaluating."""

    def __init__(self) -> None:
        self.total, self._t0 = 0.0, None

    def start(self) -> None:
        if self._t0 is None:
            sync()
            self._t0 = time.perf_counter()

    @property
    def running(self) -> bool:
        return self._t0 is not None

    def stop(self) -> None:
        if self._t0 is not None:
            sync()
            self.total += time.perf_counter() - self._t0
            self._t0 = None


class Baton:
    """A contender's side of the turns (conv/dcgan): it says it is ready, waits for its turn,
    and at the first step end ``seconds`` or more into a turn stops its clock, hands the turn
    back to the parent process and waits for the next. Without ``spec`` (``--sequential``,
    MLP) nothing waits."""

    def __init__(self, spec: str | None, seconds: float) -> None:
        self.fds = tuple(int(f) for f in spec.split(",")) if spec else None
        self.seconds, self.began = seconds, time.perf_counter()

    def _wait(self) -> None:
        if os.read(self.fds[0], 1) != b"g":
            raise SystemExit("bench_train: the parent process went away")

    def start(self) -> None:
        """Ready: wait for the first turn."""
        if self.fds:
            os.write(self.fds[1], b"r")
            self._wait()
            self.began = time.perf_counter()

    def step_done(self, clock: Clock) -> None:
        if self.fds and time.perf_counter() - self.began >= self.seconds:
            running = clock.running
            clock.stop()
            os.write(self.fds[1], b"d")
            self._wait()
            self.began = time.perf_counter()
            if running:
                clock.start()

    def finish(self) -> None:
        if self.fds:
            os.write(self.fds[1], b"e")


@torch.inference_mode()
def test_elbo(encode, decode_logits, x_test: torch.Tensor, seed: int = 0) -> float:
    """The ELBO (nats per image) of x_test (N, C, H, W): one z per image, Bernoulli on logits,
    closed-form KL. ``encode(x) -> (mu, logvar)``, ``decode_logits(z) -> logits``."""
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for i in range(0, len(x_test), 1000):
        x = x_test[i : i + 1000].to(DEVICE)
        mu, logvar = encode(x)
        z = mu + torch.exp(0.5 * logvar) * torch.randn(mu.shape, generator=g).to(DEVICE)
        logits = decode_logits(z).reshape(len(x), -1)
        rec = F.binary_cross_entropy_with_logits(logits, x.reshape(len(x), -1), reduction="none")
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(1)
        total += float((rec.sum(1) + kl).sum())
    return -total / len(x_test)


class TargetWatch:
    """When did the test -ELBO first reach ``target``? Every ``every`` steps the weights are
    copied (clock stopped, ~0.1 ms); at each epoch end the copies are scored in order until one
    reaches the target. Scoring 10,000 test images in the middle of an epoch would evict the
    training step's working set from the caches and slow the steps that follow (by ~15%
    measured here), which would understate both contenders' images/s."""

    def __init__(self, clock: Clock, x_test, target: float, every: int, eval_model, encode, decode):
        self.clock, self.x_test, self.target, self.every = clock, x_test, target, every
        self.eval_model, self.encode, self.decode = eval_model.eval(), encode, decode
        self.pending: list[tuple[float, int, dict]] = []
        self.reached: dict | None = None
        self.checks = 0

    def snapshot(self, step: int, model: nn.Module) -> None:
        if self.reached is not None or self.every <= 0 or step % self.every:
            return
        self.clock.stop()
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.pending.append((self.clock.total, step, weights))
        self.clock.start()

    def resolve(self) -> None:
        """Score the pending copies (call with the clock stopped)."""
        for seconds, step, weights in self.pending:
            if self.reached is not None:
                break
            self.eval_model.load_state_dict(weights)
            nll = -test_elbo(self.encode, self.decode, self.x_test)
            self.checks += 1
            if nll <= self.target:
                self.reached = {"seconds": seconds, "step": step, "nll": nll}
        self.pending.clear()


def peak_device_mb() -> float | None:
    """Peak memory allocated on the CUDA device in MB (None on the CPU)."""
    if DEVICE.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(DEVICE) / 2**20


def peak_rss_mb() -> float:
    """This process's resident-set high-water mark in MB (VmHWM; ru_maxrss elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def vaelab_config(args, arch: str, extra: list[str]):
    from vaelab import load_preset, override

    sets = [
        f"seed={args.seed}",
        f"train.batch_size={args.batch}",
        f"train.threads={args.threads}",
        f"train.device={args.device}",
        "train.figures=false",
        "train.report=false",
        *extra,
    ]
    if arch != "mlp":
        sets += [f"model.arch={arch}", "model.hidden="]
    return override(load_preset("pytorch-examples"), sets + list(args.vaelab_set))


def random_splits(n: int, shape=(3, 64, 64), seed: int = 0):
    """n random uint8 images of ``shape`` as DataSplits (empty valid and test splits)."""
    from vaelab.data.base import DataInfo, DataSplits, ImageSet

    info = DataInfo(f"random-{'x'.join(map(str, shape))}", tuple(shape), "8bit")
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
    empty = ImageSet(images[:0], None, info)
    return DataSplits(info, ImageSet(images, None, info), empty, empty)


# ------------------------------------------------------------------------------ workers


def run_worker(args) -> dict:
    """One contender, one run, in this process; returns its figures."""
    global DEVICE
    torch.set_num_threads(args.threads)
    from vaelab.data import load_dataset
    from vaelab.devices import pick_device

    DEVICE = pick_device(args.device)

    if args.shape == "mnist":
        data = load_dataset("mnist", data_dir(args.data_dir), download=False)
    else:
        shape = tuple(int(s) for s in args.shape.split("x"))
        data = random_splits((args.warmup + args.steps) * args.batch, shape, args.seed)
    if args.arch == "mlp":
        out = mlp_reference(args, data) if args.worker == "reference" else mlp_vaelab(args, data)
    else:
        out = throughput_run(args, data)
    out["peak_rss_mb"] = peak_rss_mb()
    out["peak_device_mb"] = peak_device_mb()
    return out


def mlp_reference(args, data) -> dict:
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(args.seed)
    train_x = data.train.to_float(data.train.images)  # (50000, 1, 28, 28) float32
    x_test = data.test.to_float(data.test.images)
    model = ReferenceVAE().to(DEVICE)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(TensorDataset(train_x), batch_size=args.batch, shuffle=True)
    shadow = ReferenceVAE().to(DEVICE)  # scores the weight copies
    encode, decode = (lambda x: shadow.encode(x.view(-1, 784))), shadow.logits
    clock = Clock()
    watch = TargetWatch(clock, x_test, args.target, args.check_every, shadow, encode, decode)
    step = images = 0
    for _epoch in range(args.epochs):
        clock.start()
        model.train()
        train_loss = 0.0
        for (x,) in loader:
            x = x.to(DEVICE)  # as pytorch/examples: data.to(device) every step
            optimizer.zero_grad()
            recon_batch, mu, logvar = model(x)
            loss = loss_function(recon_batch, x, mu, logvar)
            loss.backward()
            train_loss += loss.item()
            optimizer.step()
            step += 1
            images += len(x)
            watch.snapshot(step, model)
        clock.stop()
        watch.resolve()
    model.eval()
    encode, decode = (lambda x: model.encode(x.view(-1, 784))), model.logits
    return {
        "images": images,
        "train_s": clock.total,
        "images_per_s": images / clock.total,
        "test_elbo": test_elbo(encode, decode, x_test, seed=1),
        "to_target": watch.reached,
        "checks": watch.checks,
    }


class _Probe:
    """fit() callback: the training clock (stopped for validation and the target checks)."""

    def __init__(
        self, clock: Clock, watch: TargetWatch | None, warmup: int = 0, baton: Baton | None = None
    ) -> None:
        self.clock, self.watch, self.warmup, self.baton = clock, watch, warmup, baton

    def on_train_begin(self, st) -> None:
        if self.warmup == 0:
            self.clock.start()

    def on_step_end(self, st) -> None:
        if st.step == self.warmup:
            self.clock.start()
        if self.watch is not None:
            self.watch.snapshot(st.step, st.model)
        if st.batch == st.steps_per_epoch or st.step == st.total_steps:
            self.clock.stop()  # epoch-end validation and checkpoint follow
        elif self.baton is not None:
            self.baton.step_done(self.clock)

    def on_epoch_end(self, st, records) -> None:
        if self.watch is not None:
            self.watch.resolve()
        if st.step < st.total_steps:
            self.clock.start()

    def on_train_end(self, st, result) -> None:
        self.clock.stop()
        if self.watch is not None:
            self.watch.resolve()


def _mu_logvar(model, x):
    q = model.encode(x)
    return q.mu, q.logvar


def mlp_vaelab(args, data) -> dict:
    from vaelab import fit
    from vaelab.model import build_model

    cfg = vaelab_config(args, "mlp", [f"train.epochs={args.epochs}"])
    x_test = data.test.to_float(data.test.images)
    clock = Clock()
    shadow = build_model(cfg.model, data.info.shape).to(DEVICE)  # scores the weight copies
    watch = TargetWatch(
        clock, x_test, args.target, args.check_every, shadow,
        lambda x: _mu_logvar(shadow, x), shadow.decoder,
    )  # fmt: skip
    result = fit(cfg, data=data, out_dir=None, progress=False, callbacks=[_Probe(clock, watch)])
    model = result.model.eval()
    images = len(data.train) * args.epochs  # every epoch sees every image (last batch partial)
    return {
        "images": images,
        "train_s": clock.total,
        "images_per_s": images / clock.total,
        "fit_images_per_s": result.summary["images_per_s"],
        "precision": result.summary.get("precision"),
        "test_elbo": test_elbo(lambda x: _mu_logvar(model, x), model.decoder, x_test, seed=1),
        "to_target": watch.reached,
        "checks": watch.checks,
    }


def throughput_run(args, data) -> dict:
    """conv/dcgan: images/s over ``args.steps`` steps after ``args.warmup`` untimed ones."""
    from vaelab import fit
    from vaelab.model import build_model

    total = args.warmup + args.steps
    clock = Clock()
    baton = Baton(args.baton, args.turn)
    precision = "float32"
    if args.worker == "vaelab":
        cfg = vaelab_config(args, args.arch, [f"train.max_steps={total}"])

        class Ready:  # the turns start once fit() has set up
            def on_train_begin(self, st) -> None:
                baton.start()

        precision = fit(
            cfg,
            data=data,
            out_dir=None,
            progress=False,
            callbacks=[Ready(), _Probe(clock, None, args.warmup, baton)],
        ).summary.get("precision")
    else:
        from torch.utils.data import DataLoader, TensorDataset

        cfg = vaelab_config(args, args.arch, [])
        torch.manual_seed(args.seed)
        model = ReferenceOf(build_model(cfg.model, data.info.shape)).to(DEVICE)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        train_x = data.train.to_float(data.train.images)
        loader = DataLoader(TensorDataset(train_x), batch_size=args.batch, shuffle=True)
        model.train()
        step = 0
        baton.start()
        for (x,) in loader:
            x = x.to(DEVICE)
            optimizer.zero_grad()
            recon_batch, mu, logvar = model(x)
            loss = loss_function(recon_batch, x, mu, logvar)
            loss.backward()
            _ = loss.item()
            optimizer.step()
            step += 1
            if step == args.warmup:
                clock.start()
            if step == total:
                break
            baton.step_done(clock)
        clock.stop()
    baton.finish()
    images = args.steps * args.batch
    return {
        "images": images,
        "train_s": clock.total,
        "images_per_s": images / clock.total,
        "precision": precision,
    }


# ------------------------------------------------------------------------------ the matmul cap


def matmul_cap(arch: str, shape, batch: int, reps: int = 5) -> dict:
    """Seconds of the matrix products of one training step of vaelab's ``arch`` network, each
    product timed alone (best of ``reps`` runs of a loop). Returns ``step_s`` (the products a
    step computes) and ``issue_s`` (plus the first layer's input gradient)."""
    from vaelab.config import ModelConfig
    from vaelab.model import build_model

    mcfg = ModelConfig(arch=arch, hidden=(400,) if arch == "mlp" else (), latent_dim=20)
    model = build_model(mcfg, shape).to(DEVICE)
    layers: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []

    def hook(m, inp, out):
        layers.append((m, inp[0].detach().clone(), torch.randn_like(out)))

    kinds = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    x = torch.rand(batch, *shape, device=DEVICE)
    q = model.encode(x)
    model.decode(q.mu)
    for h in handles:
        h.remove()
    first = layers[0][0]

    def products(with_first_input: bool):
        ops = []
        for m, inp, g in layers:
            need_input = with_first_input or m is not first
            w = m.weight.detach()
            if isinstance(m, nn.Linear):
                inp2 = inp.reshape(-1, m.in_features)
                g2 = g.reshape(-1, m.out_features)
                b = m.bias.detach() if m.bias is not None else w.new_zeros(m.out_features)
                ops.append(lambda b=b, i=inp2, w=w: torch.addmm(b, i, w.t()))
                ops.append(lambda g=g2, i=inp2: torch.mm(g.t(), i))
                if need_input:
                    ops.append(lambda g=g2, w=w: torch.mm(g, w))
            else:
                transposed = isinstance(m, nn.ConvTranspose2d)
                fwd = F.conv_transpose2d if transposed else F.conv2d
                kw = dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups)
                if transposed:
                    kw["output_padding"] = m.output_padding
                ops.append(lambda i=inp, w=w, kw=kw, f=fwd: f(i, w, None, **kw))
                out_pad = list(m.output_padding) if transposed else [0, 0]
                ops.append(
                    lambda g=g, i=inp, w=w, m=m, n=need_input, t=transposed, op=out_pad: (
                        torch.ops.aten.convolution_backward(
                            g,
                            i,
                            w,
                            None,
                            list(m.stride),
                            list(m.padding),
                            list(m.dilation),
                            t,
                            op,
                            m.groups,
                            [n, True, False],
                        )
                    )
                )
        return ops

    def best_time(ops) -> float:
        for f in ops:
            f()
        sync()
        t = time.perf_counter()
        for f in ops:
            f()
        sync()
        once = time.perf_counter() - t
        loops = max(3, int(0.1 / max(once, 1e-6)))
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            for _ in range(loops):
                for f in ops:
                    f()
            sync()
            best = min(best, (time.perf_counter() - t) / loops)
        return best

    step_ops, issue_ops = products(False), products(True)
    return {
        "step_s": best_time(step_ops),
        "issue_s": best_time(issue_ops),
        "products": len(step_ops),
    }


# ------------------------------------------------------------------------------ the driver


def _worker_cmd(args, contender: str, shape: str, seed: int) -> list[str]:
    cmd = [
        sys.executable, __file__, "--worker", contender, "--shape", shape, "--arch", args.arch,
        "--epochs", str(args.epochs), "--batch", str(args.batch), "--threads", str(args.threads),
        "--target", str(args.target), "--check-every", str(args.check_every),
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--seed", str(seed),
        "--device", args.device,
    ]  # fmt: skip
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    if args.vaelab_set:
        cmd += ["--vaelab-set", *args.vaelab_set]
    return cmd


def spawn(args, contender: str, shape: str, seed: int) -> dict:
    """One contender's whole run in a fresh process."""
    proc = subprocess.run(_worker_cmd(args, contender, shape, seed), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{contender} worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def spawn_turns(args, shape: str, seed: int, order: list[str]) -> dict:
    """Both contenders in fresh processes at once, taking turns of ``args.turn`` seconds (the
    first of ``order`` first): each runs only while the other waits on a pipe, so both see the
    machine in the same state. Returns each contender's figures."""
    import tempfile

    procs = {}
    try:
        for c in order:
            go_r, go_w = os.pipe()
            done_r, done_w = os.pipe()
            err = tempfile.TemporaryFile(mode="w+")
            cmd = _worker_cmd(args, c, shape, seed) + ["--baton", f"{go_r},{done_w}"]
            cmd += ["--turn", str(args.turn)]
            p = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=err, text=True, pass_fds=(go_r, done_w)
            )
            os.close(go_r)
            os.close(done_w)
            procs[c] = (p, go_w, done_r, err)
        for c in order:  # both set up (concurrently) before the first turn
            if os.read(procs[c][2], 1) != b"r":
                procs[c][0].wait()
                procs[c][3].seek(0)
                raise RuntimeError(f"{c} worker failed:\n{procs[c][3].read()[-4000:]}")
        active = list(order)
        while active:
            for c in list(active):
                _, go_w, done_r, _ = procs[c]
                os.write(go_w, b"g")
                if os.read(done_r, 1) in (b"e", b""):  # finished (or died)
                    active.remove(c)
        out = {}
        for c in order:
            p, go_w, done_r, err = procs[c]
            stdout, _ = p.communicate()
            if p.returncode != 0:
                err.seek(0)
                raise RuntimeError(f"{c} worker failed:\n{err.read()[-4000:]}")
            out[c] = json.loads(stdout.strip().splitlines()[-1])
        return out
    finally:
        for p, go_w, done_r, err in procs.values():
            for fd in (go_w, done_r):
                try:
                    os.close(fd)
                except OSError:
                    pass
            if p.poll() is None:
                p.kill()
                p.wait()
            err.close()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def main() -> None:
    global DEVICE
    args = parse_args()
    if args.worker:
        print(json.dumps(run_worker(args)))
        return
    from vaelab.devices import pick_device

    DEVICE = pick_device(args.device)
    torch.set_num_threads(args.threads)
    shapes = ["mnist"] if args.arch == "mlp" else ["mnist", "3x64x64"]
    contenders = [args.only] if args.only else list(CONTENDERS)
    header = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "device": str(DEVICE)
        + (f" ({torch.cuda.get_device_name(DEVICE)})" if DEVICE.type == "cuda" else ""),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
    }
    what = (
        f"{args.epochs} epochs of MNIST"
        if args.arch == "mlp"
        else f"{args.steps} timed steps after {args.warmup}"
        + (", one run after the other" if args.sequential else f", turns of {args.turn:g} s")
    )
    print(
        f"bench_train: arch {args.arch}, batch {args.batch}, {what}, {args.rounds} rounds, "
        f"{args.threads} threads"
    )
    print(
        f"{header['date']}; {header['cpu']}, {header['cores']} cores ({header['cpu_capability']}); "
        f"torch {header['torch']}, python {header['python']}; device {header['device']}"
    )
    if args.vaelab_set:
        print(f"vaelab overrides: {' '.join(args.vaelab_set)}")
    report = {"header": header, "shapes": {}}
    for shape in shapes:
        img_shape = (1, 28, 28) if shape == "mnist" else tuple(int(s) for s in shape.split("x"))
        rows, caps = [], []
        print(f"\n[{shape} {'x'.join(map(str, img_shape))}]")
        print(
            f"{'round':>5} {'contender':>10} {'load1':>6} {'img/s':>8} {'cap share':>9} "
            f"{'test ELBO':>10} {'s to ' + format(args.target, 'g'):>9} {'peak MB':>8}"
        )
        turns = args.arch != "mlp" and not args.sequential and len(contenders) == 2
        for r in range(args.rounds):
            paired = {}
            if turns:  # the reference takes the first turn in odd rounds, vaelab in even
                cap = matmul_cap(args.arch, img_shape, args.batch)
                load1 = os.getloadavg()[0]
                order = contenders if r % 2 == 0 else contenders[::-1]
                paired = spawn_turns(args, shape, args.seed + r, order)
                cap_after = matmul_cap(args.arch, img_shape, args.batch)
            for c in contenders:
                if not turns:
                    cap = matmul_cap(args.arch, img_shape, args.batch)
                    load1 = os.getloadavg()[0]
                res = paired.get(c) or spawn(args, c, shape, args.seed + r)  # same seed for both
                if not turns:
                    cap_after = matmul_cap(args.arch, img_shape, args.batch)
                cap_s = min(cap["step_s"], cap_after["step_s"])
                caps.append(
                    {**cap, "step_s": cap_s, "issue_s": min(cap["issue_s"], cap_after["issue_s"])}
                )
                share = res["images_per_s"] / (args.batch / cap_s)
                row = {
                    "round": r + 1,
                    "contender": c,
                    "load1": load1,
                    "cap_s": cap_s,
                    "share": share,
                    **res,
                }
                rows.append(row)
                tt = res.get("to_target")
                print(
                    f"{r + 1:>5} {c:>10} {load1:>6.2f} {res['images_per_s']:>8.0f} "
                    f"{share:>9.1%} {fmt(res.get('test_elbo'), '.2f'):>10} "
                    f"{fmt(tt and tt['seconds'], '.2f', 'not met' if 'to_target' in res else '-'):>9} "
                    f"{res['peak_rss_mb']:>8.0f}",
                    flush=True,
                )
        cap_med = med([c["step_s"] for c in caps])
        issue_med = med([c["issue_s"] for c in caps])
        print(
            f"matmul cap: {caps[0]['products']} products of one step take {cap_med * 1e3:.2f} ms "
            f"(median of the best before/after each run) -> {args.batch / cap_med:,.0f} images/s; "
            f"with the first layer's input gradient (the issue's count) {issue_med * 1e3:.2f} ms"
        )
        summary = {}
        for c in contenders:
            rs = [x for x in rows if x["contender"] == c]
            tts = [x["to_target"]["seconds"] for x in rs if x.get("to_target")]
            summary[c] = {
                "images_per_s": med([x["images_per_s"] for x in rs]),
                "share": med([x["share"] for x in rs]),
                "test_elbo": med([x.get("test_elbo") for x in rs]),
                "test_elbo_all": [x.get("test_elbo") for x in rs],
                "seconds_to_target": med(tts) if len(tts) == len(rs) else None,
                "peak_rss_mb": max(x["peak_rss_mb"] for x in rs),
            }
            s = summary[c]
            elbos = ", ".join(fmt(e, ".2f") for e in s["test_elbo_all"])
            print(
                f"median {c:>10}: {s['images_per_s']:,.0f} img/s, {s['share']:.1%} of the cap"
                + (f", test ELBO {s['test_elbo']:.2f} ({elbos})" if s["test_elbo"] else "")
                + (
                    f", {s['seconds_to_target']:.2f} s to {args.target:g} nats"
                    if s["seconds_to_target"]
                    else ""
                )
                + f", peak {s['peak_rss_mb']:.0f} MB"
            )
        kinds = sorted(
            {x["precision"] for x in rows if x["contender"] == "vaelab" and x.get("precision")}
        )
        if "vaelab" in contenders and kinds:
            print(f"vaelab trained in: {'; '.join(kinds)} (reference: float32)")
        if len(contenders) == 2:
            ratios = [b["images_per_s"] / a["images_per_s"] for a, b in zip(rows[0::2], rows[1::2])]
            summary["ratio"] = med(ratios)
            line = (
                f"vaelab / reference images/s: {summary['ratio']:.2f}x "
                f"(per round {', '.join(f'{x:.2f}' for x in ratios)})"
            )
            ta, tb = (
                summary["reference"]["seconds_to_target"],
                summary["vaelab"]["seconds_to_target"],
            )
            if ta and tb:
                line += f"; time to {args.target:g} nats: vaelab / reference = {tb / ta:.2f}"
            print(line)
        report["shapes"][shape] = {"rows": rows, "caps": caps, "cap_s": cap_med, "summary": summary}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
