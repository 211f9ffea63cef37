"""Progress bars that also show up in log files.

tqdm redraws one line with carriage returns, which is right in a terminal and useless in a batch
job's log (``nohup``, SLURM, ``2> log``): the log gets one endless line, or nothing when the bar is
disabled for non-TTYs. ``progress_bar`` keeps tqdm in a terminal and, when stderr is not a terminal,
writes a plain line (same text) at most every ``log_interval`` seconds, plus the first and last.
"""

from __future__ import annotations

import sys
import threading
from typing import IO, Optional

LOG_INTERVAL_SECONDS = 30.0

_BAR_CLASS = None
_BAR_CLASS_MADE = threading.Lock()


def _bar_class():
    """tqdm with a thread lock of its own, made on first use.

    tqdm's default lock holds a ``multiprocessing.RLock``, and making one fixes the process's start
    method ("fork" on Linux), so a caller's later ``multiprocessing.set_start_method("spawn")`` raised
    "context has already been set" after any encode through the API; a caller already on spawn got a
    resource-tracker process. The package's bars and lines are written by threads of one process.
    """
    global _BAR_CLASS
    with _BAR_CLASS_MADE:
        if _BAR_CLASS is None:
            from tqdm import tqdm

            class Bar(tqdm):
                pass

            Bar.__qualname__ = "Bar"  # found again by pickle through the module's __getattr__
            Bar.__module__ = __name__
            Bar.set_lock(threading.RLock())
            _BAR_CLASS = Bar
    return _BAR_CLASS


def __getattr__(name: str):
    if name == "Bar":  # made on first use: tqdm is imported only when a bar is
        return _bar_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _LineWriter:
    """A file-like wrapper that turns tqdm's carriage-return redraws into whole lines."""

    def __init__(self, stream: IO[str]):
        self.stream = stream

    def write(self, text: str) -> int:
        line = text.replace("\r", "").rstrip()
        if line:
            self.stream.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()


def is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def progress_bar(total: Optional[int] = None, desc: str = "", unit: str = "it", enabled: bool = True,
                 stream: Optional[IO[str]] = None, log_interval: float = LOG_INTERVAL_SECONDS, **kwargs):
    """A tqdm bar on ``stream`` (stderr): live in a terminal, a line every ``log_interval`` s in a log.

    ``enabled=False`` (``--no_progress``, or a process other than the main one) gives a silent bar
    with the same interface, so callers never branch on it.
    """
    tqdm = _bar_class()
    stream = stream if stream is not None else sys.stderr
    if not enabled:
        return tqdm(total=total, desc=desc, unit=unit, disable=True, **kwargs)
    if is_terminal(stream):
        return tqdm(total=total, desc=desc, unit=unit, file=stream, dynamic_ncols=True, **kwargs)
    # Not a terminal: fixed width, no ANSI, throttled by time only (miniters=1 keeps tqdm from
    # skipping the check when updates are rare).
    return tqdm(total=total, desc=desc, unit=unit, file=_LineWriter(stream), ncols=100, ascii=True,
                mininterval=log_interval, maxinterval=log_interval, miniters=1, **kwargs)


def plural(count: int, noun: str, suffix: str = "s") -> str:
    """``plural(1, "epoch")`` is "1 epoch", ``plural(2, "process", "es")`` is "2 processes"."""
    return f"{count} {noun}{suffix if count != 1 else ''}"


def write_line(message: str, stream: Optional[IO[str]] = None) -> None:
    """Print a message without breaking a live progress bar (tqdm.write), on stderr by default.

    A file name that is not UTF-8 reaches Python as lone surrogates, which a strict stream cannot
    encode: such a name is printed with its bytes escaped (``caf\\xe9.abc``) instead of raising.
    """
    if any("\udc80" <= char <= "\udcff" for char in message):
        message = message.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    _bar_class().write(message, file=stream if stream is not None else sys.stderr)
