"""Datasets, the ADM center crop and the resumable ImageDataModule."""

from __future__ import annotations

import gzip
import io
import json
import pickle
from pathlib import Path
from types import SimpleNamespace

import h5py
import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from repae.datamodules.datamodule import ImageDataModule, ResumableDistributedSampler
from repae.datamodules.datasets import (
    CachedLatents,
    CorruptSampleError,
    FashionMNIST,
    H5Images,
    ImageFolder,
    write_h5_encoded_images,
    write_h5_images,
    write_h5_latents,
)
from repae.datamodules.transforms import center_crop_arr

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
needs_fashion_mnist = pytest.mark.skipif(
    not (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed (make data)",
)


# ----------------------------------------------------------------------------- center crop


def test_center_crop_resizes_short_side_and_cuts_the_center_columns():
    # 100x60 -> 32: no halving (60 < 64), bicubic resize to round(100 * 32/60) = 53 x 32, crop x 10..41.
    x = np.arange(100)
    y = np.arange(60)
    arr = np.zeros((60, 100, 3), np.uint8)
    arr[..., 0] = 2 * x[None, :]
    arr[..., 1] = 4 * y[:, None]
    out = center_crop_arr(Image.fromarray(arr), 32)
    assert out.size == (32, 32) and out.mode == "RGB"
    out = np.asarray(out).astype(float)
    # Bicubic reproduces a linear ramp: output column c samples x = (10 + c + 0.5) * 100/53 - 0.5.
    for c in (0, 15, 31):
        expected = 2 * ((10 + c + 0.5) * 100 / 53 - 0.5)
        assert abs(out[16, c, 0] - expected) <= 1.0
    for r in (4, 16, 27):  # rows away from the border, where bicubic clamps
        expected = 4 * ((r + 0.5) * 60 / 32 - 0.5)
        assert abs(out[r, 16, 1] - expected) <= 1.0


def test_center_crop_halves_large_images_with_box_filter_before_cropping():
    # 256x128 -> 64: one BOX halving to 128x64 (2x2 means), no resize, crop columns 32..95.
    x = np.arange(256)
    y = np.arange(128)
    arr = np.zeros((128, 256, 3), np.uint8)
    arr[..., 0] = (x // 2)[None, :]  # constant on each 2x2 block, so the BOX mean is exact
    arr[..., 1] = (y // 2)[:, None]
    out = np.asarray(center_crop_arr(Image.fromarray(arr), 64))
    assert out.shape == (64, 64, 3)
    np.testing.assert_array_equal(out[..., 0], np.broadcast_to(32 + np.arange(64)[None, :], (64, 64)))
    np.testing.assert_array_equal(out[..., 1], np.broadcast_to(np.arange(64)[:, None], (64, 64)))


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P", "I;16"])
def test_center_crop_converts_any_mode_to_rgb(mode):
    image = Image.new(mode, (40, 50))
    out = center_crop_arr(image, 32)
    assert out.mode == "RGB" and out.size == (32, 32)


# ----------------------------------------------------------------------------- Fashion-MNIST


@needs_fashion_mnist
def test_fashion_mnist_pads_28_to_32_and_repeats_grey_to_rgb():
    ds = FashionMNIST(split="train", image_size=32, max_images=64)
    with gzip.open(FASHION_MNIST / "train-images-idx3-ubyte.gz") as f:
        raw = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:64]
    assert len(ds) == 64
    for i in (0, 1, 63):
        sample = ds[i]
        image = sample["image"]
        assert image.shape == (3, 32, 32) and image.dtype == torch.uint8
        assert sample["label"].dtype == torch.int64
        assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
        np.testing.assert_array_equal(image[0, 2:30, 2:30].numpy(), raw[i])
        border = torch.ones(32, 32, dtype=torch.bool)
        border[2:30, 2:30] = False
        assert image[:, border].sum() == 0
        assert image.max() > 200 and (image[0] > 0).sum() > 50  # real product photos, not blank
    labels = [int(ds[i]["label"]) for i in range(len(ds))]
    assert min(labels) >= 0 and max(labels) <= 9 and len(set(labels)) > 5
    assert labels[:3] == [9, 0, 0]  # the first Fashion-MNIST training labels (ankle boot, T-shirt, T-shirt)


@needs_fashion_mnist
def test_fashion_mnist_test_split_and_resize():
    ds = FashionMNIST(split="test", image_size=64, max_images=4)
    assert len(ds) == 4
    assert ds[0]["image"].shape == (3, 64, 64)
    assert len(FashionMNIST(split="test")) == 10_000


def test_fashion_mnist_missing_directory_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        FashionMNIST(root=str(tmp_path / "nowhere"))


# ----------------------------------------------------------------------------- ImageFolder


def _make_image_folder(root: Path) -> None:
    rng = np.random.default_rng(0)
    (root / "dogs").mkdir(parents=True)
    (root / "cats" / "nested").mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(root / "cats" / "rgb.png")
    Image.fromarray(rng.integers(0, 256, (64, 48), dtype=np.uint8), mode="L").save(
        root / "cats" / "nested" / "grey.png"
    )
    Image.new("CMYK", (70, 36), (0, 255, 0, 0)).save(root / "dogs" / "cmyk.jpg")
    (root / "dogs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (root / "dogs" / "notes.txt").write_text("not an image")


def test_image_folder_labels_follow_sorted_class_directories(tmp_path):
    _make_image_folder(tmp_path)
    ds = ImageFolder(str(tmp_path), image_size=32)
    assert ds.files == ["cats/nested/grey.png", "cats/rgb.png", "dogs/broken.png", "dogs/cmyk.jpg"]
    assert ds.classes == ["cats", "dogs"]
    assert ds.labels == [0, 0, 1, 1]
    for i in (0, 1, 3):
        sample = ds[i]
        assert sample["image"].shape == (3, 32, 32) and sample["image"].dtype == torch.uint8
        assert int(sample["label"]) == ds.labels[i]
    grey = ds[0]["image"]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    magenta_cmyk = ds[3]["image"].float().mean(dim=(1, 2))  # CMYK (0, 255, 0, 0) is magenta
    assert magenta_cmyk[0] > 200 and magenta_cmyk[1] < 50 and magenta_cmyk[2] > 200


def test_image_folder_corrupt_file_raises_error_naming_it(tmp_path):
    _make_image_folder(tmp_path)
    ds = ImageFolder(str(tmp_path), image_size=32)
    with pytest.raises(CorruptSampleError, match="broken.png"):
        ds[ds.files.index("dogs/broken.png")]


def test_image_folder_reads_labels_from_dataset_json(tmp_path):
    _make_image_folder(tmp_path)
    labels = {"cats/nested/grey.png": 7, "cats/rgb.png": 3, "dogs/broken.png": 1, "dogs/cmyk.jpg": 5}
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": [[k, v] for k, v in labels.items()]}))
    ds = ImageFolder(str(tmp_path), image_size=32)
    assert ds.labels == [7, 3, 1, 5]
    assert int(ds[1]["label"]) == 3


def test_image_folder_without_subdirectories_is_one_class(tmp_path):
    for i in range(3):
        Image.new("RGB", (32, 32), (i, i, i)).save(tmp_path / f"{i}.png")
    ds = ImageFolder(str(tmp_path), image_size=32)
    assert ds.labels == [0, 0, 0]
    assert ds[2]["image"][0, 0, 0] == 2


# ----------------------------------------------------------------------------- HDF5


def _images(n: int, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_h5_writer_uses_the_official_layout(tmp_path):
    n = 1001  # crosses into the second 1000-image group
    count = write_h5_images(tmp_path, (img for img in _images(n, size=2)), range(n))
    assert count == n
    names = json.loads((tmp_path / "images_h5.json").read_text())
    assert {"00000", "00001", "00000/img00000000.png", "00001/img00001000.png", "dataset.json"} <= set(names)
    assert len(names) == n + 3  # two groups and dataset.json
    with h5py.File(tmp_path / "images.h5", "r") as f:
        png = f["00001/img00001000.png"][()]
        assert isinstance(png, np.void) and png.tobytes()[:8] == b"\x89PNG\r\n\x1a\n"
        labels = json.loads(f["dataset.json"][()].tobytes())["labels"]
    assert labels[1000] == ["00001/img00001000.png", 1000]
    ds = H5Images(str(tmp_path))
    assert len(ds) == n
    assert int(ds[1000]["label"]) == 1000 and int(ds[999]["label"]) == 999


def test_h5_images_round_trip_exactly_and_open_lazily(tmp_path):
    images = _images(5)
    labels = [3, 1, 4, 1, 5]
    write_h5_images(tmp_path, images, labels)
    ds = H5Images(str(tmp_path))
    assert ds.images.handle is None  # not opened in __init__
    pickle.dumps(ds)
    for i in range(5):
        sample = ds[i]
        assert sample["image"].dtype == torch.uint8
        np.testing.assert_array_equal(sample["image"].permute(1, 2, 0).numpy(), images[i])
        assert int(sample["label"]) == labels[i]
    assert ds.images.handle is not None
    clone = pickle.loads(pickle.dumps(ds))  # what a spawned worker receives
    assert clone.images.handle is None
    assert torch.equal(clone[2]["image"], ds[2]["image"])


def test_h5_images_corrupt_sample_names_file_and_key(tmp_path):
    write_h5_images(tmp_path, _images(3), [0, 1, 2])
    with h5py.File(tmp_path / "images.h5", "a") as f:
        del f["00000/img00000001.png"]
        f.create_dataset("00000/img00000001.png", data=np.void(b"garbage"))
    ds = H5Images(str(tmp_path))
    with pytest.raises(CorruptSampleError, match=r"00000/img00000001\.png.*images\.h5"):
        ds[1]
    assert ds[2]["image"].shape == (3, 16, 16)


def test_h5_images_missing_file_names_the_config_key_and_the_command_that_makes_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"set data\.dataset\.data_dir .*repae\.preprocess"):
        H5Images(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"set data_dir .*repae\.preprocess"):
        H5Images(str(tmp_path), config_key="data_dir")  # as repae.cache_latents names its setting


def test_cached_latents_pair_images_and_latents_by_position(tmp_path):
    images = _images(4)
    latents = np.random.default_rng(1).standard_normal((4, 8, 4, 4)).astype(np.float32)
    write_h5_images(tmp_path, images, [0, 0, 0, 0])
    write_h5_latents(tmp_path, "toy-vae", torch.from_numpy(latents), [2, 7, 1, 8])
    listing = json.loads((tmp_path / "toy-vae_h5.json").read_text())
    assert listing == [f"00000/img-mean-std-{i:08d}.npy" for i in range(4)] + ["dataset.json"]
    ds = CachedLatents(str(tmp_path), "toy-vae")
    assert ds.images.handle is None and ds.latents.handle is None
    pickle.dumps(ds)
    for i in range(4):
        sample = ds[i]
        np.testing.assert_array_equal(sample["image"].permute(1, 2, 0).numpy(), images[i])
        assert sample["latent"].dtype == torch.float32
        np.testing.assert_array_equal(sample["latent"].numpy(), latents[i])
    assert [int(ds[i]["label"]) for i in range(4)] == [2, 7, 1, 8]  # from the latent file
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 3, 16, 16) and batch["latent"].shape == (4, 8, 4, 4)
    assert batch["label"].dtype == torch.int64 and batch["label"].shape == (4,)


def test_cached_latents_length_mismatch_is_a_clear_error(tmp_path):
    write_h5_images(tmp_path, _images(4), range(4))
    write_h5_latents(tmp_path, "toy-vae", np.zeros((3, 8, 4, 4), np.float32), range(3))
    with pytest.raises(ValueError, match="4 images but .* 3 latents"):
        CachedLatents(str(tmp_path), "toy-vae")


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="png", compress_level=0)
    return buffer.getvalue()


def test_loaded_images_are_the_pixels_the_permuted_tensor_conversion_gave_in_any_png_mode(tmp_path):
    """Images are made channels-first by numpy (torch's copy was slow with several threads): the
    samples, and batches loaded in the main process with two threads, are those of the former
    ``torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)``."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (12, 20, 4), dtype=np.uint8)
    images = [
        Image.fromarray(pixels[..., :3]),
        Image.fromarray(pixels[..., 0], mode="L"),
        Image.fromarray(pixels, mode="RGBA"),
        Image.fromarray(pixels[..., :3]).convert("P", palette=Image.Palette.ADAPTIVE),
    ]
    write_h5_encoded_images(tmp_path, [_png(image) for image in images], range(len(images)))
    expected = torch.stack([
        torch.from_numpy(np.array(Image.open(io.BytesIO(_png(image))).convert("RGB"))).permute(2, 0, 1)
        for image in images
    ])  # fmt: skip
    dataset = H5Images(str(tmp_path))
    for i in range(len(images)):
        sample = dataset[i]["image"]
        assert sample.dtype == torch.uint8 and sample.is_contiguous()
        assert torch.equal(sample, expected[i])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        batch = next(iter(DataLoader(dataset, batch_size=len(images), num_workers=0)))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(batch["image"], expected)


# ----------------------------------------------------------------------------- sampler


def _epoch(sampler: ResumableDistributedSampler) -> list[int]:
    return list(iter(sampler))


def test_sampler_same_seed_and_epoch_give_the_same_order():
    a = ResumableDistributedSampler(range(50), batch_size=4, seed=3)
    b = ResumableDistributedSampler(range(50), batch_size=4, seed=3)
    assert _epoch(a) == _epoch(b)
    assert sorted(_epoch(a)) == list(range(50))
    first = _epoch(a)
    a.set_epoch(1)
    assert _epoch(a) != first and sorted(_epoch(a)) == list(range(50))
    a.set_epoch(0)
    assert _epoch(a) == first
    assert _epoch(ResumableDistributedSampler(range(50), batch_size=4, seed=4)) != first


def test_sampler_ranks_partition_the_epoch_without_overlap():
    ranks = [
        _epoch(ResumableDistributedSampler(range(51), batch_size=4, num_replicas=3, rank=r, seed=0))
        for r in range(3)
    ]
    assert all(len(indices) == 17 for indices in ranks)
    union = set().union(*ranks)
    assert len(union) == 51 and union == set(range(51))
    # drop_last truncates to a multiple of the world size, like DistributedSampler
    ranks = [_epoch(ResumableDistributedSampler(range(10), 1, num_replicas=4, rank=r)) for r in range(4)]
    assert all(len(indices) == 2 for indices in ranks) and len(set().union(*ranks)) == 8
    # without drop_last the ranks are padded by wrapping around
    ranks = [
        _epoch(ResumableDistributedSampler(range(10), 1, num_replicas=4, rank=r, drop_last=False))
        for r in range(4)
    ]
    assert all(len(indices) == 3 for indices in ranks) and set().union(*ranks) == set(range(10))


def test_sampler_start_batch_yields_the_tail_of_the_same_epoch():
    full = ResumableDistributedSampler(range(40), batch_size=4, num_replicas=2, rank=1, seed=5, epoch=2)
    resumed = ResumableDistributedSampler(
        range(40), batch_size=4, num_replicas=2, rank=1, seed=5, epoch=2, start_batch=3
    )
    assert _epoch(resumed) == _epoch(full)[12:]
    assert len(resumed) == len(full) == 20  # full epoch length, Lightning's batch counter resumes at 3
    resumed.set_epoch(2)  # Lightning re-announces the current epoch on restart: keep the offset
    assert _epoch(resumed) == _epoch(full)[12:]
    resumed.set_epoch(3)  # a new epoch starts from its first batch
    full.set_epoch(3)
    assert _epoch(resumed) == _epoch(full)


# ----------------------------------------------------------------------------- data module


class IndexDataset(Dataset):
    """Sample i has label i, so batches show which samples were drawn; "noise" reveals worker RNG."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            "image": torch.zeros(3, 2, 2, dtype=torch.uint8),
            "label": torch.tensor(index),
            "noise": torch.rand(()),
        }


