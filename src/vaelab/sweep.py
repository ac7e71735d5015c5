"""Grid sweeps: train and evaluate every cell of a grid x seeds, skip finished cells on restart,
and summarise the results as JSON, a Markdown table (mean +- std over seeds) and figures.

    from vaelab.sweep import run_sweep
    result = run_sweep(load_preset("zhao-mlp"), ["model.latent_dim=2,5,16", "model.arch=mlp,conv"],
                       seeds=3, out_dir="sweeps")

Layout: ``out_dir/NAME/`` holds one run folder per cell (``NAME/<cell>``), ``sweep.json``,
``sweep.md`` and ``figures/``. A cell is finished when its run folder has ``summary.json`` and
``eval.json``; a cell with ``checkpoints/last.pt`` but no summary is resumed; any other
leftover folder of a cell is started afresh.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import json
import math
import multiprocessing
import os
import re
import shutil
import statistics
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from vaelab.config import Config, override, to_dict
from vaelab.io import atomic_write_text


@dataclass(frozen=True)
class Cell:
    """One training run of a sweep: a grid point and a seed."""

    name: str
    point: tuple[tuple[str, str], ...]  # ((dotted key, value text), ...)
    seed: int

    @property
    def overrides(self) -> list[str]:
        return [f"{k}={v}" for k, v in self.point]

    @property
    def point_label(self) -> str:
        return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in self.point) or "(base)"


@dataclass
class SweepResult:
    """Where the sweep lives and what each cell gave (rows as in ``sweep.json``)."""

    path: Path
    rows: list[dict] = field(default_factory=list)
    table: list[dict] = field(default_factory=list)
    markdown: str = ""
    figures: list[Path] = field(default_factory=list)


def parse_grid(items: list[str] | tuple[str, ...]) -> list[tuple[str, list[str]]]:
    """``["model.latent_dim=2,5,16", "model.arch=mlp,conv"]`` -> [(key, [values]), ...].

    Values are checked against the config type by :func:`vaelab.config.override`.
    """
    grid = []
    for item in items:
        if "=" not in item:
            raise ValueError(f"grid entry {item!r} is not of the form key=v1,v2,...")
        key, values = item.split("=", 1)
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not vals:
            raise ValueError(f"grid entry {item!r} lists no values")
        grid.append((key.strip(), vals))
    keys = [k for k, _ in grid]
    if len(set(keys)) != len(keys):
        raise ValueError(f"a grid key is given twice: {keys}")
    return grid


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "-", text).strip("-")


def expand_cells(grid: list[tuple[str, list[str]]], seeds: int, base_seed: int = 0) -> list[Cell]:
    """Every grid point x seed, in a stable order (grid order, then seed)."""
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    keys = [k for k, _ in grid]
    cells = []
    for values in itertools.product(*[v for _, v in grid]):
        point = tuple(zip(keys, values))
        for s in range(seeds):
            parts = [f"{k.split('.')[-1]}={v}" for k, v in point] + [f"seed={base_seed + s}"]
            cells.append(Cell(_slug("_".join(parts)), point, base_seed + s))
    return cells


def cell_config(base: Config, cell: Cell, sweep_name: str) -> Config:
    """The config of one cell: the base, the cell's overrides, its seed and run name."""
    cfg = override(base, cell.overrides)
    return replace(cfg, seed=cell.seed, name=cell.name)


def _cell_state(run_dir: Path) -> str:
    if (run_dir / "summary.json").is_file() and (run_dir / "eval.json").is_file():
        return "done"
    if (run_dir / "summary.json").is_file():
        return "trained"
    if (run_dir / "checkpoints" / "last.pt").is_file():
        return "resumable"
    return "absent" if not run_dir.exists() else "stale"


def run_cell(
    cfg: Config,
    sweep_dir: Path,
    *,
    eval_k: int,
    metrics: list[str] | None,
    data_dir: str | None,
    eval_images: int | None = None,
    threads: int | None = None,
) -> dict:
    """Train (or resume) and evaluate one cell; returns its ``sweep.json`` row."""
    import torch

    from vaelab.evaluate import evaluate_run
    from vaelab.train import fit

    if threads:
        torch.set_num_threads(threads)
    run_dir = sweep_dir / cfg.name
    state = _cell_state(run_dir)
    if state == "stale":  # a folder with nothing to resume from: start the cell again
        shutil.rmtree(run_dir)
        state = "absent"
    if state == "absent":
        fit(cfg, out_dir=sweep_dir, progress=False, data_dir=data_dir)
    elif state == "resumable":
        fit(cfg, out_dir=sweep_dir, resume=run_dir, progress=False, data_dir=data_dir)
    if state != "done":
        evaluate_run(
            run_dir,
            k=eval_k,
            metrics=metrics,
            data_dir=data_dir,
            progress=False,
            max_images=eval_images,
        )
    return _row(run_dir, state)


def _eval_entries(run_dir: Path, split: str = "test") -> list[dict]:
    from vaelab.evaluate import read_eval

    report = read_eval(run_dir).get(split)
    return [] if report is None else [e.to_dict() for e in report.entries]


