"""Time the training data loaders on the CPU: images/s of ``data=imagenet_h5`` and
``data=cached_latents`` per process, at a run's batch per GPU and worker counts.

    python scripts/bench/loaders.py --workers 0 1 2 --output docs/benchmarks/cpu_loader_....json

The files are made by the project's own tools from synthetic photographs: JPEGs of 375-500 x
281-375 pixels (ImageNet's common sizes) with a photograph's 1/f amplitude spectrum over a colour
gradient, turned into ``images.h5`` by ``repae.preprocess`` (ADM center crop, uncompressed PNG
per image, as the official preprocessing) and into a latent cache by ``repae.cache_latents``. The
cache's VAE has the latent shape of ``--vae`` but a narrow encoder with random weights (32
channels, no residual blocks, no attention), so caching 1,408 images takes 1.5-3 minutes on 2 CPU
cores: the loader reads float32 [mean; std] arrays of the real shape, whatever their values.

Each loader is built as a run builds it: the training config is composed with
``data=<loader>``, the datamodule instantiated and its ``train_dataloader()`` iterated (no GPU:
``pin_memory`` is off). After ``--warmup`` batches (which include starting the workers), the next
``--batches`` are timed; each sample is read once (the files hold exactly the images of the warm-up
and timed batches), so h5 reads are of files in the page cache: the CPU's cost, not the storage's.
``images_per_second_per_process`` divides by the worker count (by 1 with 0 workers: the main
process loads); the workers' and the main process's CPU time per image are counted over the epoch.
``per_sample_ms`` splits one sample's CPU cost into the h5 read, the PNG decode, the rest of
``__getitem__`` (array and tensor copies) and the collate, with one torch thread (as in a worker)
and with torch's default count (as in the main process, which loads with ``num_workers=0``).
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import math
import multiprocessing
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import default_collate

from repae.benchmarking import report
from repae.cache_latents import cache_latents
from repae.datamodules.datasets import h5_image_key, h5_latent_key
from repae.known_noise import silence_known_noise
from repae.modules.vae import VAE_CONFIGS, build_vae
from repae.preprocess import preprocess

CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
LOADERS = ("imagenet_h5", "cached_latents")
LATENTS_NAME = "bench"
# The cache's VAE: the latent shape of --vae from an encoder cheap enough for a CPU.
NARROW_VAE = {"ch": 32, "num_res_blocks": 0, "attn_resolutions": []}


def synthetic_photo(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """uint8 [H, W, 3]: luminance and two weaker opponent-colour fields with a photograph's 1/f
    amplitude spectrum, over a colour gradient, at ImageNet's mean and spread of pixel values."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    frequency = np.hypot(fx, fy)
    frequency[0, 0] = 1.0
    shape = (3, height, fx.shape[1])
    spectrum = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)) / frequency
    fields = np.fft.irfft2(spectrum, s=(height, width))
    fields /= fields.std(axis=(1, 2), keepdims=True)
    opponent = np.array([[1.0, 0.35, 0.0], [1.0, -0.2, 0.3], [1.0, -0.2, -0.3]])
    rgb = np.einsum("cd,dhw->hwc", opponent, fields)
    gradient = np.linspace(0, 1, width)[None, :, None] * rng.uniform(-40, 40, 3)
    return np.clip(115 + 50 * rgb + gradient, 0, 255).astype(np.uint8)


def write_photos(folder: Path, count: int, seed: int) -> dict:
    """``count`` synthetic photographs as JPEGs (quality 90) in ``folder``; their mean size."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    sizes, nbytes = [], []
    for i in range(count):
        width, height = int(rng.integers(375, 501)), int(rng.integers(281, 376))
        path = folder / f"photo{i:06d}.jpg"
        Image.fromarray(synthetic_photo(rng, height, width)).save(path, quality=90)
        sizes.append((width, height))
        nbytes.append(path.stat().st_size)
    return {
        "source_images": count,
        "source_mean_width_height": [float(np.mean([s[i] for s in sizes])) for i in (0, 1)],
        "source_mean_jpeg_bytes": float(np.mean(nbytes)),
    }


def make_files(data_dir: Path, count: int, resolution: int, vae: str, seed: int) -> dict:
    """images.h5 and the latent cache ``LATENTS_NAME`` in ``data_dir``, by the project's tools."""
    cores = len(os.sched_getaffinity(0))
    photos = write_photos(data_dir / "photos", count, seed)
    start = time.perf_counter()
    preprocess(
        str(data_dir / "photos"), str(data_dir), resolution=resolution, num_workers=cores,
        shard_size=math.ceil(count / cores), progress=False,
    )  # fmt: skip
    preprocess_s = time.perf_counter() - start
    torch.manual_seed(seed)
    weights = data_dir / "vae.pt"
    torch.save(build_vae(vae, **NARROW_VAE).state_dict(), weights)
    overrides = [
        f"data_dir={data_dir}", f"vae.name={vae}", *(f"+vae.{key}={value}" for key, value in NARROW_VAE.items()),
        f"vae_weights_path={weights}", f"latents_name={LATENTS_NAME}", "batch_size=32", "num_workers=0",
        "trainer.accelerator=cpu", "+trainer.enable_progress_bar=false", f"paths.log_dir={data_dir / 'logs'}",
    ]  # fmt: skip
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="cache", overrides=overrides)
    start = time.perf_counter()
    cache_latents(cfg)
    return {
        **photos,
        "preprocess_seconds": preprocess_s,
        "cache_latents_seconds": time.perf_counter() - start,
        "cache_vae": {"name": vae, **NARROW_VAE, "weights": "random"},
    }