def _fake_trainer(world_size: int = 1, rank: int = 0, epoch: int = 0) -> SimpleNamespace:
    return SimpleNamespace(world_size=world_size, global_rank=rank, current_epoch=epoch, training=True)


def test_global_batch_is_split_across_devices():
    dm = ImageDataModule(IndexDataset(32), batch_size=8, num_workers=0)
    dm.trainer = _fake_trainer(world_size=2, rank=1)
    dm.setup("fit")
    assert dm.batch_size_per_device == 4
    loader = dm.train_dataloader()
    assert loader.batch_size == 4
    assert loader.sampler.num_replicas == 2 and loader.sampler.rank == 1
    assert len(loader) == 4  # 32 samples / 2 ranks / 4 per device


def test_global_batch_not_divisible_by_world_size_raises():
    dm = ImageDataModule(IndexDataset(32), batch_size=10, num_workers=0)
    dm.trainer = _fake_trainer(world_size=4)
    with pytest.raises(ValueError, match="divisible by the number of devices"):
        dm.setup("fit")


def _labels(batches) -> list[list[int]]:
    return [batch["label"].tolist() for batch in batches]


def test_state_dict_round_trip_resumes_the_remaining_batches():
    dataset = IndexDataset(30)
    dm = ImageDataModule(dataset, batch_size=4, num_workers=0, seed=7)
    dm.trainer = _fake_trainer(epoch=1)
    dm.setup("fit")
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(1)
    uninterrupted = _labels(loader)
    assert len(uninterrupted) == 7  # 30 // 4, last partial batch dropped

    consumed = []
    for batch in loader:
        consumed.append(dm.on_after_batch_transfer(batch, 0)["label"].tolist())
        if len(consumed) == 3:
            break
    state = dm.state_dict()
    assert state == {"epoch": 1, "batches_consumed": 3}

    restored = ImageDataModule(dataset, batch_size=4, num_workers=0, seed=7)
    restored.trainer = _fake_trainer(epoch=1)
    restored.load_state_dict(state)
    restored.setup("fit")
    resumed_loader = restored.train_dataloader()
    resumed_loader.sampler.set_epoch(1)
    assert consumed + _labels(resumed_loader) == uninterrupted

    # the next epoch starts from its first batch and the counter restarts
    restored.trainer.current_epoch = 2
    resumed_loader.sampler.set_epoch(2)
    next_epoch = _labels(resumed_loader)
    assert len(next_epoch) == 7 and next_epoch != uninterrupted
    restored.on_after_batch_transfer({}, 0)
    assert restored.state_dict() == {"epoch": 2, "batches_consumed": 1}