def _row(run_dir: Path, state: str) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text())
    values: dict[str, Any] = {}
    labels: dict[str, str] = {}
    for e in _eval_entries(run_dir):
        if isinstance(e["value"], (int, float)) and not isinstance(e["value"], bool):
            key = e["name"] + (f" [{e['unit']}]" if e.get("unit") else "")
            values[key] = e["value"]
            labels[key] = ", ".join(
                f"{k}={e[k]}"
                for k in ("estimator", "k", "split", "binarization")
                if e.get(k) is not None
            )
    return {
        "run": str(run_dir),
        "resumed_from": state,
        "summary": summary,
        "eval": values,
        "labels": labels,
    }


def _mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


SUMMARY_COLUMNS = {
    "train loss [nats/image]": ("train", "loss"),
    "valid loss [nats/image]": ("valid", "loss"),
    "best valid ELBO [nats/image]": ("best_valid_elbo",),
    "parameters": ("parameters",),
    "train time [s]": ("train_time_s",),
}


def _dig(d: Any, path: tuple[str, ...]) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def aggregate(cells: list[Cell], rows: list[dict]) -> list[dict]:
    """One entry per grid point: mean and std over seeds of every number."""
    groups: dict[tuple, list[dict]] = {}
    labels: dict[tuple, str] = {}
    for cell, row in zip(cells, rows):
        groups.setdefault(cell.point, []).append(row)
        labels[cell.point] = cell.point_label
    table = []
    for point, rs in groups.items():
        numbers: dict[str, list[float]] = {}
        for r in rs:
            for col, path in SUMMARY_COLUMNS.items():
                v = _dig(r["summary"], path)
                if isinstance(v, (int, float)):
                    numbers.setdefault(col, []).append(float(v))
            for k, v in r["eval"].items():
                numbers.setdefault(k, []).append(float(v))
        stats = {k: _mean_std(v) for k, v in numbers.items()}
        table.append(
            {
                "point": dict(point),
                "label": labels[point],
                "seeds": len(rs),
                "stats": {k: {"mean": m, "std": s} for k, (m, s) in stats.items()},
            }
        )
    return table


def _fmt(m: float, s: float, seeds: int) -> str:
    if math.isnan(m):
        return "n/a"
    digits = 0 if abs(m) >= 1e4 else 2
    return f"{m:,.{digits}f}" + (f" ± {s:,.{digits}f}" if seeds > 1 else "")


def markdown_table(table: list[dict], columns: list[str] | None = None) -> str:
    """A Markdown table: one row per grid point, mean ± std over seeds per column."""
    if not table:
        return "(no cells)\n"
    if columns is None:
        seen: dict[str, None] = {}
        for t in table:
            for k in t["stats"]:
                seen.setdefault(k, None)
        columns = list(seen)
    head = "| setting | seeds | " + " | ".join(columns) + " |"
    sep = "|---|---|" + "---|" * len(columns)
    lines = [head, sep]
    for t in table:
        cells = [
            _fmt(t["stats"][c]["mean"], t["stats"][c]["std"], t["seeds"])
            if c in t["stats"]
            else "n/a"
            for c in columns
        ]
        lines.append(f"| {t['label']} | {t['seeds']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_sweep(
    base: Config,
    grid: list[str] | tuple[str, ...],
    *,
    seeds: int = 1,
    out_dir: str | os.PathLike = "sweeps",
    name: str | None = None,
    jobs: int = 1,
    eval_k: int = 100,
    metrics: list[str] | None = None,
    eval_images: int | None = None,
    data_dir: str | None = None,
    figures: bool = True,
    progress: bool = True,
) -> SweepResult:
    """Run every cell of ``grid`` x ``seeds`` (skipping finished ones), evaluate, summarise.

    Args:
        base: the config every cell starts from.
        grid: ``key=v1,v2,...`` entries; the cells are their Cartesian product.
        seeds: seeds per grid point (``base.seed``, ``base.seed + 1``, ...).
        out_dir, name: the sweep lives in ``out_dir/name`` (default name: ``base.name``).
        jobs: cells trained at once, in separate processes (each gets cores // jobs threads).
        eval_k: importance samples for the log-likelihood of each cell.
        metrics: metric names for :func:`vaelab.evaluate.evaluate_run` (default: its defaults).
        eval_images: evaluate each cell on the first N test images only (quick sweeps).
        data_dir: the data directory.
        figures: write the comparison figures (:func:`comparison_figures`): the bound curves
            for every sweep, the latent-size grids when the grid varies the latent size. They
            are drawn again on a restart, even when every cell was finished.
    """
    parsed = parse_grid(grid)
    cells = expand_cells(parsed, seeds, base.seed)
    name = name or base.name
    sweep_dir = Path(out_dir) / name
    sweep_dir.mkdir(parents=True, exist_ok=True)
    cfgs = [cell_config(base, c, name) for c in cells]  # validates every override up front
    atomic_write_text(
        sweep_dir / "sweep_config.json",
        json.dumps(
            {
                "base": to_dict(base),
                "grid": list(grid),
                "seeds": seeds,
                "eval_k": eval_k,
                "metrics": metrics,
            },
            indent=2,
        ),
    )
    rows: list[dict | None] = [None] * len(cells)
    kwargs = {
        "eval_k": eval_k,
        "metrics": metrics,
        "data_dir": data_dir,
        "eval_images": eval_images,
    }
    bar = _progress(len(cells), progress)
    if jobs <= 1:
        for i, cfg in enumerate(cfgs):
            rows[i] = run_cell(cfg, sweep_dir, **kwargs)
            bar.update(1)
    else:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
            futures = {
                pool.submit(run_cell, cfg, sweep_dir, threads=threads, **kwargs): i
                for i, cfg in enumerate(cfgs)
            }
            for fut in cf.as_completed(futures):
                rows[futures[fut]] = fut.result()
                bar.update(1)
    bar.close()
    done_rows = [r for r in rows if r is not None]
    for cell, row in zip(cells, done_rows):
        row["cell"] = cell.name
        row["point"] = dict(cell.point)
        row["seed"] = cell.seed
    table = aggregate(cells, done_rows)
    md = (
        f"# Sweep `{name}`\n\nGrid: {', '.join(f'`{g}`' for g in grid)}; seeds: {seeds}; "
        f"log-likelihood with k = {eval_k}. Numbers are mean ± std over seeds.\n\n"
        + markdown_table(table)
    )
    atomic_write_text(
        sweep_dir / "sweep.json",
        json.dumps(
            {"name": name, "grid": list(grid), "seeds": seeds, "cells": done_rows, "table": table},
            indent=2,
        ),
    )
    atomic_write_text(sweep_dir / "sweep.md", md)
    result = SweepResult(sweep_dir, done_rows, table, md)
    if figures:
        result.figures = comparison_figures(sweep_dir, cells, parsed, data_dir=data_dir)
    return result


