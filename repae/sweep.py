"""A summary table of a Hydra multirun: one row per sweep point, its overrides and final metrics."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table

FINAL_METRICS_FILE = "final_metrics.json"


def collect(sweep_dir: Path, keys: list[str]) -> list[dict[str, Any]]:
    """One row per finished run under ``sweep_dir``: its overrides and the ``keys`` it logged last."""
    rows = []
    for metrics_file in sorted(sweep_dir.glob(f"*/{FINAL_METRICS_FILE}")):
        run_dir = metrics_file.parent
        overrides_file = run_dir / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.exists() else []
        metrics = json.loads(metrics_file.read_text())
        rows.append(
            {"run": run_dir.name, "overrides": " ".join(overrides), **{key: metrics.get(key) for key in keys}}
        )
    return rows


class SweepSummary(Callback):
    """At the end of a multirun, write ``summary.csv`` into the sweep directory and print the table.

    Reads each run's ``final_metrics.json`` (written by ``repae.train``), so it works the same for
    local sweeps and for SLURM jobs that ran elsewhere.
    """

    def __init__(self, keys: list[str]):
        self.keys = list(keys)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = collect(sweep_dir, self.keys)
        if not rows:
            return
        with open(sweep_dir / "summary.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        table = Table(title=f"sweep summary ({sweep_dir / 'summary.csv'})")
        for column in rows[0]:
            table.add_column(column)
        for row in rows:
            table.add_row(
                *("" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values())
            )
        console = Console()
        if not console.is_terminal:  # a log file: rich would cut the table at 80 columns
            console = Console(width=100_000)
        console.print(table)
