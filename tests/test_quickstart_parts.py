"""Unit-level checks of the quick starts (clamp2/quickstart/, code/quickstart.py) that the end-to-end
runs do not look at: the report's numbers and lines, the summary line, the metrics read back from the
project's scripts, the demo corpus's facts and texts, and the rendered audio. Each is fast: no
training, scripts replaced by recorded output where the pipeline only parses what they print."""

from __future__ import annotations

import io
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from conftest import load_script, processes_left_running

from clamp2.provenance import code_version
from clamp2.quickstart import pipeline, report
from clamp2.quickstart import demo_corpus as dc
from clamp2.quickstart import music21_corpus
from clamp2.quickstart.pipeline import Clamp3Settings, Quickstart, Quickstart3, Settings, StepFailed


# -- pipeline ---------------------------------------------------------------------------------------

def test_chance_and_metric_lines():
    assert pipeline.chance_mrr(12) == pytest.approx(sum(1 / r for r in range(1, 13)) / 12)
    printed = "MRR: 0.31\nHit@1: 0.2\nHit@10: 0.9\nHit@100: 1.0\n"
    assert pipeline.metric_lines(printed) == {"MRR": 0.31, "Hit@1": 0.2, "Hit@10": 0.9, "Hit@100": 1.0}


def test_model_env_batch_is_per_process():
    env = Quickstart(Path("/nonexistent/x"), Settings(batch_size=16, nproc=2)).model_env()
    assert env["CLAMP2_BATCH_SIZE"] == "8" and env["M3_BATCH_SIZE"] == "16"


def test_a_failed_step_exits_1_and_timings_survive_a_resume(tmp_path, capsys):
    run = Quickstart(tmp_path, Settings.tiny(), progress=False)

    def fails():
        raise StepFailed("broken")
    run.steps = lambda: [("corpus", lambda: None), ("convert", fails)]
    assert run.run() == 1
    assert "step 2 (convert) failed" in capsys.readouterr().err
    # a resumed run keeps the earlier steps' times (the report's Time table)
    again = Quickstart(tmp_path, Settings.tiny(), progress=False)
    assert list(again.timings) == ["corpus"]


def test_a_step_stopped_by_a_full_disk_in_a_library_writer_is_one_line(tmp_path, capsys):
    # transformers' save_pretrained writes through safetensors, whose full-disk error is no OSError: a 30-line
    # traceback at step 4 of a quick start on a small disk.
    run = Quickstart(tmp_path, Settings.tiny(), progress=False)

    class SafetensorError(Exception):
        """safetensors' own error type (not an OSError)."""

    def full():
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    def broken():
        raise SafetensorError("Error while serializing: header too large")

    run.steps = lambda: [("corpus", lambda: None), ("text model", full)]
    assert run.run() == 1
    err = capsys.readouterr().err
    assert err.strip() == (f"quickstart: step 2 (text model) failed: No space left on device in {tmp_path}; free "
                           "space and run the same command again: finished steps are kept")
    run.steps = lambda: [("text model", broken)]
    with pytest.raises(SafetensorError):  # anything else is not said to be a full disk
        run.run()


def test_steps_an_older_version_did_are_said(tmp_path, capsys):
    # markers of an older version are empty files: its numbers (FMD changed in 7801419) were reported as this one's
    (tmp_path / ".done").mkdir()
    (tmp_path / ".done" / "corpus").touch()
    run = Quickstart(tmp_path, Settings.tiny(), progress=False)
    run.print_summary = lambda total: None
    run.steps = lambda: [("corpus", lambda: None), ("convert", lambda: None)]
    assert run.run() == 0
    assert "done by another version of this package" in capsys.readouterr().err
    assert (tmp_path / ".done" / "convert").read_text().strip() == code_version()
    (tmp_path / ".done" / "corpus").write_text(code_version())
    assert run.run() == 0
    assert "another version" not in capsys.readouterr().err


