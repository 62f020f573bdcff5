"""Time scaled-dot-product attention at the training step's shapes, per SDPA backend, on one GPU:

    python scripts/bench/attention.py --batch-size 32

Shapes [batch, heads, tokens, head_dim], bf16: SiT-XL at 256 tokens (XL/1 on f16 latents and XL/2
on f8 latents both have 16 x 16 patches; 16 heads of 72) and DINOv2-B at 224 px (257 tokens,
12 heads of 64). For each backend (flash, memory-efficient, cuDNN, math) and for SDPA's own choice:
the median GPU milliseconds of the forward, and of forward + backward, with the attention FLOPs
(4·B·H·T²·d forward, 3.5× that for forward + backward: the backward's five matmuls, as FlopCounterMode counts them) as TFLOP/s.
A backend that does not run at a shape is reported with its error.
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from repae.benchmarking import matmul_tflops, report, time_ms

SHAPES = {"sit_xl_256_tokens": (16, 256, 72), "dinov2_b_224px": (12, 257, 64)}
BACKENDS = {
    "default": None,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


def measure(batch_size: int, heads: int, tokens: int, head_dim: int, backend: SDPBackend | None) -> dict:
    """Forward and forward + backward milliseconds and TFLOP/s of one attention call."""
    q, k, v = (
        torch.randn(
            batch_size, heads, tokens, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True
        )
        for _ in range(3)
    )
    grad = torch.randn_like(q)
    forward_flops = 4 * batch_size * heads * tokens**2 * head_dim

    def forward():
        return F.scaled_dot_product_attention(q, k, v)

    def forward_backward():
        torch.autograd.grad(forward(), (q, k, v), grad)

    with sdpa_kernel(backend) if backend is not None else contextlib.nullcontext():
        forward_ms = time_ms(forward, repeats=20)
        both_ms = time_ms(forward_backward, repeats=20)
    return {
        "forward_ms": forward_ms,
        "forward_backward_ms": both_ms,
        "forward_tflops": forward_flops / forward_ms / 1e9,
        "forward_backward_tflops": 3.5 * forward_flops / both_ms / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-size", type=int, default=32, help="images (default: 32)")
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    results = {
        "matmul_tflops": matmul_tflops(),
        "batch_size": args.batch_size,
        "shapes": {},
    }
    for shape_name, (heads, tokens, head_dim) in SHAPES.items():
        rows = results["shapes"][shape_name] = {"heads": heads, "tokens": tokens, "head_dim": head_dim}
        for name, backend in BACKENDS.items():
            try:
                rows[name] = measure(args.batch_size, heads, tokens, head_dim, backend)
            except RuntimeError as error:  # the backend does not support this shape or card
                rows[name] = {"error": str(error).splitlines()[0]}
            print(shape_name, name, rows[name], flush=True)
    report(results, args.output)


if __name__ == "__main__":
    main()
