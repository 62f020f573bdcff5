"""Every experiment composes, and its configured objects are buildable by Hydra."""

from __future__ import annotations

import importlib.util

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from conftest import CONF_DIR

EXPERIMENTS = ["repae_sdvae", "repae_invae", "repae_vavae", "ldm_only_e2e_vavae", "demo"]


def compose_train(*overrides: str):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides), return_hydra_config=True)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_with_official_defaults(experiment):
    cfg = compose_train(f"experiment={experiment}")
    assert cfg.run_name == experiment
    assert cfg.model.optimizer.learning_rate == pytest.approx(1e-4 if experiment != "demo" else 3e-4)
    if experiment.startswith("repae"):
        assert (cfg.model.proj_coeff, cfg.model.vae_align_proj_coeff) == (0.5, 1.5)
        assert cfg.model.loss.discriminator_weight == 0.1 and cfg.model.loss.kl_weight == 1e-6
        assert cfg.data.batch_size == 256 and cfg.model.max_train_steps == 400_000
    if experiment == "ldm_only_e2e_vavae":
        assert cfg.model.mode == "ldm_only" and cfg.model.loss is None
        assert cfg.model.sit.name == "SiT-XL/1" and cfg.model.max_train_steps == 4_000_000


def test_sit_geometry_follows_the_vae():
    for experiment, (name, size, channels) in {
        "repae_sdvae": ("SiT-XL/2", 32, 4),
        "repae_invae": ("SiT-XL/1", 16, 32),
    }.items():
        sit = compose_train(f"experiment={experiment}").model.sit
        assert (sit.name, sit.input_size, sit.in_channels) == (name, size, channels)


def test_slurm_trainer_takes_ranks_from_slurm_without_lightning_requeue():
    cfg = compose_train("experiment=repae_sdvae", "trainer=slurm")
    environment = instantiate(cfg.trainer.plugins[1])
    assert type(environment).__name__ == "SLURMEnvironment" and environment.auto_requeue is False
    assert cfg.trainer.strategy.find_unused_parameters is True


@pytest.mark.parametrize(
    "overrides",
    [["trainer=fsdp"], ["trainer=slurm", "trainer.strategy._target_=repae.strategies.ShardedSiTStrategy"]],
)
def test_fsdp_trainer_shards_the_sit_and_its_ema_and_keeps_ddp_for_the_rest(overrides):
    from repae.strategies import ShardedSiTStrategy

    strategy = instantiate(compose_train("experiment=repae_sdvae", *overrides).trainer.strategy)
    assert isinstance(strategy, ShardedSiTStrategy)
    assert strategy.sharded_modules == ("sit", "ema")
    assert strategy._ddp_kwargs["find_unused_parameters"] is True


def submitit_launcher_installed() -> bool:
    try:
        return importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is not None
    except ModuleNotFoundError:
        return False


@pytest.mark.skipif(
    not submitit_launcher_installed(), reason="hydra-submitit-launcher (the `slurm` extra) is not installed"
)
def test_slurm_launcher_config_composes():
    cfg = compose_train("experiment=repae_sdvae", "trainer=slurm", "hydra/launcher=slurm")
    assert cfg.hydra.launcher.tasks_per_node == 8 and cfg.hydra.launcher.max_num_timeout == 20


PERF_KEYS = ("compile", "compile_options", "vae_compile_options", "channels_last", "fast_kernels")


def perf_settings(cfg) -> dict:
    return {**{key: cfg.model[key] for key in PERF_KEYS}, "fused": cfg.model.optimizer.fused}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_the_reference_perf_is_the_default_and_fast_sets_the_gpu_recipe(experiment):
    reference = compose_train(f"experiment={experiment}")
    assert reference.hydra.runtime.choices.perf == "reference"
    assert perf_settings(reference) == {
        "compile": False,
        "compile_options": None,
        "vae_compile_options": None,
        "channels_last": False,
        "fast_kernels": False,
        "fused": None,
    }
    fast = compose_train("perf=fast", f"experiment={experiment}")
    assert perf_settings(fast) == {
        "compile": True,
        "compile_options": None,
        "vae_compile_options": None,
        "channels_last": True,
        "fast_kernels": True,
        "fused": True,
    }
    # The perf group sets speed keys only; an ldm_only model keeps having no loss.
    for key in set(reference.model) - set(PERF_KEYS) - {"optimizer"}:
        assert fast.model[key] == reference.model[key], key
    if fast.model.loss is not None:
        assert fast.model.loss.autocast_networks is False  # fp32 loss networks, as measured


def test_perf_fast_is_the_gpu_recipe_docs_performance_measures():
    """`perf=fast` composes the model of the command behind docs/performance.md's numbers (its
    fast kernels were unconditional then, hence model.fast_kernels=true)."""
    fast = compose_train("experiment=repae_sdvae", "perf=fast")
    measured = compose_train(
        "experiment=repae_sdvae",
        "model.optimizer.fused=true",
        "model.compile=true",
        "model.channels_last=true",
        "model.fast_kernels=true",
    )
    assert fast.model == measured.model


def test_a_speed_key_set_on_its_own_overrides_the_perf_group():
    cfg = compose_train(
        "perf=fast", "experiment=repae_sdvae", "model.compile=false", "model.loss.autocast_networks=true"
    )
    assert cfg.model.compile is False and cfg.model.channels_last is True
    assert cfg.model.loss.autocast_networks is True
