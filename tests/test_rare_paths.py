"""Paths the rest of the suite never executed (found by a coverage-guided audit): user-reachable behaviour
first, then the bad-input paths that matter. Docstrings name the code each test covers."""

import io
import os
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO_ROOT, VECTORS, load_script
from conftest import run_main as _run

VECTORS3 = VECTORS.parent / "vectors_clamp3"


# -- clamp2/api.py: M3's folder, skip and cache paths; the models' repr --------------------------------

@pytest.fixture(scope="module")
def m3():
    from clamp2 import M3

    return M3.from_pretrained(VECTORS / "tiny_m3.pth")


def _music_folder(root: Path) -> Path:
    """The vectors' interleaved ABC and MTF, one sub-folder, a text file (not music) and a broken file."""
    folder = root / "music"
    (folder / "sub").mkdir(parents=True)
    for path in sorted((VECTORS / "extract_in" / "abc").glob("*.abc"))[:2]:
        (folder / path.name).write_bytes(path.read_bytes())
    for path in sorted((VECTORS / "extract_in" / "mtf").glob("*.mtf"))[:1]:
        (folder / "sub" / path.name).write_bytes(path.read_bytes())
    (folder / "notes.txt").write_text("a tune from scotland\n")
    (folder / "empty.abc").write_bytes(b"")
    return folder


def test_m3_encode_folder_skips_and_raises_as_documented(m3, tmp_path):
    """api.py: M3.encode_folder, and M3.encode with errors="skip"."""
    from clamp2 import EncodeError

    folder = _music_folder(tmp_path)
    encoded = m3.encode_folder(folder, progress=False)
    names = sorted(Path(item).relative_to(folder).as_posix() for item in encoded.items)
    good = sorted(p for p in (Path(folder) / n for n in names))
    assert names == sorted(["sub/" + p.name for p in (folder / "sub").glob("*.mtf")]
                           + [p.name for p in folder.glob("*.abc") if p.name != "empty.abc"])
    assert [Path(item).name for item, _ in encoded.failures] == ["empty.abc"]  # the .txt is not music: not taken
    for item, feature in zip(encoded.items, encoded.features):
        # A file in a batch against the same file alone: other GEMM shapes, other rounding. The states are of
        # size ~3 (float32 steps of 2.4e-7 to 4.8e-7): 1e-6 was 2 to 4 steps. 1e-5, as every other batch check.
        np.testing.assert_allclose(feature, m3.encode(item)[0], atol=1e-5)
        want = np.load(VECTORS / "expected" / "feat_m3" / Path(item).suffix[1:] / (Path(item).stem + ".npy"))[0]
        np.testing.assert_allclose(feature, want, atol=1e-5)
    assert len(good) == len(encoded.features)
    with pytest.raises(EncodeError, match="empty"):
        m3.encode_folder(folder, errors="raise", progress=False)
    with pytest.raises(FileNotFoundError, match="folder not found"):
        m3.encode_folder(tmp_path / "absent", progress=False)
    skipped = m3.encode([folder / "empty.abc", *encoded.items], errors="skip")
    assert [Path(i).name for i, _ in skipped.failures] == ["empty.abc"] and len(skipped.features) == len(encoded.items)


def test_m3_cache_hits_equal_the_computed_features(tmp_path):
    """api.py (M3._settings: the cache namespace of M3)."""
    from clamp2 import M3

    files = sorted((VECTORS / "extract_in").rglob("*.abc")) + sorted((VECTORS / "extract_in").rglob("*.mtf"))
    n = len(files)
    m3 = M3.from_pretrained(VECTORS / "tiny_m3.pth", cache=tmp_path / "cache")
    first = m3.encode(files, errors="skip")
    second = m3.encode(files, errors="skip")
    assert n >= 3 and (first.computed, first.cached) == (n, 0) and (second.computed, second.cached) == (0, n)
    for a, b in zip(first.features, second.features):
        assert a.shape == b.shape and np.array_equal(a, b)
    # An M3 namespace never answers a CLaMP 2 request (per-position CLaMP 2 features of other sizes).
    from clamp2 import CLaMP2

    clamp2 = CLaMP2.from_pretrained(VECTORS / "tiny_clamp2.pth", text_model=str(VECTORS / "tiny_text_model"),
                                    max_text_length=16, cache=tmp_path / "cache")
    other = clamp2.encode_music(files, normalize=False, errors="skip")
    assert other.cached == 0 and other.computed == n


