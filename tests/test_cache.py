"""clamp2.cache: a changed file is re-encoded, an unchanged one never; keys follow weights and settings."""

import json
import multiprocessing
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import VECTORS


@pytest.fixture
def music(tmp_path):
    folder = tmp_path / "music"
    folder.mkdir()
    for source in ("extract_in/abc/bwv10.7.abc", "extract_in/mtf/handmade.mtf", "inputs/midi/handmade.mid",
                   "inputs/abc/airds_tune3.abc"):
        shutil.copy(VECTORS / source, folder / (source.split("/")[1] + "_" + source.rsplit("/", 1)[1]))
    return folder


def tiny_model(cache, weights=VECTORS / "tiny_clamp2.pth", max_text_length=16):
    from clamp2 import CLaMP2

    return CLaMP2.from_pretrained(weights, text_model=str(VECTORS / "tiny_text_model"),
                                  max_text_length=max_text_length, cache=cache)


class CountingForward:
    """Counts the music windows that reach the model (the rows of every music encoder call)."""

    def __init__(self, model):
        self.windows = 0
        original = model.model.music_states  # music_global goes through it too

        def counted(ids, masks):
            self.windows += len(ids)
            return original(ids, masks)
        model.model.music_states = counted


def windows_of(model, path):
    from clamp2.extraction.core import window_starts
    from clamp2.extraction.model_inputs import resolve

    ids = model._runners(False)["music"].encode(resolve(path))
    return len(window_starts(len(ids), model.model.music_model.dims.patch_length))


def test_only_the_changed_file_is_encoded_again(music, tmp_path):
    model = tiny_model(tmp_path / "cache")
    counter = CountingForward(model)
    first = model.encode_folder(music, progress=False)
    assert (first.computed, first.cached, len(first.failures)) == (4, 0, 0)
    assert counter.windows == sum(windows_of(model, p) for p in first.items) > 4

    counter.windows = 0
    again = model.encode_folder(music, progress=False)
    assert (again.computed, again.cached, counter.windows) == (0, 4, 0)
    np.testing.assert_array_equal(again.features, first.features)

    changed = music / "midi_handmade.mid"
    changed.write_bytes((VECTORS / "inputs/midi/bwv10.7.mid").read_bytes())  # same name, new content
    third = model.encode_folder(music, progress=False)
    assert (third.computed, third.cached) == (1, 3)
    assert counter.windows == windows_of(model, changed)
    row = third.names.index("midi_handmade.mid")
    np.testing.assert_allclose(third.features[row],
                               np.load(VECTORS / "expected/feat_clamp2_global/mtf/bwv10.7.npy")[0], atol=1e-5)
    others = [i for i in range(4) if i != row]
    np.testing.assert_array_equal(third.features[others], first.features[others])
    # Renaming or copying a file is not a change of content: still cached.
    shutil.copy(changed, music / "copy.mid")
    fourth = model.encode_folder(music, progress=False)
    assert (fourth.computed, fourth.cached) == (0, 5)


def test_settings_and_weights_have_their_own_entries(music, tmp_path):
    import torch

    from clamp2.cache import FeatureCache

    cache = FeatureCache(tmp_path / "cache")
    model = tiny_model(cache)
    assert model.encode_folder(music, progress=False).computed == 4
    per_position = model.encode_folder(music, normalize=False, progress=False)
    assert per_position.computed == 4 and per_position.features[0].ndim == 2
    assert model.encode_folder(music, normalize=False, progress=False).cached == 4
    # The same weights under another name are the same weights; changed weights are not.
    renamed = tmp_path / "renamed.pth"
    shutil.copy(VECTORS / "tiny_clamp2.pth", renamed)
    assert tiny_model(cache, weights=renamed).encode_folder(music, progress=False).cached == 4
    checkpoint = torch.load(renamed, weights_only=True)
    checkpoint["model"]["music_proj.bias"] += 1.0
    torch.save(checkpoint, renamed)
    assert tiny_model(cache, weights=renamed).encode_folder(music, progress=False).computed == 4
    # A different text window changes text features: another namespace, even for the music.
    assert tiny_model(cache, max_text_length=8).encode_folder(music, progress=False).computed == 4
    groups = cache.info()
    assert len(groups) == 4 and sum(g["entries"] for g in groups) == 16


