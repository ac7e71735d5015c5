"""``report.html``: one self-contained page per run.

Sections: the config (TOML), the summary, the model summary table, the evaluation numbers with
their labels (``eval.json``, when the run has been evaluated), the attribute probes and every
figure that applies to the run. Images are embedded as base64 data URIs and the styles are
inline, so the page needs no network, no JavaScript and no other file: it can be mailed, or
opened from an archive.

Figures already in ``figures/`` and newer than the weights (and, for the training curves, the
log) are reused; the others are drawn and saved there. A figure that fails is reported in its
place, so one failing figure never costs the whole report. This module imports matplotlib only
when it draws.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import os
import warnings
from pathlib import Path
from typing import Any

REPORT_FILE = "report.html"
EVAL_FILE = "eval.json"

CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 0;
       color: #222; background: #fafafa; line-height: 1.45; }
main { max-width: 1100px; margin: 0 auto; padding: 1.5em 2em 4em; background: #fff; }
h1 { font-size: 1.7em; margin-bottom: 0.2em; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
h3 { margin-bottom: 0.3em; }
.sub { color: #666; margin-top: 0; }
pre { background: #f4f4f4; padding: 0.8em 1em; overflow-x: auto; font-size: 0.82em;
      border-radius: 4px; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
th, td { border-bottom: 1px solid #e4e4e4; padding: 0.25em 0.9em 0.25em 0; text-align: left;
         vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1.2em 0 2em; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; margin-top: 0.3em; }
.note { color: #8a5a00; background: #fff7e6; padding: 0.5em 0.8em; border-radius: 4px; }
.error { color: #a40000; background: #fdecec; padding: 0.5em 0.8em; border-radius: 4px; }
nav a { margin-right: 1em; }
.cols { display: grid; grid-template-columns: minmax(0, 1fr) minmax(0, 1fr); gap: 2em; }
.cols pre { margin-top: 0; }
.glance { margin-top: 1em; }
@media (max-width: 800px) { .cols { grid-template-columns: minmax(0, 1fr); } }
"""


# ------------------------------------------------------------------------------ small helpers


def _esc(value: Any) -> str:
    """Escape text content (quotes stay readable, e.g. in the TOML config)."""
    return html.escape(str(value), quote=False)


