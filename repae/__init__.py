"""repae: REPA-E (end-to-end VAE + latent diffusion transformer training) in Lightning + Hydra."""

__version__ = "0.1.0"