def test_a_cache_that_cannot_be_written_warns_once_and_the_features_still_come(tmp_path, monkeypatch, capsys):
    """api.py: an OSError from the cache's put is one warning; the features are returned."""
    from clamp2 import M3
    from clamp2 import cache as cache_module

    files = sorted((VECTORS / "extract_in").rglob("*.abc")) + sorted((VECTORS / "extract_in").rglob("*.mtf"))

    def refuse(self, key, feature):
        raise OSError(28, "No space left on device")

    namespace_class = type(cache_module.FeatureCache(tmp_path / "c").namespace({"x": 1}, {}))
    monkeypatch.setattr(namespace_class, "put", refuse)
    m3 = M3.from_pretrained(VECTORS / "tiny_m3.pth", cache=tmp_path / "cache")
    features = m3.encode(files)
    err = capsys.readouterr().err
    assert err.count("warning: cannot write to the feature cache") == 1 and "No space left" in err
    plain = M3.from_pretrained(VECTORS / "tiny_m3.pth").encode(files)
    assert all(np.array_equal(a, b) for a, b in zip(features, plain))


def test_reprs_name_the_model(m3):
    """api.py: the reprs of CLaMP2, CLaMP3 and M3."""
    from clamp2 import CLaMP2, CLaMP3

    assert repr(m3) == "M3(tiny_m3.pth, hidden=64, patch_length=32, device=cpu, dtype=fp32)"
    clamp2 = CLaMP2.from_pretrained(VECTORS / "tiny_clamp2.pth", text_model=str(VECTORS / "tiny_text_model"),
                                    max_text_length=16)
    assert repr(clamp2).startswith(f"CLaMP2(tiny_clamp2.pth, dim={clamp2.dim}, patch_length=32, text_model=")
    clamp3 = CLaMP3.from_pretrained(VECTORS3 / "tiny_clamp3.pth", text_model=str(VECTORS / "tiny_text_model"))
    assert repr(clamp3).startswith(f"CLaMP3(tiny_clamp3.pth, variant=None, dim={clamp3.dim}, patch_length=")


# -- clamp2/extraction/model_inputs.py: bytes content ---------------------------------------------------

def test_bytes_of_utf8_text_are_read_as_their_text(m3):
    """model_inputs.py: bytes that are neither MIDI, .mxl nor .npy are UTF-8 text (ABC or MTF)."""
    from clamp2 import EncodeError

    abc = sorted((VECTORS / "extract_in" / "abc").glob("*.abc"))[0]
    mtf = sorted((VECTORS / "extract_in" / "mtf").glob("*.mtf"))[0]
    from_bytes = m3.encode([abc.read_bytes(), mtf.read_bytes()])
    from_files = m3.encode([abc, mtf])
    assert all(np.array_equal(a, b) for a, b in zip(from_bytes, from_files))
    with pytest.raises(EncodeError, match="neither MIDI, .mxl nor UTF-8 text"):
        m3.encode([b"X:1\nK:C\n\xff\xfe"])
    with pytest.raises(EncodeError, match="a folder, not a file"):
        m3.encode([VECTORS])


@pytest.mark.parametrize("item", ["array", "int", "none"])
def test_an_unusable_item_that_is_not_a_path_raises_encode_error_with_its_reason(item):
    """An array, an int or None with errors="raise": EncodeError with the reason, naming the item by its type
    (the failure report once called os.fspath on it and raised a bare TypeError)."""
    from clamp2 import CLaMP3, EncodeError

    clamp3 = CLaMP3.from_pretrained(VECTORS3 / "tiny_clamp3.pth", text_model=str(VECTORS / "tiny_text_model"))
    width = clamp3.model.audio_dims.hidden_size
    value = {"array": np.ones((13, 5, width), np.float32), "int": 3, "none": None}[item]
    # errors="skip" names the reason (this works) ...
    skipped = clamp3.encode_audio([value], errors="skip")
    assert len(skipped.failures) == 1
    # ... errors="raise" (the default) must raise EncodeError with it, as for a path.
    with pytest.raises(EncodeError, match="expected \\[1, n, 64\\]|cannot encode a"):
        clamp3.encode_audio([value])


