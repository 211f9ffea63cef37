"""Decoding, the 24 kHz resampler, the z-score and the windows (SPEC §16), and the audio renderer."""

import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch

from clamp2.extraction import audio
from clamp2.quickstart import audio_render

VECTORS = Path(__file__).parent / "data" / "vectors_clamp3"
AUDIO_IN = VECTORS / "inputs" / "audio"
EXPECTED = VECTORS / "expected"


def reference_resample(wave: np.ndarray, orig: int, new: int = 24000) -> np.ndarray:
    """§16's formula written independently: float64 taps rounded to float32, a float64 direct sum."""
    g = math.gcd(orig, new)
    o, n = orig // g, new // g
    base = min(o, n) * 0.99
    width = math.ceil(6 * o / base)
    k = np.arange(-width, width + o, dtype=np.float64)
    j = (-np.arange(n) / np.float32(n)).astype(np.float32).astype(np.float64)  # torch: int tensor / n in float32
    t = np.clip((k[None, :] / o + j[:, None]) * base, -6, 6)
    taps = (np.sinc(t) * np.cos(np.pi * t / 12) ** 2 * base / o).astype(np.float32).astype(np.float64)
    padded = np.concatenate([np.zeros(width), wave.astype(np.float64), np.zeros(width + o)])
    steps = (len(padded) - taps.shape[1]) // o + 1
    frames = np.lib.stride_tricks.sliding_window_view(padded, taps.shape[1])[::o][:steps]
    out = (frames @ taps.T).reshape(-1)  # [steps, n] → phases interleaved
    return out[: math.ceil(n * len(wave) / o)]


