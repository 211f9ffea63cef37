"""MERT as a HubertModel, its loader, the batched feature driver and process_data/extract_mert.py (SPEC §16)."""

import importlib.util
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from clamp2.checkpoint import CheckpointError
from clamp2.extraction.audio import AudioError
from clamp2.extraction.mert import MertFeatureExtractor, plan_audio_jobs
from clamp2.models import mert
from clamp2.quickstart import audio_render
from conftest import free_port

DATA = Path(__file__).parent / "data"
VECTORS = DATA / "vectors_clamp3"
AUDIO_IN = VECTORS / "inputs" / "audio"
EXPECTED = VECTORS / "expected"
TINY = VECTORS / "tiny_mert"
TINY_SAFETENSORS = VECTORS / "tiny_mert_safetensors"
SCRIPT = Path(__file__).resolve().parents[1] / "process_data" / "extract_mert.py"
FEATURE_TOLERANCE = 1e-5  # vectors README: CPU float32

# MERT-v1-95M's published config.json differs from the tiny one only in these sizes.
FULL_SIZES = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
              "conv_dim": [512] * 7, "num_conv_pos_embeddings": 128, "num_conv_pos_embedding_groups": 16}


def read_key_table(path):
    """key → shape of a key table (first column: the current key name; shape: the first ``[...]`` column)."""
    rows = [line.split("\t") for line in path.read_text().splitlines() if line and not line.startswith(("#", "key"))]
    return {row[0]: json.loads(next(c for c in row if c.startswith("["))) for row in rows}


def tiny_values():
    return json.loads((TINY / "config.json").read_text())


@pytest.fixture(scope="module")
def tiny_model():
    return mert.load_mert(TINY)


def test_full_size_model_has_exactly_the_published_keys_and_shapes():
    values = {**tiny_values(), **FULL_SIZES}
    with torch.device("meta"):  # 94M parameters: shapes only, no memory, no init time
        model = mert.build_mert(values)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    expected = read_key_table(DATA / "mert_state_dict.tsv")
    assert shapes == expected
    assert list(shapes) == list(expected)  # same order too
    assert sum(np.prod(s) for s in shapes.values()) == 94_371_712
    assert model.config.num_hidden_layers == 12 and model.config.feat_extract_norm == "group"
    assert not model.training


def test_legacy_and_safetensors_folders_load_the_same_tensors():
    legacy, current = mert.load_mert(TINY).state_dict(), mert.load_mert(TINY_SAFETENSORS).state_dict()
    assert list(legacy) == list(current)
    assert all(torch.equal(legacy[k], current[k]) for k in legacy)
    table = read_key_table(VECTORS / "tiny_mert_keys.tsv")
    assert {k: list(v.shape) for k, v in current.items()} == table
    raw = torch.load(TINY / "pytorch_model.bin", weights_only=True)
    assert "encoder.pos_conv_embed.conv.weight_g" in raw
    assert torch.equal(raw["encoder.pos_conv_embed.conv.weight_v"],
                       current["encoder.pos_conv_embed.conv.parametrizations.weight.original1"])


def test_strict_key_check_names_missing_and_unexpected_keys(tmp_path):
    state = torch.load(TINY / "pytorch_model.bin", weights_only=True)
    del state["encoder.layer_norm.bias"]
    state["encoder.extra.weight"] = torch.zeros(1)
    folder = tmp_path / "bad_mert"
    folder.mkdir()
    shutil.copy(TINY / "config.json", folder / "config.json")
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as info:
        mert.load_mert(folder)
    assert "missing keys (1): encoder.layer_norm.bias" in str(info.value)
    assert "unexpected keys (1): encoder.extra.weight" in str(info.value)


def test_mert_only_features_are_refused():
    with pytest.raises(ValueError, match="feature_extractor_cqt"):
        mert.hubert_config({**tiny_values(), "feature_extractor_cqt": True})
    assert "auto_map" not in mert.hubert_config(tiny_values()).to_dict()


class _Payload:
    def __reduce__(self):
        import os

        return (os.system, ("echo pwned",))


