import math

import pytest
import torch
import torch._dynamo.testing
import torch.nn as nn
import torch.nn.functional as F

from repae.modules.losses import VAERegularizationLoss, alignment_loss, call_with_frozen_parameters

GENERATOR_KEYS = {
    "total_loss",
    "reconstruction_loss",
    "perceptual_loss",
    "kl_loss",
    "weighted_gan_loss",
    "discriminator_factor",
    "d_weight",
    "gan_loss",
}
DISCRIMINATOR_KEYS = {"discriminator_loss", "logits_real", "logits_fake", "lecam_loss"}


class StubPosterior:
    def __init__(self, kl: torch.Tensor):
        self._kl = kl

    def kl(self) -> torch.Tensor:
        return self._kl


class MeanAbsDifference(nn.Module):
    """Stub perceptual distance: 2 * mean |x - y| per sample -> [B]."""

    def forward(self, x, y):
        return 2 * (x - y).abs().mean(dim=(1, 2, 3))


def channel_sum_discriminator() -> nn.Module:
    """1x1 conv with unit weights: logits = sum of the three channels."""
    conv = nn.Conv2d(3, 1, kernel_size=1)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.bias.zero_()
    return conv


def batchnorm_discriminator() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.LeakyReLU(0.2), nn.Conv2d(4, 1, 1))


def images():
    """x = 0; x_hat is 0.5 for sample 0 and -0.25 for sample 1."""
    x = torch.zeros(2, 3, 4, 4)
    x_hat = torch.stack([torch.full((3, 4, 4), 0.5), torch.full((3, 4, 4), -0.25)])
    return x, x_hat


def make_loss(**kwargs) -> VAERegularizationLoss:
    kwargs.setdefault("discriminator", channel_sum_discriminator())
    kwargs.setdefault("perceptual", MeanAbsDifference())
    return VAERegularizationLoss(**kwargs)


@pytest.mark.parametrize(("reconstruction_loss", "reconstruction_value"), [("l1", 0.375), ("l2", 0.15625)])
def test_generator_loss_matches_hand_computed_terms(reconstruction_loss, reconstruction_value):
    loss_fn = make_loss(
        reconstruction_loss=reconstruction_loss,
        reconstruction_weight=2.0,
        logvar_init=math.log(2.0),
        perceptual_weight=0.5,
        kl_weight=0.1,
        discriminator_weight=0.1,
        discriminator_factor=1.0,
    )
    x, x_hat = images()
    loss, logs = loss_fn(x, x_hat, StubPosterior(torch.tensor([2.0, 4.0])), gan_factor=loss_fn.factor(0))

    reconstruction = 2.0 * reconstruction_value / 2.0  # weight 2, divided by exp(logvar) = 2
    perceptual = 0.5 * (2 * 0.5 + 2 * 0.25) / 2  # mean over batch of the stub distance
    kl = 0.1 * (2.0 + 4.0) / 2  # sum over batch / B, weighted
    gan = -(3 * 0.5 + 3 * -0.25) / 2  # -mean D(x_hat), D sums channels
    weighted_gan = 0.1 * 1.0 * gan
    expected = {
        "reconstruction_loss": reconstruction,
        "perceptual_loss": perceptual,
        "kl_loss": kl,
        "gan_loss": gan,
        "weighted_gan_loss": weighted_gan,
        "discriminator_factor": 1.0,
        "d_weight": 0.1,
        "total_loss": reconstruction + perceptual + kl + weighted_gan,
    }
    assert loss.item() == pytest.approx(expected["total_loss"])
    assert set(logs) == GENERATOR_KEYS
    for name, value in expected.items():
        assert logs[name].item() == pytest.approx(value), name


