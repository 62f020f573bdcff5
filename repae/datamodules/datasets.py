"""Datasets (reference section 2).

Every dataset returns one sample as a dict ``{"image": uint8 [3, H, W], "label": int64 []}``;
``CachedLatents`` adds ``"latent": float32 [2C, h, w]`` (``[mean; std]`` of the VAE posterior).
The default collate turns these into ``{"image": [B, 3, H, W], "label": [B], "latent": [B, 2C, h, w]}``.

The HDF5 layout is the official one (``preprocessing.py`` / ``cache_latents.py``), so files made by
the official tools and by ``write_h5_images`` / ``write_h5_latents`` are interchangeable:

- ``images.h5``: dataset ``{idx[:5]}/img{idx}.png`` (``idx = f"{i:08d}"``) holding the bytes of an
  uncompressed PNG as a scalar, plus a bytes dataset ``dataset.json`` = ``{"labels": [[key, label], ...]}``;
  ``images_h5.json`` lists every object name in the file.
- ``{name}.h5``: float32 dataset ``{idx[:5]}/img-mean-std-{idx}.npy`` of shape [2C, h, w] and
  ``dataset.json``; ``{name}_h5.json`` lists the dataset keys.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from repae.datamodules.transforms import center_crop_arr

# Errors PIL / h5py / numpy raise on truncated or garbage content, and PIL's refusal to decode
# images beyond its pixel limit (a decompression-bomb guard).
_DECODE_ERRORS = (
    OSError,
    UnidentifiedImageError,
    ValueError,
    SyntaxError,
    KeyError,
    Image.DecompressionBombError,
)


class CorruptSampleError(RuntimeError):
    """A sample could not be read or decoded; the message names the file (and HDF5 key)."""


def image_extensions() -> set[str]:
    """Lower-case file extensions PIL can open, e.g. ``{".png", ".jpg", ...}``."""
    return {ext.lower() for ext in Image.registered_extensions()}


def _image_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image -> uint8 tensor [3, H, W] (RGB).

    numpy makes the channels-first copy: torch splits its copy of a permuted uint8 image over its
    intra-op threads, and with two (``data.num_workers=0`` on 2 cores) a sample cost 6-7x its CPU
    time in a DataLoader worker, which runs one thread: docs/performance.md, "Data loading".
    """
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).transpose(2, 0, 1).copy())


def _as_bytes(value: Any) -> bytes:
    """Bytes stored in an HDF5 scalar dataset (``np.void``, ``bytes`` or a uint8 array)."""
    return value if isinstance(value, bytes) else np.asarray(value).tobytes()


def _sample(image: torch.Tensor, label: int, **extra: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"image": image, "label": torch.tensor(label, dtype=torch.int64), **extra}


class FashionMNIST(Dataset):
    """Fashion-MNIST from the gzip IDX files of Debian's ``dataset-fashion-mnist`` package.

    Images are 28x28 greyscale; for ``image_size == 32`` they are zero-padded by 2 px on each side
    (no resampling), otherwise resized with BICUBIC. The grey channel is repeated to RGB.

    Args:
        root: folder holding ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``.
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000 images).
        image_size: output side.
        max_images: keep only the first ``max_images`` samples (``None``: all).
        class_labels: False gives every image the label 0, for a class-unconditional model
            (``model.sit.num_classes=1``: the study's variant ``unconditional``).
    """

    classes = (
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    )  # fmt: skip

    def __init__(
        self,
        root: str = "/usr/share/datasets/fashion-mnist",
        split: str = "train",
        image_size: int = 32,
        max_images: int | None = None,
        class_labels: bool = True,
    ):
        if split not in ("train", "test"):
            raise ValueError(f"FashionMNIST split must be 'train' or 'test', got {split!r}")
        prefix = "train" if split == "train" else "t10k"
        root_path = Path(root)
        images_file = root_path / f"{prefix}-images-idx3-ubyte.gz"
        labels_file = root_path / f"{prefix}-labels-idx1-ubyte.gz"
        for file in (images_file, labels_file):
            if not file.is_file():
                raise FileNotFoundError(
                    f"Fashion-MNIST file {file} not found. Install the data with "
                    "`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or set data.dataset.root "
                    "to a folder holding the four original *-ubyte.gz IDX files."
                )
        self.images = _read_idx(images_file, magic=2051, keep=max_images)  # [N, 28, 28] uint8
        self.labels = _read_idx(labels_file, magic=2049, keep=max_images)  # [N] uint8
        if len(self.images) != len(self.labels):
            raise ValueError(f"{images_file} and {labels_file} hold different numbers of samples")
        self.image_size = image_size
        self.class_labels = class_labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        grey = self.images[index]
        if self.image_size == 32:
            grey = np.pad(grey, 2)
        else:
            grey = np.array(
                Image.fromarray(grey).resize((self.image_size, self.image_size), resample=Image.BICUBIC)
            )
        image = torch.from_numpy(grey).unsqueeze(0).repeat(3, 1, 1)
        return _sample(image, int(self.labels[index]) if self.class_labels else 0)


