"""Training-data behaviour a code-driven mutation audit found untested: the eval split (rounding, seed 42, what
counts towards the training batch), which text a sample trains on, M3's uncorrupted eval set and full-patch
shuffles, launch checks, and the ranks' messages."""

import json
import random

import pytest

from clamp2.training.data import dropout_join, read_music
from conftest import REPO_ROOT, VECTORS

SEP = "</s>"


def test_unit_length_is_dropped_from_upper_case_abc_too(tmp_path):
    # Not: the suffix compared without lower(); docs/differences.md: L:1/8 removed from .abc in any case.
    (tmp_path / "a.ABC").write_text("X:1\nL:1/8\nK:G\nabc|\n")
    assert read_music(tmp_path / "a.ABC") == "X:1\nK:G\nabc|\n"


def test_dropout_join_shuffles_the_kept_lines():
    # Not: no shuffle: the reference random.shuffle(selected_candidates) before joining.
    lines = [f"line {i}" for i in range(6)]
    orders = set()
    for seed in range(200):
        kept = dropout_join(lines, SEP, random.Random(seed)).split(SEP)
        if len(kept) >= 3:
            orders.add(kept == sorted(kept, key=lines.index))
    assert orders == {True, False}


def test_shuffle_of_a_full_patch_can_move_its_last_character():
    # Not: no-eos patch shuffles 1..len-2 only. The reference: index_eos = len(patch) when the
    # patch has no eos, indices = range(1, index_eos): the last character is shuffled too.
    import torch

    from clamp2.patchilizer import EOS_TOKEN_ID, M3Patchilizer
    from clamp2.training.corruption import shuffle_patch

    patch = torch.tensor(M3Patchilizer(16, 8).patch_to_ids("abcdefghijklmnopqrstuvwxyz"))
    assert EOS_TOKEN_ID not in patch.tolist()
    assert any(shuffle_patch(patch, random.Random(seed))[-1] != patch[-1] for seed in range(50))


# -- task wiring (tasks.py) ------------------------------------------------------------------------

TEXT_MODEL = str(VECTORS / "tiny_text_model")


def _config(monkeypatch, **extra):
    from clamp2.configuration import load_config

    env = {"PATCH_LENGTH": "32", "PATCH_NUM_LAYERS": "1", "TOKEN_NUM_LAYERS": "1", "M3_HIDDEN_SIZE": "64",
           "MAX_TEXT_LENGTH": "16", "TEXT_MODEL_NAME": TEXT_MODEL, "CLAMP2_HIDDEN_SIZE": "48",
           "CLAMP3_HIDDEN_SIZE": "48", "AUDIO_HIDDEN_SIZE": "64", "AUDIO_NUM_LAYERS": "1", "MAX_AUDIO_LENGTH": "4",
           "CLAMP2_LOAD_M3": "0", "CLAMP3_LOAD_M3": "0"}
    env.update(extra)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return load_config(REPO_ROOT / "code" / "config.py", report=False)


def _abc(tmp_path, name="a.abc"):
    source = sorted((VECTORS / "extract_in" / "abc").glob("*.abc"))[0]
    (tmp_path / name).write_bytes(source.read_bytes())
    return name


