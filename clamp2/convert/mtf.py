"""MIDI <-> MIDI Text Format (MTF), the text form of MIDI that M3 and CLaMP 2 read (SPEC §2).

An MTF file is ``ticks_per_beat <N>`` followed by one line per message of mido's merged track:
the values of ``msg.dict()`` (mido's field order) turned into text with ``str``, joined by single
spaces, the whole line then escaped with the ``unicode_escape`` codec. The published checkpoints
were trained on exactly these bytes, so nothing here may be "improved" without breaking them.
"""

from __future__ import annotations

import io
import os
import warnings

import mido

# Dropped in M3-compatible mode: free text and vendor data, which the published models never saw.
M3_DROPPED_META_TYPES = frozenset({
    "text", "copyright", "track_name", "instrument_name", "lyrics", "marker", "cue_marker",
    "device_name", "sequencer_specific",
})
M3_DROPPED_MESSAGE_TYPES = frozenset({"sysex"})

# MTF modes (SPEC §2, SPEC_CLAMP3 §18): "m3" is CLaMP 2's M3-compatible mode; "clamp3" is what
# CLaMP 3 was trained on (M3's mode, but sysex and sequencer-specific metas kept); "all" keeps everything.
MTF_MODES = ("m3", "clamp3", "all")
_DROPPED = {
    "m3": (M3_DROPPED_META_TYPES, M3_DROPPED_MESSAGE_TYPES),
    "clamp3": (M3_DROPPED_META_TYPES - {"sequencer_specific"}, frozenset()),
    "all": (frozenset(), frozenset()),
}

# Meta types whose single value is free text: it may contain spaces, so on reading it is
# everything between the type and the last token (the time).
TEXT_META_TYPES = frozenset({
    "text", "copyright", "track_name", "instrument_name", "lyrics", "marker", "cue_marker",
    "device_name",
})

TICKS_PER_BEAT_KEY = "ticks_per_beat"
MIDI_EXTENSIONS = (".mid", ".midi")


def message_to_line(message: mido.Message | mido.MetaMessage) -> str:
    """One MTF line: ``str`` of every value of ``message.dict()``, space-joined, unicode-escaped."""
    return " ".join(str(value) for value in message.dict().values()).encode("unicode_escape").decode()


def mtf_mode(m3_compatible: bool = True, mode: str | None = None) -> str:
    """The mode asked for: ``mode`` when given, else ``"m3"`` or ``"all"`` by ``m3_compatible``."""
    if mode is None:
        return "m3" if m3_compatible else "all"
    if mode not in MTF_MODES:
        raise ValueError(f"unknown MTF mode {mode!r}: expected one of {', '.join(MTF_MODES)}")
    return mode


def keeps_message(message, m3_compatible: bool = True, mode: str | None = None) -> bool:
    dropped_meta, dropped_messages = _DROPPED[mtf_mode(m3_compatible, mode)]
    return message.type not in (dropped_meta if message.is_meta else dropped_messages)


def midi_file_to_mtf(midi: mido.MidiFile, m3_compatible: bool = True, *, mode: str | None = None) -> str:
    mode = mtf_mode(m3_compatible, mode)
    lines = [f"{TICKS_PER_BEAT_KEY} {midi.ticks_per_beat}"]
    lines.extend(message_to_line(message) for message in midi.merged_track if keeps_message(message, mode=mode))
    return "\n".join(lines)


