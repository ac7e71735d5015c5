"""The VAE: an amortised Gaussian encoder q(z|x), the prior N(0, I) and a decoder likelihood p(x|z).

The model maps images to distributions and nothing else: no loss weights, optimiser, data or
logging live here (objectives are in :mod:`vaelab.objectives`, training in :mod:`vaelab.train`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from vaelab.config import Config, ModelConfig, from_dict, to_dict
from vaelab.distributions import DiagonalGaussian, StandardNormal
from vaelab.likelihoods import build_likelihood
from vaelab.nets import ARCHITECTURES

_HALF = (torch.float16, torch.bfloat16)


class VAE(nn.Module):
    """A variational autoencoder for images of shape (C, H, W).

    Args:
        encoder: (B, C, H, W) -> (mu, logvar), each (B, Z).
        decoder: (B, Z) -> raw likelihood parameters (B, P*C, H, W).
        likelihood: the head turning raw parameters into p(x|z).
        latent_dim: Z.
        shape: (C, H, W) of the images.
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        likelihood: nn.Module,
        latent_dim: int,
        shape: tuple[int, int, int],
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.likelihood = likelihood
        self.latent_dim = int(latent_dim)
        self.shape = tuple(int(s) for s in shape)
        self.prior = StandardNormal(self.latent_dim)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != self.shape:
            raise ValueError(
                f"expected images of shape (B, {', '.join(map(str, self.shape))}), "
                f"got {tuple(x.shape)}"
            )

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """q(z|x) for a batch x of shape (B, C, H, W) in [0, 1]."""
        self._check(x)
        mu, logvar = self.encoder(x)
        if mu.dtype in _HALF:  # under autocast: the Gaussian, its KL and samples in float32
            mu, logvar = mu.float(), logvar.float()
        return DiagonalGaussian(mu, logvar)

    def decode(self, z: torch.Tensor):
        """p(x|z) for latents z of shape (B, Z) (or (K, B, Z), flattened and restored)."""
        if z.shape[-1] != self.latent_dim:
            raise ValueError(f"expected latents (..., {self.latent_dim}), got {tuple(z.shape)}")
        lead = z.shape[:-1]
        raw = self.decoder(z.reshape(-1, self.latent_dim))
        if len(lead) > 1:
            raw = raw.view(*lead, *raw.shape[1:]).flatten(0, len(lead) - 1)
        if raw.dtype in _HALF:  # under autocast: log p(x|z) summed over pixels in float32
            raw = raw.float()
        return self.likelihood(raw)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """Encode, draw one reparameterised z, decode: returns (q_z, p_x, z)."""
        q_z = self.encode(x)
        z = q_z.rsample(generator=generator)
        return q_z, self.decode(z), z

    @torch.no_grad()
    def sample(
        self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Decode n prior draws z ~ N(0, temperature^2 I); returns the means of p(x|z), (n, C, H, W)."""
        z = self.prior.sample(n, temperature=temperature, device=self.device, generator=generator)
        return self.decode(z).mean

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """The mean of p(x | z = E[q(z|x)]), (B, C, H, W) in [0, 1]."""
        return self.decode(self.encode(x).mu).mean


_CONVS = (nn.Conv2d, nn.ConvTranspose2d)


def has_convolutions(model: nn.Module) -> bool:
    """Whether ``model`` has 2-D convolutions (which run faster in the channels-last layout)."""
    return any(isinstance(m, _CONVS) for m in model.modules())


def output_layer(decoder: nn.Module) -> nn.Module | None:
    """The decoder's last Linear or convolution (the one that gives the likelihood's raw
    parameters; every architecture in vaelab.nets defines its layers in the order they run)."""
    last = None
    for m in decoder.modules():
        if isinstance(m, (nn.Linear, *_CONVS)):
            last = m
    return last


def is_channels_last(model: nn.Module) -> bool:
    """Whether ``model`` has convolutions and all their weights are channels-last already."""
    weights = [m.weight for m in model.modules() if isinstance(m, _CONVS)]
    return bool(weights) and all(
        w.is_contiguous(memory_format=torch.channels_last) for w in weights
    )


def build_model(cfg: ModelConfig | Config, shape: tuple[int, int, int]) -> VAE:
    """Build the VAE that ``cfg`` describes for images of ``shape`` (C, H, W).

    The shape comes from the data (``DataInfo.shape``), never from the config.
    """
    if isinstance(cfg, Config):
        cfg = cfg.model
    shape = tuple(int(s) for s in shape)
    if len(shape) != 3:
        raise ValueError(f"image shape must be (C, H, W), got {shape}")
    if cfg.latent_dim < 1:
        raise ValueError(f"model.latent_dim must be >= 1, got {cfg.latent_dim}")
    likelihood = build_likelihood(
        cfg.likelihood,
        shape,
        {"sigma": cfg.sigma, "sigma_floor": cfg.sigma_floor, "gaussian_link": cfg.gaussian_link},
    )
    builder = ARCHITECTURES.get(cfg.arch)
    encoder, decoder = builder(cfg, shape, likelihood.params_per_channel * shape[0])
    return VAE(encoder, decoder, likelihood, cfg.latent_dim, shape)


def init_output_bias(model: VAE, mean: torch.Tensor) -> str | None:
    """Set the bias of the decoder's output layer so that, before the hidden units say
    anything, p(x|z) has the data's mean image ``mean`` (C, H, W) in [0, 1].

    The usual starting point of density models of images (Bernoulli: the per-pixel log-odds
    of the training set): the first updates then learn structure instead of the average
    brightness of each pixel. The output layer is the last ``Linear``/``Conv2d``/
    ``ConvTranspose2d`` with a bias that the decoder runs (found by running it once). A
    ``Linear`` with one output per raw value gets a bias per pixel; a convolution gets a bias
    per channel (the likelihood's raw value for the channel's mean level). Only the bias
    changes; weights and random state are untouched.

    Returns what was set (for logs), or None when it does not apply: the likelihood has no
    inverse mean (:meth:`~vaelab.likelihoods.Likelihood.raw_for_mean`), or the output layer
    is none of those.
    """
    if tuple(mean.shape) != model.shape:
        raise ValueError(f"mean image of shape {tuple(mean.shape)} for images {model.shape}")
    raw = model.likelihood.raw_for_mean(mean.double().clamp(0.0, 1.0))
    if raw is None:
        return None
    ran: list[nn.Module] = []
    kinds = (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)
    hooks = [
        m.register_forward_hook(lambda mod, i, o: ran.append(mod))
        for m in model.decoder.modules()
        if isinstance(m, kinds) and m.bias is not None
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model.decoder(torch.zeros(1, model.latent_dim, device=model.device))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    if not ran:
        return None
    last = ran[-1]
    with torch.no_grad():
        if isinstance(last, nn.Linear) and last.out_features == raw.numel():
            last.bias.copy_(raw.flatten())
            return f"{type(model.likelihood).__name__} output bias = the training mean, per pixel"
        if not isinstance(last, nn.Linear) and last.out_channels == raw.shape[0]:
            level = mean.double().mean((1, 2), keepdim=True).expand_as(mean)
            last.bias.copy_(model.likelihood.raw_for_mean(level)[:, 0, 0])
            return f"{type(model.likelihood).__name__} output bias = the training mean, per channel"
    return None


def init_input_bias(model: VAE, mean: torch.Tensor) -> str | None:
    """Centre the encoder's first layer on the data's mean image ``mean`` (C, H, W): its
    bias becomes ``b - W mean``, so at the start it sees the images minus their mean.

    Data-dependent initialisation only (the network and what it can represent do not
    change); it is what standardising the inputs would do to the first layer, and measured
    with the MLP it reaches a given ELBO in fewer steps (docs/benchmarks.md). Applies to
    encoders that start with a flatten and a ``Linear`` with a bias (vaelab's ``mlp`` and
    ``linear``). Returns what was set (for logs), or None when it does not apply.
    """
    if tuple(mean.shape) != model.shape:
        raise ValueError(f"mean image of shape {tuple(mean.shape)} for images {model.shape}")
    body = getattr(model.encoder, "body", None)
    if not (isinstance(body, nn.Sequential) and len(body) and isinstance(body[0], nn.Flatten)):
        return None
    # the first layer after the flatten: the body's, or the heads' when the body has none
    first = body[1] if len(body) > 1 else getattr(model.encoder.heads, "linear", None)
    if not isinstance(first, nn.Linear) or first.bias is None or first.in_features != mean.numel():
        return None
    with torch.no_grad():
        w = first.weight
        first.bias.sub_(w @ mean.flatten().to(device=w.device, dtype=w.dtype))
    return "encoder input centred on the training mean"


def count_parameters(module: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


# ------------------------------------------------------------------------------ save / load


def save_model(model: VAE, cfg: ModelConfig | Config, directory: str | os.PathLike) -> Path:
    """Write ``config.json`` (the model config and image shape) and ``model.safetensors``.

    Nothing is pickled: :func:`load_model` rebuilds the network through the registry.
    """
    from safetensors.torch import save_file

    from vaelab.config import Config as _Config
    from vaelab.io import atomic_path, atomic_write_text

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    full = cfg if isinstance(cfg, _Config) else None
    payload = to_dict(full) if full is not None else {"model": to_dict(cfg)}
    payload["image_shape"] = list(model.shape)
    atomic_write_text(directory / "config.json", json.dumps(payload, indent=2))
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(directory / "model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt", "vaelab": "1"})
    return directory


def load_model(directory: str | os.PathLike, device: torch.device | str = "cpu") -> VAE:
    """Rebuild a model saved by :func:`save_model` (or a run folder) and load its weights."""
    from safetensors.torch import load_file

    directory = Path(directory)
    cfg_path, weights = directory / "config.json", directory / "model.safetensors"
    for p in (cfg_path, weights):
        if not p.is_file():
            raise FileNotFoundError(f"{p} not found: expected a folder written by save_model")
    payload = json.loads(cfg_path.read_text())
    if "image_shape" not in payload or "model" not in payload:
        raise ValueError(f"{cfg_path} lacks 'model' or 'image_shape'")
    mcfg = from_dict(ModelConfig, payload["model"], "model")
    model = build_model(mcfg, tuple(payload["image_shape"]))
    state = load_file(str(weights), device="cpu")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:
        raise ValueError(f"{weights} does not match {cfg_path}: {exc}") from None
    if missing or unexpected:
        raise ValueError(
            f"{weights} does not match the config: missing {missing}, unexpected {unexpected}"
        )
    return model.to(device).eval()


def model_summary(model: VAE, depth: int = 3) -> str:
    """A Keras-style table (layer, output shape, parameters, totals) for encoder and decoder.

    Uses torchinfo; the encoder is summarised on one (1, C, H, W) input and the decoder on one
    (1, Z) latent, as in Zhao et al.'s Figures 9-10.
    """
    from torchinfo import summary

    was_training = model.training
    model.eval()
    try:
        enc = summary(
            model.encoder,
            input_size=(1, *model.shape),
            depth=depth,
            verbose=0,
            device=model.device,
            col_names=("output_size", "num_params"),
        )
        dec = summary(
            model.decoder,
            input_size=(1, model.latent_dim),
            depth=depth,
            verbose=0,
            device=model.device,
            col_names=("output_size", "num_params"),
        )
    finally:
        model.train(was_training)
    lik = count_parameters(model.likelihood)
    lines = ["Encoder", str(enc), "", "Decoder", str(dec)]
    if lik:
        lines += ["", f"Likelihood parameters: {lik:,}"]
    lines += ["", f"Total parameters: {count_parameters(model):,}"]
    return "\n".join(lines)
