"""clamp2.workers: worker processes end with the process that started them, under every start method."""

import multiprocessing
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, processes_left_running

# Two pool workers with the package's initializer, busy; their pids printed, then the process waits to be killed.
POOL = ("import multiprocessing, sys, time\n"
        "sys.path.insert(0, sys.argv[2])\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "from clamp2.workers import exit_with_parent\n"
        "pool = ProcessPoolExecutor(2, mp_context=multiprocessing.get_context(sys.argv[1]),\n"
        "                           initializer=exit_with_parent)\n"
        "futures = [pool.submit(time.sleep, 0.5) for _ in range(4)]\n"
        "futures[0].result()\n"
        "print(*[p.pid for p in multiprocessing.active_children()], flush=True)\n"
        "time.sleep(300)\n")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
@pytest.mark.parametrize("method", [m for m in ("fork", "spawn", "forkserver")
                                    if m in multiprocessing.get_all_start_methods()])
def test_pool_workers_end_with_a_killed_parent_under_every_start_method(method):
    # Under "forkserver" (Linux's default from Python 3.14) a worker's parent is the fork server, and the fork server
    # lives as long as any of its children: watching os.getppid() left the workers running forever after a SIGKILL.
    process = subprocess.Popen([sys.executable, "-c", POOL, method, str(REPO_ROOT)], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(pid) for pid in process.stdout.readline().split()]
    finally:
        process.kill()
        process.wait()
    assert len(pids) == 2, pids
    alive = processes_left_running(pids, 8)
    assert not alive, f"{method}: pool workers {alive} outlived the killed process"


# The process asks for one worker and is killed at once, before the worker (still starting: a spawned interpreter
# takes a while) has run its initializer.
KILLED_AT_ONCE = ("import multiprocessing, os, signal, sys\n"
                  "sys.path.insert(0, sys.argv[2])\n"
                  "from concurrent.futures import ProcessPoolExecutor\n"
                  "from clamp2.workers import exit_with_parent\n"
                  "pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context(sys.argv[1]), "
                  "initializer=exit_with_parent)\n"
                  "pool.submit(os.getpid)\n"
                  "open(sys.argv[3], 'w').write(' '.join(str(p.pid) for p in multiprocessing.active_children()))\n"
                  "os.kill(os.getpid(), signal.SIGKILL)\n")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
@pytest.mark.parametrize("method", [m for m in ("spawn", "forkserver") if m in multiprocessing.get_all_start_methods()])
def test_a_worker_whose_parent_died_while_it_started_ends(method, tmp_path):
    # The initializer took os.getppid() as the parent to watch: read after the parent's death it was the reaper's
    # pid (1), and the worker waited on its task queue forever.
    subprocess.run([sys.executable, "-c", KILLED_AT_ONCE, method, str(REPO_ROOT), str(tmp_path / "pids")], timeout=60)
    pids = [int(pid) for pid in (tmp_path / "pids").read_text().split()]
    assert len(pids) == 1, pids
    alive = processes_left_running(pids, 10)
    assert not alive, f"{method}: the worker {alive} outlived its killed parent"
