"""The five process_data batch converters and clamp2.convert.batch_runner: real files, bad files, re-runs."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mido
import time

import pytest

from clamp2.convert import batch_runner
from clamp2.convert.abc import abc_to_interleaved, interleaved_to_xml, xml_to_abc
from clamp2.files import TMP_SUFFIX
from conftest import REPO_ROOT, load_script, unlistable, workers_outliving_a_kill


def read_exact(path) -> str:
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


def run(script: str, *args) -> int:
    return load_script(f"process_data/{script}.py").main([str(a) for a in args])


def failure_log(output_dir: Path, tool: str) -> dict[str, str]:
    lines = read_exact(output_dir / f"failed_{tool}.log").splitlines()
    return dict(line.split("\t", 1) for line in lines)


def output_files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.suffix != ".log"}


def assert_no_partial_files(folder: Path) -> None:
    assert not [p for p in folder.rglob("*") if p.name.endswith(TMP_SUFFIX)]


def without_date(xml_text: str) -> str:
    return re.sub(r"<encoding-date>[^<]*</encoding-date>", "", xml_text)


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def corpus_tree(tmp_path_factory) -> Path:
    """Corpus scores in sub-folders: chorales, a quartet movement, songs."""
    from music21 import corpus

    root = tmp_path_factory.mktemp("scores")
    for folder, work in (("chorales", "bach/bwv10.7"), ("chorales", "bach/bwv113.8"),
                         ("quartets", "mozart/k80/movement3"), ("songs/lead", "leadSheet/fosterBrownHair")):
        source = Path(str(corpus.getWork(work)))
        (root / folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(source, root / folder / source.name)
    return root


# ------------------------------------------------------------------------------------------------
# Outputs are the reference bytes


def test_scripts_reproduce_the_conformance_vectors(vectors, tmp_path, capsys):
    inputs, expected = vectors / "inputs", vectors / "expected"
    assert run("batch_xml2abc", inputs / "xml", tmp_path / "abc") == 0
    assert last_line(capsys.readouterr().out) == "converted 1, skipped 0, failed 0"
    assert read_exact(tmp_path / "abc" / "bwv10.7.abc") == read_exact(expected / "abc_from_xml" / "bwv10.7.abc")

    abc_in = tmp_path / "abc_in"
    (abc_in / "folk").mkdir(parents=True)
    shutil.copy(expected / "abc_from_xml" / "bwv10.7.abc", abc_in)
    # the single-voice tune as folk collections write it: no V:1 line
    (abc_in / "folk" / "airds_tune3.abc").write_text(
        read_exact(inputs / "abc" / "airds_tune3.abc").replace("K:G\nV:1\n", "K:G\n"), encoding="utf-8")
    assert run("batch_interleaved_abc", abc_in, tmp_path / "interleaved", "--workers", 2) == 0
    assert read_exact(tmp_path / "interleaved" / "bwv10.7.abc") == read_exact(expected / "interleaved" / "bwv10.7.abc")
    assert read_exact(tmp_path / "interleaved" / "folk" / "airds_tune3.abc") == read_exact(
        expected / "interleaved" / "airds_tune3.abc")
    # the tune's ` cannot be timed by abctoolkit: logged as a warning, not a failure
    assert "folk/airds_tune3.abc\t" in read_exact(tmp_path / "interleaved" / "warnings_interleaved_abc.log")
    assert read_exact(tmp_path / "interleaved" / "failed_interleaved_abc.log") == ""

    for flags, folder in (((), "mtf"), (("--m3_compatible",), "mtf"), (("--keep_all",), "mtf_all")):
        out = tmp_path / ("midi" + "".join(flags))
        assert run("batch_midi2mtf", inputs / "midi", out, *flags) == 0
        for name in ("bwv10.7", "handmade"):
            assert read_exact(out / f"{name}.mtf") == read_exact(expected / folder / f"{name}.mtf")

    assert run("batch_mtf2midi", tmp_path / "midi--keep_all", tmp_path / "midi_back") == 0
    for name in ("bwv10.7", "handmade"):
        original = mido.MidiFile(inputs / "midi" / f"{name}.mid")
        rebuilt = mido.MidiFile(tmp_path / "midi_back" / f"{name}.mid")
        assert rebuilt.type == 1 and list(rebuilt.merged_track) == list(original.merged_track)


def test_corpus_chain_mirrors_folders_and_matches_the_converters(corpus_tree, tmp_path, capsys):
    abc, interleaved, xml = tmp_path / "abc", tmp_path / "interleaved", tmp_path / "xml"
    assert run("batch_xml2abc", corpus_tree, abc, "--workers", 2) == 0
    assert output_files(abc) == {"chorales/bwv10.7.abc", "chorales/bwv113.8.abc",
                                 "quartets/movement3.abc", "songs/lead/fosterBrownHair.abc"}
    assert run("batch_interleaved_abc", abc, interleaved, "--workers", 2) == 0
    assert run("batch_abc2xml", interleaved, xml, "--workers", 2) == 0
    assert output_files(xml) == {"chorales/bwv10.7.xml", "chorales/bwv113.8.xml",
                                 "quartets/movement3.xml", "songs/lead/fosterBrownHair.xml"}
    assert last_line(capsys.readouterr().out) == "converted 4, skipped 0, failed 0"
    # worker processes give the bytes of the converters called directly
    for score in corpus_tree.rglob("*.mxl"):
        relative = score.relative_to(corpus_tree).with_suffix(".abc")
        assert read_exact(abc / relative) == xml_to_abc(score)
    quartet_abc = read_exact(abc / "quartets" / "movement3.abc")
    assert read_exact(interleaved / "quartets" / "movement3.abc") == abc_to_interleaved(quartet_abc)
    first_bar = next(line for line in read_exact(interleaved / "quartets" / "movement3.abc").splitlines()
                     if line.startswith("[V:"))
    assert first_bar.startswith("[V:1]") and first_bar.count("[V:") == 4
    assert read_exact(xml / "songs" / "lead" / "fosterBrownHair.xml").startswith("<?xml version='1.0' encoding='utf-8'?>")
    song = read_exact(interleaved / "songs" / "lead" / "fosterBrownHair.abc")
    assert without_date(read_exact(xml / "songs" / "lead" / "fosterBrownHair.xml")) == without_date(
        interleaved_to_xml(song))


# ------------------------------------------------------------------------------------------------
# Bad inputs: reported, the rest converts, nothing partial, re-runs convert only what is missing


def write_midi_inputs(folder: Path, vectors: Path) -> None:
    (folder / "good").mkdir(parents=True)
    (folder / "bad").mkdir()
    for name in ("bwv10.7", "handmade"):
        shutil.copy(vectors / "inputs" / "midi" / f"{name}.mid", folder / "good")
    (folder / "bad" / "empty.mid").write_bytes(b"")
    full = (vectors / "inputs" / "midi" / "bwv10.7.mid").read_bytes()
    (folder / "bad" / "truncated.mid").write_bytes(full[: len(full) // 2])
    (folder / "bad" / "text.mid").write_text("Just some notes about a piece, not MIDI.\n")


def test_failure_log_of_a_finished_run_is_sorted(vectors, tmp_path, capsys):
    """Rejections (known before converting) stream first, conversions as they finish: the end rewrites sorted."""
    inputs = tmp_path / "in"
    (inputs / "a").mkdir(parents=True)
    (inputs / "b").mkdir()
    (inputs / "a" / "empty.mid").write_bytes(b"")
    for name in ("x.mid", "x.midi"):  # the same output: the second is rejected before any conversion
        shutil.copy(vectors / "inputs" / "midi" / "handmade.mid", inputs / "b" / name)
    assert run("batch_midi2mtf", inputs, tmp_path / "out", "--workers", 1) == 1
    err = capsys.readouterr().err
    assert err.index("failed: b/x.midi") < err.index("failed: a/empty.mid")  # the order they happened in
    assert list(failure_log(tmp_path / "out", "midi2mtf")) == ["a/empty.mid", "b/x.midi"]


def test_bad_midi_files_are_reported_and_the_rest_converts(vectors, tmp_path, capsys):
    inputs, out = tmp_path / "in", tmp_path / "out"
    write_midi_inputs(inputs, vectors)
    assert run("batch_midi2mtf", inputs, out, "--workers", 2) == 1
    captured = capsys.readouterr()
    assert last_line(captured.out) == "converted 2, skipped 0, failed 3"
    failures = failure_log(out, "midi2mtf")
    assert set(failures) == {"bad/empty.mid", "bad/truncated.mid", "bad/text.mid"}
    # two workers finish in any order: the finished log is sorted, the same run after run
    assert list(failures) == sorted(failures)
    assert "not a complete MIDI file" in failures["bad/empty.mid"]
    assert "not a complete MIDI file" in failures["bad/truncated.mid"]
    assert "MThd not found" in failures["bad/text.mid"]
    for name, reason in failures.items():
        assert f"failed: {name}: {reason}" in captured.err
    assert output_files(out) == {"good/bwv10.7.mtf", "good/handmade.mtf"}
    assert_no_partial_files(out)

    # re-running converts nothing new and reports the same failures
    assert run("batch_midi2mtf", inputs, out) == 1
    assert last_line(capsys.readouterr().out) == "converted 0, skipped 2, failed 3"
    # once a bad file is replaced, only that file is converted
    shutil.copy(vectors / "inputs" / "midi" / "handmade.mid", inputs / "bad" / "text.mid")
    assert run("batch_midi2mtf", inputs, out) == 1
    assert last_line(capsys.readouterr().out) == "converted 1, skipped 2, failed 2"
    assert read_exact(out / "bad" / "text.mtf") == read_exact(vectors / "expected" / "mtf" / "handmade.mtf")
    assert set(failure_log(out, "midi2mtf")) == {"bad/empty.mid", "bad/truncated.mid"}


def test_bad_abc_and_xml_files(vectors, tmp_path, capsys):
    xml_in = tmp_path / "xml_in"
    xml_in.mkdir()
    shutil.copy(vectors / "inputs" / "xml" / "bwv10.7.mxl", xml_in)
    (xml_in / "malformed.xml").write_text("<score-partwise><part id='P1'><measure number='1'>")
    (xml_in / "empty.musicxml").write_bytes(b"")
    assert run("batch_xml2abc", xml_in, tmp_path / "abc") == 1
    failures = failure_log(tmp_path / "abc", "xml2abc")
    assert set(failures) == {"malformed.xml", "empty.musicxml"}
    assert "ParseError" in failures["malformed.xml"]
    assert output_files(tmp_path / "abc") == {"bwv10.7.abc"}

    abc_in = tmp_path / "abc_in"
    abc_in.mkdir()
    shutil.copy(vectors / "expected" / "abc_from_xml" / "bwv10.7.abc", abc_in)
    (abc_in / "latin1.abc").write_bytes("X:1\nT:Chanson fran\xe7aise\nK:C\nV:1\ncdef|\n".encode("latin-1"))
    (abc_in / "unequal_bars.abc").write_text("X:1\nL:1/8\nM:2/4\nK:C\nV:1\ncdef|gabc|\nV:2\nCDEF|\n")
    (abc_in / "unequal_durations.abc").write_text("X:1\nL:1/8\nM:2/4\nK:C\nV:1\ncdef|gabc|\nV:2\nCDE|G,A,B,C|\n")
    (abc_in / "empty.abc").write_bytes(b"")
    capsys.readouterr()
    assert run("batch_interleaved_abc", abc_in, tmp_path / "interleaved", "--workers", 2) == 1
    assert last_line(capsys.readouterr().out) == "converted 2, skipped 0, failed 3"
    failures = failure_log(tmp_path / "interleaved", "interleaved_abc")
    assert set(failures) == {"latin1.abc", "unequal_bars.abc", "empty.abc"}
    assert "UnicodeDecodeError" in failures["latin1.abc"]
    assert "Unequal bar numbers" in failures["unequal_bars.abc"]
    assert "no K: line" in failures["empty.abc"]
    warnings_log = read_exact(tmp_path / "interleaved" / "warnings_interleaved_abc.log")
    assert warnings_log.startswith("unequal_durations.abc\tbar durations differ")
    assert output_files(tmp_path / "interleaved") == {"bwv10.7.abc", "unequal_durations.abc"}
    assert_no_partial_files(tmp_path / "interleaved")

    assert run("batch_abc2xml", abc_in, tmp_path / "xml") == 1
    # abc2xml reads Latin-1 as its command line does; an empty file has no tune
    assert set(failure_log(tmp_path / "xml", "abc2xml")) == {"empty.abc"}
    assert "latin1.xml" in output_files(tmp_path / "xml")

    mtf_in = tmp_path / "mtf_in"
    mtf_in.mkdir()
    shutil.copy(vectors / "expected" / "mtf" / "handmade.mtf", mtf_in)
    (mtf_in / "broken.mtf").write_text("ticks_per_beat 96\nnote_on 0 0 60\n")
    assert run("batch_mtf2midi", mtf_in, tmp_path / "midi") == 1
    assert "line 2" in failure_log(tmp_path / "midi", "mtf2midi")["broken.mtf"]
    assert output_files(tmp_path / "midi") == {"handmade.mid"}


def test_a_file_that_disappears_mid_run(vectors, tmp_path, monkeypatch, capsys):
    inputs = tmp_path / "in"
    write_midi_inputs(inputs, vectors)
    shutil.rmtree(inputs / "bad")
    vanishing = inputs / "good" / "handmade.mid"
    real_find_files = batch_runner.find_files

    def find_then_delete(*args, **kwargs):
        found = real_find_files(*args, **kwargs)
        vanishing.unlink()  # gone after discovery, before conversion
        return found

    monkeypatch.setattr(batch_runner, "find_files", find_then_delete)
    assert run("batch_midi2mtf", inputs, tmp_path / "out", "--workers", 1) == 1
    assert last_line(capsys.readouterr().out) == "converted 1, skipped 0, failed 1"
    assert "FileNotFoundError" in failure_log(tmp_path / "out", "midi2mtf")["good/handmade.mid"]
    assert output_files(tmp_path / "out") == {"good/bwv10.7.mtf"}
    assert_no_partial_files(tmp_path / "out")


def test_of_inputs_differing_in_extension_case_the_lower_case_one_is_converted(vectors, tmp_path):
    # The original takes lower-case extensions only, so it converts song.mid; path order alone puts song.MID first.
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(vectors / "inputs" / "midi" / "bwv10.7.mid", inputs / "song.MID")
    shutil.copy(vectors / "inputs" / "midi" / "handmade.mid", inputs / "song.mid")
    assert run("batch_midi2mtf", inputs, tmp_path / "out") == 1
    assert failure_log(tmp_path / "out", "midi2mtf") == {"song.MID": "same output song.mtf as song.mid"}
    assert read_exact(tmp_path / "out" / "song.mtf") == read_exact(vectors / "expected" / "mtf" / "handmade.mtf")


def test_inputs_sharing_an_output_do_not_overwrite_each_other(vectors, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(vectors / "inputs" / "midi" / "handmade.mid", inputs / "piece.mid")
    shutil.copy(vectors / "inputs" / "midi" / "bwv10.7.mid", inputs / "piece.midi")
    assert run("batch_midi2mtf", inputs, tmp_path / "out") == 1
    assert failure_log(tmp_path / "out", "midi2mtf") == {"piece.midi": "same output piece.mtf as piece.mid"}
    assert read_exact(tmp_path / "out" / "piece.mtf") == read_exact(vectors / "expected" / "mtf" / "handmade.mtf")


def crash_on_marked_files(path: Path) -> str:
    if "crash" in path.name:
        os._exit(3)  # a worker dying outright, as on a segfault or an out-of-memory kill
    return path.read_text()


def run_with_a_crashing_file(tmp_path: Path, good_files: int, convert) -> batch_runner.BatchResult:
    """``ok0.txt`` … and ``crash.txt`` in ``tmp_path/in``, converted by ``convert`` in 2 workers into ``tmp_path/out``."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    (tmp_path / "out").mkdir()
    for index in range(good_files):
        (inputs / f"ok{index}.txt").write_text(f"piece {index}")
    (inputs / "crash.txt").write_text("boom")
    jobs, _ = batch_runner.plan_jobs(inputs, tmp_path / "out", [".txt"], ".out")
    return batch_runner.run_batch(jobs, convert, output_dir=tmp_path / "out", tool="test", workers=2, progress=False)


