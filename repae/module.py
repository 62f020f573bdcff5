"""The REPA-E LightningModule: SiT, VAE and discriminator trained together with manual optimization.

One training step (end-to-end mode, reference §7.2):
  1. encoder features of the raw uint8 batch, no grad;
  2. VAE forward -> posterior, z (reparameterised), recon;
  3. VAE loss = regularisation loss (generator mode) + vae_align_proj_coeff * REPA loss from an
     ``align_only`` pass through the SiT with detached SiT parameters and the SiT in eval mode
     (BN running stats, no label dropout); that pass draws t and noise;
  4. discriminator loss on the detached recon;
  5. SiT loss = mean denoising loss + proj_coeff * REPA loss on detached z, same t and noise,
     SiT in train mode;
  6. each loss is backpropagated into its own parameter set as soon as it is formed (so only one
     pass's activations are alive at a time), gradients are clipped per set, and the three AdamW
     steps run at the end, only if every gradient is finite; then the EMA is updated
     (``repae.optim_step.JointStep``).

The official code steps each optimizer right after its backward. None of the three passes reads
parameters another optimizer has just changed (the SiT pass takes z and the D pass recon from
before the VAE update in the official code too), so stepping all three at the end computes the
same update, and it lets a non-finite loss skip all three updates together.

LDM-only mode (reference §8): frozen VAE in eval mode (no optimizer), SiT BN fixed in eval mode
with the latents-stats file, latents encoded on the fly or read from a latent cache.

VAE-only mode (VAE pre-training): the VAE and discriminator losses of step 3-4 alone; no SiT, no
encoders. A BatchNorm (``latents_bn``) follows the latents, and the VAE extraction reads the latents
stats from it as it reads them from the EMA SiT's, so a pre-trained VAE is extracted like an E2E-VAE.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from functools import cached_property, partial
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
from lightning.pytorch.utilities import rank_zero_warn

from repae.config import build_model, to_plain
from repae.kernels import use_fast_kernels
from repae.modules.ema import EMAUpdate, make_ema, update_ema
from repae.modules.encoders import build_encoders
from repae.modules.losses import call_with_frozen_parameters
from repae.modules.samplers import generate_images
from repae.modules.sit import GlobalBatchNorm2d
from repae.modules.state_dict import check_state_dict
from repae.modules.vae import DiagonalGaussianDistribution, images_to_vae_input, load_vae_weights
from repae.optim_step import JointStep
from repae.safe_load import load_weights_only

MODES = ("e2e", "ldm_only", "vae_only")


def load_latents_stats(path: str) -> dict[str, torch.Tensor]:
    """Read a ``{vae}-latents-stats.pt`` file: {"latents_scale", "latents_bias"} of [1,C,1,1]."""
    try:
        stats = load_weights_only(path, "model.latents_stats_path")
    except FileNotFoundError:
        raise FileNotFoundError(
            f"latents-stats file not found: {path}. Set model.latents_stats_path to the "
            "'<vae>-latents-stats.pt' file released with the VAE (or written by repae's VAE extraction)."
        ) from None
    if not isinstance(stats, Mapping) or not {"latents_scale", "latents_bias"} <= set(stats):
        raise ValueError(f"{path} is not a latents-stats file: expected keys latents_scale and latents_bias")
    return stats


def rng_state() -> dict[str, Any]:
    """This process's torch RNG states (CPU and, if used, CUDA): t and noise are drawn from them."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def inductor_options(key: str, options: Mapping | None) -> dict:
    """``options`` (the config's ``model.<key>``) as a dict, every name checked against inductor's."""
    options = dict(to_plain(options) or {})
    if options:  # checked only then: listing the options imports inductor (seconds)
        unknown = sorted(set(options) - set(torch._inductor.list_options()))
        if unknown:
            raise ValueError(
                f"model.{key}: unknown inductor option(s) {unknown}; the names are those of "
                "torch._inductor.list_options()"
            )
    return options


