"""The paper's claims in miniature, one command: ``python -m repae.study [--out logs/study] [--parallel 8]``.

Runs the protocol of docs/reproduction.md on one GPU: stage 0 (VAE pre-training, ``study/vae_pretrain``),
its extraction, the arms vanilla / repa / repae / naive_e2e x seeds as concurrent processes, the
extraction of each seed's REPA-E and naive-E2E VAE, the arm repa_e2e_vae x seeds, then the VAE
measurements (rFD-EffNet, PSNR, latent statistics on the t10k test split) and the outputs:
``results.csv``, ``summary.md`` (tables and the verdicts of claims (a)-(d) by the fixed rules below),
``fd_vs_step.png``, ``grids.png`` and ``timing.json``. ``--report-only`` rewrites summary.md and
fd_vs_step.png from an existing results.csv.

Resumable: a finished run (its ``final_metrics.json`` exists) is skipped, an unfinished one resumes from
its ``last.ckpt``. ``--smoke`` runs the same code for a couple of CPU steps per stage (the test).
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageDraw

from repae.cli import BAD_INPUT, exit_on_bad_input
from repae.convert.checkpoints import extract_vae
from repae.datamodules.datasets import FashionMNIST
from repae.metrics import EfficientNetFeatures, FeatureStatistics, frechet_distance, save_reference_statistics
from repae.modules.vae import build_vae, images_to_vae_input, load_vae_weights
from repae.protocol import reference_record_arrays
from repae.reconstruction import psnr

ARMS = ("vanilla", "repa", "repae", "naive_e2e", "repa_e2e_vae")
FIRST_ARMS = ARMS[:4]  # arm 5 needs each seed's REPA-E VAE
SEEDS = (0, 1)
# Protocol variants (docs/reproduction.md), each conf/study_variant/<name>.yaml, recorded before run.
VARIANTS = sorted(
    path.stem for path in (Path(__file__).resolve().parents[1] / "conf" / "study_variant").glob("*.yaml")
)
TUNED_VAES = ("repae", "naive_e2e")  # arms whose VAE is extracted and measured
VAE_NAME = "f4d4-tiny"  # conf/model/vae/tiny.yaml
EFFNET_RESOLUTION = 64  # callbacks.fid.effnet_resolution of conf/experiment/study/base.yaml
# --smoke: the same stages on the CPU, a couple of steps each, tiny sample counts, and nothing the
# study does not read (the loss-curve plot).
SMOKE_OVERRIDES = [
    "trainer=cpu",
    "model.max_train_steps=2",
    "data.batch_size=4",
    "data.num_workers=0",
    "data.dataset.max_images=64",
    "callbacks.checkpoint.every_n_steps=2",
    "callbacks.loss_curve=null",
    "trainer.log_every_n_steps=1",  # losses at both steps: the study's loss diagnostics have values
]
SMOKE_SAMPLING_OVERRIDES = [
    "model.sampling.num_steps=2",  # Euler steps of the FD samples and the grids
    "callbacks.fid.steps=[2]",
    "callbacks.fid.num_samples=10",
    "callbacks.fid.batch_size=10",
    "callbacks.image_grid.num_images=10",
]
SMOKE_TEST_IMAGES = 20
# results.csv column -> the metric each run logs, averaged since the previous evaluated step; the
# latent scale only in the end-to-end arms (as the frozen-SiT pass sees it: repae.module).
DIAGNOSTICS = {
    "denoising_loss": "denoising_loss",
    "proj_loss": "proj_loss",
    "training_latent_std": "latent_std",
    "training_latent_std_over_running": "latent_std_over_running",
}
RESULT_FIELDS = [
    "kind", "arm", "seed", "step", "fd_effnet", "fd_effnet_raw", *DIAGNOSTICS, "vae", "rfd_effnet", "psnr",
    "latent_mean", "latent_std", "latent_channel_means", "latent_channel_stds",
]  # fmt: skip


def log(message: str, started: float) -> None:
    print(f"[study {time.monotonic() - started:7.0f}s] {message}", flush=True)


# --- running ------------------------------------------------------------------------------------
def read_json_record(path: Path, what: str) -> object:
    """``path``'s JSON, or ``{}`` when there is none; a file that is not JSON is refused by name."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (ValueError, RecursionError) as error:
        raise ValueError(f"{path} is not a {what} ({type(error).__name__}: {error}); remove it") from None


