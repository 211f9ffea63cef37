"""clamp2.CLaMP3: raw MusicXML/MIDI/ABC/MTF, MERT features and text in, the reference's CLaMP 3 features out;
cache keys per family and variant; failures named; the published names and hub messages."""

import shutil

import numpy as np
import pytest

from conftest import DATA_DIR, VECTORS
from test_api import fake_hub_cache

VECTORS3 = DATA_DIR / "vectors_clamp3"
TEXT_MODEL = str(VECTORS / "tiny_text_model")
GLOBAL = VECTORS3 / "expected" / "feat_clamp3_global"
RAW = VECTORS3 / "expected" / "feat_clamp3_raw"


@pytest.fixture(scope="module")
def tiny3():
    from clamp2 import CLaMP3

    return CLaMP3.from_pretrained(VECTORS3 / "tiny_clamp3.pth", text_model=TEXT_MODEL, max_text_length=16, batch_size=4)


def test_raw_inputs_of_every_kind_give_the_reference_features(tiny3):
    inputs = VECTORS3 / "inputs"
    # MIDI in CLaMP 3's MTF mode (handmade_sysex keeps its sysex), MusicXML through xml2abc + interleaving,
    # standard ABC, interleaved ABC, MTF and MERT features: each equals the original's extract_clamp3.
    cases = [(inputs / "midi" / "handmade_sysex.mid", "mtf/handmade_sysex"),
             (inputs / "midi" / "bwv26.6.mid", "mtf/bwv26.6"),
             (inputs / "midi" / "banish_misfortune.mid", "mtf/banish_misfortune"),
             (inputs / "xml" / "bwv26.6.mxl", "abc/bwv26.6"),
             (inputs / "abc" / "banish_misfortune.abc", "abc/banish_misfortune"),
             (VECTORS3 / "extract_in" / "abc" / "bwv26.6.abc", "abc/bwv26.6"),
             (VECTORS3 / "extract_in" / "mtf" / "bwv26.6.mtf", "mtf/bwv26.6")]
    audio = sorted((VECTORS3 / "extract_in" / "audio").glob("*.npy"))
    cases += [(path, f"audio/{path.stem}") for path in audio]
    items = [item for item, _ in cases]
    features = tiny3.encode_music(items)
    assert features.shape == (len(cases), 48)
    for row, (item, expected) in zip(features, cases):
        np.testing.assert_allclose(row, np.load(GLOBAL / f"{expected}.npy")[0], atol=1e-5, err_msg=str(item))
    per_position = tiny3.encode_music(items, normalize=False)
    for states, (item, expected) in zip(per_position, cases):
        want = np.load(RAW / f"{expected}.npy")[0]
        assert states.shape == want.shape, item
        np.testing.assert_allclose(states, want, atol=1e-5, err_msg=str(item))
    np.testing.assert_allclose(tiny3.encode_audio(audio), features[-len(audio):], atol=1e-6)
    texts = [path.read_text(encoding="utf-8") for path in sorted((VECTORS3 / "extract_in" / "txt").glob("*.txt"))]
    want = np.stack([np.load(GLOBAL / "txt" / f"{path.stem}.npy")[0]
                     for path in sorted((VECTORS3 / "extract_in" / "txt").glob("*.txt"))])
    np.testing.assert_allclose(tiny3.encode_text(texts), want, atol=1e-5)
    scores = tiny3.similarity(tiny3.encode_text(texts), features)
    assert scores.shape == (3, len(cases)) and np.all(np.abs(scores) <= 1 + 1e-6)


def test_mert_arrays_and_bytes_equal_their_files(tiny3):
    path = VECTORS3 / "extract_in" / "audio" / "banish_misfortune_22k05_mono_s16.npy"
    from_file = tiny3.encode_audio(path)
    np.testing.assert_allclose(tiny3.encode_audio(np.load(path)), from_file, atol=1e-6)
    np.testing.assert_allclose(tiny3.encode_music([path.read_bytes()]), from_file, atol=1e-6)