class REPAE(pl.LightningModule):
    """REPA-E training system. Sub-models are given as Hydra configs (``_target_`` dicts) so a
    checkpoint's hyperparameters alone rebuild the architecture.

    Args:
        sit, vae, encoder, loss: configs of the SiT (``build_sit``), the VAE (``build_vae``), the
            alignment encoders (``build_encoders``) and the VAE regularisation loss (which holds
            the discriminator and the perceptual loss; unused in ``ldm_only`` mode).
        mode: ``e2e`` (REPA-E), ``ldm_only`` (frozen VAE) or ``vae_only`` (VAE pre-training).
        proj_coeff: REPA weight in the SiT loss. vae_align_proj_coeff: REPA weight in the VAE loss.
        vae_denoising_coeff: weight of the denoising loss that reaches the VAE through the frozen
            SiT, as the REPA loss does (e2e). An ablation (the paper's naive end-to-end tuning),
            never a default: 0 is the official stop-gradient.
        optimizer: AdamW settings with the official names (learning_rate, vae_learning_rate,
            disc_learning_rate, adam_beta1, adam_beta2, adam_weight_decay, adam_epsilon).
        max_grad_norm: clip norm, applied separately to each parameter set.
        ema_decay: decay of the SiT EMA.
        max_train_steps: training stops after this many steps (one batch = one step).
        max_consecutive_nonfinite: this many skipped steps in a row stop the run with an error
            (with fused optimizers, checked every that many steps: see ``repae.optim_step``).
        vae_weights_path, latents_stats_path, discriminator_weights_path: pretrained files loaded
            by ``load_pretrained`` when a run starts (not when it resumes).
        sampling: defaults for ``generate`` (mode, num_steps, cfg_scale, guidance interval, ...).
        compile: torch.compile the SiT, the VAE, the encoders and the loss networks in place.
        compile_options: inductor options for those compilations (``torch.compile(options=...)``,
            names as in ``torch._inductor.list_options()``), e.g. ``coordinate_descent_tuning``.
            ``triton.cudagraphs`` (CUDA graphs over each compiled network) is for ``ldm_only`` only:
            the e2e step's backward passes end graph generations whose outputs it still uses.
        vae_compile_options: inductor options for the VAE's compilation alone, over
            ``compile_options``: an option that pays for the VAE's convolutional graphs but would
            lengthen every network's compile (coordinate descent tuning) can be given to it alone.
        channels_last: keep the convolutional networks (VAE, discriminator, perceptual network) and
            their image inputs in NHWC memory format, which cuDNN's bf16 convolutions use natively
            (otherwise it converts every activation both ways). Same numbers, another layout.
        fast_kernels: run the VAE with the fast forms of its modules (``repae.kernels``: fused
            channels_last GroupNorm + swish, the upsampling as one transposed convolution, ...),
            swapped in at ``setup``. Same parameters, same function up to rounding.
    """

    def __init__(
        self,
        sit: Mapping,
        vae: Mapping,
        encoder: Mapping,
        loss: Mapping | None = None,
        mode: str = "e2e",
        proj_coeff: float = 0.5,
        vae_align_proj_coeff: float = 1.5,
        vae_denoising_coeff: float = 0.0,
        optimizer: Mapping | None = None,
        max_grad_norm: float = 1.0,
        ema_decay: float = 0.9999,
        max_train_steps: int = 400_000,
        max_consecutive_nonfinite: int = 10,
        vae_weights_path: str | None = None,
        latents_stats_path: str | None = None,
        discriminator_weights_path: str | None = None,
        sampling: Mapping | None = None,
        compile: bool = False,
        compile_options: Mapping | None = None,
        vae_compile_options: Mapping | None = None,
        channels_last: bool = False,
        fast_kernels: bool = False,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown model.mode {mode!r}; choose one of {MODES}")
        self.save_hyperparameters(
            to_plain({key: value for key, value in locals().items() if key not in ("self", "__class__")})
        )
        self.automatic_optimization = False
        self.mode = mode
        self.proj_coeff = proj_coeff
        self.vae_align_proj_coeff = vae_align_proj_coeff
        self.vae_denoising_coeff = vae_denoising_coeff
        self.optimizer_config = dict(to_plain(optimizer) or {})
        self.max_grad_norm = max_grad_norm
        self.ema_decay = ema_decay
        self.max_train_steps = max_train_steps
        self.max_consecutive_nonfinite = max_consecutive_nonfinite
        self.sampling_defaults = dict(to_plain(sampling) or {})
        self.compile_models = compile
        self.compile_options = inductor_options("compile_options", compile_options)
        self.vae_compile_options = {
            **self.compile_options,
            **inductor_options("vae_compile_options", vae_compile_options),
        }
        # Inductor's options (and its environment variable) act only on compiled models.
        self.cuda_graphs = compile and (
            os.environ.get("TORCHINDUCTOR_CUDAGRAPHS") == "1"
            or any(
                options.get("triton.cudagraphs")
                for options in (self.compile_options, self.vae_compile_options)
            )
        )
        if self.cuda_graphs and mode != "ldm_only":
            raise ValueError(
                f"CUDA graphs (triton.cudagraphs in model.compile_options or model.vae_compile_options, or "
                f"TORCHINDUCTOR_CUDAGRAPHS=1) work in mode ldm_only only, not {mode}: that step's backward "
                "passes end CUDA-graph generations whose outputs it still uses"
            )
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.fast_kernels = fast_kernels

        # Built (and registered) in this order: it sets the order of the random initialisations and
        # of the parameters, which DDP's gradient buckets follow.
        self.encoders = build_encoders(**to_plain(encoder)) if mode != "vae_only" else nn.ModuleList()
        self.vae = build_model(to_plain(vae), "model.vae")
        if mode == "vae_only":  # no SiT: the latents' BatchNorm alone, for the extracted latents stats
            self.sit = self.ema = None
            self.latents_bn = GlobalBatchNorm2d(self.vae.latent_channels, eps=1e-4, affine=False)
        else:
            self.sit = build_model(to_plain(sit), "model.sit", z_dims=[e.embed_dim for e in self.encoders])
            self.ema = make_ema(self.sit)
        self.ema_update: EMAUpdate | None = None  # made in on_train_start, for the SiT the strategy holds
        self.vae_loss = build_model(to_plain(loss), "model.loss") if mode != "ldm_only" else None
        if mode == "ldm_only":
            self.vae.requires_grad_(False).eval()
        if self.sit is not None and self.vae.latent_channels != self.sit.in_channels:
            raise ValueError(
                f"model.sit.in_channels={self.sit.in_channels}, but the VAE makes {self.vae.latent_channels}-channel "
                "latents: set model.sit.in_channels (and input_size) to match model.vae"
            )

        # The step counter: one batch = one step, whatever Lightning's global_step does with three
        # optimizers. Checkpointed as a buffer; mirrored as a Python int so reading it never waits
        # for the GPU.
        self.register_buffer("train_step", torch.zeros((), dtype=torch.long))
        self._step = 0
        self.register_buffer("nonfinite_steps", torch.zeros((), dtype=torch.long))
        self.grad_scalers: list[torch.amp.GradScaler] | None = None
        self.joint_step: JointStep | None = None  # made in on_train_start, for the optimizers
        self.rng_states_to_restore: list[dict[str, Any]] | None = None

    # --- set-up -------------------------------------------------------------------------------
    @property
    def step(self) -> int:
        return self._step

    @property
    def num_classes(self) -> int:
        return self.sit.num_classes

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return self.sit.latent_shape

    @property
    def token_grid(self) -> int:
        return self.sit.input_size // self.sit.patch_size

    def load_pretrained(self) -> None:
        """Load the pretrained VAE, latent statistics and discriminator named in the config, then
        re-sync the EMA (as the official ``update_ema(decay=0)`` before training)."""
        hp = self.hparams
        if hp.vae_weights_path:
            load_vae_weights(self.vae, hp.vae_weights_path)
        if hp.latents_stats_path and self.sit is not None:
            self.sit.init_bn(**load_latents_stats(hp.latents_stats_path))
        elif self.mode == "ldm_only":
            raise ValueError(
                "ldm_only mode needs model.latents_stats_path: the SiT's fixed latent normalisation"
            )
        if hp.discriminator_weights_path and self.vae_loss is not None:
            from repae.modules.discriminator import load_discriminator_weights

            load_discriminator_weights(self.vae_loss.discriminator, hp.discriminator_weights_path)
        if self.sit is not None:
            update_ema(self.ema, self.sit, decay=0.0)

    def setup(self, stage: str) -> None:
        # 16-mixed: Lightning's single GradScaler would clip scaled gradients in manual mode and update
        # its scale between our three steps; we keep one scaler per optimizer and unscale before clipping.
        plugin = self.trainer.precision_plugin
        if getattr(plugin, "scaler", None) is not None:
            device = plugin.device if hasattr(plugin, "device") else "cuda"
            self.grad_scalers = [torch.amp.GradScaler(device) for _ in self.parameter_groups]
            plugin.scaler = None
        if self.fast_kernels:
            use_fast_kernels(self.vae)
        convolutional = [self.vae, *([self.vae_loss] if self.vae_loss else [])]
        if self.memory_format is torch.channels_last:
            for module in convolutional:
                module.to(memory_format=torch.channels_last)
        if self.compile_models and stage == "fit":
            for module in [*([self.sit] if self.sit else []), *self.encoders, *convolutional]:
                options = self.vae_compile_options if module is self.vae else self.compile_options
                module.compile(options=options or None)

    @cached_property
    def parameter_groups(self) -> list[tuple[str, list[nn.Parameter], float]]:
        """(name, parameters, learning rate) per optimizer, in optimizer order."""
        config = self.optimizer_config
        groups = []
        if self.sit is not None:
            groups.append(
                ("sit", [p for p in self.sit.parameters() if p.requires_grad], config["learning_rate"])
            )
        if self.mode != "ldm_only":
            groups.append(("vae", list(self.vae.parameters()), config["vae_learning_rate"]))
            groups.append(
                (
                    "disc",
                    list(self.vae_loss.discriminator.parameters()),
                    config["disc_learning_rate"],
                )
            )
        return groups

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        config = self.optimizer_config
        return [
            torch.optim.AdamW(
                params,
                lr=lr,
                betas=(config["adam_beta1"], config["adam_beta2"]),
                weight_decay=config["adam_weight_decay"],
                eps=config["adam_epsilon"],
                foreach=config.get("foreach", None),
                fused=config.get("fused", None),
            )
            for _, params, lr in self.parameter_groups
        ]

    # --- training -----------------------------------------------------------------------------
    def encode_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            features = [encoder(images, grid_size=self.token_grid) for encoder in self.encoders]
        if self.cuda_graphs:
            # A graph replayed without grad returns memory of its pool, which the SiT's graph reuses
            # before the REPA loss reads these features.
            features = [f.clone() for f in features]
        return features

    def check_batch(self, images: torch.Tensor) -> None:
        """Images must decode to the SiT's latent grid: size = latent size x VAE downsampling."""
        factor = self.vae.downsample_factor
        size = self.sit.input_size * factor
        if tuple(images.shape[-2:]) != (size, size):
            raise ValueError(
                f"the data gives {tuple(images.shape[-2:])} images, but model.sit.input_size="
                f"{self.sit.input_size} with a {factor}x downsampling VAE needs {size}x{size}: the image size "
                f"must be a multiple of {factor} and equal input_size * {factor}"
            )

    def vae_input(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images [B,3,H,W] -> the VAE's input in [-1, 1], in the configured memory format."""
        return images_to_vae_input(images).contiguous(memory_format=self.memory_format)

    @cached_property
    def step_buffers(self) -> list[torch.Tensor]:
        """Buffers a training step changes in its forward passes (BN running stats of the SiT and
        the discriminator, LeCam EMAs): a skipped step restores them."""
        frozen = ("encoders.", "vae_loss.perceptual.", "ema.", "train_step", "nonfinite_steps")
        return [buffer for name, buffer in self.named_buffers() if not name.startswith(frozen)]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch["image"], batch["label"]
        if self.sit is not None:
            self.check_batch(images)
        self.joint_step.begin()
        if self.mode == "e2e":
            logs = self._e2e_losses(images, labels, self.joint_step.backward)
        elif self.mode == "vae_only":
            logs = self._vae_only_losses(images, self.joint_step.backward)
        else:
            logs = self._ldm_only_losses(batch, images, labels, self.joint_step.backward)
        logs |= self.joint_step.check_gradients()
        logs.update(
            # torch.full launches a fill; Lightning would copy a Python float over and wait for the GPU
            step=torch.full((), float(self.step + 1), device=self.device),
            epoch=torch.full((), float(self.current_epoch), device=self.device),
        )
        # Logged before the joint step may wait for the GPU, so Lightning's per-metric bookkeeping
        # (several ms of CPU a step) runs while the GPU is still busy with the backward passes. Not
        # prog_bar: Lightning reads those on the host after every batch, waiting for the GPU; the
        # progress bar (repae.callbacks.progress.ProgressBar) shows the losses every few steps.
        self.log_dict(logs, on_step=True, batch_size=images.shape[0])
        self.joint_step.step(self.step + 1)
        self.train_step += 1
        self._step += 1

    def _e2e_losses(
        self, images, labels, backward: Callable[[str, torch.Tensor], None]
    ) -> dict[str, torch.Tensor]:
        """The three losses of an end-to-end step, each handed to ``backward(name, loss)`` as soon as
        it is formed, so only one pass's activations are alive at a time. Returns the logs."""
        x = self.vae_input(images)
        self.vae.train()
        posterior, z, recon = self.vae(x)
        # The encoders' features after the VAE's forward is queued: their many small kernels are
        # then launched while the GPU runs the VAE's large ones, instead of at the step start,
        # where the GPU would wait for the host to launch them.
        zs = self.encode_features(images)
        gan_factor = self.vae_loss.factor(self.step)
        reg_loss, reg_logs = self.vae_loss(x, recon, posterior, gan_factor, mode="generator")
        # Frozen-SiT pass: eval mode (BN running stats, no label dropout), detached parameters.
        self.sit.eval()
        scale_logs = self._latent_scale_logs(z)
        align = call_with_frozen_parameters(
            self.sit,
            z,
            labels,
            zs,
            align_only=not self.vae_denoising_coeff,
            time_input=self._training_times(z),
        )
        vae_align_loss = align["proj_loss"]
        vae_total_loss = reg_loss + self.vae_align_proj_coeff * vae_align_loss
        ablation_logs = {}
        if self.vae_denoising_coeff:
            vae_denoising_loss = align["denoising_loss"].mean()
            vae_total_loss = vae_total_loss + self.vae_denoising_coeff * vae_denoising_loss
            ablation_logs["vae_denoising_loss"] = vae_denoising_loss
        backward("vae", vae_total_loss)

        d_loss, d_logs = self.vae_loss(x, recon, posterior, gan_factor, mode="discriminator")
        backward("disc", d_loss)

        self.sit.train()
        out = self.sit(z.detach(), labels, zs, time_input=align["time_input"], noises=align["noises"])
        denoising_loss = out["denoising_loss"].mean()
        sit_loss = denoising_loss + self.proj_coeff * out["proj_loss"]
        backward("sit", sit_loss)
        return {
            "sit_loss": sit_loss,
            "denoising_loss": denoising_loss,
            "proj_loss": out["proj_loss"],
            "vae_loss": vae_total_loss,
            "vae_align_loss": vae_align_loss,
            "d_loss": d_loss,
            **ablation_logs,
            **scale_logs,
            **{key: value for key, value in reg_logs.items() if key != "total_loss"},
            **{key: value for key, value in d_logs.items() if key != "discriminator_loss"},
        }

    @torch.no_grad()
    def _latent_scale_logs(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """The latents' spread as the frozen-SiT pass sees it: ``latent_std``, the std of this rank's
        sampled latents [N, C, h, w] per channel, averaged over channels, and
        ``latent_std_over_running``, per channel over what that pass divides by (the BatchNorm's
        running std, with its eps), averaged. The REPA loss that reaches the VAE pulls the spread up
        (docs/reproduction.md, "Investigation")."""
        std = z.float().std(dim=(0, 2, 3))
        bn = self.sit.bn
        return {
            "latent_std": std.mean(),
            "latent_std_over_running": (std * (bn.running_var + bn.eps).rsqrt()).mean(),
        }

    def _vae_only_losses(
        self, images, backward: Callable[[str, torch.Tensor], None]
    ) -> dict[str, torch.Tensor]:
        """The VAE and discriminator losses of an end-to-end step, without the SiT; ``latents_bn``
        follows the latents (no gradient) for the extraction's latents stats."""
        x = self.vae_input(images)
        self.vae.train()
        posterior, z, recon = self.vae(x)
        with torch.no_grad():
            self.latents_bn.train()(z.float())
        gan_factor = self.vae_loss.factor(self.step)
        vae_loss, reg_logs = self.vae_loss(x, recon, posterior, gan_factor, mode="generator")
        backward("vae", vae_loss)
        d_loss, d_logs = self.vae_loss(x, recon, posterior, gan_factor, mode="discriminator")
        backward("disc", d_loss)
        return {
            "vae_loss": vae_loss,
            "d_loss": d_loss,
            **{key: value for key, value in reg_logs.items() if key != "total_loss"},
            **{key: value for key, value in d_logs.items() if key != "discriminator_loss"},
        }

    def _training_times(self, latents: torch.Tensor) -> torch.Tensor:
        """This step's t [B,1,1,1], drawn on the CPU generator as the official code (seeds match) and
        copied to the latents' device without waiting: the SiT would draw the same, but inside its
        compiled graph the copy waits for all queued GPU work, and the GPU then idles while the host
        catches up. The copy is from pinned memory because CUDA makes a copy from pageable memory
        wait for the stream too (the H100 profile of the LDM-only step showed that wait)."""
        times = self.sit.sample_time(latents.shape[0])
        if latents.is_cuda:
            times = times.pin_memory()
        return times.to(latents.device, non_blocking=True)

    def _ldm_only_latents(self, batch, images) -> torch.Tensor:
        with torch.no_grad():
            if "latent" in batch:
                return DiagonalGaussianDistribution.from_mean_std(batch["latent"].float()).sample()
            return self.vae.encode(self.vae_input(images)).sample()

    def _ldm_only_losses(self, batch, images, labels, backward) -> dict[str, torch.Tensor]:
        z = self._ldm_only_latents(batch, images)
        zs = self.encode_features(images)  # after the VAE's encoder, as in _e2e_losses
        self.sit.train()
        self.sit.bn.eval()  # fixed per-channel normalisation from the latents-stats file
        out = self.sit(z, labels, zs, time_input=self._training_times(z))
        denoising_loss = out["denoising_loss"].mean()
        sit_loss = denoising_loss + self.proj_coeff * out["proj_loss"]
        backward("sit", sit_loss)
        return {"sit_loss": sit_loss, "denoising_loss": denoising_loss, "proj_loss": out["proj_loss"]}

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.step >= self.max_train_steps:
            self.trainer.should_stop = True

    # --- checkpoints --------------------------------------------------------------------------
    def _frozen_prefixes(self) -> tuple[str, ...]:
        """Submodules rebuilt from their own weight files, kept out of checkpoints."""
        return ("encoders.", "vae_loss.perceptual.")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        prefixes = self._frozen_prefixes()
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(prefixes)
        }
        if self.grad_scalers:
            checkpoint["grad_scalers"] = [scaler.state_dict() for scaler in self.grad_scalers]
        # Every rank's RNG state, so a resumed run draws the same t, noise and label dropout.
        states = [rng_state()]
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            states = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, rng_state())
        checkpoint["rng_states"] = states

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        prefixes = self._frozen_prefixes()
        own = self.state_dict()
        checkpoint["state_dict"].update({k: v for k, v in own.items() if k.startswith(prefixes)})
        what = "the checkpoint does not match the configured model (was it written by another experiment?)"
        check_state_dict(own, checkpoint["state_dict"], what)
        self._step = int(checkpoint["state_dict"]["train_step"])
        if self.grad_scalers and "grad_scalers" in checkpoint:
            for scaler, state in zip(self.grad_scalers, checkpoint["grad_scalers"], strict=True):
                scaler.load_state_dict(state)
        self.rng_states_to_restore = checkpoint.get("rng_states")

    def on_train_start(self) -> None:
        if self.step >= self.max_train_steps:  # re-running a finished run: nothing to do
            self.trainer.should_stop = True
        # Here, once the strategy has wrapped (or sharded) the SiT and made the optimizers, and a
        # checkpoint was loaded into them.
        if self.sit is not None:
            self.ema_update = EMAUpdate(self.ema, self.sit, compile=self.compile_models)
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        self.joint_step = JointStep(
            {
                name: optimizer
                for (name, _, _), optimizer in zip(self.parameter_groups, optimizers, strict=True)
            },
            backward=self.manual_backward,
            ema_update=partial(self.ema_update, self.ema_decay) if self.ema_update else None,
            step_buffers=self.step_buffers,
            nonfinite_steps=self.nonfinite_steps,
            max_grad_norm=self.max_grad_norm,
            max_consecutive_nonfinite=self.max_consecutive_nonfinite,
            scalers=self.grad_scalers,
        )
        # After the per-rank reseeding, which would otherwise restart the random streams.
        states = self.rng_states_to_restore
        if states and len(states) == self.trainer.world_size:
            set_rng_state(states[self.global_rank])
        elif states:
            rank_zero_warn(
                f"the checkpoint holds the RNG states of {len(states)} processes, this run has "
                f"{self.trainer.world_size}: random streams restart from the seed, so the run continues "
                "correctly but not bit-identically to an uninterrupted one"
            )
        self.rng_states_to_restore = None

    # --- sampling -----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self, labels: torch.Tensor, noise: torch.Tensor, use_ema: bool = True, **sampler_kwargs
    ) -> torch.Tensor:
        """Sample images for ``labels`` [B] from ``noise`` [B,C,h,w] -> uint8 [B,3,H,W] with the (EMA)
        SiT and the VAE; ``model.sampling`` gives the defaults (see ``generate_images``).

        Raises:
            ValueError: a ``vae_only`` model, which has no SiT to sample with.
        """
        if self.sit is None:
            raise ValueError(
                "model.mode=vae_only: a vae_only model has no SiT, so it has nothing to sample. Extract its "
                "VAE (python -m repae.convert extract-vae <checkpoint> --name NAME) and train a SiT on it "
                "(model.mode=e2e or ldm_only)."
            )
        return generate_images(
            self.ema if use_ema else self.sit,
            self.vae,
            labels,
            noise,
            **{**self.sampling_defaults, **sampler_kwargs},
        )
