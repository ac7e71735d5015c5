"""report.html and the plot/report commands on a small run trained by fit()."""

from __future__ import annotations

import json
import os
import re
import time
from html.parser import HTMLParser

import pytest
import torch

from vaelab.cli import main
from vaelab.config import load_preset, override
from vaelab.report import eval_rows, write_report
from vaelab.runs import load_run
from vaelab.train import fit

viz = pytest.importorskip("vaelab.viz")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A z = 4 digits run of a few epochs, written by fit() (default figures, no report)."""
    cfg = override(
        load_preset("quickstart"),
        [
            "train.epochs=3",
            "model.hidden=64",
            "model.latent_dim=4",
            "train.report=false",
            "train.log_every=5",
        ],
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = fit(cfg, out_dir=tmp_path_factory.mktemp("runs"), progress=False)
    finally:
        torch.set_num_threads(threads)
    return result.run_dir


class Collect(HTMLParser):
    """Every tag's attributes, plus the ids of sections and figures."""

    def __init__(self):
        super().__init__()
        self.attrs: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.attrs.append((tag, dict(attrs)))


def parse(page: str) -> list[tuple[str, dict]]:
    p = Collect()
    p.feed(page)
    return p.attrs


EVAL = {
    "entries": [
        {"label": "Test ELBO (nats, 1 sample)", "value": -27.5, "split": "test"},
        {"label": "IS log-likelihood, k=500", "value": -25.1, "stderr": 0.02},
        {"name": "bits_per_dim", "value": 0.61},
    ]
}


def test_report_is_self_contained_with_every_applicable_figure(run_dir):
    (run_dir / "eval.json").write_text(json.dumps(EVAL))
    try:
        path = write_report(run_dir)
    finally:
        (run_dir / "eval.json").unlink()
    assert path == run_dir / "report.html"
    page = path.read_text()
    tags = parse(page)
    ids = {a.get("id") for _, a in tags}
    for section in ("run", "model", "eval", "attributes", "figures"):
        assert section in ids, section
    run = load_run(run_dir)
    kinds = viz.applicable_figures(run.model, run.data(), run.metrics())
    images = [a for t, a in tags if t == "img"]
    assert sorted(a["alt"] for a in images) == sorted(kinds)
    assert all(
        a["src"].startswith(("data:image/png;base64,", "data:image/gif;base64,")) for a in images
    )
    # Nothing is fetched: every src/href is a data URI or an anchor.
    for _, a in tags:
        for key in ("src", "href"):
            if key in a:
                assert a[key].startswith(("data:", "#")), a
    assert "<script" not in page
    # The numbers and their labels.
    assert "Test ELBO (nats, 1 sample)" in page and "-27.5" in page
    assert "IS log-likelihood, k=500" in page and "stderr=0.02" in page
    assert "bits_per_dim" in page
    assert "Total parameters" in page  # the model summary table
    assert "training arithmetic" in page  # float32, or bf16 products where the run used them
    assert 'name = "quickstart"' in page  # the config as TOML
    assert "is digit 7" in page  # the attribute probe table
    assert (run_dir / "figures" / "traversal-animation.gif").is_file()


def test_report_reuses_fresh_figures_and_redraws_stale_ones(run_dir):
    write_report(run_dir, kinds=["manifold"])
    fig = run_dir / "figures" / "manifold.png"
    before = fig.stat().st_mtime_ns
    time.sleep(0.01)
    write_report(run_dir, kinds=["manifold"])
    assert fig.stat().st_mtime_ns == before
    weights = run_dir / "model.safetensors"
    old = weights.stat()
    os.utime(weights, ns=(old.st_atime_ns, before + 10**9))  # weights newer than the figure
    try:
        write_report(run_dir, kinds=["manifold"])
        assert fig.stat().st_mtime_ns > before
    finally:
        os.utime(weights, ns=(old.st_atime_ns, old.st_mtime_ns))
    redrawn = fig.stat().st_mtime_ns
    write_report(run_dir, kinds=["manifold"], regenerate=True)
    assert fig.stat().st_mtime_ns > redrawn


