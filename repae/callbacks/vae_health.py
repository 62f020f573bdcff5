"""Watch the VAE that end-to-end training tunes: reconstruction quality and latent statistics over time."""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from matplotlib.figure import Figure
from torch.utils.data import DataLoader, Dataset

from repae.callbacks.run import current_step, run_dir
from repae.callbacks.sampling import _images_of_batch, images_to_uint8
from repae.metrics import EfficientNetFeatures, FeatureStatistics, InceptionFeatures, frechet_distance
from repae.modules.vae import images_to_vae_input
from repae.reconstruction import psnr, ssim

PANELS = ("rfd", "psnr", "ssim", "perceptual", "kl", "latent_mean", "latent_std")


def held_out_loader(datamodule: LightningDataModule | None) -> Iterable | None:
    """The data module's validation loader, else its test loader, else None."""
    if datamodule is None:
        return None
    for hook in ("val_dataloader", "test_dataloader"):
        try:
            return getattr(datamodule, hook)()
        except MisconfigurationException:  # Lightning's default hook: the data module has no such split
            continue
    return None


class VAEHealthCallback(Callback):
    """Every ``every_n_steps`` iterations, measure the VAE on a fixed set of ``num_images`` images.

    The images are the first ``num_images`` of ``dataset`` when given (a dataset of
    ``{"image": uint8 [3,H,W]}`` samples, e.g. a held-out test split, as the FD callback's
    ``reference_dataset``), else of the data module's held-out split: its ``held_out`` dataset
    (``data.held_out``), else its ``val_dataloader()``, else its ``test_dataloader()`` (read once, kept on
    the CPU). A data module with
    neither (``ImageDataModule`` has neither) or none at all leaves only training images, which the VAE
    trains on: the callback then measures the first ``num_images`` of a fresh training loader and warns
    once, at the start of fit, that its numbers are on training images, not held-out ones (and, as a
    training loader starts where the run is, other ones after a resume). Each image is encoded, its
    posterior mean decoded, and logged under ``vae/`` to every logger:

    - ``rfid`` (Inception, when ``inception_weights_path`` is set) or ``rfd_effnet``
      (EfficientNet-Lite0, not comparable to rFID): Fréchet distance of reconstructions to originals;
    - ``psnr``, ``ssim`` (uint8 images, see ``repae.reconstruction``);
    - ``perceptual``: the loss module's perceptual distance (LPIPS, or its EfficientNet stand-in);
    - ``kl``: KL(q(z|x) || N(0, I)) per image;
    - ``latent_mean_c{i}``, ``latent_std_c{i}``: per-channel statistics of posterior samples, what the
      SiT's BatchNorm normalises (a drift here is the latent space changing under the SiT).

    All ranks compute (the VAE may be sharded); rank 0 logs and draws ``filename`` (one panel per
    quantity) in the run directory, next to the loss curve. The history survives resume.
    """

    def __init__(
        self,
        every_n_steps: int,
        num_images: int = 256,
        batch_size: int = 32,
        inception_weights_path: str | None = None,
        effnet_resolution: int = 128,
        seed: int = 0,
        filename: str = "vae_health.png",
        dataset: Dataset | None = None,
    ):
        if every_n_steps <= 0 or num_images < 2 or batch_size <= 0:
            raise ValueError("every_n_steps and batch_size must be positive, num_images >= 2")
        self.every_n_steps = every_n_steps
        self.num_images = num_images
        self.batch_size = batch_size
        self.inception_weights_path = inception_weights_path
        self.effnet_resolution = effnet_resolution
        self.seed = seed
        self.filename = filename
        self.dataset = dataset
        self.use_inception = inception_weights_path is not None
        if self.use_inception and not os.path.isfile(
            inception_weights_path
        ):  # not a silent switch to FD-EffNet
            raise FileNotFoundError(
                f"Inception weights not found at {inception_weights_path!r}: set "
                "callbacks.vae_health.inception_weights_path to torch-fidelity's FID Inception file, or to null "
                "for FD-EffNet"
            )
        self.rfd_name = "rfid" if self.use_inception else "rfd_effnet"
        self.extractor: torch.nn.Module | None = None
        self.held_out_loader: Iterable | None = None
        self.images: torch.Tensor | None = None
        self.history: dict[str, dict[str, list]] = {}

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Chosen here rather than at the first measurement, so that a run without held-out images says
        # so when it starts, not every_n_steps later.
        dataset = self.dataset if self.dataset is not None else getattr(trainer.datamodule, "held_out", None)
        if dataset is not None:
            self.held_out_loader = DataLoader(dataset, batch_size=self.batch_size)
        else:
            self.held_out_loader = held_out_loader(trainer.datamodule)
        if self.held_out_loader is None:
            rank_zero_warn(
                f"vae_health measures the VAE on the first {self.num_images} training images, which the VAE "
                "trains on, not held-out ones: the data module has no validation or test split "
                "(val_dataloader / test_dataloader); set data.held_out (or callbacks.vae_health.dataset) to a held-out dataset"
            )

    def measured_images(self, trainer: Trainer) -> torch.Tensor:
        """The fixed uint8 images [num_images, 3, H, W] (CPU), read once: see the class docstring."""
        if self.images is None:
            loader = self.held_out_loader
            if loader is None:
                datamodule = trainer.datamodule
                loader = datamodule.train_dataloader() if datamodule is not None else trainer.train_dataloader
            images, count = [], 0
            for batch in loader:
                batch_images = images_to_uint8(_images_of_batch(batch)[: self.num_images - count])
                images.append(batch_images.cpu())
                count += batch_images.shape[0]
                if count >= self.num_images:
                    break
            if count < self.num_images:
                raise ValueError(f"vae_health: the data holds only {count} images, fewer than num_images")
            self.images = torch.cat(images)
        return self.images

    def _extractor(self, device: torch.device) -> torch.nn.Module:
        if self.extractor is None:
            if self.use_inception:
                self.extractor = InceptionFeatures(
                    self.inception_weights_path, "callbacks.vae_health.inception_weights_path"
                )
            else:
                self.extractor = EfficientNetFeatures(self.effnet_resolution)
        return self.extractor.to(device).eval()

    @torch.no_grad()
    def measure(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, float]:
        """The metrics of the VAE on the measured images (keys without the ``vae/`` prefix)."""
        vae, device = pl_module.vae, pl_module.device
        perceptual = getattr(getattr(pl_module, "vae_loss", None), "perceptual", None)
        extractor = self._extractor(device)
        originals, reconstructions = (
            FeatureStatistics(extractor.num_features, device=device) for _ in range(2)
        )
        generator = torch.Generator(device=device).manual_seed(self.seed)
        sums = {"psnr": 0.0, "ssim": 0.0, "perceptual": 0.0, "kl": 0.0}
        latent_sum = latent_square_sum = None
        latent_count = 0
        was_training = vae.training
        vae.eval()
        for images in self.measured_images(trainer).split(self.batch_size):
            images = images.to(device)
            x = images_to_vae_input(images)
            posterior = vae.encode(x)
            recon_x = vae.decode(posterior.mode()).float()
            recon = torch.clamp(127.5 * recon_x + 128.0, 0, 255).to(torch.uint8)
            originals.update(extractor(images))
            reconstructions.update(extractor(recon))
            sums["psnr"] += psnr(images, recon).sum().item()
            sums["ssim"] += ssim(images, recon).sum().item()
            sums["kl"] += posterior.kl().sum().item()
            if perceptual is not None:
                sums["perceptual"] += perceptual(x, recon_x.clamp(-1, 1)).float().sum().item()
            z = posterior.sample(generator).double()
            per_channel = z.transpose(0, 1).flatten(1)  # [C, B*h*w]
            latent_sum = per_channel.sum(1) + (0 if latent_sum is None else latent_sum)
            latent_square_sum = per_channel.square().sum(1) + (
                0 if latent_square_sum is None else latent_square_sum
            )
            latent_count += per_channel.shape[1]
        vae.train(was_training)
        count = self.images.shape[0]
        metrics = {self.rfd_name: frechet_distance(*reconstructions.compute(), *originals.compute())}
        metrics.update(
            {key: value / count for key, value in sums.items() if key != "perceptual" or perceptual}
        )
        mean = latent_sum / latent_count
        std = (latent_square_sum / latent_count - mean.square()).clamp_min(0).sqrt()
        for channel, (m, s) in enumerate(zip(mean.tolist(), std.tolist(), strict=True)):
            metrics[f"latent_mean_c{channel}"], metrics[f"latent_std_c{channel}"] = m, s
        return metrics

    def plot(self, path: str) -> None:
        """One panel per quantity (all latent channels together) against the step."""
        figure = Figure(figsize=(7, 2.0 * len(PANELS)), layout="constrained")
        axes = figure.subplots(len(PANELS), 1, sharex=True, squeeze=False)[:, 0]
        for ax, panel in zip(axes, PANELS, strict=True):
            key = self.rfd_name if panel == "rfd" else panel
            for name, series in self.history.items():
                if name == key or (panel.startswith("latent_") and name.startswith(panel + "_c")):
                    ax.plot(series["steps"], series["values"], linewidth=1, marker=".")
            ax.set_ylabel(key)
            ax.grid(alpha=0.3)
        axes[-1].set_xlabel("step")
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        figure.savefig(path, dpi=100)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = current_step(pl_module)
        if step % self.every_n_steps != 0:
            return
        metrics = self.measure(trainer, pl_module)
        if not trainer.is_global_zero:
            return
        for key, value in metrics.items():
            series = self.history.setdefault(key, {"steps": [], "values": []})
            series["steps"].append(step)
            series["values"].append(value)
        for logger in trainer.loggers:
            logger.log_metrics({f"vae/{key}": value for key, value in metrics.items()}, step=step)
        self.plot(os.path.join(run_dir(trainer), self.filename))

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = {key: dict(series) for key, series in state_dict["history"].items()}
