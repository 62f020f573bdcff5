"""Behaviour of the CompVis AutoencoderKL, its posterior and its weight loader, and of its fast
kernels (``repae.kernels``): the same function as the network of ``repae/modules/vae.py``."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from repae.kernels import group_norm as group_norm_module
from repae.kernels import use_fast_kernels
from repae.kernels.group_norm import FastGroupNorm, group_norm_channels_last
from repae.kernels.upsample import upsample_conv3x3
from repae.kernels.vae import FAST_MODULES
from repae.modules.vae import (
    VAE_CONFIGS,
    AttnBlock,
    AutoencoderKL,
    DiagonalGaussianDistribution,
    ResnetBlock,
    build_vae,
    load_vae_weights,
    swish,
)


def build_on_meta(name: str) -> AutoencoderKL:
    with torch.device("meta"):
        return build_vae(name)


def num_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name, params, tensors", [("f8d4", 83_653_863, 248), ("f16d32", 69_836_067, 342)])
def test_official_configs_match_reference_parameter_and_tensor_counts(name, params, tensors):
    vae = build_on_meta(name)
    assert num_parameters(vae) == params
    assert len(vae.state_dict()) == tensors


def test_f8d4_encoder_decoder_split_matches_reference():
    vae = build_on_meta("f8d4")
    assert round(num_parameters(vae.encoder) / 1e6, 2) == 34.16
    assert round(num_parameters(vae.decoder) / 1e6, 2) == 49.49


def test_state_dict_uses_compvis_key_layout():
    keys = set(build_on_meta("f8d4").state_dict())
    for key in [
        "encoder.conv_in.weight",
        "encoder.down.0.block.0.norm1.weight",
        "encoder.down.0.block.1.conv2.bias",
        "encoder.down.1.block.0.nin_shortcut.weight",
        "encoder.down.2.downsample.conv.weight",
        "encoder.mid.block_1.conv1.weight",
        "encoder.mid.attn_1.q.weight",
        "encoder.mid.attn_1.proj_out.bias",
        "encoder.mid.block_2.norm2.bias",
        "encoder.norm_out.weight",
        "encoder.conv_out.weight",
        "decoder.conv_in.weight",
        "decoder.mid.attn_1.norm.weight",
        "decoder.up.0.block.2.conv1.weight",
        "decoder.up.0.block.0.nin_shortcut.weight",
        "decoder.up.3.upsample.conv.weight",
        "decoder.norm_out.bias",
        "decoder.conv_out.weight",
        "quant_conv.weight",
        "post_quant_conv.bias",
    ]:
        assert key in keys, key
    # The last level downsamples / the first level upsamples nothing.
    assert not any(k.startswith("encoder.down.3.downsample") for k in keys)
    assert not any(k.startswith("decoder.up.0.upsample") for k in keys)
    assert not any(k.startswith("decoder.up.3.block.3") for k in keys)
    # Attention weights are 1x1 convs (not diffusers linears).
    assert build_on_meta("f8d4").state_dict()["encoder.mid.attn_1.k.weight"].shape == (512, 512, 1, 1)


def test_decoder_up_zero_is_highest_resolution_level():
    vae = build_on_meta("f8d4")
    # f8d4 channels per level: 128, 256, 512, 512; up.0 ends at 128 channels next to conv_out.
    assert vae.decoder.up[0].block[-1].conv2.out_channels == 128
    assert vae.decoder.up[0].block[0].conv1.in_channels == 256
    assert vae.decoder.up[3].block[0].conv1.in_channels == 512
    assert vae.decoder.conv_out.in_channels == 128
    assert vae.quant_conv.weight.shape == (8, 8, 1, 1)
    assert vae.post_quant_conv.weight.shape == (4, 4, 1, 1)


def test_f16d32_has_attention_only_at_its_16px_level():
    vae = build_on_meta("f16d32")
    assert [len(level.attn) for level in vae.encoder.down] == [0, 0, 0, 0, 2]
    assert [len(level.attn) for level in vae.decoder.up] == [0, 0, 0, 0, 3]
    assert vae.encoder.down[4].attn[0].q.in_channels == 512
    assert vae.downsample_factor == 16
    assert vae.latent_channels == 32


def test_f8d4_has_no_attention_besides_mid():
    vae = build_on_meta("f8d4")
    assert all(len(level.attn) == 0 for level in vae.encoder.down)
    assert all(len(level.attn) == 0 for level in vae.decoder.up)
    assert sum(isinstance(m, AttnBlock) for m in vae.modules()) == 2
    assert vae.downsample_factor == 8
    assert vae.latent_channels == 4


def test_tiny_vae_is_small():
    assert num_parameters(build_on_meta("f4d4-tiny")) < 1_000_000


def test_tiny_vae_round_trip_shapes_on_32px_images():
    torch.manual_seed(0)
    vae = build_vae("f4d4-tiny")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    posterior, z, recon = vae(x)
    assert posterior.mean.shape == (2, 4, 8, 8)
    assert z.shape == (2, 4, 8, 8)
    assert recon.shape == (2, 3, 32, 32)
    assert torch.equal(vae.decode(z), recon)
    _, _, no_recon = vae(x, return_recon=False)
    assert no_recon is None


def test_sampled_latent_backpropagates_into_encoder():
    torch.manual_seed(0)
    vae = build_vae("f4d4-tiny")
    _, z, _ = vae(torch.randn(2, 3, 32, 32), return_recon=False)
    z.square().sum().backward()
    assert vae.encoder.conv_in.weight.grad is not None
    assert vae.encoder.conv_in.weight.grad.abs().sum() > 0
    assert vae.quant_conv.weight.grad.abs().sum() > 0
    assert vae.post_quant_conv.weight.grad is None


def test_build_vae_applies_overrides_and_rejects_unknown_names():
    vae = build_vae("f4d4-tiny", embed_dim=8)
    assert vae.latent_channels == 8
    assert vae.encoder.conv_out.out_channels == 16
    with pytest.raises(ValueError, match="f16d32"):
        build_vae("f8d16")


def test_constructor_accepts_lists_as_hydra_passes_them():
    config = {**VAE_CONFIGS["f4d4-tiny"], "ch_mult": [1, 2, 2], "attn_resolutions": [8]}
    vae = AutoencoderKL(**config)
    assert len(vae.encoder.down[2].attn) == 1
    assert vae(torch.randn(1, 3, 32, 32))[2].shape == (1, 3, 32, 32)


def test_kl_matches_closed_form():
    torch.manual_seed(0)
    params = torch.randn(3, 8, 4, 5)
    posterior = DiagonalGaussianDistribution(params)
    mean, logvar = params[:, :4], params[:, 4:]
    expected = torch.stack([0.5 * (mean[b] ** 2 + logvar[b].exp() - 1 - logvar[b]).sum() for b in range(3)])
    assert posterior.kl().shape == (3,)
    torch.testing.assert_close(posterior.kl(), expected)
    assert DiagonalGaussianDistribution(torch.zeros(2, 8, 3, 3)).kl().abs().max() == 0


def test_logvar_is_clamped_to_minus_30_and_20():
    params = torch.zeros(1, 2, 1, 3)
    params[0, 1] = torch.tensor([-100.0, 5.0, 100.0])
    posterior = DiagonalGaussianDistribution(params)
    assert posterior.logvar.flatten().tolist() == [-30.0, 5.0, 20.0]
    torch.testing.assert_close(posterior.var, posterior.logvar.exp())
    torch.testing.assert_close(posterior.std, (0.5 * posterior.logvar).exp())


def test_mode_is_mean_and_sample_is_mean_plus_std_noise():
    torch.manual_seed(0)
    posterior = DiagonalGaussianDistribution(torch.randn(2, 6, 4, 4))
    assert torch.equal(posterior.mode(), posterior.mean)
    generator = torch.Generator().manual_seed(123)
    noise = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(123))
    torch.testing.assert_close(posterior.sample(generator), posterior.mean + posterior.std * noise)


def test_from_mean_std_round_trips_the_cached_latent_format():
    torch.manual_seed(0)
    posterior = DiagonalGaussianDistribution(torch.randn(2, 8, 4, 4))
    cached = torch.cat([posterior.mean, posterior.std], dim=1)
    restored = DiagonalGaussianDistribution.from_mean_std(cached)
    assert torch.equal(restored.mean, posterior.mean)
    torch.testing.assert_close(restored.std, posterior.std)
    torch.testing.assert_close(restored.logvar, posterior.logvar)


@pytest.mark.parametrize("fast_kernels", [False, True], ids=["plain", "fast"])
def test_attention_block_equals_explicit_softmax_attention(fast_kernels):
    torch.manual_seed(0)
    block = use_fast_kernels(AttnBlock(64), fast_kernels)
    for conv in (block.q, block.k, block.v, block.proj_out):
        torch.nn.init.normal_(conv.weight, std=0.2)
    x = torch.randn(2, 64, 5, 6)

    h = block.norm(x)
    q = block.q(h).reshape(2, 64, 30).permute(0, 2, 1)  # [B, HW, C]
    k = block.k(h).reshape(2, 64, 30)  # [B, C, HW]
    weights = F.softmax(torch.bmm(q, k) * 64**-0.5, dim=2)  # [B, HW(query), HW(key)]
    v = block.v(h).reshape(2, 64, 30)
    out = torch.bmm(v, weights.permute(0, 2, 1)).reshape(2, 64, 5, 6)
    expected = x + block.proj_out(out)

    torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)


def values_and_gradients(function, x: torch.Tensor, grad_output: torch.Tensor, parameters=()):
    """Output, and the gradients of the input and ``parameters`` for a given output gradient."""
    x = x.detach().requires_grad_()
    out = function(x)
    grads = torch.autograd.grad(out, [x, *parameters], grad_output)
    return out, grads


def assert_same_values_and_gradients(found, expected, x, grad_output, parameters, tolerance=1e-5):
    """``found(x)`` equals ``expected(x)``, and so do the gradients of x and ``parameters``; returns
    ``found(x)``."""
    reference, reference_grads = values_and_gradients(expected, x, grad_output, parameters)
    out, grads = values_and_gradients(found, x, grad_output, parameters)
    torch.testing.assert_close(out, reference, atol=tolerance, rtol=tolerance)
    for grad, reference_grad in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(grad, reference_grad, atol=tolerance, rtol=tolerance)
    return out


def test_channels_last_group_norm_equals_torch_and_stays_channels_last():
    torch.manual_seed(0)
    weight, bias = torch.randn(64, requires_grad=True), torch.randn(64, requires_grad=True)
    x = 3 * torch.randn(2, 64, 5, 7) + 1  # non-zero mean: the pooled group variance must include it
    grad_output = torch.randn(2, 64, 5, 7)

    out = assert_same_values_and_gradients(
        lambda t: group_norm_channels_last(t, 32, weight, bias, 1e-6),
        lambda t: F.group_norm(t, 32, weight, bias, 1e-6),
        x.contiguous(memory_format=torch.channels_last),
        grad_output,
        [weight, bias],
    )
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    "memory_format", [torch.channels_last, torch.contiguous_format], ids=["nhwc", "nchw"]
)
def test_group_norm_then_swish_has_the_values_and_gradients_of_the_norm_followed_by_swish(memory_format):
    """On the channels_last path the pair is one autograd function with its own backward."""
    torch.manual_seed(0)
    norm = FastGroupNorm(num_groups=32, num_channels=64).to(torch.float64)
    torch.nn.init.normal_(norm.weight), torch.nn.init.normal_(norm.bias)
    input_bias = 2 * torch.randn(64, dtype=torch.float64, requires_grad=True)
    x = (3 * torch.randn(2, 64, 5, 7, dtype=torch.float64) + 1).contiguous(memory_format=memory_format)
    grad_output = torch.randn(2, 64, 5, 7, dtype=torch.float64)

    out = assert_same_values_and_gradients(
        lambda t: norm(t, input_bias=input_bias, then_swish=True),
        lambda t: swish(F.group_norm(t + input_bias[:, None, None], 32, norm.weight, norm.bias, norm.eps)),
        x,
        grad_output,
        [norm.weight, norm.bias, input_bias],
        tolerance=1e-10,
    )
    assert out.is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize(
    "memory_format", [torch.channels_last, torch.contiguous_format], ids=["nhwc", "nchw"]
)
def test_group_norm_of_an_input_bias_equals_the_group_norm_of_the_biased_input(memory_format):
    """The fast ResnetBlock hands conv1's bias to norm2 instead of adding it to conv1's output."""
    torch.manual_seed(0)
    norm = FastGroupNorm(num_groups=32, num_channels=64)
    torch.nn.init.normal_(norm.weight), torch.nn.init.normal_(norm.bias)
    input_bias = 2 * torch.randn(64, requires_grad=True)  # different per channel of one group
    x = (3 * torch.randn(2, 64, 5, 7) + 1).contiguous(memory_format=memory_format)
    grad_output = torch.randn(2, 64, 5, 7)
    parameters = [norm.weight, norm.bias, input_bias]

    assert_same_values_and_gradients(
        lambda t: norm(t, input_bias=input_bias),
        lambda t: F.group_norm(t + input_bias[:, None, None], 32, norm.weight, norm.bias, norm.eps),
        x,
        grad_output,
        parameters,
    )


def switched(network: torch.nn.Module, fast_kernels: bool):
    """``network``'s forward with its fast kernels on or off (the same parameters either way)."""
    return lambda x: use_fast_kernels(network, fast_kernels)(x)


