"""Run integrity (issue #22): each test is an attack or a fault, and what it must not achieve.

Hostile checkpoints, re-runs that must continue the newest state, two runs on one directory, an
unwritable or full disk, flipped bytes, corrupt images and runs that would do nothing. Entry-point
runs go through ``tests/fault_runner.py`` (see test_reliability.py); ``docs/reliability.md`` maps
every fault to its test.
"""

from __future__ import annotations

import builtins
import csv
import errno
import os
import pickle
import shutil
import socket
import struct
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict
from test_reliability import (
    QUIET,
    entry_argv,
    last_rows,
    load_checkpoint,
    loss_trace,
    one_thread,  # noqa: F401  (autouse: one thread per test run)
    run_dir,
    the_error_line,
    write_image_folder,
)

from repae.callbacks.checkpoint import AtomicCheckpointIO, verify_checkpoint
from repae.config_checks import check_training_config
from repae.metrics import InceptionFeatures
from repae.preprocess import preprocess
from repae.run_directory import write_text_atomically
from repae.safe_load import weights_only_loads
from repae.train import input_error, train

from conftest import CONF_DIR, compose_config

REPO = Path(__file__).resolve().parents[1]
CHAIN = ("model.max_train_steps=6", "callbacks.checkpoint.every_n_steps=1")
IMAGE_FOLDER = ("data=image_folder", "data.dataset.image_size=32", "data.on_corrupt=skip")


