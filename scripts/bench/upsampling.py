"""Time the VAE decoder's upsampling convolutions (nearest x2, then conv3x3) in two forms, compiled,
forward + input and weight gradients, at the shapes the decoder runs them:

    python scripts/bench/upsampling.py --vae f8d4 --channels-last

- ``upsample_then_conv3x3``: ``interpolate``, then the 3x3 convolution (the model's definition, as
  the official code runs it);
- ``transposed`` (what ``repae.kernels.upsample.upsample_conv3x3`` runs): a stride-2 transposed
  convolution with a 4x4 kernel of summed taps, which writes the interleaved output itself.

Random weights, bf16 autocast; each form's largest difference to the first is reported too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from repae.benchmarking import module_input_shapes, report, time_ms, vae_argument_parser
from repae.kernels.upsample import upsample_conv3x3
from repae.modules.vae import Upsample


def upsample_then_conv3x3(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    return F.conv2d(F.interpolate(x, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)


FORMS = {"upsample_then_conv3x3": upsample_then_conv3x3, "transposed": upsample_conv3x3}


def time_form(form, x: Tensor, weight: Tensor, bias: Tensor, grad: Tensor) -> tuple[float, Tensor]:
    """Milliseconds of the compiled form's forward and backward, and its output (float32)."""
    compiled = torch.compile(form, dynamic=False)

    def step() -> Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = compiled(x, weight, bias)
        out.backward(grad)
        return out.detach().float()

    out = step()
    return time_ms(step), out


def main() -> None:
    args = vae_argument_parser(__doc__).parse_args()
    torch.backends.cudnn.benchmark = True
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    results = {"vae": args.vae, "batch_size": args.batch_size}
    results["channels_last"], results["shapes"] = args.channels_last, {}
    shapes = module_input_shapes(args.vae, args.batch_size, args.resolution, Upsample)
    for shape in shapes:
        b, c, h, w = shape
        torch.manual_seed(0)
        x = torch.randn(shape, device="cuda").contiguous(memory_format=memory_format).requires_grad_()
        weight = 0.02 * torch.randn(c, c, 3, 3, device="cuda")
        weight = weight.contiguous(memory_format=memory_format).requires_grad_()
        bias = torch.zeros(c, device="cuda", requires_grad=True)
        grad = torch.randn(b, c, 2 * h, 2 * w, device="cuda", dtype=torch.bfloat16)
        grad = grad.contiguous(memory_format=memory_format)
        timings, reference = {}, None
        for name, form in FORMS.items():
            milliseconds, out = time_form(form, x, weight, bias, grad)
            reference = out if reference is None else reference
            timings[name] = {
                "forward_backward_ms": milliseconds,
                "max_abs_difference": (out - reference).abs().max().item(),
            }
        results["shapes"]["x".join(map(str, shape))] = timings
        print(shape, timings, flush=True)
    report(results, args.output)


if __name__ == "__main__":
    main()