def test_corpus_step_says_train_and_held_out_counts(tmp_path, monkeypatch, capsys):
    pieces = [types.SimpleNamespace(split=s) for s in ["train"] * 8 + ["test"] * 2]
    monkeypatch.setattr(dc, "build_demo_corpus", lambda *a, **k: pieces)
    Quickstart(tmp_path, Settings.tiny(), progress=False).step_corpus()
    assert ": 8 train, 2 held out" in capsys.readouterr().out


def _piece_files(d: Path, split: str, stem: str, en: str, other: str) -> None:
    for kind in ("abc", "mtf"):
        (d / kind / split).mkdir(parents=True, exist_ok=True)
        (d / kind / split / f"{stem}.{kind}").write_text("x\n")
    (d / "metadata" / split).mkdir(parents=True, exist_ok=True)
    (d / "metadata" / split / f"{stem}.json").write_text(json.dumps(
        {"title": stem, "summary_en": en, "summary_nen": {"language": "German", "summary": other}}))


def test_pairs_write_the_other_language_queries(tmp_path):
    run = Quickstart(tmp_path, Settings.tiny(), progress=False)
    _piece_files(run.data, "train", "jig_A", "english a", "deutsch a")
    _piece_files(run.data, "test", "jig_B", "english b", "deutsch b")
    run.step_pairs()
    assert (run.data / "queries_en" / "jig_B.txt").read_text() == "english b"
    assert (run.data / "queries_nen" / "jig_B.txt").read_text() == "deutsch b"
    assert not (run.data / "queries_en" / "jig_A.txt").exists()


def test_features_and_evaluate_use_the_right_folders(tmp_path, monkeypatch):
    run = Quickstart(tmp_path, Settings.tiny(), progress=False)
    calls = []
    run.extract = lambda source, target, normalize=True: calls.append((source.name, target.name, normalize))
    run.step_features()
    assert ("train", "abc_train_positions", False) in calls and ("test", "abc_test_positions", False) in calls
    assert ("train", "abc_train", True) in calls and ("test", "mtf_test", True) in calls

    (run.features / "abc_test").mkdir(parents=True)
    for i in range(12):
        np.save(run.features / "abc_test" / f"jig_{i}.npy", np.zeros((1, 4), np.float32))
    searched = []

    def fake_run_script(relative, args, env=None, ok=(0,), capture=False):
        searched.append((Path(args[0]).name, Path(args[1]).name))
        return "MRR: 0.5\nHit@1: 0.25\nHit@10: 1.0\n"
    monkeypatch.setattr(pipeline, "run_script", fake_run_script)
    run.zero_shot = run.probe = run.fmd = lambda: None
    run.step_evaluate()
    assert searched == [("text_en", "abc_test"), ("text_en", "mtf_test"), ("text_nen", "abc_test"),
                        ("abc_test", "mtf_test")]
    assert run.metrics["chance_mrr"] == round(pipeline.chance_mrr(12), 4) == 0.2586
    assert run.metrics["retrieval"]["text→music (ABC)"] == {"MRR": 0.5, "Hit@1": 0.25, "Hit@10": 1.0}


def recorded_zero_shot_and_probe(run, predictions: dict, printed: str, probe_metrics: dict, calls=None):
    """A ``pipeline.run_script`` stand-in: zero_shot.py writes ``predictions`` and prints ``printed``;
    train_cls.py writes the probe's metrics.json; each call's arguments go to ``calls`` by script."""
    def fake_run_script(relative, args, env=None, ok=(0,), capture=False):
        if calls is not None:
            calls[relative] = [str(a) for a in args]
        if "zero_shot" in relative:
            (run.out / "zero_shot.json").write_text(json.dumps(predictions))
            return printed
        if "train_cls" in relative:
            (run.out / "probe").mkdir(exist_ok=True)
            (run.out / "probe" / "metrics.json").write_text(json.dumps(probe_metrics))
        return ""
    return fake_run_script


