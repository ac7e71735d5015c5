"""Sharded evaluation: N processes report what one process reports.

First, in one process, the sharded metric functions are run once per pretend rank and their
per-image results reassembled: they must be one process's (the draws depend on the image's
batch or chunk, never on the number of processes). Then two real launches under torchrun (gloo,
2 processes on 127.0.0.1, ~10 s each on 2 cores): a script calling ``evaluate_run`` with every
metric (rank 0 alone writes ``eval.json``), and ``vaelab eval --nproc 2``.
"""

from __future__ import annotations

import json
import os
import shutil
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vaelab.cli import main as cli_main
from vaelab.config import load_preset, override
from vaelab.distributed import launch
from vaelab.evaluate import EvalReport, _evaluate, evaluate_run, read_eval
from vaelab.metrics import EvalContext
from vaelab.metrics.likelihood import elbo_stats, importance_sampled_log_likelihood
from vaelab.runs import load_run

SRC = Path(__file__).resolve().parents[1] / "src"
# digits: 200 test images, one read batch; ELBO compute batches of 64 (64, 64, 64, 8) and
# k = 50 importance samples in chunks of 40 images (5 chunks: 2 on rank 0, 3 on rank 1).
FAST = dict(k=50, batch_size=64, probe_train_images=300, progress=False)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from vaelab.train import fit

    cfg = override(
        load_preset("quickstart"),
        ["model.hidden=32", "model.latent_dim=4", "train.max_steps=40", "train.schedule=none",
         "train.figures=false", "train.report=false"],
    )  # fmt: skip
    return fit(cfg, out_dir=tmp_path_factory.mktemp("runs"), progress=False).run_dir


def feature_net():
    """The same untrained LeNet features in every process (FD without training a network)."""
    from vaelab.metrics.features import FeatureNet, LeNet

    torch.manual_seed(0)
    net = LeNet(1, 10, image_size=8)
    return FeatureNet(net, key="fd_test", display="FD-test", description="an untrained LeNet")


@pytest.fixture(scope="module")
def one(run_dir):
    """One process, every metric, no file written."""
    return evaluate_run(run_dir, device="cpu", write=False, feature_net=feature_net(), **FAST)


def assert_same(report: EvalReport, ref: EvalReport) -> None:
    """Every entry to 1e-5 relative (the Frechet distances, from float32 features fed to the
    network in other batches, to 1e-4)."""
    assert report.names() == ref.names()
    for a, b in zip(report.entries, ref.entries):
        rel = 1e-4 if a.name.startswith("fd_") else 1e-5
        assert a.n_images == b.n_images and a.k == b.k, a.name
        assert a.value == pytest.approx(b.value, rel=rel, abs=1e-9), a.name
        if b.stderr is not None:
            assert a.stderr == pytest.approx(b.stderr, rel=rel), a.name
        for key in ("per_dim", "variances"):
            if key in b.extra:
                assert a.extra[key] == pytest.approx(b.extra[key], rel=rel, abs=2e-6), a.name


def child_env() -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join(p for p in [str(SRC), os.environ.get("PYTHONPATH")] if p)}


# ------------------------------------------------------------------ one process, pretend ranks


@pytest.mark.parametrize("world", [2, 3])
def test_shards_reassemble_one_process(run_dir, world):
    """Per-image ELBO terms and IS estimates of each rank's share, put back in order, are one
    process's: the same z for every image whatever the number of processes."""
    model = load_run(run_dir).load_model("cpu")
    ctx = EvalContext(model=model, data=load_run(run_dir).data(), split="test", seed=5)
    gen = lambda: ctx.generator("elbo")  # noqa: E731
    ref = elbo_stats(model, ctx.batches(), generator=gen(), batch_size=64)
    is_ref = importance_sampled_log_likelihood(model, ctx.batches(), k=50, seed=1, workers=1)
    parts = [
        (
            elbo_stats(model, ctx.batches(), generator=gen(), batch_size=64, shard=(r, world)),
            importance_sampled_log_likelihood(
                model, ctx.batches(), k=50, seed=1, workers=1, shard=(r, world)
            ),
        )
        for r in range(world)
    ]
    assert all(len(p[1].log_px) > 0 for p in parts)  # every rank gets chunks here
    for got, want in [(0, ref), (1, is_ref)]:
        index = torch.cat([p[got].index for p in parts])
        assert sorted(index.tolist()) == list(range(200))
        for name in ("elbo", "kl") if got == 0 else ("log_px", "ess"):
            merged = torch.cat([getattr(p[got], name) for p in parts])[index.argsort()]
            torch.testing.assert_close(merged, getattr(want, name), rtol=1e-6, atol=1e-6)
    kl_dims = sum(p[0].kl_per_dim * p[0].index.numel() for p in parts) / 200
    torch.testing.assert_close(kl_dims, ref.kl_per_dim, rtol=1e-6, atol=1e-9)


