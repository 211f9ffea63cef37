"""MusicXML -> ABC -> interleaved ABC -> MusicXML, through ``abctoolkit`` (SPEC §3).

- ``xml_to_abc``: Wim Vree's xml2abc as shipped in abctoolkit, with ``-d 8 -x``, run in-process
  (about 10x faster than a subprocess per file) and giving exactly the bytes that
  ``python -m abctoolkit.xml2abc -d 8 -x FILE`` writes to stdout. *fix*: an ``.mxl`` whose score is
  a ``.musicxml`` is read through ``META-INF/container.xml``.
- ``abc_to_interleaved``: the CLaMP 2 cleaning + rotation pipeline, so that every line holds one
  bar of every voice: ``[V:1]...|[V:2]...|``. *fix*: a single-voice tune without a ``V:1`` line
  gets one after its first ``K:`` line. *fix*: a tune on which that pipeline fails is repaired
  (:mod:`clamp2.convert.abc_repair`: line continuations, barlines in a row, unclosed bars, ...) and
  tried again; a failure then names the line where abctoolkit breaks.
- ``interleaved_to_xml``: abctoolkit's abc2xml, the bytes of its command line's standard output
  (what the reference's ``batch_abc2xml.py`` saves).

The abctoolkit modules keep module-level state between calls (xml2abc's global ``abcOut``,
abc2xml's ``prevloc`` and ``mxm``); each call here resets it so that a conversion depends on its
input only, as it would in a fresh ``python -m`` process. They also print diagnostics to
stdout/stderr: those are captured and end up in the error message or in an ``AbcWarning``.

``abctoolkit.convert`` and ``abctoolkit.data`` are never imported: the former runs a shell
command at import.
"""

from __future__ import annotations

import io
import os
import re
import warnings
import xml.etree.ElementTree as ElementTree
import zipfile
from optparse import Values
from pathlib import Path

from clamp2.convert.abc_repair import (COMMENT_RE, INLINE_VOICE_RE, clean_quotes, locate_bar_problem, masked,
                                       numbered_lines, repair_lines, shortened)
from clamp2.convert.captured import captured, one_conversion

MUSICXML_EXTENSIONS = (".xml", ".mxl", ".musicxml")
XML2ABC_UNIT_LENGTH = 8
# The most an .mxl member may expand to: a few-MB archive can hold gigabytes of zeros (a zip bomb), read whole
# into memory here, where xml2abc itself streams it. The largest real scores are tens of MB.
MAX_MXL_MEMBER_BYTES = 512 << 20

# Dropped from standard ABC before interleaving: titles, composers, lyrics, notes and MIDI hints
# carry no music the model should see (SPEC §3).
INTERLEAVE_REMOVED_FIELDS = ["X:", "T:", "C:", "W:", "w:", "Z:", "%%MIDI"]
FIELD_LINE_RE = re.compile(r"^[A-Za-z]:")


class AbcWarning(UserWarning):
    """A conversion that succeeded but whose result may be musically off (e.g. unaligned bars)."""


def xml2abc_options() -> Values:
    """The option values ``python -m abctoolkit.xml2abc -d 8 -x`` ends up with."""
    return Values({
        "u": None, "m": 0, "c": 0, "d": XML2ABC_UNIT_LENGTH, "n": 0, "b": 0, "o": "", "v": 0,
        "x": True, "p": [], "j": None, "t": None, "s": None, "i": None, "v1": None,
        "ped": True, "stm": False,
    })


def container_rootfile(archive: zipfile.ZipFile) -> str | None:
    try:
        container = ElementTree.fromstring(read_member(archive, "META-INF/container.xml"))
    except (KeyError, ElementTree.ParseError):
        return None
    for element in container.iter():
        # Some writers put the OCF namespace on the element, some do not.
        if element.tag.rsplit("}", 1)[-1] == "rootfile" and element.get("full-path"):
            return element.get("full-path")
    return None


