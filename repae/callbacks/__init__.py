"""Lightning callbacks: sample grids, FID/FD, loss curves."""
