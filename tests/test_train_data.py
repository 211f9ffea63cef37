"""Training data (SPEC §7): texts, instrument removal, JSONL checks, datasets and batches on real pieces."""

import json
import math
import random
from collections import Counter

import pytest
import torch

from clamp2.patchilizer import M3Patchilizer
from clamp2.text_model import load_tokenizer
from clamp2.training.data import (DataError, EvalBatches, M3Dataset, PairItem, TextMusicCollator, TextMusicDataset,
                                  SymbolicMusic, TrainBatches, check_music_files, collate_m3, dropout_join,
                                  eval_music_path, eval_plan, eval_text, metadata_lines, read_music, read_pairs,
                                  remove_instrument_info, split_eval, training_text)
from conftest import VECTORS
from train_corpus import corpus  # noqa: F401  (fixture)

SEP = "</s>"


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(VECTORS / "tiny_text_model"))


# -- instrument removal ----------------------------------------------------------------------------

def test_instrument_removal_abc(vectors):
    text = (vectors / "extract_in/abc/bwv10.7.abc").read_text()
    cleaned = remove_instrument_info(text)
    assert 'V:1 treble nm="Soprano" snm="S."\n' in text
    assert "V:1 treble\n" in cleaned and "V:4 bass\n" in cleaned and "nm=" not in cleaned
    assert remove_instrument_info("V:1 treble snm=\"S.\"\n[V:1]abc|") == "V:1 treble\n[V:1]abc|"
    # A V: line without a name, and every other line, stays as it is; a cut last line gains "\n".
    assert remove_instrument_info("K:G\nV:1 treble\nabc|") == "K:G\nV:1 treble\nabc|"
    assert remove_instrument_info("K:G\nV:1 nm=\"Flute\"") == "K:G\nV:1\n"


def test_instrument_removal_mtf():
    text = "ticks_per_beat 480\nprogram_change 0 0 41\nnote_on 0 0 60 80\nprogram_change 0 1 73"
    assert remove_instrument_info(text) == ("ticks_per_beat 480\nprogram_change 0 0 0\nnote_on 0 0 60 80\n"
                                            "program_change 0 1 0\n")


@pytest.mark.parametrize("clamp3", [False, True])
def test_instrument_removal_only_in_training_with_p_0_9(tmp_path, clamp3):
    # SPEC §7: in training, with p 0.9; evaluation always sees the file as written.
    path = tmp_path / "a.abc"
    path.write_text('X:1\nL:1/8\nK:G\nV:1 treble nm="Flute"\n[V:1]abc|def|\n')
    patchilizer = M3Patchilizer()
    music = SymbolicMusic(patchilizer, clamp3=clamp3)
    as_written = music.load(path, training=False, rng=random.Random(0))
    stripped_text = remove_instrument_info(read_music(path)).replace("L:1/8\n", "")
    stripped = torch.from_numpy(patchilizer.encode_array(stripped_text, add_special_patches=True)).long()
    assert not torch.equal(as_written, stripped)
    assert all(torch.equal(music.load(path, training=False, rng=random.Random(seed)), as_written)
               for seed in range(50))
    loads = [music.load(path, training=True, rng=random.Random(seed)) for seed in range(1000)]
    assert all(torch.equal(x, stripped) or torch.equal(x, as_written) for x in loads)
    assert 870 <= sum(torch.equal(x, stripped) for x in loads) <= 930  # 0.8 or 1.0 would be far outside


def test_read_music_drops_unit_length_from_abc_only(tmp_path):
    (tmp_path / "a.abc").write_text("X:1\nL:1/8\nK:G\nabc|\n")
    (tmp_path / "a.mtf").write_text("ticks_per_beat 480\nL:1/8\n")
    assert read_music(tmp_path / "a.abc") == "X:1\nK:G\nabc|\n"
    assert read_music(tmp_path / "a.mtf") == "ticks_per_beat 480\nL:1/8\n"


# -- texts -----------------------------------------------------------------------------------------

ITEM = {"title": "Reel\n\nof the North", "composer": None, "genres": ["Folk", "Reel", "Folk"],
        "tags": ["Reel\nof the North", ""], "year": 1890, "description": "Reel",
        "summary_en": "A lively reel.", "summary_nen": {"language": "German", "summary": "Ein lebhafter Reel."},
        "filepaths": ["a.abc"]}


