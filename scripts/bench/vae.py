"""Time the VAE alone: encode + decode, forward and backward, as in the REPA-E step (71 % of its FLOPs).

    python scripts/bench/vae.py --vae f8d4 --compile --channels-last

Random weights and inputs, the VAE's fast kernels (``model.fast_kernels``), bf16 autocast, the
loss is the mean absolute reconstruction error so the backward reaches every layer. Compiles in a fraction of the time of the whole step, so layout and
normalisation choices can be compared quickly; `scripts/benchmark.py` gives the step's numbers.
"""

from __future__ import annotations

import statistics
import time

import torch

from repae.benchmarking import matmul_tflops, report, vae_argument_parser
from repae.kernels import use_fast_kernels
from repae.modules.vae import build_vae


def main() -> None:
    parser = vae_argument_parser(__doc__)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (default: 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps (default: 3)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the VAE")
    args = parser.parse_args()

    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    vae = use_fast_kernels(build_vae(args.vae)).cuda().to(memory_format=memory_format)
    if args.compile:
        vae.compile()
    images = torch.rand(args.batch_size, 3, args.resolution, args.resolution, device="cuda") * 2 - 1
    images = images.contiguous(memory_format=memory_format)

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, _, recon = vae(images)
        (recon.float() - images).abs().mean().backward()
        vae.zero_grad(set_to_none=True)

    times = []
    for index in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        if index == 0:
            print(f"first step {times[0]:.1f} s", flush=True)
    seconds = statistics.median(times[args.warmup :])
    result = {
        "vae": args.vae,
        "batch_size": args.batch_size,
        "resolution": args.resolution,
        "steps": args.steps,
        "warmup": args.warmup,
        "compile": args.compile,
        "channels_last": args.channels_last,
        "step_ms": 1e3 * seconds,
        "images_per_second": args.batch_size / seconds,
        "first_step_s": times[0],
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "bf16_matmul_tflops": matmul_tflops(),
    }
    report(result, args.output)


if __name__ == "__main__":
    main()
