"""File discovery, atomic writes, the feature cache, the CLI and progress lines: paths a code-driven mutation audit
found untested."""

import io
import os
import stat

import numpy as np
import pytest


def test_a_single_file_root_is_found_only_with_a_wanted_suffix(tmp_path):
    # A file given where a folder is expected (clamp3_embd/clamp3_search take one file) is taken only when
    # its suffix is wanted: "query.docx" is "Could not determine modality", never a file of modality None.
    from clamp2.files import find_files
    from clamp2.search.clamp3 import files_by_modality

    other, tune = tmp_path / "query.docx", tmp_path / "tune.ABC"
    other.write_text("x")
    tune.write_text("x")
    assert find_files(other, ["abc"]) == []
    assert find_files(tune, ["abc"]) == [tune]
    assert files_by_modality(other) == {}


def test_a_file_log_keeps_one_files_lines_in_their_order(tmp_path):
    from clamp2.files import write_file_log

    write_file_log(tmp_path / "log", [("b.abc", "z: second step"), ("a.abc", "only"), ("b.abc", "a: third step")])
    assert (tmp_path / "log").read_text() == "a.abc\tonly\nb.abc\tz: second step\nb.abc\ta: third step\n"


def test_ctrl_c_during_a_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    from clamp2.files import atomic_write_bytes

    def interrupted(fd, views):
        os.write(fd, b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "writev", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(tmp_path / "x.npy", b"header", b"body")
    assert os.listdir(tmp_path) == []


def test_leftovers_of_one_output_are_not_those_of_a_longer_name(tmp_path):
    # "x.npy" and "x.npy.npy" (from x.npy.abc) may be written in one folder at once; a worker's death
    # clears the first one's leftovers, never the second's file in progress.
    from clamp2.files import remove_partial_files

    mine, theirs = tmp_path / ".x.npy.dead0.partial", tmp_path / ".x.npy.npy.live0.partial"
    mine.write_bytes(b"")
    theirs.write_bytes(b"")
    assert remove_partial_files(tmp_path / "x.npy") == 1
    assert not mine.exists() and theirs.exists()


def test_outputs_follow_a_group_writable_umask(tmp_path):
    from clamp2.files import atomic_write_bytes, atomic_write_text

    old = os.umask(0o002)
    try:
        atomic_write_bytes(tmp_path / "a.npy", b"x")
        atomic_write_text(tmp_path / "b.txt", "x")
    finally:
        os.umask(old)
    assert {stat.S_IMODE(os.stat(tmp_path / n).st_mode) for n in ("a.npy", "b.txt")} == {0o664}


def test_an_output_replaced_keeps_its_mode_and_a_link_is_replaced_not_followed(tmp_path):
    # --overwrite made a fresh file and renamed it over the old one: a chmod 444 output came back 0644 (its
    # protection lost) and a 600 one readable by all. The mode stays, as with sed -i or vim's :w!.
    from clamp2.files import atomic_path, atomic_write_bytes, atomic_write_text

    def through_atomic_path(path):
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"new")

    writers = (lambda p: atomic_write_bytes(p, b"new"), lambda p: atomic_write_text(p, "new"), through_atomic_path)
    for number, (write, mode) in enumerate(zip(writers, (0o444, 0o600, 0o640))):
        path = tmp_path / f"out{number}"
        path.write_bytes(b"old")
        os.chmod(path, mode)
        write(path)
        assert path.read_bytes() == b"new" and stat.S_IMODE(os.stat(path).st_mode) == mode
    umask = os.umask(0)
    os.umask(umask)
    target = tmp_path / "elsewhere.txt"
    target.write_text("old")
    os.chmod(target, 0o600)
    (tmp_path / "link.txt").symlink_to(target)
    atomic_write_text(tmp_path / "link.txt", "new")  # the link is replaced by a file; what it pointed to stays
    assert not (tmp_path / "link.txt").is_symlink() and (tmp_path / "link.txt").read_text() == "new"
    assert target.read_text() == "old" and stat.S_IMODE(os.stat(tmp_path / "link.txt").st_mode) == 0o666 & ~umask


