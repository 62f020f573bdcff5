"""Training speed of runs from their logs: the median steps/s between consecutive progress lines.

    python scripts/study_step_rates.py logs/study/runs/*.log [--after "2026-12-07 14:52:30"] \
        [--before ...] [--output rates.json]

Reads the lines ``ProgressLog`` writes every ``trainer.log_every_n_steps`` (``[time][logger][INFO] -
step N/T | ...``) from each run's log, e.g. the study's ``runs/<arm>_s<seed>.log``. The median over
the intervals between consecutive lines leaves out the few that hold an FD evaluation, a checkpoint
or a resume. ``--after``/``--before`` keep the lines of one stretch, e.g. one device call of a study
that was stopped and resumed into the same logs (docs/reproduction.md, "MPS" under "The command").
"""

from __future__ import annotations

import argparse
import datetime
import re
import statistics
from pathlib import Path

from repae.benchmarking import report

PROGRESS = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]\[[^\]]*\]\[INFO\] - step (\d+)/(\d+) \|")
TIME_FORMAT = "%Y-%m-%d %H:%M:%S,%f"


def progress_points(text: str) -> list[tuple[datetime.datetime, int]]:
    """(time, step) of each progress line, in the order written."""
    points = []
    for line in text.splitlines():
        match = PROGRESS.match(line)
        if match:
            points.append((datetime.datetime.strptime(match.group(1), TIME_FORMAT), int(match.group(2))))
    return points


def step_rate(points: list[tuple[datetime.datetime, int]]) -> dict | None:
    """Median steps/s over the intervals between consecutive points in which the step advanced."""
    rates = [
        (step - previous_step) / seconds
        for (previous_time, previous_step), (time, step) in zip(points, points[1:], strict=False)
        if step > previous_step and (seconds := (time - previous_time).total_seconds()) > 0
    ]
    if not rates:
        return None
    return {
        "median_steps_per_s": statistics.median(rates),
        "intervals": len(rates),
        "first_step": points[0][1],
        "last_step": points[-1][1],
    }


def parse_time(text: str) -> datetime.datetime:
    """A local time as the logs write it, e.g. ``2026-12-07 14:52:30`` (no time zone: the logs have none)."""
    try:
        time = datetime.datetime.fromisoformat(text)
    except ValueError:
        time = None
    if time is None or time.tzinfo is not None:
        raise argparse.ArgumentTypeError(f"not a time such as '2026-12-07 14:52:30' (no time zone): {text!r}")
    return time


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("logs", type=Path, nargs="+", help="run logs (the study's runs/<arm>_s<seed>.log)")
    parser.add_argument("--after", type=parse_time, help="only progress lines written after this time")
    parser.add_argument("--before", type=parse_time, help="only progress lines written before this time")
    parser.add_argument("--output", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.after and args.before and args.after >= args.before:
        parser.error("--after must be earlier than --before")
    runs = {}
    for path in args.logs:
        try:
            text = path.read_text(errors="replace")
        except OSError as error:
            raise SystemExit(f"error: cannot read {path}: {error.strerror}") from None
        points = [
            (time, step)
            for time, step in progress_points(text)
            if (args.after is None or time > args.after) and (args.before is None or time < args.before)
        ]
        runs[str(path)] = step_rate(points)
    window = {"after": args.after and str(args.after), "before": args.before and str(args.before)}
    report({"window": window, "runs": runs}, args.output)


if __name__ == "__main__":
    main()