def score_name_in_mxl(archive: zipfile.ZipFile) -> str:
    """The member xml2abc converts: its own rule first (first non-META ``*.xml``) so that the bytes
    stay the reference's, else the rootfile named by ``META-INF/container.xml`` (the *fix* for
    archives whose score is a ``.musicxml``)."""
    for name in archive.namelist():
        if name[:4] != "META" and name[-4:].lower() == ".xml":
            return name
    rootfile = container_rootfile(archive)
    if rootfile is None:
        raise ValueError("no MusicXML score in the .mxl archive (no *.xml and no container rootfile)")
    if rootfile not in archive.namelist():
        raise ValueError(f"container.xml names {rootfile!r}, which is not in the .mxl archive")
    return rootfile


def read_member(archive: zipfile.ZipFile, name: str) -> bytes:
    """``archive.read(name)``, refused past :data:`MAX_MXL_MEMBER_BYTES` (declared or actual size)."""
    too_big = ValueError(f"{name!r} in the .mxl archive expands to more than {MAX_MXL_MEMBER_BYTES >> 20} MiB "
                         "(a zip bomb?); not read")
    if archive.getinfo(name).file_size > MAX_MXL_MEMBER_BYTES:
        raise too_big
    with archive.open(name) as member:
        data = member.read(MAX_MXL_MEMBER_BYTES + 1)
    if len(data) > MAX_MXL_MEMBER_BYTES:
        raise too_big
    return data


def is_xml_bytes(data: bytes, declared: bool = False) -> bool:
    """XML in any encoding a MusicXML writer uses: UTF-16 with its byte-order mark, or text starting ``<``
    (``<?xml``, its declaration, with ``declared``)."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data[2:200].decode("utf-16-le" if data[0] == 0xFF else "utf-16-be", "ignore").lstrip().startswith("<")
    return data.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<?xml" if declared else b"<")


def read_musicxml(path: str | os.PathLike) -> bytes:
    path = Path(path)
    if path.suffix.lower() != ".mxl":
        return path.read_bytes()
    try:
        with zipfile.ZipFile(path) as archive:
            return read_member(archive, score_name_in_mxl(archive))
    except zipfile.BadZipFile as error:
        data = path.read_bytes()
        if is_xml_bytes(data):  # *fix*: uncompressed MusicXML saved as .mxl (the reference fails: not a zip)
            return data
        raise ValueError(f"not an .mxl (zip) archive: {error}") from error


def last_message(printed: str) -> str:
    lines = [line.strip() for line in printed.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def container_score(path: str | os.PathLike) -> bytes | None:
    """The score ``META-INF/container.xml`` names in an ``.mxl``, when it is not the member xml2abc's rule picks."""
    if Path(path).suffix.lower() != ".mxl":
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            rootfile = container_rootfile(archive)
            if rootfile is None or rootfile == score_name_in_mxl(archive) or rootfile not in archive.namelist():
                return None
            return read_member(archive, rootfile)
    except (zipfile.BadZipFile, ValueError):
        return None


def xml_to_abc(path: str | os.PathLike) -> str:
    """Standard ABC (``-d 8 -x``) of a MusicXML file; raises ``ValueError`` when xml2abc gives nothing.

    An ``.mxl`` is read as xml2abc reads it (its first non-META ``*.xml``), so that the bytes stay the
    reference's; when that member is not a score xml2abc converts (an archive holding another XML
    file first), the score its ``container.xml`` names is converted instead (*fix*: the reference fails).
    """
    try:
        return musicxml_bytes_to_abc(read_musicxml(path), path)
    except ValueError as error:
        score = container_score(path)
        if score is None:
            raise
        try:
            return musicxml_bytes_to_abc(score, path)
        except ValueError:
            raise error from None


