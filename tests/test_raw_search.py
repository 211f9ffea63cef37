"""clamp2_search.py / clamp2_eval.py: search and metrics straight from raw files, through the cache."""

import json
import shutil

import numpy as np
import pytest

from conftest import VECTORS, load_script

MODEL = ["--weights", str(VECTORS / "tiny_clamp2.pth"), "--text_model", str(VECTORS / "tiny_text_model"),
         "--num_workers", "0", "--no_progress"]


@pytest.fixture
def raw(tmp_path):
    """Raw music (MusicXML, MIDI, ABC) and texts named by piece: bwv10.7 exists as music and as text."""
    music, texts = tmp_path / "music", tmp_path / "texts"
    music.mkdir()
    texts.mkdir()
    shutil.copy(VECTORS / "inputs" / "xml" / "bwv10.7.mxl", music)
    shutil.copy(VECTORS / "inputs" / "midi" / "handmade.mid", music)
    shutil.copy(VECTORS / "inputs" / "abc" / "airds_tune3.abc", music)
    for name in ("bwv10.7", "multi", "short"):
        shutil.copy(VECTORS / "inputs" / "txt" / f"{name}.txt", texts)
    (texts / "handmade.txt").write_text("A tiny hand-made MIDI piece.", encoding="utf-8")
    return music, texts


def test_search_from_raw_files_then_from_the_cache(tiny_env, raw, tmp_path, capsys):
    music, _ = raw
    search = load_script("semantic_search/clamp2_search.py")
    args = ["a chorale by Bach", str(music), "--top_k", "5", "--json", "--cache", str(tmp_path / "cache"), *MODEL]
    assert search.main(args) == 0
    first = capsys.readouterr()
    results = json.loads(first.out)
    assert [r["rank"] for r in results] == [1, 2, 3]  # K capped at the 3 pieces
    assert sorted(r["path"] for r in results) == ["airds_tune3.abc", "bwv10.7.mxl", "handmade.mid"]
    assert [r["score"] for r in results] == sorted((r["score"] for r in results), reverse=True)
    assert "3 encoded, 0 from cache" in first.err
    assert search.main(args) == 0
    second = capsys.readouterr()
    assert json.loads(second.out) == results
    assert "0 encoded, 3 from cache" in second.err  # no model work the second time


def test_search_with_a_music_query_and_on_features(tiny_env, raw, tmp_path, capsys):
    music, _ = raw
    features = tmp_path / "features"
    extract = load_script("code/extract_clamp2.py")
    assert extract.main([str(VECTORS / "extract_in" / "abc"), str(features), "--normalize",
                         "--weights", str(VECTORS / "tiny_clamp2.pth"), "--text_model", str(VECTORS / "tiny_text_model"),
                         "--no_progress"]) == 0
    # The extraction's own line, read here so that the search's output below is the search's alone.
    assert "Successfully Loaded CLaMP 2 Checkpoint" in capsys.readouterr().out
    search = load_script("semantic_search/clamp2_search.py")
    query = features / "airds_tune3.npy"
    assert search.main([str(query), str(features), "--no_cache", *MODEL]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[0] == "1" and lines[0].split()[2] == "airds_tune3"  # itself first
    assert float(lines[0].split()[1]) == pytest.approx(1.0, abs=1e-6)
    # A music file as the query: its own conversion is found first among the raw files.
    assert search.main([str(music / "airds_tune3.abc"), str(music), "--no_cache", *MODEL]) == 0
    assert capsys.readouterr().out.splitlines()[0].split()[2] == "airds_tune3.abc"


def test_a_feature_file_among_raw_music_is_refused_not_read_as_the_whole_folder(tiny_env, raw, tmp_path, capsys):
    # One stray .npy made the folder a feature folder: the music beside it was left out, exit 0.
    music, texts = raw
    search, evaluate = load_script("semantic_search/clamp2_search.py"), load_script("semantic_search/clamp2_eval.py")
    np.save(music / ".hidden.npy", np.ones((1, 48), np.float32))  # hidden: ignored, as every hidden file
    assert search.main(["a chorale", str(music), "--json", "--no_cache", *MODEL]) == 0
    assert sorted(r["path"] for r in json.loads(capsys.readouterr().out)) == [
        "airds_tune3.abc", "bwv10.7.mxl", "handmade.mid"]
    np.save(music / "stray.npy", np.ones((1, 48), np.float32))
    assert search.main(["a chorale", str(music), "--no_cache", *MODEL]) == 2
    err = capsys.readouterr().err
    assert "holds .npy features (1, e.g. stray.npy) and raw music or text files (3, e.g. airds_tune3.abc)" in err
    assert evaluate.main([str(texts), str(music), "--no_cache", *MODEL]) == 2
    assert "give a folder of one kind" in capsys.readouterr().err
    np.save(texts / "stray.npy", np.ones((1, 48), np.float32))  # 4 texts beside 1 feature: refused too
    assert evaluate.main([str(texts), str(texts), "--no_cache", *MODEL]) == 2
    assert "(1, e.g. stray.npy) and raw music or text files (4, e.g. bwv10.7.txt)" in capsys.readouterr().err


def test_eval_from_raw_files_equals_the_metrics_script_on_extracted_features(tiny_env, raw, tmp_path, capsys):
    music, texts = raw
    evaluate = load_script("semantic_search/clamp2_eval.py")
    ranks = tmp_path / "ranks.jsonl"
    assert evaluate.main([str(texts), str(music), "--ranks", str(ranks), "--cache", str(tmp_path / "cache"), *MODEL]) == 0
    raw_lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in raw_lines] == ["MRR", "Hit@1", "Hit@10", "Hit@100"]
    assert [json.loads(line)["key"] for line in ranks.read_text().splitlines()] == ["bwv10", "handmade"]

    # The same pieces through the batch pipeline: converters, extract_clamp2.py, semantic_search_metrics.py.
    convert = tmp_path / "converted"
    assert load_script("process_data/batch_xml2abc.py").main([str(music), str(convert / "std"), "--workers", "1"]) == 0
    assert load_script("process_data/batch_interleaved_abc.py").main(
        [str(convert / "std"), str(convert / "abc"), "--workers", "1"]) == 0
    assert load_script("process_data/batch_midi2mtf.py").main([str(music), str(convert / "mtf"), "--workers", "1"]) == 0
    extract = load_script("code/extract_clamp2.py")
    args = ["--normalize", "--weights", str(VECTORS / "tiny_clamp2.pth"), "--text_model", str(VECTORS / "tiny_text_model"),
            "--no_progress"]
    assert extract.main([str(texts), str(tmp_path / "ft"), *args]) == 0
    for kind in ("abc", "mtf"):
        assert extract.main([str(convert / kind), str(tmp_path / "fm"), *args]) == 0
    capsys.readouterr()
    assert load_script("semantic_search/semantic_search_metrics.py").main([str(tmp_path / "ft"), str(tmp_path / "fm")]) == 0
    assert capsys.readouterr().out.splitlines() == raw_lines


