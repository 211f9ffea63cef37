"""Convert MusicXML (.xml, .mxl, .musicxml) to standard ABC with abctoolkit's xml2abc (docs/formats.md).

    python process_data/batch_xml2abc.py <input_dir> <output_dir> [--workers N] [--overwrite]
        [--file_timeout SECONDS] [--no_progress]

Each score becomes ``<output_dir>/<same relative folder>/<stem>.abc``, byte for byte what
``python -m abctoolkit.xml2abc -d 8 -x FILE`` prints (unit length 1/8, no line breaks), converted
in-process. An ``.mxl`` whose score is a ``.musicxml`` is read through its
``META-INF/container.xml``. Existing outputs are skipped unless ``--overwrite``; failures go to
``<output_dir>/failed_xml2abc.log`` and stderr. Exit status: 0 all converted, 1 some file failed,
2 usage error.
"""

from __future__ import annotations

from clamp2.cli import interrupt_in_one_line

interrupt_in_one_line()  # before torch loads: Ctrl-C is one line, never a traceback

import argparse
import sys


def parse_args(argv=None) -> argparse.Namespace:
    from clamp2.convert.batch_runner import batch_argument_parser

    parser = batch_argument_parser("Convert MusicXML files to standard ABC (xml2abc -d 8 -x).",
                                   "MusicXML (.xml/.mxl/.musicxml)", "ABC (.abc)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from clamp2.convert.batch_runner import batch_options, convert_folder
    from clamp2.convert.abc import MUSICXML_EXTENSIONS, xml_to_abc

    return convert_folder(args.input_dir, args.output_dir, convert=xml_to_abc,
                          extensions=MUSICXML_EXTENSIONS, output_suffix=".abc", tool="xml2abc",
                          **batch_options(args))


if __name__ == "__main__":
    sys.exit(main())
