"""Time the training step of any experiment on GPU(s): images/s, MFU and peak memory.

    python scripts/benchmark.py experiment=repae_sdvae --batch-size 32 --steps 20
    python scripts/benchmark.py experiment=repae_sdvae model.compile=true trainer.precision=bf16-mixed
    python scripts/benchmark.py experiment=ldm_only_e2e_vavae --devices 2

Positional arguments are Hydra overrides of the training config. Weights are random (the encoder,
LPIPS trunk, VAE and discriminator files are not needed) and the data are random uint8 images,
so the numbers measure the step, not the data pipeline. The step runs through the real Trainer and
LightningModule. FLOPs per image are counted once with torch's FlopCounterMode on one step (matmuls,
convolutions and attention, forward and backward) of the model as defined, with the VAE's fast
kernels switched off for that step: the VAE's upsampling convolutions count as 3x3 convolutions on
the upsampled grid, as the official code runs them, though the fast kernels (``model.fast_kernels``)
compute them with 2.25x fewer FLOPs (model FLOPs, not executed ones).
MFU divides the achieved FLOP/s by the bf16 matrix rate of an 8192^3 matmul measured on the same
card in the same run, so results compare across H100 and H200. Results go to stdout and, with
--output, to a JSON file.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch.utils.data import Dataset
from torch.utils.flop_counter import FlopCounterMode

from repae.benchmarking import matmul_tflops, report
from repae.config import to_plain
from repae.datamodules.datamodule import ImageDataModule
from repae.kernels import use_fast_kernels

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
RANDOM_WEIGHTS = [
    "model.vae_weights_path=null",
    "model.latents_stats_path=null",
    "model.discriminator_weights_path=null",
    "model.encoder.weights_paths=random",
    "++model.loss.perceptual.vgg_weights_path=random",
]


class RandomImages(Dataset):
    """Deterministic random uint8 images [3,R,R] and labels, as the training data format; with
    ``latent_shape`` (C,h,w) also a cached posterior ``latent`` [2C,h,w] (mean; std), as
    ``data=cached_latents`` serves for LDM-only training."""

    def __init__(self, length: int, resolution: int, num_classes: int, latent_shape=None):
        self.length, self.resolution, self.num_classes = length, resolution, num_classes
        self.latent_shape = latent_shape

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(index)
        image = torch.randint(
            0, 256, (3, self.resolution, self.resolution), dtype=torch.uint8, generator=generator
        )
        sample = {"image": image, "label": torch.tensor(index % self.num_classes)}
        if self.latent_shape is not None:
            mean = torch.randn(*self.latent_shape, generator=generator)
            std = 0.01 + 0.1 * torch.rand(*self.latent_shape, generator=generator)
            sample["latent"] = torch.cat([mean, std])
        return sample


class GarbageCollectionPauses:
    """The host's pauses for Python's garbage collector while recording: (generation, ms) each.

    A collection stops the host; if it lasts longer than the GPU work queued ahead, the GPU idles,
    so a long pause shows as a slow step."""

    def __init__(self):
        self.pauses: list[tuple[int, float]] = []
        self._started: float | None = None

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.pauses.append((info["generation"], 1e3 * (time.perf_counter() - self._started)))
            self._started = None

    def start(self) -> None:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)

    def stop(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def summary(self) -> dict[str, dict[str, float]]:
        """Per generation: how many collections and their total and longest milliseconds."""
        summary = {}
        for generation in sorted({g for g, _ in self.pauses}):
            times = [ms for g, ms in self.pauses if g == generation]
            summary[f"generation_{generation}"] = {
                "count": len(times),
                "total_ms": sum(times),
                "max_ms": max(times),
            }
        return summary


class StepTimer(pl.Callback):
    """Step times on the GPU's own timeline, FLOPs of the first step, and optionally a kernel
    profile of the last two steps.

    A CUDA event is recorded at every batch start and after the last batch; a step's time is the
    distance between consecutive events. Nothing synchronises the host inside the timed steps, so
    the CPU may run ahead of the GPU as it does in training, and the numbers are the throughput a
    training run sees. The first step (compilation) is timed on the wall clock."""

    def __init__(self, count_flops: bool, total_steps: int, warmup: int, profile_path: Path | None):
        self.events: list[torch.cuda.Event] = []
        self.first_step_s: float | None = None
        self.flops: int | None = None
        self.count_flops = count_flops
        self.total_steps = total_steps
        self.warmup = warmup
        self.profile_path = profile_path
        self._counter: FlopCounterMode | None = None
        self._counting = contextlib.ExitStack()
        self._profiler: torch.profiler.profile | None = None
        self.garbage_collection = GarbageCollectionPauses()

    @property
    def times(self) -> list[float]:
        """Seconds of every step after the first, in order (valid after the last step)."""
        return [start.elapsed_time(end) / 1e3 for start, end in itertools.pairwise(self.events)]

    def _record(self) -> None:
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self.events.append(event)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            if self.count_flops:
                self._counter = self._counting.enter_context(FlopCounterMode(display=False))
                use_fast_kernels(pl_module.vae, enabled=False)  # the network as defined
                self._counting.callback(use_fast_kernels, pl_module.vae, pl_module.fast_kernels)
            torch.cuda.synchronize()
            self._start = time.perf_counter()
        else:
            self._record()
        if batch_idx == self.warmup:
            self.garbage_collection.start()
        if self.profile_path and batch_idx == self.total_steps - 2:
            self.garbage_collection.stop()  # the profiled steps are left out of the timing
            activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            self._profiler = torch.profiler.profile(activities=activities)
            self._profiler.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 0:
            torch.cuda.synchronize()
            self.first_step_s = time.perf_counter() - self._start
        if self._counter is not None:
            self._counting.close()
            self.flops = self._counter.get_total_flops()
            self._counter = None
        if batch_idx == self.total_steps - 1:
            self._record()
            self.garbage_collection.stop()
            torch.cuda.synchronize()
        if self._profiler is not None and batch_idx == self.total_steps - 1:
            self._profiler.__exit__(None, None, None)
            self.profile_path.parent.mkdir(parents=True, exist_ok=True)
            self.profile_path.write_text(kernel_report(self._profiler))
            self._profiler = None


# First match wins: inductor names Triton kernels after the ops they fuse (..._convolution_...) and
# its foreach kernels triton_for_..., cuDNN names its attention kernels cudnn_..._sdpa_..._flash_...
KERNEL_FAMILIES = {
    "compiled foreach ops (the EMA under model.compile)": ("triton_for",),
    "Triton (inductor-fused element-wise, norms, reductions)": ("triton",),
    "attention": ("sdpa", "fmha", "flash", "attention"),
    "convolution (cuDNN)": ("xmma", "implicit_gemm", "conv", "cudnn", "nchwToNhwc", "nhwcToNchw"),
    "matmul (cuBLAS)": ("nvjet", "gemm", "cutlass", "cublas"),
    "foreach ops (fused AdamW, gradient norm, the uncompiled EMA)": ("multi_tensor_apply",),
    "ATen element-wise and reductions": ("elementwise", "reduce_kernel", "vectorized"),
    "memory copies and fills": ("memcpy", "memset", "copy", "fill"),
}


def kernel_family(name: str) -> str:
    """The family of a CUDA kernel, by name (the first family with a matching fragment)."""
    lowered = name.lower()
    for family, fragments in KERNEL_FAMILIES.items():
        if any(fragment.lower() in lowered for fragment in fragments):
            return family
    return "other"


def kernel_report(profiler: torch.profiler.profile, gaps: int = 15, rows: int = 60, slices: int = 20) -> str:
    """What the GPU did in the profiled steps: the share of the time it was busy, GPU time per
    kernel family (all kernels), idle time by gap length and over the window (``slices`` equal
    parts), the longest idle gaps with the kernels around them, and the ``rows`` costliest kernels."""
    kernels = sorted(
        (
            event
            for event in profiler.events()
            # GPU-side spans of host annotations (e.g. "Optimizer.step#AdamW.step") are not kernels
            if event.device_type == torch.autograd.DeviceType.CUDA and not event.is_user_annotation
        ),
        key=lambda event: event.time_range.start,
    )
    first = kernels[0].time_range.start
    window = kernels[-1].time_range.end - first
    busy, end, previous = 0.0, first, kernels[0]
    idle: list[tuple[float, float, str, str]] = []  # (length, start, kernel before, kernel after)
    families: dict[str, float] = {}
    for kernel in kernels:
        start, stop = kernel.time_range.start, kernel.time_range.end
        family = kernel_family(kernel.name)
        families[family] = families.get(family, 0.0) + stop - start
        if start > end:
            idle.append((start - end, end, previous.name, kernel.name))
        busy += max(0.0, stop - max(start, end))
        if stop > end:
            end, previous = stop, kernel
    lines = [
        f"profiled window (first kernel start to last kernel end): {window / 1e3:.1f} ms, "
        f"GPU busy {busy / 1e3:.1f} ms ({100 * busy / window:.1f} %), idle {(window - busy) / 1e3:.1f} ms",
        "",
        "GPU time by kernel family (all kernels; overlapping kernels counted in full):",
    ]
    total = sum(families.values())
    for family, time_us in sorted(families.items(), key=lambda item: -item[1]):
        lines.append(f"  {100 * time_us / total:5.1f} %  {time_us / 1e3:8.1f} ms  {family}")
    lines += ["", "idle time by gap length:"]
    for low, high in itertools.pairwise((0.0, 10.0, 100.0, 1000.0, float("inf"))):
        lengths = [length for length, *_ in idle if low <= length < high]
        lines.append(f"  {low:5.0f} to {high:5.0f} us: {sum(lengths) / 1e3:7.1f} ms in {len(lengths)} gaps")
    per_slice = [0.0] * slices
    for length, start, *_ in idle:
        per_slice[min(slices - 1, int(slices * (start - first) / window))] += length
    lines += [
        "",
        f"idle ms in each of {slices} equal parts of the window ({window / slices / 1e3:.1f} ms each):",
        "  " + " ".join(f"{time_us / 1e3:.1f}" for time_us in per_slice),
        "",
        f"longest idle gaps (of {len(idle)}), with the kernels before and after:",
    ]
    host = sorted(
        (event for event in profiler.events() if event.device_type == torch.autograd.DeviceType.CPU),
        key=lambda event: event.time_range.start,
    )
    for length, start, before, after in sorted(idle, reverse=True)[:gaps]:
        lines.append(f"  {length / 1e3:7.2f} ms  after {before[:90]}  before {after[:90]}")
        middle = start + length / 2
        running = [event.name for event in host if event.time_range.start <= middle < event.time_range.end]
        lines.append(f"           the host meanwhile in: {' > '.join(running) or '(no profiled op: Python)'}")
    waits = [
        event
        for event in host
        if ("Synchronize" in event.name or event.name == "cudaMemcpyAsync")
        and event.time_range.elapsed_us() > 100
    ]
    lines += ["", "host waits for the GPU longer than 0.1 ms (CUDA runtime call, the op that made it):"]
    for event in waits:
        outermost = event
        while outermost.cpu_parent is not None:
            outermost = outermost.cpu_parent
        lines.append(f"  {event.time_range.elapsed_us() / 1e3:7.2f} ms  {event.name}  in {outermost.name}")
    lines += ["", profiler.key_averages().table(sort_by="self_cuda_time_total", row_limit=rows)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the training config")
    parser.add_argument("--batch-size", type=int, default=32, help="images per GPU (default: 32)")
    parser.add_argument("--devices", type=int, default=1, help="GPUs (default: 1)")
    parser.add_argument("--resolution", type=int, default=256, help="image size (default: 256)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (default: 20)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed first steps (default: 5)")
    parser.add_argument("--num-workers", type=int, default=4, help="data loader workers (default: 4)")
    parser.add_argument(
        "--flops-per-image",
        type=float,
        default=None,
        help="FLOPs of one image's step; default: counted on the first step, which is only "
        "possible without model.compile (a dispatch mode stops dynamo compiling that step)",
    )
    parser.add_argument(
        "--cached-latents",
        action="store_true",
        help="LDM-only: feed cached VAE posteriors (random) instead of encoding the images on the fly",
    )
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="profile the last two steps (host and GPU; left out of the timing), write the report here",
    )
    args = parser.parse_intermixed_args()  # Hydra overrides may come before or after the options
    if args.warmup < 1 or args.steps < (3 if args.profile else 1):
        parser.error(
            "--warmup must be at least 1 (the first step compiles), --steps at least 1, 3 with --profile"
        )

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*RANDOM_WEIGHTS, *args.overrides])
    cfg.model.max_train_steps = args.warmup + args.steps
    if cfg.model.mode == "ldm_only":  # needs fixed latent statistics; unit ones will do for timing
        stats = Path(tempfile.mkdtemp()) / "latents-stats.pt"
        channels = cfg.model.sit.in_channels
        torch.save(
            {"latents_scale": torch.ones(1, channels, 1, 1), "latents_bias": torch.zeros(1, channels, 1, 1)},
            stats,
        )
        cfg.model.latents_stats_path = str(stats)
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(cfg.allow_tf32)
    model = instantiate(to_plain(cfg.model), _recursive_=False)
    model.load_pretrained()
    if args.cached_latents and cfg.model.mode != "ldm_only":
        raise SystemExit("--cached-latents needs an ldm_only experiment")
    dataset = RandomImages(
        args.batch_size * args.devices * (args.warmup + args.steps),
        args.resolution,
        model.num_classes,
        latent_shape=model.latent_shape if args.cached_latents else None,
    )
    datamodule = ImageDataModule(
        dataset, batch_size=args.batch_size * args.devices, num_workers=args.num_workers
    )
    count_flops = args.flops_per_image is None and args.devices == 1 and not cfg.model.compile
    timer = StepTimer(
        count_flops=count_flops,
        total_steps=args.warmup + args.steps,
        warmup=args.warmup,
        profile_path=args.profile,
    )
    strategy = cfg.trainer.get("strategy", "auto")
    trainer = pl.Trainer(
        accelerator="gpu",
        devices=args.devices,
        precision=cfg.trainer.precision,
        strategy=instantiate(strategy) if isinstance(strategy, DictConfig) else strategy,
        max_epochs=-1,
        max_steps=-1,
        use_distributed_sampler=False,
        benchmark=True,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    torch.cuda.reset_peak_memory_stats()
    trainer.fit(model, datamodule=datamodule)
    if not trainer.is_global_zero:
        return
    # The profiled (last two) steps run slower under the profiler: left out of the timing.
    timed = timer.times[args.warmup - 1 : len(timer.times) - (2 if args.profile else 0)]
    step_time = statistics.mean(timed)
    images_per_second = args.batch_size * args.devices / step_time
    results = {
        "overrides": args.overrides,
        "devices": args.devices,
        "batch_size_per_gpu": args.batch_size,
        "precision": str(cfg.trainer.precision),
        "compile": bool(cfg.model.compile),
        "cached_latents": args.cached_latents,
        "step_time_s": step_time,
        "step_times_s": timed,
        "first_step_s": timer.first_step_s,
        "images_per_second": images_per_second,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "garbage_collection_in_timed_steps": timer.garbage_collection.summary(),
    }
    flops_per_image = args.flops_per_image or (timer.flops / args.batch_size if timer.flops else None)
    if flops_per_image:
        peak = matmul_tflops()
        results.update(
            tflop_per_image=flops_per_image / 1e12,
            bf16_matmul_tflops=peak,
            mfu=flops_per_image * images_per_second / (peak * 1e12),
        )
    report(results, args.output)


if __name__ == "__main__":
    sys.exit(main())
