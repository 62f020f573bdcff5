"""Checkpoint and weight conversion (reference sections 3.5, 7.7, 10).

    python -m repae.convert extract-vae CKPT --name NAME [--save-dir exps]
    python -m repae.convert from-official CKPT OUT.ckpt [--vae-weights VAE.pt] [HYDRA_OVERRIDE ...]
    python -m repae.convert to-diffusers VAE.pt OUT_DIR --vae f16d32 [--latents-stats STATS.pt]
    python -m repae.convert from-diffusers DIFFUSERS_DIR OUT.pt

``extract-vae`` is the official ``save_vae_weights.py`` for both kinds of training checkpoints:
a repae Lightning ``.ckpt`` or an official ``train_repae.py`` ``.pt``. ``from-official`` turns an
official ``train_repae.py`` / ``train_ldm_only.py`` checkpoint into a repae Lightning checkpoint
that ``python -m repae.train ckpt_path=...`` resumes and ``REPAE.load_from_checkpoint`` loads.
``to-diffusers`` / ``from-diffusers`` convert a VAE between the CompVis layout and a diffusers
``AutoencoderKL`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``), including the
per-level attention blocks of f16d32, with every tensor accounted for in both directions.

Official checkpoints pickle an ``argparse.Namespace`` (the training arguments). Every file is read
with ``torch.load(weights_only=True)``, with only ``argparse.Namespace`` added to torch's
allow-list: any other pickled object is refused, never constructed.
"""

from __future__ import annotations

import argparse
import json
import logging
import pickle
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import Tensor, nn

from repae.module import to_plain
from repae.modules.sit import latents_stats_from_bn
from repae.modules.state_dict import StateDictDiff
from repae.modules.vae import VAE_CONFIGS, AutoencoderKL, build_vae

log = logging.getLogger(__name__)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
# The only non-tensor, non-container type an official checkpoint pickles (its "args").
SAFE_GLOBALS = [argparse.Namespace]
StateDict = dict[str, Tensor]


# --- reading checkpoints ----------------------------------------------------------------------
def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a training checkpoint (repae ``.ckpt`` or official ``.pt``) without running pickled code.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file pickles an object outside the allow-list (tensors, containers,
            primitive types, ``argparse.Namespace``), or is not a torch file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist or is not a file")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL (\S+)", str(error))
        what = found.group(1) if found else "an object"
        raise ValueError(
            f"Refusing to load {str(path)!r}: it pickles {what}, which is not on repae's allow-list (tensors, "
            "dicts, lists, numbers, strings and argparse.Namespace). Unpickling arbitrary objects can run "
            "arbitrary code, so repae never does it. If you trust the file, load it yourself and re-save "
            "its tensors and plain values."
        ) from None
    except (RuntimeError, EOFError) as error:
        raise ValueError(f"Could not read {str(path)!r} as a torch checkpoint: {error}") from None
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{str(path)!r} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    return dict(checkpoint)


def _with_prefix(state: Mapping[str, Tensor], prefix: str) -> StateDict:
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