# --- entry-point runs -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory, entry_points):
    """Every entry-point scenario of this file in one fault-runner plan (one start-up for all):

    - ``seed`` trains 2 steps; ``straight`` starts from its last.ckpt with ``ckpt_path`` and trains to
      step 6 uninterrupted. ``chain`` runs the same command as ``straight`` again and again: killed
      while writing last.ckpt after step 4 (the step file 0000004.ckpt is already written), killed
      inside step 5, then run once more after its directory was moved to ``moved``;
    - ``holder`` trains while ``intruder``, another seed, starts on the same run directory;
    - a read-only checkpoints folder, a disk that fills up at the first save, and runs that would
      train nothing;
    - ``on_corrupt=skip`` on a folder with a corrupt image, straight and killed then resumed.
    """
    root = tmp_path_factory.mktemp("integrity")
    logs = root / "logs" / "train"
    from_seed = f"ckpt_path={run_dir(root, 'seed') / 'checkpoints' / 'last.ckpt'}"
    chain_argv = entry_argv(root, "chain", *CHAIN, from_seed)
    chain_ckpts = run_dir(root, "chain") / "checkpoints"
    read_only = run_dir(root, "read_only") / "checkpoints"
    read_only.mkdir(parents=True)
    read_only.chmod(0o555)  # binds an ordinary user; the read_only fault makes it bind root too
    images = write_image_folder(root / "images", 11, "broken.png").parent
    skip_argv = (*IMAGE_FOLDER, f"data.dataset.root={images}", "model.max_train_steps=4")
    skip_argv += ("callbacks.checkpoint.every_n_steps=1",)
    no_max_images = ("data.dataset.max_images",)

    def zero_work(name: str, *overrides: str, drop: tuple[str, ...] = ()) -> dict:
        return {"name": name, "argv": entry_argv(root, name, *overrides, drop=drop)}

    # A background case runs next to the foreground cases after it (on the second core); no case
    # touches the directory of another that runs at the same time.
    cases = [
        {"name": "seed", "argv": entry_argv(root, "seed", "model.max_train_steps=2")},
        {"name": "straight", "argv": entry_argv(root, "straight", *CHAIN, from_seed), "background": True},
        {
            "name": "killed_in_save",
            "argv": chain_argv,
            "watch": [str(chain_ckpts)],
            "faults": [
                {
                    "kind": "fail_checkpoint_write",
                    "step": 4,
                    "file": "last.ckpt",
                    "action": "kill",
                    "probe": str(root / "killed_in_save.json"),
                }
            ],
        },
        {
            "name": "read_only",
            "background": True,
            "argv": entry_argv(root, "read_only"),
            "faults": [{"kind": "read_only", "path": str(read_only)}] if os.geteuid() == 0 else [],
        },
        {
            "name": "rerun",
            "argv": chain_argv,
            "watch": [str(chain_ckpts)],
            "faults": [{"kind": "kill_after_optimizer_step", "step": 5}],
        },
        {
            "name": "disk_full_at_first_save",
            "background": True,
            "argv": entry_argv(
                root, "full", "model.max_train_steps=1", "callbacks.checkpoint.every_n_steps=1"
            ),
            "faults": [
                {
                    "kind": "fail_checkpoint_write",
                    "step": 1,
                    "file": "last.ckpt",
                    "action": "enospc",
                    "probe": str(root / "disk_full.json"),
                }
            ],
        },
        {
            "name": "moved",
            "argv": entry_argv(root, "moved", *CHAIN, from_seed),
            "faults": [{"kind": "rename", "source": str(logs / "chain"), "target": str(logs / "moved")}],
        },
        {
            "name": "holder",
            "argv": entry_argv(root, "locked", "model.max_train_steps=3"),
            "background": True,
            "faults": [
                {
                    "kind": "hold_after_step",
                    "step": 1,
                    "ready": str(root / "ready"),
                    "release": str(root / "go"),
                }
            ],
        },
        {
            "name": "intruder",
            "argv": entry_argv(root, "locked", "model.max_train_steps=3", "seed=1"),
            "faults": [
                {"kind": "wait_for_file", "path": str(root / "ready")},
                {"kind": "touch_at_exit", "path": str(root / "go")},
            ],
        },
        {
            "name": "skip_straight",
            "argv": entry_argv(root, "skip_straight", *skip_argv, drop=no_max_images),
            "background": True,
        },
        {
            "name": "skip_killed",
            "argv": entry_argv(root, "skip_chain", *skip_argv, drop=no_max_images),
            "faults": [{"kind": "kill_after_optimizer_step", "step": 3}],
        },
        {"name": "skip_resumed", "argv": entry_argv(root, "skip_chain", *skip_argv, drop=no_max_images)},
        {**zero_work("empty_dataset", "data.dataset.max_images=0", drop=no_max_images), "background": True},
        zero_work("fewer_images_than_a_batch", "data.dataset.max_images=3", drop=no_max_images),
        {
            **zero_work("negative_steps", "model.max_train_steps=-5", drop=("model.max_train_steps",)),
            "background": True,
        },
        zero_work("fractional_steps", "model.max_train_steps=2.5", drop=("model.max_train_steps",)),
        {**zero_work("ema_decay_above_one", "model.ema_decay=2"), "background": True},
        zero_work("proj_coeff_not_a_number", "model.proj_coeff=abc"),
    ]
    results = entry_points(root / "runner", cases)
    return SimpleNamespace(root=root, results=results, images=images, read_only=read_only)


def succeeded(result: dict) -> None:
    assert result["exitcode"] == 0, result["stderr"][-3000:]


def assert_same_run(run: Path, reference: Path, steps: list[int]) -> None:
    """Same losses in every step and the same final weights as the reference run."""
    expected, found = loss_trace(reference), loss_trace(run)
    assert sorted(expected) == sorted(found) == steps
    for step, losses in expected.items():
        assert found[step] == pytest.approx(losses, rel=0, abs=1e-6), step
    straight = load_checkpoint(reference / "checkpoints" / "last.ckpt")["state_dict"]
    final = load_checkpoint(run / "checkpoints" / "last.ckpt")["state_dict"]
    assert final["train_step"] == steps[-1] and final.keys() == straight.keys()
    for key, value in straight.items():
        torch.testing.assert_close(final[key], value, rtol=0, atol=1e-6, msg=key)


@pytest.mark.slow
def test_rerunning_a_ckpt_path_command_continues_the_newest_state_even_from_a_moved_directory(runs):
    results = runs.results
    succeeded(results["seed"])
    succeeded(results["straight"])
    assert results["killed_in_save"]["signal"] == 9 and results["rerun"]["signal"] == 9
    succeeded(results["moved"])
    # The re-run resumed at step 3 (the newest last.ckpt), not at the ckpt_path's step 2, and said so.
    assert "is ignored" in results["rerun"]["stdout"] + results["rerun"]["stderr"]
    moved = run_dir(runs.root, "moved")
    assert_same_run(moved, run_dir(runs.root, "straight"), [3, 4, 5, 6])