@pytest.mark.parametrize("orig", [8000, 16000, 22050, 44100, 48000, 96000])
def test_resampler_matches_the_formula_in_float64(orig):
    rng = np.random.default_rng(orig)
    wave = (rng.standard_normal(orig // 3) * 0.3).astype(np.float32)
    ours = audio.resample(wave, orig)
    ref = reference_resample(wave, orig)
    assert ours.dtype == np.float32 and ours.shape == ref.shape == (math.ceil(24000 * len(wave) / orig),)
    assert np.abs(ours - ref).max() < 1e-6


def test_resampler_kernel_taps_are_the_float64_formula_rounded():
    kernel, width, o, n = audio.sinc_kernel(44100, 24000)
    assert (o, n, width) == (147, 80, math.ceil(6 * 147 / (80 * 0.99)))
    assert kernel.shape == (n, 1, 2 * width + o)
    k = np.arange(-width, width + o) / o
    t = np.clip((k - np.float32(3) / np.float32(80)) * 80 * 0.99, -6, 6)  # phase j = 3, -j/n in float32
    expected = np.sinc(t) * np.cos(np.pi * t / 12) ** 2 * 80 * 0.99 / o
    assert np.abs(kernel[3, 0].double().numpy() - expected).max() < 1e-8


def test_same_rate_is_not_resampled():
    wave = np.arange(10, dtype=np.float32)
    assert audio.resample(wave, 24000) is wave


@pytest.mark.parametrize("path", sorted(AUDIO_IN.iterdir()), ids=lambda p: p.name)
def test_waves_match_the_reference_pipeline(path):
    raw = audio.load_wave(path, normalized=False)
    expected = np.load(EXPECTED / "wave_24k" / (path.stem + ".npy"))
    assert raw.shape == expected.shape[1:]
    assert np.abs(raw - expected[0]).max() <= 1e-6  # 0.0 here: torchaudio's resampler bit for bit
    normalized = audio.normalize(raw)
    expected = np.load(EXPECTED / "wave_24k_norm" / (path.stem + ".npy"))
    assert np.abs(normalized - expected[0]).max() <= 1e-6  # a float32 ulp: numpy's summation order


@pytest.mark.parametrize("subtype,scale", [("PCM_16", 2 ** 15), ("PCM_24", 2 ** 23), ("PCM_32", 2 ** 31)])
def test_integer_pcm_is_scaled_by_two_to_the_bits_minus_one(tmp_path, subtype, scale):
    ints = np.array([[0, 0], [1, -1], [scale - 1, -scale], [12345, 678]], dtype=np.int64)
    path = tmp_path / "x.wav"
    dtype = "int16" if subtype == "PCM_16" else "int32"
    stored = ints * (1 if subtype != "PCM_24" else 256)  # soundfile writes int32 data as its top 24 bits
    soundfile.write(path, stored.astype(dtype), 8000, subtype=subtype)
    samples, rate = audio.decode(path)
    assert rate == 8000 and samples.dtype == np.float32 and samples.shape == (2, 4)
    assert np.array_equal(samples, (ints.T / scale).astype(np.float32))
    assert np.array_equal(audio.to_mono(samples), ((samples[0] + samples[1]) / 2).astype(np.float32))


def test_normalize_is_one_z_score_over_the_whole_track():
    wave = np.concatenate([np.full(1000, 0.5), np.full(3000, -0.1)]).astype(np.float32)
    out = audio.normalize(wave)
    assert out.dtype == np.float32
    assert abs(float(out.mean())) < 1e-6 and abs(float(out.std()) - 1) < 1e-4
    assert np.all(audio.normalize(np.zeros(100, np.float32)) == 0)  # silence: no NaN


@pytest.mark.parametrize("length,bounds", [
    (268800, [(0, 120000), (120000, 240000), (240000, 268800)]),
    (240000, [(0, 120000), (120000, 240000)]),
    (263999, [(0, 120000), (120000, 240000)]),  # last 23,999 samples: under 1 s, dropped
    (264000, [(0, 120000), (120000, 240000), (240000, 264000)]),
    (24000, [(0, 24000)]),
    (12000, []),
])
def test_windows(length, bounds):
    assert audio.window_bounds(length) == bounds


def test_bad_files_are_audio_errors(tmp_path):
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF\x00\x00not really audio")
    with pytest.raises(audio.AudioError, match="cannot decode"):
        audio.load_windows(broken)
    empty = tmp_path / "empty.flac"
    soundfile.write(empty, np.zeros((0, 1), np.float32), 16000, format="FLAC")
    with pytest.raises(audio.AudioError, match="empty"):
        audio.load_windows(empty)
    short = tmp_path / "short.wav"
    soundfile.write(short, np.ones(15000, np.float32) * 0.1, 16000)  # 0.94 s
    with pytest.raises(audio.AudioError, match=r"shorter than 1 s \(22500 samples at 24 kHz, a window needs 24000\)"):
        audio.load_windows(short)
    # One NaN in a float file would make the z-score, and every feature, NaN: a failure, not a silent NaN file.
    samples = np.full((48000, 2), 0.1, np.float32)
    samples[100, 1] = np.nan
    soundfile.write(tmp_path / "nan.wav", samples, 24000, subtype="FLOAT")
    with pytest.raises(audio.AudioError, match="1 non-finite sample .NaN or infinity."):
        audio.load_windows(tmp_path / "nan.wav")
    samples[100] = [np.inf, -np.inf]  # counted per sample, not per frame (their mean alone would be NaN)
    soundfile.write(tmp_path / "inf.wav", samples, 24000, subtype="FLOAT")
    with pytest.raises(audio.AudioError, match="2 non-finite samples"):
        audio.load_windows(tmp_path / "inf.wav")
    # finite, but the track's float32 mean overflows: the z-score would be NaN everywhere
    soundfile.write(tmp_path / "huge.wav", np.full((48000, 1), 3e38, np.float32), 24000, subtype="FLOAT")
    with pytest.raises(audio.AudioError, match="too large to z-score"):
        audio.load_windows(tmp_path / "huge.wav")


def test_wav_data_size_zero_reads_to_end_of_file(tmp_path):
    # A recorder killed before patching its header leaves the data size (and often the RIFF size) 0:
    # FFmpeg, which the reference decodes with, reads such a data chunk to the end of the file.
    frames = (np.arange(30001 * 2, dtype=np.int16) % 2000 - 1000).reshape(-1, 2)
    fmt = (b"fmt " + (16).to_bytes(4, "little") + (1).to_bytes(2, "little") + (2).to_bytes(2, "little")
           + (22050).to_bytes(4, "little") + (22050 * 4).to_bytes(4, "little") + (4).to_bytes(2, "little")
           + (16).to_bytes(2, "little"))
    note = b"LIST" + (3).to_bytes(4, "little") + b"abc\x00"  # odd size: padded to an even length
    body = b"WAVE" + fmt + note + b"data" + (0).to_bytes(4, "little") + frames.tobytes()
    unpatched = tmp_path / "unpatched.wav"
    unpatched.write_bytes(b"RIFF" + (0).to_bytes(4, "little") + body)
    patched = tmp_path / "patched.wav"
    soundfile.write(patched, frames, 22050, subtype="PCM_16")
    samples, rate = audio.decode(unpatched)
    assert rate == 22050 and samples.shape == (2, 30001)
    assert np.array_equal(samples, audio.decode(patched)[0])
    header_only = tmp_path / "header_only.wav"
    header_only.write_bytes(b"RIFF" + (0).to_bytes(4, "little") + body[:-frames.nbytes])
    with pytest.raises(audio.AudioError, match="empty audio"):
        audio.load_windows(header_only)


@pytest.fixture(scope="module")
def chorale_midi(tmp_path_factory):
    return audio_render.corpus_midi("bach/bwv66.6", tmp_path_factory.mktemp("midi") / "bwv66.6.mid")


def test_render_music21_corpus_piece(chorale_midi, tmp_path):
    wav = audio_render.render_midi(chorale_midi, tmp_path / "a" / "bwv66.6.wav", sample_rate=22050, seconds=3)
    info = soundfile.info(wav)
    assert (info.samplerate, info.channels, info.frames, info.subtype) == (22050, 2, 3 * 22050, "PCM_16")
    samples, _ = audio.decode(wav)
    assert 0.2 < np.abs(samples).max() <= 0.7 + 1e-4  # music, peak-scaled
    assert np.sqrt((samples ** 2).mean()) > 0.01
    mono = audio_render.render_midi(chorale_midi, tmp_path / "m.flac", sample_rate=16000, seconds=2, channels=1,
                                    program=40)
    assert soundfile.info(mono).channels == 1 and soundfile.info(mono).format == "FLAC"
    assert not list(tmp_path.rglob("*.partial"))


def test_mp3_decodes_close_to_the_wav_of_the_same_audio(chorale_midi, tmp_path):
    samples = audio_render.synthesize_midi(chorale_midi, 44100)[: 44100 * 3]
    samples = samples * np.float32(0.7 / np.abs(samples).max())
    audio_render.write_audio(tmp_path / "x.wav", samples, 44100)
    audio_render.write_audio(tmp_path / "x.mp3", samples, 44100)
    wav = audio.load_wave(tmp_path / "x.wav", normalized=False)
    mp3 = audio.load_wave(tmp_path / "x.mp3", normalized=False)
    assert mp3.shape == wav.shape  # libsndfile trims the encoder delay: no shift
    assert np.sqrt(((wav - mp3) ** 2).mean()) < 0.05 * np.sqrt((wav ** 2).mean())


FFMPEG_DECODES = Path(__file__).parent / "data" / "ffmpeg_decodes"


@pytest.mark.parametrize("name", sorted(json.loads((FFMPEG_DECODES / "reference.json").read_text())["files"]))
def test_compressed_audio_decodes_to_ffmpegs_samples(name):
    # The reference decodes with torchaudio: FFmpeg's decoders where installed; libsndfile's (mpg123, libvorbis) must give
    # the same frames: same count (encoder delay and padding trimmed alike, or not at all without a Xing header),
    # same alignment, values within decoder rounding (measured: MP3 1.3e-6, Vorbis 1.5e-7).
    about = json.loads((FFMPEG_DECODES / "reference.json").read_text())
    expected = about["files"][name]
    reference = np.load(FFMPEG_DECODES / "reference.npz")
    samples, rate = audio.decode(FFMPEG_DECODES / name)
    assert (rate, samples.shape) == (expected["rate"], (expected["channels"], expected["frames"]))
    edge, block = about["edge_frames"], about["block_frames"]
    tolerance = 3e-6 if name.endswith(".mp3") else 1e-6
    assert np.abs(samples[:, :edge] - reference[f"{name}/head"]).max() < tolerance
    assert np.abs(samples[:, -edge:] - reference[f"{name}/tail"]).max() < tolerance
    whole = samples.shape[1] // block * block
    means = samples[:, :whole].reshape(samples.shape[0], -1, block).mean(axis=2, dtype=np.float64)
    assert np.abs(means - reference[f"{name}/block_means"]).max() < tolerance


def test_damaged_and_truncated_mp3(tmp_path):
    # A run of zeros inside the frames: libsndfile gives up partway with "Unspecified internal error";
    # the failure says the data, not the header, is damaged. A cut file decodes up to its last whole frame.
    source = (FFMPEG_DECODES / "lame_44k1_stereo.mp3").read_bytes()
    damaged = tmp_path / "damaged.mp3"
    damaged.write_bytes(source[:len(source) // 2] + b"\0" * 1500 + source[len(source) // 2 + 1500:])
    with pytest.raises(audio.AudioError, match="its MP3 data is damaged after a valid header"):
        audio.decode(damaged)
    cut = tmp_path / "cut.mp3"
    cut.write_bytes(source[:len(source) // 2])
    whole, _ = audio.decode(FFMPEG_DECODES / "lame_44k1_stereo.mp3")
    part, _ = audio.decode(cut)
    assert 0.4 * whole.shape[1] < part.shape[1] < 0.6 * whole.shape[1]
    assert np.abs(part - whole[:, :part.shape[1]]).max() < 1e-6
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt \x02\x00\x00\x00\x01\x00")
    with pytest.raises(audio.AudioError, match=r"^cannot decode audio \(Error opening"):
        audio.decode(broken)


@pytest.mark.parametrize("channels", [1, 2, 3, 6])
def test_mono_from_interleaved_frames_has_the_bits_of_torchs_channel_mean(tmp_path, channels):
    # MERT's workers average the channels without transposing first; the result must not move a bit.
    rng = np.random.default_rng(channels)
    data = (rng.standard_normal((48000, channels)) * rng.choice([1e-6, 1e-3, 0.5, 3.0], size=(48000, channels)))
    path = tmp_path / "x.wav"
    soundfile.write(path, data.astype(np.float32), 16000, subtype="FLOAT")
    samples, rate = audio.decode(path)
    mono, mono_rate = audio.load_mono(path)
    assert mono_rate == rate == 16000 and mono.dtype == np.float32 and mono.flags.c_contiguous
    assert np.array_equal(mono, audio.to_mono(samples))
    for real in sorted(AUDIO_IN.iterdir()):  # the reference vectors' files: mono and stereo, integer and float
        samples, _ = audio.decode(real)
        assert np.array_equal(audio.load_mono(real)[0], audio.to_mono(samples)), real.name


@pytest.mark.parametrize("channels", [3, 5, 6, 7, 8])
def test_channel_mean_has_the_bits_of_the_references_mean_over_torchaudios_transposed_frames(tmp_path, channels):
    # torchaudio.load (soundfile and FFmpeg backends) returns the transpose of the decoded [frames, channels]
    # buffer, and the reference averages that view: torch sums each frame's contiguous channels. Summed over a
    # contiguous [channels, frames] copy, 5-7 channels were one float32 rounding off for about half the samples.
    rng = np.random.default_rng(channels)
    data = rng.uniform(-1, 1, (48000, channels)).astype(np.float32)
    path = tmp_path / "x.wav"
    soundfile.write(path, data, 16000, subtype="FLOAT")
    frames, _ = soundfile.read(path, dtype="float32", always_2d=True)
    reference = torch.mean(torch.from_numpy(frames).t(), dim=0, keepdim=True)[0].numpy()
    assert np.array_equal(audio.load_mono(path)[0], reference)
    assert np.array_equal(audio.to_mono(audio.decode(path)[0]), reference)


def _filter_never_built_for(monkeypatch, rate):
    """sinc_kernel that fails as the real one did for ``rate`` (out of memory), without taking the memory."""
    real = audio.sinc_kernel

    def guarded(orig_rate, new_rate):
        if orig_rate == rate:
            raise MemoryError(f"the {orig_rate} Hz filter was built: {audio.filter_elements(orig_rate, new_rate)} elements")
        return real(orig_rate, new_rate)

    monkeypatch.setattr(audio, "sinc_kernel", guarded)


def test_a_rate_whose_resampling_filter_would_take_gigabytes_is_an_audio_error(tmp_path, monkeypatch):
    # 44,101 Hz shares no factor with 24,000: torchaudio's filter is 24,000 phases x 44,127 taps, 7.9 GiB per
    # float64 temporary. Building it got a decoding worker killed for memory (ending the batch); resampled on the
    # device it ended the run with a traceback. A header byte flipped in a rate field makes such rates (47,873 Hz).
    _filter_never_built_for(monkeypatch, 44101)
    path = tmp_path / "odd_rate.wav"
    soundfile.write(path, np.full(44101, 0.1, np.float32), 44101)
    with pytest.raises(audio.AudioError, match=r"sample rate 44101 Hz cannot be resampled to 24000 Hz.*7\.9 GiB"):
        audio.load_windows(path)
    with pytest.raises(audio.AudioError, match="sample rate 44101 Hz"):
        audio.resample_tensor(torch.zeros(44101), 44101)
    for rate in (8000, 11025, 11127, 12000, 16000, 22050, 22254, 32000, 37800, 44056, 44100, 48000, 64000, 88200,
                 96000, 176400, 192000, 352800, 384000):  # usual rates, and old odd ones with a common factor
        audio.check_resampling(rate)


def test_a_cut_flac_decodes_up_to_its_cut_and_one_damaged_inside_still_fails(tmp_path):
    # An interrupted download or copy: libsndfile failed the whole read ("flac decoder lost sync", "Internal
    # psf_fseek() failed") even for a file missing only its last byte, where it reads a cut MP3, WAV or Ogg up to the
    # cut, and FFmpeg decodes every whole FLAC frame. Every frame kept has passed libFLAC's CRC check.
    rng = np.random.default_rng(0)
    whole = tmp_path / "whole.flac"
    soundfile.write(whole, (rng.standard_normal((44100 * 3, 2)) * 0.1).astype(np.float32), 44100, subtype="PCM_16")
    data = whole.read_bytes()
    clean, rate = audio.decode(whole)
    for keep in (len(data) - 1, len(data) // 2):
        (tmp_path / "cut.flac").write_bytes(data[:keep])
        part, part_rate = audio.decode(tmp_path / "cut.flac")
        assert part_rate == rate and 0 < part.shape[1] < clean.shape[1]
        assert np.array_equal(part, clean[:, :part.shape[1]])
    damaged = bytearray(data)
    damaged[len(data) // 2:len(data) // 2 + 300] = bytes(300)  # frames after the damage remain: not a cut
    (tmp_path / "damaged.flac").write_bytes(bytes(damaged))
    with pytest.raises(audio.AudioError, match="its FLAC data is damaged after a valid header"):
        audio.decode(tmp_path / "damaged.flac")


def declare_flac_frames(path: Path, total: int) -> None:
    """Set the total-samples field (36 bits) of a FLAC's STREAMINFO, the first metadata block."""
    data = bytearray(path.read_bytes())
    assert data[:4] == b"fLaC" and data[4] & 0x7F == 0
    field = int.from_bytes(data[18:26], "big")
    data[18:26] = (field & ~((1 << 36) - 1) | total).to_bytes(8, "big")
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("declared", [1 << 31, (1 << 36) - 1])
def test_a_flac_declaring_more_frames_than_it_holds_decodes_its_frames_in_bounded_memory(tmp_path, declared):
    # soundfile allocates the whole read from the header's frame count: a 75 KB FLAC saying 2^36 frames asked for
    # 512 GiB ("MemoryError: Unable to allocate 512. GiB"), 2^31 frames for 16 GiB. Past MAX_PREALLOCATED_SAMPLES
    # the file is read in blocks, to its real end; a cut one as well (flac_before_cut).
    rng = np.random.default_rng(0)
    whole = tmp_path / "whole.flac"
    soundfile.write(whole, (rng.standard_normal((22050, 2)) * 0.1).astype(np.float32), 44100, subtype="PCM_16")
    clean, rate = audio.decode_frames(whole)
    data = whole.read_bytes()
    for name, body in (("lying.flac", data), ("lying_cut.flac", data[:len(data) * 2 // 3])):
        path = tmp_path / name
        path.write_bytes(body)
        declare_flac_frames(path, declared)
        assert soundfile.info(path).frames == declared
        frames, frames_rate = audio.decode_frames(path)
        assert frames_rate == rate and 0 < len(frames) <= len(clean)
        assert np.array_equal(frames, clean[:len(frames)]) and (len(frames) == len(clean)) == (body == data)
        assert (frames if frames.base is None else frames.base).nbytes == frames.nbytes  # no 8 GiB buffer behind it


def test_reading_in_blocks_gives_the_whole_reads_samples(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((30000, 3)) * 0.1).astype(np.float32)
    for name, subtype in (("a.wav", "PCM_24"), ("a.flac", "PCM_16"), ("a.ogg", "VORBIS")):
        soundfile.write(tmp_path / name, x, 44100, subtype=subtype)
        whole, _ = audio.decode_frames(tmp_path / name)
        with monkeypatch.context() as patch:
            patch.setattr(audio, "MAX_PREALLOCATED_SAMPLES", 0)
            patch.setattr(audio, "READ_BLOCK_FRAMES", 4096)
            blocks, _ = audio.decode_frames(tmp_path / name)
        assert blocks.dtype == np.float32 and np.array_equal(blocks.view(np.uint32), whole.view(np.uint32))


def test_a_file_named_mp3_without_audio_is_not_said_to_be_missing(tmp_path):
    # A saved error page, or a download cut inside its first frame: libsndfile says "File does not exist or is not a
    # regular file (possibly a pipe?)" of a file that is there.
    page = tmp_path / "song.mp3"
    page.write_text("<html><body>404 Not Found</body></html>\n" * 50)
    with pytest.raises(audio.AudioError, match=r"^cannot decode audio \(Error opening .*song\.mp3': no audio frame found"):
        audio.decode(page)


@pytest.mark.skipif(sys.platform == "win32" or sys.getfilesystemencoding().lower() != "utf-8",
                    reason="a file name that is not UTF-8 needs a POSIX file system decoded as UTF-8")
def test_an_audio_file_whose_name_is_not_utf8_is_decoded(tmp_path):
    # A Latin-1 name from an old archive ("Café" as b"Caf\xe9"): Python holds it as "Caf\udce9", which soundfile
    # encodes strictly: "cannot decode audio ('utf-8' codec can't encode character '\udce9' ...)" of a good file.
    good = tmp_path / "good.wav"
    soundfile.write(good, np.full((24000, 2), 0.25, np.float32), 24000, subtype="FLOAT")
    latin = os.path.join(os.fsencode(tmp_path), b"Caf\xe9 au lait.wav")
    os.rename(os.fsencode(good), latin)
    path = tmp_path / os.fsdecode(b"Caf\xe9 au lait.wav")
    samples, rate = audio.decode(path)
    assert rate == 24000 and samples.shape == (2, 24000) and np.all(samples == 0.25)
    flac = tmp_path / "whole.flac"  # the cut-FLAC path opens the file again
    soundfile.write(flac, np.random.default_rng(0).uniform(-0.5, 0.5, (44100, 1)).astype(np.float32), 44100)
    cut = tmp_path / os.fsdecode(b"cut \xe9.flac")
    cut.write_bytes(flac.read_bytes()[:-1])
    assert 0 < audio.decode(cut)[0].shape[1] < 44100