def test_zero_shot_and_probe_numbers(tmp_path, monkeypatch):
    run = Quickstart(tmp_path, Settings.tiny(), progress=False)
    run.out.mkdir(parents=True, exist_ok=True)
    predictions = {f"{label}_{i}.abc": label for label, n in (("jig", 3), ("reel", 1)) for i in range(n)}

    monkeypatch.setattr(pipeline, "run_script", recorded_zero_shot_and_probe(
        run, predictions, "zero-shot: accuracy 0.75, macro-F1 0.40\n",
        {"eval": {"accuracy": 0.8, "macro_f1": 0.6}, "best_epoch": 7, "files": {"train": 40, "eval": 5}}))
    run.zero_shot()
    z = run.metrics["zero_shot"]
    assert (z["accuracy"], z["macro_f1"], z["majority_class"]) == (0.75, 0.4, 0.75)
    folder = run.features / "abc_test_positions"
    folder.mkdir(parents=True)
    for name in ("jig_1", "jig_2", "jig_3", "reel_1", "hornpipe_1"):
        np.save(folder / f"{name}.npy", np.zeros((1, 4), np.float32))
    run.probe()
    assert run.metrics["probe"] == {"accuracy": 0.8, "macro_f1": 0.6, "best_epoch": 7, "train_files": 40,
                                    "eval_files": 5, "majority_class": 0.6}


def test_collection_table_cells(tmp_path):
    run = Quickstart(tmp_path, Settings.tiny(), progress=False)
    counts = {"train": {"jig": 3, "reel": 3}, "test": {"jig": 2, "reel": 1}}
    for split, by_label in counts.items():
        (run.features / f"abc_{split}").mkdir(parents=True, exist_ok=True)
        for label, n in by_label.items():
            for i in range(n):
                np.save(run.features / f"abc_{split}" / f"{label}_{i}.npy", np.zeros((1, 4), np.float32))
    seen = []

    def measure(held_out, training):
        seen.append((held_out.name, training.name))
        return float(len(seen))
    table = run.collection_table("abc", "by_collection", 2, measure)
    assert seen == [("jig", "jig"), ("jig", "reel")]  # reel has one held-out piece: too few
    assert table["jig"] == {"chorale": None, "germanfolk": None, "chinesefolk": None, "jig": 1.0, "reel": 2.0,
                            "hornpipe": None}
    assert all(v is None for v in table["reel"].values())


def test_summary_line_ratio(tmp_path, capsys):
    run = Quickstart(tmp_path, Settings.tiny(), progress=False)
    run.metrics = {"retrieval": {"text→music (ABC)": {"MRR": 0.5}}, "chance_mrr": 0.25,
                   "zero_shot": {"accuracy": 0.5, "majority_class": 0.2}, "probe": {"accuracy": 0.7, "macro_f1": 0.6}}
    run.print_summary(60)
    out = capsys.readouterr().out
    assert "text→music (ABC) MRR 0.50 (chance 0.25, 2.0x)" in out
    assert "zero-shot accuracy 0.50 (majority class 0.20)" in out


# -- the CLaMP 3 mode -------------------------------------------------------------------------------

def test_clamp3_record_translation_is_keyed_by_language():
    record = pipeline.clamp3_record({"title": "t", "summary_en": "e", "summary_nen": {"language": "French",
                                     "summary": "f"}, "filepaths": ["abc/x.abc"]})
    assert record == {"title": "t", "analysis": "e", "translations": {"language": "French", "French": "f"},
                      "filepaths": ["abc/x.abc"]}


def test_audio_jobs_render_mono_24k(monkeypatch):
    from clamp2.quickstart import audio_render

    seen = {}
    monkeypatch.setattr(audio_render, "render_midi", lambda *a, **k: seen.update(k))
    assert pipeline._render_one(("a.mid", "a.wav", 10.0, 40)) is None
    assert seen == {"sample_rate": 24000, "seconds": 10.0, "program": 40, "channels": 1}


