"""Time the VAE's GroupNorm + swish, forward and backward, compiled, at the shapes the VAE runs it:

    python scripts/bench/group_norm.py --vae f8d4
    python scripts/bench/group_norm.py --min-size 128 --options coordinate_descent   # minutes less

Always the channels_last path (NCHW goes to ``F.group_norm``, so there is no ``--channels-last``),
with conv1's bias as ``input_bias`` and the result in bf16 for the next convolution, in two forms
(``FORMS``): ``group_norm_channels_last`` then swish, as torch.compile fuses the pair, and the
model's ``group_norm_swish_channels_last`` (its backward's sums in a Triton kernel of their own),
each under every set of inductor options of ``OPTIONS`` (``--options``).
For each distinct input shape: the milliseconds of forward + backward (the gradients of x, the
weight, the bias and the input bias; per-call CUDA events, so host time counts where the host is
the slower), the kernels that ran with their GPU microseconds per call, and the largest differences
to the first variant's output and gradients. At 256 x 256, 128 channels, 32 images the pair's
backward writes the float32 product of the gradient and swish' out and reads it back in two more
passes; the fused form's reads the gradient and x twice.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.nn import GroupNorm

from repae.benchmarking import module_input_shapes, report, time_ms, vae_argument_parser
from repae.kernels.group_norm import group_norm_channels_last, group_norm_swish_channels_last
from repae.modules.vae import swish

OPTIONS = {"default": {}, "coordinate_descent": {"coordinate_descent_tuning": True}}


def group_norm_then_swish(x, weight, bias, input_bias):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return swish(group_norm_channels_last(x, 32, weight, bias, 1e-6, input_bias)).to(torch.bfloat16)


def group_norm_swish(x, weight, bias, input_bias):
    with torch.autocast("cuda", dtype=torch.bfloat16):
        return group_norm_swish_channels_last(x, 32, weight, bias, 1e-6, input_bias)


FORMS = {"group_norm_then_swish": group_norm_then_swish, "group_norm_swish": group_norm_swish}


def kernels_per_call(step, calls: int = 3) -> list[tuple[str, float, int]]:
    """(kernel name, GPU microseconds per call of ``step``, launches per call), costliest first."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as profiler:
        for _ in range(calls):
            step()
        torch.cuda.synchronize()
    rows = [
        (event.key[:100], round(event.device_time_total / calls, 1), event.count // calls)
        for event in profiler.key_averages()
        if event.device_time_total > 0
    ]
    return sorted(rows, key=lambda row: -row[1])


def max_abs_difference(found: torch.Tensor, expected: torch.Tensor) -> float:
    return (found.float() - expected.float()).abs().max().item()


def time_variant(form, options: dict, inputs: tuple, grad: torch.Tensor) -> dict:
    """The form compiled with these inductor options: its forward + backward's milliseconds, output,
    gradients (of every input) and kernels."""
    torch._dynamo.reset()  # each variant compiles afresh, not as a recompilation of the last
    compiled = torch.compile(form, dynamic=False, options=options)

    def step():
        out = compiled(*inputs)
        return out, torch.autograd.grad(out, inputs, grad)

    out, grads = step()
    return {"ms": time_ms(step), "out": out, "grads": grads, "kernels": kernels_per_call(step)[:10]}


def main() -> None:
    parser = vae_argument_parser(__doc__, channels_last_option=False)
    parser.add_argument(
        "--options", nargs="+", choices=list(OPTIONS), default=list(OPTIONS), help="(default: all)"
    )
    parser.add_argument(
        "--min-size", type=int, default=0, help="only inputs at least this high and wide (default: all)"
    )
    args = parser.parse_args()
    counts = Counter(module_input_shapes(args.vae, args.batch_size, args.resolution, GroupNorm))
    counts = {shape: norms for shape, norms in counts.items() if shape[2] >= args.min_size}
    results = {"vae": args.vae, "shapes": {}}
    for shape, norms in sorted(counts.items(), key=lambda item: -item[0][2]):
        torch.manual_seed(0)
        channels = shape[1]
        x = (2 * torch.randn(shape, device="cuda") + 0.5).to(torch.bfloat16)
        x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
        weight = (1 + 0.1 * torch.randn(channels, device="cuda")).requires_grad_()
        bias = (0.1 * torch.randn(channels, device="cuda")).requires_grad_()
        input_bias = (0.1 * torch.randn(channels, device="cuda")).requires_grad_()
        inputs, grad = (x, weight, bias, input_bias), torch.randn_like(x)
        timings, reference = {"norms_in_the_vae": norms}, None
        for form_name, form in FORMS.items():
            for options_name in args.options:
                variant = time_variant(form, OPTIONS[options_name], inputs, grad)
                reference = reference or variant
                timings[f"{form_name} {options_name}"] = row = {
                    "forward_backward_ms": variant["ms"],
                    "max_abs_difference": max_abs_difference(variant["out"], reference["out"]),
                    "max_abs_gradient_differences": [
                        max_abs_difference(g, r)
                        for g, r in zip(variant["grads"], reference["grads"], strict=True)
                    ],
                    "kernels": variant["kernels"],
                }
                print(shape, form_name, options_name, row, flush=True)
        results["shapes"]["x".join(map(str, shape))] = timings
    report(results, args.output)


if __name__ == "__main__":
    main()
