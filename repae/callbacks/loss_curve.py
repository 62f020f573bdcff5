"""A PNG of the training losses, independent of the logger in use."""

from __future__ import annotations

import os

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from matplotlib.figure import Figure

from repae.callbacks.run import current_step, run_dir


class LossCurveCallback(Callback):
    """Record losses from ``trainer.callback_metrics`` every iteration and plot them to ``filename``.

    For each of ``keys`` the value logged at this batch (``key`` or Lightning's ``key_step`` variant) is
    stored against ``pl_module.step``. The plot (one panel per key, shared step axis) is written under
    the run directory by rank 0 every ``every_n_steps`` iterations and at train end. The history is
    part of the callback's ``state_dict``, so a resumed run continues the same curve.

    The values stay on their device until the curve is written: reading one on the host waits for the
    GPU, which the training step otherwise never does. They are read in one go every
    ``every_n_steps`` iterations, at train end, and whenever ``history`` is read (``state_dict`` too).
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
        self._history: dict[str, dict[str, list]] = {key: {"steps": [], "values": []} for key in self.keys}
        # Recorded, not yet read: per batch, its step, the keys logged and their values in one tensor.
        self._pending: list[tuple[int, list[str], torch.Tensor]] = []

    @property
    def history(self) -> dict[str, dict[str, list]]:
        """``{key: {"steps": [...], "values": [...]}}`` of Python numbers, up to the last recorded step."""
        self._read_pending()
        return self._history

    def _read_pending(self) -> None:
        """Move the pending values into the history as floats: one wait for the GPU."""
        if not self._pending:
            return
        values = torch.cat([stacked for _, _, stacked in self._pending]).tolist()
        recorded = [(step, key) for step, keys, _ in self._pending for key in keys]
        for (step, key), value in zip(recorded, values, strict=True):
            series = self._history.setdefault(key, {"steps": [], "values": []})
            series["steps"].append(step)
            series["values"].append(value)
        self._pending = []

    def _record(self, metrics: dict, step: int) -> None:
        logged = {key: metrics.get(key, metrics.get(f"{key}_step")) for key in self.keys}
        logged = {key: value for key, value in logged.items() if value is not None}
        if logged:
            # A copy, so later steps cannot change it; mixed dtypes are promoted, so every value
            # reads back as the float(value) it would give now.
            stacked = torch.stack([value.detach() for value in logged.values()])
            self._pending.append((step, list(logged), stacked))

    def plot(self, path: str) -> None:
        """Write the recorded curves to ``path`` (PNG); keys with no values are left out."""
        history = self.history
        recorded = [key for key in self.keys if history.get(key, {}).get("steps")]
        figure = Figure(figsize=(7, 2.2 * max(len(recorded), 1)), layout="constrained")
        axes = figure.subplots(max(len(recorded), 1), 1, sharex=True, squeeze=False)[:, 0]
        for ax, key in zip(axes, recorded, strict=False):  # one empty panel when nothing was logged
            ax.plot(history[key]["steps"], history[key]["values"], linewidth=1)
            ax.set_ylabel(key)
            ax.grid(alpha=0.3)
        axes[-1].set_xlabel("step")
        directory = os.path.dirname(path)
        if directory:
            os.makedirs(directory, exist_ok=True)
        figure.savefig(path, dpi=100)

    def _write(self, trainer: Trainer) -> None:
        directory = run_dir(trainer)
        self._read_pending()  # on every rank, so that the values kept on the device stay few
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
        self._pending = []
        self._history = {
            key: {"steps": list(s["steps"]), "values": list(s["values"])}
            for key, s in state_dict["history"].items()
        }