# -- clamp2/extraction/audio.py and mert.py ----------------------------------------------------------------

def _wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, samples, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def _data_offset(data: bytes) -> int:
    offset = 12
    while data[offset:offset + 4] != b"data":
        size = int.from_bytes(data[offset + 4:offset + 8], "little")
        offset += 8 + size + (size & 1)
    return offset


def test_a_wav_whose_data_size_is_0_but_riff_size_is_right_is_read_to_the_end(tmp_path):
    """audio.py: a data size of 0 is read to the end of the file (the RIFF size is kept when it is not 0)."""
    from clamp2.extraction.audio import decode_frames, wav_read_to_end

    rng = np.random.default_rng(0)
    samples = (rng.uniform(-0.5, 0.5, size=(2400, 2))).astype(np.float32)
    good = _wav_bytes(samples, 24000)
    want, _ = decode_frames(_write(tmp_path / "good.wav", good))
    offset = _data_offset(good)
    broken = bytearray(good)
    broken[offset + 4:offset + 8] = (0).to_bytes(4, "little")  # data size 0, RIFF size as written
    frames, rate = decode_frames(_write(tmp_path / "zero_data.wav", bytes(broken)))
    assert rate == 24000 and frames.shape == want.shape and np.array_equal(frames, want)
    patched = wav_read_to_end(tmp_path / "zero_data.wav").getvalue()
    assert patched[4:8] == good[4:8] and patched == good
    # No repair for what is not a WAV, or a WAV whose data size is not 0.
    assert wav_read_to_end(_write(tmp_path / "x.ogg", b"OggS" + bytes(40))) is None
    assert wav_read_to_end(tmp_path / "good.wav") is None
    no_data = bytearray(good[:offset])  # the header's chunks, no data chunk at all
    assert wav_read_to_end(_write(tmp_path / "no_data.wav", bytes(no_data))) is None


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_extract_mert_lists_inputs_that_would_write_one_feature(tmp_path, capsys):
    """mert.py: the plan's collisions are printed as failures and logged; the other files are extracted."""
    import soundfile

    script = load_script("process_data/extract_mert.py")
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name in ("a.wav", "a.flac", "b.wav"):
        soundfile.write(folder / name, rng.uniform(-0.3, 0.3, 24000 * 2).astype(np.float32), 24000)
    out = tmp_path / "out"
    code, _, err = _run(script, [folder, out, "--model", VECTORS3 / "tiny_mert", "--num_workers", "0",
                                 "--no_progress"], capsys)
    assert code == 1
    assert f"failed: {folder / 'a.flac'}:" in err and f"failed: {folder / 'a.wav'}:" in err
    assert "extract_mert: extracted 1, skipped 0 existing, failed 2" in err
    assert sorted(p.name for p in out.rglob("*.npy")) == ["b.npy"]
    log = dict(line.split("\t") for line in (out / "failed_extract_mert.log").read_text().splitlines())
    assert set(log) == {"a.flac", "a.wav"} and all("would all write" in reason for reason in log.values())


# -- clamp2/extraction/core.py: the scripts' usage checks ------------------------------------------------

@pytest.mark.parametrize("flag, says", [("--batch_tokens=-1", "--batch_tokens must be 0 (off) or more"),
                                        ("--num_workers=-1", "--num_workers must be 0 or more")])
def test_extract_m3_refuses_negative_counts(tmp_path, capsys, flag, says):
    """core.py: negative --batch_tokens / --num_workers are usage errors."""
    script = load_script("code/extract_m3.py")
    with pytest.raises(SystemExit) as exit_info:
        script.main([str(VECTORS / "extract_in"), str(tmp_path / "out"), "--weights", str(VECTORS / "tiny_m3.pth"), flag])
    assert exit_info.value.code == 2 and says in capsys.readouterr().err


def test_run_extraction_input_folder_missing_is_usage_error(tmp_path, capsys):
    """core.py (the scripts check first; the library entry point must too)."""
    from clamp2.extraction.core import run_extraction

    args = Namespace(input_dir=tmp_path / "absent", output_dir=tmp_path / "out", overwrite=False, no_progress=True,
                     batch_size=4, files_per_chunk=8, num_workers=0)
    assert run_extraction(args, {}, False, False, torch.device("cpu")) == 2
    assert "error: input folder not found" in capsys.readouterr().err


