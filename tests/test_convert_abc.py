"""MusicXML -> ABC -> interleaved ABC -> MusicXML through abctoolkit (SPEC §3), on real scores."""

from __future__ import annotations

import re
import subprocess
import sys
import warnings
import xml.etree.ElementTree as ElementTree
import zipfile
from pathlib import Path

import pytest

from clamp2.convert.abc import (
    AbcWarning,
    abc_file_to_interleaved,
    abc_to_interleaved,
    clean_quotes,
    interleaved_file_to_xml,
    interleaved_to_xml,
    read_musicxml,
    split_tunes,
    xml_to_abc,
)

# Multi-part chorales (bwv113.8 is an .mxl whose score is a .musicxml), a string quartet
# movement, single-part songs (a lead sheet, a song whose piano staff has two voices).
CORPUS_WORKS = {
    "chorale": "bach/bwv10.7",
    "chorale_musicxml_inside": "bach/bwv113.8",
    "quartet": "mozart/k80/movement3",
    "lead_sheet": "leadSheet/fosterBrownHair",
    "song": "verdi/laDonnaEMobile",
}
REMOVED_FIELDS = ("X:", "T:", "C:", "W:", "w:", "Z:", "%%MIDI")


def read_exact(path) -> str:
    with open(path, encoding="utf-8", newline="") as f:
        return f.read()


def corpus_path(work: str) -> Path:
    from music21 import corpus

    return Path(str(corpus.getWork(work)))


@pytest.fixture(scope="module")
def corpus_scores() -> dict[str, Path]:
    return {kind: corpus_path(work) for kind, work in CORPUS_WORKS.items()}


def cli_xml2abc(path: Path) -> str:
    completed = subprocess.run([sys.executable, "-m", "abctoolkit.xml2abc", "-d", "8", "-x", str(path)],
                               capture_output=True, check=True)
    return completed.stdout.decode("utf-8")


def cli_abc2xml(path: Path) -> str:
    # What the reference's batch_abc2xml.py saves: the command's standard output, decoded as UTF-8.
    completed = subprocess.run([sys.executable, "-m", "abctoolkit.abc2xml", str(path)], capture_output=True, check=True)
    return completed.stdout.decode("utf-8")


def without_date(xml_text: str) -> str:
    # abc2xml stamps today's date: a run across midnight must not fail the comparison.
    return re.sub(r"<encoding-date>[^<]*</encoding-date>", "", xml_text)


