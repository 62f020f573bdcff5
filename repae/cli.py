"""What the command-line entry points share: bad input ends the process with one ``error: ...`` line on
stderr and exit status 1, instead of a traceback the user would have to read for the one line that
matters."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# What most entry points raise for a wrong argument or a missing file.
BAD_INPUT = (FileNotFoundError, ValueError)


@contextmanager
def exit_on_bad_input(
    errors: tuple[type[BaseException], ...] = BAD_INPUT,
    message: Callable[[BaseException], str | None] = str,
    log: logging.Logger | None = None,
) -> Iterator[None]:
    """Turn an exception of ``errors`` raised in the body into ``SystemExit("error: <message(error)>")``.

    Args:
        errors: the exception types that are bad input.
        message: the line for an error; None where a closer look finds it is not bad input after all,
            and it propagates with its traceback.
        log: also log the line here (entry points whose log goes to a file, so the file says why the
            run ended).
    """
    try:
        yield
    except errors as error:
        line = message(error)
        if line is None:
            raise
        if log is not None:
            log.error("%s", line)
        raise SystemExit(f"error: {line}") from None
