"""Sampling, metric and loss-curve callbacks on a stub REPA-E module with a real Lightning Trainer (CPU)."""

import csv
import hashlib
import json
import os
import sys
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

import repae.callbacks.vae_health as vae_health_module
from repae.callbacks.loss_curve import LossCurveCallback
from repae.callbacks.progress import ProgressBar, ProgressLog
from repae.callbacks.sampling import DistributionMetricCallback, ImageGridCallback, images_to_uint8
from repae.callbacks.vae_health import VAEHealthCallback
from repae.metrics import load_reference_statistics
from repae.modules.vae import build_vae

IMAGE_SIZE = 8


class StubREPAE(LightningModule):
    """Exposes the interface the callbacks use: generate / step / num_classes / latent_shape.

    ``generate`` turns the first three noise channels, upsampled x2, into uint8 images [B, 3, 8, 8] and
    records its arguments. ``step`` is a buffer, so it is checkpointed like the real counter.
    """

    num_classes = 10
    latent_shape = (4, 4, 4)

    def __init__(self, max_train_steps: int = 7):
        super().__init__()
        self.max_train_steps = max_train_steps
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.register_buffer("step", torch.tensor(0))
        self.generate_calls = []

    def training_step(self, batch, batch_idx):
        self.step += 1
        loss = (self.weight - 1) ** 2 + 0 * batch[0].mean()
        self.log("sit_loss", loss)
        self.log("d_loss", 2 * loss, on_step=True, on_epoch=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def generate(self, labels, noise, **sampler_kwargs):
        self.generate_calls.append((labels.clone(), noise.clone(), sampler_kwargs))
        images = torch.nn.functional.interpolate(noise[:, :3], scale_factor=2)
        return images_to_uint8(images.clamp(-1, 1))


class RandomImages(LightningDataModule):
    def __init__(self, count: int = 64):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.images = torch.rand(count, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) * 2 - 1
        self.labels = torch.randint(0, 10, (count,), generator=generator)
        self.train_dataloader_calls = 0

    def train_dataloader(self):
        self.train_dataloader_calls += 1
        return DataLoader(TensorDataset(self.images, self.labels), batch_size=8)


def make_trainer(tmp_path, callbacks, max_steps, enable_progress_bar=False):
    return Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        callbacks=callbacks,
        logger=CSVLogger(str(tmp_path)),
        default_root_dir=str(tmp_path),
        log_every_n_steps=50,
        enable_checkpointing=False,
        enable_progress_bar=enable_progress_bar,
        enable_model_summary=False,
    )


def logged_metrics(trainer):
    with open(os.path.join(trainer.logger.log_dir, "metrics.csv")) as f:
        return list(csv.DictReader(f))


def test_image_grid_is_written_with_fixed_inputs_and_the_right_size(tmp_path):
    module = StubREPAE(max_train_steps=3)
    grid = ImageGridCallback(every_n_steps=2, num_images=6, labels=[1, 2], seed=3, mode="sde", num_steps=4)
    trainer = make_trainer(tmp_path, [grid], max_steps=3)
    trainer.fit(module, datamodule=RandomImages())

    # Step 2 (periodic) and step 3 (train end).
    names = sorted(f for f in os.listdir(trainer.default_root_dir) if f.startswith("samples_"))
    assert names == ["samples_step0000002.png", "samples_step0000003.png"]
    with Image.open(os.path.join(trainer.default_root_dir, names[0])) as png:
        # 6 images of 8x8 in rows of ceil(sqrt(6)) = 3 with 2-pixel padding: 2 rows x 3 columns.
        assert png.size == (3 * (IMAGE_SIZE + 2) + 2, 2 * (IMAGE_SIZE + 2) + 2)
        assert png.mode == "RGB"

    (labels_a, noise_a, kwargs_a), (labels_b, noise_b, _) = module.generate_calls
    assert labels_a.tolist() == [1, 2, 1, 2, 1, 2]
    assert torch.equal(labels_a, labels_b) and torch.equal(noise_a, noise_b)
    assert noise_a.shape == (6, *StubREPAE.latent_shape)
    assert kwargs_a["mode"] == "sde" and kwargs_a["num_steps"] == 4
    assert isinstance(kwargs_a["generator"], torch.Generator)


