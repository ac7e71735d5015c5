"""Run folders: where a training run lives on disk, and how to read one back.

A run folder ``runs/NAME/`` holds::

    config.json          the resolved config (+ ``image_shape``), written when training starts
    model.safetensors    the released weights (written at the end; see vaelab.model.save_model)
    checkpoints/         last.pt and best.pt: everything needed to resume exactly
    metrics.jsonl        one JSON record per line, appended while training
    summary.json         final numbers, wall time, hardware, versions
    figures/             reconstructions and prior samples

Every file except ``metrics.jsonl`` is written to a temporary name and renamed
(:mod:`vaelab.io`). ``metrics.jsonl`` is appended one whole line per ``write`` call, so a kill
can at worst leave a torn last line, which :func:`read_metrics` skips and a resume truncates.

:func:`load_run` returns a :class:`Run`, which rebuilds the model from ``config.json`` and the
safetensors weights (no pickles) and the data from the config's ``data`` section.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vaelab.config import Config, from_dict, to_dict
from vaelab.io import atomic_path, atomic_write_text

RUNS_DIR = "runs"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINT_FORMAT = "vaelab-checkpoint-1"


# ------------------------------------------------------------------------------ creating runs


def new_run_dir(out_dir: str | os.PathLike, name: str) -> Path:
    """Create and return ``out_dir/name``, or ``out_dir/name-2``, ``-3``, ... if it exists."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for i in range(1, 10_000):
        path = out_dir / (name if i == 1 else f"{name}-{i}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise ValueError(f"too many runs named {name!r} in {out_dir}")


def write_config(run_dir: Path, cfg: Config, image_shape: tuple[int, ...]) -> None:
    """``config.json``: the full config plus the image shape (the format of save_model)."""
    payload = to_dict(cfg)
    payload["image_shape"] = list(image_shape)
    atomic_write_text(run_dir / CONFIG_FILE, json.dumps(payload, indent=2))


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


class MetricsLog:
    """Append-only ``metrics.jsonl``; each record goes out in one ``os.write`` call."""

    def __init__(self, path: str | os.PathLike, truncate_to: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_to is not None and self.path.exists():
            # Drop records logged after the checkpoint we resume from (they will be redone).
            os.truncate(self.path, min(truncate_to, self.path.stat().st_size))
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, record: dict) -> None:
        os.write(self._fd, (json.dumps(record) + "\n").encode("utf-8"))

    @property
    def offset(self) -> int:
        """Bytes written so far (stored in checkpoints, so a resume can truncate back)."""
        return os.fstat(self._fd).st_size

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All records of a ``metrics.jsonl`` (a torn last line from a kill is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not JSON: {line[:80]!r}") from None
    return records


# ------------------------------------------------------------------------------ checkpoints


def save_checkpoint(path: str | os.PathLike, payload: dict) -> Path:
    """``torch.save`` to a temporary file, then rename: a kill never leaves a torn checkpoint."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (plain tensors, no pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, pickle errors, EOFError...
        raise ValueError(f"checkpoint {path} cannot be read ({exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a vaelab checkpoint (format {CHECKPOINT_FORMAT})")
    return payload


def capture_rng_state(noise: torch.Generator | None = None) -> dict:
    """The RNG states a checkpoint needs (torch CPU and CUDA, NumPy, Python, the z-noise
    generator), as tensors and plain values so ``torch.load(weights_only=True)`` reads them."""
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
        "noise": None if noise is None else noise.get_state(),
    }


def restore_rng_state(state: dict, noise: torch.Generator | None = None) -> None:
    """Undo :func:`capture_rng_state`."""
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
    if noise is not None and state["noise"] is not None:
        noise.set_state(state["noise"])


def remove_stale_temporaries(folder: Path) -> None:
    """Delete ``.NAME.*.tmp`` files a killed atomic write left behind."""
    if folder.is_dir():
        for p in folder.glob(".*.tmp"):
            p.unlink(missing_ok=True)


# ------------------------------------------------------------------------------ reading runs


def resolve_run(name_or_path: str | os.PathLike, runs_dir: str | os.PathLike = RUNS_DIR) -> Path:
    """A run folder from a path (``runs/NAME``) or a bare NAME under ``runs_dir``."""
    p = Path(name_or_path).expanduser()
    candidates = [p] if p.is_absolute() or len(p.parts) > 1 else [p, Path(runs_dir) / p]
    for c in candidates:
        if (c / CONFIG_FILE).is_file():
            return c
    tried = " or ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"no run folder at {tried} (a run folder holds {CONFIG_FILE})")


def read_config(run_dir: Path) -> tuple[Config, tuple[int, ...] | None]:
    path = run_dir / CONFIG_FILE
    payload = json.loads(path.read_text())
    shape = payload.pop("image_shape", None)
    try:
        cfg = from_dict(Config, payload)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: {exc}") from exc
    return cfg, None if shape is None else tuple(shape)


@dataclass
class Run:
    """A run folder: its config, summary and metrics, and the model rebuilt lazily.

    ``model`` comes from ``model.safetensors``; a run stopped before the end (no weights yet)
    falls back to ``checkpoints/last.pt``.
    """

    path: Path
    config: Config
    image_shape: tuple[int, ...] | None = None
    summary: dict = field(default_factory=dict)
    _model: Any = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def figures_dir(self) -> Path:
        return self.path / "figures"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def model(self):
        if self._model is None:
            self._model = self.load_model()
        return self._model

    def load_model(self, device: str | torch.device = "cpu"):
        """The trained VAE in eval mode on ``device``."""
        from vaelab.model import build_model, load_model

        if (self.path / WEIGHTS_FILE).is_file():
            return load_model(self.path, device=device)
        ckpt = self.checkpoints_dir / "last.pt"
        if not ckpt.is_file() or self.image_shape is None:
            raise FileNotFoundError(
                f"{self.path} has neither {WEIGHTS_FILE} nor checkpoints/last.pt"
            )
        model = build_model(self.config.model, self.image_shape)
        model.load_state_dict(load_checkpoint(ckpt)["model"])
        return model.to(device).eval()

    def metrics(self) -> list[dict]:
        """The records of ``metrics.jsonl`` (see :mod:`vaelab.train` for the fields)."""
        return read_metrics(self.path / METRICS_FILE)

    def data(self, data_dir: str | os.PathLike | None = None):
        """The run's :class:`vaelab.data.DataSplits`, rebuilt from the config's data section."""
        from vaelab.train import load_data

        return load_data(self.config, data_dir)


def load_run(path: str | os.PathLike) -> Run:
    """Open the run folder ``path`` (or NAME under ./runs)."""
    run_dir = resolve_run(path)
    cfg, shape = read_config(run_dir)
    summary_path = run_dir / SUMMARY_FILE
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return Run(path=run_dir, config=cfg, image_shape=shape, summary=summary)
