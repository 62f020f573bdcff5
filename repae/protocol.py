"""The protocol record: everything besides the model that decides whether two metric values compare.

A FID means little without the number of samples, the label sampling, the sampler and its guidance,
the reference statistics and the feature extractor they were made with. :func:`build_protocol` gathers
these fields into one JSON-able dict, which ``repae.generate`` writes beside the samples,
``repae.evaluate`` writes with its results and the FID callbacks write into the run directory.
:func:`protocol_differences` names the fields that change FID in which two records differ.

Reference statistics files written by repae record the extractor and its input resolution
(:func:`reference_record`); :func:`check_reference` refuses a file made with others.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

import repae
from repae.git import git

FID_50K = 50_000
CHUNK_BYTES = 16 * 2**20
# The record keys of a reference statistics file (0-d arrays, readable without pickle).
REFERENCE_EXTRACTOR_KEY = "feature_extractor"
REFERENCE_RESOLUTION_KEY = "feature_resolution"
INCEPTION_RESOLUTION = 299  # the TF graph resizes every image to 299x299
# Fields of the record that change FID; the others (seeds, versions, the checkpoint) identify a run.
FID_FIELDS = (
    "num_samples",
    "label_sampling",
    "sampler",
    "precision",
    "weights",
    "reference_sha256",
    "inception_sha256",
    "feature_extractor",
    "feature_resolution",
)

_hash_cache: dict[tuple[str, int, int], str] = {}


def sha256_of_file(path: str | os.PathLike | None) -> str | None:
    """SHA-256 of a file, read in chunks; cached per ``(path, size, mtime)`` for this process.
    None when ``path`` is None or not a file (e.g. the running model of a training run)."""
    if path is None or not os.path.isfile(path):
        return None
    stat = os.stat(path)
    key = (os.path.abspath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _hash_cache:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK_BYTES):
                digest.update(chunk)
        _hash_cache[key] = digest.hexdigest()
    return _hash_cache[key]


def source_commit() -> str:
    """The git commit of the repae source, "unknown" when it is not a git checkout (an installed wheel)."""
    source = Path(repae.__file__).resolve().parent.parent
    if not (source / ".git").exists():
        return "unknown"
    return git(source, "rev-parse", "HEAD") or "unknown"


def feature_resolution(feature_extractor: str, effnet_resolution: int) -> int:
    """The input size the extractor resizes images to: 299 for Inception, ``effnet_resolution`` else."""
    return INCEPTION_RESOLUTION if feature_extractor == "inception" else int(effnet_resolution)


def build_protocol(
    *,
    num_samples: int | None = None,
    label_sampling: str | None = None,
    sampler: Mapping[str, Any] | None = None,
    seeds: Mapping[str, int] | None = None,
    precision: str | None = None,
    compile: bool | None = None,
    use_ema: bool | None = None,
    checkpoint_path: str | None = None,
    reference_path: str | None = None,
    inception_weights_path: str | None = None,
    feature_extractor: str | None = None,
    feature_resolution: int | None = None,
) -> dict[str, Any]:
    """The protocol record of a metric or of a sample set (fields not known to the caller are None).

    ``sampler`` takes the keys of ``conf/generate.yaml``'s ``sampler`` (``mode``, ``num_steps``,
    ``heun``, ``cfg_scale``, ``guidance_low``, ``guidance_high``); the record keeps those that decide
    the samples and states the guidance interval as ``[low, high]``.
    """
    sampler_record = None
    if sampler is not None:
        sampler_record = {
            "mode": sampler.get("mode", "ode"),
            "num_steps": sampler.get("num_steps"),
            "heun": bool(sampler.get("heun", False)),
            "cfg_scale": sampler.get("cfg_scale", 1.0),
            "guidance_interval": [sampler.get("guidance_low", 0.0), sampler.get("guidance_high", 1.0)],
        }
    return {
        "num_samples": num_samples,
        "label_sampling": label_sampling,
        "sampler": sampler_record,
        "seeds": dict(seeds) if seeds is not None else None,
        "precision": precision,
        "compile": compile,
        "weights": None if use_ema is None else ("ema" if use_ema else "raw"),
        "checkpoint_sha256": sha256_of_file(checkpoint_path),
        "reference_sha256": sha256_of_file(reference_path),
        "inception_sha256": sha256_of_file(inception_weights_path) if feature_extractor != "effnet" else None,
        "feature_extractor": feature_extractor,
        "feature_resolution": feature_resolution,
        "repae_version": repae.__version__,
        "git_commit": source_commit(),
        "torch_version": torch.__version__,
    }


def protocol_differences(first: Mapping[str, Any], second: Mapping[str, Any]) -> list[str]:
    """One line per FID-changing field whose values are both known and differ."""
    differences = []
    for key in FID_FIELDS:
        a, b = first.get(key), second.get(key)
        if a is not None and b is not None and a != b:
            differences.append(f"{key}: {a} vs {b}")
    return differences


def sample_count_warning(protocol: Mapping[str, Any], metrics: Mapping[str, float]) -> str | None:
    """A warning when a FID comes from fewer than 50,000 samples (FID is biased upwards in fewer)."""
    count = protocol.get("num_samples")
    if "fid" in metrics and count is not None and count < FID_50K:
        return f"FID of {count} samples: not comparable with FID-50K numbers (FID falls as samples grow)"
    return None


# --- reference statistics files ----------------------------------------------------------------
def reference_record_arrays(feature_extractor: str, resolution: int) -> dict[str, np.ndarray]:
    """The arrays that record, in a reference ``.npz``, the extractor and resolution of its statistics."""
    return {
        REFERENCE_EXTRACTOR_KEY: np.array(feature_extractor),
        REFERENCE_RESOLUTION_KEY: np.array(int(resolution)),
    }


def reference_record(path: str) -> dict[str, Any] | None:
    """``{"feature_extractor", "feature_resolution"}`` recorded in a reference ``.npz``; None if unrecorded."""
    with np.load(path) as data:
        if REFERENCE_EXTRACTOR_KEY not in data.files:
            return None
        return {
            "feature_extractor": str(data[REFERENCE_EXTRACTOR_KEY]),
            "feature_resolution": int(data[REFERENCE_RESOLUTION_KEY]),
        }


def check_reference(path: str, feature_extractor: str, resolution: int) -> str | None:
    """Refuse (ValueError) a reference whose statistics were made with another extractor or resolution.

    Returns a warning for a file that records neither (e.g. ADM's ``VIRTUAL_imagenet256_labeled.npz``),
    naming what cannot be checked; None when the record matches."""
    record = reference_record(path)
    if record is None:
        return (
            f"{path!r} does not record the feature extractor and resolution its statistics were made "
            f"with: cannot check that they are {feature_extractor} at {resolution}px"
        )
    if record != {"feature_extractor": feature_extractor, "feature_resolution": int(resolution)}:
        raise ValueError(
            f"the reference {path!r} was made with {record['feature_extractor']} at "
            f"{record['feature_resolution']}px, but this evaluation uses {feature_extractor} at {resolution}px; "
            "its Fréchet distances would not compare (set the same extractor and resolution, or remake the reference)"
        )
    return None
