"""Worker processes that end with the process that started them.

A batch converter's pool, an extraction's tokenizing or decoding DataLoader workers, a training run's
loader workers: when the main process is killed (SIGKILL, or SIGTERM's default action, as a cluster's
preemption sends), nothing in it runs to stop them. Reparented, they wait forever for work that never
comes, or on a pipe full of results nobody reads, holding memory and a slot until the node reboots.
"""

from __future__ import annotations

import os
import threading
import time


def exit_with_parent(*_worker_id: int) -> None:
    """Pool initializer or DataLoader ``worker_init_fn``: end this worker once its parent is gone."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()
