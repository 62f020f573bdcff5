"""The fused GroupNorm + swish backward: its Triton kernel sums what the torch form sums (run on the
CPU by Triton's interpreter, in a process of its own: the interpreter is chosen at import), and its
compiled backward graph makes no other pass over the activation."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from functorch.compile import min_cut_rematerialization_partition
from torch._dynamo.backends.common import aot_autograd

from repae.kernels.group_norm import group_norm_swish_channels_last

CHECK = """
import torch
from repae.kernels import scale_shift_swish as module

torch.manual_seed(0)
# 96 channels (not a power of two) and 5 x 7 pixels: masked channels and a partial last tile.
for b, c, h, w, dtype, target_programs in [
    (2, 96, 5, 7, torch.float32, 1024),
    (3, 64, 9, 9, torch.bfloat16, 6),  # several programs per image
    (2, 512, 4, 4, torch.bfloat16, 1024),
]:
    module.TARGET_PROGRAMS = target_programs
    grad, x = (torch.randn(b, c, h, w).to(dtype).contiguous(memory_format=torch.channels_last) for _ in range(2))
    scale, shift = torch.randn(b, c), torch.randn(b, c)
    found = module._grad_sums_triton(grad, x, scale, shift)
    expected = module.scale_shift_swish_grad_sums(grad, x, scale, shift)  # CPU tensors: the torch form
    torch.testing.assert_close(found, expected, atol=1e-4, rtol=1e-5)
print("ok")
"""


def test_the_triton_reduction_sums_what_the_torch_form_sums():
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    result = subprocess.run(
        [sys.executable, "-c", CHECK], env=env, cwd=root, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_the_fused_backward_reduces_over_the_activation_only_for_the_two_gradient_sums():
    """What the fused form is for: the backward graph torch.compile partitions reduces over the
    [B, C, H, W] activation only in the sums op, which torch.compile traces into (on the CPU its
    torch form: the sums of dz and dz * x; on CUDA one Triton kernel). Any other reduction, a
    recomputed channel mean say, would be a pass of its own on the GPU."""
    reductions = []

    def record_backward(graph_module, _inputs):
        for node in graph_module.graph.nodes:
            name = str(node.target)
            if node.op == "call_function" and any(op in name for op in ("mean", "sum", "var")):
                reductions.append((name, node.args[0].meta["val"].numel()))
        return graph_module

    backend = aot_autograd(
        fw_compiler=lambda graph_module, _inputs: graph_module,
        bw_compiler=record_backward,
        partition_fn=min_cut_rematerialization_partition,
    )
    x = torch.randn(2, 64, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight, bias, input_bias = (torch.randn(64, requires_grad=True) for _ in range(3))
    torch._dynamo.reset()

    @torch.compile(backend=backend)
    def norm(x, weight, bias, input_bias):
        return group_norm_swish_channels_last(x, 32, weight, bias, 1e-6, input_bias)

    norm(x, weight, bias, input_bias).sum().backward()

    over_the_activation = [name for name, numel in reductions if numel == x.numel()]
    assert over_the_activation == ["aten.sum.dim_IntList"] * 2, reductions
