"""Turn standard ABC into interleaved ABC, one bar of every voice per line (docs/formats.md).

    python process_data/batch_interleaved_abc.py <input_dir> <output_dir> [--workers N] [--overwrite]
        [--file_timeout SECONDS] [--no_progress]

Each ``.abc`` (read as UTF-8) becomes ``<output_dir>/<same relative folder>/<stem>.abc`` through
the CLaMP 2 abctoolkit pipeline: information fields and bar numbers removed, empty bars stripped,
voices rotated into ``[V:1]...|[V:2]...|`` lines. A single-voice tune without a ``V:1`` line is
treated as one voice. A tune the reference's steps cannot split into bars (hand-written folk
tunes: line continuations, two barlines in a row, no closing barline; see docs/abc.md) is
repaired and tried again, and the repairs are logged in
``<output_dir>/warnings_interleaved_abc.log``, as are unequal bar durations. Voices with
different bar counts, an empty piece or a non-UTF-8 file are failures
(``<output_dir>/failed_interleaved_abc.log`` and stderr, with the line where the tune breaks).
The output folder must differ from the input folder. Exit status: 0 all converted, 1 some file
failed, 2 usage error.
"""

from __future__ import annotations

from clamp2.cli import interrupt_in_one_line

interrupt_in_one_line()  # before torch loads: Ctrl-C is one line, never a traceback

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    from clamp2.convert.batch_runner import batch_argument_parser

    parser = batch_argument_parser("Convert standard ABC files to interleaved ABC.",
                                   "standard ABC (.abc)", "interleaved ABC (.abc)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from clamp2.convert.batch_runner import batch_options, convert_folder
    from clamp2.convert.abc import abc_file_to_interleaved

    return convert_folder(args.input_dir, args.output_dir, convert=abc_file_to_interleaved,
                          extensions=[".abc"], output_suffix=".abc", tool="interleaved_abc",
                          **batch_options(args))


if __name__ == "__main__":
    sys.exit(main())
