"""The one parallel batch runner behind every per-file converter (process_data/batch_*.py).

Users convert tens of thousands of files at once, so a run must survive any single file:

- inputs are found recursively and each gets ``<output_dir>/<same relative folder>/<stem><suffix>``;
  an output that exists and is not empty is skipped unless ``overwrite`` (so re-running converts
  only what is missing), and two inputs that would share an output (``a.mid`` and ``a.midi``) are a failure
  for the second instead of a silent overwrite;
- files are converted in worker processes (all cores by default; with one worker, in this
  process), each output is written atomically (``clamp2.files``), so no partial file is ever
  left behind;
- a file whose conversion raises is a failure, reported on stderr and as
  ``relative/path<TAB>reason`` in ``<output_dir>/failed_<tool>.log`` (rewritten by every run,
  flushed per line); a worker process that dies (crash, out-of-memory kill) fails only the file
  it was converting: the files in flight beside it are retried one by one;
- with ``file_timeout`` (``--file_timeout SECONDS``), a conversion still running after that long is stopped and
  its file fails (a crafted MIDI of a few MB keeps mido reading for hours; abc2xml on a tune of 100,000 bars
  for many minutes): Python code is interrupted where it is; code that does not come back to Python (a C call)
  has its worker process ended a little later, and the files beside it are retried, as after a crash;
- ``UserWarning``\\ s a conversion issues (e.g. unaligned bars) go to
  ``<output_dir>/warnings_<tool>.log`` in the same format, and the file still counts as converted (a re-run keeps
  the lines of the files it skips, so a resumed run's log is an uninterrupted run's);
- a run killed from outside (SIGTERM, SIGKILL) leaves at most temporary files, which the re-run removes, and
  its worker processes exit with it;
- the run ends with one line ``converted N, skipped N, failed N``; the exit status is 0 when
  nothing failed, 1 when a file failed, 2 for a usage error (no input folder, no matching files,
  an output folder that would overwrite the inputs).

A conversion is any picklable callable ``convert(input_path) -> str | bytes`` (a module-level
function or a ``functools.partial`` of one); ``str`` is written as UTF-8 with no newline
translation.

Public API: :func:`add_batch_arguments`, :func:`batch_argument_parser`, :func:`batch_options`,
:func:`positive_int`, :func:`positive_seconds`, :func:`plan_jobs`, :func:`run_batch`, :func:`convert_folder`, :class:`Job`, :class:`BatchResult`,
:class:`BatchUsageError`.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import signal
import sys
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from clamp2.cli import ArgumentParser
from clamp2.files import (ONE_FILE_THERE, DiskFull, atomic_path, atomic_write_bytes, atomic_write_text,
                          disk_full_error, find_files, finished_output, input_problem, log_line,
                          lower_case_extensions_first, mirror_path, output_aliases, output_problem, read_file_log,
                          remove_partial_files, remove_partial_files_of, say_disk_full, unlink_if_link, unreachable,
                          write_file_log)
from clamp2.workers import exit_with_parent

Convert = Callable[[Path], "str | bytes"]

EXIT_OK, EXIT_FAILURES, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
# Enough queued work to keep every worker busy without holding a future per file of a huge batch.
TASKS_PER_WORKER = 4
MAX_REASON_LENGTH = 2000


class BatchUsageError(ValueError):
    """The command line cannot be run as given (exit status 2)."""


@dataclass(frozen=True)
class Job:
    source: Path
    target: Path
    name: str  # what reports show: the source relative to the input folder, POSIX style


@dataclass
class BatchResult:
    converted: int = 0
    skipped: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[tuple[str, str]] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return len(self.failures)

    @property
    def exit_code(self) -> int:
        return EXIT_FAILURES if self.failures else EXIT_OK

    def summary(self) -> str:
        return f"converted {self.converted}, skipped {self.skipped}, failed {self.failed}"


@dataclass(frozen=True)
class FileOutcome:
    # Plain strings only: an exception object may not survive pickling back from a worker.
    ok: bool
    reason: str = ""
    warnings: tuple[str, ...] = ()
    # The output of a conversion with warnings: the main process writes it once their lines are logged, so a run
    # killed in between (SIGTERM, SIGKILL; a worker outlives its parent by up to half a second) cannot leave an
    # output that a re-run skips without its warnings.
    data: "str | bytes | None" = None
    # The output's file system is full: every later file would fail the same way, so the batch stops.
    disk_full: bool = False


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


MAX_FILE_TIMEOUT = 1e9  # hard_limit() of it, 1.5e9 s, still fits a 32-bit time_t


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    if value > MAX_FILE_TIMEOUT:  # the alarm and the watchdog take at most about 2^63 ns (2^31 s where time_t is 32-bit)
        raise argparse.ArgumentTypeError(f"at most {MAX_FILE_TIMEOUT:g} seconds, got {text} (leave it out for no limit)")
    return value


def add_batch_arguments(parser: argparse.ArgumentParser, input_kind: str, output_kind: str) -> None:
    """The arguments every batch converter shares: input_dir output_dir [--workers N] [--overwrite]
    [--file_timeout SECONDS] [--no_progress] (:func:`batch_options` passes them on to :func:`convert_folder`)."""
    parser.add_argument("input_dir", help=f"folder of {input_kind} files (searched recursively)")
    parser.add_argument("output_dir",
                        help=f"folder for the {output_kind} files, mirroring input_dir's sub-folders")
    parser.add_argument("--workers", type=positive_int, default=None,
                        help="worker processes (default: all cores, os.cpu_count())")
    parser.add_argument("--overwrite", action="store_true",
                        help="convert again files whose output exists (default: skip them)")
    parser.add_argument("--file_timeout", type=positive_seconds, default=None, metavar="SECONDS",
                        help="stop a file's conversion after this many seconds and count it as failed, so that "
                             "one pathological file cannot hold up the batch (default: no limit, as the original)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")


def batch_options(args: argparse.Namespace) -> dict:
    """The keyword arguments of :func:`convert_folder` that :func:`add_batch_arguments` parsed."""
    return dict(workers=args.workers, overwrite=args.overwrite, file_timeout=args.file_timeout,
                progress=not args.no_progress)


def batch_argument_parser(description: str, input_kind: str, output_kind: str) -> argparse.ArgumentParser:
    parser = ArgumentParser(description=description)
    add_batch_arguments(parser, input_kind, output_kind)
    return parser


def one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_REASON_LENGTH else text[:MAX_REASON_LENGTH] + "..."


def describe_error(error: BaseException) -> str:
    message = str(error)
    return one_line(f"{type(error).__name__}: {message}" if message else type(error).__name__)


def is_within(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
    except ValueError:
        return False
    return True


def physical_paths() -> Callable[[Path], str]:
    """``str(path.resolve())`` for many paths, each folder resolved once: ``resolve()`` walks every component of
    every path, and took nine tenths of planning a batch (9 s per 100,000 files in 100 folders)."""
    folders: dict[Path, str] = {}

    def physical(path: Path) -> str:
        if os.path.islink(path):
            return os.fspath(path.resolve())
        folder = folders.get(path.parent)
        if folder is None:
            folder = folders[path.parent] = os.path.realpath(path.parent)
        return os.path.join(folder, path.name)

    return physical


def plan_jobs(input_dir: str | os.PathLike, output_dir: str | os.PathLike, extensions: Iterable[str],
              output_suffix: str) -> tuple[list[Job], list[tuple[str, str]]]:
    """Jobs for every matching input, and ``(name, reason)`` for inputs that cannot have one.

    Raises :class:`BatchUsageError` when the input folder is missing, holds no matching file, or
    an output would be written over its own input.
    """
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    problem = unreachable(input_dir, "input folder") or unreachable(output_dir, "output folder")
    if problem:
        raise BatchUsageError(problem)
    if not input_dir.exists():
        raise BatchUsageError(f"input folder {input_dir} does not exist")
    if output_dir.exists() and not output_dir.is_dir():
        raise BatchUsageError(f"output folder {output_dir} is a file")
    # Before any work: a folder this user may not list is not "no files" or one failure named ".", and an output
    # folder it may not create (a read-only parent) is not a PermissionError traceback after the listing.
    problem = (input_problem(input_dir) if input_dir.is_dir() else None) or output_problem(output_dir, folder=True,
                                                                                            what="output")
    if problem:
        raise BatchUsageError(problem)
    resolved_output = os.fspath(output_dir.resolve())
    # A folder that cannot be listed, a FIFO or device with a wanted suffix: failures, not silently left out.
    problems: list[tuple[Path, str]] = []
    sources = find_files(input_dir, extensions, problems)
    physical = physical_paths()
    if input_dir.is_dir() and resolved_output != os.fspath(input_dir.resolve()):
        # An output folder inside the input folder must not feed its outputs back in as inputs.
        inside = resolved_output + os.sep
        sources = [s for s in sources if not physical(s).startswith(inside)]
    if not sources and not problems:
        raise BatchUsageError(f"no {'/'.join(extensions)} files under {input_dir}")

    jobs: list[Job] = []
    rejected: list[tuple[str, str]] = [
        (path.relative_to(input_dir).as_posix() if is_within(path, input_dir) else str(path), reason)
        for path, reason in problems]
    claimed: dict[Path, str] = {}
    for source in lower_case_extensions_first(sources):
        name = source.relative_to(input_dir).as_posix() if input_dir.is_dir() else source.name
        target = mirror_path(source, input_dir, output_dir, output_suffix)
        if physical(target) == physical(source):
            raise BatchUsageError(f"output {target} would overwrite its input: choose another output folder")
        if target in claimed:
            rejected.append((name, f"same output {target.name} as {claimed[target]}"))
            continue
        claimed[target] = name
        jobs.append(Job(source, target, name))
    aliases = output_aliases(job.target for job in jobs)  # Song.mtf and song.mtf on macOS or Windows
    rejected += [(job.name, f"same output {job.target.name} as {claimed[aliases[job.target]]} ({ONE_FILE_THERE})")
                 for job in jobs if job.target in aliases]
    return [job for job in jobs if job.target not in aliases], rejected


def is_about_the_file(category: type[Warning]) -> bool:
    # Deprecation notices of libraries (pyparsing's are UserWarnings too) say nothing about the file.
    return (issubclass(category, UserWarning)
            and not issubclass(category, (DeprecationWarning, PendingDeprecationWarning)))


class FileTimeout(BaseException):
    """A conversion ran past its time limit. A BaseException, as KeyboardInterrupt: a converter's own
    ``except Exception`` (a fallback parser, a retry) must not take it for a bad file and go on."""


# A conversion that the alarm cannot interrupt (inside a C call that never returns to Python) gets this much longer,
# then its worker process is ended from a watchdog thread.
def hard_limit(seconds: float) -> float:
    return seconds + max(2.0, seconds / 2)


_watchdog_output = None


@contextlib.contextmanager
def time_limit(seconds: float | None):
    """Raise :class:`FileTimeout` in the code run inside after ``seconds`` (None: no limit); end the process
    after :func:`hard_limit` seconds if that code never comes back to Python. For worker processes only (the
    second part exits the process), run in their main thread (signals)."""
    if seconds is None:
        yield
        return
    import faulthandler

    global _watchdog_output

    def stop(signum, frame):
        raise FileTimeout

    if _watchdog_output is None:
        # faulthandler writes the stuck stack before it exits: not into the user's terminal.
        _watchdog_output = open(os.devnull, "w")
    previous = signal.signal(signal.SIGALRM, stop)
    try:
        # Armed inside the try: an alarm due at once (a tiny limit, a descheduled worker) raises here, and the
        # finally still cancels the watchdog (left armed, it ended the worker during its next file).
        faulthandler.dump_traceback_later(hard_limit(seconds), exit=True, file=_watchdog_output)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        yield
    finally:
        # The alarm may come due in here, even at a function's first line (signal.signal itself runs pending handlers
        # first, then leaves the old one installed): once, as the timer does not repeat. A second pass then completes.
        try:
            _disarm(previous)
        except FileTimeout:
            _disarm(previous)
            raise


def _disarm(previous) -> None:
    import faulthandler

    signal.setitimer(signal.ITIMER_REAL, 0)
    faulthandler.cancel_dump_traceback_later()
    signal.signal(signal.SIGALRM, previous)


def timed_out(seconds: float) -> str:
    return f"conversion stopped after {seconds:g} s (--file_timeout); a larger limit may convert it"


def convert_file(convert: Convert, source: Path, target: Path, file_timeout: float | None = None) -> FileOutcome:
    """Convert one file and write its output atomically; never raises for a bad file."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with time_limit(file_timeout):
                    data = convert(source)
            except FileTimeout:
                return FileOutcome(False, timed_out(file_timeout))
        if not isinstance(data, (str, bytes, bytearray)):
            raise TypeError(f"conversion returned {type(data).__name__}, not str or bytes")
        data = data if isinstance(data, str) else bytes(data)
        notes = tuple(one_line(str(w.message)) for w in caught if is_about_the_file(w.category))
        if notes:
            return FileOutcome(True, warnings=notes, data=data)
        write_output(target, data)
    except Exception as error:  # noqa: BLE001 - one bad file must never cost the batch
        full = disk_full_error(error)
        if full is not None:
            return FileOutcome(False, f"cannot write {target}: {full.strerror}", disk_full=True)
        return FileOutcome(False, describe_error(error))
    return FileOutcome(True)


