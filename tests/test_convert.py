"""Weight tooling: safe loading of official checkpoints, VAE extraction, official -> repae checkpoints
(load and resume), and the CompVis <-> diffusers VAE conversion."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import open_dict
from safetensors.torch import load_file, save_file

from repae.config import to_plain
from repae.convert.checkpoints import extract_vae, load_checkpoint
from repae.convert.diffusers import (
    DIFFUSERS_WEIGHTS,
    diffusers_config,
    from_diffusers,
    save_diffusers,
    to_diffusers,
    vae_from_diffusers_config,
    vae_to_diffusers_state_dict,
)
from repae.convert.official import compose_train_config, from_official
from repae.module import REPAE
from repae.modules.vae import build_vae
from repae.train import train

from conftest import TINY_OVERRIDES

REPO = Path(__file__).resolve().parents[1]
OFFICIAL_STEPS = 7
# The tiny demo model; the official arguments below fix SiT name, VAE, classes, encoder, steps.
EXTRA_OVERRIDES = [o for o in TINY_OVERRIDES if not o.startswith("model.max_train_steps")] + [
    "++callbacks.fid=null"
]


def official_args() -> argparse.Namespace:
    return argparse.Namespace(
        exp_name="tiny", model="SiT-S/2", vae="f4d4-tiny", resolution=32, num_classes=10, encoder_depth=1,
        enc_type="effnet-lite0", proj_coeff=0.5, vae_align_proj_coeff=1.5, cfg_prob=0.1, bn_momentum=0.1,
        qk_norm=False, fused_attn=True, path_type="linear", weighting="uniform", prediction="v",
        learning_rate=3e-4, vae_learning_rate=3e-4, disc_learning_rate=3e-4, adam_beta1=0.9, adam_beta2=0.999,
        adam_weight_decay=0.0, adam_epsilon=1e-8, max_grad_norm=1.0, max_train_steps=OFFICIAL_STEPS + 1,
        batch_size=4, seed=0, mixed_precision="no", vae_ckpt="pretrained/tiny/tiny.pt", compile=False,
    )  # fmt: skip


def stepped_adamw(params: list[torch.nn.Parameter], with_grad: list[torch.nn.Parameter]) -> dict:
    """An AdamW state_dict over ``params`` after one step in which only ``with_grad`` had gradients."""
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    generator = torch.Generator().manual_seed(0)
    for param in with_grad:
        param.grad = torch.randn(param.shape, generator=generator)
    optimizer.step()
    return optimizer.state_dict()


def make_official(tmp_path: Path, ldm_only: bool = False) -> tuple[Path, dict]:
    """An official-layout checkpoint of the tiny demo model, with distinct EMA and BN statistics."""
    cfg = compose_train_config(["model.max_train_steps=8", *EXTRA_OVERRIDES])
    torch.manual_seed(0)
    model = instantiate(to_plain(cfg.model), _recursive_=False)
    sit_params = list(model.sit.parameters())  # pos_embed included, as in train_repae.py
    checkpoint = {"model": None, "ema": None, "opt": stepped_adamw(sit_params, sit_params)}
    if not ldm_only:
        vae_params = list(model.vae.parameters())
        checkpoint["opt_vae"] = stepped_adamw(vae_params, vae_params)
        # The official loss-module optimizer: a frozen LPIPS-like parameter first, then D.
        frozen = torch.nn.Parameter(torch.zeros(3))
        discriminator_params = list(model.vae_loss.discriminator.parameters())
        checkpoint["opt_disc"] = stepped_adamw([frozen, *discriminator_params], discriminator_params)
        checkpoint["vae"] = model.vae.state_dict()
        checkpoint["discriminator"] = model.vae_loss.discriminator.state_dict()
    model.sit.bn.running_mean.copy_(torch.linspace(-1, 1, 4))
    model.sit.bn.running_var.copy_(torch.linspace(0.5, 2, 4))
    checkpoint["model"] = model.sit.state_dict()
    checkpoint["ema"] = {
        k: v + 0.25 if v.is_floating_point() else v for k, v in model.sit.state_dict().items()
    }
    checkpoint["args"] = official_args()
    checkpoint["steps"] = OFFICIAL_STEPS
    path = tmp_path / ("ldm.pt" if ldm_only else "official.pt")
    torch.save(checkpoint, path)
    if ldm_only:
        torch.save(model.vae.state_dict(), tmp_path / "frozen-vae.pt")
    return path, checkpoint


@pytest.fixture(scope="module")
def official_checkpoint(tmp_path_factory) -> tuple[Path, dict]:
    """One official-layout checkpoint for the tests that only read it (``make_official``)."""
    return make_official(tmp_path_factory.mktemp("official"))


def leave_marker(path: str) -> None:
    Path(path).touch()


class Payload:
    """Unpickling this calls leave_marker: the kind of object a malicious checkpoint carries."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (leave_marker, (str(self.marker),))


