"""Pieces shared by the architecture families."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vaelab import native
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


def _dense(x: torch.Tensor) -> bool:
    """Whether x's elements fill its memory with no gaps or overlaps (NCHW or NHWC order)."""
    return x.is_contiguous() or (
        x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    )


class _NativeDropout(torch.autograd.Function):
    """Dropout by ``csrc/dropout.c``. The mask is kept as one bit per element (a uint16 per 16
    elements, in x's memory order); the backward pass applies it with the same scale."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, kernel) -> torch.Tensor:
        out = torch.empty_like(x)  # x's strides: empty_like preserves a dense layout
        n = x.numel()
        mask = torch.empty((n + 15) // 16, dtype=torch.int16)
        seed = int(torch.randint(0, 2**62, (1,)).item())  # torch's generator: seeded runs repeat
        keep = min(round((1.0 - p) * 2.0**32), 2**32 - 1)
        ctx.scale = 1.0 / (1.0 - p)
        kernel(x.data_ptr(), n, seed, keep, ctx.scale, out.data_ptr(), mask.data_ptr())
        ctx.save_for_backward(mask)
        ctx.shape, ctx.stride = x.shape, x.stride()
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        if grad.stride() != ctx.stride:  # e.g. an expanded or differently laid out gradient
            grad = torch.empty_strided(ctx.shape, ctx.stride, dtype=grad.dtype).copy_(grad)
        out = torch.empty_like(grad)
        native.dropout_kernel(grad.dtype, apply=True)(
            grad.data_ptr(), grad.numel(), mask.data_ptr(), ctx.scale, out.data_ptr()
        )
        return out, None, None


class Dropout(nn.Dropout):
    """:class:`torch.nn.Dropout` (same arguments, state and behaviour) whose training pass on
    CPU float32/bfloat16 tensors runs ``csrc/dropout.c``: the keep/drop draw, scaling and a
    1-bit mask in one pass: forwards and backwards 10-14x faster than torch's CPU dropout (a
    128x32x28x28 batch: 2.1 against 29 ms on the machine of docs/benchmarks.md, whose
    ``benchmarks/bench_layers.py`` measures it). Each element is kept with probability
    1 - p from a counter-based draw seeded by torch's generator, so ``torch.manual_seed`` makes
    runs repeat; the masks differ from torch's own. Elsewhere (CUDA, other dtypes, in-place,
    under torch.compile, no C compiler) it is torch's dropout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self.training
            and 0.0 < self.p < 1.0
            and not self.inplace
            and x.device.type == "cpu"
            and _dense(x)
            and not torch.compiler.is_compiling()
            and (kernel := native.dropout_kernel(x.dtype)) is not None
        ):
            return _NativeDropout.apply(x, self.p, kernel)
        return super().forward(x)