def test_a_weights_file_holding_code_is_refused_not_run(tmp_path, capfd):
    folder = tmp_path / "evil_mert"
    shutil.copytree(TINY, folder)
    torch.save({"feature_projection.projection.weight": _Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="holds Python objects other than tensors"):
        mert.load_mert(folder)
    assert "pwned" not in capfd.readouterr().out


def test_missing_model_is_one_line_naming_the_download(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(mert.MertNotFound) as info:
        mert.load_mert(mert.MERT_HUB_ID)
    assert "`hf download m-a-p/MERT-v1-95M`" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(mert.MertNotFound, match="hf download m-a-p/MERT-v1-95M --local-dir"):
        mert.load_mert(tmp_path / "no" / "such" / "folder")


def test_flop_count_matches_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import HubertModel

    config = mert.hubert_config(tiny_values())
    config._attn_implementation = "eager"  # the counter does not see CPU SDPA's kernel
    model = HubertModel(config).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 120000))
    assert abs(counter.get_total_flops() / mert.forward_flops(config, 120000) - 1) < 1e-3


# -- features ------------------------------------------------------------------------------------

@pytest.mark.parametrize("resample_on_device", [False, True])
@pytest.mark.parametrize("all_layers,folder", [(False, "mert_mean"), (True, "mert_all")])
def test_features_match_the_reference_pipeline(tiny_model, all_layers, folder, resample_on_device):
    # resample_on_device: the workers only decode; resampling and the z-score run where the model does.
    paths = sorted(AUDIO_IN.iterdir())
    extractor = MertFeatureExtractor(tiny_model, "cpu", batch_size=2, all_layers=all_layers,
                                     resample_on_device=resample_on_device)
    results = {paths[i].stem: (array, error) for i, array, error in extractor.iter_files(paths)}
    assert results["banish_misfortune_48k_stereo_f32"][0] is None
    assert "shorter than 1 s" in results["banish_misfortune_48k_stereo_f32"][1]
    for stem, (array, error) in results.items():
        if stem == "banish_misfortune_48k_stereo_f32":
            continue
        expected = np.load(EXPECTED / folder / (stem + ".npy"))
        assert error is None and array.dtype == np.float32 and array.shape == expected.shape
        assert np.abs(array - expected).max() < FEATURE_TOLERANCE, stem


def test_api_features_of_one_file(tiny_model):
    path = AUDIO_IN / "banish_misfortune_22k05_mono_s16.wav"
    features = MertFeatureExtractor(tiny_model, "cpu").features(path)
    assert features.shape == (3, 64) and features.dtype == np.float32
    assert np.abs(features - np.load(EXPECTED / "mert_mean" / (path.stem + ".npy"))[0]).max() < FEATURE_TOLERANCE
    with pytest.raises(AudioError, match="shorter than 1 s"):
        MertFeatureExtractor(tiny_model, "cpu").features(AUDIO_IN / "banish_misfortune_48k_stereo_f32.wav")


@pytest.mark.parametrize("rate", [24000, 16000])
def test_samples_too_large_to_z_score_fail_on_either_path(tiny_model, tmp_path, rate):
    # numpy's float32 sums (the reference's z-score) overflow: every feature would be NaN. torch's
    # var_mean does not overflow, so the device path z-scores such a file on the host, as the reference does.
    soundfile.write(tmp_path / "huge.wav", np.full((3 * rate, 1), 3e38, np.float32), rate, subtype="FLOAT")
    for on_device in (False, True):
        extractor = MertFeatureExtractor(tiny_model, "cpu", resample_on_device=on_device)
        with pytest.raises(AudioError, match="too large to z-score"):
            extractor.features(tmp_path / "huge.wav")
    soundfile.write(tmp_path / "loud.wav", np.full((3 * rate, 1), 1e18, np.float32), rate, subtype="FLOAT")
    assert np.isfinite(MertFeatureExtractor(tiny_model, "cpu", resample_on_device=True).features(tmp_path / "loud.wav")).all()