def test_an_empty_cache_entry_is_missing_not_an_error(tmp_path):
    # No fsync: after a power cut a renamed entry can be empty; it is encoded again, never a crash.
    from clamp2.cache import FeatureCache

    namespace = FeatureCache(tmp_path).namespace({"model": "test"})
    key = "ab" * 32
    namespace.put(key, np.ones((1, 4), np.float32))
    np.testing.assert_array_equal(namespace.get(key), np.ones((1, 4), np.float32))
    namespace.path(key).write_bytes(b"")
    assert namespace.get(key) is None


def test_a_damaged_weights_memo_is_not_taken_as_the_hash(tmp_path):
    from clamp2 import cache

    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x" * 100)
    right = cache.weights_fingerprint(weights, tmp_path / "cache")
    (memo,) = (tmp_path / "cache" / "weights").iterdir()
    memo.write_text(right[:20])  # cut short
    cache._weights_hashes.clear()
    assert cache.weights_fingerprint(weights, tmp_path / "cache") == right


def test_clear_removes_the_weights_memos_too(tmp_path, capsys):
    from clamp2 import cache

    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x" * 100)
    cache.weights_fingerprint(weights, tmp_path / "cache")
    cache.FeatureCache(tmp_path / "cache").namespace({"model": "t"}).put("cd" * 32, np.zeros((1, 2), np.float32))
    assert cache.main(["clear", "--cache", str(tmp_path / "cache")]) == 0
    assert "removed 1 cached features" in capsys.readouterr().out
    assert list((tmp_path / "cache").iterdir()) == []


def test_clear_empties_a_features_folder_linked_to_another_disk_and_keeps_the_link(tmp_path, capsys):
    # Was "Cannot call rmtree on a symbolic link; N cached features are left", exit 1.
    from clamp2 import cache

    (tmp_path / "big_disk").mkdir()
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "features").symlink_to(tmp_path / "big_disk")
    cache.FeatureCache(tmp_path / "cache").namespace({"model": "t"}).put("cd" * 32, np.zeros((1, 2), np.float32))
    assert list((tmp_path / "big_disk").iterdir())
    assert cache.main(["clear", "--cache", str(tmp_path / "cache")]) == 0
    assert "removed 1 cached features" in capsys.readouterr().out
    assert (tmp_path / "cache" / "features").is_symlink() and list((tmp_path / "big_disk").iterdir()) == []


def test_clear_with_a_features_link_to_a_disk_not_mounted_clears_the_rest(tmp_path, capsys):
    # A dangling link (the other disk unmounted): was "cannot clear the feature cache ...: No such file or directory".
    from clamp2 import cache

    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "features").symlink_to(tmp_path / "not_mounted" / "features")
    assert cache.main(["clear", "--cache", str(tmp_path / "cache")]) == 0
    assert "removed 0 cached features" in capsys.readouterr().out
    assert (tmp_path / "cache" / "features").is_symlink()


def test_the_default_log_interval_throttles(tmp_path):
    from clamp2.progress import progress_bar

    path = tmp_path / "log.txt"
    with open(path, "w") as stream:
        with progress_bar(total=500, desc="work", stream=stream) as bar:
            for _ in range(500):
                bar.update(1)
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and "500/500" in lines[1]
    assert all(line.isascii() for line in lines)  # a log gets an ASCII bar, not block characters


def test_write_line_prints_a_non_utf8_name_on_a_strict_stream(tmp_path):
    from clamp2.progress import write_line

    with open(tmp_path / "log", "w", encoding="utf-8", errors="strict") as stream:
        write_line(f"failed: {os.fsdecode(b'caf' + bytes([0xe9]) + b'.abc')}", stream=stream)
    assert (tmp_path / "log").read_text() == "failed: caf\\xe9.abc\n"


def test_help_keeps_the_description_lines(capsys):
    from clamp2 import cache

    with pytest.raises(SystemExit):
        cache.parse_args(["--help"])
    assert "\n    clamp2-cache info [--cache DIR]\n    clamp2-cache clear [--cache DIR]\n" in capsys.readouterr().out