def test_a_dying_worker_fails_only_its_file(tmp_path):
    result = run_with_a_crashing_file(tmp_path, 6, crash_on_marked_files)
    assert result.failures == [("crash.txt", batch_runner.WORKER_DIED)]
    assert result.converted == 6
    assert output_files(tmp_path / "out") == {f"ok{i}.out" for i in range(6)}
    assert read_exact(tmp_path / "out" / "ok3.out") == "piece 3"


def slow_with_a_partial_file_or_crash(path: Path) -> str:
    """A conversion that is mid-write for a while (its partial output on disk), or that kills its worker."""
    if "crash" in path.name:
        time.sleep(0.2)  # the other worker is busy with a good file by then
        os._exit(3)
    partial = path.parent.parent / "out" / f".{path.stem}.out.worker{os.getpid()}.partial"
    partial.write_text("half")
    time.sleep(0.6)
    partial.unlink()
    return path.read_text()


def test_files_in_flight_when_a_worker_dies_are_retried_and_their_partial_files_removed(tmp_path):
    result = run_with_a_crashing_file(tmp_path, 3, slow_with_a_partial_file_or_crash)
    assert result.failures == [("crash.txt", batch_runner.WORKER_DIED)] and result.converted == 3
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["failed_test.log", "ok0.out", "ok1.out", "ok2.out",
                                                                  "warnings_test.log"]