def _read_idx(path: Path, magic: int, keep: int | None = None) -> np.ndarray:
    """Read a gzip IDX file (big-endian header: magic, then one uint32 per dimension), or of its
    items only ``[:keep]``, decompressing no further than those (the 60,000 training images take a
    quarter of a second, a tiny run's 64 of them nothing)."""
    with gzip.open(path, "rb") as f:
        header = f.read(4)
        found = int.from_bytes(header, "big") if len(header) == 4 else None
        if found != magic:
            raise ValueError(f"{path} is not an IDX file with magic number {magic} (found {found})")
        ndim = magic & 0xFF
        shape = tuple(int(s) for s in np.frombuffer(f.read(4 * ndim), dtype=">u4", count=ndim))
        items = len(range(shape[0])[:keep])
        item_size = int(np.prod(shape[1:]))
        data = f.read(items * item_size)
    return np.frombuffer(data, dtype=np.uint8).reshape(items, *shape[1:])


class ImageFolder(Dataset):
    """A folder of images, ADM-center-cropped on the fly (same transform as ``preprocessing.py``).

    Files with a PIL-known extension are found recursively and sorted by relative path. Labels come
    from an EDM-style ``<root>/dataset.json`` (``{"labels": [[relpath, label], ...]}``) if present,
    otherwise from the sorted names of the top-level directories (ImageNet: ``n01440764`` = 0, ...).
    A folder with no sub-directories is one class (label 0).

    Args:
        root: the image folder.
        image_size: output side.
    """

    def __init__(self, root: str, image_size: int = 256):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} not found: set data.dataset.root")
        extensions = image_extensions()
        self.files = sorted(
            (Path(folder) / name).relative_to(self.root).as_posix()
            for folder, _, names in os.walk(self.root, followlinks=True)  # symlinked class dirs count
            for name in names
            if os.path.splitext(name)[1].lower() in extensions
        )
        if not self.files:
            raise FileNotFoundError(f"no image files found under {self.root}: set data.dataset.root")
        labels_file = self.root / "dataset.json"
        if labels_file.is_file():
            self.classes = None
            labels = dict(json.loads(labels_file.read_text())["labels"])
            missing = [name for name in self.files if name not in labels]
            if missing:
                raise ValueError(f"{labels_file} has no label for {len(missing)} files, e.g. {missing[0]}")
            self.labels = [int(labels[name]) for name in self.files]
        else:
            top_dirs = [name.split("/")[0] if "/" in name else None for name in self.files]
            if all(top is None for top in top_dirs):
                self.classes = [""]
                self.labels = [0] * len(self.files)
            else:
                loose = [name for name, top in zip(self.files, top_dirs, strict=True) if top is None]
                if loose:
                    raise ValueError(
                        f"{self.root} mixes class directories with {len(loose)} loose files (e.g. {loose[0]}); "
                        "move them into a class directory or add a dataset.json with labels"
                    )
                self.classes = sorted(set(top_dirs))
                class_index = {name: i for i, name in enumerate(self.classes)}
                self.labels = [class_index[top] for top in top_dirs]
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        path = self.root / self.files[index]
        try:
            with Image.open(path) as image:
                cropped = center_crop_arr(image, self.image_size)
        except _DECODE_ERRORS as err:
            raise CorruptSampleError(f"cannot read image {path}: {err}") from err
        return _sample(_image_to_tensor(cropped), self.labels[index])


class _LazyH5:
    """An HDF5 file opened on first use in each process.

    A handle opened in the parent and inherited by forked DataLoader workers is shared state that
    h5py does not support (reference quirk 23), and an open handle cannot be pickled for spawned
    workers. So the handle is ``None`` until first access, re-opened when the process id changes,
    and dropped when pickled.
    """

    def __init__(self, path: Path):
        self.path = path
        self.handle: h5py.File | None = None
        self._pid: int | None = None

    def file(self) -> h5py.File:
        if self.handle is None or self._pid != os.getpid():
            self.handle = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self.handle

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "handle": None, "_pid": None}