def test_mert_pairs_only_pieces_with_features(tmp_path, monkeypatch):
    run = Quickstart3(tmp_path, Clamp3Settings.tiny(), progress=False)
    run.s.mert = "published"
    d = run.data
    d.mkdir(parents=True)
    for split in ("train", "test"):
        lines = [json.dumps({"analysis": "a", "filepaths": [f"abc/{split}/jig_{i}.abc"]}) + "\n" for i in range(2)]
        (d / f"clamp3_symbolic_{split}.jsonl").write_text("".join(lines))
        (d / "mert" / split).mkdir(parents=True)
        np.save(d / "mert" / split / "jig_0.npy", np.zeros((1, 1, 4), np.float32))
    monkeypatch.setattr(pipeline, "run_script", lambda *a, **k: "")
    run.step_mert()
    records = [json.loads(line) for line in (d / "clamp3_audio_train.jsonl").read_text().splitlines()]
    assert [r["filepaths"] for r in records] == [["mert/train/jig_0.npy"]]


def test_report_numbers_and_lines(tmp_path):
    run = Quickstart(tmp_path, Settings.tiny(), progress=False)
    run.metrics = {"retrieval": {"text→music (ABC)": {"MRR": 0.5, "Hit@1": 0.25, "Hit@10": 1.0}},
                   "held_out_pieces": 12, "chance_mrr": 0.25}
    run.timings = {"corpus": 3.0}
    text = report.report_text(run, {"training_curves.png": True, "similarity_matrix.png": False},
                              tmp_path / "none.png")
    assert "| text→music (ABC) | 0.500 | 0.250 | 2.0× | Hit@1 0.25, Hit@10 1.00 |" in text
    assert "10 pieces from each of six collections, 12 held out" in text
    assert "(hidden 64, 2 layers, 1 epoch) and a small CLaMP 2 (text encoder hidden 64, 10 epochs" in text
    assert "plots/training_curves.png" in text and "plots/similarity_matrix.png" not in text
    assert "plots/feature_map.png" not in text and "| corpus | 3 |" in text


def test_report_plots_read_the_right_features(tmp_path, monkeypatch):
    run = Quickstart(tmp_path, Settings.tiny(), progress=False)
    maps = []
    monkeypatch.setattr(report, "plot_feature_map", lambda folders, path, *a: maps.append(folders) or False)
    report.write_report(run)
    assert maps == [{"ABC": run.features / "abc_train", "MTF": run.features / "mtf_train"}]


def test_clamp3_report_names_gm_programs_one_based(tmp_path):
    run = Quickstart3(tmp_path, Clamp3Settings.tiny(), progress=False)
    report.write_report_clamp3(run)
    text = (tmp_path / "report.md").read_text()
    assert "chorale: church organ (GM program 20)" in text and "jig: violin (fiddle) (GM program 41)" in text


def test_read_log_and_mert_rows(tmp_path):
    log = tmp_path / "log.txt"
    log.write_text("epoch: 1\ntrain_loss: 2.5\neval_loss: 3.0\nepoch: 2\ntrain_loss: 2.0\neval_loss: 2.75\n")
    assert report.read_log(log) == {"train_loss": [2.5, 2.0], "eval_loss": [3.0, 2.75]}
    np.save(tmp_path / "a.npy", np.array([[[1.0, 0.0], [3.0, 2.0]]], np.float32))  # MERT: [1, rows, D]
    keys, rows = report.load_folder(tmp_path)
    assert keys == ["a"] and rows.tolist() == [[2.0, 1.0]]


# -- the command line ---------------------------------------------------------------------------------

def test_cli_limits_and_seed(tmp_path, monkeypatch, capsys):
    script = load_script("code/quickstart.py")
    seen = []
    monkeypatch.setattr(Quickstart, "run", lambda self: seen.append(self.s) or 0)  # no pipeline run
    assert script.main(["--out", str(tmp_path / "a"), "--per_collection", "4"]) == 2
    assert script.main(["--clamp3", "--out", str(tmp_path / "b"), "--audio_seconds", "4"]) == 2
    assert not seen
    assert script.main(["--out", str(tmp_path / "c"), "--tiny", "--seed", "3"]) == 0
    assert seen[0].seed == 3


# -- the demo corpus ----------------------------------------------------------------------------------

