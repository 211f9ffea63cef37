"""The one module that owns ``torch.distributed``: setup, rank/device info, barrier, teardown.

Reads the variables of ``torchrun`` (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and of the
legacy ``python -m torch.distributed.launch`` (which passes ``--local_rank`` or, with
``--use_env``, LOCAL_RANK). Picks NCCL on CUDA and gloo on CPU. One process without those
variables runs undistributed. Use it as a context manager so teardown happens in ``finally``::

    with distributed_context() as dist_info:
        ...
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import gc
import importlib
import os
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from .workers import exit_with_parent


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def before_process_group(free_at_exit: bool = False) -> None:
    """Call before a process group is made (here or by accelerate), so that teardown can free it, and so that
    this process ends with its launcher.

    ``free_at_exit``: run :func:`teardown` at interpreter exit, for callers without
    :func:`distributed_context` (the extraction scripts return from main() with the group up).

    torch._dynamo's first import keeps ~10 references to a process group that already exists
    (torch 2.13; DDP's constructor and torch.compile import it), so destroy_process_group could not
    free the group and its gloo worker threads outlived teardown. At interpreter exit such a thread,
    still freeing a finished collective's Python tensors, aborted the process now and then
    ("terminate called without an active exception", SIGABRT: a failed run after all the work was
    done). Imported first, it never sees the group. Costs about a second, once per process.

    torchrun starts each process in its own session: a SIGKILLed launcher left them running on, reparented
    (an extraction to the end of its folder, a training beside a re-run's), so each exits once its parent is gone.
    """
    importlib.import_module("torch._dynamo")
    end_with_launcher()
    if free_at_exit:
        atexit.register(teardown)  # atexit runs while the interpreter is whole, before its shutdown


def launched_by_a_launcher() -> bool:
    """Whether torchrun (any number of processes) or ``accelerate launch`` (its one-process launcher too) started
    this process: the variables each sets in every process it starts."""
    return "TORCHELASTIC_RUN_ID" in os.environ or "ACCELERATE_USE_CPU" in os.environ


def end_with_launcher() -> None:
    """End this process once the process that started it is gone (a launcher killed, or interrupted alone: accelerate
    exits on SIGINT without stopping its child, which then worked on to the end of its folder beside a re-run).

    The launcher is the parent noted when the package was imported: one killed during this process's imports is
    gone already. Only in the process that imported it: a child forked after the import has another parent."""
    from . import STARTED_BY

    pid, launcher = STARTED_BY
    exit_with_parent(parent=launcher if pid == os.getpid() else None)


def setup(local_rank_arg: Optional[int] = None, device: Optional[str] = None, timeout_minutes: int = 30) -> DistInfo:
    """Initialise the process group when launched with several processes; return this process's info."""
    world_size = env_int("WORLD_SIZE", 1)
    rank = env_int("RANK", 0)
    local_rank = env_int("LOCAL_RANK", local_rank_arg if local_rank_arg is not None and local_rank_arg >= 0 else 0)
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        torch_device = torch.device("cuda", local_rank)
    else:
        torch_device = torch.device("cpu")
    backend = None
    if world_size > 1:
        backend = "nccl" if use_cuda else "gloo"
        before_process_group()
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(minutes=timeout_minutes))
    elif launched_by_a_launcher():
        end_with_launcher()
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=torch_device, backend=backend)


# How long teardown lets gloo's worker threads run without the GIL before the group is freed (below).
RETIRE_SECONDS = 0.05


def teardown() -> None:
    """Destroy every process group and free it now, joining its worker threads (see :func:`before_process_group`)."""
    global _END_GROUP
    _END_GROUP = None
    if dist.is_available() and dist.is_initialized():
        # A gloo worker thread frees each finished collective (its tensors' Python objects: it needs the GIL)
        # while it holds the group's work lock, and the group's destructor takes that lock while holding the
        # GIL (torch 2.13): if the two meet, the process deadlocks after all its work is done (seen once, in a
        # 2-rank test on 2 loaded cores). Sleeping releases the GIL and the CPU, so the workers finish freeing
        # what they ran before the destructor can run; it narrows the race, which only torch can close.
        time.sleep(RETIRE_SECONDS)
        dist.destroy_process_group()
        gc.collect()  # a group held only by a reference cycle is freed here, not at interpreter exit