def test_the_code_that_makes_features_has_its_own_entries(music, tmp_path, monkeypatch):
    # A new version of the converters (e.g. the ABC repairs) or of the models must not be served features
    # the old one cached.
    from clamp2 import cache as cache_module

    package = tmp_path / "package"
    for pattern in cache_module.FEATURE_CODE:
        for source in Path(cache_module.__file__).parent.glob(pattern):
            target = package / source.relative_to(Path(cache_module.__file__).parent)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(source, target)
    assert cache_module.source_fingerprint(package, cache_module.FEATURE_CODE) == cache_module.code_fingerprint()
    (package / "convert" / "abc_repair.py").write_text("# a repair changed\n", encoding="utf-8")
    changed = cache_module.source_fingerprint(package, cache_module.FEATURE_CODE)
    assert changed != cache_module.code_fingerprint()
    model = tiny_model(tmp_path / "cache")
    assert model._cache_namespace(False).settings["code_sha256"] == cache_module.code_fingerprint()
    assert model.encode_folder(music, progress=False).computed == 4
    monkeypatch.setattr(cache_module, "code_fingerprint", lambda: changed)
    assert tiny_model(tmp_path / "cache").encode_folder(music, progress=False).computed == 4


def test_each_precision_has_its_own_entries(tmp_path):
    # bf16 features differ from fp32 ones (~1e-2 relative): a cache a bf16 run filled on a GPU must never
    # serve an fp32 run. bf16 runs only on CUDA, so the precision is set as from_pretrained(dtype=) sets it.
    from clamp2.cache import FeatureCache

    cache = FeatureCache(tmp_path / "cache")
    fp32, bf16 = tiny_model(cache), tiny_model(cache)
    bf16.dtype = "bf16"
    folders = {model.dtype: model._cache_namespace(False).folder for model in (fp32, bf16)}
    assert folders["fp32"] != folders["bf16"]
    assert bf16._cache_namespace(False).settings["dtype"] == "bf16"


def test_an_unreadable_entry_is_encoded_again(music, tmp_path):
    model = tiny_model(tmp_path / "cache")
    first = model.encode_folder(music, progress=False)
    entries = sorted((tmp_path / "cache" / "features").rglob("*.npy"))
    assert len(entries) == 4 and not list((tmp_path / "cache").rglob("*.partial"))
    entries[0].write_bytes(b"\x93NUMPY truncated")
    again = model.encode_folder(music, progress=False)
    assert (again.computed, again.cached) == (1, 3)
    np.testing.assert_allclose(again.features, first.features, atol=1e-6)


def test_the_text_api_does_not_fill_the_cache(tmp_path):
    model = tiny_model(tmp_path / "cache")
    model.encode_text(["a folk tune"])
    assert not (tmp_path / "cache" / "features").exists()


def test_weights_are_hashed_once(tmp_path, monkeypatch):
    from clamp2 import cache

    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x" * 1000)
    calls = []
    real = cache.sha256_of_file
    monkeypatch.setattr(cache, "sha256_of_file", lambda path: calls.append(path) or real(path))
    first = cache.weights_fingerprint(weights, tmp_path / "cache")
    cache._weights_hashes.clear()  # as in a new process: the memo on disk answers
    assert cache.weights_fingerprint(weights, tmp_path / "cache") == first and len(calls) == 1
    weights.write_bytes(b"y" * 1000)
    assert cache.weights_fingerprint(weights, tmp_path / "cache") != first and len(calls) == 2


def _fill(args):
    from clamp2.cache import FeatureCache

    root, worker = args
    namespace = FeatureCache(root).namespace({"model": "test"})
    for key in range(40):
        namespace.put(f"{key:064x}", np.full((1, 256), key, dtype=np.float32))
    return worker