def _require_file(path: Path, config_key: str) -> Path:
    """``path``, or an error naming the setting that points at its folder and the command that makes it."""
    if not path.is_file():
        written_by_preprocess = path.name in ("images.h5", "images_h5.json")
        made_by = "python -m repae.preprocess" if written_by_preprocess else "python -m repae.cache_latents"
        raise FileNotFoundError(
            f"{path} not found: set {config_key} to the folder that `{made_by}` wrote it into "
            "(images.h5 and images_h5.json from repae.preprocess; {name}.h5 and {name}_h5.json from "
            "repae.cache_latents)"
        )
    return path


def _read_h5_labels(path: Path) -> dict[str, int]:
    """The ``{"labels": [[key, label], ...]}`` table stored in the file's ``dataset.json``."""
    with h5py.File(path, "r") as f:
        return {key: int(label) for key, label in json.loads(_as_bytes(f["dataset.json"][()]))["labels"]}


def _sorted_names(json_path: Path, extensions: set[str]) -> list[str]:
    """Sorted object names from an ``*_h5.json`` listing, keeping those with one of ``extensions``."""
    names = json.loads(json_path.read_text())
    return sorted(name for name in names if os.path.splitext(name)[1].lower() in extensions)


def _labels_for(names: list[str], labels: dict[str, int], path: Path) -> list[int]:
    missing = [name for name in names if name not in labels]
    if missing:
        raise ValueError(f"dataset.json in {path} has no label for {len(missing)} entries, e.g. {missing[0]}")
    return [labels[name] for name in names]


class H5Images(Dataset):
    """Images from the official ``images.h5`` (written by ``preprocessing.py`` or ``write_h5_images``).

    The PNGs are decoded with PIL; no augmentation (the official pipeline has no flips). The HDF5
    file is opened lazily in each worker process (see ``_LazyH5``); ``__init__`` only reads the
    name list and the labels.

    Args:
        data_dir: folder holding ``images.h5`` and ``images_h5.json``.
        config_key: the setting that gives ``data_dir``, named by the error when a file is missing.
    """

    def __init__(self, data_dir: str, config_key: str = "data.dataset.data_dir"):
        self.data_dir = Path(data_dir)
        images_path = _require_file(self.data_dir / "images.h5", config_key)
        self.names = _sorted_names(
            _require_file(self.data_dir / "images_h5.json", config_key), image_extensions()
        )
        self.labels = _labels_for(self.names, _read_h5_labels(images_path), images_path)
        self.images = _LazyH5(images_path)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return _sample(_read_h5_image(self.images, self.names[index]), self.labels[index])


def _read_h5_image(h5: _LazyH5, name: str) -> torch.Tensor:
    try:
        with Image.open(io.BytesIO(_as_bytes(h5.file()[name][()]))) as image:
            return _image_to_tensor(image)
    except _DECODE_ERRORS as err:
        raise CorruptSampleError(f"cannot read image {name!r} in {h5.path}: {err}") from err


class CachedLatents(Dataset):
    """Images plus their cached VAE posterior ``[mean; std]`` (the official ``CustomH5Dataset``).

    Image and latent names are each sorted and paired by position (``00000/img00000000.png`` <->
    ``00000/img-mean-std-00000000.npy``); labels come from the latent file's ``dataset.json``.

    Args:
        data_dir: folder holding ``images.h5``, ``images_h5.json``, ``{latents_name}.h5`` and
            ``{latents_name}_h5.json``.
        latents_name: the ``--vae-latents-name`` used when caching, e.g. ``"repae-invae-400k"``.
    """

    def __init__(self, data_dir: str, latents_name: str):
        self.data_dir = Path(data_dir)
        key = "data.dataset.data_dir"
        images_path = _require_file(self.data_dir / "images.h5", key)
        latents_path = _require_file(self.data_dir / f"{latents_name}.h5", key)
        self.image_names = _sorted_names(
            _require_file(self.data_dir / "images_h5.json", key), image_extensions()
        )
        self.latent_names = _sorted_names(
            _require_file(self.data_dir / f"{latents_name}_h5.json", key), {".npy"}
        )
        if len(self.image_names) != len(self.latent_names):
            raise ValueError(
                f"{images_path} lists {len(self.image_names)} images but {latents_path} lists "
                f"{len(self.latent_names)} latents; re-run latent caching for this images.h5"
            )
        self.labels = _labels_for(self.latent_names, _read_h5_labels(latents_path), latents_path)
        self.images = _LazyH5(images_path)
        self.latents = _LazyH5(latents_path)

    def __len__(self) -> int:
        return len(self.image_names)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        image = _read_h5_image(self.images, self.image_names[index])
        name = self.latent_names[index]
        try:
            latent = torch.from_numpy(np.asarray(self.latents.file()[name], dtype=np.float32))
        except _DECODE_ERRORS as err:
            raise CorruptSampleError(f"cannot read latent {name!r} in {self.latents.path}: {err}") from err
        return _sample(image, self.labels[index], latent=latent)