def test_keys_and_facts():
    assert dc.parse_abc_key("Gmaj") == ("G", "", "major") and dc.parse_abc_key("Ador") == ("A", "", "dorian")
    assert dc.key_name(("A", "", "minor"), "de") == "a-Moll" and dc.key_name(("B", "b", "major"), "de") == "B-Dur"
    from music21 import converter

    tune = "X:1\nT:Test\nO:Europa, Deutschland, Hessen\nM:3/4\nK:G\nG2 A2 B2 | d6 |]\n"
    piece = dc.Piece("germanfolk_x", dc.COLLECTIONS[1], Path("x.abc"), tune)
    piece.facts = dc.piece_facts(piece, converter.parse(tune, format="abc"), tune)
    assert piece.facts["range"] == ("G4", "D5") and piece.facts["origin"] == "Hessen"
    record = dc.piece_record(piece, seed=0)
    assert record["tags"] == ["Hessen", "3/4"]


def test_seed_changes_the_draw_and_the_wording():
    jigs = dc.COLLECTIONS[3]
    assert [p.name for p in dc.shuffled_candidates(jigs, 0)] != [p.name for p in dc.shuffled_candidates(jigs, 1)]
    pieces = dc.shuffled_candidates(jigs, 0)[:20]
    for p in pieces:
        p.facts = {"title": "T", "key": ("D", "", "major"), "meter": "6/8", "voices": 1}
    assert [dc.piece_record(p, 0) for p in pieces] != [dc.piece_record(p, 1) for p in pieces]


def test_essen_collections_keep_only_their_country_and_name_tunes_from_one(tmp_path):
    german = dc.collection_pieces(dc.COLLECTIONS[1])  # essenFolksong/*.abc holds the Chinese books too
    assert german and all("Deutschland" in (dc.abc_field(p.abc_text, "O") or "") for p in german)
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "two.abc").write_text("X:1\nT:a\nK:C\nC4|]\n\nX:2\nT:b\nK:C\nD4|]\n", encoding="latin-1")
    names = [p.name for p in dc.collection_pieces(dc.Collection("s", str(folder), "*.abc", "abc", {}))]
    assert names == ["s_two-1", "s_two-2"]


# -- rendered audio -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def short_midi(tmp_path_factory):
    """Two notes on a piano (program 0), 1 s in all at 120 bpm."""
    import mido

    midi = mido.MidiFile(ticks_per_beat=480)
    track = mido.MidiTrack()
    midi.tracks.append(track)
    track.append(mido.Message("program_change", channel=0, program=0, time=0))
    for note in (60, 67):
        track.append(mido.Message("note_on", channel=0, note=note, velocity=90, time=0))
        track.append(mido.Message("note_off", channel=0, note=note, velocity=0, time=480))
    path = tmp_path_factory.mktemp("midi") / "short.mid"
    midi.save(str(path))
    return path


