"""Audio in (SPEC §16): decoding, resampling to 24 kHz, whole-track z-score, 5-second windows.

The reference decodes with torchaudio and resamples with ``torchaudio.transforms.Resample``; no
torchaudio build works with this project's torch, so both are done here: ``soundfile``
(libsndfile: WAV, FLAC, OGG/Vorbis/Opus, MP3 through its mpg123 decoder) decodes, and
:func:`resample` reproduces torchaudio's default windowed-sinc resampler to the last float32 bit.
"""

from __future__ import annotations

import io
import math
import os
import re
import sys
from functools import lru_cache
from typing import List, Tuple

import numpy as np
import torch

MERT_SAMPLE_RATE = 24000
WINDOW_SAMPLES = 5 * MERT_SAMPLE_RATE  # one MERT window: 5 s
MIN_WINDOW_SAMPLES = MERT_SAMPLE_RATE  # a last window shorter than 1 s is dropped
AUDIO_EXTENSIONS = (".wav", ".mp3", ".flac", ".ogg")
NORM_EPSILON = 1e-7  # Wav2Vec2FeatureExtractor's zero-mean unit-variance epsilon

# torchaudio.transforms.Resample defaults (sinc_interp_hann).
LOWPASS_FILTER_WIDTH = 6
ROLLOFF = 0.99
# The largest resampling filter built (n phases x taps): 2^26 elements is 256 MiB in float32, 512 MiB per float64
# temporary. Every usual rate needs under 52,000 (8-384 kHz: at most 11,025 Hz's 51,520); a rate sharing almost no
# factor with 24,000 (44,101 Hz, 47,999 Hz, or a corrupt header's 47,873 Hz) needs over 10^9: 4-9 GiB per
# temporary, which got the process killed for memory (a worker's death stops the whole batch).
MAX_FILTER_ELEMENTS = 1 << 26
# soundfile allocates a read's whole array from the header's frame count before decoding: a FLAC whose STREAMINFO
# says 2^36 frames in 75 KB asked for 512 GiB (a MemoryError). Up to 2^31 samples (8 GiB of float32, reserved but
# only touched as frames are decoded; 6.7 hours of 44.1 kHz stereo) the header is trusted, as before; past it, the
# file is read in blocks of READ_BLOCK_FRAMES, to its real end. Not lower: an MP3 read in blocks may differ from one
# read by an ulp after the first block (libsndfile's mpg123 path), and real recordings must decode as the original's.
MAX_PREALLOCATED_SAMPLES = 1 << 31
READ_BLOCK_FRAMES = 1 << 20


class AudioError(ValueError):
    """An audio file that gives no MERT input: undecodable, empty, or shorter than one window."""


def decode(path: str | os.PathLike) -> Tuple[np.ndarray, int]:
    """``(samples [channels, frames] float32, sample rate)``; integer PCM scaled by 1/2^(bits-1).

    libsndfile's float read of integer PCM divides by 2^(bits-1) (int16/32768, int32/2^31), which
    is what torchaudio gives; float files come out as stored.
    """
    frames, rate = decode_frames(path)
    return np.ascontiguousarray(frames.T), rate


def decode_frames(path: str | os.PathLike) -> Tuple[np.ndarray, int]:
    """:func:`decode` as libsndfile gives it: ``[frames, channels]``, interleaved."""
    if os.path.getsize(path) == 0:
        raise AudioError("empty file (0 bytes)")
    data, rate = _read_all(os.fspath(path))
    if data.shape[0] == 0:
        patched = wav_read_to_end(path)
        if patched is not None:
            data, rate = _read_all(patched)
    return data, rate


NOT_A_FILE = "File does not exist or is not a regular file"