def test_official_checkpoint_with_namespace_loads_but_any_other_pickled_object_is_refused(
    tmp_path, official_checkpoint
):
    path, official = official_checkpoint
    loaded = load_checkpoint(path)
    assert isinstance(loaded["args"], argparse.Namespace) and loaded["args"].model == "SiT-S/2"
    assert loaded["steps"] == OFFICIAL_STEPS

    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    torch.save({**official, "extra": Payload(marker)}, evil)
    with pytest.raises(ValueError, match="leave_marker, which is not on repae's allow-list"):
        load_checkpoint(evil)
    assert not marker.exists()  # nothing was executed
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "absent.pt")


def test_extraction_writes_official_files_that_load_back_into_a_model(tmp_path, official_checkpoint):
    path, official = official_checkpoint
    files = extract_vae(path, "e2e-tiny", tmp_path / "exps")
    folder = tmp_path / "exps" / "e2e-tiny"
    assert files == {
        "vae": folder / "e2e-tiny.pt",
        "latents_stats": folder / "e2e-tiny-latents-stats.pt",
        "discriminator": folder / "e2e-tiny-discriminator-ckpt.pt",
    }
    stats = torch.load(files["latents_stats"], weights_only=True)
    ema_var = official["ema"]["bn.running_var"]
    torch.testing.assert_close(stats["latents_scale"], ema_var.rsqrt().reshape(1, 4, 1, 1))
    torch.testing.assert_close(stats["latents_bias"], official["ema"]["bn.running_mean"].reshape(1, 4, 1, 1))
    # Round trip: the files as pretrained weights of a fresh model reproduce the checkpoint.
    cfg = compose_train_config([
        *EXTRA_OVERRIDES, f"model.vae_weights_path={files['vae']}", f"model.latents_stats_path={files['latents_stats']}",
        f"model.discriminator_weights_path={files['discriminator']}",
    ])  # fmt: skip
    model = instantiate(to_plain(cfg.model), _recursive_=False)
    model.load_pretrained()
    assert all(torch.equal(v, official["vae"][k]) for k, v in model.vae.state_dict().items())
    assert all(
        torch.equal(v, official["discriminator"][k])
        for k, v in model.vae_loss.discriminator.state_dict().items()
    )
    torch.testing.assert_close(model.ema.bn.running_var, ema_var)
    torch.testing.assert_close(model.ema.bn.running_mean, official["ema"]["bn.running_mean"])


