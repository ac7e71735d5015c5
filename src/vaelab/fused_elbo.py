"""The ELBO of an MLP VAE with a hand-written backward pass: one autograd node per step.

For the most common VAE -- vaelab's ``mlp`` encoder and decoder (Linear layers with ReLU or tanh
between them), a Bernoulli likelihood and the ELBO objective (L samples, beta or a
warm-up, closed-form KL) -- a training step's matrix products are all that must cost time. Run
through autograd, the same step also pays for about a hundred small operations and graph
nodes, which on a CPU at batch 128 take as long as a third of the products. :class:`FusedElbo`
computes the forward pass with a few fused operations and the gradient of every weight in
one ``backward`` written out by hand:

    dlogits = (sigmoid(l) - x) / (B L)                         (Bernoulli on logits)
    through each Linear: dW = dY^T X, db = sum dY, dX = dY W, then the activation's derivative
    dz -> dmu = sum_L dz + beta mu / B,  dlogvar = sum_L dz eps sigma / 2 + beta (sigma^2 - 1) / 2B

It returns the same :class:`~vaelab.objectives.ObjectiveOutput` as
:func:`vaelab.objectives.elbo` for the same noise (tested to float rounding), so training
uses it transparently (``train.fused = true``, the default). On the CPU in float32 the
Bernoulli term and its gradient come from one pass of a C kernel (:mod:`vaelab.native`) when
a C compiler is present. :func:`fused_elbo_for` says whether a model and objective qualify;
anything else runs through autograd as before. With ``compute_dtype=torch.bfloat16``
(``train.bf16``) the products run in bfloat16 on rounded copies of the weights, while the
latents, the KL, the Bernoulli term and the weights' gradients stay float32. There, a ReLU
first layer whose batch is mostly zeros (MNIST: 81% of the pixels) is computed by
``csrc/sparse.c`` (:class:`vaelab.native.SparseFirstLayer`), forward product and weight
gradient, skipping the pairs of inputs that are both 0 -- the same bf16 products in another
summation order (see :data:`SPARSE_MAX_DENSITY`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vaelab import native
from vaelab.objectives import ObjectiveOutput, capacity_schedule

# Activations whose derivative follows from their output y.
_ACTS = (nn.ReLU, nn.Tanh)
# Batches with at most this share of non-zero inputs take the sparse first layer (bf16 only;
# csrc/sparse.c). Its cost grows with the pairs of neighbouring inputs not both 0. Measured for
# the 784-400 layer at batch 128, 2 threads (forward, weight gradient and the weight's
# rearrangement against the dense bf16 products and casts): MNIST (19% non-zero, clustered)
# 0.55-0.65; zeros scattered at random, 10/20/30/40% non-zero: 0.46/0.72/0.89/1.07.
SPARSE_MAX_DENSITY = 0.35


def _act_forward(kind: type, t: torch.Tensor) -> torch.Tensor:
    return t.relu_() if kind is nn.ReLU else t.tanh_()


def _act_backward(kind: type, grad: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """d(loss)/d(pre-activation) from d(loss)/dy and the activation's output y."""
    if kind is nn.ReLU:
        return torch.ops.aten.threshold_backward(grad, y, 0)
    return torch.ops.aten.tanh_backward(grad, y)


def _linear_plan(layers: list[nn.Module]) -> list[tuple[nn.Linear, type | None]] | None:
    """[(Linear, activation type or None)] for Linear (act Linear)* sequences, else None."""
    plan: list[tuple[nn.Linear, type | None]] = []
    for m in layers:
        if isinstance(m, nn.Linear):
            plan.append((m, None))
        elif type(m) in _ACTS and plan and plan[-1][1] is None:
            plan[-1] = (plan[-1][0], type(m))
        else:
            return None
    return plan or None


