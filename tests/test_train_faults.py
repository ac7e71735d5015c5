"""A kill -9 in the middle of a checkpoint write leaves the previous checkpoint loadable."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from vaelab.runs import load_checkpoint

CHILD = textwrap.dedent(
    """
    import os, signal, sys, torch
    from vaelab import runs
    from vaelab.config import load_preset, override
    from vaelab.train import fit

    cfg = override(load_preset("quickstart"), ["model.hidden=16", "model.latent_dim=2",
        "train.epochs=3", "train.figures=false", "train.report=false"])
    real_save = torch.save
    saves = []

    def dying_save(obj, f, *args, **kwargs):
        saves.append(f)
        if obj.get("step") == 44:  # the end of epoch 2: write half a file, then die
            real_save(obj, f, *args, **kwargs)
            with open(f, "r+b") as fh:
                fh.truncate(os.path.getsize(f) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)

    runs.torch.save = dying_save
    fit(cfg, out_dir=sys.argv[1], progress=False)
    """
)


def test_kill_during_checkpoint_write_keeps_the_previous_one(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path)], capture_output=True, text=True, timeout=180
    )
    assert proc.returncode == -9, proc.stderr
    folder = tmp_path / "quickstart" / "checkpoints"
    ckpt = load_checkpoint(folder / "last.pt")
    assert ckpt["step"] == 22  # the end of epoch 1
    assert load_checkpoint(folder / "best.pt")["step"] == 22
    assert list(folder.glob(".last.pt.*.tmp"))  # the torn temporary is beside it, not in place

    # A resume cleans the torn temporary up and finishes the run.
    from vaelab.config import load_preset, override
    from vaelab.train import fit

    cfg = override(
        load_preset("quickstart"),
        [
            "model.hidden=16",
            "model.latent_dim=2",
            "train.epochs=3",
            "train.figures=false",
            "train.report=false",
        ],
    )
    result = fit(cfg, resume=tmp_path / "quickstart", progress=False)
    assert result.summary["steps"] == 66
    assert not list(folder.glob(".*.tmp"))
