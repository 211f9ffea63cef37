"""File discovery, output-path mirroring and atomic writes: the one place batch scripts share.

Every batch tool in this project walks an input folder recursively, writes one output per input
under the same relative folder of an output folder, skips outputs that already exist and are not
empty (so a re-run resumes), and never leaves a truncated file behind (write to a temporary name
in the same folder, then ``os.replace``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import json
import os
import re
import secrets
import socket
import sys
import time
import unicodedata
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple


def normalize_extensions(extensions: Iterable[str]) -> tuple[str, ...]:
    return tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)


def find_files(root: str | os.PathLike, extensions: Iterable[str],
               problems: Optional[List[Tuple[Path, str]]] = None) -> list[Path]:
    """All files under ``root`` (recursively) whose suffix is one of ``extensions``, sorted.

    Matching is case-insensitive; hidden files and folders (name starting with ``.``) and our own
    temporary files are ignored, and links to folders are not followed (as ``os.walk``). Sorting
    makes the order, and so every run, deterministic. What cannot be searched or read is left out
    and, when ``problems`` is given, added to it as ``(path, reason)``: a folder that cannot be
    listed (its files would be missed without a word), and a FIFO, socket or device with a wanted
    suffix (reading a FIFO waits forever). A broken link is listed: reading it says what is wrong.
    """
    root = Path(root)
    wanted = normalize_extensions(extensions)
    if root.is_file():
        return [root] if root.suffix.lower() in wanted else []
    found = []
    folders = [os.fspath(root)]
    while folders:
        folder = folders.pop()
        try:
            with os.scandir(folder) as listing:
                entries = list(listing)
        except OSError as error:
            if problems is not None:
                problems.append((Path(folder), f"cannot list this folder: {error.strerror or error}; "
                                               "its files were not searched"))
            continue
        for entry in entries:
            name = entry.name
            if name.startswith("."):
                continue
            # The entry's type comes with the listing (no stat, except for links): as cheap as os.walk.
            if _is(entry.is_dir):
                if not _is(entry.is_symlink):
                    folders.append(entry.path)
            elif not name.endswith(TMP_SUFFIX) and os.path.splitext(name)[1].lower() in wanted:
                if _is(entry.is_file) or not os.path.exists(entry.path):  # a regular file, or a broken link
                    found.append(Path(entry.path))
                elif problems is not None:
                    problems.append((Path(entry.path), f"not a regular file ({_special_kind(entry.path)}); "
                                                       "skipped"))
    return sorted(found)


def _is(test) -> bool:
    try:
        return test()
    except OSError:  # gone meanwhile, or a link we may not follow
        return False


def _special_kind(path: str) -> str:
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError:
        return "unreadable"
    return "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"


_CASE_INSENSITIVE_PATHS = os.name == "nt"


def _fold(parts) -> tuple:
    """Path parts as ``relative_to`` compares them: lower-cased on Windows, as they are elsewhere."""
    return tuple(part.lower() for part in parts) if _CASE_INSENSITIVE_PATHS else tuple(parts)


def mirror_path(input_path: str | os.PathLike, input_root: str | os.PathLike,
                output_root: str | os.PathLike, new_suffix: str) -> Path:
    """``output_root / <input's folder relative to input_root> / <stem><new_suffix>``."""
    input_path, input_root = Path(input_path), Path(input_root)
    # parts arithmetic rather than relative_to/parent/stem Paths: this runs once per input, and
    # a corpus of a million short tunes spent a minute here (same result, lexically as relative_to).
    parts, root_parts = input_path.parts, input_root.parts
    if len(parts) > len(root_parts) and _fold(parts[:len(root_parts)]) == _fold(root_parts) and \
            _fold((input_path.anchor,)) == _fold((input_root.anchor,)):
        folders = parts[len(root_parts):-1]
    else:  # the input is the root itself (a single file given as the "root"), or outside it
        folders = ()
    return Path(output_root, *folders, input_path.stem + new_suffix)


def lower_case_extensions_first(paths: Iterable[Path]) -> List[Path]:
    """``paths`` with those whose extension is in lower case first, each group in its given order.

    The original converters take lower-case extensions only: of ``song.MID`` and ``song.mid``, which share an
    output, they convert ``song.mid``. Claiming outputs in this order converts the same one here, where path
    order alone would pick ``song.MID`` (upper case sorts first).
    """
    return sorted(paths, key=lambda path: path.suffix != path.suffix.lower())