@pytest.mark.parametrize(
    "memory_format", [torch.channels_last, torch.contiguous_format], ids=["nhwc", "nchw"]
)
def test_fast_resnet_block_computes_the_compvis_block_with_every_bias(memory_format):
    torch.manual_seed(0)
    block = ResnetBlock(64, 96)
    for parameter in block.parameters():  # non-zero biases and non-trivial norm affines
        torch.nn.init.normal_(parameter, std=0.1)
    x = torch.randn(2, 64, 6, 5)
    expected = block(x)

    fast = use_fast_kernels(copy.deepcopy(block)).to(memory_format=memory_format)
    out = fast(x.contiguous(memory_format=memory_format))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "memory_format", [torch.channels_last, torch.contiguous_format], ids=["nhwc", "nchw"]
)
def test_encoder_and_decoder_compute_the_compvis_networks_with_every_bias(memory_format):
    """The fast kernels together (GroupNorm with conv1's bias and the fused swish, the attention,
    the upsampling as a transposed convolution): with them the encoder and the decoder compute what
    the CompVis network of ``repae/modules/vae.py`` computes, values and gradients, in float64 so
    that nothing but a wrong formula tells them apart."""
    torch.manual_seed(0)
    vae = build_vae("f4d4-tiny", attn_resolutions=(8,)).to(torch.float64, memory_format=memory_format)
    for name, parameter in vae.named_parameters():
        if name.endswith("bias"):  # large enough that a bias dropped or added twice shows
            torch.nn.init.normal_(parameter, std=0.5)
    images = (torch.rand(2, 3, 32, 32, dtype=torch.float64) * 2 - 1).contiguous(memory_format=memory_format)
    latents = torch.randn(2, 4, 8, 8, dtype=torch.float64).contiguous(memory_format=memory_format)

    for network, x in [(vae.encoder, images), (vae.decoder, latents)]:
        compvis = switched(network, fast_kernels=False)
        grad_output = torch.randn_like(compvis(x))
        assert_same_values_and_gradients(
            switched(network, fast_kernels=True),
            compvis,
            x,
            grad_output,
            list(network.parameters()),
            tolerance=1e-10,
        )