def file_facts(data_dir: Path, count: int) -> dict:
    """What the loaders read: images, PNG bytes per image, the latents' shape and bytes."""
    with (
        h5py.File(data_dir / "images.h5", "r") as images,
        h5py.File(data_dir / f"{LATENTS_NAME}.h5", "r") as latents,
    ):
        available = (
            len(json.loads((data_dir / f"{LATENTS_NAME}_h5.json").read_text())) - 1
        )  # and dataset.json
        if available < count:
            raise SystemExit(f"error: {data_dir} holds {available} images; --warmup + --batches need {count}")
        png_bytes = [images[h5_image_key(i)].nbytes for i in range(count)]
        latent = latents[h5_latent_key(0)]
        return {
            "images": count,
            "png_mean_bytes": float(np.mean(png_bytes)),
            "latent_shape": list(latent.shape),
            "latent_bytes": int(latent.nbytes),
        }


def data_config(loader: str, data_dir: Path, batch_size: int) -> DictConfig:
    """``data`` of the training config composed with ``data=<loader>``, on the files in ``data_dir``."""
    overrides = [f"data={loader}", f"paths.data_dir={data_dir}", f"data.batch_size={batch_size}"]
    if loader == "cached_latents":
        overrides.append(f"data.dataset.latents_name={LATENTS_NAME}")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=overrides).data


def datamodule(config: DictConfig, num_workers: int):
    """The datamodule a run with this ``data`` config and ``data.num_workers`` builds (set up, one device)."""
    module = instantiate(config, num_workers=num_workers)
    module.setup("fit")
    return module