def test_metadata_lines_first_occurrence_no_empty_lines():
    # Values de-duplicated in order ("Folk" twice, "Reel\nof the North" as title-like tag), then split
    # into lines; empty lines never appear; numbers and summaries are not metadata text.
    assert metadata_lines(ITEM) == ["Reel", "of the North", "Folk", "Reel", "Reel", "of the North"]


def test_training_text_draws_and_fallbacks():
    lines = set(metadata_lines(ITEM))
    kinds = Counter()
    for seed in range(4000):
        text = training_text(ITEM, SEP, random.Random(seed))
        if text == "A lively reel.":
            kinds["en"] += 1
        elif text == "Ein lebhafter Reel.":
            kinds["nen"] += 1
        else:
            parts = text.split(SEP)
            assert parts and all(parts) and set(parts) <= lines  # never an empty line
            kinds["meta"] += 1
    assert 1850 < kinds["meta"] < 2150 and 850 < kinds["en"] < 1150 and 850 < kinds["nen"] < 1150


def test_dropout_keeps_each_metadata_line_with_p_0_5():
    lines = [f"line {i}" for i in range(10)]
    kept = [len(dropout_join(lines, SEP, random.Random(seed)).split(SEP)) for seed in range(2000)]
    # Mean 5 (+0.01 from the all-dropped fallback); its standard error here is 0.035; p 0.6 would give 6.
    assert abs(sum(kept) / len(kept) - 5.0) < 0.15
    assert set(dropout_join(lines, SEP, random.Random(1)).split(SEP)) <= set(lines)


@pytest.mark.parametrize("summary_en,summary_nen", [
    ("An air.", {"language": "French", "summary": "Un air."}),
    (["An air."], [{"language": "French", "summary": "Un air."}]),
    (["An air.", "A tune."], ["Un air."]),
])
def test_summaries_as_strings_or_lists(summary_en, summary_nen):
    item = {"summary_en": summary_en, "summary_nen": summary_nen, "filepaths": ["a.abc"]}
    texts = {training_text(item, SEP, random.Random(seed)) for seed in range(200)}
    assert texts == ({"An air.", "Un air."} | ({"A tune."} if len(summary_en) == 2 and isinstance(summary_en, list)
                                                 else set()))
    assert eval_text(item) == "An air."


def test_eval_music_choice(tmp_path):
    abc, mtf = tmp_path / "a.abc", tmp_path / "a.mtf"
    assert eval_music_path([abc, mtf]) == abc
    assert eval_music_path([mtf, abc]) == abc
    assert eval_music_path([mtf]) == mtf  # the reference indexes a missing second entry
    assert eval_music_path([abc.with_name("t.ABC"), mtf]) == mtf  # the reference's endswith(".abc")


def test_split_eval_is_seeded_and_rounds_as_the_reference():
    # the reference's training: random.seed(42); random.shuffle(data); data[:int(len(data) * 0.01)]
    # (1070 · 0.01 = 10.7: int() gives 10 where round() would give 11)
    items = list(range(1070))
    reference = list(items)
    random.Random(42).shuffle(reference)
    split = split_eval(items, 0.01, 42)
    assert split.eval == reference[:10] and split.train == reference[10:]
    assert split_eval(items, 0.01, 42) == split
    assert "10 of 1070 items held out" in split.reason and "rounded down" in split.reason
    # its linear probe rounds up: math.ceil(len(files) * 0.2)
    split = split_eval(list(range(11)), 0.2, 42, min_train=0, round_up=True)
    assert len(split.eval) == 3 and "rounded up" in split.reason


def test_split_eval_never_leaves_training_impossible():
    items = list(range(50))
    # 1% of 50 is 1 item; a contrastive loss needs 2.
    split = split_eval(items, 0.01, 42, min_train=32, min_eval=2)
    assert (len(split.train), len(split.eval)) == (48, 2) and "raised to the minimum of 2" in split.reason
    # 30% would leave 35 < one global batch of 40: lowered to 10.
    split = split_eval(items, 0.3, 42, min_train=40, min_eval=2)
    assert (len(split.train), len(split.eval)) == (40, 10) and "lowered so that 40 items" in split.reason
    # Nothing can be spared: train on all 50 and evaluate on them too, saying so.
    split = split_eval(items, 0.01, 42, min_train=49, min_eval=2)
    assert sorted(split.train) == sorted(split.eval) == items and "no item held out" in split.reason