@pytest.mark.slow
def test_no_versioned_checkpoint_is_ever_written(runs):
    """0000004.ckpt was written before the kill and again after the resume; the directory was moved."""
    names = {path.name for path in run_dir(runs.root, "moved").rglob("*")}
    assert not [name for name in names if "-v" in name], names
    assert {"0000003.ckpt", "0000004.ckpt", "0000005.ckpt", "0000006.ckpt", "last.ckpt"} <= names


@pytest.mark.slow
def test_a_lock_and_a_half_written_checkpoint_of_a_killed_run_are_cleared_by_the_next_run(runs):
    left = [Path(path).name for path in runs.results["killed_in_save"]["watched"]]
    assert any(name.startswith(".last.ckpt.tmp-") for name in left), left  # the fault left one
    # The re-run took the dead run's lock, removed its temporary file and rewrote 0000004.ckpt in place.
    after_rerun = sorted(Path(path).name for path in runs.results["rerun"]["watched"])
    assert after_rerun == ["0000003.ckpt", "0000004.ckpt", "last.ckpt"]


@pytest.mark.slow
def test_a_second_run_on_a_busy_directory_fails_naming_the_holder_and_the_first_completes(runs):
    line = the_error_line(runs.results["intruder"])
    assert f"{run_dir(runs.root, 'locked')} is in use by pid" in line
    assert f"on host {socket.gethostname()}" in line
    succeeded(runs.results["holder"])
    locked = run_dir(runs.root, "locked")
    with open(locked / "csv" / "metrics.csv") as f:
        assert len(list(csv.DictReader(f))) == 3, "the intruder logged rows"
    assert sorted(last_rows(locked)) == [1, 2, 3]
    assert "seed: 0" in (locked / "config.yaml").read_text()
    assert load_checkpoint(locked / "checkpoints" / "last.ckpt")["state_dict"]["train_step"] == 3


@pytest.mark.slow
def test_an_unwritable_checkpoints_folder_stops_the_run_before_the_first_step(runs):
    line = the_error_line(runs.results["read_only"])
    assert f"cannot write to {runs.read_only}" in line and "callbacks.checkpoint.dirpath" in line
    assert not (run_dir(runs.root, "read_only") / "csv" / "metrics.csv").exists()


@pytest.mark.slow
def test_a_full_disk_before_any_last_ckpt_does_not_claim_one_is_intact(runs):
    line = the_error_line(runs.results["disk_full_at_first_save"])
    assert "No space left on device" in line and "intact" not in line
    assert "last.ckpt was not written yet" in line


@pytest.mark.slow
@pytest.mark.parametrize(
    "case, message",
    [
        ("empty_dataset", "the dataset has 0 samples, fewer than one batch"),
        ("fewer_images_than_a_batch", "the dataset has 3 samples, fewer than one batch (data.batch_size=4"),
        ("negative_steps", "model.max_train_steps must be > 0, got -5"),
        ("fractional_steps", "model.max_train_steps must be an integer, got 2.5"),
        ("ema_decay_above_one", "model.ema_decay must be in [0, 1], got 2"),
        ("proj_coeff_not_a_number", "model.proj_coeff must be a number, got 'abc'"),
    ],
)
def test_a_run_that_would_train_nothing_or_has_a_wrong_value_is_an_error(runs, case, message):
    assert message in the_error_line(runs.results[case])
    assert not (run_dir(runs.root, case) / "checkpoints" / "last.ckpt").exists()


@pytest.mark.slow
def test_on_corrupt_skip_resumes_exactly_and_reports_the_skipped_file(runs):
    for case in ("skip_straight", "skip_resumed"):
        succeeded(runs.results[case])
    assert runs.results["skip_killed"]["signal"] == 9
    straight, chain = run_dir(runs.root, "skip_straight"), run_dir(runs.root, "skip_chain")
    assert_same_run(chain, straight, [1, 2, 3, 4])
    for case in ("skip_straight", "skip_resumed"):
        log = runs.results[case]["stdout"] + runs.results[case]["stderr"]
        report = log[log.index("replaced 1 unreadable samples") :]  # the report at the end of the run
        assert f"cannot read image {runs.images / 'broken.png'}" in report


