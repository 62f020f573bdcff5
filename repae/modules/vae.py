"""LDM/CompVis ``AutoencoderKL`` as used by REPA-E (reference section 3).

Module and attribute names reproduce the CompVis state-dict layout (``encoder.down.{l}.block.{b}``,
``decoder.up.{l}``, ``quant_conv``, ...), not the diffusers one, so the official REPA-E VAE
checkpoints (``sdvae-f8d4.pt``, ``e2e-vavae-400k.pt``, ...) load without remapping.

Images are in [-1, 1]. The VAE has no scaling factor: latent normalisation lives in the SiT.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from repae.modules.scale_shift_swish import affine, at_least_float32, scale_shift_swish, swish
from repae.modules.state_dict import check_state_dict, describe


def images_to_vae_input(images: Tensor) -> Tensor:
    """uint8 images [B,3,H,W] in [0, 255] -> float [-1, 1], the VAE's input range (``x/127.5 - 1``)."""
    return images.float() / 127.5 - 1


class DiagonalGaussianDistribution:
    """Diagonal Gaussian posterior q(z|x) parameterised by ``[mean; logvar]`` along channels.

    Args:
        parameters: [B, 2C, h, w]; the first C channels are the mean, the last C the log-variance.
    """

    def __init__(self, parameters: Tensor):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        # Clamping keeps exp() finite for an untrained or diverging encoder.
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    @classmethod
    def from_mean_std(cls, mean_std: Tensor) -> DiagonalGaussianDistribution:
        """Build from the cached-latent format ``[mean; std]`` ([B, 2C, h, w]) of ``cache_latents.py``."""
        mean, std = torch.chunk(mean_std, 2, dim=1)
        return cls(torch.cat([mean, 2.0 * torch.log(std)], dim=1))

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """Reparameterised sample ``mean + std * eps`` ([B, C, h, w]); gradients flow into mean and std.

        The noise is float32 even under autocast, as the official code's."""
        noise = torch.randn(
            self.mean.shape, device=self.mean.device, dtype=torch.float32, generator=generator
        )
        return self.mean + self.std * noise

    def mode(self) -> Tensor:
        """The posterior mean, [B, C, h, w]."""
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) summed over C, h, w: [B], in float32 (a bf16 sum over C*h*w is too coarse)."""
        mean, logvar = self.mean.float(), self.logvar.float()
        return 0.5 * torch.sum(mean.pow(2) + logvar.exp() - 1.0 - logvar, dim=[1, 2, 3])


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

    On CUDA, ``F.group_norm`` (and inductor's decomposition of it) views the input as [B, G, -1],
    which copies an NHWC tensor to NCHW. Here the statistics are per-channel moments over the H*W
    positions, a reduction that reads NHWC in place, pooled within each group (the group variance
    is the mean of the channel variances plus the variance of the channel means).

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


class GroupNorm(nn.GroupNorm):
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


def Normalize(channels: int) -> GroupNorm:
    """GroupNorm with 32 groups, as in the CompVis code (``channels`` must be a multiple of 32)."""
    return GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class Conv2dDeferredBias(nn.Conv2d):
    """``nn.Conv2d`` (same parameters and state-dict keys) whose forward leaves out its bias: the
    caller adds ``self.bias`` later, where it costs no pass of its own (``GroupNorm``'s
    ``input_bias``)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight, None, self.stride, self.padding, self.dilation, self.groups)


