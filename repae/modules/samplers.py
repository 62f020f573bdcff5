"""Samplers for a velocity-predicting SiT: Euler/Heun ODE and Euler–Maruyama SDE, with CFG.

Conventions (as in the official REPA / REPA-E ``samplers.py``):

- time runs from t=1 (pure noise) to t=0 (data); the interpolant is ``x_t = alpha(t) x_0 + sigma(t) eps``;
- the integration state is kept in float64, the model sees ``x`` and ``t`` in ``latents.dtype``;
- classifier-free guidance doubles the batch with the null label and uses
  ``d = d_uncond + cfg_scale * (d_cond - d_uncond)`` on all channels, but only when ``cfg_scale > 1``
  and ``guidance_low <= t <= guidance_high`` (guidance interval).

``model`` is anything with ``model.inference(x [B, C, H, W], t [B], y int64 [B]) -> v [B, C, H, W]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from repae.modules.sit import interpolant


def score_from_velocity(v: torch.Tensor, x: torch.Tensor, t: torch.Tensor, path_type: str = "linear"):
    """Score ``grad log p_t(x)`` implied by a velocity prediction.

    ``s = (alpha / alpha' * v - x) / (sigma^2 - alpha / alpha' * sigma' * sigma)``; on the linear path this
    is ``((t - 1) v - x) / t = -eps / t``. ``v, x``: [B, C, H, W]; ``t``: [B].
    """
    t = t.view(-1, *([1] * (x.dim() - 1)))
    alpha, sigma, d_alpha, d_sigma = interpolant(t, path_type)
    reverse_alpha_ratio = alpha / d_alpha
    variance = sigma**2 - reverse_alpha_ratio * d_sigma * sigma
    return (reverse_alpha_ratio * v - x) / variance


def diffusion_coefficient(t: torch.Tensor) -> torch.Tensor:
    """SDE diffusion ``w(t) = 2t`` (as in the official code, independent of the path type)."""
    return 2 * t


def _guidance_active(t: torch.Tensor, cfg_scale: float, guidance_low: float, guidance_high: float) -> bool:
    return bool(cfg_scale > 1.0 and guidance_low <= t <= guidance_high)


def _model_input(x: torch.Tensor, y: torch.Tensor, y_null: torch.Tensor, guided: bool):
    """Batch for one model evaluation: ``[x; x]`` with ``[y; null]`` under guidance, else ``x, y``."""
    if guided:
        return torch.cat([x, x], dim=0), torch.cat([y, y_null], dim=0)
    return x, y


def _velocity(model, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One model call on a float64 state ``x`` [B, C, H, W] at float64 times ``t`` [B]; returns float64."""
    return model.inference(x.to(dtype), t.to(dtype), y).to(torch.float64)


def _time_input(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The 0-d float64 time ``t`` broadcast to the batch of ``x``: [B] float64."""
    return torch.ones(x.shape[0], dtype=torch.float64, device=x.device) * t


def standard_normal(
    shape: tuple[int, ...] | torch.Size,
    generator: torch.Generator | Sequence[torch.Generator] | None,
    dtype: torch.dtype,
    device: torch.device,
) -> torch.Tensor:
    """N(0, I) noise of ``shape`` [B, ...] from one generator, or row ``b`` from ``generator[b]``.

    One generator per sample makes each sample's noise independent of how samples are batched, so a
    sample can be regenerated alone (resumed generation, any batch size or number of devices).
    """
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, dtype=dtype, device=device)
    if len(generator) != shape[0]:
        raise ValueError(f"Got {len(generator)} generators for a batch of {shape[0]} samples")
    return torch.stack([torch.randn(shape[1:], generator=g, dtype=dtype, device=device) for g in generator])


def _guide(d: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    d_cond, d_uncond = d.chunk(2)
    return d_uncond + cfg_scale * (d_cond - d_uncond)


@torch.no_grad()
def euler_sampler(
    model,
    latents: torch.Tensor,
    y: torch.Tensor,
    num_steps: int = 50,
    heun: bool = False,
    cfg_scale: float = 1.0,
    guidance_low: float = 0.0,
    guidance_high: float = 1.0,
    path_type: str = "linear",
    null_class: int = 1000,
) -> torch.Tensor:
    """Deterministic Euler (or Heun) integration of the probability-flow ODE from t=1 to t=0.

    ``latents``: initial noise [B, C, H, W]; ``y``: int64 labels [B]. Returns float64 [B, C, H, W].
    ``path_type`` is accepted for a uniform sampler signature; the ODE only needs the velocity.
    Heun adds a corrector evaluation at ``t_next`` on all but the last step (which ends at t=0); its
    guidance on/off decision uses ``t_cur``, as in the official code.
    """
    dtype = latents.dtype
    y_null = torch.full_like(y, null_class)
    t_steps = torch.linspace(1, 0, num_steps + 1, dtype=torch.float64)
    x_next = latents.to(torch.float64)
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:], strict=True)):
        x_cur = x_next
        guided = _guidance_active(t_cur, cfg_scale, guidance_low, guidance_high)
        model_input, y_cur = _model_input(x_cur, y, y_null, guided)
        d_cur = _velocity(model, model_input, y_cur, _time_input(t_cur, model_input), dtype)
        if guided:
            d_cur = _guide(d_cur, cfg_scale)
        x_next = x_cur + (t_next - t_cur) * d_cur
        if heun and i < num_steps - 1:
            model_input, y_cur = _model_input(x_next, y, y_null, guided)
            d_prime = _velocity(model, model_input, y_cur, _time_input(t_next, model_input), dtype)
            if guided:
                d_prime = _guide(d_prime, cfg_scale)
            x_next = x_cur + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


@torch.no_grad()
def euler_maruyama_sampler(
    model,
    latents: torch.Tensor,
    y: torch.Tensor,
    num_steps: int = 250,
    cfg_scale: float = 1.0,
    guidance_low: float = 0.0,
    guidance_high: float = 1.0,
    path_type: str = "linear",
    null_class: int = 1000,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Euler–Maruyama integration of the reverse SDE from t=1 to t=0.

    Time grid ``[linspace(1, 0.04, num_steps), 0]``: ``num_steps - 1`` stochastic steps down to t=0.04,
    then one deterministic step to t=0 that returns the mean (the score blows up as t -> 0). Drift
    ``v - w(t)/2 * s`` (CFG applied to the drift), update ``x + drift * dt + sqrt(w(t) |dt|) * xi``.
    ``generator`` seeds ``xi`` (None: the global RNG of the latents' device, like ``randn_like``); a
    list of B generators draws each sample's ``xi`` from its own (see :func:`standard_normal`).

    ``latents``: [B, C, H, W]; ``y``: int64 [B]. Returns float64 [B, C, H, W]; ``num_steps`` model calls.
    """
    dtype = latents.dtype
    y_null = torch.full_like(y, null_class)
    t_steps = torch.linspace(1.0, 0.04, num_steps, dtype=torch.float64)
    t_steps = torch.cat([t_steps, torch.tensor([0.0], dtype=torch.float64)])

    def drift(x_cur: torch.Tensor, t_cur: torch.Tensor) -> torch.Tensor:
        guided = _guidance_active(t_cur, cfg_scale, guidance_low, guidance_high)
        model_input, y_cur = _model_input(x_cur, y, y_null, guided)
        time_input = _time_input(t_cur, model_input)
        v = _velocity(model, model_input, y_cur, time_input, dtype)
        d = v - 0.5 * diffusion_coefficient(t_cur) * score_from_velocity(
            v, model_input, time_input, path_type
        )
        return _guide(d, cfg_scale) if guided else d

    x_next = latents.to(torch.float64)
    for t_cur, t_next in zip(t_steps[:-2], t_steps[1:-1], strict=True):
        dt = t_next - t_cur
        x_cur = x_next
        xi = standard_normal(x_cur.shape, generator, x_cur.dtype, x_cur.device)
        x_next = (
            x_cur
            + drift(x_cur, t_cur) * dt
            + torch.sqrt(diffusion_coefficient(t_cur)) * (xi * torch.sqrt(dt.abs()))
        )

    t_cur, t_next = t_steps[-2], t_steps[-1]
    return x_next + (t_next - t_cur) * drift(x_next, t_cur)


def sample(
    model, latents: torch.Tensor, y: torch.Tensor, mode: str = "ode", **sampler_kwargs
) -> torch.Tensor:
    """Dispatch to :func:`euler_sampler` (``mode="ode"``) or :func:`euler_maruyama_sampler` (``"sde"``).

    ``heun=False`` is accepted and ignored in SDE mode so one sampler config serves both modes.
    """
    if mode == "ode":
        return euler_sampler(model, latents, y, **sampler_kwargs)
    if mode == "sde":
        if sampler_kwargs.pop("heun", False):
            raise ValueError("Heun's method is only available for ODE sampling (mode='ode').")
        return euler_maruyama_sampler(model, latents, y, **sampler_kwargs)
    raise ValueError(f"Unknown sampling mode {mode!r}; expected 'ode' or 'sde'.")


@torch.no_grad()
def generate_images(
    sit, vae, labels: torch.Tensor, noise: torch.Tensor, mode: str = "ode", **sampler_kwargs
) -> torch.Tensor:
    """Sample with ``sit`` from ``noise`` [B, C, h, w] for int64 ``labels`` [B] and decode with ``vae``.

    The sampler runs in the SiT's normalised latent space; latents are mapped back with the SiT's
    BatchNorm statistics (``sit.denormalize_latents``) and decoded with the VAE in eval mode. Images
    become uint8 [B, 3, H, W] by ``clamp(255 (x + 1) / 2, 0, 255)`` and truncation, as the official
    ``generate.py`` (no +0.5 rounding). ``null_class`` defaults to ``sit.num_classes``; other keyword
    arguments go to :func:`sample` (``num_steps``, ``cfg_scale``, ``generator``, ...).
    """
    sampler_kwargs.setdefault("null_class", sit.num_classes)
    if sampler_kwargs.get("cfg_scale", 1.0) > 1.0 and sit.y_embedder.dropout_prob == 0:
        raise ValueError(
            f"classifier-free guidance (cfg_scale={sampler_kwargs['cfg_scale']}) needs the null-class "
            "embedding, which a SiT built with class_dropout_prob=0 does not have: sample with cfg_scale=1"
        )
    modes = sit.training, vae.training
    sit.eval(), vae.eval()  # no label dropout; the decoder's behaviour is mode-free, but be safe
    latents = sample(sit, noise, labels, mode=mode, **sampler_kwargs)
    images = vae.decode(sit.denormalize_latents(latents.to(noise.dtype)))
    sit.train(modes[0]), vae.train(modes[1])
    return torch.clamp(255.0 * (images.float() + 1) / 2, 0, 255).to(torch.uint8)
