"""Repairs of hand-written ABC that abctoolkit cannot split into bars (*fix*, SPEC §3).

abctoolkit splits each voice into bars with one regular expression and needs barlines and bar
texts to alternate, the voice to start with music or a barline and end with a barline, and every
voice to be a ``V:n`` block. Folk-tune collections break these rules in ways ABC allows, and the
original pipeline then loses the tune (``IndexError``, ``Unequal bar elements``).
:mod:`clamp2.convert.abc` calls :func:`repair_lines` only for a tune whose normal conversion
failed, so every tune the original converts keeps its bytes.

Each repair maps the tune's lines to new lines and changes only the body (the lines after the
first ``K:`` line); a line keeps the number it has in the tune as given, so that what still fails
is reported where the user can find it. In order:

- :func:`join_field_continuations`: a ``+:`` line (ABC 2.1's field continuation) is appended to
  the field line above it (alone, abctoolkit glues it into a bar as music).
- :func:`group_inline_voices`: a body written as ``[V:1] ...`` / ``[V:2] ...`` lines becomes a
  ``V:1`` block, then a ``V:2`` block (abctoolkit only knows ``V:`` lines).
- :func:`drop_body_comments`: ``%`` comment lines and trailing ``% comments`` leave the body
  (abctoolkit glues them into a bar, where they comment out the rest of the interleaved line).
- :func:`join_line_continuations`: a music line ending with ``\\`` is joined with the next one
  (the ``\\`` would stay inside a bar, where abc2xml rejects it).
- :func:`inline_body_fields`: a field line inside the body that changes the music (``K:G``,
  ``L:1/16``, ``P:B``) becomes an inline field ``[K:G]`` at the start of the next music line,
  after its barline (as a line of its own, abctoolkit would make it a bar); descriptive ones
  (``N:``, ``B:``, ...) go; voices and the fields the pipeline removes stay.
- :func:`merge_adjacent_barlines`: two different barlines with only blanks or a line break between
  them (``:|`` ending a line, ``|:`` starting the next) become one (``::``).
- :func:`bar_full_line_ends`: a music line that ends without a barline exactly where a full bar
  of the metre ends gets one (Essen songs end phrases at line ends without barlines).
- :func:`bar_unbarred_lines`: a voice with no barline at all (free-metre Essen songs) gets one at
  the end of each music line: each written phrase becomes a bar.
- :func:`close_final_bar`: a voice whose last bar has no closing barline gets ``|]``.

:func:`locate_bar_problem` names what breaks abctoolkit's bar split, with the line.
"""

from __future__ import annotations

import functools
import io
import re
from fractions import Fraction
from typing import Callable, NamedTuple

from clamp2.convert.captured import captured

FIELD_LINE_RE = re.compile(r"^[A-Za-z]:")
VOICE_LINE_RE = re.compile(r"^V:")
INLINE_VOICE_RE = re.compile(r"^\s*\[V:\s*([^\]\s]+)[^\]]*\]")
# Text in which a "|" is no barline: annotations and chord symbols, decorations.
ANNOTATION_RE = re.compile(r'"[^"\n]*"|![^!\n]*!')
COMMENT_RE = re.compile(r"(?<!\\)%.*$")
CONTINUATION_RE = re.compile(r"\\\s*$")
FIELD_CONTINUATION = "+:"
# What abctoolkit's bar-length count cannot read, and which has no length: inline fields, +decorations+,
# and the decoration shortcuts ~ (roll), H (fermata), L (accent) and the spacer y.
NO_LENGTH_RE = re.compile(r"\[[A-Za-z]:[^\]\n]*\]|\+[^+\n]*\+|[~HLy]")
# What abctoolkit's bar split keeps with the barline before it: a repeat ending (``|1``, ``:|2``, ``|1,3``) or
# the ``:`` of a ``:|:`` (its own set of characters), and the blanks after it.
ENDING_RE = re.compile(r"\s*[0-9:][0-9,.\-:]*\s*")
# Fields ABC 2.1 allows inline that change how the music sounds or is cut into parts.
INLINE_FIELDS = "IKLMPQUm"
# Field lines the repairs leave where they are: voices, and what the pipeline drops anyway.
KEPT_FIELD_LINES = ("V:", "X:", "T:", "C:", "W:", "w:", "Z:")
START_REPEATS = ("|:", "||:", "[|:")
END_REPEATS = (":|", ":||", ":|]")
THICK_OR_DOUBLE = ("||", "|]", "[|")


