"""A small real training corpus for the trainer tests, built from music21's corpus and the spec vectors.

- ABC: the first tunes of Essen folk-song collections shipped with music21 (single-voice ABC, as
  folk collections write it) and the vectors' interleaved ABC files;
- MTF: Bach chorales from music21 rendered to MIDI by music21, then written as MTF lines (SPEC §2,
  M3-compatible: text-like metas and sysex dropped) with a tiny inline converter, plus the vectors' MTF;
- a JSONL whose metadata comes from the pieces (titles, origin, genre) with English summaries
  (strings or lists) and non-English ones (dicts or lists of dicts), paths relative to its folder.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from conftest import VECTORS

ESSEN_FILES = ("essenFolksong/altdeu10.abc", "essenFolksong/ballad10.abc")
CHORALES = ("bach/bwv66.6", "bach/bwv269", "bach/bwv347", "bach/bwv153.1")
DROPPED_META = {"text", "copyright", "track_name", "instrument_name", "lyrics", "marker", "cue_marker",
                "device_name", "sequencer_specific"}


def midi_to_mtf(path: Path) -> str:
    import mido

    midi = mido.MidiFile(path)
    lines = [f"ticks_per_beat {midi.ticks_per_beat}"]
    for message in mido.merge_tracks(midi.tracks):
        if message.type in DROPPED_META or message.type == "sysex":
            continue
        line = " ".join(str(value) for value in message.dict().values())
        lines.append(line.encode("unicode_escape").decode("ascii"))
    return "\n".join(lines)


def essen_tunes(count_per_file: int):
    """(catalogue number, title, origin, genre, abc body) of each collection's first tunes.

    The body drops the ``X:``/``T:``/``N:``/``O:`` lines (SPEC §3 removes such information fields).
    """
    from music21 import corpus

    for name in ESSEN_FILES:
        text = corpus.getWork(name.split("/")[1].removesuffix(".abc")).read_text(encoding="latin-1")
        chunks = [c for c in re.split(r"\n\s*\n", text) if "X:" in c][:count_per_file]
        for chunk in chunks:
            fields = dict(re.findall(r"^([A-Z]):\s*(.*)$", chunk, flags=re.M))
            body = "\n".join(line for line in chunk.strip().splitlines()
                             if not re.match(r"^[XTNO]:", line)) + "\n"
            yield (fields.get("N", "").strip(), fields.get("T", "untitled").strip(), fields.get("O", "").strip(),
                   fields.get("R", "").strip(), body)


def build_corpus(root: Path, vectors: Path, tunes_per_file: int = 14) -> Path:
    """Write ``root/{abc,mtf}/...`` and ``root/pairs.jsonl``; returns ``root`` (built once, then reused)."""
    done = root / "done"
    if done.exists():
        return root
    from music21 import corpus

    (root / "abc").mkdir(parents=True, exist_ok=True)
    (root / "mtf").mkdir(parents=True, exist_ok=True)
    items = []
    for number, (catalogue, title, origin, genre, body) in enumerate(essen_tunes(tunes_per_file)):
        name = f"abc/essen_{number:02d}.abc"
        (root / name).write_text(body, encoding="utf-8")
        # The catalogue number first: tiny test texts are cut to a few tokens, and several tunes share a title.
        summary = f"{catalogue} {title}: a folk song from {origin or 'Europe'}, a {genre or 'song'}."
        german = {"language": "German", "summary": f"{catalogue} {title}: ein Volkslied."}
        # Odd lines use the README's shapes (string, dict), even ones the reference's (lists).
        items.append({"title": title, "catalogue": catalogue, "composer": None,
                      "genres": [g.strip() for g in genre.split(",") if g.strip()], "region": origin or None,
                      "summary_en": summary if number % 2 else [summary],
                      "summary_nen": german if number % 2 else [german],
                      "filepaths": [name]})
    for work in CHORALES:
        stem = work.split("/")[1]
        midi = root / f"{stem}.mid"
        corpus.parse(work).write("midi", fp=str(midi))
        (root / f"mtf/{stem}.mtf").write_text(midi_to_mtf(midi), encoding="utf-8")
        midi.unlink()
        items.append({"title": f"Chorale {stem}", "composer": "Johann Sebastian Bach", "genres": ["Chorale", "Baroque"],
                      "summary_en": f"Chorale {stem} by Johann Sebastian Bach, a four-part hymn setting.",
                      "summary_nen": {"language": "French", "summary": f"Choral {stem} de Bach."},
                      "filepaths": [f"mtf/{stem}.mtf"]})
    for kind in ("abc", "mtf"):
        for path in sorted((vectors / "extract_in" / kind).glob(f"*.{kind}")):
            shutil.copy(path, root / kind / path.name)
    items.append({"title": "Ach Gott, vom Himmel sieh darein", "composer": "Johann Sebastian Bach",
                  "lyrics": "Ach Gott, vom Himmel sieh darein\nund lass dich des erbarmen",
                  "summary_en": ["Bach's chorale BWV 10.7 for four voices."],
                  "summary_nen": [{"language": "German", "summary": "Bachs Choral BWV 10.7."}],
                  "filepaths": ["abc/bwv10.7.abc", "mtf/bwv10.7.mtf"]})
    items.append({"title": "Airds air", "summary_en": "A Scottish air from the Aird collection.",
                  "summary_nen": {"language": "Spanish", "summary": "Un aire escocés."},
                  "filepaths": ["abc/airds_tune3.abc"]})
    items.append({"title": "Handmade", "summary_en": "A tiny hand-made MIDI piece.",
                  "summary_nen": {"language": "Italian", "summary": "Un piccolo brano MIDI."},
                  "filepaths": ["mtf/handmade.mtf"]})
    with open(root / "pairs.jsonl", "w", encoding="utf-8") as handle:
        for item in items:
            handle.write(json.dumps(item, ensure_ascii=False) + "\n")
    done.touch()
    return root


def split_jsonl(root: Path, eval_count: int = 4) -> tuple[Path, Path]:
    """``train.jsonl`` / ``eval.jsonl`` beside ``pairs.jsonl`` (the last ``eval_count`` lines for eval)."""
    lines = (root / "pairs.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    (root / "train.jsonl").write_text("".join(lines[:-eval_count]), encoding="utf-8")
    (root / "eval.jsonl").write_text("".join(lines[-eval_count:]), encoding="utf-8")
    return root / "train.jsonl", root / "eval.jsonl"


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """The corpus, built once per session (import this fixture into a test module to use it)."""
    if not VECTORS.is_dir():
        pytest.fail(f"conformance vectors not found at {VECTORS}: the checkout is incomplete")
    return build_corpus(tmp_path_factory.getbasetemp() / "train_corpus", VECTORS)
