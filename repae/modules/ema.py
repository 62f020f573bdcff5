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
    pairs = []
    for (name, ema_t), (model_name, model_t) in zip(
        [*ema.named_parameters(), *ema.named_buffers()],
        [*model.named_parameters(), *model.named_buffers()],
        strict=True,
    ):
        assert name == model_name, f"EMA and model differ: {name} vs {model_name}"
        if isinstance(ema_t, DTensor) != isinstance(model_t, DTensor):
            raise ValueError(f"{name}: the EMA and the model must be sharded alike (both or neither)")
        pairs.append((local_shard(ema_t), local_shard(model_t.detach())))
    return pairs


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float, where: torch.Tensor | None = None) -> None:
    """ema <- decay * ema + (1 - decay) * model, for parameters and floating-point buffers.

    As in the official ``update_ema``, floating-point buffers (the SiT's BatchNorm running mean and
    variance) are averaged too, so sampling and E2E-VAE latent statistics come from the EMA;
    integer buffers (``num_batches_tracked``) are copied. ``decay=0`` copies ``model`` exactly.
    One fused ``_foreach_lerp_`` over all tensors instead of a Python loop of small kernels.

    ``where``: a bool scalar tensor; False leaves the EMA as it is. Decided on the device, so the
    host never waits to read it, at the cost of one lerp kernel per tensor instead of one fused
    kernel. Integer buffers are copied either way (the caller restores the model's on a skip).
    """
    ema_tensors, model_tensors = [], []
    for ema_t, model_t in tensor_pairs(ema, model):
        if ema_t.is_floating_point():
            ema_tensors.append(ema_t)
            model_tensors.append(model_t.to(ema_t.dtype))
        else:
            ema_t.copy_(model_t)
    if where is not None:
        weights = {dtype: (where * (1.0 - decay)).to(dtype) for dtype in {t.dtype for t in ema_tensors}}
        torch._foreach_lerp_(ema_tensors, model_tensors, [weights[t.dtype] for t in ema_tensors])
    elif decay == 0:
        torch._foreach_copy_(ema_tensors, model_tensors)
    else:
        torch._foreach_lerp_(ema_tensors, model_tensors, 1.0 - decay)