def test_batches_are_not_counted_outside_training():
    dm = ImageDataModule(IndexDataset(8), batch_size=4, num_workers=0)
    dm.trainer = _fake_trainer()
    dm.trainer.training = False
    dm.on_after_batch_transfer({}, 0)
    assert dm.state_dict() == {"epoch": 0, "batches_consumed": 0}


def test_worker_rng_depends_only_on_seed_epoch_rank_and_worker():
    dm = ImageDataModule(IndexDataset(16), batch_size=4, num_workers=2, persistent_workers=False)
    dm.setup("fit")
    loader = dm.train_dataloader()

    def noise(epoch):
        loader.sampler.set_epoch(epoch)
        return torch.cat([batch["noise"] for batch in loader])

    first = noise(0)
    assert torch.equal(noise(0), first)
    assert not torch.equal(noise(1), first)


# ----------------------------------------------------------------------------- Lightning resume


class RecordingModule(L.LightningModule):
    """Records the labels of every training batch; one dummy parameter so the optimizer steps."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["label"].tolist())
        return self.weight * 0.0 + self.weight.square()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(dataset, max_steps, ckpt_dir=None, ckpt_path=None) -> list[list[int]]:
    callbacks = []
    if ckpt_dir is not None:
        callbacks.append(
            L.pytorch.callbacks.ModelCheckpoint(
                dirpath=ckpt_dir, filename="{step}", every_n_train_steps=1, save_top_k=-1
            )
        )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        use_distributed_sampler=False,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=ckpt_dir is not None,
        callbacks=callbacks,
    )
    module = RecordingModule()
    datamodule = ImageDataModule(dataset, batch_size=2, num_workers=0, seed=1)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return module.seen


@pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning")
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_lightning_resume_from_checkpoint_sees_the_same_batches(tmp_path):
    dataset = IndexDataset(12)  # 6 batches per epoch
    uninterrupted = _fit(dataset, max_steps=15, ckpt_dir=tmp_path)
    assert len(uninterrupted) == 15
    assert sorted(sum(uninterrupted[:6], [])) == list(range(12))
    assert uninterrupted[6:12] != uninterrupted[:6]  # reshuffled each epoch
    # step 8: early in epoch 1 (2 of 6 batches); step 6: the last batch of epoch 0
    for step in (8, 6, 3):
        resumed = _fit(dataset, max_steps=15, ckpt_path=str(tmp_path / f"step={step}.ckpt"))
        assert uninterrupted[:step] + resumed == uninterrupted, f"resume from step {step}"
