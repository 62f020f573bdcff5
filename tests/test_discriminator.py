"""Behaviour of the taming/pix2pix PatchGAN discriminator and its weight loader."""

from __future__ import annotations

import pytest
import torch

from repae.modules.discriminator import NLayerDiscriminator, load_discriminator_weights


def test_parameter_count_matches_reference():
    with torch.device("meta"):
        discriminator = NLayerDiscriminator()
    assert sum(p.numel() for p in discriminator.parameters()) == 2_765_633


def test_state_dict_keys_match_reference_layout():
    keys = list(NLayerDiscriminator().state_dict())
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    expected = (
        ["main.0.weight", "main.0.bias", "main.2.weight"]
        + [f"main.3.{k}" for k in bn]
        + ["main.5.weight"]
        + [f"main.6.{k}" for k in bn]
        + ["main.8.weight"]
        + [f"main.9.{k}" for k in bn]
        + ["main.11.weight", "main.11.bias"]
    )
    assert keys == expected


def test_layer_strides_and_widths():
    main = NLayerDiscriminator().main
    convs = [main[i] for i in (0, 2, 5, 8, 11)]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert all(isinstance(main[i], torch.nn.BatchNorm2d) for i in (3, 6, 9))


def test_256px_images_give_30x30_patch_logits():
    with torch.no_grad():
        logits = NLayerDiscriminator()(torch.randn(1, 3, 256, 256))
    assert logits.shape == (1, 1, 30, 30)


def test_32px_images_give_2x2_patch_logits():
    assert NLayerDiscriminator()(torch.randn(2, 3, 32, 32)).shape == (2, 1, 2, 2)


def test_weights_init_statistics():
    torch.manual_seed(0)
    main = NLayerDiscriminator().main
    conv_weights = torch.cat([main[i].weight.flatten() for i in (0, 2, 5, 8, 11)])
    bn_weights = torch.cat([main[i].weight for i in (3, 6, 9)])
    assert abs(conv_weights.mean().item()) < 1e-3
    assert conv_weights.std().item() == pytest.approx(0.02, rel=0.02)
    assert bn_weights.mean().item() == pytest.approx(1.0, abs=0.01)
    assert bn_weights.std().item() == pytest.approx(0.02, rel=0.2)
    assert all(torch.equal(main[i].bias, torch.zeros(main[i].num_features)) for i in (3, 6, 9))


def test_load_discriminator_weights_round_trips_exactly(tmp_path):
    torch.manual_seed(0)
    source = NLayerDiscriminator(ndf=32)
    source(torch.randn(2, 3, 32, 32))  # move the BN running statistics off their defaults
    torch.save(source.state_dict(), tmp_path / "d.pt")
    target = NLayerDiscriminator(ndf=32)
    load_discriminator_weights(target, tmp_path / "d.pt")
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_load_discriminator_weights_errors_name_the_config_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.discriminator_weights_path"):
        load_discriminator_weights(NLayerDiscriminator(), tmp_path / "missing.pt")
    torch.save(NLayerDiscriminator(ndf=32).state_dict(), tmp_path / "small.pt")
    with pytest.raises(
        ValueError,
        match=r"model.discriminator_weights_path.*expected \(64, 3, 4, 4\), found \(32, 3, 4, 4\)",
    ):
        load_discriminator_weights(NLayerDiscriminator(), tmp_path / "small.pt")
