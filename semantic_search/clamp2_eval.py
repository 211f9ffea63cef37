"""Retrieval metrics (MRR, Hit@K) straight from raw files: queries and references paired by key.

    python semantic_search/clamp2_eval.py texts/ music/            # .txt descriptions → their music
    python semantic_search/clamp2_eval.py abc/ midi/ --ranks ranks.jsonl --weights weights_clamp2_....pth

Each side is a folder of raw files (music or .txt, searched recursively, converted as the batch
pipeline converts them, encoded through the feature cache), a folder of .npy features, or an index.
A query and a reference are paired by key (file name up to the first '.'); only keys on both sides
take part; each query's references are ranked by cosine similarity exactly as
semantic_search_metrics.py ranks them, and the metrics are printed the same way (``MRR: x``...).
--ranks writes each query's key, the rank of its true match and its top 10. Exit status: 0 ok,
1 some files could not be used (listed), 2 usage or model error.
"""

from __future__ import annotations

from clamp2.cli import interrupt_in_one_line

interrupt_in_one_line()  # before torch loads: Ctrl-C is one line, never a traceback

import json
import sys
from pathlib import Path

from clamp2.api import add_model_arguments, clamp2_from_args
from clamp2.cli import ArgumentParser, fail_usage, load_script_config
from clamp2.files import not_found, output_problem, write_text_or_say
from clamp2.progress import plural


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("query_folder", type=Path, help="queries: raw files, .npy features or an index")
    parser.add_argument("reference_folder", type=Path, help="references: raw files, .npy features or an index")
    parser.add_argument("--ranks", type=Path, default=None, help="write one JSON line per query (key, rank, top 10)")
    add_model_arguments(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # torch loads only once the arguments are parsed: --help and usage errors answer at once.
    from clamp2.search.raw_files import lazy_model, load_collection, one_per_key
    from clamp2.search.retrieval import format_metrics, rank_true_matches

    for folder in (args.query_folder, args.reference_folder):
        if problem := not_found(folder):
            fail_usage(problem)
    # Before the model loads and both folders are encoded: a --ranks file that cannot be written was said at the end.
    if args.ranks and (problem := output_problem(args.ranks, folder=False, what="ranks")):
        fail_usage(problem)
    cfg = load_script_config(__file__)
    model = lazy_model(lambda: clamp2_from_args(args, cfg))
    try:
        sides = [load_collection(folder, model, progress=not args.no_progress)
                 for folder in (args.query_folder, args.reference_folder)]
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    failures = [item for side in sides for item in side.failures]
    for name, reason in failures:
        print(f"failed: {name}: {reason}", file=sys.stderr)
    sides = [one_per_key(side, folder) for folder, side in zip((args.query_folder, args.reference_folder), sides)]
    for folder, side in zip((args.query_folder, args.reference_folder), sides):
        for warning in side.warnings:
            print(warning, file=sys.stderr)
        if not side.keys:
            fail_usage(f"no usable file in {folder}")
    queries, references = sides
    try:
        result = rank_true_matches(queries.keys, queries.matrix, references.keys, references.matrix,
                                   top=10 if args.ranks else 0, device=args.device or "cpu")
    except ValueError as exc:
        fail_usage(str(exc))
    for line in format_metrics(result.metrics):
        print(line)
    if args.ranks:
        lines = [json.dumps({"key": key, "rank": int(rank), "top": [[k, float(s)] for k, s in top]}, ensure_ascii=False)
                 for key, rank, top in zip(result.keys, result.ranks, result.top)]
        if not write_text_or_say(args.ranks, "\n".join(lines) + "\n"):
            return 2
    print(f"clamp2_eval: {plural(len(result.keys), 'common key')} ({len(queries.keys)} queries, "
          f"{len(references.keys)} references), "
          f"{sum(s.computed for s in sides)} encoded, {sum(s.cached for s in sides)} from cache, {len(failures)} failed",
          file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
