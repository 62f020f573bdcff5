"""Reconstruction metrics of a VAE: ``python -m repae.evaluate mode=reconstruction reconstruction.vae_path=...``.

Each image of the set (ADM center crop to ``reconstruction.resolution``, as the training data) is
encoded, its posterior mean decoded, and the reconstruction converted to uint8 as generated samples
are. Then:

- ``rfid`` (Inception; ``rfd_effnet`` with ``feature_extractor=effnet``, not comparable to rFID): the
  Fréchet distance between the features of the reconstructions and of the originals;
- ``psnr``: per image ``10 log10(255^2 / MSE)`` over its uint8 pixels, averaged over images;
- ``ssim``: Gaussian-window SSIM (11 px, sigma 1.5) on uint8 RGB, averaged over images (torchmetrics);
- ``lpips``: LPIPS-VGG16 between original and reconstruction in [-1, 1], averaged over images.

docs/evaluation.md states the protocol next to the paper's numbers it matches.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset, Subset

from repae.config import build_model
from repae.convert.checkpoints import load_checkpoint
from repae.convert.official import official_config
from repae.datamodules.datasets import H5Images, ImageFolder
from repae.evaluate import INCEPTION_WEIGHTS_CONFIG_KEY, Evaluation
from repae.metrics import EfficientNetFeatures, FeatureStatistics, InceptionFeatures, frechet_distance
from repae.modules.perceptual import LPIPS
from repae.modules.state_dict import sub_state_dict
from repae.modules.vae import VAE_CONFIGS, AutoencoderKL, build_vae, images_to_vae_input

LPIPS_CONFIG_KEY = "reconstruction.lpips_vgg_weights_path"


def psnr(originals: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of uint8 images [B, 3, H, W]: ``10 log10(255^2 / mean squared error)`` -> [B]."""
    error = (originals.double() - reconstructions.double()).square().flatten(1).mean(dim=1)
    return 10 * torch.log10(255.0**2 / error)


