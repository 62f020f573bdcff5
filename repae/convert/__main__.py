"""Checkpoint and weight conversion (reference sections 3.5, 7.7, 10).

    python -m repae.convert extract-vae CKPT --name NAME [--save-dir exps]
    python -m repae.convert from-official CKPT OUT.ckpt [--vae-weights VAE.pt] [HYDRA_OVERRIDE ...]
    python -m repae.convert to-diffusers VAE.pt OUT_DIR --vae f16d32 [--latents-stats STATS.pt]
    python -m repae.convert from-diffusers DIFFUSERS_DIR OUT.pt

``extract-vae`` is the official ``save_vae_weights.py`` for both kinds of training checkpoints:
a repae Lightning ``.ckpt`` or an official ``train_repae.py`` ``.pt``. ``from-official`` turns an
official ``train_repae.py`` / ``train_ldm_only.py`` checkpoint into a repae Lightning checkpoint
that ``python -m repae.train ckpt_path=...`` resumes and ``REPAE.load_from_checkpoint`` loads.
``to-diffusers`` / ``from-diffusers`` convert a VAE between the CompVis layout and a diffusers
``AutoencoderKL`` folder. Bad input (a missing or refused file, weights that do not fit) ends with
one ``error:`` line and exit status 1.
"""

from __future__ import annotations

import argparse
import logging
import shlex
from collections.abc import Sequence

from hydra.errors import HydraException

from repae.cli import BAD_INPUT, exit_on_bad_input
from repae.convert.checkpoints import extract_vae
from repae.convert.diffusers import from_diffusers, to_diffusers
from repae.convert.official import from_official
from repae.modules.vae import VAE_CONFIGS

log = logging.getLogger("repae.convert")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    formatter = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="python -m repae.convert", description=__doc__.split("\n\n")[0],
                                     formatter_class=formatter)  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True)

    extract = commands.add_parser(
        "extract-vae",
        formatter_class=formatter,
        help="VAE, latents-stats and discriminator files from a training checkpoint",
    )
    extract.add_argument("checkpoint", help="repae .ckpt or official train_repae.py .pt")
    extract.add_argument("--name", required=True, help="file name stem NAME (official --vae-name)")
    extract.add_argument("--save-dir", default="exps", help="files go to SAVE_DIR/NAME/")

    official = commands.add_parser(
        "from-official",
        formatter_class=formatter,
        help="official train_repae.py / train_ldm_only.py checkpoint -> repae .ckpt",
    )
    official.add_argument("checkpoint", help="official checkpoint, e.g. exps/NAME/checkpoints/0400000.pt")
    official.add_argument("output", help="repae Lightning checkpoint to write")
    official.add_argument(
        "--vae-weights", default=None, help="VAE file of a train_ldm_only.py run (its --vae-ckpt)"
    )
    official.add_argument(
        "--discriminator-weights",
        default=None,
        help="discriminator file for a train_repae.py checkpoint saved without one",
    )
    official.add_argument(
        "--fresh-optimizers", action="store_true", help="do not carry over the Adam moments"
    )
    official.add_argument("overrides", nargs="*", help="extra Hydra overrides of conf/train.yaml (key=value)")

    export = commands.add_parser(
        "to-diffusers", formatter_class=formatter, help="CompVis VAE file -> diffusers AutoencoderKL folder"
    )
    export.add_argument("vae_weights", help="VAE state_dict file, e.g. pretrained/e2e-vavae/e2e-vavae.pt")
    export.add_argument("output_dir", help="diffusers model folder to write")
    export.add_argument("--vae", required=True, choices=sorted(VAE_CONFIGS), help="VAE architecture")
    export.add_argument(
        "--latents-stats", default=None, help="NAME-latents-stats.pt to store as latents_mean/std"
    )

    imported = commands.add_parser(
        "from-diffusers", formatter_class=formatter, help="diffusers AutoencoderKL folder -> CompVis VAE file"
    )
    imported.add_argument(
        "diffusers_dir", help="folder with config.json and diffusion_pytorch_model.safetensors"
    )
    imported.add_argument("output", help="VAE state_dict file to write, e.g. pretrained/NAME/NAME.pt")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    with exit_on_bad_input((*BAD_INPUT, HydraException)):
        run(args)


def run(args: argparse.Namespace) -> None:
    """Run the parsed command."""
    if args.command == "extract-vae":
        for kind, path in extract_vae(args.checkpoint, args.name, args.save_dir).items():
            log.info("wrote %s: %s", kind, path)
    elif args.command == "from-official":
        overrides = from_official(
            args.checkpoint,
            args.output,
            args.overrides,
            args.vae_weights,
            args.discriminator_weights,
            args.fresh_optimizers,
        )
        log.info("wrote %s; continue training with:\n  python -m repae.train %s", args.output,
                 " ".join(shlex.quote(o) for o in [*overrides, f"ckpt_path={args.output}"]))  # fmt: skip
    elif args.command == "to-diffusers":
        log.info("wrote %s", to_diffusers(args.vae_weights, args.output_dir, args.vae, args.latents_stats))
    else:
        output, name = from_diffusers(args.diffusers_dir, args.output)
        match = f"model.vae.name={name}" if name else "no named VAE config has this architecture"
        log.info("wrote %s (%s)", output, match)


if __name__ == "__main__":
    main()
