"""Time one update of the SiT's EMA in the forms the training step could use, on one GPU:

    python scripts/benchmark_ema.py --sit SiT-XL/2

- ``per_tensor_lerp`` (what ``update_ema(..., where=finite)`` runs on the GPU-side skip path): the
  weight is a device tensor, 0 on a skipped step, for which ``_foreach_lerp_`` has no fast path, so
  it launches one lerp kernel per tensor;
- ``python_weight`` (``update_ema`` without ``where``, the host-side path): one fused
  ``_foreach_lerp_`` with a Python weight; the floor, but it cannot skip a step without the host
  reading the finiteness flag;
- ``compiled_foreach``: ``ema += w * (model - ema)`` as foreach ops under ``torch.compile``, which
  fuses them into a few kernels; the seconds its first call took to compile are reported.

For each: the GPU milliseconds of one update (CUDA events), the host milliseconds to queue one
(what delays the next step's launches; the step's profile shows the GPU idle ~2.3 ms at each step
start) and the largest difference to ``per_tensor_lerp``'s EMA.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn as nn
from benchmark import report
from benchmark_convolutions import time_ms

from repae.modules.ema import make_ema, tensor_pairs, update_ema
from repae.modules.sit import SIT_MODEL_NAMES, build_sit

DECAY = 0.9999


def lerp_towards(
    ema_tensors: list[torch.Tensor], model_tensors: list[torch.Tensor], weight: torch.Tensor
) -> None:
    torch._foreach_add_(
        ema_tensors, torch._foreach_mul(torch._foreach_sub(model_tensors, ema_tensors), weight)
    )


compiled_lerp_towards = torch.compile(lerp_towards, dynamic=False)


def averaged_tensors(ema: nn.Module, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The EMA's and the model's tensors that ``update_ema`` averages (the floating-point ones),
    selected as it selects them."""
    pairs = [(e, m) for e, m in tensor_pairs(ema, model) if e.is_floating_point()]
    return [e for e, _ in pairs], [m for _, m in pairs]


def compiled_foreach(ema: nn.Module, model: nn.Module, finite: torch.Tensor) -> None:
    compiled_lerp_towards(*averaged_tensors(ema, model), finite * (1.0 - DECAY))


FORMS = {
    "per_tensor_lerp": lambda ema, model, finite: update_ema(ema, model, DECAY, where=finite),
    "python_weight": lambda ema, model, finite: update_ema(ema, model, DECAY),
    "compiled_foreach": compiled_foreach,
}


def host_ms(function, repeats: int = 10) -> float:
    """Mean milliseconds the host spends in ``function()`` when the GPU keeps up (not synchronised
    inside the timed calls)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return 1e3 * elapsed / repeats


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sit", default="SiT-XL/2", choices=SIT_MODEL_NAMES, help="SiT (default: SiT-XL/2)")
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = build_sit(args.sit, in_channels=4, input_size=32, z_dims=[768]).cuda()
    finite = torch.tensor(True, device="cuda")
    results = {"device": torch.cuda.get_device_name(), "sit": args.sit, "forms": {}}
    reference = None
    for name, form in FORMS.items():
        ema = make_ema(model)
        ema_tensors = averaged_tensors(ema, model)[0]
        results["tensors"] = len(ema_tensors)
        torch._foreach_mul_(ema_tensors, 0.5)  # the update must move every tensor
        start = time.perf_counter()
        form(ema, model, finite)
        torch.cuda.synchronize()
        first_call_s = time.perf_counter() - start
        if reference is None:
            reference = ema_tensors
        difference = max((a - b).abs().max().item() for a, b in zip(ema_tensors, reference, strict=True))

        def update(form=form, ema=ema) -> None:
            form(ema, model, finite)

        results["forms"][name] = {
            "gpu_ms": time_ms(update),
            "host_ms": host_ms(update),
            "first_call_s": first_call_s,
            "max_abs_difference_after_one_update": difference,
        }
        print(name, results["forms"][name], flush=True)
    report(results, args.output)


if __name__ == "__main__":
    main()