class Line(NamedTuple):
    number: int  # 1-based, in the tune as given
    text: str
    assumed: bool = False  # not in the tune: the V:1 line the one-voice fix adds after K: (line ``number``)


Lines = list[Line]


def numbered_lines(abc_text: str) -> Lines:
    # Split on "\n" only, as the interleaving pipeline reads.
    return [Line(number, text) for number, text in enumerate(io.StringIO(abc_text).readlines(), 1)]


def body_start(lines: Lines) -> int | None:
    """Index of the first body line: the one after the first ``K:`` line (None: not a tune)."""
    for index, line in enumerate(lines):
        if line.text.startswith("K:"):
            return index + 1
    return None


def toolkit_body_start(lines: Lines) -> int | None:
    """Index where abctoolkit's body starts: its last ``V:1`` line, else (one voice, no ``V:1``: the
    one-voice fix adds it after ``K:``) :func:`body_start`.

    The lines before it are abctoolkit's header, which the original keeps as written, and so do the
    repairs: a field there holds for every voice (``K:``, ``L:``) or for the ``V:`` definition above it
    (xml2abc's ``K:none``, ``I:percmap``); in a tune whose ``V:1``/``V:2`` blocks repeat (a block per
    system), the earlier blocks are header text too.
    """
    start = body_start(lines)
    if start is None:
        return None
    last_v1 = next((index for index in range(len(lines) - 1, start - 1, -1) if lines[index].text.strip() == "V:1"),
                   None)
    return start if last_v1 is None else last_v1


def inline_field(text: str) -> str:
    """A field line as an inline field: ``K:D % modulates`` → ``[K:D]`` (inside ``[...]``, a ``%`` would
    comment out the rest of the interleaved line: every other voice's bar on it)."""
    return "[" + COMMENT_RE.sub("", text).strip() + "]"


def is_music_line(text: str) -> bool:
    return bool(text.strip()) and not FIELD_LINE_RE.match(text) and not text.startswith("%")


def with_newline(text: str) -> str:
    return text if text.endswith("\n") else text + "\n"


def masked(text: str) -> str:
    """The text with annotations and decorations blanked (same length), so barlines can be found."""
    return ANNOTATION_RE.sub(lambda match: " " * len(match.group()), text)


@functools.cache
def barline_re() -> re.Pattern:
    from abctoolkit.utils import Barline_regexPattern  # the pattern its bar split uses

    return re.compile(Barline_regexPattern)


def barline_spans(text: str) -> list[tuple[int, int]]:
    return [match.span() for match in barline_re().finditer(masked(text))]


def ends_with_barline(text: str) -> bool:
    spans = barline_spans(text)
    return bool(spans) and not text[spans[-1][1]:].strip()


def starts_with_barline(text: str) -> bool:
    spans = barline_spans(text)
    return bool(spans) and not text[:spans[0][0]].strip()


def voice_blocks(lines: Lines) -> list[list[int]]:
    """Indices of the music lines of each voice of the body (a ``V:`` line starts a new voice)."""
    start = toolkit_body_start(lines)
    if start is None:
        return []
    blocks: list[list[int]] = [[]]
    for index in range(start, len(lines)):
        if VOICE_LINE_RE.match(lines[index].text):
            blocks.append([])
        elif is_music_line(lines[index].text):
            blocks[-1].append(index)
    return [block for block in blocks if block]


# ------------------------------------------------------------------------------------------------
# The repairs, each a no-op on a tune that does not need it