def test_discriminator_loss_is_hinge_loss_times_factor():
    loss_fn = make_loss(discriminator_factor=2.0)
    x, x_hat = images()
    x = torch.full_like(x, 1 / 6)  # real logits 0.5
    loss, logs = loss_fn(x, x_hat, None, gan_factor=loss_fn.factor(0), mode="discriminator")

    real_term = 1 - 0.5  # relu(1 - 0.5)
    fake_term = ((1 + 1.5) + (1 - 0.75)) / 2  # relu(1 + D(x_hat)) for logits 1.5 and -0.75
    expected = 2.0 * 0.5 * (real_term + fake_term)
    assert set(logs) == DISCRIMINATOR_KEYS
    assert loss.item() == pytest.approx(expected)
    assert logs["discriminator_loss"].item() == pytest.approx(expected)
    assert logs["logits_real"].item() == pytest.approx(0.5)
    assert logs["logits_fake"].item() == pytest.approx((1.5 - 0.75) / 2)
    assert logs["lecam_loss"].item() == 0.0


def test_gan_terms_are_off_before_discriminator_start():
    loss_fn = make_loss(discriminator_start=10)
    x, x_hat = images()
    posterior = StubPosterior(torch.zeros(2))

    before, logs_before = loss_fn(x, x_hat, posterior, gan_factor=loss_fn.factor(9))
    assert logs_before["discriminator_factor"].item() == 0.0
    assert logs_before["gan_loss"].item() == 0.0
    assert logs_before["weighted_gan_loss"].item() == 0.0
    d_loss_before, _ = loss_fn(x, x_hat, None, gan_factor=loss_fn.factor(9), mode="discriminator")
    assert d_loss_before.item() == 0.0

    after, logs_after = loss_fn(x, x_hat, posterior, gan_factor=loss_fn.factor(10))
    assert logs_after["discriminator_factor"].item() == 1.0
    assert logs_after["gan_loss"].item() == pytest.approx(-0.375)
    assert (after - before).item() == pytest.approx(0.1 * -0.375)
    d_loss_after, _ = loss_fn(x, x_hat, None, gan_factor=loss_fn.factor(10), mode="discriminator")
    assert d_loss_after.item() > 0.0


def test_lecam_regularization_uses_and_updates_logit_emas():
    assert not hasattr(make_loss(), "ema_real_logits_mean")  # default weight 0: no buffers
    loss_fn = make_loss(lecam_regularization_weight=0.5, lecam_ema_decay=0.9)
    x, x_hat = images()
    x = torch.full_like(x, 1 / 6)  # mean real logit 0.5; mean fake logit 0.375
    _, logs = loss_fn(x, x_hat, None, gan_factor=loss_fn.factor(0), mode="discriminator")

    # EMAs start at 0: relu(0.5 - 0)^2 + relu(0 - 0.375)^2 = 0.25, times the weight.
    assert logs["lecam_loss"].item() == pytest.approx(0.5 * 0.25)
    assert logs["discriminator_loss"].item() == pytest.approx(0.5 * (0.5 + 1.375) + 0.125)
    assert loss_fn.ema_real_logits_mean.item() == pytest.approx(0.1 * 0.5)
    assert loss_fn.ema_fake_logits_mean.item() == pytest.approx(0.1 * 0.375)
    assert {"ema_real_logits_mean", "ema_fake_logits_mean"} <= set(loss_fn.state_dict())


def test_logvar_is_a_buffer_outside_the_optimizer():
    loss_fn = make_loss(logvar_init=0.5)
    assert "logvar" in dict(loss_fn.named_buffers())
    assert "logvar" not in dict(loss_fn.named_parameters())
    assert loss_fn.logvar.item() == 0.5


