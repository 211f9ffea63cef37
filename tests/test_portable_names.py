"""File names as macOS and Windows folders hold them: case- and normalization-insensitive output folders.

Tests cannot mount a case-insensitive file system: :func:`clamp2.files.name_folding` (the probe that finds one)
is checked on the test's own folder, and stood in for where an output folder must fold names.
"""

import os
import unicodedata
from pathlib import Path

import pytest

from clamp2 import files
from clamp2.convert import batch_runner
from clamp2.extraction.core import plan_jobs as plan_extraction

NFC = unicodedata.normalize("NFC", "F\u00fcr Elise")
NFD = unicodedata.normalize("NFD", "F\u00fcr Elise")


def _folds_here(tmp_path: Path) -> tuple:
    (tmp_path / "Probe").write_text("x")
    (tmp_path / NFD).write_text("x")
    try:
        return (tmp_path / "probe").exists(), (tmp_path / NFC).exists()
    finally:
        (tmp_path / "Probe").unlink()
        (tmp_path / NFD).unlink()


def test_name_folding_says_what_the_file_system_does_and_leaves_nothing(tmp_path):
    (tmp_path / "out").mkdir()
    assert files.name_folding(tmp_path / "out" / "not" / "made") == _folds_here(tmp_path)
    assert os.listdir(tmp_path / "out") == []
    assert not (tmp_path / "out" / "not").exists()


def inputs_differing_in_case_and_normalization(root: Path, suffix: str) -> None:
    root.mkdir()
    for stem in ("Song", "song", NFC, NFD):
        (root / (stem + suffix)).write_text(f"X:1\nT:{stem}\nK:C\nC|\n")


@pytest.mark.parametrize("folds", [(True, True), (False, False)])
def test_batch_plan_rejects_outputs_one_file_on_a_folding_output_folder(tmp_path, monkeypatch, folds):
    # Song.abc and song.abc (Für in NFC and NFD) on macOS or Windows: the second output overwrote the first
    # without a word, and a re-run skipped both.
    if _folds_here(tmp_path) != (False, False):
        pytest.skip("the test folder's file system folds names itself")
    monkeypatch.setattr(files, "name_folding", lambda folder: folds, raising=False)
    inputs_differing_in_case_and_normalization(tmp_path / "in", ".abc")
    jobs, rejected = batch_runner.plan_jobs(tmp_path / "in", tmp_path / "out", [".abc"], ".xml")
    if folds == (False, False):  # a Linux output folder: four files, as the reference writes them
        assert (len(jobs), rejected) == (4, [])
        return
    # The first in file order is converted (NFD sorts before NFC), the other is a failure naming it.
    assert {job.name for job in jobs} == {"Song.abc", NFD + ".abc"}
    assert {name for name, _ in rejected} == {"song.abc", NFC + ".abc"}
    assert all(files.ONE_FILE_THERE in reason for _, reason in rejected)


def test_extraction_plan_fails_every_input_of_outputs_one_file_on_a_folding_output_folder(tmp_path, monkeypatch):
    if _folds_here(tmp_path) != (False, False):
        pytest.skip("the test folder's file system folds names itself")
    monkeypatch.setattr(files, "name_folding", lambda folder: (True, False), raising=False)  # Windows: case only
    inputs_differing_in_case_and_normalization(tmp_path / "in", ".abc")
    plan = plan_extraction(tmp_path / "in", tmp_path / "out")
    assert sorted(job.path.name for job in plan.jobs) == sorted([NFC + ".abc", NFD + ".abc"])
    assert sorted(path.name for path, _ in plan.failures) == ["Song.abc", "song.abc"]
    assert all(files.ONE_FILE_THERE in reason for _, reason in plan.failures)


def test_result_files_keep_names_that_are_not_utf8(tmp_path):
    # zero_shot.py --output, clamp2_eval.py / semantic_search_metrics.py --ranks, clamp2_fmd.py --per_file: a file
    # named b"\xff.mid" (legal on Linux) raised UnicodeEncodeError once the whole run was done, and lost the results.
    import json

    name = os.fsdecode(b"\xff.mid")
    assert files.write_text_or_say(tmp_path / "p.json", json.dumps({name: "jig"}, ensure_ascii=False))
    assert (tmp_path / "p.json").read_bytes() == b'{"\xff.mid": "jig"}'
    assert json.loads((tmp_path / "p.json").read_text(errors="surrogateescape")) == {name: "jig"}