def test_audio_bytes_of_every_mp3_frame_layout_equal_their_files(tmp_path):
    # An MP3 without an ID3 tag starts with a frame header: MPEG-1 (0xFFFB, with CRC 0xFFFA), MPEG-2 (0xFFF3)
    # and MPEG-2.5 (0xFFE3) must all be read as audio, as their files are.
    from clamp2 import CLaMP3
    from clamp2.extraction.model_inputs import audio_suffix

    model = CLaMP3.from_pretrained(VECTORS3 / "tiny_clamp3.pth", text_model=TEXT_MODEL, max_text_length=16,
                                   mert=VECTORS3 / "tiny_mert")
    files = sorted((DATA_DIR / "ffmpeg_decodes").glob("*.mp3"))
    assert {path.read_bytes()[:2] for path in files} >= {b"\xff\xfb", b"\xff\xf3", b"\xff\xe3", b"ID"}
    for head in (b"\xff\xfa", b"\xff\xf2", b"\xff\xe2"):
        assert audio_suffix(head + b"\x90\x00") == ".mp3"
    assert audio_suffix(b"\xff\xfd\x90\x00") is None  # layer II
    assert audio_suffix(b"\xff\xeb\x90\x00") is None  # the reserved MPEG version
    assert audio_suffix(b"\xff") is None and audio_suffix(b"") is None
    from_files = model.encode_audio(files)
    from_bytes = model.encode_audio([path.read_bytes() for path in files])
    np.testing.assert_allclose(from_bytes, from_files, atol=1e-6)


def test_bad_inputs_are_named_with_their_reason(tiny3, tmp_path):
    from clamp2 import EncodeError

    np.save(tmp_path / "double.npy", np.load(VECTORS3 / "extract_in/audio/bwv26.6_16k_stereo_s16.npy").astype(np.float64))
    good = VECTORS3 / "extract_in" / "abc" / "bwv26.6.abc"
    items = [tmp_path / "double.npy", VECTORS3 / "expected" / "mert_all" / "bwv26.6_16k_stereo_s16.npy", good,
             tmp_path / "missing.wav"]
    encoded = tiny3.encode_music(items, errors="skip")
    assert encoded.items == [good] and encoded.features.shape == (1, 48)
    reasons = dict(encoded.failures)
    assert "float64" in reasons[items[0]] and "--mean_features" in reasons[items[1]]
    assert "file not found" in reasons[items[3]]
    with pytest.raises(EncodeError, match="double.npy"):
        tiny3.encode_music(items)
    skipped = tiny3.encode_audio([good], errors="skip")
    assert "not audio" in skipped.failures[0][1]


def test_clamp2_refuses_audio_and_families_are_told_apart(tmp_path):
    from clamp2 import CLaMP2, CLaMP3
    from clamp2.checkpoint import CheckpointError

    clamp2 = CLaMP2.from_pretrained(VECTORS / "tiny_clamp2.pth", text_model=TEXT_MODEL, max_text_length=16)
    encoded = clamp2.encode_music([VECTORS3 / "extract_in/audio/bwv26.6_16k_stereo_s16.npy"], errors="skip")
    assert "CLaMP 3" in encoded.failures[0][1]
    with pytest.raises(CheckpointError, match="is a CLaMP 2 checkpoint.*CLaMP2"):
        CLaMP3.from_pretrained(VECTORS / "tiny_clamp2.pth", text_model=TEXT_MODEL)
    with pytest.raises(CheckpointError, match="is a CLaMP 3 checkpoint.*CLaMP3"):
        CLaMP2.from_pretrained(VECTORS3 / "tiny_clamp3.pth", text_model=TEXT_MODEL)
    with pytest.raises(ValueError, match="variant='c3'"):
        CLaMP3.from_pretrained(VECTORS3 / "tiny_clamp3.pth", text_model=TEXT_MODEL, variant="c3")


def test_cache_keys_hold_the_family_and_the_variant(tmp_path):
    from clamp2 import CLaMP2, CLaMP3, FeatureCache
    from clamp2.hub import PUBLISHED_CLAMP3_WEIGHTS

    cache = FeatureCache(tmp_path / "cache")
    # The same weights under both published names: only the variant differs.
    for variant, name in PUBLISHED_CLAMP3_WEIGHTS.items():
        shutil.copy(VECTORS3 / "tiny_clamp3.pth", tmp_path / name)
    items = [VECTORS3 / "extract_in/mtf/handmade_sysex.mtf", VECTORS3 / "extract_in/audio/bwv26.6_16k_stereo_s16.npy"]
    saas = CLaMP3.from_pretrained(tmp_path, text_model=TEXT_MODEL, max_text_length=16, cache=cache)
    assert saas.variant == "saas" and saas.weights_path.name == PUBLISHED_CLAMP3_WEIGHTS["saas"]
    first = saas.encode_music(items, errors="skip")
    again = saas.encode_music(items, errors="skip")
    assert (first.computed, again.cached, again.computed) == (2, 2, 0)
    np.testing.assert_array_equal(first.features, again.features)
    c2 = CLaMP3.from_pretrained(tmp_path, variant="c2", text_model=TEXT_MODEL, max_text_length=16, cache=cache)
    assert c2.variant == "c2" and c2.encode_music(items, errors="skip").computed == 2
    clamp2 = CLaMP2.from_pretrained(VECTORS / "tiny_clamp2.pth", text_model=TEXT_MODEL, max_text_length=16, cache=cache)
    assert clamp2.encode_music(items[:1], errors="skip").computed == 1
    groups = {(n["settings"]["model"], n["settings"].get("variant")) for n in cache.info()}
    assert groups == {("clamp3", "saas"), ("clamp3", "c2"), ("clamp2", None)}
    per_position = saas.encode_music(items, normalize=False, errors="skip")
    assert per_position.computed == 2 and [f.shape for f in per_position.features] == [(17, 64), (4, 64)]


def test_encode_folder_takes_symbolic_audio_and_text(tiny3):
    encoded = tiny3.encode_folder(VECTORS3 / "extract_in", progress=False)
    assert len(encoded) == 11 and not encoded.failures
    for name, row in zip(encoded.names, encoded.features):
        np.testing.assert_allclose(row, np.load((GLOBAL / name).with_suffix(".npy"))[0], atol=1e-5, err_msg=name)


def test_published_names_and_hub_messages_offline(tmp_path, monkeypatch):
    from clamp2 import CLaMP3
    from clamp2.hub import PUBLISHED_CLAMP3_WEIGHTS, WeightsNotFound

    assert PUBLISHED_CLAMP3_WEIGHTS["saas"] == (
        "weights_clamp3_saas_h_size_768_t_model_FacebookAI_xlm-roberta-base_t_length_128_a_size_768_a_layers_12"
        "_a_length_128_s_size_768_s_layers_12_p_size_64_p_length_512.pth")
    assert PUBLISHED_CLAMP3_WEIGHTS["c2"] == PUBLISHED_CLAMP3_WEIGHTS["saas"].replace("_saas_", "_c2_")
    hub = fake_hub_cache(tmp_path / "hub", "sander-wood/clamp3",
                         {PUBLISHED_CLAMP3_WEIGHTS["saas"]: VECTORS3 / "tiny_clamp3.pth"})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = CLaMP3.from_pretrained("sander-wood/clamp3", text_model=TEXT_MODEL, max_text_length=16, hub_cache_dir=hub)
    assert model.variant == "saas" and "snapshots" in model.weights_path.parts
    # The C2 file is not in the cache: the message names it (never the SAAS file) and the command.
    with pytest.raises(WeightsNotFound) as info:
        CLaMP3.from_pretrained("sander-wood/clamp3", variant="c2", text_model=TEXT_MODEL, hub_cache_dir=hub)
    assert f"hf download sander-wood/clamp3 {PUBLISHED_CLAMP3_WEIGHTS['c2']}" in str(info.value)
    with pytest.raises(WeightsNotFound, match="weights_y.pth is not a published file of the Hugging Face repo "
                                              "sander-wood/clamp3") as info:
        CLaMP3.from_pretrained(tmp_path / "weights_y.pth")
    assert all(f"hf download sander-wood/clamp3 {name} --local-dir ." in str(info.value)
               for name in PUBLISHED_CLAMP3_WEIGHTS.values())


