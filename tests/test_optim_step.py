"""Behaviour of the joint optimizer step: per-set clipping and loss scaling, all three updates and the
EMA taken together or skipped together, and the count of skipped steps (three tiny CPU models)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import pytest
import torch
import torch.nn as nn

from repae.modules.ema import EMAUpdate, make_ema
from repae.optim_step import JointStep

BETA1 = 0.9
PATHS = [pytest.param(False, id="host-reads-finiteness"), pytest.param(True, id="fused-skips-on-device")]


@dataclass
class Rig:
    models: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    ema: nn.Module
    joint_step: JointStep
    scalers: list[torch.amp.GradScaler] | None


def rig(fused: bool, max_grad_norm=1.0, max_consecutive_nonfinite=10, scaled=False) -> Rig:
    """A SiT-like model with BatchNorm (its running stats are the step buffers) and an EMA, and a
    VAE- and a discriminator-like model, each with its own AdamW. No bias before the BatchNorm: its
    gradient would be rounding noise, which AdamW's m / sqrt(v) turns into learning-rate-sized moves."""
    torch.manual_seed(0)
    models = {
        "sit": nn.Sequential(nn.Linear(4, 8, bias=False), nn.BatchNorm1d(8), nn.Linear(8, 1)),
        "vae": nn.Linear(4, 1),
        "disc": nn.Linear(4, 1),
    }
    optimizers = {
        name: torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(BETA1, 0.999), fused=fused)
        for name, model in models.items()
    }
    ema = make_ema(models["sit"])
    scalers = [torch.amp.GradScaler("cpu") for _ in models] if scaled else None
    joint_step = JointStep(
        optimizers,
        backward=torch.Tensor.backward,
        ema_update=partial(EMAUpdate(ema, models["sit"]), 0.5),
        step_buffers=list(models["sit"].buffers()),
        nonfinite_steps=torch.zeros((), dtype=torch.long),
        max_grad_norm=max_grad_norm,
        max_consecutive_nonfinite=max_consecutive_nonfinite,
        scalers=scalers,
    )
    return Rig(models, optimizers, ema, joint_step, scalers)


def train_step(rig: Rig, number: int, bad: str | None = None, bad_value=float("nan")) -> dict:
    """One training step (1-based ``number``); the loss of parameter set ``bad`` times ``bad_value``."""
    x = torch.randn(16, 4, generator=torch.Generator().manual_seed(number))
    rig.joint_step.begin()
    for name, model in rig.models.items():
        loss = 100 * model(x).pow(2).mean()
        rig.joint_step.backward(name, loss * bad_value if name == bad else loss)
    logs = rig.joint_step.check_gradients()
    rig.joint_step.step(number)
    return logs