def test_zero_shot_truth_labels_match_names_in_either_normalization():
    # A label typed in NFC and a file name a Mac wrote in NFD (or the reverse): the file had no truth label and was
    # left out of the accuracy without a word.
    from clamp2.search.zero_shot import label_in_name

    nfc, nfd = (unicodedata.normalize(form, "L\u00e4ndler") for form in ("NFC", "NFD"))
    assert label_in_name(f"{nfd}_01.mid", [nfc, "jig"]) == nfc
    assert label_in_name(f"{nfc.lower()}_01.mid", [nfd, "jig"]) == nfd
    assert label_in_name("reel_01.mid", [nfc, "jig"]) is None


def test_feature_folders_leave_out_the_appledouble_files_a_mac_writes(tmp_path):
    # A feature folder copied by a Mac to a USB drive or share has ._x.npy beside each x.npy: each was read, "skipped:
    # not a .npy file", and every search exited 1. (CLaMP 3's tools, reading sub-folders, already skip hidden files.)
    import numpy as np

    from clamp2.search.feature_store import build_index, read_features

    folder = tmp_path / "features"
    folder.mkdir()
    for name in ("a", "b"):
        np.save(folder / f"{name}.npy", np.ones((1, 4), np.float32))
        (folder / f"._{name}.npy").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(64))
    features = read_features(folder, progress=False)
    assert (features.names, features.skipped) == (["a.npy", "b.npy"], [])
    assert build_index(folder, tmp_path / "index").skipped == []


def test_summaries_of_inputs_one_file_on_a_folding_output_folder_are_failures(tmp_path, monkeypatch):
    # The summaries' own collision rule (a.json beside a.JSON) is the same as the converters' on macOS or Windows.
    from clamp2.convert.summarize import summarize_folder

    if _folds_here(tmp_path) != (False, False):
        pytest.skip("the test folder's file system folds names itself")
    monkeypatch.setattr(files, "name_folding", lambda folder: (True, True), raising=False)
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    for name in ("Song.json", "song.json"):
        (tmp_path / "in" / name).write_text('{"title": "x"}', encoding="utf-8")
    (tmp_path / "out" / "Song.json").write_text('{"done": true}', encoding="utf-8")  # no request needed
    failed = []
    counts = summarize_folder(tmp_path / "in", tmp_path / "out", client=None, model="m", progress=False,
                              echo=failed.append)
    assert counts.skipped == 1
    assert len(failed) == 1 and "song.json" in failed[0] and files.ONE_FILE_THERE in failed[0]


def test_search_warns_of_keys_that_differ_only_in_normalization(tmp_path, capsys):
    # Features written from NFC inputs, then the input folder re-synced from a Mac (NFD names) and the extraction
    # run again: two features of one piece, shown as two results that look the same, without a word.
    import subprocess
    import sys

    import numpy as np

    from conftest import REPO_ROOT

    folder = tmp_path / "features"
    folder.mkdir()
    for stem in (NFC, NFD, "Song", "song"):
        np.save(folder / f"{stem}.npy", np.ones((1, 4), np.float32))
    np.save(tmp_path / "query.npy", np.ones((1, 4), np.float32))
    done = subprocess.run([sys.executable, str(REPO_ROOT / "semantic_search" / "semantic_search.py"),
                           str(tmp_path / "query.npy"), str(folder), "--top_k", "4"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "differ only in Unicode normalization" in warnings[0]  # Song/song: two pieces
    assert ascii(NFC) in warnings[0] and ascii(NFD) in warnings[0]
    assert len(done.stdout.strip().splitlines()) >= 4  # both kept


def test_scripts_print_names_that_are_not_utf8_under_a_strict_utf8_stdout(tmp_path):
    # LANG=en_US.UTF-8 makes stdout strict: a search listing b"\xff.npy" ended in a UnicodeEncodeError traceback.
    import subprocess
    import sys

    import numpy as np

    from conftest import REPO_ROOT

    folder = tmp_path / "features"
    folder.mkdir()
    np.save(folder / os.fsdecode(b"\xff.npy"), np.ones((1, 4), np.float32))
    np.save(tmp_path / "query.npy", np.ones((1, 4), np.float32))
    done = subprocess.run([sys.executable, str(REPO_ROOT / "semantic_search" / "semantic_search.py"),
                           str(tmp_path / "query.npy"), str(folder)], capture_output=True, timeout=120,
                          env=dict(os.environ, PYTHONIOENCODING="utf-8:strict"))
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert b"\xff" in done.stdout and b"Traceback" not in done.stderr
