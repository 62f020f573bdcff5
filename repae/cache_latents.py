"""Latent caching (reference section 2.3): ``python -m repae.cache_latents latents_name=NAME vae.name=f16d32
vae_weights_path=pretrained/NAME/NAME.pt [trainer.devices=8]``.

A Lightning predict run encodes every image of ``{data_dir}/images.h5`` with a frozen VAE (eval
mode, float32) and writes the posterior ``[mean; std]`` (float32 [2C, h, w]) per image, in the
official layout: ``{output_dir}/{NAME}.h5`` + ``{NAME}_h5.json``, read by ``CachedLatents`` and by
the official ``train_ldm_only.py``.

Each rank saves every predicted batch as a part file (indices + latents) in ``work_dir``, under a
temporary name renamed when complete. A restarted run skips the images already in part files. When
all ranks are done, rank 0 merges the parts into the HDF5 file, keeping the first copy of an
index that appears twice (a padding sampler or an overlapping restart), checks that every image is
there exactly once, optionally writes the latents-stats file, and deletes the parts.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Sequence
from pathlib import Path

import h5py
import hydra
import lightning.pytorch as pl
import numpy as np
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import BasePredictionWriter
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset

from repae.cli import exit_on_bad_input
from repae.datamodules.datasets import H5Images, h5_latent_key, write_h5_labels_and_listing
from repae.known_noise import silence_known_noise
from repae.modules.vae import AutoencoderKL, images_to_vae_input, load_checked_state_dict
from repae.preprocess import check_manifest

log = logging.getLogger(__name__)


class IndexedImages(Dataset):
    """The samples ``indices`` of ``dataset`` as ``{"image": uint8 [3, H, W], "index": int64 []}``."""

    def __init__(self, dataset: Dataset, indices: Sequence[int]):
        self.dataset = dataset
        self.indices = list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        index = self.indices[i]
        return {"image": self.dataset[index]["image"], "index": torch.tensor(index, dtype=torch.int64)}


class LatentEncoder(pl.LightningModule):
    """``predict_step``: a batch of uint8 images [B, 3, H, W] -> ``{"index": [B], "latents": [B, 2C, h, w]}``,
    the float32 ``[posterior mean; posterior std]`` of the frozen ``vae``."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        posterior = self.vae.encode(images_to_vae_input(batch["image"]))
        return {"index": batch["index"], "latents": torch.cat([posterior.mean, posterior.std], dim=1).float()}


def part_indices(work_dir: Path) -> np.ndarray:
    """Sorted unique dataset indices already stored in the part files of ``work_dir``."""
    found = [np.load(path)["indices"] for path in sorted(work_dir.glob("part-*.npz"))]
    return np.unique(np.concatenate(found)) if found else np.zeros(0, dtype=np.int64)


def merge_parts(
    work_dir: Path, output_dir: Path, name: str, labels: Sequence[int], latents_stats_path: Path | None = None
) -> int:
    """Write ``{name}.h5`` and ``{name}_h5.json`` into ``output_dir`` from the part files of ``work_dir``.

    Every index in ``[0, len(labels))`` must occur in the parts; an index seen again is dropped.
    The HDF5 file is written under a temporary name and renamed, then the listing is written:
    the listing marks a finished file.

    If ``latents_stats_path`` is given, also saves ``{"latents_bias", "latents_scale"}`` ([1, C, 1, 1])
    there: per-channel mean and 1/std of the latents ``z = mean + std * eps`` the models see, from
    the exact moments ``E[z] = E[mean]`` and ``E[z^2] = E[mean^2 + std^2]`` (no sampling noise).

    Returns:
        The number of latents written.

    Raises:
        ValueError: some images have no latent.
    """
    num_images = len(labels)
    written = np.zeros(num_images, dtype=bool)
    sums = squares = None
    count = 0
    final, partial = output_dir / f"{name}.h5", output_dir / f"{name}.h5.tmp"
    listing, partial_listing = output_dir / f"{name}_h5.json", output_dir / f"{name}_h5.json.tmp"
    listing.unlink(missing_ok=True)
    with h5py.File(partial, "w") as f:
        for path in sorted(work_dir.glob("part-*.npz")):
            with np.load(path) as part:
                indices, latents = part["indices"], part["latents"]
            keep = []
            for row, index in enumerate(indices.tolist()):
                if not written[index]:
                    written[index] = True
                    keep.append(row)
            for row in keep:
                f.create_dataset(h5_latent_key(int(indices[row])), data=latents[row])
            mean, std = np.split(latents[keep].astype(np.float64), 2, axis=1)
            if sums is None:
                sums, squares = np.zeros(mean.shape[1]), np.zeros(mean.shape[1])
            sums += mean.sum(axis=(0, 2, 3))
            squares += (mean**2 + std**2).sum(axis=(0, 2, 3))
            count += mean.shape[0] * mean.shape[2] * mean.shape[3]
        missing = np.flatnonzero(~written)
        if len(missing):
            raise ValueError(
                f"{len(missing)} of {num_images} images have no latent in {work_dir} (e.g. index {missing[0]}); "
                "run the caching again to encode them"
            )
        entries = [[h5_latent_key(i), int(label)] for i, label in enumerate(labels)]
        write_h5_labels_and_listing(f, entries, partial_listing, groups=False)
    os.replace(partial, final)
    os.replace(partial_listing, listing)
    if latents_stats_path is not None and count:
        bias = sums / count
        std = np.sqrt(squares / count - bias**2)
        shape = (1, len(bias), 1, 1)
        stats = {
            "latents_scale": torch.from_numpy(1.0 / std).float().reshape(shape),
            "latents_bias": torch.from_numpy(bias).float().reshape(shape),
        }
        torch.save(stats, latents_stats_path)
    return int(written.sum())


