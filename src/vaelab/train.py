"""fit(): train a VAE from a config, with logging, checkpoints, exact resume and a NaN guard.

One call does everything a run needs::

    result = fit(load_preset("quickstart"))     # -> runs/quickstart/
    result.model, result.summary["best_valid_elbo"]

The step is kept tight: batches come from indexing a uint8 tensor (``BatchIterator``), the
optimizer is fused (or foreach) Adam, gradients are freed with ``set_to_none``, and nothing
waits for the device except every ``train.log_every`` steps, when the accumulated sums are read
once. The gradient norm is computed only when logging or clipping.

Records in ``metrics.jsonl`` (one JSON object per line)::

    {"kind": "step" | "epoch", "step", "epoch", "split": "train" | "valid",
     "loss", "elbo", "rec", "kl", "beta", "lr", "grad_norm", "images_per_s", "time"}

``elbo`` is the true (beta = 1) ELBO in nats per image, ``rec`` = -E[log p(x|z)] and ``kl`` the
KL term, both nats per image; step records average the steps since the previous record, train
epoch records the whole epoch. Valid epoch records hold the validation set's true ELBO (one z
per image, model in eval mode) and ``bits_per_dim`` = -elbo / (D ln 2) where the likelihood is
a proper mass function for the data (binary or 8-bit). ``step`` counts optimizer steps done,
``epoch`` is 1-based, ``time`` is seconds since the run started (across resumes).

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
from vaelab.devices import describe_hardware, pick_device
from vaelab.model import VAE, build_model, count_parameters, save_model
from vaelab.objectives import beta_schedule, compute_objective, elbo

SCHEDULES = ("none", "cosine", "plateau")
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
        try:
            return torch.optim.Adam(params, fused=True, **kwargs)
        except (RuntimeError, ValueError):  # fused not built for this device/dtype
            pass
    return torch.optim.Adam(params, foreach=True, **kwargs)


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


@torch.inference_mode()
def validate(model: VAE, imageset, batch_size: int, device: torch.device, seed: int) -> dict:
    """The true ELBO of ``imageset`` (beta = 1, one z per image, eval mode), nats per image.

    The binarization draws and z noise come from ``seed`` alone, so every epoch scores the
    same validation images and the training RNG streams are untouched.
    """
    from vaelab.data import BatchIterator

    was_training = model.training
    model.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    it = BatchIterator(imageset, batch_size, shuffle=False, seed=seed, device=device)
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    for x in it.epoch(0):
        out = elbo(model, x, generator=gen)
        sums += torch.stack([out.elbo.sum(), -out.log_px_z.sum(), out.kl.sum()]).double()
    model.train(was_training)
    n = max(1, len(imageset))
    e, r, k = (sums / n).tolist()
    return {"elbo": e, "rec": r, "kl": k}


def _rng_state(noise: torch.Generator) -> dict:
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": random.getstate(),
        "noise": noise.get_state(),
    }


def _set_rng_state(state: dict, noise: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    noise.set_state(state["noise"])


class _StopSignals:
    """Turn SIGINT/SIGTERM into a flag checked after each step; a second signal aborts."""

    def __init__(self) -> None:
        self.reason: str | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum, frame) -> None:
        if self.reason is not None:  # second signal: stop now, without saving
            raise KeyboardInterrupt
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
        progress: show a progress bar (on a terminal) and one line per epoch.
        callbacks: objects with any of ``on_train_begin(state)``, ``on_step_end(state)``,
            ``on_epoch_end(state, records)``, ``on_train_end(state, result)``;
            ``state`` is a :class:`TrainState`.
        data_dir: where datasets live (else ``cfg.data.data_dir``, else ``$VAELAB_DATA_DIR``).

    Returns:
        :class:`FitResult`. Raises :class:`TrainingInterrupted` on SIGINT/SIGTERM and
        :class:`TrainingDiverged` on a NaN/Inf loss.
    """
    from tqdm.auto import tqdm

    from vaelab.data import BatchIterator

    t_start = time.perf_counter()
    tc = cfg.train
    if tc.schedule not in SCHEDULES:
        raise ValueError(
            f"train.schedule must be one of {', '.join(SCHEDULES)}, got {tc.schedule!r}"
        )
    if tc.epochs < 1 and tc.max_steps < 1:
        raise ValueError("train.epochs (or train.max_steps) must be >= 1")
    if tc.log_every < 1:
        raise ValueError(f"train.log_every must be >= 1, got {tc.log_every}")
    device = pick_device(tc.device)

    # Run folder and checkpoint to resume from.
    ckpt = None
    if resume is not None:
        run_dir = runs.resolve_run(resume)
        last = run_dir / "checkpoints" / "last.pt"
        if not last.is_file():
            raise FileNotFoundError(f"{last} not found: {run_dir} has no checkpoint to resume")
        ckpt = runs.load_checkpoint(last)
        _check_resumable(cfg, ckpt["config"], last)
        runs.remove_stale_temporaries(last.parent)
    elif out_dir is not None:
        run_dir = runs.new_run_dir(out_dir, cfg.name)
    else:
        run_dir = None

    seed_everything(cfg.seed)
    if data is None:
        data = load_data(cfg, data_dir)
    info = data.info
    model = build_model(cfg.model, info.shape).to(device)
    optimizer = make_optimizer(model, cfg, device)
    train_iter = BatchIterator(data.train, tc.batch_size, seed=cfg.seed, device=device)
    steps_per_epoch = len(train_iter)
    if steps_per_epoch == 0:
        raise ValueError(f"{info.name}: the training split is empty")
    total_steps = tc.max_steps if tc.max_steps > 0 else tc.epochs * steps_per_epoch
    n_epochs = math.ceil(total_steps / steps_per_epoch)
    scheduler = make_scheduler(optimizer, cfg, total_steps)
    noise = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    params = [p for p in model.parameters() if p.requires_grad]
    proper = model.likelihood.is_proper(info.value_kind)
    bpd_scale = (
        -1.0 / (info.num_pixels * math.log(2))
        if proper and info.value_kind in ("binary", "8bit")
        else None
    )
    has_valid = len(data.valid) > 0
    acc_dtype = torch.float32 if device.type == "mps" else torch.float64

    # Loop state (all of it goes into checkpoints).
    st = TrainState(cfg, model, optimizer, run_dir, total_steps, steps_per_epoch)
    best_elbo, best_epoch, since_best, bad_steps = -math.inf, 0, 0, 0
    history: list[dict] = []
    elapsed0, train_time = 0.0, 0.0
    epoch_acc = torch.zeros(4, dtype=acc_dtype, device=device)  # loss, elbo, rec, kl sums
    epoch_images, epoch_time, images_seen = 0, 0.0, 0
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scheduler is not None and ckpt["scheduler"] is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
        _set_rng_state(ckpt["rng"], noise)
        st.step, st.epoch, st.batch = ckpt["step"], ckpt["epoch"], ckpt["batch"]
        best_elbo, best_epoch = ckpt["best_valid_elbo"], ckpt["best_epoch"]
        since_best, bad_steps = ckpt["epochs_since_best"], ckpt["bad_steps"]
        history, elapsed0, train_time = ckpt["history"], ckpt["elapsed"], ckpt["train_time"]
        epoch_acc.copy_(ckpt["epoch_acc"].to(acc_dtype))
        epoch_images, epoch_time = ckpt["epoch_images"], ckpt["epoch_time"]
        images_seen = ckpt["images_seen"]

    log = None
    tb = None
    if run_dir is not None:
        runs.write_config(run_dir, cfg, info.shape)
        log = runs.MetricsLog(run_dir / runs.METRICS_FILE, ckpt["metrics_offset"] if ckpt else None)
        tb = _tensorboard(cfg, run_dir)
    best_state = None  # in-memory copy of the best weights, for early stopping
    if tc.compile:
        model.encoder.compile()
        model.decoder.compile()
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if tc.bf16 and device.type == "cuda"
        else nullcontext()
    )
    if tc.bf16 and device.type != "cuda":
        warnings.warn(f"train.bf16 is for CUDA only; training in float32 on {device}", stacklevel=2)

    def now() -> float:
        return elapsed0 + time.perf_counter() - t_start

    def emit(record: dict) -> None:
        if log is not None:
            log.write(record)
        if tb is not None:
            tag = f"{record['kind']}/{record['split']}"
            for k, v in record.items():
                if isinstance(v, float):
                    tb.add_scalar(f"{tag}/{k}", v, record["step"])

    def checkpoint(best: bool = False) -> None:
        if run_dir is None:
            return
        payload = {
            "format": runs.CHECKPOINT_FORMAT,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": None if scheduler is None else scheduler.state_dict(),
            "step": st.step,
            "epoch": st.epoch,
            "batch": st.batch,
            "rng": _rng_state(noise),
            "data_seed": cfg.seed,
            "best_valid_elbo": best_elbo,
            "best_epoch": best_epoch,
            "epochs_since_best": since_best,
            "bad_steps": bad_steps,
            "epoch_acc": epoch_acc.cpu(),
            "epoch_images": epoch_images,
            "epoch_time": epoch_time,
            "images_seen": images_seen,
            "history": history,
            "elapsed": now(),
            "train_time": train_time,
            "metrics_offset": log.offset,
            "config": to_dict(cfg),
        }
        folder = run_dir / "checkpoints"
        runs.save_checkpoint(folder / "last.pt", payload)
        if best:
            runs.save_checkpoint(folder / "best.pt", payload)

    # Divergence bookkeeping without syncs: the first step whose loss was not finite (-1: none).
    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    grad_was_bad = torch.zeros((), dtype=torch.bool, device=device)

    def assert_finite() -> None:
        bad = int(first_bad)
        if bad >= 0:
            raise TrainingDiverged(bad, run_dir, "gradient norm" if bool(grad_was_bad) else "loss")

    window_acc = epoch_acc.clone()
    window_images, window_t0 = 0, time.perf_counter()
    last_gnorm = float("nan")
    step_cbs, epoch_cbs = (
        _callbacks(callbacks, "on_step_end"),
        _callbacks(callbacks, "on_epoch_end"),
    )
    for cb in _callbacks(callbacks, "on_train_begin"):
        cb(st)
    if progress:
        where = f" -> {run_dir}" if run_dir is not None else ""
        print(
            f"vaelab: training {cfg.name}: {data.describe()}; {cfg.model.arch}, "
            f"{count_parameters(model):,} parameters, {device}{where}",
            file=sys.stderr,
        )
    bar = tqdm(
        total=total_steps,
        initial=st.step,
        disable=(not progress) or None,
        unit="step",
        dynamic_ncols=True,
        leave=False,
    )
    stopped_early = False
    model.train()
    try:
        with _StopSignals() as signals:
            while st.step < total_steps and not stopped_early:
                epoch_t0 = time.perf_counter()
                bar.set_description(f"epoch {st.epoch + 1}/{n_epochs}")
                for x in train_iter.epoch(st.epoch, start_batch=st.batch):
                    # ---------------------------------------------------------------- step
                    step = st.step
                    log_now = (step + 1) % tc.log_every == 0
                    with autocast:
                        out = compute_objective(model, x, cfg.objective, step, total_steps, noise)
                    loss = out.loss
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    gnorm = None
                    if tc.grad_clip > 0:
                        gnorm = torch.nn.utils.clip_grad_norm_(params, tc.grad_clip, foreach=True)
                    elif log_now or tc.max_bad_steps > 0:
                        gnorm = grad_norm(params)
                    bad = ~torch.isfinite(loss.detach())
                    if gnorm is not None:
                        gbad = ~torch.isfinite(gnorm)
                        grad_was_bad |= gbad & ~bad & (first_bad < 0)
                        bad = bad | gbad
                    if tc.max_bad_steps > 0 and bool(bad):  # opt-in: one sync per step
                        bad_steps += 1
                        if bad_steps > tc.max_bad_steps:
                            raise TrainingDiverged(step, run_dir, f"loss ({bad_steps} bad steps)")
                        optimizer.zero_grad(set_to_none=True)
                        grad_was_bad.zero_()
                    else:
                        first_bad = torch.where(bad & (first_bad < 0), step, first_bad)
                        optimizer.step()
                        if scheduler is not None and tc.schedule == "cosine":
                            scheduler.step()
                        b = x.shape[0]
                        epoch_acc += torch.stack(
                            [
                                loss.detach() * b,
                                out.elbo.detach().sum(),
                                -out.log_px_z.detach().sum(),
                                out.kl.detach().sum(),
                            ]
                        ).to(acc_dtype)
                        epoch_images += b
                        window_images += b
                        images_seen += b
                    st.step, st.batch = step + 1, st.batch + 1
                    bar.update(1)
                    # --------------------------------------------------------- bookkeeping
                    if log_now:
                        assert_finite()  # the one sync of the window
                        dt = time.perf_counter() - window_t0
                        w = ((epoch_acc - window_acc) / max(1, window_images)).tolist()
                        last_gnorm = float(gnorm) if gnorm is not None else float("nan")
                        rec = _record("step", "train", st, w, cfg, step, optimizer)
                        rec.update(
                            grad_norm=last_gnorm,
                            images_per_s=window_images / max(dt, 1e-9),
                            time=now(),
                            bad_steps=bad_steps,
                        )
                        emit(rec)
                        bar.set_postfix(
                            loss=f"{w[0]:.2f}",
                            elbo=f"{w[1]:.2f}",
                            kl=f"{w[3]:.2f}",
                            img_s=f"{rec['images_per_s']:.0f}",
                            refresh=False,
                        )
                        window_acc.copy_(epoch_acc)
                        window_images, window_t0 = 0, time.perf_counter()
                    if tc.checkpoint_every > 0 and st.step % tc.checkpoint_every == 0:
                        assert_finite()
                        checkpoint()
                    for cb in step_cbs:
                        cb(st)
                    reason = signals.reason or st.stop_reason
                    if reason is not None:
                        assert_finite()
                        epoch_time += time.perf_counter() - epoch_t0
                        train_time += time.perf_counter() - epoch_t0
                        checkpoint()
                        raise TrainingInterrupted(st.step, run_dir, reason)
                    if st.step >= total_steps:
                        break
                # -------------------------------------------------------------- epoch end
                assert_finite()
                epoch_time += time.perf_counter() - epoch_t0
                train_time += time.perf_counter() - epoch_t0
                means = (epoch_acc / max(1, epoch_images)).tolist()
                train_rec = _record("epoch", "train", st, means, cfg, st.step - 1, optimizer)
                train_rec.update(
                    grad_norm=last_gnorm,
                    time=now(),
                    bad_steps=bad_steps,
                    images_per_s=epoch_images / max(epoch_time, 1e-9),
                )
                records = [train_rec]
                if has_valid:
                    v = validate(model, data.valid, tc.eval_batch_size, device, cfg.seed)
                    if not math.isfinite(v["elbo"]):
                        raise TrainingDiverged(st.step, run_dir, "validation ELBO")
                    valid_rec = {
                        **train_rec,
                        "split": "valid",
                        **v,
                        "loss": -v["elbo"],
                        "time": now(),
                    }
                    for k in ("grad_norm", "images_per_s", "bad_steps"):
                        valid_rec.pop(k)
                    if bpd_scale is not None:
                        valid_rec["bits_per_dim"] = v["elbo"] * bpd_scale
                    records.append(valid_rec)
                score = records[-1]["elbo"]
                improved = score > best_elbo
                if improved:
                    best_elbo, best_epoch, since_best = score, st.epoch + 1, 0
                    if tc.early_stopping > 0:
                        best_state = {k: t.detach().clone() for k, t in model.state_dict().items()}
                else:
                    since_best += 1
                if scheduler is not None and tc.schedule == "plateau":
                    scheduler.step(score)
                for r in records:
                    emit(r)
                history.extend(records)
                if progress:
                    tqdm.write(_epoch_line(st, n_epochs, records), file=sys.stderr)
                for cb in epoch_cbs:
                    cb(st, records)
                stopped_early = tc.early_stopping > 0 and since_best >= tc.early_stopping
                if st.batch >= steps_per_epoch:  # a whole epoch (not cut by max_steps)
                    st.epoch, st.batch = st.epoch + 1, 0
                    epoch_acc.zero_()
                    window_acc.zero_()
                    epoch_images, epoch_time = 0, 0.0
                checkpoint(best=improved)
                reason = signals.reason or st.stop_reason
                if reason is not None and st.step < total_steps and not stopped_early:
                    raise TrainingInterrupted(st.step, run_dir, reason)
    finally:
        bar.close()
        if log is not None:
            log.close()
        if tb is not None:
            tb.close()

    # ------------------------------------------------------------------------------ the end
    if best_state is not None:
        model.load_state_dict(best_state)  # early stopping releases the best weights
    model.eval()
    summary = _summary(
        cfg,
        data,
        model,
        device,
        history,
        st,
        now(),
        train_time,
        best_elbo,
        best_epoch,
        stopped_early,
        bad_steps,
        images_seen,
    )
    result = FitResult(model=model, run_dir=run_dir, summary=summary, history=history)
    if run_dir is not None:
        save_model(model, cfg, run_dir)
        if tc.figures:
            summary["figures"] = _optional_step(
                "vaelab.viz", "save_default_figures", model, data, run_dir / "figures"
            )
        runs.write_json(run_dir / runs.SUMMARY_FILE, summary)
        if tc.report:
            summary["report"] = _optional_step("vaelab.report", "write_report", run_dir)
            runs.write_json(run_dir / runs.SUMMARY_FILE, summary)
    for cb in _callbacks(callbacks, "on_train_end"):
        cb(st, result)
    return result