def test_a_run_stopped_before_its_last_step_samples_nothing_at_the_stop(tmp_path):
    """A requeue signal stops a run early: its grid and FD wait for the schedule, or the run's true end."""
    module = StubREPAE(max_train_steps=7)
    grid = ImageGridCallback(every_n_steps=2, num_images=2, seed=0, mode="ode", num_steps=2)
    metric = DistributionMetricCallback(
        steps=[2, 7],
        num_samples=4,
        batch_size=4,
        reference_stats_path=str(tmp_path / "reference.npz"),
        reference_from_datamodule_images=8,
        effnet_resolution=32,
        mode="ode",
        num_steps=2,
    )
    trainer = make_trainer(tmp_path, [grid, metric], max_steps=3)  # stopped at step 3 of 7
    trainer.fit(module, datamodule=RandomImages())

    names = sorted(f for f in os.listdir(trainer.default_root_dir) if f.startswith("samples_"))
    assert names == ["samples_step0000002.png"]
    assert [int(row["step"]) for row in logged_metrics(trainer) if row.get("fd_effnet")] == [2]


def test_ode_grid_passes_no_generator():
    grid = ImageGridCallback(every_n_steps=1, num_images=4, mode="ode", heun=True)
    module = StubREPAE()
    image = grid.sample_grid(module)
    assert image.dtype == torch.uint8 and image.shape == (
        3,
        2 * (IMAGE_SIZE + 2) + 2,
        2 * (IMAGE_SIZE + 2) + 2,
    )
    labels, _, kwargs = module.generate_calls[0]
    assert kwargs == {"mode": "ode", "heun": True}
    assert ((0 <= labels) & (labels < StubREPAE.num_classes)).all()


class RecordingWandbLogger(WandbLogger):
    """A WandbLogger that never starts wandb and records log_image calls."""

    def __init__(self):
        self.images = []

    def log_image(self, key, images, step=None, **kwargs):
        self.images.append((key, images, step))


def test_grid_is_sent_to_a_wandb_logger(tmp_path):
    logger = RecordingWandbLogger()
    trainer = SimpleNamespace(
        log_dir=str(tmp_path), default_root_dir=str(tmp_path), is_global_zero=True, loggers=[logger]
    )
    module = StubREPAE()
    module.step += 5
    ImageGridCallback(every_n_steps=5, num_images=4).on_train_batch_end(trainer, module, None, None, 0)
    ((key, images, step),) = logger.images
    assert key == "samples" and step == 5
    assert images[0].shape == (2 * (IMAGE_SIZE + 2) + 2, 2 * (IMAGE_SIZE + 2) + 2, 3)
    assert images[0].dtype == np.uint8
    assert os.path.exists(tmp_path / "samples_step0000005.png")


def test_fd_effnet_is_logged_against_reference_built_from_training_images(tmp_path):
    module, data = StubREPAE(), RandomImages()
    reference_path = str(tmp_path / "reference" / "fashion_effnet.npz")
    metric = DistributionMetricCallback(
        every_n_steps=2,
        num_samples=6,
        batch_size=4,
        feature_extractor="effnet",
        reference_stats_path=reference_path,
        reference_from_datamodule_images=12,
        effnet_resolution=32,
        mode="ode",
        num_steps=2,
    )
    trainer = make_trainer(tmp_path, [metric], max_steps=2)
    trainer.fit(module, datamodule=data)

    value = trainer.callback_metrics["fd_effnet"].item()
    assert np.isfinite(value) and value > 0
    rows = [row for row in logged_metrics(trainer) if row.get("fd_effnet")]
    assert [(int(row["step"]), float(row["fd_effnet"])) for row in rows] == [(2, pytest.approx(value))]
    assert "fid" not in trainer.callback_metrics

    # 6 samples in batches of 4 + 2, class-balanced labels, evaluated once (step 2 = train end).
    assert [len(labels) for labels, _, _ in module.generate_calls] == [4, 2]
    assert sorted(torch.cat([labels for labels, _, _ in module.generate_calls]).tolist()) == [
        0,
        1,
        2,
        3,
        4,
        5,
    ]

    # The reference was built from the training images (one fresh loader) and cached for later runs.
    assert data.train_dataloader_calls == 2  # one by the Trainer, one for the reference
    mu, sigma = load_reference_statistics(reference_path)
    assert mu.shape == (1280,) and sigma.shape == (1280, 1280)

    # The EfficientNet stays in the callback: checkpoints hold only the module's own weights.
    checkpoint_path = str(tmp_path / "last.ckpt")
    trainer.save_checkpoint(checkpoint_path)
    checkpoint = torch.load(checkpoint_path, weights_only=True)
    assert set(checkpoint["state_dict"]) == {"weight", "step"}


