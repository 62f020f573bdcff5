"""Sample-quality metrics: FID/sFID/IS/precision-recall plumbing, FD-EffNet, readers and errors."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from PIL import Image
from torch import nn

import repae.metrics as metrics_module
from repae.evaluate import (
    evaluate,
    image_batches,
    inception_metrics,
    inception_score,
    iterate_npz_images,
    precision_recall,
)
from repae.metrics import InceptionFeatures, frechet_distance
from repae.protocol import build_protocol, protocol_differences, sample_count_warning

from conftest import CONF_DIR

FASHION_MNIST = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory) -> str:
    """A weight file in the layout of torch-fidelity's Inception, randomly initialised (the real one cannot
    ship). He-initialised convolutions keep the activations O(1) through the 94 ReLU layers, so the
    features differ between images as real ones do instead of vanishing."""
    import torch_fidelity.feature_extractor_inceptionv3 as inception_module

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            inception_module.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None
        )
        patch.setattr(inception_module, "load_state_dict_from_url", lambda *args, **kwargs: {})
        net = inception_module.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.manual_seed(0)
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path = tmp_path_factory.mktemp("inception") / "weights-inception-2015-12-05-6726825d.pth"
    torch.save(net.state_dict(), path)
    return str(path)


def smooth_images(count: int, seed: int, size: int = 32) -> np.ndarray:
    """uint8 [count, size, size, 3] images: upsampled random 4x4 colour fields."""
    coarse = torch.rand(count, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    images = nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    return (images * 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def evaluate_config(tmp_path, samples_path, reference_path, *overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(
            config_name="evaluate",
            overrides=[
                f"samples_path={samples_path}",
                f"reference_path={reference_path}",
                f"metrics_path={tmp_path}/metrics.json",
                "device=cpu",
                "num_workers=0",
                "batch_size=8",
                *overrides,
            ],
        )


def test_the_frechet_distance_of_few_samples_in_their_common_subspace_equals_the_full_one(monkeypatch):
    rng = np.random.default_rng(0)
    for num_samples, reduced in ((300, False), (20, True)):  # full rank, and singular as with few samples
        a = rng.normal(size=(num_samples, 96)) @ rng.normal(size=(96, 96))
        b = rng.normal(size=(num_samples, 96)) @ rng.normal(size=(96, 96)) + 0.3
        stats_a = a.mean(0), np.cov(a, rowvar=False)
        stats_b = b.mean(0), np.cov(b, rowvar=False)
        assert (metrics_module.common_subspace(stats_a[1], stats_b[1]) is not None) == reduced
        found = frechet_distance(*stats_a, *stats_b)
        itself = frechet_distance(*stats_a, *stats_a)
        with monkeypatch.context() as full:
            full.setattr(metrics_module, "common_subspace", lambda *sigmas: None)
            assert found == pytest.approx(frechet_distance(*stats_a, *stats_b), rel=1e-6)
        assert abs(itself) < 1e-5 * np.trace(stats_a[1])


def test_the_subspace_frechet_distance_is_real_where_feature_scales_differ_by_orders_of_magnitude(
    monkeypatch,
):
    """``sqrtm`` of the singular product of the reduced covariances turned rounding into an imaginary
    diagonal of 0.25 here (and refused it); the full 256-d product's passes."""
    rng = np.random.default_rng(5)
    a, b = (rng.normal(size=(20, 256)) * np.exp(2 * rng.normal(size=256)) + 3 + shift for shift in (0, 0.3))
    stats_a = a.mean(0), np.cov(a, rowvar=False)
    stats_b = b.mean(0), np.cov(b, rowvar=False)
    assert metrics_module.common_subspace(stats_a[1], stats_b[1]) is not None
    found = frechet_distance(*stats_a, *stats_b)
    monkeypatch.setattr(metrics_module, "common_subspace", lambda *sigmas: None)
    assert found == pytest.approx(frechet_distance(*stats_a, *stats_b), rel=1e-6)