# ------------------------------------------------------------------------------ helpers


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


def _optional_step(module: str, func: str, *args) -> Any:
    """Call ``module.func(*args)`` if that module exists; a failure warns (training is saved)."""
    if importlib.util.find_spec(module) is None:
        return None
    try:
        out = getattr(importlib.import_module(module), func)(*args)
    except Exception as exc:  # a plotting bug must not lose a finished run
        warnings.warn(f"{module}.{func} failed: {type(exc).__name__}: {exc}", stacklevel=2)
        return {"error": f"{type(exc).__name__}: {exc}"}
    if isinstance(out, dict):
        return {k: str(v) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return [str(p) for p in out]
    return None if out is None else str(out)


def _summary(
    cfg,
    data,
    model,
    device,
    history,
    st,
    wall,
    train_time,
    best_elbo,
    best_epoch,
    stopped_early,
    bad_steps,
    images_seen,
) -> dict:
    info = data.info
    last = {}
    for r in history:
        last[r["split"]] = r
    proper = model.likelihood.is_proper(info.value_kind)
    summary = {
        "name": cfg.name,
        "train": last.get("train"),
        "valid": last.get("valid"),
        "best_valid_elbo": best_elbo if math.isfinite(best_elbo) else None,
        "best_epoch": best_epoch,
        "epochs": st.epoch + (1 if st.batch else 0),
        "steps": st.step,
        "stopped_early": stopped_early,
        "bad_steps": bad_steps,
        "wall_time_s": wall,
        "train_time_s": train_time,
        "images_per_s": images_seen / max(train_time, 1e-9),
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
        "hardware": describe_hardware(device),
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
