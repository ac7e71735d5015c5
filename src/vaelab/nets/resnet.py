"""Residual convolutional encoder/decoder, meant for good likelihoods.

Encoder: 3x3 stem, then per stage ``blocks_per_stage`` pre-activation residual blocks and a
stride-2 convolution; flatten; linear (mu, logvar). Decoder: linear, reshape, then per stage a
nearest-neighbour 2x upsample + 3x3 conv and residual blocks; a 3x3 conv to the likelihood
parameters. No batch normalisation, so the model is the same function in train and eval mode
(which matters for importance-sampled likelihoods). Sides are padded to a multiple of
2^stages and cropped back.
"""

from __future__ import annotations

import torch
from torch import nn

from vaelab.nets.common import (
    ARCHITECTURES,
    Conv2d,
    CropTo,
    Dropout,
    GaussianHeads,
    PadTo,
    Reshape,
    activation,
    padded_size,
)


class ResBlock(nn.Module):
    """x + conv(act(conv(act(x)))), 3x3 convolutions, channels unchanged."""

    def __init__(self, ch: int, act: str, dropout: float) -> None:
        super().__init__()
        self.body = nn.Sequential(
            activation(act),
            Conv2d(ch, ch, 3, padding=1),
            activation(act),
            Dropout(dropout) if dropout > 0 else nn.Identity(),
            Conv2d(ch, ch, 3, padding=1),
        )
        nn.init.zeros_(self.body[-1].weight)  # start as identity for a stable deep stack
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResNetEncoder(nn.Module):
    def __init__(
        self,
        c: int,
        hp: int,
        wp: int,
        channels: tuple[int, ...],
        blocks: int,
        z: int,
        act: str,
        dropout: float,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [PadTo(hp, wp), Conv2d(c, channels[0], 3, padding=1)]
        prev = channels[0]
        for ch in channels:
            layers += [ResBlock(prev, act, dropout) for _ in range(blocks)]
            layers.append(Conv2d(prev, ch, 3, stride=2, padding=1))
            prev = ch
        n = 2 ** len(channels)
        layers += [activation(act), nn.Flatten()]
        self.body = nn.Sequential(*layers)
        self.heads = GaussianHeads(prev * (hp // n) * (wp // n), z)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads(self.body(x))


@ARCHITECTURES.register("resnet")
def build_resnet(
    cfg, shape: tuple[int, int, int], out_channels: int
) -> tuple[nn.Module, nn.Module]:
    """Residual conv VAE; ``hidden`` = channels per stage (default 64, 128)."""
    c, h, w = shape
    channels = tuple(cfg.hidden) or (64, 128)
    blocks = max(1, cfg.blocks_per_stage)
    act = cfg.activation
    n = 2 ** len(channels)
    hp, wp = padded_size(h, n), padded_size(w, n)
    encoder = ResNetEncoder(c, hp, wp, channels, blocks, cfg.latent_dim, act, cfg.dropout)
    rev = list(reversed(channels))
    layers: list[nn.Module] = [
        nn.Linear(cfg.latent_dim, rev[0] * (hp // n) * (wp // n)),
        Reshape(rev[0], hp // n, wp // n),
    ]
    prev = rev[0]
    for ch in rev[1:] + [rev[-1]]:
        layers += [nn.Upsample(scale_factor=2, mode="nearest"), Conv2d(prev, ch, 3, padding=1)]
        layers += [ResBlock(ch, act, cfg.dropout) for _ in range(blocks)]
        prev = ch
    layers += [activation(act), Conv2d(prev, out_channels, 3, padding=1), CropTo(h, w)]
    return encoder, nn.Sequential(*layers)
