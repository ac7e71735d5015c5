"""fit(): train a VAE from a config, with logging, checkpoints, exact resume and a NaN guard.

One call does everything a run needs::

    result = fit(load_preset("quickstart"))     # -> runs/quickstart/
    result.model, result.summary["best_valid_elbo"]

The step is kept tight: batches come from indexing a uint8 tensor (``BatchIterator``), the
optimizer is fused Adam with a lean step (:mod:`vaelab.optim`; foreach Adam where fused is not
built), denormal floats count as zero in every CPU thread while training and malloc keeps freed memory
for the next step instead of returning it to the OS (:mod:`vaelab.cpu`),
gradients are freed with ``set_to_none``, and nothing waits for the device except every
``train.log_every`` steps, when the accumulated sums are read once. The gradient norm is
computed only when logging or clipping.

Records in ``metrics.jsonl`` (one JSON object per line)::

    {"kind": "step" | "epoch", "step", "epoch", "split": "train" | "valid",
     "loss", "elbo", "rec", "kl", "beta", "lr", "grad_norm", "images_per_s", "time"}

``elbo`` is the true (beta = 1) ELBO in nats per image, ``rec`` = -E[log p(x|z)] and ``kl`` the
KL term, both nats per image; step records average the steps since the previous record, train
epoch records the whole epoch. Valid epoch records hold the validation set's true ELBO (one z
per image, model in eval mode), ``bits_per_dim`` = -elbo / (D ln 2) where the likelihood is
a proper mass function for the data (binary or 8-bit), and ``ssim``, the mean SSIM of the
reconstructions (decoder mean at E_q[z|x]) of the first 256 validation images.
``step`` counts optimizer steps done, ``epoch`` is 1-based, ``time`` is seconds since the run
started (across resumes).

Under torchrun (``WORLD_SIZE`` > 1) the run is data-parallel: see :mod:`vaelab.distributed`.

Faults: SIGINT/SIGTERM save ``checkpoints/last.pt`` and raise :class:`TrainingInterrupted`; a
non-finite loss (or gradient norm, when computed) raises :class:`TrainingDiverged` naming the
first bad step, before anything is checkpointed, so ``last.pt`` stays at the last good point.
With ``train.max_bad_steps`` = N > 0, up to N bad steps are skipped instead (as VDVAE does);
that mode reads the loss every step, which costs one device sync per step.
"""

from __future__ import annotations

import importlib.util
import math
import random
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import vaelab
from vaelab import runs
from vaelab.config import Config, to_dict
from vaelab.cpu import denormals_flushed, freed_memory_kept
from vaelab.devices import cpu_model, describe_hardware, native_bf16, pick_device
from vaelab.model import (
    VAE,
    build_model,
    count_parameters,
    has_convolutions,
    init_input_bias,
    init_output_bias,
    output_layer,
    save_model,
)
from vaelab.objectives import beta_schedule, capacity_schedule, compute_objective, elbo
from vaelab.optim import FusedAdam

SCHEDULES = ("none", "cosine", "plateau")
# torch.compile modes; "reduce-overhead" replays the compiled step as CUDA graphs on a GPU
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
PLATEAU_FACTOR, PLATEAU_PATIENCE = 0.5, 3  # ReduceLROnPlateau on the validation ELBO


class TrainingDiverged(RuntimeError):
    """The loss or the gradients became NaN or Inf."""

    def __init__(self, step: int, run_dir: Path | None, what: str = "loss") -> None:
        self.step = step
        self.run_dir = run_dir
        where = ""
        if run_dir is not None and (run_dir / "checkpoints" / "last.pt").is_file():
            where = f"; the last good checkpoint is {run_dir / 'checkpoints' / 'last.pt'}"
        super().__init__(
            f"training diverged: non-finite {what} at step {step}{where}. Try a lower "
            "train.lr, train.grad_clip, or train.max_bad_steps=N to skip a few bad steps"
        )


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM (or a callback) stopped training; a checkpoint was saved."""

    def __init__(self, step: int, run_dir: Path | None, reason: str) -> None:
        self.step = step
        self.run_dir = run_dir
        self.reason = reason
        if run_dir is None:
            msg = f"training stopped by {reason} at step {step} (no run folder, nothing saved)"
        else:
            msg = (
                f"training stopped by {reason} at step {step}; checkpoint saved to "
                f"{run_dir / 'checkpoints' / 'last.pt'}. Resume with: "
                f"vaelab train --resume {run_dir}"
            )
        super().__init__(msg)


@dataclass
class FitResult:
    """What :func:`fit` returns: the trained model (eval mode), its run folder (None without
    one), the summary (as in ``summary.json``) and the epoch records (train and valid)."""

    model: VAE
    run_dir: Path | None
    summary: dict
    history: list[dict] = field(default_factory=list)


@dataclass
class TrainState:
    """What callbacks see. A callback may call :meth:`request_stop`."""

    cfg: Config
    model: VAE
    optimizer: torch.optim.Optimizer
    run_dir: Path | None
    total_steps: int
    steps_per_epoch: int
    step: int = 0
    epoch: int = 0  # 0-based index of the current epoch
    batch: int = 0  # batches of the current epoch done
    stop_reason: str | None = None

    def request_stop(self, reason: str = "a callback") -> None:
        self.stop_reason = reason


# ------------------------------------------------------------------------------ building blocks


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_data(cfg: Config, data_dir: str | Path | None = None):
    """The :class:`vaelab.data.DataSplits` that ``cfg.data`` describes.

    ``data_dir`` wins over ``cfg.data.data_dir``, which wins over ``$VAELAB_DATA_DIR``.
    """
    from vaelab.data import load_dataset

    d = cfg.data
    return load_dataset(
        d.name,
        data_dir if data_dir is not None else d.data_dir,
        valid_size=d.valid_size,
        subset_train=d.subset_train,
        subset_valid=d.subset_valid,
        subset_test=d.subset_test,
        subset_mode=d.subset_mode,
        seed=cfg.seed,
        image_size=d.image_size,
        channels=d.channels,
        binarize=d.binarize,
    )


def make_optimizer(model: torch.nn.Module, cfg: Config, device: torch.device):
    """Adam with the config's lr, betas and (L2) weight decay; fused where supported."""
    t = cfg.train
    if len(t.betas) != 2:
        raise ValueError(f"train.betas needs two numbers, got {list(t.betas)}")
    kwargs = dict(lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    if device.type in ("cpu", "cuda", "mps"):
        try:  # Adam(fused=True), minus ~0.15 ms of Python a step (vaelab.optim)
            return FusedAdam(params, **kwargs)
        except (RuntimeError, ValueError):  # fused not built for this device/dtype
            pass
    return torch.optim.Adam(params, foreach=True, **kwargs)


def _match_state_layout(optimizer: torch.optim.Optimizer) -> None:
    """Give every optimizer state tensor its parameter's memory layout (strides).

    A checkpoint written by a run in another layout (``train.channels_last`` changed between
    save and resume) loads with the saved strides; the fused Adam kernel walks parameter,
    gradient and moments as flat memory, so their layouts must agree.
    """
    changed = False
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for k, v in list(state.items()):
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    state[k] = torch.empty_like(p, dtype=v.dtype).copy_(v)
                    changed = True
    if changed and hasattr(optimizer, "_lean"):
        optimizer._lean = None  # vaelab.optim.FusedAdam's cached lists


def make_scheduler(optimizer, cfg: Config, total_steps: int):
    """None, per-step cosine decay to 0 over ``total_steps``, or plateau on the valid ELBO."""
    name = cfg.train.schedule
    if name == "none":
        return None
    if name == "cosine":
        span = max(1, total_steps)
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: 0.5 * (1.0 + math.cos(math.pi * min(s, span) / span))
        )
    if name == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=PLATEAU_FACTOR, patience=PLATEAU_PATIENCE
        )
    raise ValueError(f"train.schedule must be one of {', '.join(SCHEDULES)}, got {name!r}")


def grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of the gradients (a 0-d tensor; no sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def resolve_bf16(
    setting: bool | str, device: torch.device, fused_mlp: bool, convolutional: bool = False
) -> bool:
    """Whether a run trains with bfloat16 products, from ``train.bf16``.

    ``true``: where bf16 is native (CUDA, or a CPU with AVX512-BF16/AMX), else a warning and
    float32. ``"auto"``: on a CPU with native bf16, for the fused MLP path (``fused_mlp``: its
    own bf16 products) and for convolutional networks (autocast), where it was measured to
    speed training up (up to 1.6x) and leave the test ELBO within the spread of float32 runs
    (docs/benchmarks.md); float32 elsewhere, silently. ``false``: float32.
    """
    if setting == "auto":
        return (fused_mlp or convolutional) and device.type == "cpu" and native_bf16(device)
    if setting is True and native_bf16(device):
        return True
    if setting is True:
        warnings.warn(
            f"train.bf16 needs CUDA or a CPU with native bfloat16 arithmetic (AVX512-BF16 "
            f"or AMX); {device} ({cpu_model() if device.type == 'cpu' else device.type}) "
            "has none, so this run trains in float32",
            stacklevel=4,
        )
    return False


class Float32OutputLayer:
    """Under bf16 autocast, run ``layer`` (the decoder's output layer) in float32, with its
    input cast up: the likelihood's parameters (logits, means) keep float32 precision instead
    of bf16's 8 bits of mantissa. Forward hooks, removed by :meth:`remove`. On the conv
    network (MNIST, 10 epochs, seeds 0 and 1) bf16 autocast ended 1.8 and 1.1 nats below
    float32's test ELBO with the output layer in bf16, and 0.2 below / 0.5 above with it in
    float32 (docs/benchmarks.md)."""

    def __init__(self, layer: torch.nn.Module, device_type: str) -> None:
        self.device_type, self.was_on = device_type, False
        self.handles = [
            layer.register_forward_pre_hook(self._before),
            layer.register_forward_hook(self._after),
        ]

    def _before(self, module, args):
        self.was_on = torch.is_autocast_enabled(self.device_type)
        torch.set_autocast_enabled(self.device_type, False)
        return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    def _after(self, module, args, out) -> None:
        torch.set_autocast_enabled(self.device_type, self.was_on)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


SSIM_IMAGES = 256  # validate() scores the reconstructions of this many validation images


@torch.inference_mode()
def validate(
    model: VAE, imageset, batch_size: int, device: torch.device, seed: int, dist=None
) -> dict:
    """The true ELBO of ``imageset`` (beta = 1, one z per image, eval mode), nats per image,
    and ``ssim``: the mean SSIM of the reconstructions (decoder mean at E_q[z|x]) of its first
    ``SSIM_IMAGES`` images (:func:`vaelab.metrics.reconstruction.ssim_torch`: scikit-image's
    numbers, in a few milliseconds).

    The binarization draws and z noise come from ``seed`` alone, so every epoch scores the
    same validation images and the training RNG streams are untouched. With ``dist`` (a
    :class:`vaelab.distributed.Distributed`) each process scores its slice of every batch,
    with its slice of the same noise, and the sums are all-reduced.
    """
    from vaelab.data import BatchIterator
    from vaelab.metrics.reconstruction import ssim_torch

    was_training = model.training
    model.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    it = BatchIterator(imageset, batch_size, shuffle=False, seed=seed, device=device)
    dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
    sums = torch.zeros(5, dtype=dtype, device=device)  # elbo, rec, kl, ssim sum, ssim count
    for b, x in enumerate(it.epoch(0)):
        start, eps = b * batch_size, None  # start: index of x[0] in the split
        if dist is not None:
            x, eps, lo = dist.shard_eval(x, gen, model.latent_dim)
            start += lo
            if x.shape[0] == 0:
                continue
        out = elbo(model, x, generator=gen, eps=eps)
        sums[:3] += torch.stack([out.elbo.sum(), -out.log_px_z.sum(), out.kl.sum()]).to(dtype)
        m = min(x.shape[0], SSIM_IMAGES - start)
        if m > 0:
            r = model.reconstruct(x[:m]).clamp(0.0, 1.0)
            sums[3] += float(ssim_torch(x[:m], r).sum())
            sums[4] += m
    if dist is not None:
        dist.all_reduce_(sums)
    model.train(was_training)
    n = max(1, len(imageset))
    e, rec, kl, ssim_sum, n_ssim = sums.tolist()
    result = {"elbo": e / n, "rec": rec / n, "kl": kl / n}
    if n_ssim > 0:
        result["ssim"] = ssim_sum / n_ssim
    return result


class _StopSignals:
    """Turn SIGINT/SIGTERM into a flag checked after each step; a second signal aborts, unless
    ``abort_on_second`` is False (under torchrun, whose agent forwards the user's signal again)."""

    def __init__(self, abort_on_second: bool = True) -> None:
        self.reason: str | None = None
        self.abort_on_second = abort_on_second
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.reason is not None:  # second signal: stop now, without saving
            if self.abort_on_second:
                raise KeyboardInterrupt
            return
        self.reason = signal.Signals(signum).name

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _check_resumable(cfg: Config, saved: dict, path: Path) -> None:
    """Model, data, objective and seed must match the checkpoint; train.* may change."""
    now = to_dict(cfg)
    diffs = [
        f"{sec}.{k}: {saved[sec].get(k)!r} -> {v!r}"
        for sec in ("model", "data", "objective")
        for k, v in now[sec].items()
        if saved[sec].get(k) != v and not (sec == "data" and k == "data_dir")
    ]
    if saved.get("seed") != cfg.seed:
        diffs.append(f"seed: {saved.get('seed')!r} -> {cfg.seed!r}")
    if diffs:
        raise ValueError(
            f"cannot resume {path}: the config differs from the checkpoint's in "
            + "; ".join(diffs)
            + " (only train.* settings may change on resume)"
        )


def _callbacks(callbacks: Iterable[Any], hook: str) -> list[Callable]:
    return [getattr(cb, hook) for cb in callbacks if callable(getattr(cb, hook, None))]


# ------------------------------------------------------------------------------ the loop


class _Loop:
    """The state of one training run and the steps that change it; :func:`fit` drives it.

    Everything here that a resume needs goes through :meth:`state_dict`.
    """

    def __init__(
        self,
        cfg: Config,
        data,
        device: torch.device,
        run_dir: Path | None,
        callbacks: Iterable[Any],
        progress: bool,
        dist=None,
    ) -> None:
        from vaelab.data import BatchIterator, mean_image

        tc = cfg.train
        self.cfg, self.data, self.device, self.run_dir = cfg, data, device, run_dir
        self.dist = dist  # a vaelab.distributed.Distributed under torchrun, else None
        self.writes = dist is None or dist.is_main  # only rank 0 writes files
        self.progress = progress and self.writes
        self.t_start = time.perf_counter()
        self.model = build_model(cfg.model, data.info.shape).to(device)
        self.init_notes = None  # what init_output/input_bias set (a resumed run loads its own)
        if tc.init_output_bias or tc.init_input_bias:
            mean = mean_image(data.train).to(device)
            done = [
                init_output_bias(self.model, mean) if tc.init_output_bias else None,
                init_input_bias(self.model, mean) if tc.init_input_bias else None,
            ]
            self.init_notes = "; ".join(d for d in done if d) or None
        # train.channels_last: convolutional networks train in NHWC (faster in oneDNN/cuDNN)
        self.channels_last = tc.channels_last and has_convolutions(self.model)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.optimizer = make_optimizer(self.model, cfg, device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.batches = BatchIterator(data.train, tc.batch_size, seed=cfg.seed, device=device)
        steps_per_epoch = len(self.batches)
        if steps_per_epoch == 0:
            raise ValueError(f"{data.info.name}: the training split is empty")
        total = tc.max_steps if tc.max_steps > 0 else tc.epochs * steps_per_epoch
        self.n_epochs = math.ceil(total / steps_per_epoch)
        self.scheduler = make_scheduler(self.optimizer, cfg, total)
        self.noise = torch.Generator(device=device).manual_seed(cfg.seed + 1)
        self.st = TrainState(cfg, self.model, self.optimizer, run_dir, total, steps_per_epoch)
        # train.fused: MLP VAEs with a Bernoulli ELBO take the hand-written gradient
        # (vaelab.fused_elbo), one autograd node per step; compile switches it off.
        from vaelab.fused_elbo import fused_elbo_for

        fusable = tc.fused and not tc.compile and dist is None
        self.fused = fused_elbo_for(self.model, cfg.objective) if fusable else None
        bf16 = resolve_bf16(tc.bf16, device, self.fused is not None, has_convolutions(self.model))
        self.autocast, self.float32_output = nullcontext(), None
        self.precision = "float32"
        if self.fused is not None and bf16:  # its own bf16 products (no autocast)
            self.fused = fused_elbo_for(self.model, cfg.objective, torch.bfloat16)
            self.precision = "bf16 products (fused MLP gradient)"
        elif bf16:  # float32 weights, bf16 products but the output layer's
            self.autocast = torch.autocast(device.type, dtype=torch.bfloat16)
            self.precision = "bf16 autocast (float32 output layer)"
            last = output_layer(self.model.decoder)
            if last is not None:
                self.float32_output = Float32OutputLayer(last, device.type)
        # train.sharded: two worker processes, each owning half of every layer (started by
        # run(), after a resume has loaded the weights; vaelab.sharded)
        self.sharded, self.shard = None, False
        if tc.sharded:
            from vaelab.sharded import why_not_sharded

            bf16_fused = self.fused is not None and self.fused.lowp
            why = why_not_sharded(self.model, cfg, device, bf16_fused)
            if why is None and dist is not None:
                why = "it does not combine with distributed training"
            if why is None:
                self.shard = True
                self.precision += ", each layer split over 2 pinned processes (train.sharded)"
            else:
                warnings.warn(f"train.sharded: {why}; training in this process", stacklevel=3)
        # train.compile: the whole objective (networks, likelihood, KL, loss) as one graph for
        # full batches, or (data-parallel, bf16) the encoder and decoder; in place either way,
        # so state_dict keys stay the same.
        self.compiled = None
        if tc.compile and (dist is not None or bf16):
            self.model.encoder.compile(mode=tc.compile_mode)
            self.model.decoder.compile(mode=tc.compile_mode)
        elif tc.compile and cfg.objective.name in ("elbo", "iwae"):
            self.compiled = _compile_objective(self.model, cfg.objective, tc.compile_mode)
        info = data.info
        proper = self.model.likelihood.is_proper(info.value_kind)
        discrete = proper and info.value_kind in ("binary", "8bit")
        self.bpd_scale = -1.0 / (info.num_pixels * math.log(2)) if discrete else None
        self.acc_dtype = torch.float32 if device.type == "mps" else torch.float64
        # Counters saved in checkpoints.
        self.best_elbo, self.best_epoch, self.since_best, self.bad_steps = -math.inf, 0, 0, 0
        self.history: list[dict] = []
        self.elapsed0, self.train_time, self.images_seen = 0.0, 0.0, 0
        self.epoch_acc = torch.zeros(4, dtype=self.acc_dtype, device=device)  # loss elbo rec kl
        self.acc_signs = torch.tensor([1.0, 1.0, -1.0, 1.0], dtype=self.acc_dtype, device=device)
        self.epoch_images, self.epoch_time = 0, 0.0
        # Not saved: the divergence flags (never saved while set) and the logging window.
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.grad_was_bad = torch.zeros((), dtype=torch.bool, device=device)
        self.window_acc = self.epoch_acc.clone()
        self.window_images, self.window_t0 = 0, time.perf_counter()
        self.last_gnorm = float("nan")
        self.best_state: dict | None = None
        self.stopped_early = False
        self.log: runs.MetricsLog | None = None
        self.tb = None
        self.callbacks = {
            hook: _callbacks(callbacks, hook)
            for hook in ("on_train_begin", "on_step_end", "on_epoch_end", "on_train_end")
        }
        if dist is not None:
            dist.check_batches(len(data.train), tc.batch_size)
            dist.wrap(self.model, cfg.objective, total)

    # ---------------------------------------------------------------------- state and files

    _COUNTERS = (
        "best_elbo",
        "best_epoch",
        "since_best",
        "bad_steps",
        "history",
        "train_time",
        "images_seen",
        "epoch_images",
        "epoch_time",
    )

    def state_dict(self) -> dict:
        st = self.st
        return {
            "format": runs.CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "step": st.step,
            "epoch": st.epoch,
            "batch": st.batch,
            "rng": runs.capture_rng_state(self.noise),
            "data_seed": self.cfg.seed,  # the data order is a function of (seed, epoch, batch)
            **{k: getattr(self, k) for k in self._COUNTERS},
            "epoch_acc": self._sums()[0].cpu(),
            "elapsed": self.now(),
            "metrics_offset": None if self.log is None else self.log.offset,
            "config": to_dict(self.cfg),
        }

    def load_state_dict(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        _match_state_layout(self.optimizer)  # a checkpoint saved with another memory layout
        if self.scheduler is not None and ckpt["scheduler"] is not None:
            self.scheduler.load_state_dict(ckpt["scheduler"])
        runs.restore_rng_state(ckpt["rng"], self.noise)
        self.st.step, self.st.epoch, self.st.batch = ckpt["step"], ckpt["epoch"], ckpt["batch"]
        for k in self._COUNTERS:
            setattr(self, k, ckpt[k])
        self.epoch_acc.copy_(ckpt["epoch_acc"].to(self.acc_dtype))
        if not self.writes:  # the sums are global: rank 0 holds them, the others add theirs
            self.epoch_acc.zero_()
        self.window_acc.copy_(self.epoch_acc)
        self.elapsed0 = ckpt["elapsed"]

    def open_files(self, metrics_offset: int | None) -> None:
        if self.run_dir is None or not self.writes:
            return
        runs.write_config(self.run_dir, self.cfg, self.data.info.shape)
        self.log = runs.MetricsLog(self.run_dir / runs.METRICS_FILE, metrics_offset)
        self.tb = _tensorboard(self.cfg, self.run_dir)

    def close(self) -> None:
        if self.sharded is not None:  # the model gets private copies of its weights back
            self.sharded.close()
            torch.set_num_threads(self.threads_before)
        if self.log is not None:
            self.log.close()
        if self.tb is not None:
            self.tb.close()

    def now(self) -> float:
        """Seconds since the run started, across resumes."""
        return self.elapsed0 + time.perf_counter() - self.t_start

    def emit(self, record: dict) -> None:
        if self.log is not None:
            self.log.write(record)
        if self.tb is not None:
            tag = f"{record['kind']}/{record['split']}"
            for k, v in record.items():
                if isinstance(v, float):
                    self.tb.add_scalar(f"{tag}/{k}", v, record["step"])

    def save_checkpoint(self, best: bool = False) -> None:
        if self.run_dir is None:
            return
        self.assert_finite()  # never checkpoint a diverged model
        payload = self.state_dict()
        if not self.writes:
            return
        folder = self.run_dir / "checkpoints"
        runs.save_checkpoint(folder / "last.pt", payload)
        if best:
            runs.save_checkpoint(folder / "best.pt", payload)

    def assert_finite(self) -> None:
        """Raise if any step since the last check had a non-finite loss (one device sync)."""
        bad, grad = int(self.first_bad), bool(self.grad_was_bad)
        if self.dist is not None:
            bad, grad = self.dist.first_bad(bad, grad)
        if bad >= 0:
            raise TrainingDiverged(bad, self.run_dir, "gradient norm" if grad else "loss")

    def _sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``epoch_acc`` and ``window_acc`` summed over the processes (a collective)."""
        if self.dist is None:
            return self.epoch_acc, self.window_acc
        e, w = self.dist.consolidate_(self.epoch_acc, self.window_acc)
        return e, w

    def _stop_reason(self, signals: _StopSignals) -> str | None:
        reason = signals.reason or self.st.stop_reason
        return reason if self.dist is None else self.dist.agree_stop(reason)

    # ---------------------------------------------------------------------- steps

    def train_step(self, x: torch.Tensor, log_now: bool) -> torch.Tensor | None:
        """One optimizer step on batch x (B, C, H, W); returns the gradient norm if computed.

        No host-device sync unless ``train.max_bad_steps`` > 0.
        """
        if self.sharded is not None:
            return self._sharded_step(x, log_now)
        tc, st, opt = self.cfg.train, self.st, self.optimizer
        step = st.step
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.autocast:
            if self.fused is not None:
                beta = beta_schedule(step, self.cfg.objective, st.total_steps)
                out = self.fused(x, self._noise(x), beta)
            elif self.dist is None and self.compiled is not None and x.shape[0] == tc.batch_size:
                out = self._compiled_objective(x, step)  # the last, smaller batch runs eagerly
            elif self.dist is None:
                out = compute_objective(
                    self.model, x, self.cfg.objective, step, st.total_steps, self.noise
                )
            else:  # this rank's slice of x; loss = its share of the batch mean
                out = self.dist.objective(x, step, self.noise)
        loss = out.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = None
        if tc.grad_clip > 0:
            gnorm = torch.nn.utils.clip_grad_norm_(self.params, tc.grad_clip, foreach=True)
        elif log_now or tc.max_bad_steps > 0:
            gnorm = grad_norm(self.params)
        bad = ~torch.isfinite(loss.detach())
        if gnorm is not None:
            gbad = ~torch.isfinite(gnorm)
            self.grad_was_bad |= gbad & ~bad & (self.first_bad < 0)
            bad = bad | gbad
        if tc.max_bad_steps > 0 and self._any(bool(bad)):  # opt-in skipping: a sync per step
            self.bad_steps += 1
            if self.bad_steps > tc.max_bad_steps:
                raise TrainingDiverged(step + 1, self.run_dir, f"loss ({self.bad_steps} bad steps)")
            opt.zero_grad(set_to_none=True)
            self.grad_was_bad.zero_()
        else:
            self.first_bad.masked_fill_(bad & (self.first_bad < 0), step + 1)  # no sync
            opt.step()
            if tc.schedule == "cosine":
                self.scheduler.step()
            b = x.shape[0]
            with torch.no_grad():  # loss, elbo, rec, kl sums: 6 small ops, no autograd records
                row = torch.stack([loss * b, out.elbo.sum(), out.log_px_z.sum(), out.kl.sum()])
                self.epoch_acc.addcmul_(row, self.acc_signs)  # rec = -log p(x|z)
            self.epoch_images += b
            self.window_images += b
            self.images_seen += b
        st.step, st.batch = step + 1, st.batch + 1
        return gnorm

    def _sharded_step(self, x: torch.Tensor, log_now: bool) -> torch.Tensor | None:
        """train_step on the two workers of ``train.sharded`` (same bookkeeping)."""
        st, step, b = self.st, self.st.step, x.shape[0]
        beta = beta_schedule(step, self.cfg.objective, st.total_steps)
        loss, log_p, kl, norm = self.sharded(x, self._noise(x), beta, log_now)
        if not math.isfinite(loss) and self.first_bad < 0:
            self.first_bad.fill_(step + 1)
        gnorm = None
        if norm is not None:
            gnorm = torch.tensor(norm)
            if not math.isfinite(norm) and math.isfinite(loss) and self.first_bad < 0:
                self.grad_was_bad.fill_(True)
                self.first_bad.fill_(step + 1)
        if self.cfg.train.schedule == "cosine":
            self.scheduler.step()
        row = torch.tensor([loss * b, log_p - kl, log_p, kl], dtype=self.acc_dtype)
        self.epoch_acc.addcmul_(row, self.acc_signs)
        self.epoch_images += b
        self.window_images += b
        self.images_seen += b
        st.step, st.batch = step + 1, st.batch + 1
        return gnorm

    def _noise(self, x: torch.Tensor) -> torch.Tensor:
        """The step's standard-normal noise (L or k, B, Z), drawn as the eager objective draws
        it (same generator, shape and dtype), so every path sees the same z."""
        oc = self.cfg.objective
        n = oc.k if oc.name == "iwae" else oc.n_samples
        return torch.randn(
            (n, x.shape[0], self.model.latent_dim),
            generator=self.noise,
            device=x.device,
            dtype=self.params[0].dtype,
        )

    def _compiled_objective(self, x: torch.Tensor, step: int):
        """compute_objective through the compiled graph. The noise is drawn here as the eager
        objective draws it (same generator, shape and dtype), and beta and the capacity enter as
        0-d tensors, so nothing recompiles as they change. If compiling fails (no C++ compiler,
        an unsupported operation), training goes on without it, with a warning."""
        oc, st = self.cfg.objective, self.st
        eps = self._noise(x)
        cap = capacity_schedule(step, oc)
        beta = torch.tensor(beta_schedule(step, oc, st.total_steps), device=x.device)
        cap = None if cap is None else torch.tensor(cap, device=x.device)
        try:
            return self.compiled(x, eps, beta, cap)
        except Exception as exc:  # torch.compile raises many kinds; all mean "not here"
            warnings.warn(
                f"train.compile: torch.compile failed ({type(exc).__name__}: {exc}); "
                "training without it",
                stacklevel=3,
            )
            self.compiled = None
            return compute_objective(self.model, x, oc, step, st.total_steps, eps=eps)

    def _any(self, flag: bool) -> bool:
        return flag if self.dist is None else self.dist.any(flag)

    def log_window(self, gnorm: torch.Tensor | None) -> dict:
        """A step record: the means since the previous one (the window's one sync)."""
        self.assert_finite()
        dt = time.perf_counter() - self.window_t0
        epoch_sums, window_start = self._sums()
        means = ((epoch_sums - window_start) / max(1, self.window_images)).tolist()
        self.last_gnorm = float(gnorm) if gnorm is not None else float("nan")
        rec = _record("step", "train", self.st, means, self.cfg, self.st.step - 1, self.optimizer)
        rec.update(
            grad_norm=self.last_gnorm,
            images_per_s=self.window_images / max(dt, 1e-9),
            time=self.now(),
            bad_steps=self.bad_steps,
        )
        self.emit(rec)
        self.window_acc.copy_(self.epoch_acc)
        self.window_images, self.window_t0 = 0, time.perf_counter()
        return rec

    def end_epoch(self) -> list[dict]:
        """Train means and the validation ELBO; best/early stopping/plateau; checkpoint."""
        self.assert_finite()
        st, tc = self.st, self.cfg.train
        means = (self._sums()[0] / max(1, self.epoch_images)).tolist()
        train_rec = _record("epoch", "train", st, means, self.cfg, st.step - 1, self.optimizer)
        train_rec.update(
            grad_norm=self.last_gnorm,
            time=self.now(),
            bad_steps=self.bad_steps,
            images_per_s=self.epoch_images / max(self.epoch_time, 1e-9),
        )
        records = [train_rec]
        if len(self.data.valid) > 0:
            v = validate(
                self.model,
                self.data.valid,
                tc.eval_batch_size,
                self.device,
                self.cfg.seed,
                self.dist,
            )
            if not math.isfinite(v["elbo"]):
                raise TrainingDiverged(st.step, self.run_dir, "validation ELBO")
            valid_rec = {
                **{k: train_rec[k] for k in ("kind", "step", "epoch")},
                "split": "valid",
                "loss": -v["elbo"],
                **v,
                **{k: train_rec[k] for k in ("beta", "lr")},
                "time": self.now(),
            }
            if self.bpd_scale is not None:
                valid_rec["bits_per_dim"] = v["elbo"] * self.bpd_scale
            records.append(valid_rec)
        score = records[-1]["elbo"]  # the validation ELBO (train ELBO without a valid split)
        improved = score > self.best_elbo
        if improved:
            self.best_elbo, self.best_epoch, self.since_best = score, st.epoch + 1, 0
            if tc.early_stopping > 0:
                self.best_state = {
                    k: t.detach().clone() for k, t in self.model.state_dict().items()
                }
        else:
            self.since_best += 1
        if tc.schedule == "plateau":
            self.scheduler.step(score)
        for r in records:
            self.emit(r)
        self.history.extend(records)
        self.stopped_early = 0 < tc.early_stopping <= self.since_best
        if st.batch >= st.steps_per_epoch:  # a whole epoch (not one cut short by max_steps)
            st.epoch, st.batch = st.epoch + 1, 0
            # The logging window runs across the epoch boundary: keep its sums so far
            # (epoch_acc - window_acc) as a negative start, then zero the epoch's sums.
            self.window_acc.sub_(self.epoch_acc)
            self.epoch_acc.zero_()
            self.epoch_images, self.epoch_time = 0, 0.0
        self.save_checkpoint(best=improved)
        return records

    def run(self) -> None:
        """Train until the step budget is spent, early stopping, or a stop request."""
        from tqdm.auto import tqdm

        st, tc = self.st, self.cfg.train
        threads = self.threads_before = torch.get_num_threads()
        if self.shard and self.sharded is None:  # worker start-up (~1-2 s) before the clock
            from vaelab.sharded import ShardedStep

            self.sharded = ShardedStep(self.model, self.optimizer, tc.batch_size)
        for cb in self.callbacks["on_train_begin"]:
            cb(st)
        bar = tqdm(
            total=st.total_steps,
            initial=st.step,
            disable=(not self.progress) or None,
            unit="step",
            dynamic_ncols=True,
            leave=False,
        )
        step_cbs = self.callbacks["on_step_end"]
        self.model.train()
        if self.sharded is not None:  # this process only feeds the workers: one thread, so
            torch.set_num_threads(1)  # that no idle OpenMP thread spins on their cores
        try:
            if self.dist is not None:
                self.dist.reseed_workers(self.cfg.seed, st.step)
            with _StopSignals(abort_on_second=self.dist is None) as signals:
                while st.step < st.total_steps and not self.stopped_early:
                    t0 = time.perf_counter()
                    bar.set_description(f"epoch {st.epoch + 1}/{self.n_epochs}")
                    for x in self.batches.epoch(st.epoch, start_batch=st.batch):
                        log_now = (st.step + 1) % tc.log_every == 0
                        gnorm = self.train_step(x, log_now)
                        bar.update(1)
                        if log_now:
                            r = self.log_window(gnorm)
                            bar.set_postfix(
                                loss=f"{r['loss']:.2f}",
                                elbo=f"{r['elbo']:.2f}",
                                kl=f"{r['kl']:.2f}",
                                img_s=f"{r['images_per_s']:.0f}",
                                refresh=False,
                            )
                        if tc.checkpoint_every > 0 and st.step % tc.checkpoint_every == 0:
                            self.save_checkpoint()
                        for cb in step_cbs:
                            cb(st)
                        reason = self._stop_reason(signals)
                        if reason is not None:
                            self._add_time(t0)
                            self.save_checkpoint()
                            raise TrainingInterrupted(st.step, self.run_dir, reason)
                        if st.step >= st.total_steps:
                            break
                    self._add_time(t0)
                    if self.sharded is not None:
                        torch.set_num_threads(threads)  # validation runs here
                    records = self.end_epoch()
                    if self.sharded is not None:
                        torch.set_num_threads(1)
                    e = records[0]["epoch"]  # about 20 epoch lines per run, plus the last
                    if self.progress and (
                        e % max(1, self.n_epochs // 20) == 0
                        or e == 1
                        or st.step >= st.total_steps
                        or self.stopped_early
                    ):
                        tqdm.write(_epoch_line(st, self.n_epochs, records), file=sys.stderr)
                    for cb in self.callbacks["on_epoch_end"]:
                        cb(st, records)
                    reason = self._stop_reason(signals)
                    if reason is not None and st.step < st.total_steps and not self.stopped_early:
                        self.save_checkpoint()
                        raise TrainingInterrupted(st.step, self.run_dir, reason)
        finally:
            bar.close()

    def _add_time(self, t0: float) -> None:
        dt = time.perf_counter() - t0
        self.epoch_time += dt
        self.train_time += dt

    def finish(self) -> FitResult:
        """Release the model (best weights under early stopping), write the run's last files."""
        if self.cfg.train.early_stopping > 0:  # release the best weights, not the last
            best = self.best_state
            if best is None and self.run_dir is not None:  # best epoch was before a resume
                path = self.run_dir / "checkpoints" / "best.pt"
                best = runs.load_checkpoint(path)["model"] if path.is_file() else None
            if best is not None:
                self.model.load_state_dict(best)
        if self.channels_last:  # release the model in the usual layout
            self.model.to(memory_format=torch.contiguous_format)
        if self.float32_output is not None:
            self.float32_output.remove()
        model, run_dir, tc = self.model.eval(), self.run_dir, self.cfg.train
        summary = _summary(self)
        result = FitResult(model=model, run_dir=run_dir, summary=summary, history=self.history)
        if run_dir is not None and self.writes:
            save_model(model, self.cfg, run_dir)
            if tc.figures:
                summary["figures"] = _optional_step(
                    "vaelab.viz", "save_default_figures", model, self.data, run_dir / "figures"
                )
            runs.write_json(run_dir / runs.SUMMARY_FILE, summary)
            if tc.report:
                summary["report"] = _optional_step(
                    "vaelab.report", "write_report", run_dir, data=self.data
                )
                runs.write_json(run_dir / runs.SUMMARY_FILE, summary)
        for cb in self.callbacks["on_train_end"]:
            cb(self.st, result)
        return result


# ------------------------------------------------------------------------------ fit


def fit(
    cfg: Config,
    *,
    out_dir: str | Path | None = "runs",
    data=None,
    resume: str | Path | None = None,
    progress: bool = True,
    callbacks: Iterable[Any] = (),
    data_dir: str | Path | None = None,
) -> FitResult:
    """Train the VAE ``cfg`` describes and write its run folder.

    Args:
        cfg: the experiment (see :mod:`vaelab.config`).
        out_dir: parent of the run folder ``out_dir/cfg.name`` (``-2``, ``-3``, ... appended if
            it exists). ``None`` trains without writing any file.
        data: :class:`vaelab.data.DataSplits` to use instead of loading ``cfg.data``.
        resume: a run folder (or NAME under ./runs) to continue from its ``checkpoints/last.pt``;
            model, optimizer, schedule, RNG states, data order and step continue exactly.
            Only ``train.*`` settings may differ from the checkpoint's config.
        progress: a progress bar (on a terminal) and one line per epoch on stderr.
        callbacks: objects with any of ``on_train_begin(state)``, ``on_step_end(state)``,
            ``on_epoch_end(state, records)``, ``on_train_end(state, result)``, where ``state``
            is a :class:`TrainState`; ``state.request_stop()`` stops like SIGINT does.
        data_dir: where datasets live (else ``cfg.data.data_dir``, else ``$VAELAB_DATA_DIR``).

    Under torchrun (``WORLD_SIZE`` > 1) every process calls ``fit`` with the same arguments and
    they train data-parallel (:mod:`vaelab.distributed`): ``train.batch_size`` is the global
    batch, rank 0 alone writes files, and every rank returns the same model and numbers.

    Returns:
        :class:`FitResult`.

    Raises:
        TrainingInterrupted: SIGINT, SIGTERM or a callback stopped the run (checkpoint saved).
        TrainingDiverged: a NaN/Inf loss or gradient norm; ``last.pt`` is the last good state.
        ValueError, FileNotFoundError: a bad config, missing data, or nothing to resume.
        vaelab.distributed.DistributedFailure: under torchrun, another process died or the
            group timed out.
    """
    tc = cfg.train
    if tc.schedule not in SCHEDULES:
        raise ValueError(
            f"train.schedule must be one of {', '.join(SCHEDULES)}, got {tc.schedule!r}"
        )
    if tc.bf16 not in (True, False, "auto"):
        raise ValueError(f'train.bf16 must be true, false or "auto", got {tc.bf16!r}')
    if tc.compile_mode not in COMPILE_MODES:
        raise ValueError(
            f"train.compile_mode must be one of {', '.join(COMPILE_MODES)}, got {tc.compile_mode!r}"
        )
    if tc.epochs < 1 and tc.max_steps < 1:
        raise ValueError("train.epochs (or train.max_steps) must be >= 1")
    if tc.log_every < 1:
        raise ValueError(f"train.log_every must be >= 1, got {tc.log_every}")
    if tc.threads < 0:
        raise ValueError(f"train.threads must be >= 0 (0: torch's default), got {tc.threads}")
    from vaelab.distributed import Distributed

    # Under torchrun: join the group; rank 0 alone makes (or reads) the run folder.
    dist, device = Distributed.setup(pick_device(tc.device))
    try:
        if dist is None:
            run_dir, ckpt = _prepare_run(cfg, out_dir, resume)
        else:
            run_dir, ckpt = dist.on_main(lambda: _prepare_run(cfg, out_dir, resume))
        threads = torch.get_num_threads()
        if tc.threads > 0:
            torch.set_num_threads(tc.threads)
        # denormals count as 0 (vaelab.cpu): Adam on decayed moments is ~5x faster; freed
        # memory stays with malloc: a step reuses the last one's, without page faults
        try:
            with denormals_flushed(), freed_memory_kept():
                return _fit(cfg, data, device, run_dir, ckpt, callbacks, progress, data_dir, dist)
        finally:
            torch.set_num_threads(threads)
    finally:
        if dist is not None:
            dist.close()


def _prepare_run(cfg: Config, out_dir, resume) -> tuple[Path | None, dict | None]:
    """The run folder (made, or found for a resume) and the checkpoint to resume from."""
    from vaelab.distributed import announce_run_dir

    ckpt = None
    if resume is not None:
        run_dir = runs.resolve_run(resume)
        last = run_dir / "checkpoints" / "last.pt"
        if not last.is_file():
            raise FileNotFoundError(f"{last} not found: {run_dir} has no checkpoint to resume")
        ckpt = runs.load_checkpoint(last)
        _check_resumable(cfg, ckpt["config"], last)
        runs.remove_stale_temporaries(last.parent)
    else:
        run_dir = None if out_dir is None else runs.new_run_dir(out_dir, cfg.name)
    announce_run_dir(run_dir)
    return run_dir, ckpt


def _fit(cfg, data, device, run_dir, ckpt, callbacks, progress, data_dir, dist) -> FitResult:
    if data is None:
        data = load_data(cfg, data_dir)
    seed_everything(cfg.seed)  # after loading, so the model's init never depends on the loader
    loop = _Loop(cfg, data, device, run_dir, callbacks, progress, dist)
    if ckpt is not None:
        loop.load_state_dict(ckpt)
    if loop.progress:
        where = f" -> {run_dir}" if run_dir is not None else ""
        procs = "" if dist is None else f" x {dist.world_size} processes ({dist.backend})"
        print(
            f"vaelab: training {cfg.name}: {data.describe()}; {cfg.model.arch}, "
            f"{count_parameters(loop.model):,} parameters, {device}{procs}{where}"
            + (f"; {loop.init_notes}" if loop.init_notes and ckpt is None else ""),
            file=sys.stderr,
        )
    loop.open_files(ckpt["metrics_offset"] if ckpt else None)
    try:
        loop.run()
    except RuntimeError as exc:  # under torchrun: name a lost process, and the checkpoint
        failure = None if dist is None else dist.failure(exc, loop.st.step, run_dir)
        if failure is None:
            raise
        raise failure from exc
    finally:
        loop.close()
    return loop.finish()


# ------------------------------------------------------------------------------ helpers


def _compile_objective(model: VAE, oc, mode: str = "default") -> Callable:
    """The ELBO or IWAE objective of ``oc`` as one torch.compile graph (fixed shapes), called
    as ``f(x, eps, beta, capacity)`` with explicit noise and 0-d tensor weights. ``mode`` is
    torch.compile's (``"reduce-overhead"``: CUDA graphs on a GPU)."""
    from vaelab.objectives import iwae

    def objective(x, eps, beta, capacity):
        if oc.name == "iwae":
            return iwae(model, x, k=oc.k, eps=eps)
        return elbo(
            model,
            x,
            n_samples=oc.n_samples,
            beta=beta,
            capacity=capacity,
            gamma=oc.capacity_gamma,
            free_bits=oc.free_bits,
            eps=eps,
        )

    return torch.compile(objective, dynamic=False, mode=mode)


def _record(kind, split, st: TrainState, means, cfg, beta_step, optimizer) -> dict:
    loss, elbo_, rec, kl = means
    return {
        "kind": kind,
        "step": st.step,
        "epoch": st.epoch + 1,
        "split": split,
        "loss": loss,
        "elbo": elbo_,
        "rec": rec,
        "kl": kl,
        "beta": beta_schedule(max(0, beta_step), cfg.objective, st.total_steps)
        if cfg.objective.name == "elbo"
        else 1.0,
        "lr": optimizer.param_groups[0]["lr"],
    }


def _epoch_line(st: TrainState, n_epochs: int, records: list[dict]) -> str:
    t = records[0]
    line = (
        f"epoch {t['epoch']}/{n_epochs} step {st.step}: train loss {t['loss']:.3f} "
        f"elbo {t['elbo']:.3f} kl {t['kl']:.3f} ({t['images_per_s']:.0f} img/s)"
    )
    if len(records) > 1:
        v = records[1]
        line += f" | valid elbo {v['elbo']:.3f}"
        if "bits_per_dim" in v:
            line += f" ({v['bits_per_dim']:.4f} bits/dim)"
    return line


def _tensorboard(cfg: Config, run_dir: Path):
    if not cfg.train.tensorboard:
        return None
    if importlib.util.find_spec("tensorboard") is None:
        warnings.warn(
            "train.tensorboard=true but the tensorboard package is not installed "
            "(pip install tensorboard); logging to metrics.jsonl only",
            stacklevel=3,
        )
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(run_dir / "tensorboard"))


def _optional_step(module: str, func: str, *args, **kwargs) -> Any:
    """Call ``module.func(*args, **kwargs)`` if that module exists; a failure warns (training
    is saved)."""
    if importlib.util.find_spec(module) is None:
        return None
    try:
        out = getattr(importlib.import_module(module), func)(*args, **kwargs)
    except Exception as exc:  # a plotting bug must not lose a finished run
        warnings.warn(f"{module}.{func} failed: {type(exc).__name__}: {exc}", stacklevel=2)
        return {"error": f"{type(exc).__name__}: {exc}"}
    if isinstance(out, dict):
        return {k: str(v) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return [str(p) for p in out]
    return None if out is None else str(out)


def _precision(loop: _Loop) -> str:
    """What the run trained in, with the share of steps that took the sparse first layer."""
    fused = loop.fused
    if fused is None or not fused.sparse_calls:
        return loop.precision
    return (
        f"{loop.precision}; sparse first layer (csrc/sparse.c) in {fused.sparse_calls:,} of "
        f"{fused.calls:,} steps"
    )


def _summary(loop: _Loop) -> dict:
    """``summary.json``: final numbers, timing, hardware, versions, data and likelihood facts."""
    cfg, data, model, st = loop.cfg, loop.data, loop.model, loop.st
    info = data.info
    last = {}
    for r in loop.history:
        last[r["split"]] = r
    proper = model.likelihood.is_proper(info.value_kind)
    summary = {
        "name": cfg.name,
        "train": last.get("train"),
        "valid": last.get("valid"),
        "best_valid_elbo": loop.best_elbo if math.isfinite(loop.best_elbo) else None,
        "best_epoch": loop.best_epoch,
        "epochs": st.epoch + (1 if st.batch else 0),
        "steps": st.step,
        "stopped_early": loop.stopped_early,
        "bad_steps": loop.bad_steps,
        "wall_time_s": loop.now(),
        "train_time_s": loop.train_time,
        "images_per_s": loop.images_seen / max(loop.train_time, 1e-9),
        "parameters": count_parameters(model),
        "likelihood": cfg.model.likelihood,
        "likelihood_proper": proper,
        "dataset": {
            "name": info.name,
            "shape": list(info.shape),
            "value_kind": info.value_kind,
            "binarization": info.binarization,
            "train": len(data.train),
            "valid": len(data.valid),
            "test": len(data.test),
        },
        "hardware": describe_hardware(loop.device),
        "precision": _precision(loop),
        "channels_last": loop.channels_last,
        "distributed": None if loop.dist is None else loop.dist.describe(),
        "versions": {
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "numpy": np.__version__,
            "vaelab": vaelab.__version__,
        },
    }
    if not proper:
        summary["likelihood_note"] = (
            f"the {cfg.model.likelihood} likelihood is not a proper density/mass for "
            f"{info.value_kind} data ({info.name}); its ELBO is not a bound on log p(x) and does "
            "not compare with proper likelihoods"
        )
    return summary