def musicxml_bytes_to_abc(data: bytes, path: str | os.PathLike) -> str:
    """xml2abc's standard ABC of MusicXML ``data``; ``path`` names the tune as on the command line."""
    from abctoolkit import xml2abc

    options = xml2abc_options()
    abc_text = io.StringIO()
    renumbered = None
    diagnostics = io.StringIO()
    with captured("stderr", diagnostics):
        # xml2abc's Parser writes through the module-global ``abcOut``; a fresh one per call is
        # exactly what its command line does per file (tune number X:1, as for a single file).
        output = xml2abc.ABCoutput(os.path.splitext(os.fspath(path))[0] + ".abc", "", 0, options)
        output.outfile = abc_text
        xml2abc.abcOut = output
        try:
            xml2abc.Parser(options).parse(io.BytesIO(data))
        except Exception as error:
            renumbered = numbered_lyrics(data) if isinstance(error, ValueError) else None
            if renumbered is None:
                raise ValueError(f"xml2abc failed: {type(error).__name__}: {error}") from error
        finally:
            xml2abc.abcOut = None
    if renumbered is not None:  # *fix*: the reference loses the file
        warnings.warn("lyric numbers xml2abc cannot read (e.g. Sibelius's number=\"chorus\") converted as "
                      "further verses", AbcWarning, stacklevel=2)
        return musicxml_bytes_to_abc(renumbered, path)
    text = abc_text.getvalue()
    if not text:
        partwise = timewise_to_partwise(data)
        if partwise is not None:  # *fix*: xml2abc reads only score-partwise and finds no part in a timewise score
            return musicxml_bytes_to_abc(partwise, path)
        reason = last_message(diagnostics.getvalue()) or "no output"
        raise ValueError(f"xml2abc wrote no ABC ({reason})")
    return text


_VERSE_PREFIX = re.compile(r"^.*verse")  # xml2abc's own: "verse2", "part1verse2" are verse 2


def numbered_lyrics(data: bytes) -> bytes | None:
    """``data`` with each lyric ``number`` xml2abc cannot read as a verse (MusicXML allows any token, and
    Sibelius writes ``number="chorus"``; xml2abc's ``int()`` raises) made a verse after the piece's last
    numbered one, the same name the same verse throughout; ``None`` when there is none (the error is another)."""
    try:
        root = ElementTree.fromstring(data)
    except ElementTree.ParseError:
        return None
    lyrics = list(root.iter("lyric"))
    verses, unreadable = [], []
    for lyric in lyrics:
        try:
            verses.append(int(_VERSE_PREFIX.sub("", lyric.get("number", "1"))))
        except ValueError:
            unreadable.append(lyric)
    if not unreadable:
        return None
    names: dict[str, int] = {}
    for lyric in unreadable:
        lyric.set("number", str(names.setdefault(lyric.get("number"), max(verses, default=0) + len(names) + 1)))
    return ElementTree.tostring(root, encoding="utf-8")


def timewise_to_partwise(data: bytes) -> bytes | None:
    """A ``score-timewise`` document (MusicXML's other layout: each measure holds its parts) as the
    ``score-partwise`` one xml2abc reads (each part holds its measures), as MusicXML's own XSLT maps it;
    ``None`` for any other document."""
    try:
        root = ElementTree.fromstring(data)
    except ElementTree.ParseError:
        return None
    if root.tag != "score-timewise":
        return None
    partwise = ElementTree.Element("score-partwise", root.attrib)
    parts: dict[str, ElementTree.Element] = {}
    for child in root:
        if child.tag != "measure":
            partwise.append(child)  # the header: work, identification, defaults, credits, part-list
            continue
        for part in child.findall("part"):
            measure = ElementTree.SubElement(parts.setdefault(part.get("id"), ElementTree.Element("part", part.attrib)),
                                             "measure", child.attrib)
            measure.extend(list(part))
    partwise.extend(parts.values())
    return ElementTree.tostring(partwise, encoding="utf-8")


def has_v1_line(abc_lines: list[str]) -> bool:
    # The same test abctoolkit uses to find the tune body.
    return any(line.strip() == "V:1" for line in abc_lines)


def add_v1_line(abc_lines: list[str]) -> list[str]:
    """*fix*: a tune without a ``V:1`` line is one voice: insert ``V:1`` after its first ``K:`` line."""
    for index, line in enumerate(abc_lines):
        if line.startswith("K:"):
            head = abc_lines[:index + 1]
            if not head[-1].endswith("\n"):
                head[-1] += "\n"
            return head + ["V:1\n"] + abc_lines[index + 1:]
    raise ValueError("not an ABC tune: no K: line")


