"""MIDI <-> MTF (SPEC §2) on the conformance vectors, hand-built MIDI and MIDI rendered from corpus scores."""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from pathlib import Path

import mido
import pytest
from mido import Message, MetaMessage, MidiFile, MidiTrack

from clamp2.convert.mtf import (
    M3_DROPPED_MESSAGE_TYPES,
    M3_DROPPED_META_TYPES,
    line_to_message,
    message_to_line,
    midi_file_to_mtf,
    midi_to_bytes,
    midi_to_mtf,
    mtf_to_midi,
)

SPEC_M3_DROPPED = {"text", "copyright", "track_name", "instrument_name", "lyrics", "marker",
                   "cue_marker", "device_name", "sequencer_specific", "sysex"}


def read_exact(path) -> str:
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


@pytest.fixture(scope="module")
def handmade_midi(tmp_path_factory):
    """Three tracks with every kind of message SPEC §2 has to survive."""
    path = tmp_path_factory.mktemp("midi") / "handmade.mid"
    conductor = MidiTrack([
        MetaMessage("track_name", name="Conductor"),
        MetaMessage("copyright", text="(c) 2024"),
        MetaMessage("time_signature", numerator=4, denominator=4),
        MetaMessage("key_signature", key="D"),
        MetaMessage("set_tempo", tempo=500000),
        MetaMessage("smpte_offset", frame_rate=25, hours=1, minutes=2, seconds=3, frames=4, sub_frames=5),
        # runs of spaces, a backslash, a newline and a trailing space must all come back
        MetaMessage("text", text="a  b \\ c\nd "),
        MetaMessage("marker", text="A"),
        MetaMessage("cue_marker", text="cue"),
        MetaMessage("sequencer_specific", data=[1, 2, 3]),
        MetaMessage("device_name", name="Synth"),
        mido.midifiles.meta.UnknownMetaMessage(type_byte=0x08, data=(65, 66)),
        MetaMessage("set_tempo", tempo=400000, time=480),
        MetaMessage("time_signature", numerator=3, denominator=4),
    ])
    violin = MidiTrack([
        MetaMessage("track_name", name="Violín"),  # Latin-1 byte 0xED in the file
        # UTF-8 bytes in the file, as most editors write them; mido reads them as Latin-1
        MetaMessage("instrument_name", name="Flöte".encode("utf-8").decode("latin-1")),
        MetaMessage("channel_prefix", channel=1),
        MetaMessage("midi_port", port=0),
        Message("program_change", channel=1, program=40),
        Message("control_change", channel=1, control=7, value=100),
        Message("note_on", channel=1, note=62, velocity=90),
        MetaMessage("lyrics", text="Hal-"),
        Message("pitchwheel", channel=1, pitch=-8192, time=120),
        Message("pitchwheel", channel=1, pitch=8191, time=120),
        Message("aftertouch", channel=1, value=50, time=10),
        Message("polytouch", channel=1, note=62, value=30, time=10),
        Message("note_off", channel=1, note=62, velocity=0, time=220),
        MetaMessage("lyrics", text="le"),
        Message("note_on", channel=1, note=64, velocity=80),
        Message("note_on", channel=1, note=64, velocity=0, time=480),
    ])
    system = MidiTrack([
        Message("sysex", data=[0x7E, 0x7F, 0x09, 0x01]),
        Message("sysex", data=[], time=10),
        MetaMessage("sequence_number", number=7, time=5),
    ])
    midi = MidiFile(ticks_per_beat=480)
    midi.tracks += [conductor, violin, system]
    midi.save(path)
    return path


@pytest.fixture(scope="module")
def corpus_midis(tmp_path_factory):
    """MIDI rendered by music21 from corpus scores: a chorale, a quartet movement, a lead sheet."""
    from music21 import corpus, midi

    folder = tmp_path_factory.mktemp("corpus_midi")
    paths = []
    for work in ("bach/bwv1.6", "schumann_robert/opus48no2", "leadSheet/fosterBrownHair"):
        score = corpus.parse(work)
        midi_file = midi.translate.streamToMidiFile(score)
        path = folder / (work.replace("/", "_") + ".mid")
        midi_file.open(str(path), "wb")
        midi_file.write()
        midi_file.close()
        paths.append(path)
    return paths


