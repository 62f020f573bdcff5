"""Is the naive arm's poor EMA FD its BatchNorm statistics? (docs/reproduction.md, "The naive arm's
EMA"):

    python scripts/study_ema_batchnorm.py logs/ema_bn/runs/naive_e2e_s0 \\
        --output docs/reproduction/ema_batchnorm_<card>_<commit>.json

The SiT samples in its normalised latent space, and its BatchNorm's running mean and variance map
the samples back to VAE latents (``SiT.denormalize_latents``). The EMA averages those buffers like
weights, as the official code does, so while the latents' variance falls during a run (the naive
end-to-end arm's, to ~1/30), the EMA's statistics lag the raw SiT's.

For each checkpoint of a one-process run at a step where it logged its FD, with that FD's own
protocol (``callbacks.fid`` of the run's config.yaml: samples, labels, noise and reference;
``model.sampling``), three Fréchet distances: the EMA SiT's, the raw SiT's, and that of the EMA SiT
with the raw SiT's BatchNorm statistics. The first two are the run's logged values measured again:
the JSON holds both, a check of the measurement. The run's files are data, never code: its config is
read as plain YAML (no interpolation), only typed values are taken from it, and its feature
extractor must be EfficientNet (an Inception weights file would be unpickled by torch-fidelity).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml

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
# callbacks.fid: the keys of a run's FD callback; any other would reach its sampler unseen here
FD_KEYS = {"_target_", "every_n_steps", "steps", "num_samples", "batch_size", "feature_extractor",
           "effnet_resolution", "inception_weights_path", "reference_dataset",
           "reference_from_datamodule_images", "reference_stats_path", "seed", "use_ema"}  # fmt: skip
MISSING = object()


def read_config(path: Path) -> dict:
    """A run's config.yaml as plain data: YAML's safe loader, interpolations left as text."""
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not YAML: {type(error).__name__}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a {type(config).__name__}, not a run's config")
    return config


def setting(config: Mapping, key: str, kind: type, default: object = MISSING):
    """The dotted ``key`` of a run's config, of type ``kind`` (a float may be written as an int);
    one error line naming the key, never its value, if it is missing or of another type."""
    value = config
    for part in key.split("."):
        value = value.get(part, MISSING) if isinstance(value, Mapping) else MISSING
    if value is MISSING:
        if default is MISSING:
            raise ValueError(f"the run's config.yaml has no {key}")
        return default
    kinds = (int, float) if kind is float else kind
    if not isinstance(value, kinds) or (isinstance(value, bool) and kind is not bool):
        raise ValueError(
            f"the run's config.yaml: {key} is a {type(value).__name__}, not of type {kind.__name__}"
        )
    return float(value) if kind is float else value


def sampling_module(model: SamplingModel, sampler: Mapping, device: torch.device) -> SimpleNamespace:
    """What ``DistributionMetricCallback.sample_statistics`` reads of the training module, for a
    ``SamplingModel``: its SiT (EMA or raw) was chosen when it was loaded, so ``use_ema`` is moot."""

    def generate(labels, noise, use_ema: bool = True, **sampler_kwargs) -> torch.Tensor:
        return model.generate(labels, noise, **{**sampler, **sampler_kwargs})

    return SimpleNamespace(
        device=device, num_classes=model.num_classes, latent_shape=model.latent_shape, generate=generate
    )


def fd_callback(config: Mapping, reference_path: str) -> DistributionMetricCallback:
    """The run's FD callback, built from the values of ``callbacks.fid`` in its config (its
    ``_target_`` and dataset configs are not used), with its feature extractor."""
    fid = setting(config, "callbacks.fid", dict)
    unknown = sorted(map(str, set(fid) - FD_KEYS))
    if unknown:
        raise ValueError(
            f"the run's config.yaml: callbacks.fid has keys this script does not reproduce: {unknown}"
        )
    if setting(config, "callbacks.fid.use_ema", bool, True) is not True:
        raise ValueError("the run's config.yaml: callbacks.fid.use_ema must be true (its FD is the EMA's)")
    # The logged raw FD is compared with the raw FD measured here under callbacks.fid's protocol.
    fid_raw = setting(config, "callbacks.fid_raw", dict, None)
    if fid_raw is not None and (
        fid_raw.get("use_ema") is not False
        or {k: v for k, v in fid_raw.items() if k != "use_ema"}
        != {k: v for k, v in fid.items() if k != "use_ema"}
    ):
        raise ValueError("the run's config.yaml: callbacks.fid_raw must be callbacks.fid with use_ema: false")
    if setting(config, "callbacks.fid.feature_extractor", str, "effnet") != "effnet":
        raise ValueError("the run's config.yaml: callbacks.fid.feature_extractor must be effnet")
    steps = setting(config, "callbacks.fid.steps", list)
    if not all(isinstance(step, int) and not isinstance(step, bool) for step in steps):
        raise ValueError("the run's config.yaml: callbacks.fid.steps must be a list of step numbers")
    callback = DistributionMetricCallback(
        num_samples=setting(config, "callbacks.fid.num_samples", int),
        batch_size=setting(config, "callbacks.fid.batch_size", int),
        steps=steps,
        feature_extractor="effnet",
        reference_stats_path=reference_path,
        effnet_resolution=setting(config, "callbacks.fid.effnet_resolution", int, 128),
        seed=setting(config, "callbacks.fid.seed", int, 0),
    )
    callback.setup(ONE_PROCESS, SimpleNamespace(), "fit")
    return callback


def use_raw_batchnorm(ema_sit: torch.nn.Module, raw_sit: torch.nn.Module) -> None:
    """Give the EMA SiT the raw SiT's BatchNorm running mean and variance, and nothing else."""
    ema_sit.bn.running_mean.copy_(raw_sit.bn.running_mean)
    ema_sit.bn.running_var.copy_(raw_sit.bn.running_var)


