"""A Rich progress bar that reads its metric values from the GPU only now and then."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar

from repae.callbacks.run import current_step


class ProgressBar(RichProgressBar):
    """``RichProgressBar`` whose metrics are read every ``metrics_every_n_steps`` training batches.

    Lightning's bar turns every metric it shows into a Python float at every batch, and reading a
    value on the host waits for the GPU, which the training step otherwise never does. This bar
    still moves every ``refresh_rate`` batches, but its metrics are read only at the first call, at
    batches ``metrics_every_n_steps``, ``2 * metrics_every_n_steps``, ... (where Lightning logs with
    the same ``log_every_n_steps``, so the two reads share one wait) and at every call outside training.

    Besides Lightning's progress-bar metrics it shows ``keys`` from ``trainer.callback_metrics``:
    Lightning itself converts every metric logged with ``prog_bar=True`` to a float at every batch
    (when it collects the batch's metrics), so a metric shown without that wait must be logged
    without ``prog_bar`` and named in ``keys``.
    """

    def __init__(
        self, metrics_every_n_steps: int = 50, keys: tuple[str, ...] | list[str] = (), **kwargs: Any
    ):
        if metrics_every_n_steps <= 0:
            raise ValueError(f"metrics_every_n_steps must be positive, got {metrics_every_n_steps}")
        super().__init__(**kwargs)
        self.metrics_every_n_steps = metrics_every_n_steps
        self.keys = list(keys)
        self._metrics: dict | None = None

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict:
        first_or_outside_training = self._metrics is None or not trainer.training
        if first_or_outside_training or current_step(pl_module) % self.metrics_every_n_steps == 0:
            logged = trainer.callback_metrics
            shown = {key: float(logged[key]) for key in self.keys if key in logged}
            self._metrics = {**super().get_metrics(trainer, pl_module), **shown}
        return self._metrics
