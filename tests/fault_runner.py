"""Run the training entry point as separate processes with injected faults (``entry_points`` fixture).

Usage: ``python tests/fault_runner.py``, then one line ``plan.json results.json`` on stdin per plan
(``serve``; the tests' ``entry_points`` fixture keeps one running). The plan is ``{"cases": [case, ...]}``
and each case one run of ``python -m repae.train *argv`` in its own process: a child forked from
this one after the heavy imports (torch, Lightning: most of a tiny run's start-up time), which
then runs the ``repae.train`` module as ``__main__`` the way ``python -m`` does. The child's stdout
and stderr go to files and its end is observed with ``waitpid``, so a SIGKILL is seen as exactly
that. Cases start in plan order, each (foreground) case once the one before has ended; a
``background`` case runs next to the cases after it, on the second core: it starts once the previous
background case has ended (so two runs at most go at once), without waiting for its own end.

A case: ``{"name", "argv", "faults": [...], "background": bool, "keep": [file, ...],
"watch": [file or folder, ...]}``. Right after a case ends (a background case: once it is awaited),
the files in ``keep`` are copied to ``<results folder>/<name>/`` and the sha256 of every file under
``watch`` is recorded.

Faults are patched into the child only (production code has no test hooks):

- ``{"kind": "kill_after_optimizer_step", "step": s}``: SIGKILL inside the 1-based step ``s``, after
  the optimizers and the EMA have updated the weights in memory, before the step counter moves.
- ``{"kind": "fail_checkpoint_write", "step": s, "file": "last.ckpt", "action": "enospc" | "kill",
  "probe": path}``: while the trainer saves ``file`` after step ``s``, a file opened for binary
  writing gets the first half of the first block written to it (flushed to disk), then the write
  raises ``OSError(ENOSPC)`` (a full disk) or the process SIGKILLs itself. The probe JSON records
  the sha256 of ``file`` before the save and the paths opened for writing.
- ``{"kind": "nan_vae_loss", "from_step": s}``: the VAE loss is NaN in every step from ``s`` on.
- ``{"kind": "hold_after_step", "step": s, "ready": path, "release": path}``: after step ``s``,
  create ``ready`` and wait (up to 5 minutes) until ``release`` exists.
- ``{"kind": "wait_for_file", "path": p}``: start only once ``p`` exists (up to 5 minutes).
- ``{"kind": "touch_at_exit", "path": p}``: create ``p`` when the process exits.
- ``{"kind": "rename", "source": a, "target": b}``: move ``a`` to ``b`` before the run starts.
- ``{"kind": "read_only", "path": d}``: opening a file for writing or making a folder under ``d``
  fails with ``EACCES``, as in a read-only folder (``chmod`` does not bind root).

Results, by case name: ``{"exitcode", "signal", "stdout", "stderr", "watched"}`` (``signal`` is set
when the child was killed by one, ``exitcode`` otherwise).
"""

from __future__ import annotations

import atexit
import builtins
import errno
import hashlib
import importlib.util
import io
import json
import os
import runpy
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import hydra  # noqa: F401  (imported before forking, so that no run pays for it)
import lightning.pytorch as pl

import repae.callbacks.checkpoint  # noqa: F401
import repae.callbacks.sampling  # noqa: F401
import repae.datamodules.datamodule  # noqa: F401
import repae.loggers  # noqa: F401
import repae.module  # noqa: F401
from repae.modules.losses import VAERegularizationLoss
from repae.optim_step import JointStep

from helpers.faults import nan_vae_loss_methods
from helpers.forked import run_and_exit