def batchnorm_statistics(model: SamplingModel) -> dict[str, list[float]]:
    """Per latent channel, the running mean and variance that map the SiT's samples back to VAE latents."""
    return {
        "running_mean": model.sit.bn.running_mean.tolist(),
        "running_var": model.sit.bn.running_var.tolist(),
    }


@torch.no_grad()
def measure(run: Path, device: torch.device, reference_path: str | None = None) -> dict:
    """The three FDs at each step with a logged FD and a checkpoint, beside the logged FDs."""
    config = read_config(run / "config.yaml")  # repae.train writes it resolved: the values are there
    processes = setting(config, "trainer.devices", int, 1) * setting(config, "trainer.num_nodes", int, 1)
    if processes != 1:  # the run's samples would be split over its processes, each with its own noise
        raise ValueError(
            "the run's config.yaml: trainer.devices x trainer.num_nodes must be 1 (a one-process run)"
        )
    sampler = {key: setting(config, f"model.sampling.{key}", kind) for key, kind in SAMPLER.items()}
    tf32 = setting(config, "allow_tf32", bool)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    reference_path = reference_path or setting(config, "callbacks.fid.reference_stats_path", str)
    callback = fd_callback(config, reference_path)
    extractor = callback.feature_extractor.to(device).eval()
    check_reference_record(callback, reference_path)
    reference = load_reference_statistics(reference_path, extractor, callback.batch_size, device)

    def fd(model: SamplingModel) -> float:
        statistics = callback.sample_statistics(ONE_PROCESS, sampling_module(model, sampler, device))
        return frechet_distance(*statistics.compute(), *reference)

    steps = []
    try:
        rows = fd_rows(run, run.name, setting(config, "seed", int), sorted(callback.steps))
    except KeyError as error:
        raise ValueError(f"{run / 'csv' / 'metrics.csv'} has no column {error}") from None
    for row in rows:
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
        use_raw_batchnorm(ema.sit, raw.sit)
        record["fd_ema_raw_batchnorm"] = fd(ema)
        print({key: value for key, value in record.items() if "batchnorm" not in key}, file=sys.stderr)
        steps.append(record)
    if not steps:
        raise FileNotFoundError(f"{run}: no checkpoint (checkpoints/<step>.ckpt) at a step with a logged FD")
    return {"run": str(run), "reference": reference_path, "sampler": sampler, "steps": steps}


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
