"""Pieces shared by the architecture families."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vaelab import native
from vaelab.registry import Registry

ARCHITECTURES: Registry = Registry("architecture")

_ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "softplus": nn.Softplus,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
}


def activation(name: str) -> nn.Module:
    """A fresh activation module by name (relu, gelu, tanh, softplus, silu, elu, leaky_relu)."""
    try:
        return _ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; choose one of: {', '.join(sorted(_ACTIVATIONS))}"
        ) from None


class GaussianHeads(nn.Module):
    """One linear layer giving (mu, logvar), each (B, Z), from features (B, F)."""

    def __init__(self, in_features: int, latent_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, 2 * latent_dim)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.linear(h).chunk(2, dim=-1)
        return mu, logvar


def padded_size(size: int, factor: int) -> int:
    """The smallest multiple of ``factor`` that is >= ``size``."""
    return int(math.ceil(size / factor) * factor)


class PadTo(nn.Module):
    """Zero-pad (B, C, H, W) symmetrically to (B, C, h, w)."""

    def __init__(self, h: int, w: int) -> None:
        super().__init__()
        self.h, self.w = h, w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dh, dw = self.h - x.shape[-2], self.w - x.shape[-1]
        if dh == 0 and dw == 0:
            return x
        return F.pad(x, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2))


class CropTo(nn.Module):
    """Centre-crop (B, C, H', W') to (B, C, h, w) (undoes :class:`PadTo`)."""

    def __init__(self, h: int, w: int) -> None:
        super().__init__()
        self.h, self.w = h, w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dh, dw = x.shape[-2] - self.h, x.shape[-1] - self.w
        if dh == 0 and dw == 0:
            return x
        return x[..., dh // 2 : dh // 2 + self.h, dw // 2 : dw // 2 + self.w]


class Reshape(nn.Module):
    """(B, prod(shape)) -> (B, *shape)."""

    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], *self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


def _dense(x: torch.Tensor) -> bool:
    """Whether x's elements fill its memory with no gaps or overlaps (NCHW or NHWC order)."""
    return x.is_contiguous() or (
        x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
    )


class _NativeDropout(torch.autograd.Function):
    """Dropout by ``csrc/dropout.c``. The mask is kept as one bit per element (a uint16 per 16
    elements, in x's memory order); the backward pass applies it with the same scale."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, kernel) -> torch.Tensor:
        out = torch.empty_like(x)  # x's strides: empty_like preserves a dense layout
        n = x.numel()
        mask = torch.empty((n + 15) // 16, dtype=torch.int16)
        seed = int(torch.randint(0, 2**62, (1,)).item())  # torch's generator: seeded runs repeat
        keep = min(round((1.0 - p) * 2.0**32), 2**32 - 1)
        ctx.scale = 1.0 / (1.0 - p)
        kernel(x.data_ptr(), n, seed, keep, ctx.scale, out.data_ptr(), mask.data_ptr())
        ctx.save_for_backward(mask)
        ctx.shape, ctx.stride = x.shape, x.stride()
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        if grad.stride() != ctx.stride:  # e.g. an expanded or differently laid out gradient
            grad = torch.empty_strided(ctx.shape, ctx.stride, dtype=grad.dtype).copy_(grad)
        out = torch.empty_like(grad)
        native.dropout_kernel(grad.dtype, apply=True)(
            grad.data_ptr(), grad.numel(), mask.data_ptr(), ctx.scale, out.data_ptr()
        )
        return out, None, None


class Dropout(nn.Dropout):
    """:class:`torch.nn.Dropout` (same arguments, state and behaviour) whose training pass on
    CPU float32/bfloat16 tensors runs ``csrc/dropout.c``: the keep/drop draw, scaling and a
    1-bit mask in one pass: forwards and backwards 10-14x faster than torch's CPU dropout (a
    128x32x28x28 batch: 2.1 against 29 ms on the machine of docs/benchmarks.md, whose
    ``benchmarks/bench_layers.py`` measures it). Each element is kept with probability
    1 - p from a counter-based draw seeded by torch's generator, so ``torch.manual_seed`` makes
    runs repeat; the masks differ from torch's own. Elsewhere (CUDA, other dtypes, in-place,
    under torch.compile, no C compiler) it is torch's dropout."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self.training
            and 0.0 < self.p < 1.0
            and not self.inplace
            and x.device.type == "cpu"
            and _dense(x)
            and not torch.compiler.is_compiling()
            and (kernel := native.dropout_kernel(x.dtype)) is not None
        ):
            return _NativeDropout.apply(x, self.p, kernel)
        return super().forward(x)