@pytest.mark.parametrize("name", ["bwv10.7", "handmade"])
@pytest.mark.parametrize("m3_compatible, folder", [(True, "mtf"), (False, "mtf_all")])
def test_vectors_byte_for_byte(vectors, name, m3_compatible, folder):
    text = midi_to_mtf(vectors / "inputs" / "midi" / f"{name}.mid", m3_compatible=m3_compatible)
    assert text == read_exact(vectors / "expected" / folder / f"{name}.mtf")


def test_spec_example_lines():
    assert message_to_line(MetaMessage("time_signature", numerator=3, denominator=4)) == "time_signature 3 4 24 8 0"
    assert message_to_line(MetaMessage("set_tempo", tempo=500000)) == "set_tempo 500000 0"
    assert message_to_line(Message("note_on", note=74, velocity=80)) == "note_on 0 0 74 80"
    assert message_to_line(Message("note_on", note=74, velocity=0, time=455)) == "note_on 455 0 74 0"


def test_handmade_lines_follow_spec(handmade_midi):
    lines = midi_to_mtf(handmade_midi, m3_compatible=False).split("\n")
    assert lines[0] == "ticks_per_beat 480"
    expected_in_order = [
        "track_name Conductor 0",
        "copyright (c) 2024 0",
        "time_signature 4 4 24 8 0",
        "key_signature D 0",
        "set_tempo 500000 0",
        "smpte_offset 25 1 2 3 4 5 0",
        r"text a  b \\ c\nd  0",
        "marker A 0",
        "cue_marker cue 0",
        "sequencer_specific (1, 2, 3) 0",  # read from a file, mido holds a tuple
        "device_name Synth 0",
        "unknown_meta 8 (65, 66) 0",
        r"track_name Viol\xedn 0",
        r"instrument_name Fl\xc3\xb6te 0",
        "channel_prefix 1 0",
        "midi_port 0 0",
        "program_change 0 1 40",  # channel messages: time second
        "control_change 0 1 7 100",
        "note_on 0 1 62 90",
        "lyrics Hal- 0",
        "sysex 0 [126, 127, 9, 1]",  # msg.dict() gives sysex data as a list
        "sysex 10 []",
        "sequence_number 7 5",
        "pitchwheel 105 1 -8192",
        "pitchwheel 120 1 8191",
        "aftertouch 10 1 50",
        "polytouch 10 1 62 30",
        "set_tempo 400000 220",  # tempo and meter change mid-piece
        "time_signature 3 4 24 8 0",
        "note_off 0 1 62 0",
        "lyrics le 0",
        "note_on 0 1 64 80",
        "note_on 480 1 64 0",
        "end_of_track 0",  # merge_tracks keeps a single one, at the end
    ]
    assert lines[1:] == expected_in_order
    assert all(line.isascii() for line in lines)


def test_writer_is_str_join_unicode_escape(handmade_midi, corpus_midis):
    for path in [handmade_midi, *corpus_midis]:
        midi = MidiFile(path)
        expected = [f"ticks_per_beat {midi.ticks_per_beat}"] + [
            " ".join(str(v) for v in m.dict().values()).encode("unicode_escape").decode()
            for m in midi.merged_track]
        assert midi_to_mtf(path, m3_compatible=False) == "\n".join(expected)


def test_m3_mode_drops_exactly_the_listed_types(handmade_midi, corpus_midis):
    assert M3_DROPPED_META_TYPES | M3_DROPPED_MESSAGE_TYPES == SPEC_M3_DROPPED
    for path in [handmade_midi, *corpus_midis]:
        all_lines = midi_to_mtf(path, m3_compatible=False).split("\n")
        m3_lines = midi_to_mtf(path).split("\n")
        assert m3_lines == [line for line in all_lines if line.split(" ")[0] not in SPEC_M3_DROPPED]
    kept_types = {line.split(" ")[0] for line in midi_to_mtf(handmade_midi).split("\n")[1:]}
    assert kept_types == {"time_signature", "key_signature", "set_tempo", "smpte_offset", "unknown_meta",
                          "channel_prefix", "midi_port", "program_change", "control_change", "note_on",
                          "note_off", "sequence_number", "pitchwheel", "aftertouch", "polytouch", "end_of_track"}


