"""CPU settings for training: denormal floats flushed to zero in every torch thread, and freed
memory kept by the C allocator.

Adam's first moment of a weight whose input is almost always 0 (MNIST's border pixels feed the
first layer zeros) shrinks by beta1 = 0.9 a step, reaches the denormal range (below 1.2e-38)
and stays there for ~150 steps. On x86 each arithmetic operation on a denormal takes a
microcode assist, tens to hundreds of times slower than on a normal number: after 2 epochs of
the 784-400-20 MNIST MLP, 17% of the first layer's first moments are denormal and the fused
Adam step takes 4.4 ms instead of 0.9 ms (1 thread), so later epochs train slower than the
first. With flush-to-zero and denormals-are-zero (FTZ/DAZ, ``torch.set_flush_denormal``) those
values count as 0, which changes nothing that matters: such a moment moves its weight by less
than 1e-30.

The mode is a property of each OS thread, and ``torch.set_flush_denormal`` sets it only in the
calling one; torch's OpenMP worker threads keep the mode they were created with. So
:func:`denormals_flushed` also runs one OpenMP parallel region (libgomp's ``GOMP_parallel``,
through ctypes) in which every worker sets it, and undoes both on exit. Where no OpenMP runtime
can be found, or the CPU has no such mode (``torch.set_flush_denormal`` returns False, as off
x86), only the calling thread is set, or nothing.

Freed memory (:func:`freed_memory_kept`): glibc's malloc hands blocks above a sliding threshold
(128 KiB, rising to at most 32 MiB) straight to and from the OS with mmap/munmap, and gives the
top of its heap back when more than twice that is free. A training step allocates and frees the
same large tensors every time, so each step can map, fault in (one page fault per 4 KiB) and
unmap tens of megabytes afresh: the conv network of vaelab.nets.conv in NHWC float32 took 16,000
page faults a step (84 against 52 ms a step at batch 128 on the machine of docs/benchmarks.md).
While fit() runs, blocks up to 256 MiB (a 128 x 32 x 64 x 64 float32 activation is 64 MiB) come
from the heap and up to 1 GiB of free heap is kept, so a step reuses the memory the previous one
freed; on exit the heap is trimmed.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_SMALLEST_NORMAL = torch.finfo(torch.float32).tiny  # 1.2e-38
_OPENMP_LIBS = ("libgomp", "libiomp5", "libomp")  # all export GOMP_parallel
_REGION = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_GOMP_PARALLEL_ARGS = [_REGION, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]  # fn, data, n, flags


def denormals_are_flushed() -> bool:
    """Whether this thread treats denormal floats as zero (a float32 probe)."""
    return float(torch.tensor([_SMALLEST_NORMAL / 4]) * 1.0) == 0.0


def _openmp_library() -> ctypes.CDLL | None:
    """The OpenMP runtime this process has loaded (Linux: found in /proc/self/maps)."""
    try:
        with open("/proc/self/maps") as fh:
            paths = {line.split()[-1] for line in fh if "/" in line}
    except OSError:
        return None
    for path in sorted(paths):
        if os.path.basename(path).startswith(_OPENMP_LIBS):
            try:
                lib = ctypes.CDLL(path)  # the loaded copy: dlopen returns the same handle
                lib.GOMP_parallel.argtypes = _GOMP_PARALLEL_ARGS
                lib.GOMP_parallel.restype = None
                return lib
            except (OSError, AttributeError):
                continue
    return None


def set_flush_denormal_all_threads(on: bool) -> bool:
    """``torch.set_flush_denormal(on)`` in this thread and in torch's OpenMP workers.

    Returns False where the CPU has no such mode (nothing was changed)."""
    if not torch.set_flush_denormal(on):
        return False
    threads = torch.get_num_threads()
    lib = _openmp_library() if threads > 1 else None
    if lib is not None:
        region = _REGION(lambda _data: _set_quietly(on))  # kept alive during the call
        lib.GOMP_parallel(region, None, threads, 0)
    return True


def _set_quietly(on: bool) -> None:
    torch.set_flush_denormal(on)


@contextmanager
def denormals_flushed() -> Iterator[bool]:
    """Flush denormal floats to zero in every torch CPU thread while the block runs.

    Yields whether the mode is on. If this thread already had it on, nothing is changed (and
    nothing is undone on exit)."""
    if denormals_are_flushed():
        yield True
        return
    on = set_flush_denormal_all_threads(True)
    try:
        yield on
    finally:
        if on:
            set_flush_denormal_all_threads(False)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def _glibc() -> ctypes.CDLL | None:
    """The process's C library if it is glibc (mallopt and malloc_trim), else None."""
    try:
        libc = ctypes.CDLL(None)
        if not hasattr(libc, "gnu_get_libc_version"):  # musl and others: mallopt differs
            return None
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None


@contextmanager
def freed_memory_kept(
    mmap_threshold: int = 256 << 20, trim_threshold: int = 1 << 30
) -> Iterator[bool]:
    """While the block runs, glibc's malloc serves blocks below ``mmap_threshold`` bytes from
    its heap and keeps up to ``trim_threshold`` bytes of free heap instead of returning them to
    the OS, so memory freed by one training step is reused by the next without page faults.

    Yields whether the setting took (False off glibc). On exit the thresholds become 32 and
    64 MiB (the highest glibc's own sliding rule sets) and the free heap goes back to the OS."""
    libc = _glibc()
    on = (
        libc is not None
        and libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
        and libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
    )
    try:
        yield on
    finally:
        if on:
            libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
            libc.mallopt(_M_TRIM_THRESHOLD, 64 << 20)
            libc.malloc_trim(0)
