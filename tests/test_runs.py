"""Run folders: naming, metrics log, checkpoints, RNG capture, loading runs."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from vaelab import runs
from vaelab.config import load_preset, override
from vaelab.model import build_model
from vaelab.runs import (
    MetricsLog,
    capture_rng_state,
    load_checkpoint,
    load_run,
    new_run_dir,
    read_metrics,
    resolve_run,
    restore_rng_state,
    save_checkpoint,
)


def test_new_run_dir_adds_a_suffix(tmp_path):
    names = [new_run_dir(tmp_path, "exp").name for _ in range(3)]
    assert names == ["exp", "exp-2", "exp-3"]


def test_metrics_log_appends_truncates_and_survives_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    log.write({"step": 1})
    offset = log.offset
    log.write({"step": 2})
    log.close()
    with open(path, "a") as fh:
        fh.write('{"step": 3, "lo')  # a kill in the middle of a line
    assert read_metrics(path) == [{"step": 1}, {"step": 2}]
    MetricsLog(path, truncate_to=offset).close()  # a resume from the checkpoint at step 1
    assert read_metrics(path) == [{"step": 1}]
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(path)
    assert read_metrics(tmp_path / "absent.jsonl") == []


def test_checkpoint_round_trip_and_corruption(tmp_path):
    path = tmp_path / "ckpt" / "last.pt"
    payload = {"format": runs.CHECKPOINT_FORMAT, "w": torch.arange(3.0), "step": 4}
    save_checkpoint(path, payload)
    assert load_checkpoint(path)["step"] == 4
    assert not list(path.parent.glob(".*.tmp"))
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(ValueError, match="cannot be read"):
        load_checkpoint(path)
    torch.save({"something": "else"}, path)
    with pytest.raises(ValueError, match="not a vaelab checkpoint"):
        load_checkpoint(path)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "none.pt")


def test_rng_state_round_trip():
    noise = torch.Generator().manual_seed(3)
    state = capture_rng_state(noise)
    a = (torch.rand(3), np.random.rand(3), random.random(), torch.randn(2, generator=noise))
    restore_rng_state(state, noise)
    b = (torch.rand(3), np.random.rand(3), random.random(), torch.randn(2, generator=noise))
    torch.testing.assert_close(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert a[2] == b[2]
    torch.testing.assert_close(a[3], b[3])


def test_resolve_run_by_name_or_path(tmp_path, monkeypatch):
    run_dir = tmp_path / "runs" / "exp"
    cfg = load_preset("quickstart")
    run_dir.mkdir(parents=True)
    runs.write_config(run_dir, cfg, (1, 8, 8))
    monkeypatch.chdir(tmp_path)
    assert resolve_run("exp") == tmp_path.joinpath("runs", "exp").relative_to(tmp_path)
    assert resolve_run("runs/exp").name == "exp"
    assert resolve_run(run_dir) == run_dir
    with pytest.raises(FileNotFoundError, match="no run folder"):
        resolve_run("other")


def test_unfinished_run_loads_its_model_from_the_checkpoint(tmp_path):
    cfg = override(load_preset("quickstart"), ["model.hidden=16", "model.latent_dim=2"])
    model = build_model(cfg.model, (1, 8, 8))
    run_dir = tmp_path / "exp"
    runs.write_config(run_dir, cfg, (1, 8, 8))
    save_checkpoint(
        run_dir / "checkpoints" / "last.pt",
        {"format": runs.CHECKPOINT_FORMAT, "model": model.state_dict()},
    )
    run = load_run(run_dir)
    assert run.summary == {} and run.config == cfg and run.image_shape == (1, 8, 8)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(run.model.state_dict()[k], v)
    assert run.metrics() == []
    (run_dir / "config.json").write_text(json.dumps({"model": {"nope": 1}}))
    with pytest.raises(ValueError, match="nope"):
        load_run(run_dir)
