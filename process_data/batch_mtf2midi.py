"""Convert MIDI Text Format (.mtf) back to MIDI (docs/formats.md).

    python process_data/batch_mtf2midi.py <input_dir> <output_dir> [--workers N] [--overwrite]
        [--file_timeout SECONDS] [--no_progress]

Each ``.mtf`` becomes ``<output_dir>/<same relative folder>/<stem>.mid``: a type-1 file with one
track holding the messages of the text (``unknown_meta`` lines are skipped). MTF written with
``batch_midi2mtf.py --keep_all`` gives back the original message list. Failures go to
``<output_dir>/failed_mtf2midi.log`` and stderr. Exit status: 0 all converted, 1 some file failed,
2 usage error.
"""

from __future__ import annotations

from clamp2.cli import interrupt_in_one_line

interrupt_in_one_line()  # before torch loads: Ctrl-C is one line, never a traceback

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    from clamp2.convert.batch_runner import batch_argument_parser

    parser = batch_argument_parser("Convert MIDI Text Format files back to MIDI.", "MTF (.mtf)",
                                   "MIDI (.mid)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from clamp2.convert.batch_runner import batch_options, convert_folder
    from clamp2.convert.mtf import mtf_file_to_midi_bytes

    return convert_folder(args.input_dir, args.output_dir, convert=mtf_file_to_midi_bytes,
                          extensions=[".mtf"], output_suffix=".mid", tool="mtf2midi",
                          **batch_options(args))


if __name__ == "__main__":
    sys.exit(main())
