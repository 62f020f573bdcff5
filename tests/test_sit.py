"""Behaviour of the SiT: official shapes and keys, the integrated losses, BN and the align pass."""

import pytest
import torch
import torch.nn.functional as F

from repae.modules.losses import call_with_frozen_parameters
from repae.modules.sit import SIT_MODEL_NAMES, build_sit, interpolant, projector_dims, sincos_pos_embed_2d


def tiny_sit(**overrides):
    kwargs = dict(
        input_size=8,
        in_channels=4,
        depth=4,
        hidden_size=64,
        num_heads=4,
        z_dims=[16],
        projector_dim=32,
        encoder_depth=2,
        num_classes=10,
    )
    return build_sit("SiT-S/2", **{**kwargs, **overrides})


def num_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "name, in_channels, input_size, expected",
    [
        ("SiT-XL/2", 4, 32, 683_242_512),
        ("SiT-XL/1", 32, 16, 683_279_392),
        ("SiT-L/2", 4, 32, 465_955_600),
        ("SiT-B/2", 4, 32, 137_845_008),
    ],
)
def test_parameter_counts_match_official(name, in_channels, input_size, expected):
    with torch.device("meta"):
        model = build_sit(name, in_channels=in_channels, input_size=input_size, z_dims=[768])
    assert num_params(model) == expected


def test_state_dict_keys_match_official_layout():
    with torch.device("meta"):
        model = build_sit("SiT-XL/2", z_dims=[768])
    state = model.state_dict()
    assert len(state) == 301
    expected_shapes = {
        "pos_embed": (1, 256, 1152),
        "x_embedder.proj.weight": (1152, 4, 2, 2),
        "t_embedder.mlp.0.weight": (1152, 256),
        "t_embedder.mlp.2.weight": (1152, 1152),
        "y_embedder.embedding_table.weight": (1001, 1152),
        "blocks.27.attn.qkv.weight": (3456, 1152),
        "blocks.0.attn.proj.bias": (1152,),
        "blocks.0.mlp.fc1.weight": (4608, 1152),
        "blocks.0.mlp.fc2.weight": (1152, 4608),
        "blocks.0.adaLN_modulation.1.weight": (6912, 1152),
        "projectors.0.0.weight": (2048, 1152),
        "projectors.0.2.weight": (2048, 2048),
        "projectors.0.4.weight": (768, 2048),
        "final_layer.linear.weight": (16, 1152),
        "final_layer.adaLN_modulation.1.weight": (2304, 1152),
        "bn.running_mean": (4,),
        "bn.running_var": (4,),
        "bn.num_batches_tracked": (),
    }
    for key, shape in expected_shapes.items():
        assert tuple(state[key].shape) == shape, key


def test_every_size_and_patch_is_buildable_including_sit_s():
    assert len(SIT_MODEL_NAMES) == 16
    model = build_sit("SiT-S/2", input_size=8, in_channels=4, depth=2, z_dims=[8], encoder_depth=1)
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([1, 2]), [torch.randn(2, 16, 8)])
    assert out["denoising_loss"].shape == (2,)


def test_projector_dims_recover_the_encoder_feature_sizes_from_the_weights():
    sit = build_sit(
        "SiT-S/2", input_size=8, in_channels=4, z_dims=[768, 112, 1024], projector_dim=64, num_classes=10
    )
    assert projector_dims(sit.state_dict()) == [768, 112, 1024]
    # The key order of a file does not matter, nor does it matter that projector 10 sorts before 2 as text.
    many = build_sit("SiT-S/2", input_size=8, in_channels=4, z_dims=list(range(8, 20)), projector_dim=16)
    assert projector_dims(dict(reversed(list(many.state_dict().items())))) == list(range(8, 20))
    assert projector_dims(build_sit("SiT-S/2", input_size=8, in_channels=4, z_dims=[]).state_dict()) == []


def test_unknown_model_name_lists_valid_names():
    with pytest.raises(ValueError, match="SiT-XL/2"):
        build_sit("SiT-XXL/2")


def test_pos_embed_is_frozen_by_default_and_trainable_on_request():
    assert not tiny_sit().pos_embed.requires_grad
    assert tiny_sit(pos_embed_trainable=True).pos_embed.requires_grad


def test_pos_embed_is_mae_sincos():
    emb = sincos_pos_embed_2d(8, 2)  # tokens (0,0), (0,1), (1,0), (1,1) in row-major order
    omega = 1.0 / 10000 ** (torch.arange(2) / 2)
    col, row = torch.tensor([0.0, 1, 0, 1]), torch.tensor([0.0, 0, 1, 1])
    expected = torch.cat(
        [
            (col[:, None] * omega).sin(),
            (col[:, None] * omega).cos(),
            (row[:, None] * omega).sin(),
            (row[:, None] * omega).cos(),
        ],
        dim=1,
    )
    torch.testing.assert_close(emb, expected)


def test_denoising_loss_is_v_prediction_mse_with_given_time_and_noise():
    torch.manual_seed(0)
    model = tiny_sit().eval()
    for p in model.final_layer.parameters():  # the zero-initialised head would make the output trivial
        torch.nn.init.normal_(p, std=0.1)
    x, y = torch.randn(3, 4, 8, 8), torch.tensor([0, 1, 2])
    t, noise = torch.rand(3, 1, 1, 1), torch.randn(3, 4, 8, 8)
    out = model(x, y, [torch.randn(3, 16, 16)], time_input=t, noises=noise)
    xn = model.bn(x)
    x_t = (1 - t) * xn + t * noise
    v = model.inference(x_t, t.flatten(), y)
    torch.testing.assert_close(out["model_output"], v)
    torch.testing.assert_close(out["denoising_loss"], (v - (noise - xn)).square().mean(dim=(1, 2, 3)))
    assert out["time_input"] is not None and torch.equal(out["noises"], noise)


