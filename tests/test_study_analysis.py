"""The analyses behind docs/reproduction.md's "Investigation": how much of the REPA target needs no
image (scripts/study_targets.py) and which way the REPA loss pulls the latents' spread
(scripts/study_latent_scale.py)."""

from __future__ import annotations

import pytest
import torch

from repae.modules.sit import build_sit
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
