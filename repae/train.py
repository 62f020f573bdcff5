"""Training entry point: ``python -m repae.train experiment=repae_sdvae [overrides]``.

Composes the Hydra config, builds the data module, the REPA-E LightningModule, callbacks, loggers
and the Trainer, and fits. The run directory is deterministic (``logs/train/<run_name>``), so the
same command resumes from ``checkpoints/last.ckpt`` after an interruption or a SLURM requeue.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import lightning.pytorch as pl
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from repae.module import to_plain


def instantiate_dict(config: DictConfig | None) -> list:
    """Instantiate every entry with a ``_target_`` of a group like ``callbacks`` or ``logger``
    (entries set to null are skipped, so any of them can be switched off from the command line)."""
    return [instantiate(entry) for entry in (config or {}).values() if entry is not None and "_target_" in entry]


def resume_checkpoint(cfg: DictConfig) -> str | None:
    """The checkpoint to resume from: ``ckpt_path`` if given, else the run's ``last.ckpt`` if any."""
    if cfg.ckpt_path:
        if not Path(cfg.ckpt_path).is_file():
            raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path} does not exist")
        return str(cfg.ckpt_path)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    return str(last) if cfg.resume and last.is_file() else None


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit one run; returns the final logged metrics (used by multirun summaries)."""
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = instantiate(to_plain(cfg.model), _recursive_=False)
    ckpt_path = resume_checkpoint(cfg)
    if ckpt_path is None:
        model.load_pretrained()
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=instantiate_dict(cfg.callbacks),
                                      logger=instantiate_dict(cfg.get("logger")) or False)
    if trainer.is_global_zero:
        Path(cfg.paths.output_dir).mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, Path(cfg.paths.output_dir) / "config.yaml", resolve=True)
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    return {key: float(value) for key, value in trainer.callback_metrics.items() if value.numel() == 1}


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> None:
    train(cfg)


if __name__ == "__main__":
    main()
