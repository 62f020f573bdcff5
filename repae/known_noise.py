"""Messages that Lightning and torch print on every run of ours although nothing is wrong.

Each is silenced by its exact text, so every other warning still comes through:
- Lightning's advertisement for its LitLogger, printed whenever another logger is used;
- "Found N module(s) in eval mode at the start of training": the alignment encoders, the
  perceptual network, the EMA SiT and (in ``ldm_only``) the VAE are frozen in eval mode on purpose;
- "your dataloader is not resumable" on every mid-epoch resume: our sampler restores its position
  itself (``repae.datamodules``), which Lightning cannot see;
- torch's deprecation of ``LeafSpec``, raised inside Lightning's own pytree helper.
"""

from __future__ import annotations

import logging
import warnings


class _DropMessages(logging.Filter):
    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


def silence_known_noise() -> None:
    """Install the filters (idempotent); called by the entry points, not on import."""
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropMessages) for f in rank_zero.filters):
        rank_zero.addFilter(_DropMessages("💡 Tip: For seamless cloud logging"))
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
    warnings.filterwarnings(
        "ignore", message=r"You're resuming from a checkpoint that ended before the epoch"
    )
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