def interleave_quietly(abc_text: str) -> tuple[str, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        text = abc_to_interleaved(abc_text)
    return text, [str(w.message) for w in caught if issubclass(w.category, AbcWarning)]


# ------------------------------------------------------------------------------------------------
# Conformance vectors


def test_xml_to_abc_vector(vectors):
    assert xml_to_abc(vectors / "inputs" / "xml" / "bwv10.7.mxl") == read_exact(
        vectors / "expected" / "abc_from_xml" / "bwv10.7.abc")


def test_interleaved_vectors(vectors):
    expected = vectors / "expected" / "interleaved"
    assert abc_file_to_interleaved(vectors / "expected" / "abc_from_xml" / "bwv10.7.abc") == read_exact(
        expected / "bwv10.7.abc")
    # abctoolkit cannot time the ` (beaming) in this tune: a warning, not a failure
    with pytest.warns(AbcWarning, match="bar durations"):
        assert abc_file_to_interleaved(vectors / "inputs" / "abc" / "airds_tune3.abc") == read_exact(
            expected / "airds_tune3.abc")


def test_single_voice_tune_without_v1_line_is_fixed(vectors, tmp_path):
    with_v1 = read_exact(vectors / "inputs" / "abc" / "airds_tune3.abc")
    assert "\nK:G\nV:1\n" in with_v1
    without_v1 = tmp_path / "tune3.abc"
    without_v1.write_text(with_v1.replace("\nK:G\nV:1\n", "\nK:G\n"), encoding="utf-8")
    with pytest.warns(AbcWarning):
        assert abc_file_to_interleaved(without_v1) == read_exact(vectors / "expected" / "interleaved" / "airds_tune3.abc")


def test_not_a_tune_is_a_failure():
    with pytest.raises(ValueError, match="no K: line"):
        abc_to_interleaved("X:1\nT:no key\nabc|def|\n")


def test_several_tunes_without_v1_fail_instead_of_running_together():
    """A tune book in one file: the one-voice fix would read the second tune's header as notes of the first."""
    book = "X:1\nT:First\nL:1/8\nM:4/4\nK:C\nc8 | d8 |]\n\nX:2\nT:Second\nL:1/8\nM:3/4\nK:G\nG6 | B6 | d6 |]\n"
    with pytest.raises(ValueError, match=r"2 tunes in one file \(X: lines 1, 8\).*one tune each"):
        abc_to_interleaved(book)
    # each tune alone is the one-voice tune the fix is for
    for tune in split_tunes(book):
        assert interleave_quietly(tune)[0].count("[V:1]") in (2, 3)


@pytest.mark.parametrize("voices", ["V:S\ncdef|\nV:A\nCDEF|\n", "V: 1\ncdef|\nV: 2\nCDEF|\n",
                                    "V:1 clef=treble\ncdef|\nV:2 clef=bass\nCDEF|\n"])
def test_voices_not_named_v1_v2_fail_with_the_reason(voices):
    with pytest.raises(ValueError, match=r"its voices are 'V:.*\(line 5\).*exactly 'V:1', 'V:2'"):
        abc_to_interleaved("X:1\nL:1/8\nM:4/4\nK:C\n" + voices)


# ------------------------------------------------------------------------------------------------
# In-process xml2abc / abc2xml == their command lines, independent of what ran before


def test_in_process_xml2abc_equals_command_line_after_other_files(corpus_scores, vectors):
    # Convert other scores first: leftover module state would change the bytes of the next one.
    for path in corpus_scores.values():
        xml_to_abc(path)
    for kind in ("quartet", "lead_sheet"):
        assert xml_to_abc(corpus_scores[kind]) == cli_xml2abc(corpus_scores[kind])
    # Voltas (<ending>): the options left at their defaults (-v 0 among them) shape their ABC too.
    with_voltas = corpus_path("bach/bwv8.6")
    abc = xml_to_abc(with_voltas)
    assert "|1 " in abc and ":|2 " in abc
    assert abc == cli_xml2abc(with_voltas)


@pytest.mark.parametrize("variant", ["utf-8 bom", "crlf", "latin-1 declared"])
def test_plain_xml_with_a_bom_crlf_or_another_declared_encoding_gives_the_same_abc(variant, tmp_path, vectors):
    """Files as other editors save them convert as the command line (the reference's call) converts them."""
    score = read_musicxml(vectors / "inputs" / "xml" / "bwv10.7.mxl")
    if isinstance(score, str):
        score = score.encode("utf-8")
    assert score.startswith(b"<?xml") and b"\r\n" not in score and b'encoding="utf-8"' in score[:100]
    if variant == "utf-8 bom":
        data = b"\xef\xbb\xbf" + score
    elif variant == "crlf":
        data = score.replace(b"\n", b"\r\n")
    else:
        data = score.replace(b'encoding="utf-8"', b'encoding="ISO-8859-1"', 1)
    path = tmp_path / "bwv10.7.xml"
    path.write_bytes(data)
    abc = xml_to_abc(path)
    assert abc == cli_xml2abc(path)
    vector = read_exact(vectors / "expected" / "abc_from_xml" / "bwv10.7.abc")
    # The lyrics hold UTF-8 bytes (’, ©): read as Latin-1 they change, as in the command line; all else stays.
    assert (abc != vector) == (variant == "latin-1 declared")
    assert abc.count("\n") == vector.count("\n")


def test_mxl_with_musicxml_score_reads_container(corpus_scores, tmp_path):
    path = corpus_scores["chorale_musicxml_inside"]
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        assert not [n for n in names if n.lower().endswith(".xml") and not n.startswith("META")]
        unpacked = tmp_path / "bwv113.8.musicxml"
        unpacked.write_bytes(archive.read("bwv113.8.musicxml"))
    # The command line gives nothing for the archive (the bug being fixed) ...
    assert cli_xml2abc(path) == ""
    # ... and the fix gives exactly what it gives for the unpacked score.
    abc = xml_to_abc(path)
    assert abc and abc == cli_xml2abc(unpacked)


def test_mxl_container_rootfile_is_followed(tmp_path, vectors):
    score = read_musicxml(vectors / "inputs" / "xml" / "bwv10.7.mxl")
    archive_path = tmp_path / "packed.mxl"
    with zipfile.ZipFile(archive_path, "w") as archive:
        archive.writestr("META-INF/container.xml",
                         '<?xml version="1.0"?><container xmlns="urn:oasis:names:tc:opendocument:xmlns:container">'
                         '<rootfiles><rootfile full-path="scores/main.musicxml"/></rootfiles></container>')
        archive.writestr("scores/part1.musicxml", b"<not-the-score/>")
        archive.writestr("scores/main.musicxml", score)
    assert xml_to_abc(archive_path) == read_exact(vectors / "expected" / "abc_from_xml" / "bwv10.7.abc")


def test_mxl_whose_first_xml_member_is_not_the_score_converts_the_container_score(tmp_path, vectors):
    """xml2abc's own rule (first non-META *.xml) picks a layout file here and fails, as the reference does."""
    score = read_musicxml(vectors / "inputs" / "xml" / "bwv10.7.mxl")
    archive_path = tmp_path / "extra_first.mxl"
    with zipfile.ZipFile(archive_path, "w") as archive:
        archive.writestr("META-INF/container.xml",
                         '<?xml version="1.0"?><container><rootfiles><rootfile full-path="score.xml"/></rootfiles></container>')
        archive.writestr("aaa_layout.xml", b"<layout/>")
        archive.writestr("score.xml", score)
    assert cli_xml2abc(archive_path) == ""
    assert xml_to_abc(archive_path) == read_exact(vectors / "expected" / "abc_from_xml" / "bwv10.7.abc")
    # with no container naming another member, the failure is xml2abc's own
    with zipfile.ZipFile(tmp_path / "layout_only.mxl", "w") as archive:
        archive.writestr("aaa_layout.xml", b"<layout/>")
    with pytest.raises(ValueError, match="xml2abc"):
        xml_to_abc(tmp_path / "layout_only.mxl")


def test_a_timewise_score_converts_as_its_partwise_form(tmp_path, vectors):
    """score-timewise is valid MusicXML (each measure holds its parts); xml2abc reads only score-partwise and
    writes nothing ("has no notes"), the reference's failure. Here it becomes the partwise score's ABC."""
    score = ElementTree.fromstring(read_musicxml(vectors / "inputs" / "xml" / "bwv10.7.mxl"))
    timewise = ElementTree.Element("score-timewise", score.attrib)
    timewise.extend(child for child in score if child.tag != "part")
    parts = score.findall("part")
    for index, first in enumerate(parts[0].findall("measure")):
        measure = ElementTree.SubElement(timewise, "measure", first.attrib)
        for part in parts:
            ElementTree.SubElement(measure, "part", part.attrib).extend(part.findall("measure")[index])
    path = tmp_path / "bwv10.7.xml"
    path.write_bytes(ElementTree.tostring(timewise, encoding="utf-8"))
    assert cli_xml2abc(path) == ""
    assert xml_to_abc(path) == read_exact(vectors / "expected" / "abc_from_xml" / "bwv10.7.abc")


def test_uncompressed_musicxml_saved_as_mxl_converts_as_the_xml(tmp_path, vectors):
    """Some sites and exporters save plain MusicXML under .mxl; the reference fails (not a zip)."""
    score = read_musicxml(vectors / "inputs" / "xml" / "bwv10.7.mxl")
    (tmp_path / "bwv10.7.mxl").write_bytes(score)
    assert xml_to_abc(tmp_path / "bwv10.7.mxl") == read_exact(vectors / "expected" / "abc_from_xml" / "bwv10.7.abc")
    (tmp_path / "noise.mxl").write_bytes(b"neither zip nor XML")
    with pytest.raises(ValueError, match="not an .mxl"):
        xml_to_abc(tmp_path / "noise.mxl")


def test_a_lyric_number_xml2abc_cannot_read_becomes_the_next_verse(tmp_path):
    """MusicXML allows any token as a lyric number and Sibelius writes number="chorus" (music21's
    schubert/Lindenbaum.xml): xml2abc's int() raises and the reference loses the file. Here each such
    name is one further verse throughout, as if the file had numbered it, with a warning."""
    def score(chorus: str) -> str:
        notes = "".join(
            f'<note><pitch><step>{step}</step><octave>5</octave></pitch><duration>4</duration><type>whole</type>'
            + "".join(f'<lyric number="{number}"><syllabic>single</syllabic><text>{text}</text></lyric>'
                      for number, text in lyrics) + "</note>"
            for step, lyrics in (("C", (("1", "la"), (chorus, "lo"))), ("D", ((chorus, "li"), ("verse1", "le")))))
        return ('<?xml version="1.0" encoding="UTF-8"?><score-partwise version="3.0"><part-list><score-part id="P1">'
                '<part-name>V</part-name></score-part></part-list><part id="P1"><measure number="1"><attributes>'
                '<divisions>1</divisions><time><beats>8</beats><beat-type>4</beat-type></time></attributes>'
                f'{notes}</measure></part></score-partwise>')

    numbered, named = tmp_path / "numbered.xml", tmp_path / "named.xml"
    numbered.write_text(score("2"), encoding="utf-8")
    named.write_text(score("chorus"), encoding="utf-8")
    assert cli_xml2abc(named) == ""
    with pytest.warns(AbcWarning, match="lyric numbers"):
        abc = xml_to_abc(named)
    assert abc == xml_to_abc(numbered).replace("numbered", "named")
    assert "w: la le|\nw: lo li|" in abc


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "latin-1"])
def test_musicxml_content_in_another_encoding_converts_as_the_file(encoding, tmp_path):
    """The API's content route: a MusicXML file's bytes in UTF-16 (Finale, older Sibelius) or Latin-1, or that
    file read into a str, give the file's interleaved ABC (they were refused as not UTF-8, or misread)."""
    from clamp2.extraction.model_inputs import model_text, resolve

    name = {"utf-16": "UTF-16", "utf-16-be": "UTF-16", "latin-1": "ISO-8859-1"}[encoding]
    text = (f'<?xml version="1.0" encoding="{name}"?>\n<score-partwise version="4.0"><part-list>'
            '<score-part id="P1"><part-name>Flöte à bec</part-name></score-part></part-list><part id="P1">'
            '<measure number="1"><attributes><divisions>1</divisions><time><beats>4</beats><beat-type>4</beat-type>'
            '</time></attributes><direction><direction-type><words>très doux</words></direction-type></direction>'
            '<note><pitch><step>C</step><octave>5</octave></pitch><duration>4</duration><type>whole</type></note>'
            '</measure></part></score-partwise>\n')
    data = (b"\xfe\xff" if encoding == "utf-16-be" else b"") + text.encode(encoding)
    path = tmp_path / "score.xml"
    path.write_bytes(data)
    expected = model_text(resolve(path))
    assert 'nm="Flöte à bec"' in expected and '"^très doux"' in expected
    assert model_text(resolve(data)) == expected
    assert model_text(resolve(data.decode(encoding))) == expected


