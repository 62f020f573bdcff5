"""Latent caching: values equal to a direct vae.encode, exactly once per image over 2 processes, resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

import repae.cache_latents as cache_module
from repae.cache_latents import cache_latents, merge_parts
from repae.datamodules.datasets import CachedLatents, H5Images, write_h5_images
from repae.modules.vae import build_vae

REPO = Path(__file__).resolve().parents[1]
NUM_IMAGES = 7  # odd: two ranks cannot split it evenly


@pytest.fixture
def data(tmp_path) -> Path:
    """images.h5 with 7 random 32x32 images (labels 0..6) and a tiny VAE's weights in vae.pt."""
    images = np.random.default_rng(0).integers(0, 256, (NUM_IMAGES, 32, 32, 3), dtype=np.uint8)
    write_h5_images(tmp_path, images, range(NUM_IMAGES))
    torch.manual_seed(0)
    torch.save(build_vae("f4d4-tiny").state_dict(), tmp_path / "vae.pt")
    return tmp_path


def overrides(data: Path, *extra: str) -> list[str]:
    return [
        f"data_dir={data}", "vae.name=f4d4-tiny", f"vae_weights_path={data / 'vae.pt'}", "latents_name=tiny",
        "batch_size=2", "num_workers=0", "trainer.accelerator=cpu", "+trainer.enable_progress_bar=false",
        f"paths.log_dir={data / 'logs'}", *extra,
    ]  # fmt: skip


def cache_config(data: Path, *extra: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="cache", overrides=overrides(data, *extra))


