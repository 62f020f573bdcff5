"""What a run shows while it trains with its output going to a file (SLURM, nohup, `> log`)."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch import Callback

from conftest import TINY_OVERRIDES


def test_a_run_redirected_to_a_file_prints_plain_progress_lines_train_log_holds_them_a_summary_without_flops_and_no_known_noise(
    tmp_path, entry_points
):
    overrides = [
        o
        for o in TINY_OVERRIDES
        if not o.startswith(("trainer.log_every_n_steps", "callbacks.model_summary"))
    ]
    argv = [*overrides, "model.max_train_steps=4", "trainer.log_every_n_steps=2", "callbacks.image_grid=null",
            "callbacks.loss_curve=null", f"paths.log_dir={tmp_path / 'logs'}", "run_name=redirected"]  # fmt: skip
    # A python -m repae.train process whose stdout and stderr are files.
    result = entry_points(tmp_path / "runner", [{"name": "redirected", "argv": argv}])["redirected"]
    assert result["exitcode"] == 0, result["stderr"][-3000:]

    def progress_lines(text: str) -> list[str]:
        return [line.split(" - ", 1)[-1] for line in text.splitlines() if "steps/s | ETA" in line]

    printed = progress_lines(result["stdout"])
    assert [line.split(" |")[0] for line in printed] == ["step 2/4", "step 4/4"]
    assert all("sit_loss" in line and "vae_loss" in line and "d_loss" in line for line in printed)
    assert progress_lines((tmp_path / "logs" / "train" / "redirected" / "train.log").read_text()) == printed
    # Lightning's messages about things we do on purpose are silenced (repae.known_noise).
    output = result["stdout"] + result["stderr"]
    assert (
        "litlogger" not in output and "in eval mode at the start" not in output and "LeafSpec" not in output
    )
    # The model summary, without the FLOPs Lightning cannot count for our model (always 0).
    assert "| sit " in output and "Trainable params" in output
    assert "FLOPs" not in output and "Total Flops" not in output


def test_the_tensorboard_logger_writes_event_files(tiny_config, tmp_path):
    from hydra.utils import instantiate

    cfg = tiny_config("logger=tensorboard")
    (logger,) = [instantiate(entry) for entry in cfg.logger.values()]
    logger.log_metrics({"sit_loss": 0.5}, step=1)
    logger.finalize("success")
    assert list((Path(cfg.paths.output_dir) / "tensorboard").glob("events.out.tfevents.*"))


def test_rerunning_a_finished_run_changes_no_file_and_says_so_in_one_line(tiny_config, capsys):
    import hashlib

    from repae.train import train

    cfg = tiny_config("model.max_train_steps=2", "callbacks.checkpoint.every_n_steps=1")
    metrics = train(cfg)
    run_dir = Path(cfg.paths.output_dir)

    def hashes() -> dict[str, str]:
        return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(run_dir.rglob("*")) if p.is_file()}  # fmt: skip

    before = hashes()
    capsys.readouterr()
    assert train(cfg) == metrics  # a sweep summary reads the same final metrics again
    assert hashes() == before
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and printed[0].startswith("run complete at step 2: nothing to do")


class StopAfterFirstStep(Callback):
    """Stops training after one step, as a requeue signal or a user's interrupt would."""

    def on_train_batch_end(self, trainer, pl_module, *args):
        trainer.should_stop = True


def test_a_run_stopped_before_its_last_step_writes_no_final_metrics(tiny_config):
    from repae.train import train

    cfg = tiny_config(
        "model.max_train_steps=3", "+callbacks.stop._target_=test_run_output.StopAfterFirstStep"
    )
    train(cfg)
    assert not (Path(cfg.paths.output_dir) / "final_metrics.json").exists()


def test_every_missing_input_file_is_reported_at_once_with_its_key(tiny_config, tmp_path):
    import pytest

    from repae.train import train

    cfg = tiny_config(
        f"model.vae_weights_path={tmp_path}/vae.pt",
        f"model.latents_stats_path={tmp_path}/stats.pt",
        f"+callbacks.fid.inception_weights_path={tmp_path}/inception.pth",
    )
    with pytest.raises(FileNotFoundError) as error:
        train(cfg)
    message = str(error.value)
    assert message.startswith("3 input file(s) missing")
    for key, name in [("model.vae_weights_path", "vae.pt"), ("model.latents_stats_path", "stats.pt"),
                      ("callbacks.fid.inception_weights_path", "inception.pth")]:  # fmt: skip
        assert f"{key}={tmp_path}/{name}" in message
    assert not (tmp_path / "run").exists()  # found before anything was written