def test_corpus_midi_is_m3_by_default(corpus_midis):
    for path in corpus_midis:
        text = midi_to_mtf(path)
        assert text == midi_to_mtf(path, m3_compatible=True)
        assert "track_name" not in text and text.startswith("ticks_per_beat ")
        assert "\n" + "note_on " in text and not text.endswith("\n")


def without_unknown_meta(messages):
    return [m for m in messages if m.type != "unknown_meta"]


def test_keep_all_round_trip_gives_the_same_messages(handmade_midi, corpus_midis, vectors):
    for path in [handmade_midi, *corpus_midis, *sorted((vectors / "inputs" / "midi").glob("*.mid"))]:
        original = MidiFile(path)
        text = midi_to_mtf(path, m3_compatible=False)
        rebuilt = mtf_to_midi(text)
        assert rebuilt.ticks_per_beat == original.ticks_per_beat
        assert len(rebuilt.tracks) == 1
        # SPEC: unknown_meta lines are skipped on reading; everything else comes back as it was.
        assert list(rebuilt.tracks[0]) == without_unknown_meta(original.merged_track)
        # ... and survives being written and read again as a standard MIDI file.
        reread = MidiFile(file=io.BytesIO(midi_to_bytes(rebuilt)))
        assert list(reread.merged_track) == without_unknown_meta(original.merged_track)
        assert midi_file_to_mtf(reread, m3_compatible=False) == "\n".join(
            line for line in text.split("\n") if "unknown_meta" not in line)


THIRD_PARTY_REFERENCE = Path(__file__).parent / "data" / "midi_testprimitive_reference.json"


@pytest.mark.filterwarnings("ignore:the header says 18 tracks:UserWarning")  # test04.mid: a 19th, blank track
def test_third_party_midi_matches_the_originals_bytes_in_every_mode():
    """music21's own MIDI test files (made by other sequencers) give the original scripts' bytes.

    The hashes were taken from the original batch_midi2mtf.py / batch_mtf2midi.py run on these files
    (tests/data/README.md); the MIDI written back is compared for the MTF of each mode.
    """
    from music21 import midi as music21_midi

    folder = Path(music21_midi.__file__).parent / "testPrimitive"
    reference = json.loads(THIRD_PARTY_REFERENCE.read_text(encoding="utf-8"))["files"]
    assert sorted(p.name for p in folder.glob("*.mid")) == sorted(reference), "music21's test files changed"
    mismatches = []
    for name, modes in sorted(reference.items()):
        assert sorted(modes) == ["all", "clamp3", "m3"]
        for mode, want in modes.items():
            text = midi_to_mtf(folder / name, mode=mode)
            if hashlib.sha256(text.encode("utf-8")).hexdigest() != want["mtf_sha256"]:
                mismatches.append(f"{name} {mode} mtf")
            elif hashlib.sha256(midi_to_bytes(mtf_to_midi(text))).hexdigest() != want["midi_sha256"]:
                mismatches.append(f"{name} {mode} midi")
    assert not mismatches


def test_mtf_to_midi_is_type_1_with_mido_header(vectors):
    data = midi_to_bytes(mtf_to_midi(read_exact(vectors / "expected" / "mtf" / "handmade.mtf")))
    assert data[:14] == b"MThd\x00\x00\x00\x06\x00\x01\x00\x01\x00\x60"


def test_line_parsing_rules():
    message = line_to_message(r"text a  b \\ c\nd  12")
    assert message.is_meta and message.text == "a  b \\ c\nd " and message.time == 12
    assert line_to_message("track_name  0").name == ""
    assert line_to_message("sysex 3 [1, 2, 3]").data == (1, 2, 3)
    assert line_to_message("sysex 0 []").data == ()
    assert line_to_message("sequencer_specific (4, 5) 0").data == (4, 5)
    # mido keeps a meta's data as a tuple, so one byte is written "(67,)"
    assert line_to_message("sequencer_specific (67,) 0").data == (67,)
    assert line_to_message("sequencer_specific () 0").data == ()
    note = line_to_message("note_on 7.0 2 60 100")  # integral numbers become int
    assert note == Message("note_on", time=7, channel=2, note=60, velocity=100) and type(note.time) is int
    assert line_to_message("key_signature F#m 0").key == "F#m"
    # text values are never taken for lists
    assert line_to_message("marker [1, 2] 0").text == "[1, 2]"


