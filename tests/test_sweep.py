"""Sweeps: grid parsing, cells, a miniature sweep end to end (2 cells, 1 seed, a few steps),
restart skipping finished cells, and resuming an interrupted one."""

import json
import shutil

import pytest

from vaelab.cli import main
from vaelab.config import load_preset, override
from vaelab.sweep import aggregate, expand_cells, markdown_table, parse_grid, run_sweep


def test_parse_grid_and_cells():
    grid = parse_grid(["model.latent_dim=2,5", "model.arch=mlp,conv"])
    assert grid == [("model.latent_dim", ["2", "5"]), ("model.arch", ["mlp", "conv"])]
    cells = expand_cells(grid, seeds=2, base_seed=10)
    assert len(cells) == 8 and cells[0].seed == 10 and cells[1].seed == 11
    assert cells[0].name == "latent_dim=2_arch=mlp_seed=10"
    assert len({c.name for c in cells}) == 8
    with pytest.raises(ValueError, match="key=v1,v2"):
        parse_grid(["model.latent_dim"])
    with pytest.raises(ValueError, match="given twice"):
        parse_grid(["a=1", "a=2"])


def test_bad_grid_key_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match="unknown config key 'model.latent'"):
        run_sweep(load_preset("quickstart"), ["model.latent=2,3"], out_dir=tmp_path)


def test_aggregate_mean_and_std():
    cells = expand_cells(parse_grid(["model.latent_dim=2"]), seeds=2)
    rows = [{"summary": {"parameters": 10}, "eval": {"log_px [nats/image]": v}} for v in (-90, -92)]
    table = aggregate(cells, rows)
    stats = table[0]["stats"]["log_px [nats/image]"]
    assert stats["mean"] == -91 and stats["std"] == pytest.approx(2**0.5)
    assert "-91.00 ± 1.41" in markdown_table(table)


@pytest.fixture(scope="module")
def mini_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweeps")
    base = override(
        load_preset("quickstart"),
        [
            "train.max_steps=30",
            "train.epochs=1",
            "train.report=false",
            "train.figures=false",
            "name=mini",
        ],
    )
    result = run_sweep(
        base,
        ["model.latent_dim=2,4"],
        seeds=1,
        out_dir=out,
        eval_k=10,
        metrics=["elbo", "loglik"],
        progress=False,
    )
    return base, out, result


def test_mini_sweep_writes_results(mini_sweep):
    base, out, result = mini_sweep
    payload = json.loads((result.path / "sweep.json").read_text())
    assert len(payload["cells"]) == 2 and len(payload["table"]) == 2
    for row in payload["cells"]:
        assert any(k.startswith("loglik") or k.startswith("log_px") for k in row["eval"])
        assert (result.path / row["cell"] / "eval.json").is_file()
    md = (result.path / "sweep.md").read_text()
    assert "latent_dim=2" in md and "latent_dim=4" in md
    assert [p.name for p in result.figures] == [
        "latent-samples_all.png",
        "latent-reconstructions_all.png",
        "bound-curves_all.png",
    ]


def test_restart_of_a_finished_sweep_draws_the_figures_again(mini_sweep):
    base, out, result = mini_sweep
    shutil.rmtree(result.path / "figures")
    again = run_sweep(
        base,
        ["model.latent_dim=2,4"],
        seeds=1,
        out_dir=out,
        eval_k=10,
        metrics=["elbo", "loglik"],
        progress=False,
    )
    assert {r["resumed_from"] for r in again.rows} == {"done"}
    assert [p.name for p in again.figures] == [p.name for p in result.figures]
    assert all(p.is_file() for p in again.figures)


def test_every_grid_gets_bound_curves_per_setting_of_the_other_keys(tmp_path, monkeypatch):
    """A grid without the latent size: one bound-curves figure per setting of the other keys,
    labelled by the varying key, from the first seed's runs (run folders faked: no training)."""
    import vaelab.viz.compare as compare
    from vaelab.config import Config
    from vaelab.runs import write_config
    from vaelab.sweep import comparison_figures, varying_key

    grid = parse_grid(["train.lr=0.001,0.003", "model.arch=mlp,conv"])
    assert varying_key(grid) == "train.lr"
    assert varying_key(parse_grid(["model.arch=mlp", "train.lr=1,2"])) == "train.lr"
    assert varying_key(parse_grid(["train.lr=1", "model.latent_dim=2,3"])) == "model.latent_dim"
    cells = expand_cells(grid, seeds=2)
    epoch = {"kind": "epoch", "step": 10, "epoch": 1, "elbo": -100.0}
    for c in cells:
        (tmp_path / c.name).mkdir()
        write_config(tmp_path / c.name, override(Config(), c.overrides), (1, 8, 8))
        records = [{**epoch, "split": s} for s in ("train", "valid")]
        (tmp_path / c.name / "metrics.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in records)
        )
    drawn = []
    real = compare.bound_curves

    def spy(runs, *, labels=None):
        drawn.append(([r.name for r in runs], labels))
        return real(runs, labels=labels)

    monkeypatch.setattr(compare, "bound_curves", spy)
    paths = comparison_figures(tmp_path, cells, grid)
    assert [p.name for p in paths] == ["bound-curves_arch=mlp.png", "bound-curves_arch=conv.png"]
    assert all(p.is_file() for p in paths)
    assert drawn[0] == (
        ["lr=0.001_arch=mlp_seed=0", "lr=0.003_arch=mlp_seed=0"],
        ["lr = 0.001", "lr = 0.003"],
    )


def test_restart_skips_finished_and_resumes_interrupted(mini_sweep):
    base, out, result = mini_sweep
    done = result.path / "latent_dim=2_seed=0"
    cut = result.path / "latent_dim=4_seed=0"
    mtime = (done / "model.safetensors").stat().st_mtime_ns
    # Make the second cell look interrupted: a checkpoint but no summary or eval.
    (cut / "summary.json").unlink()
    (cut / "eval.json").unlink()
    again = run_sweep(
        base,
        ["model.latent_dim=2,4"],
        seeds=1,
        out_dir=out,
        eval_k=10,
        metrics=["elbo", "loglik"],
        progress=False,
        figures=False,
    )
    states = {r["cell"]: r["resumed_from"] for r in again.rows}
    assert states == {"latent_dim=2_seed=0": "done", "latent_dim=4_seed=0": "resumable"}
    assert (done / "model.safetensors").stat().st_mtime_ns == mtime
    assert (cut / "summary.json").is_file() and (cut / "eval.json").is_file()
    # A leftover folder without a checkpoint is started afresh.
    shutil.rmtree(cut / "checkpoints")
    (cut / "summary.json").unlink()
    third = run_sweep(
        base,
        ["model.latent_dim=4"],
        seeds=1,
        out_dir=out,
        eval_k=10,
        metrics=["elbo"],
        progress=False,
        figures=False,
    )
    assert third.rows[0]["resumed_from"] == "absent"


def test_sweep_cli(tmp_path, capsys):
    status = main(
        [
            "sweep",
            "quickstart",
            "train.max_steps=10",
            "train.epochs=1",
            "train.report=false",
            "train.figures=false",
            "--grid",
            "model.latent_dim=2",
            "--out",
            str(tmp_path),
            "--name",
            "cli",
            "--k",
            "5",
            "--metrics",
            "elbo",
            "--no-figures",
        ]
    )
    assert status == 0
    out = capsys.readouterr().out
    assert "| latent_dim=2 |" in out and (tmp_path / "cli" / "sweep.md").is_file()