def interrupted_on_the_second_file(path: Path) -> str:
    if path.name == "b.txt":
        raise KeyboardInterrupt
    return path.read_text()


def test_ctrl_c_exits_130_keeping_what_was_written(tmp_path, capsys):
    # 130 (128 + SIGINT), not 0: a "convert && extract" chain must stop after an interrupt.
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("a.txt", "b.txt", "c.txt"):
        (inputs / name).write_text(name)
    code = batch_runner.convert_folder(inputs, tmp_path / "out", convert=interrupted_on_the_second_file,
                                       extensions=[".txt"], output_suffix=".out", tool="test", workers=1,
                                       progress=False)
    assert code == 130 and "run the same command again" in capsys.readouterr().err
    assert read_exact(tmp_path / "out" / "a.out") == "a.txt" and not list((tmp_path / "out").rglob("*.partial"))


# ------------------------------------------------------------------------------------------------
# Skipping, overwriting, usage errors, command line


def test_skip_existing_and_overwrite(vectors, tmp_path, capsys):
    out = tmp_path / "out"
    assert run("batch_midi2mtf", vectors / "inputs" / "midi", out) == 0
    (out / "handmade.mtf").write_text("stale")
    assert run("batch_midi2mtf", vectors / "inputs" / "midi", out) == 0
    assert last_line(capsys.readouterr().out) == "converted 0, skipped 2, failed 0"
    assert read_exact(out / "handmade.mtf") == "stale"
    (out / "handmade.mtf").write_bytes(b"")  # renamed into place but emptied by a power cut: converted again
    assert run("batch_midi2mtf", vectors / "inputs" / "midi", out) == 0
    assert last_line(capsys.readouterr().out) == "converted 1, skipped 1, failed 0"
    assert read_exact(out / "handmade.mtf") == read_exact(vectors / "expected" / "mtf" / "handmade.mtf")
    (out / "handmade.mtf").write_text("stale")
    assert run("batch_midi2mtf", vectors / "inputs" / "midi", out, "--overwrite") == 0
    assert last_line(capsys.readouterr().out) == "converted 2, skipped 0, failed 0"
    assert read_exact(out / "handmade.mtf") == read_exact(vectors / "expected" / "mtf" / "handmade.mtf")


