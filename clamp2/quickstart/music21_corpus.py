"""Small real data sets from music21's bundled corpus, for demos and benchmarks (no downloads).

MusicXML scores become interleaved ABC (xml2abc → interleaving, SPEC §3); the same scores rendered
to MIDI by music21 become MTF (SPEC §2). Conversions that fail are skipped, as a batch would.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Iterable, List, Optional, Sequence

from ..files import atomic_write_text, finished_output

DEFAULT_COMPOSERS = ("bach", "mozart", "beethoven", "haydn", "handel", "schumann", "schubert", "monteverdi",
                     "palestrina", "josquin", "chopin", "joplin")
MUSICXML_SUFFIXES = (".mxl", ".xml", ".musicxml")


def corpus_musicxml_paths(composers: Iterable[str] = DEFAULT_COMPOSERS, per_composer: Optional[int] = None) -> List[Path]:
    """MusicXML files of the bundled corpus by composer (music21 also lists .krn/.rntxt: filtered out)."""
    from music21 import corpus

    paths: List[Path] = []
    for composer in composers:
        found = sorted(Path(p) for p in corpus.getComposer(composer) if Path(p).suffix.lower() in MUSICXML_SUFFIXES)
        paths.extend(found[:per_composer] if per_composer else found)
    return paths


def piece_name(path: Path) -> str:
    """A unique, readable stem: ``<composer folder>_<file stem>``."""
    composer = path.parent.name if path.parent.name != "corpus" else "misc"
    return f"{composer}_{path.stem}".replace(" ", "_")


def musicxml_to_interleaved(path: Path) -> str:
    from ..convert.abc import abc_to_interleaved, xml_to_abc

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unequal bar durations are warnings only (SPEC §3)
        return abc_to_interleaved(xml_to_abc(path))


def musicxml_to_mtf(path: Path, tmp_dir: Path) -> str:
    """Render a score to MIDI with music21 and convert that to M3-compatible MTF."""
    from music21 import converter

    from ..convert.mtf import midi_to_mtf

    midi_path = tmp_dir / (path.stem + ".mid")
    converter.parse(str(path)).write("midi", fp=str(midi_path))
    try:
        return midi_to_mtf(midi_path)
    finally:
        midi_path.unlink(missing_ok=True)


def build_music_files(out_dir: str | os.PathLike, scores: Sequence[Path], kinds: Sequence[str] = ("abc", "mtf"),
                      progress: bool = True) -> List[Path]:
    """Write ``out_dir/abc/<name>.abc`` and/or ``out_dir/mtf/<name>.mtf`` for each score; existing files are kept."""
    import tempfile

    from clamp2.progress import progress_bar

    out_dir = Path(out_dir)
    written: List[Path] = []
    with tempfile.TemporaryDirectory() as tmp:
        for score in progress_bar(iterable=scores, total=len(scores), desc="corpus", unit="score", enabled=progress):
            for kind in kinds:
                target = out_dir / kind / f"{piece_name(score)}.{kind}"
                if not finished_output(target):
                    try:
                        text = musicxml_to_interleaved(score) if kind == "abc" else musicxml_to_mtf(score, Path(tmp))
                    except Exception:  # noqa: BLE001 - a corpus piece a converter cannot handle is just left out
                        continue
                    atomic_write_text(target, text)
                written.append(target)
    return written