class ResnetBlock(nn.Module):
    """GN -> swish -> conv3x3 -> GN -> swish -> dropout -> conv3x3, plus a (1x1-projected) shortcut.

    [B, in_channels, H, W] -> [B, out_channels, H, W]. No timestep embedding (``temb_ch=0``).
    """

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = Conv2dDeferredBias(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(self.norm1(x, then_swish=True))
        # norm2 adds conv1's bias without writing conv1's output plus bias out: one pass less over
        # the activation (see group_norm_scale_shift).
        h = self.conv2(self.dropout(self.norm2(h, input_bias=self.conv1.bias, then_swish=True)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual: [B, C, H, W] -> same.

    ``softmax(q k^T / sqrt(C)) v`` with two ``bmm`` and a float32 softmax, as autocast runs the
    CompVis code. Not ``F.scaled_dot_product_attention``: no flash kernel takes a 512-wide head, and
    the memory-efficient kernel it picks for channels_last activations is ~20x slower in backward
    than the two bmm (6 ms a call for 32 images of 32x32 on an H100). The explicit float32 cast also
    keeps inductor from pattern-matching the bmm back into that kernel. The cost is the HW x HW
    weights kept for backward (float32 and bf16, 6 bytes an entry): ~190 MiB a block for 32 images
    at 32x32 latents (256 px, f8), 16x that at 512 px.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        x_norm = self.norm(x)
        # [B, C, H, W] -> [B, HW, C], tokens = spatial positions; for channels_last input it is a view.
        q, k, v = (proj(x_norm).reshape(b, c, h * w).transpose(1, 2) for proj in (self.q, self.k, self.v))
        scores = torch.bmm(q, k.transpose(1, 2))
        weights = torch.softmax(at_least_float32(scores) * c**-0.5, dim=2)
        out = torch.bmm(weights.to(v.dtype), v)
        return x + self.proj_out(out.transpose(1, 2).reshape(b, c, h, w))


class Downsample(nn.Module):
    """Asymmetric pad (0, 1, 0, 1) then conv3x3 stride 2: [B, C, H, W] -> [B, C, H/2, W/2]."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest x2 then conv3x3: [B, C, H, W] -> [B, C, 2H, 2W] (computed by ``upsample_conv3x3``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return upsample_conv3x3(x, self.conv.weight, self.conv.bias)


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


class Encoder(nn.Module):
    """Images [B, in_channels, H, W] -> ``[mean; logvar]`` pre-quant features [B, 2*z_channels, H/f, W/f].

    ``f = 2**(len(ch_mult) - 1)``. Attention follows every ResnetBlock of a level whose nominal
    resolution (``resolution`` divided by the downsampling so far) is in ``attn_resolutions``.
    """

    def __init__(
        self,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        resolution: int,
        in_channels: int,
        z_channels: int,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)

        self.down = nn.ModuleList()
        block_in = ch
        curr_res = resolution
        for level, mult in enumerate(ch_mult):
            block_out = ch * mult
            down = nn.Module()
            down.block = nn.ModuleList()
            down.attn = nn.ModuleList()
            for _ in range(num_res_blocks):
                down.block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    down.attn.append(AttnBlock(block_in))
            if level != len(ch_mult) - 1:
                down.downsample = Downsample(block_in)
                curr_res //= 2
            self.down.append(down)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)

        self.norm_out = Normalize(block_in)
        # "double_z": the encoder predicts both mean and log-variance.
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for down in self.down:
            for i, block in enumerate(down.block):
                h = block(h)
                if len(down.attn) > 0:
                    h = down.attn[i](h)
            if hasattr(down, "downsample"):
                h = down.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(self.norm_out(h, then_swish=True))


class Decoder(nn.Module):
    """Latents [B, z_channels, h, w] -> images [B, out_channels, h*f, w*f] (unbounded, trained to [-1, 1]).

    ``self.up[0]`` is the HIGHEST resolution level (the CompVis code prepends levels while
    building from the lowest resolution up); the forward pass walks ``self.up`` in reverse.
    Each level has ``num_res_blocks + 1`` ResnetBlocks.
    """

    def __init__(
        self,
        ch: int,
        ch_mult: Sequence[int],
        num_res_blocks: int,
        attn_resolutions: Sequence[int],
        resolution: int,
        out_channels: int,
        z_channels: int,
        dropout: float = 0.0,
    ):
        super().__init__()
        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, dropout)
        self.mid.attn_1 = AttnBlock(block_in)
        self.mid.block_2 = ResnetBlock(block_in, block_in, dropout)

        levels = []
        for level in reversed(range(len(ch_mult))):
            block_out = ch * ch_mult[level]
            up = nn.Module()
            up.block = nn.ModuleList()
            up.attn = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                up.block.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    up.attn.append(AttnBlock(block_in))
            if level != 0:
                up.upsample = Upsample(block_in)
                curr_res *= 2
            levels.insert(0, up)
        self.up = nn.ModuleList(levels)

        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for up in reversed(self.up):
            for i, block in enumerate(up.block):
                h = block(h)
                if len(up.attn) > 0:
                    h = up.attn[i](h)
            if hasattr(up, "upsample"):
                h = up.upsample(h)
        return self.conv_out(self.norm_out(h, then_swish=True))


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder with ``z_channels == embed_dim`` (REPA-E ``f8d4`` / ``f16d32``).

    Args:
        embed_dim: latent channels E.
        ch: base channel count; level l has ``ch * ch_mult[l]`` channels (multiples of 32 for GroupNorm).
        ch_mult: channel multiplier per level; the spatial downsampling factor is ``2**(len(ch_mult)-1)``.
        num_res_blocks: ResnetBlocks per encoder level (the decoder uses one more).
        attn_resolutions: nominal resolutions at which per-level attention blocks are inserted.
        resolution: nominal input resolution; only decides where attention goes, any H, W divisible by
            the downsampling factor work.
        in_channels, out_channels: image channels.
        dropout: dropout inside the ResnetBlocks.
    """

    def __init__(
        self,
        embed_dim: int,
        ch: int = 128,
        ch_mult: Sequence[int] = (1, 2, 4, 4),
        num_res_blocks: int = 2,
        attn_resolutions: Sequence[int] = (16,),
        resolution: int = 256,
        in_channels: int = 3,
        out_channels: int = 3,
        dropout: float = 0.0,
    ):
        super().__init__()
        # Hydra hands over ListConfigs; plain tuples keep `in` checks and repr simple.
        ch_mult = tuple(ch_mult)
        attn_resolutions = tuple(attn_resolutions)
        self.embed_dim = embed_dim
        self.ch_mult = ch_mult
        self.encoder = Encoder(
            ch, ch_mult, num_res_blocks, attn_resolutions, resolution, in_channels, embed_dim, dropout
        )
        self.decoder = Decoder(
            ch, ch_mult, num_res_blocks, attn_resolutions, resolution, out_channels, embed_dim, dropout
        )
        self.quant_conv = nn.Conv2d(2 * embed_dim, 2 * embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(embed_dim, embed_dim, kernel_size=1)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def latent_channels(self) -> int:
        return self.embed_dim

    def encode(self, x: Tensor) -> DiagonalGaussianDistribution:
        """Images [B, 3, H, W] in [-1, 1] -> posterior over latents [B, E, H/f, W/f]."""
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: Tensor) -> Tensor:
        """Latents [B, E, h, w] -> reconstructions [B, 3, h*f, w*f].

        Returns the tensor itself; the official code wraps it in an object with a ``.sample`` field.
        """
        return self.decoder(self.post_quant_conv(z))

    def forward(
        self, x: Tensor, return_recon: bool = True
    ) -> tuple[DiagonalGaussianDistribution, Tensor, Tensor | None]:
        """Returns ``(posterior, z, recon)`` with ``z = posterior.sample()`` [B, E, H/f, W/f] and
        ``recon = decode(z)`` [B, 3, H, W], or ``None`` when ``return_recon`` is False."""
        posterior = self.encode(x)
        z = posterior.sample()
        recon = self.decode(z) if return_recon else None
        return posterior, z, recon


VAE_CONFIGS: dict[str, dict] = {
    # SD-VAE (REPA-E/sdvae, e2e-sdvae): 83.65M params, 256px -> 4x32x32.
    "f8d4": dict(embed_dim=4, ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, attn_resolutions=(16,)),
    # IN-VAE / VA-VAE (REPA-E/invae, vavae, e2e-*): 69.84M params, 256px -> 32x16x16, attention at 16x16.
    "f16d32": dict(embed_dim=32, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,)),
    # Not an official model: a ~0.9M-param f4 VAE for tests and the CPU demo on 32x32 images.
    "f4d4-tiny": dict(
        embed_dim=4, ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(), resolution=32
    ),
}


def build_vae(name: str, **overrides) -> AutoencoderKL:
    """Instantiate a named configuration of ``VAE_CONFIGS``; keyword ``overrides`` replace its entries."""
    if name not in VAE_CONFIGS:
        raise ValueError(f"Unknown VAE config {name!r}; valid names: {sorted(VAE_CONFIGS)}")
    return AutoencoderKL(**{**VAE_CONFIGS[name], **overrides})


def load_checked_state_dict(
    module: nn.Module,
    path: str | Path,
    config_key: str,
    wrapper_keys: Sequence[str] = ("state_dict",),
    strict: bool = True,
):
    """Load a ``torch.save``-d state_dict file into ``module``, turning every failure into one clear error.

    The file may hold the state_dict itself or a dict wrapping it under one of ``wrapper_keys``.
    Loaded with ``weights_only=True`` on the CPU. ``config_key`` names the setting that points at
    the file, so the messages tell the user what to change.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unreadable file, not a state_dict, or keys/shapes that do not fit ``module``
            (missing and unexpected keys are tolerated when ``strict`` is False; shape mismatches never).

    Returns:
        ``load_state_dict``'s named tuple of ``missing_keys`` and ``unexpected_keys``.
    """
    path = Path(path)
    target = type(module).__name__
    if not path.is_file():
        raise FileNotFoundError(
            f"{target} weights file {str(path)!r} does not exist or is not a file. Set `{config_key}` to a state_dict "
            f"file saved with torch.save(model.state_dict(), path)."
        )
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise ValueError(
            f"Could not read {str(path)!r} (set by `{config_key}`) as a weights-only torch file: {error}. "
            f"Full training checkpoints pickle extra objects; save only the {target} state_dict."
        ) from None
    if isinstance(state_dict, Mapping):
        for key in wrapper_keys:
            if isinstance(state_dict.get(key), Mapping):
                state_dict = state_dict[key]
                break
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, Tensor) for v in state_dict.values()):
        raise ValueError(
            f"{str(path)!r} (set by `{config_key}`) is not a state_dict of tensors "
            f"(nor one wrapped under {list(wrapper_keys)})."
        )

    hint = "Check that the model config matches the file."
    if any("down_blocks" in k or "up_blocks" in k for k in state_dict):
        hint += " The file looks like a diffusers checkpoint; convert it to the CompVis/LDM layout."
    what = f"{str(path)!r} (set by `{config_key}`) does not match the configured {target}"
    diff = check_state_dict(module.state_dict(), state_dict, what, hint, strict=strict)
    if not diff.matches:
        warnings.warn(
            f"Non-strict load of {str(path)!r} into {target}: {len(diff.missing)} missing keys "
            f"({describe(diff.missing)}), {len(diff.unexpected)} unexpected keys ({describe(diff.unexpected)}).",
            stacklevel=2,
        )
    return module.load_state_dict(state_dict, strict=strict)


def load_vae_weights(vae: AutoencoderKL, path: str | Path, strict: bool = True):
    """Load VAE weights (CompVis layout, e.g. ``sdvae-f8d4.pt``) from ``path`` into ``vae``.

    Accepts a plain state_dict or one wrapped under ``"vae"`` (REPA-E training checkpoints) or
    ``"state_dict"``. Strict by default: the official ``train_repae.py`` loads with ``strict=False``,
    which silently leaves any missing weight at its random initialisation.
    See ``load_checked_state_dict`` for the errors raised (config key ``model.vae_weights_path``).
    """
    return load_checked_state_dict(
        vae, path, config_key="model.vae_weights_path", wrapper_keys=("vae", "state_dict"), strict=strict
    )