def same_ranks(a, b) -> bool:
    """Two --ranks files agree: keys, ranks and top lists, scores to float32 rounding (the features were
    computed in other batches)."""
    left, right = ([json.loads(line) for line in path.read_text().splitlines()] for path in (a, b))
    return [(x["key"], x["rank"], [k for k, _ in x["top"]]) for x in left] == \
        [(x["key"], x["rank"], [k for k, _ in x["top"]]) for x in right] and \
        all(abs(s - t) < 1e-5 for x, y in zip(left, right) for (_, s), (_, t) in zip(x["top"], y["top"]))


def test_eval_keeps_the_last_file_of_a_shared_key_and_names_them(tiny_env, raw, tmp_path, capsys):
    # The same piece as MusicXML and as MIDI (the README's xml/ + midi/ layout) share the key "bwv10": as a
    # feature folder's keys are kept, the last file in sorted path order is used, with a warning naming both.
    music, texts = raw
    (music / "midi").mkdir()
    shutil.copy(VECTORS / "inputs" / "midi" / "bwv10.7.mid", music / "midi" / "bwv10.7.mid")
    evaluate = load_script("semantic_search/clamp2_eval.py")
    assert evaluate.main([str(texts), str(music), "--no_cache", "--ranks", str(tmp_path / "both.jsonl"), *MODEL]) == 0
    both = capsys.readouterr()
    assert (f"warning: 2 files of {music} share the key 'bwv10' (bwv10.7.mxl, midi/bwv10.7.mid): "
            "midi/bwv10.7.mid is used") in both.err
    assert "2 common keys (4 queries, 3 references)" in both.err
    (music / "bwv10.7.mxl").unlink()
    assert evaluate.main([str(texts), str(music), "--no_cache", "--ranks", str(tmp_path / "midi.jsonl"), *MODEL]) == 0
    midi_only = capsys.readouterr()
    assert "share the key" not in midi_only.err
    # The metrics and scores of the file that was kept (the scores tell the MIDI's feature from the MusicXML's).
    assert both.out == midi_only.out
    assert same_ranks(tmp_path / "both.jsonl", tmp_path / "midi.jsonl")


def test_eval_keeps_the_file_the_pipelines_feature_folder_keeps(tiny_env, raw, tmp_path, capsys):
    # bwv10.7.abc and bwv10.7.live.mid share the key "bwv10". Raw names sort the .mid last, but their
    # features bwv10.7.npy and bwv10.7.live.npy sort the .abc's last, and a feature folder keeps the last:
    # so the pipeline (extract, then evaluate the features) uses the ABC, and so must the raw run.
    music, texts = raw
    (music / "bwv10.7.mxl").unlink()
    shutil.copy(VECTORS / "extract_in" / "abc" / "bwv10.7.abc", music / "bwv10.7.abc")
    shutil.copy(VECTORS / "inputs" / "midi" / "bwv10.7.mid", music / "bwv10.7.live.mid")
    evaluate = load_script("semantic_search/clamp2_eval.py")
    assert evaluate.main([str(texts), str(music), "--no_cache", "--ranks", str(tmp_path / "raw.jsonl"), *MODEL]) == 0
    assert "bwv10.7.abc is used" in capsys.readouterr().err
    (music / "bwv10.7.live.mid").unlink()
    assert evaluate.main([str(texts), str(music), "--no_cache", "--ranks", str(tmp_path / "abc.jsonl"), *MODEL]) == 0
    assert same_ranks(tmp_path / "raw.jsonl", tmp_path / "abc.jsonl")


def test_the_raw_folder_reader_takes_every_music_extension_the_encoder_takes():
    # raw_files keeps its own torch-free copy of the table: an extension added to the encoder alone would be
    # neither found in a raw folder nor accepted as a query by clamp2_search/clamp2_eval.
    from clamp2.extraction.model_inputs import MUSIC_INPUT_EXTENSIONS
    from clamp2.search.raw_files import MUSIC_SUFFIXES

    assert sorted(MUSIC_SUFFIXES) == sorted(MUSIC_INPUT_EXTENSIONS)