def mirror_outputs(paths: Iterable[Path], input_root: str | os.PathLike, output_root: str | os.PathLike,
                   new_suffix: str) -> Tuple[Dict[Path, Path], List[Tuple[Path, str]]]:
    """``({input: output}, [(input, why)])``: each input's :func:`mirror_path`, unless inputs share one.

    ``a.mid`` and ``a.midi`` (or ``a.wav`` and ``a.flac``) in one folder would write the same
    ``a.npy``: every input of such a group is a failure naming them all, never a silent overwrite.
    Inputs keep their order.
    """
    by_output: Dict[Path, List[Path]] = {}
    for path in paths:
        by_output.setdefault(mirror_path(path, input_root, output_root, new_suffix), []).append(path)
    folded = set()
    for output, same in output_aliases(list(by_output)).items():  # Song.npy and song.npy on macOS or Windows
        by_output[same].extend(by_output.pop(output))
        folded.add(same)
    outputs: Dict[Path, Path] = {}
    collisions: List[Tuple[Path, str]] = []
    for output, group in by_output.items():
        if len(group) > 1:
            names = ", ".join(p.name for p in group)
            why = f" ({ONE_FILE_THERE})" if output in folded else ""
            collisions.extend((p, f"{names} would all write {output}{why}; rename all but one") for p in group)
        else:
            outputs[group[0]] = output
    return outputs, collisions


ONE_FILE_THERE = "the output folder's file system takes names differing only in case or accents' encoding as one"


def name_key(name: str | os.PathLike) -> str:
    """``name`` as a case- and normalization-insensitive file system (macOS APFS and HFS+, Windows NTFS, ext4 with
    casefold) compares it: NFC, case-folded. ``Song.mid`` and ``song.mid``, ``Für`` in NFC and in NFD, have one key."""
    text = os.fspath(name)
    if text.isascii():  # one normal form, and casefold is lower: the usual corpus's paths cost a lower() each
        return text.lower()
    return unicodedata.normalize("NFC", text).casefold()


def name_folding(folder: str | os.PathLike) -> Tuple[bool, bool]:
    """``(case, normalization)``: whether the file system of ``folder`` (or of its nearest existing folder above)
    takes names differing only in case, or only in Unicode normalization (NFC/NFD), as one. Found by creating a
    temporary file and looking it up under another case and another normalization; (False, False) when that
    cannot be done (a read-only folder: nothing will be written there either)."""
    folder = os.path.abspath(folder)
    while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    probe = os.path.join(folder, _temporary_name("A\u0308"))  # "Ä" in NFD, upper case
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError:
        return False, False
    try:
        name = os.path.basename(probe)
        return (os.path.lexists(os.path.join(folder, name.lower())),
                os.path.lexists(os.path.join(folder, unicodedata.normalize("NFC", name))))
    finally:
        with contextlib.suppress(OSError):
            os.unlink(probe)


def output_aliases(outputs: Iterable[Path]) -> Dict[Path, Path]:
    """``{output: the earlier output it would overwrite}``: outputs whose paths differ only in case or Unicode
    normalization, where the output folder's file system takes them as one file (macOS, Windows; never on a
    usual Linux one, where they are two files, as the reference writes them). The file system is probed
    (:func:`name_folding`) only when such paths occur, once per folder."""
    first: Dict[str, Path] = {}
    folding: Dict[Path, Tuple[bool, bool]] = {}
    aliases: Dict[Path, Path] = {}
    for output in outputs:
        other = first.setdefault(name_key(output), output)
        if other is output or other == output:  # "is" first: a Path's == costs more than the rest of the loop
            continue
        if output.parent not in folding:
            folding[output.parent] = name_folding(output.parent)
        case, normalization = folding[output.parent]

        def fold(path: Path) -> str:
            text = unicodedata.normalize("NFC", os.fspath(path)) if normalization else os.fspath(path)
            return text.casefold() if case else text

        if fold(output) == fold(other):
            aliases[output] = other
    return aliases


TMP_SUFFIX = ".partial"

# A full disk or an exhausted quota: every later write to the same place fails too.
DISK_FULL_ERRNOS = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if e is not None)


class DiskFull(OSError):
    """An output could not be written because its file system is full (or the quota is spent): a batch stops."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


def error_chain(error: Optional[BaseException]) -> Iterator[BaseException]:
    """``error`` and what it was raised from or while handling, innermost last."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


