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


def swish(x: Tensor) -> Tensor:
    """The CompVis ``nonlinearity``: x * sigmoid(x)."""
    return x * torch.sigmoid(x)


def Normalize(channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups, as in the CompVis code (``channels`` must be a multiple of 32)."""
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """GN -> swish -> conv3x3 -> GN -> swish -> dropout -> conv3x3, plus a (1x1-projected) shortcut.

    [B, in_channels, H, W] -> [B, out_channels, H, W]. No timestep embedding (``temb_ch=0``).
    """

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual: [B, C, H, W] -> same.

    ``softmax(q k^T / sqrt(C)) v`` with two ``bmm``, as the CompVis code computes it.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.norm = Normalize(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        h_ = self.norm(x)
        q, k, v = self.q(h_), self.k(h_), self.v(h_)
        b, c, h, w = q.shape
        q = q.reshape(b, c, h * w).permute(0, 2, 1)  # [B, HW, C]
        k = k.reshape(b, c, h * w)  # [B, C, HW]
        weights = torch.softmax(torch.bmm(q, k) * c**-0.5, dim=2)  # [B, HW (queries), HW (keys)]
        v = v.reshape(b, c, h * w)
        h_ = torch.bmm(v, weights.permute(0, 2, 1))  # [B, C, HW (queries)]
        return x + self.proj_out(h_.reshape(b, c, h, w))


class Downsample(nn.Module):
    """Asymmetric pad (0, 1, 0, 1) then conv3x3 stride 2: [B, C, H, W] -> [B, C, H/2, W/2]."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest x2 then conv3x3: [B, C, H, W] -> [B, C, 2H, 2W]."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


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
        return self.end(h)

    def end(self, h: Tensor) -> Tensor:
        """The CompVis ``# end``: norm_out -> swish -> conv_out."""
        return self.conv_out(swish(self.norm_out(h)))


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
        return self.end(h)

    def end(self, h: Tensor) -> Tensor:
        """The CompVis ``# end``: norm_out -> swish -> conv_out."""
        return self.conv_out(swish(self.norm_out(h)))


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


def load_vae_weights(
    vae: AutoencoderKL, path: str | Path, strict: bool = True, config_key: str = "model.vae_weights_path"
):
    """Load VAE weights (CompVis layout, e.g. ``sdvae-f8d4.pt``) from ``path`` into ``vae``.

    Accepts a plain state_dict or one wrapped under ``"vae"`` (REPA-E training checkpoints) or
    ``"state_dict"``. Strict by default: the official ``train_repae.py`` loads with ``strict=False``,
    which silently leaves any missing weight at its random initialisation.
    See ``load_checked_state_dict`` for the errors raised, which name ``config_key``.
    """
    return load_checked_state_dict(
        vae, path, config_key=config_key, wrapper_keys=("vae", "state_dict"), strict=strict
    )
