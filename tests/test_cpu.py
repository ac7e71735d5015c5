"""denormals_flushed(): denormal floats count as zero in every torch thread, then not again."""

from __future__ import annotations

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
