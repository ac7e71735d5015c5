"""vaelab: train, evaluate and explore Variational Autoencoders on images.

The core API::

    from vaelab import build_model, elbo, iwae, load_preset
    cfg = load_preset("quickstart")
    model = build_model(cfg.model, (1, 8, 8))
    out = elbo(model, x)            # out.loss, out.elbo (B,), out.log_px_z, out.kl

Names are imported lazily (PEP 562), so ``import vaelab`` and ``vaelab --help`` stay fast and
heavy optional pieces (matplotlib, scikit-learn) load only where they are used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Config": "vaelab.config",
    "DataConfig": "vaelab.config",
    "ModelConfig": "vaelab.config",
    "ObjectiveConfig": "vaelab.config",
    "TrainConfig": "vaelab.config",
    "load_config": "vaelab.config",
    "load_preset": "vaelab.config",
    "override": "vaelab.config",
    "preset_names": "vaelab.config",
    "save_config": "vaelab.config",
    "DiagonalGaussian": "vaelab.distributions",
    "StandardNormal": "vaelab.distributions",
    "LIKELIHOODS": "vaelab.likelihoods",
    "build_likelihood": "vaelab.likelihoods",
    "VAE": "vaelab.model",
    "build_model": "vaelab.model",
    "count_parameters": "vaelab.model",
    "load_model": "vaelab.model",
    "model_summary": "vaelab.model",
    "save_model": "vaelab.model",
    "ARCHITECTURES": "vaelab.nets",
    "OBJECTIVES": "vaelab.objectives",
    "ObjectiveOutput": "vaelab.objectives",
    "compute_objective": "vaelab.objectives",
    "elbo": "vaelab.objectives",
    "iwae": "vaelab.objectives",
    "load_dataset": "vaelab.data",
    "DATASETS": "vaelab.data",
    "fit": "vaelab.train",
    "evaluate": "vaelab.evaluate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vaelab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