def h5_image_key(index: int) -> str:
    """Name of image ``index`` in ``images.h5``: ``"00012/img00012345.png"`` (1000 images per group)."""
    idx = f"{index:08d}"
    return f"{idx[:5]}/img{idx}.png"


def h5_latent_key(index: int) -> str:
    """Name of latent ``index`` in ``{name}.h5``: ``"00012/img-mean-std-00012345.npy"``."""
    idx = f"{index:08d}"
    return f"{idx[:5]}/img-mean-std-{idx}.npy"


def encode_png(image_uint8_hwc: np.ndarray) -> bytes:
    """An uncompressed PNG (``compress_level=0``, as ``preprocessing.py``) of a uint8 [H, W, 3] array."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image_uint8_hwc, dtype=np.uint8)).save(buffer, format="png", compress_level=0)
    return buffer.getvalue()


def write_h5_labels_and_listing(f: h5py.File, labels: list[list[Any]], listing: Path, groups: bool) -> None:
    """Store ``dataset.json`` (``{"labels": [[key, label], ...]}``) in the open file ``f`` and write the
    ``*_h5.json`` name listing (every object name; groups too when ``groups``) to ``listing``."""
    f.create_dataset("dataset.json", data=np.void(json.dumps({"labels": labels}).encode("utf-8")))
    names: list[str] = []
    f.visititems(lambda name, obj: names.append(name) if groups or isinstance(obj, h5py.Dataset) else None)
    listing.write_text(json.dumps(names))


def write_h5_encoded_images(path: str | Path, pngs: Iterable[bytes], labels: Iterable[int]) -> int:
    """Write ``images.h5`` and ``images_h5.json`` into the folder ``path`` from already encoded PNGs.

    Args:
        path: output folder (created if needed).
        pngs: PNG file contents, one per image, in index order (streamed).
        labels: one int per image.

    Returns:
        The number of images written.
    """
    out_dir = Path(path)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries: list[list[Any]] = []
    with h5py.File(out_dir / "images.h5", "w") as f:
        for i, (png, label) in enumerate(zip(pngs, labels, strict=True)):
            key = h5_image_key(i)
            f.create_dataset(key, data=np.void(png))
            entries.append([key, int(label)])
        write_h5_labels_and_listing(f, entries, out_dir / "images_h5.json", groups=True)
    return len(entries)


def write_h5_images(path: str | Path, images_uint8_hwc: Iterable[np.ndarray], labels: Iterable[int]) -> int:
    """Write ``images.h5`` and ``images_h5.json`` into the folder ``path`` (official layout).

    Each image is stored as an uncompressed PNG (``compress_level=0``, as ``preprocessing.py`` does).

    Args:
        path: output folder (created if needed).
        images_uint8_hwc: uint8 arrays [H, W, 3], e.g. an [N, H, W, 3] array or a generator
            (streamed: the images never need to fit in memory together).
        labels: one int per image.

    Returns:
        The number of images written.
    """
    return write_h5_encoded_images(path, (encode_png(image) for image in images_uint8_hwc), labels)


def write_h5_latents(
    path: str | Path, name: str, latents: Iterable[np.ndarray | torch.Tensor], labels: Iterable[int]
) -> int:
    """Write ``{name}.h5`` and ``{name}_h5.json`` into the folder ``path`` (``cache_latents.py`` layout).

    Args:
        path: output folder (created if needed); normally the folder of ``images.h5``.
        name: the latents name (``--vae-latents-name``).
        latents: float arrays [2C, h, w] = ``[posterior mean; posterior std]``, in the order of the
            images in ``images.h5``; an [N, 2C, h, w] array or a generator.
        labels: one int per latent.

    Returns:
        The number of latents written.
    """
    out_dir = Path(path)
    out_dir.mkdir(parents=True, exist_ok=True)
    entries: list[list[Any]] = []
    with h5py.File(out_dir / f"{name}.h5", "w") as f:
        for i, (latent, label) in enumerate(zip(latents, labels, strict=True)):
            key = h5_latent_key(i)
            f.create_dataset(key, data=np.asarray(latent, dtype=np.float32))
            entries.append([key, int(label)])
        write_h5_labels_and_listing(f, entries, out_dir / f"{name}_h5.json", groups=False)
    return len(entries)
