"""Real audio without downloads: music21 corpus pieces → MIDI → WAV/FLAC/OGG/MP3 (tests, demos, benchmarks).

MIDI is rendered with TinySoundFont (``tinysoundfont``) and the General MIDI SoundFont that the
``pretty_midi`` wheel ships (``TimGM6mb.sf2``). Where ``tinysoundfont`` is not installed (its
``pyaudio`` dependency needs PortAudio headers to build; install it with ``pip install --no-deps
tinysoundfont``), pretty_midi's own sine-wave synthesizer stands in: still the piece's notes and
timing, plainer timbre. Files are written atomically with ``soundfile``.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Optional

import numpy as np

from ..files import atomic_path

# soundfile format and default subtype by extension (the temporary name hides the extension).
_FORMATS = {".wav": ("WAV", "PCM_16"), ".flac": ("FLAC", "PCM_16"), ".ogg": ("OGG", "VORBIS"),
            ".mp3": ("MP3", "MPEG_LAYER_III")}
TAIL_SECONDS = 1.0  # let the last notes ring out
PEAK = 0.7


def soundfont_path() -> Path:
    """pretty_midi's bundled General MIDI SoundFont (TimGM6mb.sf2)."""
    import pretty_midi

    return Path(pretty_midi.__file__).with_name("TimGM6mb.sf2")


def have_soundfont_synth() -> bool:
    try:
        import tinysoundfont  # noqa: F401
    except ImportError:
        return False
    return soundfont_path().is_file()


def _midi_bytes(midi_path: str | os.PathLike, program: Optional[int]) -> bytes:
    """The MIDI file, with every pitched channel switched to ``program`` when one is given."""
    data = Path(midi_path).read_bytes()
    if program is None:
        return data
    import mido

    midi = mido.MidiFile(file=io.BytesIO(data))
    channels = set()
    for track in midi.tracks:
        for i, msg in enumerate(track):
            if msg.type == "program_change":
                track[i] = msg.copy(program=program)
            if hasattr(msg, "channel") and msg.channel != 9:
                channels.add(msg.channel)
    midi.tracks[0][0:0] = [mido.Message("program_change", channel=c, program=program, time=0) for c in sorted(channels)]
    out = io.BytesIO()
    midi.save(file=out)
    return out.getvalue()


def synthesize_midi(midi_path: str | os.PathLike, sample_rate: int = 44100, program: Optional[int] = None,
                    max_seconds: Optional[float] = None) -> np.ndarray:
    """``[frames, 2]`` float32 of the whole piece plus a second of release (at most ``max_seconds``), unscaled."""
    import mido

    data = _midi_bytes(midi_path, program)
    seconds = mido.MidiFile(file=io.BytesIO(data)).length + TAIL_SECONDS
    if max_seconds is not None:
        seconds = min(seconds, max_seconds)
    frames = int(round(seconds * sample_rate))
    if have_soundfont_synth():
        import tinysoundfont
        from tinysoundfont.midi import load_memory

        synth = tinysoundfont.Synth(samplerate=sample_rate)
        synth.sfload(str(soundfont_path()))
        sequencer = tinysoundfont.Sequencer(synth)
        sequencer.add(load_memory(data))
        buffer = synth.generate(frames)
        return np.frombuffer(buffer, dtype=np.float32).reshape(-1, 2)[:frames].copy()
    import pretty_midi

    mono = pretty_midi.PrettyMIDI(io.BytesIO(data)).synthesize(fs=sample_rate).astype(np.float32)
    mono = np.pad(mono, (0, max(0, frames - len(mono))))[:frames]
    return np.stack([mono, mono], axis=1)


def write_audio(path: str | os.PathLike, samples: np.ndarray, sample_rate: int, subtype: Optional[str] = None) -> Path:
    """Write ``[frames, channels]`` float samples atomically; the format follows the extension."""
    import soundfile

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _FORMATS:
        raise ValueError(f"cannot write {path.name}: use one of {', '.join(_FORMATS)}")
    fmt, default_subtype = _FORMATS[suffix]
    with atomic_path(path) as tmp:
        soundfile.write(str(tmp), samples, sample_rate, format=fmt, subtype=subtype or default_subtype)
    return path


def render_midi(midi_path: str | os.PathLike, wav_path: str | os.PathLike, sample_rate: int = 44100,
                seconds: Optional[float] = None, start: float = 0.0, program: Optional[int] = None,
                channels: int = 2, subtype: Optional[str] = None) -> Path:
    """Render a MIDI file to ``wav_path`` (.wav/.flac/.ogg/.mp3), peak-scaled to 0.7.

    ``start``/``seconds`` crop the render (seconds from the start of the piece), ``program`` plays
    every pitched part on one General MIDI program, ``channels`` 1 averages to mono, ``subtype`` is
    soundfile's (``PCM_16`` default, ``FLOAT``, ``PCM_24`` …).
    """
    audio = synthesize_midi(midi_path, sample_rate, program, None if seconds is None else start + seconds)
    peak = float(np.abs(audio).max())
    if peak > 0:
        audio = audio * np.float32(PEAK / peak)
    first = int(round(start * sample_rate))
    last = None if seconds is None else first + int(round(seconds * sample_rate))
    audio = audio[first:last]
    if channels == 1:
        audio = audio.mean(axis=1, keepdims=True)
    return write_audio(wav_path, audio, sample_rate, subtype)


def corpus_midi(corpus_name: str, midi_path: str | os.PathLike) -> Path:
    """A music21 corpus piece (e.g. ``bach/bwv66.6``) written as MIDI by music21."""
    from music21 import corpus

    score = corpus.parse(corpus_name)
    midi_path = Path(midi_path)
    with atomic_path(midi_path) as tmp:
        score.write("midi", fp=str(tmp))
    return midi_path
