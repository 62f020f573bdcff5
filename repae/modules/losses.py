"""REPA alignment loss and the VAE regularisation loss (L1 + perceptual + KL + hinge GAN) of REPA-E."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule

RECONSTRUCTION_LOSSES = ("l1", "l2")
LOSS_MODES = ("generator", "discriminator")


def alignment_loss(zs: list[torch.Tensor], zs_tilde: list[torch.Tensor]) -> torch.Tensor:
    """REPA projection loss: negative token-wise cosine similarity.

    Args:
        zs: target features, one [B, T, D_e] tensor per alignment encoder.
        zs_tilde: projected SiT features, same shapes as `zs`.

    Returns:
        A float32 scalar: -cos averaged over tokens, then batch, then encoders (in [-1, 1]).
    """
    if len(zs) == 0 or len(zs) != len(zs_tilde):
        raise ValueError(
            f"need one projection per encoder, got {len(zs)} targets and {len(zs_tilde)} projections"
        )
    # Normalising in fp16 produces NaNs (REPA issue #46): cast first and keep autocast out.
    with torch.autocast(device_type=zs_tilde[0].device.type, enabled=False):
        per_encoder = [
            -(F.normalize(z.float(), dim=-1) * F.normalize(z_tilde.float(), dim=-1)).sum(dim=-1).mean()
            for z, z_tilde in zip(zs, zs_tilde, strict=True)
        ]
    return torch.stack(per_encoder).mean()


def call_with_frozen_parameters(module: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """Calls `module` with detached parameters: gradients reach the inputs but not the parameters.

    Replaces the official code's toggling of `requires_grad`, which forces torch.compile recompiles
    and clashes with DDP. Buffers are passed as the module's own tensors, so a module in train mode
    still updates them (e.g. BatchNorm running statistics).

    An FSDP-sharded module gathers its own parameters inside its forward, so it cannot take
    substitutes: it is called as it is, and the caller must discard the parameter gradients this
    call produces (REPAE zeroes each optimizer's gradients before that optimizer's own backward).
    """
    if isinstance(module, FSDPModule):
        return module(*args, **kwargs)
    parameters_and_buffers = {name: p.detach() for name, p in module.named_parameters()}
    parameters_and_buffers.update(module.named_buffers())
    return torch.func.functional_call(module, parameters_and_buffers, args, kwargs)


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat))), a scalar."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def lecam_loss(
    logits_real_mean: torch.Tensor,
    logits_fake_mean: torch.Tensor,
    ema_real_logits_mean: torch.Tensor,
    ema_fake_logits_mean: torch.Tensor,
) -> torch.Tensor:
    """LeCam regulariser (Tseng et al. 2021) on mean logits against EMAs of the other side."""
    return (
        F.relu(logits_real_mean - ema_fake_logits_mean).square().mean()
        + F.relu(ema_real_logits_mean - logits_fake_mean).square().mean()
    )


class VAERegularizationLoss(nn.Module):
    """REPA-E's VAE regularisation loss (official `ReconstructionLoss_Single_Stage`, VAE mode).

    Defaults are those of `configs/l1_lpips_kl_gan.yaml`. Everything runs in float32 with autocast
    disabled, as in the official code, unless `autocast_networks` lets the perceptual network and
    the discriminator run under the caller's autocast (the loss arithmetic stays float32). The
    discriminator stays in whatever mode the caller sets; the official code never switches it to
    eval, so its BatchNorm uses batch statistics.

    Generator mode (the VAE update):
        L = w_rec * rec / exp(logvar) + w_perc * mean_b P(x, x_hat) + w_kl * sum_b KL_b / B
            + discriminator_weight * factor * (-mean D(x_hat))
    Discriminator mode (the D update, x_hat detached):
        L_D = factor * 0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat))) + w_lecam * LeCam
    with factor = discriminator_factor once step >= discriminator_start, else 0.

    Unlike the official code, the generator pass does not flip `requires_grad` on the discriminator
    (that breaks torch.compile and DDP); it calls D with detached parameters instead, which gives the
    same gradients.

    Args:
        discriminator: maps images [B, 3, H, W] to logits of any shape.
        perceptual: frozen distance, (x, x_hat) -> [B].
        logvar_init: initial value of the fixed (never optimised) `logvar` buffer.
        lecam_regularization_weight: LeCam weight; if > 0, EMAs of the mean real and fake logits are
            kept in buffers `ema_real_logits_mean`, `ema_fake_logits_mean` (decay `lecam_ema_decay`).
        autocast_networks: run the perceptual network and the discriminator in the autocast dtype
            the loss is called under (bf16 with bf16-mixed) instead of float32. Faster; differs
            from the official code, which runs them in float32.
    """

    def __init__(
        self,
        discriminator: nn.Module,
        perceptual: nn.Module,
        discriminator_start: int = 0,
        discriminator_factor: float = 1.0,
        discriminator_weight: float = 0.1,
        perceptual_weight: float = 1.0,
        reconstruction_loss: str = "l1",
        reconstruction_weight: float = 1.0,
        kl_weight: float = 1e-6,
        logvar_init: float = 0.0,
        lecam_regularization_weight: float = 0.0,
        lecam_ema_decay: float = 0.999,
        autocast_networks: bool = False,
    ):
        super().__init__()
        if reconstruction_loss not in RECONSTRUCTION_LOSSES:
            raise ValueError(
                f"reconstruction_loss must be one of {RECONSTRUCTION_LOSSES}, got {reconstruction_loss!r}"
            )
        self.discriminator = discriminator
        self.perceptual = perceptual
        self.discriminator_start = discriminator_start
        self.discriminator_factor = discriminator_factor
        self.discriminator_weight = discriminator_weight
        self.perceptual_weight = perceptual_weight
        self.reconstruction_loss = reconstruction_loss
        self.reconstruction_weight = reconstruction_weight
        self.kl_weight = kl_weight
        self.lecam_regularization_weight = lecam_regularization_weight
        self.lecam_ema_decay = lecam_ema_decay
        self.autocast_networks = autocast_networks
        # A buffer, not a parameter: the official logvar has requires_grad=False and must stay out
        # of the optimiser. Same state-dict key as the official module.
        self.register_buffer("logvar", torch.tensor(float(logvar_init)))
        if lecam_regularization_weight > 0.0:
            self.register_buffer("ema_real_logits_mean", torch.zeros(1))
            self.register_buffer("ema_fake_logits_mean", torch.zeros(1))

    def factor(self, step: int) -> float:
        """GAN factor at `step`: discriminator_factor once step >= discriminator_start, else 0."""
        return self.discriminator_factor if step >= self.discriminator_start else 0.0

    def forward(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        posterior: Any,
        gan_factor: float,
        mode: str = "generator",
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """
        Args:
            inputs: real images x, [B, 3, H, W] in [-1, 1].
            reconstructions: x_hat, [B, 3, H, W] in [-1, 1].
            posterior: the VAE posterior; only `posterior.kl()` -> [B] is used (generator mode).
            gan_factor: ``factor(step)``, the GAN terms' weight at this step. A float, not the step:
                torch.compile specialises on it, so a compiled loss traces once per value (twice a
                run) where an int step would be traced again at step 1.
            mode: "generator" or "discriminator".

        Returns:
            (loss, logs): a float32 scalar and detached float32 scalars for logging.
        """
        if mode not in LOSS_MODES:
            raise ValueError(f"mode must be one of {LOSS_MODES}, got {mode!r}")
        device_type = inputs.device.type
        network_dtype = None
        if self.autocast_networks and torch.is_autocast_enabled(device_type):
            network_dtype = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type=device_type, enabled=False):
            inputs = inputs.float()
            reconstructions = reconstructions.float()
            if mode == "generator":
                return self._generator_loss(inputs, reconstructions, posterior, gan_factor, network_dtype)
            return self._discriminator_loss(inputs, reconstructions, gan_factor, network_dtype)

    @staticmethod
    def _network_precision(device_type: str, dtype: torch.dtype | None):
        """The precision the perceptual network and the discriminator run in: autocast to
        ``dtype``, or float32 (autocast stays off) when ``dtype`` is None."""
        return torch.autocast(device_type=device_type, dtype=dtype) if dtype else nullcontext()

    def _generator_loss(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        posterior: Any,
        factor: float,
        network_dtype: torch.dtype | None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.reconstruction_loss == "l1":
            reconstruction_loss = F.l1_loss(reconstructions, inputs)
        else:
            reconstruction_loss = F.mse_loss(reconstructions, inputs)
        reconstruction_loss = self.reconstruction_weight * reconstruction_loss / torch.exp(self.logvar)

        with self._network_precision(inputs.device.type, network_dtype):
            perceptual = self.perceptual(inputs, reconstructions)
        perceptual_loss = self.perceptual_weight * perceptual.float().mean()

        kl = posterior.kl().float()
        kl_loss = self.kl_weight * kl.sum() / kl.shape[0]

        gan_loss = torch.zeros((), device=inputs.device)
        if factor > 0.0 and self.discriminator_weight > 0.0:
            with self._network_precision(inputs.device.type, network_dtype):
                logits_fake = call_with_frozen_parameters(self.discriminator, reconstructions)
            gan_loss = -logits_fake.float().mean()
        weighted_gan_loss = self.discriminator_weight * factor * gan_loss

        total_loss = reconstruction_loss + perceptual_loss + kl_loss + weighted_gan_loss
        logs = {
            "total_loss": total_loss,
            "reconstruction_loss": reconstruction_loss,
            "perceptual_loss": perceptual_loss,
            "kl_loss": kl_loss,
            "weighted_gan_loss": weighted_gan_loss,
            # new_full launches a fill kernel; torch.tensor(float, device=...) would wait for the GPU
            "discriminator_factor": inputs.new_full((), factor),
            "d_weight": inputs.new_full((), self.discriminator_weight),
            "gan_loss": gan_loss,
        }
        return total_loss, {name: value.detach().float() for name, value in logs.items()}

    def _discriminator_loss(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        factor: float,
        network_dtype: torch.dtype | None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # The official code also sets requires_grad on the real images, but never uses that
        # gradient (no gradient penalty), so it is skipped here.
        with self._network_precision(inputs.device.type, network_dtype):
            logits_real = self.discriminator(inputs.detach()).float()
            logits_fake = self.discriminator(reconstructions.detach()).float()
        discriminator_loss = factor * hinge_discriminator_loss(logits_real, logits_fake)

        regularization = torch.zeros((), device=inputs.device)
        if self.lecam_regularization_weight > 0.0:
            real_mean, fake_mean = logits_real.mean(), logits_fake.mean()
            regularization = self.lecam_regularization_weight * lecam_loss(
                real_mean, fake_mean, self.ema_real_logits_mean, self.ema_fake_logits_mean
            )
            # EMAs are updated after use (as in the official code), in place so the buffers persist.
            with torch.no_grad():
                self.ema_real_logits_mean.lerp_(real_mean.detach(), 1 - self.lecam_ema_decay)
                self.ema_fake_logits_mean.lerp_(fake_mean.detach(), 1 - self.lecam_ema_decay)
        discriminator_loss = discriminator_loss + regularization

        logs = {
            "discriminator_loss": discriminator_loss,
            "logits_real": logits_real.mean(),
            "logits_fake": logits_fake.mean(),
            "lecam_loss": regularization,
        }
        return discriminator_loss, {name: value.detach() for name, value in logs.items()}
