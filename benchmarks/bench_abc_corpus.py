"""How many of music21's corpus ABC tunes ``process_data/batch_interleaved_abc.py`` interleaves, and how fast.

    python benchmarks/bench_abc_corpus.py [--limit N] [--workers N] [--out DIR] [--roundtrip]

Splits every tune of every ``.abc`` file of music21's corpus (12,978 tunes in 1,146 files, from
``X:`` line to ``X:`` line) into its own file, ``<out>/abc/<collection>/<file>_<index>.abc``, runs
the real ``process_data/batch_interleaved_abc.py`` on them in a subprocess, as a user would, and
prints converted / total, the failures by class, the repairs the converted tunes needed (each
repaired tune is one the original CLaMP 2 pipeline loses) and tunes/s (wall clock of the script,
start-up included). ``--limit N`` runs N tunes spread over all the collections (every k-th tune).
``--roundtrip`` then converts the repaired tunes back to MusicXML with
``process_data/batch_abc2xml.py`` and parses each file with music21 (about 0.1 s a tune).
Outputs go to a temporary folder unless ``--out`` names one (kept, with the scripts' logs).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from clamp2.convert.batch_runner import positive_int
from clamp2.cli import ArgumentParser

REPO_ROOT = Path(__file__).resolve().parents[1]
REPAIRED_RE = re.compile(r"^repaired \(([^)]*)\)")


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(description="Interleave every ABC tune of music21's corpus and count what converts.")
    parser.add_argument("--limit", type=positive_int, default=None,
                        help="run only this many tunes, spread over all the collections (default: all)")
    parser.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1,
                        help="worker processes of the batch scripts (default: all cores)")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for the tunes, outputs and logs (default: a temporary folder, deleted)")
    parser.add_argument("--roundtrip", action="store_true",
                        help="convert the repaired tunes to MusicXML (batch_abc2xml.py) and parse them with music21")
    return parser.parse_args(argv)


def corpus_tunes() -> list[tuple[str, str]]:
    """``(relative output path, tune text)`` of every tune of music21's corpus ABC files."""
    import music21

    from clamp2.convert.abc import split_tunes

    corpus = Path(music21.__file__).parent / "corpus"
    tunes = []
    for path in sorted(corpus.rglob("*.abc")):
        stem = path.relative_to(corpus).with_suffix("").as_posix()
        for index, tune in enumerate(split_tunes(path.read_text(encoding="utf-8"))):
            tunes.append((f"{stem}_{index:04d}.abc", tune))
    return tunes


def write_tunes(tunes: list[tuple[str, str]], folder: Path) -> None:
    for name, text in tunes:
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8", newline="")


def run_script(script: str, input_dir: Path, output_dir: Path, workers: int) -> tuple[float, str]:
    """Wall-clock seconds and the summary line of a process_data batch script."""
    command = [sys.executable, str(REPO_ROOT / "process_data" / script), str(input_dir), str(output_dir),
               "--workers", str(workers)]
    start = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if completed.returncode not in (0, 1):
        raise SystemExit(f"{script} exited {completed.returncode}: {completed.stderr.strip()[-2000:]}")
    return elapsed, completed.stdout.strip().splitlines()[-1]


def read_log(path: Path) -> dict[str, str]:
    from clamp2.files import read_file_log  # names holding a tab are quoted there

    return dict(read_file_log(path)) if path.exists() else {}


def failure_class(reason: str) -> str:
    """The kind of a failure: its reason without the location, quotes and numbers."""
    reason = re.sub(r"^\w+Error: ", "", reason).split(" (", 1)[0].split("; ", 1)[0]
    return re.sub(r"\d+", "N", re.sub(r"'[^']*'|\[[^\]]*\]", "...", reason))


def round_trip(output_dir: Path, repaired: list[str], folder: Path, workers: int) -> None:
    import warnings

    import music21

    chosen = folder / "repaired_interleaved"
    for name in repaired:
        target = chosen / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((output_dir / name).read_bytes())
    xml_dir = folder / "repaired_xml"
    elapsed, summary = run_script("batch_abc2xml.py", chosen, xml_dir, workers)
    print(f"abc2xml of the {len(repaired)} repaired tunes: {summary} ({elapsed:.1f} s)")
    parsed, unreadable, wrong_bars = 0, [], []
    for name in repaired:
        xml_path = xml_dir / Path(name).with_suffix(".xml")
        if not xml_path.exists():
            continue
        bars = sum(1 for line in (chosen / name).read_text(encoding="utf-8").splitlines() if line.startswith("[V:"))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                score = music21.converter.parse(xml_path)
        except Exception as error:  # noqa: BLE001 - counted and listed
            unreadable.append(f"{name}: {type(error).__name__}: {error}")
            continue
        parsed += 1
        if any(len(part.getElementsByClass("Measure")) != bars for part in score.parts):
            wrong_bars.append(name)
    print(f"music21 parses {parsed} of {len(repaired)} MusicXML files; {len(wrong_bars)} with a measure "
          f"count other than the interleaved tune's bar count")
    for line in (unreadable + wrong_bars)[:10]:
        print(f"  {line}")


def main(argv=None) -> int:
    args = parse_args(argv)
    tunes = corpus_tunes()
    if args.limit and args.limit < len(tunes):
        tunes = tunes[::len(tunes) // args.limit][:args.limit]
    with tempfile.TemporaryDirectory(prefix="bench_abc_corpus_") as temporary:
        folder = args.out or Path(temporary)
        input_dir, output_dir = folder / "abc", folder / "interleaved"
        write_tunes(tunes, input_dir)
        print(f"running process_data/batch_interleaved_abc.py on {len(tunes)} tunes "
              f"({args.workers} workers) ...", file=sys.stderr)
        elapsed, summary = run_script("batch_interleaved_abc.py", input_dir, output_dir, args.workers)
        failures = read_log(output_dir / "failed_interleaved_abc.log")
        notes = read_log(output_dir / "warnings_interleaved_abc.log")
        repairs = {name: REPAIRED_RE.match(note).group(1) for name, note in notes.items() if REPAIRED_RE.match(note)}

        converted = len(tunes) - len(failures)
        print(f"script: {summary}")
        print(f"converted {converted} / {len(tunes)} tunes ({100 * converted / len(tunes):.2f}%) "
              f"in {elapsed:.1f} s = {len(tunes) / elapsed:.0f} tunes/s")
        print(f"the original pipeline converts {converted - len(repairs)}; "
              f"{len(repairs)} more after a repair")
        by_repair = collections.Counter(name.strip() for names in repairs.values() for name in names.split(","))
        for name, count in by_repair.most_common():
            print(f"  repair {name}: {count} tunes")
        by_class = collections.Counter(failure_class(reason) for reason in failures.values())
        print(f"failures: {len(failures)}")
        for reason, count in by_class.most_common():
            example = next(name for name, full in failures.items() if failure_class(full) == reason)
            print(f"  {count:5d}  {reason}  (e.g. {example}: {failures[example]})")
        if args.roundtrip and repairs:
            round_trip(output_dir, sorted(repairs), folder, args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
