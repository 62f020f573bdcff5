"""The reproduction study (docs/reproduction.md) and the pieces it adds: VAE pre-training
(``model.mode=vae_only``) and the naive end-to-end ablation (``model.vae_denoising_coeff``)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import OmegaConf

from repae.callbacks.requeue import RequeueOnSignal
from repae.config import build_model
from repae.convert.checkpoints import extract_vae
from repae.module import REPAE, to_plain
from repae.study import (
    ARMS,
    StageTimes,
    fd_rows,
    process_environment,
    record_variant,
    steps_to_reach,
    train_command,
)
from scripts import study_ema_batchnorm

from conftest import CONF_DIR
from test_training import a_batch, fit


def build(cfg) -> REPAE:
    torch.manual_seed(0)
    model = instantiate(to_plain(cfg.model), _recursive_=False)
    model.load_pretrained()
    return model.train()


def vae_gradients(model: REPAE) -> list[torch.Tensor]:
    """The VAE's gradients from the VAE loss of one end-to-end step on a fixed batch and seed."""
    batch = a_batch()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    model._e2e_losses(
        batch["image"], batch["label"], lambda name, loss: loss.backward() if name == "vae" else None
    )
    return [p.grad.clone() for p in model.vae.parameters()]


def perturb_sit(model: REPAE) -> None:
    with torch.no_grad():
        for p in model.sit.parameters():
            p.add_(0.1 * torch.randn_like(p))


def test_vae_receives_the_denoising_loss_only_with_a_nonzero_vae_denoising_coeff(tiny_config):
    model = build(tiny_config("model.vae_align_proj_coeff=0"))
    stop_gradient = vae_gradients(model)
    perturb_sit(model)
    # With the coefficient 0 (the default) the SiT does not enter the VAE's gradient at all.
    assert all(torch.equal(a, b) for a, b in zip(stop_gradient, vae_gradients(model), strict=True))

    model.vae_denoising_coeff = 1.0
    naive = vae_gradients(model)
    assert any(not torch.allclose(a, b) for a, b in zip(stop_gradient, naive, strict=True))
    perturb_sit(model)
    assert any(not torch.allclose(a, b) for a, b in zip(naive, vae_gradients(model), strict=True))
    assert all(p.grad is None for p in model.sit.parameters())  # through the frozen SiT only


def test_vae_only_trains_vae_and_discriminator_without_a_sit_and_extracts_like_e2e(tiny_config, tmp_path):
    cfg = tiny_config("model=vae_only", "model.max_train_steps=2", "callbacks.checkpoint.every_n_steps=2")
    model = build(cfg)
    assert model.sit is None and len(model.encoders) == 0
    assert [name for name, _, _ in model.parameter_groups] == ["vae", "disc"]
    vae_before = [p.clone() for p in model.vae.parameters()]
    with pytest.warns(UserWarning, match="no SiT"):  # the image grid callback has nothing to sample
        fit(cfg, model)
    assert model.step == 2
    assert any(not torch.equal(a, b) for a, b in zip(vae_before, model.vae.parameters(), strict=True))
    assert not torch.equal(model.latents_bn.running_var, torch.ones(4))  # the latents' statistics moved

    files = extract_vae(tmp_path / "run" / "checkpoints" / "last.ckpt", "pretrained", tmp_path / "vae")
    stats = torch.load(files["latents_stats"], weights_only=True)
    torch.testing.assert_close(stats["latents_bias"].flatten(), model.latents_bn.running_mean)
    assert set(files) == {"vae", "latents_stats", "discriminator"}


def test_the_unconditional_variant_trains_a_sit_that_is_given_no_class(tiny_config):
    cfg = tiny_config("+study_variant=unconditional", "model.max_train_steps=2")
    assert cfg.callbacks.image_grid.labels is None
    dataset = instantiate(cfg.data.dataset)
    assert {int(dataset[i]["label"]) for i in range(len(dataset))} == {0}
    model = build(cfg)
    assert model.num_classes == 1 and model.sit.y_embedder.embedding_table.num_embeddings == 1
    fit(cfg, model)
    assert model.step == 2


