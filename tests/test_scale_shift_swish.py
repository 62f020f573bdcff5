"""The CUDA forms of the GroupNorm + swish backward's sums compute what the torch form computes: the
Triton kernel run on the CPU by Triton's interpreter, in a process of its own (the interpreter is
chosen at import), and the torch form compiled."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from repae.modules import scale_shift_swish as module

pytest.importorskip("triton")

CHECK = """
import torch
from repae.modules import scale_shift_swish as module

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
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    result = subprocess.run(
        [sys.executable, "-c", CHECK], env=env, cwd=root, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_the_compiled_torch_form_sums_what_the_eager_one_sums():
    """The other CUDA form (``CUDA_SUMS = "compiled"``), compiled here for the CPU."""
    torch.manual_seed(0)
    grad, x = (torch.randn(2, 96, 5, 7).contiguous(memory_format=torch.channels_last) for _ in range(2))
    scale, shift = torch.randn(2, 96), torch.randn(2, 96)
    expected = module.grad_sums(grad, x, scale, shift)
    torch.testing.assert_close(module.compiled_grad_sums(grad, x, scale, shift), expected)
