"""How the API and the raw-folder tools tell interleaved ABC from a standard tune (``abc_format="auto"``).

The rule must read every output of ``batch_interleaved_abc.py`` as interleaved, including the ones
abctoolkit leaves untidy, and never a standard tune: a misread interleaved file is interleaved a
second time (``[V:1][V:1]...`` or a failure), a misread standard tune is never interleaved.
"""

from __future__ import annotations

from pathlib import Path

import music21
import pytest

from clamp2.convert.abc import abc_to_interleaved, split_tunes, xml_to_abc
from clamp2.extraction.model_inputs import RawInput, is_interleaved, model_text, written_then_read

CORPUS = Path(music21.__file__).parent / "corpus"


def corpus_tune(relative_path: str, number: str) -> str:
    for tune in split_tunes((CORPUS / relative_path).read_text(encoding="utf-8")):
        if tune.split("\n", 1)[0][2:].strip() == number:
            return tune
    raise LookupError(f"no X:{number} in {relative_path}")


def auto_model_text(text: str) -> str:
    return model_text(RawInput("abc_auto", data=text))


@pytest.mark.filterwarnings("ignore:bar durations differ")
@pytest.mark.filterwarnings("ignore:bars lost")
def test_interleaved_outputs_with_stray_lines_are_read_as_they_are():
    # Real corpus pieces whose interleaved form has lines that do not start with "[V:": bwv171.6's voice
    # names run over several header lines; the Londonderry Hornpipe keeps an indented bar and blank lines.
    # As the batch tool's files read back ("\r" in a voice name is a newline then).
    chorale = written_then_read(abc_to_interleaved(xml_to_abc(CORPUS / "bach" / "bwv171.6.mxl")))
    hornpipe = written_then_read(abc_to_interleaved(corpus_tune("oneills1850/1701-1780.abc", "1753")))
    for text, stray in ((chorale, "Oboe 1,2"), (hornpipe, "           a2 f>d A>df>a")):
        assert "\n" + stray in text  # the case this test is about: a line that is not "[V:..."
        assert is_interleaved(text)
        assert auto_model_text(text) == text  # not interleaved a second time


def test_standard_tunes_are_interleaved_first():
    # Aird's Airs X:1148: two flutes declared in the header, the body one "[V:1] ..."/"[V:2] ..." line each:
    # standard ABC written with inline voices; its interleaved form puts both voices of a bar on one line.
    duet = corpus_tune("airdsAirs/book6.abc", "1148")
    assert not is_interleaved(duet)
    interleaved = auto_model_text(duet)
    assert interleaved != duet and is_interleaved(interleaved)
    assert all(line.count("[V:") == 2 for line in interleaved.splitlines() if line.startswith("[V:"))
    for text in (corpus_tune("oneills1850/1701-1780.abc", "1753"),  # no V: at all
                 "X:1\nL:1/8\nK:C\nV:1\ncdef|gabc|\nV:2\nCDEF|GABc|\n",  # voice blocks
                 "X:1\nL:1/8\nK:C\n[V:1]cdef|\n[V:1]gabc|\nV:2\nCDEF|\n"):  # a voice block after inline voices
        assert not is_interleaved(text)


@pytest.mark.parametrize("text, expected", [
    ("L:1/8\nK:C\n[V:1]cdef|\n[V:1]gabc|\n", True),  # one voice, as the interleaving step writes it
    # The same bars with X: (the interleaving step removes it): a standard tune with [V:1] on every line.
    ("X:1\nT:Jig\nL:1/8\nK:C\n[V:1]cdef|\n[V:1]gabc|\n", False),
    ("L:1/8\nK:C\nV:1\nV:2\n[V:1]cd|[V:2]CD|\nef|\n[V:1]ga|[V:2]GA|\n", True),  # a stray bar, most prefixed
    ("L:1/8\nK:C\nV:1\nV:2\n[V:1]ab|[V:2]AB|\n[V:1]|\n[V:1]ef|[V:2]EF|\n", True),  # a one-voice stray line
    ("L:1/8\nK:C\nV:1\nV:2\n[V:1]cd|[V:2]CD|\nef|\n", False),  # half prefixed: not most
    ("L:1/8\nK:C\nV:1\nV:2\n[V:1]cd|[V:2]CD|\nef|\ngab|\n", False),  # most not prefixed
    ("X:1\nL:1/8\nK:C\n", False),  # no music
])
def test_the_rule_on_small_cases(text, expected):
    assert is_interleaved(text) is expected


@pytest.mark.parametrize("separator", ["\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"])
def test_line_separators_other_than_newline_stay_inside_their_line(separator):
    # Files are read with universal newlines, so "\n" is the only line break left; the patchilizer, the
    # reference's extraction and abctoolkit split lines on it alone. str.splitlines() also breaks at these
    # characters (a form feed, NEL or U+2028 in an annotation): the bars then read as unprefixed lines and an
    # interleaved file was interleaved a second time ("[V:1][V:1]...", other patches) or failed.
    text = f'L:1/8\nK:C\nV:1\nV:2\n[V:1]"^x{separator}y"cd|[V:2]CD|\n[V:1]e{separator}f|[V:2]EF|\n'
    assert is_interleaved(text)
    assert auto_model_text(text) == text
