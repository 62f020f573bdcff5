"""Does the REPA loss that reaches REPA-E's VAE pull its latents' spread up? (docs/reproduction.md,
"Investigation"):

    python scripts/study_latent_scale.py logs/study/runs/repae_s0/checkpoints/*.ckpt \\
        --start-vae logs/study/vae/stage0/stage0.pt --output docs/reproduction/latent_scale.json

REPA-E's VAE gets its REPA loss through a frozen SiT whose input BatchNorm runs in eval mode: the
latents are centred on the running mean and divided by the running std of earlier batches, while
the SiT's own pass uses the batch's statistics and moves the running ones towards them (momentum
0.1). Latents that spread wider than the running std are a cleaner input to the frozen SiT at every
t; if that aligns better, the REPA loss pulls the spread up, the running std follows, and the pull
repeats.

For each end-to-end run's checkpoint (its raw SiT, as the VAE's pass uses it, its VAE and alignment
encoder), on ``--batches`` batches of Fashion-MNIST training images, with t, the noise and the
posterior samples fixed per batch (the same for every checkpoint), per latent channel and averaged
over channels (``--start-vae``: the first two for the VAE the runs started from):

- ``latent_std``: the std over the batch of the posterior means; ``posterior_std``: the posterior's
  own std;
- ``running_std``: the SiT BatchNorm's running std; ``std_over_running``: the sampled latents' std
  over it: above 1, the frozen pass sees a wider spread than the SiT's own pass;
- ``proj_loss`` of that pass, and ``dloss_dspread``: its derivative in each channel's spread about
  the running mean (``alignment_spread_gradient``): negative, the REPA loss pulls that
  spread up; ``dloss_dspread_common``, their sum: along one common spread of all channels, also per
  batch.

The run's ``vae_align_proj_coeff`` is recorded: with 0 no REPA loss reaches its VAE (a control).
Batch means and stds here are over ``--batch-size`` training images, not the 10,000 t10k images of
the study's VAE table.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path

import torch

from repae.benchmarking import report
from repae.convert.checkpoints import load_checkpoint
from repae.generate import load_sampling_model
from repae.modules.encoders import build_encoders
from repae.modules.vae import images_to_vae_input, load_vae_weights
from repae.study import fashion_mnist


def alignment_spread_gradient(
    sit: torch.nn.Module,
    z: torch.Tensor,
    labels: torch.Tensor,
    features: list[torch.Tensor],
    time_input: torch.Tensor,
    noises: torch.Tensor,
) -> tuple[float, torch.Tensor]:
    """(proj_loss, d proj_loss / d s [C]) of the SiT's align-only pass in eval mode, the pass through
    which REPA-E's VAE gets its REPA loss, on the latents ``mu + s * (z - mu)``: each channel's spread
    about the running mean ``mu`` that the eval-mode BatchNorm subtracts, at s = 1. A negative entry:
    the REPA loss pulls that channel's spread up against the running std the pass divides by (the
    SiT's own pass divides by the batch's std instead). The entries' sum is the derivative along one
    common spread of all channels.

    z, noises: [N, C, H, W]; labels [N]; features: one [N, T, z_dim] per projector; time_input
    [N, 1, 1, 1]. The SiT keeps its mode and buffers.
    """  # fmt: skip
    was_training = sit.training
    mean = sit.bn.running_mean.view(1, -1, 1, 1)
    spread = torch.ones(z.shape[1], device=z.device, requires_grad=True)
    sit.eval()
    try:
        with torch.enable_grad():
            latents = mean + spread.view(1, -1, 1, 1) * (z - mean)
            out = sit(latents, labels, features, align_only=True, time_input=time_input, noises=noises)
            (gradient,) = torch.autograd.grad(out["proj_loss"], spread)
    finally:
        sit.train(was_training)
    return out["proj_loss"].item(), gradient


def channel_lists(rows: list[dict]) -> dict:
    """Per key: the mean over rows of a per-channel tensor, as a list, and its channel average."""
    out = {}
    for key in rows[0]:
        # on the CPU: some devices have no float64
        mean = torch.stack([torch.as_tensor(row[key]).cpu().double() for row in rows]).mean(0)
        out[key] = mean.mean().item()
        if mean.ndim:
            out[f"{key}_per_channel"] = [round(v, 5) for v in mean.tolist()]
    return out


def posterior_statistics(vae: torch.nn.Module, batch: torch.Tensor) -> tuple:
    """The posterior of uint8 images [N, 3, H, W], and its per-channel ``latent_std`` and
    ``posterior_std`` [C]."""
    with torch.no_grad():
        posterior = vae.encode(images_to_vae_input(batch))
    return posterior, {
        "latent_std": posterior.mean.std(dim=(0, 2, 3)),
        "posterior_std": posterior.std.mean((0, 2, 3)),
    }


def measure(
    path: Path, batches: list[tuple], seed: int, device: torch.device, encoder_weights: str | None
) -> tuple[dict, torch.nn.Module]:
    """The measurements of one run's checkpoint, and its VAE (on ``device``)."""
    try:
        checkpoint = load_checkpoint(path)
        hparams = checkpoint.get("hyper_parameters")
        if not isinstance(hparams, Mapping):
            raise SystemExit(f"error: {path} is not a repae end-to-end run's checkpoint")
        coeff = hparams.get("vae_align_proj_coeff")
        if isinstance(coeff, bool) or not isinstance(coeff, int | float):
            found = "missing" if coeff is None else f"a {type(coeff).__name__}"  # not the value: not ours
            raise SystemExit(f"error: {path}: hyper_parameters.vae_align_proj_coeff is {found}, not a number")
        model = load_sampling_model(str(path), use_ema=False)
    except (FileNotFoundError, ValueError) as error:
        raise SystemExit(f"error: {error}") from None
    sit, vae = model.sit.to(device), model.vae.to(device)
    # Only the encoder's names and resolution are taken from the checkpoint, which may come from
    # someone else (build_encoders refuses unknown names); which files are read is ours to say.
    encoder = {key: value for key, value in dict(hparams.get("encoder") or {}).items()
               if key in ("names", "resolution")}  # fmt: skip
    try:
        encoders = build_encoders(**encoder, weights_paths=encoder_weights).eval().to(device)
    except (TypeError, ValueError, OSError) as error:
        raise SystemExit(
            f"error: the alignment encoders of {path} (names and resolution from its "
            f"hyper_parameters.encoder, weight files from --encoder-weights): {error}"
        ) from None
    grid = sit.input_size // sit.patch_size
    running_std = (sit.bn.running_var + sit.bn.eps).sqrt()  # what the eval-mode pass divides by
    rows, common = [], []
    for index, (images, labels) in enumerate(batches):
        images, labels = images.to(device), labels.to(device)
        torch.manual_seed(seed + index)
        posterior, stds = posterior_statistics(vae, images)
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape).to(device)
        with torch.no_grad():
            features = [encoder(images, grid_size=grid) for encoder in encoders]
        time_input = sit.sample_time(len(images)).to(device)  # as training draws it
        noises = torch.randn(z.shape).to(device)
        proj_loss, gradient = alignment_spread_gradient(sit, z, labels, features, time_input, noises)
        rows.append({**stds, "std_over_running": z.std(dim=(0, 2, 3)) / running_std,
                     "proj_loss": proj_loss, "dloss_dspread": gradient})  # fmt: skip
        common.append(gradient.sum().item())
    return {
        "sit_step": int(checkpoint["state_dict"]["train_step"]),
        "vae_align_proj_coeff": float(coeff),
        **channel_lists(rows),
        **channel_lists([{"running_std": running_std}]),
        "dloss_dspread_common": sum(common) / len(common),
        "dloss_dspread_common_per_batch": [round(v, 6) for v in common],
    }, vae


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", type=Path, help="end-to-end runs' .ckpt files")
    parser.add_argument("--start-vae", type=Path, help="the VAE weights the runs started from (stage 0)")
    parser.add_argument(
        "--encoder-weights",
        help="the alignment encoders' weight files, comma-separated in the runs' order (default: none, "
        "as the study's EfficientNet-Lite0, whose weights come with its package)",
    )
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--output", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    if args.start_vae and not args.start_vae.is_file():  # before the measurements, which take minutes
        raise SystemExit(f"error: --start-vae: no file {args.start_vae}")
    device = torch.device(args.device)
    images, labels = fashion_mnist("train", args.batches * args.batch_size)
    batches = [(images[i : i + args.batch_size], labels[i : i + args.batch_size])
               for i in range(0, len(images), args.batch_size)]  # fmt: skip
    results = {"batches": args.batches, "batch_size": args.batch_size}
    for path in args.checkpoints:
        results[str(path)], vae = measure(path, batches, args.seed, device, args.encoder_weights)
        print(path, results[str(path)], flush=True)
    if args.start_vae:  # into the last run's VAE: the runs share their VAE's architecture
        try:
            load_vae_weights(vae, args.start_vae, config_key="--start-vae")
        except (FileNotFoundError, ValueError) as error:
            raise SystemExit(f"error: {error}") from None
        rows = [posterior_statistics(vae, batch.to(device))[1] for batch, _ in batches]
        results[str(args.start_vae)] = channel_lists(rows)
        print(args.start_vae, results[str(args.start_vae)], flush=True)
    report(results, args.output)


if __name__ == "__main__":
    main()
