"""code/extract_clamp3.py (SPEC_CLAMP3 §14-§15): the reference's numbers for text, ABC, MTF and MERT
features, independence from batching, bad audio arrays, checkpoint names and messages."""

import json
import shutil

import numpy as np
import pytest
import torch

from clamp2.extraction.core import AudioEncoder, InputError, MusicEncoder
from clamp2.patchilizer import M3Patchilizer
from conftest import DATA_DIR, load_script

VECTORS3 = DATA_DIR / "vectors_clamp3"
TEXT_MODEL = DATA_DIR / "vectors" / "tiny_text_model"
TINY_CLAMP3_ENV = {"PATCH_LENGTH": "32", "PATCH_NUM_LAYERS": "2", "TOKEN_NUM_LAYERS": "1", "M3_HIDDEN_SIZE": "64",
                   "CLAMP3_HIDDEN_SIZE": "48", "MAX_TEXT_LENGTH": "16", "AUDIO_HIDDEN_SIZE": "64",
                   "AUDIO_NUM_LAYERS": "2", "MAX_AUDIO_LENGTH": "4", "TEXT_MODEL_NAME": "tiny_text_model"}
TINY_NAME = ("weights_clamp3_saas_h_size_48_t_model_tiny_text_model_t_length_16_a_size_64_a_layers_2_a_length_4"
             "_s_size_64_s_layers_2_p_size_64_p_length_32.pth")


@pytest.fixture
def tiny_env(monkeypatch):
    for k, v in TINY_CLAMP3_ENV.items():
        monkeypatch.setenv(k, v)


@pytest.fixture(scope="module")
def extract_clamp3():
    return load_script("code/extract_clamp3.py")


def clamp3_args(inp, out, *extra, weights=VECTORS3 / "tiny_clamp3.pth"):
    return [str(inp), str(out), *(["--weights", str(weights)] if weights else []), "--text_model", str(TEXT_MODEL),
            "--num_workers", "0", "--no_progress", *extra]


def max_diffs(expected_root, got_root):
    """{relative path: max |difference|} over every expected array; shapes and file sets must match."""
    files = sorted(expected_root.rglob("*.npy"))
    assert files
    diffs = {}
    for ref in files:
        rel = ref.relative_to(expected_root)
        got, want = np.load(got_root / rel), np.load(ref)
        assert got.dtype == np.float32 and got.shape == want.shape, rel
        diffs[rel.as_posix()] = float(np.abs(got - want).max())
    assert sorted(p.relative_to(got_root) for p in got_root.rglob("*.npy")) == [p.relative_to(expected_root) for p in files]
    return diffs


@pytest.mark.parametrize("flag,expected", [("--get_global", "feat_clamp3_global"), (None, "feat_clamp3_raw"),
                                           ("--normalize", "feat_clamp3_global")])
def test_reproduces_the_reference_for_every_kind(tiny_env, tmp_path, extract_clamp3, capsys, flag, expected):
    out = tmp_path / "out"
    # A trailing "/" on the input folder maps the same (the reference glues names onto the output then).
    assert extract_clamp3.main(clamp3_args(str(VECTORS3 / "extract_in") + "/", out, *([flag] if flag else []))) == 0
    diffs = max_diffs(VECTORS3 / "expected" / expected, out)
    assert {name.split("/")[0] for name in diffs} == {"abc", "audio", "mtf", "txt"}
    assert max(diffs.values()) < 1e-5, diffs
    captured = capsys.readouterr()
    assert "Successfully Loaded CLaMP 3 Checkpoint from Epoch 1 with loss 1.0" in captured.out
    assert "extract_clamp3: extracted 11, skipped 0 existing, failed 0" in captured.err


@pytest.mark.parametrize("get_global", [True, False])
def test_features_do_not_depend_on_batching(tiny_env, tmp_path, extract_clamp3, get_global):
    # The inputs hold MTF longer than PATCH_LENGTH (506 patches vs 32), text longer than MAX_TEXT_LENGTH
    # and audio longer than MAX_AUDIO_LENGTH (5 rows vs 4): overlapping last windows are exercised.
    flag = ["--get_global"] if get_global else []
    one, many = tmp_path / "b1", tmp_path / "b16"
    assert extract_clamp3.main(clamp3_args(VECTORS3 / "extract_in", one, "--batch_size", "1", *flag)) == 0
    assert extract_clamp3.main(clamp3_args(VECTORS3 / "extract_in", many, "--batch_size", "16", "--num_workers", "2",
                                           "--files_per_chunk", "3", *flag)) == 0
    files = sorted(one.rglob("*.npy"))
    assert len(files) == 11
    for path in files:
        np.testing.assert_allclose(np.load(many / path.relative_to(one)), np.load(path), atol=1e-5, rtol=0)