def test_extra_values_and_bare_types_read_as_the_reference_reads_them():
    # The reference reads the fields' values by position: a trailing space or a stray value is
    # ignored, and a bare type (no value at all) is mido's default message.
    assert line_to_message("set_tempo 500000 0 ") == MetaMessage("set_tempo", tempo=500000, time=0)
    assert line_to_message("note_on 0 0 60 64 99") == Message("note_on", note=60, velocity=64)
    assert line_to_message("sysex 0 [1, 2, 3] 5").data == (1, 2, 3)
    assert line_to_message("end_of_track") == MetaMessage("end_of_track", time=0)
    # A text meta with its time alone: the reference joins the no words before it, an empty text.
    assert line_to_message("marker 0") == MetaMessage("marker", text="", time=0)
    assert line_to_message("text 5") == MetaMessage("text", text="", time=5)
    with pytest.raises(ValueError, match="text has 2 fields"):
        line_to_message("text")  # the reference fails too (its time would be the word "text")


@pytest.mark.parametrize("first_line", ["\ufeffticks_per_beat 480", "ticks_per_beat +480", "ticks_per_beat 4_80",
                                        "ticks_per_beat 480 extra", "ticks_per_beat  480"])
def test_first_line_read_as_the_reference_reads_it(first_line):
    # The reference reads int(line.split(" ")[1]): a sign, underscores and later values pass; a Windows
    # editor's byte-order mark is ignored; a run of spaces (the reference fails on it) is read here too.
    midi = mtf_to_midi(first_line + "\nnote_on 0 0 60 64\nnote_off 480 0 60 0\nend_of_track 0")
    assert midi.ticks_per_beat == 480
    assert [m.type for m in midi.tracks[0]] == ["note_on", "note_off", "end_of_track"]


def test_reader_skips_unknown_meta_and_splits_lines():
    midi = mtf_to_midi("ticks_per_beat 96\r\nunknown_meta 8 (65, 66) 0\nset_tempo 400000 0\nend_of_track 0\n")
    assert midi.ticks_per_beat == 96 and midi.type == 1
    assert [m.type for m in midi.tracks[0]] == ["set_tempo", "end_of_track"]


def test_round_trip_of_smpte_timing_and_one_byte_sequencer_data():
    """An SMPTE division (-25 fps, 40 ticks a frame) and a one-byte sequencer_specific come back as they were."""
    midi = MidiFile(ticks_per_beat=-6360)
    midi.tracks.append(MidiTrack([MetaMessage("sequencer_specific", data=(0x43,)),
                                  Message("note_on", note=60, velocity=100), Message("note_off", note=60, time=96)]))
    data = midi_to_bytes(midi)
    assert data[12:14] == b"\xe7\x28"
    text = midi_file_to_mtf(MidiFile(file=io.BytesIO(data)), mode="clamp3")
    assert text.splitlines()[:2] == ["ticks_per_beat -6360", "sequencer_specific (67,) 0"]
    assert midi_to_bytes(mtf_to_midi(text)) == data


@pytest.mark.parametrize("text, match", [
    ("", "empty"),
    ("note_on 0 0 60 64", "ticks_per_beat"),
    ("ticks_per_beat 40000", "-32768 <= N <= 32767"),
    ("ticks_per_beat 9x", "ticks_per_beat"),
    ("resolution 480", "ticks_per_beat"),
    ("ticks_per_beat", "ticks_per_beat"),
    ("ticks_per_beat (67,)", "ticks_per_beat"),
    ("ticks_per_beat 96\nsequencer_specific (1,,) 0", "line 2"),
    ("ticks_per_beat 96\nsequencer_specific (1, 2,) 0", "line 2"),
    ("ticks_per_beat 96\nnot_a_type 0", "line 2: unknown MIDI message type"),
    ("ticks_per_beat 96\nnote_on 0 0 60", "line 2: note_on has 4 fields"),
    ("ticks_per_beat 96\nnote_on 0 0 600 64", "line 2"),
])
def test_reader_rejects_malformed_mtf(text, match):
    with pytest.raises(ValueError, match=match):
        mtf_to_midi(text)


