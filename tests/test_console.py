"""The progress line (rate, time left, throttled off a terminal) and the one-line user error."""

import io

import pytest

from harness.console import Progress, exit_on_user_error, format_seconds


def test_progress_prints_done_rate_and_time_left(monkeypatch):
    clock = iter([0.0, 2.0, 4.0, 4.5])  # start, then one reading per update
    monkeypatch.setattr("harness.console.time.perf_counter", lambda: next(clock))
    stream = io.StringIO()
    progress = Progress("step", 10, "steps", every=2, done=2, stream=stream)
    progress.update(1, "loss 1.0")  # 3/10 after 2 s from 2/10: 0.5 steps/s, 14 s left; not printed (every 2)
    progress.update(1, "loss 0.5")  # 4/10 after 4 s: 0.5 steps/s, 12 s left
    progress.update(6)  # done: always printed
    assert stream.getvalue().splitlines() == ["step 4/10  0.5 steps/s  ETA 12s  loss 0.5",
                                              "step 10/10  1.78 steps/s  ETA 0s"]


def test_progress_off_a_terminal_prints_at_most_one_line_per_interval(monkeypatch):
    clock = iter([0.0, 0.1, 0.2, 2.5, 2.6, 2.7])
    monkeypatch.setattr("harness.console.time.perf_counter", lambda: next(clock))
    stream = io.StringIO()
    progress = Progress("loading", 5, "tensors", min_seconds=2.0, stream=stream)
    for _ in range(5):
        progress.update(1)
    assert [line.split()[1] for line in stream.getvalue().splitlines()] == ["3/5", "5/5"]


def test_format_seconds():
    assert [format_seconds(s) for s in (0, 59.4, 61, 3599, 3600, 7325)] == ["0s", "59s", "1m01s", "59m59s", "1h00m",
                                                                           "2h02m"]


def test_user_errors_exit_2_with_one_line_and_bugs_keep_their_traceback(capsys):
    with pytest.raises(SystemExit) as exit_info, exit_on_user_error("prog"):
        raise ValueError("data.jsonl:3: unknown kind 'harmfull'")
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "prog: error: data.jsonl:3: unknown kind 'harmfull'\n"
    with pytest.raises(KeyError), exit_on_user_error("prog"):
        raise KeyError("a bug, not the user's")
