"""Time one update of the SiT's EMA in the forms the training step could use, on one GPU:

    python scripts/bench/ema.py --sit SiT-XL/2

- ``per_tensor_lerp`` (``EMAUpdate(ema, sit)(decay, where=finite)``, the GPU-side skip path
  uncompiled): the weight is a device tensor, 0 on a skipped step, for which ``_foreach_lerp_`` has
  no fast path, so it launches one lerp kernel per tensor;
- ``per_tensor_lerp_lists_built_each_call`` (``update_ema(ema, sit, decay, where=finite)``): the
  same, with the tensor lists built by walking both modules at every call, as the step did before;
- ``python_weight`` (``EMAUpdate(ema, sit)(decay)``, the host-side path): one fused
  ``_foreach_lerp_`` with a Python weight; the floor, but it cannot skip a step without the host
  reading the finiteness flag;
- ``compiled_foreach`` (``EMAUpdate(ema, sit, compile=True)(decay, where=finite)``, the GPU-side
  skip path under ``model.compile``): foreach ops under ``torch.compile``, which fuses them into a
  few kernels; the seconds its first call took to compile are reported.

For each: the GPU milliseconds of one update (CUDA events around updates queued while the GPU
sleeps, so the host's launch time is not counted), the host milliseconds to queue one (what delays
the next step's launches) and the largest difference to ``per_tensor_lerp``'s EMA after one update.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn as nn

from repae.benchmarking import gpu_ms, host_ms, report
from repae.modules.ema import EMAUpdate, make_ema, update_ema
from repae.modules.sit import SIT_MODEL_NAMES, build_sit

DECAY = 0.9999


def device_weighted(compile: bool):
    """The GPU-side skip path: an ``EMAUpdate`` made once, weighted by the finiteness flag."""

    def make(ema: nn.Module, model: nn.Module):
        update = EMAUpdate(ema, model, compile=compile)
        return lambda finite: update(DECAY, where=finite)

    return make


def python_weight(ema: nn.Module, model: nn.Module):
    update = EMAUpdate(ema, model)
    return lambda finite: update(DECAY)


def lists_built_each_call(ema: nn.Module, model: nn.Module):
    return lambda finite: update_ema(ema, model, DECAY, where=finite)


# Each form, given the EMA and the model, returns one update as a function of the finiteness flag.
FORMS = {
    "per_tensor_lerp": device_weighted(compile=False),
    "per_tensor_lerp_lists_built_each_call": lists_built_each_call,
    "python_weight": python_weight,
    "compiled_foreach": device_weighted(compile=True),
}


def averaged_tensors(ema: nn.Module, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The EMA's and the model's tensors that an ``EMAUpdate`` averages."""
    update = EMAUpdate(ema, model)
    return update.ema_tensors, update.model_tensors


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
    results = {"sit": args.sit, "forms": {}}
    reference = None
    for name, make_form in FORMS.items():
        ema = make_ema(model)
        ema_tensors = averaged_tensors(ema, model)[0]
        results["tensors"] = len(ema_tensors)
        torch._foreach_mul_(ema_tensors, 0.5)  # the update must move every tensor
        update = make_form(ema, model)
        start = time.perf_counter()
        update(finite)
        torch.cuda.synchronize()
        first_call_s = time.perf_counter() - start
        if reference is None:
            reference = [t.clone() for t in ema_tensors]
        difference = max((a - b).abs().max().item() for a, b in zip(ema_tensors, reference, strict=True))

        def one_update(update=update) -> None:
            update(finite)

        results["forms"][name] = {
            "gpu_ms": gpu_ms(one_update),
            "host_ms": host_ms(one_update),
            "first_call_s": first_call_s,
            "max_abs_difference_after_one_update": difference,
        }
        print(name, results["forms"][name], flush=True)
    report(results, args.output)


if __name__ == "__main__":
    main()