def _attr(value: Any) -> str:
    """Escape an attribute value."""
    return html.escape(str(value), quote=True)


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def flatten(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dicts -> (dotted key, leaf) pairs; lists of scalars stay one value."""
    if isinstance(obj, dict):
        out = []
        for k, v in obj.items():
            out += flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    return [(prefix, obj)]


def _table(rows: list[tuple], headers: tuple[str, ...]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for cell in row:
            cls = (
                ' class="num"'
                if isinstance(cell, (int, float)) and not isinstance(cell, bool)
                else ""
            )
            cells.append(f"<td{cls}>{_esc(_fmt(cell))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def data_uri(path: Path) -> str:
    mime = {".png": "image/png", ".gif": "image/gif", ".jpg": "image/jpeg"}[path.suffix.lower()]
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


# (dotted summary key, label) of the numbers shown at the top of the report.
GLANCE = (
    ("parameters", "parameters"),
    ("epochs", "epochs"),
    ("steps", "steps"),
    ("wall_time_s", "wall time (s)"),
    ("precision", "training arithmetic"),
    ("valid.elbo", "final valid ELBO (nats)"),
    ("valid.bits_per_dim", "final valid bits/dim"),
    ("best_valid_elbo", "best valid ELBO (nats)"),
    ("best_epoch", "best epoch"),
    ("likelihood_note", "note"),
)


def _glance(summary: dict) -> str:
    """A short table of the headline numbers of ``summary.json`` (those that are there)."""
    flat = dict(flatten(summary or {}))
    rows = [(label, flat[key]) for key, label in GLANCE if flat.get(key) is not None]
    return f'<div class="glance">{_table(rows, ("at a glance", ""))}</div>' if rows else ""


def eval_section(payload: Any) -> str:
    """HTML for ``eval.json``: one table per split for vaelab's own format (each number with its
    unit, standard error, k, estimator and notes), else a generic labelled table."""
    if not (isinstance(payload, dict) and isinstance(payload.get("splits"), dict)):
        return _table(eval_rows(payload), ("metric", "value", "detail"))
    parts = []
    for split, rep in payload["splits"].items():
        proper = rep.get("likelihood_proper", True)
        head = (
            f"{rep.get('dataset', '?')}, {split} split ({_fmt(rep.get('n_images'))} images), "
            f"seed {rep.get('seed')}; binarization: {rep.get('binarization')}; likelihood: "
            f"{rep.get('likelihood')}" + ("" if proper else " (NOT a proper likelihood here)")
        )
        rows = []
        for e in rep.get("entries", []):
            notes = "; ".join(e.get("notes") or [])
            rows.append(
                (
                    e.get("name", "?"),
                    e.get("value") if e.get("value") is not None else "skipped",
                    "" if e.get("stderr") is None else f"± {e['stderr']:.2g}",
                    e.get("unit", ""),
                    "" if e.get("k") is None else e["k"],
                    e.get("estimator", "") + (f" [{notes}]" if notes else ""),
                )
            )
        headers = ("metric", "value", "stderr", "unit", "k", "estimator / notes")
        parts.append(f"<h3>{_esc(split)}</h3><p>{_esc(head)}</p>{_table(rows, headers)}")
    return "".join(parts)


def eval_rows(entries: Any) -> list[tuple]:
    """Rows (label, value, detail) of ``eval.json``.

    Accepts a list of entries or a dict of them; an entry is a dict with ``label`` (or
    ``name``) and ``value`` (other keys become the detail), or a bare number.
    """
    if isinstance(entries, dict) and isinstance(entries.get("entries"), (list, dict)):
        entries = entries["entries"]
    items = entries.items() if isinstance(entries, dict) else enumerate(entries or [])
    rows = []
    for key, entry in items:
        if isinstance(entry, dict) and "value" in entry:
            label = entry.get("label") or entry.get("name") or key
            rest = {k: v for k, v in entry.items() if k not in ("label", "name", "value")}
            detail = ", ".join(f"{k}={_fmt(v)}" for k, v in flatten(rest))
            rows.append((str(label), entry["value"], detail))
        elif isinstance(entry, dict):
            for k, v in flatten(entry, str(key)):
                rows.append((k, v, ""))
        else:
            rows.append((str(key), entry, ""))
    return rows


# ------------------------------------------------------------------------------ figures


def _fresh(path: Path, sources: list[Path]) -> bool:
    """``path`` exists and is at least as new as every existing source."""
    if not path.is_file():
        return False
    mtime = path.stat().st_mtime
    return all(mtime >= s.stat().st_mtime for s in sources if s.is_file())


def collect_figures(run, data, regenerate: bool = False, kinds: list[str] | None = None):
    """Draw (or reuse) each applicable figure of ``run`` into ``run.figures_dir``.

    Returns a list of (kind, path or None, error or None).
    """
    from vaelab.viz import FIGURES, applicable_figures, output_suffix, render, save_figure

    model, metrics = run.model, run.metrics()
    wanted = kinds if kinds is not None else applicable_figures(model, data, metrics)
    weights = [run.path / "model.safetensors", run.path / "config.json"]
    out = []
    for kind in wanted:
        FIGURES.get(kind)
        path = Path(run.figures_dir) / f"{kind}{output_suffix(kind)}"
        sources = weights + ([run.path / "metrics.jsonl"] if kind == "training-curves" else [])
        if not regenerate and _fresh(path, sources):
            out.append((kind, path, None))
            continue
        try:
            fig = render(kind, model=model, data=data, metrics=metrics)
            out.append((kind, save_figure(fig, path), None))
        except Exception as exc:  # one figure's failure is shown in the report, not fatal
            warnings.warn(f"report: figure {kind!r} failed: {exc}", stacklevel=2)
            out.append((kind, None, f"{type(exc).__name__}: {exc}"))
    return out


def _probe_table(model, data) -> str:
    from vaelab.viz import probe_attributes

    directions = sorted(probe_attributes(model, data), key=lambda d: d.baseline - d.accuracy)
    rows = [
        (
            d.name,
            round(d.accuracy, 4),
            round(d.baseline, 4),
            round(d.accuracy - d.baseline, 4),
            d.n_positive,
            d.n,
        )
        for d in directions
    ]
    head = ("attribute", "probe accuracy", "majority baseline", "gain", "positives", "fit on")
    return _table(rows, head)


# ------------------------------------------------------------------------------ the page


def build_report(
    run,
    *,
    data=None,
    data_dir: str | os.PathLike | None = None,
    regenerate: bool = False,
    kinds: list[str] | None = None,
) -> str:
    """The HTML of ``run``'s report (figures are drawn into ``figures/`` as a side effect)."""
    from vaelab.config import dumps
    from vaelab.model import model_summary
    from vaelab.viz import FIGURES

    notes = []
    if data is None:
        try:
            data = run.data(data_dir)
        except (FileNotFoundError, ValueError, OSError) as exc:
            notes.append(
                f"The dataset could not be loaded ({exc}); figures that need data are left out."
            )
    sections: list[tuple[str, str, str]] = []  # (anchor, title, html)

    if run.summary:
        rows = [(k, v if isinstance(v, (int, float)) else _fmt(v)) for k, v in flatten(run.summary)]
        summary = _table(rows, ("key", "value"))
    else:
        summary = '<p class="note">No summary.json: the run has not finished.</p>'
    body = (
        f'<div class="cols"><div><h3>Config</h3><pre>{_esc(dumps(run.config))}</pre></div>'
        f"<div><h3>Summary</h3>{summary}</div></div>"
    )
    sections.append(("run", "Config and summary", body))

    try:
        body = f"<pre>{_esc(model_summary(run.model))}</pre>"
    except Exception as exc:  # torchinfo can fail on exotic modules; say so in the page
        body = f'<p class="error">model summary failed: {_esc(exc)}</p>'
    sections.append(("model", "Model", body))

    eval_path = run.path / EVAL_FILE
    if eval_path.is_file():
        try:
            body = eval_section(json.loads(eval_path.read_text()))
        except (ValueError, TypeError) as exc:
            body = f'<p class="error">{_esc(eval_path.name)} cannot be read: {_esc(exc)}</p>'
    else:
        body = (
            '<p class="note">Not evaluated yet: run <code>vaelab evaluate RUN</code> '
            "(or <code>vaelab report RUN --eval</code>).</p>"
        )
    sections.append(("eval", "Evaluation", body))

    has_labels = data is not None and data.train.labels is not None and data.test.labels is not None
    if has_labels:
        try:
            body = (
                "<p>Logistic regression on the posterior means of training images against "
                "each binary attribute, scored on test images (Astorga et al. 5.2.4). A "
                "probe well above its majority baseline means the latent space captured "
                "the attribute linearly.</p>" + _probe_table(run.model, data)
            )
        except Exception as exc:
            body = f'<p class="error">attribute probes failed: {_esc(exc)}</p>'
        sections.append(("attributes", "Attribute probes", body))

    figures = []
    for kind, path, error in collect_figures(run, data, regenerate, kinds):
        caption = f"<b>{_esc(kind)}</b>: {_esc(FIGURES.describe(kind))}"
        if error is not None:
            figures.append(
                f'<figure id="fig-{_attr(kind)}"><p class="error">{_esc(kind)} '
                f"failed: {_esc(error)}</p></figure>"
            )
        else:
            figures.append(
                f'<figure id="fig-{_attr(kind)}"><img src="{data_uri(path)}" alt="{_attr(kind)}">'
                f"<figcaption>{caption}</figcaption></figure>"
            )
    sections.append(("figures", "Figures", "\n".join(figures)))

    title = f"vaelab run {run.name}"
    described = _esc(data.describe()) if data is not None else ""
    stamp = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    nav = "".join(f'<a href="#{a}">{_esc(t)}</a>' for a, t, _ in sections)
    note_html = "".join(f'<p class="note">{_esc(n)}</p>' for n in notes)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        '<link rel="icon" href="data:,">',  # no favicon request
        f"<title>{_esc(title)}</title><style>{CSS}</style></head><body><main>",
        f"<h1>{_esc(title)}</h1>",
        f'<p class="sub">{described}<br>{_esc(run.path)} &middot; report written {_esc(stamp)}</p>',
        f"<nav>{nav}</nav>",
        note_html,
        _glance(run.summary),
    ]
    for anchor, name, body in sections:
        parts.append(f'<section id="{anchor}"><h2>{_esc(name)}</h2>{body}</section>')
    parts.append("</main></body></html>")
    return "\n".join(parts)


def write_report(
    run,
    *,
    data=None,
    data_dir: str | os.PathLike | None = None,
    regenerate: bool = False,
    kinds: list[str] | None = None,
    evaluate: bool = False,
    out: str | os.PathLike | None = None,
) -> Path:
    """Write ``report.html`` for ``run`` (a run folder, NAME under ./runs, or a Run); returns
    its path. ``evaluate=True`` first runs :func:`vaelab.evaluate.evaluate_run` (eval.json)."""
    from vaelab.io import atomic_write_text
    from vaelab.runs import load_run

    if not hasattr(run, "figures_dir"):
        run = load_run(run)
    if evaluate:
        from vaelab.evaluate import evaluate_run

        evaluate_run(run)
    page = build_report(run, data=data, data_dir=data_dir, regenerate=regenerate, kinds=kinds)
    return atomic_write_text(Path(out) if out is not None else run.path / REPORT_FILE, page)
