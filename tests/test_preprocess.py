"""Preprocessing an image folder into the official images.h5: counts, labels, crop, skips, resume."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

import repae.preprocess as preprocess_module
from repae.datamodules.datasets import H5Images
from repae.datamodules.transforms import center_crop_arr
from repae.preprocess import preprocess

REPO = Path(__file__).resolve().parents[1]
GREEN, RED = (0, 200, 0), (200, 0, 0)


def _random_rgb(height: int, width: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def make_folder(root: Path) -> Path:
    """Two classes, seven files: five readable (RGB, greyscale, CMYK, RGBA, a tiny one) and two
    unreadable (garbage bytes, a truncated JPEG). Sorted order: cat/a, cat/b, cat/c, dog/d, dog/e, dog/f, dog/g."""
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    # 64x32 (W x H): red 16 px bands left and right, green centre; the 32 px crop is the green square.
    stripes = np.zeros((32, 64, 3), dtype=np.uint8)
    stripes[:] = GREEN
    stripes[:, :16] = RED
    stripes[:, 48:] = RED
    Image.fromarray(stripes).save(root / "cat" / "a.png")
    Image.fromarray(np.tile(np.arange(0, 250, 5, dtype=np.uint8), (40, 1))).save(
        root / "cat" / "b.png"
    )  # 'L'
    Image.new("CMYK", (48, 48), (0, 128, 255, 0)).save(root / "cat" / "c.jpg")
    _random_rgb(90, 70, seed=1).convert("RGBA").save(root / "dog" / "d.png")
    (root / "dog" / "e.jpg").write_bytes(b"this is not an image")
    buffer = io.BytesIO()
    _random_rgb(64, 64, seed=2).save(buffer, format="JPEG")
    (root / "dog" / "f.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    _random_rgb(20, 24, seed=3).save(root / "dog" / "g.png")
    return root


@pytest.fixture
def folder(tmp_path) -> Path:
    return make_folder(tmp_path / "images")


def run(folder: Path, out: Path, **kwargs) -> dict:
    kwargs = {"resolution": 32, "num_workers": 0, "shard_size": 3, "progress": False, **kwargs}
    return preprocess(str(folder), str(out), **kwargs)


def stored_pngs(out: Path) -> list[bytes]:
    with h5py.File(out / "images.h5", "r") as f:
        return [np.asarray(f[name][()]).tobytes() for name in H5Images(str(out)).names]


def test_every_readable_image_is_written_with_its_label_and_unreadable_ones_are_reported(folder, tmp_path):
    out = tmp_path / "data"
    report = run(folder, out)
    dataset = H5Images(str(out))
    assert (report["num_files"], report["num_written"], report["num_skipped"]) == (7, 5, 2)
    assert len(dataset) == 5
    assert dataset.names == [f"00000/img0000000{i}.png" for i in range(5)]
    assert dataset.labels == [0, 0, 0, 1, 1]  # cat/a, cat/b, cat/c, dog/d, dog/g
    assert [entry["file"] for entry in report["skipped"]] == ["dog/e.jpg", "dog/f.jpg"]
    assert "UnidentifiedImageError" in report["skipped"][0]["error"]
    assert "truncated" in report["skipped"][1]["error"]
    assert json.loads((out / "preprocess_report.json").read_text()) == report
    assert not (out / "images.parts").exists()  # shards removed after the merge
    # Same layout as the official preprocessing.py: groups, PNG datasets and dataset.json listed.
    listing = json.loads((out / "images_h5.json").read_text())
    assert listing == ["00000", *dataset.names, "dataset.json"]


def test_images_are_adm_center_crops_in_rgb(folder, tmp_path):
    out = tmp_path / "data"
    run(folder, out)
    dataset = H5Images(str(out))
    images = [dataset[i]["image"] for i in range(len(dataset))]
    assert all(image.shape == (3, 32, 32) for image in images)
    # The 64x32 stripes image keeps its short side and loses 16 px left and right: all green.
    assert (images[0].permute(1, 2, 0) == torch.tensor(GREEN, dtype=torch.uint8)).all()
    grey = images[1]
    assert (grey[0] == grey[1]).all() and (grey[1] == grey[2]).all()
    # Bit-identical to the on-the-fly crop of ImageFolder (and the official center_crop_arr).
    readable = ["cat/a.png", "cat/b.png", "cat/c.jpg", "dog/d.png", "dog/g.png"]
    for image, name in zip(images, readable, strict=True):
        with Image.open(folder / name) as source:
            expected = np.asarray(center_crop_arr(source, 32))
        assert np.array_equal(image.permute(1, 2, 0).numpy(), expected), name
    # The PNGs are stored uncompressed, as preprocessing.py does.
    assert all(len(png) > 32 * 32 * 3 for png in stored_pngs(out))


def test_labels_come_from_an_edm_style_dataset_json(tmp_path):
    root = tmp_path / "flat"
    root.mkdir()
    for i in range(3):
        _random_rgb(40, 40, seed=i).save(root / f"img{i}.png")
    (root / "dataset.json").write_text(
        json.dumps({"labels": [["img0.png", 7], ["img1.png", 3], ["img2.png", 7]]})
    )
    run(root, tmp_path / "data")
    assert H5Images(str(tmp_path / "data")).labels == [7, 3, 7]


def test_max_images_keeps_the_first_files_in_sorted_order(folder, tmp_path):
    report = run(folder, tmp_path / "data", max_images=2)
    dataset = H5Images(str(tmp_path / "data"))
    assert (report["num_files"], len(dataset), report["num_skipped"]) == (2, 2, 0)
    assert dataset.labels == [0, 0]


def test_worker_processes_write_the_same_file_as_one_process(folder, tmp_path):
    run(folder, tmp_path / "serial", num_workers=0, shard_size=2)
    run(folder, tmp_path / "parallel", num_workers=2, shard_size=2)
    assert stored_pngs(tmp_path / "serial") == stored_pngs(tmp_path / "parallel")
    assert H5Images(str(tmp_path / "parallel")).labels == [0, 0, 0, 1, 1]


def test_an_interrupted_run_resumes_without_redoing_finished_shards(folder, tmp_path, monkeypatch):
    run(folder, tmp_path / "straight", shard_size=2)
    out = tmp_path / "resumed"
    encode = preprocess_module.encode_image

    def interrupt_at_file_3(dataset, index):
        if index == 3:
            raise KeyboardInterrupt
        return encode(dataset, index)

    monkeypatch.setattr(preprocess_module, "encode_image", interrupt_at_file_3)
    with pytest.raises(KeyboardInterrupt):
        run(folder, out, shard_size=2)
    parts = out / "images.parts"
    assert sorted(path.name for path in parts.glob("shard-*.h5")) == ["shard-00000.h5"]  # files 0, 1
    assert not (out / "images_h5.json").exists()
    # A shard left half-written by a killed worker is discarded, not merged.
    (parts / "shard-00001.tmp").write_bytes(b"partial")

    encoded = []

    def record(dataset, index):
        encoded.append(index)
        return encode(dataset, index)

    monkeypatch.setattr(preprocess_module, "encode_image", record)
    report = run(folder, out, shard_size=2)
    assert encoded == [2, 3, 4, 5, 6]  # shard 0 (files 0 and 1) was not redone
    assert report["num_written"] == 5 and report["num_skipped"] == 2
    assert stored_pngs(out) == stored_pngs(tmp_path / "straight")
    assert H5Images(str(out)).labels == H5Images(str(tmp_path / "straight")).labels


def test_resuming_with_other_settings_is_refused(folder, tmp_path):
    out = tmp_path / "data"
    run(folder, out, keep_work_dir=True)
    with pytest.raises(ValueError, match="different settings \\(resolution\\)"):
        run(folder, out, resolution=16)


def test_command_line_entry_point_writes_images_h5(folder, tmp_path):
    out = tmp_path / "data"
    result = subprocess.run(
        [sys.executable, "-m", "repae.preprocess", f"input_dir={folder}", f"output_dir={out}", "resolution=16",
         "num_workers=2", "shard_size=4", f"paths.log_dir={tmp_path / 'logs'}", "progress=false"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    dataset = H5Images(str(out))
    assert len(dataset) == 5 and dataset[0]["image"].shape == (3, 16, 16)
    assert json.loads((out / "preprocess_report.json").read_text())["num_skipped"] == 2
