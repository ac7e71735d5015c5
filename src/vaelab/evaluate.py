"""evaluate(): every registered metric of a model on one split, each number labelled.

    report = evaluate(model, load_dataset("mnist", binarize="dynamic"), k=1000)
    print(format_table(report))
    report.value("log_px")                      # nats per image
    evaluate_run("runs/quickstart", k=5000)     # also writes runs/quickstart/eval.json

Every :class:`~vaelab.metrics.Entry` carries its unit, estimator, k, split, binarization and
image count; a Bernoulli likelihood on grey-level data is flagged "not a proper likelihood".
Evaluation never looks at the training objective, so a beta = 4 run compares with a beta = 1 run.

Dynamically binarized data are binarized once per evaluation: the 0/1 draw of each image is
seeded by ``seed`` (and its read batch), so every metric sees the same binary images and a
rerun with the same seed reproduces them.

Several processes (``torchrun --nproc-per-node N -m vaelab eval RUN``, ``vaelab eval RUN
--nproc N``, or :func:`evaluate` called under torchrun): the processes join torchrun's group
(gloo on the CPU, nccl on CUDA, one GPU per local rank; see :mod:`vaelab.distributed`), every
process reads the same batches of the split and scores its contiguous slice of each, and the
report every process returns equals one process's up to float rounding:

* ``elbo``, ``loglik``, ``reconstruction``: per-image values are gathered in split order, so
  means and standard errors are computed as in one process. The ELBO's z noise is drawn whole
  for each batch by every process, which keeps its slice; importance sampling splits each
  batch by whole chunks, whose draws are seeded by their global index.
* ``fd``: count, sum and sum of outer products of the features are summed across processes;
  prior samples come from one shared draw per batch. Rank 0 first trains (or downloads) and
  caches the feature network, then the others load it.
* ``active-units``: sums of E_q[z] and of its outer products, summed across processes.
* ``probe``: latent means encoded in slices and gathered; rank 0 alone fits the
  logistic regression and hands its result to the others.
* ``params``: counted by every process (no data, no exchange).

:func:`evaluate_run` has rank 0 load (and if needed download) the data first, and write
``eval.json`` alone. A process-group timeout (``$VAELAB_DIST_TIMEOUT_S``, default 600 s) also
bounds how long the others wait for rank 0's probe or feature network. One process (or
``distributed=False``) never touches torch.distributed.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vaelab.metrics import DEFAULT_METRICS, METRICS, Entry, EvalContext
from vaelab.metrics.base import MetricUnavailable
from vaelab.model import has_convolutions, is_channels_last

EVAL_FILE = "eval.json"
EVAL_FORMAT = "vaelab-eval-1"


@dataclass
class EvalReport:
    """The entries of one evaluation, and what they were computed on.

    Attributes:
        entries: the labelled numbers, in metric order.
        dataset: the data's name (``DataInfo.name``), e.g. ``"mnist-dynamic"``.
        split, n_images, k, seed: as evaluated.
        processes: how many processes shared the work (torchrun's world size; 1 without).
        binarization: how the evaluated images were binarized, in words.
        likelihood: the decoder likelihood's registered class name; ``likelihood_proper``
            whether it is a proper density or mass on this data.
        seconds: wall time per metric.
        device, created, versions: where, when and with what.
        run: the run folder, when evaluated through :func:`evaluate_run`.
    """

    entries: list[Entry]
    dataset: str
    split: str
    n_images: int
    k: int
    seed: int
    binarization: str
    likelihood: str
    likelihood_proper: bool
    seconds: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"
    created: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    run: str | None = None
    processes: int = 1

    def get(self, name: str) -> Entry:
        """The entry called ``name``; a ValueError lists the names there are."""
        for e in self.entries:
            if e.name == name:
                return e
        raise ValueError(f"no entry {name!r} in this report; entries: {', '.join(self.names())}")

    def value(self, name: str) -> float | None:
        return self.get(name).value

    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "entries"}
        d["entries"] = [e.to_dict() for e in self.entries]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvalReport:
        d = dict(d)
        d["entries"] = [Entry.from_dict(e) for e in d.get("entries", [])]
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=True)


def _versions() -> dict[str, str]:
    import platform

    import vaelab

    return {
        "vaelab": vaelab.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def _metric_names(metrics) -> tuple[list[str], bool]:
    """(names, explicit): ``None`` means the defaults, where a metric the data cannot support
    (e.g. a probe without labels) is reported as skipped instead of raising."""
    if metrics is None:
        return [m for m in DEFAULT_METRICS if m in METRICS], False
    if isinstance(metrics, str):
        metrics = [metrics]
    names = [n.strip() for m in metrics for n in m.split(",") if n.strip()]
    for n in names:
        METRICS.get(n)  # raises with the list of choices
    return list(dict.fromkeys(names)), True


def evaluate(
    model,
    data,
    *,
    split: str = "test",
    k: int = 1000,
    metrics: str | list[str] | tuple[str, ...] | None = None,
    batch_size: int = 1000,
    device: torch.device | str | None = None,
    seed: int = 0,
    data_dir: str | os.PathLike | None = None,
    feature_net: Any = "lenet",
    max_images: int | None = None,
    probe_train_images: int | None = None,
    workers: int | None = None,
    loglik_sample: int | None = None,
    channels_last: bool = True,
    progress: bool = True,
    distributed: bool = True,
) -> EvalReport:
    """Evaluate ``model`` on ``data`` (a :class:`vaelab.data.DataSplits`).

    Args:
        split: ``"test"`` (default), ``"valid"`` or ``"train"``.
        k: importance samples per image for ``loglik`` (1000; 5000 for paper tables).
        metrics: registered metric names (``METRICS.names()``), as a list or a comma-separated
            string; ``None`` runs :data:`~vaelab.metrics.DEFAULT_METRICS`, skipping (with a
            note) any the data cannot support, such as a probe on unlabeled data.
        batch_size: images per forward pass.
        device: where to compute (the model is moved there); ``None``: the model's device.
        seed: seeds every Monte Carlo draw and the binarization of dynamic data.
        data_dir: where the FD-LeNet feature network is cached (default: the data dir).
        feature_net: ``"lenet"``, ``"lenet:DATASET"``, ``"inception"``, ``"inception:PATH"`` or a
            :class:`~vaelab.metrics.features.FeatureNet`.
        max_images: evaluate only the first N images of the split.
        probe_train_images: fit the linear probe on the first N train images (default all).
        workers: CPU threads for importance sampling (``None``: one per torch thread; see
            :func:`~vaelab.metrics.likelihood.importance_sampled_log_likelihood`).
        loglik_sample: importance-sample only a random sample of this many images of the split
            and estimate the split's mean log p(x) as its mean ELBO (every image) plus the
            sample's mean gap log p(x) - ELBO (a difference estimator; its stderr is that of
            the estimate of the split's mean, from the sample). ``None``: every image.
        channels_last: run a convolutional model in the channels-last (NHWC) layout, which
            oneDNN and cuDNN run faster (1.5x for importance sampling with the ``resnet``
            decoder on a 2-core CPU); same numbers up to float rounding, and the model's layout
            is restored afterwards.
        progress: progress bars for the slow metrics (rank 0's only, under torchrun).
        distributed: under torchrun, share the work with the other processes, which must all
            call :func:`evaluate` too (a collective). ``False``: evaluate everything in this
            process, e.g. on rank 0 alone of a training job.

    Returns:
        :class:`EvalReport`; under torchrun every process returns the same numbers, which
        equal one process's up to float rounding (see the module docstring).
    """
    from vaelab.distributed import Distributed

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if max_images is not None and max_images < 2:
        raise ValueError(f"max_images must be >= 2, got {max_images}")
    names, explicit = _metric_names(metrics)
    device = model.device if device is None else torch.device(device)
    # under torchrun: join the group (nothing is joined in one process, or with distributed=False)
    dist, device = Distributed.setup(device) if distributed else (None, device)
    relayout = channels_last and has_convolutions(model) and not is_channels_last(model)
    try:
        if relayout:
            model.to(memory_format=torch.channels_last)
        ctx = EvalContext(
            model=model.to(device),
            data=data,
            split=split,
            k=k,
            seed=seed,
            batch_size=batch_size,
            device=device,
            data_dir=None if data_dir is None else Path(data_dir),
            feature_net=feature_net,
            max_images=max_images,
            progress=progress and (dist is None or dist.is_main),
            probe_train_images=probe_train_images,
            workers=workers,
            loglik_sample=loglik_sample,
            requested=explicit,
            dist=dist,
        )
        return _evaluate(ctx, names, explicit)
    finally:
        if relayout:
            model.to(memory_format=torch.contiguous_format)
        if dist is not None:
            dist.close()


def _evaluate(ctx: EvalContext, names: list[str], explicit: bool) -> EvalReport:
    model, data, split, world = ctx.model, ctx.data, ctx.split, ctx.shard
    if ctx.n_images < 2:
        raise ValueError(
            f"the {split} split of {data.info.name} has {ctx.n_images} images; need >= 2"
        )
    if world is not None and ctx.n_images < world[1]:
        raise ValueError(
            f"the {split} split of {data.info.name} has {ctx.n_images} images, fewer than the "
            f"{world[1]} processes; evaluate on fewer processes"
        )
    was_training = model.training
    model.eval()
    entries, seconds = [], {}
    try:
        for name in names:
            start = time.perf_counter()
            try:
                entries += METRICS.get(name)(ctx)
            except MetricUnavailable as exc:
                if explicit:
                    raise
                entries.append(ctx.label(name, None, "", "skipped", notes=(f"skipped: {exc}",)))
            seconds[name] = round(time.perf_counter() - start, 3)
    finally:
        model.train(was_training)
    return EvalReport(
        entries=entries,
        dataset=data.info.name,
        split=split,
        n_images=ctx.n_images,
        k=ctx.k,
        seed=ctx.seed,
        binarization=ctx.binarization,
        likelihood=type(model.likelihood).__name__,
        likelihood_proper=model.likelihood.is_proper(data.info.value_kind),
        seconds=seconds,
        device=str(ctx.device),
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        versions=_versions(),
        processes=1 if world is None else world[1],
    )


# ------------------------------------------------------------------------------ run folders


def read_eval(run_dir: str | os.PathLike) -> dict[str, EvalReport]:
    """The reports in a run's ``eval.json``, by split (``{}`` when there is none)."""
    path = Path(run_dir) / EVAL_FILE
    if not path.is_file():
        return {}
    payload = json.loads(path.read_text())
    if payload.get("format") != EVAL_FORMAT:
        raise ValueError(f"{path} is not a vaelab eval file (format {EVAL_FORMAT})")
    return {s: EvalReport.from_dict(r) for s, r in payload["splits"].items()}


def write_eval(run_dir: str | os.PathLike, report: EvalReport) -> Path:
    """Merge ``report`` into ``eval.json`` atomically: its entries replace those of the same name
    for the same split, and other entries (from earlier ``--metrics`` runs) are kept."""
    from vaelab.io import atomic_write_text

    run_dir = Path(run_dir)
    reports = read_eval(run_dir)
    old = reports.get(report.split)
    if old is not None and old.dataset == report.dataset:
        fresh = set(report.names())
        merged = [e for e in old.entries if e.name not in fresh] + report.entries
        seconds = {**old.seconds, **report.seconds}
        report = EvalReport(**{**report.__dict__, "entries": merged, "seconds": seconds})
    reports[report.split] = report
    payload = {"format": EVAL_FORMAT, "splits": {s: r.to_dict() for s, r in reports.items()}}
    return atomic_write_text(run_dir / EVAL_FILE, json.dumps(payload, indent=2) + "\n")


def evaluate_run(
    run_path: str | os.PathLike,
    *,
    data_dir: str | os.PathLike | None = None,
    device: torch.device | str | None = "auto",
    write: bool = True,
    distributed: bool = True,
    **kwargs: Any,
) -> EvalReport:
    """Load a run folder (:func:`vaelab.runs.load_run`), evaluate it on its own dataset and
    merge the report into ``<run>/eval.json`` (atomically). ``kwargs`` go to :func:`evaluate`;
    ``device="auto"`` picks CUDA, then MPS, then the CPU.

    Under torchrun (unless ``distributed=False``, see :func:`evaluate`), rank 0 loads the data
    first (a download happens once), every process evaluates its share, and rank 0 alone
    writes ``eval.json`` while the others wait for it.
    """
    from vaelab.devices import pick_device
    from vaelab.distributed import Distributed
    from vaelab.runs import load_run

    run = load_run(run_path)
    dev = pick_device(device) if device is not None else torch.device("cpu")
    dist, dev = Distributed.setup(dev) if distributed else (None, dev)  # evaluate() reuses it
    on_main = (lambda fn: fn()) if dist is None else dist.on_main
    try:
        model = run.load_model(dev)
        loaded: list = []
        on_main(lambda: loaded.append(run.data(data_dir)))  # rank 0 first: it may download
        data = loaded[0] if loaded else run.data(data_dir)
        report = evaluate(
            model, data, device=dev, data_dir=data_dir, distributed=distributed, **kwargs
        )
        report.run = str(run.path)
        if write:
            on_main(lambda: write_eval(run.path, report))
        return report
    finally:
        if dist is not None:
            dist.close()


# ----------------------------------------------------------------------------------- table


def _fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "parameters" or unit.startswith("of "):
        return f"{int(round(v)):,}"
    return f"{v:.6g}"


def _table(rows: list[list[Any]], headers: list[str]) -> str:
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    right = {1, 2, 4}  # numbers align right
    fmt = [lambda c, w, i=i: c.rjust(w) if i in right else c.ljust(w) for i in range(len(headers))]
    lines = ["  ".join(fmt[i](c, widths[i]) for i, c in enumerate(r)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_table(report: EvalReport, estimators: bool = True) -> str:
    """A readable table of the report: a header with dataset, split and binarization, one row
    per entry (value, standard error, unit, k), then each entry's estimator and any notes."""
    head = [
        f"dataset {report.dataset}, {report.split} split ({report.n_images:,} images), seed {report.seed}"
        + (f", run {report.run}" if report.run else ""),
        f"binarization: {report.binarization}",
        f"likelihood: {report.likelihood}"
        + ("" if report.likelihood_proper else " -- NOT a proper likelihood for this data"),
        "",
    ]
    rows = [
        [
            e.name,
            _fmt(e.value, e.unit),
            "" if e.stderr is None else f"{e.stderr:.2g}",
            e.unit,
            "" if e.k is None else e.k,
            "*" * bool(e.notes),
        ]
        for e in report.entries
    ]
    lines = head + [_table(rows, ["metric", "value", "+- stderr", "unit", "k", "note"])]
    if estimators:
        lines += ["", "estimators:"] + [f"  {e.name}: {e.estimator}" for e in report.entries]
    notes = sorted({n for e in report.entries for n in e.notes})
    if notes:
        lines += ["", "notes (*):"] + [f"  {n}" for n in notes]
    total = sum(report.seconds.values())
    procs = f" x {report.processes} processes" if report.processes > 1 else ""
    lines += [
        "",
        f"{total:.1f} s on {report.device}{procs}: "
        + ", ".join(f"{m} {s:.1f} s" for m, s in report.seconds.items()),
    ]
    return "\n".join(lines)
