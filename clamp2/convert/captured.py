"""abctoolkit one conversion at a time, its printed diagnostics captured for the converting thread alone.

abctoolkit keeps module-level state (xml2abc's ``abcOut``, abc2xml's ``prevloc``/``mxm``) and prints what it cannot
read to stdout/stderr, which the converters capture to report it. Two threads sharing one model (a service) used to
fail each other's files and, with ``contextlib.redirect_stdout``, leave ``sys.stdout`` a buffer for good and swallow
every other thread's output while a conversion ran. Here conversions hold one re-entrant lock (conversions nest), and
the capture swaps in a stream that sends the converting thread's writes to its buffer and every other thread's to
the stream that was there.
"""

from __future__ import annotations

import collections
import contextlib
import os
import sys
import threading
from typing import Iterator, TextIO

_LOCK = threading.RLock()
_RETIRED: collections.deque = collections.deque(maxlen=64)


def _new_lock_after_fork() -> None:
    # A child forked while another thread converts (DataLoader workers of a threaded service) would inherit the
    # lock held by a thread it does not have, and wait for it forever.
    global _LOCK
    _LOCK = threading.RLock()


os.register_at_fork(after_in_child=_new_lock_after_fork)


@contextlib.contextmanager
def one_conversion() -> Iterator[None]:
    """Hold the converters' lock (re-entrant) for the ``with`` block."""
    lock = _LOCK
    with lock:
        yield


class _ThreadRouted:
    """A text stream that writes the ``owner`` thread's output to ``capture`` and other threads' to ``target``."""

    def __init__(self, target: TextIO, capture: TextIO, owner: int):
        self._target, self._capture, self._owner = target, capture, owner

    def _stream(self) -> TextIO:
        return self._capture if threading.get_ident() == self._owner else self._target

    def write(self, text: str) -> int:
        return self._stream().write(text)

    def flush(self) -> None:
        self._stream().flush()

    def __getattr__(self, name: str):
        return getattr(self._stream(), name)


@contextlib.contextmanager
def captured(stream_name: str, buffer: TextIO) -> Iterator[TextIO]:
    """This thread's writes to ``sys.<stream_name>`` ("stdout" or "stderr") go to ``buffer`` for the block, under
    the converters' lock (the swap of the process-wide name is then undone in order)."""
    with one_conversion():
        previous = getattr(sys, stream_name)
        routed = _ThreadRouted(previous, buffer, threading.get_ident())
        setattr(sys, stream_name, routed)
        try:
            yield buffer
        finally:
            setattr(sys, stream_name, previous)
            routed._capture = previous  # its buffer is not held below
            # Kept alive: CPython 3.11's print() holds sys.stdout by a borrowed reference, so another thread in
            # the middle of a print would write through a freed stream (a segmentation fault, seen in the tests).
            _RETIRED.append(routed)