def test_cached_reference_is_loaded_instead_of_rebuilt(tmp_path):
    reference_path = str(tmp_path / "ref.npz")
    rng = np.random.default_rng(0)
    features = rng.normal(size=(20, 1280))
    np.savez(reference_path, mu=features.mean(0), sigma=np.cov(features, rowvar=False))
    metric = DistributionMetricCallback(
        every_n_steps=100,
        num_samples=4,
        batch_size=4,
        reference_stats_path=reference_path,
        reference_from_datamodule_images=12,
        effnet_resolution=32,
        num_steps=1,
    )
    module, data = StubREPAE(max_train_steps=1), RandomImages()
    trainer = make_trainer(tmp_path, [metric], max_steps=1)
    trainer.fit(module, datamodule=data)
    assert data.train_dataloader_calls == 1
    np.testing.assert_array_equal(metric.reference[0], features.mean(0))
    # Evaluated once, at train end (step 1 is not a multiple of every_n_steps).
    value = trainer.callback_metrics["fd_effnet"].item()
    rows = [row for row in logged_metrics(trainer) if row.get("fd_effnet")]
    assert [(int(row["step"]), float(row["fd_effnet"])) for row in rows] == [(1, pytest.approx(value))]


def test_ranks_sample_disjoint_class_balanced_shares():
    metric = DistributionMetricCallback(
        every_n_steps=1, num_samples=23, batch_size=4, reference_stats_path="x.npz"
    )
    shares = [metric.labels_for_rank(num_classes=5, world_size=3, rank=rank) for rank in range(3)]
    assert [len(share) for share in shares] == [8, 8, 7]
    counts = torch.bincount(torch.cat(shares), minlength=5).tolist()
    assert sorted(counts) == [4, 4, 5, 5, 5]
    # Same list on every rank (seeded by `seed`, not by the rank).
    assert torch.equal(shares[1], metric.labels_for_rank(num_classes=5, world_size=3, rank=1))


def test_metric_states_are_summed_across_ranks():
    """With a (fake) 2-rank strategy whose reduce doubles each state, the statistics count both ranks."""
    metric = DistributionMetricCallback(
        every_n_steps=1, num_samples=8, batch_size=4, reference_stats_path="x.npz", effnet_resolution=32
    )
    metric.setup(None, None, "fit")
    reduced = []

    def reduce(tensor, reduce_op):
        reduced.append(reduce_op)
        return tensor * 2

    trainer = SimpleNamespace(world_size=2, global_rank=1, strategy=SimpleNamespace(reduce=reduce))
    module = StubREPAE()
    statistics = metric.sample_statistics(trainer, module)
    assert reduced == ["sum", "sum", "sum"]
    assert statistics.count.item() == 2 * 4  # this rank's share of 8 is 4; doubled by the reduction
    assert [len(labels) for labels, _, _ in module.generate_calls] == [4]