def arm_config(arm: str, *overrides: str):
    """The composed training config of a study arm."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=[f"experiment=study/{arm}", *overrides])


def leaves(node: dict, prefix: str = "") -> dict:
    """{dotted key: value} of every leaf of a nested dict."""
    flat = {}
    for key, value in node.items():
        flat.update(
            leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value}
        )
    return flat


def test_the_scale_variant_changes_only_the_sits_size_and_alignment_depth():
    sit_s2 = {"model.sit.depth": 12, "model.sit.hidden_size": 384, "model.sit.num_heads": 6}
    for arm in ARMS:
        scaled_config = arm_config(arm, "+study_variant=scale")
        protocol, scaled = (leaves(OmegaConf.to_container(c)) for c in (arm_config(arm), scaled_config))
        changed = {key for key in protocol.keys() | scaled.keys() if protocol.get(key) != scaled.get(key)}
        assert changed == {*sit_s2, "model.sit.encoder_depth"}, arm
        assert {key: scaled[key] for key in sit_s2} == sit_s2
        assert scaled["model.sit.encoder_depth"] == 4 and protocol["model.sit.encoder_depth"] == 2
    sit = build_model(to_plain(scaled_config.model.sit), "model.sit", z_dims=[320])
    assert len(sit.blocks) == 12 and sit.pos_embed.shape[-1] == 384 and sit.encoder_depth == 4


def test_a_variant_reaches_every_arm_but_stage_0_and_a_study_keeps_its_variant(tmp_path):
    def variant_overrides(experiment: str) -> list[str]:
        command = train_command(tmp_path, experiment, 0, tmp_path / "run", False, "unconditional")
        return [arg for arg in command if "study_variant" in arg]

    assert variant_overrides("repa") == ["+study_variant=unconditional"]
    assert variant_overrides("vae_pretrain") == []
    record_variant(tmp_path, None)
    record_variant(tmp_path, None)  # resuming the same study
    with pytest.raises(ValueError, match="variant none .*asks for unconditional: give another --out"):
        record_variant(tmp_path, "unconditional")
    (tmp_path / "study.json").write_text('{"variant": "os.system"}')
    with pytest.raises(ValueError, match="unknown variant"):  # a foreign file is refused, not trusted
        record_variant(tmp_path, None)
    for foreign in ('["not", "a", "record"]', '"unconditional"'):
        (tmp_path / "study.json").write_text(foreign)
        with pytest.raises(ValueError, match="study.json is not a study record"):
            record_variant(tmp_path, "unconditional")
    (tmp_path / "study.json").write_text("[" * 100_000)
    with pytest.raises(ValueError, match="study.json is not a study record"):
        record_variant(tmp_path, None)

    older = tmp_path / "older"  # a protocol study from before study.json existed
    (older / "runs").mkdir(parents=True)
    with pytest.raises(ValueError, match="variant none .*asks for unconditional"):
        record_variant(older, "unconditional")


def test_the_runs_of_a_study_under_slurm_checkpoint_on_its_signal_but_never_requeue_the_job(tmp_path):
    for experiment in ("vae_pretrain", "repae"):
        command = train_command(tmp_path, experiment, 0, tmp_path / "run", False)
        overrides = [arg for arg in command[3:] if not arg.startswith(("experiment=", "hydra."))]
        callback = instantiate(arm_config(experiment, *overrides).callbacks.requeue)
        assert isinstance(callback, RequeueOnSignal) and callback.requeue is False


def test_each_run_of_a_study_gets_its_share_of_the_cpu_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert process_environment(8)["OMP_NUM_THREADS"] == "2"
    assert process_environment(32)["OMP_NUM_THREADS"] == "1"


def test_steps_to_reach_interpolates_in_log_step():
    curve = {500: 40.0, 1000: 20.0, 2000: 10.0}
    assert steps_to_reach(curve, 20.0) == ("", pytest.approx(1000))
    assert steps_to_reach(curve, 15.0) == ("", pytest.approx(2**0.5 * 1000))
    assert steps_to_reach(curve, 50.0) == ("<=", 500)
    assert steps_to_reach(curve, 5.0) == (">", 2000)


def test_study_rows_hold_the_scheduled_steps_only_with_their_diagnostics(tmp_path):
    run = tmp_path / "runs" / "repae_s0"
    (run / "csv").mkdir(parents=True)
    (run / "config.yaml").write_text("callbacks:\n  fid:\n    steps: [2, 4]\n")
    logged = [  # step, fd_effnet, fd_effnet_raw, denoising_loss, proj_loss, latent_std
        (1, "", "", "0.5", "-0.1", "1.0"), (2, "", "", "0.3", "-0.3", "2.0"), (2, "90.0", "", "", "", ""),
        (2, "", "80.0", "", "", ""),
        (3, "", "", "0.2", "-0.4", "3.0"), (3, "70.0", "", "", "", ""),  # an FD at the step a signal stopped the run
        (4, "", "", "0.1", "-0.6", "4.0"), (4, "60.0", "", "", "", ""), (4, "", "50.0", "", "", ""),
    ]  # fmt: skip
    with open(run / "csv" / "metrics.csv", "w") as f:
        f.write("step,fd_effnet,fd_effnet_raw,denoising_loss,proj_loss,latent_std\n")
        f.writelines(",".join(map(str, row)) + "\n" for row in logged)
    rows = fd_rows(run, "repae", 0)
    assert [(row["step"], row["fd_effnet"], row["fd_effnet_raw"]) for row in rows] == [
        (2, 90.0, 80.0),
        (4, 60.0, 50.0),
    ]
    assert [row["denoising_loss"] for row in rows] == [pytest.approx(0.4), pytest.approx(0.15)]
    assert [row["proj_loss"] for row in rows] == [pytest.approx(-0.2), pytest.approx(-0.5)]
    assert [row["training_latent_std"] for row in rows] == [pytest.approx(1.5), pytest.approx(3.5)]
    # a metric the run did not log (an ldm_only arm's latent scale) is left empty
    assert [row["training_latent_std_over_running"] for row in rows] == [None, None]


STOPPABLE_STUDY = """
import sys, time
from pathlib import Path
import repae.study as study

