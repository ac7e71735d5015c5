"""Data-parallel training on several processes: torch.distributed + DistributedDataParallel.

Launch with PyTorch's own launcher, ``torchrun`` (or ``vaelab train --nproc N``, which runs it)::

    torchrun --nproc-per-node 4 -m vaelab train kingma-mnist
    vaelab train kingma-mnist --nproc 4

:func:`vaelab.train.fit` notices the variables torchrun sets (``RANK``, ``WORLD_SIZE``, ...)
and joins the process group (gloo on the CPU, nccl on CUDA, one GPU per local rank). What each
process does, so that N processes train exactly as one process with the same batch would:

* ``train.batch_size`` is the *global* batch. Every process draws the same global batch (the
  :class:`~vaelab.data.BatchIterator` order and dynamic-binarization draws are a function of
  (seed, epoch, batch)) and keeps its contiguous slice; slices differ in size by at most one.
* Every process draws the global batch's noise eps (L, B, Z) from the shared-seed generator and
  keeps its slice, so z is what one process would have drawn.
* Each process's loss is its slice's share of the global batch mean (mean over the slice times
  n_rank / B) and DDP *sums* the gradients (a comm hook): the sum is the gradient of the global
  batch mean, also for a last batch that does not split evenly.
* Metric sums are all-reduced (ELBO sums and counts; FID/FD statistics are sums too); the
  validation set is sharded the same way. Only rank 0 writes files (run folder, metrics,
  checkpoints, figures, report); the run folder it creates is broadcast to the others.
* Checkpoints hold global state only, so a checkpoint written by N processes resumes in one
  and the other way round.

Evaluation joins the group the same way (``vaelab eval RUN --nproc N``, or
:func:`vaelab.evaluate.evaluate` under torchrun): each process scores its slice of every
batch and the per-image results and sufficient statistics are gathered or summed, so the
report equals one process's; see :mod:`vaelab.evaluate`.

Not identical to one process: dropout masks (each process draws its own), BatchNorm batch
statistics on the CPU (per process; on CUDA BatchNorm becomes SyncBatchNorm), and the free-bits
loss, whose batch-mean KL per dimension is taken per process.

A process that dies makes the others fail at their next collective (gloo notices at once; a
timeout, ``$VAELAB_DIST_TIMEOUT_S`` seconds, default 600, catches the rest) with
:class:`DistributedFailure`; torchrun then stops the job. Checkpoints are written atomically by
rank 0 after the collectives that feed them, so ``checkpoints/last.pt`` stays loadable.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

ENV_TIMEOUT = "VAELAB_DIST_TIMEOUT_S"
ENV_RUN_INFO = "VAELAB_RUN_INFO"  # the launcher's file where rank 0 notes its run folder
DEFAULT_TIMEOUT_S = 600
_STOP_CODES = (None, "a stop request", "SIGINT", "SIGTERM")  # agreed as the max over processes
_COMM_ERRORS = ("gloo", "nccl", "connection reset", "connection closed", "timed out", "timeout")


class DistributedFailure(RuntimeError):
    """A collective operation failed: another process died, or the group timed out."""


def env_world() -> tuple[int, int, int] | None:
    """(rank, local_rank, world_size) from torchrun's variables; None outside a multi-process
    launch (``WORLD_SIZE`` unset or 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world


def is_main_process() -> bool:
    """True except on the processes of a torchrun launch with ``RANK`` > 0."""
    return int(os.environ.get("RANK", "0")) == 0


def _sum_hook(group, bucket):
    """DDP comm hook: sum the gradient buckets (DDP's default averages them)."""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


class _Objective(nn.Module):
    """The training objective as a module, so DDP's forward (and gradient sync) wraps it."""

    def __init__(self, vae: nn.Module, cfg, total_steps: int) -> None:
        super().__init__()
        self.vae, self.cfg, self.total_steps = vae, cfg, total_steps

    def forward(self, x: torch.Tensor, step: int, eps: torch.Tensor):
        from vaelab.objectives import compute_objective

        return compute_objective(self.vae, x, self.cfg, step, self.total_steps, None, eps)


class Distributed:
    """This process's place in the group and the collectives the training loop needs.

    Tensor sums go through the default group (gloo or nccl); flags and small Python values go
    through a CPU (gloo) group, so agreeing on a stop costs no device sync.
    """

    def __init__(self, rank: int, local_rank: int, world_size: int, device: torch.device) -> None:
        self.rank, self.local_rank, self.world_size = rank, local_rank, world_size
        self.device = device
        self.backend = dist.get_backend()
        self.cpu_group = dist.new_group(backend="gloo") if self.backend != "gloo" else None
        self.ddp: nn.Module | None = None
        self._owns_group = False

    # ---------------------------------------------------------------------- joining and leaving

    @classmethod
    def setup(cls, device: torch.device) -> tuple[Distributed | None, torch.device]:
        """Join torchrun's process group (if launched by it) and pick this rank's device.

        Returns (None, device) in a single-process run.
        """
        world = env_world()
        if world is None and dist.is_initialized() and dist.get_world_size() > 1:
            local = int(os.environ.get("LOCAL_RANK", dist.get_rank()))
            world = (dist.get_rank(), local, dist.get_world_size())  # the caller's group
        if world is None:
            return None, device
        rank, local_rank, world_size = world
        if device.type == "mps":
            raise ValueError(
                "torch.distributed does not support MPS; run on the CPU "
                "(train.device=cpu, or vaelab eval --device cpu)"
            )
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        owns = not dist.is_initialized()
        if owns:
            timeout = timedelta(seconds=float(os.environ.get(ENV_TIMEOUT, DEFAULT_TIMEOUT_S)))
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend, timeout=timeout)
        self = cls(rank, local_rank, world_size, device)
        self._owns_group = owns
        return self, device

    def close(self) -> None:
        """Leave the process group if :meth:`setup` joined it."""
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict:
        return {"world_size": self.world_size, "backend": self.backend}

    # ---------------------------------------------------------------------- small agreements

    def _cpu_reduce(self, values: Sequence[int], op) -> list[int]:
        t = torch.tensor(list(values), dtype=torch.int64)
        dist.all_reduce(t, op=op, group=self.cpu_group)
        return t.tolist()

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0 and give every rank its result (or raise its error everywhere)."""
        box: list[Any] = [None]
        if self.is_main:
            try:
                box[0] = ("ok", fn())
            except Exception as exc:  # re-raised on every rank below, not swallowed
                box[0] = ("error", exc)
        dist.broadcast_object_list(box, src=0, group=self.cpu_group)
        status, value = box[0]
        if status == "error":
            raise value
        return value

    def agree_stop(self, reason: str | None) -> str | None:
        """The stop reason if any process has one (signals win over callbacks), else None."""
        code = 0 if reason is None else _STOP_CODES.index(reason) if reason in _STOP_CODES else 1
        agreed = self._cpu_reduce([code], dist.ReduceOp.MAX)[0]
        if agreed == 0:
            return None
        return reason if reason is not None else f"{_STOP_CODES[agreed]} on another process"

    def any(self, flag: bool) -> bool:
        return bool(self._cpu_reduce([int(flag)], dist.ReduceOp.MAX)[0])

    def first_bad(self, step: int, grad: bool) -> tuple[int, bool]:
        """The earliest bad step over the processes (-1: none) and whether its gradient was."""
        big = 2**61  # (big * 2 + 1) fits in int64
        key = (step if step >= 0 else big) * 2 + (0 if grad else 1)
        key = self._cpu_reduce([key], dist.ReduceOp.MIN)[0]
        return (-1, False) if key // 2 == big else (key // 2, key % 2 == 0)

    # ---------------------------------------------------------------------- sums

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over the processes, in place."""
        dist.all_reduce(t)
        return t

    def consolidate_(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """The sums of ``tensors`` over the processes; afterwards rank 0 holds the sums and the
        others zeros, so accumulating on and summing again stays right."""
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        totals = [s.view_as(t) for s, t in zip(flat.split([t.numel() for t in tensors]), tensors)]
        for t, total in zip(tensors, totals):
            if self.is_main:
                t.copy_(total)
            else:
                t.zero_()
        return totals

    def sum_cpu_(self, *tensors: torch.Tensor) -> None:
        """Sum CPU ``tensors`` over the processes, in place, in one float64 exchange through
        the CPU group (evaluation's sufficient statistics; no device round trip under nccl)."""
        flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
        dist.all_reduce(flat, group=self.cpu_group)
        with torch.inference_mode():  # metrics' statistics may be inference tensors
            for t, total in zip(tensors, flat.split([t.numel() for t in tensors])):
                t.copy_(total.view_as(t))

    def gather_rows(self, index: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
        """Every process's rows of ``tensors``, in global order, on every process (CPU).

        ``index`` (n,) holds the global positions of this process's n rows; over all the
        processes the positions must be 0..N-1, each once. Used for per-image evaluation
        results, so means and standard errors are computed on the same (N,) tensors, in the
        same order, as in one process.
        """
        mine = (index.cpu(), [t.detach().cpu() for t in tensors])
        parts: list[Any] = [None] * self.world_size
        dist.all_gather_object(parts, mine, group=self.cpu_group)
        idx = torch.cat([p[0] for p in parts])
        order = torch.argsort(idx)
        if not torch.equal(idx[order], torch.arange(idx.numel())):
            raise RuntimeError(
                f"the processes' rows do not cover positions 0..{idx.numel() - 1} exactly once"
            )
        return [torch.cat([p[1][i] for p in parts])[order] for i in range(len(tensors))]

    # ---------------------------------------------------------------------- batches

    def bounds(self, n: int) -> tuple[int, int]:
        """This rank's contiguous slice [lo, hi) of a global batch of n (sizes differ by <= 1)."""
        return self.rank * n // self.world_size, (self.rank + 1) * n // self.world_size

    def check_batches(self, n_images: int, batch_size: int) -> None:
        """Every global training batch must give every process at least one image."""
        last = n_images % batch_size
        smallest = min(batch_size, n_images) if last == 0 else last
        if smallest < self.world_size:
            raise ValueError(
                f"train.batch_size={batch_size} on {n_images} training images leaves a batch of "
                f"{smallest}, fewer than the {self.world_size} processes; choose a batch size "
                f"(the global batch) whose batches, the last one included, hold at least "
                f"{self.world_size} images"
            )

    def wrap(self, model: nn.Module, objective_cfg, total_steps: int) -> nn.Module:
        """Wrap the training objective of ``model`` in DistributedDataParallel (parameters are
        broadcast from rank 0; gradients summed). On CUDA, BatchNorm becomes SyncBatchNorm in
        place, with the same parameters and state_dict keys."""
        if self.device.type == "cuda":
            nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ids = [self.device.index] if self.device.type == "cuda" else None
        self.ddp = nn.parallel.DistributedDataParallel(
            _Objective(model, objective_cfg, total_steps), device_ids=ids
        )
        self.ddp.register_comm_hook(None, _sum_hook)
        return self.ddp

    def _noise(self, n: int, n_samples: int, latent_dim: int, generator, lo: int, hi: int):
        """This rank's slice (L, hi - lo, Z) of the global batch's noise (L, n, Z)."""
        eps = torch.randn(
            (n_samples, n, latent_dim), generator=generator, device=self.device, dtype=torch.float32
        )
        return eps[:, lo:hi]

    def objective(self, x: torch.Tensor, step: int, generator: torch.Generator):
        """The objective on this rank's slice of the global batch x (B, C, H, W).

        ``loss`` is the slice's share of the global batch mean (the summed gradients are those
        of the global mean); the per-example tensors are the slice's. Noise comes from
        ``generator`` exactly as one process would draw it.
        """
        cfg = self.ddp.module.cfg
        n = x.shape[0]
        lo, hi = self.bounds(n)
        n_samples = cfg.k if cfg.name == "iwae" else cfg.n_samples
        eps = self._noise(n, n_samples, self.ddp.module.vae.latent_dim, generator, lo, hi)
        out = self.ddp(x[lo:hi], step, eps)
        out.loss = out.loss * ((hi - lo) / n)
        return out

    def shard_eval(self, x: torch.Tensor, generator: torch.Generator, latent_dim: int):
        """(x slice, eps slice (1, b, Z), lo) of a global evaluation batch: one z per image."""
        lo, hi = self.bounds(x.shape[0])
        return x[lo:hi], self._noise(x.shape[0], 1, latent_dim, generator, lo, hi), lo

    def reseed_workers(self, seed: int, step: int) -> None:
        """Give ranks > 0 their own global RNG stream (dropout masks), from (seed, step, rank)."""
        if self.is_main:
            return
        from vaelab.data.batches import derive_seed

        torch.manual_seed(derive_seed(seed, step, self.rank))

    # ---------------------------------------------------------------------- failures

    def failure(
        self, exc: RuntimeError, step: int, run_dir: Path | None
    ) -> DistributedFailure | None:
        """A :class:`DistributedFailure` for ``exc`` if it came from the communication layer
        (gloo and nccl raise plain RuntimeErrors, so their messages are read), else None."""
        from vaelab.train import TrainingDiverged

        if isinstance(exc, (TrainingDiverged, DistributedFailure)):
            return None
        text = str(exc).lower()
        is_comm = isinstance(exc, getattr(dist, "DistError", ())) or any(
            w in text for w in _COMM_ERRORS
        )
        if not is_comm:
            return None
        where = ""
        if run_dir is not None:
            where = f"; {_checkpoint_note(run_dir)}"
        return DistributedFailure(
            f"rank {self.rank} of {self.world_size}: communication with the other processes "
            f"failed near step {step} (did another process die? see its messages){where}. "
            f"Cause: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
        )


def _checkpoint_note(run_dir: Path) -> str:
    last = Path(run_dir) / "checkpoints" / "last.pt"
    if not last.is_file():
        return f"no checkpoint was written in {run_dir}"
    from vaelab.runs import load_checkpoint

    try:
        ckpt = load_checkpoint(last)
    except (ValueError, FileNotFoundError) as exc:
        return f"the checkpoint {last} cannot be read ({exc})"
    epochs, batches = ckpt["epoch"], ckpt["batch"]
    done = f"{epochs} epoch{'' if epochs == 1 else 's'}" + (
        f" + {batches} steps" if batches else ""
    )
    return (
        f"the last checkpoint, {last} (step {ckpt['step']}: {done}), loads; "
        f"resume with: vaelab train --resume {run_dir} (optionally --nproc N)"
    )


def announce_run_dir(run_dir: Path | None) -> None:
    """Tell the ``vaelab train --nproc`` launcher (if any) where the run folder is."""
    path = os.environ.get(ENV_RUN_INFO)
    if path and run_dir is not None:
        Path(path).write_text(json.dumps({"run_dir": str(run_dir)}))


# ------------------------------------------------------------------------------ launching


def launch(nproc: int, command: Sequence[str], what: str = "training") -> int:
    """Run ``command`` on ``nproc`` processes of this machine through torchrun, in this process
    (``python -m torch.distributed.run --standalone --nproc-per-node N COMMAND``).

    ``command`` is ``["-m", "vaelab", "train", ...]``, ``["-m", "vaelab", "eval", ...]`` or
    ``[script.py, args...]``; ``what`` names the job in failure messages. Returns 0; 1 after
    printing which ranks failed, how, and a training run's last checkpoint; or 128 + N after
    signal N (training processes save a checkpoint first, as a single process does).
    """
    import tempfile

    from torch.distributed.elastic.multiprocessing import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    args = parse_args(["--standalone", "--nproc-per-node", str(nproc), *command])
    saved_env = dict(os.environ)
    # torchrun's agent takes these signals (its default TORCHELASTIC_SIGNALS_TO_HANDLE)
    names = ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT")
    handlers = {
        getattr(signal, n): signal.getsignal(getattr(signal, n))
        for n in names
        if hasattr(signal, n)
    }
    with tempfile.TemporaryDirectory() as tmp:
        info = Path(tmp) / "run.json"
        os.environ[ENV_RUN_INFO] = str(info)
        try:
            run(args)
            return 0
        except ChildFailedError as exc:
            print(_failure_report(exc, nproc, info, what), file=sys.stderr)
            return 1
        except SignalException as exc:  # torchrun passed the signal on and waited for them
            note = f"; {_checkpoint_note(_run_dir(info))}" if info.is_file() else ""
            print(f"vaelab: stopped by {exc.sigval.name}{note}", file=sys.stderr)
            return 128 + int(exc.sigval)
        finally:
            os.environ.clear()
            os.environ.update(saved_env)
            for s, h in handlers.items():
                signal.signal(s, h)


def _failure_report(exc, nproc: int, info: Path, what: str = "training") -> str:
    first, _ = exc.get_first_failure()
    lines = [f"vaelab: error: distributed {what} on {nproc} processes failed:"]
    for rank in sorted(exc.failures):
        f = exc.failures[rank]
        how = (
            f"was killed by {f.signal_name()}"
            if f.exitcode < 0
            else f"exited with status {f.exitcode}"
        )
        mark = " (first failure)" if rank == first else ""
        lines.append(f"  rank {rank} (local rank {f.local_rank}, pid {f.pid}) {how}{mark}")
    if info.is_file():
        lines.append(f"  {_checkpoint_note(_run_dir(info))}")
    return "\n".join(lines)


def _run_dir(info: Path) -> Path:
    return Path(json.loads(info.read_text())["run_dir"])
