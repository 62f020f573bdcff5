"""Time every distinct convolution of the VAE, LPIPS and the discriminator on their own: forward,
input gradient (dgrad) and weight gradient (wgrad), with the rate each reaches.

    python scripts/bench/convolutions.py --vae f8d4 --channels-last

Convolutions are about half of the compiled REPA-E step's GPU time; this shows which of them run far
below the card's matrix rate. Random weights; the VAE in bf16, the loss networks in float32 with TF32 as the official code runs them,
or in bf16 with --loss-networks-bf16 (`model.loss.autocast_networks=true`).
The decoder's upsampling convolutions are not among them: they run as transposed convolutions
with the `Upsample` modules' weights (not through `nn.Conv2d`); scripts/bench/upsampling.py
times those.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from repae.benchmarking import matmul_tflops, report, time_ms, vae_argument_parser
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


def main() -> None:
    parser = vae_argument_parser(__doc__)
    parser.add_argument(
        "--loss-networks-bf16", action="store_true", help="LPIPS and the discriminator in bf16"
    )
    args = parser.parse_args()

    torch.backends.cudnn.benchmark = True
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
        rows.append(row)
        print(
            f"{network:13s} {str(weight_shape):20s} s{stride[0]} in {str(input_shape):22s} {row['dtype']:8s} "
            + "  ".join(
                f"{operation} {times[operation]:6.3f} ms {row[f'{operation}_tflops']:5.0f} TF/s"
                for operation in OPERATIONS
            ),
            flush=True,
        )
    report(
        {
            "vae": args.vae,
            "batch_size": args.batch_size,
            "resolution": args.resolution,
            "channels_last": args.channels_last,
            "loss_networks_dtype": str(loss_dtype).removeprefix("torch."),
            "bf16_matmul_tflops": matmul_tflops(),
            "convolutions": rows,
        },
        args.output,
    )


if __name__ == "__main__":
    main()
