"""A Rich progress bar that reads its metric values from the GPU only now and then."""

from __future__ import annotations

import datetime
import logging
import sys
import time
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar

from repae.callbacks.run import current_step

log = logging.getLogger(__name__)


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

    When stdout is not a terminal the bar is switched off (Rich would draw it once, at the end):
    :class:`ProgressLog` prints plain lines there instead.
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

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not sys.stdout.isatty():
            self.disable()
        super().setup(trainer, pl_module, stage)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._metrics = None  # the bar's last state shows the values at the last step, not a stale read
        super().on_train_epoch_end(trainer, pl_module)


class ProgressLog(Callback):
    """One plain line every ``every_n_steps`` steps and at the end of training: step, rate, ETA and
    the current values of ``keys``. Always written to the run's log file (Hydra's ``train.log``);
    printed too when stdout is not a terminal (SLURM, ``nohup``, ``> log``), where the Rich bar
    draws nothing until the run ends. The rate is the average since this process started training,
    so it includes data loading, evaluation callbacks and checkpointing."""

    def __init__(self, every_n_steps: int = 50, keys: tuple[str, ...] | list[str] = ()):
        if every_n_steps <= 0:
            raise ValueError(f"every_n_steps must be positive, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.keys = list(keys)
        self._start: tuple[float, int] | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start = (time.monotonic(), current_step(pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if current_step(pl_module) % self.every_n_steps == 0:
            self._report(trainer, pl_module)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if current_step(pl_module) % self.every_n_steps != 0:
            self._report(trainer, pl_module)

    def line(self, step: int, total: int, seconds: float, steps_done: int, values: dict[str, float]) -> str:
        rate = steps_done / seconds if seconds > 0 else 0.0
        eta = f"{datetime.timedelta(seconds=round((total - step) / rate))}" if rate > 0 else "?"
        shown = " ".join(f"{key} {value:.4g}" for key, value in values.items())
        return f"step {step}/{total} | {rate:.3g} steps/s | ETA {eta}" + (f" | {shown}" if shown else "")

    def _report(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero or self._start is None:
            return
        started, first_step = self._start
        step = current_step(pl_module)
        logged = trainer.callback_metrics
        values = {key: float(logged[key]) for key in self.keys if key in logged}
        text = self.line(
            step, pl_module.max_train_steps, time.monotonic() - started, step - first_step, values
        )
        if sys.stdout.isatty():  # the Rich bar is on screen: the line goes to the log file only
            record = log.makeRecord(log.name, logging.INFO, __file__, 0, text, None, None)
            for handler in logging.getLogger().handlers:
                if isinstance(handler, logging.FileHandler):
                    handler.handle(record)
        else:
            log.info(text)
