"""Throughput of the batch converters on music21 corpus data: MIDI -> MTF and ABC interleaving.

    python benchmarks/bench_process_data.py [--pieces 20] [--copies 10] [--workers N]

Renders ``--pieces`` Bach chorales from music21's corpus to MIDI (music21) and to standard ABC
(xml2abc), copies each ``--copies`` times so that the batch is large enough to time, then runs
the same runner the process_data scripts use (``clamp2.convert.batch_runner.run_batch``) with 1 worker, with
``--workers`` (default: all cores), and with ``--workers`` under a ``--file_timeout`` (the per-file alarm and
watchdog), printing files/s. Outputs go to a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from clamp2.cli import ArgumentParser


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(description="Files/s of midi->mtf and of ABC interleaving.")
    parser.add_argument("--pieces", type=int, default=20, help="corpus chorales to render (default 20)")
    parser.add_argument("--copies", type=int, default=10, help="copies of each rendered file (default 10)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="worker processes of the parallel run (default: all cores)")
    return parser.parse_args(argv)


def chorale_paths(count: int) -> list[Path]:
    from music21 import corpus

    paths = sorted(Path(str(p)) for p in corpus.getComposer("bach") if str(p).endswith(".mxl"))
    return paths[:count]


def render_inputs(scores: list[Path], copies: int, midi_dir: Path, abc_dir: Path) -> None:
    from music21 import converter, midi

    from clamp2.convert.abc import xml_to_abc

    for score_path in scores:
        midi_file = midi.translate.streamToMidiFile(converter.parse(score_path))
        rendered = midi_dir / (score_path.stem + ".mid")
        midi_file.open(str(rendered), "wb")
        midi_file.write()
        midi_file.close()
        abc = abc_dir / (score_path.stem + ".abc")
        abc.write_text(xml_to_abc(score_path), encoding="utf-8", newline="")
        for copy in range(1, copies):
            shutil.copy(rendered, midi_dir / f"{score_path.stem}_{copy}.mid")
            shutil.copy(abc, abc_dir / f"{score_path.stem}_{copy}.abc")


def time_batch(input_dir: Path, output_dir: Path, extensions, suffix: str, convert, workers: int,
               file_timeout: float | None = None) -> tuple[float, int]:
    from clamp2.convert.batch_runner import plan_jobs, run_batch

    jobs, _ = plan_jobs(input_dir, output_dir, extensions, suffix)
    start = time.perf_counter()
    result = run_batch(jobs, convert, output_dir=output_dir, tool="bench", workers=workers, progress=False,
                       file_timeout=file_timeout)
    elapsed = time.perf_counter() - start
    if result.failures:
        print(f"warning: {result.failed} files failed, e.g. {result.failures[0]}", file=sys.stderr)
    return elapsed, result.converted


def main(argv=None) -> int:
    args = parse_args(argv)
    import functools

    from clamp2.convert.abc import abc_file_to_interleaved
    from clamp2.convert.mtf import midi_to_mtf

    with tempfile.TemporaryDirectory(prefix="bench_process_data_") as tmp:
        tmp = Path(tmp)
        midi_dir, abc_dir = tmp / "midi", tmp / "abc"
        midi_dir.mkdir()
        abc_dir.mkdir()
        scores = chorale_paths(args.pieces)
        print(f"rendering {len(scores)} chorales x {args.copies} copies ...", file=sys.stderr)
        render_inputs(scores, args.copies, midi_dir, abc_dir)
        tasks = [
            ("midi->mtf", midi_dir, [".mid"], ".mtf", functools.partial(midi_to_mtf, m3_compatible=True)),
            ("interleave abc", abc_dir, [".abc"], ".abc", abc_file_to_interleaved),
        ]
        for name, input_dir, extensions, suffix, convert in tasks:
            runs = [(workers, None) for workers in sorted({1, args.workers})] + [(args.workers, 60.0)]
            for workers, file_timeout in runs:
                output_dir = tmp / f"out_{suffix[1:]}_{workers}_{file_timeout}"
                elapsed, converted = time_batch(input_dir, output_dir, extensions, suffix, convert, workers,
                                                file_timeout)
                limit = f", file_timeout={file_timeout:g}" if file_timeout else ""
                print(f"{name:15s} workers={workers:2d}{limit}: {converted} files in {elapsed:6.2f} s = "
                      f"{converted / elapsed:8.1f} files/s")
    long_sysex_line()
    return 0


def long_sysex_line(size: int = 2_000_000) -> None:
    """MTF -> MIDI of one sample-dump-sized sysex line (2 M bytes): linear in the line (it once took minutes)."""
    from clamp2.convert.mtf import mtf_to_midi

    text = "ticks_per_beat 480\nsysex 0 (" + ", ".join(["1"] * size) + ")\n"
    started = time.perf_counter()
    mtf_to_midi(text)
    elapsed = time.perf_counter() - started
    print(f"{'mtf->midi':15s} one sysex of {size:,} bytes: {elapsed:6.2f} s = {len(text) / elapsed / 1e6:6.1f} MB/s")


if __name__ == "__main__":
    sys.exit(main())
