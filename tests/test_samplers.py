"""Samplers against hand-written step rules of the official REPA / REPA-E samplers."""

import math

import pytest
import torch

from repae.modules.samplers import (
    euler_maruyama_sampler,
    euler_sampler,
    generate_images,
    interpolant,
    sample,
    score_from_velocity,
)
from repae.modules.sit import build_sit
from repae.modules.vae import build_vae

NULL_CLASS = 5


class LinearVelocity(torch.nn.Module):
    """v = a * x + b * t + c[y]: linear in x and t, class-dependent offset (null class included).

    Records (dtype of x, dtype of t, batch size, first t) of every call.
    """

    def __init__(self, channels: int = 2, num_classes: int = NULL_CLASS):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.a = torch.randn(channels, generator=generator).view(1, -1, 1, 1)
        self.b = torch.randn(channels, generator=generator).view(1, -1, 1, 1)
        self.c = torch.randn(num_classes + 1, channels, generator=generator)
        self.calls = []

    def inference(self, x, t, y):
        self.calls.append((x.dtype, t.dtype, x.shape[0], float(t[0])))
        a, b, c = (p.to(x.dtype) for p in (self.a, self.b, self.c))
        return a * x + b * t.view(-1, 1, 1, 1) + c[y].view(*c[y].shape, 1, 1)


def velocity(model, x, t, y):
    """The model at a float64 state and a Python-float time, as the samplers call it (float32 inputs)."""
    time = torch.full((x.shape[0],), t, dtype=torch.float64)
    return model.inference(x.float(), time.float(), y).double()


def guided_velocity(model, x, t, y, scale):
    both = velocity(model, torch.cat([x, x]), t, torch.cat([y, torch.full_like(y, NULL_CLASS)]))
    cond, uncond = both.chunk(2)
    return uncond + scale * (cond - uncond)


@pytest.fixture
def inputs():
    generator = torch.Generator().manual_seed(1)
    latents = torch.randn(3, 2, 4, 4, generator=generator)
    labels = torch.tensor([0, 3, 4])
    return latents, labels


def test_euler_matches_hand_written_loop(inputs):
    latents, labels = inputs
    model = LinearVelocity()
    num_steps = 7
    x = latents.double()
    times = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64).tolist()
    for t_cur, t_next in zip(times[:-1], times[1:], strict=True):
        x = x + (t_next - t_cur) * velocity(model, x, t_cur, labels)

    out = euler_sampler(model, latents, labels, num_steps=num_steps, null_class=NULL_CLASS)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, x, rtol=1e-12, atol=1e-12)


def test_heun_matches_hand_written_loop_and_skips_last_corrector(inputs):
    latents, labels = inputs
    model = LinearVelocity()
    num_steps = 5
    x = latents.double()
    times = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64).tolist()
    for i, (t_cur, t_next) in enumerate(zip(times[:-1], times[1:], strict=True)):
        d_cur = velocity(model, x, t_cur, labels)
        x_euler = x + (t_next - t_cur) * d_cur
        if i < num_steps - 1:
            d_prime = velocity(model, x_euler, t_next, labels)
            x = x + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
        else:
            x = x_euler

    model.calls.clear()
    out = euler_sampler(model, latents, labels, num_steps=num_steps, heun=True, null_class=NULL_CLASS)
    torch.testing.assert_close(out, x, rtol=1e-12, atol=1e-12)
    assert len(model.calls) == 2 * num_steps - 1


def test_euler_with_cfg_matches_hand_written_loop(inputs):
    latents, labels = inputs
    model = LinearVelocity()
    num_steps, scale, low, high = 10, 2.5, 0.2, 0.65
    x = latents.double()
    times = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64).tolist()
    for t_cur, t_next in zip(times[:-1], times[1:], strict=True):
        if low <= t_cur <= high:
            d = guided_velocity(model, x, t_cur, labels, scale)
        else:
            d = velocity(model, x, t_cur, labels)
        x = x + (t_next - t_cur) * d

    out = euler_sampler(
        model,
        latents,
        labels,
        num_steps=num_steps,
        cfg_scale=scale,
        guidance_low=low,
        guidance_high=high,
        null_class=NULL_CLASS,
    )
    torch.testing.assert_close(out, x, rtol=1e-12, atol=1e-12)


