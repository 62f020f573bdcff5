"""Config helpers: plain containers from OmegaConf configs, and models built from config data with
repae's own builders only.

A checkpoint stores its model config (``hyper_parameters``: dicts whose ``_target_`` names a builder)
so that it rebuilds its architecture alone. That data comes from a file, possibly someone else's:
handed to Hydra's ``instantiate``, a ``_target_`` such as ``numpy.savetxt`` or ``builtins.open``
would write or truncate any file the user can write. ``build_model`` calls only the builders listed in
``MODEL_BUILDERS`` and passes them only plain values, so config data chooses sizes and names, never
code.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

# Every _target_ of conf/model/**, the only callables a model config may name.
MODEL_BUILDERS = (
    "repae.modules.sit.build_sit",
    "repae.modules.vae.build_vae",
    "repae.modules.losses.VAERegularizationLoss",
    "repae.modules.discriminator.NLayerDiscriminator",
    "repae.modules.perceptual.LPIPS",
    "repae.modules.perceptual.EfficientNetPerceptual",
)
PLAIN_TYPES = (str, int, float, bool, type(None))


def to_plain(config: Any) -> Any:
    """DictConfig -> plain dict/list, so hyperparameters load with torch.load(weights_only=True)."""
    if isinstance(config, DictConfig):
        return OmegaConf.to_container(config, resolve=True)
    if isinstance(config, Mapping):
        return {key: to_plain(value) for key, value in config.items()}
    return config


def build_model(config: Any, key: str, **kwargs: Any) -> Any:
    """``builder(**entries, **kwargs)`` for a config ``{"_target_": builder, **entries}``, as Hydra's
    ``instantiate`` would, but only for a builder in ``MODEL_BUILDERS`` and plain entries (str, int,
    float, bool, None, and lists and dicts of them); an entry that is itself a config with a
    ``_target_`` is built the same way first. ``kwargs`` come from the caller's code and are passed as
    they are.

    Args:
        config: a plain dict (from a checkpoint's ``hyper_parameters`` or a composed config).
        key: where ``config`` comes from, e.g. ``hyper_parameters.vae``, named by the errors.

    Raises:
        ValueError: another ``_target_``, any other Hydra ``_key_``, or a value that is not plain.
    """
    if not isinstance(config, Mapping) or "_target_" not in config:
        raise ValueError(f"{key} must be a config with a _target_ naming one of {', '.join(MODEL_BUILDERS)}")
    target = config["_target_"]
    if target not in MODEL_BUILDERS:
        raise ValueError(
            f"{key}._target_={target!r} is not a repae model builder (allowed: {', '.join(MODEL_BUILDERS)})"
        )
    entries = _plain({name: value for name, value in config.items() if name != "_target_"}, key)
    module, name = target.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**{**entries, **kwargs})


def _plain(value: Any, key: str) -> Any:
    """``value`` checked to be plain data; nested configs with a ``_target_`` built by ``build_model``."""
    if isinstance(value, PLAIN_TYPES):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(item, f"{key}[{index}]") for index, item in enumerate(value)]
    if isinstance(value, Mapping):
        if "_target_" in value:
            return build_model(value, key)
        for name in value:
            if not isinstance(name, str) or (name.startswith("_") and name.endswith("_")):
                raise ValueError(f"{key} has the key {name!r}: model configs hold plain names only")
        return {name: _plain(item, f"{key}.{name}") for name, item in value.items()}
    raise ValueError(f"{key} is a {type(value).__name__}: model configs hold plain values only")
