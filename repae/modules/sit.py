"""SiT: the latent diffusion transformer of REPA-E, with its REPA projectors and input BatchNorm.

Follows the official ``models/sit.py`` (reference §6) module for module, so official state dicts
load without remapping. Shapes: N batch, C latent channels, H=W latent size, p patch size,
T = (H/p)^2 tokens, D hidden size.

Differences from the official code, all deliberate:
- No ``decoder_hidden_size``: the final layer always uses ``hidden_size`` (the official default of
  768 makes every SiT-S config crash).
- ``pos_embed_trainable`` makes the accidental learning of ``pos_embed`` in the official
  ``train_repae.py`` (reference §7.6) an explicit choice; the default keeps it frozen.
- The ``align_only`` pass stops after block ``encoder_depth`` (the official one still runs the
  final layer on the partial features and throws the result away).
- ``qk_norm`` passes its LayerNorm explicitly (recent timm versions need it).
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from repae.modules.losses import alignment_loss

PATH_TYPES = ("linear", "cosine")
TIME_SAMPLINGS = ("uniform", "lognormal")


def latents_stats_from_bn(running_mean: torch.Tensor, running_var: torch.Tensor) -> dict[str, torch.Tensor]:
    """The ``-latents-stats.pt`` content of BN buffers [C]: scale = rsqrt(var), bias = mean, [1,C,1,1]."""
    shape = (1, running_mean.numel(), 1, 1)
    return {
        "latents_scale": running_var.rsqrt().reshape(shape).clone(),
        "latents_bias": running_mean.reshape(shape).clone(),
    }


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation. x [N,T,D]; shift, scale [N,D]."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_pos_embed_2d(embed_dim: int, grid_size: int) -> torch.Tensor:
    """MAE 2-D sin-cos position embedding, [grid_size^2, embed_dim] in float32.

    The first half of the channels encodes the column (w) index, the second half the row index;
    each half is ``[sin(pos*omega), cos(pos*omega)]`` with ``omega_k = 10000^(-k/(D/4))``.
    """
    assert embed_dim % 4 == 0, "sin-cos position embedding needs hidden_size divisible by 4"
    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_w, grid_h = torch.meshgrid(coords, coords, indexing="xy")  # row-major token order

    def embed_1d(pos: torch.Tensor) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(embed_dim // 4, dtype=torch.float64) / (embed_dim / 4))
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([embed_1d(grid_w), embed_1d(grid_h)], dim=1).float()


def interpolant(t: torch.Tensor, path_type: str) -> tuple[torch.Tensor, ...]:
    """Coefficients of x_t = alpha*x + sigma*eps and their time derivatives. t=0 data, t=1 noise."""
    if path_type == "linear":
        return 1 - t, t, -torch.ones_like(t), torch.ones_like(t)
    if path_type == "cosine":
        half_pi = math.pi / 2
        return (
            torch.cos(half_pi * t),
            torch.sin(half_pi * t),
            -half_pi * torch.sin(half_pi * t),
            half_pi * torch.cos(half_pi * t),
        )
    raise ValueError(f"unknown path_type {path_type!r}; choose one of {PATH_TYPES}")


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens: [N,C,H,W] -> [N,T,D] (row-major token order)."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.input_size = input_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(
                f"SiT expects latents of spatial size {self.input_size}x{self.input_size}, "
                f"got {tuple(x.shape[-2:])}"
            )
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """Raw t in [0,1] (not x1000) -> [N,D] through a sinusoidal code and an MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000) -> torch.Tensor:
        """t [N] -> [N, dim], cos half first (as DiT/SiT)."""
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding.to(t.dtype)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> [N,D]. Row ``num_classes`` is the null class used for CFG; in train mode
    labels are replaced by it with probability ``dropout_prob``."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


class Attention(nn.Module):
    """Multi-head self-attention with timm's parameter names (qkv, q_norm, k_norm, proj)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False, fused_attn: bool = True):
        super().__init__()
        assert dim % num_heads == 0, "hidden_size must be divisible by num_heads"
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.fused_attn = fused_attn
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)
            x = attn.softmax(dim=-1) @ v
        return self.proj(x.transpose(1, 2).reshape(n, t, d))


class Mlp(nn.Module):
    """Token-wise MLP with timm's parameter names (fc1, fc2)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning. x [N,T,D], c [N,D] -> [N,T,D]."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qk_norm: bool = False,
        fused_attn: bool = True,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, qk_norm=qk_norm, fused_attn=fused_attn)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(
            6, dim=-1
        )
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """Tokens [N,T,D] -> per-token patches [N,T,p*p*C] (channel order p, q, c)."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """Affine-free BatchNorm whose training statistics cover the global batch of all processes.

    SyncBatchNorm semantics (the official code converts the SiT's BN to it) on any backend,
    gloo/CPU included, and with the same arithmetic on one process as on many, so a run's result
    does not depend on how its batch is split. In REPA-E no gradient flows through the batch
    statistics (the SiT pass sees detached latents, the alignment pass runs BN in eval mode), so
    the statistics are reduced without autograd. Same buffers and state-dict keys as BatchNorm2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        channels = x.shape[1]
        with torch.no_grad():
            flat = x.detach().float().transpose(0, 1).reshape(channels, -1)
            stats = torch.cat([flat.sum(dim=1), flat.square().sum(dim=1), flat.new_full((1,), flat.shape[1])])
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(stats)
            count = stats[-1]
            mean = stats[:channels] / count
            var = (stats[channels:-1] / count - mean.square()).clamp_min(0)
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * count / (count - 1), self.momentum)
            self.num_batches_tracked += 1
        shape = (1, channels, 1, 1)
        return ((x.float() - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)).to(x.dtype)


