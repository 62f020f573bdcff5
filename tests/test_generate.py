"""Sample generation: labels, per-index determinism, resume, the ADM npz, and checkpoint loading."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

import repae.generate as generate_module
from repae.generate import (
    SamplingModel,
    generate,
    load_sampling_model,
    npz_path_of,
    sample_labels,
)
from repae.modules.samplers import euler_maruyama_sampler, generate_images
from repae.modules.sit import build_sit, projector_dims
from repae.modules.vae import build_vae
from repae.train import train

from conftest import CONF_DIR, compose_config


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A repae Lightning checkpoint of the tiny demo model after one training step (10 classes, 32px)."""
    run_dir = tmp_path_factory.mktemp("train")
    # ema_decay 0: the EMA equals the trained SiT, so sampling does not see the zero-initialised head only.
    cfg = compose_config(
        run_dir,
        "model.max_train_steps=1",
        "model.ema_decay=0.0",
        "++callbacks.fid=null",
        "callbacks.image_grid=null",
        "callbacks.loss_curve=null",
    )
    train(cfg)
    return run_dir / "checkpoints" / "last.ckpt"


def generate_config(ckpt_path, sample_dir, *overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(
            config_name="generate",
            overrides=[
                f"ckpt_path={ckpt_path}",
                f"sample_dir={sample_dir}",
                "num_samples=20",
                "batch_size=8",
                "sampler.num_steps=3",
                "trainer.accelerator=cpu",
                "progress_bar=false",
                *overrides,
            ],
        )


def assert_same_images(a: np.ndarray, b: np.ndarray) -> None:
    """Equal up to the float rounding of batched kernels, which may flip a rare uint8 value by one."""
    assert a.shape == b.shape
    difference = np.abs(a.astype(int) - b.astype(int))
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3


def read_npz(path) -> np.ndarray:
    with np.load(path) as data:
        assert list(data.keys()) == ["arr_0"]
        return data["arr_0"]


def test_class_balanced_labels_have_equal_counts_and_do_not_depend_on_num_samples():
    labels = sample_labels(2000, 10, "equal", global_seed=0)
    assert labels.dtype == torch.int64
    assert torch.bincount(labels, minlength=10).tolist() == [200] * 10
    # Every prefix of whole blocks is balanced, and a longer run keeps the labels of a shorter one.
    assert torch.bincount(labels[:30], minlength=10).tolist() == [3] * 10
    assert torch.equal(sample_labels(1234, 10, "equal", global_seed=0), labels[:1234])
    counts = torch.bincount(sample_labels(1005, 10, "equal", global_seed=0), minlength=10)
    assert counts.max() - counts.min() <= 1
    # Shuffled, and the shuffle follows the seed.
    assert not torch.equal(labels[:10], torch.arange(10))
    assert not torch.equal(sample_labels(2000, 10, "equal", global_seed=1), labels)


def test_random_labels_are_uniform_draws_that_follow_the_seed():
    labels = sample_labels(5000, 10, "random", global_seed=0)
    counts = torch.bincount(labels, minlength=10)
    assert counts.sum() == 5000 and labels.min() >= 0 and labels.max() < 10
    assert len(set(counts.tolist())) > 1  # not balanced by construction
    assert ((counts - 500).abs() < 100).all()  # ~4.5 standard deviations
    assert torch.equal(sample_labels(5000, 10, "random", global_seed=0), labels)
    with pytest.raises(ValueError, match="label_sampling"):
        sample_labels(10, 10, "balanced")


def test_per_sample_generators_make_sde_samples_independent_of_batching():
    class Linear(torch.nn.Module):
        def inference(self, x, t, y):
            return -x + y.view(-1, 1, 1, 1).to(x)

    latents = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2])

    def generators(seeds):
        return [torch.Generator().manual_seed(seed) for seed in seeds]

    together = euler_maruyama_sampler(Linear(), latents, labels, num_steps=5, generator=generators([7, 8, 9]))
    alone = [
        euler_maruyama_sampler(
            Linear(), latents[i : i + 1], labels[i : i + 1], num_steps=5, generator=generators([seed])
        )
        for i, seed in enumerate([7, 8, 9])
    ]
    torch.testing.assert_close(together, torch.cat(alone), rtol=0, atol=1e-12)
    assert not torch.allclose(together[0], together[1])
    with pytest.raises(ValueError, match="generators"):
        euler_maruyama_sampler(Linear(), latents, labels, num_steps=2, generator=generators([1, 2]))