def _openable(source):
    """What soundfile can open: a path whose name is not valid UTF-8 (a Latin-1 name from an old archive, which
    Python holds with surrogate escapes) as its bytes; soundfile encodes a str path strictly and failed on it."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if isinstance(path, str):
            try:
                path.encode(sys.getfilesystemencoding())
            except UnicodeEncodeError:
                return os.fsencode(path)
        return path
    return source


def _read_all(source) -> Tuple[np.ndarray, int]:
    """soundfile.read's float32 frames, with a failure named by where it happened: the header or the data."""
    import soundfile

    errors = (soundfile.LibsndfileError, RuntimeError, TypeError, ValueError)
    try:
        sound = soundfile.SoundFile(_openable(source))
    except errors as exc:
        message = ' '.join(str(exc).split())
        if isinstance(source, (str, os.PathLike)):
            try:  # libsndfile says only "System error." for a file the user may not read
                open(source, "rb").close()
            except OSError as error:
                raise AudioError(f"cannot read the file: {error.strerror or error}") from None
        if NOT_A_FILE in message and isinstance(source, (str, os.PathLike)) and os.path.isfile(source):
            # libsndfile's words for a file it took for MP3 by its name but found no MPEG frame in (a saved
            # error page, a download cut in its first frame): the file is there.
            message = re.sub(re.escape(NOT_A_FILE) + r"[^.]*\.?",
                             f"no audio frame found (libsndfile reports it as '{NOT_A_FILE}')", message)
        raise AudioError(f"cannot decode audio ({message})") from None
    with sound:
        try:
            return read_frames(sound), int(sound.samplerate)
        except errors as exc:
            if sound.format == "FLAC":
                cut = flac_before_cut(source)
                if cut is not None:
                    return cut, int(sound.samplerate)
            # libsndfile says only "Unspecified internal error" when an MP3's frames are damaged partway.
            raise AudioError(f"cannot decode audio: its {sound.format} data is damaged after a valid header "
                             f"({' '.join(str(exc).split())})") from None


def read_frames(sound) -> np.ndarray:
    """``sound.read(dtype="float32", always_2d=True)``, in blocks when the header declares over
    :data:`MAX_PREALLOCATED_SAMPLES`: memory follows the frames there are, not the frames declared."""
    if max(sound.frames, 0) * sound.channels <= MAX_PREALLOCATED_SAMPLES:
        return sound.read(dtype="float32", always_2d=True)
    blocks = []
    while len(block := sound.read(READ_BLOCK_FRAMES, dtype="float32", always_2d=True)) > 0:
        blocks.append(block)
        if len(block) < READ_BLOCK_FRAMES:
            break
    return np.concatenate(blocks) if blocks else np.zeros((0, sound.channels), np.float32)


def flac_before_cut(source) -> np.ndarray | None:
    """The frames of a FLAC cut short (an interrupted download or copy) before its cut, else None.

    libsndfile fails the whole read at the cut frame ("flac decoder lost sync", "Internal psf_fseek()
    failed"), where FFmpeg decodes every whole frame before it, as libsndfile itself does for a cut MP3,
    WAV or Ogg file. Every frame returned has passed libFLAC's CRC check. A stream that goes on after
    the damage (libFLAC can still seek to its last frame) gives None: damage in the middle stays a failure.
    """
    import soundfile

    if not isinstance(source, (str, os.PathLike)):
        return None
    with soundfile.SoundFile(_openable(source)) as sound:
        blocks, decoded = [], 0
        while True:  # in blocks: the header's frame count may be a lie (read_frames)
            frames = np.zeros((min(max(sound.frames - decoded, 0), READ_BLOCK_FRAMES), sound.channels), np.float32)
            try:
                # libsndfile's own read, which returns how many frames it decoded before the error (soundfile's
                # read raises without saying); soundfile's private handles, so another soundfile version may lack
                # them.
                count = soundfile._snd.sf_readf_float(sound._file, soundfile._ffi.cast("float *", frames.ctypes.data),
                                                      len(frames))
            except AttributeError:
                return None
            blocks.append(frames[:max(count, 0)])
            decoded += max(count, 0)
            if count < len(frames) or len(frames) == 0:
                break
        frames = np.concatenate(blocks)
    with soundfile.SoundFile(_openable(source)) as sound:
        try:
            sound.seek(sound.frames - 1)
            if len(sound.read(1, dtype="float32")) == 1:
                return None  # the stream goes on after the damage: not a cut
        except (soundfile.LibsndfileError, RuntimeError, ValueError):
            pass
    return frames[:decoded] if decoded > 0 else None