def join_field_continuations(lines: Lines) -> Lines:
    start = body_start(lines)
    if start is None:
        return lines
    result = lines[:start]
    for line in lines[start:]:
        if line.text.startswith(FIELD_CONTINUATION) and len(result) > start and FIELD_LINE_RE.match(result[-1].text):
            field = result[-1]
            text = COMMENT_RE.sub("", field.text.rstrip("\n")).rstrip()  # "N:a % c" + "+:b": "N:a b", b no comment
            result[-1] = Line(field.number, text + " " + line.text[2:].strip() + "\n", field.assumed)
        else:
            result.append(line)
    return result


def group_inline_voices(lines: Lines) -> Lines:
    start = body_start(lines)
    if start is None or not any(INLINE_VOICE_RE.match(line.text) for line in lines[start:]):
        return lines
    voices: dict[str, Lines] = {}
    current = None
    for line in lines[start:]:
        text = line.text
        match = INLINE_VOICE_RE.match(text)
        if match:
            current = match.group(1)
            text = text[match.end():].lstrip()
        elif VOICE_LINE_RE.match(text) or (current is None and is_music_line(text)):
            return lines  # V: blocks, or music outside any voice: not this layout
        elif current is None:
            continue
        block = voices.setdefault(current, [Line(line.number, f"V:{current}\n")])
        if text.strip():
            block.append(Line(line.number, with_newline(text)))
    return lines[:start] + [line for block in voices.values() for line in block]


def drop_body_comments(lines: Lines) -> Lines:
    start = toolkit_body_start(lines)  # comments in abctoolkit's header stay there, as the original keeps them
    if start is None:
        return lines
    body = []
    for line in lines[start:]:
        if line.text.startswith("%"):
            continue
        if is_music_line(line.text):
            content = line.text.rstrip("\n")
            at = COMMENT_RE.search(masked(content))  # a % inside an annotation ("^50% more") is text
            uncommented = content[:at.start()] if at else content  # the blanks before the % stay: they part notes
            if not uncommented.strip():
                continue
            if uncommented != content:
                line = Line(line.number, uncommented + "\n")
        body.append(line)
    return lines[:start] + body


def join_line_continuations(lines: Lines) -> Lines:
    start = toolkit_body_start(lines)
    if start is None:
        return lines
    result = lines[:start]
    pending: list[str] = []  # a continued line's text so far, in pieces: joined once, where its chain ends
    number = 0  # the continued line's number
    escaped = False  # a piece holds a \" (escapes_dropped may then change the whole text at the next join)
    fields: list[str] = []  # inline fields met between a continued line and the next music line
    field_lines: Lines = []  # the same fields as the lines they came from
    for line in lines[start:]:
        if pending and is_music_line(line.text):
            piece = after_leading_barline(escapes_dropped(line.text).lstrip(), "".join(fields))
            fields, field_lines = [], []
            # Without \" and with the piece not blank, each step touches the piece alone: the continuation
            # "\" and the blanks after it lie in it, escapes_dropped leaves the text as it is (a \" cannot form
            # where two pieces meet: the text before ends with a space), and the joined line's first two
            # characters, which decide whether it is music, are the first piece's. Re-reading the whole
            # text at each join made a chain of n continued lines take time quadratic in n.
            if not escaped and '\\"' not in piece and piece.strip():
                head = pending[0]
                if (CONTINUATION_RE.search(piece) and not FIELD_LINE_RE.match(head)
                        and not head.startswith("%")):
                    rest = CONTINUATION_RE.sub("", piece).rstrip()
                    if rest.strip():
                        pending.append(rest + " ")
                        continue
                else:
                    result.append(Line(number, "".join(pending) + piece))
                    pending = []
                    continue
            line = Line(number, "".join(pending) + piece)
            pending = []
        elif pending and VOICE_LINE_RE.match(line.text):
            # The next music belongs to another voice: joining would move this voice's bars into it. The
            # line ends here, as without its "\", and the fields after it stay lines of their own.
            result += [Line(number, "".join(pending).rstrip() + "\n"), *field_lines, line]
            pending, fields, field_lines = [], [], []
            continue
        elif pending:
            # ABC 2.1 lets a field or a comment line sit between the two. A field that changes the music
            # (K:, M:, L:, ...) takes effect there, mid-line once the two are joined: inlined in place, not
            # before the joined line (inline_body_fields' place for it), which would move it bars early.
            text = line.text
            if FIELD_LINE_RE.match(text) and text[0] in INLINE_FIELDS and not text.startswith(KEPT_FIELD_LINES):
                fields.append(inline_field(text))
                field_lines.append(line)
            else:
                result.append(line)
            continue
        if is_music_line(line.text) and CONTINUATION_RE.search(line.text):
            number = line.number
            pending = [CONTINUATION_RE.sub("", escapes_dropped(line.text)).rstrip() + " "]
            escaped = '\\"' in pending[0]
            continue
        result.append(line)
    if pending:
        result.append(Line(number, "".join(pending).rstrip() + "\n"))  # fields after the music: dropped
    return result