def test_in_process_abc2xml_equals_command_line_after_other_files(corpus_scores, tmp_path):
    interleaved = {}
    for kind in ("chorale", "lead_sheet"):
        interleaved[kind] = tmp_path / f"{kind}.abc"
        interleaved[kind].write_text(interleave_quietly(xml_to_abc(corpus_scores[kind]))[0], encoding="utf-8")
    interleaved_file_to_xml(interleaved["chorale"])
    first = interleaved_file_to_xml(interleaved["lead_sheet"])
    assert first.endswith("</score-partwise>\n")
    assert without_date(first) == without_date(cli_abc2xml(interleaved["lead_sheet"]))
    assert without_date(interleaved_file_to_xml(interleaved["chorale"])) == without_date(
        cli_abc2xml(interleaved["chorale"]))


def test_failures_raise_with_a_reason(tmp_path):
    broken = tmp_path / "broken.xml"
    broken.write_text("<score-partwise><part id='P1'><measure>")
    with pytest.raises(ValueError, match="xml2abc failed: ParseError"):
        xml_to_abc(broken)
    not_zip = tmp_path / "fake.mxl"
    not_zip.write_bytes(b"plain text")
    with pytest.raises(ValueError, match="zip"):
        xml_to_abc(not_zip)
    empty_score = tmp_path / "empty.xml"
    empty_score.write_text("<score-partwise><part-list/></score-partwise>")
    with pytest.raises(ValueError, match="xml2abc wrote no ABC"):
        xml_to_abc(empty_score)
    with pytest.raises(ValueError, match="abc2xml produced no score"):
        interleaved_to_xml("")