# How Rust writers (safetensors, tokenizers: transformers' save_pretrained) word ENOSPC/EDQUOT in errors that are not
# OSErrors: "I/O error: No space left on device (os error 28)".
_RUST_DISK_FULL = re.compile(r"\(os error (%s)\)" % "|".join(str(e) for e in sorted(DISK_FULL_ERRNOS)))


def disk_full_error(error: Optional[BaseException]) -> Optional[OSError]:
    """The ENOSPC/EDQUOT OSError that ``error`` is or was raised while handling (C++ writers such as
    ``torch.save`` turn it into a RuntimeError; Rust writers say ``(os error 28)`` in their own error type), or
    None."""
    for cause in error_chain(error):
        if isinstance(cause, OSError) and cause.errno in DISK_FULL_ERRNOS:
            return cause
        found = _RUST_DISK_FULL.search(str(cause)) if not isinstance(cause, OSError) else None
        if found:
            code = int(found.group(1))
            return OSError(code, os.strerror(code))
    return None


def say_disk_full(reason: str, remaining: str) -> None:
    """The one line a batch tool ends with when a full disk (or quota) stopped it: ``reason`` names the output,
    ``remaining`` what a re-run does ("convert the remaining files")."""
    print(f"error: {reason}; stopped: free space and run the same command again to {remaining}", file=sys.stderr)


def unwritable(path: str | os.PathLike, error: OSError) -> str:
    """The one line (without "error: ") for an output that could not be written: a full disk or quota, a read-only
    file system, a permission. ``f.write`` on a full disk raises an OSError without the file name: this names it."""
    return f"cannot write {path}: {error.strerror or error}"


def write_text_or_say(path: str | os.PathLike, text: str) -> bool:
    """:func:`atomic_write_text` for a script's result file; a write that fails (a full disk, a read-only file
    system, a permission) is one line on stderr naming the file, and False (a file there before is kept).
    surrogateescape, as :func:`write_file_log`: the file names these results hold may not be UTF-8 (a file named
    b"\\xff.mid" is written as those bytes); strict encoding raised once the whole run was done, and lost it."""
    try:
        atomic_write_text(path, text, errors="surrogateescape")
    except OSError as error:
        print(f"error: {unwritable(path, error)}", file=sys.stderr)
        return False
    return True


def log_line(name: str, reason: str) -> str:
    """One line of a batch tool's failure or warning log: ``relative/path<TAB>reason``.

    A name holding a tab or a line break (legal in a POSIX file name), or starting with ``"``, is written as a
    JSON string so that the line reads back as written (:func:`read_file_log`); every other name as it is.
    """
    if name.startswith('"') or any(character in name for character in "\t\n\r"):
        name = json.dumps(name, ensure_ascii=False)
    return f"{name}\t{reason}\n"


def write_file_log(path: str | os.PathLike, entries: Iterable[Tuple[str, str]]) -> None:
    """:func:`log_line` lines, atomically: the format of every batch tool's failure and warning logs, sorted by
    file so that the same inputs give the same log (a file's own lines in their order)."""
    # surrogateescape: a file name that is not UTF-8 (os gives its bytes as lone surrogates) is written as those
    # bytes, as the file system has it; strict encoding raised at the end of the run and lost the whole log.
    atomic_write_text(path, "".join(log_line(name, reason) for name, reason in sorted(entries, key=lambda e: e[0])),
                      errors="surrogateescape")


