"""Does the REPA loss that reaches REPA-E's VAE push its latents' scale up? (docs/reproduction.md,
"Investigation"), on the CPU or a GPU:

    python scripts/study_latent_scale.py logs/study/runs/repae_s0/checkpoints/*.ckpt \
        --output docs/reproduction/latent_scale.json

REPA-E's VAE gets its REPA loss through a frozen SiT whose input BatchNorm runs in eval mode: the
latents are divided by the running std of earlier batches, while the SiT's own pass divides by the
batch's std and moves the running std towards it (momentum 0.1). Latents larger than the running std
are a cleaner input to the frozen SiT at every t; if that aligns better, the REPA loss pushes the
VAE's latents up, the running std follows, and the push repeats: the study's REPA-E VAEs end with
latent stds of 5.8-9.4 from 1.2.

For each end-to-end run's checkpoint (its raw SiT, VAE and alignment encoder), on ``--batches``
batches of Fashion-MNIST training images, with t, the noise and the posterior samples fixed per batch
(the same for every checkpoint), the means over batches of (``--start-vae``: the first two for the VAE the runs started from):

- ``latent_std``: the std over the batch of the posterior means, averaged over channels (the study's
  VAE table's measure); ``posterior_std``: the posterior's own std, averaged;
- ``scale_over_running``: the sampled latents' std over the SiT BatchNorm's running std, per channel,
  averaged (``running_std``: that running std, averaged): above 1, the frozen pass sees larger
  latents than the SiT's own pass does;
- ``proj_loss`` and ``dloss_dscale``: the REPA loss of the VAE's pass and its derivative in a global
  scale s of the latents at s = 1 (``repae.study.alignment_scale_gradient``): negative, the loss
  pulls the latents' scale up. Its per-batch values too.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from repae.benchmarking import provenance, report
from repae.config import build_model
from repae.convert.checkpoints import load_checkpoint, training_components
from repae.modules.encoders import build_encoders
from repae.modules.sit import projector_dims
from repae.modules.vae import images_to_vae_input, load_vae_weights
from repae.study import alignment_scale_gradient, fashion_mnist


def posterior_statistics(vae: torch.nn.Module, batch: torch.Tensor) -> tuple:
    """The posterior of a batch of uint8 images, and its ``latent_std`` and ``posterior_std``."""
    with torch.no_grad():
        posterior = vae.encode(images_to_vae_input(batch))
    return posterior, {
        "latent_std": posterior.mean.std(dim=(0, 2, 3)).mean().item(),
        "posterior_std": posterior.std.mean().item(),
    }


def load_run(path: Path) -> tuple[dict, dict]:
    """An end-to-end run's checkpoint: (hyper_parameters, its SiT, VAE, ... state dicts)."""
    try:
        checkpoint = load_checkpoint(path)
        parts = training_components(checkpoint)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    if "hyper_parameters" not in checkpoint or parts["sit"] is None or parts["vae"] is None:
        raise SystemExit(f"error: {path} is not a repae end-to-end run's checkpoint (its SiT and VAE)")
    return checkpoint, parts


def measure(path: Path, images: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int) -> dict:
    checkpoint, parts = load_run(path)
    hparams = checkpoint["hyper_parameters"]
    sit = build_model(hparams["sit"], "hyper_parameters.sit", z_dims=projector_dims(parts["sit"]))
    sit.load_state_dict(parts["sit"])
    vae = build_model(hparams["vae"], "hyper_parameters.vae")
    vae.load_state_dict(parts["vae"])
    encoders = build_encoders(**hparams["encoder"]).eval()
    sit.requires_grad_(False)
    vae.eval().requires_grad_(False)
    grid = sit.input_size // sit.patch_size
    rows = []
    for index, start in enumerate(range(0, len(images), batch_size)):
        batch, batch_labels = images[start : start + batch_size], labels[start : start + batch_size]
        generator = torch.Generator().manual_seed(seed + index)
        posterior, stds = posterior_statistics(vae, batch)
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        with torch.no_grad():
            features = [encoder(batch, grid_size=grid) for encoder in encoders]
        time_input = torch.rand(len(batch), 1, 1, 1, generator=generator)
        noises = torch.randn(z.shape, generator=generator)
        proj_loss, gradient = alignment_scale_gradient(sit, z, batch_labels, features, time_input, noises)
        rows.append({
            **stds,
            # > 1: the latents are ahead of the running std the VAE's pass divides them by
            "scale_over_running": (z.std(dim=(0, 2, 3)) / sit.bn.running_var.sqrt()).mean().item(),
            "proj_loss": proj_loss,
            "dloss_dscale": gradient,
        })  # fmt: skip
    return {
        "sit_step": int(checkpoint["state_dict"]["train_step"]),
        "running_std": sit.bn.running_var.sqrt().mean().item(),
        **{key: sum(row[key] for row in rows) / len(rows) for key in rows[0]},
        "dloss_dscale_per_batch": [row["dloss_dscale"] for row in rows],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", type=Path, help="end-to-end runs' .ckpt files")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--start-vae", type=Path, help="the VAE weights the runs started from (stage 0): its stds too"
    )
    parser.add_argument("--output", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    images, labels = fashion_mnist("train", args.batches * args.batch_size)
    results = {"provenance": provenance(), "batches": args.batches, "batch_size": args.batch_size}
    if args.start_vae:
        vae = build_model(load_run(args.checkpoints[0])[0]["hyper_parameters"]["vae"], "hyper_parameters.vae")
        load_vae_weights(vae, args.start_vae)
        rows = [posterior_statistics(vae.eval(), images[i : i + args.batch_size])[1]
                for i in range(0, len(images), args.batch_size)]  # fmt: skip
        results[str(args.start_vae)] = {key: sum(row[key] for row in rows) / len(rows) for key in rows[0]}
        print(args.start_vae, results[str(args.start_vae)], flush=True)
    for path in args.checkpoints:
        started = time.monotonic()
        results[str(path)] = {**measure(path, images, labels, args.batch_size, args.seed),
                              "seconds": round(time.monotonic() - started, 1)}  # fmt: skip
        print(path, results[str(path)], flush=True)
    report(results, args.output)


if __name__ == "__main__":
    main()