def test_generate_images_matches_the_lightning_module_generate(tiny_config):
    from hydra.utils import instantiate

    from repae.config import to_plain

    torch.manual_seed(0)
    module = instantiate(to_plain(tiny_config().model), _recursive_=False)
    module.load_pretrained()
    noise = torch.randn(4, *module.latent_shape, generator=torch.Generator().manual_seed(3))
    labels = torch.tensor([0, 3, 5, 9])
    kwargs = dict(mode="ode", num_steps=3, cfg_scale=1.5)
    expected = module.generate(labels, noise, **kwargs)
    got = generate_images(module.ema, module.vae, labels, noise, **kwargs)
    assert got.dtype == torch.uint8 and got.shape == (4, 3, 32, 32)
    assert torch.equal(got, expected)


def test_generation_writes_pngs_and_an_adm_npz_with_class_balanced_labels(
    tiny_checkpoint, tmp_path, monkeypatch
):
    seen_labels = []
    original = SamplingModel.generate

    def recording_generate(self, labels, noise, **kwargs):
        seen_labels.append(labels.clone())
        return original(self, labels, noise, **kwargs)

    monkeypatch.setattr(SamplingModel, "generate", recording_generate)
    sample_dir = tmp_path / "samples"
    npz_path = generate(generate_config(tiny_checkpoint, sample_dir))

    assert npz_path == npz_path_of(sample_dir) == tmp_path / "samples.npz"
    assert sorted(os.listdir(sample_dir)) == [f"{i:06d}.png" for i in range(20)]
    images = read_npz(npz_path)
    assert images.dtype == np.uint8 and images.shape == (20, 32, 32, 3)
    for index in (0, 7, 19):
        np.testing.assert_array_equal(images[index], np.asarray(Image.open(sample_dir / f"{index:06d}.png")))
    assert len({images[i].tobytes() for i in range(20)}) == 20  # each index has its own noise
    labels = torch.cat(seen_labels)
    assert torch.bincount(labels, minlength=10).tolist() == [2] * 10


def test_generation_resumes_without_regenerating_finished_indices(tiny_checkpoint, tmp_path, monkeypatch):
    writes = []
    original_save = generate_module.save_png
    monkeypatch.setattr(
        generate_module,
        "save_png",
        lambda image, path: (writes.append(path.name), original_save(image, path)),
    )

    sample_dir = tmp_path / "resumed"
    generate(generate_config(tiny_checkpoint, sample_dir, "num_samples=12"))
    assert len(writes) == 12
    first_files = {
        name: (os.stat(sample_dir / name).st_mtime_ns, (sample_dir / name).read_bytes()) for name in writes
    }
    # A run killed mid-batch: one finished index lost, and a temporary file left behind.
    os.remove(sample_dir / "000005.png")
    (sample_dir / "000013.png.tmp").write_bytes(b"truncated")
    del first_files["000005.png"]
    writes.clear()

    generate(generate_config(tiny_checkpoint, sample_dir, "num_samples=20"))
    assert sorted(writes) == sorted(["000005.png", *[f"{i:06d}.png" for i in range(12, 20)]])
    for name, (mtime, content) in first_files.items():
        assert os.stat(sample_dir / name).st_mtime_ns == mtime and (sample_dir / name).read_bytes() == content

    fresh = generate(generate_config(tiny_checkpoint, tmp_path / "fresh", "num_samples=20", "batch_size=20"))
    resumed = read_npz(npz_path_of(sample_dir))
    assert resumed.shape == (20, 32, 32, 3)
    assert_same_images(resumed, read_npz(fresh))

    # Nothing left to do: no image and no npz is written again.
    writes.clear()
    npz_mtime = os.stat(npz_path_of(sample_dir)).st_mtime_ns
    generate(generate_config(tiny_checkpoint, sample_dir, "num_samples=20"))
    assert writes == [] and os.stat(npz_path_of(sample_dir)).st_mtime_ns == npz_mtime
    # Fewer samples than there are PNGs: only the npz is rebuilt.
    generate(generate_config(tiny_checkpoint, sample_dir, "num_samples=12"))
    assert writes == []
    np.testing.assert_array_equal(read_npz(npz_path_of(sample_dir)), resumed[:12])


