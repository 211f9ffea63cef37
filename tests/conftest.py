"""Shared test fixtures: paths of the repo, the spec's conformance vectors, script loading, free ports."""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import os
import socket
import time
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def _private_user_cache() -> None:
    """The scripts keep memos (weights hashes) and the API its features in the user cache folder: the suite's,
    and those of the scripts it starts, go to a temporary folder, never the user's (nor is one read there)."""
    import atexit
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="clamp2-tests-cache-")
    os.environ["XDG_CACHE_HOME"] = folder
    atexit.register(shutil.rmtree, folder, ignore_errors=True)


_private_user_cache()
# Reference data copied into the repository (tests/data/README.md says what each file is).
DATA_DIR = REPO_ROOT / "tests" / "data"
SPEC_DIR = DATA_DIR  # state-dict key lists and the language list
VECTORS = DATA_DIR / "vectors"
# The config of the tiny models in tests/data/vectors (tiny_m3.pth, tiny_clamp2.pth), as scripts read it.
TINY_ENV = {"PATCH_LENGTH": "32", "PATCH_NUM_LAYERS": "2", "TOKEN_NUM_LAYERS": "1", "M3_HIDDEN_SIZE": "64",
            "CLAMP2_HIDDEN_SIZE": "48", "MAX_TEXT_LENGTH": "16"}


def load_script(relative_path: str):
    """Import a script such as ``code/train_m3.py`` as a module (no sys.path edits), to call ``main``."""
    path = REPO_ROOT / relative_path
    name = "script_" + relative_path.replace("/", "_").replace(".py", "")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(script, args, capsys):
    """A loaded script's ``main`` on ``args`` (made strings): ``(exit status, stdout, stderr)``."""
    code = script.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def free_port() -> int:
    """A TCP port free on this machine now, for a test's torchrun or process group."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def join_as_rank(rank: int, world_size: int, port: int) -> None:
    """Set the torchrun variables in a process started by ``torch.multiprocessing.spawn``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))


def spawn_ranks(worker, args: tuple, nprocs: int = 2, timeout: float = 180.0) -> None:
    """``torch.multiprocessing.spawn(worker, args, nprocs)`` with a deadline: a rank that hangs (a deadlock
    in torch's gloo teardown was seen once in a full run) fails its test, naming the ranks, instead of
    stalling the suite until CI's limit. A rank that raises or exits non-zero raises as with ``spawn``."""
    import torch.multiprocessing as mp

    context = mp.spawn(worker, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(0.0, deadline - time.monotonic())):
        if time.monotonic() >= deadline:
            stuck = [rank for rank, process in enumerate(context.processes) if process.is_alive()]
            for process in context.processes:
                process.kill()
                process.join(10)
            pytest.fail(f"ranks {stuck} of {nprocs} still running after {timeout:.0f} s: hung")


