"""pick_device: cuda, then mps, then cpu; explicit names are checked."""

from __future__ import annotations

import pytest
import torch

from vaelab.devices import describe_hardware, pick_device


def test_auto_prefers_cuda_then_mps_then_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("vaelab.devices._mps_available", lambda: False)
    assert pick_device() == torch.device("cpu")
    monkeypatch.setattr("vaelab.devices._mps_available", lambda: True)
    assert pick_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto") == torch.device("cuda")


def test_explicit_names_are_validated(monkeypatch):
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device(torch.device("cpu")) == torch.device("cpu")
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        pick_device("tpu")
    with pytest.raises(ValueError, match="unknown device"):
        pick_device("cpu:1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA GPU"):
        pick_device("cuda")


def test_hardware_description():
    info = describe_hardware(torch.device("cpu"))
    assert info["cpu_count"] >= 1 and info["torch_threads"] >= 1 and info["device"] == "cpu"
