"""How much of the study's REPA target a predictor that knows only the class and the token position
gets (docs/reproduction.md, "Investigation"), on the CPU:

    python scripts/study_targets.py --output docs/reproduction/targets.json

For each encoder setting ``tap_block:input_resolution:grid`` (EfficientNet-Lite0 truncated after MBConv
block ``tap_block``, images resized to ``input_resolution``, tokens resampled to ``grid`` x ``grid``
as the SiT's REPA loss sees them): the tokens of the first ``--train-images`` Fashion-MNIST training
images fit the predictions, the mean cosine similarity is measured on the first ``--test-images``
t10k images (``target_baselines``). The study's setting is 10:64:4 (a 6-block SiT with
patch 2 on 8x8 latents has a 4x4 token grid). ``FASHION_MNIST_ROOT`` names the data folder.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from repae.benchmarking import report
from repae.modules.encoders import EfficientNetLite0Encoder
from repae.study import fashion_mnist


def target_baselines(
    train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor
) -> dict[str, float]:
    """How much of a REPA target needs no image: the mean cosine similarity on ``test`` of the best
    predictions that know nothing, the token's position, or the position and the class label.

    ``train``/``test``: encoder tokens ``[N, T, D]``; labels ``[N]``. Each prediction is the mean
    direction of the training tokens that share what it knows (the cosine-optimal constant). The
    SiT's REPA loss is minus this similarity, so a SiT, which is given the label, learns from the
    alignment only what its ``proj_loss`` gains beyond ``-class_position``.
    """
    train, test = F.normalize(train.float(), dim=-1), F.normalize(test.float(), dim=-1)

    def similarity(prediction: torch.Tensor) -> float:
        return (F.normalize(prediction, dim=-1) * test).sum(-1).mean().item()

    by_class = torch.zeros(int(max(train_labels.max(), test_labels.max())) + 1, *train.shape[1:])
    by_class.index_add_(0, train_labels, train)
    return {
        "constant": similarity(train.mean((0, 1)).expand_as(test)),
        "position": similarity(train.mean(0).expand_as(test)),
        "class_position": similarity(by_class[test_labels]),
    }


@torch.no_grad()
def tokens(encoder: torch.nn.Module, images: torch.Tensor, grid: int, batch_size: int = 500) -> torch.Tensor:
    return torch.cat(
        [encoder(images[i : i + batch_size], grid_size=grid) for i in range(0, len(images), batch_size)]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train-images", type=int, default=20000)
    parser.add_argument("--test-images", type=int, default=10000)
    parser.add_argument("--setting", nargs="+", default=["10:64:4"], help="tap_block:input_resolution:grid")
    parser.add_argument("--output", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    train_images, train_labels = fashion_mnist("train", args.train_images)
    test_images, test_labels = fashion_mnist("test", args.test_images)
    results = {"train_images": len(train_images), "test_images": len(test_images)}
    for setting in args.setting:
        tap_block, resolution, grid = (int(part) for part in setting.split(":"))
        started = time.monotonic()
        encoder = EfficientNetLite0Encoder(tap_block=tap_block, input_resolution=resolution).eval()
        train, test = tokens(encoder, train_images, grid), tokens(encoder, test_images, grid)
        results[setting] = {
            "token_dim": train.shape[-1],
            **target_baselines(train, train_labels, test, test_labels),
            "seconds": round(time.monotonic() - started, 1),
        }
        print(setting, results[setting], flush=True)
    report(results, args.output)


if __name__ == "__main__":
    main()