def test_render_tail_program_crop_and_mono(short_midi, tmp_path):
    import mido
    import soundfile

    from clamp2.quickstart import audio_render

    rate = 8000
    full = audio_render.synthesize_midi(short_midi, rate)
    assert full.shape == (int(round((mido.MidiFile(str(short_midi)).length + 1.0) * rate)), 2)  # a second of release
    assert audio_render.synthesize_midi(short_midi, rate, max_seconds=0.5).shape == (rate // 2, 2)
    switched = mido.MidiFile(file=io.BytesIO(audio_render._midi_bytes(short_midi, 40)))
    programs = [m.program for t in switched.tracks for m in t if m.type == "program_change"]
    assert programs and set(programs) == {40}
    stereo = audio_render.render_midi(short_midi, tmp_path / "s.wav", sample_rate=rate, seconds=1.0, program=40)
    mono = audio_render.render_midi(short_midi, tmp_path / "m.wav", sample_rate=rate, seconds=1.0, program=40,
                                    channels=1)
    s, _ = soundfile.read(str(stereo), dtype="float64")
    m, _ = soundfile.read(str(mono), dtype="float64")
    assert m.shape == (rate,) and np.abs(m - s.mean(axis=1)).max() <= 2 / 32768


def test_a_rebuild_restores_a_deleted_midi(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "one.abc").write_text("X:1\nT:a\nM:2/4\nL:1/8\nK:C\nCDEF|G4|]\n", encoding="latin-1")
    songs = dc.Collection("s", str(folder), "*.abc", "abc", {"en": "a song", "de": "ein Lied", "fr": "une chanson",
                                                               "es": "una canción"})
    first = dc.build_demo_corpus(tmp_path / "out", 1, progress=False, collections=(songs,), workers=1)
    midi = tmp_path / "out" / "midi" / "train" / f"{first[0].name}.mid"
    data = midi.read_bytes()
    midi.unlink()
    dc.build_demo_corpus(tmp_path / "out", 1, progress=False, collections=(songs,), workers=1)
    assert midi.read_bytes() == data


# -- defects the audit found (each test fails on the code before the fix) ------------------------------

def test_mixolydian_is_not_read_as_minor():
    # "m" (ABC's minor) must not swallow "mix": 23 of Ryan's Mammoth tunes are K:…mix.
    assert dc.parse_abc_key("Amix") == ("A", "", "mixolydian")
    assert dc.parse_abc_key("Dmixolydian") == ("D", "", "mixolydian")
    assert dc.parse_abc_key("Em") == dc.parse_abc_key("Emin") == dc.parse_abc_key("E minor") == ("E", "", "minor")
    assert dc.key_name(dc.parse_abc_key("Gmix"), "de") == "G-Mixolydisch"


def test_a_cell_without_a_number_is_never_the_closest():
    lines = report._collection_table({"jig": {"jig": 1.5, "reel": float("nan")},
                                      "reel": {"jig": None, "reel": float("nan")}}, 2, True)
    assert lines[2] == "| jig | **1.50** | nan |"
    assert lines[3] == "| reel | n/a | nan |"


def test_the_summary_has_no_ratio_when_chance_is_zero(tmp_path, capsys):
    for run in (Quickstart(tmp_path / "2", Settings.tiny(), progress=False),
                Quickstart3(tmp_path / "3", Clamp3Settings.tiny(), progress=False)):
        run.metrics = {"retrieval": {"text→music (ABC)": {"MRR": 0.0}, "text→ABC": {"MRR": 0.0}}, "chance_mrr": 0.0}
        run.print_summary(60)
    out = capsys.readouterr().out
    assert "text→music (ABC) MRR 0.00 (chance 0.00)\n" in out and "text→ABC MRR 0.00 (chance 0.00)\n" in out


def test_corpus_files_keep_finished_ones_and_redo_empty_ones(tmp_path):
    scores = music21_corpus.corpus_musicxml_paths(per_composer=None)[:2]
    names = [music21_corpus.piece_name(score) for score in scores]
    (tmp_path / "abc").mkdir()
    (tmp_path / "abc" / f"{names[0]}.abc").write_text("kept\n")
    (tmp_path / "abc" / f"{names[1]}.abc").write_text("")  # renamed into place, its data lost: converted again
    written = music21_corpus.build_music_files(tmp_path, scores, kinds=("abc",), progress=False)
    assert written == [tmp_path / "abc" / f"{name}.abc" for name in names]
    assert written[0].read_text() == "kept\n"
    assert "\n[V:1]" in written[1].read_text()  # interleaved ABC


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGINT"])
def test_training_processes_end_with_a_killed_quickstart(tmp_path, nproc, signal_name):
    """A quick start killed during a torchrun step (SIGKILL, or SIGTERM: Python then runs no cleanup) takes the
    training with it; left running, it would train on beside the re-run's own training (epochs logged twice).
    So does a Ctrl-C sent to the quick start alone (``kill -INT``): subprocess.run would SIGKILL torchrun, which
    then cannot end its ranks."""
    import signal
    import subprocess
    import time

    script = tmp_path / "sleeper.py"
    # Written under another name, then renamed: the test's glob must never see an empty pid file (it did under load).
    script.write_text("import os, pathlib, sys, time\n"
                      f"name = pathlib.Path({str(tmp_path)!r}, 'pid_' + os.environ.get('RANK', '0'))\n"
                      "hidden = name.with_name('.' + name.name)\n"
                      "hidden.write_text(str(os.getpid()))\n"
                      "os.replace(hidden, name)\n"
                      "time.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, "-c", "from clamp2.quickstart.pipeline import run_distributed; "
                               f"run_distributed({str(script)!r}, [], {nproc}, {{}})"])
    deadline = time.time() + 60
    while len(list(tmp_path.glob("pid_*"))) < nproc and time.time() < deadline:
        time.sleep(0.1)
    pids = [int(p.read_text()) for p in tmp_path.glob("pid_*")]
    assert len(pids) == nproc
    parent.send_signal(getattr(signal, signal_name))
    parent.wait()
    assert not processes_left_running(pids, 30)