def standard_midi_bytes(data: bytes) -> tuple[bytes, list[str]]:
    """``data`` without what mido cannot read but the standard says to skip, and what was removed.

    A RIFF RMID file (``.rmi``, often renamed ``.mid``) holds a standard MIDI file in its ``data`` chunk; a
    chunk other than ``MTrk`` after the header (Yamaha XF's ``XFIH``/``XFKM``) is to be skipped, SMF 1.0
    says ("expect alien chunks and treat them as if they weren't there"), where mido stops ("no MTrk header").
    """
    removed = []
    if data[:4] == b"RIFF" and data[8:12] == b"RMID":
        position = 12
        while position + 8 <= len(data):
            size = int.from_bytes(data[position + 4:position + 8], "little")
            if data[position:position + 4] == b"data":
                data = data[position + 8:position + 8 + size]
                removed.append("its RIFF RMID wrapper")
                break
            position += 8 + size + (size & 1)
    if data[:4] != b"MThd" or len(data) < 8:
        return data, removed
    position = 8 + int.from_bytes(data[4:8], "big")
    kept, alien = bytearray(data[:position]), []
    while position + 8 <= len(data):
        name, size = data[position:position + 4], int.from_bytes(data[position + 4:position + 8], "big")
        if name == b"MTrk":
            kept += data[position:position + 8 + size]
        elif all(32 <= byte < 127 for byte in name):
            alien.append(name.decode("ascii"))
        else:
            break  # not a chunk header: the rest is left as it is, for mido to say what is wrong
        position += 8 + size
    kept += data[position:]
    if alien:
        removed.append(f"{len(alien)} chunk{'s' if len(alien) > 1 else ''} other than MTrk "
                       f"({', '.join(sorted(set(alien)))})")
    return bytes(kept), removed


def read_midi(path: str | os.PathLike) -> mido.MidiFile:
    """``mido.MidiFile(path)``, with mido's bare ``EOFError``, ``IndexError`` and ``KeyError`` made readable.

    A file mido reads is read exactly as mido reads it (as the reference does). One mido cannot read only
    because of a RIFF RMID wrapper or chunks other than ``MTrk`` is read as the standard MIDI file inside
    (:func:`standard_midi_bytes`), with a ``UserWarning`` saying what was left out.
    """
    try:
        midi = _read_midi(path)
    except OSError as error:
        if type(error) is not OSError:  # FileNotFoundError, PermissionError, ...: not about the contents
            raise
        with open(path, "rb") as f:
            if f.read(4) not in (b"RIFF", b"MThd"):  # not MIDI at all (and maybe large): nothing to repair
                raise
            f.seek(0)
            data, removed = standard_midi_bytes(f.read())
        if not removed:
            raise
        midi = _read_midi(io.BytesIO(data))  # its error, if any, is about the file inside
        warnings.warn(f"read without {' and '.join(removed)}, where mido stops ({error})", UserWarning,
                      stacklevel=2)
        return midi
    unread = track_chunks(path) - len(midi.tracks)
    if unread > 0:  # mido reads as many tracks as the header says, as the reference does: said, not changed
        with open(path, "rb") as f:
            said = int.from_bytes(f.read(12)[10:12], "big")  # unsigned, as SMF says; mido reads it signed
        signed = f" (which mido reads as {said - 65536}: none read)" if said > 32767 else ""
        warnings.warn(f"the header says {said} track{'s' if said != 1 else ''}{signed} but the file "
                      f"holds {len(midi.tracks) + unread}: the last {unread} not read", UserWarning, stacklevel=2)
    return midi


def track_chunks(path: str | os.PathLike) -> int:
    """How many ``MTrk`` chunks a standard MIDI file holds (chunk headers only; other chunks skipped)."""
    count = 0
    with open(path, "rb") as f:
        header = f.read(8)
        if header[:4] != b"MThd":
            return 0
        f.seek(int.from_bytes(header[4:8], "big"), os.SEEK_CUR)
        while len(chunk := f.read(8)) == 8:
            if chunk[:4] == b"MTrk":
                count += 1
            elif not all(32 <= byte < 127 for byte in chunk[:4]):
                break  # not a chunk header: trailing bytes
            f.seek(int.from_bytes(chunk[4:8], "big"), os.SEEK_CUR)
    return count


