"""clamp2.api: raw files in, the scripts' features out; dims from the checkpoint; hub ids offline; failures named."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA_DIR, REPO_ROOT, VECTORS, load_script

TINY_ENV = {"PATCH_LENGTH": "32", "PATCH_NUM_LAYERS": "2", "TOKEN_NUM_LAYERS": "1", "M3_HIDDEN_SIZE": "64",
            "CLAMP2_HIDDEN_SIZE": "48", "MAX_TEXT_LENGTH": "16"}
CORPUS_SCORES = ("bach/bwv1.6.mxl", "mozart/k155/movement2.mxl", "joplin/maple_leaf_rag.mxl")


def corpus_path(relative):
    from music21 import corpus

    return [p for p in map(str, corpus.getPaths(fileExtensions=("mxl",))) if p.endswith(relative)][0]


@pytest.fixture(scope="module")
def tiny():
    from clamp2 import CLaMP2

    return CLaMP2.from_pretrained(VECTORS / "tiny_clamp2.pth", text_model=str(VECTORS / "tiny_text_model"),
                                  max_text_length=16, batch_size=4)


@pytest.fixture(scope="module")
def raw_folder(tmp_path_factory):
    """Real music in every supported raw form: corpus MusicXML, music21-rendered and hand-made MIDI,
    standard ABC (a folk tune without V:1, and one with), interleaved ABC and MTF."""
    from music21 import converter, corpus

    root = tmp_path_factory.mktemp("raw")
    for kind in ("xml", "midi", "abc", "interleaved", "mtf"):
        (root / kind).mkdir()
    for relative in CORPUS_SCORES:
        shutil.copy(corpus_path(relative), root / "xml" / relative.replace("/", "_"))
    for name in ("bwv10.7.mid", "handmade.mid"):
        shutil.copy(VECTORS / "inputs" / "midi" / name, root / "midi" / name)
    converter.parse(corpus_path("bach/bwv1.6.mxl")).write("midi", fp=str(root / "midi" / "bwv1.6_music21.midi"))
    shutil.copy(VECTORS / "inputs" / "abc" / "airds_tune3.abc", root / "abc" / "airds_tune3.abc")
    essen = corpus.getWork("altdeu10").read_text(encoding="latin-1")
    tune = essen[essen.index("X:"):].split("\n\n")[0] + "\n"
    (root / "abc" / "essen_first.abc").write_text(tune, encoding="utf-8")
    shutil.copy(VECTORS / "extract_in" / "abc" / "bwv10.7.abc", root / "interleaved" / "bwv10.7.abc")
    shutil.copy(VECTORS / "extract_in" / "mtf" / "handmade.mtf", root / "mtf" / "handmade.mtf")
    return root


@pytest.fixture(scope="module")
def script_features(raw_folder, tmp_path_factory):
    """The batch pipeline on ``raw_folder``: process_data converters, then code/extract_clamp2.py (tiny config)."""
    out = tmp_path_factory.mktemp("pipeline")
    xml2abc, interleave, midi2mtf = (load_script(f"process_data/{name}.py")
                                     for name in ("batch_xml2abc", "batch_interleaved_abc", "batch_midi2mtf"))
    assert xml2abc.main([str(raw_folder / "xml"), str(out / "xml_abc"), "--workers", "1"]) == 0
    assert interleave.main([str(out / "xml_abc"), str(out / "model_in" / "xml"), "--workers", "1"]) == 0
    assert interleave.main([str(raw_folder / "abc"), str(out / "model_in" / "abc"), "--workers", "1"]) == 0
    assert midi2mtf.main([str(raw_folder / "midi"), str(out / "model_in" / "midi"), "--workers", "1"]) == 0
    shutil.copytree(raw_folder / "interleaved", out / "model_in" / "interleaved")
    shutil.copytree(raw_folder / "mtf", out / "model_in" / "mtf")
    extract = load_script("code/extract_clamp2.py")
    features = {}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in TINY_ENV.items():
            mp.setenv(key, value)
        for normalize in (True, False):
            target = out / ("global" if normalize else "raw")
            args = [str(out / "model_in"), str(target), "--weights", str(VECTORS / "tiny_clamp2.pth"), "--text_model",
                    str(VECTORS / "tiny_text_model"), "--num_workers", "0", "--no_progress"]
            assert extract.main(args + (["--normalize"] if normalize else [])) == 0
            features[normalize] = {path.relative_to(raw_folder): np.load(target / path.relative_to(raw_folder).parent
                                                                         / (path.stem + ".npy"))[0]
                                   for path in raw_folder.rglob("*.*")}
    return features


def raw_files(raw_folder):
    return sorted(p for p in raw_folder.rglob("*.*"))


@pytest.mark.parametrize("normalize", [True, False])
def test_features_equal_the_batch_pipeline_scripts(tiny, raw_folder, script_features, normalize):
    files = raw_files(raw_folder)
    assert {p.suffix for p in files} == {".mxl", ".mid", ".midi", ".abc", ".mtf"}
    got = tiny.encode_music(files, normalize=normalize)
    assert len(got) == len(files) == 10
    for path, feature in zip(files, got):
        want = script_features[normalize][path.relative_to(raw_folder)]
        assert feature.dtype == np.float32 and feature.shape == want.shape, path
        np.testing.assert_allclose(feature, want, atol=1e-5, err_msg=str(path))
    if normalize:
        assert got.shape == (10, tiny.dim) == (10, 48)


def test_reference_vectors_from_raw_inputs_and_text(tiny):
    # The vectors' expected features come from the reference code on the same pieces.
    expected = VECTORS / "expected" / "feat_clamp2_global"
    got = tiny.encode_music([VECTORS / "inputs/xml/bwv10.7.mxl", VECTORS / "inputs/midi/handmade.mid",
                             VECTORS / "inputs/abc/airds_tune3.abc"])
    for feature, name in zip(got, ("abc/bwv10.7", "mtf/handmade", "abc/airds_tune3")):
        np.testing.assert_allclose(feature, np.load(expected / f"{name}.npy")[0], atol=1e-5, err_msg=name)
    texts = [(VECTORS / "inputs/txt" / f"{name}.txt").read_text(encoding="utf-8") for name in ("multi", "short")]
    got = tiny.encode_text(texts)
    for feature, name in zip(got, ("multi", "short")):
        np.testing.assert_allclose(feature, np.load(expected / f"txt/{name}.npy")[0], atol=1e-5)
    per_token = tiny.encode_text(texts[0], normalize=False)
    np.testing.assert_allclose(per_token[0], np.load(VECTORS / "expected/feat_clamp2_raw/txt/multi.npy")[0], atol=1e-5)


def test_batch_and_single_give_the_same_features(tiny, raw_folder):
    from clamp2 import CLaMP2

    # One of each kind; the Mozart quartet spans several windows (the longest scores are left out: time).
    names = ("mozart_k155_movement2.mxl", "bwv10.7.mid", "essen_first.abc", "bwv10.7.abc", "handmade.mtf")
    files = [p for p in raw_files(raw_folder) if p.name in names]
    assert len(files) == len(names)
    together = tiny.encode_music(files)
    single = CLaMP2.from_pretrained(VECTORS / "tiny_clamp2.pth", text_model=str(VECTORS / "tiny_text_model"),
                                    max_text_length=16, batch_size=1)
    for path, feature in zip(files, together):
        np.testing.assert_allclose(single.encode_music(path)[0], feature, atol=1e-5, err_msg=str(path))
    forward = tiny.encode_music(files, normalize=False)
    assert max(len(f) for f in forward) > 32  # several windows, the last overlapping
    for want, got in zip(forward, tiny.encode_music(files[::-1], normalize=False)[::-1]):
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_content_strings_and_bytes_equal_their_files(tiny, raw_folder, tmp_path):
    from clamp2.convert.abc import read_musicxml

    mxl = raw_folder / "xml" / "bach_bwv1.6.mxl"
    plain_xml = tmp_path / "bwv1.6.musicxml"
    plain_xml.write_bytes(read_musicxml(mxl))
    abc = raw_folder / "abc" / "essen_first.abc"
    interleaved = raw_folder / "interleaved" / "bwv10.7.abc"
    mtf = raw_folder / "mtf" / "handmade.mtf"
    midi = raw_folder / "midi" / "handmade.mid"
    files = [mxl, plain_xml, abc, interleaved, mtf, midi]
    contents = [mxl.read_bytes(), plain_xml.read_text(encoding="utf-8"), abc.read_text(encoding="utf-8"),
                interleaved.read_text(encoding="utf-8").replace("\n", "\r\n"), mtf.read_text(encoding="utf-8"),
                midi.read_bytes()]
    np.testing.assert_allclose(tiny.encode_music(contents), tiny.encode_music(files), atol=1e-5)
    # Text read with encoding="utf-8" keeps a byte-order mark; old Mac files end lines with "\r" alone.
    marked = ["\ufeff" + contents[1], "\ufeff" + contents[4], contents[4].replace("\n", "\r")]
    np.testing.assert_allclose(tiny.encode_music(marked), tiny.encode_music([plain_xml, mtf, mtf]), atol=1e-5)
    # A standard tune forced to be read as interleaved is not interleaved first: different features.
    forced = tiny.encode_music([abc], abc_format="interleaved")
    assert not np.allclose(forced, tiny.encode_music([abc]), atol=1e-3)


def test_inputs_that_cannot_be_converted_are_named_with_their_reason(tiny, raw_folder, tmp_path):
    from clamp2 import Encoded, EncodeError

    bad_midi = tmp_path / "broken.mid"
    bad_midi.write_bytes(b"not midi at all")
    empty = tmp_path / "empty.abc"
    empty.write_text("")
    bad_xml = tmp_path / "broken.xml"
    bad_xml.write_text("<score-partwise><part")
    (tmp_path / "notes.pdf").write_bytes(b"%PDF-1.4")
    good = raw_folder / "mtf" / "handmade.mtf"
    items = [bad_midi, good, empty, tmp_path / "missing.mid", bad_xml, tmp_path / "notes.pdf"]
    with pytest.raises(EncodeError) as info:
        tiny.encode_music(items)
    assert len(info.value.failures) == 5 and "broken.mid" in str(info.value)
    encoded = tiny.encode_music(items, errors="skip")
    assert isinstance(encoded, Encoded)
    assert encoded.items == [good] and encoded.indices == [1] and encoded.features.shape == (1, 48)
    np.testing.assert_allclose(encoded.features[0], tiny.encode_music(good)[0], atol=1e-6)
    reasons = dict((os.fspath(item), reason) for item, reason in encoded.failures)
    assert "MThd" in reasons[str(bad_midi)]
    assert "K:" in reasons[str(empty)] or "empty" in reasons[str(empty)]
    assert reasons[str(tmp_path / "missing.mid")].startswith("file not found")
    assert "xml2abc" in reasons[str(bad_xml)]
    assert "unsupported extension '.pdf'" in reasons[str(tmp_path / "notes.pdf")]
    with pytest.raises(EncodeError, match="no non-empty line"):
        tiny.encode_text(["a tune", "\n\n"])
    with pytest.raises(EncodeError, match="a text file"):
        tiny.encode_music(VECTORS / "inputs/txt/short.txt")
    with pytest.raises(ValueError, match="errors must be"):
        tiny.encode_music([good], errors="ignore")
    # encode_files raises by default; encode_folder lists failures by default and raises when asked.
    with pytest.raises(EncodeError, match="missing.mid: file not found"):
        tiny.encode_files([good, tmp_path / "missing.mid"], progress=False)
    assert tiny.encode_files([good, tmp_path / "missing.mid"], errors="skip", progress=False).failed_names
    folder = tmp_path / "folder"
    folder.mkdir()
    shutil.copy(good, folder)
    (folder / "empty.abc").write_text("")
    listed = tiny.encode_folder(folder, progress=False)
    assert listed.names == ["handmade.mtf"] and listed.failed_names == ["empty.abc"]
    with pytest.raises(EncodeError, match="empty.abc"):
        tiny.encode_folder(folder, errors="raise", progress=False)


def test_encode_folder_takes_music_and_text(tiny, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(VECTORS / "extract_in", folder)
    (folder / "abc" / ".hidden.abc").write_text("X:1\n")
    encoded = tiny.encode_folder(folder, progress=False)
    assert encoded.names == ["abc/airds_tune3.abc", "abc/bwv10.7.abc", "mtf/bwv10.7.mtf", "mtf/handmade.mtf",
                             "txt/bwv10.7.txt", "txt/multi.txt", "txt/short.txt"]
    assert encoded.keys[:2] == ["airds_tune3", "bwv10"]
    for name, feature in zip(encoded.names, encoded.features):
        want = np.load(VECTORS / "expected/feat_clamp2_global" / Path(name).with_suffix(".npy"))[0]
        np.testing.assert_allclose(feature, want, atol=1e-5, err_msg=name)
    assert len(tiny.encode_folder(folder, include_text=False, progress=False)) == 4


def test_similarity_is_cosine():
    from clamp2 import CLaMP2

    a = np.array([[1.0, 0.0], [3.0, 4.0]], dtype=np.float32)
    b = np.array([2.0, 0.0], dtype=np.float32)
    np.testing.assert_allclose(CLaMP2.similarity(a, b), [[1.0], [0.6]], atol=1e-7)
    assert CLaMP2.similarity(a, a).shape == (2, 2)


def test_m3_features_equal_the_reference_and_the_script(vectors, tmp_path):
    from clamp2 import M3
    from clamp2.checkpoint import CheckpointError

    m3 = M3.from_pretrained(vectors / "tiny_m3.pth")
    assert (m3.dim, m3.encoder.dims.patch_length, m3.encoder.dims.patch_num_layers,
            m3.encoder.dims.token_num_layers) == (64, 32, 2, 1)
    files = sorted((vectors / "extract_in").rglob("*.abc")) + sorted((vectors / "extract_in").rglob("*.mtf"))
    for path, feature in zip(files, m3.encode(files)):
        want = np.load(vectors / "expected/feat_m3" / path.parent.name / (path.stem + ".npy"))[0]
        np.testing.assert_allclose(feature, want, atol=1e-5, err_msg=str(path))
    # Raw MIDI goes through the converter first: the MTF's features.
    np.testing.assert_allclose(m3.encode(vectors / "inputs/midi/handmade.mid")[0],
                               np.load(vectors / "expected/feat_m3/mtf/handmade.npy")[0], atol=1e-5)
    with pytest.raises(CheckpointError, match="CLaMP2.from_pretrained"):
        M3.from_pretrained(vectors / "tiny_clamp2.pth")


def test_dims_and_text_settings_come_from_the_checkpoint(tiny_text_dir, tmp_path):
    import torch

    from clamp2 import CLaMP2
    from clamp2.checkpoint import CheckpointError, save_checkpoint
    from clamp2.models.clamp2 import CLaMP2Model
    from clamp2.models.m3 import M3Dims
    from clamp2.text_model import load_text_model

    dims = M3Dims(patch_size=16, patch_length=8, patch_num_layers=1, token_num_layers=1, hidden_size=64)
    torch.manual_seed(0)
    model = CLaMP2Model(load_text_model(str(tiny_text_dir)), dims, hidden_size=24)
    weights = tmp_path / "own.pth"
    save_checkpoint(weights, model, config={"TEXT_MODEL_NAME": str(tiny_text_dir), "MAX_TEXT_LENGTH": 12})
    loaded = CLaMP2.from_pretrained(weights)
    assert loaded.model.music_model.dims == M3Dims(16, 8, 1, 3, 64)
    assert (loaded.dim, loaded.max_text_length, loaded.text_model_name) == (24, 12, str(tiny_text_dir))
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name
    # 16-character patches: a long bar is cut, so the features differ from 64-character ones but exist.
    assert loaded.encode_music(VECTORS / "extract_in/abc/bwv10.7.abc").shape == (1, 24)
    with pytest.raises(CheckpointError, match="M3.from_pretrained"):
        CLaMP2.from_pretrained(VECTORS / "tiny_m3.pth", text_model=str(tiny_text_dir))
    with pytest.raises(ValueError, match="needs a CUDA device"):
        CLaMP2.from_pretrained(weights, device="cpu", dtype="bf16")


@pytest.mark.parametrize("family", ["CLaMP2", "CLaMP3", "M3"])
def test_a_precision_the_device_cannot_run_is_refused_before_any_download(tmp_path, monkeypatch, family):
    # bf16 on the CPU used to be refused only after the weights were resolved (for a hub id, a download of
    # gigabytes) and the model built; now before either. resolve_weights records, so nothing is fetched here.
    import clamp2
    import clamp2.hub

    fetched = []
    monkeypatch.setattr(clamp2.hub, "resolve_weights", lambda *a, **k: fetched.append(a) or tmp_path / "none.pth")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        getattr(clamp2, family).from_pretrained(tmp_path / "weights.pth", device="cpu", dtype="bf16")
    assert fetched == []


def fake_hub_cache(root, repo_id, files):
    """huggingface_hub's cache layout: models--org--name/{refs/main, snapshots/<commit>/<file>, blobs/}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = root / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for name, source in files.items():
        blob = repo / "blobs" / f"blob_{name}"
        shutil.copy(source, blob)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    return root