def test_fast_kernels_keep_the_parameters_and_state_dict_keys_and_switch_back():
    """Checkpoints load either way, and optimizers keep their parameters, as the switch swaps
    classes only."""
    vae = build_vae("f4d4-tiny", attn_resolutions=(8,))
    parameters, state_dict = list(vae.parameters()), vae.state_dict()
    plain_types = [type(module) for module in vae.modules()]

    use_fast_kernels(vae)
    assert all(a is b for a, b in zip(vae.parameters(), parameters, strict=True))
    assert list(vae.state_dict()) == list(state_dict)
    fast_types = {type(module) for module in vae.modules()}
    assert set(FAST_MODULES.values()) <= fast_types and not fast_types & set(FAST_MODULES)

    use_fast_kernels(vae, enabled=False)
    assert [type(module) for module in vae.modules()] == plain_types


@pytest.mark.parametrize(
    "shape, memory_format, takes_nhwc_path",
    [
        ((2, 64, 4, 4), torch.channels_last, True),
        ((2, 64, 4, 4), torch.contiguous_format, False),
        ((2, 64, 1, 1), torch.channels_last, False),  # both layouts at once: torch's path
        ((2, 64, 8), torch.contiguous_format, False),
    ],
    ids=["nhwc", "nchw", "1x1", "3d"],
)
def test_group_norm_uses_the_nhwc_path_only_for_channels_last_images(
    monkeypatch, shape, memory_format, takes_nhwc_path
):
    calls, original = [], group_norm_module.group_norm_channels_last

    def spy(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(group_norm_module, "group_norm_channels_last", spy)
    norm = FastGroupNorm(num_groups=32, num_channels=64)
    x = torch.randn(shape).contiguous(memory_format=memory_format)

    torch.testing.assert_close(norm(x), F.group_norm(x, 32, norm.weight, norm.bias, norm.eps))
    assert bool(calls) == takes_nhwc_path


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_channels_last_group_norm_returns_the_dtype_torch_returns(dtype):
    norm = FastGroupNorm(num_groups=32, num_channels=64).to(dtype)
    x = torch.randn(2, 64, 4, 4, dtype=dtype)
    nhwc = x.contiguous(memory_format=torch.channels_last)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            expected = F.group_norm(x, 32, norm.weight, norm.bias, norm.eps)
            out = norm(nhwc)
        assert out.dtype == expected.dtype, autocast
        torch.testing.assert_close(out, expected, atol=1e-2, rtol=1e-2)


def test_group_norm_keeps_the_torch_state_dict_keys():
    assert set(FastGroupNorm(32, 64).state_dict()) == set(torch.nn.GroupNorm(32, 64).state_dict())


@pytest.mark.parametrize(
    "memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"]
)
def test_upsampling_convolution_equals_nearest_interpolation_then_conv3x3(memory_format):
    torch.manual_seed(0)
    weight = torch.randn(6, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(6, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 4, 5, 7, dtype=torch.float64).contiguous(memory_format=memory_format)
    grad_output = torch.randn(2, 6, 10, 14, dtype=torch.float64)

    def reference(t):
        return F.conv2d(F.interpolate(t, scale_factor=2.0, mode="nearest"), weight, bias, padding=1)

    out = assert_same_values_and_gradients(
        lambda t: upsample_conv3x3(t, weight, bias), reference, x, grad_output, [weight, bias], 1e-12
    )
    assert out.is_contiguous(memory_format=memory_format)


def test_upsampling_convolution_under_autocast_stays_within_bf16_rounding_of_float32():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1)
    x = torch.randn(2, 8, 6, 6)
    expected = conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = upsample_conv3x3(x, conv.weight, conv.bias)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("fast_kernels", [False, True], ids=["plain", "fast"])
