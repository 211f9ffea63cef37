"""Converter behaviours the original pipeline has and no other test pinned (found by a code-driven mutation
audit): reading encodings and newlines as the reference does, MusicXML archives, MTF text, the batch logs,
default modes and exit status."""

from __future__ import annotations

import shutil
import warnings
import zipfile

import pytest

from clamp2.convert.abc import abc_file_to_interleaved, interleaved_file_to_xml, xml_to_abc


def read_exact(path) -> str:
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


def interleaved_quietly(path) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return abc_file_to_interleaved(path)


def test_mxl_member_with_upper_case_xml_suffix_is_the_score(vectors, tmp_path):
    # xml2abc.py: (n[:4] != 'META') and (n[-4:].lower() == '.xml'); no container.xml to fall back on.
    source = vectors / "inputs" / "xml" / "bwv10.7.mxl"
    with zipfile.ZipFile(source) as archive:
        data = archive.read("bwv10.7.xml")
    upper = tmp_path / "upper.mxl"
    with zipfile.ZipFile(upper, "w") as archive:
        archive.writestr("score.XML", data)
    assert xml_to_abc(upper) == xml_to_abc(source)


def test_upper_case_mxl_suffix_is_unzipped(vectors, tmp_path):
    # xml2abc.py: elif ext.lower() == '.mxl'
    source = vectors / "inputs" / "xml" / "bwv10.7.mxl"
    shutil.copy(source, tmp_path / "BWV.MXL")
    assert xml_to_abc(tmp_path / "BWV.MXL") == xml_to_abc(source)


def test_abc2xml_reads_non_utf8_input_as_latin1(tmp_path):
    # abc2xml.py decodeInput: utf-8, else latin-1 (byte 0x93 is U+0093, not cp1252's left quote).
    path = tmp_path / "t.abc"
    path.write_bytes(b"X:1\nT:Caf\x93 tune\nL:1/8\nM:4/4\nK:C\nV:1\ncdef gabc|\n")
    assert "<work-title>Caf\x93 tune</work-title>" in interleaved_file_to_xml(path)


def test_whitespace_only_lines_are_dropped_before_interleaving(vectors, tmp_path):
    # reference: [line for line in abc_lines if line.strip() != '']
    tune = read_exact(vectors / "inputs" / "abc" / "airds_tune3.abc")
    lines = tune.splitlines(keepends=True)
    spaced = tmp_path / "spaced.abc"
    spaced.write_text("".join(line + ("   \n" if i > 3 else "") for i, line in enumerate(lines)), encoding="utf-8")
    assert interleaved_quietly(spaced) == read_exact(vectors / "expected" / "interleaved" / "airds_tune3.abc")


def test_crlf_abc_is_read_with_universal_newlines(vectors, tmp_path):
    # reference: open(path, 'r', encoding='utf-8').readlines() turns \r\n into \n
    tune = read_exact(vectors / "inputs" / "abc" / "airds_tune3.abc")
    crlf = tmp_path / "crlf.abc"
    crlf.write_bytes(tune.replace("\n", "\r\n").encode("utf-8"))
    assert interleaved_quietly(crlf) == read_exact(vectors / "expected" / "interleaved" / "airds_tune3.abc")


def test_byte_order_mark_is_kept_as_the_reference_reads_it(vectors, tmp_path):
    # reference: open(path, 'r', encoding='utf-8'): the BOM stays on "X:" so that line is not removed
    tune = read_exact(vectors / "inputs" / "abc" / "airds_tune3.abc")
    bom = tmp_path / "bom.abc"
    bom.write_bytes(b"\xef\xbb\xbf" + tune.encode("utf-8"))
    assert interleaved_quietly(bom).startswith("\ufeffX:0003\nM:2/4\n")