# -- clamp2/checkpoint.py: files that are not checkpoints of the family asked for -----------------------

def test_checkpoint_messages_for_wrong_files(tmp_path):
    """checkpoint.py: a folder, a pickle that is not torch's, a MERT state, a state of no known family."""
    import pickle

    from clamp2.checkpoint import CheckpointError, checkpoint_family, family_mismatch, read_checkpoint

    with pytest.raises((CheckpointError, OSError)) as folder_error:
        read_checkpoint(tmp_path)
    assert str(tmp_path) in str(folder_error.value)
    pickled = tmp_path / "list.pth"
    pickled.write_bytes(pickle.dumps([1, 2, 3], protocol=2))
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        read_checkpoint(pickled)
    mert_keys = {"feature_extractor.conv_layers.0.conv.weight": 0, "encoder.layers.0.attention.k_proj.weight": 0}
    assert checkpoint_family(mert_keys) == "MERT"
    assert "is a MERT checkpoint; expected a CLaMP 2 checkpoint" in family_mismatch(mert_keys, "CLaMP 2", "w.pth")
    message = family_mismatch({"model": {"foo.weight": 0, "bar.bias": 0}}, "CLaMP 2", "w.pth")
    assert message.startswith("w.pth is not a CLaMP 2 checkpoint (its keys start 'foo.weight', 'bar.bias'); expected")
    assert "(it holds no weights)" in family_mismatch({}, "M3", "w.pth")


# -- clamp2/training: flags, JSONL forms, eval folders, M3 initialisation ---------------------------------

def test_no_resume_flag_sets_load_ckpt_off():
    """loop.py (docs/training.md: --no_resume = M3_LOAD_CKPT=0 / CLAMP2_LOAD_CKPT=0)."""
    import argparse

    from clamp2.training.arguments import add_training_arguments
    from clamp2.training.loop import flag_overrides

    parser = argparse.ArgumentParser()
    add_training_arguments(parser, "M3_")
    assert flag_overrides(parser.parse_args(["--no_resume"]), "M3_")["M3_LOAD_CKPT"] is False
    assert "CLAMP2_LOAD_CKPT" not in flag_overrides(parser.parse_args([]), "CLAMP2_")


def test_jsonl_blank_lines_are_skipped_and_a_single_filepath_string_is_taken(tmp_path):
    """data.py: blank JSONL lines are skipped, a single filepaths string is taken, bad lines are named."""
    import json

    from clamp2.training.data import DataError, read_pairs

    abc = sorted((VECTORS / "extract_in" / "abc").glob("*.abc"))[0]
    (tmp_path / "a.abc").write_bytes(abc.read_bytes())
    lines = [json.dumps({"filepaths": ["a.abc"], "summary_en": "a chorale"}), "",
             json.dumps({"filepaths": "a.abc", "summary_en": "the same chorale"}), "   ", ""]
    jsonl = tmp_path / "train.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    items = read_pairs(jsonl, require_non_english=False)
    assert [item.line_number for item in items] == [1, 3]
    assert items[0].music_paths == items[1].music_paths == [tmp_path / "a.abc"]
    for bad, says in (("[1, 2]", ":1: not a JSON object"), ('{"summary_en": "x"}', ":1: no 'filepaths'"),
                      ('{"filepaths": [], "summary_en": "x"}', ":1: no 'filepaths'")):
        jsonl.write_text(bad + "\n")
        with pytest.raises(DataError, match=says):
            read_pairs(jsonl, require_non_english=False)
    jsonl.write_text("\n\n")
    with pytest.raises(DataError, match="holds no items"):
        read_pairs(jsonl, require_non_english=False)


def _tiny_config(monkeypatch):
    from clamp2.configuration import load_config

    for key, value in {"PATCH_LENGTH": "32", "PATCH_NUM_LAYERS": "1", "TOKEN_NUM_LAYERS": "1",
                       "M3_HIDDEN_SIZE": "64"}.items():
        monkeypatch.setenv(key, value)
    return load_config(REPO_ROOT / "code" / "config.py", report=False)