def test_unreadable_midi_raises(tmp_path):
    empty = tmp_path / "empty.mid"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.mid"
    truncated.write_bytes(b"MThd\x00\x00\x00\x06\x00\x01\x00\x01\x00\x60MTrk\x00\x00\x00\x10\x00\x90\x3c")
    text = tmp_path / "text.mid"
    text.write_text("this is not MIDI\n")
    for path in (empty, truncated):
        with pytest.raises(ValueError, match="not a complete MIDI file"):
            midi_to_mtf(path)
    with pytest.raises(OSError, match="MThd not found"):
        midi_to_mtf(text)


@pytest.mark.parametrize("name", ["bwv26.6", "banish_misfortune", "handmade_sysex"])
def test_clamp3_mode_matches_the_clamp3_vectors_byte_for_byte(name):
    from conftest import DATA_DIR

    vectors3 = DATA_DIR / "vectors_clamp3"
    text = midi_to_mtf(vectors3 / "inputs" / "midi" / f"{name}.mid", mode="clamp3")
    assert text == read_exact(vectors3 / "expected" / "mtf" / f"{name}.mtf")


def test_clamp3_mode_keeps_sysex_and_sequencer_specific_only():
    from conftest import DATA_DIR

    path = DATA_DIR / "vectors_clamp3" / "inputs" / "midi" / "handmade_sysex.mid"
    m3, clamp3 = midi_to_mtf(path, mode="m3").split("\n"), midi_to_mtf(path, mode="clamp3").split("\n")
    extra = [line.split(" ")[0] for line in clamp3 if line not in m3]
    assert sorted(set(extra)) == ["sequencer_specific", "sysex"] and extra.count("sysex") == 2
    assert midi_to_mtf(path) == "\n".join(m3)
    with pytest.raises(ValueError, match="unknown MTF mode"):
        midi_to_mtf(path, mode="clamp4")


# -- found by a mutation audit: each fails on a plausible one-line bug the suite missed -----------------


def test_float_time_survives_mtf_reading():
    from clamp2.convert.mtf import line_to_message

    assert line_to_message("note_on 0.5 0 60 64").time == 0.5


# -- found by a spec-to-test mutation audit ------------------------------------------------------------


@pytest.mark.parametrize("meta_type", ["text", "copyright", "track_name", "instrument_name", "lyrics", "marker",
                                       "cue_marker", "device_name"])
def test_every_text_meta_round_trips_a_multi_word_non_ascii_text(meta_type):
    midi = MidiFile(ticks_per_beat=96)
    field = "name" if meta_type in ("track_name", "instrument_name", "device_name") else "text"
    midi.tracks.append(MidiTrack([MetaMessage(meta_type, **{field: "Café  cue\ttwo "}, time=5),
                                  MetaMessage("end_of_track", time=0)]))
    mtf = midi_file_to_mtf(midi, mode="all")
    assert f"{meta_type} Caf\\xe9  cue\\ttwo  5" in mtf.splitlines()
    assert list(mtf_to_midi(mtf).tracks[0]) == list(midi.tracks[0])


def test_a_line_mentioning_unknown_meta_anywhere_is_skipped():
    # The reference skips every line that contains "unknown_meta", even inside a text.
    midi = mtf_to_midi("ticks_per_beat 96\ntext has unknown_meta inside 0\nmarker kept 0\nend_of_track 0")
    assert [m.type for m in midi.tracks[0]] == ["marker", "end_of_track"]


def test_runs_of_spaces_on_a_line_with_a_byte_sequence_read_as_the_reference_reads_them():
    # The reference cuts a line holding "[" or "(" around the bracket and drops the empty words, so a run of
    # spaces there counts as one: "sysex 0  (1, 2)" is the sysex (1, 2), not an empty sysex (its data lost).
    assert line_to_message("sysex 0  (1, 2)") == Message("sysex", data=(1, 2))
    assert line_to_message("sysex  0 (1, 2)") == Message("sysex", data=(1, 2))
    assert line_to_message("sequencer_specific  [1, 2] 0") == MetaMessage("sequencer_specific", data=[1, 2])
    assert line_to_message("sequencer_specific [1, 2]  5") == MetaMessage("sequencer_specific", data=[1, 2], time=5)
    data = midi_to_bytes(mtf_to_midi("ticks_per_beat 480\nsysex 0  (1, 2)\nend_of_track 0"))
    assert b"\xf0\x03\x01\x02\xf7" in data  # the reference's bytes: the sysex kept


