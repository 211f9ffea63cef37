"""Ctrl-C (SIGINT) on any script: one line on stderr, never a traceback; the process still ends by SIGINT
(a shell's status 130); nothing partial is left and a re-run finishes the work."""

import ast
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT

SCRIPTS = sorted(str(p.relative_to(REPO_ROOT)) for folder in ("process_data", "code", "semantic_search",
                                                               "music_classification")
                 for p in (REPO_ROOT / folder).glob("*.py") if p.name != "config.py")
ONE_LINE = "interrupted; run the same command again to resume (finished outputs are kept)"


def test_an_uncaught_ctrl_c_is_one_line_and_still_ends_the_process_by_sigint():
    code = ("import os, signal, sys, time\n"
            "from clamp2.cli import interrupt_in_one_line\n"
            "interrupt_in_one_line()\n"
            "os.kill(os.getpid(), signal.SIGINT)\n"
            "time.sleep(30)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == -signal.SIGINT
    assert result.stderr.splitlines() == [f"-c: {ONE_LINE}"]


def test_after_the_line_the_process_ends_without_the_slow_interpreter_teardown(tmp_path):
    # The line came at once, but the process then spent 2-13 s (once over 30 s) in the interpreter's teardown
    # (a full garbage collection of torch's objects) before it ended: seen on extract_clamp3/extract_mert
    # with --num_workers 2. Here a slow __del__ stands for that teardown. What must still happen first: the
    # interpreter's join of non-daemon threads (pending writes), every atexit callback, buffered output.
    code = ("import atexit, os, signal, sys, threading, time\n"
            "from clamp2.cli import interrupt_in_one_line\n"
            "interrupt_in_one_line()\n"
            "out = sys.argv[1]\n"
            "class SlowTeardown:\n"
            "    def __del__(self):\n"
            "        time.sleep(60)\n"
            "slow = SlowTeardown()\n"
            "atexit.register(lambda: open(os.path.join(out, 'atexit'), 'w').close())\n"
            "threading.Thread(target=lambda: (time.sleep(0.5), open(os.path.join(out, 'thread'), 'w').close())).start()\n"
            "print('buffered output')\n"
            "os.kill(os.getpid(), signal.SIGINT)\n"
            "time.sleep(60)\n")
    try:
        result = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True,
                                timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail("the process was still tearing the interpreter down 20 s after the Ctrl-C")
    assert result.returncode == -signal.SIGINT
    assert result.stderr.splitlines() == [f"-c: {ONE_LINE}"]
    assert result.stdout == "buffered output\n"
    assert (tmp_path / "thread").exists() and (tmp_path / "atexit").exists()


def test_other_errors_keep_their_traceback():
    code = "from clamp2.cli import interrupt_in_one_line\ninterrupt_in_one_line()\nraise ValueError('x')\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" in result.stderr and "ValueError: x" in result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_turns_ctrl_c_into_one_line_before_it_imports_anything_slow(script):
    # Loading torch takes seconds: a Ctrl-C then must not print a traceback either, so the call comes first.
    body = ast.parse((REPO_ROOT / script).read_text(encoding="utf-8")).body
    body = [node for node in body if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))]
    body = [node for node in body if not (isinstance(node, ast.ImportFrom) and node.module == "__future__")]
    first, second = body[:2]
    assert isinstance(first, ast.ImportFrom) and first.module == "clamp2.cli", script
    assert [alias.name for alias in first.names] == ["interrupt_in_one_line"], script
    assert (isinstance(second, ast.Expr) and isinstance(second.value, ast.Call)
            and getattr(second.value.func, "id", None) == "interrupt_in_one_line"), script