def is_music_line(line: str) -> bool:
    return not (FIELD_LINE_RE.match(line) or line.startswith("%"))


def printed_lines(printed: str) -> list[str]:
    return [line.strip() for line in printed.splitlines() if line.strip()]


class InterleaveError(ValueError):
    """abctoolkit cannot split, align or rotate the voices of a tune."""


def abc_to_interleaved(abc_text: str) -> str:
    """Interleaved ABC of a standard ABC tune (SPEC §3).

    Raises ``ValueError`` when abctoolkit cannot align the voices (different bar counts, an empty
    piece, an exception). Unequal bar durations or barlines between voices only issue an
    ``AbcWarning``: the reference keeps such pieces. *fix*: a tune that abctoolkit cannot take as
    written is repaired (:mod:`clamp2.convert.abc_repair`) and tried again; the repairs applied
    are named in an ``AbcWarning``. A tune the normal path converts is never repaired.
    """
    with one_conversion():
        try:
            text, messages = interleave(abc_text)
        except InterleaveError as error:
            try:
                text, messages = interleave_repaired(abc_text, error)
            except InterleaveError as second:
                hint = voice_naming_hint(abc_text)
                if hint:
                    raise InterleaveError(f"{second}; {hint}") from error
                raise
    if messages:
        warnings.warn("; ".join(messages), AbcWarning, stacklevel=2)
    return text


def interleave_repaired(abc_text: str, error: InterleaveError) -> tuple[str, list[str]]:
    """The second try, on the repaired tune; a failure names the line where abctoolkit breaks."""
    lines, applied = repair_lines(numbered_lines(abc_text))
    try:
        text, messages = interleave("".join(line.text for line in lines), repaired=True)
    except InterleaveError as second:
        where = locate_bar_problem(lines)
        reason = f"{second} ({where})" if where else str(second)
        tried = f"; repaired first: {', '.join(applied)}" if applied else ""
        raise InterleaveError(reason + tried) from error
    repairs = ", ".join(applied) or "bar-duration check skipped"
    messages.insert(0, f"repaired ({repairs}); the original pipeline fails on this tune: {error}")
    return text, messages


def body_voice_lines(abc_lines: list[str]) -> list[tuple[int, str]]:
    """(line number, line) of the ``V:`` lines after the first ``K:`` line."""
    body = next((index for index, line in enumerate(abc_lines) if line.startswith("K:")), len(abc_lines))
    return [(index + 1, line.strip()) for index, line in enumerate(abc_lines) if index > body and line.startswith("V:")]


def voice_naming_hint(abc_text: str) -> str | None:
    """Why a tune whose voices are not named ``V:1``, ``V:2``, … fails, when the ``V:1`` fix cannot help."""
    lines = io.StringIO(abc_text).readlines()
    voices = body_voice_lines(lines)
    if has_v1_line(lines) or not voices:
        return None
    named = ", ".join(f"'{line[:40]}' (line {number})" for number, line in voices[:4])
    return (f"its voices are {named}{', …' if len(voices) > 4 else ''}: abctoolkit finds the tune body and "
            "its voices by body lines exactly 'V:1', 'V:2', …; rename the voices (attributes such as clef= "
            "belong on a header V: line)")


def several_tunes_problem(abc_text: str) -> str | None:
    """A file of several tunes without a ``V:1`` line: the one-voice fix would run them together as one."""
    starts = [number for number, line in enumerate(io.StringIO(abc_text).readlines(), start=1) if line.startswith("X:")]
    if len(starts) < 2:
        return None
    shown = ", ".join(map(str, starts[:5])) + (", …" if len(starts) > 5 else "")
    return (f"{len(starts)} tunes in one file (X: lines {shown}): the interleaving takes "
            "one tune per file; split the file into one tune each")