# ------------------------------------------------------------------------------------------------
# The whole chain on real scores, checking the formats of SPEC §3


def body_voice_ids(abc_text: str) -> list[str]:
    return [line.split()[0][2:] for line in abc_text.splitlines() if re.match(r"V:\S+", line)]


@pytest.mark.parametrize("kind", list(CORPUS_WORKS))
def test_corpus_chain_formats(corpus_scores, kind):
    abc = xml_to_abc(corpus_scores[kind])
    lines = abc.split("\n")
    # standard ABC from xml2abc -d 8 -x: header, unit length 1/8, no $ line breaks, %N bar numbers
    assert lines[0] == "X:1" and "L:1/8" in lines and any(line.startswith("K:") for line in lines)
    assert "V:1" in lines and abc.endswith("\n\n")
    music = [line for line in lines if line.startswith(" ") or line.startswith("[")]
    assert music and all(re.search(r" %\d+$", line) for line in music if not line.startswith("w:"))
    assert "$" not in "".join(music)

    interleaved, warned = interleave_quietly(abc)
    assert interleaved.endswith("\n") and "\n\n" not in interleaved
    header = [line for line in interleaved.splitlines() if not line.startswith("[V:")]
    body = [line for line in interleaved.splitlines() if line.startswith("[V:")]
    assert not [line for line in header if line.startswith(REMOVED_FIELDS)]
    # header voice definitions, then one line per bar with one [V:n] chunk per voice, in order
    voices = [v for v in dict.fromkeys(body_voice_ids("\n".join(header)))]
    assert interleaved.splitlines()[len(header):] == body and body
    for line in body:
        chunks = re.findall(r"\[V:([^\]]+)\]", line)
        assert chunks == voices, line
        assert not re.search(r"%\d+$", line)
        for chunk in re.split(r"(?=\[V:)", line)[1:]:
            assert re.search(r"[|:\]][\d,.\-]*$", chunk), chunk  # a barline, maybe a volta number
    for message in warned:
        assert message  # unequal bar durations are only warnings

    xml_text = interleaved_to_xml(interleaved)
    assert xml_text.startswith("<?xml version='1.0' encoding='utf-8'?>\n<!DOCTYPE score-partwise")
    root = ElementTree.fromstring(xml_text.split("\n", 2)[2])
    assert root.tag == "score-partwise"
    parts = root.findall("part")
    assert parts and len(parts) <= len(voices)
    for part in parts:
        assert len(part.findall("measure")) == len(body)  # one interleaved line per bar


