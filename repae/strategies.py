"""``trainer=fsdp``: the SiT and its EMA sharded with FSDP2, everything else data-parallel.

The SiT (with its EMA and AdamW states) is the largest state in REPA-E and the one that grows
when users scale it; the VAE, the discriminator and the frozen encoders are small. So this
strategy is Lightning's DDP strategy with one change: before DDP wraps the LightningModule, the
submodules named in ``sharded_modules`` are sharded with ``torch.distributed.fsdp.fully_shard``
(each element of their ``blocks`` list its own unit, all-gathered just before it runs and freed
after; the rest of the module one more unit) and DDP is told to ignore their parameters and
buffers. FSDP reduce-scatters (averages) the SiT's gradients; DDP all-reduces the VAE's and the
discriminator's, exactly as with ``trainer=ddp``.

Checkpoints are the same single files as with DDP or one device (full tensors gathered on rank 0,
optimizer states in ``torch.optim.Optimizer.state_dict`` layout), so a run can resume on another
number of GPUs or another strategy.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_warn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

FULL_ON_RANK_ZERO = StateDictOptions(full_state_dict=True, cpu_offload=True)
# FSDP warns each time the SiT returns a view (its projector outputs are): an in-place change of
# one would skip FSDP's backward hook. Nothing changes the SiT's outputs in place.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(\w+\) returned a view tensor")


# Entry points besides ``forward`` that run the module (the samplers call ``SiT.inference``); FSDP
# must gather the parameters for them too.
FORWARD_METHODS = ("inference",)


def shard_module(module: nn.Module, mesh: Any, reshard_after_forward: bool = True) -> None:
    """FSDP2-shard ``module`` in place: one unit per element of ``module.blocks``, then the rest.

    A module that never trains (the EMA) always frees its gathered parameters after a forward:
    with no backward to free them it would stay gathered, holding a full copy in memory and
    breaking the shard-by-shard EMA update."""
    if not any(p.requires_grad for p in module.parameters()):
        reshard_after_forward = True
    for block in getattr(module, "blocks", []):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(module, mesh=mesh, reshard_after_forward=reshard_after_forward)
    for method in FORWARD_METHODS:
        if hasattr(module, method):
            register_fsdp_forward_method(module, method)


class ShardedSiTStrategy(DDPStrategy):
    """DDP with the submodules ``sharded_modules`` of the LightningModule sharded by FSDP2.

    Args:
        sharded_modules: attribute names of the LightningModule to shard (default: the SiT and its EMA,
            which must be sharded alike so the EMA update is a shard-by-shard lerp).
        reshard_after_forward: free each unit's gathered parameters after its forward (ZeRO-3-like,
            least memory); False keeps them until the backward (ZeRO-2-like, one all-gather less).
        **ddp_kwargs: ``DDPStrategy`` arguments for the replicated rest (``find_unused_parameters``,
            ``process_group_backend``, ...).
    """

    def __init__(
        self,
        sharded_modules: Sequence[str] = ("sit", "ema"),
        reshard_after_forward: bool = True,
        **ddp_kwargs: Any,
    ):
        super().__init__(**ddp_kwargs)
        self.sharded_modules = tuple(sharded_modules)
        self.reshard_after_forward = reshard_after_forward

    def check_model(self, module: nn.Module) -> None:
        """Raise ``ValueError`` if this strategy cannot shard ``module`` as configured. ``repae.train``
        calls it before ``fit`` starts the other ranks, so a wrong config fails in the launching
        process alone, in a second instead of after every rank has started."""
        if getattr(self.precision_plugin, "precision", None) == "16-mixed":
            raise ValueError(
                "trainer=fsdp supports trainer.precision=bf16-mixed or 32-true, not 16-mixed: the loss "
                "scalers would decide to skip steps from each rank's own gradient shard"
            )
        missing = [
            name for name in self.sharded_modules if not isinstance(getattr(module, name, None), nn.Module)
        ]
        if missing:
            raise ValueError(f"trainer.strategy.sharded_modules names no submodule of the model: {missing}")
        if len({"sit", "ema"} & set(self.sharded_modules)) == 1:
            raise ValueError(
                "trainer.strategy.sharded_modules must name sit and ema together: the EMA is averaged "
                "shard by shard, so it must be sharded exactly like the SiT"
            )

    def configure_ddp(self) -> None:
        module = self.lightning_module
        self.check_model(module)
        if getattr(module, "compile_models", False):
            rank_zero_warn("model.compile=true with trainer=fsdp has not been verified (docs/distributed.md)")
        mesh = init_device_mesh(self.root_device.type, (self.world_size,))
        for name in self.sharded_modules:
            shard_module(getattr(module, name), mesh, self.reshard_after_forward)
        prefixes = tuple(f"{name}." for name in self.sharded_modules)
        sharded = [
            name
            for name, _ in [*module.named_parameters(), *module.named_buffers()]
            if name.startswith(prefixes)
        ]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, sharded)
        if any(p.requires_grad for name, p in module.named_parameters() if not name.startswith(prefixes)):
            super().configure_ddp()
        # else (LDM-only: the SiT is all that trains) there is nothing left for DDP to synchronise.

    # --- checkpoints: full tensors on rank 0, in the layout every other strategy writes ---------
    def lightning_module_state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.lightning_module, options=FULL_ON_RANK_ZERO)

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        # Optimizer.state_dict plus a gather of the sharded tensors. (torch's get_optimizer_state_dict
        # would also do, but it runs a fake step on an optimizer without state, e.g. when a checkpoint
        # is written before the first step, which changes the next real AdamW update.)
        optimizer = optimizer.optimizer if isinstance(optimizer, LightningOptimizer) else optimizer
        state = optimizer.state_dict()
        # Every rank takes part in each gather, in the same order.
        gathered = {
            index: {
                key: value.full_tensor().cpu() if isinstance(value, DTensor) else value
                for key, value in s.items()
            }
            for index, s in state["state"].items()
        }
        return {**state, "state": gathered} if self.is_global_zero else {}

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"], strict=True):
            params = [param for group in optimizer.param_groups for param in group["params"]]
            if len(params) != sum(len(group["params"]) for group in state["param_groups"]):
                raise ValueError("the checkpoint's optimizer state does not match the model's parameters")
            sharded = {
                index: {key: _shard_like(value, params[index]) for key, value in s.items()}
                for index, s in state["state"].items()
            }
            optimizer.load_state_dict({**state, "state": sharded})


def _shard_like(value: Any, param: torch.Tensor) -> Any:
    """A full optimizer-state tensor of ``param``'s shape, sharded like ``param`` if it is sharded
    (every rank holds the full tensor, so no communication)."""
    if isinstance(param, DTensor) and isinstance(value, torch.Tensor) and value.shape == param.shape:
        return distribute_tensor(
            value.to(param.device), param.device_mesh, param.placements, src_data_rank=None
        )
    return value