def interleave(abc_text: str, repaired: bool = False) -> tuple[str, list[str]]:
    """The reference's pipeline: interleaved text and the diagnostics abctoolkit printed.

    With ``repaired=True`` (a tune the reference fails on, repaired), an exception of abctoolkit's
    bar-duration check (a diagnostic: chords written ``[D2F2]`` make it raise) is one more message
    instead of a failure, and voices left with unequal bar numbers are a failure: the reference writes
    such a tune with bars lost, which a repair is not meant to give.
    """
    from abctoolkit.check import check_alignment_unrotated
    from abctoolkit.rotate import rotate_abc
    from abctoolkit.utils import remove_bar_no_annotations, remove_information_field, strip_empty_bars

    # StringIO().readlines() splits on "\n" only, as the reference's file.readlines() does.
    abc_lines = [line for line in io.StringIO(abc_text).readlines() if line.strip() != ""]
    notes = []
    one_voice_fix = not has_v1_line(abc_lines)
    if one_voice_fix:
        # The reference fails on every such file; a tune book would otherwise become one garbled voice
        # (the next tune's header read as notes), so it stays a failure, not an InterleaveError to repair.
        problem = several_tunes_problem(abc_text)
        if problem:
            raise ValueError(problem)
        abc_lines = add_v1_line(abc_lines)
        notes = inline_voices_note(abc_lines)
    abc_lines = remove_information_field(abc_lines=abc_lines, info_fields=INTERLEAVE_REMOVED_FIELDS)
    abc_lines = remove_bar_no_annotations(abc_lines)
    abc_lines = [clean_quotes(line) if is_music_line(line) else line for line in abc_lines]

    printed = io.StringIO()
    try:
        with captured("stdout", printed):
            stripped_lines, _ = strip_empty_bars(abc_lines)
    except Exception as error:
        raise InterleaveError(f"cannot split the voices into bars: {type(error).__name__}: {error}") from error
    messages = printed_lines(printed.getvalue())
    if stripped_lines is None:
        raise InterleaveError("cannot align the voices: " + (" ".join(messages) or "strip_empty_bars failed"))
    misread = misread_bars(abc_lines)
    if misread:
        messages.append(f"bars lost, as in the original pipeline: {misread}")
    # The one-voice fix's V:1 line: inline_voices_note has named the voices that run together in it.
    blocks = "" if one_voice_fix else voice_blocks_misread(abc_lines)
    if blocks:
        messages.append(f"voice blocks misread, as in the original pipeline: {blocks}")

    printed = io.StringIO()
    unchecked = None
    try:
        with captured("stdout", printed):
            try:
                _, bar_numbers_equal, bar_durations_equal = check_alignment_unrotated(stripped_lines)
            except Exception as error:
                if not repaired:
                    raise
                # strip_empty_bars has already failed every tune whose voices differ in bar count as written.
                bar_numbers_equal, bar_durations_equal = True, False
                unchecked = f"bar durations not checked: {type(error).__name__}: {error}"
            interleaved_lines = rotate_abc(stripped_lines)
    except Exception as error:
        raise InterleaveError(f"cannot interleave the voices: {type(error).__name__}: {error}") from error
    if not bar_numbers_equal and repaired:
        raise InterleaveError("cannot align the voices: unequal bar numbers")
    messages += printed_lines(printed.getvalue())
    if unchecked:
        messages.insert(0, unchecked)
    elif not bar_durations_equal:
        messages.insert(0, "bar durations differ between voices or cannot be computed")
    if not bar_numbers_equal:
        # strip_empty_bars found equal counts, but its reassembled lines split otherwise (two barlines in a row
        # across a line end): the original prints "Unequal bar number" and writes what rotate_abc makes, so a
        # tune the original converts is converted here to the same bytes, not repaired into other ones.
        messages.insert(0, "bar numbers differ between voices once the empty bars are stripped: bars are lost or "
                           "misaligned, as in the original pipeline")
    return "".join(interleaved_lines), notes + messages