def test_hub_ids_resolve_from_the_hub_cache_offline(tmp_path, monkeypatch):
    from clamp2 import CLaMP2, M3
    from clamp2.hub import PUBLISHED_CLAMP2_WEIGHTS, PUBLISHED_M3_WEIGHTS, WeightsNotFound

    repo_id = "sander-wood/clamp2"  # resolved from the fake cache below: nothing is downloaded
    hub = fake_hub_cache(tmp_path / "hub", repo_id,
                         {PUBLISHED_CLAMP2_WEIGHTS: VECTORS / "tiny_clamp2.pth", "other.pth": VECTORS / "tiny_m3.pth"})
    model = CLaMP2.from_pretrained(repo_id, text_model=str(VECTORS / "tiny_text_model"),
                                   max_text_length=16, hub_cache_dir=hub, local_files_only=True)
    assert model.weights_path.name == PUBLISHED_CLAMP2_WEIGHTS and "snapshots" in model.weights_path.parts
    np.testing.assert_allclose(model.encode_music(VECTORS / "extract_in/mtf/handmade.mtf")[0],
                               np.load(VECTORS / "expected/feat_clamp2_global/mtf/handmade.npy")[0], atol=1e-5)
    assert M3.from_pretrained(repo_id, filename="other.pth", hub_cache_dir=hub,
                              local_files_only=True).dim == 64
    # HF_HUB_OFFLINE alone switches to the cache only, and a missing file is one line with the command.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFound) as info:
        M3.from_pretrained(repo_id, hub_cache_dir=hub)
    message = str(info.value)
    assert "\n" not in message and PUBLISHED_M3_WEIGHTS in message
    assert f"hf download sander-wood/clamp2 {PUBLISHED_M3_WEIGHTS}" in message
    # A name the hub does not hold gets the published names' commands, not a download that would fail.
    with pytest.raises(WeightsNotFound, match="weights_x.pth is not a published file of the Hugging Face repo "
                                              "sander-wood/clamp2") as info:
        CLaMP2.from_pretrained(tmp_path / "weights_x.pth")
    assert f"`hf download sander-wood/clamp2 {PUBLISHED_CLAMP2_WEIGHTS} --local-dir .`" in str(info.value)
    assert "hf download sander-wood/clamp2 weights_x.pth" not in str(info.value)
    # A folder holding the published file name (hf download --local-dir) works as well.
    local = tmp_path / "local"
    local.mkdir()
    shutil.copy(VECTORS / "tiny_m3.pth", local / PUBLISHED_M3_WEIGHTS)
    assert M3.from_pretrained(local).weights_path == local / PUBLISHED_M3_WEIGHTS
    # A folder without it names the file and the command that puts it there.
    with pytest.raises(WeightsNotFound) as info:
        CLaMP2.from_pretrained(local)
    assert str(info.value) == (f"no {PUBLISHED_CLAMP2_WEIGHTS} in folder {local}; download it with `hf download "
                               f"sander-wood/clamp2 {PUBLISHED_CLAMP2_WEIGHTS} --local-dir {local}` or pass the file itself")


