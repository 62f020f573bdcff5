"""A VAE between the CompVis layout and a diffusers ``AutoencoderKL`` folder (``config.json`` +
``diffusion_pytorch_model.safetensors``): the key maps both ways, including the per-level attention
blocks of f16d32, with every tensor accounted for in both directions.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from repae.convert.checkpoints import StateDict, load_checkpoint
from repae.modules.state_dict import check_state_dict
from repae.modules.vae import VAE_CONFIGS, AutoencoderKL, build_vae

DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
_RESNET = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "nin_shortcut": "conv_shortcut",
}
_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# Attention names of diffusers < 0.14 files, accepted on import.
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _diffusers_key(key: str, num_levels: int) -> str:
    """CompVis key -> diffusers key (``decoder.up.{l}`` is ``decoder.up_blocks.{num_levels-1-l}``)."""
    part = r"(\w+)\.(weight|bias)"
    rules = [
        (r"(encoder|decoder)\.(conv_in|conv_out)\.(weight|bias)", lambda m: m.group(0)),
        (r"(encoder|decoder)\.norm_out\.(weight|bias)", lambda m: f"{m.group(1)}.conv_norm_out.{m.group(2)}"),
        (r"(quant_conv|post_quant_conv)\.(weight|bias)", lambda m: m.group(0)),
        (rf"(encoder|decoder)\.mid\.block_([12])\.{part}",
         lambda m: f"{m.group(1)}.mid_block.resnets.{int(m.group(2)) - 1}.{_RESNET[m.group(3)]}.{m.group(4)}"),
        (rf"(encoder|decoder)\.mid\.attn_1\.{part}",
         lambda m: f"{m.group(1)}.mid_block.attentions.0.{_ATTENTION[m.group(2)]}.{m.group(3)}"),
        (rf"encoder\.down\.(\d+)\.block\.(\d+)\.{part}",
         lambda m: f"encoder.down_blocks.{m.group(1)}.resnets.{m.group(2)}.{_RESNET[m.group(3)]}.{m.group(4)}"),
        (rf"encoder\.down\.(\d+)\.attn\.(\d+)\.{part}",
         lambda m: f"encoder.down_blocks.{m.group(1)}.attentions.{m.group(2)}.{_ATTENTION[m.group(3)]}.{m.group(4)}"),
        (r"encoder\.down\.(\d+)\.downsample\.conv\.(weight|bias)",
         lambda m: f"encoder.down_blocks.{m.group(1)}.downsamplers.0.conv.{m.group(2)}"),
        (rf"decoder\.up\.(\d+)\.block\.(\d+)\.{part}",
         lambda m: f"decoder.up_blocks.{num_levels - 1 - int(m.group(1))}.resnets.{m.group(2)}."
                   f"{_RESNET[m.group(3)]}.{m.group(4)}"),
        (rf"decoder\.up\.(\d+)\.attn\.(\d+)\.{part}",
         lambda m: f"decoder.up_blocks.{num_levels - 1 - int(m.group(1))}.attentions.{m.group(2)}."
                   f"{_ATTENTION[m.group(3)]}.{m.group(4)}"),
        (r"decoder\.up\.(\d+)\.upsample\.conv\.(weight|bias)",
         lambda m: f"decoder.up_blocks.{num_levels - 1 - int(m.group(1))}.upsamplers.0.conv.{m.group(2)}"),
    ]  # fmt: skip
    for pattern, rename in rules:
        found = re.fullmatch(pattern, key)
        if found:
            return rename(found)
    raise ValueError(f"no diffusers name for the VAE weight {key!r}")


def _is_attention_projection(key: str) -> bool:
    """CompVis attention q/k/v/proj_out weights: 1x1 convs [C, C, 1, 1], diffusers Linear [C, C]."""
    return re.search(r"\.(attn_1|attn\.\d+)\.(q|k|v|proj_out)\.weight$", key) is not None


def _key_map(vae: AutoencoderKL) -> dict[str, str]:
    """CompVis key -> diffusers key for every tensor of ``vae`` (a bijection)."""
    keys = {key: _diffusers_key(key, len(vae.ch_mult)) for key in vae.state_dict()}
    if len(set(keys.values())) != len(keys):
        raise ValueError("two VAE weights map to the same diffusers name")
    return keys


def vae_to_diffusers_state_dict(vae: AutoencoderKL, state: Mapping[str, Tensor]) -> StateDict:
    """CompVis state_dict of ``vae``'s architecture -> diffusers ``AutoencoderKL`` state_dict."""
    check_state_dict(vae.state_dict(), state, "the VAE weights do not fit the configured AutoencoderKL")
    return {
        target: (state[key].flatten(1) if _is_attention_projection(key) else state[key]).contiguous().clone()
        for key, target in _key_map(vae).items()
    }