def clean_quotes(line: str) -> str:
    """SPEC §3 quirk, kept because it changes bytes: a music line loses its ``\\"`` escapes, unless a
    quoted string of the original line holds a barline, in which case those quoted strings are
    removed from the original line instead (its ``\\"`` kept)."""
    from abctoolkit.utils import Barlines, Quote_re

    cleaned = line.replace(r"\"", "")
    current = line
    for quoted in re.findall(Quote_re, line):
        if any(barline in quoted for barline in Barlines):
            current = current.replace(quoted, "")
            cleaned = current
    return cleaned


def escapes_dropped(text: str) -> str:
    """The line without its ``\\"`` escapes where the pipeline's ``clean_quotes`` drops them from it, as a line on
    its own (none of its quoted strings holds a barline). Joined with a line whose quoted string holds one, they
    would stay, and abc2xml reads ``"^\\"x\\""`` as an annotation, a rest ``x`` and junk: a longer bar."""
    cleaned = text.replace('\\"', "")
    return cleaned if clean_quotes(text) == cleaned else text


def after_leading_barline(text: str, fields: str) -> str:
    """``fields`` inserted at the start of the music of ``text``: after its leading barline and what abctoolkit
    keeps with it, a repeat ending or a ``:`` (``|[K:G] d2``, not ``[K:G]| d2``, a bar of its own; ``:|2 [K:G]d2``
    and ``:|:[K:G]d2``, not ``:|[K:G]2 d2``, which loses the ending), else before its first character."""
    if not fields:
        return text
    spans = barline_spans(text)
    if spans and not text[:spans[0][0]].strip():
        at = spans[0][1]
        ending = ENDING_RE.match(text, at)
        if ending:
            at = ending.end()
    else:
        at = len(text) - len(text.lstrip())
    return text[:at] + fields + text[at:]


def inline_body_fields(lines: Lines) -> Lines:
    # Fields in abctoolkit's header stay there for every voice; inlined into the first bar, they held for the
    # first voice only.
    start = toolkit_body_start(lines)
    if start is None:
        return lines
    result = lines[:start]
    waiting: list[str] = []
    for line in lines[start:]:
        text = line.text
        if FIELD_LINE_RE.match(text) and not text.startswith(KEPT_FIELD_LINES):
            if text[0] in INLINE_FIELDS:
                waiting.append(inline_field(text))
            continue  # the others (B:, N:, O:, ...) describe the tune: nothing sounds different
        if waiting and is_music_line(text):
            line = Line(line.number, after_leading_barline(text, "".join(waiting)))
            waiting = []
        elif VOICE_LINE_RE.match(text):
            # Fields after a voice's last music line change nothing that sounds (abctoolkit reads one block
            # per voice, so the voice has no later music); the next voice's music starts at the tune's start.
            waiting = []
        result.append(line)
    # Fields after the last music line of the tune change nothing that sounds: they are dropped.
    return result


