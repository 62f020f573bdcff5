"""Exponential moving average of a model's parameters and floating-point buffers."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor


def make_ema(model: nn.Module) -> nn.Module:
    """A frozen deep copy of ``model`` in eval mode, to be updated with ``update_ema``."""
    ema = copy.deepcopy(model).eval()
    ema.requires_grad_(False)
    return ema


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of an FSDP-sharded tensor (the EMA and the model are sharded alike); a
    plain tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def tensor_pairs(ema: nn.Module, model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(EMA tensor, model tensor) for every parameter and buffer, in module order: this rank's
    shards (``local_shard``), the model's detached. Checks that the two modules match."""
    ema_named = [*ema.named_parameters(), *ema.named_buffers()]
    model_named = [*model.named_parameters(), *model.named_buffers()]
    ema_names, model_names = [n for n, _ in ema_named], [n for n, _ in model_named]
    if ema_names != model_names:
        raise ValueError(
            f"EMA and model differ: only the EMA has {sorted(set(ema_names) - set(model_names))}, "
            f"only the model {sorted(set(model_names) - set(ema_names))} (or their order differs)"
        )
    pairs = []
    for (name, ema_t), (_, model_t) in zip(ema_named, model_named, strict=True):
        if isinstance(ema_t, DTensor) != isinstance(model_t, DTensor):
            raise ValueError(f"{name}: the EMA and the model must be sharded alike (both or neither)")
        pairs.append((local_shard(ema_t), local_shard(model_t.detach())))
    return pairs


def lerp_towards(
    ema_tensors: list[torch.Tensor], model_tensors: list[torch.Tensor], weight: torch.Tensor
) -> None:
    """ema += weight * (model - ema) for every pair, ``weight`` a scalar tensor: foreach ops, which
    torch.compile fuses into a few kernels without the differences eager mode would allocate."""
    torch._foreach_add_(
        ema_tensors, torch._foreach_mul(torch._foreach_sub(model_tensors, ema_tensors), weight)
    )


class EMAUpdate:
    """Updates ``ema`` towards ``model``: ema <- decay * ema + (1 - decay) * model, for parameters
    and floating-point buffers.

    As in the official ``update_ema``, floating-point buffers (the SiT's BatchNorm running mean and
    variance) are averaged too, so sampling and E2E-VAE latent statistics come from the EMA;
    integer buffers (``num_batches_tracked``) are copied. ``decay=0`` copies ``model`` exactly.

    The tensor lists are built once (``tensor_pairs``): building them walks both modules, host time
    that every step would pay. They stay valid while the
    modules keep their tensors (loading a state dict copies into them); after the modules are
    wrapped, sharded or moved, make a new ``EMAUpdate``.

    ``compile``: on the device-decided path (``where``), one compiled foreach update (a few fused
    kernels) instead of one lerp kernel per tensor.
    """

    def __init__(self, ema: nn.Module, model: nn.Module, compile: bool = False):
        pairs = tensor_pairs(ema, model)
        averaged = [(e, m) for e, m in pairs if e.is_floating_point()]
        self.ema_tensors = [e for e, _ in averaged]
        self.model_tensors = [m for _, m in averaged]
        self.model_dtype_differs = any(e.dtype != m.dtype for e, m in averaged)
        self.dtypes = [e.dtype for e in self.ema_tensors]
        copied = [(e, m) for e, m in pairs if not e.is_floating_point()]
        self.copied_ema_tensors = [e for e, _ in copied]
        self.copied_model_tensors = [m for _, m in copied]
        self.compiled_lerp_towards = torch.compile(lerp_towards, dynamic=False) if compile else None

    @torch.no_grad()
    def __call__(self, decay: float, where: torch.Tensor | None = None) -> None:
        """One update. ``where``: a bool scalar tensor; False leaves the EMA as it is. Decided on
        the device, so the host never waits to read it; uncompiled, at the cost of one lerp kernel
        per tensor instead of one fused kernel. Integer buffers are copied either way (the caller
        restores the model's on a skip)."""
        if self.copied_ema_tensors:
            torch._foreach_copy_(self.copied_ema_tensors, self.copied_model_tensors)
        ema_tensors, model_tensors = self.ema_tensors, self.model_tensors
        if self.model_dtype_differs:
            model_tensors = [m.to(e.dtype) for e, m in zip(ema_tensors, model_tensors, strict=True)]
        if where is not None and self.compiled_lerp_towards is not None:
            self.compiled_lerp_towards(ema_tensors, model_tensors, where * (1.0 - decay))
        elif where is not None:
            weights = {dtype: (where * (1.0 - decay)).to(dtype) for dtype in set(self.dtypes)}
            torch._foreach_lerp_(ema_tensors, model_tensors, [weights[dtype] for dtype in self.dtypes])
        elif decay == 0:
            torch._foreach_copy_(ema_tensors, model_tensors)
        else:
            torch._foreach_lerp_(ema_tensors, model_tensors, 1.0 - decay)


def update_ema(ema: nn.Module, model: nn.Module, decay: float, where: torch.Tensor | None = None) -> None:
    """One ``EMAUpdate`` of ``ema`` towards ``model`` (the official ``update_ema``), for a single
    update; updating every step, keep an ``EMAUpdate``."""
    EMAUpdate(ema, model)(decay, where)
