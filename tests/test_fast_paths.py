"""The speed levers (torch.compile of every network, fused AdamW, channels_last, the VAE's fast
kernels; together ``perf=fast``) leave the training unchanged, and their settings reach what they set."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch._inductor.config as inductor_config

from repae.kernels.vae import FAST_MODULES
from repae.train import train

from conftest import compose_config
from test_training import build, fit, loss_trace

# Step 1's losses come from the initial weights, so only rounding separates the paths (measured
# <= 1.2e-7). Step 2's weights went through one AdamW update, which turns rounding-level gradient
# differences into up to learning-rate-sized moves of parameters whose gradient is near zero (the
# update m / sqrt(v) is about the gradient's sign): measured up to 1.2e-4 (compiled attention
# reassociates its sums). For scale: learning rates a third lower move step 2 by 8e-4 (SiT) to
# 3e-2 (VAE), so step 2 barely separates a SiT-side change from rounding; step 1 catches any
# change to the forward passes and losses.
RELATIVE_TOLERANCE = {1: 1e-5, 2: 5e-4}


@pytest.fixture(scope="module")
def eager_run(tmp_path_factory) -> Path:
    """The default path's two steps, which every fast path is compared with."""
    run_dir = tmp_path_factory.mktemp("eager") / "run"
    train(compose_config(run_dir, "model.max_train_steps=2"))
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize(
    "levers",
    [
        ("model.compile=true", "model.optimizer.fused=true"),
        ("model.channels_last=true",),
        ("model.compile=true", "model.optimizer.fused=true", "model.channels_last=true"),
        ("model.fast_kernels=true", "model.channels_last=true"),
        ("perf=fast",),
    ],
    ids=[
        "compile+fused",
        "channels_last",
        "compile+fused+channels_last",
        "fast_kernels+channels_last",
        "perf=fast",
    ],
)
def test_fast_paths_train_like_the_default_path(tiny_config, eager_run, levers):
    fast = tiny_config("model.max_train_steps=2", *levers)
    # Compiled code draws its own random numbers unless told to use torch's; with torch's, the
    # same seeds give the same t, noise and label dropout, so the losses must agree.
    with inductor_config.patch(fallback_random=True):
        train(fast)
    for key in ("sit_loss", "vae_loss", "d_loss"):
        expected, found = loss_trace(eager_run, key), loss_trace(Path(fast.paths.output_dir), key)
        assert sorted(found) == [1, 2]
        for step, value in expected.items():
            assert found[step] == pytest.approx(value, rel=RELATIVE_TOLERANCE[step], abs=1e-6), (key, step)


def test_the_fast_kernels_switch_swaps_the_vae_modules_when_the_run_sets_up(tiny_config):
    cfg = tiny_config("model.fast_kernels=true", "model.max_train_steps=1")
    model = build(cfg)
    plain = {type(module) for module in model.vae.modules()}
    fit(cfg, model)
    fast = {type(module) for module in model.vae.modules()}
    assert not plain & set(FAST_MODULES.values())
    assert set(FAST_MODULES.values()) <= fast and not fast & set(FAST_MODULES)


def test_compile_options_reach_the_compilation_of_every_network(tiny_config, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: compiled.append((self, kwargs)))
    cfg = tiny_config("model.compile=true", "model.compile_options={coordinate_descent_tuning: true}")
    model = build(cfg)
    fit(cfg, model)
    assert {id(module) for module, _ in compiled} >= {id(model.sit), id(model.vae), id(model.vae_loss)}
    assert all(kwargs == {"options": {"coordinate_descent_tuning": True}} for _, kwargs in compiled)


def test_vae_compile_options_reach_the_vae_alone_over_the_shared_ones(tiny_config, monkeypatch):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: compiled.append((self, kwargs)))
    cfg = tiny_config(
        "model.compile=true",
        "model.compile_options={max_autotune: false, epilogue_fusion: true}",
        "model.vae_compile_options={coordinate_descent_tuning: true, epilogue_fusion: false}",
    )
    model = build(cfg)
    fit(cfg, model)
    options = {id(module): kwargs["options"] for module, kwargs in compiled}
    assert options.pop(id(model.vae)) == {
        "max_autotune": False,
        "epilogue_fusion": False,
        "coordinate_descent_tuning": True,
    }
    assert options and all(o == {"max_autotune": False, "epilogue_fusion": True} for o in options.values())


@pytest.mark.parametrize("key", ["compile_options", "vae_compile_options"])
def test_an_unknown_compile_option_names_the_config_key(tiny_config, key):
    with pytest.raises(Exception, match=rf"model.{key}.*'coordinate_descent_tunning'"):
        build(tiny_config(f"model.{key}={{coordinate_descent_tunning: true}}"))


@pytest.mark.parametrize(
    "asked",
    [
        "model.compile_options={triton.cudagraphs: true}",
        "model.vae_compile_options={triton.cudagraphs: true}",
        "env",
    ],
)
def test_cuda_graphs_are_refused_where_the_step_reuses_outputs_of_ended_graphs(
    tiny_config, monkeypatch, asked
):
    if asked == "env":
        monkeypatch.setenv("TORCHINDUCTOR_CUDAGRAPHS", "1")
    overrides = [] if asked == "env" else [asked]
    assert not build(tiny_config(*overrides)).cuda_graphs  # eager: inductor's options have nothing to act on
    with pytest.raises(Exception, match="work in mode ldm_only only, not e2e"):
        build(tiny_config("model.compile=true", *overrides))


def test_with_cuda_graphs_the_ldm_step_keeps_the_encoder_features_past_the_next_graph(tiny_config, tmp_path):
    stats_path = tmp_path / "stats.pt"
    torch.save({"latents_scale": torch.ones(1, 4, 1, 1), "latents_bias": torch.zeros(1, 4, 1, 1)}, stats_path)
    ldm_only = ("model.mode=ldm_only", "model.loss=null", f"model.latents_stats_path={stats_path}")
    model = build(
        tiny_config(*ldm_only, "model.compile=true", "model.compile_options={triton.cudagraphs: true}")
    )
    pool = torch.randn(4, 16, 8)  # stands for the graph's output memory, which the SiT's graph reuses
    expected = pool.clone()
    model.encoders[0].forward = lambda images, grid_size=None: pool
    features = model.encode_features(torch.zeros(4, 3, 32, 32, dtype=torch.uint8))
    pool.fill_(float("nan"))
    torch.testing.assert_close(features[0], expected)