def test_import_is_lazy():
    # `from clamp2 import CLaMP2` must not pay for torch/transformers (seconds) before a model is loaded.
    code = ("import sys; from clamp2 import CLaMP2, M3, FeatureCache; "
            "heavy = [m for m in ('torch', 'transformers', 'music21', 'mido', 'abctoolkit', 'sklearn') if m in sys.modules]; "
            "print(','.join(heavy) or 'none')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=True)
    assert out.stdout.strip() == "none"
    import clamp2

    with pytest.raises(AttributeError):
        clamp2.NoSuchThing  # noqa: B018


def test_readme_example_runs(tmp_path, monkeypatch, capsys):
    import re

    block = re.search(r"## Use from Python.*?```python\n(.*?)```", (REPO_ROOT / "README.md").read_text(), re.S)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.chdir(REPO_ROOT)
    exec(compile(block.group(1), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "xml/bwv10.7.mxl" in out and "(7, 48) []" in out
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 7


def test_a_missing_published_file_gets_its_download_command():
    from clamp2.checkpoint import missing_weights_message
    from clamp2.hub import PUBLISHED_CLAMP2_WEIGHTS, PUBLISHED_M3_WEIGHTS

    for name in (PUBLISHED_CLAMP2_WEIGHTS, PUBLISHED_M3_WEIGHTS):
        message = missing_weights_message(f"weights/{name}")
        assert f"`hf download sander-wood/clamp2 {name} --local-dir .`" in message
        assert "not a published file" not in message and message.count("hf download") == 1
    other = missing_weights_message("weights/weights_clamp2_h_size_768_t_length_16.pth")
    assert "weights_clamp2_h_size_768_t_length_16.pth is not a published file" in other
    assert other.count("hf download") == 2 and "hf download sander-wood/clamp2 weights_clamp2_h_size_768_t_length" not in other


# -- edge cases from a code-driven mutation audit of the API ----------------------------------------------

# one path given as a str is one input, not a list of its characters.
def test_one_str_path_is_one_input(tiny):
    path = VECTORS / "inputs" / "abc" / "airds_tune3.abc"
    one = tiny.encode_music(str(path))
    assert one.shape == (1, tiny.dim)
    np.testing.assert_array_equal(one, tiny.encode_music([path]))
    encoded = tiny.encode_files(str(path), errors="skip", progress=False)
    assert encoded.items == [str(path)] and not encoded.failures


# when no input could be encoded, the features are [0, dim], not [0, 0] (stackable with other results).
def test_nothing_encoded_is_zero_rows_of_the_model_width(tiny, tmp_path):
    encoded = tiny.encode_music([tmp_path / "missing.mid"], errors="skip")
    assert encoded.features.shape == (0, tiny.dim) and len(encoded.failures) == 1
    encoded = tiny.encode_files([tmp_path / "missing.txt"], errors="skip", progress=False)
    assert encoded.features.shape == (0, tiny.dim)


# CLaMP 2's encode_folder leaves audio files out (CLaMP 2 takes none); they are not failures.
def test_clamp2_encode_folder_leaves_audio_out(tiny, tmp_path):
    shutil.copy(VECTORS / "inputs" / "abc" / "airds_tune3.abc", tmp_path / "a.abc")
    shutil.copy(DATA_DIR / "vectors_clamp3" / "inputs" / "audio" / "bwv26.6_44k1_stereo_s16.wav", tmp_path / "b.wav")
    encoded = tiny.encode_folder(tmp_path, progress=False, errors="raise")
    assert encoded.names == ["a.abc"] and not encoded.failures


# a checkpoint's saved MAX_TEXT_LENGTH is capped at what the text model takes (XLM-R: positions - pad - 1).
def test_saved_max_text_length_is_capped_at_the_text_model(tmp_path):
    import torch

    from clamp2 import CLaMP2
    from clamp2.checkpoint import save_checkpoint
    from clamp2.models.clamp2 import CLaMP2Model
    from clamp2.models.m3 import M3Dims
    from clamp2.text_model import load_text_model

    text_dir = str(VECTORS / "tiny_text_model")
    torch.manual_seed(0)
    model = CLaMP2Model(load_text_model(text_dir), M3Dims(16, 8, 1, 1, 64), hidden_size=24)
    save_checkpoint(tmp_path / "own.pth", model, config={"TEXT_MODEL_NAME": text_dir, "MAX_TEXT_LENGTH": 128})
    loaded = CLaMP2.from_pretrained(tmp_path / "own.pth")
    assert loaded.max_text_length == 20 - 1 - 1
    assert loaded.encode_text(" ".join(["a long text"] * 100)).shape == (1, 24)


# an explicit max_text_length equal to what the text model takes is allowed; one more is refused.
def test_explicit_max_text_length_up_to_the_text_model_limit():
    from clamp2 import CLaMP2

    text_dir = str(VECTORS / "tiny_text_model")
    model = CLaMP2.from_pretrained(VECTORS / "tiny_clamp2.pth", text_model=text_dir, max_text_length=18)
    assert model.max_text_length == 18
    with pytest.raises(ValueError, match="MAX_TEXT_LENGTH=19 is more than"):
        CLaMP2.from_pretrained(VECTORS / "tiny_clamp2.pth", text_model=text_dir, max_text_length=19)


# M3.from_pretrained names the family of a file that is not M3, as CLaMP2/CLaMP3.from_pretrained do
# (before: "is not a M3 checkpoint (no entry 'encoder.patch_embedding.weight')" for a CLaMP 3 file).
def test_m3_from_pretrained_names_the_family_of_another_checkpoint():
    from clamp2 import M3
    from clamp2.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=r"tiny_clamp3.pth is a CLaMP 3 checkpoint; expected an M3 checkpoint "
                                              r".*CLaMP 3 checkpoints load with clamp2.CLaMP3.from_pretrained"):
        M3.from_pretrained(DATA_DIR / "vectors_clamp3" / "tiny_clamp3.pth", device="cpu")
    with pytest.raises(CheckpointError, match=r"tiny_clamp2.pth is a CLaMP 2 checkpoint; expected an M3 checkpoint"):
        M3.from_pretrained(VECTORS / "tiny_clamp2.pth", device="cpu")


# a published file asked of the other published repo names the repo that publishes it, not a download
# command that would fail (`hf download sander-wood/clamp2 weights_clamp3_saas_...`).
def test_a_published_file_asked_of_the_other_repo_names_its_repo(tmp_path):
    from clamp2 import CLaMP2, CLaMP3
    from clamp2.hub import WeightsNotFound

    hub = fake_hub_cache(tmp_path / "hub", "sander-wood/clamp2", {"other.pth": VECTORS / "tiny_m3.pth"})
    with pytest.raises(WeightsNotFound, match=r"weights_clamp3_saas_.*is published in the Hugging Face repo "
                       r"sander-wood/clamp3, not in sander-wood/clamp2: pass the hub id sander-wood/clamp3"):
        CLaMP3.from_pretrained("sander-wood/clamp2", hub_cache_dir=hub, local_files_only=True)
    with pytest.raises(WeightsNotFound,
                       match=r"weights_clamp2_.*is published in the Hugging Face repo sander-wood/clamp2"):
        CLaMP2.from_pretrained("sander-wood/clamp3", hub_cache_dir=hub, local_files_only=True)