def test_mixed_raw_folder_equals_the_script_pipeline(tmp_path, monkeypatch):
    """MusicXML, MIDI, WAV/FLAC and text through CLaMP3 = process_data converters + extract_mert.py
    (tiny MERT) + extract_clamp3.py (tiny CLaMP 3), global and per position."""
    from clamp2 import CLaMP3, FeatureCache
    from conftest import load_script
    from test_extract_clamp3 import TINY_CLAMP3_ENV

    inputs = VECTORS3 / "inputs"
    raw = tmp_path / "raw"
    for kind in ("xml", "midi", "audio", "txt"):
        shutil.copytree(inputs / kind, raw / kind)
    model_in = tmp_path / "model_in"
    run = {name: load_script(f"process_data/{name}.py").main
           for name in ("batch_xml2abc", "batch_interleaved_abc", "batch_midi2mtf", "extract_mert")}
    assert run["batch_xml2abc"]([str(raw / "xml"), str(tmp_path / "xml_abc"), "--workers", "1"]) == 0
    assert run["batch_interleaved_abc"]([str(tmp_path / "xml_abc"), str(model_in / "xml"), "--workers", "1"]) == 0
    assert run["batch_midi2mtf"]([str(raw / "midi"), str(model_in / "midi"), "--clamp3", "--workers", "1"]) == 0
    # The 0.5-s clip has no MERT window: a reported failure in both pipelines.
    assert run["extract_mert"]([str(raw / "audio"), str(model_in / "audio"), "--model", str(VECTORS3 / "tiny_mert"),
                                "--num_workers", "0", "--no_progress"]) == 1
    shutil.copytree(raw / "txt", model_in / "txt")
    extract = load_script("code/extract_clamp3.py")
    for key, value in TINY_CLAMP3_ENV.items():
        monkeypatch.setenv(key, value)
    model = CLaMP3.from_pretrained(VECTORS3 / "tiny_clamp3.pth", text_model=TEXT_MODEL, max_text_length=16,
                                   mert=VECTORS3 / "tiny_mert", cache=FeatureCache(tmp_path / "cache"))
    for get_global in (True, False):
        out = tmp_path / ("global" if get_global else "raw_features")
        assert extract.main([str(model_in), str(out), "--weights", str(VECTORS3 / "tiny_clamp3.pth"), "--text_model",
                             TEXT_MODEL, "--num_workers", "0", "--no_progress"] + (["--get_global"] if get_global else [])) == 0
        encoded = model.encode_folder(raw, normalize=get_global, progress=False)
        assert encoded.failed_names == ["audio/banish_misfortune_48k_stereo_f32.wav"]
        assert "shorter than 1 s" in encoded.failures[0][1]
        assert len(encoded) == encoded.computed == 10  # 3 audio, 3 MIDI, 1 MusicXML, 3 texts
        script = {name: np.load((out / name).with_suffix(".npy"))[0] for name in encoded.names}
        for name, feature in zip(encoded.names, encoded.features):
            assert feature.shape == script[name].shape, name
            np.testing.assert_allclose(feature, script[name], atol=1e-5, rtol=0, err_msg=name)
    again = model.encode_folder(raw, progress=False)
    assert (again.cached, again.computed) == (10, 0)


def test_readme_clamp3_example_runs(monkeypatch, capsys):
    import re

    from conftest import REPO_ROOT

    section = (REPO_ROOT / "README.md").read_text().split("## Use from Python", 1)[1].split("\n## ", 1)[0]
    block = [b for b in re.findall(r"```python\n(.*?)```", section, re.S) if "CLaMP3" in b]
    assert len(block) == 1
    monkeypatch.chdir(REPO_ROOT)
    exec(compile(block[0], "README.md", "exec"), {})
    assert re.search(r"\[\[\s*-?\d\.\d+\s+-?\d\.\d+\s+-?\d\.\d+\s*\]\]", capsys.readouterr().out)


CALLER_DEFAULTS = {"float64 dtype": ("float64", "cpu", "set"),
                   # The GPU machine's case is set_default_device("cuda"); "meta" stands for it here (no CUDA).
                   "meta device": ("float32", "meta", "set"),
                   "meta device block": ("float32", "meta", "with")}


@pytest.fixture(params=list(CALLER_DEFAULTS))
def caller_defaults(request):
    """A caller that changed torch's default dtype (a notebook beside scientific code) or device, for the
    session (set_default_device) or in a ``with torch.device(...)`` block."""
    import contextlib

    import torch

    previous = torch.get_default_dtype()
    dtype, device, how = CALLER_DEFAULTS[request.param]
    torch.set_default_dtype(getattr(torch, dtype))
    with torch.device(device) if how == "with" else contextlib.nullcontext():
        if how == "set":
            torch.set_default_device(device)
        yield getattr(torch, dtype), torch.device(device)
    torch.set_default_dtype(previous)
    # None, not the CPU device: set_default_device("cpu") leaves a function mode on torch's stack that
    # outlives the test (it doubled every patched Tensor method a later test counted).
    torch.set_default_device(None)
    # Nothing of the caller's device outlives its block or its reset: the API once put a block's device back
    # as the global default, and the next reset brought it back for good.
    assert torch.empty(0).device.type == "cpu" and torch._C._len_torch_function_stack() == 0


