"""clamp2.api on odd inputs and options: NumPy strings, object arrays, nonsense sizes and precisions, CUDA asked
for where there is none, special files in a folder, a cache set after the weights changed, a moved cache entry."""

import os
import shutil

import numpy as np
import pytest

from conftest import VECTORS

VECTORS3 = VECTORS.parent / "vectors_clamp3"
TEXT_MODEL = str(VECTORS / "tiny_text_model")
ABC = VECTORS / "extract_in" / "abc" / "bwv10.7.abc"


@pytest.fixture(scope="module")
def tiny():
    from clamp2 import CLaMP2

    return CLaMP2.from_pretrained(VECTORS / "tiny_clamp2.pth", text_model=TEXT_MODEL, max_text_length=16, batch_size=4)


def test_numpy_strings_are_paths(tiny):
    # np.array(paths) (or a pandas column's .values) holds np.str_, which has a .shape: it was taken for an
    # array of MERT features ("audio needs CLaMP 3" here, "not a numeric array" for CLaMP 3).
    from clamp2 import M3

    want = tiny.encode_music([str(ABC)])
    np.testing.assert_array_equal(tiny.encode_music(np.array([str(ABC)])), want)
    np.testing.assert_array_equal(tiny.encode_music([np.str_(str(ABC))]), want)
    m3 = M3.from_pretrained(VECTORS / "tiny_m3.pth")
    np.testing.assert_array_equal(m3.encode(np.array([str(ABC)]))[0], m3.encode([ABC])[0])


def test_numpy_strings_are_paths_for_clamp3_too():
    from clamp2 import CLaMP3

    clamp3 = CLaMP3.from_pretrained(VECTORS3 / "tiny_clamp3.pth", text_model=TEXT_MODEL, max_text_length=16)
    abc = VECTORS3 / "extract_in" / "abc" / "bwv26.6.abc"
    mert = VECTORS3 / "extract_in" / "audio" / "bwv26.6_16k_stereo_s16.npy"
    np.testing.assert_array_equal(clamp3.encode_music(np.array([str(abc), str(mert)])),
                                  clamp3.encode_music([abc, mert]))
    np.testing.assert_array_equal(clamp3.encode_audio(np.array([str(mert)])), clamp3.encode_audio([mert]))
    # An array that np.save cannot write without pickle is a named failure, not numpy's ValueError.
    from clamp2 import EncodeError

    with pytest.raises(EncodeError, match="ndarray of shape"):
        clamp3.encode_audio(np.array([None, 1], dtype=object))


@pytest.mark.parametrize("option, value", [("batch_size", 0), ("batch_size", -1), ("num_workers", -1),
                                           ("max_text_length", 0)])
def test_sizes_that_cannot_work_are_refused_when_loading(option, value):
    # batch_size=-1 returned zero rows and no failure (errors="raise" too); 0, num_workers=-1 and
    # max_text_length=0 failed later inside range() / the DataLoader.
    from clamp2 import CLaMP2, M3

    with pytest.raises(ValueError, match=option):
        CLaMP2.from_pretrained(VECTORS / "tiny_clamp2.pth", text_model=TEXT_MODEL, **{option: value})
    if option != "max_text_length":
        with pytest.raises(ValueError, match=option):
            M3.from_pretrained(VECTORS / "tiny_m3.pth", **{option: value})


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "FP32", "fp64"])
def test_an_unknown_dtype_is_refused_not_run_as_fp16(dtype):
    # Any string but "fp32"/"bf16" ran fp16 autocast on CUDA; on the CPU the message said it needs CUDA.
    import torch

    from clamp2 import CLaMP2
    from clamp2.extraction.core import autocast_context

    with pytest.raises(ValueError, match="'fp32', 'bf16' or 'fp16'"):
        autocast_context(torch.device("cuda"), dtype)
    with pytest.raises(ValueError, match="'fp32', 'bf16' or 'fp16'"):
        CLaMP2.from_pretrained(VECTORS / "tiny_clamp2.pth", text_model=TEXT_MODEL, dtype=dtype, device="cpu")


def test_cuda_asked_for_where_there_is_none_is_one_line_before_the_build(monkeypatch):
    import torch

    from clamp2 import M3
    from clamp2 import hub

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    resolved = []
    monkeypatch.setattr(hub, "resolve_weights", lambda *a, **k: resolved.append(a) or VECTORS / "tiny_m3.pth")
    with pytest.raises(ValueError, match="CUDA is not available"):
        M3.from_pretrained(VECTORS / "tiny_m3.pth", device="cuda")
    assert resolved == []