def test_images_do_not_depend_on_batch_size_and_follow_the_seed(tiny_checkpoint, tmp_path):
    model = load_sampling_model(str(tiny_checkpoint))
    runs = {}
    for name, overrides in {
        "batch3": ["batch_size=3"],
        "batch20": ["batch_size=20"],
        "seed1": ["batch_size=20", "global_seed=1"],
    }.items():
        cfg = generate_config(
            tiny_checkpoint, tmp_path / name, "num_samples=6", "sampler.mode=sde", *overrides
        )
        runs[name] = read_npz(generate(cfg, model=model))
    assert_same_images(runs["batch3"], runs["batch20"])
    assert np.abs(runs["seed1"].astype(int) - runs["batch20"].astype(int)).mean() > 1.0


def test_lightning_checkpoint_loads_without_encoder_or_loss_weight_files(tiny_checkpoint, tmp_path):
    checkpoint = torch.load(tiny_checkpoint, weights_only=True)
    # As if trained with DINOv2 and LPIPS: neither weight file exists here, and sampling needs neither.
    checkpoint["hyper_parameters"]["encoder"] = {
        "names": "dinov2-vit-b",
        "weights_paths": "/missing/dinov2.pth",
    }
    checkpoint["hyper_parameters"]["loss"] = {"_target_": "does.not.exist"}
    path = tmp_path / "moved.ckpt"
    torch.save(checkpoint, path)

    model = load_sampling_model(str(path))
    state_dict = checkpoint["state_dict"]
    for key, value in model.sit.state_dict().items():
        assert torch.equal(value, state_dict[f"ema.{key}"]), key
    for key, value in model.vae.state_dict().items():
        assert torch.equal(value, state_dict[f"vae.{key}"]), key
    assert model.num_classes == 10 and model.latent_shape == (4, 8, 8)
    assert projector_dims(model.sit.state_dict()) == [
        112
    ]  # the demo aligns to 112-channel EfficientNet features
    assert not model.sit.training and not any(p.requires_grad for p in model.parameters())

    non_ema = load_sampling_model(str(path), use_ema=False)
    assert torch.equal(non_ema.sit.final_layer.linear.weight, state_dict["sit.final_layer.linear.weight"])


def official_checkpoint(path: Path, with_vae: bool = True) -> dict:
    """An official-format checkpoint (random weights) of a SiT-S/2 on the tiny VAE, 32px, 10 classes."""
    args = argparse.Namespace(
        model="SiT-S/2",
        vae="f4d4-tiny",
        resolution=32,
        num_classes=10,
        encoder_depth=4,
        qk_norm=False,
        fused_attn=True,
        bn_momentum=0.1,
        path_type="linear",
        enc_type="dinov2-vit-b",
        cfg_prob=0.1,
    )
    torch.manual_seed(0)
    sit = build_sit("SiT-S/2", input_size=8, in_channels=4, num_classes=10, z_dims=[768], encoder_depth=4)
    torch.nn.init.normal_(sit.final_layer.linear.weight, std=0.02)
    sit.init_bn(torch.full((4,), 2.0), torch.full((4,), 0.1))
    vae = build_vae("f4d4-tiny")
    checkpoint = {"model": sit.state_dict(), "ema": sit.state_dict(), "opt": {}, "args": args, "steps": 7}
    if with_vae:
        checkpoint["vae"] = vae.state_dict()
        checkpoint["discriminator"] = {}
    torch.save(checkpoint, path)
    return {"sit": sit, "vae": vae}


