"""The optimizer step of a training step with several parameter sets: all of them or none.

REPA-E trains three parameter sets (SiT, VAE, discriminator), each with its own optimizer. Each
loss is backpropagated into its set as soon as it is formed (``JointStep.backward``), each set's
gradients are clipped to ``max_grad_norm`` by their own norm, and at the end of the training step
every optimizer steps, and the EMA is updated, only if every gradient is finite; otherwise none
of them is, so the models stay consistent, and the buffers the forward passes changed (BatchNorm
running statistics, LeCam EMAs) are restored. Too many skipped steps in a row stop the run.

The skip is decided in one of two places:

- on the device (``JointStep.skips_on_device``: every optimizer fused, no GradScaler, no
  FSDP-sharded parameter): each fused optimizer is handed the finiteness flag as ``found_inf``
  (as GradScaler hands it) and the clip divisor as ``grad_scale``, and skips its update in its own
  kernel; the EMA and the buffers take the flag as a weight. The host never waits for the GPU,
  and reads the count of consecutive skips only every ``max_consecutive_nonfinite`` steps.
- on the host otherwise: it reads the count of consecutive skips (the step's one wait for the
  GPU), then steps or restores.

Under 16-mixed each optimizer has a GradScaler of its own: a loss is scaled before its backward
and its gradients unscaled right after, so norms and clipping see the true gradients, and one
set's overflow does not change another set's scale between their steps.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor


def gradient_norm(params: list[nn.Parameter]) -> torch.Tensor:
    """The L2 norm of all of ``params``' gradients together. For FSDP-sharded parameters it is
    assembled from every rank's shard, so all ranks clip alike and agree on finiteness."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def clip_divisor(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """What to divide gradients of total norm ``norm`` by to clip them as
    ``torch.nn.utils.clip_grads_with_norm_`` does: 1 when the norm is within ``max_norm``."""
    return ((norm + 1e-6) / max_norm).clamp(min=1.0)


def torch_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer itself: Lightning's ``LightningOptimizer`` wraps it as ``optimizer``."""
    return getattr(optimizer, "optimizer", optimizer)