def training_components(checkpoint: Mapping[str, Any]) -> dict[str, StateDict | None]:
    """The state_dicts ``sit``, ``ema``, ``vae`` and ``discriminator`` of a training checkpoint.

    Official checkpoints store them under ``model``, ``ema``, ``vae``, ``discriminator``; repae
    Lightning checkpoints under the prefixes ``sit.``, ``ema.``, ``vae.``, ``vae_loss.discriminator.``.
    ``vae`` is None for ``train_ldm_only.py`` checkpoints (frozen VAE, not saved) and
    ``discriminator`` is None without a VAE loss.
    """
    if "state_dict" in checkpoint and "pytorch-lightning_version" in checkpoint:
        state = checkpoint["state_dict"]
        parts = {name: _with_prefix(state, prefix) for name, prefix in
                 [("sit", "sit."), ("ema", "ema."), ("vae", "vae."), ("discriminator", "vae_loss.discriminator.")]}  # fmt: skip
        return {name: part or None for name, part in parts.items()}
    if "model" in checkpoint and "ema" in checkpoint:
        return {
            "sit": dict(checkpoint["model"]),
            "ema": dict(checkpoint["ema"]),
            "vae": dict(checkpoint["vae"]) if "vae" in checkpoint else None,
            "discriminator": dict(checkpoint["discriminator"]) if "discriminator" in checkpoint else None,
        }
    raise ValueError(
        f"not a training checkpoint: expected a repae Lightning checkpoint ('state_dict') or an official one "
        f"('model', 'ema', ...), found keys {sorted(checkpoint)}"
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


# --- extract-vae ------------------------------------------------------------------------------
def extract_vae(checkpoint_path: str | Path, name: str, save_dir: str | Path = "exps") -> dict[str, Path]:
    """Write ``{save_dir}/{name}/{name}.pt`` (VAE), ``{name}-latents-stats.pt`` (from the EMA SiT's BN)
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
        latents_stats_from_bn(parts["ema"]["bn.running_mean"], parts["ema"]["bn.running_var"]),
        files["latents_stats"],
    )
    if parts["discriminator"] is not None:
        files["discriminator"] = out_dir / f"{name}-discriminator-ckpt.pt"
        torch.save(parts["discriminator"], files["discriminator"])
    return files


# --- from-official ----------------------------------------------------------------------------
def _hydra_value(value: Any) -> str:
    """A Hydra command-line value: quoted when it would otherwise be parsed as a sweep or null."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    text = str(value)
    return json.dumps(text) if isinstance(value, str) and re.search(r"[,\s'\"\[\]{}()=]", text) else text


PRECISIONS = {"no": "32-true", "fp16": "16-mixed", "bf16": "bf16-mixed"}


def official_overrides(args: argparse.Namespace | Mapping[str, Any], ldm_only: bool) -> list[str]:
    """Hydra overrides of ``conf/train.yaml`` that reproduce an official run's arguments.

    Arguments a run did not record are left at repae's defaults (which are the official ones).
    """
    values = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    # train_repae.py is the default model config; data configs are left to the user.
    overrides = ["model=ldm_only"] if ldm_only else []
    if "vae" in values:
        if values["vae"] not in VAE_CONFIGS:
            raise ValueError(
                f"the official run used --vae {values['vae']!r}, unknown to repae ({sorted(VAE_CONFIGS)})"
            )
        overrides.append(f"model.vae.name={values['vae']}")
        vae_config = VAE_CONFIGS[values["vae"]]
        overrides.append(f"model.sit.in_channels={vae_config['embed_dim']}")
        if "resolution" in values:
            factor = 2 ** (len(vae_config["ch_mult"]) - 1)
            overrides.append(f"model.sit.input_size={values['resolution'] // factor}")
    keys = {
        "model": "model.sit.name", "num_classes": "model.sit.num_classes", "encoder_depth": "model.sit.encoder_depth",
        "qk_norm": "model.sit.qk_norm", "fused_attn": "model.sit.fused_attn", "cfg_prob": "model.sit.class_dropout_prob",
        "path_type": "model.sit.path_type", "weighting": "model.sit.weighting", "enc_type": "model.encoder.names",
        "proj_coeff": "model.proj_coeff", "max_grad_norm": "model.max_grad_norm",
        "max_train_steps": "model.max_train_steps", "learning_rate": "model.optimizer.learning_rate",
        "adam_beta1": "model.optimizer.adam_beta1", "adam_beta2": "model.optimizer.adam_beta2",
        "adam_weight_decay": "model.optimizer.adam_weight_decay", "adam_epsilon": "model.optimizer.adam_epsilon",
        "batch_size": "data.batch_size", "seed": "seed",
    }  # fmt: skip
    if not ldm_only:
        keys.update({
            "bn_momentum": "model.sit.bn_momentum", "vae_align_proj_coeff": "model.vae_align_proj_coeff",
            "vae_learning_rate": "model.optimizer.vae_learning_rate",
            "disc_learning_rate": "model.optimizer.disc_learning_rate",
        })  # fmt: skip
    overrides += [f"{key}={_hydra_value(values[name])}" for name, key in keys.items() if name in values]
    if values.get("mixed_precision") in PRECISIONS:
        overrides.append(f"trainer.precision={PRECISIONS[values['mixed_precision']]}")
    return overrides


def compose_train_config(overrides: Sequence[str]) -> DictConfig:
    """``conf/train.yaml`` composed with ``overrides``, as ``python -m repae.train`` would."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def _check_fits(module: nn.Module, state: Mapping[str, Tensor], what: str) -> None:
    """Raise a ValueError unless ``state`` has exactly the keys and shapes of ``module``'s state_dict.

    ``module`` is not modified, so it may live on the meta device.
    """
    diff = StateDictDiff.between(module.state_dict(), state)
    if not diff.matches:
        raise ValueError(f"{what} does not fit the configured {type(module).__name__}: {diff.describe()}")


def _projector_dims(sit_state: Mapping[str, Tensor]) -> list[int]:
    """Encoder feature sizes z_dims from the output layers of the SiT's REPA projectors."""
    last: dict[int, tuple[int, Tensor]] = {}
    for key, value in sit_state.items():
        found = re.fullmatch(r"projectors\.(\d+)\.(\d+)\.weight", key)
        if found:
            encoder, layer = int(found.group(1)), int(found.group(2))
            if encoder not in last or layer > last[encoder][0]:
                last[encoder] = (layer, value)
    return [last[i][1].shape[0] for i in sorted(last)]


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
        sit = instantiate(model_cfg["sit"], z_dims=_projector_dims(parts["sit"]))
        vae = instantiate(model_cfg["vae"])
    _check_fits(sit, parts["sit"], f"{checkpoint_path}['model']")
    _check_fits(sit, parts["ema"], f"{checkpoint_path}['ema']")
    _check_fits(vae, parts["vae"], "the VAE weights")
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
        loss = instantiate({**model_cfg["loss"], "perceptual": {"_target_": "torch.nn.Identity"}})
        state_dict.update({f"vae_loss.{k}": v for k, v in loss.state_dict().items()})
        if parts["discriminator"] is None:
            log.warning(
                "%s has no discriminator: it starts freshly initialised (pass --discriminator-weights "
                "to fine-tune with a trained one)",
                checkpoint_path,
            )
        else:
            _check_fits(loss.discriminator, parts["discriminator"], "the discriminator weights")
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
        "pytorch-lightning_version": lightning.__version__,
        "state_dict": state_dict,
        "optimizer_states": optimizer_states,
        "lr_schedulers": [],
        "hyper_parameters": {key: value for key, value in model_cfg.items() if key != "_target_"},
        "converted_from": {"path": str(checkpoint_path), "args": dict(vars(args))},
    }
    Path(output_path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(output, output_path)
    return all_overrides


# --- diffusers ---------------------------------------------------------------------------------
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
_RESNET = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "nin_shortcut": "conv_shortcut",
}
_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
# Attention names of diffusers < 0.14 files, accepted on import.
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _diffusers_key(key: str, num_levels: int) -> str:
    """CompVis key -> diffusers key (``decoder.up.{l}`` is ``decoder.up_blocks.{num_levels-1-l}``)."""
    part = r"(\w+)\.(weight|bias)"
    rules = [
        (r"(encoder|decoder)\.(conv_in|conv_out)\.(weight|bias)", lambda m: m.group(0)),
        (r"(encoder|decoder)\.norm_out\.(weight|bias)", lambda m: f"{m.group(1)}.conv_norm_out.{m.group(2)}"),
        (r"(quant_conv|post_quant_conv)\.(weight|bias)", lambda m: m.group(0)),
        (rf"(encoder|decoder)\.mid\.block_([12])\.{part}",
         lambda m: f"{m.group(1)}.mid_block.resnets.{int(m.group(2)) - 1}.{_RESNET[m.group(3)]}.{m.group(4)}"),
        (rf"(encoder|decoder)\.mid\.attn_1\.{part}",
         lambda m: f"{m.group(1)}.mid_block.attentions.0.{_ATTENTION[m.group(2)]}.{m.group(3)}"),
        (rf"encoder\.down\.(\d+)\.block\.(\d+)\.{part}",
         lambda m: f"encoder.down_blocks.{m.group(1)}.resnets.{m.group(2)}.{_RESNET[m.group(3)]}.{m.group(4)}"),
        (rf"encoder\.down\.(\d+)\.attn\.(\d+)\.{part}",
         lambda m: f"encoder.down_blocks.{m.group(1)}.attentions.{m.group(2)}.{_ATTENTION[m.group(3)]}.{m.group(4)}"),
        (r"encoder\.down\.(\d+)\.downsample\.conv\.(weight|bias)",
         lambda m: f"encoder.down_blocks.{m.group(1)}.downsamplers.0.conv.{m.group(2)}"),
        (rf"decoder\.up\.(\d+)\.block\.(\d+)\.{part}",
         lambda m: f"decoder.up_blocks.{num_levels - 1 - int(m.group(1))}.resnets.{m.group(2)}."
                   f"{_RESNET[m.group(3)]}.{m.group(4)}"),
        (rf"decoder\.up\.(\d+)\.attn\.(\d+)\.{part}",
         lambda m: f"decoder.up_blocks.{num_levels - 1 - int(m.group(1))}.attentions.{m.group(2)}."
                   f"{_ATTENTION[m.group(3)]}.{m.group(4)}"),
        (r"decoder\.up\.(\d+)\.upsample\.conv\.(weight|bias)",
         lambda m: f"decoder.up_blocks.{num_levels - 1 - int(m.group(1))}.upsamplers.0.conv.{m.group(2)}"),
    ]  # fmt: skip
    for pattern, rename in rules:
        found = re.fullmatch(pattern, key)
        if found:
            return rename(found)
    raise ValueError(f"no diffusers name for the VAE weight {key!r}")


