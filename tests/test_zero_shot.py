"""Zero-shot classification: known geometry, label parsing, and a tiny model trained to tell two prompts apart."""

import json
import shutil

import numpy as np
import pytest

from conftest import load_script

ESSEN = ("altdeu10", "ballad10")
CHORALES = ("bach/bwv1.6.mxl", "bach/bwv101.7.mxl")


def test_each_piece_gets_the_label_of_the_closest_prompt():
    from clamp2.search import zero_shot

    labels = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], dtype=np.float32)
    # Scaled and tilted copies: cosine, not dot product, decides (the second row's dot product favours label 0).
    music = np.array([[0.1, 0.0, 0.01], [10.0, 12.0, 0.0], [0.0, -1.0, 0.2], [0.0, 0.0, 0.0]], dtype=np.float32)
    best, scores = zero_shot.predict(music, labels)
    assert best.tolist() == [0, 1, 2, 0]  # an all-zero feature ties everywhere: the first label
    assert scores.shape == (4, 3)
    np.testing.assert_allclose(scores[1], [10 / np.hypot(10, 12), 12 / np.hypot(10, 12), 0.0], atol=1e-6)


def test_accuracy_macro_f1_and_confusion_match_scikit_learn():
    from sklearn.metrics import confusion_matrix, f1_score

    from clamp2.search import zero_shot

    labels = ["jig", "reel", "waltz", "polka"]
    true = ["jig", "jig", "reel", "reel", "reel", "waltz", "jig"]
    pred = ["jig", "reel", "reel", "jig", "reel", "reel", "polka"]
    scores = zero_shot.evaluate(true, pred, labels)
    assert scores.accuracy == pytest.approx(3 / 7)
    assert scores.macro_f1 == pytest.approx(f1_score(true, pred, average="macro", zero_division=0))
    np.testing.assert_array_equal(scores.confusion, confusion_matrix(true, pred, labels=labels))
    table = zero_shot.format_confusion(scores).splitlines()
    assert table[0].split()[-4:] == labels and table[2].split() == ["reel", "1", "2", "0", "0"]


def test_labels_prompts_and_names():
    from clamp2.search import zero_shot

    assert zero_shot.parse_labels(" jig, reel ,,waltz ") == ["jig", "reel", "waltz"]
    with pytest.raises(ValueError, match="twice"):
        zero_shot.parse_labels("jig,reel,Jig")
    with pytest.raises(ValueError, match="at least two"):
        zero_shot.parse_labels("jig")
    assert zero_shot.prompts(["jig", "slow air"], "a {} from Ireland") == ["a jig from Ireland", "a slow air from Ireland"]
    with pytest.raises(ValueError, match="exactly one"):
        zero_shot.prompts(["jig", "reel"], "a tune")
    labels = ["air", "slow air", "reel"]
    assert zero_shot.label_in_name("sub/Reel_012.mid", labels) == "reel"
    assert zero_shot.label_in_name("slow_air_3.abc", labels) == "slow air"
    assert zero_shot.label_in_name("airs_3.abc", labels) is None
    assert zero_shot.label_in_name("reel.abc", labels) is None


def essen_tune(collection: str, index: int = 0) -> str:
    from music21 import corpus

    text = corpus.getWork(collection).read_text(encoding="latin-1")
    return [chunk + "\n" for chunk in text[text.index("X:"):].split("\n\n") if "K:" in chunk][index]


