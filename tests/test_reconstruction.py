"""Reconstruction metrics of a VAE (``repae.evaluate mode=reconstruction``): PSNR, SSIM, rFD, protocol."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from test_evaluate import evaluate_config, smooth_images

import repae.reconstruction as reconstruction_module
from repae.evaluate import evaluate
from repae.modules.vae import build_vae
from repae.reconstruction import load_vae, psnr, ssim


def test_psnr_of_a_known_pair_equals_the_hand_computation():
    original = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    reconstruction = original.clone()
    reconstruction[0, 0, 0, :2] = 40  # two of 48 values off by 40: MSE = 2 * 1600 / 48
    assert psnr(original, reconstruction).item() == pytest.approx(10 * math.log10(255**2 / (3200 / 48)))
    same = torch.randint(
        0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    assert ssim(same, same).tolist() == pytest.approx([1.0, 1.0])
    assert (ssim(same, 255 - same) < 0.5).all()


def test_reconstruction_mode_reports_psnr_ssim_and_rfd_with_its_protocol(tmp_path):
    folder = tmp_path / "val"
    folder.mkdir()
    images = smooth_images(4, seed=0)
    for index, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{index}.png")
    torch.manual_seed(0)
    vae_path = (
        tmp_path / "tiny-vae.pt"
    )  # an extracted VAE: a bare state_dict, architecture told by its tensors
    torch.save(build_vae("f4d4-tiny").state_dict(), vae_path)
    cfg = evaluate_config(
        tmp_path, "null", "null", "mode=reconstruction", "feature_extractor=effnet", "effnet_resolution=32",
        f"reconstruction.vae_path={vae_path}", f"reconstruction.images_path={folder}",
        "reconstruction.resolution=32", f"reconstruction.lpips_vgg_weights_path={tmp_path}/missing.pth",
    )  # fmt: skip
    report = evaluate(cfg)
    assert set(report["metrics"]) == {"rfd_effnet", "psnr", "ssim"} and "lpips" in report["unavailable"]
    vae = load_vae(str(vae_path))
    originals = torch.from_numpy(images).permute(0, 3, 1, 2)
    expected = psnr(originals, reconstruction_module.reconstruct(vae, originals)).mean().item()
    assert report["metrics"]["psnr"] == pytest.approx(expected, rel=1e-6)
    protocol = report["protocol"]
    assert (
        protocol["num_samples"] == 4
        and protocol["checkpoint_sha256"]
        and protocol["feature_resolution"] == 32
    )
    assert protocol["reconstruction"]["resolution"] == 32 and np.isfinite(report["metrics"]["rfd_effnet"])
