"""Data-parallel training under torchrun: gloo on the CPU, 2 processes on 127.0.0.1.

Two launches in all (each ~10 s on 2 cores, most of it importing torch three times): a fresh
2-process run, and a 2-process resume of a 1-process checkpoint in which rank 1 is killed.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from vaelab.cli import main as cli_main
from vaelab.config import load_preset, override
from vaelab.data import load_dataset
from vaelab.distributed import Distributed, launch
from vaelab.runs import load_checkpoint, read_metrics
from vaelab.train import TrainingInterrupted, fit

SRC = Path(__file__).resolve().parents[1] / "src"
# digits: 1397 training images; batch 64 -> 22 steps per epoch, the last batch of 53 images
# split 27/26 between the ranks. 30 steps cross the epoch boundary.
BASE = [
    "model.hidden=32",
    "model.latent_dim=4",
    "train.epochs=2",
    "train.log_every=5",
    "train.schedule=none",
    "train.figures=false",
    "train.report=false",
]


def tiny(*more: str):
    return override(load_preset("quickstart"), BASE + list(more))


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_close(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def child_env() -> dict[str, str]:
    """The workers import vaelab from this checkout, whatever editable install is active."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", binarize="dynamic")


@pytest.fixture(scope="module")
def straight(digits):
    """One process, 2 epochs (44 steps), no files."""
    return fit(tiny(), out_dir=None, data=digits, progress=False)


@pytest.fixture(scope="module")
def two_proc_run(tmp_path_factory):
    """``torchrun --nproc-per-node 2 -m vaelab train`` for 30 steps, rendezvous on 127.0.0.1."""
    out = tmp_path_factory.mktemp("ddp")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{free_port()}",
        "-m",
        "vaelab",
        "train",
        "quickstart",
        *BASE,
        "train.max_steps=30",
        "--out",
        str(out),
        "--no-progress",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, proc


def test_two_processes_train_as_one(two_proc_run, digits, tmp_path):
    """Global batch 64 on 2 processes == batch 64 on 1 process: weights to 1e-5, and the same
    metrics, written once, by rank 0 alone."""
    out, proc = two_proc_run
    one = fit(tiny("train.max_steps=30"), out_dir=tmp_path, data=digits, progress=False)
    assert [p.name for p in out.iterdir()] == ["quickstart"]  # one run folder, made by rank 0
    run_dir = out / "quickstart"
    assert_close(load_file(run_dir / "model.safetensors"), weights(one.model))

    ddp, ref = read_metrics(run_dir / "metrics.jsonl"), read_metrics(one.run_dir / "metrics.jsonl")
    key = [(r["kind"], r["split"], r["step"]) for r in ref]
    assert [(r["kind"], r["split"], r["step"]) for r in ddp] == key  # no record twice
    for a, b in zip(ddp, ref):
        for k in ("loss", "elbo", "rec", "kl", "ssim"):
            if k in b:
                assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (a, b)
    assert any("ssim" in r for r in ddp)

    summary = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert summary["step"] == 30 and summary["config"]["train"]["batch_size"] == 64
    assert proc.stdout.count("done:") == 1  # only rank 0 reports


def test_two_process_checkpoint_resumes_in_one(two_proc_run, straight, digits, tmp_path):
    run_dir = shutil.copytree(two_proc_run[0] / "quickstart", tmp_path / "quickstart")
    resumed = fit(tiny(), resume=run_dir, data=digits, progress=False)
    assert resumed.summary["steps"] == 44
    assert_close(weights(resumed.model), weights(straight.model))


DIE = textwrap.dedent(
    """
    import os, signal, sys
    from vaelab.config import load_preset, override
    from vaelab.train import fit

    class KillRank1:
        def on_step_end(self, st):
            if st.step == 26 and os.environ["RANK"] == "1":
                os.kill(os.getpid(), signal.SIGKILL)

    cfg = override(load_preset("quickstart"), sys.argv[2:])
    fit(cfg, resume=sys.argv[1], progress=False, callbacks=[KillRank1()])
    """
)


def test_dead_rank_fails_clearly_and_leaves_a_loadable_checkpoint(
    straight, digits, tmp_path, capfd, monkeypatch
):
    """1 process to step 10, resumed on 2 processes (``vaelab train --nproc``'s launcher);
    rank 1 is killed at step 26. The job fails naming rank 1 and SIGKILL, the checkpoint of
    step 22 (end of epoch 1) loads, and resuming it in 1 process ends where 1 process would."""
    with pytest.raises(TrainingInterrupted):

        class StopAt10:
            def on_step_end(self, st):
                if st.step == 10:
                    st.request_stop("test")

        fit(tiny(), out_dir=tmp_path, data=digits, progress=False, callbacks=[StopAt10()])
    run_dir = tmp_path / "quickstart"
    script = tmp_path / "die.py"
    script.write_text(DIE)
    monkeypatch.setenv("PYTHONPATH", child_env()["PYTHONPATH"])

    assert launch(2, [str(script), str(run_dir), *BASE]) == 1
    err = capfd.readouterr().err
    assert "rank 1 (local rank 1" in err and "killed by SIGKILL" in err, err[-3000:]
    assert f"{run_dir / 'checkpoints' / 'last.pt'} (step 22: 1 epoch), loads" in err
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == 22

    resumed = fit(tiny(), resume=run_dir, data=digits, progress=False)
    assert_close(weights(resumed.model), weights(straight.model))
    steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "step"]
    assert steps == list(range(5, 45, 5))  # rank 0's records past the checkpoint were dropped


def test_batches_must_give_every_rank_an_image():
    two = SimpleNamespace(rank=1, world_size=2)
    assert Distributed.bounds(two, 53) == (26, 53)
    Distributed.check_batches(two, 1397, 64)  # last batch 53
    with pytest.raises(ValueError, match="leaves a batch of 1, fewer than the 2 processes"):
        Distributed.check_batches(two, 1397, 1396)


def test_nproc_is_refused_under_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    assert cli_main(["train", "quickstart", "--nproc", "2"]) == 2
    assert "under torchrun already" in capsys.readouterr().err