def wav_read_to_end(path: str | os.PathLike) -> io.BytesIO | None:
    """A WAV whose ``data`` chunk declares 0 bytes, as a copy declaring the rest of the file; else None.

    A recorder killed before it patched its header leaves the size 0. FFmpeg (torchaudio's decoder where
    it is installed, as for the reference vectors) reads such a ``data`` chunk to the end of the file;
    libsndfile reads no frame, and a file with no frame has no feature.
    """
    with open(path, "rb") as handle:
        head = handle.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return None
        offset = 12
        while True:
            handle.seek(offset)
            chunk = handle.read(8)
            if len(chunk) < 8:
                return None
            size = int.from_bytes(chunk[4:8], "little")
            if chunk[:4] == b"data":
                break
            offset += 8 + size + (size & 1)  # chunks are padded to an even length
        if size != 0:
            return None
        handle.seek(0)
        whole = bytearray(handle.read())
    data_bytes = min(len(whole) - offset - 8, 0xFFFFFFFF)
    if data_bytes <= 0:
        return None
    whole[offset + 4:offset + 8] = data_bytes.to_bytes(4, "little")
    if int.from_bytes(whole[4:8], "little") == 0:
        whole[4:8] = min(len(whole) - 8, 0xFFFFFFFF).to_bytes(4, "little")
    return io.BytesIO(bytes(whole))


def to_mono(samples: np.ndarray) -> np.ndarray:
    """[channels, frames] → [frames]: the arithmetic mean of the channels (float32, as torch's mean)."""
    if samples.shape[0] == 1:
        return samples[0]
    return frames_to_mono(np.ascontiguousarray(samples.T))


def frames_to_mono(frames: np.ndarray) -> np.ndarray:
    """:func:`to_mono` of ``[frames, channels]`` without transposing first (hot in MERT's workers).

    One or two channels (nearly all audio): the same bits as torch's mean, whose sum of two float32
    values is one rounding and whose halving is exact; three or more keep torch's order of sums over
    the reference's layout: torchaudio.load (soundfile and FFmpeg backends alike) returns the transpose
    of the decoder's [frames, channels] buffer, so its channel mean sums each frame's contiguous
    channels. Summed over a contiguous [channels, frames] copy instead, 5, 6 and 7 channels come out
    one float32 rounding off for about half the samples.
    """
    if frames.shape[1] == 1:
        return np.ascontiguousarray(frames[:, 0])
    if frames.shape[1] == 2:
        return (frames[:, 0] + frames[:, 1]) / np.float32(2)
    return torch.from_numpy(np.ascontiguousarray(frames)).t().mean(dim=0).numpy()


def filter_elements(orig_rate: int, new_rate: int = MERT_SAMPLE_RATE) -> int:
    """Elements of :func:`sinc_kernel`'s filter for this pair of rates (n phases x (2·width + o) taps)."""
    g = math.gcd(int(orig_rate), int(new_rate))
    o, n = int(orig_rate) // g, int(new_rate) // g
    return n * (2 * math.ceil(LOWPASS_FILTER_WIDTH * o / (min(o, n) * ROLLOFF)) + o)


def check_resampling(orig_rate: int, new_rate: int = MERT_SAMPLE_RATE) -> None:
    """An :class:`AudioError` for a rate whose resampling filter would exceed :data:`MAX_FILTER_ELEMENTS`."""
    if int(orig_rate) <= 0:
        raise AudioError(f"sample rate {orig_rate} Hz: not a rate")
    elements = filter_elements(orig_rate, new_rate)
    if elements > MAX_FILTER_ELEMENTS:
        raise AudioError(f"sample rate {orig_rate} Hz cannot be resampled to {new_rate} Hz: the rates share no large "
                         f"common factor, and torchaudio's filter for them would take {elements * 8 / 2 ** 30:.1f} GiB")