def test_several_processes_fill_one_cache(tmp_path):
    from clamp2.cache import FeatureCache

    with multiprocessing.get_context("fork").Pool(4) as pool:
        assert sorted(pool.map(_fill, [(tmp_path, w) for w in range(8)])) == list(range(8))
    namespace = FeatureCache(tmp_path).namespace({"model": "test"})
    for key in range(40):
        np.testing.assert_array_equal(namespace.get(f"{key:064x}"), np.full((1, 256), key, dtype=np.float32))
    assert not list(tmp_path.rglob("*.partial"))


def test_default_folder_and_command_line(tmp_path, monkeypatch, capsys, music):
    from clamp2 import cache

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.default_cache_dir() == tmp_path / "xdg" / "clamp2"
    model = tiny_model(True)
    assert model.cache.root == tmp_path / "xdg" / "clamp2"
    model.encode_folder(music, progress=False)
    assert cache.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path / 'xdg' / 'clamp2'}: 4 features" in out and "clamp2 tiny_clamp2.pth  global fp32" in out
    assert cache.main(["clear"]) == 0
    assert "removed 4 cached features" in capsys.readouterr().out
    assert cache.main(["info", "--cache", str(tmp_path / "xdg" / "clamp2")]) == 0
    assert ": 0 features" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        cache.main(["purge"])
    assert info.value.code == 2


def test_an_abc_entry_is_keyed_on_the_format_it_is_read_as(music, tmp_path):
    # The feature of an .abc file depends on whether it is read as interleaved or standard, not on how that
    # was decided: auto-detected and forced readings share entries, and a file the auto rule reads
    # differently is never served the other reading's feature.
    from clamp2.extraction.model_inputs import ABC, ABC_AUTO, INTERLEAVED, RawInput, effective_kind

    standard, interleaved = music / "abc_airds_tune3.abc", music / "abc_bwv10.7.abc"
    assert effective_kind(RawInput(ABC_AUTO, path=standard)) == ABC
    assert effective_kind(RawInput(ABC_AUTO, path=interleaved)) == INTERLEAVED
    model = tiny_model(tmp_path / "cache")
    first = model.encode_files([standard, interleaved], progress=False)
    assert (first.computed, first.cached) == (2, 0)
    forced = [model.encode_files([standard], progress=False, abc_format="standard"),
              model.encode_files([interleaved], progress=False, abc_format="interleaved")]
    assert [(run.computed, run.cached) for run in forced] == [(0, 1), (0, 1)]
    np.testing.assert_array_equal(np.concatenate([run.features for run in forced]), first.features)
    misread = model.encode_files([standard], progress=False, abc_format="interleaved")
    assert (misread.computed, misread.cached) == (1, 0)


def _other_weights_same_size(source, target):
    """``source`` with music_proj.bias + 1 written in place of its bytes (torch's zip stores tensors as
    they are): other weights of exactly the same size."""
    import torch

    data = bytearray(Path(source).read_bytes())
    bias = torch.load(source, weights_only=True)["model"]["music_proj.bias"].numpy()
    at = data.find(bias.tobytes())
    assert at > 0 and data.find(bias.tobytes(), at + 1) < 0
    data[at:at + bias.nbytes] = (bias + 1).astype(bias.dtype).tobytes()
    Path(target).write_bytes(bytes(data))


