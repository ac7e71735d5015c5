"""The small MNIST convolutional VAE of Zhao et al. ("Exploring VAEs for deep learning", Figs. 9-10).

Encoder: Conv(32, 3x3, stride 2, same) -> Conv(64, 3x3, s2) -> Dropout(0.25) -> Flatten ->
Dense(32, relu) -> (mu, logvar). Decoder: Dense(h/4 * w/4 * 64) -> reshape -> ConvT(64, 3x3, s2)
-> ConvT(32, 3x3, s2) -> Dropout -> ConvT(out, 3x3, s1). At z = 2 on 1x28x28 this has 119,332
encoder and 65,089 decoder parameters (184,421 in all), as in their Table 2.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vaelab.nets.common import (
    ARCHITECTURES,
    Conv2d,
    ConvTranspose2d,
    CropTo,
    Dropout,
    GaussianHeads,
    Reshape,
    activation,
)


class ConvEncoder(nn.Module):
    def __init__(
        self,
        c: int,
        h: int,
        w: int,
        ch: tuple[int, int],
        dense: int,
        z: int,
        act: str,
        dropout: float,
    ) -> None:
        super().__init__()
        h4, w4 = math.ceil(math.ceil(h / 2) / 2), math.ceil(math.ceil(w / 2) / 2)
        self.body = nn.Sequential(
            Conv2d(c, ch[0], 3, stride=2, padding=1),
            activation(act),
            Conv2d(ch[0], ch[1], 3, stride=2, padding=1),
            activation(act),
            Dropout(dropout),
            nn.Flatten(),
            nn.Linear(ch[1] * h4 * w4, dense),
            activation(act),
        )
        self.heads = GaussianHeads(dense, z)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads(self.body(x))


@ARCHITECTURES.register("conv")
def build_conv(cfg, shape: tuple[int, int, int], out_channels: int) -> tuple[nn.Module, nn.Module]:
    """Zhao et al.'s small conv VAE; ``hidden`` = (32, 64, 32): conv channels and dense width."""
    c, h, w = shape
    hid = tuple(cfg.hidden) or (32, 64, 32)
    if len(hid) != 3:
        raise ValueError(f"conv: hidden must be (conv1, conv2, dense) channels, got {hid}")
    ch, dense = (hid[0], hid[1]), hid[2]
    dropout = cfg.dropout if cfg.dropout > 0 else 0.25
    h4, w4 = math.ceil(math.ceil(h / 2) / 2), math.ceil(math.ceil(w / 2) / 2)
    encoder = ConvEncoder(c, h, w, ch, dense, cfg.latent_dim, cfg.activation, dropout)
    decoder = nn.Sequential(
        nn.Linear(cfg.latent_dim, h4 * w4 * ch[1]),
        activation(cfg.activation),
        Reshape(ch[1], h4, w4),
        ConvTranspose2d(ch[1], ch[1], 3, stride=2, padding=1, output_padding=1),
        activation(cfg.activation),
        ConvTranspose2d(ch[1], ch[0], 3, stride=2, padding=1, output_padding=1),
        activation(cfg.activation),
        Dropout(dropout),
        ConvTranspose2d(ch[0], out_channels, 3, stride=1, padding=1),
        CropTo(h, w),
    )
    return encoder, decoder