def test_cosine_path_coefficients():
    t = torch.tensor([0.0, 0.5, 1.0])
    alpha, sigma, d_alpha, d_sigma = interpolant(t, "cosine")
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(3))
    torch.testing.assert_close(d_alpha, -torch.pi / 2 * torch.sin(torch.pi / 2 * t))
    torch.testing.assert_close(d_sigma, torch.pi / 2 * torch.cos(torch.pi / 2 * t))


@pytest.mark.parametrize("path_type", ["linear", "cosine"])
def test_lognormal_time_sampling_stays_in_unit_interval(path_type):
    t = tiny_sit(weighting="lognormal", path_type=path_type).sample_time(1000)
    assert t.shape == (1000, 1, 1, 1) and (t > 0).all() and (t < 1).all()
    assert 0.4 < t.median() < 0.6  # logit-normal(0, 1) is centred at 1/2


def test_proj_loss_is_negative_mean_cosine_of_projected_block_features():
    model = tiny_sit().eval()
    x, y = torch.randn(2, 4, 8, 8), torch.tensor([3, 4])
    zs = [torch.randn(2, 16, 16)]
    out = model(x, y, zs)
    expected = -F.cosine_similarity(out["zs_tilde"][0], zs[0], dim=-1).mean()
    torch.testing.assert_close(out["proj_loss"], expected)


def test_align_only_stops_after_encoder_depth():
    model = tiny_sit(encoder_depth=2)
    calls = []
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda *_, i=i: calls.append(i))
    model.final_layer.register_forward_hook(lambda *_: calls.append("final"))
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([0, 1]), [torch.randn(2, 16, 16)], align_only=True)
    assert calls == [0, 1]
    assert out["denoising_loss"] is None and out["model_output"] is None


def test_frozen_align_pass_sends_gradient_to_latents_but_not_to_sit_parameters():
    model = tiny_sit().eval()
    z = torch.randn(2, 4, 8, 8, requires_grad=True)
    out = call_with_frozen_parameters(
        model, z, torch.tensor([0, 1]), [torch.randn(2, 16, 16)], align_only=True
    )
    out["proj_loss"].backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad == (name != "pos_embed") for name, p in model.named_parameters())


def test_bn_uses_running_stats_in_eval_and_batch_stats_in_train():
    model = tiny_sit()
    model.init_bn(latents_scale=torch.full((4,), 0.5), latents_bias=torch.full((4,), 2.0))
    x = torch.randn(8, 4, 8, 8) * 3 + 1
    model.eval()
    torch.testing.assert_close(model.bn(x), (x - 2.0) / torch.sqrt(torch.tensor(4.0 + 1e-4)))
    before = model.bn.running_mean.clone()
    model(x, torch.zeros(8, dtype=torch.long), [torch.randn(8, 16, 16)])
    assert torch.equal(model.bn.running_mean, before), "eval-mode forward must not touch running stats"
    model.train()
    normalised = model.bn(x)
    torch.testing.assert_close(normalised.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-5, rtol=0)
    assert not torch.equal(model.bn.running_mean, before)


def test_init_bn_and_extract_latents_stats_round_trip():
    model = tiny_sit()
    scale, bias = torch.rand(1, 4, 1, 1) + 0.5, torch.randn(1, 4, 1, 1)
    model.init_bn(scale, bias)
    stats = model.extract_latents_stats()
    torch.testing.assert_close(stats["latents_scale"], scale)
    torch.testing.assert_close(stats["latents_bias"], bias)
    x = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(model.denormalize_latents(x), x / scale + bias)


def test_label_dropout_only_in_train_mode():
    model = tiny_sit(class_dropout_prob=0.5)
    labels = torch.zeros(4000, dtype=torch.long)
    model.y_embedder.eval()
    assert torch.equal(model.y_embedder(labels), model.y_embedder.embedding_table(labels))
    model.y_embedder.train()
    dropped = (
        (model.y_embedder(labels) == model.y_embedder.embedding_table.weight[10]).all(dim=1).float().mean()
    )
    assert 0.45 < dropped < 0.55


def test_sdpa_attention_equals_explicit_softmax_attention():
    torch.manual_seed(0)
    fused = tiny_sit(fused_attn=True).eval()
    explicit = tiny_sit(fused_attn=False).eval()
    explicit.load_state_dict(fused.state_dict())
    h = torch.randn(2, 16, 64)
    torch.testing.assert_close(fused.blocks[0].attn(h), explicit.blocks[0].attn(h), atol=1e-5, rtol=1e-5)


def test_wrong_latent_size_is_a_clear_error():
    with pytest.raises(ValueError, match="spatial size 8x8"):
        tiny_sit()(torch.randn(1, 4, 16, 16), torch.tensor([0]), [torch.randn(1, 16, 16)])


def test_global_batchnorm_matches_torch_batchnorm_on_one_process():
    from repae.modules.sit import GlobalBatchNorm2d

    ours = GlobalBatchNorm2d(4, eps=1e-4, momentum=0.1, affine=False)
    reference = torch.nn.BatchNorm2d(4, eps=1e-4, momentum=0.1, affine=False)
    x = torch.randn(6, 4, 5, 5) * 3 + 2
    for _ in range(3):
        torch.testing.assert_close(ours(x), reference(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.running_mean, reference.running_mean)
    torch.testing.assert_close(ours.running_var, reference.running_var)
    assert ours.num_batches_tracked == reference.num_batches_tracked == 3
    ours.eval(), reference.eval()
    torch.testing.assert_close(ours(x), reference(x))
