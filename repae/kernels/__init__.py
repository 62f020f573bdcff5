"""Speed forms of the models' modules, behind one switch (``model.fast_kernels``): the readable
networks live in ``repae/modules``, their fast subclasses here (timm's ``layers/fast_norm.py``
pattern). Imports torch and triton, never Lightning or Hydra; ``repae/modules`` never imports this."""

from repae.kernels.vae import use_fast_kernels

__all__ = ["use_fast_kernels"]
