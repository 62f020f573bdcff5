"""Checkpointing keyed on repae's step counter (one batch = one step)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temporary file next to it, fsync, then rename over the old one.

    A kill or a full disk at any point leaves the previous checkpoint complete. Lightning's own
    save writes the temporary file to ``$TMPDIR`` and moves it, which across filesystems (a local
    /tmp, a shared log directory) is a copy that can be interrupted halfway.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(temporary, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise


class StepCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that saves every ``every_n_steps`` repae steps (``pl_module.step``).

    Lightning's ``every_n_train_steps`` counts optimizer steps, three per batch in end-to-end mode
    (Lightning issue #17958), so it would save at the wrong steps. ``{step}`` in ``filename`` is
    the repae step too. ``last.ckpt`` is written with every save and after the final step; with
    ``save_official`` an official-layout ``{step:07d}.pt`` is written too (``convert.official_checkpoint``).

    The final step is saved from ``on_train_batch_end``, not ``on_train_end``: by then Lightning
    has closed the epoch, and a run resumed from such a checkpoint (say, to train longer) would
    start a new epoch with a new data order instead of continuing the interrupted one.
    """

    def __init__(self, every_n_steps: int, save_official: bool = False, **kwargs: Any):
        if every_n_steps <= 0:
            raise ValueError(f"every_n_steps must be positive, got {every_n_steps}")
        super().__init__(every_n_train_steps=0, every_n_epochs=0, save_on_train_epoch_end=False, **kwargs)
        self.every_n_steps = every_n_steps
        self.save_official = save_official

    def _monitor_candidates(self, trainer: pl.Trainer) -> dict[str, torch.Tensor]:
        candidates = super()._monitor_candidates(trainer)
        candidates["step"] = torch.tensor(trainer.lightning_module.step)
        return candidates

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any, **kwargs: Any
    ) -> None:
        final_step = pl_module.step >= pl_module.max_train_steps
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
