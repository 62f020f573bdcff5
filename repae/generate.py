"""Sample a trained model for evaluation: ``python -m repae.generate ckpt_path=<checkpoint> [overrides]``.

Writes ``<sample_dir>/{index:06d}.png`` for every index in ``[0, num_samples)`` and packs them into
``<sample_dir>.npz`` (ADM format: ``arr_0`` uint8 [N, H, W, 3]), the input of ``repae.evaluate`` and of
the ADM TensorFlow evaluator, with their protocol record (``repae.protocol``) in ``<sample_dir>.json``.

Every image is a deterministic function of ``(global_seed, index)`` and the settings:

- its label comes from :func:`sample_labels` (class-balanced or uniformly random), which does not
  depend on ``num_samples``;
- its initial noise, and in SDE mode all its sampling noise, come from a ``torch.Generator`` of its own
  seeded with :func:`index_seed`.

So any number of devices, any batch size and any resumed run produce the same image for an index
(on the same kind of device: CPU and CUDA generators differ). The official ``generate.py`` instead
seeds one generator per rank (``global_seed * world_size + rank``) and lets each rank sample a
contiguous shard, so its images change with the number of GPUs and a run cannot be resumed.

Resuming: indices whose PNG exists are skipped (PNGs are written to a temporary name and renamed,
so a killed run leaves no truncated file behind). Devices: ``trainer.devices=8`` runs Lightning's
predict loop on 8 GPUs, each sampling its share of the missing indices.

Checkpoints: a repae Lightning checkpoint (``*.ckpt``) or an official REPA-E checkpoint (``{"model",
"ema", "vae", ..., "args"}``; LDM-only ones have no ``"vae"``: set ``vae_weights_path``). Only the
(EMA) SiT and the VAE are built: the alignment encoders and the losses, with their weight files, are
not needed to sample.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import hydra
import lightning.pytorch as pl
import numpy as np
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from repae.cli import exit_on_bad_input
from repae.config import build_model
from repae.convert.checkpoints import SAFE_GLOBALS
from repae.convert.official import official_config
from repae.evaluate import npz_images_shape, protocol_path_of
from repae.known_noise import silence_known_noise
from repae.modules.samplers import generate_images
from repae.modules.sit import build_sit, projector_dims
from repae.modules.state_dict import check_state_dict, describe_keys, sub_state_dict
from repae.modules.vae import build_vae, load_checked_state_dict
from repae.protocol import build_protocol
from repae.safe_load import load_weights_only

LABEL_SAMPLINGS = ("equal", "random")
VAE_WEIGHTS_CONFIG_KEY = "vae_weights_path"


def index_seed(global_seed: int, index: int, stream: str) -> int:
    """A 63-bit seed for ``(global_seed, index)`` in a named random ``stream`` ("noise", "labels").

    A cryptographic hash, so nearby seeds and indices give unrelated streams, and the value is the
    same in every process (unlike Python's salted ``hash`` of strings).
    """
    digest = hashlib.sha256(f"{stream}:{global_seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sample_labels(
    num_samples: int, num_classes: int, label_sampling: str = "equal", global_seed: int = 0
) -> torch.Tensor:
    """Class labels of samples ``0 .. num_samples - 1``: int64 [num_samples].

    Samples are taken in blocks of ``num_classes``; block ``b`` gets a permutation of all classes
    (``equal``) or ``num_classes`` uniform draws (``random``) from a generator seeded with
    ``index_seed(global_seed, b, "labels")``. With ``equal`` every prefix of ``k * num_classes`` samples
    holds each class exactly ``k`` times (50,000 samples: 50 per ImageNet class, as the official
    class-balanced sampling), and in any case the class counts differ by at most one. The label of a
    sample never depends on ``num_samples``, so asking for more samples later keeps the earlier ones.
    The official code shuffles one global list instead: the same counts, a different order.
    """
    if label_sampling not in LABEL_SAMPLINGS:
        raise ValueError(f"label_sampling must be one of {LABEL_SAMPLINGS}, got {label_sampling!r}")
    blocks = []
    for block in range(math.ceil(num_samples / num_classes)):
        generator = torch.Generator().manual_seed(index_seed(global_seed, block, "labels"))
        if label_sampling == "equal":
            blocks.append(torch.randperm(num_classes, generator=generator))
        else:
            blocks.append(torch.randint(num_classes, (num_classes,), generator=generator))
    return torch.cat(blocks)[:num_samples] if blocks else torch.zeros(0, dtype=torch.long)


# --- the model --------------------------------------------------------------------------------
class SamplingModel(nn.Module):
    """What sampling needs and nothing else: a (usually EMA) SiT and the VAE that decodes its latents."""

    def __init__(self, sit: nn.Module, vae: nn.Module):
        super().__init__()
        self.sit = sit.eval().requires_grad_(False)
        self.vae = vae.eval().requires_grad_(False)

    @property
    def num_classes(self) -> int:
        return self.sit.num_classes

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.sit.latent_shape

    def generate(self, labels: torch.Tensor, noise: torch.Tensor, **sampler_kwargs) -> torch.Tensor:
        """``labels`` int64 [B], ``noise`` [B, C, h, w] -> uint8 images [B, 3, H, W]."""
        return generate_images(self.sit, self.vae, labels, noise, **sampler_kwargs)


def _load_strict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str, path: str) -> None:
    fits = f"The {what} weights in {path!r} do not fit the model built from its config"
    check_state_dict(module.state_dict(), state_dict, fits)
    module.load_state_dict(state_dict, strict=True)


def _from_lightning_checkpoint(checkpoint: Mapping, path: str, use_ema: bool) -> SamplingModel:
    """A repae checkpoint: architecture from ``hyper_parameters`` (plain dicts naming repae builders)."""
    hparams, state_dict = checkpoint["hyper_parameters"], checkpoint["state_dict"]
    if not isinstance(hparams, Mapping):
        raise ValueError(f"{path!r}: hyper_parameters is a {type(hparams).__name__}, not the model config")
    if hparams.get("mode") == "vae_only":
        raise ValueError(
            f"{path!r} is a model.mode=vae_only checkpoint: it has no SiT, so it has nothing to sample. "
            f"Extract its VAE (python -m repae.convert extract-vae {path} --name NAME) and train a SiT on it "
            "(model.mode=e2e or ldm_only)."
        )
    sit_state = sub_state_dict(state_dict, "ema." if use_ema else "sit.")
    sit = build_model(hparams.get("sit"), "hyper_parameters.sit", z_dims=projector_dims(sit_state))
    vae = build_model(hparams.get("vae"), "hyper_parameters.vae")
    _load_strict(sit, sit_state, "EMA SiT" if use_ema else "SiT", path)
    _load_strict(vae, sub_state_dict(state_dict, "vae."), "VAE", path)
    return SamplingModel(sit, vae)


def _official_args(checkpoint: Mapping, path: str) -> argparse.Namespace | Mapping:
    """The training arguments: ``checkpoint["args"]``, else the ``args.json`` the official training
    writes to ``<exp>/`` (checkpoints live in ``<exp>/checkpoints/``)."""
    if checkpoint.get("args") is not None:
        return checkpoint["args"]
    for directory in (Path(path).parent, Path(path).parent.parent):
        if (directory / "args.json").is_file():
            return json.loads((directory / "args.json").read_text())
    raise ValueError(
        f"{path!r} holds no 'args' and no args.json was found beside it or one folder up: cannot tell the "
        "SiT and VAE configurations (model, vae, resolution, ...) of this official checkpoint."
    )


def _from_official_checkpoint(
    checkpoint: Mapping, path: str, use_ema: bool, vae_weights_path: str | None
) -> SamplingModel:
    """An official ``train_repae.py`` / ``train_ldm_only.py`` checkpoint, built from its ``--`` arguments."""
    config = official_config(_official_args(checkpoint, path), ldm_only="vae" not in checkpoint)
    if "model.vae.name" not in config:
        raise ValueError(f"the training arguments of {path!r} name no --vae: cannot tell its VAE")
    sit_state = checkpoint["ema" if use_ema else "model"]
    vae = build_vae(config["model.vae.name"])
    sit_config = {
        key.removeprefix("model.sit."): value for key, value in config.items() if key.startswith("model.sit.")
    }
    sit = build_sit(**sit_config, z_dims=projector_dims(sit_state))
    _load_strict(sit, sit_state, "EMA SiT" if use_ema else "SiT", path)
    if "vae" in checkpoint:
        _load_strict(vae, checkpoint["vae"], "VAE", path)
    elif vae_weights_path:
        load_checked_state_dict(
            vae, vae_weights_path, config_key=VAE_WEIGHTS_CONFIG_KEY, wrapper_keys=("vae", "state_dict")
        )
    else:
        raise FileNotFoundError(
            f"{path!r} holds no VAE (an LDM-only checkpoint). Set `{VAE_WEIGHTS_CONFIG_KEY}` to the frozen VAE it "
            f"was trained with (its --vae-ckpt, e.g. e2e-vavae-400k.pt)."
        )
    return SamplingModel(sit, vae)


def load_sampling_model(
    ckpt_path: str, use_ema: bool = True, vae_weights_path: str | None = None
) -> SamplingModel:
    """Build the SiT (EMA weights by default) and the VAE of a repae or official REPA-E checkpoint.

    Both load with ``weights_only=True``; the official checkpoints pickle an ``argparse.Namespace``,
    which is allowed explicitly. Memory-mapped, so optimizer states are never read into memory.
    """
    if not os.path.isfile(ckpt_path):
        raise FileNotFoundError(
            f"Checkpoint not found: {ckpt_path!r}. Set `ckpt_path` to a repae .ckpt or an official .pt file."
        )
    checkpoint = load_weights_only(ckpt_path, "ckpt_path", allowed_globals=SAFE_GLOBALS, mmap=True)
    if "state_dict" in checkpoint and "hyper_parameters" in checkpoint:
        return _from_lightning_checkpoint(checkpoint, ckpt_path, use_ema)
    if "ema" in checkpoint:
        return _from_official_checkpoint(checkpoint, ckpt_path, use_ema, vae_weights_path)
    raise ValueError(
        f"{ckpt_path!r} is neither a repae Lightning checkpoint (state_dict + hyper_parameters) nor an official "
        f"REPA-E checkpoint (model/ema/vae/args); its keys are {describe_keys(checkpoint)}."
    )


# --- Lightning predict loop ---------------------------------------------------------------------
def png_path(sample_dir: str | Path, index: int) -> Path:
    return Path(sample_dir) / f"{index:06d}.png"


def save_png(image: np.ndarray, path: Path) -> None:
    """Write a uint8 [H, W, 3] image; via a temporary file and a rename, so no partial PNG is left."""
    temporary = path.with_name(path.name + ".tmp")
    Image.fromarray(image).save(temporary, format="PNG")
    os.replace(temporary, path)


def missing_indices(sample_dir: str | Path, num_samples: int) -> list[int]:
    """Indices in ``[0, num_samples)`` without a PNG in ``sample_dir``."""
    existing = {entry.name for entry in os.scandir(sample_dir)} if os.path.isdir(sample_dir) else set()
    return [index for index in range(num_samples) if f"{index:06d}.png" not in existing]


class GenerationModule(pl.LightningModule):
    """``predict_step``: a batch of sample indices int64 [B] -> ``{"indices", "images" uint8 [B, 3, H, W]}``.

    ``labels`` [num_samples] holds the label of every index; each index's noise comes from its own
    generator on the sampling device, seeded with ``index_seed(global_seed, index, "noise")``.
    """

    def __init__(
        self, model: SamplingModel, labels: torch.Tensor, global_seed: int, sampler: Mapping[str, Any]
    ):
        super().__init__()
        self.model = model
        self.register_buffer("labels", labels, persistent=False)
        self.global_seed = global_seed
        self.sampler = dict(sampler)

    def predict_step(self, indices: torch.Tensor, batch_idx: int) -> dict[str, torch.Tensor]:
        generators = [
            torch.Generator(device=self.device).manual_seed(index_seed(self.global_seed, index, "noise"))
            for index in indices.tolist()
        ]
        noise = torch.stack(
            [torch.randn(self.model.latent_shape, generator=g, device=self.device) for g in generators]
        )
        kwargs = dict(self.sampler)
        if kwargs.get("mode") == "sde":
            kwargs["generator"] = generators
        images = self.model.generate(self.labels[indices], noise, **kwargs)
        return {"indices": indices.cpu(), "images": images.cpu()}


class SampleIndices(pl.LightningDataModule):
    """The indices still missing in ``sample_dir``, split across ranks.

    Rank 0 lists them and broadcasts the list, so every rank shares it even if files appear while the
    ranks start; rank ``r`` of ``W`` takes every ``W``-th missing index from the ``r``-th.
    """

    def __init__(self, sample_dir: str, num_samples: int, batch_size: int):
        super().__init__()
        self.sample_dir = sample_dir
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.all_missing: list[int] = []
        self.indices: list[int] = []

    def setup(self, stage: str) -> None:
        trainer = self.trainer
        missing = missing_indices(self.sample_dir, self.num_samples) if trainer.is_global_zero else None
        self.all_missing = trainer.strategy.broadcast(missing, src=0)
        self.indices = self.all_missing[trainer.global_rank :: trainer.world_size]

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.indices, batch_size=self.batch_size, shuffle=False)


class PNGWriter(BasePredictionWriter):
    """Saves each predicted image as ``{index:06d}.png``; rank 0 shows a progress bar in images/s.

    The bar counts rank 0's images times the number of ranks (they sample equal shares in step).
    """

    def __init__(self, sample_dir: str, show_progress: bool = True):
        super().__init__(write_interval="batch")
        self.sample_dir = sample_dir
        self.show_progress = show_progress
        self.progress: tqdm | None = None

    def on_predict_start(self, trainer, pl_module) -> None:
        os.makedirs(self.sample_dir, exist_ok=True)
        if self.show_progress and trainer.is_global_zero:
            total = len(trainer.datamodule.all_missing)
            self.progress = tqdm(total=total, unit="img", desc="sampling", dynamic_ncols=True)

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ) -> None:
        for index, image in zip(prediction["indices"].tolist(), prediction["images"], strict=True):
            save_png(image.permute(1, 2, 0).numpy(), png_path(self.sample_dir, index))
        if self.progress is not None:
            self.progress.update(
                min(len(prediction["indices"]) * trainer.world_size, self.progress.total - self.progress.n)
            )

    def on_predict_end(self, trainer, pl_module) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None


def write_npz(sample_dir: str | Path, num_samples: int, npz_path: str | Path) -> None:
    """Stack ``{index:06d}.png`` for ``index < num_samples`` into ``npz_path`` as ``arr_0`` uint8 [N, H, W, 3].

    Streams the images into the archive one at a time (50,000 images at 256px are 9.8 GB; the official
    code holds them all in memory), in the layout ``np.savez`` writes (an uncompressed zip holding
    ``arr_0.npy``), then renames the finished file into place.
    """
    first = np.asarray(Image.open(png_path(sample_dir, 0)).convert("RGB"))
    header = {
        "descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
        "fortran_order": False,
        "shape": (num_samples, *first.shape),
    }
    temporary = Path(f"{npz_path}.tmp")
    with zipfile.ZipFile(temporary, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        with archive.open("arr_0.npy", "w", force_zip64=True) as array_file:
            np.lib.format.write_array_header_1_0(array_file, header)
            for index in range(num_samples):
                image = np.asarray(Image.open(png_path(sample_dir, index)).convert("RGB"))
                if image.shape != first.shape:
                    raise ValueError(
                        f"{png_path(sample_dir, index)} is {image.shape}, the first image {first.shape}"
                    )
                array_file.write(image.tobytes())
    os.replace(temporary, npz_path)


def npz_path_of(sample_dir: str | Path) -> Path:
    """``<sample_dir>.npz``, beside the folder (the official naming)."""
    return Path(f"{str(sample_dir).rstrip('/')}.npz")


def generate(cfg: DictConfig, model: SamplingModel | None = None) -> Path:
    """Sample the missing PNGs of ``cfg.sample_dir`` on ``cfg.trainer``'s devices and write the npz.

    ``model`` skips loading ``cfg.ckpt_path``. Returns the path of ``<sample_dir>.npz``.
    """
    if cfg.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if model is None:
        model = load_sampling_model(cfg.ckpt_path, use_ema=cfg.use_ema, vae_weights_path=cfg.vae_weights_path)
    if cfg.compile:  # the samplers call sit.inference; decoding runs the VAE's decoder
        model.sit.inference = torch.compile(model.sit.inference)
        model.vae.decoder.compile()
    labels = sample_labels(cfg.num_samples, model.num_classes, cfg.label_sampling, cfg.global_seed)
    sampler = OmegaConf.to_container(cfg.sampler, resolve=True)
    module = GenerationModule(model, labels, cfg.global_seed, sampler)
    sample_dir = str(cfg.sample_dir)
    npz_path = npz_path_of(sample_dir)

    # Every rank lists the missing PNGs before any rank can write one (ranks only write after they
    # have all joined inside `predict`), so all of them agree on whether there is work left.
    sampled = bool(missing_indices(sample_dir, cfg.num_samples))
    if sampled:
        trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=[PNGWriter(sample_dir, cfg.progress_bar)])
        start = time.perf_counter()
        datamodule = SampleIndices(sample_dir, cfg.num_samples, cfg.batch_size)
        trainer.predict(module, datamodule=datamodule, return_predictions=False)
        trainer.strategy.barrier()
        elapsed = time.perf_counter() - start
        count = len(datamodule.all_missing)
        rank_zero_info(
            f"Sampled {count} images in {elapsed:.1f} s ({count / elapsed:.2f} images/s) into {sample_dir}"
        )
    # Set by the launcher (torchrun, SLURM, Lightning's DDP) or by the Trainer: one writer of the npz.
    if rank_zero_only.rank != 0:
        return npz_path
    still_missing = missing_indices(sample_dir, cfg.num_samples)
    if still_missing:
        raise RuntimeError(
            f"{len(still_missing)} samples are missing in {sample_dir} (first: {still_missing[:5]})"
        )
    # As the official script, keep a finished npz; rebuild it when samples were added or the count changed.
    if sampled or not npz_path.is_file() or npz_images_shape(str(npz_path))[0] != cfg.num_samples:
        write_npz(sample_dir, cfg.num_samples, npz_path)
        rank_zero_info(f"Wrote {npz_path} (arr_0: {cfg.num_samples} images)")
    protocol_path_of(sample_dir).write_text(json.dumps(generation_protocol(cfg), indent=2))
    return npz_path


def generation_protocol(cfg: DictConfig) -> dict:
    """The protocol record of the samples of ``cfg`` (``<sample_dir>.json``, read by ``repae.evaluate``)."""
    return build_protocol(
        num_samples=cfg.num_samples,
        label_sampling=cfg.label_sampling,
        sampler=OmegaConf.to_container(cfg.sampler, resolve=True),
        seeds={"global_seed": cfg.global_seed},
        precision=f"{cfg.trainer.precision}{' + tf32' if cfg.tf32 else ''}",
        compile=cfg.compile,
        use_ema=cfg.use_ema,
        checkpoint_path=OmegaConf.select(cfg, "ckpt_path", throw_on_missing=False),
    )


@hydra.main(version_base="1.3", config_path="../conf", config_name="generate")
def main(cfg: DictConfig) -> None:
    silence_known_noise()
    # Batches of sample indices need no loader workers; Lightning suggests them all the same.
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    with exit_on_bad_input():
        generate(cfg)


if __name__ == "__main__":
    main()