def test_state_is_float64_while_model_sees_latent_dtype(inputs):
    latents, labels = inputs
    model = LinearVelocity()
    out = euler_sampler(model, latents, labels, num_steps=3, heun=True, null_class=NULL_CLASS)
    assert out.dtype == torch.float64
    assert {(x_dtype, t_dtype) for x_dtype, t_dtype, _, _ in model.calls} == {(torch.float32, torch.float32)}

    model.calls.clear()
    euler_maruyama_sampler(model, latents.double(), labels, num_steps=3, null_class=NULL_CLASS)
    assert {(x_dtype, t_dtype) for x_dtype, t_dtype, _, _ in model.calls} == {(torch.float64, torch.float64)}


def test_ode_guidance_doubles_batch_exactly_inside_closed_interval(inputs):
    latents, labels = inputs
    model = LinearVelocity()
    # 8 steps: t_cur = 1, .875, .75, .625, .5, .375, .25, .125 (exact in binary), interval [.25, .75] inclusive.
    euler_sampler(
        model,
        latents,
        labels,
        num_steps=8,
        cfg_scale=1.5,
        guidance_low=0.25,
        guidance_high=0.75,
        null_class=NULL_CLASS,
    )
    assert [t for _, _, _, t in model.calls] == [1 - i / 8 for i in range(8)]
    assert [batch for _, _, batch, _ in model.calls] == [3, 3, 6, 6, 6, 6, 6, 3]


def test_heun_corrector_follows_the_guidance_decision_of_t_cur(inputs):
    latents, labels = inputs
    model = LinearVelocity()
    euler_sampler(
        model,
        latents,
        labels,
        num_steps=4,
        heun=True,
        cfg_scale=1.5,
        guidance_low=0.5,
        guidance_high=0.75,
        null_class=NULL_CLASS,
    )
    recorded = [(t, batch) for _, _, batch, t in model.calls]
    # (t_cur, t_next) = (1, .75), (.75, .5), (.5, .25), (.25, 0); no corrector on the last step.
    # The corrector at t=.75 after t_cur=1 is unguided; the one at t=.25 after t_cur=.5 is guided.
    assert recorded == [(1.0, 3), (0.75, 3), (0.75, 6), (0.5, 6), (0.5, 6), (0.25, 6), (0.25, 3)]


def test_sde_guidance_doubles_batch_exactly_inside_closed_interval(inputs):
    latents, labels = inputs
    model = LinearVelocity()
    grid = torch.linspace(1.0, 0.04, 10, dtype=torch.float64)
    low, high = grid[6].item(), grid[2].item()
    euler_maruyama_sampler(
        model,
        latents,
        labels,
        num_steps=10,
        cfg_scale=1.5,
        guidance_low=low,
        guidance_high=high,
        null_class=NULL_CLASS,
    )
    assert [t for _, _, _, t in model.calls] == pytest.approx(grid.tolist(), abs=1e-6)
    assert [batch for _, _, batch, _ in model.calls] == [3, 3, 6, 6, 6, 6, 6, 3, 3, 3]


@pytest.mark.parametrize("sampler", [euler_sampler, euler_maruyama_sampler])
def test_no_guidance_when_cfg_scale_is_one(inputs, sampler):
    latents, labels = inputs
    model = LinearVelocity()
    sampler(model, latents, labels, num_steps=4, cfg_scale=1.0, null_class=NULL_CLASS)
    assert [batch for _, _, batch, _ in model.calls] == [3] * 4


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_score_from_velocity_is_minus_noise_over_sigma(path_type):
    generator = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(2, 4, 3, 3, generator=generator, dtype=torch.float64)
    t = torch.tensor([0.3, 0.8], dtype=torch.float64)
    alpha, sigma, d_alpha, d_sigma = (c.view(-1, 1, 1, 1) for c in interpolant(t, path_type))
    x_t = alpha * x0 + sigma * eps
    v = d_alpha * x0 + d_sigma * eps
    torch.testing.assert_close(score_from_velocity(v, x_t, t, path_type), -eps / sigma)


