"""Parameter counts of the encoder, the decoder and the likelihood head."""

from __future__ import annotations

from torch import nn

from vaelab.metrics.base import METRICS, EvalContext


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Trainable parameters: ``encoder``, ``decoder``, ``likelihood`` (learned sigmas) and
    ``total``."""
    from vaelab.model import count_parameters

    parts = {
        name: count_parameters(getattr(model, name))
        for name in ("encoder", "decoder", "likelihood")
    }
    parts["total"] = count_parameters(model)
    return parts


@METRICS.register("params")
def params_metric(ctx: EvalContext) -> list:
    """Parameter counts (encoder, decoder, likelihood, total)."""
    counts = parameter_counts(ctx.model)
    return [
        ctx.label(
            f"params.{name}",
            float(n),
            "parameters",
            "count of trainable parameters",
            split=None,
            n_images=None,
            binarization=None,
        )
        for name, n in counts.items()
    ]