def read_file_log(path: str | os.PathLike) -> List[Tuple[str, str]]:
    """``(name, reason)`` of the lines of a log :func:`write_file_log` wrote (none if there is no such file)."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape", newline="\n") as f:
            lines = f.read().split("\n")
    except OSError:
        return []
    entries = []
    for line in lines:
        if "\t" in line:
            name, reason = line.split("\t", 1)
            if name.startswith('"'):  # log_line's form of a name holding a tab or a line break
                with contextlib.suppress(ValueError):
                    name = json.loads(name)
            entries.append((name, reason))
    return entries


def output_problem(path: str | os.PathLike, folder: bool, what: str = "output") -> Optional[str]:
    """Why ``path`` cannot be written (a folder that is a file, a file that is a folder, a parent that is a
    file, no write permission), as one line, or None when it can."""
    path = Path(path)
    kind = "folder" if folder else "file"
    problem = unreachable(path, what)
    if problem:
        return problem
    if path.exists() and path.is_dir() != folder:
        return f"{what} {kind} {path} is a {'file' if folder else 'folder'}; pass a {kind} path"
    # An existing output file is replaced (atomically, in its folder): its folder is what must be writable.
    existing = path if path.exists() and folder else path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"cannot create {what} {kind} {path}: {existing} is a file"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot write {what} {kind} {path}: {existing} is not writable; pass another path"
    return None


def input_problem(path: str | os.PathLike, what: str = "input folder") -> Optional[str]:
    """Why ``path`` cannot be read as a folder (missing, a file), as one line, or None."""
    path = Path(path)
    problem = unreachable(path, what)
    if problem:
        return problem
    if not path.exists():
        return f"{what} not found: {path}"
    if not path.is_dir():
        return f"{what} {path} is a file, not a folder; pass the folder that holds it"
    if not os.access(path, os.R_OK | os.X_OK):
        return f"cannot read {what} {path}: permission denied (it cannot be listed); fix its permissions"
    return None


def unreachable(path: str | os.PathLike, what: str = "path") -> Optional[str]:
    """Why whether ``path`` exists cannot even be known (a folder above it may not be searched: ``stat`` says
    EACCES), as one line, or None. Before Python 3.14 ``Path.exists``/``is_dir``/``is_file`` raise that
    PermissionError instead of answering, and the scripts ended in a traceback."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as error:
        if error.errno in (errno.EACCES, errno.EPERM):
            return f"cannot reach {what} {path}: {error.strerror} (a folder above it cannot be searched)"
    return None


def not_found(path: str | os.PathLike, what: str = "folder", is_there: Callable[[Path], bool] = Path.exists
              ) -> Optional[str]:
    """``{what} not found: {path}`` when ``is_there`` (exists, is_dir, is_file) says no, the reason when that cannot
    even be known (:func:`unreachable`), or when it is a folder this user may not list (as :func:`input_problem`
    says it), or None: a script's first check of the paths it is given, one line where ``Path.exists`` alone raised
    a PermissionError traceback, and an unlistable folder failed later, differently for chmod 000 and 300."""
    problem = unreachable(path, what) or (None if is_there(Path(path)) else f"{what} not found: {path}")
    if problem is None and Path(path).is_dir() and not os.access(path, os.R_OK | os.X_OK):
        problem = f"cannot read {what} {path}: permission denied (it cannot be listed); fix its permissions"
    return problem


def find_all_files(root: str | os.PathLike, extensions: Iterable[str], error: type = OSError) -> list[Path]:
    """:func:`find_files` for callers with no failure log (trainers, the probe): a folder under ``root`` that
    cannot be listed raises ``error`` naming it, instead of its files being left out without a word."""
    problems: List[Tuple[Path, str]] = []
    found = find_files(root, extensions, problems)
    if problems:
        raise error("; ".join(f"{path}: {reason}" for path, reason in problems))
    return found


def _machine_id() -> str:
    """6 hex digits naming this machine (host name and boot): whose process ids a temporary name's pid is."""
    boot = ""
    with contextlib.suppress(OSError):
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as f:
            boot = f.read().strip()
    return hashlib.sha256(f"{socket.gethostname()}\n{boot}".encode()).hexdigest()[:6]


_MACHINE = _machine_id()
# A temporary name's token: random, then the writer's machine and pid, so that a run cleaning up what a killed
# writer left can tell a live writer's file (another process on the same outputs: two shells, a restarted job)
# from a dead one's.
_OWNER = re.compile(r"[0-9a-f]{8}h([0-9a-f]{6})p([0-9a-f]+)c[0-9a-f]+")
# A temporary file of another machine's writer is left alone until it has not changed for this long.
STALE_SECONDS = 3600


def _new_process_token() -> None:
    global _PROCESS_TOKEN, _TEMPORARY_COUNTER
    _PROCESS_TOKEN = f"{secrets.token_hex(4)}h{_MACHINE}p{os.getpid():x}c"
    _TEMPORARY_COUNTER = itertools.count()


_new_process_token()
# A forked child (a DataLoader worker, a pool process) must not reuse its parent's temporary names.
os.register_at_fork(after_in_child=_new_process_token)


