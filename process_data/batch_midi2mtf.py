"""Convert MIDI (.mid, .midi) to MIDI Text Format (docs/formats.md).

    python process_data/batch_midi2mtf.py <input_dir> <output_dir> [--workers N] [--overwrite]
        [--file_timeout SECONDS] [--no_progress]
    python process_data/batch_midi2mtf.py <input_dir> <output_dir> --clamp3      # for CLaMP 3
    python process_data/batch_midi2mtf.py <input_dir> <output_dir> --keep_all

Each file becomes ``<output_dir>/<same relative folder>/<stem>.mtf``: ``ticks_per_beat N`` and one
line per message of mido's merged track. M3-compatible by default (the CLaMP 2 setting, also
spelled ``--m3_compatible``): text, copyright, track/instrument names, lyrics, markers, cue
markers, device names, sequencer-specific metas and sysex are dropped. ``--clamp3`` is CLaMP 3's
mode: the same, except that sysex and sequencer-specific metas are kept; use it
for ``code/extract_clamp3.py``. ``--keep_all`` keeps every message. A file mido cannot read is a failure (``<output_dir>/failed_midi2mtf.log`` and stderr).
Exit status: 0 all converted, 1 some file failed, 2 usage error.
"""

from __future__ import annotations

from clamp2.cli import interrupt_in_one_line

interrupt_in_one_line()  # before torch loads: Ctrl-C is one line, never a traceback

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    from clamp2.convert.batch_runner import batch_argument_parser

    parser = batch_argument_parser("Convert MIDI files to MIDI Text Format (MTF).",
                                   "MIDI (.mid/.midi)", "MTF (.mtf)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--m3_compatible", dest="mode", action="store_const", const="m3",
                      help="drop the message types M3/CLaMP 2 never saw (the default)")
    mode.add_argument("--clamp3", dest="mode", action="store_const", const="clamp3",
                      help="CLaMP 3's mode: as --m3_compatible, but sysex and sequencer-specific messages kept")
    mode.add_argument("--keep_all", dest="mode", action="store_const", const="all",
                      help="keep every message (e.g. for an exact MIDI -> MTF -> MIDI round trip)")
    parser.set_defaults(mode="m3")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import functools

    from clamp2.convert.batch_runner import batch_options, convert_folder
    from clamp2.convert.mtf import MIDI_EXTENSIONS, midi_to_mtf

    return convert_folder(args.input_dir, args.output_dir,
                          convert=functools.partial(midi_to_mtf, mode=args.mode),
                          extensions=MIDI_EXTENSIONS, output_suffix=".mtf", tool="midi2mtf",
                          **batch_options(args))


if __name__ == "__main__":
    sys.exit(main())