def test_fid_of_a_set_with_itself_is_zero_and_statistics_files_round_trip(inception_weights, tmp_path):
    images = smooth_images(6, seed=0)
    # Samples as a folder of PNGs, reference as an ADM npz of the same images: both readers, one answer.
    folder = tmp_path / "samples"
    folder.mkdir()
    for index, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{index:06d}.png")
    np.savez(tmp_path / "reference.npz", arr_0=images)
    cfg = evaluate_config(
        tmp_path,
        folder,
        tmp_path / "reference.npz",
        f"inception_weights_path={inception_weights}",
        f"statistics_path={tmp_path}/stats.npz",
    )
    report = evaluate(cfg)
    metrics = report["metrics"]
    assert set(metrics) == {"fid", "sfid", "inception_score", "inception_score_std", "precision", "recall"}
    with np.load(tmp_path / "stats.npz") as stats:
        assert {key: stats[key].shape for key in stats.files} == {
            "mu": (2048,),
            "sigma": (2048, 2048),
            "mu_s": (2023,),
            "sigma_s": (2023, 2023),
            "feature_extractor": (),  # the record of what made the statistics
            "feature_resolution": (),
        }
        spread, spatial_spread = np.trace(stats["sigma"]), np.trace(stats["sigma_s"])
    assert spread > 0.1 and spatial_spread > 0.1  # the random network tells the images apart
    assert abs(metrics["fid"]) < 1e-5 * spread and abs(metrics["sfid"]) < 1e-5 * spatial_spread
    assert metrics["precision"] == metrics["recall"] == 1.0
    # IS = exp(mean KL) >= 1 exactly; a random network's near-uniform predictions put it at 1 up to rounding.
    assert metrics["inception_score"] >= 1.0 - 1e-9 and np.isfinite(metrics["inception_score"])
    assert report["num_samples"] == 6 and report["unavailable"] == {}
    assert json.loads((tmp_path / "metrics.json").read_text())["metrics"] == metrics

    # Other images against the statistics file: clearly apart, and no images for precision/recall.
    np.savez(tmp_path / "others.npz", arr_0=smooth_images(6, seed=1))
    result = inception_metrics(
        str(tmp_path / "others.npz"),
        str(tmp_path / "stats.npz"),
        inception_weights,
        metrics=["fid", "sfid", "precision_recall"],
        batch_size=8,
    )
    assert result.metrics["fid"] > 0.01 * spread and result.metrics["sfid"] > 0.01 * spatial_spread
    assert set(result.unavailable) == {"precision", "recall"}
    assert "arr_0" in result.unavailable["precision"]


def test_spatial_features_are_the_first_seven_channels_of_mixed_6d_in_tf_order(inception_weights):
    extractor = InceptionFeatures(inception_weights, config_key="inception_weights_path")
    captured = {}
    extractor.net.Mixed_6d.branch1x1.register_forward_hook(
        lambda module, inputs, output: captured.update(x=output)
    )
    images = torch.from_numpy(smooth_images(2, seed=2)).permute(0, 3, 1, 2)
    features = extractor.metric_features(images)
    assert features["pool"].shape == (2, 2048) and features["logits"].shape == (2, 1008)
    branch = captured["x"]
    assert branch.shape == (2, 192, 17, 17)
    # ADM: spatial[..., :7] of an NHWC tensor, reshaped to [N, -1]: channel fastest, then width, then height.
    assert features["spatial"].shape == (2, 17 * 17 * 7)
    assert torch.equal(features["spatial"][1, :7], branch[1, :7, 0, 0])
    assert torch.equal(features["spatial"][1, 7:14], branch[1, :7, 0, 1])
    assert torch.equal(features["spatial"][0, 17 * 7 : 17 * 7 + 7], branch[0, :7, 1, 0])
    logits_with_bias = extractor.net.fc(features["pool"])
    torch.testing.assert_close(features["logits"], logits_with_bias - extractor.net.fc.bias)


def test_inception_score_splits_samples_in_order_like_adm():
    logits = torch.randn(40, 1008, generator=torch.Generator().manual_seed(0)) * 3
    probabilities = torch.softmax(logits.double(), dim=1).numpy()
    # ADM's compute_inception_score with split_size = N / splits.
    scores = []
    for part in np.split(probabilities, 4):
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    mean, std = inception_score(logits, splits=4)
    assert mean == pytest.approx(np.mean(scores), rel=1e-9) and std == pytest.approx(np.std(scores), rel=1e-9)
    # Confident, evenly spread predictions over 4 classes score 4; identical predictions score 1.
    confident = torch.full((8, 1008), -30.0)
    confident[torch.arange(8), torch.arange(8) % 4] = 0
    assert inception_score(confident, splits=1)[0] == pytest.approx(4.0, rel=1e-6)
    assert inception_score(torch.zeros(8, 1008), splits=2)[0] == pytest.approx(1.0)


def test_precision_and_recall_of_identical_overlapping_and_disjoint_sets():
    generator = torch.Generator().manual_seed(0)
    real = torch.randn(200, 8, generator=generator)
    assert precision_recall(real, real) == (1.0, 1.0)
    assert precision_recall(real + 100, real) == (0.0, 0.0)
    # Samples collapsed onto one real image: all realistic (precision 1), almost no coverage.
    collapsed = real[:1] + 1e-3 * torch.randn(200, 8, generator=generator)
    precision, recall = precision_recall(collapsed, real)
    assert precision == 1.0 and recall < 0.05