# ------------------------------------------------------------------ batch norm + ReLU


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


class _NativeBatchNormReLU(torch.autograd.Function):
    """relu(batch_norm(x)) with batch statistics by ``csrc/batchnorm.c`` (x channels-last); also
    returns the batch mean and biased variance (for the running statistics; no gradient)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float, kernels):
        c = x.shape[1]
        bf16 = int(x.dtype == torch.bfloat16)
        y = torch.empty_like(x)
        mean, var, invstd = torch.empty(c), torch.empty(c), torch.empty(c)
        rc = kernels[0](
            bf16, x.data_ptr(), x.numel() // c, c, _ptr(weight), _ptr(bias), eps, y.data_ptr(),
            mean.data_ptr(), var.data_ptr(), invstd.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        if rc != 0:
            raise MemoryError("csrc/batchnorm.c: out of memory")
        ctx.bf16, ctx.kernels = bf16, kernels
        ctx.save_for_backward(x, weight, bias, mean, invstd)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, _mean, _var):
        x, weight, bias, mean, invstd = ctx.saved_tensors
        c = x.shape[1]
        if gy.dtype != x.dtype or gy.stride() != x.stride():
            gy = torch.empty_like(x).copy_(gy)  # x's layout (channels-last) and dtype
        dx = torch.empty_like(x) if ctx.needs_input_grad[0] else None
        dgamma = torch.empty(c) if weight is not None and ctx.needs_input_grad[1] else None
        dbeta = torch.empty(c) if bias is not None and ctx.needs_input_grad[2] else None
        rc = ctx.kernels[1](
            ctx.bf16, x.data_ptr(), gy.data_ptr(), x.numel() // c, c, _ptr(weight), _ptr(bias),
            mean.data_ptr(), invstd.data_ptr(), _ptr(dx), _ptr(dgamma), _ptr(dbeta),
            torch.get_num_threads(),
        )  # fmt: skip
        if rc != 0:
            raise MemoryError("csrc/batchnorm.c: out of memory")
        return dx, dgamma, dbeta, None, None


class BatchNormReLU2d(nn.BatchNorm2d):
    """:class:`torch.nn.BatchNorm2d` followed by ReLU, in one layer (same arguments and state:
    checkpoints load either way). On the CPU, with batch statistics (training), float32 or
    bfloat16 input and a multiple of 16 channels, ``csrc/batchnorm.c`` normalises and applies
    the ReLU in three passes forwards and two backwards, shared by torch's threads (numbers in
    docs/benchmarks.md, ``benchmarks/bench_layers.py --part batchnorm``). Elsewhere (CUDA,
    evaluation with running statistics, other dtypes) it is ``relu(BatchNorm2d(x))``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            (self.training or self.running_mean is None)
            and x.device.type == "cpu"
            and x.dim() == 4
            and x.dtype in (torch.float32, torch.bfloat16)
            and x.shape[1] % 16 == 0
            and x.numel() > x.shape[1]  # one value a channel: torch's error
            and (self.weight is None or self.weight.dtype == torch.float32)
            and not torch.compiler.is_compiling()
            and (kernels := native.batchnorm_relu_kernels()) is not None
        ):
            x = x.contiguous(memory_format=torch.channels_last)
            y, mean, var = _NativeBatchNormReLU.apply(x, self.weight, self.bias, self.eps, kernels)
            if self.training and self.track_running_stats:
                with torch.no_grad():
                    self.num_batches_tracked.add_(1)
                    if self.momentum is None:  # cumulative average, as torch's
                        factor = 1.0 / float(self.num_batches_tracked)
                    else:
                        factor = self.momentum
                    n = x.numel() // x.shape[1]
                    self.running_mean.lerp_(mean, factor)
                    self.running_var.lerp_(var * (n / (n - 1)), factor)
            return y
        return F.relu(super().forward(x))


