"""Training entry point: ``python -m repae.train experiment=repae_sdvae [overrides]``.

Composes the Hydra config, builds the data module, the REPA-E LightningModule, callbacks, loggers
and the Trainer, and fits. The run directory is deterministic (``logs/train/<run_name>``), so the
same command resumes from ``checkpoints/last.ckpt`` after an interruption or a SLURM requeue.
"""

from __future__ import annotations

import errno
import json
import logging
import pickle
import re
import sys
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import hydra
import lightning.pytorch as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException, InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from repae.callbacks.checkpoint import verify_checkpoint
from repae.cli import exit_on_bad_input
from repae.config import to_plain
from repae.config_checks import check_training_config, missing_input_files
from repae.datamodules.datasets import CorruptSampleError
from repae.known_noise import silence_known_noise
from repae.run_directory import (
    RunDirectoryError,
    RunLock,
    check_writable,
    remove_stale_temporaries,
    write_text_atomically,
)
from repae.safe_load import load_weights_only, refusal
from repae.strategies import ShardedSiTStrategy
from repae.sweep import FINAL_METRICS_FILE

log = logging.getLogger(__name__)
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

# Errors that mean "the input is wrong", reported as one message instead of a traceback.
INPUT_ERRORS = (FileNotFoundError, ValueError, CorruptSampleError, FloatingPointError, RunDirectoryError)


def instantiate_dict(config: DictConfig | None) -> list:
    """Instantiate every entry with a ``_target_`` of a group like ``callbacks`` or ``logger``
    (entries set to null are skipped, so any of them can be switched off from the command line)."""
    return [
        instantiate(entry) for entry in (config or {}).values() if entry is not None and "_target_" in entry
    ]


def checkpoint_dir(cfg: DictConfig) -> Path:
    """Where the run's checkpoints go (``callbacks.checkpoint.dirpath``, ``<run dir>/checkpoints``)."""
    dirpath = OmegaConf.select(cfg, "callbacks.checkpoint.dirpath", default=None)
    return Path(dirpath) if dirpath else Path(cfg.paths.output_dir) / "checkpoints"


def resume_checkpoint(cfg: DictConfig) -> str | None:
    """The checkpoint to start from: the run's ``last.ckpt`` if it has one (always its newest state),
    else ``ckpt_path`` if given, else none. So re-running a command with ``ckpt_path`` (a requeued
    job, the command ``convert from-official`` prints) continues the run instead of restarting it.

    Every record of the file is checked against its stored CRC-32 first, unless
    ``resume_skip_checksum``.
    """
    last = checkpoint_dir(cfg) / "last.ckpt"
    given = Path(cfg.ckpt_path) if cfg.ckpt_path else None
    if given is not None:  # a wrong argument is an error even where last.ckpt overrides it
        if not given.is_file():
            raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path} does not exist")
        verify_checkpoint(given, records=False)
    if last.is_file():
        if not cfg.resume:
            raise RunDirectoryError(
                f"{last} exists and resume=false would train over it: delete the run directory's checkpoints "
                "to start afresh, or give this run another run_name"
            )
        if given is not None:
            log.info(
                "ckpt_path=%s is ignored: %s is this run's newest state (ckpt_path only starts a run "
                "directory that has no last.ckpt)",
                given,
                last,
            )
        path = last
    elif given is not None:
        path = given
    else:
        return None
    if cfg.resume_skip_checksum:
        log.warning("resume_skip_checksum=true: loading %s without checking its records", path)
    verify_checkpoint(path, records=not cfg.resume_skip_checksum)
    return str(path)


def prepare_run_directory(cfg: DictConfig) -> None:
    """Rank 0, with the run directory locked: fail now if the checkpoints cannot be written, and
    delete the temporary files of writes that a killed process left."""
    check_writable(cfg.paths.output_dir, "paths.log_dir")
    check_writable(checkpoint_dir(cfg), "callbacks.checkpoint.dirpath")
    for folder in (Path(cfg.paths.output_dir), checkpoint_dir(cfg)):
        for stale in remove_stale_temporaries(folder):
            log.info("removed %s, left by an interrupted write", stale)


def check_latent_cache(dataset, model, cfg: DictConfig) -> None:
    """A latent cache must hold [mean; std] latents of the configured VAE's shape."""
    if "latents_name" not in cfg.data.dataset:
        return
    found = tuple(dataset[0]["latent"].shape)
    expected = (2 * model.vae.latent_channels, model.sit.input_size, model.sit.input_size)
    if found != expected:
        raise ValueError(
            f"the latent cache data.dataset.latents_name={cfg.data.dataset.latents_name} holds latents of shape "
            f"{found}, but the configured VAE and SiT need {expected} ([mean; std] of {expected[0] // 2} channels): "
            "it was built with a different VAE. Rebuild it with python -m repae.cache_latents or point "
            "latents_name at the cache of this VAE."
        )


