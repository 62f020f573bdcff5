"""Time the SiT's optimizer pass on one GPU, AdamW and then the EMA, as today and as candidates
that do both in one compiled pass (docs/performance.md, the LDM-only step's next levers):

    python scripts/bench/optimizer.py --sit SiT-XL/1 --output optimizer.json

The gradients are clipped by their norm and the step is skipped on the device when one is not
finite, as ``JointStep`` does with fused optimizers (the gradient norm itself, the same in every
form, is not timed). Forms:

- ``fused_adamw_then_ema`` (today, ``model.compile=true model.optimizer.fused=true``): torch's fused
  AdamW, handed the clip divisor as ``grad_scale`` and the finiteness flag as ``found_inf``, then
  ``EMAUpdate(compile=True)(decay, where=finite)``. AdamW reads and writes the weights, gradients
  (it writes them back unscaled) and both moments; the EMA reads the weights again.
- ``one_pass_foreach``: ``adamw_ema_foreach`` under ``torch.compile``: the same update in foreach
  ops, one region, so the EMA can be fused into AdamW's pass (the weights read once, the gradients
  not written back).
- ``one_pass_per_tensor``: ``adamw_ema_per_tensor`` under ``torch.compile``: the same per tensor,
  one fused kernel a tensor.
- ``one_pass_per_tensor_bf16_copy``: that, also writing a bf16 copy of each weight, which the
  forward could read instead of casting the weights (the casts saved are not in this pass).

The candidates average the parameters; the BatchNorm buffers' EMA (a few numbers) is left out of
them. For each form: after three passes from the same state (the second one skipped, its gradients
holding a NaN), the largest difference of the weights, moments and EMA to the first form's, as a
fraction of the largest change the first form made to that tensor (rounding gives ~1e-3 or less,
a wrong formula or skip more: the tests take 1e-2 as the line), and the seconds those three passes
took (compilation included); then the GPU milliseconds of one pass and the host milliseconds to
queue one, timed with a clip divisor of 1 (the bytes moved are the same, and the gradients fused
AdamW writes back keep their values from pass to pass). One form's state is alive at a time and
the reference is kept on the host: for an XL SiT, its weights, four sets of gradients and one form's
moments and EMA, ~20 GiB of GPU memory, plus what a compiled form allocates for itself.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn

from repae.benchmarking import gpu_ms, host_ms, report
from repae.modules.ema import EMAUpdate, make_ema
from repae.modules.sit import SIT_MODEL_NAMES, build_sit
from repae.optim_step import clip_divisor

# The SiT optimizer of conf/model/repae.yaml, the LDM-only experiment's EMA decay.
LR, BETA1, BETA2, EPS, WEIGHT_DECAY, DECAY, MAX_GRAD_NORM = 1e-4, 0.9, 0.999, 1e-8, 0.0, 0.9999, 1.0


def adamw_ema_foreach(params, grads, exp_avgs, exp_avg_sqs, ema, step, finite, divisor, copies=None):
    """One AdamW step of ``params`` (gradients ``grads`` divided by ``divisor``), then the EMA
    towards the new weights, all with foreach ops; if ``finite`` (a bool scalar tensor) is False,
    nothing changes, ``step`` (a float scalar tensor, AdamW's step count) included. ``copies``: bf16
    tensors that receive the new weights."""
    new_step = step + 1
    step_size = LR / (1 - BETA1**new_step)
    bias_correction2_sqrt = (1 - BETA2**new_step).sqrt()
    grads = torch._foreach_div(grads, divisor)
    new_exp_avgs = torch._foreach_lerp(exp_avgs, grads, 1 - BETA1)
    new_exp_avg_sqs = torch._foreach_addcmul(torch._foreach_mul(exp_avg_sqs, BETA2), grads, grads, 1 - BETA2)
    denominators = torch._foreach_add(
        torch._foreach_div(torch._foreach_sqrt(new_exp_avg_sqs), bias_correction2_sqrt), EPS
    )
    updates = torch._foreach_mul(torch._foreach_div(new_exp_avgs, denominators), step_size)
    new_params = torch._foreach_sub(torch._foreach_mul(params, 1 - LR * WEIGHT_DECAY), updates)
    new_ema = torch._foreach_add(ema, torch._foreach_mul(torch._foreach_sub(new_params, ema), 1 - DECAY))

    def kept(new, old):
        return [torch.where(finite, n, o) for n, o in zip(new, old, strict=True)]

    for olds, news in (
        (params, new_params),
        (exp_avgs, new_exp_avgs),
        (exp_avg_sqs, new_exp_avg_sqs),
        (ema, new_ema),
    ):
        torch._foreach_copy_(olds, kept(news, olds))
    if copies is not None:
        torch._foreach_copy_(copies, params)
    step.copy_(torch.where(finite, new_step, step))


def adamw_ema_per_tensor(params, grads, exp_avgs, exp_avg_sqs, ema, step, finite, divisor, copies=None):
    """``adamw_ema_foreach``, tensor by tensor."""
    new_step = step + 1
    step_size = LR / (1 - BETA1**new_step)
    bias_correction2_sqrt = (1 - BETA2**new_step).sqrt()
    for i, (p, g, m, v, e) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, ema, strict=True)):
        g = g / divisor
        new_m = m.lerp(g, 1 - BETA1)
        new_v = v * BETA2 + (1 - BETA2) * g * g
        new_p = p * (1 - LR * WEIGHT_DECAY) - step_size * (
            new_m / (new_v.sqrt() / bias_correction2_sqrt + EPS)
        )
        new_e = e + (1 - DECAY) * (new_p - e)
        m.copy_(torch.where(finite, new_m, m))
        v.copy_(torch.where(finite, new_v, v))
        e.copy_(torch.where(finite, new_e, e))
        p.copy_(torch.where(finite, new_p, p))
        if copies is not None:
            copies[i].copy_(p)
    step.copy_(torch.where(finite, new_step, step))


def trainable(sit: nn.Module, ema: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """The SiT's trained parameters (not its fixed positional embedding) and the EMA's of each."""
    ema_params = dict(ema.named_parameters())
    named = [(name, p) for name, p in sit.named_parameters() if p.requires_grad]
    return [p for _, p in named], [ema_params[name] for name, _ in named]


class FusedAdamWThenEMA:
    """Today's pass: torch's fused AdamW with the clip divisor and finiteness flag, then the EMA."""

    def __init__(self, sit: nn.Module, ema: nn.Module, compile: bool):
        self.params, self.ema_params = trainable(sit, ema)
        self.optimizer = torch.optim.AdamW(
            self.params, lr=LR, betas=(BETA1, BETA2), eps=EPS, weight_decay=WEIGHT_DECAY, fused=True
        )
        self.ema_update = EMAUpdate(ema, sit, compile=compile)

    def __call__(self, grads, finite, divisor) -> None:
        for p, g in zip(self.params, grads, strict=True):
            p.grad = g
        self.optimizer.found_inf = (~finite).float()
        self.optimizer.grad_scale = divisor
        self.optimizer.step()
        self.ema_update(DECAY, where=finite)

    def tensors(self) -> dict[str, list[torch.Tensor]]:
        state = [self.optimizer.state[p] for p in self.params]
        return {
            "weights": self.params,
            "exp_avg": [s["exp_avg"] for s in state],
            "exp_avg_sq": [s["exp_avg_sq"] for s in state],
            "ema": self.ema_params,
        }


class OnePass:
    """A candidate: ``update`` (``adamw_ema_foreach`` or ``adamw_ema_per_tensor``, compiled or not)
    over the SiT's parameters, AdamW's moments and the EMA's parameters."""

    def __init__(self, sit: nn.Module, ema: nn.Module, update: Callable, compile: bool, bf16_copy: bool):
        with torch.no_grad():
            self.params, self.ema_params = trainable(sit, ema)
            self.exp_avgs = [torch.zeros_like(p) for p in self.params]
            self.exp_avg_sqs = [torch.zeros_like(p) for p in self.params]
            self.step = torch.zeros((), device=self.params[0].device)
            self.copies = [p.to(torch.bfloat16) for p in self.params] if bf16_copy else None
        # fullgraph: a graph break would time eager code unnoticed
        self.update = torch.compile(update, dynamic=False, fullgraph=True) if compile else update

    @torch.no_grad()
    def __call__(self, grads, finite, divisor) -> None:
        self.update(
            self.params, grads, self.exp_avgs, self.exp_avg_sqs, self.ema_params, self.step, finite, divisor,
            self.copies,
        )  # fmt: skip

    def tensors(self) -> dict[str, list[torch.Tensor]]:
        return {
            "weights": self.params,
            "exp_avg": self.exp_avgs,
            "exp_avg_sq": self.exp_avg_sqs,
            "ema": self.ema_params,
        }


# Each form, given the SiT, its EMA and whether to compile, returns one pass as a function of the
# gradients, the finiteness flag and the clip divisor.
FORMS = {
    "fused_adamw_then_ema": FusedAdamWThenEMA,
    "one_pass_foreach": lambda sit, ema, compile: OnePass(sit, ema, adamw_ema_foreach, compile, False),
    "one_pass_per_tensor": lambda sit, ema, compile: OnePass(sit, ema, adamw_ema_per_tensor, compile, False),
    "one_pass_per_tensor_bf16_copy": lambda sit, ema, compile: OnePass(
        sit, ema, adamw_ema_per_tensor, compile, True
    ),
}


def finite_and_divisor(grads: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``JointStep`` hands a fused optimizer: whether the gradients' norm is finite, and the
    divisor that clips them to ``MAX_GRAD_NORM``."""
    norm = torch.nn.utils.get_total_norm(grads)
    return norm.isfinite(), clip_divisor(norm, MAX_GRAD_NORM)


def three_passes(form, gradient_sets: list[list[torch.Tensor]]) -> None:
    """Pass 1 and 3 with finite gradients, pass 2 with a NaN among them (skipped); each pass gets
    fresh copies, since fused AdamW writes the unscaled gradients back."""
    for grads in gradient_sets:
        grads = [g.clone() for g in grads]
        form(grads, *finite_and_divisor(grads))


def largest_differences(tensors: dict, reference: dict, start: dict) -> dict[str, float]:
    """Per kind of tensor, the largest |difference| to the reference, as a fraction of the largest
    change the reference made to the same tensor from ``start`` (moments start at zero). Each
    reference tensor is brought to its counterpart's device, one at a time."""

    def fraction(a, b, before):
        a, b = a.double(), b.to(a.device, torch.float64)
        change = (b - before.to(a.device, torch.float64)).abs().max() if before is not None else b.abs().max()
        return ((a - b).abs().max() / change.clamp_min(1e-30)).item()

    return {
        kind: max(
            fraction(a, b, start[kind][i] if kind in start else None)
            for i, (a, b) in enumerate(zip(tensors[kind], reference[kind], strict=True))
        )
        for kind in reference
    }


def on_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of ``tensors`` in host memory."""
    return [t.detach().to("cpu", copy=True) for t in tensors]


def random_gradients(params: list[torch.Tensor], generator: torch.Generator) -> list[torch.Tensor]:
    """One gradient for each of ``params``, small and random."""
    return [torch.randn(p.shape, device=p.device, generator=generator) * 1e-3 for p in params]


def gradient_sets(params: list[torch.Tensor], seed: int = 0) -> list[list[torch.Tensor]]:
    """Three sets of gradients for ``params``: random, the first with a NaN, random again."""
    generator = torch.Generator(device=params[0].device).manual_seed(seed)
    first = random_gradients(params, generator)
    poisoned = [g.clone() for g in first]
    poisoned[0].view(-1)[0] = float("nan")
    return [first, poisoned, random_gradients(params, generator)]


def compare_forms(
    sit: nn.Module, compile: bool, forms=FORMS, measure: Callable | None = None
) -> dict[str, dict]:
    """Run each form's three passes from the SiT's state and compare it with the first form; with
    ``measure``, add what ``measure(form)`` returns (its timings) before the form is dropped. By
    form name: the seconds of the three passes, the differences, and the measurements."""
    initial = {name: t.detach().to("cpu", copy=True) for name, t in sit.state_dict().items()}
    grads = gradient_sets([p for p in sit.parameters() if p.requires_grad])
    results, reference, start = {}, None, None
    for name, make_form in forms.items():
        sit.load_state_dict(initial)
        ema = make_ema(sit)
        torch._foreach_mul_(list(ema.parameters()), 0.5)  # the EMA must move every tensor
        form = make_form(sit, ema, compile)
        if start is None:
            start = {"weights": on_host(form.params), "ema": on_host(form.ema_params)}
        began = time.perf_counter()
        three_passes(form, grads)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - began
        if reference is None:
            reference = {kind: on_host(tensors) for kind, tensors in form.tensors().items()}
        results[name] = {
            "first_three_passes_s": seconds,
            "largest_difference_over_change": largest_differences(form.tensors(), reference, start),
            **(measure(form) if measure else {}),
        }
        print(name, results[name], flush=True)
        del form, ema
        for p in sit.parameters():
            p.grad = None  # fused AdamW's gradients
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sit", default="SiT-XL/1", choices=SIT_MODEL_NAMES, help="SiT (default: SiT-XL/1)")
    parser.add_argument(
        "--forms",
        nargs="+",
        choices=list(FORMS)[1:],
        default=list(FORMS)[1:],
        help="the candidates to run after today's form, which every run measures as the reference "
        "(default: all; each compiles for minutes, so a run can be split)",
    )
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    # The LDM-only experiment's SiT: f16d32 latents of 256-pixel images, DINOv2-B's width.
    sit = build_sit(args.sit, in_channels=32, input_size=16, z_dims=[768]).cuda()
    params = [p for p in sit.parameters() if p.requires_grad]
    results = {
        "sit": args.sit,
        "parameters": sum(p.numel() for p in params),
    }
    grads = random_gradients(params, torch.Generator(device="cuda").manual_seed(1))
    finite, divisor = torch.tensor(True, device="cuda"), torch.ones((), device="cuda")

    def timings(form) -> dict[str, float]:
        def one_pass() -> None:
            form(grads, finite, divisor)

        # A per-tensor form launches ~300 kernels a pass: few passes, so the launch queue (~1000
        # kernels) never fills and makes the host wait for the GPU.
        return {"gpu_ms": gpu_ms(one_pass, repeats=2), "host_ms": host_ms(one_pass, repeats=3)}

    reference = next(iter(FORMS))
    forms = {name: FORMS[name] for name in (reference, *args.forms)}
    results["forms"] = compare_forms(sit, compile=True, forms=forms, measure=timings)
    report(results, args.output)


if __name__ == "__main__":
    main()