def test_npz_reader_streams_adm_batches_and_rejects_other_arrays(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(5, 6, 7, 3), dtype=np.uint8)
    np.savez(tmp_path / "images.npz", arr_0=images)
    batches = list(iterate_npz_images(str(tmp_path / "images.npz"), batch_size=2))
    assert [tuple(batch.shape) for batch in batches] == [(2, 3, 6, 7), (2, 3, 6, 7), (1, 3, 6, 7)]
    np.testing.assert_array_equal(torch.cat(batches).permute(0, 2, 3, 1).numpy(), images)
    count, _ = image_batches(str(tmp_path / "images.npz"), batch_size=4)
    assert count == 5

    np.savez(tmp_path / "float.npz", arr_0=images.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        image_batches(str(tmp_path / "float.npz"), batch_size=2)
    np.savez(tmp_path / "stats.npz", mu=np.zeros(3))
    with pytest.raises(ValueError, match="arr_0"):
        image_batches(str(tmp_path / "stats.npz"), batch_size=2)
    with pytest.raises(FileNotFoundError):
        image_batches(str(tmp_path / "missing"), batch_size=2)


def fashion_mnist_rgb(count: int, offset: int = 0) -> np.ndarray:
    if not os.path.exists(FASHION_MNIST):
        pytest.skip("Debian dataset-fashion-mnist is not installed (make data)")
    with gzip.open(FASHION_MNIST) as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 28, 28)[offset : offset + count]
    return np.repeat(images[..., None], 3, axis=-1)


def test_fd_effnet_on_fashion_mnist_real_vs_real_is_below_real_vs_noise(tmp_path):
    np.savez(tmp_path / "real_a.npz", arr_0=fashion_mnist_rgb(150))
    np.savez(tmp_path / "real_b.npz", arr_0=fashion_mnist_rgb(150, offset=150))
    noise = np.random.default_rng(0).integers(0, 256, size=(150, 28, 28, 3), dtype=np.uint8)
    np.savez(tmp_path / "noise.npz", arr_0=noise)
    effnet = [
        "feature_extractor=effnet",
        "effnet_resolution=64",
        "batch_size=50",
        "inception_weights_path=/none",
    ]
    real = evaluate(evaluate_config(tmp_path, tmp_path / "real_a.npz", tmp_path / "real_b.npz", *effnet))
    noisy = evaluate(evaluate_config(tmp_path, tmp_path / "noise.npz", tmp_path / "real_b.npz", *effnet))
    assert set(real["metrics"]) == set(noisy["metrics"]) == {"fd_effnet"}  # never reported as "fid"
    assert 0 < real["metrics"]["fd_effnet"] < 0.5 * noisy["metrics"]["fd_effnet"]


def test_missing_inception_weights_name_the_config_key(tmp_path):
    np.savez(tmp_path / "images.npz", arr_0=smooth_images(2, seed=0))
    cfg = evaluate_config(
        tmp_path,
        tmp_path / "images.npz",
        tmp_path / "images.npz",
        f"inception_weights_path={tmp_path}/missing.pth",
    )
    with pytest.raises(FileNotFoundError) as error:
        evaluate(cfg)
    assert "`inception_weights_path`" in str(error.value)
    assert "weights-inception-2015-12-05-6726825d.pth" in str(error.value)


def test_reference_statistics_of_another_feature_extractor_are_rejected(inception_weights, tmp_path):
    np.savez(tmp_path / "images.npz", arr_0=smooth_images(2, seed=0))
    np.savez(tmp_path / "effnet_stats.npz", mu=np.zeros(1280), sigma=np.eye(1280))
    with pytest.raises(ValueError, match="another feature extractor"):
        inception_metrics(str(tmp_path / "images.npz"), str(tmp_path / "effnet_stats.npz"), inception_weights)
    with pytest.raises(ValueError, match="feature_extractor"):
        evaluate(
            evaluate_config(
                tmp_path, tmp_path / "images.npz", tmp_path / "images.npz", "feature_extractor=vgg"
            )
        )


EFFNET_32 = ["feature_extractor=effnet", "effnet_resolution=32", "inception_weights_path=/none"]


