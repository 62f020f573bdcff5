"""Checkpoint and weight conversion; the command line is ``python -m repae.convert`` (``__main__.py``).

- ``checkpoints``: reading training checkpoints safely, their parts, the official layout, VAE extraction;
- ``official``: official ``train_repae.py`` / ``train_ldm_only.py`` checkpoints -> repae checkpoints, and
  the mapping of the official training arguments to repae's config;
- ``diffusers``: a VAE between the CompVis layout and a diffusers ``AutoencoderKL`` folder.
"""