def misread_bars(abc_lines: list[str]) -> str:
    """Where abctoolkit's bar split loses bars of a voice without an error ("" where it loses none).

    ``split_into_bars_and_barlines`` drops repeated pieces, then takes the pieces as text, barline,
    text, barline, …: after two different barlines in a row (``|`` then ``|:`` across a line end) it
    reads barlines as bars and bars as barlines, and ``strip_empty_bars`` drops the "bars" without a
    note from the last one with a note; a voice's last bar without a closing barline is left out.
    The original's outputs lose these bars too, and so do the ones here (SPEC §3); this says so.
    """
    from abctoolkit.utils import Barline_regexPattern, Barlines, extract_metadata_and_parts

    def shown(piece: str) -> str:
        return repr(shortened(" ".join(piece.split())))

    reasons = []
    for name, text in extract_metadata_and_parts(abc_lines)[1].items():
        pieces = [piece for piece in re.split(Barline_regexPattern, text.strip()) if piece.strip()]
        pieces = pieces[:1] + [piece for before, piece in zip(pieces, pieces[1:]) if piece != before]
        barline = [piece in Barlines for piece in pieces]
        # abctoolkit takes every other piece as a bar text, each followed by its barline: from the second
        # piece after a leading barline, else from the first (a leading ``[K:D]`` piece is its "prefix",
        # with the same parity). Without a leading barline an odd count leaves the last piece out.
        first = 1 if barline[:1] == [True] else 0
        texts = range(first, len(pieces) - (1 - first), 2)
        doubled = next((index for index in texts if barline[index]), None)
        if doubled is not None:
            after = f", after the bar {shown(pieces[doubled - 2])}" if doubled >= 2 else ""
            reasons.append(f"voice {name}: two barlines in a row, {pieces[doubled - 1].strip()!r} then "
                           f"{pieces[doubled].strip()!r}{after}: abctoolkit misreads the bars from there on "
                           "(write one barline there)")
        elif first == 0 and len(pieces) % 2 == 1 and holds_notes(pieces[-1]):
            reasons.append(f"voice {name}: the last bar {shown(pieces[-1])} has no closing barline "
                           "(end it with '|]')")
    return "; ".join(reasons)


