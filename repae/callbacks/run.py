"""What the training callbacks share about the run: its step counter, whether it is complete, its directory."""

from __future__ import annotations

from lightning.pytorch import LightningModule, Trainer


def current_step(pl_module: LightningModule) -> int:
    """The REPA-E iteration counter (one per batch), never ``trainer.global_step``, which counts the
    three optimizer steps of each batch."""
    return int(pl_module.step)


def training_complete(pl_module: LightningModule) -> bool:
    """Whether the run has reached ``model.max_train_steps``. A run stopped earlier (a requeue signal)
    has not ended: what callbacks do "at the end of training" waits for the run that completes it."""
    return pl_module.step >= pl_module.max_train_steps


def run_dir(trainer: Trainer) -> str:
    """Where run artefacts (sample grids, loss curve) go: the run directory, next to checkpoints/."""
    return trainer.default_root_dir