PEDAL_SCORE = """<?xml version="1.0" encoding="UTF-8"?>
<score-partwise version="3.1">
  <part-list><score-part id="P1"><part-name>Piano</part-name></score-part></part-list>
  <part id="P1">
    <measure number="1">
      <attributes><divisions>1</divisions><key><fifths>0</fifths></key><time><beats>4</beats><beat-type>4</beat-type></time><clef><sign>G</sign><line>2</line></clef></attributes>
      <direction placement="below"><direction-type><pedal type="start"/></direction-type></direction>
      <note><pitch><step>C</step><octave>4</octave></pitch><duration>2</duration><type>half</type></note>
      <direction placement="below"><direction-type><pedal type="stop"/></direction-type></direction>
      <note><pitch><step>D</step><octave>4</octave></pitch><duration>2</duration><type>half</type></note>
    </measure>
  </part>
</score-partwise>
"""


def test_pedal_directions_are_kept_as_xml2abc_d8_x_keeps_them(tmp_path):
    # `python -m abctoolkit.xml2abc -d 8 -x ped.xml` prints "!ped! C4!ped-up! D4 | %1" (--noped not given)
    path = tmp_path / "ped.xml"
    path.write_text(PEDAL_SCORE, encoding="utf-8")
    assert "\n!ped! C4!ped-up! D4 | %1\n" in xml_to_abc(path)


def test_hand_typed_non_ascii_text_meta_reads_as_the_reference_reads_it():
    # reference str_to_msg: " ".join(...).encode('utf-8').decode('unicode_escape'): é becomes its two UTF-8 bytes
    from clamp2.convert.mtf import line_to_message

    assert line_to_message("track_name Café  x 0").name == "CafÃ©  x"


def test_mtf_file_is_read_as_utf8(tmp_path):
    # the original batch_mtf2midi.py (clamp3 02be2e3) writes exactly these bytes for this file
    from clamp2.convert.mtf import mtf_file_to_midi_bytes

    path = tmp_path / "cafe.mtf"
    path.write_bytes("ticks_per_beat 480\ntrack_name Café 0\nend_of_track 0".encode("utf-8"))
    assert mtf_file_to_midi_bytes(path) == (b"MThd\x00\x00\x00\x06\x00\x01\x00\x01\x01\xe0"
                                            b"MTrk\x00\x00\x00\r\x00\xff\x03\x05Caf\xc3\xa9\x00\xff/\x00")


def fail_over_two_lines(path):
    raise ValueError("first line\n  second line")


def test_a_multi_line_reason_is_one_line_of_the_failure_log(tmp_path, capsys):
    from clamp2.convert.batch_runner import convert_folder

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.abc").write_text("x", encoding="utf-8")
    assert convert_folder(tmp_path / "in", tmp_path / "out", convert=fail_over_two_lines, extensions=[".abc"],
                          output_suffix=".xml", tool="t", workers=1, progress=False) == 1
    assert read_exact(tmp_path / "out" / "failed_t.log") == "a.abc\tValueError: first line second line\n"


def test_pyparsing_deprecation_notices_are_not_file_warnings(vectors, tmp_path, capsys):
    # abc2xml calls pyparsing's camelCase names: PyparsingDeprecationWarning is a UserWarning too
    from clamp2.convert.batch_runner import convert_folder

    (tmp_path / "in").mkdir()
    shutil.copy(vectors / "expected" / "interleaved" / "bwv10.7.abc", tmp_path / "in")
    assert convert_folder(tmp_path / "in", tmp_path / "out", convert=interleaved_file_to_xml, extensions=[".abc"],
                          output_suffix=".xml", tool="abc2xml", workers=1, progress=False) == 0
    assert read_exact(tmp_path / "out" / "warnings_abc2xml.log") == ""


def test_failure_log_is_rewritten_by_every_run(vectors, tmp_path, capsys):
    from clamp2.convert.batch_runner import convert_folder
    from clamp2.convert.mtf import midi_to_mtf

    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(vectors / "inputs" / "midi" / "handmade.mid", inputs)
    (inputs / "broken.mid").write_bytes(b"MThd")
    args = dict(convert=midi_to_mtf, extensions=[".mid"], output_suffix=".mtf", tool="midi2mtf", workers=1,
                progress=False)
    assert convert_folder(inputs, tmp_path / "out", **args) == 1
    assert read_exact(tmp_path / "out" / "failed_midi2mtf.log").startswith("broken.mid\t")
    (inputs / "broken.mid").unlink()
    assert convert_folder(inputs, tmp_path / "out", **args) == 0
    assert read_exact(tmp_path / "out" / "failed_midi2mtf.log") == ""


