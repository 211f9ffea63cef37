"""A full disk (ENOSPC) or a read-only file system (EROFS) for the tools test_disk_full.py does not reach: one line
naming the file, nothing of the failed run left, earlier outputs intact, a re-run after freeing space resumes."""

import errno
import json
import os

import numpy as np
import pytest

import clamp2.files
from clamp2 import cache as cache_module
from clamp2.search import feature_store
from clamp2.search.feature_store import read_features
from conftest import DiskFullAfter, load_script
from conftest import run_main as run
from probe_features import class_means, write_features


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def features(folder, n, dim=16, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        np.save(folder / f"k{i:04d}.npy", rng.normal(size=(1, dim)).astype(np.float32))
    return folder


@pytest.fixture
def two_generations(tmp_path, capsys):
    """An index of 20 features (generation 1) and a folder of 50 that would make generation 2."""
    builder = load_script("semantic_search/build_index.py")
    index = tmp_path / "index"
    assert run(builder, [features(tmp_path / "small", 20), index, "--no_progress"], capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in index.iterdir()}
    return builder, index, before, features(tmp_path / "large", 50, seed=1)


def test_index_vectors_are_allocated_before_they_are_mapped(two_generations, capsys, monkeypatch):
    # On a real full disk the memory map's first page without a block killed the process by SIGBUS (exit 135, not
    # a word, a 3 MB temporary left); the blocks reserved first make it an ENOSPC the builder can say.
    builder, index, before, large = two_generations
    if not hasattr(os, "posix_fallocate"):
        pytest.skip("no posix_fallocate here")

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    code, out, err = run(builder, [large, index, "--no_progress"], capsys)
    assert code == 2 and "No space left on device" in one_line(err) and str(index) in err
    assert {p.name: p.read_bytes() for p in index.iterdir()} == before  # no temporary, generation 1 whole


def test_an_index_update_on_a_full_disk_keeps_the_previous_generation_and_leaves_none_of_its_own(
        two_generations, capsys, monkeypatch, tmp_path):
    builder, index, before, large = two_generations
    # vectors, norms and keys fit; the files list does not (a real tmpfs: vectors.2.npy, norms.2.npy, keys.2.txt
    # stayed, unreferenced, holding the space the re-run needed: it failed again after the space was freed).
    disk = DiskFullAfter(monkeypatch, feature_store, "_write_lines", writes=1)
    code, out, err = run(builder, [large, index, "--no_progress"], capsys)
    assert code == 2 and "No space left on device" in one_line(err)
    assert {p.name: p.read_bytes() for p in index.iterdir()} == before
    assert read_features(index).names == read_features(tmp_path / "small").names  # searches open generation 1
    disk.free()
    assert run(builder, [large, index, "--no_progress"], capsys)[0] == 0
    again, clean = read_features(index), read_features(large)
    assert again.names == clean.names and np.array_equal(again.matrix, clean.matrix)


@pytest.mark.parametrize("script, extra", [
    ("semantic_search/semantic_search_metrics.py", ["--ranks"]),
    ("semantic_search/clamp2_fmd.py", ["--per_file"]),
])
@pytest.mark.parametrize("cause", [errno.ENOSPC, errno.EROFS])
def test_a_results_file_that_cannot_be_written_is_one_line_naming_it(tmp_path, capsys, monkeypatch, script, extra,
                                                                      cause):
    module = load_script(script)
    queries, refs = features(tmp_path / "q", 40, seed=1), features(tmp_path / "r", 40, seed=2)
    target = tmp_path / "out.jsonl"

    def refused(path, *args, **kwargs):
        raise OSError(cause, os.strerror(cause))

    monkeypatch.setattr(clamp2.files, "atomic_write_text", refused)
    code, out, err = run(module, [queries, refs, *extra, target], capsys)
    assert code == 2 and one_line(err) == f"error: cannot write {target}: {os.strerror(cause)}"
    assert not target.exists()


def test_inference_output_on_a_full_disk_is_one_line(tmp_path, capsys, monkeypatch):
    means = class_means(["a", "b"], dim=8, separation=0.5, seed=3)
    write_features(tmp_path / "train", means, 10, seed=1)
    train_cls, inference_cls = (load_script(f"music_classification/{name}.py")
                                for name in ("train_cls", "inference_cls"))
    assert run(train_cls, ["--train_folders", tmp_path / "train", "--weights", tmp_path / "p.pth", "--epochs", "1",
                           "--hidden_size", "8", "--no_progress"], capsys)[0] == 0
    (tmp_path / "pred.json").write_text("{}")
    DiskFullAfter(monkeypatch, clamp2.files, "atomic_write_text", writes=0)
    code, out, err = run(inference_cls, [tmp_path / "train", tmp_path / "pred.json", "--weights", tmp_path / "p.pth",
                                         "--no_progress"], capsys)
    assert code == 2 and one_line(err) == f"error: cannot write {tmp_path / 'pred.json'}: No space left on device"
    assert (tmp_path / "pred.json").read_text() == "{}"


def test_a_training_run_lock_on_a_full_disk_is_one_line(tmp_path, capsys, monkeypatch):
    # Creating the lock file takes an inode; its pid line needs a block: on a full disk that write raised.
    means = class_means(["a", "b"], dim=8, separation=0.5, seed=3)
    write_features(tmp_path / "train", means, 10, seed=1)
    train_cls = load_script("music_classification/train_cls.py")

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    code, out, err = run(train_cls, ["--train_folders", tmp_path / "train", "--weights", tmp_path / "p.pth",
                                     "--epochs", "1", "--hidden_size", "8", "--no_progress"], capsys)
    line = one_line(err)
    assert code == 2 and f"cannot write beside {tmp_path / 'p.pth'}: No space left on device" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["train"]  # no lock file, nothing else


def test_merge_jsonl_on_a_full_disk_is_one_line_and_keeps_the_previous_jsonl(tmp_path, capsys, monkeypatch):
    from clamp2.convert import summarize

    (tmp_path / "abc").mkdir()
    (tmp_path / "abc/a.abc").write_text("x")
    (tmp_path / "summaries").mkdir()
    (tmp_path / "summaries/a.json").write_text(json.dumps({"title": "a", "summary_en": "An English summary.",
                                                            "summary_nen": {"language": "Welsh", "summary": "C."},
                                                            "filepaths": ["abc/a.abc"]}))
    (tmp_path / "train.jsonl").write_text("OLD\n")
    DiskFullAfter(monkeypatch, summarize, "atomic_write_text", writes=0)
    code, out, err = run(load_script("process_data/merge_jsonl.py"),
                         [tmp_path / "summaries", tmp_path / "train.jsonl"], capsys)
    assert code == 2 and one_line(err) == f"error: cannot write {tmp_path / 'train.jsonl'}: No space left on device"
    assert (tmp_path / "train.jsonl").read_text() == "OLD\n"


def test_cache_clear_on_a_read_only_disk_says_it_removed_nothing(tmp_path, capsys, monkeypatch):
    # It said "removed 12 cached features" (exit 0) and all 12 were still there.
    namespace = cache_module.FeatureCache(tmp_path / "cache").namespace({"model": "m"}, {})
    namespace.put("ab" * 32, np.ones((1, 4), dtype=np.float32))

    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(cache_module.shutil, "rmtree", read_only)
    code, out, err = run(cache_module, ["clear", "--cache", tmp_path / "cache"], capsys)
    line = one_line(err)
    assert code == 1 and "Read-only file system" in line and "1 cached features are left" in line and out == ""