def vae_from_diffusers_state_dict(vae: AutoencoderKL, state: Mapping[str, Tensor]) -> StateDict:
    """diffusers ``AutoencoderKL`` state_dict -> CompVis state_dict of ``vae``'s architecture.

    Raises:
        ValueError: a diffusers tensor has no CompVis counterpart, a CompVis tensor is missing, or a shape differs.
    """
    normalized = {}
    for key, value in state.items():
        for old, new in _LEGACY_ATTENTION.items():
            key = re.sub(rf"\.attentions\.(\d+)\.{old}\.", rf".attentions.\1.{new}.", key)
        normalized[key] = value
    inverse = {target: key for key, target in _key_map(vae).items()}
    unexpected = sorted(set(normalized) - set(inverse))
    missing = sorted(set(inverse) - set(normalized))
    if unexpected or missing:
        raise ValueError(
            f"the diffusers weights do not match the VAE: {len(unexpected)} unexpected tensors {unexpected[:5]}, "
            f"{len(missing)} missing tensors {missing[:5]}"
        )
    expected = vae.state_dict()
    converted = {}
    for target, value in normalized.items():
        key = inverse[target]
        if _is_attention_projection(key) and value.numel() == expected[key].numel():
            value = value.reshape(expected[key].shape)
        converted[key] = value.contiguous().clone()
    check_state_dict(
        vae.state_dict(), converted, "the diffusers weights do not fit the configured AutoencoderKL"
    )
    return converted


def diffusers_config(vae: AutoencoderKL, latents_stats: Mapping[str, Tensor] | None = None) -> dict[str, Any]:
    """The ``config.json`` of a diffusers ``AutoencoderKL`` with ``vae``'s architecture.

    REPA-E normalises latents per channel (the latents-stats file), not with one scaling factor:
    ``scaling_factor`` is 1 and, if ``latents_stats`` is given, ``latents_mean`` / ``latents_std``
    hold the per-channel statistics.
    """
    ch = vae.encoder.conv_in.out_channels
    if vae.ch_mult[0] != 1:
        raise ValueError(
            "diffusers' AutoencoderKL needs ch_mult[0] == 1 (its conv_in has block_out_channels[0] channels)"
        )
    # Encoder level l and decoder level l (decoder.up[l]) have attention alike, by construction.
    attention = {level for level, down in enumerate(vae.encoder.down) if len(down.attn) > 0}
    levels = range(len(vae.ch_mult))
    config = {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.33.1",
        "in_channels": vae.encoder.conv_in.in_channels,
        "out_channels": vae.decoder.conv_out.out_channels,
        "down_block_types": ["AttnDownEncoderBlock2D" if level in attention else "DownEncoderBlock2D" for level in levels],
        "up_block_types": ["AttnUpDecoderBlock2D" if level in attention else "UpDecoderBlock2D" for level in reversed(levels)],
        "block_out_channels": [ch * mult for mult in vae.ch_mult],
        "layers_per_block": len(vae.encoder.down[0].block),
        "act_fn": "silu",
        "latent_channels": vae.embed_dim,
        "norm_num_groups": 32,
        "sample_size": 256,
        "scaling_factor": 1.0,
        "shift_factor": None,
        "latents_mean": None,
        "latents_std": None,
        "force_upcast": True,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "mid_block_add_attention": True,
    }  # fmt: skip
    if latents_stats is not None:
        config["latents_mean"] = latents_stats["latents_bias"].flatten().tolist()
        config["latents_std"] = latents_stats["latents_scale"].flatten().reciprocal().tolist()
    return config


