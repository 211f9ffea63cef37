"""The quick start's corpus builder: rendering ahead in worker processes writes exactly what one process writes."""

import re
from pathlib import Path

from clamp2.convert.abc import split_tunes
from clamp2.files import TMP_SUFFIX, _temporary_name
from clamp2.quickstart.demo_corpus import COLLECTIONS, Collection, build_demo_corpus, corpus_root


def files_of(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def small_collection(tmp_path: Path) -> Collection:
    """Four real Chinese folk songs of the Essen collection, one of which music21 cannot render (han2 #31)."""
    tunes = split_tunes((corpus_root() / "essenFolksong" / "han2.abc").read_text(encoding="latin-1"))
    chosen = [tunes[30]] + tunes[:3]
    assert re.search(r"^X:\s*31\b", chosen[0], flags=re.M), "han2.abc's 31st tune moved"
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "songs.abc").write_text("\n\n".join(t.strip() for t in chosen) + "\n", encoding="latin-1")
    return Collection("songs", str(folder), "*.abc", "abc", {"en": "a folk song", "de": "ein Volkslied",
                                                            "fr": "une chanson", "es": "una canción"})


def test_workers_write_the_same_bytes_and_skip_what_fails(tmp_path, capsys):
    collections = (COLLECTIONS[0], COLLECTIONS[3], small_collection(tmp_path))  # MusicXML chorales, ABC jigs, songs
    one = build_demo_corpus(tmp_path / "one", 4, progress=False, collections=collections, workers=1)
    skipped = capsys.readouterr()
    two = build_demo_corpus(tmp_path / "two", 4, progress=False, collections=collections, workers=2)
    assert [p.name for p in one] == [p.name for p in two]
    assert [p.split for p in one] == [p.split for p in two]
    assert sum(p.collection.label == "songs" for p in one) == 3  # the fourth cannot be rendered: said, not written
    assert "skipped songs_songs-1" in skipped.out + skipped.err
    assert sum(p.split == "test" for p in one if p.collection.label == "chorale") == 0  # 4 pieces: none is the 5th
    one_files, two_files = files_of(tmp_path / "one"), files_of(tmp_path / "two")
    assert one_files and one_files == two_files
    assert {name.split("/")[0] for name in one_files} == {"xml", "abc_standard", "midi", "metadata"}


def test_a_rerun_keeps_the_files_and_renders_nothing(tmp_path):
    collections = (COLLECTIONS[3],)
    first = build_demo_corpus(tmp_path, 5, progress=False, collections=collections, workers=2)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    again = build_demo_corpus(tmp_path, 5, progress=False, collections=collections, workers=2)
    assert [p.name for p in again] == [p.name for p in first]
    assert [p.split for p in first].count("test") == 1
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()} == before


def test_a_rerun_removes_what_a_killed_write_left(tmp_path):
    collections = (COLLECTIONS[3],)
    first = build_demo_corpus(tmp_path, 2, progress=False, collections=collections, workers=1)
    piece = first[0]
    written = [p for p in tmp_path.rglob(f"{piece.name}.*") if p.is_file()]
    assert len(written) == 3  # metadata, MIDI, music
    for path in written:  # the run killed while writing this piece's files
        path.unlink()
        (path.parent / _temporary_name(path.name)).write_bytes(b"half")
    build_demo_corpus(tmp_path, 2, progress=False, collections=collections, workers=1)
    assert all(path.stat().st_size > 4 for path in written)
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(TMP_SUFFIX)]