# -- which samples each process takes --------------------------------------------------------------

def test_train_batches_drop_only_the_incomplete_last_global_batch():
    one = TrainBatches(23, batch_size=6, world_size=1, seed=42)
    ranks = [TrainBatches(23, batch_size=3, world_size=2, rank=r, seed=42) for r in range(2)]
    epochs = []
    for epoch in (1, 2, 3):
        for sampler in [one] + ranks:
            sampler.set_epoch(epoch)
        whole = list(one)
        assert len(whole) == len(one) == 3 and all(len(b) == 6 for b in whole)  # 18 of 23, 5 left out
        assert len(set(sum(whole, []))) == 18
        # Two processes with half the batch take the halves of the same global batches.
        assert [a + b for a, b in zip(*ranks)] == whole
        epochs.append(whole)
    assert epochs[0] != epochs[1] != epochs[2]  # a fresh permutation each epoch
    assert set(sum(sum(epochs, []), [])) == set(range(23))  # every sample is seen across epochs


@pytest.mark.parametrize("samples,batch,world,plan", [
    (4, 4, 2, [[2, 2]]), (9, 4, 2, [[4, 4], [1, 0]]), (1, 8, 2, [[1, 0]]), (7, 2, 1, [[2], [2], [2], [1]]),
    (11, 2, 3, [[2, 2, 2], [2, 2, 1]]),
])
def test_eval_plan_covers_every_sample_once_in_equal_shares(samples, batch, world, plan):
    assert eval_plan(samples, batch, world) == plan
    parts = [list(EvalBatches(samples, batch, world, rank)) for rank in range(world)]
    assert sorted(i for part in parts for batch_ in part for i in batch_) == list(range(samples))
    for counts in plan:
        assert max(counts) - min(counts) <= 1


# -- JSONL checks ----------------------------------------------------------------------------------

def write_jsonl(path, items):
    path.write_text("".join(json.dumps(i) + "\n" for i in items), encoding="utf-8")
    return path


def pair(*paths):
    return {"summary_en": "x", "summary_nen": {"language": "German", "summary": "y"}, "filepaths": list(paths)}


def test_read_pairs_lists_every_problem(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "ok.abc").write_text("K:G\nabc|\n")
    (tmp_path / "outside.abc").write_text("K:G\nabc|\n")
    jsonl = write_jsonl(tmp_path / "data" / "pairs.jsonl", [
        pair("ok.abc"), pair("../outside.abc"), pair(str(tmp_path / "outside.abc")), pair("sub/../../outside.abc"),
        pair("gone1.abc"), pair("gone2.mtf", "ok.abc"), pair("gone3.abc"), pair("notes.txt"),
        {"summary_en": "x", "filepaths": ["ok.abc"]}, {"summary_nen": "y", "filepaths": ["ok.abc"]},
    ])
    with open(jsonl, "a") as handle:
        handle.write("{not json\n")
    with pytest.raises(DataError) as info:
        read_pairs(jsonl, require_non_english=True)
    message = str(info.value)
    # ../ leaves the folder as the reference's join does; an absolute path is no path relative to it.
    assert "pairs.jsonl:3: file path" in message and "is not a path relative to the JSONL's folder" in message
    assert "pairs.jsonl:2:" not in message and "pairs.jsonl:4:" not in message
    assert "missing files (3):" in message and "gone1.abc" in message and "gone3.abc" in message
    assert "pairs.jsonl:8: 'notes.txt' is not an .abc or .mtf file" in message
    assert "pairs.jsonl:9: no 'summary_nen'" in message and "pairs.jsonl:10: no 'summary_en'" in message
    assert "pairs.jsonl:11: not valid JSON" in message