def test_report_says_how_to_rerun_extraction_with_the_small_models_sizes(tmp_path):
    """code/extract_clamp2.py / extract_clamp3.py read the sizes from config.py: the README's command fails on the
    quick start's small models unless the report gives the overrides the quick start used."""
    import shlex

    run = Quickstart(tmp_path / "out dir", Settings.tiny(), progress=False)
    text = report.report_text(run, {}, tmp_path / "none.png")
    line = next(l for l in text.splitlines() if "code/extract_clamp2.py" in l and l.startswith("PATCH_LENGTH="))
    words = shlex.split(line)
    env = dict(w.split("=", 1) for w in words[:words.index("python")])
    assert env == {k: run.model_env()[k] for k in env} and {"PATCH_LENGTH", "M3_HIDDEN_SIZE", "CLAMP2_HIDDEN_SIZE",
                                                           "PATCH_NUM_LAYERS", "TOKEN_NUM_LAYERS"} <= set(env)
    assert words[words.index("--weights") + 1] == str(run.evaluated_weights)
    assert words[words.index("--text_model") + 1] == run.text_model and str(run.data / "abc" / "test") in words
    run3 = Quickstart3(tmp_path / "three", Clamp3Settings.tiny(), progress=False)
    report.write_report_clamp3(run3)
    line = next(l for l in (run3.out / "report.md").read_text().splitlines() if "code/extract_clamp3.py" in l
                and l.startswith("PATCH_LENGTH="))
    assert "AUDIO_HIDDEN_SIZE=64" in line and "CLAMP3_HIDDEN_SIZE=64" in line and "--get_global" in line


