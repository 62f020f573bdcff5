"""The EMA update: decay * ema + (1 - decay) * model for floating-point tensors, integer buffers
copied, the EMA left as it is on a step flagged non-finite, the same numbers compiled or not, and
the compiled form compiled once."""

from __future__ import annotations

import pytest
import torch

from repae.modules.ema import EMAUpdate, make_ema


def a_model_and_its_ema() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.BatchNorm1d(5))
    return model, make_ema(model)


def train_a_little(model: torch.nn.Module) -> None:
    model(torch.randn(8, 3))  # the BatchNorm statistics and its batch count move too
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter))


def float_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in module.state_dict().items() if v.is_floating_point()}


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("flagged", [False, True])
def test_each_update_moves_the_ema_towards_the_model_as_it_is_now(compile, flagged):
    model, ema = a_model_and_its_ema()
    update = EMAUpdate(ema, model, compile=compile)
    for _ in range(2):  # the second update sees the model's new values: the lists hold live tensors
        train_a_little(model)
        before = float_state(ema)
        update(0.75, where=torch.tensor(True) if flagged else None)
        for key, value in float_state(model).items():
            torch.testing.assert_close(ema.state_dict()[key], 0.75 * before[key] + 0.25 * value, msg=key)
        assert ema[1].num_batches_tracked == model[1].num_batches_tracked


@pytest.mark.parametrize("compile", [False, True])
def test_a_step_flagged_non_finite_leaves_the_averaged_tensors(compile):
    model, ema = a_model_and_its_ema()
    update = EMAUpdate(ema, model, compile=compile)
    train_a_little(model)
    before = float_state(ema)
    update(0.75, where=torch.tensor(False))
    for key, value in float_state(ema).items():
        assert torch.equal(value, before[key]), key


def test_decay_zero_copies_the_model():
    model, ema = a_model_and_its_ema()
    train_a_little(model)
    EMAUpdate(ema, model)(0.0)
    for key, value in model.state_dict().items():
        assert torch.equal(ema.state_dict()[key], value), key


def test_an_ema_of_another_architecture_is_refused():
    model, _ = a_model_and_its_ema()
    other = make_ema(torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.LayerNorm(5)))
    with pytest.raises(Exception, match="EMA and model differ"):
        EMAUpdate(other, model)


def test_the_compiled_update_compiles_once_whatever_the_flag():
    model, ema = a_model_and_its_ema()
    update = EMAUpdate(ema, model, compile=True)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for flag in [True, False, True]:
        train_a_little(model)
        update(0.75, where=torch.tensor(flag))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