def write_output(target: Path, data: "str | bytes") -> None:
    if isinstance(data, str):
        atomic_write_text(target, data)
    else:
        atomic_write_bytes(target, data)


def new_pool(workers: int) -> ProcessPoolExecutor:
    return ProcessPoolExecutor(max_workers=workers, initializer=exit_with_parent)


WORKER_DIED = "worker process died while converting this file (crash or out of memory)"


def convert_in_own_process(convert: Convert, job: Job, file_timeout: float | None = None) -> FileOutcome:
    with new_pool(1) as executor:
        started = time.monotonic()
        try:
            return executor.submit(convert_file, convert, job.source, job.target, file_timeout).result()
        except BrokenProcessPool:
            if file_timeout is not None and time.monotonic() - started >= hard_limit(file_timeout):
                return FileOutcome(False, timed_out(file_timeout))  # the watchdog ended it
            return FileOutcome(False, WORKER_DIED)


def run_in_pool(convert: Convert, jobs: list[Job], workers: int,
                on_outcome: Callable[[Job, FileOutcome], None], file_timeout: float | None = None) -> None:
    queue = iter(jobs)
    executor = new_pool(workers)
    in_flight: dict = {}
    try:
        while True:
            while len(in_flight) < workers * TASKS_PER_WORKER:
                job = next(queue, None)
                if job is None:
                    break
                in_flight[executor.submit(convert_file, convert, job.source, job.target, file_timeout)] = job
            if not in_flight:
                break
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            suspects = []
            for future in done:
                job = in_flight.pop(future)
                try:
                    outcome = future.result()
                except BrokenProcessPool:
                    suspects.append(job)
                    continue
                except Exception as error:  # noqa: BLE001 - e.g. a conversion that cannot be pickled
                    outcome = FileOutcome(False, describe_error(error))
                on_outcome(job, outcome)
            if suspects:
                # A worker died and took the pool with it. Any file in flight may be the culprit:
                # each one is retried alone, so only the culprit fails, then a fresh pool goes on.
                suspects.extend(in_flight.values())
                in_flight.clear()
                executor.shutdown(wait=True, cancel_futures=True)
                for job in suspects:
                    # The pool's teardown kills the other workers too, maybe mid-write.
                    remove_partial_files(job.target)
                    on_outcome(job, convert_in_own_process(convert, job, file_timeout))
                executor = new_pool(workers)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def run_batch(jobs: list[Job], convert: Convert, *, output_dir: str | os.PathLike, tool: str,
              workers: int | None = None, overwrite: bool = False,
              rejected: Iterable[tuple[str, str]] = (), progress: bool = True,
              file_timeout: float | None = None) -> BatchResult:
    """Run ``convert`` over ``jobs`` (see the module docstring for what happens to each file).

    Failures and warnings are logged in ``output_dir/failed_<tool>.log`` and
    ``output_dir/warnings_<tool>.log``; ``rejected`` are ``(name, reason)`` failures known before
    the run (see :func:`plan_jobs`). ``workers`` defaults to ``os.cpu_count()``. ``file_timeout``: seconds
    a file's conversion may take (None: no limit); conversions then run in worker processes, even with one worker.
    """
    if file_timeout is not None and not hasattr(signal, "setitimer"):
        raise BatchUsageError("--file_timeout needs a POSIX system (Linux, macOS): leave it out here")
    from clamp2.progress import progress_bar, write_line

    output_dir = Path(output_dir)
    workers = workers or os.cpu_count() or 1
    result = BatchResult()
    todo = []
    for job in jobs:
        if not overwrite and finished_output(job.target):
            result.skipped += 1
        else:
            todo.append(job)

    output_dir.mkdir(parents=True, exist_ok=True)
    logs = (output_dir / f"failed_{tool}.log", output_dir / f"warnings_{tool}.log")
    # What a run killed mid-write (SIGKILL, SIGTERM) left: the temporary files of this run's outputs and logs.
    remove_partial_files_of([job.target for job in jobs] + list(logs))
    # The warnings of the files skipped (converted by an earlier, maybe killed, run) stay in the rewritten log.
    skipped_names = {job.name for job in jobs} - {job.name for job in todo}
    kept_warnings = [entry for entry in read_file_log(logs[1]) if entry[0] in skipped_names] if skipped_names else []
    for log in logs:  # a log name that is a link is replaced, as outputs are: never written through to its target
        unlink_if_link(log)
    # surrogateescape: a file name that is not UTF-8 is logged as its bytes (strict encoding raised mid-run).
    with open(output_dir / f"failed_{tool}.log", "w", encoding="utf-8", errors="surrogateescape", newline="\n") \
            as failure_log, \
            open(output_dir / f"warnings_{tool}.log", "w", encoding="utf-8", errors="surrogateescape", newline="\n") \
            as warning_log, \
            progress_bar(total=len(todo), desc=tool, unit="file", enabled=progress) as bar:

        def fail(name: str, reason: str) -> None:
            result.failures.append((name, reason))
            failure_log.write(log_line(name, reason))
            failure_log.flush()
            write_line(f"failed: {name}: {reason}")

        def log_warnings(job: Job, outcome: FileOutcome) -> None:
            for note in outcome.warnings:
                warning_log.write(log_line(job.name, note))
            warning_log.flush()

        def record(job: Job, outcome: FileOutcome) -> None:
            if outcome.ok and outcome.data is not None:
                try:  # the warnings' lines first, then the output renamed into place
                    with atomic_path(job.target) as tmp:
                        with open(tmp, "wb") as f:
                            f.write(outcome.data.encode("utf-8") if isinstance(outcome.data, str) else outcome.data)
                        log_warnings(job, outcome)
                except Exception as error:  # noqa: BLE001 - as a failed write in a worker
                    full = disk_full_error(error)
                    outcome = FileOutcome(False, f"cannot write {job.target}: {full.strerror}" if full
                                          else describe_error(error), disk_full=full is not None)
            elif outcome.ok:
                log_warnings(job, outcome)
            if outcome.ok:
                result.converted += 1
                result.warnings.extend((job.name, note) for note in outcome.warnings)
            elif outcome.disk_full:
                raise DiskFull(outcome.reason)
            else:
                fail(job.name, outcome.reason)
            bar.update(1)

        for name, reason in kept_warnings:
            result.warnings.append((name, reason))
            warning_log.write(log_line(name, reason))
        warning_log.flush()
        for name, reason in rejected:
            fail(name, reason)
        if (workers == 1 or len(todo) <= 1) and file_timeout is None:
            # In-process: no start-up cost, and the converters reset their libraries' state per call. A time limit
            # needs a worker process: it may end the process that runs the conversion.
            for job in todo:
                record(job, convert_file(convert, job.source, job.target))
        elif todo:
            run_in_pool(convert, todo, min(workers, len(todo)), record, file_timeout)
    # The logs were written as files finished (a killed run keeps them); workers finish in any order, so
    # a complete run rewrites them sorted by file: the same inputs give the same logs, run after run.
    for name, entries in ((f"failed_{tool}.log", result.failures), (f"warnings_{tool}.log", result.warnings)):
        if len(entries) > 1:
            write_file_log(output_dir / name, entries)
    return result


