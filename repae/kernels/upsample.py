"""The VAE decoder's nearest x2 upsampling followed by a 3x3 convolution, as one stride-2 transposed
convolution that never materialises the upsampled input."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from repae.kernels.group_norm import is_channels_last


def upsampled_kernel_taps(weight: Tensor, dim: int) -> Tensor:
    """The 3 taps (W0, W1, W2) of ``weight`` along ``dim`` -> the 4 taps (W2, W1 + W2, W0 + W1, W0).

    After nearest x2 upsampling, a 3-tap kernel reads input rows (i-1, i, i) at output row 2i and
    (i, i, i+1) at 2i+1. A stride-2 transposed convolution with padding 1 and a 4-tap kernel K gives
    x[i-1] K3 + x[i] K1 at row 2i and x[i] K2 + x[i+1] K0 at 2i+1: the same sums for this K.
    """
    w0, w1, w2 = weight.unbind(dim)
    return torch.stack([w2, w1 + w2, w0 + w1, w0], dim=dim)


def upsample_conv3x3(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), weight, bias, padding=1)`` as one
    stride-2 transposed convolution of x with a 4x4 kernel, in x's memory format.

    [B, C, H, W] -> [B, O, 2H, 2W] for weight [O, C, 3, 3]. Each output pixel sees 2x2 input pixels
    with sums of the 3x3 taps (``upsampled_kernel_taps`` along rows and columns), so this does 16
    multiply-adds per input pixel and channel pair instead of 36, and never materialises the
    upsampled input (in the f8 decoder these convolutions are 28 % of its FLOPs). Same values up to
    summation order: the taps are summed in the weight's dtype (float32; autocast leaves adds alone).
    """
    kernel = upsampled_kernel_taps(upsampled_kernel_taps(weight, 2), 3).transpose(0, 1)  # [C, O, 4, 4]
    memory_format = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    return F.conv_transpose2d(x, kernel.contiguous(memory_format=memory_format), bias, stride=2, padding=1)