def test_inception_without_weights_fails_at_setup_naming_the_config_key():
    metric = DistributionMetricCallback(
        every_n_steps=1,
        num_samples=8,
        batch_size=4,
        feature_extractor="inception",
        reference_stats_path="ref.npz",
    )
    assert metric.metric_name == "fid"
    with pytest.raises(FileNotFoundError, match="callbacks.fid.inception_weights_path"):
        metric.setup(None, None, "fit")


def test_metric_without_any_reference_is_rejected():
    with pytest.raises(ValueError, match="callbacks.fid.reference_stats_path"):
        DistributionMetricCallback(every_n_steps=1, num_samples=8, batch_size=4)
    with pytest.raises(ValueError, match="feature_extractor"):
        DistributionMetricCallback(
            every_n_steps=1, num_samples=8, batch_size=4, feature_extractor="dinov2", reference_stats_path="x"
        )


def test_loss_curve_is_plotted_and_its_history_survives_resume(tmp_path):
    curve = LossCurveCallback(keys=("sit_loss", "d_loss", "proj_loss"), every_n_steps=2)
    trainer = make_trainer(tmp_path / "first", [curve], max_steps=3)
    trainer.fit(StubREPAE(), datamodule=RandomImages())
    png = os.path.join(trainer.default_root_dir, "loss_curve.png")
    assert os.path.getsize(png) > 0
    with Image.open(png) as image:
        assert image.format == "PNG"

    assert curve.history["sit_loss"]["steps"] == [1, 2, 3]
    assert curve.history["d_loss"]["steps"] == [1, 2, 3]  # logged as d_loss_step (on_step and on_epoch)
    assert curve.history["proj_loss"]["steps"] == []
    # SGD on (w - 1)^2 from w = 0 with lr 0.1: w_k = 1 - 0.8^k, loss_k = 0.8^(2k) before step k+1.
    np.testing.assert_allclose(curve.history["sit_loss"]["values"], [1.0, 0.64, 0.4096], rtol=1e-6)
    np.testing.assert_allclose(curve.history["d_loss"]["values"], [2.0, 1.28, 0.8192], rtol=1e-6)

    checkpoint = str(tmp_path / "step3.ckpt")
    trainer.save_checkpoint(checkpoint)
    resumed_curve = LossCurveCallback(keys=("sit_loss", "d_loss", "proj_loss"), every_n_steps=2)
    resumed = make_trainer(tmp_path / "second", [resumed_curve], max_steps=5)
    resumed.fit(StubREPAE(), datamodule=RandomImages(), ckpt_path=checkpoint)
    assert resumed_curve.history["sit_loss"]["steps"] == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(resumed_curve.history["sit_loss"]["values"][3], 0.8**6, rtol=1e-6)
    assert os.path.exists(os.path.join(resumed.default_root_dir, "loss_curve.png"))

    restored = LossCurveCallback(keys=("sit_loss",))
    restored.load_state_dict(resumed_curve.state_dict())
    assert restored.history == resumed_curve.history


def count_host_reads(monkeypatch) -> list[str]:
    """Record every ``item()``, ``tolist()`` and ``float()`` of a tensor from now on: the host reads
    that would wait for the GPU."""
    reads = []
    for name in ("item", "tolist", "__float__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor, name, lambda tensor, o=original, n=name: reads.append(n) or o(tensor)
        )
    return reads


