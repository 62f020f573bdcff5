"""What the benchmarks in ``scripts/`` share: the MFU yardstick, GPU timing, the VAE benchmarks'
options and shapes, where a result came from (command, commit, CPU), and writing the results.

The step benchmark (``scripts/benchmark.py``) and the micro-benchmarks (``scripts/bench/``) run by
path (``python scripts/bench/group_norm.py ...``); this module is their one import besides the model
code, so they import no sibling script.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from repae.git import git
from repae.modules.vae import VAE_CONFIGS, build_vae


def matmul_tflops(size: int = 8192, repeats: int = 10) -> float:
    """bf16 dense matmul rate of this card (TFLOP/s), the MFU denominator."""
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    torch.cuda.synchronize()
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12


def time_ms(function, repeats: int = 10) -> float:
    """Median milliseconds of ``function()`` on the GPU (CUDA events), after three warm-up calls."""
    for _ in range(3):
        function()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def gpu_ms(function, repeats: int = 3) -> float:
    """Mean GPU milliseconds of ``function()``: its kernels are queued while the GPU sleeps, so the
    events time their execution, not the host's launches (a few calls: the launch queue holds
    ~1000 kernels)."""
    for _ in range(3):
        function()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(400_000_000)  # ~0.2 s at the H100's clock: longer than the host needs to queue
    start.record()
    for _ in range(repeats):
        function()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


def host_ms(function, repeats: int = 10) -> float:
    """Mean milliseconds the host spends in ``function()`` when the GPU keeps up (not synchronised
    inside the timed calls)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return 1e3 * elapsed / repeats


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``"unknown"`` where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


# Untracked files larger than this are data someone keeps in the checkout, not code: hashing them
# into the tree would copy them into .git/objects.
LARGEST_UNTRACKED_FILE = 10 * 2**20


def untracked_size(path: Path) -> int:
    """The bytes ``git add`` would store for ``path``: a link's own, not its target's; 0 if it has
    gone since git listed it."""
    try:
        return path.lstat().st_size
    except FileNotFoundError:
        return 0


def working_tree_hash(root: Path) -> str | None:
    """The git tree hash of the files in ``root``'s working tree, tracked and untracked (ignored ones
    and untracked ones over ``LARGEST_UNTRACKED_FILE`` left out): equal to ``git rev-parse
    <commit>^{tree}`` when the files are that commit's, whatever the repository's metadata says.
    Files a run writes into the checkout outside the ignored folders (``logs/``, ``outputs/``)
    count too. Made through a scratch index, so the repository's own index and staged changes stay
    as they are (``git add`` stores the files' blobs in ``.git/objects``, as any ``git add`` does)."""
    untracked = git(root, "ls-files", "--others", "--exclude-standard", "-z")
    if untracked is None:
        return None
    large = [
        name
        for name in untracked.split("\0")
        if name and untracked_size(root / name) > LARGEST_UNTRACKED_FILE
    ]
    with tempfile.TemporaryDirectory() as scratch:
        scratch_index = {**os.environ, "GIT_INDEX_FILE": os.path.join(scratch, "index")}
        excluded = [f":(exclude,literal){name}" for name in large]
        if git(root, "add", "--all", "--", ".", *excluded, env=scratch_index) is None:
            return None
        return git(root, "write-tree", env=scratch_index)


def provenance() -> dict:
    """Where a result came from: the command as typed from the repository root, the commit (and
    whether the working tree differed from it, untracked files included), the working tree's own
    git tree hash, the CPU model, the cores this process may use, the GPU (None without one) and
    the torch version.

    ``tree`` names the code that ran even where the commit cannot: a copy of the working tree whose
    git metadata is older than its files (a remote machine's) records a stale ``commit``, but its
    ``tree`` equals ``git rev-parse <commit>^{tree}`` of the commit whose files ran (untracked,
    unignored files included, so a clean tree matches its commit exactly)."""
    root = Path(__file__).resolve().parents[1]
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(root) if script.is_relative_to(root) else script
    # Untracked files count: a new script that produced a result is not in the commit either.
    status = git(root, "status", "--porcelain")
    return {
        "command": shlex.join(["python", str(shown), *sys.argv[1:]]),
        "commit": git(root, "rev-parse", "HEAD"),
        "uncommitted_changes": None if status is None else bool(status),
        "tree": working_tree_hash(root),
        "cpu_model": cpu_model(),
        "cpu_cores": len(os.sched_getaffinity(0)),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
    }


def report(results: dict, output: Path | None) -> None:
    """Print the results as JSON, with their ``provenance`` first, and, with an ``output`` path,
    write them there too."""
    text = json.dumps({"provenance": provenance(), **results}, indent=2)
    print(text)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text + "\n")


def vae_argument_parser(description: str, channels_last_option: bool = True) -> argparse.ArgumentParser:
    """The options of every VAE benchmark: --vae, --batch-size, --resolution, --channels-last (unless
    the benchmark has one layout only), --output."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--vae", default="f8d4", choices=sorted(VAE_CONFIGS), help="VAE config (default: f8d4)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="images (default: 32)")
    parser.add_argument("--resolution", type=int, default=256, help="image size (default: 256)")
    if channels_last_option:
        parser.add_argument(
            "--channels-last", action="store_true", help="NHWC images and operands (model.channels_last)"
        )
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    return parser


def module_input_shapes(
    vae_name: str, batch_size: int, resolution: int, module_type: type[torch.nn.Module]
) -> list[tuple[int, ...]]:
    """The input shape [batch_size, C, H, W] of each ``module_type`` module of the VAE, in the order
    encode then decode runs them (found by running both on one image on the CPU)."""
    vae = build_vae(vae_name)
    shapes = []
    hooks = [
        module.register_forward_hook(lambda _module, args, _out: shapes.append(tuple(args[0].shape)))
        for module in vae.modules()
        if isinstance(module, module_type)
    ]
    with torch.no_grad():
        vae.decode(vae.encode(torch.zeros(1, 3, resolution, resolution)).mode())
    for hook in hooks:
        hook.remove()
    return [(batch_size, *shape[1:]) for shape in shapes]
