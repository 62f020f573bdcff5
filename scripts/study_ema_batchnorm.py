"""Is the naive arm's poor EMA FD its BatchNorm statistics? (docs/reproduction.md, "The naive arm's
EMA"):

    python scripts/study_ema_batchnorm.py logs/ema_bn/runs/naive_e2e_s0 \\
        --output docs/reproduction/ema_batchnorm.json

The SiT samples in its normalised latent space, and its BatchNorm's running mean and variance map
the samples back to VAE latents (``SiT.denormalize_latents``). The EMA averages those buffers like
weights, as the official code does, so while the latents' spread falls during a run (the naive
end-to-end arm's, to ~1/30), the EMA's statistics lag the raw SiT's.

For each checkpoint of the run at a step where it logged its FD, with that FD's own protocol (the
run's config.yaml: ``callbacks.fid`` samples, labels, noise and reference, ``model.sampling``), three
Fréchet distances: the EMA SiT's, the raw SiT's, and that of the EMA SiT with the raw SiT's BatchNorm
statistics. The first two are the run's logged values measured again: the JSON holds both, a check
of the measurement. The run directory's files are read, never executed: only numbers, names and the
reference path are taken from its config.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from repae.benchmarking import report
from repae.callbacks.sampling import DistributionMetricCallback, check_reference_record
from repae.cli import exit_on_bad_input
from repae.generate import SamplingModel, load_sampling_model
from repae.metrics import frechet_distance, load_reference_statistics
from repae.study import fd_rows

ONE_PROCESS = SimpleNamespace(world_size=1, global_rank=0)  # what sample_statistics reads of a Trainer
# model.sampling: each key's type
SAMPLER = {"mode": str, "num_steps": int, "heun": bool, "cfg_scale": float, "guidance_low": float,
           "guidance_high": float, "path_type": str}  # fmt: skip
MISSING = object()


def setting(config: DictConfig, key: str, kind: type, default: object = MISSING):
    """``key`` of a run's config, of type ``kind`` (a float may be written as an int); one error
    line naming the key, never its value, if it is missing or of another type."""
    value = OmegaConf.select(config, key, default=default)
    if value is MISSING:
        raise ValueError(f"the run's config.yaml has no {key}")
    kinds = (int, float) if kind is float else kind
    if value is not default and (
        not isinstance(value, kinds) or (isinstance(value, bool) and kind is not bool)
    ):
        raise ValueError(
            f"the run's config.yaml: {key} is a {type(value).__name__}, not of type {kind.__name__}"
        )
    return value


class SamplingModule:
    """What ``DistributionMetricCallback.sample_statistics`` reads of the training module, for a
    ``SamplingModel``: its device, classes, latent shape and ``generate`` with the run's sampler."""

    def __init__(self, model: SamplingModel, sampler: Mapping, device: torch.device):
        self.model, self.sampler, self.device = model, dict(sampler), device

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.model.latent_shape

    def generate(self, labels, noise, use_ema: bool = True, **sampler_kwargs) -> torch.Tensor:
        """Samples of the model's SiT (EMA or raw: chosen when it was loaded, so ``use_ema`` is moot)."""
        return self.model.generate(labels, noise, **{**self.sampler, **sampler_kwargs})


def fd_callback(config: DictConfig, reference_path: str) -> DistributionMetricCallback:
    """The run's FD callback, built from the values of ``callbacks.fid`` in its config (its
    ``_target_`` and dataset configs are not used), with its feature extractor."""
    steps = setting(config, "callbacks.fid.steps", ListConfig)
    if not all(isinstance(step, int) for step in steps):
        raise ValueError("the run's config.yaml: callbacks.fid.steps must be a list of step numbers")
    callback = DistributionMetricCallback(
        num_samples=setting(config, "callbacks.fid.num_samples", int),
        batch_size=setting(config, "callbacks.fid.batch_size", int),
        steps=list(steps),
        feature_extractor=setting(config, "callbacks.fid.feature_extractor", str),
        reference_stats_path=reference_path,
        inception_weights_path=setting(config, "callbacks.fid.inception_weights_path", str, None),
        effnet_resolution=setting(config, "callbacks.fid.effnet_resolution", int, 128),
        seed=setting(config, "callbacks.fid.seed", int, 0),
    )
    callback.setup(ONE_PROCESS, SimpleNamespace(), "fit")
    return callback


def batchnorm_statistics(model: SamplingModel) -> dict[str, list[float]]:
    """Per latent channel, the running mean and std that map the SiT's samples back to VAE latents."""
    bn = model.sit.bn
    return {
        "running_mean": bn.running_mean.tolist(),
        "running_std": (bn.running_var + bn.eps).sqrt().tolist(),
    }


@torch.no_grad()
def measure(run: Path, device: torch.device, reference_path: str | None = None) -> dict:
    """The three FDs at each step with a logged FD and a checkpoint, beside the logged FDs."""
    config = OmegaConf.load(run / "config.yaml")  # written resolved by repae.train
    sampler = {key: setting(config, f"model.sampling.{key}", kind) for key, kind in SAMPLER.items()}
    tf32 = setting(config, "allow_tf32", bool)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    reference_path = reference_path or setting(config, "callbacks.fid.reference_stats_path", str)
    callback = fd_callback(config, reference_path)
    extractor = callback.feature_extractor.to(device).eval()
    check_reference_record(callback, reference_path)
    reference = load_reference_statistics(reference_path, extractor, callback.batch_size, device)

    def fd(model: SamplingModel) -> float:
        statistics = callback.sample_statistics(ONE_PROCESS, SamplingModule(model, sampler, device))
        return frechet_distance(*statistics.compute(), *reference)

    steps = []
    for row in fd_rows(run, run.name, setting(config, "seed", int)):
        checkpoint = run / "checkpoints" / f"{row['step']:07d}.ckpt"
        if not checkpoint.is_file():
            continue
        ema = load_sampling_model(str(checkpoint), use_ema=True).to(device)
        raw = load_sampling_model(str(checkpoint), use_ema=False).to(device)
        record = {
            "step": row["step"],
            "logged_fd_ema": row["fd_effnet"],
            "logged_fd_raw": row["fd_effnet_raw"],
            "fd_ema": fd(ema),
            "fd_raw": fd(raw),
            "ema_batchnorm": batchnorm_statistics(ema),
            "raw_batchnorm": batchnorm_statistics(raw),
        }
        ema.sit.bn.running_mean.copy_(raw.sit.bn.running_mean)
        ema.sit.bn.running_var.copy_(raw.sit.bn.running_var)
        record["fd_ema_raw_batchnorm"] = fd(ema)
        print({key: value for key, value in record.items() if "batchnorm" not in key}, flush=True)
        steps.append(record)
    if not steps:
        raise FileNotFoundError(f"{run}: no checkpoint (checkpoints/<step>.ckpt) at a step with a logged FD")
    return {"run": str(run), "reference": reference_path, "sampler": dict(sampler), "steps": steps}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "run", type=Path, help="a run directory of repae.train (config.yaml, csv/, checkpoints/)"
    )
    parser.add_argument(
        "--reference", help="the FD reference (default: the run's callbacks.fid.reference_stats_path)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    with exit_on_bad_input():
        for name in ("config.yaml", "csv/metrics.csv"):
            if not (args.run / name).is_file():
                raise FileNotFoundError(f"{args.run}: no {name}; give the directory of a repae.train run")
        report(measure(args.run, torch.device(args.device), args.reference), args.output)


if __name__ == "__main__":
    main()
