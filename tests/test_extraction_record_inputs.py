"""The output folder's settings record against what features depend on: clamp3_embd's MERT and captioner, weights
under another name, inputs that fail under --overwrite, a transformers upgrade (test_extraction_record.py has the
rest)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from clamp2.extraction.record import RECORD_NAME
from conftest import TINY_ENV, VECTORS, load_script
VECTORS3 = Path(__file__).parent / "data" / "vectors_clamp3"
TINY3_ENV = {**TINY_ENV, "AUDIO_HIDDEN_SIZE": "64", "AUDIO_NUM_LAYERS": "2", "MAX_AUDIO_LENGTH": "4"}


@pytest.fixture
def tiny3(monkeypatch):
    for key, value in TINY3_ENV.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="module")
def embd():
    return load_script("semantic_search/clamp3_embd.py")


def run(script, args, capsys):
    code = script.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, err


def other_mert(tmp_path):
    """tiny_mert with one weight changed: other MERT weights, the same CLaMP 3."""
    folder = tmp_path / "other_mert"
    shutil.copytree(VECTORS3 / "tiny_mert", folder)
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    generator = torch.Generator().manual_seed(0)
    for name, value in state.items():
        if value.is_floating_point():
            state[name] = value + 0.1 * torch.randn(value.shape, generator=generator)
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def test_embd_audio_with_other_mert_weights_is_refused(tiny3, tmp_path, embd, capsys):
    audio = tmp_path / "audio"
    audio.mkdir()
    shutil.copy(VECTORS3 / "inputs" / "audio" / "bwv26.6_44k1_stereo_s16.wav", audio)
    out = tmp_path / "out"
    common = ["--weights", VECTORS3 / "tiny_clamp3.pth", "--text_model", VECTORS / "tiny_text_model",
              "--num_workers", "0", "--no_progress", "--no_cache", "--get_global"]
    code, err = run(embd, [audio, out, "--mert", VECTORS3 / "tiny_mert", *common], capsys)
    assert code == 0, err
    first = np.load(out / "bwv26.6_44k1_stereo_s16.npy")
    mert = other_mert(tmp_path)
    fresh = tmp_path / "fresh"
    assert run(embd, [audio, fresh, "--mert", mert, *common], capsys)[0] == 0
    assert not np.allclose(np.load(fresh / "bwv26.6_44k1_stereo_s16.npy"), first, atol=1e-4)  # MERT matters
    code, err = run(embd, [audio, out, "--mert", mert, *common], capsys)
    assert code == 2, err  # not "0 features written, 1 already there" over features of the other MERT


def test_embd_same_weights_under_another_file_name_is_not_refused(tiny3, tmp_path, embd, capsys):
    texts = tmp_path / "texts"
    texts.mkdir()
    shutil.copy(VECTORS / "inputs" / "txt" / "multi.txt", texts)
    published = tmp_path / "weights_clamp3_saas_h_size_768.pth"  # a published name: variant "saas"
    shutil.copy(VECTORS3 / "tiny_clamp3.pth", published)
    copy = tmp_path / "my_copy.pth"
    shutil.copy(VECTORS3 / "tiny_clamp3.pth", copy)
    common = ["--text_model", VECTORS / "tiny_text_model", "--num_workers", "0", "--no_progress", "--no_cache",
              "--get_global"]
    out = tmp_path / "out"
    assert run(embd, [texts, out, "--weights", published, *common], capsys)[0] == 0
    code, err = run(embd, [texts, out, "--weights", copy, *common], capsys)
    assert code == 0 and "1 already there" in err, err  # the same weights (sha256): nothing to refuse


def test_overwrite_with_other_settings_leaves_no_feature_of_the_old_ones(tiny_env, tmp_path, extract_clamp2, capsys):
    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    shutil.copy(VECTORS / "extract_in" / "abc" / "bwv10.7.abc", inputs / "tune.abc")
    args = [str(inputs), str(out), "--weights", str(VECTORS / "tiny_clamp2.pth"), "--text_model",
            str(VECTORS / "tiny_text_model"), "--num_workers", "0", "--no_progress"]
    assert extract_clamp2.main(args + ["--normalize"]) == 0
    assert np.load(out / "tune.npy").shape == (1, 48)  # global
    (inputs / "tune.txt").write_text("a second input for tune.npy", encoding="utf-8")  # now tune.npy has two inputs
    extract_clamp2.main(args + ["--overwrite"])  # per-position now; both inputs fail (one output)
    settings = json.loads((out / RECORD_NAME).read_text())["settings"]
    assert settings["features"] == "per-position"
    assert not (out / "tune.npy").exists() or np.load(out / "tune.npy").ndim == 3  # no global feature left


def test_text_fingerprint_outlives_a_transformers_upgrade():
    from clamp2.cache import text_fingerprint
    from clamp2.text_model import load_text_model, load_tokenizer

    folder = VECTORS / "tiny_text_model"
    config, tokenizer = load_text_model(folder, pretrained=False).config, load_tokenizer(folder)
    before = text_fingerprint(tokenizer, config)
    config.use_bfloat16, config.torchscript, config.num_beams = False, False, 1  # generic keys of transformers 4
    config.return_dict = not config.return_dict
    assert text_fingerprint(tokenizer, config) == before
    config.layer_norm_eps = 1e-3  # what changes the features
    assert text_fingerprint(tokenizer, config) != before


def test_embd_text_then_audio_into_one_folder_and_the_merts_recorded(tiny3, tmp_path, embd, capsys):
    texts, audio = tmp_path / "texts", tmp_path / "audio"
    texts.mkdir()
    audio.mkdir()
    shutil.copy(VECTORS / "inputs" / "txt" / "multi.txt", texts)
    shutil.copy(VECTORS3 / "inputs" / "audio" / "bwv26.6_44k1_stereo_s16.wav", audio)
    common = ["--weights", VECTORS3 / "tiny_clamp3.pth", "--text_model", VECTORS / "tiny_text_model",
              "--mert", VECTORS3 / "tiny_mert", "--num_workers", "0", "--no_progress", "--no_cache", "--get_global"]
    out = tmp_path / "out"
    assert run(embd, [texts, out, *common], capsys)[0] == 0
    assert "mert_sha256" not in json.loads((out / RECORD_NAME).read_text())["settings"]
    assert run(embd, [audio, out, *common], capsys)[0] == 0  # another modality into the same folder: not refused
    assert "mert_sha256" in json.loads((out / RECORD_NAME).read_text())["settings"]
    assert run(embd, [texts, out, *common], capsys)[0] == 0  # nor text again
