"""GroupNorm (optionally followed by swish) that keeps a channels_last [B, C, H, W] tensor NHWC.

On CUDA, ``F.group_norm`` (and inductor's decomposition of it) views the input as [B, G, -1], which
copies an NHWC tensor to NCHW. Here the statistics are per-channel moments over the H*W positions,
a reduction that reads NHWC in place, pooled within each group (the group variance is the mean of
the channel variances plus the variance of the channel means).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from repae.kernels.scale_shift_swish import affine, at_least_float32, scale_shift_swish
from repae.modules.vae import swish


def is_channels_last(x: Tensor) -> bool:
    """Whether a 4-D tensor is laid out NHWC (and not also NCHW, as tensors with H = W = 1 are)."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


class ChannelMoments(torch.autograd.Function):
    """The variance and mean over H*W of each channel of a channels_last [B, C, H, W] tensor, [B, C]
    each in at least float32. Its backward is element-wise with the saved mean. Autograd's
    ``var_mean`` backward recomputes the mean, a reduction over the whole activation; with the
    norm's other backward reductions in an op of their own (``scale_shift_swish``) the compiled
    backward graph kept it, a pass of its own on the GPU."""

    @staticmethod
    def forward(ctx, x: Tensor) -> tuple[Tensor, Tensor]:
        b, c, h, w = x.shape
        rows = at_least_float32(x).permute(0, 2, 3, 1).reshape(b, h * w, c)
        var, mean = torch.var_mean(rows, dim=1, correction=0)
        ctx.save_for_backward(x, mean)
        return var, mean

    @staticmethod
    def backward(ctx, grad_var: Tensor, grad_mean: Tensor) -> Tensor:
        x, mean = ctx.saved_tensors
        positions = x.shape[2] * x.shape[3]
        centred = at_least_float32(x) - mean[:, :, None, None]
        grad = (2 * grad_var[:, :, None, None] * centred + grad_mean[:, :, None, None]) / positions
        return grad.to(x.dtype)


def group_norm_scale_shift(
    x: Tensor, num_groups: int, weight: Tensor, bias: Tensor, eps: float, input_bias: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """The GroupNorm of a channels_last [B, C, H, W] tensor as one scale and shift per (image,
    channel), [B, C] each in at least float32: ``group_norm(x) = x * scale + shift``.

    ``input_bias`` [C]: normalise ``x + input_bias`` (per channel) without materialising the sum.
    The convolution that produced x leaves its bias to this function, which saves a read and a
    write of the activation: a per-channel constant moves the channel means, not their variances.
    """
    b, c, h, w = x.shape
    channel_var, channel_mean = ChannelMoments.apply(x)
    dtype = channel_mean.dtype
    input_bias = 0.0 if input_bias is None else input_bias.to(dtype)
    channel_mean = channel_mean + input_bias
    channel_var, channel_mean = channel_var.view(b, num_groups, -1), channel_mean.view(b, num_groups, -1)
    mean = channel_mean.mean(dim=2, keepdim=True)
    var = channel_var.mean(dim=2, keepdim=True) + channel_mean.var(dim=2, correction=0, keepdim=True)
    scale = (torch.rsqrt(var + eps) * weight.to(dtype).view(num_groups, -1)).view(b, c)
    shift = bias.to(dtype) + input_bias * scale - (mean * scale.view(b, num_groups, -1)).view(b, c)
    return scale, shift


def group_norm_channels_last(
    x: Tensor, num_groups: int, weight: Tensor, bias: Tensor, eps: float, input_bias: Tensor | None = None
) -> Tensor:
    """``F.group_norm`` for a channels_last [B, C, H, W] tensor, returned channels_last: the scale and
    shift of ``group_norm_scale_shift`` applied element-wise, an op that keeps the NHWC layout and
    that torch.compile fuses with the cast feeding the next convolution. Computed in at least
    float32; returned in float32 under CUDA autocast (which runs group_norm in float32), otherwise
    in x's dtype, as ``F.group_norm``."""
    scale, shift = group_norm_scale_shift(x, num_groups, weight, bias, eps, input_bias)
    out = affine(x, scale, shift)
    return out if x.is_cuda and torch.is_autocast_enabled("cuda") else out.to(x.dtype)


def group_norm_swish_channels_last(
    x: Tensor, num_groups: int, weight: Tensor, bias: Tensor, eps: float, input_bias: Tensor | None = None
) -> Tensor:
    """``swish(group_norm_channels_last(x))`` with the backward of ``scale_shift_swish`` (the
    gradient's reductions in one pass that writes nothing but the sums). Returned in the autocast
    dtype under CUDA autocast (what the next convolution casts it to; swish is computed in float32
    first, as autocast runs the unfused pair), otherwise in x's dtype."""
    scale, shift = group_norm_scale_shift(x, num_groups, weight, bias, eps, input_bias)
    autocast = x.is_cuda and torch.is_autocast_enabled("cuda")
    return scale_shift_swish(x, scale, shift, torch.get_autocast_dtype("cuda") if autocast else x.dtype)


class FastGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same parameters and state-dict keys), [B, C, *] -> same, that keeps a
    channels_last [B, C, H, W] input channels_last (``group_norm_channels_last``, affine only);
    any other input goes to ``F.group_norm``. ``input_bias`` [C]: normalise x plus this per-channel
    bias (that of the convolution that produced x). ``then_swish``: return ``swish`` of the result
    (fused with the norm on the channels_last path: ``group_norm_swish_channels_last``)."""

    def forward(self, x: Tensor, input_bias: Tensor | None = None, then_swish: bool = False) -> Tensor:
        if self.affine and is_channels_last(x):
            norm = group_norm_swish_channels_last if then_swish else group_norm_channels_last
            return norm(x, self.num_groups, self.weight, self.bias, self.eps, input_bias)
        if input_bias is not None:
            x = x + input_bias.view(-1, *[1] * (x.dim() - 2))
        out = super().forward(x)
        return swish(out) if then_swish else out
