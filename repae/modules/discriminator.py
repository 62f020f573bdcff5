"""PatchGAN discriminator of taming-transformers / pix2pix, as used by REPA-E (reference section 4.2).

Layers live in ``self.main`` so the state-dict keys are ``main.0`` ... ``main.11`` and the released
``*-discriminator-ckpt.pt`` files load without remapping.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from repae.modules.vae import load_checked_state_dict


def weights_init(module: nn.Module) -> None:
    """taming init: conv weights N(0, 0.02); BatchNorm weight N(1, 0.02) and bias 0. Conv biases keep
    PyTorch's default init."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.constant_(module.bias, 0.0)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: images [B, input_nc, H, W] -> patch logits [B, 1, H', W'] (256x256 -> 30x30 by default).

    ``n_layers`` stride-2 convs (the first without normalisation), then one stride-1 conv with
    BatchNorm and a stride-1 conv to one channel; all kernels 4x4, padding 1, LeakyReLU(0.2).
    BatchNorm is plain (not synchronised) and, in REPA-E, always run in train mode.
    """

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(input_nc, ndf, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2, True),
        ]
        mult = 1
        for n in range(1, n_layers + 1):
            prev_mult, mult = mult, min(2**n, 8)
            # The last of these keeps the resolution: it widens the receptive field before the head.
            stride = 2 if n < n_layers else 1
            layers += [
                # No bias: BatchNorm follows.
                nn.Conv2d(ndf * prev_mult, ndf * mult, kernel_size=4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, kernel_size=4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(weights_init)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x)


def load_discriminator_weights(discriminator: NLayerDiscriminator, path: str | Path, strict: bool = True):
    """Load discriminator weights (e.g. ``sdvae-f8d4-discriminator-ckpt.pt``) from ``path``.

    Accepts a plain state_dict or one wrapped under ``"discriminator"`` or ``"state_dict"``. Raises
    FileNotFoundError / ValueError naming the config key ``model.discriminator_weights_path``.
    """
    return load_checked_state_dict(
        discriminator,
        path,
        config_key="model.discriminator_weights_path",
        wrapper_keys=("discriminator", "state_dict"),
        strict=strict,
    )
