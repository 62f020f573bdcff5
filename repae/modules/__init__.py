"""Plain ``nn.Module`` building blocks of REPA-E. Nothing here imports Lightning or Hydra."""
