"""Fast forms of the VAE's modules (``repae/modules/vae.py``) and ``use_fast_kernels``, the swap.

Each fast module subclasses the plain one and adds no parameter or buffer, so a swapped VAE keeps
its state-dict keys and its parameter objects (optimizers and checkpoints see no difference), and
computes the same function up to rounding (``tests/test_vae.py`` checks values and gradients in
float64):

- every GroupNorm keeps a channels_last input NHWC, and fuses the swish that follows it
  (``FastGroupNorm``, ``repae/kernels/group_norm.py``, with a Triton reduction in its backward);
- a ResnetBlock hands conv1's bias to norm2, which adds it to its statistics instead of a pass over
  the activation;
- the attention keeps its operands [B, HW, C] (views of a channels_last activation) and stays two
  ``bmm`` under torch.compile;
- the upsampling is one transposed convolution (``repae/kernels/upsample.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repae.kernels.group_norm import FastGroupNorm
from repae.kernels.scale_shift_swish import at_least_float32
from repae.kernels.upsample import upsample_conv3x3
from repae.modules import vae


def conv_without_bias(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """``conv(x)`` without its bias, which the caller adds where it costs no pass of its own."""
    return F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)


class FastResnetBlock(vae.ResnetBlock):
    """``ResnetBlock``: [B, in_channels, H, W] -> [B, out_channels, H, W], each norm fused with its
    swish, conv1's bias added by norm2."""

    def forward(self, x: Tensor) -> Tensor:
        h = conv_without_bias(self.conv1, self.norm1(x, then_swish=True))
        # norm2 adds conv1's bias without writing conv1's output plus bias out: one pass less over
        # the activation (see group_norm_scale_shift).
        h = self.conv2(self.dropout(self.norm2(h, input_bias=self.conv1.bias, then_swish=True)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class FastAttnBlock(vae.AttnBlock):
    """``AttnBlock``: [B, C, H, W] -> same, as two ``bmm`` on [B, HW, C] operands and a float32
    softmax (as autocast runs the plain block). Not ``F.scaled_dot_product_attention``: no flash
    kernel takes a 512-wide head, and the memory-efficient kernel it picks for channels_last
    activations is slow in backward (docs/performance.md). The explicit float32 cast also keeps
    inductor from pattern-matching the two ``bmm`` back into that kernel. The cost is the HW x HW
    weights kept for backward (float32 and bf16, 6 bytes an entry)."""

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        x_norm = self.norm(x)
        # [B, C, H, W] -> [B, HW, C], tokens = spatial positions; for channels_last input it is a view.
        q, k, v = (proj(x_norm).reshape(b, c, h * w).transpose(1, 2) for proj in (self.q, self.k, self.v))
        scores = torch.bmm(q, k.transpose(1, 2))
        weights = torch.softmax(at_least_float32(scores) * c**-0.5, dim=2)
        out = torch.bmm(weights.to(v.dtype), v)
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class FastUpsample(vae.Upsample):
    """``Upsample``: [B, C, H, W] -> [B, C, 2H, 2W] as one transposed convolution (``upsample_conv3x3``)."""

    def forward(self, x: Tensor) -> Tensor:
        return upsample_conv3x3(x, self.conv.weight, self.conv.bias)


class FastEncoder(vae.Encoder):
    """``Encoder`` whose final norm is fused with its swish."""

    def end(self, h: Tensor) -> Tensor:
        return self.conv_out(self.norm_out(h, then_swish=True))


class FastDecoder(vae.Decoder):
    """``Decoder`` whose final norm is fused with its swish."""

    def end(self, h: Tensor) -> Tensor:
        return self.conv_out(self.norm_out(h, then_swish=True))


FAST_MODULES: dict[type[nn.Module], type[nn.Module]] = {
    nn.GroupNorm: FastGroupNorm,
    vae.ResnetBlock: FastResnetBlock,
    vae.AttnBlock: FastAttnBlock,
    vae.Upsample: FastUpsample,
    vae.Encoder: FastEncoder,
    vae.Decoder: FastDecoder,
}


def use_fast_kernels(network: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch the modules of ``network`` (the VAE, or any of its modules), in place, to their fast
    forms (``enabled``) or back to the plain ones of ``repae/modules/vae.py``, and return it. Only
    the modules' classes change, not their parameters; switch before ``torch.compile``."""
    swap = FAST_MODULES if enabled else {fast: plain for plain, fast in FAST_MODULES.items()}
    for module in network.modules():
        if type(module) in swap:
            module.__class__ = swap[type(module)]
    return network
