"""Fault injection shared by the in-process reliability tests and tests/fault_runner.py."""

from __future__ import annotations

from collections.abc import Callable

from repae.modules.losses import VAERegularizationLoss


def nan_vae_loss_methods(poisoned: Callable[[int], bool]) -> dict[str, Callable]:
    """Replacements for ``VAERegularizationLoss.factor`` and ``.forward`` that make the generator
    loss NaN in the 1-based steps for which ``poisoned(step)`` holds.

    The loss sees the step only through its GAN factor, so ``factor`` remembers it for ``forward``.
    """
    original_factor, original_forward = VAERegularizationLoss.factor, VAERegularizationLoss.forward

    def factor(self, step):
        self.fault_step = step + 1  # ``step`` counts completed steps
        return original_factor(self, step)

    def forward(self, inputs, reconstructions, posterior, gan_factor, mode="generator"):
        loss, logs = original_forward(self, inputs, reconstructions, posterior, gan_factor, mode)
        return (loss * float("nan") if mode == "generator" and poisoned(self.fault_step) else loss), logs

    return {"factor": factor, "forward": forward}
