"""Run speeds read back from the progress lines of the study's run logs."""

from __future__ import annotations

import json

import pytest

from scripts import study_step_rates


def progress_line(seconds: float, step: int) -> str:
    minute, second = divmod(seconds, 60)
    return (
        f"[2026-12-07 14:{int(minute):02d}:{second:06.3f}".replace(".", ",")
        + f"][repae.callbacks.progress][INFO] - step {step}/4000 | 3.5 steps/s | ETA 0:14:28 | sit_loss 0.3"
    )


def test_the_rate_is_the_median_over_intervals_so_an_evaluation_pause_does_not_count(tmp_path, capsys):
    lines = [progress_line(10 * i, 50 * i) for i in range(1, 6)]  # 5 steps/s
    lines.insert(3, "[2026-12-07 14:00:35,000][repae.callbacks.sampling][INFO] - fd_effnet at step 150")
    lines.append(progress_line(60 + 30, 300))  # 50 steps after a 30 s FD evaluation
    lines.append(progress_line(100, 350))
    log = tmp_path / "repae_s0.log"
    log.write_text("\n".join(lines) + "\n")
    study_step_rates.main([str(log), "--output", str(tmp_path / "rates.json")])
    run = json.loads((tmp_path / "rates.json").read_text())["runs"][str(log)]
    assert run == {"median_steps_per_s": 5.0, "intervals": 6, "first_step": 50, "last_step": 350}
    assert json.loads(capsys.readouterr().out)["runs"] == {str(log): run}


def test_a_time_window_keeps_one_stretch_of_a_resumed_run(tmp_path):
    slow = [progress_line(20 * i, 50 * i) for i in range(1, 5)]  # 2.5 steps/s, to 14:01:20
    fast = [progress_line(200 + 5 * i, 200 + 50 * i) for i in range(1, 5)]  # 10 steps/s, after 14:03:20
    log = tmp_path / "repa_s1.log"
    log.write_text("\n".join(slow + ["a resumed run's start-up lines"] + fast) + "\n")
    output = tmp_path / "rates.json"
    study_step_rates.main([str(log), "--after", "2026-12-07 14:02:00", "--output", str(output)])
    assert json.loads(output.read_text())["runs"][str(log)]["median_steps_per_s"] == 10.0
    study_step_rates.main([str(log), "--before", "2026-12-07 14:02:00", "--output", str(output)])
    assert json.loads(output.read_text())["runs"][str(log)]["median_steps_per_s"] == 2.5


def test_a_log_without_progress_lines_has_no_rate_and_a_bad_time_is_refused(tmp_path, capsys):
    log = tmp_path / "vanilla_s0.log"
    log.write_text("Traceback (most recent call last):\n")
    study_step_rates.main([str(log), "--output", str(tmp_path / "rates.json")])
    assert json.loads((tmp_path / "rates.json").read_text())["runs"] == {str(log): None}
    refused = {
        ("--after", "yesterday"): "argument --after: not a time such as",
        ("--after", "2026-12-07T14:52:30Z"): "argument --after: not a time such as",
        (
            "--after",
            "2026-12-07 15:00",
            "--before",
            "2026-12-07 14:00",
        ): "--after must be earlier than --before",
    }
    for window, message in refused.items():
        with pytest.raises(SystemExit):
            study_step_rates.main([str(log), *window])
        assert message in capsys.readouterr().err