def stage_times(path: Path) -> dict[str, float]:
    """The finite numbers of a ``timing.json`` (anything else in it is left out)."""
    record = read_json_record(path, "timing record")
    items = record.items() if isinstance(record, dict) else ()
    return {
        key: value
        for key, value in items
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    }


class StageTimes:
    """Wall seconds per stage in ``timing.json``, summed over the invocations that resumed one study.

    A study split over several calls (a GPU lease ending, a stop by SIGUSR1) keeps the time each call
    spent, written as each stage ends or fails; ``calls`` counts the invocations, ``total`` sums the
    stages (start-ups between calls are not counted).
    """

    def __init__(self, path: Path, started: float):
        self.path, self.started = path, started
        self.times = stage_times(path)
        self.times["calls"] = int(self.times.get("calls", 0)) + 1

    @contextmanager
    def stage(self, name: str, what: str) -> Iterator[None]:
        log(f"stage {name}: {what}", self.started)
        since = time.monotonic()
        try:
            yield
        finally:
            spent = time.monotonic() - since
            self.times[name] = round(self.times.get(name, 0.0) + spent, 1)
            self.times["total"] = round(
                sum(v for k, v in self.times.items() if k not in ("calls", "total")), 1
            )
            self.path.write_text(json.dumps(self.times, indent=2))
            log(f"stage {name}: {spent:.1f} s", self.started)


def record_variant(out: Path, variant: str | None) -> None:
    """Write the study's protocol variant to ``study.json``, or check a resumed study's: runs of two
    variants in one directory would be summarised as one study."""
    path = out / "study.json"
    # A study folder from before study.json existed holds the protocol's runs.
    if path.is_file() or (out / "runs").is_dir():
        recorded = read_variant(out)
        if recorded != variant:
            raise ValueError(
                f"{out} holds a study of variant {recorded or 'none (the protocol)'}; this call asks for "
                f"{variant or 'none (the protocol)'}: give another --out"
            )
    path.write_text(json.dumps({"variant": variant}) + "\n")


def read_variant(out: Path) -> str | None:
    path = out / "study.json"
    record = read_json_record(path, "study record")
    if not isinstance(record, dict):
        raise ValueError(f'{path} is not a study record (expected {{"variant": ...}}); remove it')
    recorded = record.get("variant")
    if recorded is not None and recorded not in VARIANTS:
        raise ValueError(f"{path}: unknown variant {recorded!r}; the variants are {', '.join(VARIANTS)}")
    return recorded


def run_dir(out: Path, arm: str, seed: int) -> Path:
    return out / "runs" / f"{arm}_s{seed}"


def finished(directory: Path) -> bool:
    return (directory / "final_metrics.json").is_file()


def train_command(
    out: Path, experiment: str, seed: int, directory: Path, smoke: bool, variant: str | None = None
) -> list[str]:
    return [
        sys.executable, "-m", "repae.train", f"experiment=study/{experiment}", f"seed={seed}",
        f"study_dir={out}", f"hydra.run.dir={directory}",
        # Under SLURM each run would requeue the whole job on the SIGUSR1 the study passes on (once
        # per run, possibly before the others have checkpointed): resubmitting is the job's business.
        "callbacks.requeue.requeue=false",
        # stage 0 stays the protocol's: its VAE sees no labels, and every variant may share it
        *([f"+study_variant={variant}"] if variant and experiment != "vae_pretrain" else []),
        *(SMOKE_OVERRIDES if smoke else []),
        *(SMOKE_SAMPLING_OVERRIDES if smoke and experiment != "vae_pretrain" else []),
    ]  # fmt: skip