@pytest.mark.parametrize("line", ["end_of_track ", "note_on ", "set_tempo ", "sysex "])
def test_a_type_then_a_space_and_no_value_is_an_error_as_in_the_reference(line):
    # The reference reads "end_of_track " as the type and one empty value (its time): float('') fails.
    # Only a type with no space after it is mido's default message.
    with pytest.raises(ValueError, match="the line has 0 values"):
        line_to_message(line)
    with pytest.raises(ValueError, match="line 2"):
        mtf_to_midi("ticks_per_beat 480\n" + line)


@pytest.mark.parametrize("event", [b"\x00\xff\x58\x01\x04", b"\x00\xff\x51\x02\x07\xa1", b"\x00\xff\x59\x00",
                                   b"\x00\xff\x54\x05\xe0\x00\x00\x00\x00"])
def test_undecodable_meta_event_is_a_readable_error(tmp_path, event):
    # A time_signature with one byte, a set_tempo with two, an empty key_signature, an SMPTE rate code of 7:
    # the reference fails too, but mido's bare IndexError / KeyError ("7") says nothing in failed_midi2mtf.log.
    track = event + b"\x00\xff\x2f\x00"
    path = tmp_path / "bad_meta.mid"
    path.write_bytes(b"MThd\x00\x00\x00\x06\x00\x01\x00\x01\x00\x60MTrk" + len(track).to_bytes(4, "big") + track)
    with pytest.raises(ValueError, match="meta event mido cannot decode"):
        midi_to_mtf(path)


def two_track_midi_bytes() -> bytes:
    midi = MidiFile(ticks_per_beat=96)
    midi.tracks.append(MidiTrack([MetaMessage("set_tempo", tempo=600000), MetaMessage("track_name", name="Lead"),
                                  Message("note_on", note=60, velocity=80), Message("note_off", note=60, time=96)]))
    midi.tracks.append(MidiTrack([Message("note_on", channel=9, note=36, velocity=100, time=48),
                                  Message("note_on", channel=9, note=36, velocity=0, time=48)]))
    return midi_to_bytes(midi)


def chunk(name: bytes, payload: bytes) -> bytes:
    return name + len(payload).to_bytes(4, "big") + payload


def rmid(smf: bytes) -> bytes:
    body = b"RMID" + b"data" + len(smf).to_bytes(4, "little") + smf + b"\0" * (len(smf) % 2)
    return b"RIFF" + len(body).to_bytes(4, "little") + body + b"LIST" + (4).to_bytes(4, "little") + b"INFO"


def test_rmid_wrapper_and_chunks_other_than_mtrk_are_read_as_the_midi_file_inside(tmp_path):
    # Old GM collections hold RIFF RMID files (.rmi, often renamed .mid); Yamaha XF files have XFIH/XFKM chunks.
    # mido stops at both ("MThd not found", "no MTrk header at start of track"), so the reference loses the file;
    # SMF 1.0 says to skip unknown chunks. The MTF is the reference's MTF of the plain file, with a warning.
    smf = two_track_midi_bytes()
    header, first = smf[:14], smf[14:14 + 8 + int.from_bytes(smf[18:22], "big")]
    second = smf[14 + len(first):]
    xfih, xfkm = chunk(b"XFIH", b"\x00\xff\x01\x02XF\x00\xff\x2f\x00"), chunk(b"XFKM", b"\x00\xff\x2f\x00")
    plain = tmp_path / "plain.mid"
    plain.write_bytes(smf)
    variants = {"rmid.mid": (rmid(smf), "RIFF RMID wrapper"),
                "xf_before.mid": (header + xfih + first + second, r"1 chunk other than MTrk \(XFIH\)"),
                "xf_between.mid": (header + first + xfih + xfkm + second, r"2 chunks other than MTrk \(XFIH, XFKM\)"),
                "rmid_xf.rmi": (rmid(header + xfkm + first + second), "RIFF RMID wrapper and 1 chunk")}
    for name, (data, said) in variants.items():
        (tmp_path / name).write_bytes(data)
        for mode in ("m3", "clamp3", "all"):
            with pytest.warns(UserWarning, match=said):
                assert midi_to_mtf(tmp_path / name, mode=mode) == midi_to_mtf(plain, mode=mode), name
    # What mido reads is read as mido reads it, without a word; what is not MIDI at all stays an error.
    (tmp_path / "xf_after.mid").write_bytes(smf + xfih + xfkm)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert midi_to_mtf(tmp_path / "xf_after.mid") == midi_to_mtf(plain)
    (tmp_path / "wave.mid").write_bytes(b"RIFF" + (4).to_bytes(4, "little") + b"WAVE")
    with pytest.raises(OSError, match="MThd not found"):
        midi_to_mtf(tmp_path / "wave.mid")
    (tmp_path / "cut.mid").write_bytes(rmid(smf)[:40])  # an RMID cut short: the error is the inner file's
    with pytest.raises(ValueError, match="not a complete MIDI file"):
        midi_to_mtf(tmp_path / "cut.mid")


