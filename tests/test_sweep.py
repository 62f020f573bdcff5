"""A local multirun puts each sweep point in its own deterministic directory and writes a summary."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import TINY_OVERRIDES


def tiny_experiment(config_dir: Path, root_dir: Path) -> None:
    """An experiment file holding the tiny settings, so the command line holds just the sweep,
    as a user's would (the sweep directories are named by the command-line overrides)."""
    settings = [o for o in TINY_OVERRIDES if not o.startswith("experiment=")]
    settings += [
        "callbacks.fid=null",
        "callbacks.image_grid=null",
        "model.max_train_steps=2",
        f"paths.root_dir={root_dir}",
    ]
    body = OmegaConf.to_yaml(OmegaConf.from_dotlist([o for o in settings if not o.startswith("logger")]))
    (config_dir / "experiment").mkdir(parents=True)
    (config_dir / "experiment" / "tiny_demo.yaml").write_text(
        "# @package _global_\ndefaults:\n  - demo\n  - _self_\nrun_name: demo\n" + body
    )


@pytest.mark.slow
def test_multirun_gives_one_directory_per_value_and_a_summary_table_that_a_rerun_leaves_as_it_was(
    tmp_path, entry_points
):
    tiny_experiment(tmp_path / "conf", tmp_path)
    argv = [
        "-m",
        f"hydra.searchpath=[file://{tmp_path / 'conf'}]",
        "experiment=tiny_demo",
        "model.proj_coeff=0.25,1.0",
    ]
    # python -m repae.train -m ... as its own process
    result = entry_points(tmp_path / "runner", [{"name": "sweep", "argv": argv}])["sweep"]
    assert result["exitcode"] == 0, result["stderr"][-3000:]
    sweep_dir = tmp_path / "logs" / "train" / "demo-multirun"
    assert sorted(p.name for p in sweep_dir.iterdir() if p.is_dir()) == [
        "model.proj_coeff=0.25",
        "model.proj_coeff=1.0",
    ]
    for point in ("model.proj_coeff=0.25", "model.proj_coeff=1.0"):
        assert (sweep_dir / point / "checkpoints" / "last.ckpt").is_file()
    with open(sweep_dir / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["run"] for row in rows] == ["model.proj_coeff=0.25", "model.proj_coeff=1.0"]
    assert all(float(row["sit_loss"]) > 0 for row in rows)
    assert "sweep summary" in result["stdout"]

    # Re-running the finished sweep trains nothing and leaves the summary as it was.
    summary = (sweep_dir / "summary.csv").read_bytes()
    again = entry_points(tmp_path / "runner", [{"name": "sweep", "argv": argv}])["sweep"]
    assert again["exitcode"] == 0, again["stderr"][-3000:]
    assert again["stdout"].count("nothing to do") + again["stderr"].count("nothing to do") == 2
    assert (sweep_dir / "summary.csv").read_bytes() == summary


def test_the_summary_table_is_not_cut_when_printed_to_a_log_file(tmp_path, monkeypatch, capsys):
    from repae.sweep import SweepSummary

    long_override = "model.proj_coeff=0.25 model.vae_align_proj_coeff=1.5 model.optimizer.learning_rate=3e-4"
    point = tmp_path / "point"
    (point / ".hydra").mkdir(parents=True)
    (point / ".hydra" / "overrides.yaml").write_text(f"- {long_override}\n")
    (point / "final_metrics.json").write_text('{"sit_loss": 0.125, "fd_effnet": 1094.5}')
    SweepSummary(keys=["sit_loss", "fd_effnet"]).on_multirun_end(
        OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}})
    )
    printed = capsys.readouterr().out
    assert long_override in printed and "1094" in printed
