"""``--file_timeout``: one pathological file cannot hold up a batch conversion (clamp2.convert.batch_runner)."""

from __future__ import annotations

import signal
import struct
import time
from pathlib import Path

import pytest

from clamp2.convert import batch_runner
from conftest import load_script


def over_long_delta_time_midi(path: Path, length: int) -> None:
    """A MIDI file whose first delta time is a variable-length number of ``length`` bytes: mido reads it in quadratic
    time (200 KB: seconds; a few MB: hours), then converts it."""
    body = b"\xff" * length + b"\x7f\x90\x3c\x40\x00\xff\x2f\x00"
    path.write_bytes(b"MThd" + struct.pack(">IHHH", 6, 1, 1, 480) + b"MTrk" + struct.pack(">I", len(body)) + body)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_file_past_the_limit_fails_and_the_rest_converts(vectors, tmp_path, capsys, workers):
    import shutil

    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    shutil.copy(vectors / "inputs" / "midi" / "handmade.mid", inputs / "good.mid")
    over_long_delta_time_midi(inputs / "slow.mid", 300_000)  # ~10 s in mido
    started = time.monotonic()
    code = load_script("process_data/batch_midi2mtf.py").main(
        [str(inputs), str(outputs), "--file_timeout", "0.5", "--workers", workers, "--no_progress"])
    elapsed = time.monotonic() - started
    assert code == 1, capsys.readouterr()
    assert capsys.readouterr().out.strip() == "converted 1, skipped 0, failed 1"
    reason = (outputs / "failed_midi2mtf.log").read_text()
    assert reason == f"slow.mid\t{batch_runner.timed_out(0.5)}\n" and "--file_timeout" in reason
    assert sorted(p.name for p in outputs.iterdir()) == ["failed_midi2mtf.log", "good.mtf", "warnings_midi2mtf.log"]
    # Not a timing assertion on the machine's speed: the limit stopped the conversion instead of waiting for it.
    assert elapsed < batch_runner.hard_limit(0.5) + 5, elapsed


def swallowing_everything_then_stuck_in_c(path: Path) -> str:
    """A conversion whose own ``except Exception`` takes every error, or that never comes back to Python in time."""
    if "stuck" in path.name:
        # As a C call that runs on: the alarm is blocked, so no Python handler ever interrupts the sleep.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(60)
    if "busy" in path.name:
        spins = 0
        try:
            while True:
                spins += 1
        except Exception:  # noqa: BLE001 - a fallback that must not hide the time limit
            return "fallback"
    return path.read_text()


def test_a_converter_that_swallows_errors_or_is_stuck_in_c_is_still_stopped(tmp_path):
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    for name in ("busy.txt", "stuck.txt", "ok0.txt", "ok1.txt", "ok2.txt"):
        (inputs / name).write_text(name)
    jobs, _ = batch_runner.plan_jobs(inputs, outputs, [".txt"], ".out")
    started = time.monotonic()
    result = batch_runner.run_batch(jobs, swallowing_everything_then_stuck_in_c, output_dir=outputs, tool="test",
                                    workers=2, progress=False, file_timeout=0.5)
    assert time.monotonic() - started < 40  # the stuck file's worker was ended, not waited for (60 s)
    assert sorted(result.failures) == [("busy.txt", batch_runner.timed_out(0.5)),
                                       ("stuck.txt", batch_runner.timed_out(0.5))]
    assert result.converted == 3
    assert {p.name for p in outputs.glob("*.out")} == {"ok0.out", "ok1.out", "ok2.out"}
    assert (outputs / "ok1.out").read_text() == "ok1.txt"


def test_the_time_limit_leaves_the_alarm_as_it_found_it():
    def previous(signum, frame):
        raise AssertionError("the caller's handler ran")

    original = signal.signal(signal.SIGALRM, previous)
    try:
        with batch_runner.time_limit(5):
            sum(range(1000))
        assert signal.getsignal(signal.SIGALRM) is previous and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
        with pytest.raises(batch_runner.FileTimeout):
            with batch_runner.time_limit(0.05):
                spins = 0
                while True:
                    spins += 1
        assert signal.getsignal(signal.SIGALRM) is previous and signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
        # The watchdog that ends a stuck process was cancelled too: this process outlives its hard limit.
        time.sleep(batch_runner.hard_limit(0.05) + 0.5)
    finally:
        signal.signal(signal.SIGALRM, original)


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon", "1e10"])
def test_a_limit_that_is_not_a_positive_number_is_a_usage_error(tmp_path, capsys, value):
    with pytest.raises(SystemExit) as stopped:
        load_script("process_data/batch_abc2xml.py").main([str(tmp_path), str(tmp_path / "out"),
                                                          "--file_timeout", value])
    assert stopped.value.code == 2 and "--file_timeout" in capsys.readouterr().err


def test_an_alarm_due_at_once_leaves_no_watchdog_and_no_handler_behind():
    # A limit that passes before the block starts (tiny, or a worker descheduled meanwhile): the alarm fired before
    # time_limit's try, so the caller's handler was not restored and the watchdog stayed armed, ending the worker
    # during its next file. In a child process: a watchdog left armed exits it.
    import subprocess
    import sys

    child = """
import signal, sys, time
from clamp2.convert import batch_runner
stopped = 0
for seconds in [1e-6, 1e-5, 1e-4] * 300:
    try:
        with batch_runner.time_limit(seconds):
            sum(range(10))
    except batch_runner.FileTimeout:
        stopped += 1
    assert signal.getsignal(signal.SIGALRM) is signal.SIG_DFL, "the handler was left installed"
time.sleep(batch_runner.hard_limit(1e-4) + 1)
print("alive")
"""
    done = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "alive", (done.returncode, done.stderr[-2000:])