def test_shard_batches_cover_the_split_once(run_dir):
    data = load_run(run_dir).data()
    seen = []
    for rank in range(3):
        fake = SimpleNamespace(rank=rank, world_size=3)
        ctx = EvalContext(model=None, data=data, split="test", seed=1, max_images=150, dist=fake)
        part = ctx.shard_batches()
        seen.append((torch.cat(list(part)), part.index))
    index = torch.cat([i for _, i in seen])
    assert [len(i) for _, i in seen] == [50, 50, 50] and sorted(index.tolist()) == list(range(150))
    whole = torch.cat(list(EvalContext(model=None, data=data, split="test", seed=1).batches()))
    torch.testing.assert_close(torch.cat([x for x, _ in seen]), whole[:150][index])


def test_more_processes_than_images_is_refused(run_dir):
    model = load_run(run_dir).load_model("cpu")
    fake = SimpleNamespace(rank=0, world_size=3)
    ctx = EvalContext(model=model, data=load_run(run_dir).data(), split="test", max_images=2,
                      dist=fake)  # fmt: skip
    with pytest.raises(ValueError, match="2 images, fewer than the 3 processes"):
        _evaluate(ctx, ["elbo"], True)


def test_nproc_errors(run_dir, tmp_path, capsys, monkeypatch):
    assert cli_main(["eval", str(run_dir), "--nproc", "0"]) == 2
    assert "--nproc must be >= 1, got 0" in capsys.readouterr().err
    assert cli_main(["eval", str(tmp_path / "nope"), "--nproc", "2"]) == 2  # before torchrun
    assert "no run folder at" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert cli_main(["eval", str(run_dir), "--nproc", "2"]) == 2
    assert "under torchrun already" in capsys.readouterr().err


# ------------------------------------------------------------------------- two processes

EVAL = textwrap.dedent(
    """
    import json, os, sys
    from pathlib import Path

    sys.path.insert(0, sys.argv[3])  # this test module, for feature_net()
    import vaelab.evaluate as ev
    from test_distributed_eval import FAST, feature_net

    out, rank = Path(sys.argv[2]), os.environ["RANK"]
    write_eval = ev.write_eval

    def spy(run, report):  # note which ranks write eval.json
        (out / f"wrote-{rank}").touch()
        return write_eval(run, report)

    ev.write_eval = spy
    report = ev.evaluate_run(sys.argv[1], device="cpu", feature_net=feature_net(), **FAST)
    (out / f"report-{rank}.json").write_text(report.to_json())
    """
)


def test_two_processes_evaluate_as_one(run_dir, one, tmp_path, monkeypatch, capfd):
    """Every metric on 2 processes equals 1 process (values, stderrs, KL per dimension,
    active-unit variances); both ranks return the same report; rank 0 alone writes."""
    run = shutil.copytree(run_dir, tmp_path / "run")
    script = tmp_path / "eval.py"
    script.write_text(EVAL)
    monkeypatch.setenv("PYTHONPATH", child_env()["PYTHONPATH"])
    status = launch(2, [str(script), str(run), str(tmp_path), str(Path(__file__).parent)])
    assert status == 0, capfd.readouterr().err[-4000:]

    reports = [EvalReport.from_dict(json.loads((tmp_path / f"report-{r}.json").read_text()))
               for r in (0, 1)]  # fmt: skip
    assert reports[0].processes == 2 and one.processes == 1
    assert reports[0].names() == reports[1].names()
    assert [e.value for e in reports[0].entries] == [e.value for e in reports[1].entries]
    assert {"elbo", "log_px", "recon.ssim", "fd_test.samples", "active_units",
            "probe.accuracy", "params.total"} <= set(one.names())  # fmt: skip
    assert_same(reports[0], one)

    assert sorted(p.name for p in tmp_path.glob("wrote-*")) == ["wrote-0"]
    saved = read_eval(run)["test"]
    assert saved.processes == 2 and [e.value for e in saved.entries] == [
        e.value for e in reports[0].entries
    ]


def test_nproc_shortcut(run_dir, one, tmp_path, monkeypatch, capfd):
    """``vaelab eval RUN --nproc 2`` runs torchrun; rank 0 alone prints, once."""
    run = shutil.copytree(run_dir, tmp_path / "run")
    monkeypatch.setenv("PYTHONPATH", child_env()["PYTHONPATH"])
    argv = ["eval", str(run), "--nproc", "2", "--k", "50", "--batch-size", "64", "--device",
            "cpu", "--metrics", "elbo,loglik", "reconstruction", "--json"]  # fmt: skip
    assert cli_main(argv) == 0
    out = capfd.readouterr().out
    report = EvalReport.from_dict(json.loads(out))  # one JSON document: rank 0's
    assert report.processes == 2
    names = ["elbo", "elbo.bits_per_dim", "elbo.reconstruction", "elbo.kl", "log_px",
             "log_px.bits_per_dim", "recon.mse", "recon.psnr", "recon.ssim"]  # fmt: skip
    assert report.names() == names
    ref = EvalReport(**{**one.__dict__, "entries": [one.get(n) for n in names]})
    assert_same(report, ref)
    assert read_eval(run)["test"].names() == names
