"""Fully connected encoder/decoder (Kingma & Welling 2013; the seeds' MLP VAEs)."""

from __future__ import annotations

import math

import torch
from torch import nn

from vaelab.nets.common import ARCHITECTURES, Dropout, GaussianHeads, Reshape, activation


def _stack(sizes: list[int], act: str, dropout: float) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), activation(act)]
        if dropout > 0:
            layers.append(Dropout(dropout))
    return layers


class MLPEncoder(nn.Module):
    """x (B, C, H, W) -> flatten -> hidden layers -> (mu, logvar), each (B, Z)."""

    def __init__(
        self, in_features: int, hidden: tuple[int, ...], latent_dim: int, act: str, dropout: float
    ) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), *_stack([in_features, *hidden], act, dropout))
        self.heads = GaussianHeads(hidden[-1] if hidden else in_features, latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.heads(self.body(x))


INITS = ("he", "torch")
INIT_LOGVAR = -3.0  # "he": the encoder's log-variances start here (sigma = 0.22)


def init_mlp(encoder: MLPEncoder, decoder: nn.Sequential, scheme: str) -> None:
    """Initialise an MLP VAE's layers in place by ``scheme`` (see ``ModelConfig.init``).

    ``"he"``: each Linear followed by a ReLU gets N(0, 2 / fan_in) weights and zero biases
    (He et al. 2015), and the encoder's log-variance outputs get bias ``INIT_LOGVAR``;
    ``"torch"`` leaves PyTorch's initialisation.
    """
    if scheme not in INITS:
        raise ValueError(f"model.init must be one of {', '.join(INITS)}, got {scheme!r}")
    if scheme == "torch":
        return
    with torch.no_grad():
        for seq in (encoder.body, decoder):
            layers = list(seq)
            for layer, nxt in zip(layers[:-1], layers[1:]):
                if isinstance(layer, nn.Linear) and isinstance(nxt, nn.ReLU):
                    nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
                    layer.bias.zero_()
        head = encoder.heads.linear
        head.bias[head.out_features // 2 :] = INIT_LOGVAR


@ARCHITECTURES.register("mlp")
def build_mlp(cfg, shape: tuple[int, int, int], out_channels: int) -> tuple[nn.Module, nn.Module]:
    """Multilayer perceptron; ``hidden`` are encoder widths, the decoder mirrors them.

    784-256-z has 404,244 parameters at z = 2 (Zhao et al. Table 1); 3072-512-z256 with GELU has
    3,543,552 (Chakravarthy Table 1).
    """
    c, h, w = shape
    d_in = c * h * w
    hidden = tuple(cfg.hidden) or (400,)
    encoder = MLPEncoder(d_in, hidden, cfg.latent_dim, cfg.activation, cfg.dropout)
    dec_sizes = [cfg.latent_dim, *reversed(hidden)]
    decoder = nn.Sequential(
        *_stack(dec_sizes, cfg.activation, cfg.dropout),
        nn.Linear(dec_sizes[-1], out_channels * h * w),
        Reshape(out_channels, h, w),
    )
    assert math.prod((out_channels, h, w)) == out_channels * h * w
    init_mlp(encoder, decoder, cfg.init)
    return encoder, decoder


@ARCHITECTURES.register("linear")
def build_linear(
    cfg, shape: tuple[int, int, int], out_channels: int
) -> tuple[nn.Module, nn.Module]:
    """Linear encoder and decoder (no hidden layer).

    With the ``gaussian`` likelihood and ``gaussian_link = "identity"`` this is probabilistic
    PCA (Tipping & Bishop 1999), whose log p(x) is known in closed form.
    """
    c, h, w = shape
    encoder = MLPEncoder(c * h * w, (), cfg.latent_dim, cfg.activation, 0.0)
    decoder = nn.Sequential(
        nn.Linear(cfg.latent_dim, out_channels * h * w), Reshape(out_channels, h, w)
    )
    return encoder, decoder
