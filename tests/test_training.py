"""Behaviour of the REPA-E training step, LDM-only mode, checkpoints and resume (tiny CPU runs)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from repae.config import to_plain
from repae.module import REPAE
from repae.modules.sit import SiT
from repae.train import instantiate_dict, train


def build(cfg) -> REPAE:
    torch.manual_seed(0)
    model = instantiate(to_plain(cfg.model), _recursive_=False)
    model.load_pretrained()
    return model


def fit(cfg, model: REPAE):
    """Train ``model`` with the entry point's trainer and callbacks from ``cfg`` (no logger)."""
    trainer = instantiate(cfg.trainer, callbacks=instantiate_dict(cfg.callbacks), logger=False)
    trainer.fit(model, datamodule=instantiate(cfg.data))
    return trainer


def a_batch(batch_size=4, num_classes=10):
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (batch_size, 3, 32, 32), dtype=torch.uint8, generator=generator)
    return {"image": images, "label": torch.randint(0, num_classes, (batch_size,), generator=generator)}


def logged_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def loss_trace(run_dir: Path, key: str = "sit_loss") -> dict[int, float]:
    return {int(float(row["step"])): float(row[key]) for row in logged_rows(run_dir) if row.get(key)}


def backward_only(wanted):
    """A backward hook for ``_e2e_losses`` that backpropagates the named loss alone."""
    return lambda name, loss: loss.backward() if name == wanted else None


def test_vae_receives_no_gradient_from_the_denoising_loss(tiny_config):
    model = build(tiny_config())
    model._e2e_losses(*_inputs(model), backward_only("sit"))
    assert all(p.grad is None for p in model.vae.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.sit.parameters())


def test_vae_pass_leaves_sit_weights_gradients_and_optimizer_state_untouched(tiny_config):
    model = build(tiny_config())
    opt_sit, opt_vae, _ = model.configure_optimizers()
    sit_before = {k: v.clone() for k, v in model.sit.state_dict().items()}
    model._e2e_losses(*_inputs(model), backward_only("vae"))
    assert all(p.grad is None for p in model.sit.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.vae.encoder.parameters())
    opt_vae.step()
    assert opt_sit.state == {}
    for key, value in model.sit.state_dict().items():
        if not key.startswith("bn."):  # BN running stats move in the SiT pass, checked below
            assert torch.equal(value, sit_before[key]), key
    assert all(p.requires_grad == (n != "pos_embed") for n, p in model.sit.named_parameters())


def test_discriminator_loss_reaches_only_the_discriminator(tiny_config):
    model = build(tiny_config())
    model._e2e_losses(*_inputs(model), backward_only("disc"))
    assert all(p.grad is None for p in [*model.vae.parameters(), *model.sit.parameters()])
    assert any(p.grad is not None for p in model.vae_loss.discriminator.parameters())


def test_sit_and_vae_passes_share_time_and_noise_and_differ_in_bn_mode(tiny_config, monkeypatch):
    model = build(tiny_config())
    calls = []
    original_forward = SiT.forward

    def recording_forward(self, *args, **kwargs):
        out = original_forward(self, *args, **kwargs)
        calls.append(
            {
                "training": self.training,
                "bn_training": self.bn.training,
                "label_dropout": self.y_embedder.training,
                **out,
            }
        )
        return out

    monkeypatch.setattr(SiT, "forward", recording_forward)
    model._e2e_losses(*_inputs(model), backward_only(None))
    align, denoise = calls
    assert torch.equal(align["time_input"], denoise["time_input"])
    assert torch.equal(align["noises"], denoise["noises"])
    assert (align["bn_training"], align["label_dropout"]) == (False, False)
    assert (denoise["bn_training"], denoise["label_dropout"]) == (True, True)


def test_an_end_to_end_step_logs_its_latents_scale_against_the_running_std_the_vae_pass_divides_by(
    tiny_config, monkeypatch
):
    model = build(tiny_config())
    model.sit.bn.running_var.fill_(0.25)
    running_std_seen_by_the_vae_pass = (model.sit.bn.running_var + model.sit.bn.eps).sqrt().clone()
    latents = []
    original_forward = SiT.forward

    def recording_forward(self, x, *args, **kwargs):
        latents.append(x.detach().clone())
        return original_forward(self, x, *args, **kwargs)

    monkeypatch.setattr(SiT, "forward", recording_forward)
    logs = model._e2e_losses(*_inputs(model), backward_only(None))
    std = latents[0].std(dim=(0, 2, 3))
    torch.testing.assert_close(logs["latent_std"], std.mean())
    torch.testing.assert_close(
        logs["latent_std_over_running"], (std / running_std_seen_by_the_vae_pass).mean()
    )
    assert not torch.equal(model.sit.bn.running_var, torch.full_like(model.sit.bn.running_var, 0.25))