def test_a_callers_default_dtype_or_device_changes_no_feature(caller_defaults):
    # Before, a float64 default built float64 layers beside transformers' float32 text model: text raised
    # "mat1 and mat2 must have the same dtype", and music was computed partly in float64. A default device
    # put the models and the host buffers there.
    import torch

    from clamp2 import M3, CLaMP2, CLaMP3

    def defaults():
        return torch.get_default_dtype(), torch.get_default_device()

    def plain(function):
        now = defaults()
        torch.set_default_dtype(torch.float32)
        try:
            with torch.device("cpu"):  # reaches a caller's block as well as its global default
                return function()
        finally:
            torch.set_default_dtype(now[0])

    wav = VECTORS3 / "inputs" / "audio" / "banish_misfortune_22k05_mono_s16.wav"
    music = [VECTORS3 / "inputs" / "abc" / "banish_misfortune.abc", VECTORS3 / "inputs" / "midi" / "bwv26.6.mid"]
    texts = ["a lively jig in 6/8", "a chorale"]
    loaders = [(lambda: CLaMP3.from_pretrained(VECTORS3 / "tiny_clamp3.pth", text_model=TEXT_MODEL, max_text_length=16,
                                               mert=VECTORS3 / "tiny_mert"), music + [wav]),
               (lambda: CLaMP2.from_pretrained(VECTORS / "tiny_clamp2.pth", text_model=TEXT_MODEL,
                                               max_text_length=16), music)]
    for load, items in loaders:
        def encode(model, items=items):
            return [model.encode_text(texts), model.encode_music(items), *model.encode_music(items, normalize=False)]

        model = load()
        assert defaults() == caller_defaults  # the caller's, put back after every call
        assert {(p.dtype, p.device.type) for p in model.model.parameters()} == {(torch.float32, "cpu")}
        got = encode(model)
        assert defaults() == caller_defaults
        want = plain(lambda: encode(load()))
        assert len(got) == len(want)
        for a, b in zip(got, want):
            assert a.dtype == np.float32
            np.testing.assert_array_equal(a, b)
    got = M3.from_pretrained(VECTORS / "tiny_m3.pth").encode(music)
    assert defaults() == caller_defaults
    want = plain(lambda: M3.from_pretrained(VECTORS / "tiny_m3.pth").encode(music))
    for a, b in zip(got, want):
        assert a.dtype == np.float32
        np.testing.assert_array_equal(a, b)


def test_a_callers_autocast_changes_no_fp32_feature():
    # An API call inside a caller's bf16 autocast (a training loop using CLaMP features as targets) stays fp32.
    # Audio too: its resampling ran under the caller's autocast, and the bf16 samples failed.
    import torch

    from clamp2 import CLaMP3

    tiny3 = CLaMP3.from_pretrained(VECTORS3 / "tiny_clamp3.pth", text_model=TEXT_MODEL, max_text_length=16,
                                   mert=VECTORS3 / "tiny_mert")
    music = [VECTORS3 / "inputs" / "abc" / "banish_misfortune.abc", VECTORS3 / "inputs" / "midi" / "bwv26.6.mid",
             VECTORS3 / "inputs" / "audio" / "banish_misfortune_22k05_mono_s16.wav"]
    texts = ["a lively jig in 6/8", "a chorale"]
    want = tiny3.encode_text(texts), tiny3.encode_music(music)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = tiny3.encode_text(texts), tiny3.encode_music(music)
        assert torch.is_autocast_enabled("cpu")
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def test_the_callers_random_stream_does_not_move():
    # Each model build drew its random initial weights (then replaced by the checkpoint's) and each encode's
    # DataLoader drew a seed from torch's global generator: a seeded training run that evaluated through the
    # API mid-run drew differently afterwards, and by how often it evaluated. A refused load too.
    import torch

    from clamp2 import CLaMP3

    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    model = CLaMP3.from_pretrained(VECTORS3 / "tiny_clamp3.pth", text_model=TEXT_MODEL, max_text_length=16,
                                   mert=VECTORS3 / "tiny_mert")
    assert torch.equal(torch.random.get_rng_state(), state)
    model.encode_text(["a chorale"])
    model.encode_music([VECTORS3 / "inputs" / "abc" / "banish_misfortune.abc",
                        VECTORS3 / "inputs" / "audio" / "banish_misfortune_22k05_mono_s16.wav"])  # MERT loads here
    assert torch.equal(torch.random.get_rng_state(), state)
    with pytest.raises(ValueError):
        CLaMP3.from_pretrained(VECTORS3 / "tiny_clamp3.pth", text_model=TEXT_MODEL, dtype="bf16")  # CUDA only
    assert torch.equal(torch.random.get_rng_state(), state)


def test_a_thread_drawing_while_another_encodes_gets_its_own_stream(tiny3):
    # Saving the random state on entry and restoring it on exit rewound the draws another thread made meanwhile:
    # it got the same numbers again (dropout masks, shuffles). The API must not touch the stream at all.
    import threading
    import time

    import torch

    torch.manual_seed(7)
    want = [torch.rand(1).item() for _ in range(200)]
    stop = threading.Event()

    def encode_until_stopped():
        while not stop.is_set():
            tiny3.encode_text(["a chorale"])

    encoder = threading.Thread(target=encode_until_stopped)
    encoder.start()
    try:
        torch.manual_seed(7)
        got = []
        for _ in range(200):
            got.append(torch.rand(1).item())
            time.sleep(0.001)
    finally:
        stop.set()
        encoder.join(30)
    assert got == want


def test_encoding_leaves_the_multiprocessing_start_method_unset(tmp_path):
    # tqdm's default lock makes a multiprocessing RLock, which fixes the start method: after any encode, even
    # with no bar shown, a caller's multiprocessing.set_start_method("spawn") raised "context has already
    # been set". A fresh process: pytest's own may have fixed it already.
    import subprocess
    import sys

    code = f"""
import multiprocessing
from clamp2 import CLaMP2
model = CLaMP2.from_pretrained({str(VECTORS / "tiny_clamp2.pth")!r}, text_model={TEXT_MODEL!r}, max_text_length=16)
model.encode_text(["a chorale"])
model.encode_music([{str(VECTORS3 / "inputs" / "abc" / "banish_misfortune.abc")!r}])
model.encode_folder({str(VECTORS3 / "inputs" / "abc")!r})  # a progress bar, shown
multiprocessing.set_start_method("spawn")
print(multiprocessing.get_start_method())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "spawn"


def test_audio_cache_entries_belong_to_their_mert(tmp_path):
    """A .wav encoded through one MERT is encoded again, not read from the cache, through another MERT."""
    import torch

    from clamp2 import CLaMP3
    from clamp2.cache import FeatureCache

    other_mert = tmp_path / "other_mert"
    shutil.copytree(VECTORS3 / "tiny_mert", other_mert)
    state = torch.load(other_mert / "pytorch_model.bin", weights_only=True)
    name = next(key for key, value in state.items() if value.is_floating_point() and value.dim() == 2)
    state[name] = state[name] * 1.5
    torch.save(state, other_mert / "pytorch_model.bin")
    wav = VECTORS3 / "inputs" / "audio" / "bwv26.6_44k1_stereo_s16.wav"
    cache = FeatureCache(tmp_path / "cache")

    def encode(mert):
        model = CLaMP3.from_pretrained(VECTORS3 / "tiny_clamp3.pth", text_model=TEXT_MODEL, max_text_length=16,
                                       mert=mert, cache=cache)
        return model.encode_audio([wav], errors="skip")

    first, again, other = encode(VECTORS3 / "tiny_mert"), encode(VECTORS3 / "tiny_mert"), encode(other_mert)
    assert (first.computed, again.cached, other.computed, other.cached) == (1, 1, 1, 0)
    assert np.array_equal(first.features, again.features) and not np.allclose(first.features, other.features)


# an audio file MERT cannot use fails with the decoder's own reason (no exception class name in front).
def test_audio_failures_keep_their_reason(tmp_path):
    from clamp2 import CLaMP3

    model = CLaMP3.from_pretrained(VECTORS3 / "tiny_clamp3.pth", text_model=str(VECTORS / "tiny_text_model"),
                                   max_text_length=16, mert=str(VECTORS3 / "tiny_mert"))
    short = VECTORS3 / "inputs" / "audio" / "banish_misfortune_48k_stereo_f32.wav"
    (tmp_path / "bad.wav").write_bytes(b"RIFF garbage")
    encoded = model.encode_audio([short, tmp_path / "bad.wav"], errors="skip")
    reasons = [reason for _, reason in encoded.failures]
    assert reasons[0] == "shorter than 1 s (12000 samples at 24 kHz, a window needs 24000): no MERT window"
    assert reasons[1].startswith("cannot decode audio (")