def _read_midi(source) -> mido.MidiFile:
    try:
        return mido.MidiFile(file=source) if isinstance(source, io.BytesIO) else mido.MidiFile(source)
    except EOFError as error:
        detail = f": {error}" if str(error) else ""
        raise ValueError(f"not a complete MIDI file (unexpected end of data{detail})") from error
    except (IndexError, KeyError) as error:
        # mido decodes a meta event's bytes by position and table look-up: a set_tempo with two bytes, a
        # time_signature with one, an SMPTE rate code above 3 fail as a bare "list index out of range" / "7".
        raise ValueError(f"a meta event mido cannot decode (too short, or a value out of range): "
                         f"{type(error).__name__}: {error}") from error
    except ValueError as error:
        if "data byte must be in range" not in str(error):
            raise
        # mido reads an F0 (sysex) and an F7 (escape) event alike, as a sysex message, which holds 7-bit bytes only:
        # an escape carrying a status or real-time byte (F7 01 FA), legal MIDI, fails as a bare "data byte ...".
        raise ValueError(f"a sysex (F0) or escape (F7) event holds a byte above 127, which mido cannot read: "
                         f"{error}") from error


def midi_to_mtf(path: str | os.PathLike, m3_compatible: bool = True, *, mode: str | None = None) -> str:
    """MTF text of the MIDI file at ``path`` (no trailing newline). Raises if mido cannot read it.

    ``mode`` (``"m3"``, ``"clamp3"``, ``"all"``) overrides ``m3_compatible`` (``"m3"``/``"all"``).
    """
    return midi_file_to_mtf(read_midi(path), mode=mtf_mode(m3_compatible, mode))


def new_message(message_type: str):
    # mido knows a type either as a channel/system message or as a meta message, never both.
    try:
        return mido.Message(message_type)
    except (LookupError, ValueError):
        pass
    try:
        return mido.MetaMessage(message_type)
    except (LookupError, ValueError) as error:
        raise ValueError(f"unknown MIDI message type {message_type!r}") from error


def split_tokens(rest: str) -> list[str]:
    """Split on single spaces, keeping a ``[a, b]`` / ``(a, b)`` value (which holds spaces) whole."""
    tokens: list[str] = []
    pieces = rest.split(" ")
    index = 0
    while index < len(pieces):
        piece = pieces[index]
        if piece[:1] in ("[", "("):
            closing = "]" if piece[0] == "[" else ")"
            start = index
            while not pieces[index].endswith(closing) and index + 1 < len(pieces):
                index += 1
            piece = " ".join(pieces[start:index + 1])  # joined once: growing a string per piece is quadratic
        tokens.append(piece)
        index += 1
    return tokens


def parse_int_sequence(token: str) -> list[int] | tuple[int, ...]:
    inner = token[1:-1].strip()
    if token.startswith("(") and inner.endswith(",") and inner.count(",") == 1:
        inner = inner[:-1]  # Python's one-item tuple, "(67,)": a one-byte sequencer_specific meta
    numbers = [int(item) for item in inner.split(",")] if inner else []
    return numbers if token.startswith("[") else tuple(numbers)


def parse_value(token: str, default):
    if token[:1] in ("[", "(") and token[-1:] in ("]", ")"):
        return parse_int_sequence(token)
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        number = float(token)
        return int(number) if number.is_integer() else number
    return token


def line_tokens(message_type: str, rest: str) -> list[str]:
    if message_type in TEXT_META_TYPES:
        if " " not in rest:
            # "marker 0": the reference joins the no words between type and time, an empty text.
            return ["", rest] if rest else []  # no time at all: the field count check reports it
        # Splitting on single spaces and re-joining keeps runs of spaces and leading/trailing ones.
        # UTF-8 then unicode_escape, as the reference reads: the exact inverse for the ASCII lines
        # written here, and a hand-typed non-ASCII character becomes its UTF-8 bytes in the file.
        *value, time = rest.split(" ")
        return [" ".join(value).encode("utf-8").decode("unicode_escape"), time]
    if not rest:
        return []
    tokens = split_tokens(rest)
    if "[" in rest or "(" in rest:
        # The reference cuts such a line around its bracket and drops the empty words: a run of spaces is one.
        tokens = [token for token in tokens if token]
    return tokens


