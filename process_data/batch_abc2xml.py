"""Convert (interleaved) ABC back to MusicXML with abctoolkit's abc2xml (docs/formats.md).

    python process_data/batch_abc2xml.py <input_dir> <output_dir> [--workers N] [--overwrite]
        [--file_timeout SECONDS] [--no_progress]

Each ``.abc`` becomes ``<output_dir>/<same relative folder>/<stem>.xml``: the first tune of the
file, the same bytes ``python -m abctoolkit.abc2xml FILE`` prints, as the original's script saves
them (``-o DIR`` writes them without the last newline; input read as UTF-8, else Latin-1),
converted in-process. Existing outputs are skipped unless ``--overwrite``; failures
go to ``<output_dir>/failed_abc2xml.log`` and stderr. Exit status: 0 all converted, 1 some file
failed, 2 usage error.
"""

from __future__ import annotations

from clamp2.cli import interrupt_in_one_line

interrupt_in_one_line()  # before torch loads: Ctrl-C is one line, never a traceback

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    from clamp2.convert.batch_runner import batch_argument_parser

    parser = batch_argument_parser("Convert ABC files to MusicXML (abc2xml).", "ABC (.abc)",
                                   "MusicXML (.xml)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from clamp2.convert.batch_runner import batch_options, convert_folder
    from clamp2.convert.abc import interleaved_file_to_xml

    return convert_folder(args.input_dir, args.output_dir, convert=interleaved_file_to_xml,
                          extensions=[".abc"], output_suffix=".xml", tool="abc2xml",
                          **batch_options(args))


if __name__ == "__main__":
    sys.exit(main())