# --- hostile and damaged checkpoints (in-process) ----------------------------------------------
class OpenForWriting:
    """Unpickles into ``open(path, "w")``: the file is created (or truncated) if it is ever loaded."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return builtins.open, (str(self.path), "w")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 1-step run whose directory tests copy before attacking it."""
    run = tmp_path_factory.mktemp("victim") / "run"
    train(compose_config(run, *QUIET, "model.max_train_steps=1", "callbacks.checkpoint.every_n_steps=1"))
    return run


def copy_run(finished_run: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    return run


def test_a_pickle_payload_in_a_checkpoint_is_refused_even_with_force_no_weights_only(
    finished_run, tmp_path, monkeypatch
):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    target = tmp_path / "victim.txt"
    target.write_text("precious")
    checkpoint = load_checkpoint(finished_run / "checkpoints" / "last.ckpt")
    checkpoint["callbacks"]["payload"] = OpenForWriting(target)
    payload = tmp_path / "payload.ckpt"
    torch.save(checkpoint, payload)
    own = copy_run(finished_run, tmp_path)
    torch.save(checkpoint, own / "checkpoints" / "last.ckpt")  # the run's own last.ckpt replaced
    attacks = {
        "ckpt_path": compose_config(
            tmp_path / "fresh", *QUIET, "model.max_train_steps=2", f"ckpt_path={payload}"
        ),
        "last.ckpt": compose_config(own, *QUIET, "model.max_train_steps=2"),
        "without AtomicCheckpointIO": compose_config(
            tmp_path / "plain",
            *QUIET,
            "model.max_train_steps=2",
            f"ckpt_path={payload}",
            "trainer.plugins=null",
        ),
    }
    for name, cfg in attacks.items():
        with pytest.raises(ValueError) as error:
            train(cfg)
        assert input_error(error.value) is error.value, name  # one error: line, no traceback
        assert "refuses to load it" in str(error.value) and "a reference to io.open" in str(error.value), name
        assert "weights_only=False" not in str(error.value), name
        assert target.read_text() == "precious", name


def test_atomic_checkpoint_io_never_loads_with_weights_only_false(finished_run):
    with pytest.raises(ValueError, match="refusing to load"):
        AtomicCheckpointIO().load_checkpoint(finished_run / "checkpoints" / "last.ckpt", weights_only=False)


def test_an_inception_weights_file_that_pickles_code_is_refused_naming_its_setting_and_runs_nothing(
    tmp_path, monkeypatch
):
    # torch-fidelity's own load asks for pickles, and the caller's environment allows them.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    target = tmp_path / "victim.txt"
    target.write_text("precious")
    weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": OpenForWriting(target)}, weights)
    with pytest.raises(ValueError) as error:
        InceptionFeatures(str(weights), config_key="callbacks.fid.inception_weights_path")
    assert str(error.value).startswith(
        f"callbacks.fid.inception_weights_path {weights} holds more than tensors"
    )
    assert target.read_text() == "precious"


def test_an_inception_weights_file_that_is_no_torch_file_is_one_error_naming_its_setting(tmp_path):
    weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    weights.write_bytes(b"not a torch file")
    with pytest.raises(ValueError) as error:
        InceptionFeatures(str(weights), config_key="callbacks.fid.inception_weights_path")
    assert str(error.value).startswith(
        f"callbacks.fid.inception_weights_path {weights} is not a readable torch file"
    )
    assert input_error(error.value) is error.value


def test_a_torch_file_that_is_not_the_inception_weights_is_one_error_naming_its_setting(tmp_path):
    weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, weights)
    with pytest.raises(ValueError) as error:
        InceptionFeatures(str(weights), config_key="callbacks.fid.inception_weights_path")
    assert str(error.value).startswith(
        f"callbacks.fid.inception_weights_path {weights} is not a readable copy of "
        "weights-inception-2015-12-05-6726825d.pth (RuntimeError"
    )