@contextlib.contextmanager
def distributed_context(local_rank_arg: Optional[int] = None, device: Optional[str] = None) -> Iterator[DistInfo]:
    info = setup(local_rank_arg, device)
    try:
        yield info
    finally:
        teardown()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# A gloo group for the end-of-run barrier of batch tools (see prepare_end_barrier).
_END_GROUP = None
END_BARRIER_HOURS = 72


def prepare_end_barrier() -> None:
    """Collective, in every process right after the process group is set up (extraction does it).

    torchrun ends every process as soon as one exits non-zero, and a batch tool exits 1 when some
    of its files failed: without a barrier, the process whose shard held a bad file would kill the
    others mid-run. :func:`wait_for_all_processes` waits on this group, whose timeout is days, not
    the default group's 30 minutes (shards can finish far apart).
    """
    global _END_GROUP
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and _END_GROUP is None:
        _END_GROUP = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=END_BARRIER_HOURS))


def wait_for_all_processes(done: bool = True) -> bool:
    """Return once every process has reached this point: whether every one of them passed ``done`` (this
    process's own ``done`` without :func:`prepare_end_barrier`). Every caller reduces, never a plain barrier:
    one process's ``barrier`` met by another's ``all_reduce`` is a collective mismatch."""
    if _END_GROUP is None:
        return done
    flag = torch.tensor([int(done)], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=_END_GROUP)
    return bool(flag.item())


@contextlib.contextmanager
def others_finish_first(what: str = "this process") -> Iterator[None]:
    """Around one process's share of a batch tool's work: an unexpected error in it (not an interrupt) is
    announced at once, and the error propagates only after every process has reached
    :func:`wait_for_all_processes`: torchrun stops every process as soon as one exits non-zero, so one
    process's error (a file that runs the device out of memory) stopped the others mid-share. No-op
    without :func:`prepare_end_barrier`."""
    try:
        yield
    except Exception as exc:
        if _END_GROUP is not None:
            import sys

            print(f"error: {what} stopped: {type(exc).__name__}: {exc}; the other processes finish their "
                  "share first", file=sys.stderr, flush=True)
            wait_for_all_processes(done=False)
        raise


def all_reduce_mean(value: float, device: torch.device) -> float:
    """The mean of a Python number over all processes (itself when undistributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return float(value)
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.item() / dist.get_world_size()


def all_reduce_sum(values, device: torch.device) -> list:
    """Element-wise sums of a list of Python numbers over all processes (float64)."""
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def all_gather_rows(tensor: torch.Tensor, counts) -> torch.Tensor:
    """The rows of every rank in rank order, rank r holding ``counts[r]`` rows (any may be 0); no gradient.

    Ranks pad to the largest count for ``all_gather``, which needs equal shapes; the padding is
    cut off again. Every rank must pass the same ``counts`` and a tensor of the same dtype.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    padded = tensor.new_zeros((max(counts),) + tuple(tensor.shape[1:]))
    padded[:len(tensor)] = tensor
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded)
    return torch.cat([part[:count] for part, count in zip(gathered, counts)])


def gather_objects(obj) -> list:
    """``obj`` of every rank, in rank order (``[obj]`` when undistributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (``obj`` itself when undistributed)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (CPU and every CUDA device) generators."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def deterministic_mode(enabled: bool) -> Iterator[None]:
    """cuDNN's deterministic kernels, no autotuning, while active; previous settings restored.

    This is what the reference's DETERMINISTIC flag sets (besides the seeds). CPU training is then
    bit-reproducible; CUDA runs may still differ in the last bits where kernels add atomically.
    ``torch.use_deterministic_algorithms`` is not used: it also fills every new tensor with NaN
    (``fill_uninitialized_memory``: ~500 extra ``aten::fill_`` calls per small M3 step in the
    profiler) and costs CLaMP 2 ~5% of a CPU step, for no change in the results on the CPU.
    """
    if not enabled:
        yield
        return
    previous = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        yield
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous
