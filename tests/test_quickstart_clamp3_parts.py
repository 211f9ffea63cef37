"""Unit-level checks of the CLaMP 3 quick start's steps and of the report's plots that neither the
end-to-end runs nor test_quickstart_parts.py look at: the audio step's jobs and messages, the audio
stage's starting weights, the MERT step, CLaMP 3's evaluate / zero-shot / probe / score table, the
FMD and group-score parsing, the similarity plot's ticks, and the corpus builder's render-ahead
bookkeeping. Scripts are replaced by recorded output; nothing is trained."""

from __future__ import annotations

import concurrent.futures
import json
from pathlib import Path

import numpy as np
import pytest

from clamp2.quickstart import pipeline, report
from clamp2.quickstart import demo_corpus as dc
from clamp2.quickstart.pipeline import Clamp3Settings, Quickstart, Quickstart3, Settings, StepFailed
from test_quickstart_parts import recorded_zero_shot_and_probe


class _InlinePool:
    """ProcessPoolExecutor stand-in: map runs here, in order (a patched function cannot be pickled)."""

    def __init__(self, max_workers=None, **kwargs):
        self.max_workers = max_workers

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def map(self, function, jobs, chunksize=1):
        return [function(job) for job in jobs]


def _npy(folder: Path, stem: str, row) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / f"{stem}.npy", np.asarray([row], np.float32))


# -- step_audio -------------------------------------------------------------------------------------

def test_audio_step_jobs_folders_instruments_and_failures(tmp_path, monkeypatch, capsys):
    run = Quickstart3(tmp_path, Clamp3Settings.tiny(), progress=False)
    d = run.data
    for split, stems in (("train", ["jig_a", "reel_b", "hornpipe_c"]), ("test", ["chorale_d"])):
        (d / "midi" / split).mkdir(parents=True)
        for stem in stems:
            (d / "midi" / split / f"{stem}.mid").write_bytes(b"MThd")
    (d / "audio" / "train").mkdir(parents=True)
    (d / "audio" / "train" / "hornpipe_c.wav").write_bytes(b"RIFF")  # rendered in an earlier run: kept
    (d / "audio" / "test").mkdir(parents=True)
    (d / "audio" / "test" / "chorale_d.wav").write_bytes(b"")  # renamed into place, its data lost: rendered again
    jobs = []

    def render(job):
        jobs.append(job)
        midi, wav, seconds, program = job
        if Path(midi).stem == "reel_b":
            return "reel_b.mid: cannot render"
        Path(wav).parent.mkdir(parents=True, exist_ok=True)
        Path(wav).write_bytes(b"RIFF")
        return None
    monkeypatch.setattr(pipeline, "_render_one", render)
    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", _InlinePool)
    run.step_audio()
    assert jobs == [(str(d / "midi" / "train" / "jig_a.mid"), str(d / "audio" / "train" / "jig_a.wav"), 10.0, 40),
                    (str(d / "midi" / "train" / "reel_b.mid"), str(d / "audio" / "train" / "reel_b.wav"), 10.0, 105),
                    (str(d / "midi" / "test" / "chorale_d.mid"), str(d / "audio" / "test" / "chorale_d.wav"), 10.0, 19)]
    printed = capsys.readouterr()
    assert "not rendered: reel_b.mid: cannot render" in printed.err
    assert printed.out.startswith("3 pieces rendered (first 10 s, mono 24 kHz")  # the two new ones and the kept one


# -- step_audio_stage -------------------------------------------------------------------------------

def test_audio_stage_starts_from_the_symbolic_last_epoch_once(tmp_path, monkeypatch):
    run = Quickstart3(tmp_path, Clamp3Settings.tiny(), progress=False)
    models = tmp_path / "models"
    models.mkdir()
    (models / "weights_clamp3_symbolic.pth").write_bytes(b"best epoch")
    (models / "latest_weights_clamp3_symbolic.pth").write_bytes(b"last epoch")
    calls = []
    monkeypatch.setattr(pipeline, "run_distributed", lambda script, args, nproc, env: calls.append((script, args)))
    run.step_audio_stage()
    assert run.clamp3_weights.read_bytes() == b"last epoch"
    script, args = calls[0]
    assert script == "code/train_clamp3_audio.py" and "--freeze_text" in args
    assert args[args.index("--train_jsonl") + 1] == run.data / "clamp3_audio_train.jsonl"
    assert args[args.index("--epochs") + 1] == 8
    # a re-run (the audio stage failed half-way) keeps what the audio stage wrote
    run.clamp3_weights.write_bytes(b"audio stage")
    run.s.freeze_text_audio = False
    run.step_audio_stage()
    assert run.clamp3_weights.read_bytes() == b"audio stage"
    assert "--freeze_text" not in calls[1][1]


# -- step_mert --------------------------------------------------------------------------------------

def test_mert_step_builds_the_random_mert_only_without_mert_and_keeps_going_past_a_bad_file(tmp_path, monkeypatch):
    from clamp2.models import mert

    built = []
    monkeypatch.setattr(mert, "build_small_mert", lambda out, **k: built.append((out, k)))
    seen = []

    def extract(relative, args, env=None, ok=(0,), capture=False):
        seen.append(relative)
        if 1 not in ok:  # extract_mert.py exits 1 when one file of many could not be read
            raise StepFailed(f"{relative} exited with status 1")
        return ""
    monkeypatch.setattr(pipeline, "run_script", extract)
    for mert_path, expect_build in ((None, True), ("published", False)):
        out = tmp_path / str(mert_path)
        run = Quickstart3(out, Clamp3Settings.tiny(), progress=False)
        run.s.mert = mert_path
        run.data.mkdir(parents=True)
        for split in ("train", "test"):
            (run.data / f"clamp3_symbolic_{split}.jsonl").write_text(
                json.dumps({"analysis": "a", "filepaths": [f"abc/{split}/jig_1.abc", f"mtf/{split}/jig_1.mtf"]}) + "\n")
            _npy(run.data / "mert" / split, "jig_1", np.zeros((1, 4)))
        built.clear()
        run.step_mert()
        assert bool(built) == expect_build
        if expect_build:
            assert built[0] == (str(out / "models" / "mert_small"), {"hidden_size": 64, "num_layers": 1,
                                                                     "conv_dim": 16, "seed": 0})
        test = json.loads((run.data / "clamp3_audio_test.jsonl").read_text())
        assert test["filepaths"] == ["mert/test/jig_1.npy"]


# -- CLaMP 3 evaluate, zero-shot, probe, score table ------------------------------------------------

def test_clamp3_evaluate_searches_the_right_folders(tmp_path, monkeypatch):
    run = Quickstart3(tmp_path, Clamp3Settings.tiny(), progress=False)
    run.s.mert = "m-a-p/MERT-v1-95M"
    for i in range(12):
        _npy(run.features / "audio_test", f"jig_{i}", np.zeros(4))
    for i in range(30):
        _npy(run.features / "audio_train", f"jig_t{i}", np.zeros(4))
    searched, parts = [], []

    def fake_run_script(relative, args, env=None, ok=(0,), capture=False):
        searched.append((Path(args[0]).name, Path(args[1]).name))
        return "MRR: 0.5\nHit@1: 0.25\n"
    monkeypatch.setattr(pipeline, "run_script", fake_run_script)
    run.zero_shot = lambda: parts.append("zero-shot")
    run.probe = lambda: parts.append("probe")
    run.score_table = lambda: parts.append("score")
    run.step_evaluate()
    assert searched == [("text_en", "abc_test"), ("text_en", "audio_test"), ("abc_test", "audio_test"),
                        ("mtf_test", "audio_test")]
    assert parts == ["zero-shot", "probe", "score"]
    m = run.metrics
    assert m["held_out_pieces"] == 12 and m["chance_mrr"] == 0.2586
    assert m["audio_front_end"] == "published MERT m-a-p/MERT-v1-95M"
    assert json.loads((tmp_path / "metrics.json").read_text())["results"]["audio_front_end"].startswith("published")


def test_clamp3_zero_shot_probe_and_extract_arguments(tmp_path, monkeypatch):
    run = Quickstart3(tmp_path, Clamp3Settings.tiny(), progress=False)
    calls = {}
    monkeypatch.setattr(pipeline, "run_script", recorded_zero_shot_and_probe(
        run, {"jig_1.wav": "jig"}, "accuracy 1.0, macro-F1 1.0\n",
        {"eval": {"accuracy": 0.5, "macro_f1": 0.4}, "best_epoch": 2, "files": {"train": 8, "eval": 2}}, calls))
    run.zero_shot()
    z = calls["semantic_search/zero_shot.py"]
    assert z[0] == str(run.data / "audio" / "test")
    assert z[z.index("--model") + 1] == "clamp3" and z[z.index("--mert") + 1] == run.mert_model
    run.probe()
    p = calls["music_classification/train_cls.py"]
    assert p[p.index("--probe") + 1] == "clamp3"
    assert p[p.index("--train_folders") + 1] == str(run.features / "audio_train")
    assert p[p.index("--eval_folders") + 1] == str(run.features / "audio_test")
    run.extract(run.data / "mert" / "test", run.features / "audio_test")
    assert "--get_global" in calls["code/extract_clamp3.py"]


def test_clamp3_score_table_reads_negative_scores_and_one_piece_collections(tmp_path, monkeypatch):
    run = Quickstart3(tmp_path, Clamp3Settings.tiny(), progress=False)
    _npy(run.features / "audio_test", "jig_1", np.ones(4))  # one held-out jig: still scored
    _npy(run.features / "audio_train", "jig_2", np.ones(4))
    _npy(run.features / "audio_train", "reel_3", np.ones(4))
    queries = []

    def fake_run_script(relative, args, env=None, ok=(0,), capture=False):
        queries.append(Path(args[0]).parent.name)
        score = "0.8123" if Path(args[1]).name == "jig" else "-0.0412"
        return f"Total query features: 1\nTotal reference features: 1\nGroup similarity: {score}\n"
    monkeypatch.setattr(pipeline, "run_script", fake_run_script)
    run.score_table()
    table = run.metrics["clamp3_score_test_vs_train"]
    assert table["jig"]["jig"] == 0.8123 and table["jig"]["reel"] == -0.0412
    assert set(queries) == {"test"}  # the held-out collection is the query side
    assert table["reel"]["jig"] is None


def test_fmd_cells_keep_the_sign_and_no_number_is_nan(tmp_path, monkeypatch):
    run = Quickstart(tmp_path, Settings.tiny(), progress=False)
    for split in ("train", "test"):
        for i in range(2):
            _npy(run.features / f"abc_{split}", f"jig_{split}{i}", np.ones(4))
            _npy(run.features / f"abc_{split}", f"reel_{split}{i}", np.ones(4))
    printed = {"jig": "FMD (mle) between 'a' and 'b': -0.0000\n", "reel": ""}  # reel's run printed no number
    monkeypatch.setattr(pipeline, "run_script", lambda relative, args, **k: printed[Path(args[0]).name])
    run.fmd()
    table = run.metrics["fmd_test_vs_train"]
    assert table["jig"]["jig"] == 0.0 and str(table["jig"]["jig"]) == "-0.0"
    assert np.isnan(table["jig"]["reel"])


# -- report.py: plots -------------------------------------------------------------------------------

@pytest.fixture
def figures(monkeypatch):
    kept = []
    monkeypatch.setattr(report, "_save", lambda fig, path: kept.append(fig))
    yield kept
    import matplotlib.pyplot as plt

    for fig in kept:
        plt.close(fig)