def norm_activation(channels: int, act: str, batch_norm: bool) -> list[nn.Module]:
    """The modules after a convolution: batch norm + activation, or the activation alone.
    With ReLU the pair is one :class:`BatchNormReLU2d` and an ``nn.Identity`` that keeps the
    layer indices (so the state-dict keys) of the two-module form."""
    if not batch_norm:
        return [activation(act)]
    if act == "relu":
        return [BatchNormReLU2d(channels), nn.Identity()]
    return [nn.BatchNorm2d(channels), activation(act)]


# ------------------------------------------------------------------ convolutions


def columns(x: torch.Tensor, kernel, stride, padding, out_size) -> torch.Tensor:
    """im2col: the (N * Ho * Wo, kh * kw * C) matrix whose row (n, oy, ox), column (ky, kx, c)
    is x[n, c, oy * sh + ky - ph, ox * sw + kx - pw] (0 outside x), for x (N, C, H, W) in any
    layout and the output size (Ho, Wo) of a convolution of x with that kernel, stride and
    padding. Its product with a (kh * kw * C, C') matrix is that convolution. Channels-last
    CPU batches are gathered by ``csrc/im2col.c`` in one pass."""
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw), (ho, wo) = kernel, stride, padding, out_size
    if (
        x.device.type == "cpu"
        and x.is_contiguous(memory_format=torch.channels_last)
        and (kernel_fn := native.im2col_kernel()) is not None
    ):
        cols = torch.empty(n * ho * wo, kh * kw * c, dtype=x.dtype)
        kernel_fn(
            x.data_ptr(), n, h, w, c * x.element_size(), kh, kw, sh, sw, ph, pw, ho, wo,
            cols.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        return cols
    xp = F.pad(
        x.permute(0, 2, 3, 1),
        (0, 0, pw, (wo - 1) * sw + kw - pw - w, ph, (ho - 1) * sh + kh - ph - h),
    )
    s = xp.stride()
    view = xp.as_strided(
        (n, ho, wo, kh, kw, c),
        (s[0], sh * s[1], sw * s[2], s[1], s[2], s[3]),
        xp.storage_offset(),
    )
    return view.reshape(n * ho * wo, kh * kw * c)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N * H * W, C), a view when t is channels-last."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