def test_m3_eval_folders_empty_or_partly_absent_are_notes(tmp_path, monkeypatch):
    """tasks.py: eval folders without a piece (the split is used) and one absent beside one with pieces."""
    from clamp2.training.tasks import m3_task

    config = _tiny_config(monkeypatch)
    train = tmp_path / "train"
    train.mkdir()
    for path in sorted((VECTORS / "extract_in").rglob("*.abc")) + sorted((VECTORS / "extract_in").rglob("*.mtf")):
        for copy in range(3):
            (train / f"{copy}_{path.name}").write_bytes(path.read_bytes())
    empty = tmp_path / "empty_eval"
    empty.mkdir()
    task = m3_task(config, [str(train)], [str(empty)], global_batch=1)
    assert any(f"no .abc or .mtf files under the eval folders {empty}, so " in note for note in task.notes)
    held = tmp_path / "eval"
    held.mkdir()
    (held / "x.abc").write_bytes(sorted((VECTORS / "extract_in").rglob("*.abc"))[0].read_bytes())
    task = m3_task(config, [str(train)], [str(held), str(tmp_path / "absent")], global_batch=1)
    assert task.notes == [f"eval folder {tmp_path / 'absent'} not found: evaluating on the others"]
    assert len(task.eval_set) == 1


def test_clamp3_load_m3_without_a_file_is_a_note_and_random_weights(tmp_path):
    """tasks.py: CLaMP 3 with a missing M3 file is a note, and the symbolic encoder starts from random weights."""
    from clamp2.models.clamp3 import AudioDims
    from clamp2.models.m3 import M3Dims
    from clamp2.training.tasks import build_clamp3_model

    notes = []
    build_clamp3_model(str(VECTORS / "tiny_text_model"), M3Dims(64, 32, 1, 1, 64), AudioDims(64, 2, 4), 48, (),
                       [str(tmp_path / "absent_m3.pth")], log=notes.append)
    assert notes == [f"note: CLAMP3_LOAD_M3 is set but no M3 file exists ({tmp_path / 'absent_m3.pth'}): the "
                     "symbolic encoder starts from random weights"]


# -- clamp2/probe: a finished run re-run; features read from disk ----------------------------------------

PROBE_FAST = ["--hidden_size", "16", "--learning_rate", "3e-3", "--batch_size", "8", "--no_progress"]


@pytest.fixture
def probe_data(tmp_path):
    from probe_features import class_means, write_features

    means = class_means(["folk", "jazz", "rock"], dim=8, separation=0.35, seed=3)
    write_features(tmp_path / "train", means, 20, seed=1)
    return tmp_path


def test_a_finished_probe_run_re_run_trains_nothing(probe_data, tmp_path, capsys):
    """commands.py: a finished probe run, re-run, has no epoch left to train."""
    from clamp2.checkpoint import latest_path, read_checkpoint

    script = load_script("music_classification/train_cls.py")
    args = ["--train_folders", probe_data / "train", "--weights", tmp_path / "w.pth", "--epochs", "2", *PROBE_FAST]
    assert _run(script, args, capsys)[0] == 0
    before = read_checkpoint(latest_path(tmp_path / "w.pth"))
    code, out, err = _run(script, args, capsys)
    assert code == 0, err
    assert "nothing to train (2 epoch(s) already done)" in out + err
    after = read_checkpoint(latest_path(tmp_path / "w.pth"))
    assert after["history"] == before["history"]
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])


def test_probe_features_read_from_disk_train_the_same_probe(probe_data, tmp_path, capsys):
    """data.py: --cache_gb 0 (a data set larger than the budget) reads each file when needed."""
    from clamp2.checkpoint import read_checkpoint

    script = load_script("music_classification/train_cls.py")
    common = ["--train_folders", probe_data / "train", "--epochs", "2", *PROBE_FAST]
    assert _run(script, common + ["--weights", tmp_path / "mem.pth"], capsys)[0] == 0
    assert _run(script, common + ["--weights", tmp_path / "disk.pth", "--cache_gb", "0"], capsys)[0] == 0
    memory, disk = read_checkpoint(tmp_path / "mem.pth"), read_checkpoint(tmp_path / "disk.pth")
    assert all(torch.equal(memory["model"][k], disk["model"][k]) for k in memory["model"])
    assert {k: v for k, v in memory["history"].items() if k != "seconds"} == \
        {k: v for k, v in disk["history"].items() if k != "seconds"}
    inference = load_script("music_classification/inference_cls.py")
    outputs = []
    for budget in ("4", "0"):
        out_file = tmp_path / f"pred_{budget}.jsonl"
        code, _, err = _run(inference, [probe_data / "train", out_file, "--weights", tmp_path / "mem.pth",
                                        "--cache_gb", budget, "--no_progress"], capsys)
        assert code == 0, err
        outputs.append(out_file.read_text())
    assert outputs[0] == outputs[1]