def direct_encoding(data: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """[mean; std] [N, 8, 8, 8] of every image by calling vae.encode directly."""
    vae = build_vae("f4d4-tiny")
    vae.load_state_dict(torch.load(data / "vae.pt", weights_only=True))
    images = torch.stack([H5Images(str(data))[i]["image"] for i in range(NUM_IMAGES)])
    with torch.no_grad():
        posterior = vae.eval().encode(images.float() / 127.5 - 1)
    return posterior.mean, posterior.std


def assert_same_encoding(latents: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> None:
    """``latents`` are [mean; std] up to float32 rounding: the cache encodes in other batches than
    ``direct_encoding``, and CPU convolutions sum in an order that depends on the batch size."""
    torch.testing.assert_close(latents, torch.cat([mean, std], dim=1), rtol=1e-5, atol=1e-6)


def cached(data: Path) -> tuple[torch.Tensor, list[int], list[str]]:
    dataset = CachedLatents(str(data), "tiny")
    latents = torch.stack([dataset[i]["latent"] for i in range(len(dataset))])
    return latents, dataset.labels, json.loads((data / "tiny_h5.json").read_text())


def test_cached_latents_equal_a_direct_vae_encode_and_stats_are_their_moments(data):
    cache_latents(cache_config(data, "latents_stats=true"))
    latents, labels, listing = cached(data)
    mean, std = direct_encoding(data)
    assert_same_encoding(latents, mean, std)
    assert latents.dtype == torch.float32 and latents.shape == (NUM_IMAGES, 8, 8, 8)
    assert labels == list(range(NUM_IMAGES))
    assert listing == [f"00000/img-mean-std-0000000{i}.npy" for i in range(NUM_IMAGES)] + ["dataset.json"]
    assert not (data / "tiny.parts").exists()
    # Stats of z = mean + std * eps over images and positions, per channel.
    stats = torch.load(data / "tiny-latents-stats.pt", weights_only=True)
    bias = mean.double().mean(dim=(0, 2, 3))
    variance = (mean.double() ** 2 + std.double() ** 2).mean(dim=(0, 2, 3)) - bias**2
    torch.testing.assert_close(stats["latents_bias"], bias.float().reshape(1, 4, 1, 1))
    torch.testing.assert_close(stats["latents_scale"], variance.rsqrt().float().reshape(1, 4, 1, 1))


def test_two_processes_encode_every_image_exactly_once(data):
    result = subprocess.run(
        [sys.executable, "-m", "repae.cache_latents",
         *overrides(data, "trainer.devices=2", "trainer.strategy=ddp", "keep_work_dir=true")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    parts = sorted((data / "tiny.parts").glob("part-*.npz"))
    ranks = {path.name.split("-")[2] for path in parts}
    assert ranks == {"r0", "r1"}  # both processes encoded images
    indices = np.concatenate([np.load(path)["indices"] for path in parts])
    assert sorted(set(indices.tolist())) == list(range(NUM_IMAGES))
    latents, labels, listing = cached(data)
    assert len(listing) == len(set(listing)) == NUM_IMAGES + 1
    mean, std = direct_encoding(data)
    assert_same_encoding(latents, mean, std)
    assert labels == list(range(NUM_IMAGES))


def test_merge_keeps_one_copy_of_padded_indices_and_refuses_missing_ones(tmp_path):
    work = tmp_path / "parts"
    work.mkdir()
    latents = torch.arange(5 * 2 * 1 * 1, dtype=torch.float32).reshape(5, 2, 1, 1).numpy() + 1
    # A padding DistributedSampler over 5 images and 2 ranks: rank 0 gets 0, 2, 4, rank 1 gets 1, 3, 0.
    np.savez(work / "part-00000000-r0-a.npz", indices=np.array([0, 2, 4]), latents=latents[[0, 2, 4]])
    np.savez(work / "part-00000001-r1-b.npz", indices=np.array([1, 3, 0]), latents=latents[[1, 3, 0]])
    assert merge_parts(work, tmp_path, "toy", labels=[5, 6, 7, 8, 9]) == 5
    listing = json.loads((tmp_path / "toy_h5.json").read_text())
    assert listing == [f"00000/img-mean-std-0000000{i}.npy" for i in range(5)] + ["dataset.json"]
    write_h5_images(tmp_path, np.zeros((5, 4, 4, 3), np.uint8), range(5))
    dataset = CachedLatents(str(tmp_path), "toy")
    assert [dataset[i]["latent"].flatten().tolist() for i in range(5)] == latents.reshape(5, 2).tolist()
    assert dataset.labels == [5, 6, 7, 8, 9]

    (work / "part-00000001-r1-b.npz").unlink()
    with pytest.raises(ValueError, match="2 of 5 images have no latent"):
        merge_parts(work, tmp_path, "toy", labels=[5, 6, 7, 8, 9])


def test_an_interrupted_run_encodes_only_the_remaining_images(data, monkeypatch):
    predict_step = cache_module.LatentEncoder.predict_step
    encoded: list[int] = []

    def fail_at_third_batch(self, batch, batch_idx):
        if batch_idx == 2:
            raise RuntimeError("node lost")
        return predict_step(self, batch, batch_idx)

    monkeypatch.setattr(cache_module.LatentEncoder, "predict_step", fail_at_third_batch)
    with pytest.raises(RuntimeError, match="node lost"):
        cache_latents(cache_config(data))
    assert len(list((data / "tiny.parts").glob("part-*.npz"))) == 2  # images 0-3
    assert not (data / "tiny_h5.json").exists()

    def record(self, batch, batch_idx):
        encoded.extend(batch["index"].tolist())
        return predict_step(self, batch, batch_idx)

    monkeypatch.setattr(cache_module.LatentEncoder, "predict_step", record)
    cache_latents(cache_config(data))
    assert encoded == [4, 5, 6]
    latents, labels, _ = cached(data)
    mean, std = direct_encoding(data)
    assert_same_encoding(latents, mean, std)


def test_resuming_with_another_vae_is_refused(data):
    (data / "tiny.parts").mkdir()
    (data / "tiny.parts" / "manifest.json").write_text(json.dumps({"vae": {"name": "f8d4"}}))
    with pytest.raises(ValueError, match="different settings"):
        cache_latents(cache_config(data))


def test_a_folder_without_images_h5_names_the_data_dir_setting_and_repae_preprocess(data, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"set data_dir .*python -m repae\.preprocess"):
        cache_latents(cache_config(data, f"data_dir={tmp_path / 'empty'}"))


def test_missing_vae_weights_name_the_setting(data):
    with pytest.raises(FileNotFoundError, match="vae_weights_path"):
        cache_latents(cache_config(data, f"vae_weights_path={data / 'absent.pt'}"))


def test_a_missing_vae_weights_file_is_one_error_line_from_the_command_line(data):
    result = subprocess.run(
        [sys.executable, "-m", "repae.cache_latents", *overrides(data, f"vae_weights_path={data / 'missing.pt'}")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "missing.pt" in lines[-1], result.stderr[-3000:]
    assert not any("Traceback" in line for line in lines)