def test_generator_mode_gives_no_gradient_to_discriminator_parameters():
    torch.manual_seed(0)
    discriminator = batchnorm_discriminator()
    loss_fn = make_loss(discriminator=discriminator)
    bn = discriminator[1]
    running_mean_before = bn.running_mean.clone()
    x = torch.randn(2, 3, 8, 8)
    x_hat = torch.randn(2, 3, 8, 8, requires_grad=True)

    loss, _ = loss_fn(x, x_hat, StubPosterior(torch.zeros(2)), gan_factor=loss_fn.factor(0))
    loss.backward()

    assert all(p.grad is None for p in discriminator.parameters())
    assert all(p.requires_grad for p in discriminator.parameters())
    assert x_hat.grad is not None and x_hat.grad.abs().sum() > 0
    # D stays in train mode: batch statistics, running statistics updated as in the official code.
    assert not torch.equal(bn.running_mean, running_mean_before)
    assert bn.num_batches_tracked.item() == 1


def test_gan_gradient_to_reconstructions_matches_plain_discriminator_call():
    torch.manual_seed(0)
    discriminator = batchnorm_discriminator()
    x_hat = torch.randn(2, 3, 8, 8, requires_grad=True)
    (-discriminator(x_hat).mean()).backward()
    expected = x_hat.grad.clone()
    x_hat.grad = None

    loss_fn = make_loss(
        discriminator=discriminator,
        discriminator_weight=1.0,
        perceptual_weight=0.0,
        reconstruction_weight=0.0,
        kl_weight=0.0,
    )
    loss, _ = loss_fn(
        torch.zeros_like(x_hat), x_hat, StubPosterior(torch.zeros(2)), gan_factor=loss_fn.factor(0)
    )
    loss.backward()
    torch.testing.assert_close(x_hat.grad, expected)


def test_call_with_frozen_parameters_keeps_outputs_and_buffer_tensors():
    torch.manual_seed(0)
    module = batchnorm_discriminator().eval()
    running_var = module[1].running_var
    inputs = torch.randn(2, 3, 8, 8, requires_grad=True)

    output = call_with_frozen_parameters(module, inputs)

    torch.testing.assert_close(output, module(inputs))
    assert module[1].running_var is running_var
    output.sum().backward()
    assert inputs.grad is not None
    assert all(p.grad is None for p in module.parameters())


def test_discriminator_mode_gives_no_gradient_to_reconstructions():
    torch.manual_seed(0)
    discriminator = batchnorm_discriminator()
    loss_fn = make_loss(discriminator=discriminator)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    x_hat = torch.randn(2, 3, 8, 8, requires_grad=True)

    loss, _ = loss_fn(x, x_hat, None, gan_factor=loss_fn.factor(0), mode="discriminator")
    loss.backward()

    assert x_hat.grad is None
    assert x.grad is None
    assert all(p.grad is not None for p in discriminator.parameters())