def test_linear_score_has_the_closed_form():
    generator = torch.Generator().manual_seed(3)
    v, x = torch.randn(2, 1, 2, 2, 2, generator=generator, dtype=torch.float64)
    t = torch.tensor([0.4], dtype=torch.float64)
    torch.testing.assert_close(score_from_velocity(v, x, t, "linear"), ((t - 1) * v - x) / t)


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_euler_maruyama_matches_hand_written_loop(inputs, path_type):
    latents, labels = inputs
    model = LinearVelocity()
    num_steps, scale, high = 6, 2.0, 0.75

    def drift(x, t):
        guided = t <= high
        x_in = torch.cat([x, x]) if guided else x
        y_in = torch.cat([labels, torch.full_like(labels, NULL_CLASS)]) if guided else labels
        v = velocity(model, x_in, t, y_in)
        if path_type == "linear":
            score = ((t - 1) * v - x_in) / t
        else:
            a, s = math.cos(t * math.pi / 2), math.sin(t * math.pi / 2)
            da, ds = -math.pi / 2 * s, math.pi / 2 * a
            score = (a / da * v - x_in) / (s**2 - a / da * ds * s)
        d = v - 0.5 * (2 * t) * score
        if guided:
            cond, uncond = d.chunk(2)
            d = uncond + scale * (cond - uncond)
        return d

    times = torch.linspace(1.0, 0.04, num_steps, dtype=torch.float64).tolist() + [0.0]
    noise_generator = torch.Generator().manual_seed(7)
    x = latents.double()
    for t_cur, t_next in zip(times[:-2], times[1:-1], strict=True):
        xi = torch.randn(x.shape, generator=noise_generator, dtype=torch.float64)
        x = (
            x
            + drift(x, t_cur) * (t_next - t_cur)
            + math.sqrt(2 * t_cur) * xi * math.sqrt(abs(t_next - t_cur))
        )
    x = x + (times[-1] - times[-2]) * drift(x, times[-2])

    out = euler_maruyama_sampler(
        model,
        latents,
        labels,
        num_steps=num_steps,
        cfg_scale=scale,
        guidance_high=high,
        path_type=path_type,
        null_class=NULL_CLASS,
        generator=torch.Generator().manual_seed(7),
    )
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, x, rtol=1e-10, atol=1e-10)


def test_euler_maruyama_noise_only_in_first_steps_and_last_step_deterministic(inputs):
    latents, labels = inputs
    model = LinearVelocity()
    num_steps = 5
    generator = torch.Generator().manual_seed(11)
    euler_maruyama_sampler(
        model, latents, labels, num_steps=num_steps, null_class=NULL_CLASS, generator=generator
    )
    assert len(model.calls) == num_steps

    # Exactly num_steps - 1 noise draws of the latent shape were taken from the generator.
    reference = torch.Generator().manual_seed(11)
    for _ in range(num_steps - 1):
        torch.randn(latents.shape, generator=reference, dtype=torch.float64)
    assert torch.equal(torch.randn(4, generator=generator), torch.randn(4, generator=reference))

    # A single step is the deterministic final step: the generator does not matter.
    one_a = euler_maruyama_sampler(
        model, latents, labels, num_steps=1, generator=torch.Generator().manual_seed(0)
    )
    one_b = euler_maruyama_sampler(
        model, latents, labels, num_steps=1, generator=torch.Generator().manual_seed(1)
    )
    assert torch.equal(one_a, one_b)
    many_a = euler_maruyama_sampler(
        model, latents, labels, num_steps=3, generator=torch.Generator().manual_seed(0)
    )
    many_b = euler_maruyama_sampler(
        model, latents, labels, num_steps=3, generator=torch.Generator().manual_seed(1)
    )
    assert not torch.allclose(many_a, many_b)


def test_sample_dispatches_by_mode(inputs):
    latents, labels = inputs
    model = LinearVelocity()
    ode = sample(model, latents, labels, mode="ode", num_steps=4, null_class=NULL_CLASS)
    torch.testing.assert_close(ode, euler_sampler(model, latents, labels, num_steps=4, null_class=NULL_CLASS))
    sde = sample(
        model,
        latents,
        labels,
        mode="sde",
        heun=False,
        num_steps=4,
        generator=torch.Generator().manual_seed(0),
    )
    expected = euler_maruyama_sampler(
        model, latents, labels, num_steps=4, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(sde, expected)
    with pytest.raises(ValueError, match="mode"):
        sample(model, latents, labels, mode="ddim")
    with pytest.raises(ValueError, match="Heun"):
        sample(model, latents, labels, mode="sde", heun=True)


def test_unknown_path_type_raises():
    with pytest.raises(ValueError, match="path_type"):
        interpolant(torch.tensor([0.5]), "vp")


def test_guidance_without_a_null_class_embedding_is_refused_clearly():
    sit = build_sit(
        "SiT-S/2",
        input_size=4,
        in_channels=4,
        depth=1,
        encoder_depth=1,
        num_classes=3,
        class_dropout_prob=0.0,
    )
    vae = build_vae("f4d4-tiny")
    with pytest.raises(ValueError, match="null-class embedding"):
        generate_images(sit, vae, torch.zeros(1, dtype=torch.long), torch.randn(1, 4, 4, 4), cfg_scale=2.0)