def test_quartet_and_chorales_keep_their_voices(corpus_scores):
    for kind, expected_voices in (("chorale", 4), ("quartet", 4), ("lead_sheet", 1)):
        interleaved, _ = interleave_quietly(xml_to_abc(corpus_scores[kind]))
        first_bar = next(line for line in interleaved.splitlines() if line.startswith("[V:"))
        assert first_bar.count("[V:") == expected_voices


def test_xml2abc_scores_written_voice_by_voice_get_no_block_warning(corpus_scores):
    # xml2abc writes each voice once after its V: definitions: nothing stays in abctoolkit's header.
    for kind in ("chorale", "chorale_musicxml_inside", "quartet", "song"):
        _, warned = interleave_quietly(xml_to_abc(corpus_scores[kind]))
        assert not any("voice blocks misread" in message for message in warned), (kind, warned)


# ------------------------------------------------------------------------------------------------
# Interleaving rules and failures

TWO_VOICES = "X:1\nT:t\nM:2/4\nL:1/8\nK:C\nV:1\n{v1}\nV:2\n{v2}\n"


def test_unequal_bar_counts_fail():
    with pytest.raises(ValueError, match="cannot align the voices"):
        abc_to_interleaved(TWO_VOICES.format(v1="cdef|gabc|", v2="CDEF|"))


