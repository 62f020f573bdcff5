"""Guidance sweeps: ``python -m repae.guidance_sweep ckpt_path=<checkpoint> evaluation.reference_path=<npz>``.

For every point of ``cfg_scales`` x ``guidance_highs`` (x ``num_steps``, optional), generate samples with
``repae.generate`` (any number of GPUs, resumable per image) and evaluate them on rank 0 against one
reference with one feature extractor, both prepared once. Samples go to ``samples/<name>/`` (and
``samples/<name>.npz``); each finished point is written as ``points/<name>.json`` (metrics + protocol) under the sweep's output directory; a re-run skips those
points, so a killed sweep continues where it stopped. At the end, ``guidance_sweep.csv``,
``guidance_sweep.md`` and ``guidance_sweep.png`` (heat maps of FID, IS, precision and recall over
scale x interval) hold every finished point.
"""

from __future__ import annotations

import csv
import itertools
import json
import warnings
from pathlib import Path

import hydra
from lightning.pytorch.utilities import rank_zero_only
from matplotlib.figure import Figure
from omegaconf import DictConfig, OmegaConf, open_dict

from repae.cli import exit_on_bad_input
from repae.evaluate import Evaluation, InceptionEvaluator, effnet_metrics, resolve_device
from repae.generate import generate, generation_protocol, load_sampling_model
from repae.known_noise import silence_known_noise
from repae.protocol import build_protocol, feature_resolution

TABLE_METRICS = ("fid", "inception_score", "precision", "recall")


def point_name(cfg_scale: float, guidance_high: float, num_steps: int) -> str:
    return f"cfg{cfg_scale}-high{guidance_high}-steps{num_steps}"


def sweep_points(cfg: DictConfig) -> list[dict]:
    """``{"cfg_scale", "guidance_high", "num_steps"}`` for every point of the grid, steps outermost."""
    steps = cfg.num_steps if cfg.num_steps is not None else [cfg.sampler.num_steps]
    return [
        {"cfg_scale": scale, "guidance_high": high, "num_steps": n}
        for n, scale, high in itertools.product(steps, cfg.cfg_scales, cfg.guidance_highs)
    ]


class PointEvaluator:
    """The evaluation settings of the sweep, with the reference and the extractor prepared once."""

    def __init__(self, settings: DictConfig):
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.inception = None
        if settings.feature_extractor == "inception":
            self.inception = InceptionEvaluator(
                settings.reference_path,
                settings.inception_weights_path,
                list(settings.metrics),
                settings.batch_size,
                settings.num_workers,
                self.device,
                settings.inception_score_splits,
            )

    def evaluate(self, samples_path: str) -> Evaluation:
        if self.inception is not None:
            return self.inception.evaluate(samples_path)
        s = self.settings
        return effnet_metrics(
            samples_path, s.reference_path, s.effnet_resolution, s.batch_size, s.num_workers, self.device
        )

    def protocol_fields(self) -> dict:
        s = self.settings
        record = build_protocol(
            reference_path=s.reference_path,
            inception_weights_path=s.inception_weights_path,
            feature_extractor=s.feature_extractor,
            feature_resolution=feature_resolution(s.feature_extractor, s.effnet_resolution),
        )
        return {key: value for key, value in record.items() if value is not None}


def run_point(
    cfg: DictConfig, point: dict, model, evaluator: PointEvaluator | None, result_path: Path
) -> None:
    """Generate the samples of one point (all ranks) and evaluate them (rank 0)."""
    point_cfg = cfg.copy()
    with open_dict(point_cfg):
        point_cfg.sampler.cfg_scale = point["cfg_scale"]
        point_cfg.sampler.guidance_high = point["guidance_high"]
        point_cfg.sampler.num_steps = point["num_steps"]
        point_cfg.sample_dir = str(Path(cfg.paths.output_dir) / "samples" / result_path.stem)
    npz_path = generate(point_cfg, model=model)
    if rank_zero_only.rank != 0:
        return
    evaluation = evaluator.evaluate(str(npz_path))
    protocol = {**generation_protocol(point_cfg), **evaluator.protocol_fields()}
    protocol["num_samples"] = evaluation.num_samples
    result = {
        **point,
        "metrics": evaluation.metrics,
        "unavailable": evaluation.unavailable,
        "protocol": protocol,
    }
    temporary = result_path.with_name(result_path.name + ".tmp")
    temporary.write_text(json.dumps(result, indent=2))
    temporary.replace(result_path)  # a point counts as finished only once its whole result is written