@pytest.fixture(scope="module")
def labelled_folder(tmp_path_factory):
    """Folk tunes as standard ABC and Bach chorales as MusicXML, named ``<label>_...``, plus one unnamed tune."""
    from music21 import corpus

    folder = tmp_path_factory.mktemp("zero_shot") / "music"
    (folder / "chorales").mkdir(parents=True)
    for number, collection in enumerate(ESSEN):
        (folder / f"folk_{number}.abc").write_text(essen_tune(collection), encoding="utf-8")
    for number, relative in enumerate(CHORALES):
        path = [p for p in map(str, corpus.getPaths(fileExtensions=("mxl",))) if p.endswith(relative)][0]
        shutil.copy(path, folder / "chorales" / f"chorale_{number}.mxl")
    (folder / "untitled.abc").write_text(essen_tune(ESSEN[0], 1), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def trained_weights(labelled_folder, tiny_text_dir, tmp_path_factory):
    """A tiny CLaMP 2 trained for a few steps to pair 'a folk tune' with the folk tunes and
    'a chorale tune' with the chorales (every window of every piece, contrastive loss)."""
    import torch

    from clamp2 import CLaMP2
    from clamp2.checkpoint import save_checkpoint
    from clamp2.extraction.core import pad_batch, window_starts
    from clamp2.extraction.model_inputs import TEXT, RawInput, resolve
    from clamp2.models.clamp2 import CLaMP2Model
    from clamp2.models.m3 import M3Dims
    from clamp2.text_model import load_text_model, load_tokenizer

    torch.manual_seed(0)
    dims = M3Dims(patch_size=64, patch_length=16, patch_num_layers=1, token_num_layers=1, hidden_size=64)
    model = CLaMP2Model(load_text_model(str(tiny_text_dir)), dims, hidden_size=32)
    tokenizer = load_tokenizer(str(tiny_text_dir))
    runners = CLaMP2(model, tokenizer, weights_path=tiny_text_dir, text_model=str(tiny_text_dir),
                     max_text_length=16, device="cpu")._runners(False)
    windows = {}
    for label in ("folk", "chorale"):
        windows[label] = []
        for path in sorted(labelled_folder.rglob(f"{label}_*")):
            ids = runners["music"].encode(resolve(path))
            windows[label] += [ids[s:s + dims.patch_length] for s in window_starts(len(ids), dims.patch_length)]
    texts = [runners["text"].encode(RawInput(TEXT, data=f"a {label} tune")) for label in ("folk", "chorale")]
    text_ids, text_masks = pad_batch(texts, tokenizer.pad_token_id)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(60):
        music = [windows[label][step % len(windows[label])] for label in ("folk", "chorale")]
        music_ids, music_masks = pad_batch(music, 0)
        loss = model(text_ids, text_masks, music_ids.long(), music_masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    weights = tmp_path_factory.mktemp("weights") / "zero_shot_tiny.pth"
    save_checkpoint(weights, model, config={"TEXT_MODEL_NAME": str(tiny_text_dir), "MAX_TEXT_LENGTH": 16})
    return weights


@pytest.fixture(scope="module")
def script():
    return load_script("semantic_search/zero_shot.py")


def test_zero_shot_script_on_a_trained_tiny_model(script, labelled_folder, trained_weights, tiny_text_dir, tmp_path,
                                                  capsys):
    output, png, cache = tmp_path / "predictions.json", tmp_path / "confusion.png", tmp_path / "cache"
    args = [str(labelled_folder), "--labels", "folk,chorale", "--prompt", "a {} tune", "--weights",
            str(trained_weights), "--text_model", str(tiny_text_dir), "--output", str(output), "--confusion_png",
            str(png), "--cache", str(cache), "--num_workers", "0", "--no_progress"]
    assert script.main(args) == 0
    out = capsys.readouterr().out
    predictions = json.loads(output.read_text(encoding="utf-8"))
    # The unnamed tune was not trained on: it gets a label, but which one is not the model's to know.
    assert predictions.pop("untitled.abc") in ("folk", "chorale")
    assert predictions == {"chorales/chorale_0.mxl": "chorale", "chorales/chorale_1.mxl": "chorale",
                           "folk_0.abc": "folk", "folk_1.abc": "folk"}
    assert "5 files classified (5 encoded, 0 from cache), 0 failed; predicted folk " in out
    assert "accuracy 1.0000, macro-F1 1.0000 over the 4 of 5 files whose names start with a label" in out
    assert png.read_bytes().startswith(b"\x89PNG")

    # Same folder again: every feature from the cache; a broken file is named, the others still classified.
    (labelled_folder / "broken.mid").write_bytes(b"no midi here")
    try:
        assert script.main(args) == 1
    finally:
        (labelled_folder / "broken.mid").unlink()
    captured = capsys.readouterr()
    assert "5 files classified (0 encoded, 5 from cache), 1 failed" in captured.out
    assert "failed: broken.mid: OSError: MThd not found" in captured.err
    assert {k: v for k, v in json.loads(output.read_text(encoding="utf-8")).items() if k != "untitled.abc"} == predictions

    # Swapped labels: the prompts follow their labels, so the predictions swap too.
    swapped = tmp_path / "swapped.json"
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("# labels\nchorale\nfolk\n", encoding="utf-8")
    assert script.main([str(labelled_folder), "--labels_file", str(labels_file), "--prompt", "a {} tune",
                        "--weights", str(trained_weights), "--text_model", str(tiny_text_dir), "--output", str(swapped),
                        "--cache", str(cache), "--num_workers", "0", "--no_progress"]) == 0
    assert {k: v for k, v in json.loads(swapped.read_text(encoding="utf-8")).items() if k != "untitled.abc"} == predictions


def test_usage_errors(script, tmp_path, capsys):
    assert_usage = [
        ([str(tmp_path), "--labels", "jig"], "at least two labels"),
        ([str(tmp_path), "--labels", "jig,reel", "--prompt", "a tune"], "exactly one {}"),
        ([str(tmp_path / "nope"), "--labels", "jig,reel"], "folder not found"),
        ([str(tmp_path), "--labels_file", str(tmp_path / "labels.txt")], "labels.txt"),
        ([str(tmp_path)], "one of the arguments --labels --labels_file is required"),
    ]
    for argv, message in assert_usage:
        with pytest.raises(SystemExit) as info:
            script.main(argv)
        assert info.value.code == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_missing_weights_is_one_line_with_the_download_command(script, labelled_folder, tiny_text_dir, tmp_path,
                                                               capsys):
    argv = [str(labelled_folder), "--labels", "folk,chorale", "--weights", str(tmp_path / "weights_x.pth"),
            "--text_model", str(tiny_text_dir), "--no_cache", "--no_progress", "--output", str(tmp_path / "p.json")]
    assert script.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: weights file not found") and "weights_x.pth is not a published file" in err[-1]
    assert "`hf download sander-wood/clamp2 weights_clamp2_h_size_768_lr_5e-05" in err[-1]
    assert not (tmp_path / "p.json").exists()


def test_labels_file_with_own_prompts(tmp_path):
    from clamp2.search import zero_shot

    path = tmp_path / "labels.txt"
    path.write_text("# collections\njig = a lively jig in 6/8 time\nreel\n\nchorale = a Bach chorale\n", encoding="utf-8")
    labels, own = zero_shot.read_label_prompts(path)
    assert labels == ["jig", "reel", "chorale"]
    assert zero_shot.prompts(labels, "a {} tune", own) == ["a lively jig in 6/8 time", "a reel tune", "a Bach chorale"]
    path.write_text("jig =\nreel\n", encoding="utf-8")
    with pytest.raises(ValueError, match="label = prompt"):
        zero_shot.read_label_prompts(path)


# -- found by a mutation audit: each fails on a plausible one-line bug the suite missed -----------------


def test_macro_f1_ignores_labels_that_never_occur():
    from sklearn.metrics import f1_score

    from clamp2.search import zero_shot

    labels = ["jig", "reel", "waltz", "hornpipe"]  # hornpipe: neither true nor predicted
    true = ["jig", "jig", "reel", "waltz"]
    pred = ["jig", "reel", "reel", "waltz"]
    scores = zero_shot.evaluate(true, pred, labels)
    assert scores.macro_f1 == pytest.approx(f1_score(true, pred, average="macro", zero_division=0))


def test_labels_that_would_tie_or_share_a_file_name_prefix_are_refused(tmp_path):
    """Two labels with one prompt have one text feature (the later could never be predicted); "slow air" and
    "slow_air" both claim slow_air_1.mid as their truth. An exact tie of distinct prompts goes to the first label."""
    from clamp2.search import zero_shot

    with pytest.raises(ValueError, match="twice"):
        zero_shot.parse_labels("slow air,slow_air,reel")
    path = tmp_path / "labels.txt"
    path.write_text("jig = a dance tune\nreel = a dance tune\n", encoding="utf-8")
    labels, own = zero_shot.read_label_prompts(path)
    with pytest.raises(ValueError, match="same prompt"):
        zero_shot.prompts(labels, "{}", own)
    with pytest.raises(ValueError, match="same prompt"):
        zero_shot.prompts(["jig", "reel"], "{}", {"jig": "reel"})
    same = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]], dtype=np.float32)  # labels 0 and 1: the same direction
    assert zero_shot.predict(np.array([[1.0, 0.1]], dtype=np.float32), same)[0].tolist() == [0]
    assert zero_shot.predict(np.array([[1.0, 0.1]], dtype=np.float32), same[[1, 0, 2]])[0].tolist() == [0]