@lru_cache(maxsize=32)
def sinc_kernel(orig_rate: int, new_rate: int) -> Tuple[torch.Tensor, int, int, int]:
    """``(kernel [n, 1, 2·width + o] float32, width, o, n)`` of torchaudio's default resampler.

    Built in float64 and rounded to float32, with torchaudio's operation order (its ``-j/n`` is an
    integer tensor divided in float32 before it meets the float64 taps): any other order moves the
    last bit of some taps.
    """
    g = math.gcd(int(orig_rate), int(new_rate))
    o, n = int(orig_rate) // g, int(new_rate) // g
    base = min(o, n) * ROLLOFF
    width = math.ceil(LOWPASS_FILTER_WIDTH * o / base)
    taps = torch.arange(-width, width + o, dtype=torch.float64)[None, None] / o
    t = torch.arange(0, -n, -1)[:, None, None] / n + taps
    t *= base
    t = t.clamp_(-LOWPASS_FILTER_WIDTH, LOWPASS_FILTER_WIDTH)
    window = torch.cos(t * math.pi / LOWPASS_FILTER_WIDTH / 2) ** 2
    t *= math.pi
    scale = base / o
    kernel = torch.where(t == 0, torch.tensor(1.0).to(t), t.sin() / t)
    kernel *= window * scale
    return kernel.to(torch.float32), width, o, n


def resampled_length(length: int, orig_rate: int, new_rate: int = MERT_SAMPLE_RATE) -> int:
    """Samples kept after resampling: torchaudio's ``ceil(as_tensor(n * length / o))``.

    ``torch.as_tensor`` of a Python float is float32 (torch's default dtype), so the quotient is
    rounded to float32 before the ceiling: one sample fewer than the exact ceiling whenever it lies
    just above a whole number (~18% of 1-5 min tracks at 44.1 kHz: 240,854 samples give 131,077,
    not 131,078). Past 2^23 output samples (~6 min at 24 kHz) float32 steps by 1 or more, so the
    last window's length, and whether it is kept, can change too.
    """
    g = math.gcd(int(orig_rate), int(new_rate))
    o, n = int(orig_rate) // g, int(new_rate) // g
    return math.ceil(float(np.float32(n * length / o)))


def resample(wave: np.ndarray, orig_rate: int, new_rate: int = MERT_SAMPLE_RATE) -> np.ndarray:
    """[frames] float32 at ``orig_rate`` → [:func:`resampled_length`] float32 at ``new_rate`` (unchanged if equal)."""
    if int(orig_rate) == int(new_rate):
        return wave
    return resample_tensor(torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32)), orig_rate, new_rate).numpy()


def resample_tensor(wave: torch.Tensor, orig_rate: int, new_rate: int = MERT_SAMPLE_RATE) -> torch.Tensor:
    """:func:`resample` of a float32 tensor on any device (on the CPU the same operations, to the bit).

    The convolution runs in fp32 (:func:`_full_precision_convolutions`): cuDNN's default TF32 would round
    the samples to 10 mantissa bits, a caller's autocast to 8.
    """
    if int(orig_rate) == int(new_rate):
        return wave
    check_resampling(orig_rate, new_rate)
    kernel, width, o, n = sinc_kernel(int(orig_rate), int(new_rate))
    length = wave.shape[-1]
    x = torch.nn.functional.pad(wave.view(1, 1, -1), (width, width + o))
    with torch.no_grad(), _full_precision_convolutions():
        phases = torch.nn.functional.conv1d(x, kernel.to(wave.device), stride=o)  # [1, n, frames]
    return phases.transpose(1, 2).reshape(-1)[: resampled_length(length, orig_rate, new_rate)]


def _full_precision_convolutions():
    """fp32 whatever the caller set: TF32 off (CUDA), and a caller's autocast off on any device (a CPU bf16
    autocast made the samples bf16, and the API's audio failed on them)."""
    from ..attention import ExactFloat32

    return ExactFloat32()


def normalize(wave: np.ndarray) -> np.ndarray:
    """One z-score over the whole track: ``(x - mean) / sqrt(var + 1e-7)`` in float32 (numpy's sums)."""
    wave = np.asarray(wave, dtype=np.float32)
    return (wave - wave.mean()) / np.sqrt(wave.var() + NORM_EPSILON)


