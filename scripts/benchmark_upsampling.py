"""Time the VAE decoder's upsampling convolutions (nearest x2, then conv3x3) in three forms, compiled,
forward + input and weight gradients, at the shapes the decoder runs them:

    python scripts/benchmark_upsampling.py --vae f8d4 --channels-last

- ``upsample_then_conv3x3``: the upsampled copy, then the 3x3 convolution (the model's definition;
  the upsampling is the broadcast the VAE used before, whose compiled backward is a sum);
- ``subpixel``: one 2x2 convolution of the input with 4x the output channels, one per output
  parity, interleaved afterwards (16 taps per input pixel instead of 36);
- ``transposed`` (what ``repae.kernels.upsample.upsample_conv3x3`` runs): a stride-2 transposed
  convolution with a 4x4 kernel of summed taps, which writes the interleaved output itself.

Random weights, bf16 autocast; each form's largest difference to the first is reported too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from benchmark import report, upsample_then_conv3x3
from benchmark_convolutions import time_ms
from benchmark_vae import module_input_shapes, vae_argument_parser
from torch import Tensor

from repae.kernels.group_norm import is_channels_last
from repae.kernels.upsample import upsample_conv3x3, upsampled_kernel_taps
from repae.modules.vae import Upsample

# Output parity (even/odd row) -> the two of the transposed kernel's four taps it uses: row 2i
# reads input rows (i-1, i) with taps (K3, K1), row 2i+1 rows (i, i+1) with (K2, K0).
PARITY_TAPS = ((3, 1), (2, 0))


def subpixel(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    b, c, h, w = x.shape
    out_channels = weight.shape[0]
    kernel = upsampled_kernel_taps(upsampled_kernel_taps(weight, 2), 3)  # [O, C, 4, 4]
    taps = torch.tensor(PARITY_TAPS, device=weight.device)
    # [O, C, 2 (row parity), 2, 2 (column parity), 2] -> [row parity, column parity, O, C, 2, 2]
    parity_weight = kernel[:, :, taps][..., taps].permute(2, 4, 0, 1, 3, 5)
    memory_format = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    parity_weight = parity_weight.reshape(4 * out_channels, c, 2, 2).contiguous(memory_format=memory_format)
    parities = F.conv2d(x, parity_weight, bias.repeat(4), padding=1).unflatten(1, (2, 2, out_channels))
    rows = [
        torch.stack([parities[:, a, col, :, a : a + h, col : col + w] for col in (0, 1)], dim=-1)
        for a in (0, 1)
    ]
    out = torch.stack(rows, dim=3).reshape(b, out_channels, 2 * h, 2 * w)
    return out.contiguous(memory_format=memory_format)


FORMS = {"upsample_then_conv3x3": upsample_then_conv3x3, "subpixel": subpixel, "transposed": upsample_conv3x3}


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
    results = {"device": torch.cuda.get_device_name(), "vae": args.vae, "batch_size": args.batch_size}
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
