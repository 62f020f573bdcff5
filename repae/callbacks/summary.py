"""The model summary printed when training starts, without the FLOPs Lightning cannot count for us."""

from __future__ import annotations

import logging
from typing import Any

from lightning.pytorch.callbacks import ModelSummary as LightningModelSummary
from lightning.pytorch.utilities.model_summary.model_summary import _format_summary_table

log = logging.getLogger(__name__)


class ModelSummary(LightningModelSummary):
    """Lightning's table of submodules (name, type, parameters, train/eval mode) and parameter totals,
    as plain text in the run's log, without its FLOPs column and "Total Flops" line.

    Lightning counts FLOPs only while it runs the module's ``example_input_array`` through
    ``forward``; REPAE has none (a training step runs three networks on a batch), so every count
    would read 0. Used instead of Lightning's default summary (``trainer.enable_model_summary``),
    which also prints through Rich when Rich is installed.
    """

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        columns = [column for column in summary_data if column[0] != "FLOPs"]
        table = _format_summary_table(
            total_parameters, trainable_parameters, model_size, total_training_modes, total_flops, *columns
        )
        log.info("\n" + "\n".join(line for line in table.splitlines() if not line.endswith("Total Flops")))