def test_the_loss_curve_reads_the_logged_values_only_when_it_writes(tmp_path, monkeypatch):
    batches = [  # what the module logged at steps 1 to 5; no d_loss at step 2, a bf16 d_loss from step 3
        {"sit_loss": torch.tensor(1 / 3), "d_loss_step": torch.tensor(0.7)},
        {"sit_loss": torch.tensor(0.25)},
        {"sit_loss": torch.tensor(1 / 7), "d_loss_step": torch.tensor(0.9, dtype=torch.bfloat16)},
        {"sit_loss": torch.tensor(0.125), "d_loss_step": torch.tensor(1.1, dtype=torch.bfloat16)},
        {"sit_loss": torch.tensor(1 / 9), "d_loss_step": torch.tensor(1.3, dtype=torch.bfloat16)},
    ]
    expected = {
        key: {
            "steps": [step for step, logged in enumerate(batches, 1) if f"{key}{suffix}" in logged],
            "values": [float(logged[f"{key}{suffix}"]) for logged in batches if f"{key}{suffix}" in logged],
        }
        for key, suffix in (("sit_loss", ""), ("d_loss", "_step"))
    }
    curve = LossCurveCallback(keys=("sit_loss", "d_loss"), every_n_steps=3)
    trainer = SimpleNamespace(default_root_dir=str(tmp_path), is_global_zero=True)
    reads = count_host_reads(monkeypatch)
    for step, logged in enumerate(batches, 1):
        trainer.callback_metrics = logged
        curve.on_train_batch_end(trainer, SimpleNamespace(step=step), None, None, step - 1)
        for value in logged.values():
            value.add_(100)  # the module's tensors may change after the batch: the recorded values may not
        assert reads == ([] if step < 3 else ["tolist"])  # one read for steps 1-3, when the curve is written
    assert os.path.exists(tmp_path / "loss_curve.png")

    state = curve.state_dict()  # steps 4 and 5, in one more read
    assert reads == ["tolist", "tolist"]
    assert state["history"] == expected and curve.history == expected
    assert all(type(value) is float for series in state["history"].values() for value in series["values"])


def test_the_progress_bar_reads_its_metrics_every_n_batches_and_outside_training(tmp_path, monkeypatch):
    reads = []  # per read of Lightning's progress-bar metrics: the training batches run by then

    def lightning_metrics(bar, trainer, pl_module):
        reads.append(trainer.fit_loop.epoch_loop.total_batch_idx + 1)
        return {"v_num": 0}

    monkeypatch.setattr(RichProgressBar, "get_metrics", lightning_metrics)
    calls = []
    get_metrics = ProgressBar.get_metrics
    monkeypatch.setattr(ProgressBar, "get_metrics", lambda *args: calls.append(1) or get_metrics(*args))
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)  # the bar is drawn on terminals only
    bar = ProgressBar(metrics_every_n_steps=3, keys=["sit_loss", "proj_loss"])
    trainer = make_trainer(tmp_path, [bar], max_steps=7, enable_progress_bar=True)
    trainer.fit(StubREPAE(), datamodule=RandomImages())
    assert len(calls) == 8  # asked at each of the 7 batches and at epoch end...
    assert reads == [1, 3, 6, 7]  # ...read at the first call, every 3 batches, and at the end of training

    # Outside training every call reads; the keys come from callback_metrics (proj_loss was not logged).
    assert bar.get_metrics(trainer, trainer.lightning_module) == {
        "v_num": 0,
        "sit_loss": pytest.approx(0.8**12),
    }
    assert reads == [1, 3, 6, 7, 7]


def test_progress_lines_come_every_n_steps_and_at_the_end_with_the_last_values(tmp_path, caplog):
    caplog.set_level("INFO", logger="repae.callbacks.progress")
    progress = ProgressLog(every_n_steps=3, keys=["sit_loss", "proj_loss"])
    trainer = make_trainer(tmp_path, [progress], max_steps=7)
    trainer.fit(StubREPAE(), datamodule=RandomImages())

    lines = [record.getMessage() for record in caplog.records if record.name == "repae.callbacks.progress"]
    assert [line.split(" |")[0] for line in lines] == ["step 3/7", "step 6/7", "step 7/7"]
    assert all("steps/s" in line and "ETA" in line for line in lines)
    # The final line shows the loss of the last step (SGD lr 0.1 on (w-1)^2 from w=0), not a stale read.
    assert lines[-1].endswith(f"sit_loss {0.8**12:.4g}")
    assert "proj_loss" not in lines[-1]  # a key that was never logged is left out


def test_a_progress_line_reports_the_average_rate_and_the_time_left():
    line = ProgressLog().line(step=30, total=130, seconds=60.0, steps_done=20, values={"sit_loss": 0.1234567})
    assert line == "step 30/130 | 0.333 steps/s | ETA 0:05:00 | sit_loss 0.1235"