def test_unequal_bar_durations_only_warn():
    text, warned = interleave_quietly(TWO_VOICES.format(v1="cdef|gabc|", v2="CDE|G,A,B,C|"))
    assert text.splitlines()[-2:] == ["[V:1]cdef|[V:2]CDE|", "[V:1]gabc|[V:2]G,A,B,C|"]
    assert warned and "bar durations" in warned[0]


def test_empty_piece_fails():
    with pytest.raises(ValueError, match="Empty piece"):
        abc_to_interleaved(TWO_VOICES.format(v1="z4|z4|", v2="z4|z4|"))


def test_information_fields_and_bar_numbers_removed():
    abc = "X:3\nT:title\nC:me\nZ:who\n%%MIDI program 1\nM:2/4\nL:1/8\nK:C\n\nV:1\ncdef|gabc| %2\nw: la la\n"
    text, _ = interleave_quietly(abc)
    assert text == "M:2/4\nL:1/8\nK:C\n[V:1]cdef|\n[V:1]gabc|\n"


def test_quote_quirk():
    # no barline inside quotes: every \" is deleted
    assert clean_quotes('"C"cd \\"x\\" ef|\n') == '"C"cd x ef|\n'
    # a quoted string with a barline is removed from the original line, whose \" stay
    assert clean_quotes('"^a|b"cd \\"x\\" "D"ef|\n') == 'cd \\"x\\" "D"ef|\n'
    text, _ = interleave_quietly("M:2/4\nL:1/8\nK:C\nV:1\n\"^x||y\"cdef|gabc|\n")
    assert text.splitlines()[-2:] == ["[V:1]cdef|", "[V:1]gabc|"]
    # A "%" comment line is not music: its \" stay (the reference's output, byte for byte).
    text, _ = interleave_quietly('M:2/4\nL:1/8\nK:C\nV:1\n% say \\"x\\" here\n"C"cd \\"y\\" ef|gabc|\n')
    assert text.splitlines()[-2:] == ['[V:1]% say \\"x\\" here"C"cd y ef|', "[V:1]gabc|"]


# -- found by a mutation audit: each fails on a plausible one-line bug the suite missed -----------------


def test_tune_end_words_W_are_removed_by_interleaving():
    from clamp2.convert.abc import abc_to_interleaved

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text = abc_to_interleaved("X:1\nT:t\nW:words in the header\nM:2/4\nL:1/8\nK:C\nV:1\ncdef|gabc|\n")
    assert text == "M:2/4\nL:1/8\nK:C\n[V:1]cdef|\n[V:1]gabc|\n"


TWO_VOICE_HEAD = "X:1\nL:1/4\nM:2/4\nK:C\nV:1\nV:2\n"


def test_a_percent_sign_inside_a_quoted_text_is_named_as_music_abc2xml_drops():
    # Found by differential fuzzing: xml2abc writes a text "50%" as "^50%", and abc2xml (abctoolkit's and the
    # original's) reads the % as a comment: the whole interleaved line, one bar of every voice, is lost.
    text = TWO_VOICE_HEAD + '[V:1]"^50%"C2|[V:2]E2|\n[V:1]D2|][V:2]F2|]\n'
    with pytest.warns(AbcWarning, match=r"music lost.*quoted text \(line 7\)"):
        xml_text = interleaved_to_xml(text)
    pitches = [note.findtext("pitch/step") for note in ElementTree.fromstring(xml_text.split("\n", 2)[2]).iter("note")]
    assert pitches == ["D", "F"]  # what the warning is about: C and E are gone


@pytest.mark.parametrize("text", [TWO_VOICE_HEAD + '[V:1]"^50"C2|[V:2]E2| % a comment "x%"\n[V:1]D2|][V:2]F2|]\n',
                                  "X:1\nT:50% off\nL:1/4\nM:2/4\nK:C\nC2|D2|]\n"])
def test_a_percent_sign_in_a_comment_or_a_field_is_no_loss(text):
    with warnings.catch_warnings():
        warnings.simplefilter("error", AbcWarning)
        interleaved_to_xml(text)