def build_projector(hidden_size: int, projector_dim: int, z_dim: int) -> nn.Sequential:
    """REPA projector: token-wise 3-layer MLP [N,T,D] -> [N,T,z_dim]."""
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, z_dim),
    )


def projector_dims(sit_state_dict: dict[str, torch.Tensor]) -> list[int]:
    """``z_dims`` of a SiT state dict's REPA projectors: the output size of each projector's last
    Linear (the weight [z_dim, projector_dim] with the highest layer index), in projector order.

    A strict load needs the projectors' shapes; reading them from the weights spares building the
    alignment encoders (and needing their weight files) to learn them.
    """
    last: dict[int, tuple[int, int]] = {}
    for key, value in sit_state_dict.items():
        found = re.fullmatch(r"projectors\.(\d+)\.(\d+)\.weight", key)
        if found:
            projector, layer = int(found.group(1)), int(found.group(2))
            if projector not in last or layer > last[projector][0]:
                last[projector] = (layer, value.shape[0])
    return [last[i][1] for i in sorted(last)]


class SiT(nn.Module):
    """Scalable interpolant transformer with REPA projectors and an affine-free input BatchNorm.

    ``forward`` takes raw (unnormalised) VAE latents, normalises them with ``bn`` (batch stats in
    train mode, running stats in eval mode), draws t and noise unless given, and returns the
    per-sample v-prediction loss and the REPA alignment loss. ``inference`` is the plain velocity
    network on already-normalised latents, used by the samplers.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        z_dims: tuple[int, ...] | list[int] = (768,),
        projector_dim: int = 2048,
        encoder_depth: int = 8,
        bn_momentum: float = 0.1,
        qk_norm: bool = False,
        fused_attn: bool = True,
        pos_embed_trainable: bool = False,
        path_type: str = "linear",
        weighting: str = "uniform",
        prediction: str = "v",
    ):
        super().__init__()
        if path_type not in PATH_TYPES:
            raise ValueError(f"unknown path_type {path_type!r}; choose one of {PATH_TYPES}")
        if weighting not in TIME_SAMPLINGS:
            raise ValueError(f"unknown weighting {weighting!r}; choose one of {TIME_SAMPLINGS}")
        if prediction != "v":
            raise ValueError(
                f"only prediction='v' is supported (as in the official code), got {prediction!r}"
            )
        if not 1 <= encoder_depth <= depth:
            raise ValueError(f"encoder_depth must be in [1, depth={depth}], got {encoder_depth}")
        if input_size % patch_size:
            raise ValueError(f"latent size {input_size} is not divisible by patch size {patch_size}")
        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.encoder_depth = encoder_depth
        self.path_type = path_type
        self.weighting = weighting

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = (input_size // patch_size) ** 2
        self.pos_embed = nn.Parameter(
            torch.zeros(1, num_patches, hidden_size), requires_grad=pos_embed_trainable
        )
        self.blocks = nn.ModuleList(
            SiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm=qk_norm, fused_attn=fused_attn)
            for _ in range(depth)
        )
        self.projectors = nn.ModuleList(
            build_projector(hidden_size, projector_dim, z_dim) for z_dim in z_dims
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        # affine=False on purpose: a learned affine could shrink the latents and game the diffusion loss.
        self.bn = GlobalBatchNorm2d(
            in_channels, eps=1e-4, momentum=bn_momentum, affine=False, track_running_stats=True
        )
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(basic_init)
        grid_size = self.input_size // self.patch_size
        self.pos_embed.data.copy_(sincos_pos_embed_2d(self.pos_embed.shape[-1], grid_size).unsqueeze(0))
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    # --- latent statistics -------------------------------------------------------------------
    @property
    def latent_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the latents the SiT models."""
        return (self.in_channels, self.input_size, self.input_size)

    @torch.no_grad()
    def init_bn(self, latents_scale: torch.Tensor, latents_bias: torch.Tensor) -> None:
        """Set BN running stats from a ``-latents-stats.pt`` file: mean = bias, var = (1/scale)^2.
        Accepts [C] or [1,C,1,1] tensors."""
        self.bn.running_mean.copy_(latents_bias.reshape(-1))
        self.bn.running_var.copy_(latents_scale.reshape(-1).reciprocal().square())

    @torch.no_grad()
    def extract_latents_stats(self) -> dict[str, torch.Tensor]:
        """The inverse of ``init_bn``: ``{"latents_scale", "latents_bias"}`` as [1,C,1,1]."""
        return latents_stats_from_bn(self.bn.running_mean, self.bn.running_var)

    def denormalize_latents(self, x: torch.Tensor) -> torch.Tensor:
        """Sampler space -> VAE latents: x / scale + bias, without BN's eps (as the official decode)."""
        stats = self.extract_latents_stats()
        return x / stats["latents_scale"].to(x) + stats["latents_bias"].to(x)

    # --- network ----------------------------------------------------------------------------
    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[N,T,p*p*C] -> [N,C,H,W]."""
        p, c = self.patch_size, self.in_channels
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised latents [N,C,H,W], t [N], y [N] -> tokens [N,T,D], conditioning [N,D]."""
        tokens = self.x_embedder(x) + self.pos_embed
        return tokens, self.t_embedder(t) + self.y_embedder(y)

    def inference(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Velocity of normalised latents x [N,C,H,W] at t [N] for labels y [N] -> [N,C,H,W]."""
        h, c = self.embed(x, t, y)
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final_layer(h, c))

    def sample_time(self, n: int) -> torch.Tensor:
        """[n,1,1,1] training times on the CPU generator, as the official code (so seeds match)."""
        if self.weighting == "uniform":
            return torch.rand(n, 1, 1, 1)
        sigma = torch.randn(n, 1, 1, 1).exp()
        return sigma / (1 + sigma) if self.path_type == "linear" else 2 / math.pi * torch.atan(sigma)

    def forward(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        zs: list[torch.Tensor] | None = None,
        align_only: bool = False,
        time_input: torch.Tensor | None = None,
        noises: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor | list[torch.Tensor] | None]:
        """Training forward with the integrated losses.

        Args:
            x: raw VAE latents [N,C,H,W] (normalised here by ``bn``).
            y: labels [N] (int64).
            zs: encoder features, one [N,T,z_dim] per projector; None or [] gives proj_loss 0.
            align_only: stop after block ``encoder_depth``; no denoising loss.
            time_input, noises: t [N,1,1,1] and noise [N,C,H,W] to reuse; drawn when None (t on
                the CPU generator: on a GPU, pass it in, copied without waiting, as REPAE does).
        Returns a dict with ``denoising_loss`` [N] (None if align_only), ``proj_loss`` (scalar),
        ``zs_tilde`` (list of [N,T,z_dim]), ``model_output`` [N,C,H,W] (None if align_only),
        ``time_input`` [N,1,1,1] and ``noises`` [N,C,H,W].
        """
        xn = self.bn(x)
        if time_input is None:
            time_input = self.sample_time(xn.shape[0])
        time_input = time_input.to(device=xn.device, dtype=xn.dtype)
        if noises is None:
            # randn, not randn_like: the same draw whatever the latents' memory format (channels_last)
            noises = torch.randn(xn.shape, device=xn.device, dtype=xn.dtype)
        alpha, sigma, d_alpha, d_sigma = interpolant(time_input, self.path_type)
        x_t = alpha * xn + sigma * noises
        target = d_alpha * xn + d_sigma * noises

        h, c = self.embed(x_t, time_input.flatten(), y)
        zs_tilde = []
        for i, block in enumerate(self.blocks, start=1):
            h = block(h, c)
            if i == self.encoder_depth:
                zs_tilde = [projector(h) for projector in self.projectors]
                if align_only:
                    break

        proj_loss = alignment_loss(zs, zs_tilde) if zs else x.new_zeros((), dtype=torch.float32)
        model_output = denoising_loss = None
        if not align_only:
            model_output = self.unpatchify(self.final_layer(h, c))
            denoising_loss = (model_output.float() - target.float()).square().mean(dim=(1, 2, 3))
        return {
            "denoising_loss": denoising_loss,
            "proj_loss": proj_loss,
            "zs_tilde": zs_tilde,
            "model_output": model_output,
            "time_input": time_input,
            "noises": noises,
        }


SIT_CONFIGS = {
    "SiT-S": dict(depth=12, hidden_size=384, num_heads=6),
    "SiT-B": dict(depth=12, hidden_size=768, num_heads=12),
    "SiT-L": dict(depth=24, hidden_size=1024, num_heads=16),
    "SiT-XL": dict(depth=28, hidden_size=1152, num_heads=16),
}
SIT_MODEL_NAMES = tuple(f"{size}/{patch}" for size in SIT_CONFIGS for patch in (1, 2, 4, 8))


def build_sit(name: str = "SiT-XL/2", **overrides) -> SiT:
    """Build a SiT by its paper name, e.g. ``build_sit("SiT-XL/2", in_channels=4, input_size=32,
    z_dims=[768])``. Any constructor argument may be overridden (the demo shrinks depth/width)."""
    match = re.fullmatch(r"(SiT-(?:S|B|L|XL))/(\d+)", name)
    if match is None or name not in SIT_MODEL_NAMES:
        raise ValueError(f"unknown SiT model {name!r}; valid names: {', '.join(SIT_MODEL_NAMES)}")
    kwargs = {**SIT_CONFIGS[match.group(1)], "patch_size": int(match.group(2)), **overrides}
    return SiT(**kwargs)