def test_the_progress_bar_is_off_when_stdout_is_not_a_terminal(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    bar = ProgressBar(metrics_every_n_steps=3)
    make_trainer(tmp_path, [bar], max_steps=2, enable_progress_bar=True).fit(
        StubREPAE(), datamodule=RandomImages()
    )
    assert bar.is_disabled


def test_the_metric_protocol_is_written_and_a_reference_of_another_resolution_refused(tmp_path):
    reference_path = str(tmp_path / "reference.npz")

    def metric(resolution):
        return DistributionMetricCallback(
            every_n_steps=100,
            num_samples=4,
            batch_size=4,
            reference_stats_path=reference_path,
            reference_from_datamodule_images=8,
            effnet_resolution=resolution,
            mode="ode",
            num_steps=2,
            cfg_scale=1.5,
        )

    trainer = make_trainer(tmp_path, [metric(32)], max_steps=1)
    trainer.fit(StubREPAE(max_train_steps=1), datamodule=RandomImages())
    protocol = json.loads((tmp_path / "fd_effnet_protocol.json").read_text())
    assert protocol["num_samples"] == 4 and protocol["weights"] == "ema"
    assert protocol["sampler"]["cfg_scale"] == 1.5 and protocol["sampler"]["num_steps"] == 2
    assert protocol["feature_extractor"] == "effnet" and protocol["feature_resolution"] == 32
    assert protocol["reference_sha256"] == hashlib.sha256(open(reference_path, "rb").read()).hexdigest()
    with open(os.path.join(trainer.logger.log_dir, "hparams.yaml")) as f:
        assert "fd_effnet_protocol" in f.read()
    with np.load(reference_path) as reference:  # the reference records what made it
        assert str(reference["feature_extractor"]) == "effnet" and int(reference["feature_resolution"]) == 32

    trainer = make_trainer(tmp_path / "other", [metric(64)], max_steps=1)
    with pytest.raises(ValueError, match="made with effnet at 32px, but this evaluation uses effnet at 64px"):
        trainer.fit(StubREPAE(max_train_steps=1), datamodule=RandomImages())


class StubE2E(StubREPAE):
    """The stub with a tiny VAE and a perceptual distance, as an end-to-end REPA-E module has."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.vae = build_vae("f4d4-tiny")
        self.vae_loss = torch.nn.Module()
        self.vae_loss.perceptual = L1Distance()


class L1Distance(torch.nn.Module):
    def forward(self, x, y):
        return (x - y).abs().flatten(1).mean(1)


def test_vae_health_logs_every_listed_metric_and_draws_its_png(tmp_path, monkeypatch):
    monkeypatch.setattr(vae_health_module, "frechet_distance", lambda *stats: 1.5)
    health = VAEHealthCallback(every_n_steps=2, num_images=6, batch_size=4, effnet_resolution=32)
    module = StubE2E()
    trainer = make_trainer(tmp_path, [health], max_steps=4)
    trainer.fit(module, datamodule=RandomImages())
    rows = [row for row in logged_metrics(trainer) if row.get("vae/psnr")]
    assert [int(row["step"]) for row in rows] == [2, 4]
    latent_keys = {f"vae/latent_{kind}_c{c}" for kind in ("mean", "std") for c in range(4)}
    expected = {"vae/rfd_effnet", "vae/psnr", "vae/ssim", "vae/perceptual", "vae/kl", *latent_keys}
    assert expected <= {key for key, value in rows[0].items() if value}
    assert float(rows[0]["vae/rfd_effnet"]) == 1.5 and float(rows[0]["vae/kl"]) > 0
    assert all(float(rows[0][key]) > 0 for key in latent_keys if "std" in key)
    assert (tmp_path / "vae_health.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert health.history["psnr"]["steps"] == [2, 4] and health.images.shape == (6, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert module.vae.training  # the measurement leaves the VAE in the mode training set


class WithHeldOutSplits(RandomImages):
    """RandomImages with a test split, and a validation split too when ``with_val``."""

    def __init__(self, with_val: bool):
        super().__init__()
        generator = torch.Generator().manual_seed(1)
        self.split_images = {
            split: torch.rand(8, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator) * 2 - 1
            for split in ("val", "test")
        }
        if with_val:
            self.val_dataloader = lambda: self.split_loader("val")

    def split_loader(self, split):
        return DataLoader(
            TensorDataset(self.split_images[split], torch.zeros(8, dtype=torch.long)), batch_size=4
        )

    def test_dataloader(self):
        return self.split_loader("test")


@pytest.mark.parametrize("with_val", [True, False], ids=["val", "test"])
def test_vae_health_measures_on_the_validation_split_else_the_test_split_without_a_warning(
    tmp_path, monkeypatch, with_val
):
    monkeypatch.setattr(vae_health_module, "frechet_distance", lambda *stats: 1.5)
    health = VAEHealthCallback(every_n_steps=1, num_images=6, batch_size=4, effnet_resolution=32)
    datamodule = WithHeldOutSplits(with_val)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [health], max_steps=1).fit(StubE2E(), datamodule=datamodule)
    assert not [w for w in caught if "vae_health" in str(w.message)]
    split = "val" if with_val else "test"
    assert torch.equal(health.images, images_to_uint8(datamodule.split_images[split][:6]))


def test_vae_health_measures_on_its_own_dataset_when_given_one(tmp_path, monkeypatch):
    monkeypatch.setattr(vae_health_module, "frechet_distance", lambda *stats: 1.5)
    images = torch.randint(0, 256, (8, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8)
    dataset = [{"image": image} for image in images]
    health = VAEHealthCallback(
        every_n_steps=1, num_images=6, batch_size=4, effnet_resolution=32, dataset=dataset
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [health], max_steps=1).fit(
            StubE2E(), datamodule=WithHeldOutSplits(with_val=True)
        )
    assert not [w for w in caught if "vae_health" in str(w.message)]
    assert torch.equal(health.images, images[:6])  # the dataset's, not the data module's validation split


def test_vae_health_measures_on_the_data_modules_held_out_split(tmp_path, monkeypatch):
    monkeypatch.setattr(vae_health_module, "frechet_distance", lambda *stats: 1.5)
    images = torch.randint(0, 256, (8, 3, IMAGE_SIZE, IMAGE_SIZE), dtype=torch.uint8)
    datamodule = WithHeldOutSplits(with_val=True)
    datamodule.held_out = [{"image": image} for image in images]  # data.held_out, before val and test
    health = VAEHealthCallback(every_n_steps=1, num_images=6, batch_size=4, effnet_resolution=32)
    make_trainer(tmp_path, [health], max_steps=1).fit(StubE2E(), datamodule=datamodule)
    assert torch.equal(health.images, images[:6])


def test_vae_health_without_a_held_out_split_warns_once_that_it_measures_training_images(
    tmp_path, monkeypatch
):
    monkeypatch.setattr(vae_health_module, "frechet_distance", lambda *stats: 1.5)
    health = VAEHealthCallback(every_n_steps=1, num_images=6, batch_size=4, effnet_resolution=32)
    datamodule = RandomImages()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, [health], max_steps=2).fit(StubE2E(), datamodule=datamodule)
    ours = [str(w.message) for w in caught if "vae_health" in str(w.message)]
    assert len(ours) == 1 and "first 6 training images" in ours[0] and "not held-out" in ours[0]
    assert health.history["psnr"]["steps"] == [1, 2]  # two measurements, one warning
    assert torch.equal(health.images, images_to_uint8(datamodule.images[:6]))


def test_vae_health_with_a_missing_inception_file_is_an_error_naming_its_key(tmp_path):
    from repae.callbacks.vae_health import VAEHealthCallback

    with pytest.raises(FileNotFoundError, match="callbacks.vae_health.inception_weights_path"):
        VAEHealthCallback(every_n_steps=10, inception_weights_path=str(tmp_path / "missing.pth"))