@pytest.mark.parametrize("mode", ["generator", "discriminator"])
def test_losses_are_float32_for_bfloat16_inputs_and_under_autocast(mode):
    torch.manual_seed(0)
    loss_fn = make_loss(discriminator=batchnorm_discriminator().eval())
    x, x_hat = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    posterior = StubPosterior(torch.tensor([1.0, 3.0], dtype=torch.bfloat16))

    reference, _ = loss_fn(x, x_hat, posterior, gan_factor=loss_fn.factor(0), mode=mode)
    from_bf16, logs = loss_fn(
        x.bfloat16(), x_hat.bfloat16(), posterior, gan_factor=loss_fn.factor(0), mode=mode
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast, _ = loss_fn(x, x_hat, posterior, gan_factor=loss_fn.factor(0), mode=mode)

    assert from_bf16.dtype == torch.float32
    assert all(value.dtype == torch.float32 for value in logs.values())
    assert under_autocast.dtype == torch.float32
    assert torch.equal(under_autocast, reference)  # autocast had no effect inside


class ConvPerceptual(nn.Module):
    """Stub perceptual distance through a convolution: mean |conv(x) - conv(y)| per sample -> [B]."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x, y):
        return (self.conv(x) - self.conv(y)).abs().mean(dim=(1, 2, 3))


@pytest.mark.parametrize("mode", ["generator", "discriminator"])
def test_autocast_networks_runs_the_networks_in_bfloat16_and_the_loss_in_float32(mode):
    torch.manual_seed(0)
    loss_fn = make_loss(
        discriminator=batchnorm_discriminator().eval(), perceptual=ConvPerceptual(), autocast_networks=True
    )
    convolution_dtypes = []
    for module in loss_fn.modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_hook(lambda _, __, output: convolution_dtypes.append(output.dtype))
    x, x_hat = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    posterior = StubPosterior(torch.tensor([1.0, 3.0]))

    reference, _ = loss_fn(x, x_hat, posterior, gan_factor=loss_fn.factor(0), mode=mode)
    assert set(convolution_dtypes) == {torch.float32}  # no autocast around the call: float32
    convolution_dtypes.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, logs = loss_fn(x, x_hat, posterior, gan_factor=loss_fn.factor(0), mode=mode)

    assert set(convolution_dtypes) == {torch.bfloat16}
    assert loss.dtype == torch.float32
    assert all(value.dtype == torch.float32 for value in logs.values())
    assert not torch.equal(loss, reference)
    torch.testing.assert_close(loss, reference, rtol=3e-2, atol=1e-3)


def test_a_compiled_loss_is_traced_once_while_the_gan_factor_holds():
    loss_fn = make_loss(discriminator_start=2)
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(loss_fn, backend=counter)
    x, x_hat = images()
    posterior = StubPosterior(torch.zeros(2))
    for step in range(4):  # factor 0, 0, then 1, 1: one trace per value, none per step
        compiled(x, x_hat, posterior, gan_factor=loss_fn.factor(step))
    assert counter.frame_count == 2


def test_invalid_options_raise():
    with pytest.raises(ValueError, match="l1"):
        make_loss(reconstruction_loss="l3")
    x, x_hat = images()
    with pytest.raises(ValueError, match="discriminator"):
        make_loss()(x, x_hat, None, gan_factor=1.0, mode="critic")


def test_alignment_loss_is_minus_one_for_identical_features():
    z = torch.randn(2, 5, 8)
    assert alignment_loss([z], [z.clone()]).item() == pytest.approx(-1.0)
    assert alignment_loss([z], [3 * z]).item() == pytest.approx(-1.0)  # scale invariant


def test_alignment_loss_is_zero_for_orthogonal_features():
    z = torch.zeros(2, 5, 4)
    z_tilde = torch.zeros(2, 5, 4)
    z[..., 0], z_tilde[..., 1] = 1.0, 2.0
    assert alignment_loss([z], [z_tilde]).item() == pytest.approx(0.0)


def test_alignment_loss_averages_tokens_batch_and_encoders():
    torch.manual_seed(0)
    z_a, z_tilde_a = torch.randn(3, 4, 8), torch.randn(3, 4, 8)
    z_b = torch.randn(3, 6, 16)  # second encoder with another dim and token count
    loss = alignment_loss([z_a, z_b], [z_tilde_a, -z_b])

    encoder_a = -F.cosine_similarity(z_a, z_tilde_a, dim=-1).mean()
    encoder_b = 1.0  # opposite features
    assert loss.item() == pytest.approx(((encoder_a + encoder_b) / 2).item(), abs=1e-6)
    with pytest.raises(ValueError):
        alignment_loss([z_a, z_b], [z_tilde_a])


def test_alignment_loss_is_float32_for_bfloat16_features():
    torch.manual_seed(0)
    z, z_tilde = torch.randn(2, 16, 32), torch.randn(2, 16, 32, requires_grad=True)
    loss = alignment_loss([z.bfloat16()], [z_tilde.bfloat16()])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_autocast = alignment_loss([z], [z_tilde])

    assert loss.dtype == torch.float32
    assert loss_autocast.dtype == torch.float32
    assert loss.item() == pytest.approx(alignment_loss([z], [z_tilde]).item(), abs=1e-2)
    loss_autocast.backward()
    assert torch.isfinite(z_tilde.grad).all()