def convert_folder(input_dir: str | os.PathLike, output_dir: str | os.PathLike, *, convert: Convert,
                   extensions: Iterable[str], output_suffix: str, tool: str, workers: int | None = None,
                   overwrite: bool = False, progress: bool = True, file_timeout: float | None = None) -> int:
    """The whole command line of a batch converter; returns its exit status (0, 1, 2; 130 on Ctrl-C)."""
    extensions = tuple(extensions)
    try:
        jobs, rejected = plan_jobs(input_dir, output_dir, extensions, output_suffix)
        if file_timeout is not None and not hasattr(signal, "setitimer"):
            raise BatchUsageError("--file_timeout needs a POSIX system (Linux, macOS): leave it out here")
    except BatchUsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    try:
        result = run_batch(jobs, convert, output_dir=output_dir, tool=tool, workers=workers,
                           overwrite=overwrite, rejected=rejected, progress=progress, file_timeout=file_timeout)
    except KeyboardInterrupt:
        # Outputs written so far are complete files; a re-run converts only the rest.
        print("interrupted: run the same command again to convert the remaining files", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as error:
        # A full disk fails every later file too: one line and stop, not a failure per file (or a traceback
        # when the failure log itself can no longer be written).
        full = disk_full_error(error)
        if full is None:
            raise
        where = "" if isinstance(full, DiskFull) else f" writing in {output_dir}"
        say_disk_full(f"{full.strerror}{where}", "convert the remaining files")
        return EXIT_FAILURES
    output_dir = Path(output_dir)
    if result.failures:
        print(f"{result.failed} failed files listed in {output_dir / f'failed_{tool}.log'}", file=sys.stderr)
    if result.warnings:
        print(f"{len(result.warnings)} warnings listed in {output_dir / f'warnings_{tool}.log'}",
              file=sys.stderr)
    print(result.summary())
    return result.exit_code
