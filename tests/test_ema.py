"""Behaviour of the SiT's exponential moving average (repae/modules/ema.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from repae.modules.ema import make_ema, update_ema


def a_model_and_its_ema() -> tuple[nn.Module, nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Linear(5, 2))
    ema = make_ema(model)
    model(torch.randn(8, 3))  # BatchNorm running statistics and num_batches_tracked move
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter))
    return model, ema, {key: value.clone() for key, value in ema.state_dict().items()}


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("finite", [True, False], ids=["finite step", "skipped step"])
def test_an_update_decided_on_the_device_follows_the_formula_or_leaves_the_ema(compiled, finite):
    model, ema, before = a_model_and_its_ema()
    update_ema(ema, model, decay=0.75, where=torch.tensor(finite), compiled=compiled)
    for key, value in ema.state_dict().items():
        if not value.is_floating_point():  # num_batches_tracked: copied from the model either way
            assert torch.equal(value, model.state_dict()[key]), key
        elif finite:
            expected = 0.75 * before[key] + 0.25 * model.state_dict()[key]
            torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7, msg=key)
        else:
            assert torch.equal(value, before[key]), key