def test_encode_folder_names_special_files_it_cannot_read(tiny, tmp_path):
    # The scripts report a FIFO named like an input; encode_folder left it out without a word.
    shutil.copy(ABC, tmp_path / "good.abc")
    os.mkfifo(tmp_path / "pipe.abc")
    encoded = tiny.encode_folder(tmp_path, progress=False)
    assert encoded.names == ["good.abc"]
    assert encoded.failed_names == ["pipe.abc"] and "FIFO" in encoded.failures[0][1]
    from clamp2 import EncodeError, M3

    with pytest.raises(EncodeError, match="pipe.abc"):
        tiny.encode_folder(tmp_path, errors="raise", progress=False)
    assert M3.from_pretrained(VECTORS / "tiny_m3.pth").encode_folder(tmp_path, progress=False).failed_names == ["pipe.abc"]


def test_a_cache_set_after_the_weights_changed_is_not_filled(tmp_path):
    # The weights' hash is taken when a cache is first used; a cache set after construction, once the file
    # was replaced, got this model's features under the new weights' namespace, served to the next model.
    import torch

    from clamp2 import CLaMP2, FeatureCache

    weights = tmp_path / "model.pth"
    shutil.copy(VECTORS / "tiny_clamp2.pth", weights)
    model = CLaMP2.from_pretrained(weights, text_model=TEXT_MODEL, max_text_length=16)
    checkpoint = torch.load(weights, map_location="cpu", weights_only=True)
    checkpoint["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in checkpoint["model"].items()}
    torch.save(checkpoint, weights)
    model.cache = FeatureCache(tmp_path / "cache")
    old = model.encode_music([ABC])
    retrained = CLaMP2.from_pretrained(weights, text_model=TEXT_MODEL, max_text_length=16, cache=tmp_path / "cache")
    result = retrained.encode_files([ABC], progress=False)
    assert result.cached == 0
    assert not np.allclose(result.features, old, atol=1e-3)


def test_an_intact_entry_under_another_key_is_not_served(tmp_path):
    # Entries ended with the sha256 of their bytes only: a valid entry copied over another one's name (a sync
    # tool mixing names) was served: another file's feature, or numpy's "all input arrays must have the same
    # shape" when a per-position entry landed under a global key.
    from clamp2 import CLaMP2

    model = CLaMP2.from_pretrained(VECTORS / "tiny_clamp2.pth", text_model=TEXT_MODEL, max_text_length=16,
                                   cache=tmp_path / "cache")
    items = [ABC, VECTORS / "extract_in" / "mtf" / "handmade.mtf"]
    first = model.encode_files(items, progress=False).features
    model.encode_files(items, False, progress=False)
    entries = sorted((tmp_path / "cache" / "features").rglob("*/*.npy"))
    assert len(entries) == 4
    contents = [entry.read_bytes() for entry in entries]
    for entry, data in zip(entries, contents[1:] + contents[:1]):
        entry.write_bytes(data)
    again = model.encode_files(items, progress=False)
    assert (again.computed, again.cached) == (2, 0)
    np.testing.assert_allclose(again.features, first, atol=1e-6)


def test_an_empty_string_is_named_as_such(tiny):
    # Path("") is the current folder: the failure read "a folder, not a file: . (encode folders with encode_folder)".
    encoded = tiny.encode_music(["", str(ABC), ""], errors="skip")
    assert encoded.indices == [1]
    assert [reason for _, reason in encoded.failures] == ["an empty string: neither a file name nor content"] * 2


def test_an_empty_cache_path_is_refused_not_the_current_folder(tmp_path, monkeypatch):
    # cache=os.environ.get("CLAMP_CACHE", "") with the variable unset filled the current folder with features/.
    from clamp2 import CLaMP2
    from clamp2.cache import FeatureCache

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="feature cache path is empty"):
        CLaMP2.from_pretrained(VECTORS / "tiny_clamp2.pth", text_model=TEXT_MODEL, cache="")
    with pytest.raises(ValueError, match="feature cache path is empty"):
        FeatureCache("")
    assert list(tmp_path.iterdir()) == []
    assert str(FeatureCache(".").root) == "."  # asked for by name: kept