@contextlib.contextmanager
def run_lock_held(weights):
    """Another process holding the run lock of ``weights`` (a live training run), as a Popen; killed at the end.
    It writes ``pid N on node7`` into the lock file, the holder a refusal names."""
    import subprocess
    import sys

    pytest.importorskip("fcntl")
    hold = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); fcntl.lockf(fd, "
            "fcntl.LOCK_EX); os.write(fd, b'pid %d on node7' % os.getpid()); print('locked', flush=True); "
            "time.sleep(300)")
    holder = subprocess.Popen([sys.executable, "-c", hold, f"{weights}.lock"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def processes_left_running(pids, timeout: float) -> list:
    """Those of ``pids`` still running (not zombies) after up to ``timeout`` s; killed, so a failing test leaves
    none behind (Linux: reads /proc)."""
    import signal

    def running(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.time() + timeout
    alive = [pid for pid in pids if running(pid)]
    while alive and time.time() < deadline:
        time.sleep(0.1)
        alive = [pid for pid in alive if running(pid)]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    return alive


def workers_outliving_a_kill(command: list, signal_name: str, workers_of, count: int = 2, settle: float = 0.0,
                             timeout: float = 60.0) -> list:
    """Start ``command``; once ``workers_of(process)`` names ``count`` worker pids and they have worked ``settle``
    s, kill it with ``signal_name`` (SIGTERM, SIGKILL). The workers still running 15 s later (then killed)."""
    import signal
    import subprocess

    process = subprocess.Popen(command)
    workers: list = []
    try:
        deadline = time.time() + timeout
        while len(workers) < count and time.time() < deadline:
            time.sleep(0.05)
            workers = workers_of(process)
        time.sleep(settle)
        assert len(workers) == count, f"expected {count} workers, found {workers}"
    finally:
        process.send_signal(getattr(signal, signal_name))
        process.wait()
    return processes_left_running(workers, 15)


@pytest.fixture
def vectors() -> Path:
    if not VECTORS.is_dir():
        pytest.fail(f"conformance vectors not found at {VECTORS}: the checkout is incomplete")
    return VECTORS


@pytest.fixture(scope="session")
def tiny_text_dir(tmp_path_factory) -> Path:
    """A 2-layer XLM-R encoder + hand-built Unigram tokenizer, made on the fly (nothing downloaded)."""
    from clamp2.text_model import build_small_text_model

    out = tmp_path_factory.mktemp("tiny_text_model")
    texts = ["a folk tune from scotland", "chorale by johann sebastian bach", "string quartet by mozart",
             "a lively reel in d major", "music piece composed in the baroque period"]
    build_small_text_model(out, texts, hidden_size=32, num_layers=2, num_heads=2, max_positions=40)
    return out


def record_cudnn_attention(monkeypatch) -> list:
    """The ``cudnn_attention`` of every ``Precision.choose`` call a trainer makes from now on (CPU runs ignore it)."""
    from clamp2.training import loop

    chosen = []
    choose = loop.Precision.choose.__func__

    def recording(cls, device, requested, cudnn_attention=False):
        chosen.append(cudnn_attention)
        return choose(cls, device, requested, cudnn_attention)

    monkeypatch.setattr(loop.Precision, "choose", classmethod(recording))
    return chosen



# PyTorch's per-operator fp32 precision flags (2.9 on): cuDNN conv and RNN, CUDA and oneDNN matmul, oneDNN conv.
PRECISION_OPERATORS = (("cudnn", "conv"), ("cudnn", "rnn"), ("cuda", "matmul"), ("mkldnn", "matmul"), ("mkldnn", "conv"))
FP32_FLAGS = ("ieee",) * len(PRECISION_OPERATORS)


def precision_flags():
    """The per-operator flags, as strings ("ieee": fp32; "tf32", "bf16": shortcuts; "none": inherited)."""
    return tuple(getattr(getattr(torch.backends, backend), name).fp32_precision for backend, name in PRECISION_OPERATORS)


def legacy_precision_flags():
    """The legacy view (cudnn.allow_tf32, the matmul precision), "raises" where PyTorch refuses to read it."""
    values = []
    for read in (lambda: torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision):
        try:
            values.append(read())
        except RuntimeError:
            values.append("raises")
    return tuple(values)


def torch_process_state():
    """What one test must not leave changed for the next: defaults, function modes, autocast, precision."""
    return {"default dtype": torch.get_default_dtype(), "default device": torch.get_default_device(),
            "function modes": torch._C._len_torch_function_stack(),  # e.g. set_default_device("cpu") pushes one
            "cpu autocast": torch.is_autocast_enabled("cpu"), "fp32 precision": torch.backends.fp32_precision,
            "precision flags": precision_flags()}


@pytest.fixture(autouse=True)
def torch_state_is_left_as_found(request):
    # A leak shows up in a later test as something else (a DeviceContext mode left by one test doubled the
    # Tensor-method calls another test counted); this names the test that leaked.
    before = torch_process_state()
    yield
    after = torch_process_state()
    assert after == before, f"{request.node.nodeid} changed torch's process state: {before} -> {after}"


@pytest.fixture
def precision_restored():
    """Puts PyTorch's process-wide precision flags back to the defaults after a test that changes them."""
    saved = torch.backends.fp32_precision, legacy_precision_flags(), precision_flags()
    yield
    torch.backends.fp32_precision = saved[0]
    torch.backends.cudnn.allow_tf32, matmul = saved[1]  # readable here: the tests start from consistent flags
    torch.set_float32_matmul_precision(matmul)
    for (backend, name), value in zip(PRECISION_OPERATORS, saved[2]):  # after the legacy setters, which rewrite them
        setattr(getattr(getattr(torch.backends, backend), name), "fp32_precision", value)
    assert (torch.backends.fp32_precision, legacy_precision_flags(), precision_flags()) == saved


@pytest.fixture
def cuda_machine(monkeypatch):
    """ExactFloat32 as where CUDA is: cuDNN's flags are set too (on this machine they govern nothing; no CUDA call)."""
    import clamp2.attention

    monkeypatch.setattr(clamp2.attention, "_cuda_present", lambda: True)


@pytest.fixture
def tf32_allowed(precision_restored):
    """A caller that let TF32 (and bf16 matmuls) in through the legacy switches."""
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("medium")
    yield


def unlistable(monkeypatch, name: str) -> None:
    """``os.scandir`` of a folder called ``name`` raises EACCES: a folder this user may not list (chmod 000),
    which root (these tests' user here) can always list."""
    scandir = os.scandir

    def refusing(path="."):
        if os.fspath(path).endswith(name):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)


class DiskFullAfter:
    """``owner.attribute`` (a write function taking the path first) succeeds ``writes`` times, then raises
    ENOSPC as a full disk does, until :meth:`free`; ``calls`` lists the paths it was given."""

    def __init__(self, monkeypatch, owner, attribute: str, writes: int):
        self.real, self.calls, self.writes = getattr(owner, attribute), [], writes
        monkeypatch.setattr(owner, attribute, self.write)

    def write(self, path, *args, **kwargs):
        self.calls.append(path)
        if self.writes is not None and len(self.calls) > self.writes:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.real(path, *args, **kwargs)

    def free(self) -> None:
        self.writes = None


@pytest.fixture
def tiny_env(monkeypatch):
    """The scripts' config set to :data:`TINY_ENV` for this test."""
    for key, value in TINY_ENV.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="module")
def extract_clamp2():
    return load_script("code/extract_clamp2.py")


@pytest.fixture(scope="module")
def extract_m3():
    return load_script("code/extract_m3.py")