def merged_barline(first: str, second: str) -> str:
    """One barline for two in a row, keeping the repeat signs and the stronger line."""
    if second == "|" or first == second:
        return first
    if first == "|":
        return second
    if first in END_REPEATS + ("::",) and second in START_REPEATS + ("::",):
        return "::"
    if second in START_REPEATS:
        return "||:" if first in THICK_OR_DOUBLE else second
    return first


def merge_adjacent_barlines(lines: Lines) -> Lines:
    lines = list(lines)
    for block in voice_blocks(lines):
        # The voice as abctoolkit sees it: its music lines one after the other. Only barlines are
        # removed below, never a line end, so the result has one row per line of the block.
        voice = "".join(with_newline(lines[index].text) for index in block)
        pieces: list[str] = []
        position, kept = 0, None  # kept: index in pieces of the barline that absorbs the next ones
        for begin, end in barline_spans(voice):
            # A decoration or annotation between two barlines is a bar text to abctoolkit too.
            between, barline = voice[position:begin], voice[begin:end]
            if kept is not None and not between.strip() and barline != pieces[kept]:
                pieces[kept] = merged_barline(pieces[kept], barline)
                pieces.append(between)
            else:
                # Equal ones in a row are left: abctoolkit drops the repeats itself.
                pieces += [between, barline]
                kept = len(pieces) - 1
            position = end
        pieces.append(voice[position:])
        rows = "".join(pieces).split("\n")
        for row, index in zip(rows, block):
            if row + "\n" != with_newline(lines[index].text):
                lines[index] = Line(lines[index].number, row + "\n" if row.strip() else "")
    return [line for line in lines if line.text]


def header_value(lines: Lines, field: str) -> str | None:
    start = body_start(lines) or len(lines)
    values = [COMMENT_RE.sub("", line.text[2:]).strip() for line in lines[:start] if line.text.startswith(field)]
    return values[-1] if values else None


def bar_length(lines: Lines) -> Fraction | None:
    """One bar of the header's metre in units of its ``L:`` length (None: free or unknown metre,
    or a metre or unit length that changes in the body)."""
    start = body_start(lines)
    if start is None or any(re.match(r"^[ML]:|.*\[[ML]:", line.text) for line in lines[start:]):
        return None
    meter, unit = header_value(lines, "M:"), header_value(lines, "L:")
    meter = {"C": "4/4", "C|": "2/2"}.get(meter, meter)
    meter_match = re.fullmatch(r"(\d+(?:\+\d+)*)\s*/\s*(\d+)", meter or "")
    if not meter_match:
        return None
    bar = Fraction(sum(int(part) for part in meter_match.group(1).split("+")), int(meter_match.group(2)))
    if unit is None:  # ABC 2.1's default unit: 1/16 below a metre of 3/4, else 1/8
        unit = "1/16" if bar < Fraction(3, 4) else "1/8"
    unit_match = re.fullmatch(r"(\d+)\s*/\s*(\d+)", unit)
    if not unit_match or int(unit_match.group(1)) == 0:
        return None
    return bar / Fraction(int(unit_match.group(1)), int(unit_match.group(2))) or None


def written_length(bar_text: str) -> Fraction | None:
    from abctoolkit.duration import calculate_bartext_duration

    with captured("stdout", io.StringIO()):  # it prints what it cannot read
        try:
            # What it cannot read, as ABC 2.1 reads it: back-quotes (beaming only) out, A// = A/4,
            # (p:q = (p:q:p.
            text = NO_LENGTH_RE.sub("", masked(bar_text)).replace("`", "")
            text = re.sub(r"/{2,}", lambda m: "/" + str(2 ** len(m.group())), text)
            text = re.sub(r"\((\d+):(\d+)(?![:\d])", r"(\1:\2:\1", text)
            return calculate_bartext_duration(text)
        except Exception:  # noqa: BLE001 - e.g. chords written [D2F2]: then nothing is known
            return None