def _is_attention_projection(key: str) -> bool:
    """CompVis attention q/k/v/proj_out weights: 1x1 convs [C, C, 1, 1], diffusers Linear [C, C]."""
    return re.search(r"\.(attn_1|attn\.\d+)\.(q|k|v|proj_out)\.weight$", key) is not None


def _key_map(vae: AutoencoderKL) -> dict[str, str]:
    """CompVis key -> diffusers key for every tensor of ``vae`` (a bijection)."""
    keys = {key: _diffusers_key(key, len(vae.ch_mult)) for key in vae.state_dict()}
    if len(set(keys.values())) != len(keys):
        raise ValueError("two VAE weights map to the same diffusers name")
    return keys


def vae_to_diffusers_state_dict(vae: AutoencoderKL, state: Mapping[str, Tensor]) -> StateDict:
    """CompVis state_dict of ``vae``'s architecture -> diffusers ``AutoencoderKL`` state_dict."""
    _check_fits(vae, state, "the VAE weights")
    return {
        target: (state[key].flatten(1) if _is_attention_projection(key) else state[key]).contiguous().clone()
        for key, target in _key_map(vae).items()
    }


def vae_from_diffusers_state_dict(vae: AutoencoderKL, state: Mapping[str, Tensor]) -> StateDict:
    """diffusers ``AutoencoderKL`` state_dict -> CompVis state_dict of ``vae``'s architecture.

    Raises:
        ValueError: a diffusers tensor has no CompVis counterpart, a CompVis tensor is missing, or a shape differs.
    """
    normalized = {}
    for key, value in state.items():
        for old, new in _LEGACY_ATTENTION.items():
            key = re.sub(rf"\.attentions\.(\d+)\.{old}\.", rf".attentions.\1.{new}.", key)
        normalized[key] = value
    inverse = {target: key for key, target in _key_map(vae).items()}
    unexpected = sorted(set(normalized) - set(inverse))
    missing = sorted(set(inverse) - set(normalized))
    if unexpected or missing:
        raise ValueError(
            f"the diffusers weights do not match the VAE: {len(unexpected)} unexpected tensors {unexpected[:5]}, "
            f"{len(missing)} missing tensors {missing[:5]}"
        )
    expected = vae.state_dict()
    converted = {}
    for target, value in normalized.items():
        key = inverse[target]
        if _is_attention_projection(key) and value.numel() == expected[key].numel():
            value = value.reshape(expected[key].shape)
        converted[key] = value.contiguous().clone()
    _check_fits(vae, converted, "the diffusers weights")
    return converted


