"""Callbacks that sample from the EMA model during training: image grids and FID / FD-EffNet.

Both rely on the LightningModule exposing

- ``generate(labels int64 [B], noise [B, C, h, w], **sampler_kwargs) -> uint8 images [B, 3, H, W]``
  (EMA SiT + sampler + VAE decode with the EMA BatchNorm statistics),
- ``num_classes``, ``latent_shape`` ``(C, h, w)`` and ``step`` (REPA-E iterations: one per batch).

A module without a SiT (``model.mode=vae_only``) has nothing to sample: both callbacks then warn once
and do nothing.

Schedules use ``pl_module.step``, never ``trainer.global_step`` (which counts the three optimizer steps
of each batch). ``sampler_kwargs`` are forwarded to ``generate`` (``mode``, ``num_steps``, ``cfg_scale``,
``guidance_low``, ``guidance_high``, ``heun``, ``path_type``); in SDE mode a seeded ``generator`` is added
so the sampling noise is reproducible too.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.utils import make_grid

from repae.callbacks.run import current_step, run_dir, training_complete
from repae.metrics import (
    EfficientNetFeatures,
    FeatureStatistics,
    InceptionFeatures,
    frechet_distance,
    load_reference_statistics,
    save_reference_statistics,
)
from repae.protocol import build_protocol, check_reference, feature_resolution, reference_record_arrays

log = logging.getLogger(__name__)

REFERENCE_STATS_CONFIG_KEY = "callbacks.fid.reference_stats_path"
REFERENCE_IMAGES_CONFIG_KEY = "callbacks.fid.reference_from_datamodule_images"


def _with_generator(sampler_kwargs: dict, seed: int, device: torch.device) -> dict:
    """Add a seeded ``generator`` for the SDE noise (the ODE sampler is deterministic and takes none)."""
    if sampler_kwargs.get("mode", "ode") != "sde":
        return dict(sampler_kwargs)
    return {**sampler_kwargs, "generator": torch.Generator(device=device).manual_seed(seed)}


def samples_from(callback: Callback, pl_module: LightningModule) -> bool:
    """Whether ``pl_module`` has a SiT to sample from (any mode but vae_only); warns if not."""
    if getattr(pl_module, "mode", None) != "vae_only":
        return True
    rank_zero_warn(f"{type(callback).__name__} does nothing: this model has no SiT (model.mode=vae_only)")
    return False


def images_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Data-loader images to uint8 [B, 3, H, W].

    uint8 passes through; floats are taken in [-1, 1] (the VAE input range) and converted like the
    official sample saving: ``clamp(255 (x + 1) / 2, 0, 255)`` truncated. Grey images are repeated to RGB.
    """
    if images.dtype != torch.uint8:
        images = torch.clamp(255.0 * (images.float() + 1) / 2, 0, 255).to(torch.uint8)
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return images


