"""Guidance sweeps: a grid of CFG scale x guidance interval, generated, evaluated, tabled, resumable."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import open_dict
from test_evaluate import inception_weights, smooth_images  # noqa: F401
from test_generate import tiny_checkpoint  # noqa: F401

import repae.guidance_sweep as sweep_module
from repae.guidance_sweep import guidance_sweep

from conftest import CONF_DIR


def sweep_config(ckpt_path, output_dir, reference_path, weights_path):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            config_name="guidance_sweep",
            overrides=[
                f"ckpt_path={ckpt_path}",
                "cfg_scales=[1.0,2.0]",
                "guidance_highs=[0.5,1.0]",
                "num_samples=4",
                "batch_size=4",
                "sampler.mode=ode",
                "sampler.num_steps=2",
                "trainer.accelerator=cpu",
                "progress_bar=false",
                f"evaluation.reference_path={reference_path}",
                f"evaluation.inception_weights_path={weights_path}",
                "evaluation.batch_size=8",
                "evaluation.num_workers=0",
                "evaluation.device=cpu",
            ],
        )
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


def test_a_2x2_sweep_writes_table_and_heat_map_and_resumes_only_unfinished_points(
    tiny_checkpoint,  # noqa: F811
    inception_weights,  # noqa: F811
    tmp_path,
    monkeypatch,
):
    np.savez(tmp_path / "reference.npz", arr_0=smooth_images(8, seed=0))
    generated = []
    original_generate = sweep_module.generate

    def recording_generate(cfg, model=None):
        generated.append((cfg.sampler.cfg_scale, cfg.sampler.guidance_high))
        return original_generate(cfg, model=model)

    monkeypatch.setattr(sweep_module, "generate", recording_generate)
    output = tmp_path / "sweep"
    cfg = sweep_config(tiny_checkpoint, output, tmp_path / "reference.npz", inception_weights)
    rows = guidance_sweep(cfg)

    assert sorted(generated) == [(1.0, 0.5), (1.0, 1.0), (2.0, 0.5), (2.0, 1.0)]
    with open(output / "guidance_sweep.csv") as f:
        table = list(csv.DictReader(f))
    assert [(float(r["cfg_scale"]), float(r["guidance_high"])) for r in table] == sorted(generated)
    assert all(r["fid"] and r["inception_score"] and r["precision"] and r["recall"] for r in table)
    assert (output / "guidance_sweep.md").read_text().count("\n") == 2 + 4
    assert (output / "guidance_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    point = json.loads((output / "points" / "cfg2.0-high0.5-steps2.json").read_text())
    assert point["protocol"]["sampler"]["cfg_scale"] == 2.0
    assert point["protocol"]["sampler"]["guidance_interval"] == [0.0, 0.5]
    assert point["protocol"]["num_samples"] == 4 and point["protocol"]["inception_sha256"]
    assert {row["fid"] for row in rows} == {float(r["fid"]) for r in table}

    # A sweep killed before its last point finished: only that point is generated again.
    (output / "points" / "cfg2.0-high1.0-steps2.json").unlink()
    generated.clear()
    guidance_sweep(cfg)
    assert generated == [(2.0, 1.0)]
    with open(output / "guidance_sweep.csv") as f:
        assert len(list(csv.DictReader(f))) == 4

    # Nothing missing: nothing is generated, and no model is even loaded.
    generated.clear()
    monkeypatch.setattr(sweep_module, "load_sampling_model", lambda *args, **kwargs: pytest.fail("loaded"))
    guidance_sweep(cfg)
    assert generated == []
