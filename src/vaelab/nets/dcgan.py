"""DCGAN-style conv VAE: Astorga et al.'s CelebA network ("Recreating AEVB", Sec. 5.2).

Encoder: blocks of Conv(k4, s2, p1) + BatchNorm + ReLU with channels 32-64-128-256, flatten,
linear (mu, logvar) heads. Decoder: linear, reshape, then ConvTranspose(k4, s2, p1) blocks that
mirror the encoder, the last one without normalisation. Inputs whose sides are not multiples of
2^blocks (28x28, 8x8) are zero-padded on the way in and centre-cropped on the way out, so 28x28,
32x32, 64x64 and 64x48 all work.
"""

from __future__ import annotations

import torch
from torch import nn

from vaelab.nets.common import (
    ARCHITECTURES,
    Conv2d,
    ConvTranspose2d,
    CropTo,
    GaussianHeads,
    PadTo,
    Reshape,
    norm_activation,
    padded_size,
)


class DCGANEncoder(nn.Module):
    def __init__(
        self, c: int, hp: int, wp: int, channels: tuple[int, ...], z: int, act: str, bn: bool
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [PadTo(hp, wp)]
        prev = c
        for ch in channels:
            layers += [Conv2d(prev, ch, 4, stride=2, padding=1, bias=not bn)]
            layers += norm_activation(ch, act, bn)
            prev = ch
        n = 2 ** len(channels)
        layers.append(nn.Flatten())
        self.body = nn.Sequential(*layers)
        self.heads = GaussianHeads(prev * (hp // n) * (wp // n), z)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads(self.body(x))


@ARCHITECTURES.register("dcgan")
def build_dcgan(cfg, shape: tuple[int, int, int], out_channels: int) -> tuple[nn.Module, nn.Module]:
    """Astorga et al.'s CelebA conv VAE; ``hidden`` = channels (default 32, 64, 128, 256)."""
    c, h, w = shape
    channels = tuple(cfg.hidden) or (32, 64, 128, 256)
    n = 2 ** len(channels)
    hp, wp = padded_size(h, n), padded_size(w, n)
    encoder = DCGANEncoder(c, hp, wp, channels, cfg.latent_dim, cfg.activation, cfg.batch_norm)
    rev = list(reversed(channels))
    layers: list[nn.Module] = [
        nn.Linear(cfg.latent_dim, rev[0] * (hp // n) * (wp // n)),
        Reshape(rev[0], hp // n, wp // n),
    ]
    layers += norm_activation(rev[0], cfg.activation, cfg.batch_norm)
    for a, b in zip(rev[:-1], rev[1:]):
        layers.append(ConvTranspose2d(a, b, 4, stride=2, padding=1, bias=not cfg.batch_norm))
        layers += norm_activation(b, cfg.activation, cfg.batch_norm)
    layers += [ConvTranspose2d(rev[-1], out_channels, 4, stride=2, padding=1), CropTo(h, w)]
    return encoder, nn.Sequential(*layers)