def _images_of_batch(batch) -> torch.Tensor:
    """The image tensor of a training batch: the batch itself, its first element, or ``batch["image(s)"]``."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, dict):
        for key in ("image", "images"):
            if key in batch:
                return batch[key]
        raise ValueError(f"No 'image'/'images' entry in the batch (keys: {list(batch)})")
    return batch[0]


class ImageGridCallback(Callback):
    """Every ``every_n_steps`` iterations (and when training completes), sample a grid of images with fixed inputs.

    Labels and initial noise are drawn once from ``seed`` so successive grids show the same samples
    evolving. ``labels`` (optional) are repeated cyclically to ``num_images``; by default they are
    random classes. The grid (``ceil(sqrt(num_images))`` images per row, 2-pixel padding) is written as
    a PNG named ``filename_template.format(step=...)`` under the run directory on rank 0, and sent to
    TensorBoard (``add_image``) or W&B (``log_image``) when such a logger is active.
    """

    def __init__(
        self,
        every_n_steps: int,
        num_images: int = 16,
        labels: list[int] | None = None,
        seed: int = 0,
        filename_template: str = "samples_step{step:07d}.png",
        **sampler_kwargs,
    ):
        if every_n_steps <= 0 or num_images <= 0:
            raise ValueError("every_n_steps and num_images must be positive")
        self.every_n_steps = every_n_steps
        self.num_images = num_images
        self.labels = list(labels) if labels is not None else None
        self.seed = seed
        self.filename_template = filename_template
        self.sampler_kwargs = sampler_kwargs
        self._fixed_inputs: tuple[torch.Tensor, torch.Tensor] | None = None
        self._last_step: int | None = None
        self.enabled = True

    def fixed_inputs(self, pl_module: LightningModule) -> tuple[torch.Tensor, torch.Tensor]:
        """The labels int64 [N] and noise [N, C, h, w] used for every grid (CPU, drawn once)."""
        if self._fixed_inputs is None:
            generator = torch.Generator().manual_seed(self.seed)
            noise = torch.randn(self.num_images, *pl_module.latent_shape, generator=generator)
            if self.labels is None:
                labels = torch.randint(0, pl_module.num_classes, (self.num_images,), generator=generator)
            else:
                labels = torch.tensor([self.labels[i % len(self.labels)] for i in range(self.num_images)])
            self._fixed_inputs = labels, noise
        return self._fixed_inputs

    @torch.no_grad()
    def sample_grid(self, pl_module: LightningModule) -> torch.Tensor:
        """Sample the fixed inputs and tile them: uint8 [3, H_grid, W_grid] on the CPU."""
        labels, noise = self.fixed_inputs(pl_module)
        kwargs = _with_generator(self.sampler_kwargs, self.seed, pl_module.device)
        images = pl_module.generate(labels.to(pl_module.device), noise.to(pl_module.device), **kwargs)
        return make_grid(images.cpu(), nrow=math.ceil(math.sqrt(self.num_images)), padding=2)

    def _log_grid(self, trainer: Trainer, pl_module: LightningModule) -> None:
        step = current_step(pl_module)
        if step == self._last_step:
            return
        self._last_step = step
        # All ranks sample (cheap), so no rank waits in a collective that rank 0 alone might enter.
        grid = self.sample_grid(pl_module)
        directory = run_dir(trainer)
        if not trainer.is_global_zero:
            return
        path = os.path.join(directory, self.filename_template.format(step=step))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        Image.fromarray(grid.permute(1, 2, 0).numpy()).save(path)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("samples", grid, global_step=step)
            elif isinstance(logger, WandbLogger):
                logger.log_image(key="samples", images=[grid.permute(1, 2, 0).numpy()], step=step)

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.enabled = samples_from(self, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.enabled and current_step(pl_module) % self.every_n_steps == 0:
            self._log_grid(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.enabled and training_complete(pl_module):
            self._log_grid(trainer, pl_module)


class DistributionMetricCallback(Callback):
    """FID (Inception) or FD-EffNet (EfficientNet-Lite0) of EMA samples, every ``every_n_steps`` and/or at
    the listed ``steps``, and when training completes (not when a requeue signal stops the run early).

    Each evaluation samples ``num_samples`` images on all ranks together (each rank its contiguous share
    of a class-balanced, shuffled label list, noise from the per-rank seed ``seed * world_size + rank``,
    so every evaluation uses the same samples), accumulates :class:`FeatureStatistics`, sums them across
    ranks and logs the Fréchet distance to the reference as ``fid`` or ``fd_effnet``. With
    ``use_ema=false`` it samples the raw (trained, non-EMA) SiT instead and logs ``fid_raw`` /
    ``fd_effnet_raw``: a second instance that tells how far the EMA lags behind the model it averages.

    Reference statistics: ``reference_stats_path`` (ADM-style npz with ``mu``/``sigma``, or images
    ``arr_0`` whose features are computed with this callback's extractor). If that file does not exist
    (or no path is given) and ``reference_dataset`` is given (a dataset of ``{"image": uint8 [3,H,W]}``
    samples, e.g. a held-out test split), they are computed once, on rank 0, from all its images; else, with
    ``reference_from_datamodule_images = N``, from the first N images of a fresh
    ``trainer.datamodule.train_dataloader()`` (else the trainer's train loader). Either is written to
    ``reference_stats_path`` when given. Handy for the demo and the reproduction study; for
    published-number comparisons use the ADM reference batch with Inception.

    The feature extractor lives in this callback, not in the LightningModule, so it never enters checkpoints.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        every_n_steps: int | None = None,
        steps: list[int] | None = None,
        feature_extractor: str = "effnet",
        reference_stats_path: str | None = None,
        reference_from_datamodule_images: int | None = None,
        reference_dataset: Dataset | None = None,
        inception_weights_path: str | None = None,
        effnet_resolution: int = 128,
        seed: int = 0,
        use_ema: bool = True,
        **sampler_kwargs,
    ):
        if feature_extractor not in ("inception", "effnet"):
            raise ValueError(f"feature_extractor must be 'inception' or 'effnet', got {feature_extractor!r}")
        if num_samples < 2 or batch_size <= 0 or (every_n_steps is not None and every_n_steps <= 0):
            raise ValueError("num_samples must be >= 2; batch_size and every_n_steps positive")
        if every_n_steps is None and not steps:
            raise ValueError("set every_n_steps or steps (a list of steps to evaluate at), or both")
        if (
            reference_stats_path is None
            and not reference_from_datamodule_images
            and reference_dataset is None
        ):
            raise ValueError(
                f"No reference for the Fréchet distance: set `{REFERENCE_STATS_CONFIG_KEY}` (npz with mu/sigma "
                f"or images arr_0), `callbacks.fid.reference_dataset` (a dataset config) or "
                f"`{REFERENCE_IMAGES_CONFIG_KEY}` (number of training images)."
            )
        self.every_n_steps = every_n_steps
        self.steps = set(steps or ())
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.feature_extractor_name = feature_extractor
        self.use_ema = use_ema
        self.metric_name = ("fid" if feature_extractor == "inception" else "fd_effnet") + (
            "" if use_ema else "_raw"
        )
        self.reference_stats_path = reference_stats_path
        self.reference_from_datamodule_images = reference_from_datamodule_images
        self.reference_dataset = reference_dataset
        self.inception_weights_path = inception_weights_path
        self.effnet_resolution = effnet_resolution
        self.seed = seed
        self.sampler_kwargs = sampler_kwargs
        self.feature_extractor: torch.nn.Module | None = None
        self.reference: tuple[np.ndarray, np.ndarray] | None = None
        self._last_step: int | None = None
        self.enabled = True

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.enabled = samples_from(self, pl_module)
        if self.enabled and self.feature_extractor is None:
            if self.feature_extractor_name == "inception":
                self.feature_extractor = InceptionFeatures(
                    self.inception_weights_path, config_key="callbacks.fid.inception_weights_path"
                )
            else:
                self.feature_extractor = EfficientNetFeatures(self.effnet_resolution)

    def _extractor(self, device: torch.device) -> torch.nn.Module:
        return self.feature_extractor.to(device).eval()

    def _reference_statistics(
        self, trainer: Trainer, pl_module: LightningModule
    ) -> tuple[np.ndarray, np.ndarray]:
        if self.reference is not None:
            return self.reference
        path = self.reference_stats_path
        if path is not None and os.path.isfile(path):
            check_reference_record(self, path)
            self.reference = load_reference_statistics(
                path, self._extractor(pl_module.device), self.batch_size, pl_module.device
            )
        elif self.reference_dataset is not None or self.reference_from_datamodule_images:
            reference = (
                self._statistics_of_reference_images(trainer, pl_module) if trainer.is_global_zero else None
            )
            self.reference = trainer.strategy.broadcast(reference, src=0)
            if trainer.is_global_zero and path is not None:
                save_reference_statistics(path, *self.reference, **reference_record(self))
        else:
            raise FileNotFoundError(
                f"Reference statistics {path!r} not found. Point `{REFERENCE_STATS_CONFIG_KEY}` at an npz with "
                f"mu/sigma (or images arr_0), or set `{REFERENCE_IMAGES_CONFIG_KEY}` to build it from training data."
            )
        return self.reference

    @torch.no_grad()
    def _statistics_of_reference_images(self, trainer: Trainer, pl_module: LightningModule):
        extractor = self._extractor(pl_module.device)
        statistics = FeatureStatistics(extractor.num_features, device=pl_module.device)
        if self.reference_dataset is not None:
            for batch in DataLoader(self.reference_dataset, batch_size=self.batch_size):
                statistics.update(extractor(images_to_uint8(_images_of_batch(batch).to(pl_module.device))))
            return statistics.compute()
        datamodule = trainer.datamodule
        loader = datamodule.train_dataloader() if datamodule is not None else trainer.train_dataloader
        remaining = self.reference_from_datamodule_images
        for batch in loader:
            images = images_to_uint8(_images_of_batch(batch)[:remaining].to(pl_module.device))
            statistics.update(extractor(images))
            remaining -= images.shape[0]
            if remaining <= 0:
                break
        if remaining > 0:
            raise ValueError(
                f"The training data has only {self.reference_from_datamodule_images - remaining} images, "
                f"fewer than `{REFERENCE_IMAGES_CONFIG_KEY}` = {self.reference_from_datamodule_images}"
            )
        return statistics.compute()

    def labels_for_rank(self, num_classes: int, world_size: int, rank: int) -> torch.Tensor:
        """This rank's labels: a contiguous shard of a shuffled, class-balanced list of ``num_samples``.

        The list is the same on every rank (shuffled with ``seed``), so the shards partition it.
        """
        generator = torch.Generator().manual_seed(self.seed)
        order = torch.randperm(self.num_samples, generator=generator)
        all_labels = (torch.arange(self.num_samples) % num_classes)[order]
        share, extra = divmod(self.num_samples, world_size)
        start = rank * share + min(rank, extra)
        return all_labels[start : start + share + (rank < extra)]

    @torch.no_grad()
    def sample_statistics(self, trainer: Trainer, pl_module: LightningModule) -> FeatureStatistics:
        """Features of ``num_samples`` samples (of the EMA SiT, or the raw one), summed over all ranks."""
        device = pl_module.device
        extractor = self._extractor(device)
        rank_seed = self.seed * trainer.world_size + trainer.global_rank
        noise_generator = torch.Generator().manual_seed(rank_seed)
        kwargs = _with_generator(self.sampler_kwargs, rank_seed, device)
        statistics = FeatureStatistics(extractor.num_features, device=device)
        labels = self.labels_for_rank(pl_module.num_classes, trainer.world_size, trainer.global_rank)
        batches = labels.split(self.batch_size)
        # Ranks' shares differ by one image at most, but every rank must run as many model passes as
        # the others: with a sharded EMA (trainer=fsdp) each pass is a collective. A rank short of a
        # batch samples one throw-away image.
        most_batches = math.ceil(math.ceil(self.num_samples / trainer.world_size) / self.batch_size)
        for index in range(most_batches):
            batch_labels = batches[index] if index < len(batches) else torch.zeros(1, dtype=torch.long)
            noise = torch.randn(len(batch_labels), *pl_module.latent_shape, generator=noise_generator)
            images = pl_module.generate(
                batch_labels.to(device), noise.to(device), use_ema=self.use_ema, **kwargs
            )
            if index < len(batches):
                statistics.update(extractor(images))
        if trainer.world_size > 1:
            for state in statistics.state_tensors():
                state.copy_(trainer.strategy.reduce(state, reduce_op="sum"))
        return statistics

    def evaluate(self, trainer: Trainer, pl_module: LightningModule) -> float:
        """Sample, compare with the reference, log ``metric_name`` at ``pl_module.step``; returns it."""
        reference = self._reference_statistics(trainer, pl_module)
        started = time.perf_counter()
        statistics = self.sample_statistics(trainer, pl_module)
        moments = statistics.compute()
        sampled = time.perf_counter()
        # Every rank holds the same summed statistics; only rank 0 pays for the matrix square root.
        value = frechet_distance(*moments, *reference) if trainer.is_global_zero else 0.0
        value = trainer.strategy.broadcast(value, src=0)
        step = current_step(pl_module)
        if trainer.is_global_zero:  # an evaluation stops training: its cost belongs next to the step rate
            log.info(
                f"{self.metric_name} at step {step}: {value:.4f} ({self.num_samples} samples and their "
                f"features {sampled - started:.1f} s, Fréchet distance {time.perf_counter() - sampled:.1f} s)"
            )
        # Logged straight to the loggers: `self.log` would only reach them on `log_every_n_steps`
        # boundaries and is not allowed in on_train_end. callback_metrics makes it monitorable.
        for logger in trainer.loggers:
            logger.log_metrics({self.metric_name: value}, step=step)
        trainer.callback_metrics[self.metric_name] = torch.tensor(value)
        write_metric_protocol(self, trainer, pl_module)
        return value

    def _maybe_evaluate(self, trainer: Trainer, pl_module: LightningModule) -> None:
        step = current_step(pl_module)
        if step != self._last_step:
            self._last_step = step
            self.evaluate(trainer, pl_module)

    def due(self, step: int) -> bool:
        return step in self.steps or (self.every_n_steps is not None and step % self.every_n_steps == 0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.enabled and self.due(current_step(pl_module)):
            self._maybe_evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.enabled and training_complete(pl_module):
            self._maybe_evaluate(trainer, pl_module)


# --- the protocol of the Fréchet distances this callback logs (repae/protocol.py) --------------------
def _resolution(callback: DistributionMetricCallback) -> int:
    return feature_resolution(callback.feature_extractor_name, callback.effnet_resolution)


def reference_record(callback: DistributionMetricCallback) -> dict[str, np.ndarray]:
    """The arrays that record this callback's extractor and resolution in the reference file it writes."""
    return reference_record_arrays(callback.feature_extractor_name, _resolution(callback))


def check_reference_record(callback: DistributionMetricCallback, path: str) -> None:
    """Refuse reference statistics made with another extractor or resolution; warn if unrecorded."""
    with np.load(path) as data:
        holds_statistics = "mu" in data.files
    if holds_statistics:
        warning = check_reference(path, callback.feature_extractor_name, _resolution(callback))
        if warning:
            rank_zero_warn(warning)


def metric_protocol(
    callback: DistributionMetricCallback, trainer: Trainer, pl_module: LightningModule
) -> dict:
    """The protocol record of the logged metric: samples of the running model, class-balanced labels."""
    return build_protocol(
        num_samples=callback.num_samples,
        label_sampling="equal",
        sampler=callback.sampler_kwargs,
        seeds={"seed": callback.seed},
        precision=str(trainer.precision),
        compile=getattr(pl_module, "compile_models", None),
        use_ema=callback.use_ema,
        reference_path=callback.reference_stats_path,
        inception_weights_path=callback.inception_weights_path,
        feature_extractor=callback.feature_extractor_name,
        feature_resolution=_resolution(callback),
    )


def write_metric_protocol(
    callback: DistributionMetricCallback, trainer: Trainer, pl_module: LightningModule
) -> None:
    """Write ``<run dir>/<metric>_protocol.json`` and hand the record to every logger as hyperparameters."""
    if not trainer.is_global_zero:
        return
    protocol = metric_protocol(callback, trainer, pl_module)
    path = os.path.join(run_dir(trainer), f"{callback.metric_name}_protocol.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(protocol, f, indent=2)
    for logger in trainer.loggers:
        logger.log_hyperparams({f"{callback.metric_name}_protocol": protocol})
