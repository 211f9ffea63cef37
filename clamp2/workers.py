"""Worker processes that end with the process that started them.

A batch converter's pool, an extraction's tokenizing or decoding DataLoader workers, a training run's
loader workers: when the main process is killed (SIGKILL, or SIGTERM's default action, as a cluster's
preemption sends), nothing in it runs to stop them. Reparented, they wait forever for work that never
comes, or on a pipe full of results nobody reads, holding memory and a slot until the node reboots.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import List, Optional


def exit_with_parent(*_worker_id: int, parent: Optional[int] = None) -> None:
    """Pool initializer or DataLoader ``worker_init_fn``: end this worker once its parent is gone.

    ``parent``: the PID this process was started by, when known from earlier (at once if it is gone already).
    Under the "forkserver" start method (Linux's default from Python 3.14) a worker's parent is the fork server,
    which lives as long as any of its children: the worker then waits on the sentinel of the process that asked
    for it instead (a pipe that process holds open; end of file once it is gone)."""
    sentinel = _requester_sentinel() if parent is None else None
    parent = os.getppid() if parent is None else parent

    def watch() -> None:
        if sentinel is not None:
            from multiprocessing.connection import wait

            wait([sentinel])
        while sentinel is None and os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _requester_sentinel() -> Optional[int]:
    """The sentinel of the process that started this multiprocessing worker when that is not its parent: a fork
    server started it, or the requester died while this worker was starting (a spawned interpreter takes seconds)
    and os.getppid() is already the reaper's. None when the parent is the requester, and outside multiprocessing."""
    import multiprocessing

    requester = multiprocessing.parent_process()
    if requester is None or requester.pid == os.getppid():
        return None
    try:
        return requester.sentinel
    except ValueError:  # no sentinel known
        return None


def ending_with_this_process(command: List[str]) -> List[str]:
    """``command`` (a program and its arguments, the program a path) made to get SIGTERM when this process dies.

    On Linux it starts through a small Python launcher that sets PR_SET_PDEATHSIG, which survives the exec
    (and exits at once if this process is already gone); torchrun ends its workers on the SIGTERM it gets.
    Elsewhere the command is returned as it is.
    """
    if not sys.platform.startswith("linux"):
        return list(command)
    launcher = ("import ctypes, os, signal, sys; ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM); "
                "os.getppid() == int(sys.argv[1]) or sys.exit(143); os.execv(sys.argv[2], sys.argv[2:])")
    return [sys.executable, "-c", launcher, str(os.getpid())] + list(command)