def state(rig: Rig) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the models and the EMA, and every optimizer state tensor."""
    tensors = {f"{name}.{k}": v for name, model in rig.models.items() for k, v in model.state_dict().items()}
    tensors |= {f"ema.{k}": v for k, v in rig.ema.state_dict().items()}
    for name, optimizer in rig.optimizers.items():
        for index, s in enumerate(optimizer.state.values()):
            tensors |= {f"adamw_{name}.{index}.{k}": v for k, v in s.items()}
    return {key: value.detach().clone() for key, value in tensors.items()}


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    return {key for key, value in before.items() if not torch.equal(value, after[key])}


@pytest.mark.parametrize("fused", PATHS)
def test_a_nonfinite_vae_gradient_skips_all_three_updates_and_the_ema_and_restores_the_bn_stats(fused):
    steps = rig(fused)
    train_step(steps, 1)
    before = state(steps)
    logs = train_step(steps, 2, bad="vae")
    assert changed(before, state(steps)) == set()
    assert float(logs["nonfinite_steps"]) == 1 and int(steps.joint_step.nonfinite_steps) == 1
    before = state(steps)
    train_step(steps, 3)
    assert {key.split(".")[0] for key in changed(before, state(steps))} == {
        "sit",
        "vae",
        "disc",
        "ema",
        "adamw_sit",
        "adamw_vae",
        "adamw_disc",
    }
    assert int(steps.joint_step.nonfinite_steps) == 1


@pytest.mark.parametrize("fused", PATHS)
def test_gradients_are_clipped_to_max_grad_norm_per_parameter_set(fused):
    max_norm = 1e-3  # far below the gradient norms here
    steps = rig(fused, max_grad_norm=max_norm)
    logs = train_step(steps, 1)
    for name, optimizer in steps.optimizers.items():
        assert logs[f"grad_norm_{name}"] > 10 * max_norm  # logged before clipping
        # After one step AdamW's first moment is (1 - beta1) times the gradient it was given.
        moments = [s["exp_avg"] for s in optimizer.state.values()]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(m) for m in moments]))
        torch.testing.assert_close(norm, torch.tensor((1 - BETA1) * max_norm), rtol=1e-4, atol=0, msg=name)


def test_under_16_mixed_the_gradients_are_unscaled_before_their_norm_and_the_clip():
    plain, scaled = rig(fused=False, max_grad_norm=1e-3), rig(fused=False, max_grad_norm=1e-3, scaled=True)
    for number in (1, 2):
        plain_logs, scaled_logs = train_step(plain, number), train_step(scaled, number)
        # The scale is a power of two: scaling and unscaling are exact.
        assert plain_logs.keys() == scaled_logs.keys()
        assert all(torch.equal(plain_logs[key], scaled_logs[key]) for key in plain_logs)
    assert changed(state(plain), state(scaled)) == set()


def test_under_16_mixed_an_overflow_skips_every_step_and_backs_off_only_its_own_scale():
    steps = rig(fused=False, scaled=True)
    train_step(steps, 1)
    before = state(steps)
    train_step(steps, 2, bad="vae", bad_value=float("inf"))
    assert changed(before, state(steps)) == set()
    scales = {name: scaler.get_scale() for name, scaler in zip(steps.models, steps.scalers, strict=True)}
    assert scales == {"sit": 2.0**16, "vae": 2.0**15, "disc": 2.0**16}


def test_the_fused_path_and_the_host_path_take_the_same_update():
    host, device = rig(fused=False, max_grad_norm=0.5), rig(fused=True, max_grad_norm=0.5)
    assert (host.joint_step.skips_on_device, device.joint_step.skips_on_device) == (False, True)
    for number, bad in [(1, None), (2, "sit"), (3, None), (4, "disc"), (5, None)]:
        train_step(host, number, bad), train_step(device, number, bad)
    host_state, device_state = state(host), state(device)
    assert host_state.keys() == device_state.keys()
    for key, value in host_state.items():
        # fused and for-loop AdamW round differently, and clip by dividing vs multiplying
        torch.testing.assert_close(device_state[key], value, rtol=1e-5, atol=1e-7, msg=key)
    assert int(host.joint_step.nonfinite_steps) == int(device.joint_step.nonfinite_steps) == 2


@pytest.mark.parametrize("fused", PATHS)
def test_n_consecutive_nonfinite_steps_stop_the_run_with_the_documented_message(fused):
    steps = rig(fused, max_consecutive_nonfinite=2)
    train_step(steps, 1)
    train_step(steps, 2, bad="sit")
    if fused:  # the host reads the count of consecutive skips only every 2 steps: after step 4
        train_step(steps, 3, bad="sit")
    last = 4 if fused else 3
    count = 3 if fused else 2
    with pytest.raises(
        FloatingPointError,
        match=rf"^{count} consecutive steps with non-finite losses or gradients \(last at step {last}\); "
        r"stopping\. Resume from the last checkpoint, e\.g\. with a lower learning rate or bf16 instead of "
        r"16-mixed precision\.$",
    ):
        train_step(steps, last, bad="sit")


@pytest.mark.parametrize("fused", PATHS)
def test_a_finite_step_resets_the_count_of_consecutive_skips_but_not_the_total(fused):
    steps = rig(fused, max_consecutive_nonfinite=2)
    for number in range(1, 7):
        train_step(steps, number, bad="disc" if number % 2 else None)
    assert int(steps.joint_step.nonfinite_steps) == 3


def test_on_the_fused_path_the_host_reads_the_device_only_every_max_consecutive_nonfinite_steps(monkeypatch):
    steps = rig(fused=True, max_consecutive_nonfinite=3)
    reads: list[str] = []
    for method in ("__bool__", "__int__", "__float__", "item", "tolist"):
        original = getattr(torch.Tensor, method)

        def read(self, *args, _original=original, _method=method, **kwargs):
            reads.append(_method)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, read)
    reads_per_step = []
    for number in range(1, 7):
        train_step(steps, number, bad="vae" if number in (2, 5) else None)
        reads_per_step.append(len(reads))
        reads.clear()
    monkeypatch.undo()
    assert [n > 0 for n in reads_per_step] == [False, False, True, False, False, True], reads_per_step
