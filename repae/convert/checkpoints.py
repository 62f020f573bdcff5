"""Training checkpoints: reading them safely, their parts, the official layout, and VAE extraction.

Official checkpoints pickle an ``argparse.Namespace`` (the training arguments). Every file is read
with ``torch.load(weights_only=True)``, with only ``argparse.Namespace`` added to torch's
allow-list: any other pickled object is refused, never constructed.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from repae.modules.sit import latents_stats_from_bn
from repae.modules.state_dict import describe_keys, sub_state_dict
from repae.safe_load import load_weights_only

# The only non-tensor, non-container type an official checkpoint pickles (its "args").
SAFE_GLOBALS = [argparse.Namespace]
StateDict = dict[str, Tensor]


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint (repae ``.ckpt`` or official ``.pt``) without running pickled code.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file pickles an object outside the allow-list (tensors, containers,
            primitive types, ``argparse.Namespace``), or is not a torch file.
    """
    checkpoint = load_weights_only(path, "checkpoint", allowed_globals=SAFE_GLOBALS)
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{str(path)!r} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    return dict(checkpoint)


def training_components(checkpoint: Mapping[str, Any]) -> dict[str, StateDict | None]:
    """The state_dicts ``sit``, ``ema``, ``vae``, ``discriminator`` and ``latents_bn`` of a training
    checkpoint; ``latents_bn`` is the BatchNorm that normalises the latents (the EMA SiT's, or the
    module's own in ``vae_only`` runs, which have no SiT), whose running statistics are the latents stats.

    Official checkpoints store them under ``model``, ``ema``, ``vae``, ``discriminator``; repae
    Lightning checkpoints under the prefixes ``sit.``, ``ema.``, ``vae.``, ``vae_loss.discriminator.``.
    ``vae`` is None for ``train_ldm_only.py`` checkpoints (frozen VAE, not saved) and
    ``discriminator`` is None without a VAE loss.
    """
    if "state_dict" in checkpoint and "pytorch-lightning_version" in checkpoint:
        state = checkpoint["state_dict"]
        parts = {name: sub_state_dict(state, prefix) for name, prefix in
                 [("sit", "sit."), ("ema", "ema."), ("vae", "vae."), ("discriminator", "vae_loss.discriminator."),
                  ("latents_bn", "latents_bn.")]}  # fmt: skip
        parts["latents_bn"] = parts["latents_bn"] or sub_state_dict(parts["ema"], "bn.")
        return {name: part or None for name, part in parts.items()}
    if "model" in checkpoint and "ema" in checkpoint:
        return {
            "sit": dict(checkpoint["model"]),
            "ema": dict(checkpoint["ema"]),
            "vae": dict(checkpoint["vae"]) if "vae" in checkpoint else None,
            "discriminator": dict(checkpoint["discriminator"]) if "discriminator" in checkpoint else None,
            "latents_bn": sub_state_dict(checkpoint["ema"], "bn."),
        }
    raise ValueError(
        f"not a training checkpoint: expected a repae Lightning checkpoint ('state_dict') or an official one "
        f"('model', 'ema', ...), found keys {describe_keys(checkpoint)}"
    )


def official_checkpoint(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """A repae Lightning checkpoint in the layout of the official ``train_repae.py`` /
    ``train_ldm_only.py`` ones: ``model, ema, vae, discriminator, opt, opt_vae, opt_disc, steps``
    (the last four of an LDM-only run only ``opt``), for the official ``generate.py`` and
    ``save_vae_weights.py``. The optimizer states index repae's parameter lists: the SiT's leaves
    out the frozen ``pos_embed`` the official optimizer holds, and the discriminator's holds no
    LPIPS parameters, so they do not resume the official training script's optimizers."""
    parts = training_components(checkpoint)
    official: dict[str, Any] = {"model": parts["sit"], "ema": parts["ema"]}
    optimizers = dict(zip(["opt", "opt_vae", "opt_disc"], checkpoint["optimizer_states"], strict=False))
    if parts["vae"] is not None and len(optimizers) == 3:
        official.update(vae=parts["vae"], discriminator=parts["discriminator"])
    official.update(optimizers)
    official["steps"] = int(checkpoint["state_dict"]["train_step"])
    return official


def extract_vae(checkpoint_path: str | Path, name: str, save_dir: str | Path = "exps") -> dict[str, Path]:
    """Write ``{save_dir}/{name}/{name}.pt`` (VAE), ``{name}-latents-stats.pt`` (from ``latents_bn``)
    and, if the checkpoint has one, ``{name}-discriminator-ckpt.pt``.

    Returns:
        The written files by kind: ``vae``, ``latents_stats`` and possibly ``discriminator``.
    """
    parts = training_components(load_checkpoint(checkpoint_path))
    if parts["vae"] is None:
        raise ValueError(
            f"{checkpoint_path} has no VAE weights (a train_ldm_only / ldm_only checkpoint: the VAE was frozen "
            "and not saved); its VAE is the file it was trained with"
        )
    out_dir = Path(save_dir) / name
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"vae": out_dir / f"{name}.pt", "latents_stats": out_dir / f"{name}-latents-stats.pt"}
    torch.save(parts["vae"], files["vae"])
    torch.save(
        latents_stats_from_bn(parts["latents_bn"]["running_mean"], parts["latents_bn"]["running_var"]),
        files["latents_stats"],
    )
    if parts["discriminator"] is not None:
        files["discriminator"] = out_dir / f"{name}-discriminator-ckpt.pt"
        torch.save(parts["discriminator"], files["discriminator"])
    return files