def test_official_checkpoint_with_pickled_namespace_loads_and_samples(tmp_path):
    reference = official_checkpoint(tmp_path / "0000007.pt")
    model = load_sampling_model(str(tmp_path / "0000007.pt"))
    for key, value in reference["sit"].state_dict().items():
        assert torch.equal(model.sit.state_dict()[key], value), key
    assert model.sit.encoder_depth == 4 and len(model.sit.blocks) == 12 and model.latent_shape == (4, 8, 8)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([1, 2])
    expected = generate_images(reference["sit"].eval(), reference["vae"], labels, noise, num_steps=2)
    assert torch.equal(model.generate(labels, noise, num_steps=2), expected)


def test_official_ldm_only_checkpoint_needs_the_vae_weights_path(tmp_path):
    reference = official_checkpoint(tmp_path / "ldm.pt", with_vae=False)
    with pytest.raises(FileNotFoundError, match="vae_weights_path"):
        load_sampling_model(str(tmp_path / "ldm.pt"))
    torch.save(reference["vae"].state_dict(), tmp_path / "vae.pt")
    model = load_sampling_model(str(tmp_path / "ldm.pt"), vae_weights_path=str(tmp_path / "vae.pt"))
    assert torch.equal(model.vae.decoder.conv_out.weight, reference["vae"].decoder.conv_out.weight)
    with pytest.raises(FileNotFoundError, match="vae_weights_path"):
        load_sampling_model(str(tmp_path / "ldm.pt"), vae_weights_path=str(tmp_path / "missing.pt"))


def test_unknown_or_missing_checkpoints_are_rejected_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="ckpt_path"):
        load_sampling_model(str(tmp_path / "missing.ckpt"))
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="neither"):
        load_sampling_model(str(tmp_path / "other.pt"))


def test_a_vae_only_model_or_checkpoint_says_it_has_nothing_to_sample(tiny_config, tmp_path):
    from hydra.utils import instantiate

    from repae.config import to_plain

    module = instantiate(to_plain(tiny_config("model=vae_only").model), _recursive_=False)
    with pytest.raises(ValueError, match="a vae_only model has no SiT, so it has nothing to sample"):
        module.generate(torch.tensor([0]), torch.randn(1, 4, 8, 8))

    path = tmp_path / "vae_only.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    with pytest.raises(ValueError, match="vae_only checkpoint: it has no SiT, so it has nothing to sample"):
        load_sampling_model(str(path))
    # From the command line: one error line and a non-zero exit.
    command = [
        sys.executable, "-m", "repae.generate", f"ckpt_path={path}", f"sample_dir={tmp_path}/samples",
        f"hydra.run.dir={tmp_path}/run", "trainer.accelerator=cpu",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "nothing to sample" in lines[-1], result.stderr[-3000:]
    assert not any("Traceback" in line for line in lines)


def test_the_protocol_of_the_samples_is_written_beside_them(tiny_checkpoint, tmp_path):
    sample_dir = tmp_path / "samples"
    generate(generate_config(tiny_checkpoint, sample_dir, "num_samples=2", "sampler.cfg_scale=1.5"))
    protocol = json.loads((tmp_path / "samples.json").read_text())
    assert protocol["num_samples"] == 2 and protocol["label_sampling"] == "equal"
    assert protocol["sampler"] == {
        "mode": "sde",
        "num_steps": 3,
        "heun": False,
        "cfg_scale": 1.5,
        "guidance_interval": [0.0, 1.0],
    }
    assert protocol["seeds"] == {"global_seed": 0} and protocol["weights"] == "ema"
    assert protocol["precision"] == "32-true + tf32" and protocol["compile"] is False
    assert protocol["checkpoint_sha256"] == hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest()
    assert protocol["torch_version"] == torch.__version__ and protocol["git_commit"]
