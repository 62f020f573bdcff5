"""The end of a run in a child forked from a test runner (``tests/fault_runner.py``,
``tests/helpers/deterministic_run.py``), as the command's own process would end."""

from __future__ import annotations

import atexit
import os
import sys
import traceback
from collections.abc import Callable
from typing import NoReturn


def run_and_exit(function: Callable[[], object]) -> NoReturn:
    """Run ``function()`` and end this process as ``python -m ...`` would: exit code 0, the code
    (or message) of a ``SystemExit``, or 1 with the traceback of an exception; atexit handlers run.
    The interpreter's teardown of its modules is skipped: with torch and Lightning loaded it takes a
    second or more, and the forked child's parent tears down its own."""
    try:
        function()
        code = 0
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else int(exit.code is not None)
        if exit.code is not None and not isinstance(exit.code, int):
            print(exit.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        code = 1
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