def test_output_folder_inside_the_input_folder_is_not_read_back(vectors, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(vectors / "expected" / "abc_from_xml" / "bwv10.7.abc", inputs)
    assert run("batch_interleaved_abc", inputs, inputs / "interleaved") == 0
    assert run("batch_interleaved_abc", inputs, inputs / "interleaved") == 0
    assert last_line(capsys.readouterr().out) == "converted 0, skipped 1, failed 0"
    assert output_files(inputs / "interleaved") == {"bwv10.7.abc"}


def test_usage_errors_exit_2(vectors, tmp_path, capsys):
    assert run("batch_midi2mtf", tmp_path / "missing", tmp_path / "out") == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("no music here")
    assert run("batch_xml2abc", tmp_path / "notes", tmp_path / "out") == 2
    assert "no .xml/.mxl/.musicxml files" in capsys.readouterr().err
    abc_in = tmp_path / "abc"
    abc_in.mkdir()
    shutil.copy(vectors / "expected" / "abc_from_xml" / "bwv10.7.abc", abc_in)
    assert run("batch_interleaved_abc", abc_in, abc_in, "--overwrite") == 2
    assert "overwrite its input" in capsys.readouterr().err
    assert read_exact(abc_in / "bwv10.7.abc") == read_exact(vectors / "expected" / "abc_from_xml" / "bwv10.7.abc")
    for bad_args in (["--workers", "0"], ["--keep_all", "--m3_compatible"], []):
        with pytest.raises(SystemExit) as exit_info:
            run("batch_midi2mtf", *([vectors / "inputs" / "midi", tmp_path / "o"] if bad_args else []), *bad_args)
        assert exit_info.value.code == 2


@pytest.mark.parametrize("script", ["batch_xml2abc", "batch_interleaved_abc", "batch_abc2xml",
                                    "batch_midi2mtf", "batch_mtf2midi"])
def test_help_and_documented_interface(script, capsys):
    module = load_script(f"process_data/{script}.py")
    assert module.__doc__ and f"python process_data/{script}.py <input_dir> <output_dir>" in module.__doc__
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    assert "--workers" in help_text and "--overwrite" in help_text and "--no_progress" in help_text
    args = module.parse_args(["in", "out"])
    assert args.workers is None and args.overwrite is False and args.no_progress is False


def test_no_progress_silences_the_bar(vectors, tmp_path, capsys):
    # stderr is not a terminal here, so the bar writes whole lines ("midi2mtf: ... file/s") unless silenced.
    assert run("batch_midi2mtf", vectors / "inputs" / "midi", tmp_path / "a", "--workers", "1") == 0
    assert "midi2mtf:" in capsys.readouterr().err
    assert run("batch_midi2mtf", vectors / "inputs" / "midi", tmp_path / "b", "--workers", "1", "--no_progress") == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert last_line(captured.out) == "converted 2, skipped 0, failed 0"


def test_runs_as_a_script(vectors, tmp_path):
    completed = subprocess.run(
        [sys.executable, str(REPO_ROOT / "process_data" / "batch_midi2mtf.py"), str(vectors / "inputs" / "midi"),
         str(tmp_path / "out"), "--keep_all", "--workers", "2"], capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip().splitlines()[-1] == "converted 2, skipped 0, failed 0"
    assert read_exact(tmp_path / "out" / "handmade.mtf") == read_exact(vectors / "expected" / "mtf_all" / "handmade.mtf")


def test_midi2mtf_clamp3_mode_reproduces_the_clamp3_vectors(tmp_path, capsys):
    from conftest import DATA_DIR

    vectors3 = DATA_DIR / "vectors_clamp3"
    assert run("batch_midi2mtf", vectors3 / "inputs" / "midi", tmp_path / "mtf", "--clamp3") == 0
    for name in ("bwv26.6", "banish_misfortune", "handmade_sysex"):
        assert read_exact(tmp_path / "mtf" / f"{name}.mtf") == read_exact(vectors3 / "expected" / "mtf" / f"{name}.mtf")
    with pytest.raises(SystemExit) as exit_info:
        run("batch_midi2mtf", vectors3 / "inputs" / "midi", tmp_path / "o", "--clamp3", "--keep_all")
    assert exit_info.value.code == 2


# ------------------------------------------------------------------------------------------------
# A run killed from outside (SIGTERM, SIGKILL): a re-run leaves nothing of it behind


def test_a_rerun_removes_the_temporary_files_a_killed_run_left(tmp_path, capsys):
    from clamp2.files import _open_temporary

    inputs, out = tmp_path / "in", tmp_path / "out"
    (inputs / "sub").mkdir(parents=True)
    (inputs / "a.txt").write_text("a")
    (inputs / "sub" / "b.txt").write_text("b")
    out.mkdir()
    (out / "a.out").write_text("a")  # finished before the kill: skipped
    # What a run killed while writing sub/b.out (SIGKILL, or SIGTERM's default action) and a.out (an
    # --overwrite run) left: their temporary files, as the writer names them.
    for target in (out / "sub" / "b.out", out / "a.out"):
        fd, _ = _open_temporary(str(target))
        os.write(fd, b"hal")
        os.close(fd)
    assert batch_runner.convert_folder(inputs, out, convert=lambda path: path.read_text(), extensions=[".txt"],
                                       output_suffix=".out", tool="test", workers=1, progress=False) == 0
    assert last_line(capsys.readouterr().out) == "converted 1, skipped 1, failed 0"
    assert read_exact(out / "sub" / "b.out") == "b"
    assert_no_partial_files(out)


def slow_and_telling_its_pid(path: Path) -> str:
    (path.parent.parent / "pids" / str(os.getpid())).touch()
    time.sleep(0.5)
    return path.read_text()


@pytest.mark.skipif(not sys.platform.startswith("linux"),
                    reason="the test's conversion function must be importable in spawned workers; /proc")
@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGKILL"])
def test_workers_do_not_outlive_a_killed_run(tmp_path, signal_name):
    (tmp_path / "in").mkdir()
    (tmp_path / "pids").mkdir()
    for index in range(40):
        (tmp_path / "in" / f"{index}.txt").write_text(str(index))
    code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
            "import test_batch_process_data as t\n"
            "from clamp2.convert import batch_runner\n"
            "batch_runner.convert_folder(sys.argv[3] + '/in', sys.argv[3] + '/out', convert=t.slow_and_telling_its_pid,"
            " extensions=['.txt'], output_suffix='.out', tool='test', workers=2, progress=False)\n")
    alive = workers_outliving_a_kill([sys.executable, "-c", code, str(Path(__file__).parent), str(REPO_ROOT),
                                      str(tmp_path)], signal_name,
                                     lambda batch: [int(p.name) for p in (tmp_path / "pids").iterdir()])
    assert not alive, f"worker processes {alive} outlived the killed run"


def warn_and_copy(path: Path) -> str:
    import warnings

    warnings.warn(f"unequal bars in {path.stem}")
    return path.read_text()


def test_a_rerun_keeps_the_warnings_of_the_files_it_skips(tmp_path, capsys):
    # A resumed run (or the same command run twice) converts only what is missing; the warnings of the files
    # converted before must stay in the log, as after one uninterrupted run.
    inputs, out = tmp_path / "in", tmp_path / "out"
    (inputs / "sub").mkdir(parents=True)
    for name in ("a.txt", "sub/b.txt", "c.txt"):
        (inputs / name).write_text(name)

    def convert() -> int:
        return batch_runner.convert_folder(inputs, out, convert=warn_and_copy, extensions=[".txt"],
                                           output_suffix=".out", tool="test", workers=1, progress=False)

    assert convert() == 0
    complete = read_exact(out / "warnings_test.log")
    assert complete == "a.txt\tunequal bars in a\nc.txt\tunequal bars in c\nsub/b.txt\tunequal bars in b\n"
    (out / "sub" / "b.out").unlink()  # as if the run had been killed before it
    assert convert() == 0
    assert last_line(capsys.readouterr().out) == "converted 1, skipped 2, failed 0"
    assert read_exact(out / "warnings_test.log") == complete
    assert convert() == 0  # nothing left to do: the log stays whole
    assert read_exact(out / "warnings_test.log") == complete


def fail_or_warn(path: Path) -> str:
    import warnings

    if path.stem.startswith("bad"):
        raise ValueError("not a score")
    warnings.warn("unequal bars")
    return path.read_text()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="a file name that is not UTF-8 needs Linux")
