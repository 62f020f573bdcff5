"""A SLURM warning signal checkpoints at a step boundary, requeues, and the rerun resumes exactly."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from types import SimpleNamespace

import lightning.pytorch as pl
import torch
from omegaconf import open_dict

from repae.callbacks.requeue import RequeueOnSignal
from repae.train import train

from test_training import loss_trace


class SignalAtStep(pl.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.step == self.step - 1:
            os.kill(os.getpid(), signal.SIGUSR1)


def test_signal_checkpoints_requeues_and_the_rerun_continues_identically(tiny_config, tmp_path, monkeypatch):
    straight = tiny_config("model.max_train_steps=4")
    train(straight)

    marker = tmp_path / "requeued"
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    cfg = tiny_config("model.max_train_steps=4")
    cfg.paths.output_dir = str(tmp_path / "preempted")
    with open_dict(cfg):
        cfg.callbacks.requeue.requeue_command = ["touch", f"{marker}_{{job_id}}"]
        cfg.callbacks.requeue.every_n_steps = 2  # the signal in step 1 is acted on after step 2
        cfg.callbacks.signal = {"_target_": "test_requeue.SignalAtStep", "step": 1}
    train(cfg)
    checkpoint = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["state_dict"]["train_step"] == 2
    assert checkpoint["ImageDataModule"] == {"epoch": 0, "batches_consumed": 2}
    assert Path(f"{marker}_4242").exists(), "scontrol requeue was not called with the job id"

    with open_dict(cfg):
        cfg.callbacks.signal = None
    train(cfg)  # the requeued job: same command, same directory
    expected, resumed = loss_trace(Path(straight.paths.output_dir)), loss_trace(Path(cfg.paths.output_dir))
    assert sorted(resumed) == [1, 2, 3, 4]
    for step, value in expected.items():
        assert abs(resumed[step] - value) <= 1e-6 + 1e-5 * abs(value), step


def test_with_requeue_off_the_signal_only_checkpoints_and_stops(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    marker = tmp_path / "requeued"
    callback = RequeueOnSignal(requeue_command=["touch", str(marker)], requeue=False)
    saved = []
    trainer = SimpleNamespace(
        strategy=SimpleNamespace(reduce_boolean_decision=lambda decision, all: decision),
        checkpoint_callback=SimpleNamespace(save=saved.append),
        is_global_zero=True,
        should_stop=False,
    )
    callback._request(signal.SIGUSR1, None)
    callback.on_train_batch_end(trainer, SimpleNamespace(step=3))
    assert saved == [trainer] and trainer.should_stop
    assert not marker.exists(), "the job was requeued"
