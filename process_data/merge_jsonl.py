"""Merge per-piece summary .json files into one training JSONL.

    python process_data/merge_jsonl.py summaries/ data/train.jsonl
    # music files live elsewhere than the JSONL's folder:
    python process_data/merge_jsonl.py summaries/ jsonl/train.jsonl --data_root data/

One JSON object per line, ordered by the summary files' relative paths. Each ``filepaths`` entry
is read relative to ``--data_root`` (default: the JSONL's folder) and written relative to the
JSONL's folder, which is how training reads it. An entry that does not exist, is absolute outside
the data root, or leaves it with ``..`` is reported on stderr and its record is left out, as is a
record without usable summaries. ``summary_en`` (string or list) and ``summary_nen`` (object or
list) are kept in the shape they have. Exit status: 0 all merged, 1 some records left out,
2 usage error.
"""

from __future__ import annotations

from clamp2.cli import interrupt_in_one_line

interrupt_in_one_line()  # before torch loads: Ctrl-C is one line, never a traceback

import argparse
import sys
from pathlib import Path
from clamp2.cli import ArgumentParser


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(
        description="Merge summary .json files (from gpt4_summarize.py) into one training JSONL.")
    parser.add_argument("summaries_dir", help="folder of summary .json files (searched recursively)")
    parser.add_argument("output_jsonl", help="the JSONL to write")
    parser.add_argument("--data_root", default=None,
                        help="folder the filepaths entries are relative to (default: the JSONL's folder)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from clamp2.files import find_files, input_problem, output_problem, unreachable, unwritable
    from clamp2.convert.summarize import merge_summaries

    summaries_dir = Path(args.summaries_dir)
    problem = unreachable(summaries_dir, "summaries folder") or (
        args.data_root is not None and unreachable(args.data_root, "data root"))
    if problem or not summaries_dir.is_dir():
        print(f"error: {problem or f'summaries folder {summaries_dir} does not exist'}", file=sys.stderr)
        return 2
    # chmod 000 or 300: find_files cannot list it and found nothing, which was said as "no .json files under".
    if problem := input_problem(summaries_dir, "summaries folder"):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if not find_files(summaries_dir, [".json"]):
        print(f"error: no .json files under {summaries_dir}", file=sys.stderr)
        return 2
    if args.data_root is not None and not Path(args.data_root).is_dir():
        print(f"error: data root {args.data_root} does not exist", file=sys.stderr)
        return 2
    problem = output_problem(args.output_jsonl, folder=False)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        result = merge_summaries(summaries_dir, args.output_jsonl, args.data_root)
    except OSError as error:  # the JSONL's write (a summary that cannot be read is skipped, named)
        print(f"error: {unwritable(args.output_jsonl, error)}", file=sys.stderr)
        return 2
    print(f"wrote {result.written} records to {args.output_jsonl}, skipped {len(result.skipped)}")
    return 1 if result.skipped else 0


if __name__ == "__main__":
    sys.exit(main())
