"""Several processes train exactly like one process with the same global batch (DDP and FSDP)."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY_OVERRIDES

HELPER = Path(__file__).parent / "helpers" / "deterministic_run.py"
# No label dropout and no GAN term: the discriminator's BatchNorm uses per-rank batch statistics
# (as in the official code), which by design differ from one process's. With adam_epsilon=1 an
# AdamW update is ~lr * gradient: a desynchronised gradient shows at full size, while float
# rounding in the gradient all-reduce stays tiny (with eps=1e-8 Adam's normalisation turns any
# rounding difference of a near-zero gradient into a +-lr step).
OPTIMIZER = [
    "model.optimizer.adam_epsilon=1.0",
    "model.optimizer.learning_rate=0.5",
    "model.optimizer.vae_learning_rate=0.5",
    "model.optimizer.disc_learning_rate=0.5",
]
COMMON = [
    *OPTIMIZER,
    "model.max_train_steps=2",
    "model.sit.class_dropout_prob=0.0",
    "model.loss.discriminator_start=1000",
    "callbacks.image_grid=null",
    "callbacks.loss_curve=null",
    "callbacks.checkpoint.every_n_steps=1",
    "data.batch_size=4",  # the global batch
]


class DeterministicRuns:
    """Runs ``helpers/deterministic_run.py RUN_DIR *COMMON *overrides`` through one ``--serve``
    process, which forks every rank of every run after its imports."""

    def __init__(self):
        root = Path(__file__).resolve().parents[1]
        paths = [str(root), str(root / "tests"), os.environ.get("PYTHONPATH", "")]
        # One thread per process, as Lightning sets for each rank of a multi-process run: on two
        # busy cores a spinning second OpenMP thread can make a 1-second step take 20.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, paths)), "OMP_NUM_THREADS": "1"}
        self.server = subprocess.Popen(
            [sys.executable, str(HELPER), "--serve"],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its runs and their ranks share its process group
        )

    def __call__(self, run_dir: Path, *overrides: str) -> None:
        self.server.stdin.write(json.dumps([str(run_dir), *COMMON, *overrides]) + "\n")
        self.server.stdin.flush()
        if not select.select([self.server.stdout], [], [], 600)[0]:
            os.killpg(self.server.pid, signal.SIGKILL)
            pytest.fail(f"{run_dir} took over 10 minutes")
        exit_code = self.server.stdout.readline().strip()
        assert exit_code == "0", Path(f"{run_dir}.log").read_text()[-4000:]

    def close(self) -> None:
        self.server.stdin.close()
        self.server.wait(timeout=60)


@pytest.fixture(scope="module")
def run():
    runs = DeterministicRuns()
    yield runs
    runs.close()


# The last case also samples image grids from the sharded EMA between steps, which must leave it
# sharded like the SiT even when the SiT keeps its gathered blocks until the backward.
GLOO_CASES = {
    "single": [],
    "ddp": ["trainer=ddp_cpu"],
    "fsdp": ["trainer=fsdp_cpu"],
    "fsdp-no-reshard-with-grids": [
        "trainer=fsdp_cpu",
        "trainer.strategy.reshard_after_forward=false",
        "callbacks.image_grid={_target_: repae.callbacks.sampling.ImageGridCallback, every_n_steps: 1, num_images: 2}",
        "model.sampling.cfg_scale=1.0",  # no null-class embedding without label dropout
    ],
}


@pytest.fixture(scope="module")
def gloo_runs(tmp_path_factory, run):
    """The 2-step run of a ``GLOO_CASES`` name, made on first use and shared by the tests that read
    it: the one-process run is the reference of every two-process run, and the sharded run is also
    the start of the resume test (which continues copies, never the shared runs)."""
    root = tmp_path_factory.mktemp("gloo")

    def made(name: str) -> Path:
        if not (root / name).is_dir():
            run(root / name, *GLOO_CASES[name])
        return root / name

    return made


@pytest.mark.slow
@pytest.mark.parametrize("case", [name for name in GLOO_CASES if name != "single"])
def test_two_gloo_processes_match_one_process_with_the_same_global_batch(gloo_runs, case):
    assert_same_training(gloo_runs("single"), gloo_runs(case))


@pytest.mark.slow
def test_a_sharded_run_saves_full_checkpoints_and_resumes_exactly(tmp_path, gloo_runs, run):
    """trainer=fsdp writes the same single-file checkpoint as one process (full tensors, optimizer
    states indexed per optimizer), a run resumed from it continues as if never stopped, and a
    single-process run continues under sharding."""
    shutil.copytree(gloo_runs("single"), tmp_path / "single")
    shutil.copytree(gloo_runs("fsdp"), tmp_path / "resumed")
    single = torch.load(tmp_path / "single" / "checkpoints" / "last.ckpt", weights_only=True)
    sharded = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert sharded["state_dict"].keys() == single["state_dict"].keys()
    weights = torch.load(tmp_path / "resumed" / "weights_rank0.pt")
    for key, value in sharded["state_dict"].items():
        assert torch.equal(value, weights[key]), f"{key} in the checkpoint is not the trained tensor"
    for sharded_optimizer, single_optimizer in zip(
        sharded["optimizer_states"], single["optimizer_states"], strict=True
    ):
        assert sharded_optimizer["param_groups"] == single_optimizer["param_groups"]
        for index, state in single_optimizer["state"].items():
            assert state["exp_avg"].shape == sharded_optimizer["state"][index]["exp_avg"].shape

    longer = ["model.max_train_steps=3"]
    run(tmp_path / "resumed", "trainer=fsdp_cpu", *longer)
    run(tmp_path / "uninterrupted", "trainer=fsdp_cpu", *longer)
    resumed = torch.load(tmp_path / "resumed" / "weights_rank0.pt")
    uninterrupted = torch.load(tmp_path / "uninterrupted" / "weights_rank0.pt")
    assert (tmp_path / "resumed" / "steps_rank0.txt").read_text() == "3", "the run did not resume at step 3"
    for key, value in uninterrupted.items():
        assert torch.equal(resumed[key], value), f"{key} differs after resuming"

    # The single-process run continues under sharding: its third step equals a single process's
    # third step up to one step's float rounding of the gradient reductions.
    run(tmp_path / "single", "trainer=fsdp_cpu", *longer)
    run(tmp_path / "single_uninterrupted", *longer)
    assert (tmp_path / "single" / "steps_rank0.txt").read_text() == "3", "the run did not resume at step 3"
    final = torch.load(tmp_path / "single" / "checkpoints" / "last.ckpt", weights_only=True)
    for optimizer in final["optimizer_states"]:  # the Adam moments and step counts carried over
        assert all(int(state["step"]) == 3 for state in optimizer["state"].values())
    switched = torch.load(tmp_path / "single" / "weights_rank0.pt")
    expected = torch.load(tmp_path / "single_uninterrupted" / "weights_rank0.pt")
    for key, value in expected.items():
        per_rank_statistics = key.startswith("vae_loss.discriminator.") and ".running_" in key  # D's BN
        if value.is_floating_point() and not per_rank_statistics:
            torch.testing.assert_close(switched[key], value, atol=1e-5, rtol=1e-5, msg=key)


@pytest.mark.slow
def test_a_sharded_module_name_the_model_lacks_stops_with_one_clear_error_before_other_ranks_start(
    tmp_path, entry_points
):
    argv = [*TINY_OVERRIDES, f"paths.root_dir={tmp_path}", "trainer=fsdp_cpu",
            "trainer.strategy.sharded_modules=[sit,transformer]"]  # fmt: skip
    result = entry_points(tmp_path / "runner", [{"name": "unknown", "argv": argv}])["unknown"]
    assert result["exitcode"] == 1, result["stderr"][-3000:]
    assert "Traceback" not in result["stderr"], result["stderr"][-3000:]
    assert (
        "error: trainer.strategy.sharded_modules names no submodule of the model: ['transformer']"
        in result["stderr"]
    )
    assert "Initializing distributed" not in result["stdout"] + result["stderr"], "a rank was started"


@pytest.mark.slow
def test_lightnings_launcher_starts_the_second_rank_of_a_train_command_into_the_same_run(
    tmp_path, entry_points
):
    # The equality tests fork their ranks; this is the path a user's `python -m repae.train
    # trainer=ddp` takes: Lightning re-runs the command for rank 1, and Hydra must not give it a
    # run directory of its own.
    argv = [*TINY_OVERRIDES, f"paths.root_dir={tmp_path}", "trainer=ddp_cpu", "model.max_train_steps=2"]
    result = entry_points(tmp_path / "runner", [{"name": "ddp", "argv": argv}])["ddp"]
    output = result["stdout"] + result["stderr"]
    assert result["exitcode"] == 0, output[-3000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in output, output[-3000:]
    runs = [path.parent for path in (tmp_path / "logs").rglob(".hydra")]
    assert len(runs) == 1, runs
    assert (runs[0] / "checkpoints" / "last.ckpt").is_file()
    assert json.loads((runs[0] / "final_metrics.json").read_text())["step"] == 2


GPU = ["trainer.accelerator=gpu", "trainer.precision=32-true", "trainer.benchmark=false", "allow_tf32=false"]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("trainer", ["ddp", "fsdp"])
def test_two_nccl_gpus_match_one_gpu_with_the_same_global_batch(tmp_path, run, trainer):
    run(tmp_path / "single", *GPU, "trainer.devices=1")
    run(tmp_path / "ddp", f"trainer={trainer}", *GPU, "trainer.devices=2")
    assert_same_training(tmp_path / "single", tmp_path / "ddp")


def assert_same_training(single_run: Path, two_process_run: Path) -> None:
    """Every parameter, EMA tensor and BN buffer is identical on both ranks and equal to the
    single-process run's."""
    single = torch.load(single_run / "weights_rank0.pt")
    rank0 = torch.load(two_process_run / "weights_rank0.pt")
    rank1 = torch.load(two_process_run / "weights_rank1.pt")
    assert rank0["train_step"] == rank1["train_step"] == single["train_step"] == 2
    for key, value in rank0.items():
        if (
            key.startswith("vae_loss.discriminator.")
            and not key.endswith("weight")
            and not key.endswith("bias")
        ):
            continue  # D's BN running stats: per-rank batches, broadcast from rank 0 (official behaviour)
        assert torch.equal(value, rank1[key]), f"{key} differs between ranks"
        if value.is_floating_point():
            # float rounding of the gradient sums, grown over two large steps; a desynchronised
            # gradient would differ by ~lr * gradient, orders of magnitude more
            torch.testing.assert_close(value, single[key], atol=2e-4, rtol=1e-4, msg=key)
        else:
            assert torch.equal(value, single[key]), key
    assert not torch.equal(rank0["sit.bn.running_mean"], torch.zeros(4)), "the SiT pass updated BN"
