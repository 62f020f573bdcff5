"""A PNG of the training losses, independent of the logger in use."""

from __future__ import annotations

import os

from lightning.pytorch import Callback, LightningModule, Trainer
from matplotlib.figure import Figure

from repae.callbacks.sampling import current_step, run_dir


class LossCurveCallback(Callback):
    """Record losses from ``trainer.callback_metrics`` every iteration and plot them to ``filename``.

    For each of ``keys`` the value logged at this batch (``key`` or Lightning's ``key_step`` variant) is
    stored against ``pl_module.step``. The plot (one panel per key, shared step axis) is written under
    the run directory by rank 0 every ``every_n_steps`` iterations and at train end. The history is
    part of the callback's ``state_dict``, so a resumed run continues the same curve.
    """

    def __init__(
        self,
        keys: tuple[str, ...] | list[str] = ("sit_loss", "denoising_loss", "proj_loss", "vae_loss", "d_loss"),
        filename: str = "loss_curve.png",
        every_n_steps: int = 500,
    ):
        if every_n_steps <= 0:
            raise ValueError("every_n_steps must be positive")
        self.keys = list(keys)
        self.filename = filename
        self.every_n_steps = every_n_steps
        self.history: dict[str, dict[str, list]] = {key: {"steps": [], "values": []} for key in self.keys}

    def _record(self, metrics: dict, step: int) -> None:
        for key in self.keys:
            value = metrics.get(key, metrics.get(f"{key}_step"))
            if value is None:
                continue
            series = self.history.setdefault(key, {"steps": [], "values": []})
            series["steps"].append(step)
            series["values"].append(float(value))

    def plot(self, path: str) -> None:
        """Write the recorded curves to ``path`` (PNG); keys with no values are left out."""
        recorded = [key for key in self.keys if self.history.get(key, {}).get("steps")]
        figure = Figure(figsize=(7, 2.2 * max(len(recorded), 1)), layout="constrained")
        axes = figure.subplots(max(len(recorded), 1), 1, sharex=True, squeeze=False)[:, 0]
        for ax, key in zip(axes, recorded, strict=False):  # one empty panel when nothing was logged
            ax.plot(self.history[key]["steps"], self.history[key]["values"], linewidth=1)
            ax.set_ylabel(key)
            ax.grid(alpha=0.3)
        axes[-1].set_xlabel("step")
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        figure.savefig(path, dpi=100)

    def _write(self, trainer: Trainer) -> None:
        directory = run_dir(trainer)
        if trainer.is_global_zero:
            self.plot(os.path.join(directory, self.filename))

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx
    ) -> None:
        step = current_step(pl_module)
        self._record(trainer.callback_metrics, step)
        if step % self.every_n_steps == 0:
            self._write(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer)

    def state_dict(self) -> dict:
        return {
            "history": {
                key: {"steps": list(s["steps"]), "values": list(s["values"])}
                for key, s in self.history.items()
            }
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = {
            key: {"steps": list(s["steps"]), "values": list(s["values"])}
            for key, s in state_dict["history"].items()
        }