def bar_full_line_ends(lines: Lines) -> Lines:
    """A music line that ends without a barline just where a full bar of the metre ends gets one.

    Essen songs write one phrase per line and often leave out the barline at its end; abctoolkit
    would glue the phrase's last bar to the next line's first. A line that ends mid-bar (a phrase
    ending on an upbeat) is left alone: its bar goes on at the next line.
    """
    length = bar_length(lines)
    if length is None:
        return lines
    lines = list(lines)
    for block in voice_blocks(lines):
        if not any(barline_spans(lines[index].text) for index in block):
            continue  # an unbarred voice: bar_unbarred_lines decides
        bar_text = ""  # the bar that is open at the end of the line
        for row, index in enumerate(block[:-1]):  # the last line is close_final_bar's
            text = lines[index].text
            spans = barline_spans(text)
            bar_text = text[spans[-1][1]:] if spans else bar_text + text
            if not bar_text.strip() or starts_with_barline(lines[block[row + 1]].text):
                continue
            if written_length(bar_text) == length:
                lines[index] = Line(lines[index].number, text.rstrip() + " |\n")
                bar_text = ""
    return lines


def bar_unbarred_lines(lines: Lines) -> Lines:
    lines = list(lines)
    for block in voice_blocks(lines):
        if not any(barline_spans(lines[index].text) for index in block):
            for index in block:
                lines[index] = Line(lines[index].number, lines[index].text.rstrip() + " |\n")
    return lines


def close_final_bar(lines: Lines) -> Lines:
    lines = list(lines)
    for block in voice_blocks(lines):
        last = lines[block[-1]]
        if not ends_with_barline(last.text):
            lines[block[-1]] = Line(last.number, last.text.rstrip() + " |]\n")
    return lines


REPAIRS: tuple[Callable[[Lines], Lines], ...] = (
    join_field_continuations, group_inline_voices, drop_body_comments, join_line_continuations, inline_body_fields,
    merge_adjacent_barlines, bar_full_line_ends, bar_unbarred_lines, close_final_bar,
)


def repair_lines(lines: Lines) -> tuple[Lines, list[str]]:
    """The lines with every repair applied, and the names of the repairs that changed them."""
    applied = []
    for repair in REPAIRS:
        repaired = repair(lines)
        if repaired != lines:
            applied.append(repair.__name__)
            lines = repaired
    return lines, applied


def repair_tune(abc_text: str) -> tuple[str, list[str]]:
    """:func:`repair_lines` on a whole tune: the repaired text and the repairs applied (for inspection)."""
    lines, applied = repair_lines(numbered_lines(abc_text))
    return "".join(line.text for line in lines), applied


# ------------------------------------------------------------------------------------------------
# Where abctoolkit breaks

INFORMATION_FIELDS = ("X:", "T:", "C:", "W:", "w:", "Z:", "%%MIDI")  # abc.INTERLEAVE_REMOVED_FIELDS
BAR_NUMBER_RE = re.compile(r"%\d+\n$")
ELLIPSIS_AT = 30


class Element(NamedTuple):
    is_barline: bool
    text: str
    number: int  # line of the tune where it starts


def abctoolkit_voices(lines: Lines) -> dict[str, Lines]:
    """The body as abctoolkit cuts it: from the last ``V:1`` line, one part per ``V:`` line.

    The same steps as the interleaving pipeline: blank lines and information fields dropped, a
    ``V:1`` line after the first ``K:`` line of a tune that has none.
    """
    lines = [line for line in lines if line.text.strip()]
    if not any(line.text.strip() == "V:1" for line in lines):
        start = body_start(lines)
        if start is None:
            return {}
        lines = lines[:start] + [Line(lines[start - 1].number, "V:1\n", assumed=True)] + lines[start:]
    lines = [line for line in lines if not line.text.startswith(INFORMATION_FIELDS)]
    first = max(index for index, line in enumerate(lines) if line.text.strip() == "V:1")
    voices: dict[str, Lines] = {}
    name = "V:1"
    voices[name] = [lines[first]]
    for line in lines[first + 1:]:
        if line.text.startswith("V:"):
            name = line.text.strip()
            voices[name] = [line]
        else:
            voices[name].append(line)
    return voices


