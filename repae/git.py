"""Asking git about the checkout repae runs from (provenance of results and evaluation records)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def git(root: Path, *args: str, env: dict | None = None) -> str | None:
    """The output of ``git args`` in ``root``, stripped; None if git is missing, fails or hangs
    (a network file system)."""
    try:
        done = subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True, env=env, timeout=60
        )
    except (OSError, subprocess.CalledProcessError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip()
