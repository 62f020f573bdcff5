"""Per-rank seeding, as the official ``set_seed(seed + rank)``."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback


class SeedPerRank(Callback):
    """Reseed every process with ``seed + global_rank`` once the ranks exist.

    Models are built before the ranks are known, with the base seed, so every rank starts from the
    same weights; t, noise and label dropout then differ per rank, as in the official code.
    """

    def __init__(self, seed: int):
        self.seed = seed

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        pl.seed_everything(self.seed + trainer.global_rank, workers=True, verbose=False)