# File names hold at most 255 bytes (NAME_MAX on Linux, macOS and Windows file systems). The temporary
# name adds ~35 to the output's (dots, a token naming the writer's machine and pid, a counter, the suffix), so a
# long output name gets a shorter stand-in in its temporary name.
LONGEST_TEMPORARY_STEM = 200
_STEM_PREFIX_BYTES = LONGEST_TEMPORARY_STEM - 17  # the prefix, "~" and 16 hex digits of the name's hash


def temporary_stem(name: str) -> str:
    """What a temporary file of output ``name`` is named after: the name itself, or for a name over
    LONGEST_TEMPORARY_STEM bytes its start, ``~`` and a hash of the whole name (the same for every writer
    of that output, so a later run finds and removes what a killed one left)."""
    encoded = os.fsencode(name)
    if len(encoded) <= LONGEST_TEMPORARY_STEM:
        return name
    cut = _STEM_PREFIX_BYTES
    while cut and (encoded[cut] & 0xC0) == 0x80:  # not inside a UTF-8 character (some file systems refuse that)
        cut -= 1
    return f"{os.fsdecode(encoded[:cut])}~{hashlib.sha256(encoded).hexdigest()[:16]}"


def _temporary_stems(name: str) -> set:
    """The stems a leftover of ``name`` may have: :func:`temporary_stem`, and the whole name (earlier versions
    named every temporary file after it)."""
    return {name, temporary_stem(name)}


def _temporary_name(name: str) -> str:
    """``.<name>.<process token><counter>.partial``: unique per process and call without a random-number
    system call per file (extraction writes thousands a second); O_EXCL still guards the rare clash.
    A name too long for that is stood in for by :func:`temporary_stem`."""
    return f".{temporary_stem(name)}.{_PROCESS_TOKEN}{next(_TEMPORARY_COUNTER):x}{TMP_SUFFIX}"


def _open_temporary(path: str) -> tuple[int, str]:
    """Open a new, empty file next to ``path`` under a name no other writer uses: (descriptor, its path).

    Created with mode 0666 so that the umask gives the output a normal file's permissions (no
    chmod; reading the umask would mean setting it, which races with other threads). A missing
    parent folder is created. Plain ``str`` paths: extraction opens thousands a second.
    """
    folder, name = os.path.split(path)
    made_parent = False
    while True:
        tmp = os.path.join(folder, _temporary_name(name))
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue
        except FileNotFoundError:
            if made_parent:
                raise
            # Several writer threads may race to create it: exist_ok, then try once more.
            os.makedirs(folder or ".", exist_ok=True)
            made_parent = True
        except OSError as error:  # said of the output, not of a temporary name the user never chose
            raise OSError(error.errno, f"{error.strerror} (cannot create a file in its folder)", path) from None


def _replace(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    try:
        os.replace(tmp, path)
    except IsADirectoryError:
        raise IsADirectoryError(f"{path} is a folder; pass a file path") from None


def _keep_mode(path: str, tmp: str) -> None:
    """Give ``tmp`` the permission bits of the file ``path`` it is to replace, if there is one (``--overwrite``).

    The new file would have the umask's mode (0644): a chmod 444 output lost its protection, a 600 one became
    readable by all. ``sed -i`` and vim's ``:w!`` keep the mode as well. A link at ``path`` is replaced, not
    followed (as before): the new file has the umask's mode.
    """
    import stat

    try:
        mode = os.lstat(path).st_mode
    except OSError:  # a new output
        return
    if stat.S_ISREG(mode):
        os.chmod(tmp, stat.S_IMODE(mode) & 0o777)


@contextlib.contextmanager
def _temporary_next_to(path: str) -> Iterator[tuple[int, str]]:
    """(descriptor, path) of a new temporary file; renamed to ``path`` on success, deleted on failure."""
    fd, tmp = _open_temporary(path)
    try:
        yield fd, tmp
        _keep_mode(path, tmp)
        _replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it to ``path``, else delete it."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; pass a file path")
    with _temporary_next_to(os.fspath(path)) as (fd, tmp):
        os.close(fd)
        yield Path(tmp)


def unlink_if_link(path: str | os.PathLike) -> None:
    """Remove ``path`` when it is a symbolic link, or a file this user may not write: a log a run rewrites in place
    (opened for writing, flushed per line) is then a new file beside the outputs, never written through the link
    (which truncated its target, a file outside the output folder). Outputs, renamed into place, replace their links
    alike, and their read-only files: so do the logs (a read-only one was a PermissionError traceback, as non-root)."""
    if os.path.islink(path) or (os.path.isfile(path) and not os.access(path, os.W_OK)):
        with contextlib.suppress(OSError):  # gone meanwhile, or a read-only folder: then as before, through it
            os.unlink(path)