def fused_elbo_for(
    model: nn.Module, objective, compute_dtype: torch.dtype = torch.float32
) -> FusedElbo | None:
    """A :class:`FusedElbo` for ``model`` under ``objective`` (an ObjectiveConfig), or None.

    ``compute_dtype=torch.bfloat16`` runs the matrix products in bfloat16 (see
    :class:`FusedElbo`).

    Qualifies: a :class:`~vaelab.model.VAE` with vaelab's MLP encoder (Flatten, then Linear +
    ReLU/tanh layers, no dropout, one linear Gaussian head) and an MLP decoder (Linear
    layers with those activations, the last without, then a reshape), the Bernoulli
    likelihood, and the ``elbo`` objective (closed-form KL) without capacity or free bits.
    Everything else returns None (the autograd path).
    """
    from vaelab.likelihoods import Bernoulli
    from vaelab.nets.common import GaussianHeads, Reshape
    from vaelab.nets.mlp import MLPEncoder

    if objective.name != "elbo" or objective.free_bits > 0:
        return None
    if capacity_schedule(0, objective) is not None:
        return None
    if type(getattr(model, "likelihood", None)) is not Bernoulli:
        return None
    enc, dec = getattr(model, "encoder", None), getattr(model, "decoder", None)
    if type(enc) is not MLPEncoder or not isinstance(enc.heads, GaussianHeads):
        return None
    body = list(enc.body)
    if not body or not isinstance(body[0], nn.Flatten):
        return None
    encoder = _linear_plan(body[1:] + [enc.heads.linear]) if len(body) > 1 else None
    if len(body) == 1:
        encoder = [(enc.heads.linear, None)]
    if not isinstance(dec, nn.Sequential):
        return None
    dec_layers = list(dec)
    while dec_layers and isinstance(dec_layers[-1], (Reshape, nn.Unflatten)):
        dec_layers.pop()
    decoder = _linear_plan(dec_layers)
    if encoder is None or decoder is None or encoder[-1][1] is not None:
        return None
    if decoder[-1][1] is not None:
        return None
    return FusedElbo(model, encoder, decoder, compute_dtype)