def voice_blocks_misread(abc_lines: list[str]) -> str:
    """Where abctoolkit's voice split misreads a tune written a block per system (``V:1``, ``V:2``, ``V:1``,
    ``V:2``, …) without an error ("" where it misreads nothing).

    ``extract_metadata_and_tunebody`` starts the body at the *last* line exactly ``V:1``: the music written
    after the first ``K:`` line and before it stays in the output's header as written, one voice after the
    other, not interleaved (abc2xml still reads it; the model sees it as header lines), and a voice with no
    block after that line is left out of the interleaved lines. After it, ``extract_metadata_and_parts``
    keeps one block per ``V:`` line text: a voice's earlier blocks are replaced by its last one (their bars
    lost, the voices then misaligned), and a ``[V:2] …`` line inside ``V:1``'s block is read as ``V:1``'s
    bars. And ``strip_empty_bars``, meant for the rests that open a piece, drops the bars that open the
    last system when every voice rests there. The original's outputs do all this too, and so do the ones
    here (SPEC §3); this says so.
    """
    from abctoolkit.utils import (Barline_regexPattern, Barlines, extract_barline_and_bartext_dict,
                                  find_valid_bar_index, remove_square_bracket_information_field)

    key_line = next((index for index, line in enumerate(abc_lines) if line.startswith("K:")), None)
    body = next((index for index in range(len(abc_lines) - 1, -1, -1) if abc_lines[index].strip() == "V:1"), None)
    if key_line is None or body is None or body < key_line:
        return ""  # no V:1 (the one-voice fix adds it after K:), or V:1 only before K:: nothing written before

    def bars_of(lines: list[str]) -> list[str]:
        text = "".join(INLINE_VOICE_RE.sub("", line, count=1) for line in lines if is_music_line(line))
        # A bar holds a note or a rest: not only fields ([P:A]), annotations, decorations or a volta number.
        return [piece for piece in re.split(Barline_regexPattern, text) if piece not in Barlines and re.search(
            "[A-Ga-gzZxX]", remove_square_bracket_information_field(re.sub(r'"[^"]*"|![^!]*!', "", piece)))]

    def counted(bars: list[str]) -> str:
        shown = " … ".join(repr(shortened(" ".join(bar.split()))) for bar in dict.fromkeys([bars[0], bars[-1]]))
        return f"{len(bars)} bar{'s' if len(bars) != 1 else ''} ({shown})"

    def inline_voice(line: str) -> str | None:
        match = INLINE_VOICE_RE.match(line)
        return f"V:{match.group(1)}" if match else None

    # Before the body: the music lines between K: and the last V:1 line, by the voice they are written under.
    before: dict[str, list[str]] = {}
    voice = "before any voice line"
    for line in abc_lines[key_line + 1:body]:
        voice = line.strip() if line.startswith("V:") else inline_voice(line) or voice
        before.setdefault(voice, []).extend(bars_of([line]))
    before = {name: bars for name, bars in before.items() if bars}
    # After it: abctoolkit's blocks, one per V: line (a repeated V: line text replaces the earlier block). As in
    # extract_metadata_and_parts, the body's first line opens a block even when it is not at the line start
    # (" V:1 ": the body is found by the stripped text, the later voice lines by startswith).
    blocks: list[tuple[str, list[str]]] = []
    for offset, line in enumerate(abc_lines[body:]):
        if offset == 0 or line.startswith("V:"):
            blocks.append((line.strip(), []))
        else:
            blocks[-1][1].append(line)
    names = [name for name, _ in blocks]

    reasons = []
    if before:
        shown = ", ".join(f"{name} {counted(bars)}" for name, bars in before.items())
        reasons.append("abctoolkit's body starts at the last 'V:1' line, and the bars written before it (a block per "
                       f"system, or a voice before V:1) stay in the header as written, not interleaved: {shown}")
        missing = [name for name in before if name.startswith("V:") and name not in names]
        if missing:
            reasons.append(f"{', '.join(missing)} {'has' if len(missing) == 1 else 'have'} no block after that line: "
                           "left out of the interleaved lines")
    for name in dict.fromkeys(names):
        if names.count(name) > 1:
            last = len(names) - 1 - names[::-1].index(name)
            replaced = [bar for block, lines in blocks[:last] if block == name for bar in bars_of(lines)]
            reasons.append(f"voice {name} has {names.count(name)} blocks after the last 'V:1' line: abctoolkit keeps "
                           f"the last one only, and the {counted(replaced) if replaced else 'no bars'} of the "
                           "earlier ones are lost")
    inlined: dict[tuple[str, str], list[str]] = {}
    for name, lines in blocks:
        for line in lines:
            other = inline_voice(line)
            if other and other != name:
                inlined.setdefault((name, other), []).append(line)
    for (name, other), lines in inlined.items():
        shown = (f"the line {shortened(lines[0].strip())!r} in voice {name}'s block: abctoolkit reads its bars"
                 if len(lines) == 1 else f"{len(lines)} lines starting [{other}] in voice {name}'s block "
                 f"({shortened(lines[0].strip())!r}, …): abctoolkit reads their bars")
        reasons.append(f"{shown} as {name}'s, not {other}'s (write '{other}' on a line of its own)")
    if before:
        bar_texts = extract_barline_and_bartext_dict(abc_lines)[3]
        first = min(find_valid_bar_index(texts)[0] for texts in bar_texts.values())
        if 0 < first < len(bar_texts["V:1"]):
            reasons.append(f"the {counted(bar_texts['V:1'][:first])} of V:1 opening the last system, rests in "
                           f"every voice, {'is' if first == 1 else 'are'} dropped with the other voices' as empty "
                           "leading bars")
    if reasons:
        reasons.append("write each voice's bars together: all of V:1, then all of V:2, …")
    return "; ".join(reasons)


def holds_notes(bar_text: str) -> bool:
    """abctoolkit's test for the last bar it keeps (``find_valid_bar_index``): a letter A–G outside
    ``!…!`` decorations, ``[…]`` fields and quoted annotations."""
    from abctoolkit.utils import (remove_quote_text_annotations, remove_square_bracket_information_field,
                                  remove_wrapped_content)

    text = remove_quote_text_annotations(remove_wrapped_content(abc_text=bar_text, wrap_symbols=["!!"]))
    text = re.sub("%.*", "", text)  # a comment after the last barline is no bar
    return re.search("[A-Ga-g]", remove_square_bracket_information_field(text)) is not None


