"""Train the tiny demo config with all randomness made a function of the sample, then save every
rank's final weights: `PYTHONPATH=tests python tests/helpers/deterministic_run.py RUN_DIR [overrides...]`
(tests/ on the path for its ``conftest``). With ``--serve`` it runs one such command per line of
stdin, each in a child forked after the imports (see ``serve``).

With t, noise and the VAE's posterior sample derived from each sample's own latents, a run's
result depends only on its global batches, not on how they are split over processes, so a DDP
run can be compared with a single-process run. Lightning's DDP launcher re-runs this script in
every rank.
"""

import json
import os
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
        trainer.strategy.barrier()  # every rank's files exist once rank 0's process ends


def deterministic_run(run_dir: Path, *overrides: str) -> None:
    REPAE._training_times = per_sample_times  # the step draws t and hands it to the SiT
    SiT.forward = per_sample_forward
    DiagonalGaussianDistribution.sample = lambda self, generator=None: self.mean
    cfg = compose_config(run_dir, *overrides)
    with open_dict(cfg):
        cfg.callbacks.save_weights = {
            "_target_": "helpers.deterministic_run.SaveWeightsPerRank",
            "directory": str(run_dir),
        }
    train(cfg)


def serve() -> None:
    """Run each line of stdin, a JSON list ``[RUN_DIR, override, ...]``, as the command
    ``deterministic_run.py RUN_DIR override ...`` in a child forked from this process, with stdout and
    stderr going to ``RUN_DIR.log``; answer each with the child's exit code, one line on stdout.

    The children skip the imports (most of a tiny run's start-up). Lightning starts the other ranks
    of a multi-process run from the child's ``sys.argv``: as the plain command, which imports anew.
    """
    for line in sys.stdin:
        run_dir, *overrides = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            with open(f"{run_dir}.log", "wb") as log:
                os.dup2(log.fileno(), 1)
                os.dup2(log.fileno(), 2)
            sys.argv = [os.path.abspath(__file__), run_dir, *overrides]
            deterministic_run(Path(run_dir), *overrides)
            sys.exit(0)  # an exception ends the child with its traceback in the log and exit code 1
        _, status = os.waitpid(pid, 0)
        print(os.waitstatus_to_exitcode(status), flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        deterministic_run(Path(sys.argv[1]), *sys.argv[2:])