def vae_from_diffusers_config(config: Mapping[str, Any]) -> AutoencoderKL:
    """An (untrained) ``AutoencoderKL`` with the architecture of a diffusers ``config.json``."""
    if config.get("act_fn", "silu") != "silu" or config.get("norm_num_groups", 32) != 32:
        raise ValueError("only act_fn='silu' and norm_num_groups=32 match repae's AutoencoderKL")
    if (
        not config.get("mid_block_add_attention", True)
        or not config.get("use_quant_conv", True)
        or not config.get("use_post_quant_conv", True)
    ):
        raise ValueError(
            "repae's AutoencoderKL always has a mid-block attention, quant_conv and post_quant_conv"
        )
    channels = list(config["block_out_channels"])
    ch = channels[0]
    if any(c % ch for c in channels):
        raise ValueError(f"block_out_channels {channels} are not multiples of the first")
    down = list(config["down_block_types"])
    attention = [level for level, kind in enumerate(down) if kind.startswith("Attn")]
    up_attention = [
        len(down) - 1 - i for i, kind in enumerate(config["up_block_types"]) if kind.startswith("Attn")
    ]
    if sorted(up_attention) != attention:
        raise ValueError(
            "encoder and decoder have attention at different levels; repae's AutoencoderKL cannot express that"
        )
    resolution = 256
    return AutoencoderKL(
        embed_dim=config["latent_channels"],
        ch=ch,
        ch_mult=[c // ch for c in channels],
        num_res_blocks=config["layers_per_block"],
        attn_resolutions=[resolution // 2**level for level in attention],
        resolution=resolution,
        in_channels=config.get("in_channels", 3),
        out_channels=config.get("out_channels", 3),
    )


def matching_vae_config(vae: AutoencoderKL) -> str | None:
    """The name in ``VAE_CONFIGS`` with exactly ``vae``'s tensors (names and shapes), if any."""
    shapes = {key: value.shape for key, value in vae.state_dict().items()}
    for name in VAE_CONFIGS:
        with torch.device("meta"):
            candidate = build_vae(name)
        if {key: value.shape for key, value in candidate.state_dict().items()} == shapes:
            return name
    return None


def save_diffusers(
    vae: AutoencoderKL, state: Mapping[str, Tensor], output_dir: str | Path,
    latents_stats: Mapping[str, Tensor] | None = None,
) -> Path:  # fmt: skip
    """Write ``state`` (CompVis weights of ``vae``'s architecture; ``vae`` may live on the meta device)
    as a diffusers ``AutoencoderKL`` folder: ``config.json`` + ``diffusion_pytorch_model.safetensors``."""
    from safetensors.torch import save_file

    converted = vae_to_diffusers_state_dict(vae, state)
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(converted, out_dir / DIFFUSERS_WEIGHTS, metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(diffusers_config(vae, latents_stats), indent=2))
    return out_dir


def to_diffusers(
    vae_weights_path: str | Path,
    output_dir: str | Path,
    vae: str,
    latents_stats_path: str | Path | None = None,
) -> Path:
    """Write a diffusers ``AutoencoderKL`` folder from a CompVis VAE file (``save_diffusers``).

    Args:
        vae_weights_path: VAE state_dict (``NAME.pt``, or a file wrapping it under ``vae``/``state_dict``).
        output_dir: the diffusers model folder to write.
        vae: the architecture, a ``VAE_CONFIGS`` name (``f8d4``, ``f16d32``, ...).
        latents_stats_path: optional ``NAME-latents-stats.pt``, stored as ``latents_mean``/``latents_std``.
    """
    with torch.device("meta"):
        model = build_vae(vae)
    state = load_checkpoint(vae_weights_path)
    state = dict(state.get("vae", state.get("state_dict", state)))
    stats = load_checkpoint(latents_stats_path) if latents_stats_path else None
    return save_diffusers(model, state, output_dir, stats)


def from_diffusers(diffusers_dir: str | Path, output_path: str | Path) -> tuple[Path, str | None]:
    """Write a CompVis VAE state_dict (``NAME.pt``, for ``model.vae_weights_path``) from a diffusers folder.

    If the config holds ``latents_mean``/``latents_std``, also writes ``NAME-latents-stats.pt`` next to it.

    Returns:
        The written VAE file and the matching ``VAE_CONFIGS`` name (``model.vae.name``), or None if
        no named configuration has this architecture.
    """
    from safetensors.torch import load_file

    folder = Path(diffusers_dir)
    for required in ("config.json", DIFFUSERS_WEIGHTS):
        if not (folder / required).is_file():
            raise FileNotFoundError(
                f"{folder / required} not found: expected a diffusers AutoencoderKL folder"
            )
    config = json.loads((folder / "config.json").read_text())
    with torch.device("meta"):
        model = vae_from_diffusers_config(config)
    converted = vae_from_diffusers_state_dict(model, load_file(folder / DIFFUSERS_WEIGHTS))
    output = Path(output_path)
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(converted, output)
    if config.get("latents_mean") is not None and config.get("latents_std") is not None:
        shape = (1, len(config["latents_mean"]), 1, 1)
        stats = {
            "latents_scale": torch.tensor(config["latents_std"]).reciprocal().reshape(shape),
            "latents_bias": torch.tensor(config["latents_mean"]).reshape(shape),
        }
        torch.save(stats, output.with_name(f"{output.stem}-latents-stats.pt"))
    return output, matching_vae_config(model)
