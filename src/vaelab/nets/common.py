"""Pieces shared by the architecture families."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vaelab.registry import Registry

ARCHITECTURES: Registry = Registry("architecture")

_ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
}


def activation(name: str) -> nn.Module:
    """A fresh activation module by name (relu, gelu, tanh, softplus, silu, elu, leaky_relu)."""
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; choose one of: {', '.join(sorted(_ACTIVATIONS))}"
        ) from None


class GaussianHeads(nn.Module):
    """One linear layer giving (mu, logvar), each (B, Z), from features (B, F)."""

    def __init__(self, in_features: int, latent_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, 2 * latent_dim)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.linear(h).chunk(2, dim=-1)
        return mu, logvar


def padded_size(size: int, factor: int) -> int:
    """The smallest multiple of ``factor`` that is >= ``size``."""
    return int(math.ceil(size / factor) * factor)


class PadTo(nn.Module):
    """Zero-pad (B, C, H, W) symmetrically to (B, C, h, w)."""

    def __init__(self, h: int, w: int) -> None:
        super().__init__()
        self.h, self.w = h, w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dh, dw = self.h - x.shape[-2], self.w - x.shape[-1]
        if dh == 0 and dw == 0:
            return x
        return F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))


class CropTo(nn.Module):
    """Centre-crop (B, C, H', W') to (B, C, h, w) (undoes :class:`PadTo`)."""

    def __init__(self, h: int, w: int) -> None:
        super().__init__()
        self.h, self.w = h, w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dh, dw = x.shape[-2] - self.h, x.shape[-1] - self.w
        if dh == 0 and dw == 0:
            return x
        return x[..., dh // 2 : dh // 2 + self.h, dw // 2 : dw // 2 + self.w]


class Reshape(nn.Module):
    """(B, prod(shape)) -> (B, *shape)."""

    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], *self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"
