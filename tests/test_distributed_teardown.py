"""Teardown frees the process group: no gloo thread outlives ``distributed_context`` (2 real ranks).

A gloo worker thread still alive at interpreter exit can abort the process while freeing a finished
collective's Python tensors (SIGABRT, "terminate called without an active exception"): a run that
had done all its work then failed now and then. The threads must be joined by teardown, also after
DDP (whose constructor imports torch._dynamo, which kept the group alive) and all_gather_object,
and, for the extraction scripts (accelerate's group, no context manager), by the exit handler.
"""

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import free_port, join_as_rank, spawn_ranks

GLOO_THREADS = ("pt_gloo_runloop", "gloo_tcp_loop")

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads thread names from /proc")


def thread_names():
    task = Path("/proc/self/task")
    return sorted((task / tid / "comm").read_text().strip() for tid in os.listdir(task))


def gloo_threads():
    return [name for name in thread_names() if name in GLOO_THREADS]


def worker(rank, world_size, port, out_dir):
    join_as_rank(rank, world_size, port)
    torch.set_num_threads(1)
    from torch.nn.parallel import DistributedDataParallel

    from clamp2.distributed import all_reduce_mean, distributed_context, gather_objects, prepare_end_barrier

    def train_step():  # as the scripts do: the DDP model lives in a function called inside the context
        model = DistributedDataParallel(torch.nn.Linear(4, 2))
        model(torch.randn(3, 4)).sum().backward()
        all_reduce_mean(1.0, torch.device("cpu"))
        gather_objects({"rank": rank})
        return gloo_threads()

    with distributed_context(device="cpu"):
        prepare_end_barrier()  # a second gloo group, held by the module, as extraction makes it
        inside = train_step()
    record = {"inside": inside, "after": gloo_threads()}
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(record))


def test_teardown_joins_gloo_threads(tmp_path):
    spawn_ranks(worker, (2, free_port(), str(tmp_path)))
    for rank in range(2):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert "pt_gloo_runloop" in record["inside"], record  # the check sees the threads while they run
        assert record["after"] == [], f"rank {rank}: gloo threads left after teardown: {record['after']}"


def extraction_worker(rank, world_size, port, out_dir):
    join_as_rank(rank, world_size, port)
    torch.set_num_threads(1)
    import atexit

    from clamp2.distributed import all_reduce_mean, wait_for_all_processes
    from clamp2.extraction.core import process_state

    state, device = process_state("cpu")  # the extraction scripts' setup, through accelerate
    all_reduce_mean(float(state.process_index), device)
    wait_for_all_processes()
    inside = gloo_threads()
    atexit._run_exitfuncs()  # what the interpreter runs first when main() has returned
    record = {"inside": inside, "after": gloo_threads(), "processes": state.num_processes}
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(record))


def test_extraction_frees_its_group_at_exit(tmp_path):
    spawn_ranks(extraction_worker, (2, free_port(), str(tmp_path)))
    for rank in range(2):
        record = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert record["processes"] == 2 and "pt_gloo_runloop" in record["inside"], record
        assert record["after"] == [], f"rank {rank}: gloo threads left at exit: {record['after']}"


def hanging_worker(rank, seconds):
    if rank == 1:
        time.sleep(seconds)


def test_a_hung_rank_fails_its_test_by_the_deadline_and_is_killed():
    started = time.monotonic()
    # Rank 0 returns at once, but on a loaded machine its start (a spawned interpreter importing torch) can
    # itself take 5 s: it may be listed too; the hung rank 1 must be.
    with pytest.raises(pytest.fail.Exception, match=r"ranks \[(0, )?1\] of 2 still running after 5 s: hung"):
        spawn_ranks(hanging_worker, (600,), timeout=5)
    assert time.monotonic() - started < 60  # not the worker's 600 s