def test_file_names_that_are_not_utf8_are_logged_as_the_file_system_has_them(tmp_path, capsys):
    # Latin-1 names (old archives): the run went on logging per file and raised UnicodeEncodeError on the first one.
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    for raw in (b"bad caf\xe9.txt", b"ok caf\xe9.txt", b"ok2.txt"):
        (inputs / os.fsdecode(raw)).write_text("x")
    assert batch_runner.convert_folder(inputs, out, convert=fail_or_warn, extensions=[".txt"], output_suffix=".out",
                                       tool="test", workers=1, progress=False) == 1
    assert last_line(capsys.readouterr().out) == "converted 2, skipped 0, failed 1"
    assert (out / "failed_test.log").read_bytes() == b"bad caf\xe9.txt\tValueError: not a score\n"
    assert (out / "warnings_test.log").read_bytes() == b"ok caf\xe9.txt\tunequal bars\nok2.txt\tunequal bars\n"
    assert sorted(os.listdir(os.fsencode(out))) == [b"failed_test.log", b"ok caf\xe9.out", b"ok2.out",
                                                    b"warnings_test.log"]


@pytest.mark.skipif(os.name == "nt", reason="a tab or a line break in a file name needs a POSIX file system")
def test_names_with_a_tab_or_a_line_break_read_back_from_the_logs(tmp_path, capsys):
    # Logs are name<TAB>reason lines: such a name was written raw, so a resumed run read "b" as a line of its own
    # and lost the warnings of "a<LF>b.txt"; the name is written as a JSON string, every other name as it is.
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    for name in ("a\nb.txt", "c\td.txt", '"q.txt', "plain.txt", "bad\n.txt"):
        (inputs / name).write_text("x")

    def convert() -> int:
        return batch_runner.convert_folder(inputs, out, convert=fail_or_warn, extensions=[".txt"],
                                           output_suffix=".out", tool="test", workers=1, progress=False)

    assert convert() == 1
    complete = read_exact(out / "warnings_test.log")
    assert complete == ('"\\"q.txt"\tunequal bars\n"a\\nb.txt"\tunequal bars\n"c\\td.txt"\tunequal bars\n'
                        "plain.txt\tunequal bars\n")
    assert read_exact(out / "failed_test.log") == '"bad\\n.txt"\tValueError: not a score\n'
    (out / "plain.out").unlink()
    assert convert() == 1
    assert last_line(capsys.readouterr().out) == "converted 1, skipped 3, failed 1"  # the failed file again
    assert read_exact(out / "warnings_test.log") == complete