def diffusers_config(vae: AutoencoderKL, latents_stats: Mapping[str, Tensor] | None = None) -> dict[str, Any]:
    """The ``config.json`` of a diffusers ``AutoencoderKL`` with ``vae``'s architecture.

    REPA-E normalises latents per channel (the latents-stats file), not with one scaling factor:
    ``scaling_factor`` is 1 and, if ``latents_stats`` is given, ``latents_mean`` / ``latents_std``
    hold the per-channel statistics.
    """
    ch = vae.encoder.conv_in.out_channels
    if vae.ch_mult[0] != 1:
        raise ValueError(
            "diffusers' AutoencoderKL needs ch_mult[0] == 1 (its conv_in has block_out_channels[0] channels)"
        )
    # Encoder level l and decoder level l (decoder.up[l]) have attention alike, by construction.
    attention = {level for level, down in enumerate(vae.encoder.down) if len(down.attn) > 0}
    levels = range(len(vae.ch_mult))
    config = {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.33.1",
        "in_channels": vae.encoder.conv_in.in_channels,
        "out_channels": vae.decoder.conv_out.out_channels,
        "down_block_types": ["AttnDownEncoderBlock2D" if level in attention else "DownEncoderBlock2D" for level in levels],
        "up_block_types": ["AttnUpDecoderBlock2D" if level in attention else "UpDecoderBlock2D" for level in reversed(levels)],
        "block_out_channels": [ch * mult for mult in vae.ch_mult],
        "layers_per_block": len(vae.encoder.down[0].block),
        "act_fn": "silu",
        "latent_channels": vae.embed_dim,
        "norm_num_groups": 32,
        "sample_size": 256,
        "scaling_factor": 1.0,
        "shift_factor": None,
        "latents_mean": None,
        "latents_std": None,
        "force_upcast": True,
        "use_quant_conv": True,
        "use_post_quant_conv": True,
        "mid_block_add_attention": True,
    }  # fmt: skip
    if latents_stats is not None:
        config["latents_mean"] = latents_stats["latents_bias"].flatten().tolist()
        config["latents_std"] = latents_stats["latents_scale"].flatten().reciprocal().tolist()
    return config