out = Path(sys.argv[1])
child = (
    "import signal, sys, time; from pathlib import Path; d = Path(sys.argv[1]); "
    "signal.signal(signal.SIGUSR1, lambda *a: (d.joinpath('checkpointed').touch(), sys.exit(0))); "
    "d.mkdir(parents=True, exist_ok=True); d.joinpath('ready').touch(); time.sleep(60)"
)
study.train_command = lambda out, experiment, seed, directory, *rest: [sys.executable, "-c", child, str(directory)]
jobs = [("repa", seed, out / "runs" / f"repa_s{seed}") for seed in (0, 1)]
try:
    study.run_all(jobs, out, 1, False, time.monotonic(), None)
except RuntimeError as error:
    print(f"error: {error}")
    sys.exit(1)
"""


def test_a_signal_to_the_study_checkpoints_its_runs_and_starts_no_other(tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-c", STOPPABLE_STUDY, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    first = tmp_path / "runs" / "repa_s0"
    deadline = time.monotonic() + 60
    while not (first / "ready").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGUSR1)  # what SLURM sends before the time limit
    output, _ = process.communicate(timeout=60)
    assert process.returncode == 1
    assert "error: stopped by SIGUSR1" in output and "the same command resumes them" in output
    assert (first / "checkpointed").exists()  # the run was told to write its checkpoint
    assert not (tmp_path / "runs" / "repa_s1.log").exists()  # and no other run started


def test_stage_times_sum_over_resumed_calls_and_keep_a_stage_that_failed(tmp_path):
    path = tmp_path / "timing.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="timing.json is not a timing record"):
        StageTimes(path, time.monotonic())
    path.write_text('{"calls": Infinity, "arms": NaN, "reference": 1e400}')
    assert StageTimes(path, time.monotonic()).times == {"calls": 1}  # only finite numbers are kept
    path.write_text('["not", "a", "timing"]')  # a foreign file is ignored, not trusted
    first = StageTimes(path, time.monotonic())
    with pytest.raises(RuntimeError), first.stage("arms", "the arms"):
        time.sleep(0.01)
        raise RuntimeError("runs failed")  # what a stop by SIGUSR1 raises
    stopped = json.loads(path.read_text())
    assert stopped["calls"] == 1 and stopped["arms"] >= 0.0
    second = StageTimes(path, time.monotonic())
    with second.stage("arms", "the arms"):
        time.sleep(0.2)
    with second.stage("measurements", "the VAEs"):
        pass
    resumed = json.loads(path.read_text())
    assert resumed["calls"] == 2
    assert resumed["arms"] >= stopped["arms"] + 0.1
    assert resumed["total"] == pytest.approx(resumed["arms"] + resumed["measurements"], abs=0.11)


SMOKE_STUDY = [sys.executable, "-m", "repae.study", "--smoke", "--parallel", "4", "--out"]


@pytest.fixture(scope="module")
def smoke_study(tmp_path_factory):
    """The directory of a finished smoke study (every stage, a couple of CPU steps per run)."""
    out = tmp_path_factory.mktemp("smoke") / "study"
    result = subprocess.run([*SMOKE_STUDY, str(out)], capture_output=True, text=True, env=os.environ.copy())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


@pytest.mark.slow  # minutes on 2 busy cores: eight 1280-d Fréchet distances and six training processes
def test_smoke_study_writes_every_output_with_rows_for_every_arm(smoke_study, tmp_path):
    out = tmp_path / "study"  # a copy: this test rewrites and resumes it, the fixture stays as it was
    shutil.copytree(smoke_study, out)
    for name in ("results.csv", "summary.md", "fd_vs_step.png", "grids.png", "timing.json"):
        assert (out / name).is_file(), name
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    fd = [row for row in rows if row["kind"] == "fd"]
    assert {row["arm"] for row in fd} == set(ARMS)
    assert all(row["fd_effnet_raw"] for row in fd)  # the raw SiT's FD beside the EMA's, every arm
    assert all(row["proj_loss"] and row["denoising_loss"] for row in fd)
    assert {row["vae"] for row in rows if row["kind"] == "vae"} == {"stage0", "repae_s0", "naive_e2e_s0"}
    summary = (out / "summary.md").read_text()
    assert all(f"- ({claim})" in summary for claim in "abcd")
    assert "Diagnostic, not used by the verdicts: FD-EffNet of the raw" in summary
    # The study's reference records its extractor and resolution, so every run checks it silently.
    assert not any("does not record" in log.read_text() for log in (out / "runs").glob("*.log"))

    (out / "summary.md").unlink()
    command = [sys.executable, "-m", "repae.study", "--out", str(out), "--report-only"]
    subprocess.run(command, check=True, capture_output=True, env=os.environ.copy())
    assert (out / "summary.md").read_text() == summary

    # Resumed with only the stage-0 VAE kept (what a new machine gets back), the study trains no
    # stage-0 run again and its finished arms stay as they were; timing.json sums both calls' stages.
    results = (out / "results.csv").read_bytes()
    first_call = json.loads((out / "timing.json").read_text())
    assert first_call["calls"] == 1 and first_call["total"] > 0
    shutil.rmtree(out / "runs" / "vae_pretrain_s0")
    resumed = subprocess.run([*SMOKE_STUDY, str(out)], capture_output=True, text=True, env=os.environ.copy())
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert not (out / "runs" / "vae_pretrain_s0").exists()
    assert "started" not in resumed.stdout  # every run was finished
    assert (out / "results.csv").read_bytes() == results
    both_calls = json.loads((out / "timing.json").read_text())
    assert both_calls["calls"] == 2
    assert all(both_calls[stage] >= first_call[stage] for stage in first_call if stage != "calls")


@pytest.mark.slow  # the smoke study's
def test_the_ema_batchnorm_study_measures_a_runs_logged_fds_again_and_the_ema_with_raw_statistics(
    smoke_study, tmp_path
):
    run = smoke_study / "runs" / "naive_e2e_s0"
    output = tmp_path / "ema_batchnorm.json"
    threads = torch.get_num_threads()
    # the runs' thread count, so their summation order: with another, this 10-sample FD moved 1e-5
    torch.set_num_threads(int(process_environment(4)["OMP_NUM_THREADS"]))
    try:
        study_ema_batchnorm.main([str(run), "--device", "cpu", "--output", str(output)])
    finally:
        torch.set_num_threads(threads)
    (step,) = json.loads(output.read_text())["steps"]
    assert step["step"] == 2  # the smoke run's one FD step, where it also checkpoints
    # The same samples as the run's callbacks drew: the logged FDs, measured again.
    assert step["fd_ema"] == pytest.approx(step["logged_fd_ema"], rel=1e-6)
    assert step["fd_raw"] == pytest.approx(step["logged_fd_raw"], rel=1e-6)
    # Two steps into the run the EMA's BatchNorm statistics still differ from the raw SiT's, and
    # the EMA SiT sampling with the raw statistics is a third model.
    assert step["ema_batchnorm"] != step["raw_batchnorm"]
    assert step["fd_ema_raw_batchnorm"] not in (step["fd_ema"], step["fd_raw"])