def test_a_failing_figure_is_reported_in_place(run_dir, monkeypatch, tmp_path):
    def broken(kind, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(viz, "render", broken)
    with pytest.warns(UserWarning, match="boom"):
        path = write_report(
            run_dir, kinds=["interpolation"], regenerate=True, out=tmp_path / "r.html"
        )
    page = path.read_text()
    assert "interpolation failed: RuntimeError: boom" in page
    assert not [a for t, a in parse(page) if t == "img"]


def test_report_without_data_keeps_the_data_free_figures(run_dir, monkeypatch, tmp_path):
    from vaelab.runs import Run

    def no_data(self, data_dir=None):
        raise FileNotFoundError("mnist files not found in /nowhere")

    monkeypatch.setattr(Run, "data", no_data)
    page = write_report(run_dir, out=tmp_path / "r.html").read_text()
    assert "The dataset could not be loaded (mnist files not found in /nowhere)" in page
    alts = sorted(a["alt"] for t, a in parse(page) if t == "img")
    assert alts == ["manifold", "samples", "training-curves", "traversal", "traversal-animation"]


def test_eval_rows_accepts_several_shapes():
    assert eval_rows({"entries": [{"label": "A", "value": 1.0}]}) == [("A", 1.0, "")]
    assert eval_rows({"elbo": {"value": -3.0, "label": "ELBO"}}) == [("ELBO", -3.0, "")]
    assert eval_rows({"fid": 12.5}) == [("fid", 12.5, "")]
    assert eval_rows({"test": {"elbo": -3.0}}) == [("test.elbo", -3.0, "")]


def test_fit_writes_the_report(tmp_path):
    cfg = override(
        load_preset("quickstart"), ["train.max_steps=5", "model.hidden=16", "model.latent_dim=2"]
    )
    result = fit(cfg, out_dir=tmp_path, progress=False)
    assert result.summary["report"] == str(result.run_dir / "report.html")
    assert "<h2>Figures</h2>" in (result.run_dir / "report.html").read_text()


# ------------------------------------------------------------------------------ commands


def test_plot_command(run_dir, capsys, tmp_path):
    assert main(["plot", str(run_dir), "--kind", "manifold", "--n", "4"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == str(run_dir / "figures" / "manifold.png")
    assert (
        main(
            [
                "plot",
                str(run_dir),
                "--kind",
                "samples",
                "--temperature",
                "0.5,1",
                "--out",
                str(tmp_path / "s.png"),
            ]
        )
        == 0
    )
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (
        main(
            [
                "plot",
                str(run_dir),
                "--kind",
                "traversal-animation",
                "--dims",
                "0,1",
                "-o",
                "steps=3",
            ]
        )
        == 0
    )
    assert (run_dir / "figures" / "traversal-animation.gif").read_bytes()[:6] == b"GIF89a"
    assert (
        main(
            [
                "plot",
                str(run_dir),
                "--kind",
                "reconstructions",
                "-o",
                "layout=rows",
                "--n",
                "4",
                "--out",
                str(tmp_path / "r.png"),
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "plot",
                str(run_dir),
                str(run_dir),
                "--kind",
                "latent-comparison",
                "-o",
                "mode=reconstructions",
                "--out",
                str(tmp_path / "c.png"),
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["plot", str(run_dir), "--kind", "samples", "--dims", "0,1"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"no option\(s\) dims; its options: n=64, temperature=1.0", err)
    assert main(["plot", str(run_dir), "--kind", "nope"]) == 2
    assert "choose one of" in capsys.readouterr().err
    assert main(["plot", str(run_dir), str(run_dir), "--kind", "latent-comparison"]) == 2


def test_report_command(run_dir, capsys, tmp_path):
    out = tmp_path / "page.html"
    assert main(["report", str(run_dir), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert out.read_text().startswith("<!DOCTYPE html>")