def test_bn_running_stats_move_only_in_the_sit_pass(tiny_config, monkeypatch):
    model = build(tiny_config())
    images, labels = _inputs(model)
    stats = []
    model.sit.bn.register_forward_hook(
        lambda module, *_: stats.append((module.training, module.num_batches_tracked.item()))
    )
    model._e2e_losses(images, labels, backward_only(None))
    assert stats == [(False, 0), (True, 1)]


def test_training_logs_official_metric_names_and_stops_at_max_train_steps(tiny_config):
    cfg = tiny_config()
    train(cfg)
    rows = logged_rows(Path(cfg.paths.output_dir))
    logged = {key for row in rows for key, value in row.items() if value}
    expected = {
        "sit_loss",
        "denoising_loss",
        "proj_loss",
        "grad_norm_sit",
        "vae_loss",
        "reconstruction_loss",
        "perceptual_loss",
        "kl_loss",
        "weighted_gan_loss",
        "discriminator_factor",
        "gan_loss",
        "d_weight",
        "grad_norm_vae",
        "vae_align_loss",
        "d_loss",
        "grad_norm_disc",
        "logits_real",
        "logits_fake",
        "lecam_loss",
        "latent_std",
        "latent_std_over_running",
        "epoch",
    }
    assert expected <= logged
    assert sorted(loss_trace(Path(cfg.paths.output_dir))) == [1, 2, 3]
    checkpoint = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["state_dict"]["train_step"] == 3
    assert len(checkpoint["optimizer_states"]) == 3
    assert not any(key.startswith(("encoders.", "vae_loss.perceptual.")) for key in checkpoint["state_dict"])
    assert {
        "sit.bn.running_mean",
        "ema.bn.running_var",
        "vae.quant_conv.weight",
        "vae_loss.discriminator.main.0.weight",
    } <= set(checkpoint["state_dict"])


@pytest.mark.parametrize("fused", ["false", "true"])  # true: the EMA update decided on the device
def test_ema_follows_its_formula(tiny_config, fused):
    cfg = tiny_config("model.ema_decay=0.5", "model.max_train_steps=1", f"model.optimizer.fused={fused}")
    model = build(cfg)
    initial = {k: v.clone() for k, v in model.sit.state_dict().items()}
    assert all(torch.equal(initial[k], v) for k, v in model.ema.state_dict().items())
    fit(cfg, model)
    for key, ema_value in model.ema.state_dict().items():
        if ema_value.is_floating_point():
            expected = 0.5 * initial[key] + 0.5 * model.sit.state_dict()[key]
            torch.testing.assert_close(ema_value, expected, msg=key)


@pytest.mark.parametrize("fused", ["false", "true"])  # true: clipped inside fused AdamW (grad_scale)
def test_each_parameter_set_is_updated_with_gradients_clipped_to_max_grad_norm(tiny_config, fused):
    max_norm = 1e-3  # far below the gradient norms of an untrained model
    cfg = tiny_config(
        "model.max_train_steps=1", f"model.max_grad_norm={max_norm}", f"model.optimizer.fused={fused}"
    )
    model = build(cfg)
    trainer = fit(cfg, model)
    beta1 = cfg.model.optimizer.adam_beta1
    for name, optimizer in zip(["sit", "vae", "disc"], model.optimizers(), strict=True):
        assert trainer.callback_metrics[f"grad_norm_{name}"] > 10 * max_norm  # logged before clipping
        # After one step AdamW's first moment is (1 - beta1) times the gradient it was given.
        first_moments = [state["exp_avg"] for state in optimizer.optimizer.state.values()]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(m) for m in first_moments]))
        torch.testing.assert_close(norm, torch.tensor((1 - beta1) * max_norm), rtol=1e-3, atol=0, msg=name)