def children_cpu_seconds() -> float:
    """CPU seconds of this process's ended and joined child processes (DataLoader workers)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_loader(config: DictConfig, num_workers: int, warmup: int, batches: int) -> dict:
    """images/s of the datamodule's train_dataloader over ``batches`` batches after ``warmup``, and
    the CPU time per image of the workers and of the main process over the whole epoch (the files
    hold exactly ``warmup + batches`` batches, so the workers load nothing that is not counted)."""
    module = datamodule(config, num_workers)
    batch_size = module.batch_size
    load_before = os.getloadavg()[0]
    workers_cpu, main_cpu = children_cpu_seconds(), time.process_time()
    dataloader = module.train_dataloader()
    iterator = iter(dataloader)
    start = time.perf_counter()
    for _ in range(warmup):
        first = next(iterator)
    warmup_s = time.perf_counter() - start
    times = []
    for _ in range(batches):
        start = time.perf_counter()
        next(iterator)
        times.append(time.perf_counter() - start)
    if next(iterator, None) is not None:
        raise RuntimeError(f"{config.dataset.data_dir} holds more than {warmup + batches} batches")
    main_cpu = time.process_time() - main_cpu
    del iterator, dataloader  # stops and joins the workers
    gc.collect()
    if multiprocessing.active_children():
        raise RuntimeError("DataLoader workers still run: their CPU time cannot be counted")
    images = (warmup + batches) * batch_size
    images_per_second = batches * batch_size / sum(times)
    return {
        "images_per_second": images_per_second,
        "images_per_second_per_process": images_per_second / max(num_workers, 1),
        "workers_cpu_ms_per_image": 1e3 * (children_cpu_seconds() - workers_cpu) / images,
        "main_cpu_ms_per_image": 1e3 * main_cpu / images,
        "warmup_seconds": warmup_s,
        "batch_seconds": times,
        "load_average_1min_before": load_before,
        "batch": {key: [list(value.shape), str(value.dtype)] for key, value in first.items()},
    }


def per_sample_ms(config: DictConfig, data_dir: Path, count: int, threads: int) -> dict:
    """One sample's CPU milliseconds, by part, with ``threads`` torch threads (a DataLoader worker
    runs one; ``getitem_rest``, the array and tensor copies, is a difference of separate passes)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    module = datamodule(config, 0)
    dataset, batch_size = module.dataset, module.batch_size
    has_latents = "latents_name" in config.dataset
    parts = {"h5_read": 0.0, "png_decode": 0.0, "latent_read": 0.0, "getitem": 0.0, "collate": 0.0}
    with (
        h5py.File(data_dir / "images.h5", "r") as images,
        h5py.File(data_dir / f"{LATENTS_NAME}.h5", "r") as latents,
    ):
        for i in range(count):
            start = time.process_time()
            png = images[h5_image_key(i)][()]
            read = time.process_time()
            Image.open(io.BytesIO(png.tobytes())).convert("RGB")
            decoded = time.process_time()
            if has_latents:
                np.asarray(latents[h5_latent_key(i)], dtype=np.float32)
            latent_read = time.process_time()
            parts["h5_read"] += read - start
            parts["png_decode"] += decoded - read
            parts["latent_read"] += latent_read - decoded
    for first in range(0, count - batch_size + 1, batch_size):
        start = time.process_time()
        samples = [dataset[i] for i in range(first, first + batch_size)]
        got = time.process_time()
        default_collate(samples)
        parts["getitem"] += got - start
        parts["collate"] += time.process_time() - got
    torch.set_num_threads(previous)
    timed = count // batch_size * batch_size
    result = {key: 1e3 * parts[key] / count for key in ("h5_read", "png_decode", "latent_read")}
    result.update({key: 1e3 * parts[key] / timed for key in ("getitem", "collate")})
    result["getitem_rest"] = (
        result["getitem"] - result["h5_read"] - result["png_decode"] - result["latent_read"]
    )
    if not has_latents:
        del result["latent_read"]
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--loaders", nargs="+", default=list(LOADERS), choices=LOADERS, help="default: both")
    parser.add_argument(
        "--workers", nargs="+", type=int, default=[0, 1, 2], help="num_workers (default: 0 1 2)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch, per GPU (default: 32)")
    parser.add_argument("--warmup", type=int, default=4, help="untimed first batches (default: 4)")
    parser.add_argument("--batches", type=int, default=40, help="timed batches (default: 40)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timings per setting, median kept (default: 3)"
    )
    parser.add_argument("--resolution", type=int, default=256, help="images.h5 side (default: 256)")
    parser.add_argument(
        "--vae", default="f16d32", choices=sorted(VAE_CONFIGS),
        help="the latent shape to cache (default: f16d32, the VA-VAE of ldm_only_e2e_vavae)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--data-dir", type=Path, default=None,
        help="make the files here, or reuse them if it holds a complete set (default: a temporary folder)",
    )  # fmt: skip
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if min(args.workers) < 0 or min(args.batch_size, args.batches, args.repeats) < 1 or args.warmup < 1:
        parser.error("--workers must be >= 0; --batch-size, --batches, --repeats and --warmup >= 1")
    silence_known_noise()
    count = (args.warmup + args.batches) * args.batch_size
    options = {key: value for key, value in vars(args).items() if key != "output"}
    options["data_dir"] = None if args.data_dir is None else str(args.data_dir)
    results = {"options": options}
    with tempfile.TemporaryDirectory() as temporary:
        data_dir = args.data_dir or Path(temporary)
        if (data_dir / f"{LATENTS_NAME}_h5.json").is_file():
            results["files"] = "reused"
        else:
            results["files"] = make_files(data_dir, count, args.resolution, args.vae, args.seed)
        results["data"] = file_facts(data_dir, count)
        results["loaders"] = {}
        for loader in args.loaders:
            config = data_config(loader, data_dir, args.batch_size)
            profile = {
                f"threads_{threads}": per_sample_ms(config, data_dir, count, threads)
                for threads in sorted({1, torch.get_num_threads()})
            }
            results["loaders"][loader] = entry = {"per_sample_ms": profile, "workers": {}}
            for workers in args.workers:
                runs = [time_loader(config, workers, args.warmup, args.batches) for _ in range(args.repeats)]
                median = statistics.median(run["images_per_second"] for run in runs)
                entry["workers"][str(workers)] = {
                    "images_per_second": median,
                    "images_per_second_per_process": median / max(workers, 1),
                    "workers_cpu_ms_per_image": statistics.median(
                        run["workers_cpu_ms_per_image"] for run in runs
                    ),
                    "main_cpu_ms_per_image": statistics.median(run["main_cpu_ms_per_image"] for run in runs),
                    "runs": runs,
                }
                print(f"{loader} num_workers={workers}: {median:.1f} images/s", flush=True)
    report(results, args.output)
    return results


if __name__ == "__main__":
    main()
