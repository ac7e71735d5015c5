"""Choosing a torch device: CUDA, then Apple MPS, then the CPU.

Code in vaelab never calls ``.cuda()``; it takes a ``device`` and gets one from
:func:`pick_device`, so the same run goes wherever the hardware allows.
"""

from __future__ import annotations

import os
import platform

import torch

DEVICE_KINDS = ("auto", "cpu", "cuda", "mps")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def pick_device(name: str | torch.device = "auto") -> torch.device:
    """The device to run on.

    Args:
        name: ``"auto"`` (CUDA if available, then MPS, then CPU), ``"cpu"``, ``"cuda"``,
            ``"cuda:N"`` or ``"mps"``. An explicit device that is not available raises.

    Raises:
        ValueError: an unknown name, or a device this machine does not have.
    """
    if isinstance(name, torch.device):
        name = str(name)
    name = name.strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    kind, _, index = name.partition(":")
    if kind not in DEVICE_KINDS or (index and (kind != "cuda" or not index.isdigit())):
        raise ValueError(f"unknown device {name!r}; use one of: auto, cpu, cuda, cuda:N, mps")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but torch sees no CUDA GPU here")
        if index and int(index) >= torch.cuda.device_count():
            raise ValueError(
                f"device {name!r} does not exist: torch sees {torch.cuda.device_count()} GPU(s)"
            )
    if kind == "mps" and not _mps_available():
        raise ValueError("device 'mps' was asked for but MPS is not available here")
    return torch.device(name)


def native_bf16(device: torch.device) -> bool:
    """Whether bfloat16 autocast pays on ``device``: any CUDA GPU, or a CPU with native bf16
    arithmetic (AVX512-BF16 or AMX, as oneDNN reports it). Elsewhere bf16 is emulated, slower
    than float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    try:
        return bool(
            torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
        )
    except (AttributeError, RuntimeError):  # an older or a stripped-down torch build
        return False


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), or what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_hardware(device: torch.device) -> dict:
    """Facts for a run's summary: CPU model, cores, torch threads and the device's name."""
    info = {
        "device": str(device),
        "device_name": cpu_model(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        props = torch.cuda.get_device_properties(device)
        info["gpu_memory_gb"] = round(props.total_memory / 2**30, 1)
    elif device.type == "mps":
        info["device_name"] = "Apple MPS"
    return info