def write_table(rows: list[dict], output_dir: Path) -> None:
    """``guidance_sweep.csv`` and ``guidance_sweep.md``: one row per point."""
    columns = ["cfg_scale", "guidance_high", "num_steps", *TABLE_METRICS]
    with open(output_dir / "guidance_sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows({key: row.get(key) for key in columns} for row in rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [
            f"{row[key]:.4f}"
            if isinstance(row.get(key), float) and key in TABLE_METRICS
            else str(row.get(key))
            for key in columns
        ]
        lines.append("| " + " | ".join(cells) + " |")
    (output_dir / "guidance_sweep.md").write_text("\n".join(lines) + "\n")


def plot_heat_maps(rows: list[dict], cfg: DictConfig, path: Path) -> None:
    """One heat map per metric (columns) and number of steps (rows): guidance_high x cfg_scale."""
    steps = sorted({row["num_steps"] for row in rows})
    scales, highs = list(cfg.cfg_scales), list(cfg.guidance_highs)
    figure = Figure(figsize=(3.6 * len(TABLE_METRICS), 3.0 * len(steps)), layout="constrained")
    axes = figure.subplots(len(steps), len(TABLE_METRICS), squeeze=False)
    for row_axes, n in zip(axes, steps, strict=True):
        for ax, metric in zip(row_axes, TABLE_METRICS, strict=True):
            grid = [[float("nan")] * len(scales) for _ in highs]
            for row in rows:
                if row["num_steps"] == n and row.get(metric) is not None:
                    grid[highs.index(row["guidance_high"])][scales.index(row["cfg_scale"])] = row[metric]
            image = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis")
            figure.colorbar(image, ax=ax)
            for (y, x), value in (
                (yx, grid[yx[0]][yx[1]]) for yx in itertools.product(range(len(highs)), range(len(scales)))
            ):
                ax.text(x, y, f"{value:.3g}", ha="center", va="center", color="white", fontsize=8)
            ax.set_xticks(range(len(scales)), [str(s) for s in scales])
            ax.set_yticks(range(len(highs)), [str(h) for h in highs])
            ax.set_xlabel("cfg_scale")
            ax.set_ylabel("guidance_high")
            ax.set_title(f"{metric} ({n} steps)")
    figure.savefig(path, dpi=100)


def guidance_sweep(cfg: DictConfig) -> list[dict]:
    """Run the missing points of the grid; on rank 0 write the table and heat maps. Returns the rows."""
    output_dir = Path(cfg.paths.output_dir)
    points_dir = output_dir / "points"
    points_dir.mkdir(parents=True, exist_ok=True)
    points = sweep_points(cfg)
    result_paths = [points_dir / f"{point_name(**point)}.json" for point in points]
    missing = [(point, path) for point, path in zip(points, result_paths, strict=True) if not path.is_file()]
    if missing:
        model = load_sampling_model(cfg.ckpt_path, use_ema=cfg.use_ema, vae_weights_path=cfg.vae_weights_path)
        evaluator = PointEvaluator(cfg.evaluation) if rank_zero_only.rank == 0 else None
        for point, path in missing:
            run_point(cfg, point, model, evaluator, path)
    if rank_zero_only.rank != 0:
        return []
    rows = []
    for path in result_paths:
        result = json.loads(path.read_text())
        rows.append(
            {**{key: result[key] for key in ("cfg_scale", "guidance_high", "num_steps")}, **result["metrics"]}
        )
    write_table(rows, output_dir)
    plot_heat_maps(rows, cfg, output_dir / "guidance_sweep.png")
    print(f"Guidance sweep: {len(rows)} points ({len(missing)} new) in {output_dir / 'guidance_sweep.md'}")
    print((output_dir / "guidance_sweep.md").read_text())
    return rows


@hydra.main(version_base="1.3", config_path="../conf", config_name="guidance_sweep")
def main(cfg: DictConfig) -> None:
    silence_known_noise()
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    OmegaConf.resolve(cfg)
    with exit_on_bad_input():
        guidance_sweep(cfg)


if __name__ == "__main__":
    main()