def test_other_weights_with_the_same_size_and_mtime_have_their_own_entries(music, tmp_path):
    # Weights copied over the file with the same size and modification time (cp -p, rsync -t, os.utime)
    # were given the old weights' memoized hash, in the process and on disk: the old features were served.
    import os

    from clamp2 import cache as cache_module

    weights = tmp_path / "w.pth"
    shutil.copy(VECTORS / "tiny_clamp2.pth", weights)
    first = tiny_model(tmp_path / "cache", weights=weights).encode_folder(music, progress=False)
    before = os.stat(weights)
    _other_weights_same_size(VECTORS / "tiny_clamp2.pth", weights)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(weights).st_size == before.st_size
    fresh = tiny_model(None, weights=weights).encode_folder(music, progress=False)
    assert not np.array_equal(fresh.features, first.features)
    again = tiny_model(tmp_path / "cache", weights=weights).encode_folder(music, progress=False)
    assert again.computed == 4
    np.testing.assert_array_equal(again.features, fresh.features)
    cache_module._weights_hashes.clear()  # a new process: the memo on disk answers
    _other_weights_same_size(weights, weights)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    third = tiny_model(tmp_path / "cache", weights=weights).encode_folder(music, progress=False)
    assert third.computed == 4
    fresh = tiny_model(None, weights=weights).encode_folder(music, progress=False)
    np.testing.assert_array_equal(third.features, fresh.features)


def test_weights_replaced_after_loading_do_not_name_the_features_of_the_loaded_ones(music, tmp_path):
    # The hash was taken at the first encode: weights saved over the file after loading (a training run)
    # named the namespace of features the old model computed, served to every later run of the new weights.
    weights = tmp_path / "w.pth"
    shutil.copy(VECTORS / "tiny_clamp2.pth", weights)
    loaded = tiny_model(tmp_path / "cache", weights=weights)
    _other_weights_same_size(VECTORS / "tiny_clamp2.pth", tmp_path / "next.pth")
    (tmp_path / "next.pth").replace(weights)
    loaded.encode_folder(music, progress=False)
    later = tiny_model(tmp_path / "cache", weights=weights).encode_folder(music, progress=False)
    assert later.computed == 4
    np.testing.assert_array_equal(later.features,
                                  tiny_model(None, weights=weights).encode_folder(music, progress=False).features)


def test_a_damaged_entry_is_encoded_again_never_served(music, tmp_path):
    # An entry whose data bytes were damaged (one flipped byte: a value of 2e36), or a readable .npy of
    # another shape (encode_folder raised "all input arrays must have the same shape"), is not served:
    # each entry ends with the sha256 of its bytes.
    model = tiny_model(tmp_path / "cache")
    first = model.encode_folder(music, progress=False)
    entries = sorted((tmp_path / "cache" / "features").rglob("*/*.npy"))
    assert len(entries) == 4
    data = bytearray(entries[0].read_bytes())
    data[-40] ^= 0x40  # in the feature's values
    entries[0].write_bytes(bytes(data))
    np.save(entries[1], np.zeros((1, 5), np.float32))
    again = model.encode_folder(music, progress=False)
    assert (again.computed, again.cached) == (2, 2)
    np.testing.assert_allclose(again.features, first.features, atol=1e-6)
    assert (model.encode_folder(music, progress=False).cached, len(entries)) == (4, 4)


def test_info_marks_the_groups_an_older_version_wrote(tmp_path, capsys):
    from clamp2.cache import FeatureCache, code_fingerprint, main

    cache = FeatureCache(tmp_path)
    settings = {"model": "clamp2", "per_position": False, "dtype": "fp32"}
    cache.namespace({**settings, "code_sha256": code_fingerprint()}).put("a" * 64, np.zeros((1, 4), np.float32))
    cache.namespace({**settings, "code_sha256": "0" * 64}).put("a" * 64, np.zeros((1, 4), np.float32))
    old = tmp_path / "features" / "oldformat"  # format 1 (no code_sha256, no digest after the bytes)
    (old / "aa").mkdir(parents=True)
    (old / "settings.json").write_text(json.dumps({"settings": {**settings, "feature_format": 1}, "about": {}}))
    np.save(old / "aa" / ("a" * 64 + ".npy"), np.zeros((1, 4), np.float32))
    assert main(["info", "--cache", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert len(lines) == 3 and sum("another version's" in line for line in lines) == 2
    assert "another version's" in next(line for line in lines if "oldformat" in line)
