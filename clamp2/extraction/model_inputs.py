"""Raw inputs → the text the models read, exactly as the batch pipeline would leave it on disk.

The batch pipeline is ``process_data/batch_xml2abc.py`` → ``batch_interleaved_abc.py`` for
MusicXML, ``batch_interleaved_abc.py`` for standard ABC, ``batch_midi2mtf.py`` (M3-compatible for
CLaMP 2, ``--clamp3`` for CLaMP 3) for MIDI, ``process_data/extract_mert.py`` (MERT's layer mean) for
audio (CLaMP 3 only), then ``code/extract_*.py``. Every step writes its result as UTF-8 bytes and the next one
reads it back with universal newlines, so the same round trip is applied here between steps: a
file's feature from :mod:`clamp2.api` equals the feature of the scripts' files.

An input is a path (``.xml/.mxl/.musicxml``, ``.mid/.midi``, ``.abc``, ``.mtf``, ``.txt``; for CLaMP 3
also audio ``.wav/.flac/.ogg/.mp3`` and MERT features ``.npy``), a string of content (it holds a
newline), bytes (a MIDI file, a compressed ``.mxl``, an audio file, a ``.npy`` file, or UTF-8 text)
or, for CLaMP 3, a NumPy array of MERT features.
What a content string is, is read from its start: ``ticks_per_beat`` → MTF, ``<`` → MusicXML,
anything else → ABC. ABC is interleaved when it reads as ``batch_interleaved_abc.py``'s output
(:func:`is_interleaved`), standard otherwise (``abc_format`` forces either).
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from clamp2.convert.abc import is_xml_bytes

from .core import InputError, read_text_file

MUSICXML = "musicxml"
MIDI = "midi"
ABC = "abc"  # standard ABC: interleaved first
INTERLEAVED = "interleaved"
ABC_AUTO = "abc_auto"  # ABC whose kind is read from its lines
MTF = "mtf"
TEXT = "text"
AUDIO = "audio"  # an audio file, turned into MERT features by the MERT model
MERT = "mert"  # MERT features already extracted (process_data/extract_mert.py's .npy)

ABC_FORMATS = ("auto", "standard", "interleaved")
_ABC_KIND = {"auto": ABC_AUTO, "standard": ABC, "interleaved": INTERLEAVED}
KIND_OF_EXTENSION = {".xml": MUSICXML, ".mxl": MUSICXML, ".musicxml": MUSICXML, ".mid": MIDI, ".midi": MIDI,
                     ".abc": ABC_AUTO, ".mtf": MTF, ".txt": TEXT}
MUSIC_INPUT_EXTENSIONS = tuple(ext for ext, kind in KIND_OF_EXTENSION.items() if kind != TEXT)
TEXT_INPUT_EXTENSIONS = (".txt",)
# CLaMP 3 only: what SPEC_CLAMP3 §16 decodes, and MERT features.
AUDIO_KIND_OF_EXTENSION = {".wav": AUDIO, ".flac": AUDIO, ".ogg": AUDIO, ".mp3": AUDIO, ".npy": MERT}
AUDIO_INPUT_EXTENSIONS = tuple(AUDIO_KIND_OF_EXTENSION)

# Converter settings the features depend on (part of the feature cache's key).
CONVERTER_SETTINGS = {"xml2abc": "-d 8 -x", "midi2mtf": "m3_compatible", "read": "utf-8, universal newlines"}
CLAMP3_CONVERTER_SETTINGS = {**CONVERTER_SETTINGS, "midi2mtf": "clamp3"}

_FIELD_LINE = re.compile(r"^[A-Za-z]:")
_INLINE_VOICE = re.compile(r"\[V:([^\]]*)\]")
_MIDI_MAGIC, _ZIP_MAGIC, _NPY_MAGIC = b"MThd", b"PK\x03\x04", b"\x93NUMPY"
_AUDIO_MAGIC = {b"RIFF": ".wav", b"fLaC": ".flac", b"OggS": ".ogg", b"ID3": ".mp3"}
NO_AUDIO = "audio needs CLaMP 3 (clamp2.CLaMP3): CLaMP 2 and M3 read symbolic music only"


@dataclass(frozen=True)
class RawInput:
    """One input: its kind and either a file or its content (``bytes`` or ``str``)."""

    kind: str
    path: Optional[Path] = None
    data: Union[bytes, str, None] = None

    def content(self) -> bytes:
        if self.path is not None:
            return self.path.read_bytes()
        return self.data if isinstance(self.data, bytes) else self.data.encode("utf-8")

    def digest(self) -> str:
        """sha256 of the input's bytes (the file's, or the content's UTF-8)."""
        sha = hashlib.sha256()
        if self.path is not None:
            with open(self.path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    sha.update(block)
        else:
            sha.update(self.content())
        return sha.hexdigest()


def describe(item: Any, limit: int = 40) -> str:
    """How reports name an item: its path, or the start of its content."""
    if isinstance(item, (str, bytes)) and not is_path_like(item):
        text = item if isinstance(item, str) else repr(item[:limit])
        head = " ".join(text.split())
        return f"<content {head[:limit]!r}{'...' if len(head) > limit else ''}>"
    if isinstance(item, (str, os.PathLike)):
        return os.fspath(item)
    shape = getattr(item, "shape", None)  # a NumPy array of MERT features, or what was passed by mistake
    return f"<{type(item).__name__} of shape {tuple(shape)}>" if shape is not None else f"<{type(item).__name__}>"


def is_path_like(item: Any) -> bool:
    """Paths and one-line strings are file names; strings with a newline and bytes are content."""
    return isinstance(item, os.PathLike) or (isinstance(item, str) and "\n" not in item and "\r" not in item)


def is_array(item: Any) -> bool:
    """A NumPy array (of MERT features), not a NumPy string (``np.str_``/``np.bytes_``: a path or content)."""
    return type(item).__module__ == "numpy" and hasattr(item, "shape") and not isinstance(item, (str, bytes))


def audio_suffix(data: bytes) -> Optional[str]:
    """The extension of audio file bytes by their magic number, or None."""
    for magic, suffix in _AUDIO_MAGIC.items():
        if data.startswith(magic):
            return suffix
    # An MP3 without an ID3 tag starts with a frame header: 11 sync bits, an MPEG version (1, 2 or 2.5),
    # layer III; with or without CRC.
    if len(data) >= 2 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0 and data[1] & 0x18 != 0x08 \
            and data[1] & 0x06 == 0x02:
        return ".mp3"
    return None


_XML_DECLARATION = re.compile(r"""^(\ufeff?\s*<\?xml\b[^>]*?\bencoding\s*=\s*)(["'])[^"']*\2""")


def xml_text_as_utf8(text: str) -> Union[str, bytes]:
    """MusicXML given as ``str``: its UTF-8 bytes, the declaration saying so (a declared ``ISO-8859-1`` or
    ``UTF-16`` would make the parser misread them); unchanged where it declares no other encoding."""
    declared = _XML_DECLARATION.match(text)
    if declared is None or text[declared.end(1) + 1:declared.end() - 1].lower().replace("_", "-") in ("utf-8", "utf8"):
        return text
    return _XML_DECLARATION.sub(lambda m: m.group(1) + m.group(2) + "UTF-8" + m.group(2), text, count=1).encode("utf-8")


def resolve(item: Any, abc_format: str = "auto", allow_text: bool = False, allow_audio: bool = False) -> RawInput:
    """What ``item`` is (raises :class:`InputError` for a missing file or an unsupported kind).

    ``allow_audio`` (CLaMP 3): audio files and MERT features (``.npy``, bytes or a NumPy array) too.
    """
    if abc_format not in ABC_FORMATS:
        raise ValueError(f"abc_format must be one of {', '.join(ABC_FORMATS)}, not {abc_format!r}")
    if is_array(item):
        if not allow_audio:
            raise InputError(NO_AUDIO)
        import numpy as np

        buffer = io.BytesIO()
        try:
            np.save(buffer, item, allow_pickle=False)
        except ValueError as exc:  # an object array: not MERT features
            raise InputError(f"not a numeric array of MERT features ({exc})") from None
        return RawInput(MERT, data=buffer.getvalue())
    if isinstance(item, str) and item == "":  # Path("") is ".": "a folder, not a file: ."
        raise InputError("an empty string: neither a file name nor content")
    if is_path_like(item):
        path = Path(item).expanduser()
        if path.is_dir():
            raise InputError(f"a folder, not a file: {path} (encode folders with encode_folder)")
        if not path.is_file():
            raise InputError(f"file not found: {path}")
        kind = KIND_OF_EXTENSION.get(path.suffix.lower())
        if kind is None and path.suffix.lower() in AUDIO_KIND_OF_EXTENSION:
            if not allow_audio:
                raise InputError(NO_AUDIO)
            return RawInput(AUDIO_KIND_OF_EXTENSION[path.suffix.lower()], path=path)
        if kind is None:
            raise InputError(f"unsupported extension {path.suffix!r} (music: {', '.join(MUSIC_INPUT_EXTENSIONS)}"
                             f"{'; audio: ' + ', '.join(AUDIO_INPUT_EXTENSIONS) if allow_audio else ''}"
                             f"{'; text: .txt' if allow_text else ''})")
        if kind == TEXT and not allow_text:
            raise InputError("a text file: encode texts with encode_text, or mixed folders with encode_files")
        return RawInput(_ABC_KIND[abc_format] if kind == ABC_AUTO else kind, path=path)
    if isinstance(item, bytes):
        if item.startswith(_MIDI_MAGIC):
            return RawInput(MIDI, data=item)
        if item.startswith(_ZIP_MAGIC) or is_xml_bytes(item, declared=True):
            return RawInput(MUSICXML, data=item)  # as a file's bytes: the XML declaration names the encoding
        if item.startswith(_NPY_MAGIC) or audio_suffix(item):
            if not allow_audio:
                raise InputError(NO_AUDIO)
            return RawInput(MERT if item.startswith(_NPY_MAGIC) else AUDIO, data=item)
        try:
            item = item.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InputError(f"bytes that are neither MIDI, .mxl nor UTF-8 text ({exc.reason} at byte {exc.start})") from None
    if isinstance(item, str):
        head = item.lstrip("\ufeff \t\r\n")
        if head.startswith("ticks_per_beat"):
            return RawInput(MTF, data=item)
        if head.startswith("<"):
            return RawInput(MUSICXML, data=xml_text_as_utf8(item))
        return RawInput(_ABC_KIND[abc_format], data=item)
    raise InputError(f"cannot encode a {type(item).__name__}: pass paths, or str/bytes content")


# -- conversion ----------------------------------------------------------------------------------

def written_then_read(text: str) -> str:
    """``text`` after the batch tools' write (UTF-8, no newline translation) and the next step's read."""
    return io.TextIOWrapper(io.BytesIO(text.encode("utf-8")), encoding="utf-8").read()


def is_interleaved(abc_text: str) -> bool:
    """Whether ``abc_text`` reads as ``batch_interleaved_abc.py``'s output rather than a standard tune.

    Interleaved ABC declares its voices in the header and gives each bar as a line of ``[V:n]``
    parts. Not *every* line: abctoolkit's rotation keeps stray header text (a voice name broken
    over lines, ``3/8=120``), indented fragments and the odd unprefixed bar, so what counts is the
    text from the first ``[V:`` line on: no ``V:`` voice block there, and most music lines prefixed.
    A standard tune that writes several voices inline, one ``[V:n]`` per line, is not interleaved:
    an interleaved line holds every voice of its bar. Nor is a text with a line the interleaving
    step removes (``X:``, ``T:``, ``C:``, ``W:``, ``w:``, ``Z:``, ``%%MIDI``), such as a tune that
    writes ``[V:1]`` on every line. Measured on music21's corpus (12,978 folk tunes and 650 scores,
    standard and interleaved, ours and the original's), none is misread.
    """
    from ..convert.abc import INTERLEAVE_REMOVED_FIELDS

    # "\n" only, as the patchilizer splits: splitlines() also breaks at \x0b, \x0c, \x85, U+2028, ... inside a bar.
    lines = abc_text.split("\n")
    if any(line.startswith(tuple(INTERLEAVE_REMOVED_FIELDS)) for line in lines):  # interleaving removes them
        return False
    first = next((index for index, line in enumerate(lines) if line.startswith("[V:")), None)
    if first is None:
        return False
    body = lines[first:]
    if any(line.startswith("V:") for line in body):
        return False
    music = [line for line in body if line.strip() and not _FIELD_LINE.match(line) and not line.startswith("%")]
    prefixed = [line for line in music if line.startswith("[V:")]
    if 2 * len(prefixed) <= len(music):
        return False
    voices_per_line = [set(_INLINE_VOICE.findall(line)) for line in prefixed]
    return len(set().union(*voices_per_line)) == 1 or any(len(voices) > 1 for voices in voices_per_line)


def model_text(raw: RawInput, midi_mode: str = "m3") -> str:
    """The interleaved ABC, MTF or text that extraction reads for ``raw`` (MIDI in MTF mode ``midi_mode``)."""
    if raw.kind == MUSICXML:
        from ..convert.abc import xml_to_abc

        zipped = isinstance(raw.data, bytes) and raw.data.startswith(_ZIP_MAGIC)
        with _as_file(raw, ".mxl" if zipped else ".xml") as path:
            return interleave(written_then_read(xml_to_abc(path)))
    if raw.kind == MIDI:
        from ..convert.mtf import midi_to_mtf

        with _as_file(raw, ".mid") as path:
            return written_then_read(midi_to_mtf(path, mode=midi_mode))
    text = _text_of(raw)
    if raw.kind == ABC or (raw.kind == ABC_AUTO and not is_interleaved(text)):
        return interleave(text)
    return text


def _text_of(raw: RawInput) -> str:
    return read_text_file(raw.path) if raw.path is not None else written_then_read(_as_text(raw))


def effective_kind(raw: RawInput) -> str:
    """``raw``'s kind, ``abc_auto`` resolved to the format the ABC reads as: what its feature depends on
    (the feature cache keys on it, so a change of :func:`is_interleaved` never serves a stale feature)."""
    if raw.kind != ABC_AUTO:
        return raw.kind
    try:
        return INTERLEAVED if is_interleaved(_text_of(raw)) else ABC
    except ValueError:  # not UTF-8: encoding it reports why
        return raw.kind


def interleave(abc_text: str) -> str:
    from ..convert.abc import AbcWarning, abc_to_interleaved
    from ..convert.captured import one_conversion

    # Unequal bar durations are only warnings in the batch pipeline too (the file is converted). The filters are
    # process-wide: under the converters' lock, two threads cannot leave one's "ignore" behind for good.
    with one_conversion(), warnings.catch_warnings():
        warnings.simplefilter("ignore", AbcWarning)
        return written_then_read(abc_to_interleaved(abc_text))


def _as_text(raw: RawInput) -> str:
    return raw.data if isinstance(raw.data, str) else raw.data.decode("utf-8")


class _as_file:
    """The input's path, or a temporary file holding its content (converters read files)."""

    def __init__(self, raw: RawInput, suffix: str):
        self.raw, self.suffix, self.tmp = raw, suffix, None

    def __enter__(self) -> Path:
        if self.raw.path is not None:
            return self.raw.path
        self.tmp = tempfile.TemporaryDirectory(prefix="clamp2_input_")
        path = Path(self.tmp.name) / ("input" + self.suffix)
        path.write_bytes(self.raw.content())
        return path

    def __exit__(self, *exc) -> None:
        if self.tmp is not None:
            self.tmp.cleanup()


class RawMusicEncoder:
    """Raw input → patches, through :func:`model_text` and extraction's own :class:`~clamp2.extraction.core.MusicEncoder`.

    Picklable (it holds the patchilizer only), so DataLoader workers can convert files.
    ``midi_mode``: the MTF mode MIDI is converted in (``"m3"`` for CLaMP 2, ``"clamp3"``).
    """

    def __init__(self, music_encoder, midi_mode: str = "m3"):
        self.music_encoder = music_encoder
        self.midi_mode = midi_mode

    def __call__(self, raw: RawInput):
        return self.music_encoder.encode_text(model_text(raw, self.midi_mode))


class RawAudioEncoder:
    """MERT features (a ``.npy`` file or its bytes) → rows, through extraction's :class:`~clamp2.extraction.core.AudioEncoder`.

    Audio files reach it already turned into MERT features (``CLaMP3`` runs MERT in the main
    process first, so no worker holds a model).
    """

    def __init__(self, audio_encoder):
        self.audio_encoder = audio_encoder

    def __call__(self, raw: RawInput):
        if raw.kind != MERT:
            raise InputError("an audio file needs its MERT features first: run process_data/extract_mert.py "
                             "and encode the .npy files")
        return self.audio_encoder(raw.path if raw.path is not None else io.BytesIO(raw.content()))


class RawTextEncoder:
    """A text (``.txt`` file or string) → token ids, through extraction's :class:`~clamp2.extraction.core.TextEncoder`."""

    def __init__(self, text_encoder):
        self.text_encoder = text_encoder

    def __call__(self, raw: RawInput):
        return self.text_encoder.encode_text(model_text(raw))