def process_environment(parallel: int) -> dict[str, str]:
    """The environment of each training process: CPU thread pools sized to its share of the cores.

    Left to their defaults, ``parallel`` processes each start torch and BLAS pools as large as the
    machine, and every evaluation's matrix square root then competes with all of them."""
    environment = dict(os.environ)
    threads = str(max(1, (os.cpu_count() or 1) // parallel))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        environment.setdefault(name, threads)
    return environment


def run_all(
    jobs: list[tuple[str, int, Path]],
    out: Path,
    parallel: int,
    smoke: bool,
    started: float,
    variant: str | None,
) -> None:
    """Run the unfinished (experiment, seed, run directory) jobs, ``parallel`` at a time, each logging
    to ``<run directory>.log``; raise naming the runs that failed.

    SIGUSR1 or SIGTERM to the study (SLURM's warning before a time limit, a lease ending) is passed
    on to the runs as SIGUSR1, on which each writes its checkpoint at a step boundary and stops; no
    run is started after it, and the study ends with an error saying the same command resumes.
    """
    pending = [job for job in jobs if not finished(job[2])]
    for _, _, directory in jobs:
        if finished(directory):
            log(f"{directory.name}: finished earlier, skipped", started)
    running: list[tuple[subprocess.Popen, Path]] = []
    failed, stopped_by = [], []

    def stop(signum, frame) -> None:
        stopped_by.append(signal.Signals(signum).name)
        pending.clear()
        for process, _ in running:
            process.send_signal(signal.SIGUSR1)

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        while pending or running:
            while pending and len(running) < parallel:
                experiment, seed, directory = pending.pop(0)
                directory.parent.mkdir(parents=True, exist_ok=True)
                log_file = open(directory.with_suffix(".log"), "a")  # noqa: SIM115 (closed with the process)
                process = subprocess.Popen(
                    train_command(out, experiment, seed, directory, smoke, variant),
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env=process_environment(parallel),
                )
                log_file.close()
                running.append((process, directory))
                log(f"{directory.name}: started", started)
                if stopped_by:  # the signal came while this run was being started
                    process.send_signal(signal.SIGUSR1)
            time.sleep(0.5)
            for process, directory in list(running):
                if process.poll() is not None:
                    running.remove((process, directory))
                    if process.returncode == 0 and finished(directory):
                        log(f"{directory.name}: done", started)
                    elif stopped_by and process.returncode in (0, -signal.SIGUSR1):
                        # 0: checkpointed and stopped; -SIGUSR1: still starting up, nothing to lose
                        log(f"{directory.name}: stopped ({stopped_by[0]})", started)
                    else:
                        log(f"{directory.name}: FAILED (see {directory}.log)", started)
                        failed.append(directory.name)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if failed:
        raise RuntimeError(f"runs failed: {', '.join(failed)}; their logs are next to their run directories")
    if stopped_by:
        raise RuntimeError(
            f"stopped by {stopped_by[0]}: the unfinished runs wrote their checkpoints (a run still "
            "starting up had none to write); the same command resumes them"
        )


def extract(out: Path, run: Path, name: str) -> Path:
    """``python -m repae.convert extract-vae`` of ``run``'s last checkpoint into ``out/vae/name/``
    (its function, in this process: a new interpreter would spend seconds on its imports)."""
    vae_file = out / "vae" / name / f"{name}.pt"
    if not vae_file.is_file():
        for kind, path in extract_vae(run / "checkpoints" / "last.ckpt", name, out / "vae").items():
            print(f"wrote {kind}: {path}", flush=True)
    return vae_file


# --- measuring ----------------------------------------------------------------------------------
def fashion_mnist(split: str, max_images: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A Fashion-MNIST split (``FASHION_MNIST_ROOT``) as uint8 images [N, 3, 32, 32] and labels [N]."""
    root = os.environ.get("FASHION_MNIST_ROOT", "/usr/share/datasets/fashion-mnist")
    dataset = FashionMNIST(root=root, split=split, max_images=max_images)
    samples = [dataset[i] for i in range(len(dataset))]
    return torch.stack([s["image"] for s in samples]), torch.stack([s["label"] for s in samples])


def test_images(smoke: bool) -> torch.Tensor:
    """The t10k test split as uint8 [N, 3, 32, 32] (the reference and the reconstruction set)."""
    return fashion_mnist("test", SMOKE_TEST_IMAGES if smoke else None)[0]


@torch.no_grad()
def effnet_statistics(images: torch.Tensor, extractor: torch.nn.Module, device: torch.device):
    statistics = FeatureStatistics(extractor.num_features, device=device)
    for batch in images.split(500):
        statistics.update(extractor(batch.to(device)))
    return statistics.compute()


@torch.no_grad()
def measure_vae(vae_file: Path, images: torch.Tensor, reference, extractor, device) -> dict:
    """rFD-EffNet and PSNR of the reconstructions (decoded posterior means) of ``images``, and the
    per-channel mean and std of the posterior means over them."""
    vae = build_vae(VAE_NAME).to(device).eval()
    load_vae_weights(vae, str(vae_file))
    recons, latents = [], []
    for batch in images.split(500):
        mean = vae.encode(images_to_vae_input(batch.to(device))).mode()
        latents.append(mean.float().cpu())
        recon = vae.decode(mean).float().clamp(-1, 1)
        recons.append(torch.round((recon + 1) * 127.5).to(torch.uint8).cpu())
    recon = torch.cat(recons)
    latent = torch.cat(latents)
    channel_means = latent.mean(dim=(0, 2, 3))
    channel_stds = latent.transpose(0, 1).flatten(1).std(dim=1)
    return {
        "rfd_effnet": frechet_distance(*effnet_statistics(recon, extractor, device), *reference),
        "psnr": float(psnr(images, recon).mean()),
        "latent_mean": float(channel_means.mean()),
        "latent_std": float(channel_stds.mean()),
        "latent_channel_means": " ".join(f"{v:.4f}" for v in channel_means.tolist()),
        "latent_channel_stds": " ".join(f"{v:.4f}" for v in channel_stds.tolist()),
    }


def fd_rows(directory: Path, arm: str, seed: int, steps: list[int] | None = None) -> list[dict]:
    """One row per scheduled step (``steps``, by default ``callbacks.fid.steps`` of the run's
    config.yaml) that the run in ``directory`` evaluated, from its CSV logger's metrics.csv: FD-EffNet
    (EMA), and as diagnostics the raw SiT's FD and the means of the ``DIAGNOSTICS`` logged since the
    previous scheduled step; ``arm`` and ``seed`` label the rows. Only scheduled steps are compared
    across arms; a run stopped by a signal before e28f2ec also logged an FD at the step it stopped at."""
    scheduled = sorted(
        steps if steps is not None else OmegaConf.load(directory / "config.yaml").callbacks.fid.steps
    )
    with open(directory / "csv" / "metrics.csv") as f:
        logged = list(csv.DictReader(f))

    def values(key: str, after: int, upto: int) -> list[float]:
        return [float(row[key]) for row in logged if row.get(key) and after < int(row["step"]) <= upto]

    rows, previous = [], 0
    for step in scheduled:
        fd = values("fd_effnet", step - 1, step)
        if fd:
            row = {"kind": "fd", "arm": arm, "seed": seed, "step": step, "fd_effnet": fd[-1]}
            raw = values("fd_effnet_raw", step - 1, step)
            row["fd_effnet_raw"] = raw[-1] if raw else None
            for column, metric in DIAGNOSTICS.items():
                logged_values = values(metric, previous, step)
                row[column] = float(np.mean(logged_values)) if logged_values else None
            rows.append(row)
        previous = step
    return rows


# --- the verdicts (fixed with the protocol, before any result) ---------------------------------
def step_table(rows: list[dict], key: str = "fd_effnet") -> dict[str, dict[int, list[float]]]:
    """arm -> step -> ``key`` (FD-EffNet unless told) of each seed that has it."""
    table: dict[str, dict[int, list[float]]] = {}
    for row in rows:
        if row["kind"] == "fd" and row.get(key) is not None:
            table.setdefault(row["arm"], {}).setdefault(row["step"], []).append(row[key])
    return table


def steps_to_reach(curve: dict[int, float], target: float) -> tuple[str, float]:
    """The first SiT step at which the (mean) FD ``curve`` reaches ``target``, linearly interpolated in
    log-step between evaluated points, as (qualifier, step): ``("", s)``, or ``("<=", first step)`` if
    the first evaluated point already reaches it, ``(">", last step)`` if none does."""
    steps = sorted(curve)
    if curve[steps[0]] <= target:
        return "<=", steps[0]
    for before, after in itertools.pairwise(steps):
        if curve[after] <= target:
            fraction = (curve[before] - target) / (curve[before] - curve[after])
            return "", math.exp(math.log(before) + fraction * (math.log(after) - math.log(before)))
    return ">", steps[-1]


def verdicts(table: dict[str, dict[int, list[float]]], vaes: dict[str, dict]) -> dict[str, tuple[bool, str]]:
    """(holds, the numbers it was decided on) for claims (a)-(d), by the rules of docs/reproduction.md."""
    last = max(table["repae"])
    mean = {arm: {step: float(np.mean(v)) for step, v in curve.items()} for arm, curve in table.items()}
    low = {arm: min(table[arm][last]) for arm in table}
    high = {arm: max(table[arm][last]) for arm in table}
    a = (
        mean["repae"][last] < mean["repa"][last] < mean["vanilla"][last]
        and high["repae"] < low["repa"]
        and high["repa"] < low["vanilla"]
    )
    original = vaes["stage0"]

    def seeds_mean(arm: str, key: str) -> float:
        return float(np.mean([v[key] for name, v in vaes.items() if name.startswith(f"{arm}_s")]))

    naive_std = seeds_mean("naive_e2e", "latent_std")
    b = mean["naive_e2e"][last] > mean["repae"][last] and naive_std < original["latent_std"]
    c = all(mean["repa_e2e_vae"][step] < mean["repa"][step] for step in mean["repa"])
    psnr, rfd = seeds_mean("repae", "psnr"), seeds_mean("repae", "rfd_effnet")
    d = psnr >= original["psnr"] - 0.5 and rfd <= 1.1 * original["rfd_effnet"]
    return {
        "a": (a, f"FD at {last}: repae {mean['repae'][last]:.3f} [{low['repae']:.3f}, {high['repae']:.3f}], "
                 f"repa {mean['repa'][last]:.3f} [{low['repa']:.3f}, {high['repa']:.3f}], "
                 f"vanilla {mean['vanilla'][last]:.3f} [{low['vanilla']:.3f}, {high['vanilla']:.3f}]"),
        "b": (b, f"FD at {last}: naive_e2e {mean['naive_e2e'][last]:.3f} vs repae {mean['repae'][last]:.3f}; "
                 f"latent std: naive {naive_std:.4f} vs original {original['latent_std']:.4f}"),
        "c": (c, "FD repa_e2e_vae vs repa: " + ", ".join(
            f"{step}: {mean['repa_e2e_vae'][step]:.3f} vs {mean['repa'][step]:.3f}" for step in sorted(mean["repa"]))),
        "d": (d, f"E2E-VAE PSNR {psnr:.2f} dB vs {original['psnr']:.2f}, "
                 f"rFD {rfd:.3f} vs {original['rfd_effnet']:.3f}"),
    }  # fmt: skip


# --- outputs ------------------------------------------------------------------------------------
def mean_spread_table(title: str, table: dict[str, dict[int, list[float]]], digits: int = 3) -> list[str]:
    """A Markdown table (with its heading) of ``table``'s arm x step values: mean ± half the spread."""
    steps = sorted({step for curve in table.values() for step in curve})
    lines = [f"## {title}", "", "| arm | " + " | ".join(f"step {s}" for s in steps) + " |",
             "|---|" + "---|" * len(steps)]  # fmt: skip
    for arm in ARMS:
        values = [table.get(arm, {}).get(step, []) for step in steps]
        cells = [f"{np.mean(v):.{digits}f} ± {np.ptp(v) / 2:.{digits}f}" if v else "" for v in values]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def write_summary(path: Path, rows: list[dict], vaes, verdict, timing, variant: str | None = None) -> None:
    table = step_table(rows)
    steps = sorted({step for curve in table.values() for step in curve})
    variant = f", variant {variant}" if variant else ""
    lines = [f"# REPA-E in miniature: results{variant}", "", "Protocol and rules: docs/reproduction.md.", "",
             *mean_spread_table("FD-EffNet of EMA samples vs the t10k test images (mean ± half the spread "
                                "over seeds)", table)]  # fmt: skip
    lines += ["", "## (a) steps the vanilla / REPA arms need to reach REPA-E's FD at step N", "",
              "| N | REPA-E FD | vanilla: steps (ratio) | repa: steps (ratio) |", "|---|---|---|---|"]  # fmt: skip
    mean = {arm: {s: float(np.mean(v)) for s, v in curve.items()} for arm, curve in table.items()}
    for n in steps:
        cells = []
        for arm in ("vanilla", "repa"):
            qualifier, needed = steps_to_reach(mean[arm], mean["repae"][n])
            cells.append(f"{qualifier} {needed:.0f} ({qualifier} {needed / n:.2f}x)".strip())
        lines.append(f"| {n} | {mean['repae'][n]:.3f} | " + " | ".join(cells) + " |")
    lines += ["", "## VAEs (t10k test split)", "", "| VAE | rFD-EffNet | PSNR (dB) | latent mean | latent std |",
              "|---|---|---|---|---|"]  # fmt: skip
    for name, v in vaes.items():
        lines.append(
            f"| {name} | {v['rfd_effnet']:.3f} | {v['psnr']:.2f} | {v['latent_mean']:.4f} | {v['latent_std']:.4f} |"
        )
    lines += ["", "## Verdicts", ""]
    for claim, (holds, numbers) in verdict.items():
        lines.append(f"- ({claim}) {'reproduced' if holds else 'NOT reproduced'}: {numbers}")
    diagnostics = [
        ("FD-EffNet of the raw (non-EMA) SiT's samples", "fd_effnet_raw", 3),
        ("Denoising loss, mean since the previous evaluated step", "denoising_loss", 4),
        ("REPA loss of the SiT (`proj_loss`, minus the cosine similarity), mean since the previous evaluated step",
         "proj_loss", 4),
        ("Latent std in training (sampled latents, end-to-end arms), mean since the previous evaluated step",
         "training_latent_std", 4),
        ("Latent std in training over the running std the VAE's REPA pass divides by, mean since the previous evaluated step",
         "training_latent_std_over_running", 4),
    ]  # fmt: skip
    for title, key, digits in diagnostics:
        if diagnostic := step_table(rows, key):
            lines += [
                "",
                *mean_spread_table(f"Diagnostic, not used by the verdicts: {title}", diagnostic, digits),
            ]
    lines += ["", f"Wall time per stage (s): {json.dumps(timing)}", ""]
    path.write_text("\n".join(lines))


def plot_fd(path: Path, table, raw_table) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for arm in ARMS:
        steps = sorted(table.get(arm, {}))
        if not steps:
            continue
        values = [table[arm][s] for s in steps]
        (line,) = axes.plot(steps, [np.mean(v) for v in values], marker="o", label=arm)
        axes.fill_between(steps, [min(v) for v in values], [max(v) for v in values], alpha=0.2)
        raw = raw_table.get(arm, {})
        if raw:
            raw_steps = sorted(raw)
            axes.plot(raw_steps, [np.mean(raw[s]) for s in raw_steps], linestyle="--", color=line.get_color())
    axes.set_xscale("log")
    axes.set_xlabel("SiT step")
    axes.set_ylabel("FD-EffNet (t10k)" + ("; dashed: raw SiT" if raw_table else ""))
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def side_by_side(path: Path, grids: dict[str, Path]) -> None:
    """The arms' grids (same labels and noise) in one image, each under its arm's name."""
    images = {arm: Image.open(file).convert("RGB") for arm, file in grids.items()}
    width = sum(image.width for image in images.values()) + 8 * (len(images) - 1)
    height = max(image.height for image in images.values()) + 16
    canvas = Image.new("RGB", (width, height), "white")
    draw, x = ImageDraw.Draw(canvas), 0
    for arm, image in images.items():
        draw.text((x + 2, 2), arm, fill="black")
        canvas.paste(image, (x, 16))
        x += image.width + 8
    canvas.save(path)


# --- the study ----------------------------------------------------------------------------------
def study(out: Path, parallel: int, smoke: bool, variant: str | None = None) -> None:
    started = time.monotonic()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    record_variant(out, variant)
    times = StageTimes(out / "timing.json", started)
    seeds = SEEDS[:1] if smoke else SEEDS
    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")

    with times.stage("reference", "EffNet statistics of the t10k test images"):
        images = test_images(smoke)
        extractor = EfficientNetFeatures(EFFNET_RESOLUTION).to(device)
        reference = effnet_statistics(images, extractor, device)
        save_reference_statistics(
            str(out / "reference_t10k_fd_effnet.npz"),
            *reference,
            **reference_record_arrays("effnet", EFFNET_RESOLUTION),
        )

    with times.stage("vae_pretrain", "VAE pre-training (stage 0)"):
        stage0 = run_dir(out, "vae_pretrain", 0)
        if not (out / "vae" / "stage0" / "stage0.pt").is_file():  # extracted only from a finished run
            run_all([("vae_pretrain", 0, stage0)], out, parallel, smoke, started, variant)
            extract(out, stage0, "stage0")
        else:
            log(f"stage-0 VAE found in {out / 'vae' / 'stage0'}: kept", started)

    with times.stage("arms", f"{', '.join(FIRST_ARMS)} x seeds {list(seeds)}"):
        jobs = [(arm, s, run_dir(out, arm, s)) for arm in FIRST_ARMS for s in seeds]
        run_all(jobs, out, parallel, smoke, started, variant)
        for arm in TUNED_VAES:
            for s in seeds:
                extract(out, run_dir(out, arm, s), f"{arm}_s{s}")

    with times.stage("repa_e2e_vae", f"repa_e2e_vae x seeds {list(seeds)}"):
        jobs = [("repa_e2e_vae", s, run_dir(out, "repa_e2e_vae", s)) for s in seeds]
        run_all(jobs, out, parallel, smoke, started, variant)

    with times.stage("measurements", "rFD, PSNR, latent statistics of each VAE"):
        vae_names = ["stage0", *(f"{arm}_s{s}" for arm in TUNED_VAES for s in seeds)]
        vaes = {name: measure_vae(out / "vae" / name / f"{name}.pt", images, reference, extractor, device)
                for name in vae_names}  # fmt: skip
        rows = [row for arm in ARMS for s in seeds for row in fd_rows(run_dir(out, arm, s), arm, s)]
        rows += [{"kind": "vae", "vae": name, **values} for name, values in vaes.items()]
        with open(out / "results.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=RESULT_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        last = max(step_table(rows)["repae"])
        grids = {arm: run_dir(out, arm, seeds[0]) / f"samples_step{last:07d}.png" for arm in ARMS}
        side_by_side(out / "grids.png", grids)
    report(out)
    log(f"done: {out / 'summary.md'}", started)


def read_results(path: Path) -> tuple[list[dict], dict[str, dict]]:
    """results.csv back as (FD rows, VAE name -> measurements)."""
    rows, vaes = [], {}
    with open(path) as f:
        for row in csv.DictReader(f):
            if row["kind"] == "fd":
                rows.append({"kind": "fd", "arm": row["arm"], "seed": int(row["seed"]), "step": int(row["step"]),
                             **{key: float(row[key]) if row.get(key) else None
                                for key in ("fd_effnet", "fd_effnet_raw", *DIAGNOSTICS)}})  # fmt: skip
            else:
                vaes[row["vae"]] = {
                    key: row[key] if key.startswith("latent_channel") else float(row[key])
                    for key in ("rfd_effnet", "psnr", "latent_mean", "latent_std",
                                "latent_channel_means", "latent_channel_stds")
                }  # fmt: skip
    return rows, vaes


def report(out: Path) -> None:
    """summary.md (tables and verdicts) and fd_vs_step.png from ``out``'s results.csv and timing.json."""
    rows, vaes = read_results(out / "results.csv")
    table = step_table(rows)
    timing = stage_times(out / "timing.json")
    plot_fd(out / "fd_vs_step.png", table, step_table(rows, "fd_effnet_raw"))
    write_summary(out / "summary.md", rows, vaes, verdicts(table, vaes), timing, read_variant(out))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("logs/study"), help="the study's directory")
    parser.add_argument("--parallel", type=int, default=8, help="training processes at a time on the GPU")
    parser.add_argument("--smoke", action="store_true", help="a couple of CPU steps per stage (the test)")
    parser.add_argument(
        "--variant",
        choices=VARIANTS,
        help="a protocol variant (conf/study_variant/), applied to every arm; give it its own --out",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="only rewrite summary.md and fd_vs_step.png from results.csv",
    )
    args = parser.parse_args(argv)
    if args.parallel < 1:
        raise SystemExit("error: --parallel must be at least 1")
    with exit_on_bad_input((RuntimeError, *BAD_INPUT)):  # BAD_INPUT: also a checkpoint extract_vae refuses
        if args.report_only:
            report(args.out)
        else:
            study(args.out, args.parallel, args.smoke, args.variant)


if __name__ == "__main__":
    main()