def bar_elements(voice: Lines) -> list[Element]:
    """Barlines and bar texts of a voice in abctoolkit's order: blank texts dropped, a repeated
    element dropped (its guard against ``| |``), texts running over line ends joined."""
    elements: list[Element] = []
    for line in voice[1:]:
        text = BAR_NUMBER_RE.sub("\n", line.text)
        position = 0
        for begin, end in barline_spans(text) + [(len(text), len(text))]:
            piece = text[position:begin]
            if piece.strip():
                if elements and not elements[-1].is_barline:
                    elements[-1] = elements[-1]._replace(text=elements[-1].text + piece.strip())
                else:
                    elements.append(Element(False, piece.strip(), line.number))
            if begin < end:
                elements.append(Element(True, text[begin:end], line.number))
            position = end
    return [element for index, element in enumerate(elements)
            if index == 0 or element.text != elements[index - 1].text]


def shortened(text: str) -> str:
    return text if len(text) <= ELLIPSIS_AT else text[:ELLIPSIS_AT] + "..."


def split_problem(name: str, voice: Lines) -> str:
    elements = bar_elements(voice)
    if not elements:
        if voice[0].assumed:  # the file has no V:1 line to look for
            return f"voice {name}, which the one-voice fix assumes after K: (line {voice[0].number}), has no music"
        return f"voice {name} (line {voice[0].number}) has no music"
    if not any(element.is_barline for element in elements):
        return f"voice {name} has no barline (line {elements[0].number})"
    for previous, element in zip(elements, elements[1:]):
        if previous.is_barline and element.is_barline:
            return (f"line {element.number}: two barlines in a row, {previous.text!r} then "
                    f"{element.text!r}, with no music between")
    if elements[0].is_barline and not elements[-1].is_barline:
        return (f"line {elements[-1].number}: the last bar {shortened(elements[-1].text)!r} of voice "
                f"{name} has no closing barline")
    return ""


def bar_count_problem(voices: dict[str, Lines]) -> str:
    from abctoolkit.duration import calculate_bartext_duration
    from abctoolkit.utils import split_into_bars_and_barlines

    bars: dict[str, list[str]] = {}
    for name, voice in voices.items():
        try:
            bars[name] = split_into_bars_and_barlines("".join(line.text for line in voice[1:]))[2]
        except Exception:  # noqa: BLE001 - split_problem names these
            return ""
    counts = {name: len(texts) for name, texts in bars.items()}
    if len(set(counts.values())) < 2:
        return ""
    summary = ", ".join(f"{name} {count}" for name, count in counts.items())
    reference = next(iter(bars))
    for index in range(min(counts.values())):
        lengths = {}
        for name, texts in bars.items():
            with captured("stdout", io.StringIO()):  # it prints what it cannot compute
                try:
                    lengths[name] = calculate_bartext_duration(texts[index])
                except Exception:  # noqa: BLE001 - a bar it cannot read proves nothing
                    lengths[name] = None
        if None not in lengths.values() and len(set(lengths.values())) > 1:
            differing = next(name for name in bars if lengths[name] != lengths[reference])
            return (f"bars per voice: {summary}; bar {index + 1} first differs in length: "
                    f"{reference} {shortened(bars[reference][index])!r} ({lengths[reference]} units of L), "
                    f"{differing} {shortened(bars[differing][index])!r} ({lengths[differing]})")
    return f"bars per voice: {summary}"


def locate_bar_problem(lines: Lines) -> str:
    """What in the tune breaks abctoolkit's bar split or voice alignment, and where ('' if none)."""
    voices = abctoolkit_voices(lines)
    for name, voice in voices.items():
        problem = split_problem(name, voice)
        if problem:
            return problem
    return bar_count_problem(voices) if len(voices) > 1 else ""
