"""The vaelab command line: discovery, list, train (smoke, resume, errors), info, data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vaelab.cli import command_modules, main
from vaelab.cli.list import KINDS, REGISTRIES
from vaelab.config import preset_names
from vaelab.runs import load_checkpoint, load_run

SMALL = ["model.hidden=32", "model.latent_dim=4", "train.report=false"]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, out, err


def test_subcommands_are_discovered(capsys):
    names = {m.__name__.rsplit(".", 1)[1] for m in command_modules()}
    assert {"train", "list", "info", "data"} <= names
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    help_text = capsys.readouterr().out
    for name in ("train", "list", "info", "data"):
        assert name in help_text
    assert main([]) == 2  # no command: help and status 2


@pytest.mark.parametrize("kind", KINDS)
def test_list_shows_every_registered_name(capsys, kind):
    status, out, _ = run_cli(capsys, "list", kind)
    assert status == 0
    if kind == "presets":
        names = preset_names()
    else:
        import importlib

        module, attr = REGISTRIES[kind]
        names = getattr(importlib.import_module(module), attr).names()
    assert names
    rows = {line.split()[0] for line in out.splitlines()[2:] if line.strip()}
    assert set(names) <= rows


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train.lrr=1"], "unknown config key 'train.lrr'; valid keys here: train.epochs"),
        (["quickstart", "train.epochs=abc"], "train.epochs: expected an integer, got 'abc'"),
        (["quickstart", "train.bf16=maybe"], "expected true/false"),
        (["quickstart", "model.hidden=a,b"], "model.hidden: expected an integer"),
        (["quickstart", "bogus.key=1"], "valid keys here: name, seed, model, data"),
        (["quickstart", "train=1"], "'train' is a section"),
        (["quickstart", "train.lr"], "not of the form key=value"),
        (["no-such-preset"], "unknown preset 'no-such-preset'; choose one of"),
        (["missing.toml"], "config file missing.toml does not exist"),
    ],
)
def test_override_errors_say_what_is_expected(capsys, argv, message):
    status, out, err = run_cli(capsys, "train", *argv, "--print-config")
    assert status == 2
    assert err.startswith("vaelab: error: ") and message in err
    assert "Traceback" not in err


def test_print_config_applies_overrides(capsys, tmp_path):
    status, out, _ = run_cli(
        capsys, "train", "train.lr=3e-4", "model.hidden=64,32", "--print-config"
    )
    assert status == 0
    assert 'name = "quickstart"' in out and "lr = 0.0003" in out
    cfg_file = tmp_path / "exp.toml"
    cfg_file.write_text(out.replace('name = "quickstart"', 'name = "mine"'))
    status, out, _ = run_cli(capsys, "train", str(cfg_file), "train.epochs=3", "--print-config")
    assert status == 0 and 'name = "mine"' in out and "epochs = 3" in out


def test_train_smoke_run_info_and_reload(capsys, tmp_path):
    """A few steps on digits through the CLI: the run folder is complete, reloads and
    reconstructs; ``vaelab info`` shows config, summary and the layer table."""
    status, out, err = run_cli(
        capsys,
        "train",
        "quickstart",
        *SMALL,
        "train.epochs=1",
        "--out",
        str(tmp_path),
        "--no-progress",
    )
    assert status == 0, err
    run_dir = tmp_path / "quickstart"
    assert f"run folder: {run_dir}" in out and "valid ELBO" in out
    for name in (
        "config.json",
        "model.safetensors",
        "metrics.jsonl",
        "summary.json",
        "checkpoints/last.pt",
        "checkpoints/best.pt",
    ):
        assert (run_dir / name).is_file(), name
    figures = {p.name for p in (run_dir / "figures").glob("*.png")}
    assert {"reconstructions.png", "samples.png"} <= figures
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 22 and summary["dataset"]["name"] == "digits-dynamic"

    run = load_run(run_dir)
    data = run.data()
    x = data.valid.to_float(data.valid.images[:4])
    assert run.model.reconstruct(x).shape == (4, 1, 8, 8)

    status, out, _ = run_cli(capsys, "info", str(run_dir))
    assert status == 0
    assert "## config" in out and "best valid ELBO" in out and "Total parameters" in out
    status, out, _ = run_cli(capsys, "info", str(run_dir), "--json")
    assert json.loads(out)["steps"] == 22
    status, _, err = run_cli(capsys, "info", str(tmp_path / "nope"))
    assert status == 2 and "no run folder" in err


def test_resume_through_the_cli(capsys, tmp_path):
    argv = [
        "train",
        "quickstart",
        *SMALL,
        "train.figures=false",
        "train.max_steps=5",
        "--out",
        str(tmp_path),
        "--no-progress",
    ]
    assert run_cli(capsys, *argv)[0] == 0
    run_dir = tmp_path / "quickstart"
    # --resume alone takes the run's own config; train.* overrides may extend it.
    status, out, err = run_cli(
        capsys, "train", "--resume", str(run_dir), "train.max_steps=9", "--no-progress"
    )
    assert status == 0, err
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == 9
    status, _, err = run_cli(
        capsys, "train", "--resume", str(run_dir), "model.latent_dim=7", "--no-progress"
    )
    assert status == 2 and "only train.* settings may change" in err


def test_python_dash_m_vaelab():
    proc = subprocess.run(
        [sys.executable, "-m", "vaelab", "list", "objectives"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "elbo" in proc.stdout and "iwae" in proc.stdout


def test_sigint_stops_the_cli_with_a_resume_hint(tmp_path):
    """Ctrl-C on a real ``vaelab train`` process: a checkpoint, status 130, and the command
    that resumes."""
    cmd = [
        sys.executable,
        "-m",
        "vaelab",
        "train",
        "quickstart",
        *SMALL,
        "train.epochs=100000",
        "train.figures=false",
        "--out",
        str(tmp_path),
        "--no-progress",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last = tmp_path / "quickstart" / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    while not last.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert last.exists(), proc.communicate()[1]
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "stopped by SIGINT" in err and f"vaelab train --resume {tmp_path / 'quickstart'}" in err
    assert load_checkpoint(last)["step"] > 0


def test_data_commands(capsys, tmp_path):
    status, out, _ = run_cli(capsys, "data", "list", "--no-verify")
    assert status == 0 and "digits" in out and "present" in out
    status, out, _ = run_cli(capsys, "data", "fetch", "digits")
    assert status == 0 and "built in" in out
    status, out, _ = run_cli(capsys, "data", "verify", "digits")
    assert status == 0 and "digits" in out
    # --data-dir before or after the command
    empty = str(tmp_path)
    status, out, _ = run_cli(capsys, "--data-dir", empty, "data", "list", "--no-verify")
    assert status == 0 and f"data dir: {Path(empty)}" in out
    status, out, _ = run_cli(capsys, "data", "list", "--no-verify", "--data-dir", empty)
    assert status == 0 and f"data dir: {Path(empty)}" in out


@pytest.mark.skipif(not os.environ.get("VAELAB_DATA_DIR"), reason="needs $VAELAB_DATA_DIR")
def test_data_verify_mnist_from_the_shared_folder(capsys):
    status, out, _ = run_cli(capsys, "data", "verify", "mnist")
    if "NO" in out.split("\n", 2)[-1] and "missing" in out:
        pytest.skip("MNIST is not in $VAELAB_DATA_DIR")
    assert status == 0 and "train-images-idx3-ubyte" in out
