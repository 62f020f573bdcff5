"""Train the tiny demo config with all randomness made a function of the sample, then save every
rank's final weights: `PYTHONPATH=tests python tests/helpers/deterministic_run.py RUN_DIR [overrides...]`
(tests/ on the path for its ``conftest``).

With t, noise and the VAE's posterior sample derived from each sample's own latents, a run's
result depends only on its global batches, not on how they are split over processes, so a DDP
run can be compared with a single-process run. Lightning's DDP launcher re-runs this script in
every rank.
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from omegaconf import open_dict
from torch.distributed.tensor import DTensor

from repae.module import REPAE
from repae.modules.sit import SiT
from repae.modules.vae import DiagonalGaussianDistribution
from repae.train import train

from conftest import compose_config

original_forward = SiT.forward


def per_sample_times(self, latents):
    return (latents.detach().flatten(1).sum(1).abs() * 7.31 % 1).view(-1, 1, 1, 1)


def per_sample_forward(self, x, y, zs=None, align_only=False, time_input=None, noises=None):
    if noises is None:
        noises = torch.sin(x.detach() * 13.7 + 1.0)
    return original_forward(self, x, y, zs, align_only=align_only, time_input=time_input, noises=noises)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor, also of an FSDP-sharded parameter (gathered from all ranks)."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


class SaveWeightsPerRank(pl.Callback):
    """Writes weights_rank{R}.pt (every tensor, whole) and steps_rank{R}.txt (the steps this process
    trained, so a test can tell a resumed run from one that started afresh)."""

    def __init__(self, directory: str):
        self.directory = Path(directory)
        self.steps_trained = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps_trained.append(pl_module.step)

    def on_train_end(self, trainer, pl_module):
        state = {key: full(value).detach().cpu().clone() for key, value in pl_module.state_dict().items()}
        torch.save(state, self.directory / f"weights_rank{trainer.global_rank}.pt")
        (self.directory / f"steps_rank{trainer.global_rank}.txt").write_text(
            " ".join(map(str, self.steps_trained))
        )


if __name__ == "__main__":
    REPAE._training_times = per_sample_times  # the step draws t and hands it to the SiT
    SiT.forward = per_sample_forward
    DiagonalGaussianDistribution.sample = lambda self, generator=None: self.mean
    run_dir = Path(sys.argv[1])
    cfg = compose_config(run_dir, *sys.argv[2:])
    with open_dict(cfg):
        cfg.callbacks.save_weights = {
            "_target_": "helpers.deterministic_run.SaveWeightsPerRank",
            "directory": str(run_dir),
        }
    train(cfg)
