"""The README's promises: its two commands, its Python example, its presets table, and that
.ci/run runs the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vaelab.config import preset_names

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def code_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_the_two_commands_are_there():
    bash = "\n".join(code_blocks("bash"))
    assert "pip install -e . && vaelab train" in bash
    # pyproject's addopts already has -q; a second -q would hide pytest's closing
    # "N passed" line, which CI reads.
    assert re.search(r"^python -m pytest$", bash, flags=re.M)


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^python -m pytest$", ci, flags=re.M)
    assert "torch==2.13.0" in ci and "VAELAB_DATA_DIR" in ci and "set -euo pipefail" in ci


def test_every_preset_is_in_the_table():
    table = {m for m in re.findall(r"^\| `([a-z0-9-]+)` \|", README, flags=re.M)}
    assert table == set(preset_names())


def test_python_examples_run(tmp_path, monkeypatch, capsys):
    blocks = code_blocks("python")
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "runs/quickstart" in out and "torch.Size([8, 1, 8, 8])" in out
    assert (tmp_path / "runs" / "quickstart" / "model.safetensors").is_file()
    # The core example: Zhao et al.'s parameter count, per-example shapes, exact reload.
    assert "parameters: 404244" in out
    assert "torch.Size([]) torch.Size([16]) torch.Size([16]) torch.Size([16])" in out
    assert out.rstrip().endswith("True") or "\nTrue\n" in out
    assert (tmp_path / "my-vae" / "model.safetensors").is_file()


@pytest.mark.parametrize("command", ["train", "list", "info", "data"])
def test_documented_commands_exist(command):
    from vaelab.cli import build_parser

    assert command in build_parser()._subparsers._group_actions[0].choices