def warn_then_read_the_log(path):
    if path.name == "a.abc":
        warnings.warn("unaligned bars", UserWarning)
        return "a"
    return read_exact(path.parent.parent / "out" / "warnings_t.log")


def test_warnings_log_is_flushed_per_file(tmp_path, capsys):
    # a killed run keeps the warnings of the files it finished
    from clamp2.convert.batch_runner import convert_folder

    (tmp_path / "in").mkdir()
    for name in ("a.abc", "b.abc"):
        (tmp_path / "in" / name).write_text("x", encoding="utf-8")
    assert convert_folder(tmp_path / "in", tmp_path / "out", convert=warn_then_read_the_log, extensions=[".abc"],
                          output_suffix=".txt", tool="t", workers=1, progress=False) == 0
    assert read_exact(tmp_path / "out" / "b.txt") == "a.abc\tunaligned bars\n"


def test_midi2mtf_default_is_m3_compatible(tmp_path, capsys):
    # CLaMP 2's batch_midi2mtf.py: m3_compatible = True (sysex and sequencer_specific dropped)
    from conftest import DATA_DIR, load_script
    from clamp2.convert.mtf import midi_to_mtf

    source = DATA_DIR / "vectors_clamp3" / "inputs" / "midi" / "handmade_sysex.mid"
    (tmp_path / "in").mkdir()
    shutil.copy(source, tmp_path / "in")
    assert load_script("process_data/batch_midi2mtf.py").main([str(tmp_path / "in"), str(tmp_path / "out")]) == 0
    written = read_exact(tmp_path / "out" / "handmade_sysex.mtf")
    assert written == midi_to_mtf(source, mode="m3") != midi_to_mtf(source, mode="clamp3")


@pytest.mark.parametrize("script", ["batch_mtf2midi", "batch_abc2xml"])
def test_script_exit_status_is_1_when_a_file_fails(tmp_path, script):
    import subprocess
    import sys

    from conftest import REPO_ROOT

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / ("bad.mtf" if script == "batch_mtf2midi" else "bad.abc")).write_bytes(b"" if script == "batch_abc2xml" else b"not music")
    completed = subprocess.run([sys.executable, str(REPO_ROOT / "process_data" / f"{script}.py"),
                                str(tmp_path / "in"), str(tmp_path / "out"), "--no_progress"],
                               capture_output=True, text=True)
    assert completed.returncode == 1, completed.stderr
    assert completed.stdout.strip().splitlines()[-1] == "converted 0, skipped 0, failed 1"


def test_interleaving_takes_only_abc_files(vectors, tmp_path, capsys):
    # docs/differences.md (which files the converters take): the interleaver takes .abc only
    from conftest import load_script

    (tmp_path / "in").mkdir()
    shutil.copy(vectors / "inputs" / "abc" / "airds_tune3.abc", tmp_path / "in")
    shutil.copy(vectors / "inputs" / "abc" / "airds_tune3.abc", tmp_path / "in" / "notes.txt")
    assert load_script("process_data/batch_interleaved_abc.py").main([str(tmp_path / "in"), str(tmp_path / "out"),
                                                                     "--no_progress"]) == 0
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.suffix != ".log") == ["airds_tune3.abc"]


def test_abc2xml_no_progress_is_silent(vectors, tmp_path, capsys):
    from conftest import load_script

    (tmp_path / "in").mkdir()
    shutil.copy(vectors / "expected" / "interleaved" / "bwv10.7.abc", tmp_path / "in")
    assert load_script("process_data/batch_abc2xml.py").main([str(tmp_path / "in"), str(tmp_path / "out"),
                                                             "--no_progress", "--workers", "1"]) == 0
    assert capsys.readouterr().err == ""
