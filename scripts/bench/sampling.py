"""Time sampling (SiT + sampler + VAE decode) on a GPU: images/s for one precision/compile setting.

    python scripts/bench/sampling.py --precision fp32            # TF32 matmuls, the official setting
    python scripts/bench/sampling.py --precision bf16 --compile

Random weights (speed does not depend on them). The protocol of the issue: Euler-Maruyama SDE,
CFG 2.2 inside the guidance interval [0, 0.65] (the SD-VAE REPA-E setting), decode with the VAE.
Use fewer --num-steps than 250 for a quick number: the time is linear in the steps.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import torch

from repae.benchmarking import report
from repae.modules.samplers import generate_images
from repae.modules.sit import build_sit
from repae.modules.vae import build_vae


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="SiT-XL/2", help="SiT name (default: SiT-XL/2)")
    parser.add_argument("--vae", default="f8d4", help="VAE config (default: f8d4)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per batch (default: 128)")
    parser.add_argument("--num-steps", type=int, default=250, help="SDE steps (default: 250)")
    parser.add_argument("--cfg-scale", type=float, default=2.2, help="default: 2.2")
    parser.add_argument("--guidance-high", type=float, default=0.65, help="default: 0.65")
    parser.add_argument(
        "--precision", choices=["fp32", "bf16"], default="fp32", help="default: fp32 (TF32 on)"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the SiT and the VAE decoder")
    parser.add_argument("--batches", type=int, default=3, help="timed batches after one warm-up (default: 3)")
    parser.add_argument("--output", type=Path, default=None, help="write the result as JSON here")
    args = parser.parse_args()

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    vae = build_vae(args.vae).cuda().eval()
    factor, channels = vae.downsample_factor, vae.latent_channels
    sit = build_sit(args.model, input_size=256 // factor, in_channels=channels, z_dims=[768]).cuda().eval()
    if args.compile:  # the samplers call sit.inference, the VAE decode calls its decoder
        sit.inference = torch.compile(sit.inference)
        vae.decoder.compile()
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if args.precision == "bf16" else contextlib.nullcontext()
    )
    kwargs = dict(
        mode="sde",
        num_steps=args.num_steps,
        cfg_scale=args.cfg_scale,
        guidance_low=0.0,
        guidance_high=args.guidance_high,
    )
    generator = torch.Generator(device="cuda").manual_seed(0)
    times = []
    with torch.no_grad(), autocast:
        for _ in range(args.batches + 1):
            labels = torch.randint(0, 1000, (args.batch_size,), device="cuda", generator=generator)
            noise = torch.randn(
                args.batch_size, channels, 256 // factor, 256 // factor, device="cuda", generator=generator
            )
            torch.cuda.synchronize()
            start = time.perf_counter()
            generate_images(sit, vae, labels, noise, **kwargs)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    per_batch = sum(times[1:]) / args.batches
    result = {
        **vars(args),
        "output": None,
        "images_per_second": args.batch_size / per_batch,
        "first_batch_s": times[0],
    }
    report(result, args.output)


if __name__ == "__main__":
    main()
