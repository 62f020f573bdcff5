"""``swish(x * scale + shift)`` with one (scale, shift) per (image, channel): the GroupNorm + swish of
the VAE's channels_last path, with a backward that reads the activation and its gradient twice and
writes nothing but the gradient of x.

Autograd's backward of ``swish(addcmul(shift, x, scale))`` forms ``dz = grad * swish'(z)`` once and
then reduces it over the H*W positions (the gradients of scale and shift) and multiplies it by the
scale (the gradient of x). torch.compile writes that float32 ``dz`` out between the two, one write
and two reads of twice the activation's bf16 size. Here the reduction is one op of its own (on CUDA
a Triton kernel) that recomputes ``dz`` from the gradient and x as it reads them; the gradient of x
recomputes it once more, element-wise, where torch.compile fuses it with the rest of the
GroupNorm's backward. Measured gains: docs/performance.md.
"""

from __future__ import annotations

import torch
from torch import Tensor

from repae.modules.vae import swish

try:
    import triton
    import triton.language as tl
except ImportError:  # a CPU-only install: the CUDA kernel is never launched
    triton = None

# Elements of one [pixels, channels] tile a program reads per loop step, and the number of programs
# to aim for (several per SM, so that the loads of one hide the latency of another).
TILE_ELEMENTS = 4096
TARGET_PROGRAMS = 1024
NUM_WARPS = 4


def swish_derivative(z: Tensor) -> Tensor:
    """d/dz of z * sigmoid(z)."""
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def at_least_float32(x: Tensor) -> Tensor:
    """x in float32, or as it is if its dtype is wider (float64): where reductions need the precision."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def affine(x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """x [B, C, H, W] * scale [B, C] + shift [B, C], in at least float32."""
    return torch.addcmul(shift[:, :, None, None], at_least_float32(x), scale[:, :, None, None])


def grad_sums(grad: Tensor, x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``scale_shift_swish_grad_sums`` in torch ops (the CPU form, and the reference for the kernel)."""
    x = x.to(scale.dtype)
    dz = grad.to(scale.dtype) * swish_derivative(affine(x, scale, shift))
    return torch.stack([dz.sum((2, 3)), (dz * x).sum((2, 3))], dim=1)


@torch.library.triton_op("repae::scale_shift_swish_grad_sums", mutates_args=())
def scale_shift_swish_grad_sums(grad: Tensor, x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """[B, 2, C]: the sums over H, W of ``dz`` and ``dz * x``, ``dz = grad * swish'(x * scale + shift)``
    (the gradients of shift and scale). grad, x: [B, C, H, W]; scale, shift: [B, C] float32.

    A ``triton_op`` rather than a ``custom_op``: torch.compile traces into it and launches the kernel
    from its own generated code, where an opaque ``custom_op`` is called through Python at every use
    (host time where the host limits). Without triton (a CPU-only install) torch logs one warning
    when this op is defined."""
    if grad.is_cuda and triton is not None:
        return _grad_sums_triton(grad, x, scale, shift)
    return grad_sums(grad, x, scale, shift)


if triton is not None:

    @triton.jit
    def _grad_sums_kernel(
        grad_ptr, x_ptr, scale_ptr, shift_ptr, partial_ptr, pixels, pixels_per_program, channels,
        BLOCK_PIXELS: tl.constexpr, BLOCK_CHANNELS: tl.constexpr,
    ):  # fmt: skip
        """One program: image ``program_id(0)``, pixels ``[program_id(1) * pixels_per_program, ...)``
        of NHWC grad and x; writes its partial sums of dz and dz * x, [2, channels]."""
        image, part = tl.program_id(0), tl.program_id(1)
        c = tl.arange(0, BLOCK_CHANNELS)
        channel_mask = c < channels
        scale = tl.load(scale_ptr + image * channels + c, mask=channel_mask, other=0.0)[None, :]
        shift = tl.load(shift_ptr + image * channels + c, mask=channel_mask, other=0.0)[None, :]
        # Per-thread partial sums, reduced across threads once at the end rather than every step.
        sum_dz = tl.zeros([BLOCK_PIXELS, BLOCK_CHANNELS], dtype=tl.float32)
        sum_dz_x = tl.zeros([BLOCK_PIXELS, BLOCK_CHANNELS], dtype=tl.float32)
        start = part * pixels_per_program
        end = tl.minimum(start + pixels_per_program, pixels)
        for first in range(start, end, BLOCK_PIXELS):
            p = first + tl.arange(0, BLOCK_PIXELS)
            mask = (p < end)[:, None] & channel_mask[None, :]
            offsets = (image * pixels + p).to(tl.int64)[:, None] * channels + c[None, :]
            g = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
            z = x * scale + shift
            s = tl.sigmoid(z)
            dz = g * s * (1.0 + z * (1.0 - s))
            sum_dz += dz
            sum_dz_x += dz * x
        out = partial_ptr + ((image * tl.num_programs(1) + part) * 2) * channels + c
        tl.store(out, tl.sum(sum_dz, axis=0), mask=channel_mask)
        tl.store(out + channels, tl.sum(sum_dz_x, axis=0), mask=channel_mask)


def _grad_sums_triton(grad: Tensor, x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    b, c, h, w = x.shape
    grad, x = (t.contiguous(memory_format=torch.channels_last) for t in (grad, x))
    scale, shift = scale.float().contiguous(), shift.float().contiguous()
    block_channels = triton.next_power_of_2(c)
    block_pixels = max(1, TILE_ELEMENTS // block_channels)
    parts = max(1, min(triton.cdiv(TARGET_PROGRAMS, b), triton.cdiv(h * w, block_pixels)))
    pixels_per_program = triton.cdiv(triton.cdiv(h * w, parts), block_pixels) * block_pixels
    parts = triton.cdiv(h * w, pixels_per_program)
    partial = torch.empty(b, parts, 2, c, device=x.device, dtype=torch.float32)
    torch.library.wrap_triton(_grad_sums_kernel)[(b, parts)](
        grad, x, scale, shift, partial, h * w, pixels_per_program, c,
        BLOCK_PIXELS=block_pixels, BLOCK_CHANNELS=block_channels, num_warps=NUM_WARPS,
    )  # fmt: skip
    return partial.sum(1)


class ScaleShiftSwish(torch.autograd.Function):
    """``swish(x * scale + shift)`` in ``out_dtype``; x [B, C, H, W], scale and shift [B, C] (float32)."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, shift: Tensor, out_dtype: torch.dtype) -> Tensor:
        ctx.save_for_backward(x, scale, shift)
        return swish(affine(x, scale, shift)).to(out_dtype)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        x, scale, shift = ctx.saved_tensors
        sums = scale_shift_swish_grad_sums(grad, x, scale, shift)
        grad_x = grad.to(scale.dtype) * (swish_derivative(affine(x, scale, shift)) * scale[:, :, None, None])
        return grad_x.to(x.dtype), sums[:, 1], sums[:, 0], None


def scale_shift_swish(x: Tensor, scale: Tensor, shift: Tensor, out_dtype: torch.dtype) -> Tensor:
    """``swish(x * scale[:, :, None, None] + shift[:, :, None, None])`` in ``out_dtype``, [B, C, H, W]."""
    return ScaleShiftSwish.apply(x, scale, shift, out_dtype)