def test_symbolic_patches_remove_every_unit_length_line():
    encode = MusicEncoder(M3Patchilizer(64, 32), remove_unit_length=True, also_mtf=True)
    for kind in ("abc", "mtf"):
        for path in sorted((VECTORS3 / "extract_in" / kind).iterdir()):
            want = json.loads((VECTORS3 / "expected" / "patches" / kind / f"{path.name}.json").read_text())
            assert encode(path).tolist() == want, path.name
    mtf = "ticks_per_beat 480\ntext L:1/8\nL:1/8\nnote_on 0 0 60 64"
    assert encode.encode_text(mtf).tolist() == encode.encode_text(mtf.replace("L:1/8\n", "")).tolist()
    m3 = MusicEncoder(M3Patchilizer(64, 32), remove_unit_length=True)  # M3 extraction keeps it in MTF
    assert m3.encode_text(mtf).shape[0] > encode.encode_text(mtf).shape[0]


def test_script_and_api_remove_unit_length_lines_from_mtf_too(tiny_env, tmp_path, extract_clamp3):
    """SPEC_CLAMP3 §13 as wired into code/extract_clamp3.py and the CLaMP3 API, not only the encoder."""
    from clamp2 import CLaMP3

    source = sorted((VECTORS3 / "extract_in" / "mtf").iterdir())[0]
    lines = source.read_text(encoding="utf-8").split("\n")
    inp = tmp_path / "in"
    inp.mkdir()
    (inp / "as_written.mtf").write_text("\n".join(lines), encoding="utf-8")
    (inp / "with_unit_length.mtf").write_text("\n".join(lines[:1] + ["L:1/8"] + lines[1:3] + ["L:1/8"] + lines[3:]),
                                              encoding="utf-8")
    out = tmp_path / "out"
    assert extract_clamp3.main(clamp3_args(inp, out, "--get_global")) == 0
    assert np.array_equal(np.load(out / "as_written.npy"), np.load(out / "with_unit_length.npy"))
    model = CLaMP3.from_pretrained(VECTORS3 / "tiny_clamp3.pth", text_model=str(TEXT_MODEL), max_text_length=16)
    features = model.encode_music([inp / "as_written.mtf", inp / "with_unit_length.mtf"])
    assert np.array_equal(features[0], features[1])


def test_audio_rows_and_bad_arrays():
    encode = AudioEncoder(64)
    segments = np.load(VECTORS3 / "extract_in" / "audio" / "banish_misfortune_22k05_mono_s16.npy")
    rows = encode.encode_array(segments).numpy()
    assert rows.shape == (5, 64) and not rows[0].any() and not rows[-1].any()
    np.testing.assert_array_equal(rows[1:-1], segments[0])
    np.testing.assert_array_equal(encode.encode_array(segments[0]).numpy(), rows)  # [n, 64] reads the same
    # float16 and integers become float32, as torch.cat with the reference's float32 zero rows makes them.
    np.testing.assert_array_equal(encode.encode_array(segments.astype(np.float16)).numpy()[1:-1],
                                  segments[0].astype(np.float16).astype(np.float32))
    assert encode.encode_array(np.ones((1, 2, 64), np.int16)).dtype == torch.float32
    bad = {"float64": (segments.astype(np.float64), "float64"),
           "complex": (segments.astype(np.complex64), "complex64"),
           "width": (np.zeros((1, 3, 32), np.float32), "last dimension 32"),
           "layers": (np.zeros((3, 3, 64), np.float32), "--mean_features"),
           # Damaged values: every feature of the file (and every score against it) would be NaN.
           "nan": (np.where(np.arange(64) == 5, np.nan, segments).astype(np.float32), r"3 of its 192 values are NaN"),
           "inf": (np.full((1, 2, 64), np.inf, np.float16), "128 of its 128 values are NaN or infinite")}
    for name, (array, reason) in bad.items():
        with pytest.raises(InputError, match=reason):
            encode.encode_array(array)


def test_bad_inputs_are_reported_and_get_no_output(tiny_env, tmp_path, extract_clamp3, capsys):
    inp, out = tmp_path / "in", tmp_path / "out"
    shutil.copytree(VECTORS3 / "extract_in", inp)
    # MERT hidden states written without --mean_features: [3, n, 64] (the reference reads 3·n segments).
    shutil.copy(VECTORS3 / "expected" / "mert_all" / "bwv26.6_16k_stereo_s16.npy", inp / "audio" / "all_layers.npy")
    np.save(inp / "audio" / "double.npy", np.load(inp / "audio" / "bwv26.6_16k_stereo_s16.npy").astype(np.float64))
    np.save(inp / "audio" / "narrow.npy", np.zeros((1, 2, 32), np.float32))
    (inp / "audio" / "garbage.npy").write_bytes(b"not numpy")
    (inp / "abc" / "only_unit_length.abc").write_text("L:1/8\n")
    assert extract_clamp3.main(clamp3_args(inp, out, "--get_global")) == 1
    err = capsys.readouterr().err
    assert "extract_clamp3: extracted 11, skipped 0 existing, failed 5" in err
    log = (out / "failed_extract_clamp3.log").read_text()
    for line in ("audio/all_layers.npy\t", "audio/double.npy\tfloat64", "audio/narrow.npy\tlast dimension 32",
                 "audio/garbage.npy\tnot a NumPy", "abc/only_unit_length.abc\tempty music file"):
        assert line in log, line
    for stem in ("all_layers", "double", "narrow", "garbage"):
        assert not (out / "audio" / f"{stem}.npy").exists()
    # An output folder inside the input folder is never read back as MERT input; a re-run skips what exists.
    nested = inp / "features"
    assert extract_clamp3.main(clamp3_args(inp, nested, "--get_global")) == 1
    assert extract_clamp3.main(clamp3_args(inp, nested, "--get_global")) == 1
    assert "extracted 0, skipped 11 existing, failed 5" in capsys.readouterr().err
    assert not (nested / "features").exists()
    # The reference takes every input when the output folder holds the input folder, and writes
    # features beside sheet music and texts when it is the input folder (no .npy input to overwrite).
    assert extract_clamp3.main(clamp3_args(inp / "audio", tmp_path, "--get_global")) == 1
    assert "extracted 3, skipped 0 existing, failed 4" in capsys.readouterr().err
    assert extract_clamp3.main(clamp3_args(inp / "abc", inp / "abc", "--get_global")) == 1
    assert "extracted 2, skipped 0 existing, failed 1" in capsys.readouterr().err