def varying_key(grid) -> str | None:
    """The grid key the comparison figures vary within one figure: the latent size when the
    grid has it, else the first key with more than one value (else the first key; None for an
    empty grid)."""
    keys = [k for k, _ in grid]
    if "model.latent_dim" in keys:
        return "model.latent_dim"
    several = [k for k, values in grid if len(values) > 1]
    return (several or keys or [None])[0]


def comparison_figures(sweep_dir: Path, cells: list[Cell], grid, *, data_dir=None) -> list[Path]:
    """Figures comparing the grid points, from the first seed's runs, one set for each setting
    of the grid keys other than :func:`varying_key` (file tag: that setting, or ``all``):

    - ``bound-curves_<tag>.png`` for every sweep: the lower bound against training images seen
      (Kingma & Welling Fig. 2), one curve per value of the varying key, labelled with it;
    - ``latent-samples_<tag>.png`` and ``latent-reconstructions_<tag>.png`` (Astorga et al.
      Figs. 1 and 4) when the grid varies the latent size.

    Only the run folders are read, so a restarted sweep whose cells are all finished draws them
    again."""
    from vaelab.runs import load_run
    from vaelab.viz import save_figure
    from vaelab.viz.compare import bound_curves, latent_comparison, setting_label

    key = varying_key(grid)
    first_seed = min(c.seed for c in cells)
    groups: dict[tuple, list[Cell]] = {}
    for c in cells:
        if c.seed == first_seed:
            rest = tuple((k, v) for k, v in c.point if k != key)
            groups.setdefault(rest, []).append(c)
    out = []
    for rest, group in groups.items():
        runs = [load_run(sweep_dir / c.name) for c in group]
        tag = _slug("_".join(f"{k.split('.')[-1]}={v}" for k, v in rest)) or "all"
        if key == "model.latent_dim":
            data = runs[0].data(data_dir)
            for mode in ("samples", "reconstructions"):
                fig = latent_comparison(runs, data, mode=mode)
                out.append(save_figure(fig, sweep_dir / "figures" / f"latent-{mode}_{tag}.png"))
        labels = None if key is None else [setting_label(key, dict(c.point)[key]) for c in group]
        fig = bound_curves(runs, labels=labels)
        out.append(save_figure(fig, sweep_dir / "figures" / f"bound-curves_{tag}.png"))
    return out


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def sweep_run_dirs(sweep_dir: str | os.PathLike) -> list[Path]:
    """The run folders (those holding ``config.json``) directly inside ``sweep_dir``, in natural
    order of their names (``latent_dim=2`` before ``latent_dim=10``)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"no sweep folder at {sweep_dir}")
    dirs = [p for p in sweep_dir.iterdir() if (p / "config.json").is_file()]
    if not dirs:
        raise FileNotFoundError(f"no run folders in {sweep_dir} (a run folder holds config.json)")
    return sorted(dirs, key=lambda p: _natural_key(p.name))


def is_sweep_dir(path: str | os.PathLike) -> bool:
    """True for a folder that is not itself a run folder but holds run folders (a sweep, or
    ``runs/``)."""
    path = Path(path)
    if not path.is_dir() or (path / "config.json").is_file():
        return False
    return any((p / "config.json").is_file() for p in path.iterdir())


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="sweep cells", unit="cell")