def test_tiny_vae_gives_the_same_reconstructions_and_gradients_in_channels_last(fast_kernels):
    torch.manual_seed(0)
    vae = use_fast_kernels(build_vae("f4d4-tiny"), fast_kernels)
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.manual_seed(1)  # the same posterior sample in both layouts
    _, _, expected = vae(images)
    expected_grads = torch.autograd.grad(expected.square().mean(), list(vae.parameters()))

    vae.to(memory_format=torch.channels_last)
    torch.manual_seed(1)
    _, _, recon = vae(images.contiguous(memory_format=torch.channels_last))
    grads = torch.autograd.grad(recon.square().mean(), list(vae.parameters()))

    assert recon.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(recon, expected, atol=1e-5, rtol=1e-4)
    for found, reference in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(found, reference, atol=1e-5, rtol=1e-3)


def test_load_vae_weights_missing_file_names_the_config_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.vae_weights_path"):
        load_vae_weights(build_vae("f4d4-tiny"), tmp_path / "nope.pt")


def test_load_vae_weights_round_trips_exactly(tmp_path):
    torch.manual_seed(0)
    source = build_vae("f4d4-tiny")
    torch.save(source.state_dict(), tmp_path / "vae.pt")
    torch.save({"vae": source.state_dict()}, tmp_path / "wrapped.pt")
    for file in ("vae.pt", "wrapped.pt"):
        torch.manual_seed(1)
        target = build_vae("f4d4-tiny")
        load_vae_weights(target, tmp_path / file)
        for key, value in source.state_dict().items():
            assert torch.equal(target.state_dict()[key], value), key


