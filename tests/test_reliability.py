"""Fault injection (issue #8): kills, non-finite steps, full disks and bad input, on tiny CPU runs.

Entry-point runs go through ``tests/fault_runner.py``: each run is its own process running
``python -m repae.train`` with faults patched in from the test side (SIGKILL at chosen points, a
disk that fills up mid-write, NaN losses). ``docs/reliability.md`` maps every fault to its test.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from repae.datamodules.datamodule import ImageDataModule
from repae.datamodules.datasets import write_h5_images, write_h5_latents
from repae.module import REPAE
from repae.modules.losses import VAERegularizationLoss
from repae.modules.vae import AutoencoderKL
from repae.train import input_error, train

from conftest import TINY_OVERRIDES, compose_config
from helpers.faults import nan_vae_loss_methods

LOSSES = ("sit_loss", "vae_loss", "d_loss")
# No sample grid or loss plot: these runs are about state, and every second counts on 2 cores.
QUIET = ("callbacks.image_grid=null", "callbacks.loss_curve=null")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny models train as fast on one thread, and then a busy neighbour process cannot stall
    them (two spinning OpenMP threads on a shared core made a 2-second test take 40)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- helpers ----------------------------------------------------------------------------------
def entry_argv(root: Path, run_name: str, *overrides: str, drop: tuple[str, ...] = ()) -> list[str]:
    """Command-line arguments of ``python -m repae.train`` for a tiny run in ``root/logs/train/run_name``;
    ``drop`` removes the tiny overrides of those keys (for datasets or groups that lack them)."""
    tiny = [o for o in TINY_OVERRIDES if o.split("=")[0] not in drop]
    return [*tiny, *QUIET, f"paths.root_dir={root}", f"run_name={run_name}", *overrides]


def run_dir(root: Path, run_name: str) -> Path:
    return root / "logs" / "train" / run_name


def last_rows(run: Path) -> dict[int, dict[str, str]]:
    """The logged row of every step; a step logged again after a resume counts with its last row."""
    with open(run / "csv" / "metrics.csv") as f:
        return {int(float(row["step"])): row for row in csv.DictReader(f) if row.get("step")}


def loss_trace(run: Path) -> dict[int, tuple[float, ...]]:
    return {step: tuple(float(row[key]) for key in LOSSES) for step, row in last_rows(run).items()}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_failed_without_traceback(result: dict) -> None:
    assert result["exitcode"] == 1, result["stderr"][-3000:]
    for stream in ("stderr", "stdout"):  # the log goes to stdout
        assert "Traceback" not in result[stream], result[stream][-3000:]


def the_error_line(result: dict) -> str:
    """The one ``error: ...`` line the entry point prints for bad input, after checking that the run
    failed with exit code 1 and printed no traceback."""
    assert_failed_without_traceback(result)
    lines = [line for line in result["stderr"].splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result["stderr"][-3000:]
    return lines[0]


# --- SIGKILL, a full disk, and resume ---------------------------------------------------------
KILL_STEPS = 6
# A checkpoint after every step; the GAN term switches on in step 4, after a resume.
KILL_OVERRIDES = (
    f"model.max_train_steps={KILL_STEPS}",
    "callbacks.checkpoint.every_n_steps=1",
    "model.loss.discriminator_start=3",
)


@pytest.fixture(scope="module")
def kill_chain(tmp_path_factory, entry_points):
    """One uninterrupted run and, next to it, the same command run again and again in one run
    directory, each time stopped by a different fault:

    1. SIGKILL inside step 3, after the optimizers and the EMA have updated (last.ckpt: step 2);
    2. the disk fills up while last.ckpt is written after step 3;
    3. SIGKILL while last.ckpt is written after step 4, with half of it on disk;
    4. the last run finishes the 6 steps.
    """
    root = tmp_path_factory.mktemp("kill")
    chain = run_dir(root, "chain")
    last = chain / "checkpoints" / "last.ckpt"
    argv = entry_argv(root, "chain", *KILL_OVERRIDES)

    def write_fault(step: int, action: str, probe: str) -> dict:
        return {
            "kind": "fail_checkpoint_write",
            "step": step,
            "file": "last.ckpt",
            "action": action,
            "probe": str(root / probe),
        }

    cases = [
        {
            "name": "uninterrupted",
            "argv": entry_argv(root, "uninterrupted", *KILL_OVERRIDES),
            "background": True,
        },
        {
            "name": "killed_in_step",
            "argv": argv,
            "keep": [str(last)],
            "faults": [{"kind": "kill_after_optimizer_step", "step": 3}],
        },
        {
            "name": "disk_full",
            "argv": argv,
            "keep": [str(last)],
            "watch": [str(chain / "checkpoints"), str(root / "runner" / "tmp")],
            "faults": [write_fault(3, "enospc", "disk_full.json")],
        },
        {
            "name": "killed_in_save",
            "argv": argv,
            "keep": [str(last)],
            "faults": [write_fault(4, "kill", "killed_in_save.json")],
        },
        {"name": "finished", "argv": argv},
    ]
    results = entry_points(root / "runner", cases)
    probes = {
        name: json.loads((root / f"{name}.json").read_text()) for name in ("disk_full", "killed_in_save")
    }
    return SimpleNamespace(
        root=root,
        chain=chain,
        results=results,
        probes=probes,
        kept=lambda case: root / "runner" / case / "last.ckpt",
    )


@pytest.mark.slow
def test_runs_killed_at_several_points_resume_to_identical_losses_and_weights(kill_chain):
    results = kill_chain.results
    assert results["uninterrupted"]["exitcode"] == 0, results["uninterrupted"]["stderr"][-3000:]
    assert results["killed_in_step"]["signal"] == 9
    assert results["killed_in_save"]["signal"] == 9
    assert results["finished"]["exitcode"] == 0, results["finished"]["stderr"][-3000:]
    expected = loss_trace(run_dir(kill_chain.root, "uninterrupted"))
    resumed = loss_trace(kill_chain.chain)
    assert sorted(expected) == list(range(1, KILL_STEPS + 1))
    assert sorted(resumed) == sorted(expected)
    for step, losses in expected.items():
        assert resumed[step] == pytest.approx(losses, rel=0, abs=1e-6), step
    # Same weights, EMA, BatchNorm statistics, counters and optimizer moments at the end.
    straight = load_checkpoint(run_dir(kill_chain.root, "uninterrupted") / "checkpoints" / "last.ckpt")
    final = load_checkpoint(kill_chain.chain / "checkpoints" / "last.ckpt")
    assert final["state_dict"]["train_step"] == KILL_STEPS
    assert final["state_dict"].keys() == straight["state_dict"].keys()
    for key, value in straight["state_dict"].items():
        torch.testing.assert_close(final["state_dict"][key], value, rtol=0, atol=1e-6, msg=key)
    for mine, theirs in zip(final["optimizer_states"], straight["optimizer_states"], strict=True):
        for index, moments in theirs["state"].items():
            for name, value in moments.items():
                torch.testing.assert_close(mine["state"][index][name], value, rtol=0, atol=1e-6)


@pytest.mark.slow
def test_a_kill_inside_a_step_leaves_the_previous_checkpoint(kill_chain):
    assert load_checkpoint(kill_chain.kept("killed_in_step"))["state_dict"]["train_step"] == 2


@pytest.mark.slow
def test_a_kill_while_writing_last_ckpt_leaves_the_previous_complete_one(kill_chain):
    probe = kill_chain.probes["killed_in_save"]
    assert probe["opened_for_writing"], "the fault never fired"
    kept = kill_chain.kept("killed_in_save")
    assert sha256(kept) == probe["before_sha256"]
    assert load_checkpoint(kept)["state_dict"]["train_step"] == 3


@pytest.mark.slow
def test_checkpoints_are_written_next_to_their_final_name(kill_chain):
    opened = [Path(path) for path in kill_chain.probes["killed_in_save"]["opened_for_writing"]]
    assert opened and all(path.parent == kill_chain.chain / "checkpoints" for path in opened), opened


@pytest.mark.slow
def test_a_full_disk_while_checkpointing_leaves_the_previous_checkpoint_byte_identical(kill_chain):
    probe = kill_chain.probes["disk_full"]
    assert probe["opened_for_writing"], "the fault never fired"
    assert kill_chain.results["disk_full"]["exitcode"] == 1
    assert "No space left on device" in kill_chain.results["disk_full"]["stderr"]
    kept = kill_chain.kept("disk_full")
    assert sha256(kept) == probe["before_sha256"]
    assert load_checkpoint(kept)["state_dict"]["train_step"] == 2
    # No partial file is left behind to fill the disk further.
    left = sorted(Path(path).name for path in kill_chain.results["disk_full"]["watched"])
    assert left == ["0000001.ckpt", "0000002.ckpt", "0000003.ckpt", "last.ckpt"]


@pytest.mark.slow
def test_a_full_disk_is_reported_in_one_line(kill_chain):
    line = the_error_line(kill_chain.results["disk_full"])
    assert "No space left on device" in line and "last.ckpt" in line


# --- non-finite losses ------------------------------------------------------------------------
def nan_vae_loss_at(monkeypatch, steps: set[int]) -> None:
    """Make the VAE loss NaN in the given 1-based steps."""
    for name, method in nan_vae_loss_methods(steps.__contains__).items():
        monkeypatch.setattr(VAERegularizationLoss, name, method)


def record_state_around_steps(monkeypatch) -> dict[int, tuple[dict, dict]]:
    """{1-based step: (state before, state after)} of the trained parameters and the EMA."""
    states: dict[int, tuple[dict, dict]] = {}
    original = REPAE.training_step

    def snapshot(model: REPAE) -> dict[str, torch.Tensor]:
        tensors = {f"sit.{k}": v for k, v in model.sit.named_parameters()}
        tensors |= {f"vae.{k}": v for k, v in model.vae.named_parameters()}
        tensors |= {f"disc.{k}": v for k, v in model.vae_loss.discriminator.named_parameters()}
        tensors |= {f"ema.{k}": v for k, v in model.ema.state_dict().items()}
        return {key: value.detach().clone() for key, value in tensors.items()}

    def training_step(self, batch, batch_idx):
        before = snapshot(self)
        original(self, batch, batch_idx)
        states[self.step] = (before, snapshot(self))

    monkeypatch.setattr(REPAE, "training_step", training_step)
    return states


@pytest.mark.parametrize(
    "optimizer",
    [
        pytest.param("model.optimizer.fused=false", id="host-reads-finiteness"),
        pytest.param("model.optimizer.fused=true", id="fused-skips-on-device"),
    ],
)
def test_a_nan_loss_skips_all_three_updates_and_the_ema_and_is_counted(tiny_config, monkeypatch, optimizer):
    cfg = tiny_config(*QUIET, optimizer)
    nan_vae_loss_at(monkeypatch, {2})
    states = record_state_around_steps(monkeypatch)
    train(cfg)
    before, after = states[2]
    assert [key for key, value in before.items() if not torch.equal(value, after[key])] == []
    for step in (1, 3):  # the snapshots do see the updates of finite steps
        changed = {
            key.split(".")[0]
            for key, value in states[step][0].items()
            if not torch.equal(value, states[step][1][key])
        }
        assert changed == {"sit", "vae", "disc", "ema"}, step
    rows = last_rows(Path(cfg.paths.output_dir))
    assert [float(rows[step]["nonfinite_steps"]) for step in (1, 2, 3)] == [0, 1, 1]
    assert np.isnan(float(rows[2]["vae_loss"])) and all(np.isfinite(float(rows[3][key])) for key in LOSSES)
    checkpoint = load_checkpoint(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt")
    assert (checkpoint["state_dict"]["train_step"], checkpoint["state_dict"]["nonfinite_steps"]) == (3, 1)


def test_with_fused_optimizers_too_many_nonfinite_steps_in_a_row_still_stop_the_run(tiny_config, monkeypatch):
    # the GPU skips the steps; the host reads the count of consecutive skips every 2 steps here
    cfg = tiny_config(
        *QUIET, "model.optimizer.fused=true", "model.max_consecutive_nonfinite=2", "model.max_train_steps=6"
    )
    nan_vae_loss_at(monkeypatch, {3, 4, 5, 6})
    with pytest.raises(FloatingPointError, match=r"^2 consecutive steps .*\(last at step 4\)"):
        train(cfg)


def test_nan_latents_in_one_step_do_not_poison_later_steps(tiny_config, monkeypatch):
    cfg = tiny_config(*QUIET, "model.max_train_steps=4")
    original, calls = AutoencoderKL.forward, []

    def forward(self, x, return_recon=True):
        posterior, z, recon = original(self, x, return_recon)
        calls.append(None)
        return posterior, (z * float("nan") if len(calls) == 2 else z), recon

    monkeypatch.setattr(AutoencoderKL, "forward", forward)
    train(cfg)
    rows = last_rows(Path(cfg.paths.output_dir))
    assert float(rows[4]["nonfinite_steps"]) == 1
    assert all(np.isfinite(float(rows[step][key])) for step in (3, 4) for key in LOSSES)


# --- bad input through the entry point --------------------------------------------------------
def write_image_folder(folder: Path, num_good: int, corrupt_name: str) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(num_good):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"good{i}.png")
    (folder / corrupt_name).write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 10)
    return folder / corrupt_name


def write_latent_cache(data_dir: Path, name: str, latent_channels: int) -> None:
    """images.h5 of 8 images of 32px plus their latents cached as [mean; std] of ``latent_channels``."""
    rng = np.random.default_rng(0)
    labels = list(range(8))
    write_h5_images(data_dir, rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), labels)
    latents = np.concatenate(
        [rng.standard_normal((8, latent_channels, 8, 8)), np.ones((8, latent_channels, 8, 8))], axis=1
    )
    write_h5_latents(data_dir, name, latents.astype(np.float32), labels)


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, entry_points):
    """A finished 1-step run ``victim``, then every bad input through the entry point, most of them
    aimed at ``victim``'s run directory (which must come out unchanged), and a run stopped by
    non-finite steps."""
    root = tmp_path_factory.mktemp("bad")
    victim = run_dir(root, "victim")
    train(compose_config(victim, *QUIET, "model.max_train_steps=1"))
    watched = [victim / "checkpoints", victim / "csv" / "metrics.csv"]
    truncated = root / "truncated.ckpt"
    truncated.write_bytes((victim / "checkpoints" / "last.ckpt").read_bytes()[:100_000])
    corrupt = write_image_folder(root / "images", 3, "broken.png")
    write_latent_cache(root / "cache", "other-vae", latent_channels=8)  # the tiny VAE has 4
    stats = root / "stats.pt"
    torch.save({"latents_scale": torch.ones(1, 4, 1, 1), "latents_bias": torch.zeros(1, 4, 1, 1)}, stats)

    def victim_case(name: str, *overrides: str, drop: tuple[str, ...] = ()) -> dict:
        return {
            "name": name,
            "argv": entry_argv(root, "victim", *overrides, drop=drop),
            "watch": [str(p) for p in watched],
        }

    image_folder = ("data=image_folder", f"data.dataset.root={corrupt.parent}", "data.dataset.image_size=32")
    # The background cases (each in a run directory of its own) run next to the victim's cases after
    # them, on the second core.
    cases = [
        {
            "name": "nonfinite_in_a_row",
            "background": True,
            "argv": entry_argv(
                root,
                "nonfinite",
                "model.max_consecutive_nonfinite=2",
                "model.max_train_steps=6",
                "callbacks.checkpoint.every_n_steps=1",
            ),
            "faults": [{"kind": "nan_vae_loss", "from_step": 3}],
        },
        victim_case("unknown_experiment", "experiment=no_such_experiment", drop=("experiment",)),
        victim_case("unknown_key", "model.sit.deptth=3"),
        victim_case(
            "missing_encoder_weights",
            "model.encoder.names=dinov2-vit-s",
            "model.encoder.resolution=256",
            f"model.encoder.weights_paths={root}/missing_dinov2.pth",
        ),
        victim_case(
            "missing_lpips_weights",
            "model/loss/perceptual=lpips",
            f"model.loss.perceptual.vgg_weights_path={root}/missing_vgg16.pth",
        ),
        victim_case(
            "missing_inception_weights",
            "callbacks.fid.feature_extractor=inception",
            f"+callbacks.fid.inception_weights_path={root}/missing_inception.pth",
            drop=("callbacks.fid",),
        ),
        {
            "name": "corrupt_image",
            "background": True,
            "argv": entry_argv(root, "corrupt", *image_folder, drop=("data.dataset.max_images",)),
        },
        victim_case("missing_checkpoint", f"ckpt_path={root}/missing.ckpt"),
        victim_case("truncated_checkpoint", f"ckpt_path={truncated}"),
        {
            "name": "corrupt_image_in_worker",
            "background": True,
            "argv": entry_argv(
                root,
                "corrupt_in_worker",
                *image_folder,
                "data.num_workers=1",
                drop=("data.dataset.max_images",),
            ),
        },
        victim_case(
            "wrong_architecture_checkpoint",
            f"ckpt_path={victim}/checkpoints/last.ckpt",
            "model.sit.depth=3",
            "model.sit.hidden_size=64",
        ),
        {
            "name": "cache_of_another_vae",
            "background": True,
            "argv": entry_argv(
                root,
                "cache",
                "data=cached_latents",
                f"data.dataset.data_dir={root / 'cache'}",
                "data.dataset.latents_name=other-vae",
                "model.mode=ldm_only",
                "model.loss=null",
                f"model.latents_stats_path={stats}",
                drop=("data.dataset.max_images",),
            ),
        },
        victim_case("image_size_not_divisible", "data.dataset.image_size=30"),
    ]
    watched_before = {
        str(path): sha256(path)
        for watch in watched
        for path in (sorted(watch.rglob("*")) if watch.is_dir() else [watch])
        if path.is_file()
    }
    results = entry_points(root / "runner", cases)
    return SimpleNamespace(root=root, results=results, watched_before=watched_before, corrupt=corrupt)


def assert_victim_untouched(bad_inputs, case: str) -> None:
    assert bad_inputs.results[case]["watched"] == bad_inputs.watched_before


@pytest.mark.slow
def test_unknown_experiment_lists_the_valid_ones(bad_inputs):
    result = bad_inputs.results["unknown_experiment"]
    assert_failed_without_traceback(result)
    assert "Could not find 'experiment/no_such_experiment'" in result["stderr"]
    assert all(
        name in result["stderr"] for name in ("demo", "repae_sdvae", "repae_vavae", "ldm_only_e2e_vavae")
    )
    assert_victim_untouched(bad_inputs, "unknown_experiment")


@pytest.mark.slow
def test_unknown_config_key_is_named(bad_inputs):
    result = bad_inputs.results["unknown_key"]
    assert_failed_without_traceback(result)
    assert "unknown config key 'model.sit.deptth'" in result["stderr"]
    assert_victim_untouched(bad_inputs, "unknown_key")


@pytest.mark.slow
def test_unknown_config_key_lists_the_valid_ones(bad_inputs):
    stderr = bad_inputs.results["unknown_key"]["stderr"]
    assert all(key in stderr for key in ("depth", "hidden_size", "num_heads", "encoder_depth"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "case, config_key",
    [
        ("missing_encoder_weights", "model.encoder.weights_paths"),
        ("missing_lpips_weights", "model.loss.perceptual.vgg_weights_path"),
        ("missing_inception_weights", "callbacks.fid.inception_weights_path"),
    ],
)
def test_missing_weight_file_names_its_config_key(bad_inputs, case, config_key):
    line = the_error_line(bad_inputs.results[case])
    assert config_key in line and str(bad_inputs.root / "missing_") in line
    assert_victim_untouched(bad_inputs, case)


@pytest.mark.slow
def test_missing_checkpoint_is_named(bad_inputs):
    line = the_error_line(bad_inputs.results["missing_checkpoint"])
    assert f"ckpt_path={bad_inputs.root}/missing.ckpt does not exist" in line
    assert_victim_untouched(bad_inputs, "missing_checkpoint")


@pytest.mark.slow
def test_truncated_checkpoint_is_named_as_truncated(bad_inputs):
    line = the_error_line(bad_inputs.results["truncated_checkpoint"])
    assert "truncated.ckpt is truncated" in line
    assert_victim_untouched(bad_inputs, "truncated_checkpoint")


@pytest.mark.slow
def test_checkpoint_of_another_architecture_names_expected_and_found_keys(bad_inputs):
    line = the_error_line(bad_inputs.results["wrong_architecture_checkpoint"])
    assert "does not match the configured model" in line
    assert "blocks.2." in line  # expected with depth 3, not in the checkpoint
    assert "expected (64" in line and "found (48" in line  # hidden size 64 configured, 48 in the checkpoint
    assert_victim_untouched(bad_inputs, "wrong_architecture_checkpoint")


@pytest.mark.slow
def test_image_size_not_divisible_by_the_vae_factor_is_named(bad_inputs):
    line = the_error_line(bad_inputs.results["image_size_not_divisible"])
    assert "(30, 30) images" in line and "multiple of 4" in line
    assert_victim_untouched(bad_inputs, "image_size_not_divisible")


def test_batch_size_not_divisible_by_the_devices_is_named():
    datamodule = ImageDataModule(dataset=[], batch_size=4, num_workers=0)
    datamodule.trainer = SimpleNamespace(global_rank=0, world_size=3)
    with pytest.raises(ValueError) as error:
        datamodule.setup("fit")
    assert input_error(error.value) is error.value  # the entry point prints it as one line
    assert "data.batch_size=4" in str(error.value) and "number of devices (3)" in str(error.value)


@pytest.mark.slow
def test_corrupt_image_is_named(bad_inputs):
    line = the_error_line(bad_inputs.results["corrupt_image"])
    assert f"cannot read image {bad_inputs.corrupt}" in line
    assert not list((run_dir(bad_inputs.root, "corrupt") / "checkpoints").glob("*.ckpt"))


@pytest.mark.slow
def test_corrupt_image_read_in_a_worker_is_named_without_the_worker_traceback(bad_inputs):
    line = the_error_line(bad_inputs.results["corrupt_image_in_worker"])
    assert f"cannot read image {bad_inputs.corrupt}" in line


@pytest.mark.slow
def test_latent_cache_of_another_vae_is_named(bad_inputs):
    line = the_error_line(bad_inputs.results["cache_of_another_vae"])
    assert "other-vae" in line and "VAE" in line


@pytest.mark.slow
def test_too_many_nonfinite_steps_in_a_row_stop_the_run_with_one_message(bad_inputs):
    line = the_error_line(bad_inputs.results["nonfinite_in_a_row"])
    assert "2 consecutive steps with non-finite losses or gradients" in line


@pytest.mark.slow
def test_too_many_nonfinite_steps_in_a_row_leave_a_checkpoint_from_before_the_first(bad_inputs):
    # Steps 3 and 4 are skipped. The checkpoint after step 3 is not written: Lightning does not save
    # twice at the same optimizer-step count, and a skipped step steps no optimizer.
    checkpoint = load_checkpoint(run_dir(bad_inputs.root, "nonfinite") / "checkpoints" / "last.ckpt")
    assert (checkpoint["state_dict"]["train_step"], checkpoint["state_dict"]["nonfinite_steps"]) == (2, 0)