def test_the_protocol_is_written_with_the_metrics_and_completed_from_the_samples_json(tmp_path):
    np.savez(tmp_path / "samples.npz", arr_0=smooth_images(6, seed=0))
    np.savez(tmp_path / "reference.npz", arr_0=smooth_images(6, seed=1))
    (tmp_path / "samples.json").write_text(
        json.dumps({"label_sampling": "random", "seeds": {"global_seed": 3}})
    )
    report = evaluate(
        evaluate_config(tmp_path, tmp_path / "samples.npz", tmp_path / "reference.npz", *EFFNET_32)
    )
    protocol = json.loads((tmp_path / "metrics.json").read_text())["protocol"]
    assert protocol == report["protocol"]
    expected_fields = {
        "num_samples", "label_sampling", "sampler", "seeds", "precision", "compile", "weights",
        "checkpoint_sha256", "reference_sha256", "inception_sha256", "feature_extractor",
        "feature_resolution", "repae_version", "git_commit", "torch_version",
    }  # fmt: skip
    assert expected_fields <= set(protocol)
    assert protocol["num_samples"] == 6 and protocol["label_sampling"] == "random"
    assert protocol["seeds"] == {"global_seed": 3}
    assert protocol["feature_extractor"] == "effnet" and protocol["feature_resolution"] == 32
    assert (
        protocol["reference_sha256"] == hashlib.sha256((tmp_path / "reference.npz").read_bytes()).hexdigest()
    )


def test_a_reference_of_another_extractor_or_resolution_is_refused_and_an_unrecorded_one_warned(
    tmp_path, capsys
):
    np.savez(tmp_path / "samples.npz", arr_0=smooth_images(6, seed=0))
    np.savez(tmp_path / "real.npz", arr_0=smooth_images(6, seed=1))
    # The reference statistics file records the extractor and resolution it was made with.
    cfg = evaluate_config(
        tmp_path,
        tmp_path / "real.npz",
        tmp_path / "real.npz",
        *EFFNET_32,
        f"statistics_path={tmp_path}/ref.npz",
    )
    evaluate(cfg)
    with np.load(tmp_path / "ref.npz") as reference:
        assert str(reference["feature_extractor"]) == "effnet" and int(reference["feature_resolution"]) == 32
    same = evaluate(evaluate_config(tmp_path, tmp_path / "samples.npz", tmp_path / "ref.npz", *EFFNET_32))
    assert same["warnings"] == []
    other_resolution = [*EFFNET_32, "effnet_resolution=64"]
    with pytest.raises(ValueError, match="made with effnet at 32px, but this evaluation uses effnet at 64px"):
        evaluate(evaluate_config(tmp_path, tmp_path / "samples.npz", tmp_path / "ref.npz", *other_resolution))
    # From the command line: one error line and a non-zero exit.
    command = [
        sys.executable, "-m", "repae.evaluate", f"samples_path={tmp_path}/samples.npz",
        f"reference_path={tmp_path}/ref.npz", *other_resolution, f"hydra.run.dir={tmp_path}/run", "device=cpu",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode != 0
    assert (
        result.stderr.strip().splitlines()[-1].startswith("error: the reference") and "64px" in result.stderr
    )

    # Statistics without a record (as ADM's files): a warning naming what cannot be checked.
    with np.load(tmp_path / "ref.npz") as reference:
        np.savez(tmp_path / "unrecorded.npz", mu=reference["mu"], sigma=reference["sigma"])
    report = evaluate(
        evaluate_config(tmp_path, tmp_path / "samples.npz", tmp_path / "unrecorded.npz", *EFFNET_32)
    )
    assert (
        len(report["warnings"]) == 1 and "cannot check that they are effnet at 32px" in report["warnings"][0]
    )
    assert "warning: " in capsys.readouterr().err


def test_comparing_with_a_result_of_another_reference_warns(tmp_path):
    np.savez(tmp_path / "samples.npz", arr_0=smooth_images(6, seed=0))
    np.savez(tmp_path / "reference_a.npz", arr_0=smooth_images(6, seed=1))
    np.savez(tmp_path / "reference_b.npz", arr_0=smooth_images(6, seed=2))
    first = tmp_path / "first"
    evaluate(evaluate_config(first, tmp_path / "samples.npz", tmp_path / "reference_a.npz", *EFFNET_32))
    compare = f"compare_with={first}/metrics.json"
    same = evaluate(
        evaluate_config(tmp_path, tmp_path / "samples.npz", tmp_path / "reference_a.npz", *EFFNET_32, compare)
    )
    assert same["warnings"] == []
    other = evaluate(
        evaluate_config(tmp_path, tmp_path / "samples.npz", tmp_path / "reference_b.npz", *EFFNET_32, compare)
    )
    assert len(other["warnings"]) == 1 and "reference_sha256" in other["warnings"][0]


def test_fid_of_fewer_than_50k_samples_and_fid_changing_differences_are_named():
    protocol = build_protocol(num_samples=10_000, feature_extractor="inception", feature_resolution=299)
    assert "FID-50K" in sample_count_warning(protocol, {"fid": 2.0})
    assert sample_count_warning({**protocol, "num_samples": 50_000}, {"fid": 2.0}) is None
    other = {**protocol, "label_sampling": "random", "seeds": {"global_seed": 1}}
    assert protocol_differences({**protocol, "label_sampling": "equal"}, other) == [
        "label_sampling: equal vs random"
    ]
