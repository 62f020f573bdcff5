"""Types and ranges of the documented training keys, checked once before a run starts.

A wrong value (``model.proj_coeff=abc``, ``model.max_train_steps=2.5``) would otherwise surface as a
traceback deep in the first step, or as a run that does nothing and exits 0. ``check_training_config``
raises one ``ConfigValueError`` naming the key; a key the config does not have (``model.loss`` is
null in LDM-only runs, a callback switched off) is not checked.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from repae.module import MODES


class ConfigValueError(ValueError):
    """A config value of the wrong type or out of range; the message names the key."""


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


# key -> (kind, range test on the value, the range in words)
INTEGER, NUMBER, BOOLEAN = "an integer", "a number", "true or false"
CHECKS: dict[str, tuple[str, Callable[[Any], bool], str]] = {
    "seed": (INTEGER, lambda v: v >= 0, ">= 0"),
    "resume": (BOOLEAN, lambda v: True, ""),
    "resume_skip_checksum": (BOOLEAN, lambda v: True, ""),
    "model.max_train_steps": (INTEGER, lambda v: v > 0, "> 0"),
    "model.ema_decay": (NUMBER, lambda v: 0 <= v <= 1, "in [0, 1]"),
    "model.proj_coeff": (NUMBER, lambda v: v >= 0, ">= 0"),
    "model.vae_align_proj_coeff": (NUMBER, lambda v: v >= 0, ">= 0"),
    "model.vae_denoising_coeff": (NUMBER, lambda v: v >= 0, ">= 0"),
    "model.max_grad_norm": (NUMBER, lambda v: v > 0, "> 0"),
    "model.max_consecutive_nonfinite": (INTEGER, lambda v: v > 0, "> 0"),
    "model.optimizer.learning_rate": (NUMBER, lambda v: v >= 0, ">= 0"),
    "model.optimizer.vae_learning_rate": (NUMBER, lambda v: v >= 0, ">= 0"),
    "model.optimizer.disc_learning_rate": (NUMBER, lambda v: v >= 0, ">= 0"),
    "model.optimizer.adam_beta1": (NUMBER, lambda v: 0 <= v < 1, "in [0, 1)"),
    "model.optimizer.adam_beta2": (NUMBER, lambda v: 0 <= v < 1, "in [0, 1)"),
    "model.optimizer.adam_weight_decay": (NUMBER, lambda v: v >= 0, ">= 0"),
    "model.optimizer.adam_epsilon": (NUMBER, lambda v: v > 0, "> 0"),
    "model.loss.discriminator_start": (INTEGER, lambda v: v >= 0, ">= 0"),
    "model.loss.kl_weight": (NUMBER, lambda v: v >= 0, ">= 0"),
    "model.loss.perceptual_weight": (NUMBER, lambda v: v >= 0, ">= 0"),
    "model.loss.reconstruction_weight": (NUMBER, lambda v: v >= 0, ">= 0"),
    "model.loss.discriminator_weight": (NUMBER, lambda v: v >= 0, ">= 0"),
    "model.sit.class_dropout_prob": (NUMBER, lambda v: 0 <= v < 1, "in [0, 1)"),
    "data.batch_size": (INTEGER, lambda v: v > 0, "> 0"),
    "data.num_workers": (INTEGER, lambda v: v >= 0, ">= 0"),
    "callbacks.checkpoint.every_n_steps": (INTEGER, lambda v: v > 0, "> 0"),
    "callbacks.image_grid.every_n_steps": (INTEGER, lambda v: v > 0, "> 0"),
    "callbacks.loss_curve.every_n_steps": (INTEGER, lambda v: v > 0, "> 0"),
    "trainer.log_every_n_steps": (INTEGER, lambda v: v > 0, "> 0"),
}
CHOICES: dict[str, tuple[str, ...]] = {
    "model.mode": MODES,
    "data.on_corrupt": ("error", "skip"),
}
KIND_TESTS = {INTEGER: _integer, NUMBER: _number, BOOLEAN: lambda v: isinstance(v, bool)}


def check_training_config(cfg: DictConfig) -> None:
    """Raise ``ConfigValueError`` for the first documented key of the wrong type or out of range."""
    for key, (kind, in_range, words) in CHECKS.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is None:
            continue
        if not KIND_TESTS[kind](value):
            raise ConfigValueError(f"{key} must be {kind}, got {value!r}")
        if not in_range(value):
            raise ConfigValueError(f"{key} must be {words}, got {value!r}")
    for key, choices in CHOICES.items():
        value = OmegaConf.select(cfg, key, default=None)
        if value is not None and value not in choices:
            raise ConfigValueError(f"{key} must be one of {', '.join(choices)}, got {value!r}")


# Files a run reads, by config key: what to put there. The pretrained files are read only when a run
# starts, not when it resumes.
PRETRAINED_FILES = {
    "model.vae_weights_path": "the VAE's weights (REPA-E's released VAEs, or repae's VAE extraction)",
    "model.latents_stats_path": "the '<vae>-latents-stats.pt' file released or extracted with the VAE",
    "model.discriminator_weights_path": "the '<vae>-discriminator-ckpt.pt' file released or extracted with the VAE",
}
WEIGHT_FILES = {
    "model.encoder.weights_paths": "each alignment encoder's original release file (README, local weights)",
    "model.loss.perceptual.vgg_weights_path": "torchvision's VGG16 ImageNet weights, vgg16-397923af.pth",
    "callbacks.fid.inception_weights_path": "torch-fidelity's FID Inception weights",
    "callbacks.vae_health.inception_weights_path": "torch-fidelity's FID Inception weights, or null",
}


def missing_input_files(cfg: DictConfig, resuming: bool) -> list[str]:
    """Every configured input file that does not exist, as ``key=path (what to put there)``, so a run
    reports them all at once instead of one per start-up."""
    expected = dict(WEIGHT_FILES) if resuming else {**PRETRAINED_FILES, **WEIGHT_FILES}
    missing = []
    for key, what in expected.items():
        value = OmegaConf.select(cfg, key, default=None)
        paths = [value] if isinstance(value, str) else list(value or [])
        missing += [f"{key}={path} ({what})" for path in paths if not Path(path).is_file()]
    dataset = OmegaConf.select(cfg, "data.dataset", default=None)
    if dataset is not None and str(dataset.get("_target_", "")).endswith(".H5Images"):
        images = Path(dataset.data_dir) / "images.h5"
        if not images.is_file():
            missing.append(
                f"data.dataset.data_dir={dataset.data_dir} has no images.h5 (make it with python -m repae.preprocess "
                f"input_dir=<ImageNet train folder> output_dir={dataset.data_dir})"
            )
    return missing