def test_an_rmid_file_named_mid_converts_with_a_warning(tmp_path, capsys):
    # The reference logs "MThd not found. Probably not a MIDI file" and writes nothing for a RIFF RMID file.
    midi = mido.MidiFile(ticks_per_beat=96)
    midi.tracks.append(mido.MidiTrack([mido.Message("note_on", note=60, velocity=80),
                                       mido.Message("note_off", note=60, time=96)]))
    plain = tmp_path / "plain.mid"
    midi.save(plain)
    smf = plain.read_bytes()
    body = b"RMID" + b"data" + len(smf).to_bytes(4, "little") + smf + b"\0" * (len(smf) % 2)
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    (inputs / "song.mid").write_bytes(b"RIFF" + len(body).to_bytes(4, "little") + body)
    assert run("batch_midi2mtf", inputs, out, "--workers", 1, "--no_progress") == 0
    assert last_line(capsys.readouterr().out) == "converted 1, skipped 0, failed 0"
    from clamp2.convert.mtf import midi_file_to_mtf
    assert read_exact(out / "song.mtf") == midi_file_to_mtf(mido.MidiFile(plain))
    assert "read without its RIFF RMID wrapper" in read_exact(out / "warnings_midi2mtf.log")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs as on POSIX")
def test_what_cannot_be_searched_or_read_is_a_failure_not_left_out(tmp_path, monkeypatch, capsys):
    # The reference's os.walk skips a folder it cannot list without a word and waits forever on a FIFO named
    # x.mid; the batch converters left both out silently (exit 0), as extraction no longer does (test_files.py).
    midi = mido.MidiFile()
    midi.tracks.append(mido.MidiTrack([mido.Message("note_on", note=60, velocity=80)]))
    inputs, out = tmp_path / "in", tmp_path / "out"
    for rel in ("ok/a.mid", "locked/b.mid"):
        (inputs / rel).parent.mkdir(parents=True, exist_ok=True)
        midi.save(inputs / rel)
    os.mkfifo(inputs / "ok" / "pipe.mid")
    unlistable(monkeypatch, "locked")  # root can list any folder: refuse one as a permission would
    assert run("batch_midi2mtf", inputs, out, "--workers", 1, "--no_progress") == 1
    assert last_line(capsys.readouterr().out) == "converted 1, skipped 0, failed 2"
    failures = failure_log(out, "midi2mtf")
    assert set(failures) == {"locked", "ok/pipe.mid"}
    assert "cannot list this folder" in failures["locked"] and "not a regular file" in failures["ok/pipe.mid"]