def test_similarity_plot_rows_and_ticks(tmp_path, figures):
    text, music = tmp_path / "text", tmp_path / "music"
    rows = {"chorale_a": [1, 0, 0], "jig_a": [0, 1, 0], "jig_b": [0, 1, 1]}
    for key, row in rows.items():
        _npy(text, key, row)
        _npy(music, key, row)
    _npy(music, "aaa_only_music", [5, 5, 5])  # a piece without a description: left out, rows still paired
    assert report.plot_similarity(text, music, tmp_path / "s.png")
    ax = figures[0].axes[0]
    m = np.asarray(list(rows.values()), np.float64)
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    np.testing.assert_allclose(ax.images[0].get_array(), m @ m.T, atol=1e-6)
    assert list(ax.get_xticks()) == [0.0, 1.5] and list(ax.get_yticks()) == [0.0, 1.5]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["chorale", "jig"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["chorale", "jig"]
    assert [line.get_ydata()[0] for line in ax.lines if line.get_ydata()[0] == line.get_ydata()[1]] == [0.5]


def test_training_curve_epochs_start_at_one(tmp_path, figures):
    assert report.plot_training({"M3": {"train_loss": [3.0, 2.0], "eval_loss": [3.5, 2.5]}}, {}, tmp_path / "t.png")
    lines = figures[0].axes[0].lines
    assert [list(line.get_xdata()) for line in lines[:2]] == [[1, 2], [1, 2]]


def test_feature_map_normalizes_and_labels_by_folder(tmp_path, figures):
    for key, row in {"jig_a": [1, 0, 0], "jig_b": [3, 0, 0], "reel_a": [0, 1, 0], "reel_b": [0, 0, 2]}.items():
        _npy(tmp_path / "train", key, row)
    _npy(tmp_path / "test", "jig_c", [0, 1, 1])
    assert report.plot_feature_map({"train": tmp_path / "train", "held out": tmp_path / "test"}, tmp_path / "f.png")
    ax = figures[0].axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["jig (train)", "jig (held out)", "reel (train)"]
    jig_train = ax.collections[0].get_offsets()
    np.testing.assert_allclose(jig_train[0], jig_train[1], atol=1e-6)  # same direction, other length: one point


def test_an_all_zero_feature_is_drawn_not_nan(tmp_path, figures):
    for key, row in {"jig_a": [1, 0, 0], "jig_b": [0, 0, 0], "reel_a": [0, 1, 0]}.items():
        _npy(tmp_path / "train", key, row)
        _npy(tmp_path / "text", key, row)
    assert report.plot_feature_map({"train": tmp_path / "train"}, tmp_path / "f.png")
    points = np.concatenate([c.get_offsets() for c in figures[0].axes[0].collections])
    assert points.shape == (3, 2) and np.isfinite(points).all()
    assert report.plot_similarity(tmp_path / "text", tmp_path / "train", tmp_path / "s.png")
    np.testing.assert_allclose(figures[1].axes[0].images[0].get_array(), np.diag([1.0, 0.0, 1.0]), atol=1e-6)


# -- report.py: the CLaMP 3 report ------------------------------------------------------------------

def test_clamp3_report_plots_read_audio_and_both_mert_splits(tmp_path, monkeypatch):
    run = Quickstart3(tmp_path, Clamp3Settings.tiny(), progress=False)
    sims, maps = [], []
    monkeypatch.setattr(report, "plot_similarity", lambda *a: sims.append(a) or False)
    monkeypatch.setattr(report, "plot_feature_map", lambda folders, path, *a: maps.append(folders) or False)
    report.write_report_clamp3(run)
    assert sims[0][:2] == (run.features / "text_en", run.features / "audio_test")
    assert maps == [{"train": run.features / "audio_train", "held out": run.features / "audio_test"},
                    {"train": run.data / "mert" / "train", "held out": run.data / "mert" / "test"}]


def test_clamp3_report_settings_and_score_table(tmp_path):
    settings = Clamp3Settings.tiny()
    settings.symbolic_epochs, settings.audio_epochs, settings.audio_seconds = 5, 3, 2.5
    run = Quickstart3(tmp_path, settings, progress=False)
    run.metrics = {"clamp3_score_test_vs_train": {"jig": {"jig": 0.9, "reel": 0.2}, "reel": {"jig": 0.7, "reel": 0.6}}}
    report.write_report_clamp3(run)
    text = (tmp_path / "report.md").read_text()
    assert "**the first 2.5 seconds**" in text
    assert "audio encoder 1 layer," in text
    assert "(5 epochs, text ↔ ABC/MTF)" in text and "(3 epochs, text ↔ MERT features" in text
    assert "text encoder frozen" in text
    assert "| jig | **0.900** | 0.200 |" in text and "| reel | **0.700** | 0.600 |" in text
    settings.freeze_text_audio = False
    report.write_report_clamp3(run)
    assert "text encoder frozen" not in (tmp_path / "report.md").read_text()


# -- demo_corpus.py: rendering ahead --------------------------------------------------------------

def test_render_ahead_keys_by_piece_and_skips_pieces_on_disk(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "book.abc").write_text("".join(f"X:{i}\nT:song {i}\nM:2/4\nL:1/8\nK:C\n{n}DEF|G4|]\n\n"
                                             for i, n in ((1, "C"), (2, "E"), (3, "G"))), encoding="latin-1")
    tunes = dc.collection_pieces(dc.Collection("s", str(folder), "*.abc", "abc", {}))  # three tunes, one file
    assert len(tunes) == 3 and len({p.source for p in tunes}) == 1
    on_disk = tunes[2]
    for path in dc.piece_paths(on_disk, tmp_path, "test"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    renders = dc._RenderAhead(tmp_path, 2)
    try:
        renders.submit(tunes)
        assert sorted(renders.futures) == sorted(p.name for p in tunes[:2])  # one future per piece, none for the kept
        assert renders.result(tunes[1])() == dc.render_piece(tunes[1])  # this piece's render, not another's
    finally:
        renders.close()


def test_a_dead_worker_sends_the_rest_of_the_corpus_here(tmp_path):
    # A worker that dies breaks the pool; asking it for a later piece (the replacement of a piece music21
    # could not parse) must fall back to rendering here, not stop the corpus step.
    import os

    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "book.abc").write_text("X:1\nT:song\nM:2/4\nL:1/8\nK:C\nCDEF|G4|]\n", encoding="latin-1")
    tune = dc.collection_pieces(dc.Collection("s", str(folder), "*.abc", "abc", {}))[0]
    renders = dc._RenderAhead(tmp_path, 2)
    try:
        with pytest.raises(concurrent.futures.process.BrokenProcessPool):
            renders.pool.submit(os._exit, 1).result()
        renders.submit([tune])
        assert renders.pool is None and not renders.futures
        assert renders.result(tune)() == dc.render_piece(tune)
    finally:
        renders.close()


def test_each_retrieval_row_has_the_chance_of_its_own_candidates(tmp_path, monkeypatch, capsys):
    # One held-out piece without audio (it failed to render): text→ABC still ranks 12 candidates, the audio rows 11.
    run = Quickstart3(tmp_path, Clamp3Settings.tiny(), progress=False)
    rows = np.random.default_rng(0).standard_normal((12, 4))
    for i, row in enumerate(rows):
        _npy(run.features / "abc_test", f"jig_{i}", row)
        if i:
            _npy(run.features / "audio_test", f"jig_{i}", row)
    monkeypatch.setattr(pipeline, "run_script", lambda *a, **k: "MRR: 0.5\nHit@1: 0.25\n")
    run.zero_shot = run.probe = run.score_table = lambda: None
    run.step_evaluate()
    m = run.metrics
    assert m["chance_mrr"] == round(pipeline.chance_mrr(11), 4) == 0.2745
    assert m["chance_mrr_by_task"] == {"text→ABC": 0.2586, "text→audio": 0.2745, "ABC→audio (same piece)": 0.2745,
                                       "MTF→audio (same piece)": 0.2745}
    run.print_summary(60)
    out = capsys.readouterr().out
    assert "text→ABC MRR 0.50 (chance 0.26, 1.9x)" in out and "text→audio MRR 0.50 (chance 0.27, 1.8x)" in out
    report.write_report_clamp3(run)
    text = (tmp_path / "report.md").read_text()
    assert "| text→ABC | 0.500 | 0.259 | 1.9× |" in text and "| text→audio | 0.500 | 0.275 | 1.8× |" in text


def test_render_pools_end_with_a_killed_quickstart(tmp_path, monkeypatch):
    """The corpus and audio steps' worker pools exit once the quick start is gone (SIGKILL, SIGTERM): without
    the exit_with_parent initializer they stayed, idle and reparented, after the re-run ended."""
    from clamp2.workers import exit_with_parent

    made = []

    class Recording(_InlinePool):
        def __init__(self, max_workers=None, **kwargs):
            made.append(kwargs.get("initializer"))
            super().__init__(max_workers)

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", Recording)
    run = Quickstart3(tmp_path, Clamp3Settings.tiny(), progress=False)
    (run.data / "midi" / "train").mkdir(parents=True)
    (run.data / "midi" / "train" / "jig_a.mid").write_bytes(b"MThd")
    monkeypatch.setattr(pipeline, "_render_one", lambda job: None)
    run.step_audio()
    dc._RenderAhead(tmp_path, 2)
    assert made == [exit_with_parent, exit_with_parent]


def test_audio_step_removes_the_temporary_file_of_a_killed_render(tmp_path, monkeypatch):
    from clamp2.files import _temporary_name

    run = Quickstart3(tmp_path, Clamp3Settings.tiny(), progress=False)
    (run.data / "midi" / "train").mkdir(parents=True)
    (run.data / "midi" / "train" / "jig_a.mid").write_bytes(b"MThd")
    (run.data / "audio" / "train").mkdir(parents=True)
    left = run.data / "audio" / "train" / _temporary_name("jig_a.wav")  # a render killed mid-write
    left.write_bytes(b"RIFF")
    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", _InlinePool)
    monkeypatch.setattr(pipeline, "_render_one", lambda job: None)
    run.step_audio()
    assert not left.exists()


def test_an_audio_step_that_renders_nothing_fails_and_is_not_marked_done(tmp_path, monkeypatch, capsys):
    run = Quickstart3(tmp_path, Clamp3Settings.tiny(), progress=False)
    (run.data / "midi" / "train").mkdir(parents=True)
    (run.data / "midi" / "train" / "jig_a.mid").write_bytes(b"MThd")
    monkeypatch.setattr(pipeline, "_render_one", lambda job: "jig_a.mid: cannot convert float NaN to integer")
    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", _InlinePool)
    with pytest.raises(StepFailed, match="no piece could be rendered"):
        run.step_audio()