def test_resume_continues_with_identical_losses(tiny_config, tmp_path):
    straight = tiny_config("model.max_train_steps=4")
    train(straight)
    interrupted = tiny_config("model.max_train_steps=2")
    interrupted.paths.output_dir = str(tmp_path / "resumed")
    train(interrupted)
    interrupted.model.max_train_steps = 4
    train(interrupted)  # same run directory: resumes from last.ckpt
    expected = loss_trace(Path(straight.paths.output_dir))
    resumed = loss_trace(Path(interrupted.paths.output_dir))
    assert sorted(resumed) == [1, 2, 3, 4]
    for step in expected:
        assert resumed[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step


def test_ldm_only_leaves_the_vae_bit_identical(tiny_config, tmp_path):
    stats_path = tmp_path / "stats.pt"
    torch.save(
        {"latents_scale": torch.full((1, 4, 1, 1), 2.0), "latents_bias": torch.zeros(1, 4, 1, 1)}, stats_path
    )
    cfg = tiny_config("model.mode=ldm_only", "model.loss=null", f"model.latents_stats_path={stats_path}")
    model = build(cfg)
    vae_before = {k: v.clone() for k, v in model.vae.state_dict().items()}
    bn_before = model.sit.bn.running_var.clone()
    trainer = fit(cfg, model)
    assert model.step == 3 and len(trainer.optimizers) == 1
    assert all(torch.equal(v, vae_before[k]) for k, v in model.vae.state_dict().items())
    assert torch.equal(model.sit.bn.running_var, bn_before)
    torch.testing.assert_close(bn_before, torch.full((4,), 0.25))


def test_ldm_only_reads_cached_latents_instead_of_encoding(tiny_config, tmp_path):
    stats_path = tmp_path / "stats.pt"
    torch.save({"latents_scale": torch.ones(1, 4, 1, 1), "latents_bias": torch.zeros(1, 4, 1, 1)}, stats_path)
    model = build(
        tiny_config("model.mode=ldm_only", "model.loss=null", f"model.latents_stats_path={stats_path}")
    )
    batch = a_batch()
    batch["latent"] = torch.cat([torch.full((4, 4, 8, 8), 3.0), torch.zeros(4, 4, 8, 8)], dim=1)  # std 0
    z = model._ldm_only_latents(batch, batch["image"])
    torch.testing.assert_close(z, torch.full((4, 4, 8, 8), 3.0))


def test_unknown_mode_is_rejected(tiny_config):
    cfg = tiny_config("model.mode=e2e_typo")
    with pytest.raises(Exception, match="unknown model.mode 'e2e_typo'.*ldm_only"):
        build(cfg)


def _inputs(model):
    batch = a_batch()
    model.train()
    return batch["image"], batch["label"]


def test_image_size_that_does_not_fit_the_vae_and_sit_is_a_clear_error(tiny_config):
    model = build(tiny_config())
    with pytest.raises(ValueError, match=r"needs 32x32.*multiple of 4"):
        model.check_batch(torch.zeros(2, 3, 30, 30, dtype=torch.uint8))
    model.check_batch(torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


def test_official_format_checkpoint_on_request(tiny_config):
    cfg = tiny_config("save_official_checkpoint=true", "model.max_train_steps=2")
    train(cfg)
    official = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "0000002.pt", weights_only=True)
    assert set(official) == {"model", "ema", "vae", "discriminator", "opt", "opt_vae", "opt_disc", "steps"}
    assert official["steps"] == 2
    lightning = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert torch.equal(official["model"]["bn.running_var"], lightning["state_dict"]["sit.bn.running_var"])
    assert torch.equal(official["vae"]["quant_conv.weight"], lightning["state_dict"]["vae.quant_conv.weight"])
    assert official["opt_vae"]["state"].keys() == lightning["optimizer_states"][1]["state"].keys()


def test_vae_and_sit_with_different_latent_channels_is_a_clear_error(tiny_config):
    with pytest.raises(Exception, match=r"model.sit.in_channels=8, but the VAE makes 4-channel latents"):
        build(tiny_config("model.sit.in_channels=8"))


def test_rerunning_a_finished_run_trains_no_further(tiny_config):
    cfg = tiny_config("model.max_train_steps=2")
    train(cfg)
    train(cfg)  # same run directory: resumes from last.ckpt, already at max_train_steps
    checkpoint = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["state_dict"]["train_step"] == 2
    assert sorted(loss_trace(Path(cfg.paths.output_dir))) == [1, 2]
