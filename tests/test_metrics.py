"""Fréchet distance, feature statistics, feature extractors and reference-statistics files."""

import gzip
import os

import numpy as np
import pytest
import torch

from repae.metrics import (
    EfficientNetFeatures,
    FeatureStatistics,
    InceptionFeatures,
    feature_statistics_of_images,
    frechet_distance,
    load_reference_statistics,
    save_reference_statistics,
)

FASHION_MNIST = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=(2, 6))
    s1, s2 = rng.uniform(0.1, 3.0, size=(2, 6))
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_of_a_feature_set_with_itself_is_zero():
    rng = np.random.default_rng(1)
    # Fewer samples than dimensions: a singular covariance, as with small evaluation sets.
    for num_samples in (500, 20):
        features = rng.normal(size=(num_samples, 32)) @ rng.normal(size=(32, 32))
        mu, sigma = features.mean(0), np.cov(features, rowvar=False)
        assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-5 * np.trace(sigma))


def test_frechet_distance_accepts_tensors_and_rejects_mismatched_shapes():
    mu, sigma = torch.zeros(3), torch.eye(3)
    assert frechet_distance(mu, sigma, mu + 1, sigma) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="Mismatched"):
        frechet_distance(mu, sigma, torch.zeros(4), torch.eye(4))


def test_feature_statistics_match_numpy_mean_and_unbiased_covariance():
    features = torch.randn(37, 5, generator=torch.Generator().manual_seed(0)) * 3 + 10
    statistics = FeatureStatistics(5)
    for chunk in features.split(8):
        statistics.update(chunk)
    mu, sigma = statistics.compute()
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(mu, features.double().numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(
        sigma, np.cov(features.double().numpy(), rowvar=False, ddof=1), rtol=1e-10, atol=1e-12
    )


def test_merging_two_halves_equals_the_whole():
    features = torch.randn(40, 4, generator=torch.Generator().manual_seed(1))
    whole, first, second = FeatureStatistics(4), FeatureStatistics(4), FeatureStatistics(4)
    whole.update(features)
    first.update(features[:15])
    second.update(features[15:])

    # What an all_reduce(SUM) of the state tensors does across two ranks.
    summed = FeatureStatistics(4)
    for state, a, b in zip(
        summed.state_tensors(), first.state_tensors(), second.state_tensors(), strict=True
    ):
        state.copy_(a + b)
    first.merge(second)
    for merged in (first, summed):
        assert merged.count.item() == 40
        for got, expected in zip(merged.compute(), whole.compute(), strict=True):
            np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-14)


def test_feature_statistics_reject_wrong_shapes_and_too_few_samples():
    statistics = FeatureStatistics(4)
    with pytest.raises(ValueError, match="features"):
        statistics.update(torch.zeros(3, 5))
    statistics.update(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="at least 2"):
        statistics.compute()


def _fashion_mnist(count: int) -> torch.Tensor:
    if not os.path.exists(FASHION_MNIST):
        pytest.skip("Debian dataset-fashion-mnist is not installed (make data)")
    with gzip.open(FASHION_MNIST) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[:count]
    return torch.from_numpy(images.copy())[:, None].expand(-1, 3, -1, -1)


def test_effnet_features_separate_real_images_from_noise():
    real = _fashion_mnist(240)
    noise = torch.randint(
        0, 256, (80, 3, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    extractor = EfficientNetFeatures(resolution=64)
    features = extractor(real[:8])
    assert features.shape == (8, 1280) and features.dtype == torch.float32
    assert torch.isfinite(features).all()

    reference = feature_statistics_of_images(real[:160], extractor, batch_size=80)
    same_data = feature_statistics_of_images(real[160:], extractor)
    other_data = feature_statistics_of_images(noise, extractor)
    fd_real = frechet_distance(*reference, *same_data)
    fd_noise = frechet_distance(*reference, *other_data)
    assert 0 < fd_real < 0.5 * fd_noise


def test_effnet_features_stay_in_eval_mode():
    extractor = EfficientNetFeatures(resolution=32)
    extractor.train()
    assert not extractor.training and not extractor.net.training
    assert not any(p.requires_grad for p in extractor.parameters())
    with pytest.raises(ValueError, match="uint8"):
        extractor(torch.zeros(1, 3, 32, 32))


@pytest.mark.parametrize("weights_path", [None, "/nonexistent/inception.pth"])
def test_missing_inception_weights_name_the_config_key_and_file(weights_path):
    with pytest.raises(FileNotFoundError) as error:
        InceptionFeatures(weights_path, config_key="callbacks.fid.inception_weights_path")
    assert "callbacks.fid.inception_weights_path" in str(error.value)
    assert "weights-inception-2015-12-05-6726825d.pth" in str(error.value)


def test_inception_features_load_a_local_file_without_downloading(tmp_path, monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as inception_module

    # A randomly initialised weight file with the right layout (the real one cannot be shipped).
    with monkeypatch.context() as patch:
        patch.setattr(inception_module.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        patch.setattr(inception_module, "load_state_dict_from_url", lambda *args, **kwargs: {})
        random_net = inception_module.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(random_net.state_dict(), weights)

    def no_download(*args, **kwargs):
        raise AssertionError("tried to download the Inception weights")

    monkeypatch.setattr(inception_module, "load_state_dict_from_url", no_download)
    extractor = InceptionFeatures(str(weights), config_key="callbacks.fid.inception_weights_path")
    features = extractor(torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8))
    assert features.shape == (2, 2048) and torch.isfinite(features).all()
    assert torch.equal(extractor.net.fc.weight, random_net.fc.weight)


class MeanColour(torch.nn.Module):
    """A 3-d toy extractor: per-channel mean and a little noise-free variation."""

    num_features = 3

    def forward(self, images):
        return images.float().mean(dim=(2, 3))


def test_reference_statistics_round_trip_and_images_npz(tmp_path):
    rng = np.random.default_rng(2)
    mu, sigma = rng.normal(size=4), np.cov(rng.normal(size=(50, 4)), rowvar=False)
    stats_path = str(tmp_path / "stats" / "ref.npz")
    save_reference_statistics(stats_path, mu, sigma)
    loaded_mu, loaded_sigma = load_reference_statistics(stats_path)
    np.testing.assert_array_equal(loaded_mu, mu)
    np.testing.assert_array_equal(loaded_sigma, sigma)

    # ADM sample/reference batches: uint8 images [N, H, W, 3] under arr_0.
    images = rng.integers(0, 256, size=(10, 8, 8, 3), dtype=np.uint8)
    images_path = str(tmp_path / "samples.npz")
    np.savez(images_path, arr_0=images)
    got_mu, got_sigma = load_reference_statistics(images_path, MeanColour(), batch_size=3)
    per_image_means = images.astype(np.float64).mean(axis=(1, 2))
    np.testing.assert_allclose(got_mu, per_image_means.mean(0), rtol=1e-6)
    np.testing.assert_allclose(got_sigma, np.cov(per_image_means, rowvar=False), rtol=1e-5)

    with pytest.raises(ValueError, match="feature_extractor"):
        load_reference_statistics(images_path)
    np.savez(str(tmp_path / "other.npz"), something=np.zeros(3))
    with pytest.raises(ValueError, match="arr_0"):
        load_reference_statistics(str(tmp_path / "other.npz"))
    with pytest.raises(FileNotFoundError):
        load_reference_statistics(str(tmp_path / "missing.npz"))