def line_to_message(line: str):
    """Parse one MTF message line back into a mido message (SPEC §2)."""
    message_type, space, rest = line.partition(" ")
    message = new_message(message_type)
    fields = [name for name in vars(message) if name != "type"]
    tokens = line_tokens(message_type, rest)
    if not space and message_type not in TEXT_META_TYPES:
        # A bare type (``end_of_track``): the reference leaves mido's defaults (time 0). With a space after
        # it (``end_of_track ``) the reference reads one empty value and fails: the count check below.
        return message
    if len(tokens) < len(fields):
        raise ValueError(f"{message_type} has {len(fields)} fields ({', '.join(fields)}), "
                         f"the line has {len(tokens)} values: {line[:200]!r}")
    # Values past the fields (a trailing space, a stray number) are ignored, as the reference ignores them.
    for name, token in zip(fields, tokens):
        is_text = message_type in TEXT_META_TYPES and name != "time"
        setattr(message, name, token if is_text else parse_value(token, getattr(message, name)))
    return message


def read_ticks_per_beat(line: str) -> int:
    """The first line's division. The reference reads ``int(line.split(" ")[1])``: later values are ignored
    and Python's ``int`` takes a sign or underscores (``+480``, ``4_80``); a byte-order mark before the key
    (a Windows editor's "UTF-8") is ignored. Runs of spaces are read too (the reference fails on them).
    Negative: an SMPTE division (frames per second and ticks per frame), which mido reads and writes as
    the header's signed 16-bit number; the MIDI header holds nothing outside that range.
    """
    words = line.lstrip("\ufeff").split(" ")
    value = None
    # The reference's second word; then the whole rest, for a run of spaces before the number.
    candidates = [words[1], " ".join(words[1:])] if words[0] == TICKS_PER_BEAT_KEY and len(words) > 1 else []
    for token in candidates:
        try:
            value = int(token)
            break
        except ValueError:
            continue
    if value is None or not -2 ** 15 <= value < 2 ** 15:
        raise ValueError(f"first line must be '{TICKS_PER_BEAT_KEY} <N>' with -32768 <= N <= 32767, "
                         f"got {line[:80]!r}")
    return value


def mtf_to_midi(text: str) -> mido.MidiFile:
    """A type-1, one-track ``mido.MidiFile`` from MTF text; ``unknown_meta`` lines are skipped."""
    lines = text.splitlines()
    if not lines:
        raise ValueError("empty MTF text")
    ticks_per_beat = read_ticks_per_beat(lines[0])
    midi = mido.MidiFile(ticks_per_beat=ticks_per_beat)
    track = mido.MidiTrack()
    midi.tracks.append(track)
    for number, line in enumerate(lines[1:], start=2):
        if "unknown_meta" in line:
            continue
        try:
            message = line_to_message(line)
            if message.is_realtime:
                # mido reads these from a track (an F8 byte, or F6, which mido counts as real-time) but refuses
                # to write them to a file, with no line: the reference fails the same file.
                raise ValueError(f"{message.type} is a real-time message, which mido cannot write to a MIDI file")
            track.append(message)
        except (ValueError, TypeError, LookupError) as error:
            raise ValueError(f"line {number}: {error}") from error
    return midi


def midi_to_bytes(midi: mido.MidiFile) -> bytes:
    buffer = io.BytesIO()
    midi.save(file=buffer)
    return buffer.getvalue()


def mtf_file_to_midi_bytes(path: str | os.PathLike) -> bytes:
    """Standard MIDI file bytes for the MTF file at ``path`` (read as UTF-8)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return midi_to_bytes(mtf_to_midi(text))
