"""denormals_flushed(): denormal floats count as zero in every torch thread, then not again;
freed_memory_kept(): malloc reuses freed blocks instead of mapping them afresh."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from vaelab.cpu import denormals_are_flushed, denormals_flushed

TINY = torch.finfo(torch.float32).tiny / 4  # a denormal float32


def _all_flushed(n: int = 1 << 20) -> bool:
    """Multiply n denormals by 1 with torch's threads: all zero only if every thread flushes."""
    x = torch.full((n,), TINY)
    return bool((x * 1.0 == 0).all())


def _none_flushed(n: int = 1 << 20) -> bool:
    x = torch.full((n,), TINY)
    return bool((x * 1.0 != 0).all())


@pytest.mark.skipif(not torch.set_flush_denormal(False), reason="no FTZ/DAZ on this CPU")
def test_every_thread_flushes_inside_and_none_after():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _none_flushed()  # the OpenMP workers exist before the block, as in a real process
        assert not denormals_are_flushed()
        with denormals_flushed() as on:
            assert on and denormals_are_flushed()
            assert _all_flushed()
        assert not denormals_are_flushed()
        assert _none_flushed()
    finally:
        torch.set_num_threads(threads)


@pytest.mark.skipif(not torch.set_flush_denormal(False), reason="no FTZ/DAZ on this CPU")
def test_a_mode_already_on_is_left_on():
    torch.set_flush_denormal(True)
    try:
        with denormals_flushed():
            pass
        assert denormals_are_flushed()
    finally:
        torch.set_flush_denormal(False)


_FAULTS = """
import resource, sys
from contextlib import nullcontext
import torch
from vaelab import load_preset, override
from vaelab.cpu import freed_memory_kept
from vaelab.model import build_model

torch.manual_seed(0)
cfg = override(load_preset("pytorch-examples"), ["model.arch=conv", "model.hidden="])
model = build_model(cfg.model, (1, 28, 28)).to(memory_format=torch.channels_last)
x = torch.rand(128, 1, 28, 28).contiguous(memory_format=torch.channels_last)

def step():  # the page faults of one forward and backward pass
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    mu, logvar = model.encoder(x)
    model.decoder(mu).sum().backward()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

with freed_memory_kept() if {kept} else nullcontext():
    last = sorted([step() for _ in range(12)][-5:])  # once the heap has grown to its needs
    print(last[2])  # the median step
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_memory_is_reused_without_page_faults():
    """A conv network's step in NHWC frees more than glibc's trim threshold at the top of the
    heap, which goes back to the OS and is faulted in again by the next step: thousands of page
    faults a step by default, none in the median step once freed_memory_kept() keeps the heap.
    The step runs torch's own layers (VAELAB_NATIVE=0), whose temporaries are the large ones:
    with vaelab's kernels the default step's faults ranged from 0 to 14,000 between runs."""
    from vaelab.cpu import _glibc

    if _glibc() is None:
        pytest.skip("not glibc")

    def faults(kept: bool) -> int:
        code = _FAULTS.format(kept=kept)
        env = {**os.environ, "VAELAB_NATIVE": "0"}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        assert out.returncode == 0, out.stderr
        return int(out.stdout.strip())

    assert faults(False) > 2000
    assert faults(True) < 100