class FusedElbo:
    """Calls :class:`_FusedElboFunction` with a model's weights; see the module docstring.

    ``compute_dtype`` is the dtype of the matrix products and the activations between them:
    float32 (the default), or bfloat16 for mixed precision -- each step rounds a copy of the
    float32 weights to bfloat16, runs every product in bfloat16 (float32 accumulation inside
    oneDNN/cuBLAS), and hands back float32 gradients; the latent variables, the KL, the
    Bernoulli term and its gradient stay float32. Only where bf16 arithmetic is native (see
    :func:`vaelab.devices.native_bf16`) is this faster.
    """

    def __init__(
        self,
        model: nn.Module,
        encoder: list,
        decoder: list,
        compute_dtype: torch.dtype = torch.float32,
    ) -> None:
        if compute_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(
                f"FusedElbo: compute_dtype must be float32 or bfloat16, not {compute_dtype}"
            )
        self.model = model
        self.compute_dtype = compute_dtype
        self.acts = tuple(a for _, a in encoder) + tuple(a for _, a in decoder)
        self.n_enc = len(encoder)
        self.params: list[torch.Tensor] = []
        for lin, _ in encoder + decoder:
            if lin.bias is None:
                raise ValueError("FusedElbo needs Linear layers with biases")
            self.params += [lin.weight, lin.bias]
        # bf16: the weights' rounded copies, re-rounded before every step into the same
        # buffers (torch's fused Adam updates weights without moving their version counters,
        # so "changed since last time" cannot be told cheaply; rounding is ~0.1 ms a step).
        self.lowp = compute_dtype != torch.float32
        self.copies: list[torch.Tensor] = []
        # bf16 with a ReLU first layer: batches that are mostly zeros (MNIST: 81% of the
        # pixels) take csrc/sparse.c's first layer, which skips the zero inputs
        self.sparse = None
        first = encoder[0][0]
        if self.lowp and encoder[0][1] is nn.ReLU and len(encoder) > 1:
            kernels = native.sparse_first_layer()
            if kernels is not None and kernels.fits(first.in_features, first.out_features):
                self.sparse = kernels
        self.sparse_now = False  # this step's choice (see __call__)
        self.calls = self.sparse_calls = 0  # steps taken, and of those with the sparse layer
        self.pairs: torch.Tensor | None = None  # the first layer's weight as kernels.pairs
        self.scratch: torch.Tensor | None = None

    def _sparse_batch(self, xf: torch.Tensor) -> bool:
        """Whether this batch (B, K) takes the sparse first layer: float32 on the CPU, at most
        :data:`SPARSE_MAX_DENSITY` of its inputs not 0."""
        if self.sparse is None or xf.device.type != "cpu" or xf.dtype != torch.float32:
            return False
        w = self.params[0]
        if not (xf.is_contiguous() and w.is_contiguous()) or xf.shape[1] != w.shape[1]:
            return False
        return self.sparse.count_nonzero(xf) <= SPARSE_MAX_DENSITY * xf.numel()

    def refresh_copies(self) -> list[torch.Tensor]:
        """The weights rounded to bfloat16 now (in the same buffers each time); on a sparse
        step the first layer's weight goes to :attr:`pairs` instead of its copy."""
        if not self.copies:
            self.copies = [p.detach().to(self.compute_dtype) for p in self.params]
        else:  # one foreach call: ~5 us a tensor less than a copy_ each
            first = 1 if self.sparse_now else 0
            torch._foreach_copy_(self.copies[first:], [p.detach() for p in self.params[first:]])
        if self.sparse_now:
            w = self.params[0].detach()
            if self.pairs is None:
                self.pairs = torch.empty(w.shape[1] // 2, w.shape[0], dtype=torch.int32)
            self.sparse.pairs(w, self.pairs, torch.get_num_threads())
        return self.copies

    def __call__(
        self, x: torch.Tensor, eps: torch.Tensor, beta: float | torch.Tensor = 1.0
    ) -> ObjectiveOutput:
        """The ELBO objective for images x (B, C, H, W) and noise eps (L, B, Z), as
        :func:`vaelab.objectives.elbo` with the same arguments computes it."""
        beta_t = torch.as_tensor(beta, dtype=x.dtype, device=x.device)
        if self.lowp:
            self.sparse_now = self._sparse_batch(x.reshape(x.shape[0], -1))
            self.sparse_calls += self.sparse_now
            self.refresh_copies()
        self.calls += 1
        loss, elbo, log_px_z, kl, kl_per_dim = _FusedElboFunction.apply(
            x, eps, beta_t, self.acts, self.n_enc, self, *self.params
        )
        return ObjectiveOutput(loss, elbo, log_px_z, kl, kl_per_dim, elbo, beta)


class _FusedElboFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, eps, beta, acts, n_enc, owner, *params):
        b = x.shape[0]
        n_samples, _, zdim = eps.shape
        xf = x.reshape(b, -1)
        lowp, cdtype = owner.lowp, owner.compute_dtype
        if lowp:  # bf16 products on the weights' rounded copies
            params = tuple(owner.copies)
        weights, biases = params[0::2], params[1::2]
        sparse = owner.sparse if lowp and owner.sparse_now else None
        threads = torch.get_num_threads()
        # encoder: activations kept for the backward pass
        h, enc_in = (xf.to(cdtype) if lowp and sparse is None else xf), []
        for i in range(n_enc):
            enc_in.append(h)
            if i == 0 and sparse is not None:  # relu(b + x W^T) over x's non-zero inputs
                out = torch.empty(b, weights[0].shape[0], dtype=cdtype)
                sparse.forward(xf, owner.pairs, owner.params[1].detach(), out, threads)
                h = out
                continue
            h = torch.addmm(biases[i], h, weights[i].t())
            if acts[i] is not None:
                h = _act_forward(acts[i], h)
        # one sample: mu, sigma, z, the KL in one C pass (csrc/gaussian.c)
        gauss = None
        if n_samples == 1 and eps.is_contiguous() and h.is_contiguous():
            gauss = native.gaussian_sample(h, eps)
        if gauss is not None:
            mu, std = torch.empty(b, zdim), torch.empty(b, zdim)
            kl_per_dim, kl = torch.empty(b, zdim), torch.empty(b)
            g = torch.empty(b, zdim, dtype=cdtype)
            gauss(h.data_ptr(), eps.data_ptr(), b, zdim, mu.data_ptr(), std.data_ptr(),
                  kl_per_dim.data_ptr(), kl.data_ptr(), g.data_ptr())  # fmt: skip
            var, dec_in = None, []  # the kernel's backward squares sigma itself
        else:
            if lowp:
                h = h.float()
            mu, logvar = h[:, :zdim], h[:, zdim:]
            std = torch.exp(0.5 * logvar)
            z = torch.addcmul(mu, std, eps).view(n_samples * b, zdim)  # (L*B, Z), sample-major
            g, dec_in = (z.to(cdtype) if lowp else z), []
        for i in range(n_enc, len(weights)):
            dec_in.append(g)
            g = torch.addmm(biases[i], g, weights[i].t())
            if acts[i] is not None:
                g = _act_forward(acts[i], g)
        logits = g.view(n_samples, b, -1)
        kernel16 = native.bernoulli_rows_grad_bf16(logits, xf) if lowp else None
        if lowp and kernel16 is None:
            logits = logits.float()
        kernel = kernel16 if kernel16 is not None else native.bernoulli_rows_grad(logits, xf)
        prescaled = kernel16 is not None  # bf16 gradient / (B L): the backward's dy as it is
        if kernel is not None:  # log p(x|z) and d(-log p)/dl = sigmoid(l) - x in one pass
            dlogits = torch.empty_like(logits)
            log_p = torch.empty(n_samples, b, dtype=xf.dtype, device=xf.device)
            step = b * xf.shape[1] * logits.element_size()
            extra = (1.0 / (b * n_samples),) if prescaled else ()
            for s in range(n_samples):  # x is shared by the L samples
                kernel(
                    logits.data_ptr() + s * step,
                    xf.data_ptr(),
                    b,
                    xf.shape[1],
                    log_p[s].data_ptr(),
                    dlogits.data_ptr() + s * step,
                    *extra,
                )
        else:
            target = xf.expand(n_samples, b, xf.shape[1])
            bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
            log_p, dlogits = -bce.sum(-1), None
        log_px_z = log_p.mean(0) if n_samples > 1 else log_p[0]
        if gauss is None:
            var = std * std
            kl_per_dim = 0.5 * (mu * mu + var - 1.0 - logvar)
            kl = kl_per_dim.sum(-1)
        elbo = log_px_z - kl
        loss = (beta * kl - log_px_z).mean()
        ctx.acts, ctx.n_enc, ctx.lowp = acts, n_enc, lowp
        ctx.sparse, ctx.owner, ctx.gauss = sparse, owner, gauss is not None
        ctx.kernel_grad, ctx.prescaled = dlogits is not None, prescaled
        saved_l = dlogits if dlogits is not None else logits
        ctx.save_for_backward(xf, eps, beta, mu, std, var, saved_l, *enc_in, h, *dec_in, *params)
        ctx.n_in = (len(enc_in), len(dec_in))
        ctx.mark_non_differentiable(elbo, log_px_z, kl, kl_per_dim)
        return loss, elbo, log_px_z, kl, kl_per_dim

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        saved = ctx.saved_tensors
        xf, eps, beta, mu, std, var, saved_l = saved[:7]  # saved_l: dlogits or logits
        n_e, n_d = ctx.n_in
        enc_in = saved[7 : 7 + n_e]
        head = saved[7 + n_e]
        dec_in = saved[8 + n_e : 8 + n_e + n_d]
        params = saved[8 + n_e + n_d :]
        weights = params[0::2]
        acts, n_enc, lowp = ctx.acts, ctx.n_enc, ctx.lowp
        cdtype = weights[0].dtype
        n_samples, b, zdim = eps.shape
        scale = grad_loss / b  # d loss / d (per-image term)
        grads: list[torch.Tensor | None] = [None] * len(params)
        # Bernoulli on logits: d(-log p)/dl = sigmoid(l) - x, averaged over the L samples
        if ctx.prescaled:  # the forward's bf16 kernel already divided by B L
            dy = saved_l if bool(grad_loss == 1) else saved_l * grad_loss.to(saved_l.dtype)
        elif ctx.kernel_grad:  # computed by the forward's kernel
            dy = saved_l * (scale / n_samples)
        else:
            dy = torch.sigmoid(saved_l).sub_(xf).mul_(scale / n_samples)
        dy = dy.view(n_samples * b, -1)
        if lowp:
            dy = dy.to(cdtype)
        outputs = list(dec_in[1:]) + [None]  # output of decoder layer i (its activation's y)
        for j in reversed(range(len(dec_in))):
            i = n_enc + j
            if acts[i] is not None:
                dy = _act_backward(acts[i], dy, outputs[j])
            grads[2 * i] = dy.t() @ dec_in[j]
            grads[2 * i + 1] = dy.sum(0)
            dy = dy @ weights[i]
        sb = scale * beta
        if ctx.gauss:  # the forward's C pass, backwards (the same library: it is loaded)
            grad_head = native.gaussian_sample_grad(cdtype)
            dz, dy = dy.contiguous(), torch.empty(b, 2 * zdim, dtype=cdtype)
            grad_head(dz.data_ptr(), eps.data_ptr(), mu.data_ptr(), std.data_ptr(), b, zdim,
                      float(sb), dy.data_ptr())  # fmt: skip
        else:
            dz = dy.view(n_samples, b, zdim)
            if lowp:
                dz = dz.float()
            dmu = (dz.sum(0) if n_samples > 1 else dz[0]) + sb * mu
            dz_eps = (dz * eps).sum(0) if n_samples > 1 else dz[0] * eps[0]
            dlogvar = dz_eps.mul_(std).mul_(0.5).add_((0.5 * sb) * (var - 1.0))
            dy = torch.cat([dmu, dlogvar], 1)
            if lowp:
                dy = dy.to(cdtype)
        enc_out = list(enc_in[1:]) + [head]
        for i in reversed(range(n_enc)):
            if acts[i] is not None:
                dy = _act_backward(acts[i], dy, enc_out[i])
            if i == 0 and ctx.sparse is not None:  # float32 dW = dy^T x over x's non-zeros
                owner, x0 = ctx.owner, enc_in[0]
                rows = (b + 1) // 2 * dy.shape[1]
                if owner.scratch is None or owner.scratch.numel() < rows:
                    owner.scratch = torch.empty(rows, dtype=torch.int32)
                grads[0] = torch.empty(dy.shape[1], x0.shape[1], dtype=x0.dtype)
                dy = dy.contiguous()
                ctx.sparse.weight_grad(x0, dy, grads[0], owner.scratch, torch.get_num_threads())
                grads[1] = dy.sum(0)
                continue
            grads[2 * i] = dy.t() @ enc_in[i]
            grads[2 * i + 1] = dy.sum(0)
            if i > 0:
                dy = dy @ weights[i]
        if lowp:  # float32 gradients for the float32 weights
            grads = [g.float() for g in grads]
        return (None, None, None, None, None, None, *grads)