def test_extraction_interrupted_mid_run_is_one_line_and_a_rerun_finishes_it(vectors, tmp_path):
    from test_extract import TINY_ENV, compare_tree

    out = tmp_path / "out"
    # Ctrl-C as the first feature is saved (one file per save, so the rest are still to come).
    wrapper = ("import os, runpy, signal, sys\n"
               "import clamp2.extraction.core as core\n"
               "core.SAVE_GROUP = 1\n"
               "save = core._save_group\n"
               "sent = []\n"
               "def save_then_ctrl_c(group):\n"
               "    errors = save(group)\n"
               "    if not sent:  # one Ctrl-C\n"
               "        sent.append(os.kill(os.getpid(), signal.SIGINT))\n"
               "    return errors\n"
               "core._save_group = save_then_ctrl_c\n"
               "sys.argv = sys.argv[1:]\n"
               "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    args = [str(REPO_ROOT / "code/extract_m3.py"), str(vectors / "extract_in"), str(out),
            "--weights", str(vectors / "tiny_m3.pth"), "--num_workers", "0", "--no_progress", "--batch_size", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", **TINY_ENV)
    result = subprocess.run([sys.executable, "-c", wrapper, *args], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == -signal.SIGINT, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert result.stderr.splitlines()[-1] == f"extract_m3.py: {ONE_LINE}"
    # No partial file; the settings record is written before the first feature.
    assert [p.name for p in out.rglob("*") if p.is_file() and p.suffix != ".npy"] == ["extraction_settings.json"]
    for path in out.rglob("*.npy"):
        np.load(path)
    rerun = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    compare_tree(vectors / "expected" / "feat_m3", out)


def test_ctrl_c_while_torch_loads_numpy_is_not_lost():
    # torch._C imports NumPy itself as it initialises and clears any error that import raises: a Ctrl-C in that
    # second was dropped and the process worked on (under torchrun: a rank waiting 30 s for its peer until
    # killed, or "ImportError: cannot load module more than once per process", or a RecursionError in
    # accelerate). The Ctrl-C is sent here exactly as NumPy imports one of its modules.
    code = ("import os, signal, sys\n"
            "from clamp2.cli import interrupt_in_one_line\n"
            "interrupt_in_one_line()\n"
            "sent = []\n"
            "def at_import(event, args):  # one Ctrl-C (NumPy's modules are imported again after a failure)\n"
            "    if event == 'import' and args[0].endswith('core.numerictypes') and not sent:  # NumPy 2 or 1\n"
            "        sent.append(True)\n"
            "        os.kill(os.getpid(), signal.SIGINT)\n"
            "sys.addaudithook(at_import)\n"
            "import torch\n"
            "print('worked on after the Ctrl-C')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGINT, (result.returncode, result.stdout, result.stderr[-2000:])
    assert result.stderr.splitlines() == [f"-c: {ONE_LINE}"]


def test_ctrl_c_in_a_weakref_callback_is_not_lost():
    # Python prints a KeyboardInterrupt raised in a weakref callback or __del__ as "Exception ignored in ..." and
    # drops it. importlib's module-lock callback runs thousands of times while torch loads: a Ctrl-C seen there
    # was lost (under torchrun the rank then waited for its peer until the launcher killed it, 30 s later).
    code = ("import os, signal, sys, time, weakref\n"
            "from clamp2.cli import interrupt_in_one_line\n"
            "interrupt_in_one_line()\n"
            "class Thing:\n"
            "    pass\n"
            "def callback(ref):\n"
            "    os.kill(os.getpid(), signal.SIGINT)\n"
            "    for _ in range(1000):  # the handler runs inside the callback (at once, or here at the latest)\n"
            "        pass\n"
            "thing = Thing()\n"
            "ref = weakref.ref(thing, callback)\n"
            "del thing\n"
            "for _ in range(100):\n"
            "    time.sleep(0.01)\n"
            "print('worked on after the Ctrl-C')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == -signal.SIGINT, (result.returncode, result.stdout, result.stderr[-2000:])
    assert result.stderr.splitlines() == [f"-c: {ONE_LINE}"]
