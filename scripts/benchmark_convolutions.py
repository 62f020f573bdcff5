"""Time every distinct convolution of the VAE, LPIPS and the discriminator on their own: forward,
input gradient (dgrad) and weight gradient (wgrad), with the rate each reaches.

    python scripts/benchmark_convolutions.py --vae f8d4 --channels-last

Convolutions are about half of the compiled REPA-E step's GPU time; this shows which of them run far
below the card's matrix rate. A convolution whose input or output channels are not a multiple
of 8 is also timed with its channels zero-padded to the next multiple of 8 (`padded_*` columns),
the remedy when cuDNN has no fast kernel for the odd count (the RGB convolutions), and a 1x1
convolution on NHWC operands also as the matmul it is (`as_matmul_*` columns). Random
weights; the VAE in bf16, the loss networks in float32 with TF32 as the official code runs them,
or in bf16 with --loss-networks-bf16 (`model.loss.autocast_networks=true`).
The decoder's upsampling convolutions are not among them: they run as transposed convolutions
with the `Upsample` modules' weights (not through `nn.Conv2d`); scripts/benchmark_upsampling.py
times those.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from benchmark import matmul_tflops, report
from benchmark_vae import vae_argument_parser
from torch import nn

from repae.kernels import use_fast_kernels
from repae.modules.discriminator import NLayerDiscriminator
from repae.modules.perceptual import LPIPS
from repae.modules.vae import build_vae

OPERATIONS = ("forward", "dgrad", "wgrad")


def convolution_calls(
    networks: dict[str, nn.Module], inputs: dict[str, tuple], dtypes: dict[str, torch.dtype]
) -> dict[tuple, list[str]]:
    """The distinct convolutions the networks run on ``inputs``: key (network, weight shape,
    stride, padding, input shape, dtype) -> the names of the modules that run it."""
    calls: dict[tuple, list[str]] = {}
    for network_name, network in networks.items():
        hooks = []
        for module_name, module in network.named_modules():
            if isinstance(module, nn.Conv2d):

                def record(conv, args, _output, network=network_name, name=module_name):
                    key = (
                        network,
                        tuple(conv.weight.shape),
                        conv.stride,
                        conv.padding,
                        tuple(args[0].shape),
                        dtypes[network],
                    )
                    calls.setdefault(key, []).append(name)

                hooks.append(module.register_forward_hook(record))
        bf16 = dtypes[network_name] == torch.bfloat16
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            network(*inputs[network_name])
        for hook in hooks:
            hook.remove()
    return calls


def time_ms(function, repeats: int = 10) -> float:
    """Median milliseconds of ``function()`` on the GPU (CUDA events), after three warm-up calls."""
    for _ in range(3):
        function()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def time_convolution(
    weight_shape, stride, padding, input_shape, dtype, memory_format
) -> tuple[dict[str, float], int]:
    """Milliseconds of the forward (with and without the bias), dgrad and wgrad of one
    convolution; and its forward FLOPs."""
    out_channels, in_channels, kh, kw = weight_shape
    x = torch.randn(input_shape, device="cuda", dtype=dtype).contiguous(memory_format=memory_format)
    weight = torch.randn(weight_shape, device="cuda", dtype=dtype).contiguous(memory_format=memory_format)
    bias = torch.randn(out_channels, device="cuda", dtype=dtype)
    y = F.conv2d(x, weight, bias, stride, padding)
    grad = torch.randn_like(y)
    backward = torch.ops.aten.convolution_backward

    def gradient(mask):
        return lambda: backward(
            grad, x, weight, [out_channels], stride, padding, (1, 1), False, (0, 0), 1, mask
        )

    times = {
        "forward": time_ms(lambda: F.conv2d(x, weight, bias, stride, padding)),
        "forward_without_bias": time_ms(lambda: F.conv2d(x, weight, None, stride, padding)),
        "dgrad": time_ms(gradient([True, False, False])),
        "wgrad": time_ms(gradient([False, True, True])),
    }
    flops = 2 * y.numel() * in_channels * kh * kw
    return times, flops


def time_as_matmul(weight_shape, input_shape, dtype) -> dict[str, float]:
    """Milliseconds of a 1x1 convolution computed as a matmul over NHWC pixels: forward, input
    gradient and weight gradient."""
    out_channels, in_channels, _, _ = weight_shape
    pixels = input_shape[0] * input_shape[2] * input_shape[3]
    x = torch.randn(pixels, in_channels, device="cuda", dtype=dtype)
    weight = torch.randn(out_channels, in_channels, device="cuda", dtype=dtype)
    bias = torch.randn(out_channels, device="cuda", dtype=dtype)
    grad = torch.randn(pixels, out_channels, device="cuda", dtype=dtype)
    return {
        "forward": time_ms(lambda: F.linear(x, weight, bias)),
        "dgrad": time_ms(lambda: grad @ weight),
        "wgrad": time_ms(lambda: (grad.t() @ x, grad.sum(0))),
    }


def padded_to_8(channels: int) -> int:
    return 8 * math.ceil(channels / 8)


def main() -> None:
    parser = vae_argument_parser(__doc__)
    parser.add_argument(
        "--loss-networks-bf16", action="store_true", help="LPIPS and the discriminator in bf16"
    )
    parser.add_argument(
        "--benchmark-limit",
        type=int,
        default=torch.backends.cudnn.benchmark_limit,
        help="cuDNN algorithms tried per convolution in benchmark mode; 0 tries all "
        f"(default: torch's, {torch.backends.cudnn.benchmark_limit})",
    )
    args = parser.parse_args()

    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.benchmark_limit = args.benchmark_limit
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    loss_dtype = torch.bfloat16 if args.loss_networks_bf16 else torch.float32
    vae = use_fast_kernels(build_vae(args.vae)).cuda()
    images = torch.rand(args.batch_size, 3, args.resolution, args.resolution, device="cuda") * 2 - 1
    networks = {
        "vae": vae,
        "lpips": LPIPS("random").cuda().eval(),
        "discriminator": NLayerDiscriminator().cuda(),
    }
    inputs = {"vae": (images,), "lpips": (images, images), "discriminator": (images,)}
    dtypes = {"vae": torch.bfloat16, "lpips": loss_dtype, "discriminator": loss_dtype}
    calls = convolution_calls(networks, inputs, dtypes)

    rows = []
    for (network, weight_shape, stride, padding, input_shape, dtype), modules in calls.items():
        times, flops = time_convolution(weight_shape, stride, padding, input_shape, dtype, memory_format)
        row = {
            "network": network,
            "modules": modules,
            "weight_shape": weight_shape,
            "stride": stride,
            "input_shape": input_shape,
            "dtype": str(dtype).removeprefix("torch."),
            "gflop": flops / 1e9,
            **{f"{operation}_ms": times[operation] for operation in OPERATIONS},
            **{f"{operation}_tflops": flops / times[operation] / 1e9 for operation in OPERATIONS},
            "forward_without_bias_ms": times["forward_without_bias"],
        }
        out_channels, in_channels, kh, kw = weight_shape
        if out_channels % 8 or in_channels % 8:
            padded_weight = (padded_to_8(out_channels), padded_to_8(in_channels), kh, kw)
            padded_input = (input_shape[0], padded_to_8(in_channels), *input_shape[2:])
            padded, _ = time_convolution(padded_weight, stride, padding, padded_input, dtype, memory_format)
            row.update({f"padded_{operation}_ms": padded[operation] for operation in OPERATIONS})
        if (kh, kw) == (1, 1) and args.channels_last:
            as_matmul = time_as_matmul(weight_shape, input_shape, dtype)
            row.update({f"as_matmul_{operation}_ms": as_matmul[operation] for operation in OPERATIONS})
        rows.append(row)
        print(
            f"{network:13s} {str(weight_shape):20s} s{stride[0]} in {str(input_shape):22s} {row['dtype']:8s} "
            + "  ".join(
                f"{operation} {times[operation]:6.3f} ms {row[f'{operation}_tflops']:5.0f} TF/s"
                + "".join(
                    f" ({variant} {row[f'{variant}_{operation}_ms']:6.3f})"
                    for variant in ("padded", "as_matmul")
                    if f"{variant}_{operation}_ms" in row
                )
                for operation in OPERATIONS
            ),
            flush=True,
        )
    report(
        {
            "device": torch.cuda.get_device_name(),
            "vae": args.vae,
            "batch_size": args.batch_size,
            "resolution": args.resolution,
            "channels_last": args.channels_last,
            "loss_networks_dtype": str(loss_dtype).removeprefix("torch."),
            "cudnn_benchmark_limit": args.benchmark_limit,
            "bf16_matmul_tflops": matmul_tflops(),
            "convolutions": rows,
        },
        args.output,
    )


if __name__ == "__main__":
    main()
