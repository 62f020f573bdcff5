"""Reading torch files that may come from someone else: tensors and plain values only.

Every ``torch.load`` in repae passes ``weights_only=True`` explicitly, because torch lets
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` override only the loads that leave it unset; files someone else
gives go through :func:`load_weights_only`, which never advises ``weights_only=False`` (that would run
the file's code). A library that loads a file itself runs inside :func:`weights_only_loads`.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch


def load_weights_only(
    path: str | Path,
    what: str = "checkpoint",
    map_location: Any = "cpu",
    allowed_globals: Iterable[type] = (),
    mmap: bool = False,
) -> Any:
    """``torch.load`` of tensors, containers, numbers and strings, plus ``allowed_globals`` (the
    official checkpoints pickle an ``argparse.Namespace``).

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: the file pickles anything else (a function or class reference), or is no torch
            file; the message names ``what`` (the config key or role of the file) and ``path``.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} {path} does not exist or is not a file")
    with load_errors(path, what), torch.serialization.safe_globals(list(allowed_globals)):
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


@contextmanager
def load_errors(path: str | Path, what: str = "checkpoint", expected: str = "torch file") -> Iterator[None]:
    """A weights-only load in the block that fails becomes one ``ValueError`` naming ``what`` and
    ``path``: :func:`refusal` for a file that pickles more than tensors, "not a readable
    ``expected``" for anything else that fails (a block that also loads the state dict names what
    the file should hold)."""
    try:
        yield
    except pickle.UnpicklingError as error:
        raise refusal(path, error, what) from None
    except (RuntimeError, KeyError, EOFError) as error:
        raise ValueError(
            f"{what} {path} is not a readable {expected} ({type(error).__name__}: {error})"
        ) from None


def refusal(path: str | Path, error: pickle.UnpicklingError, what: str = "checkpoint") -> ValueError:
    """The error for a file that a weights-only load refused (torch's own message suggests
    ``weights_only=False``)."""
    found = re.search(r"GLOBAL ([\w.]+)", str(error))
    if found is None:
        return ValueError(f"{what} {path} is not a readable torch file")
    return ValueError(
        f"{what} {path} holds more than tensors and plain values (a reference to {found.group(1)}, which is "
        "not on repae's allow-list): repae does not write such files and refuses to load it"
    )


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` in the block loads weights only, even a library's that passes
    ``weights_only=False`` (torch-fidelity's Inception loader does): torch's
    ``TORCH_FORCE_WEIGHTS_ONLY_LOAD``, set for the block, with ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``
    lifted (torch refuses the two together). A file that pickles code then fails to load instead of
    running it. The variables are the process's: use it around one construction on the main thread,
    not from threads that may overlap."""
    names = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    previous = {name: os.environ.pop(name, None) for name in names}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        yield
    finally:
        for name, value in previous.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value