def _jsonl(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


QUIET = dict(log=lambda message: None)


def test_m3_evaluation_samples_are_not_corrupted(tmp_path, monkeypatch):
    # Not: M3's eval set built with training=True: random corruption and windows in the eval loss.
    from clamp2.training.tasks import m3_task

    config = _config(monkeypatch)
    train, held = tmp_path / "train", tmp_path / "eval"
    train.mkdir(), held.mkdir()
    for index in range(4):
        _abc(train, f"{index}.abc")
    _abc(held, "x.abc")
    task = m3_task(config, [str(train)], [str(held)], global_batch=1)
    for epoch in (1, 2, 3):
        task.eval_set.set_epoch(epoch)
        sample = task.eval_set[0]
        assert torch_equal(sample["input_patches"], sample["target_patches"])


def torch_equal(a, b):
    import torch
    return torch.equal(a, b)


def test_clamp2_without_text_dropout_needs_no_non_english_summary(tmp_path, monkeypatch):
    # Not: training lines always need summary_nen. Without TEXT_DROPOUT the reference trains on
    # summary_en[0] and never reads summary_nen.
    from clamp2.training.tasks import clamp2_task

    config = _config(monkeypatch, TEXT_DROPOUT="0")
    name = _abc(tmp_path)
    train = _jsonl(tmp_path / "train.jsonl", [{"filepaths": [name], "title": f"Title {i}", "summary_en": [f"tune {i}"]}
                                              for i in range(4)])
    evals = _jsonl(tmp_path / "eval.jsonl", [{"filepaths": [name], "summary_en": [f"held {i}"]} for i in range(2)])
    task = clamp2_task(config, train, evals, **QUIET)
    assert len(task.train_set) == 4 and len(task.eval_set) == 2
    # Not: training texts drawn with TEXT_DROPOUT although it is off: always summary_en[0].
    from clamp2.text_model import load_tokenizer

    tokenizer = load_tokenizer(TEXT_MODEL)
    for epoch in range(1, 9):
        task.train_set.set_epoch(epoch)
        for index, item in enumerate(task.train_set.items):
            expected = tokenizer(item.fields["summary_en"][0])["input_ids"]
            assert task.train_set[index]["text_ids"].tolist() == expected


def test_clamp2_eval_lines_need_no_non_english_summary(tmp_path, monkeypatch):
    # Not: eval lines need summary_nen too: evaluation reads summary_en[0] only (reference eval branch).
    from clamp2.training.tasks import clamp2_task

    config = _config(monkeypatch, TEXT_DROPOUT="1")
    name = _abc(tmp_path)
    nen = {"language": "German", "summary": "Ein Lied."}
    train = _jsonl(tmp_path / "train.jsonl", [{"filepaths": [name], "summary_en": [f"tune {i}"], "summary_nen": [nen]}
                                              for i in range(4)])
    evals = _jsonl(tmp_path / "eval.jsonl", [{"filepaths": [name], "summary_en": [f"held {i}"]} for i in range(2)])
    task = clamp2_task(config, train, evals, **QUIET)
    assert len(task.eval_set) == 2


def test_clamp3_split_counts_lines_without_analysis_towards_the_training_batch(tmp_path, monkeypatch):
    # Not: min_train = global batch, ignoring the lines without analysis that always train:
    # 6 lines with analysis + 4 without, global batch 8: 2 held out, 8 train (mutant: none held out).
    from clamp2.training.tasks import clamp3_task

    config = _config(monkeypatch, EVAL_SPLIT="0.2", TEXT_DROPOUT="1")
    name = _abc(tmp_path)
    lines = [{"filepaths": [name], "analysis": f"piece {i}"} for i in range(6)]
    lines += [{"filepaths": [name], "title": f"untitled {i}"} for i in range(4)]
    task = clamp3_task(config, "symbolic", _jsonl(tmp_path / "train.jsonl", lines), global_batch=8, **QUIET)
    assert len(task.eval_set) == 2 and len(task.train_set) == 8


def test_clamp3_symbolic_stage_drops_unit_length_from_every_file(tmp_path, monkeypatch):
    # Not: symbolic stage built with CLaMP 2's SymbolicMusic: SPEC_CLAMP3 §13 removes every
    # "L:1/8\n", MTF included, in the patchilizer.
    from clamp2.training.tasks import clamp3_task

    config = _config(monkeypatch, TEXT_DROPOUT="1")
    (tmp_path / "t.mtf").write_text("ticks_per_beat 480\nL:1/8\nnote_on 0 0 60 80\n")
    lines = [{"filepaths": ["t.mtf"], "analysis": f"piece {i}"} for i in range(3)]
    evals = _jsonl(tmp_path / "eval.jsonl", lines[:2])
    task = clamp3_task(config, "symbolic", _jsonl(tmp_path / "train.jsonl", lines), evals, **QUIET)
    patches = task.eval_set[0]["music_patches"]
    text = b"".join(bytes(row[1:].tolist()).split(b"\x02")[0] for row in patches[1:-1]).decode()
    assert "L:1/8" not in text and "ticks_per_beat 480\n" in text


def test_m3_eval_folders_of_empty_strings_mean_the_split(tmp_path, monkeypatch):
    # Not: the template's EVAL_FOLDERS [""] taken as a folder: "" is the current folder.
    from clamp2.training.tasks import m3_task

    config = _config(monkeypatch)
    train = tmp_path / "train"
    train.mkdir()
    for index in range(4):
        _abc(train, f"{index}.abc")
    _abc(tmp_path, "stray.abc")  # in the current folder
    monkeypatch.chdir(tmp_path)
    task = m3_task(config, [str(train)], [""], global_batch=1)
    assert task.notes and task.notes[0].startswith("no eval folders: ")
    assert {path.name for path in task.eval_set.paths} <= {f"{index}.abc" for index in range(4)}


def test_clamp3_a_data_error_mid_training_is_said_by_the_rank_that_hit_it(tmp_path, monkeypatch, capsys):
    # Not: DataError from run_training reported by rank 0 only: a bad file read mid-training fails on
    # the rank that reads it; rank 1 must say why before torchrun stops the others.
    import contextlib

    from clamp2.distributed import DistInfo
    from clamp2.training import clamp3
    from clamp2.training.arguments import parse_clamp3_args
    from clamp2.training.data import DataError

    _config(monkeypatch)
    monkeypatch.chdir(tmp_path)

    @contextlib.contextmanager
    def rank_one(local_rank, device):
        yield DistInfo(rank=1, world_size=2, local_rank=1)

    def fail(*args, **kwargs):
        raise DataError("x.npy: NaN in the features")

    monkeypatch.setattr(clamp3, "distributed_context", rank_one)
    monkeypatch.setattr(clamp3, "clamp3_task", lambda *args, **kwargs: None)
    monkeypatch.setattr(clamp3, "check_data_sizes", lambda *args, **kwargs: None)
    monkeypatch.setattr(clamp3, "run_training", fail)
    args = parse_clamp3_args("audio", "test", ["--train_jsonl", "t.jsonl", "--no_progress"])
    assert clamp3.main("audio", str(REPO_ROOT / "code" / "train_clamp3_audio.py"), args) == 2
    assert "error (rank 1): x.npy: NaN in the features" in capsys.readouterr().err


# -- texts ---------------------------------------------------------------------------------------------

def test_empty_translations_fall_back_to_the_other_fields():
    # Not: empty translation values kept as candidates: an empty training text. The reference drops
    # empty candidates and then, having none, takes every other field.
    from clamp2.training.data import clamp3_training_text

    fields = {"id": "1", "language": "en", "translations": {"language": "German", "text": ""}, "title": "Reel"}
    assert {clamp3_training_text(fields, SEP, random.Random(seed)) for seed in range(40)} == {"Reel"}


def test_blank_summaries_are_left_out_of_the_pool():
    # Not: blank summary_nen / summary_en kept: docs/differences.md, 'empty or blank summaries'.
    from clamp2.training.data import eval_text, training_text

    fields = {"summary_en": [" ", "A tune."], "summary_nen": [{"language": "German", "summary": "  "},
                                                              {"language": "German", "summary": "Ein Lied."}],
              "filepaths": ["a.abc"]}
    assert eval_text(fields) == "A tune."
    texts = {training_text(fields, SEP, random.Random(seed)) for seed in range(300)}
    assert texts == {"A tune.", "Ein Lied."}


def test_jsonl_music_files_match_their_extension_in_any_case(tmp_path):
    # Not: suffix compared case-sensitively: docs/differences.md, '.abc/.mtf in any case'.
    from clamp2.training.data import read_pairs

    _abc(tmp_path, "a.ABC")
    jsonl = _jsonl(tmp_path / "t.jsonl", [{"filepaths": ["a.ABC"], "summary_en": "A tune."}])
    assert read_pairs(jsonl, require_non_english=False)[0].music_paths == [tmp_path / "a.ABC"]


def test_eval_batches_yield_no_empty_part():
    # Not: a rank with nothing in a global batch yields an empty index list: collating [] fails.
    from clamp2.training.data import EvalBatches

    assert list(EvalBatches(5, 2, world_size=2, rank=1)) == [[2, 3]]
    assert len(EvalBatches(5, 2, world_size=2, rank=1)) == 1
    assert list(EvalBatches(5, 2, world_size=2, rank=0)) == [[0, 1], [4]]


def test_m3_an_empty_eval_file_fails_the_launch(tmp_path, monkeypatch):
    # Not: only the training files checked before training.
    from clamp2.training.data import DataError
    from clamp2.training.tasks import m3_task

    config = _config(monkeypatch)
    train, held = tmp_path / "train", tmp_path / "eval"
    train.mkdir(), held.mkdir()
    _abc(train, "0.abc")
    (held / "empty.abc").write_text("")
    with pytest.raises(DataError, match="empty files"):
        m3_task(config, [str(train)], [str(held)], global_batch=1)


def test_clamp3_eval_lines_need_analysis(tmp_path, monkeypatch):
    # Not: eval JSONL read without the analysis check: a KeyError after the first training epoch.
    from clamp2.training.data import DataError
    from clamp2.training.tasks import clamp3_task

    config = _config(monkeypatch, TEXT_DROPOUT="1")
    name = _abc(tmp_path)
    train = _jsonl(tmp_path / "train.jsonl", [{"filepaths": [name], "analysis": f"piece {i}"} for i in range(4)])
    evals = _jsonl(tmp_path / "eval.jsonl", [{"filepaths": [name], "analysis": "held"}, {"filepaths": [name],
                                                                                          "title": "no text"}])
    with pytest.raises(DataError, match="no 'analysis' text"):
        clamp3_task(config, "symbolic", train, evals, **QUIET)


def test_clamp2_without_load_m3_does_not_look_for_m3_weights(tmp_path, monkeypatch):
    # Not: M3 weights looked for, and loaded when present, although CLAMP2_LOAD_M3 is off.
    from clamp2.training.tasks import clamp2_task

    config = _config(monkeypatch, TEXT_DROPOUT="0", CLAMP2_LOAD_M3="0")
    monkeypatch.chdir(tmp_path)
    name = _abc(tmp_path)
    train = _jsonl(tmp_path / "train.jsonl", [{"filepaths": [name], "summary_en": [f"tune {i}"]} for i in range(4)])
    messages = []
    task = clamp2_task(config, train, "", log=messages.append)
    task.build_model()
    assert not any("M3" in message for message in messages)


def test_clamp2_an_eval_file_of_one_pair_is_noted(tmp_path, monkeypatch):
    # Not: the note on a 1-pair eval JSONL, whose contrastive loss is always 0, is never given.
    from clamp2.training.tasks import clamp2_task

    config = _config(monkeypatch, TEXT_DROPOUT="0")
    name = _abc(tmp_path)
    train = _jsonl(tmp_path / "train.jsonl", [{"filepaths": [name], "summary_en": [f"tune {i}"]} for i in range(4)])
    evals = _jsonl(tmp_path / "eval.jsonl", [{"filepaths": [name], "summary_en": ["held"]}])
    task = clamp2_task(config, train, evals, **QUIET)
    assert any("holds 1 pair" in note for note in task.notes)


def test_clamp3_without_any_analysis_and_no_eval_file_fails_the_launch(tmp_path, monkeypatch):
    # Not: no line can be held out: the run would go on with an empty eval set.
    from clamp2.training.data import DataError
    from clamp2.training.tasks import clamp3_task

    config = _config(monkeypatch, TEXT_DROPOUT="1")
    name = _abc(tmp_path)
    train = _jsonl(tmp_path / "train.jsonl", [{"filepaths": [name], "title": f"piece {i}"} for i in range(4)])
    with pytest.raises(DataError, match="no line has an 'analysis' text"):
        clamp3_task(config, "symbolic", train, **QUIET)


def test_clamp3_freeze_text_of_the_environment_holds_without_the_flag(tmp_path, monkeypatch):
    # Not: --freeze_text defaulting to False: the flag's absence would override FREEZE_TEXT=1.
    from clamp2.training import clamp3
    from clamp2.training.arguments import parse_clamp3_args
    from clamp2.training.data import DataError

    _config(monkeypatch, FREEZE_TEXT="1")
    monkeypatch.chdir(tmp_path)
    seen = {}

    def capture(config, *args, **kwargs):
        seen["FREEZE_TEXT"] = config.FREEZE_TEXT
        raise DataError("stop here")

    monkeypatch.setattr(clamp3, "clamp3_task", capture)
    args = parse_clamp3_args("symbolic", "test", ["--train_jsonl", "t.jsonl", "--no_progress"])
    assert clamp3.main("symbolic", str(REPO_ROOT / "code" / "train_clamp3_symbolic.py"), args) == 2
    assert seen == {"FREEZE_TEXT": True}


def test_training_text_draws_among_the_non_english_summaries():
    # Not: always the first summary_nen: the reference random.choice(item["summary_nen"]).
    fields = {"summary_en": ["A tune."], "summary_nen": [{"language": "German", "summary": "Ein Lied."},
                                                         {"language": "French", "summary": "Un air."}]}
    texts = {training_text_(fields, seed) for seed in range(300)}
    assert texts == {"A tune.", "Ein Lied.", "Un air."}


def training_text_(fields, seed):
    from clamp2.training.data import training_text
    return training_text(fields, SEP, random.Random(seed))


# -- the default split holds out what the reference's rank 0 holds out: random.seed(42); shuffle; [:int(n·r)] --

def _reference_held_out(items, fraction):
    shuffled = list(items)
    random.Random(42).shuffle(shuffled)
    return shuffled[:int(len(items) * fraction)]


def test_m3_split_is_the_references(tmp_path, monkeypatch):
    # Not: the M3 split seeded with another seed than 42.
    from clamp2.training.data import find_music_files
    from clamp2.training.tasks import m3_task

    config = _config(monkeypatch, EVAL_SPLIT="0.2")
    train = tmp_path / "train"
    train.mkdir()
    for index in range(10):
        _abc(train, f"{index}.abc")
    task = m3_task(config, [str(train)], [], global_batch=1)
    assert task.eval_set.paths == _reference_held_out(find_music_files([str(train)]), 0.2)


def test_clamp2_split_is_the_references(tmp_path, monkeypatch):
    # Not: the CLaMP 2 split seeded with another seed than 42.
    from clamp2.training.tasks import clamp2_task

    config = _config(monkeypatch, TEXT_DROPOUT="0", EVAL_SPLIT="0.2")
    name = _abc(tmp_path)
    train = _jsonl(tmp_path / "train.jsonl", [{"filepaths": [name], "summary_en": [f"tune {i}"]} for i in range(10)])
    task = clamp2_task(config, train, "", **QUIET)
    assert [item.line_number for item in task.eval_set.items] == _reference_held_out(range(1, 11), 0.2)


def test_clamp3_split_is_the_references_when_every_line_has_analysis(tmp_path, monkeypatch):
    # Not: the CLaMP 3 split seeded with another seed than 42.
    from clamp2.training.tasks import clamp3_task

    config = _config(monkeypatch, TEXT_DROPOUT="1", EVAL_SPLIT="0.2")
    name = _abc(tmp_path)
    train = _jsonl(tmp_path / "train.jsonl", [{"filepaths": [name], "analysis": f"piece {i}"} for i in range(10)])
    task = clamp3_task(config, "symbolic", train, **QUIET)
    assert [item.line_number for item in task.eval_set.items] == _reference_held_out(range(1, 11), 0.2)