class LatentPartWriter(BasePredictionWriter):
    """Saves each predicted batch as ``part-{first index}-r{rank}-{uuid}.npz`` in ``work_dir``; after the
    predict run, rank 0 merges the parts (``merge_parts``) and, unless ``keep_work_dir``, deletes them."""

    def __init__(
        self,
        work_dir: Path,
        output_dir: Path,
        name: str,
        labels: Sequence[int],
        latents_stats_path: Path | None = None,
        keep_work_dir: bool = False,
    ):
        super().__init__(write_interval="batch")
        self.work_dir = work_dir
        self.output_dir = output_dir
        self.name = name
        self.labels = list(labels)
        self.latents_stats_path = latents_stats_path
        self.keep_work_dir = keep_work_dir

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ):
        indices = prediction["index"].cpu().numpy()
        final = self.work_dir / f"part-{indices[0]:08d}-r{trainer.global_rank}-{uuid.uuid4().hex[:8]}.npz"
        partial = final.with_suffix(".npz.tmp")
        with open(partial, "wb") as f:
            np.savez(f, indices=indices, latents=prediction["latents"].cpu().numpy())
        os.replace(partial, final)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.strategy.barrier()  # every rank's parts are on disk
        if trainer.is_global_zero:
            self.merge()

    def merge(self) -> None:
        count = merge_parts(self.work_dir, self.output_dir, self.name, self.labels, self.latents_stats_path)
        if not self.keep_work_dir:
            shutil.rmtree(self.work_dir)
        log.info("Wrote %d latents to %s", count, self.output_dir / f"{self.name}.h5")


def load_vae(cfg: DictConfig) -> AutoencoderKL:
    """The configured VAE with the weights of ``cfg.vae_weights_path`` (strict)."""
    if not cfg.vae_weights_path:
        raise ValueError(
            "vae_weights_path is not set: point it at the VAE state_dict file, e.g. pretrained/NAME/NAME.pt"
        )
    vae = instantiate(cfg.vae)
    load_checked_state_dict(
        vae, cfg.vae_weights_path, config_key="vae_weights_path", wrapper_keys=("vae", "state_dict")
    )
    return vae


def cache_latents(cfg: DictConfig) -> None:
    """Encode ``{cfg.data_dir}/images.h5`` into ``{cfg.output_dir}/{cfg.latents_name}.h5`` (resumable)."""
    dataset = H5Images(cfg.data_dir, config_key="data_dir")
    output_dir = Path(cfg.output_dir)
    work_dir = Path(cfg.work_dir)
    if (output_dir / f"{cfg.latents_name}_h5.json").is_file() and not work_dir.exists() and not cfg.overwrite:
        log.info(
            "%s already exists: nothing to do (set overwrite=true to encode again)",
            output_dir / f"{cfg.latents_name}.h5",
        )
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    check_manifest(work_dir, {
        "images": str((Path(cfg.data_dir) / "images.h5").resolve()),
        "num_images": len(dataset),
        "vae": OmegaConf.to_container(cfg.vae, resolve=True),
        "vae_weights_path": str(Path(cfg.vae_weights_path).resolve()),
    })  # fmt: skip
    for stale in work_dir.glob("*.npz.tmp"):  # batches whose write was interrupted
        stale.unlink()
    done = part_indices(work_dir)
    pending = np.setdiff1d(np.arange(len(dataset)), done).tolist()
    writer = LatentPartWriter(
        work_dir, output_dir, cfg.latents_name, dataset.labels,
        latents_stats_path=output_dir / f"{cfg.latents_name}-latents-stats.pt" if cfg.latents_stats else None,
        keep_work_dir=cfg.keep_work_dir,
    )  # fmt: skip
    if not pending:
        if instantiate(cfg.trainer, logger=False).is_global_zero:
            writer.merge()
        return
    if len(done):
        log.info("Resuming: %d of %d images already encoded in %s", len(done), len(dataset), work_dir)
    model = LatentEncoder(load_vae(cfg))
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=[writer], logger=False)
    loader = DataLoader(
        IndexedImages(dataset, pending),
        batch_size=cfg.batch_size,
        shuffle=False,
        num_workers=cfg.num_workers,
        pin_memory=torch.cuda.is_available(),
    )
    trainer.predict(model, dataloaders=loader, return_predictions=False)


@hydra.main(version_base="1.3", config_path="../conf", config_name="cache")
def main(cfg: DictConfig) -> None:
    silence_known_noise()
    with exit_on_bad_input():
        cache_latents(cfg)


if __name__ == "__main__":
    main()