def test_inside_weights_only_loads_even_a_load_that_asks_for_pickles_gets_tensors_only(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)
    target = tmp_path / "victim.txt"
    target.write_text("precious")
    payload = tmp_path / "payload.pth"
    torch.save({"weight": OpenForWriting(target)}, payload)
    with pytest.raises(pickle.UnpicklingError), weights_only_loads():
        torch.load(payload, weights_only=False)  # what torch-fidelity does with its weights path
    assert target.read_text() == "precious"
    # the caller's settings are back, after the failed load too
    assert os.environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD") == "1"
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ


def test_a_checkpoint_that_is_not_a_training_checkpoint_is_one_error_line(tiny_config, tmp_path):
    official = tmp_path / "0400000.pt"
    torch.save({"model": {"weight": torch.zeros(2)}, "steps": 400000}, official)
    with pytest.raises(ValueError, match="is not a training checkpoint of repae") as error:
        train(tiny_config(*QUIET, f"ckpt_path={official}"))
    assert input_error(error.value) is error.value and "repae.convert from-official" in str(error.value)


def flip_a_byte_inside_a_tensor(path: Path) -> None:
    with zipfile.ZipFile(path) as archive:
        record = max(
            (info for info in archive.infolist() if "/data/" in info.filename), key=lambda i: i.file_size
        )
    data = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack(
        "<HH", data[record.header_offset + 26 : record.header_offset + 30]
    )
    data[record.header_offset + 30 + name_length + extra_length + record.file_size // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_flipped_bytes_in_a_checkpoint_are_detected_on_resume_unless_skipped(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    flip_a_byte_inside_a_tensor(last)
    load_checkpoint(last)  # torch itself loads the damaged tensor without complaint
    with pytest.raises(ValueError, match="does not match its stored checksum") as error:
        train(compose_config(run, *QUIET, "model.max_train_steps=2"))
    assert "previous step file" in str(error.value) and "resume_skip_checksum=true" in str(error.value)
    assert input_error(error.value) is error.value
    train(compose_config(run, *QUIET, "model.max_train_steps=2", "resume_skip_checksum=true"))
    assert load_checkpoint(last)["state_dict"]["train_step"] == 2
    verify_checkpoint(last)  # the new save carries checksums that match


def test_a_latents_stats_file_that_is_not_a_torch_file_is_one_error_line(tiny_config, tmp_path):
    stats = tmp_path / "stats.pt"
    stats.write_bytes(b"not a torch file")
    with pytest.raises(Exception) as error:
        train(tiny_config(*QUIET, f"model.latents_stats_path={stats}"))
    cause = input_error(error.value)
    assert cause is not None and f"model.latents_stats_path {stats} is not a readable torch file" in str(
        cause
    )


# --- files written whole, configs checked --------------------------------------------------------
def test_a_full_disk_while_writing_config_yaml_leaves_the_previous_file(tmp_path, monkeypatch):
    config = tmp_path / "config.yaml"
    config.write_text("seed: 0\n")

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError):
        write_text_atomically(config, "seed: 1\n" * 1000)
    assert config.read_text() == "seed: 0\n"
    assert [path.name for path in tmp_path.iterdir()] == ["config.yaml"]


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml")))
def test_every_shipped_experiment_passes_the_config_checks(experiment):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"experiment={experiment}"])
    with open_dict(cfg):
        cfg.paths.output_dir = "unused"
    check_training_config(cfg)


def test_preprocess_with_every_input_unreadable_is_an_error(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a.png", "b.jpg"):
        (folder / name).write_bytes(b"not an image")
    with pytest.raises(ValueError, match="none of the 2 image files"):
        preprocess(str(folder), str(tmp_path / "data"), resolution=16, num_workers=0, progress=False)
    assert not (tmp_path / "data" / "images.h5").exists()
    result = subprocess.run(
        [sys.executable, "-m", "repae.preprocess", f"input_dir={folder}", f"output_dir={tmp_path / 'cli'}",
         "resolution=16", "num_workers=0", f"paths.log_dir={tmp_path / 'logs'}", "progress=false"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert [
        line for line in result.stderr.splitlines() if line.startswith("error: none of the 2 image files")
    ]