@pytest.mark.parametrize("event", [b"\x00\xf7\x01\xfa", b"\x00\xf7\x03\x90\x3c\x40", b"\x00\xf0\x03\x43\x80\xf7"])
def test_sysex_or_escape_event_with_a_byte_above_127_is_a_readable_error(tmp_path, event):
    # An F7 escape carrying a real-time or status byte is legal MIDI; mido reads it as a sysex message, which holds
    # 7-bit bytes only, and fails as a bare "data byte must be in range 0..127" (the reference fails the file too).
    track = event + b"\x00\x90\x3c\x40\x00\xff\x2f\x00"
    path = tmp_path / "escape.mid"
    path.write_bytes(b"MThd\x00\x00\x00\x06\x00\x01\x00\x01\x00\x60" + chunk(b"MTrk", track))
    with pytest.raises(ValueError, match=r"sysex \(F0\) or escape \(F7\) event holds a byte above 127"):
        midi_to_mtf(path)


@pytest.mark.parametrize("line", ["clock 10", "tune_request 0", "start 0"])
def test_a_real_time_message_is_an_error_naming_its_line(line):
    # mido reads an F8 (clock) or F6 (tune_request, which mido counts as real-time) byte from a track, so --keep_all
    # MTF can hold it, but refuses to write it ("realtime messages are not allowed in MIDI files", no line).
    with pytest.raises(ValueError, match=f"line 3: {line.split()[0]} is a real-time message"):
        mtf_to_midi("ticks_per_beat 96\nnote_on 0 0 60 64\n" + line)


def test_tracks_beyond_the_headers_count_are_not_read_as_in_the_reference_and_said(tmp_path):
    # mido reads as many MTrk chunks as the header names: a header that says 1 of 2 loses the second track's notes
    # in the reference without a word. The MTF stays the reference's; the loss is a warning.
    smf = two_track_midi_bytes()
    (tmp_path / "full.mid").write_bytes(smf)
    short = smf[:10] + (1).to_bytes(2, "big") + smf[12:]
    (tmp_path / "short.mid").write_bytes(short)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        full = midi_to_mtf(tmp_path / "full.mid")
    with pytest.warns(UserWarning, match="the header says 1 track but the file holds 2: the last 1 not read"):
        text = midi_to_mtf(tmp_path / "short.mid")
    assert text == midi_file_to_mtf(mido.MidiFile(tmp_path / "short.mid")) and text != full
    assert "note_on 48 9 36 100" not in text and "note_on 48 9 36 100" in full


@pytest.mark.parametrize("said, signed", [(65535, -1), (32768, -32768)])
def test_a_track_count_above_32767_is_said_as_the_header_says_it(tmp_path, said, signed):
    # SMF's track count is unsigned; mido reads it signed (struct ">hhh"), so 65535 is -1 and no track is read, in
    # the reference too. The MTF stays the reference's (no note); the warning says the header's count, not 0.
    smf = two_track_midi_bytes()
    path = tmp_path / "many.mid"
    path.write_bytes(smf[:10] + said.to_bytes(2, "big") + smf[12:])
    with pytest.warns(UserWarning, match=rf"the header says {said} tracks \(which mido reads as {signed}: none "
                                         r"read\) but the file holds 2: the last 2 not read"):
        text = midi_to_mtf(path)
    assert text == midi_file_to_mtf(mido.MidiFile(path)) == "ticks_per_beat 96\nend_of_track 0"