def test_weights_names_messages_and_usage(tiny_env, tmp_path, extract_clamp3, capsys, monkeypatch):
    cfg_args = extract_clamp3.parse_args
    inp = VECTORS3 / "extract_in"
    monkeypatch.chdir(tmp_path)
    # config.py's name for the variant, nothing downloaded: the message names the file and the command,
    # and the exit status is 1 (SPEC_CLAMP3 §14), where other model errors are usage errors (2).
    assert extract_clamp3.main(clamp3_args(inp, tmp_path / "o", weights=None)) == 1
    err = capsys.readouterr().err
    # The tiny sizes give a name the hub does not hold: the published files are named instead.
    from clamp2.hub import PUBLISHED_CLAMP3_WEIGHTS

    published = [f"`hf download sander-wood/clamp3 {name} --local-dir .`" for name in PUBLISHED_CLAMP3_WEIGHTS.values()]
    assert f"{TINY_NAME} is not a published file" in err and all(command in err for command in published)
    assert extract_clamp3.main(clamp3_args(inp, tmp_path / "o", "--variant", "c2", weights=None)) == 1
    assert f"{TINY_NAME.replace('_saas_', '_c2_')} is not a published file" in capsys.readouterr().err
    shutil.copy(VECTORS3 / "tiny_clamp3.pth", tmp_path / TINY_NAME.replace(".pth", "_5.pth"))
    assert extract_clamp3.main(clamp3_args(inp, tmp_path / "o", "--epoch", "7", weights=None)) == 1
    assert TINY_NAME.replace(".pth", "_7.pth") in capsys.readouterr().err
    assert extract_clamp3.main(clamp3_args(inp / "txt", tmp_path / "o5", "--epoch", "5", "--get_global",
                                           weights=None)) == 0
    assert len(list((tmp_path / "o5").glob("*.npy"))) == 3
    assert [p.name for p in tmp_path.glob("*.pth")] == [TINY_NAME.replace(".pth", "_5.pth")]  # nothing fetched
    # A CLaMP 2 checkpoint is named as such; a bad shape names the key.
    assert extract_clamp3.main(clamp3_args(inp, tmp_path / "o", weights=DATA_DIR / "vectors" / "tiny_clamp2.pth")) == 2
    assert "is a CLaMP 2 checkpoint" in capsys.readouterr().err
    monkeypatch.setenv("MAX_AUDIO_LENGTH", "8")
    assert extract_clamp3.main(clamp3_args(inp, tmp_path / "o", weights=VECTORS3 / "tiny_clamp3.pth")) == 2
    err = capsys.readouterr().err
    assert "audio_model.embeddings.position_embeddings.weight: checkpoint (4, 64) vs model (8, 64)" in err
    assert "MAX_AUDIO_LENGTH" in err
    assert not (tmp_path / "o").exists()
    monkeypatch.setenv("MAX_AUDIO_LENGTH", "4")
    # The output folder cannot be the input folder (its .npy inputs would be overwritten).
    assert extract_clamp3.main(clamp3_args(tmp_path, tmp_path)) == 2
    assert "output folder is the input folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        cfg_args(["a", "b", "--weights", "w.pth", "--variant", "c2"])
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        extract_clamp3.main(["--help"])
    assert info.value.code == 0
    assert "--get_global" in capsys.readouterr().out


def test_checkpoint_without_training_state_loads(tiny_env, tmp_path, extract_clamp3):
    state = torch.load(VECTORS3 / "tiny_clamp3.pth", map_location="cpu", weights_only=True)["model"]
    torch.save({"model": state}, tmp_path / "model_only.pth")
    torch.save(state, tmp_path / "bare.pth")
    for name in ("model_only", "bare"):
        out = tmp_path / name
        assert extract_clamp3.main(clamp3_args(VECTORS3 / "extract_in" / "audio", out, "--get_global",
                                               weights=tmp_path / f"{name}.pth")) == 0
        diffs = max_diffs(VECTORS3 / "expected" / "feat_clamp3_global" / "audio", out)
        assert max(diffs.values()) < 1e-5
