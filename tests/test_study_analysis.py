"""The analyses behind docs/reproduction.md's "Investigation": how much of the REPA target needs no
image (scripts/study_targets.py), which way the REPA loss pulls the latents' spread
(scripts/study_latent_scale.py), and the naive arm's EMA BatchNorm test (scripts/study_ema_batchnorm.py;
its measurement of a smoke run is in tests/test_study.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml

from repae.modules.sit import build_sit
from scripts import study_ema_batchnorm
from scripts.study_latent_scale import alignment_spread_gradient
from scripts.study_targets import target_baselines


def test_a_target_set_by_class_and_position_is_predicted_without_the_image():
    torch.manual_seed(0)
    labels = torch.arange(40) % 4
    per_class = torch.randn(4, 3, 8)  # 4 classes, 3 token positions, 8-d tokens
    train = per_class[labels] * (0.5 + torch.rand(40, 1, 1))  # a token's length does not change its cosine
    test = per_class[labels[:12]] * 2
    found = target_baselines(train, labels, test, labels[:12])
    assert found["class_position"] == pytest.approx(1.0, abs=1e-6)
    assert found["constant"] < found["position"] < found["class_position"]

    noise = torch.randn(12, 3, 8)  # a target the class and position say nothing about
    assert abs(target_baselines(train, labels, noise, labels[:12])["class_position"]) < 0.3


def test_the_alignment_spread_gradient_is_the_derivative_of_the_vae_pass_loss_in_each_channels_spread():
    torch.manual_seed(0)
    sit = build_sit("SiT-S/2", depth=2, hidden_size=48, num_heads=2, encoder_depth=1, in_channels=4,
                    input_size=8, num_classes=10, projector_dim=32, z_dims=[16])  # fmt: skip
    sit.requires_grad_(False)
    sit.bn.running_mean.copy_(torch.tensor([1.0, -0.5, 0.0, 2.0]))
    z, labels = 1.5 + 3 * torch.randn(6, 4, 8, 8), torch.arange(6)
    args = (labels, [torch.randn(6, 16, 16)], torch.rand(6, 1, 1, 1), torch.randn(6, 4, 8, 8))
    buffers = [buffer.clone() for buffer in sit.bn.buffers()]
    mean = sit.bn.running_mean.view(1, 4, 1, 1)

    def loss_at(spread: torch.Tensor) -> float:
        return alignment_spread_gradient(sit, mean + spread.view(1, 4, 1, 1) * (z - mean), *args)[0]

    _, gradient = alignment_spread_gradient(sit, z, *args)
    assert gradient.shape == (4,) and gradient.abs().min() > 1e-4
    step = 1e-3
    for channel in range(4):
        nudge = torch.zeros(4)
        nudge[channel] = step
        difference = (loss_at(1 + nudge) - loss_at(1 - nudge)) / (2 * step)
        assert gradient[channel].item() == pytest.approx(difference, rel=0.02)
    common = (loss_at(torch.full((4,), 1 + step)) - loss_at(torch.full((4,), 1 - step))) / (2 * step)
    assert gradient.sum().item() == pytest.approx(common, rel=0.02)
    # the pass reads the running statistics without moving them, and the SiT keeps its mode
    assert all(torch.equal(a, b) for a, b in zip(buffers, sit.bn.buffers(), strict=True))
    assert sit.training


def tiny_sit():
    return build_sit("SiT-S/2", depth=1, hidden_size=32, num_heads=2, encoder_depth=1, in_channels=4,
                     input_size=8, num_classes=10, projector_dim=16, z_dims=[8])  # fmt: skip


def test_the_ema_sit_given_the_raw_batchnorm_statistics_keeps_everything_else():
    torch.manual_seed(0)
    ema, raw = tiny_sit(), tiny_sit()
    for sit in (ema, raw):
        sit.bn.running_mean.normal_()
        sit.bn.running_var.uniform_(0.1, 2.0)
    before = copy.deepcopy(ema.state_dict())
    study_ema_batchnorm.use_raw_batchnorm(ema, raw)
    after = ema.state_dict()
    swapped = {"bn.running_mean", "bn.running_var"}
    assert all(torch.equal(after[key], raw.state_dict()[key]) for key in swapped)
    assert all(torch.equal(after[key], before[key]) for key in before if key not in swapped)


RUN_CONFIG = {  # what the script reads of a study run's config.yaml
    "seed": 0,
    "allow_tf32": True,
    "trainer": {"devices": 1, "num_nodes": 1},
    "model": {
        "sampling": {
            "mode": "ode",
            "num_steps": 25,
            "heun": False,
            "cfg_scale": 1,
            "guidance_low": 0.0,
            "guidance_high": 1.0,
            "path_type": "linear",
        }
    },
    "callbacks": {
        "fid": {
            "steps": [2],
            "num_samples": 10,
            "batch_size": 10,
            "feature_extractor": "effnet",
            "effnet_resolution": 64,
            "reference_stats_path": "reference.npz",
        }
    },
}


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("callbacks.fid.num_samples", "__import__('os').system('id')",
         "callbacks.fid.num_samples is a str, not of type int"),
        ("model.sampling.heun", "yes", "model.sampling.heun is a str, not of type bool"),
        ("callbacks.fid.steps", [True], "callbacks.fid.steps must be a list of step numbers"),
        ("callbacks.fid.feature_extractor", "inception", "callbacks.fid.feature_extractor must be effnet"),
        ("callbacks.fid.guidance_scale", 4.0,
         "callbacks.fid has keys this script does not reproduce: ['guidance_scale']"),
        ("trainer.devices", 2, "trainer.devices x trainer.num_nodes must be 1 (a one-process run)"),
        ("allow_tf32", None, "allow_tf32 is a NoneType, not of type bool"),
        ("callbacks.fid.use_ema", False, "callbacks.fid.use_ema must be true (its FD is the EMA's)"),
        ("callbacks.fid_raw", {**RUN_CONFIG["callbacks"]["fid"], "use_ema": False, "seed": 1},
         "callbacks.fid_raw must be callbacks.fid with use_ema: false"),
    ],
)  # fmt: skip
def test_the_ema_batchnorm_study_refuses_a_run_config_it_cannot_follow_in_one_line(
    tmp_path, key, value, message
):
    config = copy.deepcopy(RUN_CONFIG)
    *parents, name = key.split(".")
    node = config
    for part in parents:
        node = node[part]
    node[name] = value
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "metrics.csv").write_text("step,fd_effnet\n")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:
        study_ema_batchnorm.main([str(tmp_path), "--device", "cpu"])
    assert str(exit_info.value) == f"error: the run's config.yaml: {message}"


def test_the_ema_batchnorm_study_reads_an_interpolation_in_a_run_config_as_text(tmp_path, monkeypatch):
    monkeypatch.setenv("REPAE_TEST_SECRET", "hunter2")
    config = copy.deepcopy(RUN_CONFIG)
    config["callbacks"]["fid"]["reference_stats_path"] = "${oc.env:REPAE_TEST_SECRET}"
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "metrics.csv").write_text("step,fd_effnet\n")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(SystemExit) as exit_info:
        study_ema_batchnorm.main([str(tmp_path), "--device", "cpu"])
    assert str(exit_info.value).startswith("error: ") and "hunter2" not in str(exit_info.value)
    assert "${oc.env:REPAE_TEST_SECRET}" in str(exit_info.value)