def vae_from_diffusers_config(config: Mapping[str, Any]) -> AutoencoderKL:
    """An (untrained) ``AutoencoderKL`` with the architecture of a diffusers ``config.json``."""
    if config.get("act_fn", "silu") != "silu" or config.get("norm_num_groups", 32) != 32:
        raise ValueError("only act_fn='silu' and norm_num_groups=32 match repae's AutoencoderKL")
    if (
        not config.get("mid_block_add_attention", True)
        or not config.get("use_quant_conv", True)
        or not config.get("use_post_quant_conv", True)
    ):
        raise ValueError(
            "repae's AutoencoderKL always has a mid-block attention, quant_conv and post_quant_conv"
        )
    channels = list(config["block_out_channels"])
    ch = channels[0]
    if any(c % ch for c in channels):
        raise ValueError(f"block_out_channels {channels} are not multiples of the first")
    down = list(config["down_block_types"])
    attention = [level for level, kind in enumerate(down) if kind.startswith("Attn")]
    up_attention = [
        len(down) - 1 - i for i, kind in enumerate(config["up_block_types"]) if kind.startswith("Attn")
    ]
    if sorted(up_attention) != attention:
        raise ValueError(
            "encoder and decoder have attention at different levels; repae's AutoencoderKL cannot express that"
        )
    resolution = 256
    return AutoencoderKL(
        embed_dim=config["latent_channels"],
        ch=ch,
        ch_mult=[c // ch for c in channels],
        num_res_blocks=config["layers_per_block"],
        attn_resolutions=[resolution // 2**level for level in attention],
        resolution=resolution,
        in_channels=config.get("in_channels", 3),
        out_channels=config.get("out_channels", 3),
    )


def matching_vae_config(vae: AutoencoderKL) -> str | None:
    """The name in ``VAE_CONFIGS`` with exactly ``vae``'s tensors (names and shapes), if any."""
    shapes = {key: value.shape for key, value in vae.state_dict().items()}
    for name in VAE_CONFIGS:
        with torch.device("meta"):
            candidate = build_vae(name)
        if {key: value.shape for key, value in candidate.state_dict().items()} == shapes:
            return name
    return None


def save_diffusers(
    vae: AutoencoderKL, state: Mapping[str, Tensor], output_dir: str | Path,
    latents_stats: Mapping[str, Tensor] | None = None,
) -> Path:  # fmt: skip
    """Write ``state`` (CompVis weights of ``vae``'s architecture; ``vae`` may live on the meta device)
    as a diffusers ``AutoencoderKL`` folder: ``config.json`` + ``diffusion_pytorch_model.safetensors``."""
    from safetensors.torch import save_file

    converted = vae_to_diffusers_state_dict(vae, state)
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(converted, out_dir / DIFFUSERS_WEIGHTS, metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(diffusers_config(vae, latents_stats), indent=2))
    return out_dir


def to_diffusers(
    vae_weights_path: str | Path,
    output_dir: str | Path,
    vae: str,
    latents_stats_path: str | Path | None = None,
) -> Path:
    """Write a diffusers ``AutoencoderKL`` folder from a CompVis VAE file (``save_diffusers``).

    Args:
        vae_weights_path: VAE state_dict (``NAME.pt``, or a file wrapping it under ``vae``/``state_dict``).
        output_dir: the diffusers model folder to write.
        vae: the architecture, a ``VAE_CONFIGS`` name (``f8d4``, ``f16d32``, ...).
        latents_stats_path: optional ``NAME-latents-stats.pt``, stored as ``latents_mean``/``latents_std``.
    """
    with torch.device("meta"):
        model = build_vae(vae)
    state = load_checkpoint(vae_weights_path)
    state = dict(state.get("vae", state.get("state_dict", state)))
    stats = load_checkpoint(latents_stats_path) if latents_stats_path else None
    return save_diffusers(model, state, output_dir, stats)


def from_diffusers(diffusers_dir: str | Path, output_path: str | Path) -> tuple[Path, str | None]:
    """Write a CompVis VAE state_dict (``NAME.pt``, for ``model.vae_weights_path``) from a diffusers folder.

    If the config holds ``latents_mean``/``latents_std``, also writes ``NAME-latents-stats.pt`` next to it.

    Returns:
        The written VAE file and the matching ``VAE_CONFIGS`` name (``model.vae.name``), or None if
        no named configuration has this architecture.
    """
    from safetensors.torch import load_file

    folder = Path(diffusers_dir)
    for required in ("config.json", DIFFUSERS_WEIGHTS):
        if not (folder / required).is_file():
            raise FileNotFoundError(
                f"{folder / required} not found: expected a diffusers AutoencoderKL folder"
            )
    config = json.loads((folder / "config.json").read_text())
    with torch.device("meta"):
        model = vae_from_diffusers_config(config)
    converted = vae_from_diffusers_state_dict(model, load_file(folder / DIFFUSERS_WEIGHTS))
    output = Path(output_path)
    output.parent.mkdir(parents=True, exist_ok=True)
    torch.save(converted, output)
    if config.get("latents_mean") is not None and config.get("latents_std") is not None:
        shape = (1, len(config["latents_mean"]), 1, 1)
        stats = {
            "latents_scale": torch.tensor(config["latents_std"]).reciprocal().reshape(shape),
            "latents_bias": torch.tensor(config["latents_mean"]).reshape(shape),
        }
        torch.save(stats, output.with_name(f"{output.stem}-latents-stats.pt"))
    return output, matching_vae_config(model)


# --- command line --------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    formatter = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="python -m repae.convert", description=__doc__.split("\n\n")[0],
                                     formatter_class=formatter)  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True)

    extract = commands.add_parser(
        "extract-vae",
        formatter_class=formatter,
        help="VAE, latents-stats and discriminator files from a training checkpoint",
    )
    extract.add_argument("checkpoint", help="repae .ckpt or official train_repae.py .pt")
    extract.add_argument("--name", required=True, help="file name stem NAME (official --vae-name)")
    extract.add_argument("--save-dir", default="exps", help="files go to SAVE_DIR/NAME/")

    official = commands.add_parser(
        "from-official",
        formatter_class=formatter,
        help="official train_repae.py / train_ldm_only.py checkpoint -> repae .ckpt",
    )
    official.add_argument("checkpoint", help="official checkpoint, e.g. exps/NAME/checkpoints/0400000.pt")
    official.add_argument("output", help="repae Lightning checkpoint to write")
    official.add_argument(
        "--vae-weights", default=None, help="VAE file of a train_ldm_only.py run (its --vae-ckpt)"
    )
    official.add_argument(
        "--discriminator-weights",
        default=None,
        help="discriminator file for a train_repae.py checkpoint saved without one",
    )
    official.add_argument(
        "--fresh-optimizers", action="store_true", help="do not carry over the Adam moments"
    )
    official.add_argument("overrides", nargs="*", help="extra Hydra overrides of conf/train.yaml (key=value)")

    export = commands.add_parser(
        "to-diffusers", formatter_class=formatter, help="CompVis VAE file -> diffusers AutoencoderKL folder"
    )
    export.add_argument("vae_weights", help="VAE state_dict file, e.g. pretrained/e2e-vavae/e2e-vavae.pt")
    export.add_argument("output_dir", help="diffusers model folder to write")
    export.add_argument("--vae", required=True, choices=sorted(VAE_CONFIGS), help="VAE architecture")
    export.add_argument(
        "--latents-stats", default=None, help="NAME-latents-stats.pt to store as latents_mean/std"
    )

    imported = commands.add_parser(
        "from-diffusers", formatter_class=formatter, help="diffusers AutoencoderKL folder -> CompVis VAE file"
    )
    imported.add_argument(
        "diffusers_dir", help="folder with config.json and diffusion_pytorch_model.safetensors"
    )
    imported.add_argument("output", help="VAE state_dict file to write, e.g. pretrained/NAME/NAME.pt")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    if args.command == "extract-vae":
        for kind, path in extract_vae(args.checkpoint, args.name, args.save_dir).items():
            log.info("wrote %s: %s", kind, path)
    elif args.command == "from-official":
        overrides = from_official(
            args.checkpoint,
            args.output,
            args.overrides,
            args.vae_weights,
            args.discriminator_weights,
            args.fresh_optimizers,
        )
        log.info("wrote %s; continue training with:\n  python -m repae.train %s", args.output,
                 " ".join(shlex.quote(o) for o in [*overrides, f"ckpt_path={args.output}"]))  # fmt: skip
    elif args.command == "to-diffusers":
        log.info("wrote %s", to_diffusers(args.vae_weights, args.output_dir, args.vae, args.latents_stats))
    else:
        output, name = from_diffusers(args.diffusers_dir, args.output)
        match = f"model.vae.name={name}" if name else "no named VAE config has this architecture"
        log.info("wrote %s (%s)", output, match)


if __name__ == "__main__":
    main()