def test_read_pairs_of_the_corpus(corpus):
    items = read_pairs(corpus / "pairs.jsonl", require_non_english=True)
    assert len(items) == 35 and all(isinstance(i, PairItem) for i in items)
    both = [i for i in items if len(i.music_paths) == 2][0]
    assert [p.name for p in both.music_paths] == ["bwv10.7.abc", "bwv10.7.mtf"]
    assert all(p.is_file() and corpus in p.parents for i in items for p in i.music_paths)


def test_check_music_files(tmp_path):
    (tmp_path / "a.abc").write_text("K:G\nabc|\n")
    (tmp_path / "empty.mtf").write_text("")
    with pytest.raises(DataError) as info:
        check_music_files([tmp_path / "a.abc", tmp_path / "empty.mtf", tmp_path / "x.abc", tmp_path / "y.abc"])
    assert "missing files (2)" in str(info.value) and "empty files (1)" in str(info.value)
    # Not UTF-8 (a Latin-1 export): M3 training read it when a batch drew it, then stopped mid-epoch.
    (tmp_path / "latin1.abc").write_bytes("T:caf\xe9\nK:G\nabc|\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"files that cannot be read as text \(1\): .*latin1\.abc is not UTF-8"):
        check_music_files([tmp_path / "a.abc", tmp_path / "latin1.abc"])
    check_music_files([tmp_path / "a.abc"])


# -- datasets and batches --------------------------------------------------------------------------

def test_text_music_dataset(corpus, tokenizer):
    items = read_pairs(corpus / "pairs.jsonl", require_non_english=True)
    patchilizer = M3Patchilizer(64, 32)
    eval_set = TextMusicDataset(items, tokenizer, patchilizer, 16, training=False)
    index = next(i for i, item in enumerate(items) if len(item.music_paths) == 2)
    sample = eval_set[index]
    expected_text = tokenizer("Bach's chorale BWV 10.7 for four voices.")["input_ids"][:16]
    assert sample["text_ids"].tolist() == expected_text
    music = items[index].music_paths[0].read_text().replace("L:1/8\n", "")
    assert sample["music_patches"].tolist() == patchilizer.encode(music, add_special_patches=True,
                                                                  truncate_patches=True)
    train_set = TextMusicDataset(items, tokenizer, patchilizer, 16, training=True)
    train_set.set_epoch(1)
    first = [train_set[i] for i in range(len(items))]
    again = [train_set[i] for i in range(len(items))]
    train_set.set_epoch(2)
    later = [train_set[i] for i in range(len(items))]
    same = lambda a, b: all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)  # noqa: E731
    assert same(first, again) and not same(first, later)  # a function of (seed, epoch, index)
    assert all(len(s["text_ids"]) <= 16 and len(s["music_patches"]) <= 32 for s in first + later)


def test_collator_pads_fixed_or_to_longest(corpus, tokenizer):
    items = read_pairs(corpus / "pairs.jsonl", require_non_english=True)
    dataset = TextMusicDataset(items, tokenizer, M3Patchilizer(64, 32), 16, training=False)
    samples = [dataset[i] for i in (0, 1, 30)]
    fixed = TextMusicCollator(tokenizer.pad_token_id, 16, 32, 64)(samples)
    longest = TextMusicCollator(tokenizer.pad_token_id, 16, 32, 64, pad_to_longest=True)(samples)
    assert fixed["text_inputs"].shape == (3, 16) and fixed["music_inputs"].shape == (3, 32, 64)
    text_len = max(len(s["text_ids"]) for s in samples)
    music_len = max(len(s["music_patches"]) for s in samples)
    assert longest["text_inputs"].shape == (3, text_len) and longest["music_inputs"].shape == (3, music_len, 64)
    for row, sample in enumerate(samples):
        n = len(sample["text_ids"])
        assert fixed["text_masks"][row].tolist() == [1] * n + [0] * (16 - n)
        assert torch.all(fixed["text_inputs"][row, n:] == tokenizer.pad_token_id)
        assert torch.equal(fixed["text_inputs"][row, :text_len], longest["text_inputs"][row])
        assert torch.equal(fixed["music_inputs"][row, :music_len], longest["music_inputs"][row])


