"""Checkpoint-and-requeue on SLURM's warning signal, at a step boundary."""

from __future__ import annotations

import os
import signal
import subprocess

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

from repae.callbacks.run import current_step


class RequeueOnSignal(Callback):
    """On ``signal_name`` (SLURM sends it with ``#SBATCH --signal=USR1@120`` before the time limit
    or a preemption), finish the current step, write ``checkpoints/last.ckpt``, requeue the job and
    stop. The requeued job runs the same command in the same deterministic run directory and
    resumes from ``last.ckpt``.

    Lightning's own SLURM handler saves from inside the signal handler, i.e. possibly halfway
    through a step (after the VAE update, before the SiT's); here the handler only sets a flag and
    the checkpoint is written between steps, once every rank has seen the flag. Use it with
    ``SLURMEnvironment(auto_requeue=False)`` so the two handlers don't both act, and with
    ``StepCheckpoint`` (whose ``save`` writes the checkpoint).

    The ranks compare their flags after every ``every_n_steps``-th step only: under DDP/FSDP that
    is an all-reduce whose result the host must wait for, which would otherwise stall every step.

    With ``requeue`` False the run only checkpoints and stops: for a driver that starts several runs
    inside one SLURM job (``python -m repae.study``), where whoever runs the job resubmits it.
    """

    def __init__(
        self,
        signal_name: str = "SIGUSR1",
        requeue_command: list[str] | None = None,
        every_n_steps: int = 1,
        requeue: bool = True,
    ):
        if every_n_steps <= 0:
            raise ValueError(f"every_n_steps must be positive, got {every_n_steps}")
        self.signal_number = getattr(signal, signal_name)
        self.requeue_command = requeue_command or ["scontrol", "requeue", "{job_id}"]
        self.every_n_steps = every_n_steps
        self.requeue = requeue
        self.requested = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        signal.signal(self.signal_number, self._request)

    def _request(self, signum, frame) -> None:
        self.requested = True

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args) -> None:
        if current_step(pl_module) % self.every_n_steps:
            return
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        trainer.checkpoint_callback.save(trainer)
        job_id = os.environ.get("SLURM_JOB_ID")
        if self.requeue and trainer.is_global_zero and job_id:
            subprocess.run([part.format(job_id=job_id) for part in self.requeue_command], check=True)
        trainer.should_stop = True