class _GemmConv(torch.autograd.Function):
    """A convolution (or transposed convolution) whose forward pass and input gradient are
    torch's (oneDNN on the CPU) and whose weight gradient is one matrix product: the rows of
    the smaller side (output of a convolution, input of a transposed one) against the im2col
    columns of the larger side."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        ctx.transposed = isinstance(layer, nn.ConvTranspose2d)
        ctx.stride, ctx.padding = layer.stride, layer.padding
        ctx.output_padding = layer.output_padding if ctx.transposed else (0, 0)
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)
        if ctx.transposed:
            return F.conv_transpose2d(
                x, weight, bias, layer.stride, layer.padding, layer.output_padding
            )
        return F.conv2d(x, weight, bias, layer.stride, layer.padding)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.ops.aten.convolution_backward(
                gy, x, weight, None, ctx.stride, ctx.padding, (1, 1), ctx.transposed,
                ctx.output_padding, 1, (True, False, False),
            )[0]  # fmt: skip
        if ctx.needs_input_grad[1]:
            # weight (C_out, C_in, kh, kw) of a convolution: rows of gy, columns of x;
            # weight (C_in, C_out, kh, kw) of a transposed one: rows of x, columns of gy.
            small, large = (x, gy) if ctx.transposed else (gy, x)
            kernel = weight.shape[2:]
            cols = columns(large, kernel, ctx.stride, ctx.padding, small.shape[2:])
            a, b = weight.shape[:2]
            gw = (_as_rows(small).t() @ cols).view(a, *kernel, b).permute(0, 3, 1, 2)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy.sum((0, 2, 3))
        return gx, gw, gb, None


class _FewChannelConvTranspose(torch.autograd.Function):
    """A float32 transposed convolution to at most 4 channels (a decoder's output layer: grey
    levels or RGB), forward and backward in ``csrc/convt.c``. Where the kernel cannot run (out
    of memory) torch's own computes the same."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer, kernels):
        x = x.contiguous(memory_format=torch.channels_last)
        n, ci, hi, wi = x.shape
        _, co, kh, kw = weight.shape
        (sh, sw), (ph, pw) = layer.stride, layer.padding
        ho = (hi - 1) * sh - 2 * ph + kh + layer.output_padding[0]
        wo = (wi - 1) * sw - 2 * pw + kw + layer.output_padding[1]
        taps = kh * kw * co
        ctx.width = -(-taps // 16) * 16  # taps padded to whole vectors of 16
        w = weight.new_zeros(ci, ctx.width)
        w[:, :taps] = weight.detach().permute(0, 2, 3, 1).reshape(ci, taps)
        y = torch.empty((n, co, ho, wo), memory_format=torch.channels_last)
        geometry = (co, kh, kw, sh, sw, ph, pw, ho, wo)
        ctx.args = (layer.stride, layer.padding, (1, 1), True, layer.output_padding, 1)
        ctx.geometry, ctx.kernels = geometry, kernels
        ctx.save_for_backward(x, weight)
        status = kernels[0](
            x.data_ptr(), n, hi, wi, ci, w.data_ptr(), *geometry,
            _ptr(None if bias is None else bias.detach().contiguous()), y.data_ptr(),
            torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            return F.conv_transpose2d(x, weight, bias, *ctx.args[:2], layer.output_padding)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        x, weight = ctx.saved_tensors
        want_x, want_w, want_b = ctx.needs_input_grad[:3]
        n, ci, hi, wi = x.shape
        co, kh, kw = ctx.geometry[:3]
        taps = kh * kw * co
        gx = torch.empty_like(x) if want_x else None  # x is channels-last
        gw = x.new_empty(ci, ctx.width) if want_w else None
        wg = weight.detach().permute(2, 3, 1, 0).reshape(taps, ci).contiguous()
        strides = torch.tensor(gy.stride(), dtype=torch.int64)
        status = ctx.kernels[1](
            x.data_ptr(), gy.data_ptr(), strides.data_ptr(), n, hi, wi, ci, wg.data_ptr(),
            *ctx.geometry, _ptr(gx), _ptr(gw), torch.get_num_threads(),
        )  # fmt: skip
        if status != 0:
            gx, gw, gb = torch.ops.aten.convolution_backward(
                gy, x, weight, [co], *ctx.args, (want_x, want_w, want_b)
            )
            return gx, gw, gb, None, None
        if gw is not None:  # (ci, kh, kw, co) -> torch's (ci, co, kh, kw)
            gw = gw[:, :taps].view(ci, kh, kw, co).permute(0, 3, 1, 2)
        gb = gy.sum((0, 2, 3)) if want_b else None
        return gx, gw, gb, None, None


def _fast_conv(layer, x: torch.Tensor) -> torch.Tensor | None:
    """``layer(x)`` by :class:`_FewChannelConvTranspose` or :class:`_GemmConv` where one of
    them is the faster way on this CPU (see :class:`Conv2d`), else None (torch's own)."""
    if not (
        x.device.type == "cpu"
        and x.dim() == 4
        and layer.groups == 1
        and tuple(layer.dilation) == (1, 1)
        and layer.padding_mode == "zeros"
        and not isinstance(layer.padding, str)
        and not torch.compiler.is_compiling()
    ):
        return None
    transposed = isinstance(layer, nn.ConvTranspose2d)
    autocast = torch.is_autocast_enabled("cpu")
    if (
        transposed
        and not autocast
        and layer.out_channels <= 4
        and layer.in_channels % 16 == 0
        and x.dtype == layer.weight.dtype == torch.float32
        and layer.kernel_size[0] * layer.kernel_size[1] * layer.out_channels <= 128
        and (forward := native.convt_forward()) is not None
        and (backward := native.convt_backward()) is not None
    ):
        kernels = (forward, backward)
        return _FewChannelConvTranspose.apply(x, layer.weight, layer.bias, layer, kernels)
    if not (torch.is_grad_enabled() and layer.weight.requires_grad):
        return None
    # Where the product wins (benchmarks/bench_layers.py --part conv): bfloat16 only (oneDNN's
    # float32 weight gradient is as fast), strided layers (the resnet network's stride-1 3x3
    # convolutions, 9x larger columns, trained 1.27x slower), transposed layers to 8+ channels
    # and convolutions from 64+ channels (from 32: 0.8-1.0x; from 1-3: ~0.5x).
    if not autocast and layer.weight.dtype != x.dtype:
        return None  # torch's error
    dtype = torch.get_autocast_dtype("cpu") if autocast else x.dtype
    wide = layer.out_channels >= 8 if transposed else layer.in_channels >= 64
    if not (wide and dtype == torch.bfloat16 and tuple(layer.stride) != (1, 1)):
        return None
    w, b = layer.weight.to(dtype), layer.bias
    x, b = x.to(dtype), None if b is None else b.to(dtype)
    with torch.autocast("cpu", enabled=False):
        return _GemmConv.apply(x, w, b, layer)


class Conv2d(nn.Conv2d):
    """:class:`torch.nn.Conv2d` (same arguments, state and results) whose training pass on
    the CPU in bfloat16 (autocast) computes the weight gradient as one matrix product: the
    output gradient's rows against the input's im2col columns (``csrc/im2col.c``). oneDNN's
    bfloat16 weight gradient is its slow part: 3.5 against 1.3 ms for the dcgan network's
    128 -> 256 channel layer at batch 128 (``benchmarks/bench_layers.py --part conv``).
    Float32 layers, stride-1 layers, convolutions from fewer than 64 channels (where oneDNN's
    own is as fast), CUDA, torch.compile and inference are torch's own."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _fast_conv(self, x)
        return super().forward(x) if y is None else y


class ConvTranspose2d(nn.ConvTranspose2d):
    """:class:`torch.nn.ConvTranspose2d` (same arguments, state and results), faster on the
    CPU in two cases: in bfloat16 training of a strided layer to 8+ channels the weight gradient
    is one matrix product (as :class:`Conv2d`'s, with the im2col columns of the output
    gradient); a float32 layer to at most 4 channels from a multiple of 16, with at most 128
    (kernel position, output channel) pairs (a decoder's output layer, which vaelab keeps in
    float32 under bf16 autocast), runs forward and backward in ``csrc/convt.c``: forward +
    backward on two threads 1.0 against 4.3 ms for the dcgan network's 32 -> 1 layer at batch
    128 (MNIST), 13.7 against 18.6 ms for its 32 -> 3 layer (3x64x64), 2.5 against 6.4 ms for
    the conv network's 3x3 32 -> 1 layer (``benchmarks/bench_layers.py --part conv``).
    Elsewhere, and with ``output_size``, torch's own."""

    def forward(self, x: torch.Tensor, output_size=None) -> torch.Tensor:
        y = None if output_size is not None else _fast_conv(self, x)
        return super().forward(x, output_size) if y is None else y
