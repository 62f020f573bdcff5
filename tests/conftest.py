"""Shared fixtures: the Hydra config of a tiny demo run, composed the way `python -m repae.train` does,
and separate processes of the training entry point (``entry_points``)."""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
FAULT_RUNNER = Path(__file__).with_name("fault_runner.py")

# A run small enough for a 2-core CPU: 32px Fashion-MNIST, tiny VAE, 2-block SiT, 4 images a batch.
TINY_OVERRIDES = [
    "experiment=demo",
    "data.dataset.max_images=64",
    "data.batch_size=4",
    "data.num_workers=0",
    "model.sit.depth=2",
    "model.sit.hidden_size=48",
    "model.sit.num_heads=2",
    "model.sit.encoder_depth=1",
    "model.sit.projector_dim=32",
    "model.max_train_steps=3",
    "model.sampling.num_steps=2",
    "trainer.log_every_n_steps=1",
    "callbacks.model_summary=null",
    "callbacks.progress_bar=null",
    "callbacks.fid=null",
    "callbacks.image_grid.num_images=4",
    "logger=csv",
]


def compose_config(run_dir: Path, *overrides: str) -> DictConfig:
    """The composed training config for a tiny run writing into ``run_dir``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*TINY_OVERRIDES, *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
    return cfg


@pytest.fixture
def tiny_config(tmp_path):
    return lambda *overrides: compose_config(tmp_path / "run", *overrides)


@pytest.fixture(scope="session")
def entry_points():
    """``run(work, cases)``: runs the cases of one ``tests/fault_runner.py`` plan (each a
    ``python -m repae.train`` process; see its docstring) in the folder ``work``, and returns their
    results by case name. One runner serves the whole session, so its imports are paid once."""
    runner = None

    def run(work: Path, cases: list[dict]) -> dict[str, dict]:
        nonlocal runner
        if runner is None:
            # One thread per run: identical numerics in every run, and two runs fit the two cores.
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            env.pop("HYDRA_FULL_ERROR", None)
            runner = subprocess.Popen(
                [sys.executable, str(FAULT_RUNNER)],
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
        work.mkdir(parents=True, exist_ok=True)
        (work / "tmp").mkdir(exist_ok=True)
        plan, results = work / "plan.json", work / "results.json"
        plan.write_text(json.dumps({"cases": cases}))
        runner.stdin.write(f"{plan} {results}\n")
        runner.stdin.flush()
        if not select.select([runner.stdout], [], [], 900)[0]:
            runner.kill()
            pytest.fail(f"the runs of {plan} took over 15 minutes")
        assert runner.stdout.readline().strip() == "done", f"fault_runner.py stopped on {plan}"
        return json.loads(results.read_text())

    yield run
    if runner is not None:
        runner.stdin.close()
        runner.wait(timeout=60)