def normalize_tensor(wave: torch.Tensor) -> torch.Tensor:
    """:func:`normalize` in torch on the wave's device (float32; sums in another order: ~1e-7 relative)."""
    variance, mean = torch.var_mean(wave, correction=0)
    return (wave - mean) / torch.sqrt(variance + NORM_EPSILON)


def z_score_may_overflow(mono: np.ndarray, rate: int) -> bool:
    """Whether :func:`normalize`'s float32 sums (the reference's) might overflow on this decoded wave once
    resampled, a bound from its peak: |x - mean| ≤ 2·peak, and the windowed-sinc resampler overshoots
    a peak by well under 25%. torch's ``var_mean`` (:func:`normalize_tensor`) may not overflow there,
    and so may give other values than the reference's (all zeros for an infinite variance, NaN for an
    infinite mean). Never true of real audio: it takes samples near 1e17 for a few seconds."""
    peak = float(np.abs(mono).max(initial=0.0))  # finite: load_mono refuses NaN and infinite samples
    bound = (2.5 * peak) ** 2 * max(len(mono), resampled_length(len(mono), rate))  # float64: no overflow here
    return not bound < float(np.finfo(np.float32).max)


def too_large_to_normalize(peak: float) -> str:
    return f"samples too large to z-score in float32 (up to {peak:.3g}): its features would all be NaN"


def load_mono(path: str | os.PathLike) -> Tuple[np.ndarray, int]:
    """``(channel mean [frames] float32, sample rate)`` of an audio file; no samples is an :class:`AudioError`."""
    frames, rate = decode_frames(path)
    if frames.shape[0] == 0:
        raise AudioError("empty audio (no samples)")
    if not np.isfinite(frames).all():
        # One NaN (a float file can hold them) turns the track's z-score, and so every feature, into NaN:
        # the reference writes such features silently.
        bad = int(np.count_nonzero(~np.isfinite(frames)))
        raise AudioError(f"{bad} non-finite sample{'s' if bad > 1 else ''} (NaN or infinity) in the audio: "
                         "its features would all be NaN")
    return frames_to_mono(frames), rate


def load_wave(path: str | os.PathLike, normalized: bool = True) -> np.ndarray:
    """A file's MERT input: decoded, channels averaged, resampled to 24 kHz, z-scored ([N] float32)."""
    mono, rate = load_mono(path)
    return mert_input(mono, rate) if normalized else resample(mono, rate)


def mert_input(mono: np.ndarray, rate: int) -> np.ndarray:
    """:func:`load_wave` of a decoded channel mean: resampled to 24 kHz and z-scored ([N] float32)."""
    wave = resample(mono, rate)
    with np.errstate(over="ignore", invalid="ignore"):  # reported below as one line, not numpy's warnings
        wave = normalize(wave)
    if not np.isfinite(wave).all():  # finite samples near float32's limit: the mean or variance overflows
        raise AudioError(too_large_to_normalize(float(np.abs(mono).max())))
    return wave


def window_bounds(length: int) -> List[Tuple[int, int]]:
    """``(start, end)`` of the 5-s windows of a 24 kHz track; a last window under 1 s is dropped."""
    bounds = []
    for start in range(0, length, WINDOW_SAMPLES):
        end = min(start + WINDOW_SAMPLES, length)
        if end - start >= MIN_WINDOW_SAMPLES:
            bounds.append((start, end))
    return bounds


def track_windows(length: int) -> List[Tuple[int, int]]:
    """:func:`window_bounds` of a track of ``length`` 24 kHz samples; none is an :class:`AudioError`."""
    bounds = window_bounds(length)
    if not bounds:
        raise AudioError(f"shorter than 1 s ({length} samples at 24 kHz, a window needs {MIN_WINDOW_SAMPLES}): "
                         "no MERT window")
    return bounds


def load_windows(path: str | os.PathLike) -> Tuple[np.ndarray, List[Tuple[int, int]]]:
    """``(normalized 24 kHz wave, window bounds)``; a track without a window is an :class:`AudioError`."""
    wave = load_wave(path)
    return wave, track_windows(len(wave))
