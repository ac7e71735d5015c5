"""log p(x|z) for many latents per image, as fast as the decoder's matrix products allow.

Importance sampling decodes k latents per image (10^7 decoder passes for MNIST at k = 1000), so
the per-pixel work after the last matrix product, and allocating fresh outputs for every chunk,
would otherwise cost as much as the products themselves. :class:`LogLikelihoodRunner` removes
both where it can:

* **Bernoulli likelihood** (any decoder): the per-pixel work is fused (:func:`bernoulli_log_prob`),
  in one pass over memory by a small C kernel (:mod:`vaelab.native`) for float32 on the CPU
  when a C compiler is present, else in four PyTorch passes.
* **Bernoulli + an MLP decoder** (``nn.Sequential`` of ``Linear`` layers, elementwise activations
  and trailing reshapes, e.g. vaelab's ``mlp``): the decoder runs into buffers that are reused
  chunk after chunk as bias-free matrix products (a ones column carries the bias), activations
  run in place, and the term x . logits is folded into the last layer,
  x . (h W^T + b) = h . (W^T x) + b . x, a matrix-vector product over the hidden units instead
  of a pass over the pixels. A first Linear + ReLU runs in one C kernel pass (float32 on the
  CPU, :mod:`vaelab.native`; its inner dimension is only the latent size, where a library
  product is far from its peak), which with one hidden layer also computes that product
  while each row of h is still in registers.
* Anything else runs ``model.decode(z).log_prob(x)`` unchanged.

All three give the same numbers up to float rounding (tested against each other).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vaelab import native as vaelab_native

# Products of this many factors in [1/2, 1) stay above float32's smallest normal (2^-126).
GROUP = 112


def bernoulli_log_prob(
    logits: torch.Tensor,
    x: torch.Tensor,
    x_dot_logits: torch.Tensor | None = None,
    native: bool = True,
) -> torch.Tensor:
    """log p(x|z) = sum_d [x_d l_d - softplus(l_d)] for logits (B, n, D) and images x (B, D).

    Returns (B, n) nats. Fused, using softplus(l) = (l + |l|)/2 - log sigmoid(|l|):

        log p(x|z) = (x - 1/2) . l  -  (1/2) sum_d |l_d|  +  sum_d log sigmoid(|l_d|)

    For contiguous float32 logits on the CPU the last two sums run in one pass over memory in
    a C kernel (:mod:`vaelab.native`; ``native=False`` or no compiler: skipped). Otherwise the
    last sum takes logs of products of 112 factors in [1/2, 1) (no underflow in float32), so the
    per-pixel work is |.|, a sum, a sigmoid and a product, with no exp or log per pixel.
    ``x_dot_logits`` (B, n), if given, is (x - 1/2) . l computed elsewhere (folded into the
    decoder's last layer). ``logits`` may be overwritten.
    """
    if logits.dim() != 3 or x.dim() != 2 or logits.shape[0] != x.shape[0]:
        raise ValueError(
            f"expected logits (B, n, D) and x (B, D), got {tuple(logits.shape)} and {tuple(x.shape)}"
        )
    if x_dot_logits is None:
        x_dot_logits = torch.bmm(logits, (x - 0.5).unsqueeze(-1)).squeeze(-1)
    kernel = None if not native or logits.requires_grad else vaelab_native.bernoulli_rows(logits)
    if kernel is not None:  # -1/2 sum |l| + sum log sigmoid(|l|) in one pass
        rest = torch.empty(logits.shape[:2], dtype=logits.dtype)
        kernel(logits.data_ptr(), rest.numel(), logits.shape[2], rest.data_ptr())
        return x_dot_logits + rest
    a = logits.abs_()
    abs_sum = a.sum(-1)
    torch.sigmoid(a, out=a)
    return x_dot_logits - 0.5 * abs_sum + sum_log_groups(a)


def sum_log_groups(a: torch.Tensor) -> torch.Tensor:
    """sum_d log a_d over the last dim for a_d in [1/2, 1], as logs of products of 112 factors."""
    d = a.shape[-1]
    full = d // GROUP * GROUP
    out = a[..., :full].unflatten(-1, (full // GROUP, GROUP)).prod(-1).log_().sum(-1)
    if full < d:
        out = out + a[..., full:].prod(-1).log_()
    return out


# Activations that can run in place on a reused buffer.
_IN_PLACE = {
    nn.ReLU: lambda m, t: t.relu_(),
    nn.Tanh: lambda m, t: t.tanh_(),
    nn.Sigmoid: lambda m, t: t.sigmoid_(),
    nn.SiLU: lambda m, t: F.silu(t, inplace=True),
    nn.ELU: lambda m, t: F.elu(t, m.alpha, inplace=True),
    nn.LeakyReLU: lambda m, t: F.leaky_relu(t, m.negative_slope, inplace=True),
}
# Elementwise activations without an in-place form: applied out of place.
_ELEMENTWISE = (nn.GELU, nn.Softplus, nn.Mish, nn.Hardswish)


def _is_reshape(m: nn.Module) -> bool:
    from vaelab.nets.common import Reshape

    return isinstance(m, (Reshape, nn.Unflatten, nn.Flatten, nn.Identity))


def mlp_plan(decoder: nn.Module) -> list[nn.Module] | None:
    """The compute layers of an MLP decoder (Linear layers and elementwise activations, ending
    in a Linear, optionally followed by reshapes), or None if ``decoder`` is anything else."""
    if not isinstance(decoder, nn.Sequential):
        return None
    layers = [m for m in decoder if not isinstance(m, nn.Dropout)]  # dropout: identity in eval
    while layers and _is_reshape(layers[-1]):
        layers.pop()
    if not layers or not isinstance(layers[-1], nn.Linear):
        return None
    for m in layers:
        if not (isinstance(m, nn.Linear) or type(m) in _IN_PLACE or isinstance(m, _ELEMENTWISE)):
            return None
    return layers


class _AugmentedMLP:
    """An MLP decoder run as bias-free matrix products into buffers reused call after call.

    Each layer's input buffer carries an extra column of ones and each weight an extra column
    holding the bias, so [h, 1] [W, b]^T = h W^T + b is one ``mm`` (no bias broadcast pass),
    activations run in place on the buffer, and nothing is allocated per chunk.
    """

    def __init__(self, layers: list[nn.Module]) -> None:
        self.steps: list[tuple[str, object]] = []
        self.widths = [layers[0].in_features]  # width of each Linear's input buffer (w/o ones)
        for m in layers:
            if isinstance(m, nn.Linear):
                bias = m.bias if m.bias is not None else m.weight.new_zeros(m.out_features)
                self.steps.append(("linear", torch.cat([m.weight, bias.unsqueeze(1)], 1)))
                self.widths.append(m.out_features)
            else:
                self.steps.append(("act", m))
        self.w_last = self.steps[-1][1]  # (D, H + 1)
        self._bufs: list[torch.Tensor] = []
        # Linear + ReLU first: one C kernel pass (vaelab/csrc/mlp.c) instead of a product and
        # a ReLU pass; with one hidden layer it also yields x . logits (see __call__).
        self.first = None
        if (
            len(self.steps) > 2
            and self.steps[0][0] == "linear"
            and type(self.steps[1][1]) is nn.ReLU
        ):
            first = layers[0]
            bias = (
                first.bias if first.bias is not None else first.weight.new_zeros(first.out_features)
            )
            self.first = (first.weight.detach().t().contiguous(), bias.detach().contiguous())

    def buffers(self, rows: int) -> list[torch.Tensor]:
        """Input buffers (rows, width + 1) with a ones column, then the output (rows, D)."""
        if not self._bufs or self._bufs[0].shape[0] < rows:
            w = self.w_last
            self._bufs = [w.new_ones(rows, c + 1) for c in self.widths[:-1]]
            self._bufs.append(w.new_empty(rows, self.widths[-1]))
        return [b[:rows] for b in self._bufs]

    def latents(self, b: int, n: int) -> torch.Tensor:
        """A (b, n, Z) view of the input buffer to write latents into."""
        return self.buffers(b * n)[0][:, :-1].view(b, n, -1)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Per image (B, H + 1): [W^T (x - 1/2), b . (x - 1/2)], so that (x - 1/2) . logits
        = [h, 1] . this (the last layer folded into a matrix-vector product)."""
        return (x.flatten(1) - 0.5) @ self.w_last

    def __call__(self, z: torch.Tensor, x: torch.Tensor, aux: torch.Tensor | None) -> torch.Tensor:
        b, n, zdim = z.shape
        bufs = self.buffers(b * n)
        if z.data_ptr() != bufs[0].data_ptr():
            bufs[0][:, :-1].copy_(z.reshape(b * n, zdim))
        v = self.prepare(x) if aux is None else aux
        i, t, start, x_dot = 0, bufs[0], 0, None
        kernel = None if self.first is None else vaelab_native.linear_relu(bufs[0], v, *self.first)
        if kernel is not None:  # first Linear + ReLU in one pass; one hidden layer: x . logits too
            wt, bias = self.first
            if len(self.steps) == 3:
                x_dot = v.new_empty(b, n)
            kernel(
                bufs[0].data_ptr(), zdim + 1, b * n, wt.data_ptr(), bias.data_ptr(), zdim,
                wt.shape[1], bufs[1].data_ptr(),
                None if x_dot is None else v.data_ptr(), n,
                None if x_dot is None else x_dot.data_ptr(),
            )  # fmt: skip
            i, t, start = 1, bufs[1][:, :-1], 2
        for kind, op in self.steps[start:-1]:
            if kind == "linear":
                i += 1
                t = torch.mm(bufs[i - 1], op.t(), out=bufs[i][:, :-1])
            elif type(op) in _IN_PLACE:
                _IN_PLACE[type(op)](op, t)
            else:
                t.copy_(op(t))
        h = bufs[-2]  # (rows, H + 1), ones column included
        if x_dot is None:
            x_dot = torch.bmm(h.view(b, n, -1), v.unsqueeze(-1)).squeeze(-1)  # (b, n)
        logits = torch.mm(h, self.w_last.t(), out=bufs[-1])
        return bernoulli_log_prob(logits.view(b, n, -1), x.reshape(b, -1), x_dot)


class LogLikelihoodRunner:
    """Computes log p(x|z) (B, n) for latents z (B, n, Z), reusing buffers between calls.

    Not thread-safe: one runner per thread. ``latents(b, n)`` gives a tensor to write z into
    (saving a copy on the MLP path); ``prepare(x)`` precomputes per-image terms for a whole
    batch at once (pass slices of it as ``aux``).
    """

    FUSED = ("auto", "bernoulli", "none")

    def __init__(self, model: nn.Module, dtype: torch.dtype, fused: str = "auto") -> None:
        """``fused``: ``"auto"`` (the fastest path that applies), ``"bernoulli"`` (no MLP
        buffers) or ``"none"`` (the generic path; for cross-checks)."""
        from vaelab.likelihoods import Bernoulli

        if fused not in self.FUSED:
            raise ValueError(f"fused must be one of {self.FUSED}, got {fused!r}")
        self.model = model
        self.bernoulli = (
            fused != "none"
            and type(model.likelihood) is Bernoulli
            and dtype in (torch.float32, torch.float64)
        )
        plan = mlp_plan(model.decoder) if self.bernoulli and fused == "auto" else None
        self.mlp = None if plan is None else _AugmentedMLP(plan)

    @property
    def path(self) -> str:
        """Which path runs: ``"mlp-fused"``, ``"bernoulli-fused"`` or ``"generic"``."""
        if self.mlp is not None:
            return "mlp-fused"
        return "bernoulli-fused" if self.bernoulli else "generic"

    def latents(self, b: int, n: int, zdim: int, like: torch.Tensor) -> torch.Tensor:
        if self.mlp is not None:
            return self.mlp.latents(b, n)
        return like.new_empty(b, n, zdim)

    def prepare(self, x: torch.Tensor) -> torch.Tensor | None:
        return None if self.mlp is None else self.mlp.prepare(x)

    def __call__(
        self, z: torch.Tensor, x: torch.Tensor, aux: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.mlp is not None:
            return self.mlp(z, x, aux)
        b, n, zdim = z.shape
        raw = self.model.decoder(z.reshape(b * n, zdim))
        if self.bernoulli:
            return bernoulli_log_prob(raw.reshape(b, n, -1), x.reshape(b, -1))
        x_rep = x.unsqueeze(1).expand(b, n, *x.shape[1:]).reshape(b * n, *x.shape[1:])
        return self.model.likelihood(raw).log_prob(x_rep).view(b, n)
