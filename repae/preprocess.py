"""Image folder -> the official ``images.h5`` (reference section 2.1).

``python -m repae.preprocess input_dir=/data/imagenet/train output_dir=data [resolution=256] [num_workers=16]``

The folder is read like ``ImageFolder`` (PIL-readable files found recursively and sorted; labels
from ``dataset.json`` or the sorted class directories) and every image gets the ADM center crop.
Work is split into shards of ``shard_size`` consecutive files, encoded in parallel by
``num_workers`` processes; each finished shard is an HDF5 file in ``work_dir``, written under a
temporary name and renamed when complete, so an interrupted run restarts with the shards it has
not finished. When all shards exist they are merged, in order, into ``images.h5`` and
``images_h5.json``, and the work directory is removed.

Unreadable files are skipped: ``preprocess_report.json`` (next to ``images.h5``) counts and lists
them with the error. Images keep consecutive indices, so a skipped file shifts the later indices.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import hydra
import numpy as np
from omegaconf import DictConfig
from tqdm import tqdm

from repae.cli import exit_on_bad_input
from repae.datamodules.datasets import CorruptSampleError, ImageFolder, encode_png, write_h5_encoded_images

log = logging.getLogger(__name__)

REPORT_NAME = "preprocess_report.json"

# The folder of the current process: set once per worker by ``_set_folder`` (a Pool initializer), so
# the file list is not sent again with every shard.
_folder: ImageFolder | None = None


def _set_folder(folder: ImageFolder) -> None:
    global _folder
    _folder = folder


def encode_image(folder: ImageFolder, index: int) -> bytes:
    """The ADM-cropped image ``index`` of ``folder`` as uncompressed PNG bytes.

    Raises:
        CorruptSampleError: the file cannot be decoded.
    """
    return encode_png(folder[index]["image"].permute(1, 2, 0).numpy())


def shard_file(work_dir: Path, shard: int) -> Path:
    return work_dir / f"shard-{shard:05d}.h5"


def write_shard(work_dir: Path, shard: int, indices: range) -> int:
    """Encode the files ``indices`` of this process's folder into ``shard-{shard}.h5``.

    The shard holds ``png`` (one uint8 array of PNG bytes per readable image), ``labels`` and
    ``files`` (relative paths) of those images, and ``skipped``, a JSON list of
    ``{"file", "error"}``. It appears under its final name only once complete.

    Returns:
        ``len(indices)``, for the progress bar.
    """
    folder = _folder
    pngs, labels, files, skipped = [], [], [], []
    for index in indices:
        try:
            pngs.append(np.frombuffer(encode_image(folder, index), dtype=np.uint8))
        except CorruptSampleError as err:
            cause = err.__cause__ or err
            skipped.append({"file": folder.files[index], "error": f"{type(cause).__name__}: {cause}"})
            continue
        labels.append(folder.labels[index])
        files.append(folder.files[index])
    final = shard_file(work_dir, shard)
    partial = final.with_suffix(".tmp")
    with h5py.File(partial, "w") as f:
        png = f.create_dataset("png", (len(pngs),), dtype=h5py.vlen_dtype(np.uint8))
        for i, data in enumerate(pngs):
            png[i] = data
        f.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
        f.create_dataset("files", data=files, dtype=h5py.string_dtype())
        f.create_dataset("skipped", data=json.dumps(skipped), dtype=h5py.string_dtype())
    partial.rename(final)
    return len(indices)


def _write_shard_task(task: tuple[Path, int, range]) -> int:
    return write_shard(*task)


def check_manifest(work_dir: Path, manifest: dict[str, Any]) -> None:
    """Record the settings of a resumable run in ``work_dir``; refuse to resume work made with
    other settings (other images, resolution or VAE). Shared by preprocessing and latent caching."""
    path = work_dir / "manifest.json"
    if path.is_file():
        previous = json.loads(path.read_text())
        if previous != manifest:
            changed = sorted(key for key in manifest if previous.get(key) != manifest[key])
            raise ValueError(
                f"{work_dir} holds the work of an earlier run with different settings ({', '.join(changed)}). "
                f"Re-run with the same settings to resume it, or delete {work_dir} to start over."
            )
        return
    partial = work_dir / f"manifest.json.{os.getpid()}.tmp"
    partial.write_text(json.dumps(manifest, indent=1))
    os.replace(partial, path)


def _shard_pngs(paths: list[Path]) -> Iterator[bytes]:
    for path in paths:
        with h5py.File(path, "r") as f:
            png = f["png"]
            for i in range(len(png)):
                yield png[i].tobytes()


def preprocess(
    input_dir: str,
    output_dir: str,
    resolution: int = 256,
    num_workers: int = 16,
    max_images: int | None = None,
    shard_size: int = 1000,
    work_dir: str | None = None,
    keep_work_dir: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``images.h5``, ``images_h5.json`` and ``preprocess_report.json`` into ``output_dir``.

    Args:
        input_dir: an ImageNet-style folder (one directory per class) or a folder with an
            EDM-style ``dataset.json`` of labels.
        output_dir: folder of the outputs (created if needed).
        resolution: side of the square ADM center crop.
        num_workers: encoding processes; 0 encodes in this process.
        max_images: use only the first ``max_images`` files in sorted order (``None``: all).
        shard_size: files per shard, the unit of resumption.
        work_dir: shard folder; default ``{output_dir}/images.parts``.
        keep_work_dir: keep the shards after the merge instead of deleting them.
        progress: show a progress bar (in files).

    Returns:
        The report: ``num_files``, ``num_written``, ``num_skipped`` and ``skipped`` (a list of
        ``{"file", "error"}``), plus the settings.
    """
    folder = ImageFolder(input_dir, image_size=resolution)
    num_files = len(folder) if max_images is None else min(max_images, len(folder))
    out_dir = Path(output_dir)
    parts = Path(work_dir) if work_dir else out_dir / "images.parts"
    parts.mkdir(parents=True, exist_ok=True)
    listing = hashlib.sha1(
        json.dumps([folder.files[:num_files], folder.labels[:num_files]]).encode("utf-8")
    ).hexdigest()
    settings = {
        "input_dir": str(Path(input_dir).resolve()),
        "resolution": resolution,
        "max_images": max_images,
        "shard_size": shard_size,
        "num_files": num_files,
    }
    check_manifest(parts, {**settings, "files_sha1": listing})
    for stale in parts.glob("*.tmp"):  # shards whose writer was interrupted
        stale.unlink()

    shards = [range(start, min(start + shard_size, num_files)) for start in range(0, num_files, shard_size)]
    pending = [(parts, k, indices) for k, indices in enumerate(shards) if not shard_file(parts, k).is_file()]
    done = num_files - sum(len(indices) for _, _, indices in pending)
    if done:
        log.info(
            "Resuming: %d of %d shards already encoded in %s", len(shards) - len(pending), len(shards), parts
        )
    with tqdm(total=num_files, initial=done, unit="img", desc="preprocess", disable=not progress) as bar:
        if num_workers > 0 and len(pending) > 1:
            context = multiprocessing.get_context()
            with context.Pool(
                min(num_workers, len(pending)), initializer=_set_folder, initargs=(folder,)
            ) as pool:
                for count in pool.imap_unordered(_write_shard_task, pending):
                    bar.update(count)
        else:
            _set_folder(folder)
            for task in pending:
                bar.update(_write_shard_task(task))

    # images_h5.json is written last by the merge: its absence marks an unfinished images.h5.
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "images_h5.json").unlink(missing_ok=True)
    shard_paths = [shard_file(parts, k) for k in range(len(shards))]
    labels: list[int] = []
    skipped: list[dict[str, str]] = []
    for path in shard_paths:
        with h5py.File(path, "r") as f:
            labels.extend(int(label) for label in f["labels"][()])
            skipped.extend(json.loads(f["skipped"].asstr()[()]))
    if not labels:
        raise ValueError(
            f"none of the {num_files} image files under {input_dir} could be read, e.g. {skipped[0]['file']}: "
            f"{skipped[0]['error']}"
        )
    num_written = write_h5_encoded_images(out_dir, _shard_pngs(shard_paths), labels)
    report = {**settings, "num_written": num_written, "num_skipped": len(skipped), "skipped": skipped}
    (out_dir / REPORT_NAME).write_text(json.dumps(report, indent=1))
    if not keep_work_dir:
        shutil.rmtree(parts)
    log.info(
        "Wrote %d images to %s; skipped %d unreadable files", num_written, out_dir / "images.h5", len(skipped)
    )
    for entry in skipped:
        log.warning("skipped %s: %s", entry["file"], entry["error"])
    return report


@hydra.main(version_base="1.3", config_path="../conf", config_name="preprocess")
def main(cfg: DictConfig) -> None:
    with exit_on_bad_input(log=log):
        preprocess(
            input_dir=cfg.input_dir,
            output_dir=cfg.output_dir,
            resolution=cfg.resolution,
            num_workers=cfg.num_workers,
            max_images=cfg.max_images,
            shard_size=cfg.shard_size,
            work_dir=cfg.work_dir,
            keep_work_dir=cfg.keep_work_dir,
            progress=cfg.progress,
        )


if __name__ == "__main__":
    main()