def test_an_out_that_cannot_be_a_writable_folder_is_one_line(tmp_path, monkeypatch, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for out in (a_file, a_file / "run"):  # an existing file; a path under a file
        assert Quickstart(out, Settings.tiny(), progress=False).run() == 2
        err = capsys.readouterr().err
        assert err.startswith(f"quickstart: error: --out {out}: ") and err.count("\n") == 1

    def read_only(self, *args, **kwargs):  # a read-only folder (root, as the tests may run, can write anywhere)
        raise PermissionError(13, "Permission denied", str(self))
    monkeypatch.setattr(Path, "mkdir", read_only)
    assert Quickstart(tmp_path / "ro" / "run", Settings.tiny(), progress=False).run() == 2
    assert capsys.readouterr().err.endswith("run: Permission denied\n")


def test_cli_refuses_audio_seconds_that_are_not_a_number_and_clamp2_epochs_with_clamp3(tmp_path, monkeypatch, capsys):
    script = load_script("code/quickstart.py")
    seen = []
    monkeypatch.setattr(Quickstart, "run", lambda self: seen.append(self.s) or 0)  # no pipeline run
    for value in ("nan", "inf"):  # both passed `< 5`: every render then failed, and the MERT step after it
        assert script.main(["--clamp3", "--tiny", "--out", str(tmp_path / value), "--audio_seconds", value]) == 2
        assert "--audio_seconds must be" in capsys.readouterr().err
    assert script.main(["--clamp3", "--tiny", "--out", str(tmp_path / "e"), "--clamp2_epochs", "0"]) == 2
    assert "are CLaMP 2 options" in capsys.readouterr().err  # not "--clamp2_epochs must be at least 1"
    assert not seen


def test_report_says_why_fmd_cells_are_n_a(tmp_path):
    run = Quickstart(tmp_path, Settings.tiny(), progress=False)
    run.metrics = {"held_out_pieces": 6, "chance_mrr": 0.41,
                   "fmd_test_vs_train": {"jig": {"jig": None, "reel": None}, "reel": {"jig": None, "reel": None}}}
    text = report.report_text(run, {}, tmp_path / "none.png")
    assert "| jig | n/a | n/a |" in text and "`--per_collection 10` or more" in text
    run.metrics["fmd_test_vs_train"] = {"jig": {"jig": 1.0}}
    assert "`--per_collection 10`" not in report.report_text(run, {}, tmp_path / "none.png")


def test_an_out_holding_another_run_is_a_usage_error_naming_the_generation(tmp_path, capsys):
    # It was SystemExit("error: ..."): exit 1 (a failed step's status) without the script's name; a CLaMP 2 --out
    # given to --clamp3 listed CLaMP 3's nine own settings as "changed".
    Quickstart3(tmp_path, Clamp3Settings.tiny(), progress=False).check_settings()
    assert Quickstart(tmp_path, Settings.tiny(), progress=False).run() == 2
    assert capsys.readouterr().err == f"quickstart: error: {tmp_path} holds a CLaMP 3 run; use another --out or " \
                                      "delete it\n"
    other = tmp_path / "other"
    other.mkdir()
    Quickstart(other, Settings.tiny(), progress=False).check_settings()
    assert Quickstart3(other, Clamp3Settings.tiny(), progress=False).run() == 2
    assert "holds a CLaMP 2 run" in capsys.readouterr().err
    tiny = Settings.tiny()
    tiny.seed += 1
    assert Quickstart(other, tiny, progress=False).run() == 2
    assert "holds a run with other settings (seed)" in capsys.readouterr().err


def test_report_says_whether_text_dropout_was_on(tmp_path):
    # The report said the other-language descriptions were never trained on, and named no dropout, for a run
    # with --text_dropout too.
    def text(dropout):
        settings = Settings.tiny()
        settings.text_dropout = dropout
        run = Quickstart(tmp_path, settings, progress=False)
        run.metrics = {"held_out_pieces": 6, "chance_mrr": 0.41}
        return report.report_text(run, {}, tmp_path / "none.png")

    assert "text dropout on" in text(True) and "this run used `--text_dropout`" in text(True)
    assert "text dropout on" not in text(False) and "never trained on" in text(False)


def test_cli_notes_a_global_batch_that_nproc_changes(tmp_path, monkeypatch, capsys):
    # CLAMP2_BATCH_SIZE = batch // nproc: --tiny's 6 with --nproc 4 trained on global batches of 4, silently.
    script = load_script("code/quickstart.py")
    monkeypatch.setattr(Quickstart, "run", lambda self: 0)  # no pipeline run
    assert script.main(["--tiny", "--out", str(tmp_path / "a"), "--nproc", "4"]) == 0
    assert "each takes 1, a global batch of 4" in capsys.readouterr().err
    assert script.main(["--tiny", "--out", str(tmp_path / "b"), "--nproc", "3"]) == 0
    assert "global batch" not in capsys.readouterr().err


def test_text_model_without_weights_is_refused_not_written_over(tmp_path, monkeypatch, capsys):
    # quickstart.py --tiny --text_model DIR (no --weights) built its own small text model into DIR: the folder given
    # (a downloaded xlm-roberta-base, say) was written over.
    from conftest import VECTORS

    text_model = tmp_path / "xlm"
    shutil.copytree(VECTORS / "tiny_text_model", text_model)
    before = {path.name: path.read_bytes() for path in text_model.iterdir()}
    monkeypatch.setattr(pipeline.Quickstart, "run", lambda self: pytest.fail("the run started"))
    status = load_script("code/quickstart.py").main(["--tiny", "--out", str(tmp_path / "qs"), "--text_model",
                                                     str(text_model)])
    assert status == 2 and "--text_model goes with --weights" in capsys.readouterr().err
    assert {path.name: path.read_bytes() for path in text_model.iterdir()} == before