class JointStep:
    """Steps several optimizers together or not at all, one training step at a time:
    ``begin()``, ``backward(name, loss)`` once per parameter set, ``check_gradients()``, then
    ``step(number)``.

    Args:
        optimizers: name -> the optimizer of each parameter set, in step order. A wrapper whose
            ``step`` keeps books of its own (Lightning's ``LightningOptimizer``, whose steps Lightning
            counts) is stepped as given; the torch optimizer inside it (``torch_optimizer``) is the
            one the scalers unscale and fused AdamW's ``found_inf``/``grad_scale`` are set on.
        backward: backpropagates a loss (``torch.Tensor.backward``, Lightning's ``manual_backward``).
        ema_update: ``ema_update(where)`` after the optimizers' steps; ``where`` is None when the
            host knows the step is taken, else a bool scalar tensor: update only if True. None
            when there is no EMA (``vae_only``).
        step_buffers: the buffers the forward passes change; a skipped step restores them.
        nonfinite_steps: a long scalar tensor counting the skipped steps, incremented in place.
        max_grad_norm: each parameter set's gradients are clipped to this norm.
        max_consecutive_nonfinite: this many skipped steps in a row raise ``FloatingPointError``.
        scalers: one GradScaler per optimizer (16-mixed), or None.
    """

    def __init__(
        self,
        optimizers: Mapping[str, torch.optim.Optimizer],
        backward: Callable[[torch.Tensor], None],
        ema_update: Callable[[torch.Tensor | None], None] | None,
        step_buffers: Sequence[torch.Tensor],
        nonfinite_steps: torch.Tensor,
        max_grad_norm: float,
        max_consecutive_nonfinite: int,
        scalers: Sequence[torch.amp.GradScaler] | None = None,
    ):
        self.optimizers = dict(optimizers)
        self.parameters = {
            name: [p for group in torch_optimizer(optimizer).param_groups for p in group["params"]]
            for name, optimizer in self.optimizers.items()
        }
        self.scalers = dict(zip(self.optimizers, scalers, strict=True)) if scalers else {}
        self.run_backward = backward
        self.ema_update = ema_update or (lambda where: None)
        self.step_buffers = list(step_buffers)
        self.nonfinite_steps = nonfinite_steps
        self.consecutive_nonfinite = torch.zeros_like(nonfinite_steps)
        self.max_grad_norm = max_grad_norm
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        fused = all(torch_optimizer(o).param_groups[0].get("fused") for o in self.optimizers.values())
        sharded = any(isinstance(p, DTensor) for params in self.parameters.values() for p in params)
        self.skips_on_device = fused and not self.scalers and not sharded
        # This training step's state, from begin() to step().
        self.buffers_before: list[torch.Tensor] = []
        self.grad_norms: dict[str, torch.Tensor] = {}
        self.finite: torch.Tensor | None = None

    def begin(self) -> None:
        """Start a training step, before its forward passes: remember the step buffers."""
        self.buffers_before = [buffer.clone() for buffer in self.step_buffers]
        self.grad_norms = {}
        self.finite = None

    def backward(self, name: str, loss: torch.Tensor) -> None:
        """Backpropagate ``loss`` into parameter set ``name``, which takes this one loss a step,
        and record the norm of its (unscaled) gradients; ``step`` clips them with it."""
        optimizer, scaler = self.optimizers[name], self.scalers.get(name)
        optimizer.zero_grad(set_to_none=True)
        self.run_backward(scaler.scale(loss) if scaler else loss)
        if scaler:
            scaler.unscale_(torch_optimizer(optimizer))
        self.grad_norms[name] = gradient_norm(self.parameters[name])

    def check_gradients(self) -> dict[str, torch.Tensor]:
        """After the last backward: decide on the device whether every gradient is finite, and
        count the step in ``nonfinite_steps`` if not. Returns the logs: ``grad_norm_<name>``
        (before clipping) and ``nonfinite_steps`` (this step included)."""
        self.finite = torch.stack([norm.float() for norm in self.grad_norms.values()]).isfinite().all()
        self.nonfinite_steps += ~self.finite
        return {
            **{f"grad_norm_{name}": norm for name, norm in self.grad_norms.items()},
            "nonfinite_steps": self.nonfinite_steps.float(),
        }

    def step(self, number: int) -> None:
        """Step every optimizer and the EMA if ``check_gradients`` found every gradient finite;
        otherwise none of them, and restore the step buffers. ``number``: the 1-based number of
        this training step, which times the check of consecutive skips and is named by its error.
        Frees the gradients either way."""
        self.consecutive_nonfinite = (self.consecutive_nonfinite + 1) * ~self.finite
        if self.skips_on_device:
            self._step_on_device()
            if number % self.max_consecutive_nonfinite == 0:
                self._stop_if_too_many_in_a_row(int(self.consecutive_nonfinite), number)
        else:
            consecutive = int(self.consecutive_nonfinite)  # the step's one wait for the GPU
            self._step_on_host(taken=consecutive == 0)
            self._stop_if_too_many_in_a_row(consecutive, number)
        for name, optimizer in self.optimizers.items():
            optimizer.zero_grad(set_to_none=True)  # before the next step's passes allocate theirs
            if name in self.scalers:
                self.scalers[name].update()

    def _step_on_device(self) -> None:
        restored = [
            torch.where(self.finite, now, before)
            for now, before in zip(self.step_buffers, self.buffers_before, strict=True)
        ]
        torch._foreach_copy_(self.step_buffers, restored)
        found_inf = (~self.finite).float()
        for name, optimizer in self.optimizers.items():
            # Fused AdamW divides the gradients by grad_scale as it reads them (the hook GradScaler
            # uses), so clipping costs no pass over the gradients of its own.
            fused = torch_optimizer(optimizer)
            fused.found_inf = found_inf
            fused.grad_scale = clip_divisor(self.grad_norms[name], self.max_grad_norm)
            optimizer.step()
            del fused.found_inf, fused.grad_scale
        self.ema_update(self.finite)

    def _step_on_host(self, taken: bool) -> None:
        if taken:
            for name, optimizer in self.optimizers.items():
                torch.nn.utils.clip_grads_with_norm_(
                    self.parameters[name], self.max_grad_norm, self.grad_norms[name]
                )
                optimizer.step()
            self.ema_update(None)
        else:
            torch._foreach_copy_(self.step_buffers, self.buffers_before)

    def _stop_if_too_many_in_a_row(self, consecutive: int, number: int) -> None:
        if consecutive >= self.max_consecutive_nonfinite:
            raise FloatingPointError(
                f"{consecutive} consecutive steps with non-finite losses or gradients "
                f"(last at step {number}); stopping. Resume from the last checkpoint, "
                "e.g. with a lower learning rate or bf16 instead of 16-mixed precision."
            )