def test_m3_dataset_and_batch_padding(corpus):
    files = sorted((corpus / "abc").glob("*.abc"))[:3] + sorted((corpus / "mtf").glob("*.mtf"))[:2]
    patchilizer = M3Patchilizer(64, 32)
    dataset = M3Dataset(files, patchilizer, 0.45, training=False)
    samples = [dataset[i] for i in range(len(files))]
    for path, sample in zip(files, samples):
        expected = patchilizer.encode(read_music(path), add_special_patches=True, truncate_patches=True)
        assert sample["target_patches"].tolist() == expected
        assert torch.equal(sample["input_patches"], sample["target_patches"])  # evaluation keeps
        assert int(sample["selected_indices"].sum()) == math.ceil(0.45 * len(expected))
    assert [s["selected_indices"].tolist() for s in samples] == [dataset[i]["selected_indices"].tolist()
                                                                 for i in range(len(files))]  # eval is fixed
    batch = collate_m3(samples)
    longest = max(len(s["target_patches"]) for s in samples)
    assert batch["input_patches"].shape == (5, longest, 64) and batch["input_masks"].shape == (5, longest)
    for row, sample in enumerate(samples):
        n = len(sample["target_patches"])
        assert batch["input_masks"][row].tolist() == [1] * n + [0] * (longest - n)
        assert torch.all(batch["target_patches"][row, n:] == 0) and torch.all(batch["selected_indices"][row, n:] == 0)

# -- found by a mutation audit of the training machinery: each fails on a plausible one-line bug --------

def test_m3_training_samples_change_with_the_epoch(corpus):  # noqa: F811
    files = sorted((corpus / "abc").glob("*.abc"))[:4]
    dataset = M3Dataset(files, M3Patchilizer(64, 32), 0.45, training=True)
    draws = []
    for epoch in (1, 2, 3):
        dataset.set_epoch(epoch)
        draws.append([dataset[i]["selected_indices"].tolist() for i in range(len(files))])
    assert draws[0] != draws[1] != draws[2]


def test_eval_music_path_takes_the_second_entry_as_the_reference():
    from pathlib import Path

    assert eval_music_path([Path("a.mtf"), Path("b.abc"), Path("c.abc")]) == Path("b.abc")


def test_dropout_join_keeps_every_line_when_none_survives():
    class NoneKept(random.Random):
        def random(self):
            return 0.9
    assert sorted(dropout_join(["a", "b", "c"], "|", NoneKept(0)).split("|")) == ["a", "b", "c"]


def test_read_pairs_of_a_jsonl_that_is_not_utf8(tmp_path):
    # A JSONL in another encoding gave a UnicodeDecodeError traceback, not a DataError
    # (train_clamp2.py and train_clamp3_*.py turn only DataError into their one-line message).
    (tmp_path / "a.abc").write_text("K:G\nabc|\n")
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_bytes(b'{"summary_en": "caf\xe9", "filepaths": ["a.abc"]}\n')
    with pytest.raises(DataError, match="pairs.jsonl is not UTF-8 text"):
        read_pairs(jsonl, require_non_english=False)


@pytest.mark.parametrize("clamp3", [False, True])
def test_music_with_no_patch_trains_on_the_special_patches(tmp_path, clamp3):
    # docs/differences.md (Training): the reference's encode raises IndexError on these; here they are read.
    patchilizer = M3Patchilizer(patch_size=64, patch_length=32)
    music = SymbolicMusic(patchilizer, clamp3=clamp3)
    special = torch.from_numpy(patchilizer.encode_array("", add_special_patches=True)).long()
    assert special.shape == (2, 64)
    for name, text in [("u.abc", "L:1/8\n"), ("e.abc", "\U0001F3B5\U0001F600"), ("b.abc", "\ufeff")]:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        check_music_files([path])  # not refused at launch: the file is not empty
        for training in (False, True):
            assert torch.equal(music.load(path, training=training, rng=random.Random(0)), special)
    path, with_newline = tmp_path / "bar.abc", tmp_path / "bar_nl.abc"
    path.write_text("X:1\nK:C\nabc|\n|]", encoding="utf-8")
    with_newline.write_text("X:1\nK:C\nabc|\n|]\n", encoding="utf-8")
    assert torch.equal(music.load(path, training=False, rng=random.Random(0)),
                       music.load(with_newline, training=False, rng=random.Random(0)))
