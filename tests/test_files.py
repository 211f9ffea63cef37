"""File discovery, mirrored output paths and atomic writes."""

import os
import stat
from pathlib import Path

import pytest

from clamp2.files import atomic_write_text, find_files, mirror_path
from conftest import unlistable


def test_find_files_is_recursive_sorted_and_case_insensitive(tmp_path):
    for rel in ("b/x.ABC", "a/y.abc", "a/.hidden.abc", ".git/z.abc", "a/w.txt", "a/.v.abc.123.partial"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    assert [p.relative_to(tmp_path).as_posix() for p in find_files(tmp_path, ["abc"])] == ["a/y.abc", "b/x.ABC"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs and symbolic links as on POSIX")
def test_find_files_reports_what_it_cannot_search_or_read(tmp_path, monkeypatch):
    # A folder that cannot be listed used to be skipped without a word (the run exited 0 with its files missing),
    # and a FIFO with a wanted suffix was listed, and reading it waited forever.
    for rel in ("a/x.abc", "locked/y.abc", "b/z.abc"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text("x")
    os.mkfifo(tmp_path / "b" / "pipe.abc")
    os.mkfifo(tmp_path / "b" / "pipe.txt")  # not a wanted suffix: not reported
    (tmp_path / "b" / "gone.abc").symlink_to(tmp_path / "missing.abc")  # listed: reading it says what is wrong
    (tmp_path / "b" / "also.abc").symlink_to(tmp_path / "a" / "x.abc")  # a link to a file: listed
    (tmp_path / "b" / "into_a").symlink_to(tmp_path / "a", target_is_directory=True)  # a link to a folder: not followed
    unlistable(monkeypatch, "locked")  # root can list any folder: refuse one as a permission would
    problems = []
    found = find_files(tmp_path, ["abc"], problems)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a/x.abc", "b/also.abc", "b/gone.abc", "b/z.abc"]
    assert sorted((p.relative_to(tmp_path).as_posix(), why.split(";")[0]) for p, why in problems) == [
        ("b/pipe.abc", "not a regular file (a FIFO)"), ("locked", "cannot list this folder: Permission denied")]
    assert find_files(tmp_path, ["abc"]) == found  # without a list, the same files


@pytest.mark.skipif(os.name == "nt", reason="POSIX names are bytes; Windows' are UTF-16")
def test_failure_logs_keep_a_non_utf8_name_as_its_bytes(tmp_path):
    from clamp2.files import write_file_log

    name = os.fsdecode(b"caf\xe9.abc")  # how os gives a Latin-1 name on a UTF-8 system
    write_file_log(tmp_path / "failed.log", [(name, "empty music file"), ("b.abc", "caf\u00e9")])
    assert (tmp_path / "failed.log").read_bytes() == b"b.abc\tcaf\xc3\xa9\ncaf\xe9.abc\tempty music file\n"


def test_mirror_path_keeps_relative_folder(tmp_path):
    assert mirror_path(tmp_path / "in/a/b/c.mid", tmp_path / "in", tmp_path / "out", ".mtf") == tmp_path / "out/a/b/c.mtf"
    single = tmp_path / "one.mid"
    assert mirror_path(single, single, tmp_path / "out", ".mtf") == tmp_path / "out/one.mtf"
    # Lexical, as Path.relative_to: relative roots, several dots in a name, an input outside the root.
    assert mirror_path("in/a/x.tar.gz", "in", "out", ".npy") == Path("out/a/x.tar.npy")
    assert mirror_path("in/a/x.abc", ".", "out", ".npy") == Path("out/in/a/x.npy")
    assert mirror_path("/elsewhere/x.abc", ".", "out", ".npy") == Path("out/x.npy")
    assert mirror_path("other/b/x.abc", "in", "/out", ".npy") == Path("/out/x.npy")
    assert mirror_path("inner/x.abc", "in", "out", ".npy") == Path("out/x.npy")


def test_mirror_path_folds_case_where_paths_do(monkeypatch):
    """On Windows relative_to ignores case ("Data" under "data"); elsewhere it does not."""
    import clamp2.files as files

    assert mirror_path("Data/sub/x.abc", "data", "out", ".npy") == Path("out/x.npy")
    monkeypatch.setattr(files, "_CASE_INSENSITIVE_PATHS", True)
    assert mirror_path("Data/sub/x.abc", "data", "out", ".npy") == Path("out/sub/x.npy")


def test_plan_skips_npy_inputs_in_an_output_folder_inside_the_input_folder(tmp_path, monkeypatch):
    from clamp2.extraction.core import plan_jobs

    monkeypatch.chdir(tmp_path)
    for rel in ("a.abc", "feats/b.npy", "feats/sub/c.abc", "feats_2/d.npy"):
        Path(rel).parent.mkdir(parents=True, exist_ok=True)
        Path(rel).write_text("x")
    kinds = {".abc": "music", ".npy": "audio"}
    # feats/b.npy is an output read back; feats/sub/c.abc is a piece, taken as the reference takes it.
    # "feats_2" merely starts with the output folder's name: it is an input folder like any other.
    plan = plan_jobs(Path("."), Path("feats"), kinds=kinds)
    assert [(str(j.path), str(j.output)) for j in plan.jobs] == [("a.abc", "feats/a.npy"),
                                                                ("feats/sub/c.abc", "feats/feats/sub/c.npy"),
                                                                ("feats_2/d.npy", "feats/feats_2/d.npy")]
    assert [str(j.path) for j in plan_jobs(Path("."), Path("./feats/../elsewhere"), kinds=kinds).jobs] == [
        "a.abc", "feats/b.npy", "feats/sub/c.abc", "feats_2/d.npy"]


def test_atomic_write_leaves_nothing_on_failure_and_normal_permissions(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    atomic_write_text(target, "ok\r\n")
    assert target.read_bytes() == b"ok\r\n"
    mode = stat.S_IMODE(os.stat(target).st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask
    with pytest.raises(TypeError):
        atomic_write_text(target, None)
    assert target.read_bytes() == b"ok\r\n" and os.listdir(target.parent) == ["out.txt"]


def test_atomic_writes_from_many_threads_into_new_folders(tmp_path):
    """Extraction saves from writer threads: they race to create the same missing folders."""
    from concurrent.futures import ThreadPoolExecutor

    from clamp2.files import atomic_write_bytes

    import threading

    threads, targets = 8, []
    for folder in range(20):
        batch = [tmp_path / f"a{folder}" / "b" / f"{i}.bin" for i in range(threads)]
        start = threading.Barrier(threads, timeout=30)

        def write(path, start=start):
            start.wait()  # every thread finds the folder missing at once
            atomic_write_bytes(path, path.name.encode())

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(write, batch))
        targets += batch
    assert all(path.read_bytes() == path.name.encode() for path in targets)
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == sorted(targets)
    umask = os.umask(0)
    os.umask(umask)
    assert {stat.S_IMODE(os.stat(path).st_mode) for path in targets} == {0o666 & ~umask}
    (tmp_path / "folder.bin").mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder; pass a file path"):
        atomic_write_bytes(tmp_path / "folder.bin", b"x")
    assert os.listdir(tmp_path / "folder.bin") == [] and not list(tmp_path.glob(".folder.bin*"))


def test_temporary_names_differ_in_a_forked_child_and_a_clash_takes_another(tmp_path, monkeypatch):
    """Temporary names come from a per-process token and a counter (no random bytes per file): a forked
    writer (a DataLoader worker) must get its own token, and a name already taken must not fail a write."""
    import itertools

    from clamp2 import files
    from clamp2.files import atomic_write_bytes, remove_partial_files

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child reports its next name, then leaves without running pytest's exit handlers
        os.write(write, files._temporary_name("x.npy").encode())
        os._exit(0)
    os.close(write)
    child_name = os.read(read, 200).decode()
    os.close(read)
    os.waitpid(pid, 0)
    parent_name = files._temporary_name("x.npy")
    assert child_name.startswith(".x.npy.") and child_name.endswith(files.TMP_SUFFIX)
    assert child_name.split(".")[3][:8] != parent_name.split(".")[3][:8]  # the tokens

    target = tmp_path / "out.npy"
    monkeypatch.setattr(files, "_TEMPORARY_COUNTER", itertools.count())
    (tmp_path / files._temporary_name("out.npy")).write_bytes(b"another writer's")  # the name tried first
    monkeypatch.setattr(files, "_TEMPORARY_COUNTER", itertools.count())
    atomic_write_bytes(target, b"features")
    assert target.read_bytes() == b"features"
    assert remove_partial_files(target) == 1  # only the other writer's file is left

    big = os.urandom(3 << 20)  # several os.write calls where the kernel takes less at a time
    atomic_write_bytes(str(tmp_path / "new" / "big.npy"), big)
    assert (tmp_path / "new" / "big.npy").read_bytes() == big and os.listdir(tmp_path / "new") == ["big.npy"]


@pytest.mark.parametrize("name", ["t" * 240 + ".npy", "é" * 120 + ".mtf", "x" * 255, "t" * 210 + ".npy"])
def test_outputs_with_names_near_the_longest_are_written_and_their_leftovers_found(tmp_path, name):
    # A file name holds at most 255 bytes; the temporary name of a long one stands in a hash for its end.
    from clamp2.files import atomic_write_bytes, remove_partial_files, remove_partial_files_of, temporary_stem

    target = tmp_path / name
    atomic_write_bytes(target, b"abc")
    assert target.read_bytes() == b"abc" and [p.name for p in tmp_path.iterdir()] == [name]
    other = "t" * 239 + "u.npy"  # the same start: its temporary files are not target's
    assert temporary_stem(name) != temporary_stem(other) and len(os.fsencode(temporary_stem(name))) <= 200
    os.fsencode(temporary_stem(name)).decode("utf-8")  # never cut inside a character (APFS refuses such names)
    for number, remove in enumerate((lambda: remove_partial_files(target), lambda: remove_partial_files_of([target]))):
        leftover = tmp_path / f".{temporary_stem(name)}.dead{number}.partial"
        kept = tmp_path / f".{temporary_stem(other)}.dead{number}.partial"
        leftover.write_bytes(b"")
        kept.write_bytes(b"")
        assert remove() == 1 and not leftover.exists() and kept.exists()
    old_style = tmp_path / f".{name}.dead.partial"  # an earlier version's leftover, when the name allows it
    if len(os.fsencode(old_style.name)) <= 255:
        old_style.write_bytes(b"")
        assert remove_partial_files(target) == 1 and not old_style.exists()


def test_a_write_the_kernel_takes_in_parts_is_written_whole(tmp_path, monkeypatch):
    # writev may take fewer bytes than asked (over 2 GiB at once, signals, some network file systems).
    from clamp2.files import atomic_write_bytes

    writev = os.writev
    monkeypatch.setattr(os, "writev", lambda fd, views: writev(fd, [bytes(memoryview(views[0]))[:100]]))
    header, body = b"h" * 128, bytes(range(256)) * 16
    atomic_write_bytes(tmp_path / "x.npy", header, body)
    assert (tmp_path / "x.npy").read_bytes() == header + body
