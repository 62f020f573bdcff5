"""Train the tiny demo config with all randomness made a function of the sample, then save every
rank's final weights: `PYTHONPATH=tests python tests/helpers/deterministic_run.py RUN_DIR [overrides...]`
(tests/ on the path for its ``conftest``). With ``--serve`` it runs one such command per line of
stdin, each rank in a child forked after the imports (see ``serve``).

With t, noise and the VAE's posterior sample derived from each sample's own latents, a run's
result depends only on its global batches, not on how they are split over processes, so a DDP
run can be compared with a single-process run. Run as a command, Lightning's DDP launcher re-runs
this script in every rank.
"""

import json
import os
import signal
import socket
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig, open_dict
from torch.distributed.tensor import DTensor

from repae.module import REPAE
from repae.modules.sit import SiT
from repae.modules.vae import DiagonalGaussianDistribution
from repae.train import train

from conftest import compose_config
from helpers.forked import run_and_exit

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


def deterministic_config(run_dir: Path, *overrides: str) -> DictConfig:
    """The tiny run's config with ``overrides``, saving every rank's weights into ``run_dir``."""
    cfg = compose_config(run_dir, *overrides)
    with open_dict(cfg):
        cfg.callbacks.save_weights = {
            "_target_": "helpers.deterministic_run.SaveWeightsPerRank",
            "directory": str(run_dir),
        }
    return cfg


def deterministic_run(cfg: DictConfig) -> None:
    REPAE._training_times = per_sample_times  # the step draws t and hands it to the SiT
    SiT.forward = per_sample_forward
    DiagonalGaussianDistribution.sample = lambda self, generator=None: self.mean
    train(cfg)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_ranks(cfg: DictConfig, log: Path) -> int:
    """Run ``cfg`` in one child forked from this process per rank (``trainer.devices`` of them), with
    stdout and stderr of all going to ``log``; the first failing rank's exit code, else 0.

    The ranks are created the way torchrun creates them (``LOCAL_RANK``, ``WORLD_SIZE`` and the
    rendezvous address in the environment, which tells Lightning not to launch any), so none of them
    pays for the imports. A rank that fails ends the others, as Lightning's launcher does: they
    would wait for it in their next collective."""
    devices = cfg.trainer.devices if isinstance(cfg.trainer.devices, int) else 1
    ranks = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(devices)}
    sys.stdout.flush()
    sys.stderr.flush()
    children = set()
    with open(log, "wb") as output:
        for rank in range(devices):
            pid = os.fork()
            if pid == 0:
                os.dup2(output.fileno(), 1)
                os.dup2(output.fileno(), 2)
                if devices > 1:
                    os.environ.update(ranks, LOCAL_RANK=str(rank), NODE_RANK="0")
                run_and_exit(lambda: deterministic_run(cfg))
            children.add(pid)
    code = 0
    while children:
        pid, status = os.wait()
        children.discard(pid)
        if os.waitstatus_to_exitcode(status) != 0 and code == 0:
            code = os.waitstatus_to_exitcode(status)
            for other in children:
                os.kill(other, signal.SIGKILL)
    return code


def serve() -> None:
    """Run each line of stdin, a JSON list ``[RUN_DIR, override, ...]``, as the command
    ``deterministic_run.py RUN_DIR override ...`` (``run_ranks``, logging to ``RUN_DIR.log``);
    answer each with its exit code, one line on stdout."""
    for line in sys.stdin:
        run_dir, *overrides = json.loads(line)
        print(run_ranks(deterministic_config(Path(run_dir), *overrides), Path(f"{run_dir}.log")), flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        serve()
    else:
        deterministic_run(deterministic_config(Path(sys.argv[1]), *sys.argv[2:]))
