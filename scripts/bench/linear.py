"""Time one compiled SiT block's forward and backward under bf16 autocast, with the linear layers as
today and with linear layers whose weight gradients the matmul writes in float32
(docs/performance.md, the LDM-only step's lever (2)):

    python scripts/bench/linear.py --batch-size 32 --output linear.json

Under autocast each ``nn.Linear`` casts its fp32 weight to bf16, and its weight gradient comes out
of the matmul in bf16 and is cast to fp32 for the fp32 parameter: two passes over every weight a
step. ``Fp32WeightGradLinear`` keeps the forward's cast but has the weight-gradient matmul write
fp32 itself (``torch.mm(..., out_dtype=torch.float32)``, CUDA), so the backward's cast pass goes
and the gradient is not rounded to bf16 on the way.

Forms: ``autocast`` (today) and ``fp32_weight_grads``, each a block of the LDM-only SiT (width 1152,
16 heads, 256 tokens) under ``torch.compile``. For each: the GPU milliseconds of a forward and
backward (CUDA events around passes queued while the GPU sleeps), the first call's seconds, and the
largest gradient difference, relative to each gradient's largest value, to today's form (today's
weight gradients are the candidate's rounded to bf16: at most 2**-8) and to the block in float32
(mostly the bf16 activations', alike in both forms).
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from repae.benchmarking import gpu_ms, report
from repae.modules.sit import SiTBlock

WIDTH, HEADS, TOKENS = 1152, 16, 256


class _LinearFp32WeightGrad(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` in bf16, whose weight and bias gradients come out in float32."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        x, weight = x.to(torch.bfloat16), weight.to(torch.bfloat16)
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias.to(torch.bfloat16))

    @staticmethod
    def backward(ctx, grad_output):
        # torch.compile traces the backward under the forward's autocast, which would cast the
        # float32 products below back to bf16 on the CPU (and add a cast to the sum on CUDA).
        with torch.autocast(grad_output.device.type, enabled=False):
            return _LinearFp32WeightGrad._backward(ctx, grad_output)

    @staticmethod
    def _backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        grad_rows = grad_output.reshape(-1, grad_output.shape[-1])
        x_rows = x.reshape(-1, x.shape[-1])
        if grad_rows.is_cuda:
            grad_weight = torch.mm(grad_rows.t(), x_rows, out_dtype=torch.float32)
        else:  # aten's mm with out_dtype is CUDA-only; on the CPU the same product in float32
            grad_weight = torch.mm(grad_rows.t().float(), x_rows.float())
        grad_bias = grad_rows.sum(0, dtype=torch.float32)
        return grad_output @ weight, grad_weight, grad_bias


class Fp32WeightGradLinear(nn.Linear):
    """``nn.Linear`` that, under autocast, runs in bf16 with float32 weight gradients out of the
    matmul; without autocast, ``nn.Linear`` itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_autocast_enabled(x.device.type) or self.bias is None:
            return super().forward(x)
        return _LinearFp32WeightGrad.apply(x, self.weight, self.bias)


def with_fp32_weight_grads(module: nn.Module) -> nn.Module:
    """A copy of ``module`` whose ``nn.Linear`` layers are ``Fp32WeightGradLinear`` (same weights)."""
    module = copy.deepcopy(module)
    for layer in module.modules():
        if type(layer) is nn.Linear:
            layer.__class__ = Fp32WeightGradLinear  # the same parameters, another forward
    return module


def forward_backward(block: nn.Module, x: torch.Tensor, c: torch.Tensor, autocast: bool) -> None:
    """One forward and backward of ``block`` (its gradients set anew, as after ``zero_grad``)."""
    for p in block.parameters():
        p.grad = None
    with torch.autocast(x.device.type, torch.bfloat16, enabled=autocast):
        out = block(x, c)
    out.float().square().mean().backward()


def largest_difference(grads: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    """The largest gradient difference to ``reference``, relative to that gradient's largest value."""
    return max(
        ((g.double() - r.double()).abs().max() / r.double().abs().max().clamp_min(1e-30)).item()
        for g, r in zip(grads, reference, strict=True)
    )


def gradients(module: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in module.parameters()]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-size", type=int, default=32, help="images (default: 32)")
    parser.add_argument("--repeats", type=int, default=10, help="timed forward-backward passes (default: 10)")
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    device = torch.device("cuda")
    block = SiTBlock(WIDTH, HEADS).to(device)
    x = torch.randn(args.batch_size, TOKENS, WIDTH, device=device)
    c = torch.randn(args.batch_size, WIDTH, device=device)
    reference = copy.deepcopy(block)
    forward_backward(reference, x, c, autocast=False)
    float32_grads, first_grads = gradients(reference), None
    forms = {"autocast": block, "fp32_weight_grads": with_fp32_weight_grads(block)}
    results = {"batch_size": args.batch_size, "forms": {}}
    for name, form in forms.items():
        compiled = torch.compile(form, fullgraph=True)  # a graph break would time eager code unnoticed
        start = time.perf_counter()
        forward_backward(compiled, x, c, autocast=True)
        torch.cuda.synchronize()
        first_call_s = time.perf_counter() - start
        grads = gradients(form)
        first_grads = first_grads or grads

        def one_pass(compiled=compiled) -> None:
            forward_backward(compiled, x, c, autocast=True)

        results["forms"][name] = {
            "gpu_ms": gpu_ms(one_pass, args.repeats),
            "first_call_s": first_call_s,
            "largest_gradient_difference_to_autocast": largest_difference(grads, first_grads),
            "largest_gradient_error_vs_float32": largest_difference(grads, float32_grads),
        }
        print(name, results["forms"][name], flush=True)
    report(results, args.output)


if __name__ == "__main__":
    main()
