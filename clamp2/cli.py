"""What every command-line script shares: one-line usage errors and loading ``code/config.py``.

Scripts exit 0 on success, 1 when some inputs failed (listed), 2 for a usage or configuration
error, which is always one line on stderr (``<script>: error: ...``), never a traceback. Ctrl-C
(SIGINT) is one line too (:func:`interrupt_in_one_line`), and the process still ends by SIGINT, so a
shell sees status 130.
"""

from __future__ import annotations

import argparse
import atexit
import os
import signal
import sys
from pathlib import Path
from types import ModuleType
from typing import NoReturn

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2


def print_names_as_bytes() -> None:
    """stdout writes a file name that is not UTF-8 (``b"\\xff.mid"``, legal on Linux) as its bytes, as ``ls`` does.

    Under a usual ``LANG=en_US.UTF-8`` stdout encodes strictly: a search listing such a file, or a script naming
    it, died with UnicodeEncodeError after its work was done (stderr already escapes them)."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None and (getattr(sys.stdout, "encoding", "") or "").lower().replace("-", "") == "utf8":
        try:
            reconfigure(errors="surrogateescape")
        except (ValueError, OSError):  # a stream that cannot change its error handler: left as it is
            pass


def launched_with_others() -> bool:
    """Whether this process is one of several of a launch (WORLD_SIZE > 1), read before torch loads: a problem it
    finds alone (a node without the input folder) is said once all have met, or the others wait for it."""
    return (os.environ.get("WORLD_SIZE") or "1").strip() not in ("", "0", "1")


def interrupt_in_one_line() -> None:
    """Make an uncaught KeyboardInterrupt (Ctrl-C) print one line instead of a traceback.

    Each script calls it first, before importing torch, so a Ctrl-C while torch loads is covered too.
    Only the printing changes: ``finally`` blocks and context managers have already run, and Python
    still ends the process by SIGINT (a shell's ``$?`` is 130, a parent's ``returncode`` -2). Outputs
    are written atomically and a re-run skips or resumes what is done, which the line says.
    Being every script's first call, it also makes any file name printable (:func:`print_names_as_bytes`).
    """
    print_names_as_bytes()
    previous = sys.excepthook
    if getattr(previous, "one_line_interrupt", False):
        return
    interrupted = []

    def hook(kind, value, traceback):
        if issubclass(kind, KeyboardInterrupt):
            name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "python"
            print(f"{name}: interrupted; run the same command again to resume (finished outputs are kept)",
                  file=sys.stderr, flush=True)
            interrupted.append(True)
            return
        previous(kind, value, traceback)

    def end_now():
        # Registered before anything else, so it runs after every other atexit callback (and after the
        # interpreter has joined its non-daemon threads, e.g. pending feature writes). What is left is
        # the interpreter's teardown: a full garbage collection of torch's and transformers' objects that
        # took 2-13 s after the line above (once over 30 s), the prompt not yet back. End by SIGINT now,
        # as CPython would after that teardown: same status (-2, 130 in a shell), nothing lost.
        if not interrupted or not hasattr(signal, "SIGINT") or os.name != "posix":
            return
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)

    hook.one_line_interrupt = True
    sys.excepthook = hook
    atexit.register(end_now)
    sys.meta_path.insert(0, NumpyBeforeTorch())
    previous_unraisable = sys.unraisablehook

    def unraisable(info):
        # A Ctrl-C that lands in a weakref callback or a __del__ (importlib's module-lock callback runs thousands
        # of times while torch loads) is printed as "Exception ignored in ..." and dropped: the process worked on,
        # and under torchrun the other rank's exit left it waiting for its peer until the launcher killed it 30 s
        # later. Deliver it again, to be raised in the code that runs next.
        if isinstance(info.exc_value, KeyboardInterrupt):
            # Not from here: signal.raise_signal or _thread.interrupt_main would raise it again inside this hook,
            # where it is dropped too. A moment later, from a thread, the main thread is back in ordinary code.
            import _thread
            import threading

            timer = threading.Timer(0.05, lambda: interrupted or _thread.interrupt_main())
            timer.daemon = True
            try:
                timer.start()
                return
            except RuntimeError:  # no new thread at interpreter shutdown: the process is ending anyway
                pass
        previous_unraisable(info)

    sys.unraisablehook = unraisable


class NumpyBeforeTorch:
    """An import finder that imports NumPy, from Python, just before torch is first imported.

    Otherwise torch's C extension imports NumPy itself, while ``torch._C`` initialises, and clears any error
    that import raises (torch 2.13): a Ctrl-C in that second was lost. The process worked on, with NumPy
    half-imported: depending on the instant, as if nothing had happened, or failing later with
    "ImportError: cannot load module more than once per process" or a RecursionError in accelerate's
    ``numpy.__getattr__`` (``error: maximum recursion depth exceeded``). Imported here, a Ctrl-C raises as usual.
    It finds nothing itself (``find_spec`` returns None): importing is left to the other finders."""

    def find_spec(self, name, path=None, target=None):
        if name == "torch" and "numpy" not in sys.modules:
            import importlib

            try:
                importlib.import_module("numpy")
            except ImportError:  # torch without NumPy: nothing to protect
                pass
        return None


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (and a pointer to ``--help``) instead of usage + error."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def fail_usage(message: str) -> NoReturn:
    """Print ``error: message`` on one line and exit with the usage status (2)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


def load_script_config(script_file: str | os.PathLike, report: bool = True) -> ModuleType:
    """``code/config.py`` (beside the script, or the repository's), with environment overrides applied.

    A bad override (misspelt name, wrong type) is one line and exit status 2.
    """
    from clamp2.configuration import ConfigError, load_config

    script = Path(script_file).resolve()
    # Beside the script (code/), the script's own checkout (semantic_search/ of a clone whose clamp2 is installed
    # from a wheel, not editable), then the checkout the package sits in.
    candidates = [script.with_name("config.py"), script.parent.parent / "code" / "config.py", repository_config_path()]
    path = next((candidate for candidate in candidates if candidate.is_file()), None)
    if path is None:
        fail_usage(f"code/config.py not found beside {script.name} nor in its repository ({script.parent.parent}): "
                   "run the script from a clone of the repository, or put a copy of code/config.py beside it")
    try:
        return load_config(path, report=report)
    except (ConfigError, FileNotFoundError) as error:
        fail_usage(str(error))


def repository_config_path() -> Path:
    """The repository's ``code/config.py`` (the package sits beside ``code/`` in a checkout)."""
    return Path(__file__).resolve().parents[1] / "code" / "config.py"
