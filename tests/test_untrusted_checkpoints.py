"""A checkpoint never chooses what code runs: hostile ``hyper_parameters`` and official ``args``.

A repae checkpoint stores its model config as dicts with a ``_target_``; an official one stores its
training arguments. Both come from a file someone else may have written. Each test below is an attack
on one entry point: the payload must be refused with one clear error, and the file it aims at must be
neither created nor truncated.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from repae.config import build_model, to_plain
from repae.convert.checkpoints import load_checkpoint, training_components
from repae.convert.official import compose_train_config, official_overrides
from repae.generate import load_sampling_model
from repae.module import REPAE

from conftest import TINY_OVERRIDES

REPO = Path(__file__).resolve().parents[1]
VICTIM_TEXT = "precious data\n"


def payloads(tmp_path: Path) -> dict[str, tuple[dict, Path]]:
    """``{name: (config, victim)}``: ``numpy.savetxt`` creates ``victim``, ``builtins.open`` truncates it."""
    victim = tmp_path / "victim.txt"
    victim.write_text(VICTIM_TEXT)
    return {
        "numpy.savetxt": ({"_target_": "numpy.savetxt", "fname": str(tmp_path / "written.txt"), "X": [[1.0]]},
                          tmp_path / "written.txt"),
        "builtins.open": ({"_target_": "builtins.open", "file": str(victim), "mode": "w"}, victim),
    }  # fmt: skip


def assert_untouched(victim: Path) -> None:
    if victim.name == "victim.txt":
        assert victim.read_text() == VICTIM_TEXT, "the payload truncated the file"
    else:
        assert not victim.exists(), "the payload wrote the file"


@pytest.fixture(scope="module")
def clean_checkpoint(tmp_path_factory) -> dict:
    """A repae checkpoint of the tiny demo model (random weights), as ``ModelCheckpoint`` writes it."""
    cfg = compose_train_config(TINY_OVERRIDES)
    model = instantiate(to_plain(cfg.model), _recursive_=False)
    frozen = model._frozen_prefixes()
    return {
        "pytorch-lightning_version": "2.6.6",
        "epoch": 0,
        "global_step": 0,
        "state_dict": {k: v for k, v in model.state_dict().items() if not k.startswith(frozen)},
        "hyper_parameters": dict(model.hparams),
    }


def poisoned(clean_checkpoint: dict, path: Path, payload: dict, where: tuple[str, ...] = ("vae",)) -> Path:
    """``clean_checkpoint`` with ``payload`` at ``hyper_parameters[where[0]][where[1]]...``, saved to ``path``."""
    checkpoint = {**clean_checkpoint, "hyper_parameters": to_plain(clean_checkpoint["hyper_parameters"])}
    config = checkpoint["hyper_parameters"]
    for key in where[:-1]:
        config = config[key]
    config[where[-1]] = payload
    torch.save(checkpoint, path)
    return path


def the_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def run_module(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "REPAE_ROOT": str(cwd),
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("target", ["numpy.savetxt", "builtins.open"])
def test_the_payloads_are_live_under_hydras_instantiate(tmp_path, target):
    """What the attack does where nothing stops it (so the tests below test something)."""
    payload, victim = payloads(tmp_path)[target]
    result = instantiate(payload)
    if hasattr(result, "close"):
        result.close()
    if target == "numpy.savetxt":
        assert victim.exists()
    else:
        assert victim.read_text() == ""


@pytest.mark.parametrize("target", ["numpy.savetxt", "builtins.open"])
def test_generate_refuses_a_checkpoint_whose_vae_config_names_another_callable(
    tmp_path, clean_checkpoint, target
):
    payload, victim = payloads(tmp_path)[target]
    path = poisoned(clean_checkpoint, tmp_path / "poisoned.ckpt", payload)
    result = run_module(
        "repae.generate", f"ckpt_path={path}", f"sample_dir={tmp_path / 'samples'}", "num_samples=2",
        "sampler.num_steps=1", "trainer.accelerator=cpu", "progress_bar=false", cwd=tmp_path,
    )  # fmt: skip
    line = the_error_line(result)
    assert f"hyper_parameters.vae._target_='{target}' is not a repae model builder" in line
    assert "repae.modules.vae.build_vae" in line  # the allowed builders are listed
    assert_untouched(victim)
    assert not (tmp_path / "samples").exists()


@pytest.mark.parametrize("where", [("vae",), ("sit",), ("loss", "discriminator"), ("loss", "perceptual")])
@pytest.mark.parametrize("target", ["numpy.savetxt", "builtins.open"])
def test_load_from_checkpoint_refuses_a_payload_anywhere_in_the_model_config(
    tmp_path, clean_checkpoint, target, where
):
    payload, victim = payloads(tmp_path)[target]
    path = poisoned(clean_checkpoint, tmp_path / "poisoned.ckpt", payload, where)
    with pytest.raises(
        ValueError, match=rf"model\.{'.'.join(where)}\._target_='{target}' is not a repae model"
    ):
        REPAE.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    assert_untouched(victim)


def test_a_clean_checkpoint_still_loads(tmp_path, clean_checkpoint):
    torch.save(clean_checkpoint, tmp_path / "clean.ckpt")
    model = REPAE.load_from_checkpoint(tmp_path / "clean.ckpt", map_location="cpu", weights_only=True)
    assert torch.equal(model.vae.quant_conv.weight, clean_checkpoint["state_dict"]["vae.quant_conv.weight"])
    sampling = load_sampling_model(str(tmp_path / "clean.ckpt"))
    assert torch.equal(sampling.vae.quant_conv.weight, model.vae.quant_conv.weight)


@pytest.mark.parametrize(
    "config, refused",
    [
        # Hydra's own keys would change what gets called or how.
        ({"_target_": "repae.modules.vae.build_vae", "name": "f4d4-tiny", "_partial_": True}, "'_partial_'"),
        ({"_target_": "repae.modules.vae.build_vae", "_args_": ["f4d4-tiny"]}, "'_args_'"),
        # A nested payload, inside a list of an allowed builder's arguments.
        ({"_target_": "repae.modules.vae.build_vae", "name": "f4d4-tiny", "ch_mult": [{"_target_": "os.getcwd"}]},
         r"hyper_parameters.vae.ch_mult\[0\]._target_='os.getcwd'"),
        # Values that are not plain data.
        ({"_target_": "repae.modules.vae.build_vae", "name": "f4d4-tiny", "embed_dim": torch.tensor(4)}, "Tensor"),
        ({"_target_": ["repae.modules.vae.build_vae"], "name": "f4d4-tiny"}, "is not a repae model builder"),
        ("repae.modules.vae.build_vae", "must be a config with a _target_"),
    ],
)  # fmt: skip
def test_model_configs_hold_allowed_builders_and_plain_values_only(config, refused):
    with pytest.raises(ValueError, match=refused) as error:
        build_model(config, "hyper_parameters.vae")
    assert str(error.value).startswith("hyper_parameters.vae")


def test_convert_extract_vae_never_calls_the_checkpoints_model_config(tmp_path, clean_checkpoint):
    """extract-vae reads tensors only: the payload is inert and the VAE files are written."""
    for target, (payload, victim) in payloads(tmp_path).items():
        path = poisoned(clean_checkpoint, tmp_path / f"{target}.ckpt", payload)
        result = run_module("repae.convert", "extract-vae", str(path), "--name", target, "--save-dir",
                            str(tmp_path / "exps"), cwd=tmp_path)  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert_untouched(victim)
        state = torch.load(tmp_path / "exps" / target / f"{target}.pt", weights_only=True)
        assert torch.equal(
            state["quant_conv.weight"], clean_checkpoint["state_dict"]["vae.quant_conv.weight"]
        )


def official_args(**changes) -> argparse.Namespace:
    values = dict(model="SiT-S/2", vae="f4d4-tiny", resolution=32, num_classes=10, enc_type="effnet-lite0",
                  encoder_depth=1, proj_coeff=0.5, qk_norm=False, batch_size=4, mixed_precision="no")  # fmt: skip
    return argparse.Namespace(**{**values, **changes})


INJECTIONS = {
    "an extra override": {"model": "SiT-S/2 model.vae._target_=numpy.savetxt"},
    "an interpolation": {"model": "${oc.env:HOME}"},
    "a quote that ends the value": {"enc_type": "effnet-lite0' model.vae._target_='numpy.savetxt"},
    "a string for a number": {"num_classes": "10,model.vae._target_=numpy.savetxt"},
    "a bool for a number": {"batch_size": True},
    "a dict for a name": {"path_type": {"_target_": "numpy.savetxt"}},
    "an unhashable VAE name": {"vae": ["f4d4-tiny"]},
}


@pytest.mark.parametrize("changes", INJECTIONS.values(), ids=INJECTIONS.keys())
def test_official_arguments_cannot_inject_overrides_or_interpolations(changes):
    with pytest.raises(ValueError, match=rf"args\.{next(iter(changes))}=|--vae \["):
        official_overrides(official_args(**changes), ldm_only=False)


def test_official_names_that_hydra_would_misread_are_quoted():
    overrides = official_overrides(
        official_args(enc_type="effnet-lite0,dinov2-vit-b", path_type="null"), False
    )
    assert "model.encoder.names='effnet-lite0,dinov2-vit-b'" in overrides  # one value, not a sweep
    assert "model.sit.path_type='null'" in overrides  # the string, not None
    cfg = compose_train_config(overrides)
    assert cfg.model.encoder.names == "effnet-lite0,dinov2-vit-b" and cfg.model.sit.path_type == "null"


def test_from_official_refuses_injecting_args_and_writes_nothing(tmp_path):
    marker = tmp_path / "written.txt"
    args = official_args(model=f"SiT-S/2 model.vae._target_=numpy.savetxt +model.vae.fname={marker}")
    torch.save({"model": {}, "ema": {}, "vae": {}, "args": args, "steps": 1}, tmp_path / "official.pt")
    result = run_module("repae.convert", "from-official", str(tmp_path / "official.pt"), str(tmp_path / "out.ckpt"),
                        cwd=tmp_path)  # fmt: skip
    line = the_error_line(result)
    assert "args.model=" in line and "is not a name" in line
    assert not marker.exists() and not (tmp_path / "out.ckpt").exists()


def test_generate_refuses_injecting_official_args_from_the_checkpoint_or_args_json(tmp_path):
    args = official_args(model="${oc.env:HOME}")
    torch.save({"model": {}, "ema": {}, "vae": {}, "args": args}, tmp_path / "official.pt")
    with pytest.raises(ValueError, match=r"args\.model='\$\{oc.env:HOME\}' is not a name"):
        load_sampling_model(str(tmp_path / "official.pt"))
    # No args in the checkpoint: the args.json beside it is read, and checked alike.
    torch.save({"model": {}, "ema": {}, "vae": {}}, tmp_path / "no-args.pt")
    (tmp_path / "args.json").write_text('{"model": "SiT-S/2", "vae": "f4d4-tiny", "resolution": "32 seed=1"}')
    with pytest.raises(ValueError, match=r"args\.resolution='32 seed=1' is not an integer"):
        load_sampling_model(str(tmp_path / "no-args.pt"))


def test_a_bare_state_dict_given_as_a_checkpoint_is_refused_in_a_short_message_naming_its_size(tmp_path):
    torch.save({f"decoder.block.{i}.weight": torch.zeros(1) for i in range(500)}, tmp_path / "vae.pt")
    for load in (load_sampling_model, lambda path: training_components(load_checkpoint(path))):
        with pytest.raises(ValueError) as error:
            load(str(tmp_path / "vae.pt"))
        message = str(error.value)
        assert "(500 in total)" in message and "decoder.block.0.weight" in message and len(message) < 600


def test_the_latent_scale_study_reads_no_encoder_file_that_a_checkpoint_names(
    tmp_path, clean_checkpoint, monkeypatch
):
    from scripts import study_latent_scale

    elsewhere = tmp_path / "someone_elses.pt"
    torch.save({"weight": torch.zeros(1)}, elsewhere)
    path = poisoned(clean_checkpoint, tmp_path / "run.ckpt", {"effnet-lite0": str(elsewhere)},
                    where=("encoder", "weights_paths"))  # fmt: skip
    asked = []
    build = study_latent_scale.build_encoders
    monkeypatch.setattr(study_latent_scale, "build_encoders",
                        lambda **kwargs: asked.append(kwargs["weights_paths"]) or build(**kwargs))  # fmt: skip
    batch = (torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), torch.arange(4))
    measured, vae = study_latent_scale.measure(path, [batch], 0, torch.device("cpu"), None)
    assert asked == [None] and measured["sit_step"] == 0 and vae.training is False

    for coeff in ("0.5; import os", None, True):  # recorded as a number, or the file is refused
        odd = poisoned(clean_checkpoint, tmp_path / "odd.ckpt", coeff, where=("vae_align_proj_coeff",))
        with pytest.raises(
            SystemExit, match="error: .*vae_align_proj_coeff is (a str|missing|a bool), not a number"
        ):
            study_latent_scale.measure(odd, [batch], 0, torch.device("cpu"), None)
    torch.save({**clean_checkpoint, "hyper_parameters": ["not", "a", "config"]}, tmp_path / "odd.ckpt")
    with pytest.raises(SystemExit, match="error: .* is not a repae end-to-end run's checkpoint"):
        study_latent_scale.measure(tmp_path / "odd.ckpt", [batch], 0, torch.device("cpu"), None)


def test_a_files_keys_cannot_break_or_fake_the_one_line_error_that_names_them(tmp_path):
    hostile = {"a\nerror: all good\x1b[2J": torch.zeros(1), "b" * 10_000: torch.zeros(1)}
    torch.save(hostile, tmp_path / "hostile.pt")
    with pytest.raises(ValueError) as error:
        load_sampling_model(str(tmp_path / "hostile.pt"))
    message = str(error.value)
    assert "\n" not in message and "\x1b" not in message and len(message) < 600
    assert repr("a\nerror: all good\x1b[2J") in message and "b" * 77 + "..." in message
