"""The benchmark's yardstick: MFU counts the model's FLOPs, however the model computes them."""

from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

import torch
from torch.utils.flop_counter import FlopCounterMode

from repae.modules import vae as vae_module

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import benchmark  # noqa: E402


def convolution_flops(counter: FlopCounterMode) -> int:
    return counter.get_flop_counts()["Global"][torch.ops.aten.convolution]


def test_flops_count_the_upsampling_as_the_model_defines_it_not_as_it_runs():
    torch.manual_seed(0)
    decoder = vae_module.build_vae("f4d4-tiny").decoder
    latents = torch.randn(2, 4, 8, 8)
    upsampling_inputs = []
    hooks = [
        module.register_forward_hook(lambda _m, args, _out: upsampling_inputs.append(args[0].shape))
        for module in decoder.modules()
        if isinstance(module, vae_module.Upsample)
    ]
    with torch.no_grad(), FlopCounterMode(display=False) as executed:
        fast = decoder(latents)
    for hook in hooks:
        hook.remove()
    with (
        torch.no_grad(),
        FlopCounterMode(display=False) as counted,
        mock.patch.object(vae_module, "upsample_conv3x3", benchmark.upsample_then_conv3x3),
    ):
        as_defined = decoder(latents)

    # A 3x3 convolution on the upsampled grid: 36 multiply-adds per input pixel and channel pair;
    # the transposed convolution does 16.
    saved = sum(2 * b * c * c * (36 - 16) * h * w for b, c, h, w in upsampling_inputs)
    assert upsampling_inputs
    assert convolution_flops(counted) - convolution_flops(executed) == saved
    torch.testing.assert_close(as_defined, fast, rtol=1e-4, atol=1e-5)