def test_planning_resolves_links_as_path_resolve_does(tmp_path):
    # Each folder is resolved once (resolve() per file was most of the planning time); links keep their meaning:
    # an input link into the output folder is an output fed back, not an input; an output folder that is the
    # input folder through a link is refused.
    inputs = tmp_path / "in"
    (inputs / "sub").mkdir(parents=True)
    (inputs / "a.txt").write_text("a")
    (inputs / "sub" / "b.txt").write_text("b")
    out = inputs / "out"
    (out / "sub").mkdir(parents=True)
    (out / "done.txt").write_text("an output of an earlier run")
    (inputs / "back.txt").symlink_to(out / "done.txt")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "c.txt").write_text("c")
    (inputs / "sub" / "c.txt").symlink_to(tmp_path / "elsewhere" / "c.txt")
    jobs, rejected = batch_runner.plan_jobs(inputs, out, [".txt"], ".txt")
    assert sorted(job.name for job in jobs) == ["a.txt", "sub/b.txt", "sub/c.txt"] and not rejected
    assert {job.name: job.target for job in jobs}["sub/c.txt"] == out / "sub" / "c.txt"
    (tmp_path / "linked").symlink_to(inputs, target_is_directory=True)  # the input folder itself through a link
    with pytest.raises(batch_runner.BatchUsageError, match="would overwrite its input"):
        batch_runner.plan_jobs(tmp_path / "linked", inputs, [".txt"], ".txt")