def test_from_official_gives_a_checkpoint_that_loads_and_resumes_training(tmp_path, official_checkpoint):
    path, official = official_checkpoint
    converted = tmp_path / "converted.ckpt"
    overrides = from_official(path, converted, EXTRA_OVERRIDES)
    assert "model.sit.name=SiT-S/2" in overrides and "model.vae.name=f4d4-tiny" in overrides

    model = REPAE.load_from_checkpoint(converted)
    assert model.step == OFFICIAL_STEPS
    for ours, theirs in [(model.sit, "model"), (model.ema, "ema"), (model.vae, "vae"),
                         (model.vae_loss.discriminator, "discriminator")]:  # fmt: skip
        state = ours.state_dict()
        assert state.keys() == official[theirs].keys()
        assert all(torch.equal(state[k], official[theirs][k]) for k in state), theirs

    # The Adam moments follow their parameters by name; pos_embed (frozen in repae) is dropped.
    states = torch.load(converted, weights_only=True)["optimizer_states"]
    sit_names = [n for n, p in model.sit.named_parameters() if p.requires_grad]
    official_sit_names = [n for n, _ in model.sit.named_parameters()]
    assert "pos_embed" not in sit_names and len(states[0]["state"]) == len(sit_names)
    for index, name in enumerate(sit_names):
        expected = official["opt"]["state"][official_sit_names.index(name)]["exp_avg"]
        assert torch.equal(states[0]["state"][index]["exp_avg"], expected), name
    assert len(states[1]["state"]) == len(official["opt_vae"]["state"])
    disc_expected = [
        official["opt_disc"]["state"][i + 1]["exp_avg_sq"] for i in range(len(states[2]["state"]))
    ]
    assert all(torch.equal(states[2]["state"][i]["exp_avg_sq"], e) for i, e in enumerate(disc_expected))
    assert states[0]["param_groups"][0]["lr"] == 3e-4

    cfg = compose_train_config([*overrides, f"ckpt_path={converted}"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    train(cfg)  # one more step: official steps 7 -> max_train_steps 8
    resumed = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert int(resumed["state_dict"]["train_step"]) == OFFICIAL_STEPS + 1
    assert not torch.equal(
        resumed["state_dict"]["sit.final_layer.linear.bias"], official["model"]["final_layer.linear.bias"]
    )


def test_ldm_only_checkpoint_needs_and_takes_the_frozen_vae(tmp_path):
    path, official = make_official(tmp_path, ldm_only=True)
    with pytest.raises(ValueError, match="--vae-weights.*pretrained/tiny/tiny.pt"):
        from_official(path, tmp_path / "ldm.ckpt", EXTRA_OVERRIDES)
    overrides = from_official(
        path, tmp_path / "ldm.ckpt", EXTRA_OVERRIDES, vae_weights_path=tmp_path / "frozen-vae.pt"
    )
    assert overrides[0] == "model=ldm_only"
    model = REPAE.load_from_checkpoint(tmp_path / "ldm.ckpt")
    assert model.mode == "ldm_only" and model.vae_loss is None and model.step == OFFICIAL_STEPS
    frozen = torch.load(tmp_path / "frozen-vae.pt", weights_only=True)
    assert all(torch.equal(v, frozen[k]) for k, v in model.vae.state_dict().items())
    with pytest.raises(ValueError, match="no VAE weights"):
        extract_vae(path, "x", tmp_path)


def test_from_official_rejects_weights_that_do_not_fit_the_config(tmp_path, official_checkpoint):
    path, _ = official_checkpoint
    with pytest.raises(
        ValueError,
        match=r"\['model'\] does not fit the configured SiT: shape mismatches: pos_embed.*32 in total",
    ):
        from_official(path, tmp_path / "x.ckpt", [*EXTRA_OVERRIDES, "model.sit.hidden_size=96"])


def test_a_checkpoint_saved_without_discriminator_takes_one_from_a_file(tmp_path, official_checkpoint):
    path, official = official_checkpoint
    stripped = {k: v for k, v in official.items() if k not in ("discriminator", "opt_disc")}
    torch.save(stripped, tmp_path / "stripped.pt")
    torch.save(official["discriminator"], tmp_path / "d.pt")
    from_official(
        tmp_path / "stripped.pt",
        tmp_path / "x.ckpt",
        EXTRA_OVERRIDES,
        discriminator_weights_path=tmp_path / "d.pt",
    )
    state = torch.load(tmp_path / "x.ckpt", weights_only=True)
    for key, value in official["discriminator"].items():
        assert torch.equal(state["state_dict"][f"vae_loss.discriminator.{key}"], value)
    assert state["optimizer_states"][2]["state"] == {}  # no official D moments for a D from elsewhere


def test_extraction_from_a_repae_checkpoint_matches_extraction_from_the_official_one(
    tmp_path, official_checkpoint
):
    path, _ = official_checkpoint
    from_official(path, tmp_path / "converted.ckpt", EXTRA_OVERRIDES)
    from_repae = extract_vae(tmp_path / "converted.ckpt", "a", tmp_path)
    from_source = extract_vae(path, "b", tmp_path)
    for kind in ("vae", "latents_stats", "discriminator"):
        ours, theirs = (
            torch.load(from_repae[kind], weights_only=True),
            torch.load(from_source[kind], weights_only=True),
        )
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), kind


def test_command_line_extracts_from_an_official_checkpoint(tmp_path, official_checkpoint):
    path, official = official_checkpoint
    result = subprocess.run(
        [sys.executable, "-m", "repae.convert", "extract-vae", str(path), "--name", "n", "--save-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    vae = torch.load(tmp_path / "n" / "n.pt", weights_only=True)
    assert all(torch.equal(v, official["vae"][k]) for k, v in vae.items())


# --- diffusers ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "num_tensors", "level_attention"), [("f8d4", 248, 0), ("f16d32", 342, 50)])
def test_every_official_vae_tensor_has_exactly_one_diffusers_name(name, num_tensors, level_attention):
    with torch.device("meta"):
        vae = build_vae(name)
    state = vae.state_dict()
    converted = vae_to_diffusers_state_dict(vae, state)
    assert len(state) == len(converted) == num_tensors
    per_level = [k for k in converted if ".attentions." in k and "mid_block" not in k]
    assert len(per_level) == level_attention  # the f16d32 blocks diffusers' own converter skips
    assert converted["encoder.mid_block.attentions.0.to_q.weight"].shape == (512, 512)
    if name == "f16d32":
        assert "encoder.down_blocks.4.attentions.1.to_out.0.weight" in converted
        assert (
            "decoder.up_blocks.0.attentions.2.group_norm.bias" in converted
        )  # decoder.up.4.attn.2.norm.bias


@pytest.mark.parametrize("name", ["f8d4", "f16d32", "f4d4-tiny"])
def test_diffusers_export_and_import_round_trip_exactly(tmp_path, name):
    # The official architectures with 32 instead of 128 base channels: same blocks, same attention.
    torch.manual_seed(0)
    size = {} if name == "f4d4-tiny" else {"ch": 32}
    vae = build_vae(name, **size)
    stats = {
        "latents_scale": torch.full((1, vae.embed_dim, 1, 1), 2.0),
        "latents_bias": torch.zeros(1, vae.embed_dim, 1, 1),
    }
    out = save_diffusers(vae, vae.state_dict(), tmp_path / "hf", latents_stats=stats)
    written, match = from_diffusers(out, tmp_path / "back" / "vae.pt")
    back = torch.load(written, weights_only=True)
    assert back.keys() == vae.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in vae.state_dict().items())
    assert match == ("f4d4-tiny" if name == "f4d4-tiny" else None)  # the ch=32 variants have no name
    restored = torch.load(tmp_path / "back" / "vae-latents-stats.pt", weights_only=True)
    assert all(torch.equal(restored[k], stats[k]) for k in stats)


def test_to_diffusers_writes_a_config_and_safetensors_that_import_back(tmp_path):
    vae = build_vae("f4d4-tiny")
    torch.save(vae.state_dict(), tmp_path / "tiny.pt")
    out = to_diffusers(tmp_path / "tiny.pt", tmp_path / "hf", vae="f4d4-tiny")
    config = json.loads((out / "config.json").read_text())
    assert config["_class_name"] == "AutoencoderKL"
    assert config["block_out_channels"] == [32, 64, 64] and config["latent_channels"] == 4
    assert config["down_block_types"] == ["DownEncoderBlock2D"] * 3
    assert len(load_file(out / DIFFUSERS_WEIGHTS)) == len(vae.state_dict())
    path, match = from_diffusers(out, tmp_path / "back.pt")
    assert match == "f4d4-tiny"
    back = build_vae("f4d4-tiny")
    back.load_state_dict(torch.load(path, weights_only=True))
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(back.decode(z), vae.decode(z))


def test_f16d32_diffusers_config_has_attention_in_the_lowest_level():
    with torch.device("meta"):
        vae = build_vae("f16d32")
        config = diffusers_config(vae)
        rebuilt = vae_from_diffusers_config(config)
    assert config["down_block_types"] == ["DownEncoderBlock2D"] * 4 + ["AttnDownEncoderBlock2D"]
    assert config["up_block_types"] == ["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 4
    assert config["block_out_channels"] == [128, 128, 256, 256, 512] and config["latent_channels"] == 32
    shapes = {k: v.shape for k, v in vae.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes


def test_import_refuses_leftover_or_missing_tensors(tmp_path):
    vae = build_vae("f4d4-tiny")
    torch.save(vae.state_dict(), tmp_path / "tiny.pt")
    out = to_diffusers(tmp_path / "tiny.pt", tmp_path / "hf", vae="f4d4-tiny")
    state = load_file(out / DIFFUSERS_WEIGHTS)
    save_file({**state, "encoder.extra.weight": torch.zeros(1)}, out / DIFFUSERS_WEIGHTS)
    with pytest.raises(ValueError, match="1 unexpected tensors"):
        from_diffusers(out, tmp_path / "x.pt")
    state.pop("decoder.conv_out.bias")
    save_file(state, out / DIFFUSERS_WEIGHTS)
    with pytest.raises(ValueError, match="1 missing tensors"):
        from_diffusers(out, tmp_path / "x.pt")


@pytest.mark.parametrize("name", ["f8d4", "f16d32"])
def test_diffusers_model_decodes_like_ours(tmp_path, name):
    diffusers = pytest.importorskip("diffusers")
    vae = build_vae(name).eval()
    torch.save(vae.state_dict(), tmp_path / "vae.pt")
    to_diffusers(tmp_path / "vae.pt", tmp_path / "hf", vae=name)
    theirs = diffusers.AutoencoderKL.from_pretrained(str(tmp_path / "hf")).eval()
    generator = torch.Generator().manual_seed(0)
    # 32 px (a 4x4 or 2x2 latent grid) runs every block as 64 px would, in a quarter of the time.
    images = torch.rand(1, 3, 32, 32, generator=generator) * 2 - 1
    z = torch.randn(
        1, vae.embed_dim, 32 // vae.downsample_factor, 32 // vae.downsample_factor, generator=generator
    )
    # float64 shows the mapping is exact (float32 rounding alone reaches ~1e-5 through f16d32's
    # attention blocks, which diffusers and we compute in different orders); float32 meets 1e-4.
    for dtype, atol in [(torch.float64, 1e-10), (torch.float32, 1e-4)]:
        ours, reference = vae.to(dtype), theirs.to(dtype)
        with torch.no_grad():
            torch.testing.assert_close(
                reference.decode(z.to(dtype)).sample, ours.decode(z.to(dtype)), rtol=0, atol=atol
            )
            torch.testing.assert_close(
                reference.encode(images.to(dtype)).latent_dist.mean,
                ours.encode(images.to(dtype)).mean,
                rtol=0,
                atol=atol,
            )