def test_no_cache_flag_gives_no_cache(tmp_path):
    from clamp2.cache import add_cache_arguments, cache_from_args
    from clamp2.cli import ArgumentParser

    parser = ArgumentParser(prog="t")
    add_cache_arguments(parser)
    assert cache_from_args(parser.parse_args(["--no_cache"])) is None
    assert cache_from_args(parser.parse_args(["--cache", str(tmp_path)])).root == tmp_path


def test_cache_info_lists_namespaces_in_folder_order(tmp_path):
    from clamp2.cache import FeatureCache

    cache = FeatureCache(tmp_path)
    for model in "abcdefgh":
        cache.namespace({"model": model}).put("ef" * 32, np.zeros((1, 2), np.float32))
    folders = [entry["folder"] for entry in cache.info()]
    assert folders == sorted(folders) and len(folders) == 8


def test_a_slow_stage_after_a_burst_still_gets_its_lines(tmp_path):
    # tqdm's dynamic miniters, learnt in a fast burst, would skip the log lines of a slow stage after it.
    import time

    from clamp2.progress import progress_bar

    stream = io.StringIO()
    with progress_bar(total=12, desc="w", stream=stream, log_interval=0.2) as bar:
        bar.update(10)
        for _ in range(10):
            bar.update(0)
        for _ in range(2):
            time.sleep(0.5)
            bar.update(1)
    lines = stream.getvalue().splitlines()
    assert any("11/12" in line for line in lines) and "12/12" in lines[-1], lines


def _writer(target, stay: bool):
    """A process that opened a temporary file of ``target`` (as atomic_write_bytes does) and is still writing it
    (``stay``) or was killed then; (process, the temporary file)."""
    import subprocess
    import sys
    from pathlib import Path

    from conftest import REPO_ROOT

    code = ("import os, sys, time; from clamp2 import files; fd, tmp = files._open_temporary(sys.argv[1]); "
            "print(tmp, flush=True); time.sleep(60) if sys.argv[2] == '1' else os._exit(0)")

    process = subprocess.Popen([sys.executable, "-c", code, str(target), "1" if stay else "0"], stdout=subprocess.PIPE,
                               text=True, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    return process, Path(process.stdout.readline().strip())


def test_a_second_run_keeps_a_live_writers_temporary_files_and_removes_a_dead_ones(tmp_path):
    # Two runs of one command on one output folder (two shells, a job restarted while the first still runs): the
    # second's clean-up of what a killed run left deleted the first's file in progress, whose rename then failed
    # ("failed: ...: FileNotFoundError: .x.mid.<token>.partial -> x.mid") though nothing was wrong with the input.
    from clamp2.files import remove_partial_files, remove_partial_files_of

    target = tmp_path / "x.npy"
    live, theirs = _writer(target, stay=True)
    dead, killed = _writer(target, stay=False)
    dead.wait()
    try:
        assert theirs.exists() and killed.exists()
        assert remove_partial_files_of([target]) == 1
        assert theirs.exists() and not killed.exists()
        live.kill()
        live.wait()
        assert remove_partial_files(target) == 1 and not theirs.exists()
    finally:
        live.kill()
        live.wait()


def test_another_machines_temporary_file_is_removed_only_once_stale(tmp_path):
    # A folder shared over NFS: a writer on another node cannot be asked whether it lives; its file is left alone
    # until it has not changed for STALE_SECONDS.
    import time

    from clamp2 import files

    other = "fffff0" if files._MACHINE != "fffff0" else "fffff1"
    busy = tmp_path / f".x.npy.0123abcdh{other}p1c0.partial"
    stale = tmp_path / f".x.npy.0123abcdh{other}p2c0.partial"
    for path in (busy, stale):
        path.write_bytes(b"half")
    old = time.time() - 2 * files.STALE_SECONDS
    os.utime(stale, (old, old))
    assert files.remove_partial_files(tmp_path / "x.npy") == 1 and busy.exists() and not stale.exists()