def test_load_vae_weights_wrong_architecture_lists_keys_and_shapes(tmp_path):
    torch.save(build_vae("f4d4-tiny", attn_resolutions=(8,)).state_dict(), tmp_path / "attn.pt")
    with pytest.raises(ValueError, match="model.vae_weights_path") as error:
        load_vae_weights(build_vae("f4d4-tiny"), tmp_path / "attn.pt")
    assert "unexpected keys: encoder.down.2.attn.0" in str(error.value)

    torch.save(build_vae("f4d4-tiny", embed_dim=8).state_dict(), tmp_path / "d8.pt")
    with pytest.raises(
        ValueError, match=r"shape mismatches: .*expected \(8, 64, 3, 3\), found \(16, 64, 3, 3\)"
    ):
        load_vae_weights(build_vae("f4d4-tiny"), tmp_path / "d8.pt")


def test_load_vae_weights_non_strict_tolerates_missing_keys_but_not_shapes(tmp_path):
    torch.save(build_vae("f4d4-tiny").state_dict(), tmp_path / "plain.pt")
    target = build_vae("f4d4-tiny", attn_resolutions=(8,))
    with pytest.raises(ValueError, match="missing keys: encoder.down.2.attn.0"):
        load_vae_weights(target, tmp_path / "plain.pt")
    with pytest.warns(UserWarning, match="missing keys"):
        result = load_vae_weights(target, tmp_path / "plain.pt", strict=False)
    assert "encoder.down.2.attn.0.q.weight" in result.missing_keys


def test_load_vae_weights_rejects_files_that_are_not_state_dicts(tmp_path):
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="model.vae_weights_path"):
        load_vae_weights(build_vae("f4d4-tiny"), tmp_path / "garbage.pt")
    torch.save({"epoch": 3}, tmp_path / "not_sd.pt")
    with pytest.raises(ValueError, match="not a state_dict"):
        load_vae_weights(build_vae("f4d4-tiny"), tmp_path / "not_sd.pt")