# -- clamp2/search/clamp3.py: the default CLaMP 3 weights ----------------------------------------------

def test_clamp3_default_weights_are_config_file_when_it_exists(tmp_path, monkeypatch):
    """search/clamp3.py: no --weights: config.py's CLAMP3_WEIGHTS_PATH when that file exists here."""
    import shutil

    from clamp2.search.clamp3 import clamp3_from_args

    monkeypatch.chdir(tmp_path)
    cfg = Namespace(CLAMP3_WEIGHTS_PATH="weights_clamp3_saas_local.pth", CLAMP3_VARIANT="saas",
                    TEXT_MODEL_NAME=str(VECTORS / "tiny_text_model"), MAX_TEXT_LENGTH=128,
                    CLAMP3_HIDDEN_SIZE=768)
    shutil.copy(VECTORS3 / "tiny_clamp3.pth", tmp_path / cfg.CLAMP3_WEIGHTS_PATH)
    args = Namespace(weights=None, variant=None, text_model=None, mert=None, dtype="fp32", device="cpu",
                     batch_size=4, num_workers=0, cache=None, no_cache=True)
    model = clamp3_from_args(args, cfg)
    assert model.weights_path.name == cfg.CLAMP3_WEIGHTS_PATH and model.variant == "saas"
    assert model.encode_text(["a chorale"]).shape == (1, model.dim)


# -- clamp2/cache.py: python -m clamp2.cache ---------------------------------------------------------------

