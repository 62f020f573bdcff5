"""A PNG of the training losses, independent of the logger in use."""

from __future__ import annotations

import os

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from matplotlib.figure import Figure

from repae.callbacks.sampling import current_step, run_dir


class LossCurveCallback(Callback):
    """Record losses from ``trainer.callback_metrics`` every iteration and plot them to ``filename``.

    For each of ``keys`` the value logged at this batch (``key`` or Lightning's ``key_step`` variant) is
    stored against ``pl_module.step``. The plot (one panel per key, shared step axis) is written under
    the run directory by rank 0 every ``every_n_steps`` iterations and at train end. The history is
    part of the callback's ``state_dict``, so a resumed run continues the same curve.

    The values stay on their device until the curve is written: reading one on the host waits for the
    GPU, which the training step otherwise never does, so they are converted to floats in one read
    every ``every_n_steps`` iterations (and whenever ``history`` is read, e.g. by ``state_dict``).
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
        # Recorded but not yet read: (step, keys, their values stacked into one device tensor) per batch.
        self._pending: list[tuple[int, list[str], torch.Tensor]] = []

    @property
    def history(self) -> dict[str, dict[str, list]]:
        """``{key: {"steps": [...], "values": [...]}}`` in Python numbers; reading it waits for the GPU
        once to convert the values recorded since the last read."""
        if self._pending:
            values = torch.cat([stacked for _, _, stacked in self._pending]).tolist()
            recorded = ((step, key) for step, keys, _ in self._pending for key in keys)
            for (step, key), value in zip(recorded, values, strict=True):
                series = self._history.setdefault(key, {"steps": [], "values": []})
                series["steps"].append(step)
                series["values"].append(value)
            self._pending = []
        return self._history

    def _record(self, metrics: dict, step: int) -> None:
        logged = {key: metrics.get(key, metrics.get(f"{key}_step")) for key in self.keys}
        logged = {key: value for key, value in logged.items() if value is not None}
        if logged:
            # torch.stack copies the values (a later step cannot change them) and, like float(), keeps
            # each value exact (mixed dtypes are promoted to the widest).
            self._pending.append((step, list(logged), torch.stack([torch.as_tensor(v).detach() for v in logged.values()])))

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
        history = self.history  # on every rank, so that the values pending on the device stay few
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
