"""Checkpointing keyed on repae's step counter (one batch = one step), saved atomically and loaded
safely."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.serialization import config as serialization_config

from repae.callbacks.run import training_complete
from repae.run_directory import write_atomically
from repae.safe_load import load_weights_only


def verify_checkpoint(path: str | Path, records: bool = True) -> None:
    """Check that the checkpoint is complete and (``records``) every record matches the CRC-32 that
    ``torch.save`` stored for it.

    A torch checkpoint is a zip archive with one record per tensor storage; a truncated file has no
    readable central directory, and a flipped byte makes its record's CRC differ. ``torch.load``
    checks neither. Checking the records reads the whole file once.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip() if records else None
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        raise ValueError(
            f"checkpoint {path} is truncated or not a torch checkpoint ({error}). Delete it to start "
            "afresh, or set ckpt_path to an earlier checkpoint in the same folder."
        ) from None
    if bad is not None:
        raise ValueError(
            f"checkpoint {path} is corrupt: record {bad} does not match its stored checksum. Resume from "
            "the previous step file instead (ckpt_path=<run>/checkpoints/<step>.ckpt after moving this one "
            "away), or force-load it with resume_skip_checksum=true"
        )


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file next to it, fsync, then rename over the old one;
    load only tensors and plain values.

    A kill or a full disk at any point leaves the previous checkpoint complete. Lightning's own
    save writes the temporary file to ``$TMPDIR`` and moves it, which across filesystems (a local
    /tmp, a shared log directory) is a copy that can be interrupted halfway. Every record carries
    its CRC-32 (``verify_checkpoint`` checks them on resume).

    Loading always passes ``weights_only=True`` (``load_weights_only``): a checkpoint cannot run
    code, whatever the caller or ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` asks for.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with serialization_config.patch({"save.compute_crc32": True}):
            write_atomically(path, lambda f: torch.save(checkpoint, f), binary=True)

    def load_checkpoint(
        self, path: str | Path, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if weights_only is False:
            raise ValueError(f"refusing to load {path} with weights_only=False: it could run code")
        if not Path(path).is_file():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        checkpoint = load_weights_only(path, map_location=map_location or "cpu")
        if (
            not isinstance(checkpoint, dict)
            or not {"pytorch-lightning_version", "state_dict"} <= checkpoint.keys()
        ):
            raise ValueError(
                f"{path} is not a training checkpoint of repae (no Lightning state_dict); an official "
                "checkpoint resumes after python -m repae.convert from-official CKPT OUT.ckpt"
            )
        return checkpoint


class StepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that saves every ``every_n_steps`` repae steps (``pl_module.step``).

    Lightning's ``every_n_train_steps`` counts optimizer steps, three per batch in end-to-end mode
    (Lightning issue #17958), so it would save at the wrong steps. ``{step}`` in ``filename`` is
    the repae step too. ``last.ckpt`` is written with every save and after the final step; with
    ``save_official`` an official-layout ``{step:07d}.pt`` is written too (``convert.official_checkpoint``).

    A save overwrites a file of the same name (``enable_version_counter=False``): a run directory
    holds one ``last.ckpt``, the newest state, and no ``-v1`` copies, also when it was moved or
    reached by another path (Lightning then forgets ``last_model_path`` and would version-bump).

    The final step is saved from ``on_train_batch_end``, not ``on_train_end``: by then Lightning
    has closed the epoch, and a run resumed from such a checkpoint (say, to train longer) would
    start a new epoch with a new data order instead of continuing the interrupted one.
    """

    def __init__(self, every_n_steps: int, save_official: bool = False, **kwargs: Any):
        if every_n_steps <= 0:
            raise ValueError(f"every_n_steps must be positive, got {every_n_steps}")
        super().__init__(
            every_n_train_steps=0,
            every_n_epochs=0,
            save_on_train_epoch_end=False,
            enable_version_counter=False,
            **kwargs,
        )
        self.every_n_steps = every_n_steps
        self.save_official = save_official

    def _monitor_candidates(self, trainer: pl.Trainer) -> dict[str, torch.Tensor]:
        candidates = super()._monitor_candidates(trainer)
        candidates["step"] = torch.tensor(trainer.lightning_module.step)
        return candidates

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        final_step = training_complete(pl_module)
        if (pl_module.step % self.every_n_steps and not final_step) or self._should_skip_saving_checkpoint(
            trainer
        ):
            return
        self.save(trainer)

    def save(self, trainer: pl.Trainer) -> None:
        """Write the step checkpoint and ``last.ckpt`` now (call at a step boundary)."""
        candidates = self._monitor_candidates(trainer)
        self._save_topk_checkpoint(trainer, candidates)
        self._save_last_checkpoint(trainer, candidates)
        if self.save_official:
            self._save_official(trainer)

    def _save_official(self, trainer: pl.Trainer) -> None:
        """Also write ``{step:07d}.pt`` in the official checkpoint layout (rank 0)."""
        from repae.convert.checkpoints import official_checkpoint

        # Through the strategy, which assembles sharded (trainer=fsdp) weights on rank 0.
        checkpoint = {
            "pytorch-lightning_version": pl.__version__,
            "state_dict": trainer.strategy.lightning_module_state_dict(),
            "optimizer_states": [
                trainer.strategy.optimizer_state(optimizer) for optimizer in trainer.optimizers
            ],
        }
        if trainer.is_global_zero:
            path = Path(self.dirpath) / f"{trainer.lightning_module.step:07d}.pt"
            trainer.strategy.checkpoint_io.save_checkpoint(official_checkpoint(checkpoint), path)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Nothing: every checkpoint is written at a step boundary, with the epoch still open."""