def sha256(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def kill_after_optimizer_step(step: int) -> None:
    original = JointStep.step

    def step_then_die(self, number: int) -> None:
        original(self, number)
        if number == step:  # the step counter moves right after this call
            os.kill(os.getpid(), signal.SIGKILL)

    JointStep.step = step_then_die


class HalfWrittenFile:
    """A binary file whose first ``write`` stores half its bytes, reaches the disk, then fails."""

    def __init__(self, file, action: str):
        self._file = file
        self._action = action

    def write(self, data) -> int:
        self._file.write(bytes(data)[: len(data) // 2])
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self._file.close()

    def __getattr__(self, name):
        return getattr(self._file, name)


def fail_checkpoint_write(step: int, file: str, action: str, probe: str) -> None:
    original_save, original_open = pl.Trainer.save_checkpoint, builtins.open

    def save_checkpoint(self, filepath, *args, **kwargs):
        if Path(filepath).name != file or self.lightning_module.step != step:
            return original_save(self, filepath, *args, **kwargs)
        record = {"before_sha256": sha256(Path(filepath)), "opened_for_writing": []}

        def failing_open(path, mode="r", *open_args, **open_kwargs):
            handle = original_open(path, mode, *open_args, **open_kwargs)
            if isinstance(path, int) or "b" not in mode or not set(mode) & set("wax"):
                return handle
            record["opened_for_writing"].append(os.path.abspath(path))
            Path(probe).write_text(json.dumps(record))
            return HalfWrittenFile(handle, action)

        Path(probe).write_text(json.dumps(record))
        builtins.open = failing_open
        try:
            return original_save(self, filepath, *args, **kwargs)
        finally:
            builtins.open = original_open

    pl.Trainer.save_checkpoint = save_checkpoint


def nan_vae_loss(from_step: int) -> None:
    for name, method in nan_vae_loss_methods(lambda step: step >= from_step).items():
        setattr(VAERegularizationLoss, name, method)


def wait_for(path: str) -> None:
    deadline = time.monotonic() + 300
    while not Path(path).exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def hold_after_step(step: int, ready: str, release: str) -> None:
    original = JointStep.step

    def step_then_hold(self, number: int) -> None:
        original(self, number)
        if number == step:
            Path(ready).touch()
            wait_for(release)

    JointStep.step = step_then_hold


def touch_at_exit(path: str) -> None:
    atexit.register(Path(path).touch)


def rename(source: str, target: str) -> None:
    os.rename(source, target)


def read_only(path: str) -> None:
    folder, original_open, original_os_open, original_mkdir = Path(path), builtins.open, os.open, os.mkdir
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def refuse(target) -> None:
        if not isinstance(target, int) and (folder == Path(target) or folder in Path(target).parents):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(target))

    def checked_open(target, mode="r", *args, **kwargs):
        if set(mode) & set("wax+"):
            refuse(target)
        return original_open(target, mode, *args, **kwargs)

    def checked_os_open(target, flags, *args, **kwargs):
        if flags & writing:
            refuse(target)
        return original_os_open(target, flags, *args, **kwargs)

    def checked_mkdir(target, *args, **kwargs):
        refuse(target)
        return original_mkdir(target, *args, **kwargs)

    builtins.open = io.open = checked_open  # pathlib opens through io.open
    os.open, os.mkdir = checked_os_open, checked_mkdir


FAULTS = {
    "kill_after_optimizer_step": kill_after_optimizer_step,
    "fail_checkpoint_write": fail_checkpoint_write,
    "nan_vae_loss": nan_vae_loss,
    "hold_after_step": hold_after_step,
    "wait_for_file": wait_for,
    "touch_at_exit": touch_at_exit,
    "rename": rename,
    "read_only": read_only,
}


def run_child(case: dict, out_dir: Path) -> None:
    """In the forked child: redirect output, install the faults, run the entry point. Never returns:
    the child ends as ``python -m repae.train`` would (exit code, the message of a SystemExit or the
    traceback of an exception, atexit handlers), less the interpreter's teardown of its modules,
    which takes a second or more with torch and Lightning loaded."""
    for fd, stream in ((1, "stdout"), (2, "stderr")):
        with open(out_dir / f"{case['name']}.{stream}", "wb") as file:
            os.dup2(file.fileno(), fd)
    for fault in case.get("faults", []):
        FAULTS[fault["kind"]](**{key: value for key, value in fault.items() if key != "kind"})
    sys.argv = [importlib.util.find_spec("repae.train").origin, *case["argv"]]
    run_and_exit(lambda: runpy.run_module("repae.train", run_name="__main__", alter_sys=True))


def outcome(status: int, case: dict, out_dir: Path) -> dict:
    """The finished child's exit, output, the sha256 of the files under ``watch`` and copies of the
    files named in ``keep`` (in ``out_dir/<case name>/``), taken before the next case runs."""
    kept = out_dir / case["name"]
    for path in map(Path, case.get("keep", [])):
        if path.is_file():
            kept.mkdir(exist_ok=True)
            shutil.copyfile(path, kept / path.name)
    return {
        "exitcode": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
        "signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
        **{
            stream: (out_dir / f"{case['name']}.{stream}").read_text(errors="replace")
            for stream in ("stdout", "stderr")
        },
        "watched": {
            str(path): sha256(path)
            for watch in map(Path, case.get("watch", []))
            for path in (sorted(watch.rglob("*")) if watch.is_dir() else [watch])
            if path.is_file()
        },
    }


def run_plan(plan_path: str, results_path: str) -> None:
    cases = json.loads(Path(plan_path).read_text())["cases"]
    out_dir = Path(results_path).parent
    results, background = {}, None

    def await_case(pid: int, case: dict) -> None:
        _, status = os.waitpid(pid, 0)
        results[case["name"]] = outcome(status, case, out_dir)

    for case in cases:
        if case.get("background") and background is not None:
            await_case(*background)
            background = None
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            run_child(case, out_dir)
        if case.get("background"):
            background = pid, case
        else:
            await_case(pid, case)
    if background is not None:
        await_case(*background)
    Path(results_path).write_text(json.dumps(results, indent=1))


def serve() -> None:
    """For each stdin line ``PLAN RESULTS``: run the plan with its folder as the working directory and
    that folder's ``tmp/`` as the temporary directory (where a test can look for files a run left),
    then answer one line once the results are written. One start-up for every plan of a test session."""
    for line in sys.stdin:
        plan_path, results_path = line.split()
        work = Path(plan_path).parent
        os.chdir(work)
        os.environ["TMPDIR"] = str(work / "tmp")
        tempfile.tempdir = None  # tempfile caches the folder it found first
        run_plan(plan_path, results_path)
        print("done", flush=True)


if __name__ == "__main__":
    serve()