def test_python_m_clamp2_cache_runs_main(tmp_path):
    """cache.py (README: `python -m clamp2.cache info|clear`); 114-115: an unreadable settings.json."""
    from clamp2 import M3

    M3.from_pretrained(VECTORS / "tiny_m3.pth", cache=tmp_path / "cache").encode(
        sorted((VECTORS / "extract_in").rglob("*.abc")))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    info = subprocess.run([sys.executable, "-m", "clamp2.cache", "info", "--cache", str(tmp_path / "cache")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert info.returncode == 0, info.stderr
    assert "2 features" in info.stdout and "m3 tiny_m3.pth  per-position fp32  2 features" in info.stdout
    for settings in (tmp_path / "cache").rglob("settings.json"):
        settings.write_text("{not json")
    info = subprocess.run([sys.executable, "-m", "clamp2.cache", "info", "--cache", str(tmp_path / "cache")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert info.returncode == 0 and "? ?  per-position ?  2 features" in info.stdout, info.stdout + info.stderr
    cleared = subprocess.run([sys.executable, "-m", "clamp2.cache", "clear", "--cache", str(tmp_path / "cache")],
                             capture_output=True, text=True, env=env, timeout=120)
    assert cleared.returncode == 0 and "removed 2 cached features" in cleared.stdout


def test_probe_resume_refuses_another_probe_size_or_other_files(probe_data, tmp_path, capsys):
    """probe/train.py: a re-run with another --hidden_size, or with a file added, says why it cannot resume."""
    from probe_features import class_means, write_features

    script = load_script("music_classification/train_cls.py")
    args = ["--train_folders", probe_data / "train", "--weights", tmp_path / "p.pth", "--epochs", "1", *PROBE_FAST]
    assert _run(script, args, capsys)[0] == 0
    code, _, err = _run(script, args + ["--hidden_size", "8"], capsys)
    assert code == 2 and "is CLaMP 2's probe of hidden size 16, this run trains CLaMP 2's probe of hidden size 8" in err
    assert "--no_resume" in err and "Traceback" not in err
    # with an eval folder (training files in path order, so the same class numbering), one more training file
    write_features(probe_data / "eval", class_means(["folk", "jazz", "rock"], 8, 0.35, seed=3), 4, seed=5, start=900)
    args += ["--eval_folders", probe_data / "eval", "--weights", tmp_path / "q.pth"]
    assert _run(script, args, capsys)[0] == 0
    write_features(probe_data / "train", class_means(["folk"], 8, 0.35, seed=3), 1, seed=9, start=500)
    code, _, err = _run(script, args, capsys)
    assert code == 2 and "--no_resume" in err
    assert "was trained and evaluated on other files (or another split)" in err


def test_probe_resume_message_for_renumbered_classes_shows_a_difference(probe_data, tmp_path, capsys):
    from probe_features import class_means, write_features

    script = load_script("music_classification/train_cls.py")
    args = ["--train_folders", probe_data / "train", "--weights", tmp_path / "p.pth", "--epochs", "1", *PROBE_FAST]
    assert _run(script, args, capsys)[0] == 0
    write_features(probe_data / "train", class_means(["folk"], 8, 0.35, seed=3), 1, seed=9, start=500)
    code, _, err = _run(script, args, capsys)
    # The same class names numbered otherwise: the message shows both numberings (it once printed two
    # equal lists of names).
    assert code == 2 and "numbers the classes {" in err, err
    saved, data = err.split("numbers the classes ")[1].split(";")[0].split(", the data ")
    assert saved != data


def test_confusion_matrix_of_many_classes_is_not_annotated(tmp_path, monkeypatch):
    """probe/report.py (more than MAX_ANNOTATED_CLASSES classes: no per-cell counts)."""
    from matplotlib.axes import Axes

    from clamp2.probe.report import MAX_ANNOTATED_CLASSES, plot_confusion_matrix

    written = []
    monkeypatch.setattr(Axes, "text", lambda self, *a, **k: written.append(a))
    for n in (3, MAX_ANNOTATED_CLASSES + 1):
        written.clear()
        matrix = np.eye(n, dtype=np.int64) * 2
        plot_confusion_matrix(matrix, [f"c{i}" for i in range(n)], tmp_path / f"cm{n}.png")
        assert (tmp_path / f"cm{n}.png").stat().st_size > 0
        assert len(written) == (n * n if n <= MAX_ANNOTATED_CLASSES else 0)


# -- clamp2/convert/summarize.py: Ctrl-C stops the paid requests; an answer without choices ---------------

class _FakeCompletions:
    """Answers without choices: the first at once, the others after 0.1 s (a request in flight)."""

    def __init__(self):
        self.calls = 0

    def create(self, **kwargs):
        import time

        self.calls += 1
        if self.calls > 1:
            time.sleep(0.1)
        return Namespace(choices=[])


def test_summaries_ctrl_c_cancels_the_queued_requests_and_no_choices_is_a_failure(tmp_path):
    """summarize.py (Ctrl-C in the main thread cancels the queued files) and (no choices)."""
    import json

    from clamp2.convert.summarize import RetryPolicy, read_metadata, summarize_folder

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(12):
        (folder / f"p{i:02d}.json").write_text(json.dumps({"title": f"piece {i}", "filepaths": [f"p{i}.abc"]}))
    completions = _FakeCompletions()
    client = Namespace(chat=Namespace(completions=completions))
    failures = []

    def echo(line):  # the user presses Ctrl-C while the first failure is being reported
        failures.append(line)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        summarize_folder(folder, tmp_path / "out", client, "gpt-x", workers=1, progress=False,
                         policy=RetryPolicy(max_retries=0), echo=echo)
    assert completions.calls <= 2, f"{completions.calls} requests: the queued ones were still sent after Ctrl-C"
    assert failures == ["failed: p00.json: response has no choices"]
    assert not list((tmp_path / "out").rglob("p*.json"))
    # read_metadata: a filepaths that is not a list, or none at all, is refused before any request (335->337)
    for metadata in ({"title": "x"}, {"title": "x", "filepaths": "p.abc"}, {"filepaths": []}):
        path = tmp_path / "bad.json"
        path.write_text(json.dumps(metadata))
        with pytest.raises(ValueError, match="input has no filepaths list of file names"):
            read_metadata(path)


def test_plural_counts_read_as_english():
    """Summaries read "1 common key" and "1 epoch" (the --tiny quick start trains single epochs)."""
    from clamp2.progress import plural
    assert plural(1, "common key") == "1 common key"
    assert plural(0, "epoch") == "0 epochs"
    assert plural(2, "process", "es") == "2 processes"
    assert plural(1, "process", "es") == "1 process"