def inline_voices_note(abc_lines: list[str]) -> list[str]:
    """A warning for a tune the ``V:1`` fix reads as one voice although its body names others ``[V:2] ...``.

    SPEC §3's fix gives such a tune what the reference gives it with a ``V:1`` line added: the voices
    run together in one. Only the tune's author can say which voices it has, so it is said, not changed.
    """
    named = []
    for line in abc_lines:
        match = INLINE_VOICE_RE.match(line)
        if match and match.group(1) not in named:
            named.append(match.group(1))
    if len(named) < 2:
        return []  # one named voice is one voice: nothing runs together
    shown = ", ".join(f"[V:{name}]" for name in named[:4]) + (", …" if len(named) > 4 else "")
    return [f"read as one voice (no line exactly 'V:1'), but its body names voices {shown}: their bars run "
            "together in one voice; declare the voices on header lines before K: (V:1, V:2, …) to keep them apart"]


def interleaved_to_xml(abc_text: str) -> str:
    """MusicXML of the first tune of an ABC text, as ``abctoolkit.abc2xml FILE`` prints it.

    The reference's ``batch_abc2xml.py`` (and abctoolkit's own batch converter) save that standard
    output, which ends with a newline; the file ``-o DIR`` writes has none.
    """
    from abctoolkit import abc2xml

    # What a fresh process would start with: abc2xml keeps its parser instance and the position
    # of the previous note (used to detect beam breaks) at module level.
    diagnostics = io.StringIO()
    with captured("stderr", diagnostics):
        abc2xml.prevloc = 0
        abc2xml.mxm = abc2xml.MusicXml()
        scores = abc2xml.getXmlDocs(abc_text, 0, 1, False, False, False)
    if not scores:
        reason = last_message(diagnostics.getvalue()) or "no tune"
        raise ValueError(f"abc2xml produced no score ({reason})")
    lost = percent_in_quotes(abc_text)
    if lost:
        warnings.warn(f"music lost, as with the original's abc2xml: {lost}", AbcWarning, stacklevel=2)
    return abc2xml.fixDoctype(scores[0]) + "\n"


def percent_in_quotes(abc_text: str) -> str:
    """Music lines with a ``%`` inside a quoted string (``"^50%"``, which xml2abc writes for such a
    text): abc2xml takes it for a comment and drops the line from the quoted text on, in interleaved
    ABC the bars of every later voice too; the original's abc2xml does the same."""
    found = []
    for number, line in enumerate(abc_text.split("\n"), start=1):
        if "%" in line and is_music_line(line):
            comment = COMMENT_RE.search(masked(line))  # the line's own comment: a % outside quoted texts
            if "%" in line[:comment.start() if comment else len(line)]:
                found.append(f"line {number}")
    if not found:
        return ""
    shown = ", ".join(found[:5]) + (", ..." if len(found) > 5 else "")
    return (f"a '%' inside a quoted text ({shown}), which abc2xml reads as a comment: the rest of the line is "
            "dropped (remove the '%' from the text to keep that music)")


def split_tunes(abc_text: str) -> list[str]:
    """The tunes of a multi-tune ABC file, each from its ``X:`` line to the next ``X:`` line (the
    interleaving pipeline takes one tune per file). Text before the first ``X:`` line, the file
    header, belongs to no tune."""
    tunes: list[str] = []
    for line in io.StringIO(abc_text).readlines():
        if line.startswith("X:"):
            tunes.append(line)
        elif tunes:
            tunes[-1] += line
    return tunes


def decode_abc_for_abc2xml(data: bytes) -> str:
    # abc2xml's own rule: UTF-8, else Latin-1.
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def abc_file_to_interleaved(path: str | os.PathLike) -> str:
    # Strict UTF-8 with universal newlines, as the reference reads: other encodings are failures.
    with open(path, encoding="utf-8") as f:
        return abc_to_interleaved(f.read())


def interleaved_file_to_xml(path: str | os.PathLike) -> str:
    return interleaved_to_xml(decode_abc_for_abc2xml(Path(path).read_bytes()))
