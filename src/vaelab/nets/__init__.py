"""Encoder/decoder architectures, one module per family, each registered in :data:`ARCHITECTURES`.

A builder has the signature ``build(cfg: ModelConfig, shape: (C, H, W), out_channels: int)``
and returns ``(encoder, decoder)``:

* ``encoder(x)``: (B, C, H, W) floats in [0, 1] -> ``(mu, logvar)``, each (B, Z);
* ``decoder(z)``: (B, Z) -> raw likelihood parameters (B, out_channels, H, W), where
  ``out_channels`` = likelihood parameters per image channel x C.
"""

from vaelab.nets import conv, dcgan, mlp, resnet  # noqa: F401  (registration)
from vaelab.nets.common import ARCHITECTURES, activation

__all__ = ["ARCHITECTURES", "activation"]