def completed_step(cfg: DictConfig) -> int | None:
    """The step of the run's ``last.ckpt`` if the run is complete (it reached ``model.max_train_steps``)."""
    last = checkpoint_dir(cfg) / "last.ckpt"
    if not (cfg.resume and last.is_file()):
        return None
    verify_checkpoint(last, records=False)
    step = int(load_weights_only(last, "the run's last.ckpt", mmap=True)["state_dict"]["train_step"])
    return step if step >= cfg.model.max_train_steps else None


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit one run; returns the final logged metrics (used by multirun summaries).

    A complete run is left as it is: re-running its command writes nothing and returns the metrics
    it ended with. ``final_metrics.json`` is written only when a run completes, so a run stopped early
    (a requeue signal) is never taken for a finished one.
    """
    check_training_config(cfg)
    output_dir = Path(cfg.paths.output_dir)
    resuming = (checkpoint_dir(cfg) / "last.ckpt").is_file() or bool(cfg.ckpt_path)
    if missing := missing_input_files(cfg, resuming):
        raise FileNotFoundError(f"{len(missing)} input file(s) missing: " + "; ".join(missing))
    if (step := completed_step(cfg)) is not None:
        print(
            f"run complete at step {step}: nothing to do ({output_dir}; raise model.max_train_steps to train on)"
        )
        final = output_dir / FINAL_METRICS_FILE
        return json.loads(final.read_text()) if final.is_file() else {}
    pl.seed_everything(cfg.seed, workers=True)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(cfg.allow_tf32)
    trainer: pl.Trainer = instantiate(
        cfg.trainer,
        callbacks=instantiate_dict(cfg.callbacks),
        logger=instantiate_dict(cfg.get("logger")) or False,
    )
    # Rank 0 holds the lock for the whole run; the other ranks of the run write no run files.
    with RunLock(output_dir) if trainer.is_global_zero else nullcontext():
        if trainer.is_global_zero:
            prepare_run_directory(cfg)
        datamodule = instantiate(cfg.data)
        model = instantiate(to_plain(cfg.model), _recursive_=False)
        if isinstance(trainer.strategy, ShardedSiTStrategy):
            trainer.strategy.check_model(model)
        check_latent_cache(datamodule.dataset, model, cfg)
        ckpt_path = resume_checkpoint(cfg)
        if ckpt_path is None:
            model.load_pretrained()
        if trainer.is_global_zero:
            write_text_atomically(output_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        # weights_only=True also when trainer.plugins drops AtomicCheckpointIO: torch lets
        # TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD override only loads that leave it unset.
        try:
            trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        except pickle.UnpicklingError as error:  # raised by torch when another CheckpointIO is configured
            raise refusal(ckpt_path, error) from None
        report_skipped_samples(datamodule)
        metrics = {key: float(value) for key, value in trainer.callback_metrics.items() if value.numel() == 1}
        if trainer.is_global_zero and model.step >= model.max_train_steps:
            write_text_atomically(output_dir / FINAL_METRICS_FILE, json.dumps(metrics, indent=2))
    return metrics


def report_skipped_samples(datamodule) -> None:
    """With ``data.on_corrupt=skip``: every unreadable sample the run replaced, at the end of the log."""
    skipped = getattr(datamodule, "skipped", None)
    if skipped:
        log.warning("data.on_corrupt=skip replaced %d unreadable samples:", len(skipped))
        for message in skipped:
            log.warning("  %s", message)


def disk_full(error: BaseException | None) -> bool:
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


def input_error(error: BaseException) -> BaseException | None:
    """The user-facing cause of ``error`` if it is bad input (Hydra wraps errors raised while
    building an object from the config), else None."""
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    return error if isinstance(error, INPUT_ERRORS) else None


def one_line(error: BaseException) -> str:
    """The error's message without the worker traceback a DataLoader worker's error carries."""
    message = str(error)
    if "\nOriginal Traceback" in message:
        return message.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return message


def failure_message(cfg: DictConfig, error: BaseException) -> str | None:
    """The line for a failure the user can mend (a full disk, bad input), else None (a bug: traceback)."""
    if disk_full(error):
        last = checkpoint_dir(cfg) / "last.ckpt"
        kept = (
            f"{last} is intact" if last.is_file() else f"{last} was not written yet (a re-run starts afresh)"
        )
        return f"no space left on device ({error}); {kept}: free space and re-run the same command"
    cause = input_error(error)
    return one_line(cause) if cause is not None else None


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> dict[str, float]:
    silence_known_noise()
    with exit_on_bad_input((Exception,), partial(failure_message, cfg), log):
        return train(cfg)


def check_override_keys(argv: list[str]) -> None:
    """Exit with one line listing the valid keys when a command-line override names a key that
    does not exist (Hydra names the key but not the alternatives). Multiruns are left to Hydra."""
    if any(arg in ("-m", "--multirun") or arg.startswith("-") for arg in argv):
        return
    overrides = [arg for arg in argv if "=" in arg]
    try:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            compose(config_name="train", overrides=overrides)
    except ConfigCompositionException as error:
        match = re.search(r"Could not override '([^']+)'", str(error))
        if match is None or "not in struct" not in str(error.__cause__):
            return  # Hydra's own message is clear for the other cases (unknown group option, syntax)
        key = match.group(1)
        kept = [arg for arg in overrides if arg.split("=", 1)[0].lstrip("+~") != key]
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="train", overrides=kept)
        parent = key.rpartition(".")[0]
        while parent and not isinstance(OmegaConf.select(cfg, parent), DictConfig):
            parent = parent.rpartition(".")[0]
        node = OmegaConf.select(cfg, parent) if parent else cfg
        raise SystemExit(
            f"error: unknown config key {key!r}; valid keys of {parent or 'the config'}: "
            f"{', '.join(sorted(node.keys()))} (prefix a new key with + to add it)"
        ) from None
    finally:
        GlobalHydra.instance().clear()


if __name__ == "__main__":
    check_override_keys(sys.argv[1:])
    main()
