"""An official ``train_repae.py`` / ``train_ldm_only.py`` checkpoint -> a repae Lightning checkpoint that
``python -m repae.train ckpt_path=...`` resumes and ``REPAE.load_from_checkpoint`` loads, and the one
mapping of the official training arguments to repae's config.

The official arguments come from the checkpoint, a file possibly from someone else: each is checked
to be a plain value of its expected type (names: letters, digits and ``_ . + / -``) before it becomes a
Hydra override, so a value cannot add overrides, interpolations (``${...}``) or a ``_target_``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig
from torch import Tensor, nn

from repae.config import build_model, to_plain
from repae.convert.checkpoints import StateDict, load_checkpoint, training_components
from repae.modules.sit import projector_dims
from repae.modules.state_dict import check_state_dict
from repae.modules.vae import VAE_CONFIGS

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
PRECISIONS = {"no": "32-true", "fp16": "16-mixed", "bf16": "bf16-mixed"}
# Official argument -> (repae config key, type of its value).
OFFICIAL_ARGUMENTS: dict[str, tuple[str, type]] = {
    "model": ("model.sit.name", str), "num_classes": ("model.sit.num_classes", int),
    "encoder_depth": ("model.sit.encoder_depth", int), "qk_norm": ("model.sit.qk_norm", bool),
    "fused_attn": ("model.sit.fused_attn", bool), "cfg_prob": ("model.sit.class_dropout_prob", float),
    "path_type": ("model.sit.path_type", str), "weighting": ("model.sit.weighting", str),
    "enc_type": ("model.encoder.names", str), "proj_coeff": ("model.proj_coeff", float),
    "max_grad_norm": ("model.max_grad_norm", float), "max_train_steps": ("model.max_train_steps", int),
    "learning_rate": ("model.optimizer.learning_rate", float), "adam_beta1": ("model.optimizer.adam_beta1", float),
    "adam_beta2": ("model.optimizer.adam_beta2", float),
    "adam_weight_decay": ("model.optimizer.adam_weight_decay", float),
    "adam_epsilon": ("model.optimizer.adam_epsilon", float), "batch_size": ("data.batch_size", int),
    "seed": ("seed", int),
}  # fmt: skip
# Arguments of train_repae.py only: train_ldm_only.py trains no VAE and fixes the SiT's BatchNorm.
E2E_ARGUMENTS: dict[str, tuple[str, type]] = {
    "bn_momentum": ("model.sit.bn_momentum", float),
    "vae_align_proj_coeff": ("model.vae_align_proj_coeff", float),
    "vae_learning_rate": ("model.optimizer.vae_learning_rate", float),
    "disc_learning_rate": ("model.optimizer.disc_learning_rate", float),
}
OFFICIAL_RESOLUTION = 256  # the official --resolution default
# A model, encoder or path name; several encoders are comma-separated (--enc-type).
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+/-]*(,[A-Za-z0-9][A-Za-z0-9_.+/-]*)*")
# Unquoted, Hydra would read these names as another type.
HYDRA_KEYWORDS = {"null", "true", "false", "inf", "nan"}


def _checked(name: str, value: Any, kind: type) -> Any:
    """The official argument ``name``'s ``value`` if it is a ``kind`` (ints pass as floats, names match
    ``NAME``), else a ValueError."""
    if kind is float and type(value) is int:
        value = float(value)
    if type(value) is not kind or (kind is str and not NAME.fullmatch(value)):
        what = {str: "a name (letters, digits, _ . + / - and commas)", int: "an integer", float: "a number",
                bool: "a boolean"}[kind]  # fmt: skip
        raise ValueError(f"the official checkpoint's args.{name}={value!r} is not {what}")
    return value


def official_config(args: argparse.Namespace | Mapping[str, Any], ldm_only: bool) -> dict[str, Any]:
    """The values of repae config keys (``model.sit.name``, ...) that reproduce an official run's
    arguments (an official checkpoint's ``args`` or its ``args.json``), each type-checked.

    Arguments a run did not record are left out (repae's defaults are the official ones), except the
    resolution, which sets the SiT's input size for the run's VAE.
    """
    if isinstance(args, argparse.Namespace):
        values = vars(args)
    elif isinstance(args, Mapping):
        values = dict(args)
    else:
        raise ValueError(
            f"the official checkpoint's args are a {type(args).__name__}, not the training arguments"
        )
    config: dict[str, Any] = {}
    if "vae" in values:
        vae = values["vae"]
        if not isinstance(vae, str) or vae not in VAE_CONFIGS:
            raise ValueError(f"the official run used --vae {vae!r}, unknown to repae ({sorted(VAE_CONFIGS)})")
        vae_config = VAE_CONFIGS[vae]
        resolution = _checked("resolution", values.get("resolution", OFFICIAL_RESOLUTION), int)
        config["model.vae.name"] = vae
        config["model.sit.in_channels"] = vae_config["embed_dim"]
        config["model.sit.input_size"] = resolution // 2 ** (len(vae_config["ch_mult"]) - 1)
    arguments = OFFICIAL_ARGUMENTS if ldm_only else {**OFFICIAL_ARGUMENTS, **E2E_ARGUMENTS}
    config.update(
        {key: _checked(name, values[name], kind) for name, (key, kind) in arguments.items() if name in values}
    )
    precision = values.get("mixed_precision")
    if isinstance(precision, str) and precision in PRECISIONS:
        config["trainer.precision"] = PRECISIONS[precision]
    return config


def _hydra_value(value: Any) -> str:
    """A checked official value as a Hydra command-line value: names are single-quoted unless Hydra
    reads them as the same string unquoted (``NAME`` admits no quote, ``$`` or backslash)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        plain = re.fullmatch(r"[A-Za-z][A-Za-z0-9_./-]*", value) and value.lower() not in HYDRA_KEYWORDS
        return value if plain else f"'{value}'"
    return str(value)


def official_overrides(args: argparse.Namespace | Mapping[str, Any], ldm_only: bool) -> list[str]:
    """Hydra overrides of ``conf/train.yaml`` that reproduce an official run's arguments (``official_config``)."""
    # train_repae.py is the default model config; data configs are left to the user.
    overrides = ["model=ldm_only"] if ldm_only else []
    return overrides + [
        f"{key}={_hydra_value(value)}" for key, value in official_config(args, ldm_only).items()
    ]


def compose_train_config(overrides: Sequence[str]) -> DictConfig:
    """``conf/train.yaml`` composed with ``overrides``, as ``python -m repae.train`` would."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def _parameter_order(state: Mapping[str, Tensor], module: nn.Module) -> list[str]:
    """Names of ``module``'s parameters in the order of the keys of ``state`` (buffers left out)."""
    parameters = dict(module.named_parameters())
    return [key for key in state if key in parameters]


def _adamw_state(
    params: Sequence[tuple[str, nn.Parameter]],
    official: Mapping[str, Any] | None,
    official_names: Sequence[str] | None,
    config: Mapping[str, Any],
    lr_key: str,
) -> dict[str, Any]:
    """The AdamW state_dict repae's optimizer over ``params`` would have, with the moments of the
    official optimizer ``official`` carried over by parameter name.

    ``official_names[i]`` names the official optimizer's parameter ``i``; None means "the parameters
    that have a state, in order" (the official discriminator optimizer also holds LPIPS parameters,
    which never get gradients and so never get a state).
    """
    optimizer = torch.optim.AdamW(
        [param for _, param in params],
        lr=config.get(lr_key, 1e-4),
        betas=(config.get("adam_beta1", 0.9), config.get("adam_beta2", 0.999)),
        weight_decay=config.get("adam_weight_decay", 0.0),
        eps=config.get("adam_epsilon", 1e-8),
        foreach=config.get("foreach", None),
    )
    state_dict = optimizer.state_dict()
    if official is None:
        return state_dict
    official_state = official["state"]
    if official_names is None:
        stateful = sorted(official_state)
        if len(stateful) != len(params):
            raise ValueError(
                f"the official discriminator optimizer has state for {len(stateful)} parameters, the discriminator "
                f"has {len(params)}; pass --fresh-optimizers to start with new Adam moments"
            )
        by_name = {name: official_state[index] for (name, _), index in zip(params, stateful, strict=True)}
    else:
        official_count = sum(len(group["params"]) for group in official["param_groups"])
        if official_count != len(official_names):
            raise ValueError(
                f"the official optimizer holds {official_count} parameters, the official model state has "
                f"{len(official_names)}; pass --fresh-optimizers to start with new Adam moments"
            )
        by_name = {name: official_state[i] for i, name in enumerate(official_names) if i in official_state}
    for index, (name, param) in enumerate(params):
        if name not in by_name:
            continue
        moments = by_name[name]
        if moments["exp_avg"].shape != param.shape:
            raise ValueError(
                f"official Adam state of {name} has shape {tuple(moments['exp_avg'].shape)}, "
                f"the parameter {tuple(param.shape)}; pass --fresh-optimizers to start with new Adam moments"
            )
        state_dict["state"][index] = {key: value.clone() for key, value in moments.items()}
    return state_dict


def from_official(
    checkpoint_path: str | Path,
    output_path: str | Path,
    overrides: Sequence[str] = (),
    vae_weights_path: str | Path | None = None,
    discriminator_weights_path: str | Path | None = None,
    fresh_optimizers: bool = False,
) -> list[str]:
    """Convert an official ``train_repae.py`` / ``train_ldm_only.py`` checkpoint to a repae Lightning checkpoint.

    The training config is ``conf/train.yaml`` composed with the official run's arguments
    (``official_overrides``) followed by ``overrides``; each weight set is checked strictly
    against the configured model. The SiT, EMA, VAE and discriminator weights, the step counter and
    (unless ``fresh_optimizers``) the three AdamW states are carried over; the frozen encoders and
    perceptual network are rebuilt from their own files when the checkpoint is loaded. The data
    order and RNG states cannot be carried over: a resumed run starts a new epoch.

    Args:
        checkpoint_path: the official checkpoint (``exps/NAME/checkpoints/0400000.pt``).
        output_path: the repae checkpoint to write.
        overrides: further Hydra overrides (paths, trainer, a smaller SiT config for tests, ...).
        vae_weights_path: the VAE of a ``train_ldm_only.py`` run, which does not save it (its
            ``--vae-ckpt``); ignored for ``train_repae.py`` checkpoints, which include the VAE.
        discriminator_weights_path: a discriminator file for an end-to-end checkpoint saved without
            one; without it such a checkpoint gets a freshly initialised discriminator (fine for
            generation, not for fine-tuning).
        fresh_optimizers: start with empty Adam moments instead of the official ones (an optimizer
            state missing from the checkpoint always starts empty).

    Returns:
        All Hydra overrides used: pass them with ``ckpt_path=OUTPUT`` to ``python -m repae.train``.
    """
    checkpoint = load_checkpoint(checkpoint_path)
    if "model" not in checkpoint or "ema" not in checkpoint:
        raise ValueError(
            f"{checkpoint_path} is not an official training checkpoint (no 'model' and 'ema' entries)"
        )
    parts = training_components(checkpoint)
    ldm_only = parts["vae"] is None
    args = checkpoint.get("args", argparse.Namespace())
    if ldm_only:
        if vae_weights_path is None:
            used = getattr(args, "vae_ckpt", None)
            raise ValueError(
                f"{checkpoint_path} is a train_ldm_only.py checkpoint, which does not contain its frozen VAE: pass "
                f"--vae-weights with the VAE file it was trained with (its --vae-ckpt was {used!r})"
            )
        vae_state = load_checkpoint(vae_weights_path)
        parts["vae"] = dict(vae_state.get("vae", vae_state.get("state_dict", vae_state)))
    all_overrides = [*official_overrides(args, ldm_only), *overrides]
    cfg = compose_train_config(all_overrides)
    model_cfg = to_plain(cfg.model)

    with torch.device("meta"):
        sit = build_model(model_cfg["sit"], "model.sit", z_dims=projector_dims(parts["sit"]))
        vae = build_model(model_cfg["vae"], "model.vae")
    for key, part in (("model", "sit"), ("ema", "ema")):
        check_state_dict(
            sit.state_dict(), parts[part], f"{checkpoint_path}[{key!r}] does not fit the configured SiT"
        )
    check_state_dict(
        vae.state_dict(), parts["vae"], "the VAE weights do not fit the configured AutoencoderKL"
    )
    state_dict: StateDict = {
        **{f"sit.{k}": v for k, v in parts["sit"].items()},
        **{f"ema.{k}": v for k, v in parts["ema"].items()},
        **{f"vae.{k}": v for k, v in parts["vae"].items()},
        "train_step": torch.tensor(int(checkpoint.get("steps", 0))),
        "nonfinite_steps": torch.tensor(0),
    }
    optimizer_config = model_cfg.get("optimizer") or {}
    # (repae's parameters in optimizer order, official optimizer key, official parameter order, lr key).
    # An official optimizer was built on module.parameters(): the parameter order of its state_dict.
    groups = [(
        [(n, p) for n, p in sit.named_parameters() if p.requires_grad], "opt",
        _parameter_order(parts["sit"], sit), "learning_rate",
    )]  # fmt: skip
    if model_cfg.get("mode", "e2e") == "e2e":
        # The official D optimizer state only belongs to the checkpoint's own discriminator.
        own_discriminator = parts["discriminator"] is not None and discriminator_weights_path is None
        disc_optimizer = "opt_disc" if own_discriminator else None
        if discriminator_weights_path is not None:
            discriminator = load_checkpoint(discriminator_weights_path)
            parts["discriminator"] = dict(discriminator.get("discriminator", discriminator))
        # The loss module without its perceptual network (frozen, rebuilt from its own file on load),
        # for its buffers (logvar, ...) and a discriminator to check against or to start from.
        loss_cfg = {key: value for key, value in model_cfg["loss"].items() if key != "perceptual"}
        loss = build_model(loss_cfg, "model.loss", perceptual=nn.Identity())
        state_dict.update({f"vae_loss.{k}": v for k, v in loss.state_dict().items()})
        if parts["discriminator"] is None:
            log.warning(
                "%s has no discriminator: it starts freshly initialised (pass --discriminator-weights "
                "to fine-tune with a trained one)",
                checkpoint_path,
            )
        else:
            what = "the discriminator weights do not fit the configured NLayerDiscriminator"
            check_state_dict(loss.discriminator.state_dict(), parts["discriminator"], what)
            state_dict.update({f"vae_loss.discriminator.{k}": v for k, v in parts["discriminator"].items()})
        groups.append(
            (
                list(vae.named_parameters()),
                "opt_vae",
                _parameter_order(parts["vae"], vae),
                "vae_learning_rate",
            )
        )
        groups.append(
            (list(loss.discriminator.named_parameters()), disc_optimizer, None, "disc_learning_rate")
        )
    optimizer_states = [
        _adamw_state(
            params,
            None if fresh_optimizers or key is None else checkpoint.get(key),
            names,
            optimizer_config,
            lr_key,
        )
        for params, key, names, lr_key in groups
    ]
    output = {
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": importlib.metadata.version("lightning"),
        "state_dict": state_dict,
        "optimizer_states": optimizer_states,
        "lr_schedulers": [],
        "hyper_parameters": {key: value for key, value in model_cfg.items() if key != "_target_"},
        "converted_from": {
            "path": str(checkpoint_path),
            "args": dict(vars(args) if isinstance(args, argparse.Namespace) else args),
        },
    }
    Path(output_path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(output, output_path)
    return all_overrides