def ssim(originals: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM of uint8 images [B, 3, H, W] (Gaussian window 11, sigma 1.5, range 255) -> [B]."""
    # Imported here: torchmetrics takes seconds to import, and the study imports this module for psnr.
    from torchmetrics.functional.image import structural_similarity_index_measure

    return structural_similarity_index_measure(
        reconstructions.double(), originals.double(), data_range=255.0, reduction="none"
    )


# --- the VAE --------------------------------------------------------------------------------------
def _architecture_of(state_dict: dict, path: str) -> AutoencoderKL:
    """The ``VAE_CONFIGS`` model whose tensors (names and shapes) are exactly those of ``state_dict``."""
    shapes = {key: tuple(value.shape) for key, value in state_dict.items()}
    for name in VAE_CONFIGS:
        with torch.device("meta"):
            candidate = build_vae(name)
        if {key: tuple(value.shape) for key, value in candidate.state_dict().items()} == shapes:
            return build_vae(name)
    raise ValueError(
        f"the VAE weights in {path!r} match none of the VAE configurations {sorted(VAE_CONFIGS)}"
    )


def load_vae(path: str) -> AutoencoderKL:
    """A VAE from a repae checkpoint (``.ckpt``), an official REPA-E checkpoint, an extracted VAE
    state_dict (``e2e-vavae.pt``, architecture told by its tensors) or a diffusers ``AutoencoderKL`` folder."""
    source = Path(path)
    if source.is_dir():
        from safetensors.torch import load_file

        from repae.convert.diffusers import (
            DIFFUSERS_WEIGHTS,
            vae_from_diffusers_config,
            vae_from_diffusers_state_dict,
        )

        if not (source / "config.json").is_file() or not (source / DIFFUSERS_WEIGHTS).is_file():
            raise FileNotFoundError(f"{path!r} is a folder but not a diffusers AutoencoderKL export")
        vae = vae_from_diffusers_config(json.loads((source / "config.json").read_text()))
        state_dict = vae_from_diffusers_state_dict(vae, load_file(source / DIFFUSERS_WEIGHTS))
    else:
        checkpoint = load_checkpoint(path)
        if "state_dict" in checkpoint and "hyper_parameters" in checkpoint:
            vae = build_model(checkpoint["hyper_parameters"].get("vae"), "hyper_parameters.vae")
            state_dict = sub_state_dict(checkpoint["state_dict"], "vae.")
        elif "vae" in checkpoint and "args" in checkpoint:
            vae = build_vae(official_config(checkpoint["args"], ldm_only=False)["model.vae.name"])
            state_dict = checkpoint["vae"]
        else:
            state_dict = dict(checkpoint.get("vae", checkpoint.get("state_dict", checkpoint)))
            vae = _architecture_of(state_dict, path)
    vae.load_state_dict(state_dict, strict=True)
    return vae.eval().requires_grad_(False)


# --- the images -----------------------------------------------------------------------------------
def image_set(images_path: str, resolution: int, num_images: int | None) -> Dataset:
    """The first ``num_images`` (all with None) of a folder holding ``images.h5`` (already cropped by
    ``repae.preprocess``) or of an image folder such as ImageNet's val/ (ADM center crop on the fly)."""
    folder = Path(images_path)
    dataset = (
        H5Images(images_path) if (folder / "images.h5").is_file() else ImageFolder(images_path, resolution)
    )
    if num_images is not None:
        if num_images > len(dataset):
            raise ValueError(
                f"reconstruction.num_images={num_images}, but {images_path!r} holds {len(dataset)}"
            )
        dataset = Subset(dataset, range(num_images))
    return dataset


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] -> the decoded posterior mean, uint8 as generated samples are (truncated)."""
    recon = vae.decode(vae.encode(images_to_vae_input(images)).mode())
    return torch.clamp(127.5 * recon.float() + 128.0, 0, 255).to(torch.uint8)


def reconstruction_metrics(cfg: DictConfig, device: torch.device) -> Evaluation:
    """rFID (or rFD-EffNet), PSNR, SSIM and LPIPS of ``cfg.reconstruction.vae_path`` on its image set."""
    settings = cfg.reconstruction
    vae = load_vae(settings.vae_path).to(device)
    dataset = image_set(settings.images_path, settings.resolution, settings.num_images)
    if cfg.feature_extractor == "inception":
        extractor, name = InceptionFeatures(cfg.inception_weights_path, INCEPTION_WEIGHTS_CONFIG_KEY), "rfid"
    else:
        extractor, name = EfficientNetFeatures(cfg.effnet_resolution), "rfd_effnet"
    extractor = extractor.to(device)
    lpips, result = None, Evaluation()
    try:
        lpips = LPIPS(settings.lpips_vgg_weights_path).to(device)
    except FileNotFoundError as error:
        result.unavailable["lpips"] = f"{error} ({LPIPS_CONFIG_KEY})"
    originals, reconstructions = (FeatureStatistics(extractor.num_features, device=device) for _ in range(2))
    sums = {"psnr": 0.0, "ssim": 0.0, "lpips": 0.0}
    loader = DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.num_workers)
    for batch in loader:
        images = batch["image"].to(device)
        recon = reconstruct(vae, images)
        originals.update(extractor(images))
        reconstructions.update(extractor(recon))
        sums["psnr"] += psnr(images, recon).sum().item()
        sums["ssim"] += ssim(images, recon).sum().item()
        if lpips is not None:
            sums["lpips"] += lpips(images_to_vae_input(images), images_to_vae_input(recon)).sum().item()
        result.num_samples += images.shape[0]
    mu, sigma = reconstructions.compute()
    result.statistics = {"mu": mu, "sigma": sigma}
    result.metrics[name] = frechet_distance(mu, sigma, *originals.compute())
    for key in ("psnr", "ssim", "lpips"):
        if key not in result.unavailable:
            result.metrics[key] = float(np.float64(sums[key]) / result.num_samples)
    return result