def through_link(path: str | os.PathLike) -> Path:
    """``path``, or the file it links to when it is a symbolic link (dangling too): for a file the user names (a
    checkpoint) and may have linked to another disk. An atomic write there replaces the target and keeps the link,
    as the reference's ``torch.save`` writes through it; renaming over the link moved the file beside the link and
    left the target stale. Batch outputs in an output folder do not use it: their links are replaced."""
    return Path(os.path.realpath(path)) if os.path.islink(path) else Path(path)


def finished_output(path: str | os.PathLike) -> bool:
    """Whether a re-run may skip ``path``: it exists and is not empty.

    Outputs are renamed into place only once written, but without an ``fsync`` (costly for the
    thousands of small files a batch writes on cluster file systems) a power cut can leave a renamed
    file with no data. So an empty output is redone, not skipped: at worst a conversion that truly
    gives nothing is run again and gives nothing again.
    """
    try:
        return os.stat(path).st_size > 0
    except OSError:  # missing (or unreadable: then writing it reports why)
        return False


def remove_partial_files(path: str | os.PathLike) -> int:
    """Delete temporary files that a killed writer of ``path`` left behind; return how many.

    Only ``path``'s own: a glob ``.x.npy.*.partial`` would also match ``.x.npy.npy.<token>.partial``,
    the temporary file of another output (``x.npy.npy``, from an input ``x.npy.abc``).
    """
    return remove_partial_files_of([path])


def remove_partial_files_of(paths: Iterable[str | os.PathLike]) -> int:
    """:func:`remove_partial_files` for many outputs at once: one listing per folder, not one per file.

    For a batch that resumes after a kill: only the temporary files of ``paths`` are removed (those
    of other processes' outputs in the same folders are theirs, and may be being written). Nor those of a
    live process writing the same outputs (a second run of the same command): only a dead writer's files go.
    """
    by_folder: Dict[str, set] = {}
    for path in paths:
        folder, name = os.path.split(os.fspath(path))
        by_folder.setdefault(folder, set()).update(_temporary_stems(name))
    removed = 0
    for folder, names in by_folder.items():
        try:
            entries = [entry.name for entry in os.scandir(folder or ".")]
        except OSError:  # not made yet: nothing left there
            continue
        for entry in entries:
            stem, _, token = entry[1:-len(TMP_SUFFIX)].rpartition(".")
            if entry.startswith(".") and entry.endswith(TMP_SUFFIX) and stem in names and \
                    not _writer_may_be_alive(token, os.path.join(folder, entry)):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(folder, entry))
                    removed += 1
    return removed


def _writer_may_be_alive(token: str, path: str) -> bool:
    """Whether the process that named a temporary file ``token`` may still be writing it: a live pid on this
    machine, or a file of another machine's writer changed within STALE_SECONDS. Names without an owner (earlier
    versions, tests) and this process's own are a dead writer's."""
    owner = _OWNER.fullmatch(token)
    if owner is None:
        return False
    machine, pid = owner.group(1), int(owner.group(2), 16)
    if machine != _MACHINE or os.name == "nt":  # on Windows os.kill(pid, 0) would send CTRL_C_EVENT
        try:
            return time.time() - os.stat(path).st_mtime < STALE_SECONDS
        except OSError:
            return False
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: another user's live process
        return True
    return True


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8", errors: str = "strict") -> None:
    # newline="" so the bytes written are exactly the string's (no \r\n translation anywhere).
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding=encoding, errors=errors, newline="") as f:
            f.write(text)


def atomic_write_bytes(path: str | os.PathLike, *chunks) -> None:
    """Write the concatenation of ``chunks`` (bytes-like) to ``path`` atomically: open, write, close, rename.

    Hot in extraction (a file per piece, thousands a second from writer threads): no file object,
    and the chunks (a ``.npy`` header and the array's own memory) go out in one ``writev`` without
    being joined first.
    """
    with _temporary_next_to(os.fspath(path)) as (fd, _):
        try:
            _write_all(fd, [memoryview(chunk).cast("B") for chunk in chunks])
        finally:
            os.close(fd)


def _write_all(fd: int, views: list) -> None:
    """``writev`` until every byte of ``views`` is written (the kernel may take less: large buffers, signals)."""
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]
