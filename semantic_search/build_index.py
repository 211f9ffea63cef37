"""Pack a folder of [1, D] .npy features into one memory-mapped float32 index (or update it).

    python semantic_search/build_index.py FEATURES INDEX_DIR [--no_progress]

INDEX_DIR gets ``vectors.<gen>.npy`` (float32 [N, D], rows in file-name order), ``norms``, ``keys``,
per-file size and modification time, and ``manifest.json`` (format, dimension, count, normalised or
not). Every search tool accepts INDEX_DIR wherever it accepts a folder, with the same results. A
re-run reads only new or changed files and drops deleted ones; files that cannot be used are listed
(exit status 1) and remembered, so they are not read again until they change.
"""

from __future__ import annotations

from clamp2.cli import interrupt_in_one_line

interrupt_in_one_line()  # before torch loads: Ctrl-C is one line, never a traceback

import sys

from clamp2.cli import ArgumentParser
from clamp2.files import output_problem
from clamp2.search.feature_store import FeatureError, build_index, report_problems


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("features", help="folder of .npy features (the files directly in it)")
    parser.add_argument("index_dir", help="folder for the index (created, or updated if it holds one)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar (shown only for long runs)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    problem = output_problem(args.index_dir, folder=True, what="index")
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    try:
        update = build_index(args.features, args.index_dir, progress=not args.no_progress)
    except FeatureError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a full disk or quota, a read-only file system: the previous generation is kept
        print(f"error: cannot write the index in {args.index_dir}: {error.strerror or error}; an earlier index there "
              "is kept: free space and run the same command again", file=sys.stderr)
        return 2
    status = report_problems(update.skipped)
    print(update.summary())
    return status


if __name__ == "__main__":
    sys.exit(main())
