"""The optimizer benchmark's one-pass candidates do what today's pass does: AdamW with clipped
gradients and then the EMA, nothing at all on a step with a non-finite gradient (their speed is the
benchmark's job)."""

from __future__ import annotations

import pytest
import torch

from repae.modules.sit import build_sit
from scripts.bench import optimizer


def test_the_one_pass_candidates_update_weights_moments_and_ema_as_fused_adamw_then_the_ema_do():
    torch.manual_seed(0)
    sit = build_sit(
        "SiT-S/2", depth=2, encoder_depth=1, in_channels=4, input_size=8, z_dims=[16], num_classes=10
    )
    compared = optimizer.compare_forms(sit, compile=False)
    assert set(compared) == set(optimizer.FORMS)
    for name, entry in compared.items():
        # Rounding (the update computed in another order) is at most ~1e-3 of a change; a wrong formula ~1.
        for kind, difference in entry["largest_difference_over_change"].items():
            assert difference < 1e-2, (name, kind, difference)


def test_a_skipped_pass_of_a_candidate_changes_nothing_and_the_next_one_counts_as_the_first():
    torch.manual_seed(0)
    sit = build_sit(
        "SiT-S/2", depth=1, encoder_depth=1, in_channels=4, input_size=8, z_dims=[16], num_classes=10
    )
    ema = optimizer.make_ema(sit)
    form = optimizer.FORMS["one_pass_foreach"](sit, ema, False)
    before = {kind: [t.clone() for t in tensors] for kind, tensors in form.tensors().items()}
    first, poisoned, _ = optimizer.gradient_sets(form.params)
    form([g.clone() for g in poisoned], *optimizer.finite_and_divisor(poisoned))
    for kind, tensors in form.tensors().items():
        assert all(torch.equal(a, b) for a, b in zip(tensors, before[kind], strict=True)), kind
    assert form.step.item() == 0
    form([g.clone() for g in first], *optimizer.finite_and_divisor(first))
    # AdamW's first step moves every weight with a non-zero gradient by about the learning rate.
    moved = torch.cat([(a - b).abs().flatten() for a, b in zip(form.params, before["weights"], strict=True)])
    assert form.step.item() == 1 and moved.max().item() == pytest.approx(optimizer.LR, rel=1e-3)