def test_an_overflowing_variance_with_a_finite_mean_gives_the_references_features_on_either_path(tiny_model, tmp_path):
    # ±1e20 alternating: numpy's float32 mean is 0 but its variance overflows, so the reference's z-score
    # (Wav2Vec2FeatureExtractor: numpy's sums) is all zeros and its features are finite. The device path
    # must give the same, not refuse the file as NaN.
    samples = np.where(np.arange(3 * 24000) % 2 == 0, 1e20, -1e20).astype(np.float32)
    soundfile.write(tmp_path / "wild.wav", samples[:, None], 24000, subtype="FLOAT")
    soundfile.write(tmp_path / "silence.wav", np.zeros((3 * 24000, 1), np.float32), 24000, subtype="FLOAT")
    expected = MertFeatureExtractor(tiny_model, "cpu").features(tmp_path / "silence.wav")  # z-score of zeros: zeros
    for on_device in (False, True):
        features = MertFeatureExtractor(tiny_model, "cpu", resample_on_device=on_device).features(tmp_path / "wild.wav")
        assert features.shape == (1, 64) and np.isfinite(features).all()
        np.testing.assert_array_equal(features, expected)
    # At 16 kHz a ±7.5e16 square wave's float32 sums are finite, but not once resampled to 24 kHz (1.5× the
    # samples, and the resampler's overshoot): the reference's z-score is zeros there too.
    square = np.where((np.arange(3 * 16000) // 80) % 2 == 0, 7.5e16, -7.5e16).astype(np.float32)
    soundfile.write(tmp_path / "square.wav", square[:, None], 16000, subtype="FLOAT")
    for on_device in (False, True):
        features = MertFeatureExtractor(tiny_model, "cpu", resample_on_device=on_device).features(tmp_path / "square.wav")
        np.testing.assert_array_equal(features, expected)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """Real music from music21's corpus, rendered: a chorale and a second piece, several formats."""
    folder = tmp_path_factory.mktemp("rendered")
    midi = [audio_render.corpus_midi(name, folder / (name.replace("/", "_") + ".mid"))
            for name in ("bach/bwv66.6", "bach/bwv26.6")]
    files = {
        "long.wav": audio_render.render_midi(midi[0], folder / "long.wav", sample_rate=44100, seconds=7.5),
        "sub/chorale.FLAC": audio_render.render_midi(midi[1], folder / "sub" / "chorale.FLAC", sample_rate=48000,
                                                     seconds=6.2, channels=1),
        "exact.wav": audio_render.render_midi(midi[1], folder / "exact.wav", sample_rate=16000, seconds=5,
                                              subtype="FLOAT"),
        "same_tail.wav": audio_render.render_midi(midi[0], folder / "same_tail.wav", sample_rate=22050, start=1,
                                                  seconds=2.5),
        "also_same_tail.wav": audio_render.render_midi(midi[1], folder / "also_same_tail.wav", sample_rate=22050,
                                                       seconds=2.5),
    }
    return folder, files


def test_a_files_features_are_the_same_alone_and_in_a_batch(tiny_model, rendered):
    _, files = rendered
    paths = list(files.values())
    alone = {p: MertFeatureExtractor(tiny_model, "cpu", batch_size=1).features(p) for p in paths}
    extractor = MertFeatureExtractor(tiny_model, "cpu", batch_size=2)
    seen = 0
    for index, array, error in extractor.iter_files(paths, num_workers=1):
        assert error is None
        assert array.shape == (1,) + alone[paths[index]].shape
        assert np.abs(array[0] - alone[paths[index]]).max() < FEATURE_TOLERANCE, paths[index].name
        seen += 1
    assert seen == len(paths)
    assert alone[files["long.wav"]].shape == (2, 64)  # 7.5 s: a full window + 2.5 s
    assert alone[files["exact.wav"]].shape == (1, 64)  # 5 s: exactly one window
    assert alone[files["same_tail.wav"]].shape == (1, 64)  # 2.5 s: one short window


def test_batches_group_full_windows_and_equal_short_windows(tiny_model, rendered):
    _, files = rendered
    extractor = MertFeatureExtractor(tiny_model, "cpu", batch_size=8)
    shapes = []
    original = extractor.launch_states

    def spy(windows):
        shapes.append(tuple(windows.shape))
        return original(windows)

    extractor.launch_states = spy
    list(extractor.iter_files(list(files.values())))
    # The 3 full windows of 3 files in one batch; the three 2.5-s windows together; the 1.2-s one alone.
    assert sorted(shapes) == sorted([(3, 120000), (3, 60000), (1, 28800)])


def test_device_resampling_and_z_score_equal_the_host_ones():
    from clamp2.extraction.audio import (load_mono, load_wave, normalize, normalize_tensor, resample,
                                         resample_tensor)

    for path in sorted(AUDIO_IN.iterdir()):
        mono, rate = load_mono(path)
        resampled = resample_tensor(torch.from_numpy(mono), rate)
        assert np.array_equal(resampled.numpy(), resample(mono, rate)), path.name  # the same operations
        wave = normalize_tensor(resampled).numpy()
        np.testing.assert_allclose(wave, normalize(resample(mono, rate)), rtol=0, atol=2e-6)
        np.testing.assert_allclose(wave, load_wave(path), rtol=0, atol=2e-6)


@pytest.mark.parametrize("length,rate,kept", [
    (240854, 44100, 131077),  # 131,077.0068: float32 rounds it to 131,077 (the exact ceiling is 131,078)
    (240855, 44100, 131078),  # 131,077.55: both ceilings agree
    (44100, 44100, 24000),  # whole numbers stay whole
    # Past 2^23 the float32 step is 1: 8,423,999.46 → 8,423,999, and the last window (23,999 samples,
    # under the 24,000 kept) is dropped, where the exact ceiling would keep a 71st window.
    (15479099, 44100, 8423999),
])
def test_resampled_length_rounds_the_quotient_to_float32_as_torchaudio(length, rate, kept):
    # torchaudio keeps ceil(torch.as_tensor(n * length / o)) samples, and as_tensor of a Python float
    # is float32: one sample fewer than the exact ceiling for ~18% of 1-5 min tracks at 44.1 kHz.
    from clamp2.extraction.audio import resample, resampled_length

    assert resampled_length(length, rate) == kept
    assert kept == int(torch.ceil(torch.as_tensor(80 * length / 147)).long())  # 44,100 / 24,000 = 147 / 80
    if length < 10 ** 6:
        assert len(resample(np.zeros(length, np.float32), rate)) == kept


def test_device_resampling_turns_tf32_off_for_its_convolution_only(cuda_machine):
    # cuDNN's default TF32 would round the samples to 10 mantissa bits on CUDA; the flags are process state.
    from clamp2.extraction.audio import _full_precision_convolutions

    cudnn = torch.backends.cudnn
    before = (cudnn.allow_tf32, cudnn.enabled, cudnn.benchmark, cudnn.deterministic)
    with _full_precision_convolutions():
        assert not cudnn.allow_tf32 and (cudnn.enabled, cudnn.benchmark, cudnn.deterministic) == before[1:]
    assert (cudnn.allow_tf32, cudnn.enabled, cudnn.benchmark, cudnn.deterministic) == before


def test_resampling_is_fp32_under_a_callers_autocast():
    # A caller's CPU bf16 autocast made the resampled samples bf16, and CLaMP3.encode_music on a .wav failed
    # ("Got unsupported ScalarType BFloat16") where the API promises the caller's autocast is switched off.
    from clamp2.extraction.audio import resample

    wave = np.sin(np.arange(4410, dtype=np.float32) / 7)
    want = resample(wave, 44100)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = resample(wave, 44100)
    assert got.dtype == np.float32 and np.array_equal(got, want)


def test_a_batch_is_fetched_after_the_next_is_queued(tiny_model, rendered):
    _, files = rendered
    extractor = MertFeatureExtractor(tiny_model, "cpu", batch_size=1)
    events = []
    launch, fetch = extractor.launch_states, extractor._fetch_groups

    def spy_launch(windows):
        events.append("launch")
        return launch(windows)

    def spy_fetch(launched, count):
        events.append("fetch")
        return fetch(launched, count)

    extractor.launch_states, extractor._fetch_groups = spy_launch, spy_fetch
    paths = [files["long.wav"], files["exact.wav"]]  # 2 full windows and a 2.5-s one: 3 batches of 1
    results = {index: array for index, array, error in extractor.iter_files(paths)}
    assert events == ["launch", "launch", "fetch", "launch", "fetch", "fetch"]
    assert sorted(results) == [0, 1] and results[0].shape == (1, 2, 64) and results[1].shape == (1, 1, 64)


# -- the script ----------------------------------------------------------------------------------

def load_script():
    spec = importlib.util.spec_from_file_location("extract_mert_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def mixed_folder(rendered, tmp_path):
    source, files = rendered
    folder = tmp_path / "in"
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("*.mid"))
    samples, rate = soundfile.read(files["long.wav"], dtype="float32")
    try:
        audio_render.write_audio(folder / "sub" / "lossy.mp3", samples[: rate * 6], rate)
    except Exception as exc:  # noqa: BLE001 - a libsndfile built without MP3 encoding
        pytest.skip(f"soundfile cannot write MP3 here: {exc}")
    (folder / "broken.wav").write_bytes(b"RIFF....WAVEfmt garbage")
    (folder / "empty.ogg").write_bytes(b"")
    audio_render.write_audio(folder / "sub" / "short.Wav", samples[: rate // 2], rate)
    (folder / "notes.txt").write_text("not audio")
    return folder


def test_script_on_a_mixed_folder(tiny_model, mixed_folder, tmp_path, capsys):
    script = load_script()
    out = tmp_path / "out"
    argv = [str(mixed_folder), str(out), "--model", str(TINY), "--batch_size", "3", "--num_workers", "1",
            "--no_progress"]
    assert script.main(argv) == 1
    err = capsys.readouterr().err
    assert "extract_mert: extracted 6, skipped 0 existing, failed 3" in err
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.npy"))
    assert written == ["also_same_tail.npy", "exact.npy", "long.npy", "same_tail.npy", "sub/chorale.npy",
                       "sub/lossy.npy"]
    assert np.load(out / "long.npy").shape == (1, 2, 64) and np.load(out / "sub" / "lossy.npy").shape == (1, 2, 64)
    log = dict(line.split("\t") for line in (out / "failed_extract_mert.log").read_text().splitlines())
    assert set(log) == {"broken.wav", "empty.ogg", "sub/short.Wav"}
    assert log["broken.wav"].startswith("cannot decode") and "shorter than 1 s" in log["sub/short.Wav"]
    assert log["empty.ogg"] == "empty file (0 bytes)"
    alone = MertFeatureExtractor(tiny_model, "cpu").features(mixed_folder / "sub" / "chorale.FLAC")
    assert np.abs(np.load(out / "sub" / "chorale.npy")[0] - alone).max() < FEATURE_TOLERANCE
    assert not list(out.rglob("*.partial"))

    # A re-run resumes: every output is skipped, the failures are tried (and listed) again.
    stamp = (out / "long.npy").stat().st_mtime_ns
    assert script.main(argv) == 1
    assert "extracted 0, skipped 6 existing, failed 3" in capsys.readouterr().err
    assert (out / "long.npy").stat().st_mtime_ns == stamp
    before = np.load(out / "long.npy")
    (out / "long.npy").write_bytes(b"")  # an output emptied by a power cut after its rename is extracted again
    assert script.main(argv) == 1
    assert "extracted 1, skipped 5 existing, failed 3" in capsys.readouterr().err
    assert np.abs(np.load(out / "long.npy") - before).max() < FEATURE_TOLERANCE  # alone now, not in a batch
    stamp = (out / "long.npy").stat().st_mtime_ns
    # --overwrite extracts everything again, to the same features.
    assert script.main(argv + ["--overwrite"]) == 1
    assert "extracted 6, skipped 0 existing, failed 3" in capsys.readouterr().err
    assert (out / "long.npy").stat().st_mtime_ns != stamp and np.array_equal(np.load(out / "long.npy"), before)

    all_out = tmp_path / "all"
    assert script.main(argv[:1] + [str(all_out)] + argv[2:] + ["--all_layers"]) == 1
    assert np.load(all_out / "long.npy").shape == (3, 2, 64)

    # Resampling on the device: the same files written, the same failures, the same features up to rounding.
    device_out = tmp_path / "device"
    assert script.main(argv[:1] + [str(device_out)] + argv[2:] + ["--resample_on_device"]) == 1
    assert "extracted 6, skipped 0 existing, failed 3" in capsys.readouterr().err
    assert sorted(p.relative_to(device_out).as_posix() for p in device_out.rglob("*.npy")) == written
    device_log = dict(line.split("\t") for line in (device_out / "failed_extract_mert.log").read_text().splitlines())
    assert device_log == log
    for name in written:
        assert np.abs(np.load(device_out / name) - np.load(out / name)).max() < FEATURE_TOLERANCE, name


def test_script_usage_and_model_errors(tmp_path, capsys, rendered):
    script = load_script()
    folder, _ = rendered
    assert script.main([str(tmp_path / "missing"), str(tmp_path / "o"), "--model", str(TINY)]) == 2
    assert "input folder not found" in capsys.readouterr().err
    (tmp_path / "none").mkdir()
    assert script.main([str(tmp_path / "none"), str(tmp_path / "o"), "--model", str(TINY)]) == 2
    assert "no audio files" in capsys.readouterr().err
    assert script.main([str(folder), str(tmp_path / "o"), "--model", str(tmp_path / "no_model")]) == 2
    err = capsys.readouterr().err.strip()
    assert re.fullmatch(r"error: MERT model folder not found: .*hf download m-a-p/MERT-v1-95M.*", err)
    assert script.main([str(folder), str(tmp_path / "o"), "--model", str(TINY), "--dtype", "bf16",
                        "--device", "cpu"]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        script.parse_args([str(folder), str(tmp_path / "o"), "--batch_size", "0"])
    assert info.value.code == 2
    assert not (tmp_path / "o").exists()


def test_plan_reports_two_inputs_for_one_output(tmp_path):
    for name in ("a.wav", "a.FLAC", "b.mp3"):
        (tmp_path / name).write_bytes(b"")
    plan = plan_audio_jobs(tmp_path, tmp_path / "out")
    assert [job.path.name for job in plan.jobs] == ["b.mp3"]
    assert sorted(p.name for p, _ in plan.failures) == ["a.FLAC", "a.wav"]
    assert all("would all write" in reason for _, reason in plan.failures)


def test_torchrun_two_cpu_processes_split_the_files(tmp_path):
    import os
    import subprocess
    import sys

    port = free_port()
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}", str(SCRIPT),
           str(AUDIO_IN), str(out), "--model", str(TINY), "--num_workers", "0", "--no_progress"]
    proc = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=180)
    assert proc.returncode != 0  # the sub-second clip fails in process 1
    assert "extract_mert (process 0/2): extracted 2, skipped 0 existing, failed 0" in proc.stderr, proc.stderr[-3000:]
    assert "extract_mert (process 1/2): extracted 1, skipped 0 existing, failed 1" in proc.stderr, proc.stderr[-3000:]
    assert (out / "failed_extract_mert_1.log").read_text().startswith("banish_misfortune_48k_stereo_f32.wav\t")
    for expected in sorted((EXPECTED / "mert_mean").iterdir()):
        assert np.abs(np.load(out / expected.name) - np.load(expected)).max() < FEATURE_TOLERANCE


def test_an_unexpected_decode_or_write_error_fails_only_its_file(tmp_path, capsys, monkeypatch):
    # Errors no one foresaw (a decoder's RuntimeError, a failing write) are one file's failure, not the batch's;
    # a full disk stops the run instead (tests/test_disk_full.py).
    import errno

    from clamp2.extraction import mert as extraction

    folder = tmp_path / "in"
    shutil.copytree(VECTORS / "inputs" / "audio", folder)
    read_samples, save_npy = extraction.read_samples, extraction.save_npy

    def failing_read(path, *args, **kwargs):
        if "16k" in str(path):
            raise RuntimeError("the decoder gave up")
        return read_samples(path, *args, **kwargs)

    def failing_save(path, array):
        if "22k05" in str(path):
            raise OSError(errno.EIO, "Input/output error")
        return save_npy(path, array)

    monkeypatch.setattr(extraction, "read_samples", failing_read)
    monkeypatch.setattr(extraction, "save_npy", failing_save)
    out = tmp_path / "out"
    assert load_script().main([str(folder), str(out), "--model", str(TINY), "--num_workers", "0", "--no_progress"]) == 1
    err = capsys.readouterr().err
    assert "extracted 1, skipped 0 existing, failed 3" in err  # the 0.5 s file has no window, as ever
    assert "bwv26.6_16k_stereo_s16.flac: RuntimeError: the decoder gave up" in err
    assert "banish_misfortune_22k05_mono_s16.wav" in err and "Input/output error" in err
    assert sorted(p.name for p in out.glob("*.npy")) == ["bwv26.6_44k1_stereo_s16.npy"]


def test_a_rate_whose_resampling_filter_would_take_gigabytes_is_one_failure_on_either_path(tiny_model, tmp_path,
                                                                                           monkeypatch):
    # With --resample_on_device the filter was built in the main process: its allocation error ended the run with a
    # traceback (and without a memory limit the process was killed). It must be the file's failure, the batch going on.
    from clamp2.extraction import audio

    real = audio.sinc_kernel
    monkeypatch.setattr(audio, "sinc_kernel", lambda o, n: (_ for _ in ()).throw(MemoryError("filter built"))
                        if o == 47873 else real(o, n))
    soundfile.write(tmp_path / "a_odd.wav", np.full((47873 * 2, 1), 0.1, np.float32), 47873)
    shutil.copy(AUDIO_IN / "bwv26.6_16k_stereo_s16.flac", tmp_path / "b.flac")
    for on_device in (False, True):
        extractor = MertFeatureExtractor(tiny_model, "cpu", resample_on_device=on_device)
        results = {i: (array, error) for i, array, error in extractor.iter_files([tmp_path / "a_odd.wav",
                                                                                  tmp_path / "b.flac"])}
        assert results[0][0] is None and results[0][1].startswith("sample rate 47873 Hz cannot be resampled")
        assert results[1][1] is None and results[1][0].shape[0] == 1
