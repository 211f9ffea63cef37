"""Retrieval metrics (MRR, Hit@1, Hit@10, Hit@100) of query features against reference features.

    python semantic_search/semantic_search_metrics.py QUERY_FEATURES REF_FEATURES [--ranks ranks.jsonl] [--device cpu|cuda]

Each side is a folder of [1, D] .npy features or an index from build_index.py; a query and a
reference are paired by key (file name up to the first '.'), and only keys present on both sides
take part. For each query the references are ranked by cosine similarity (float32, a tie counts in
favour of the true match); the four metrics are printed as the reference prints them (``MRR: x``
with ``round(x, 4)``). Exact at any size: fast blocked products, near-ties re-decided with the
reference's own per-pair computation.

--ranks FILE writes one JSON line per query: ``{"key", "rank", "top": [[key, score], ...]}`` (its
true match's rank and its 10 best references). Unusable files are skipped and listed (exit 1);
no common key, a dimension mismatch or a bad option is a one-line error (exit 2).
"""

from __future__ import annotations

from clamp2.cli import interrupt_in_one_line

interrupt_in_one_line()  # before torch loads: Ctrl-C is one line, never a traceback

import json
import sys

from clamp2.cli import ArgumentParser, fail_usage
from clamp2.search.feature_store import FeatureError, read_features, report_problems, unique_by_key
from clamp2.files import output_problem, write_text_or_say
from clamp2.search.arguments import add_compute_arguments, resolve_compute_arguments

TOP_IN_RANKS_FILE = 10


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("query_folder", help="query features: folder of .npy files or an index")
    parser.add_argument("reference_folder", help="reference features: folder of .npy files or an index")
    parser.add_argument("--ranks", default=None, metavar="FILE",
                        help="write each query's key, true-match rank and top-10 references (JSON lines)")
    add_compute_arguments(parser)
    return resolve_compute_arguments(parser.parse_args(argv))


def main(argv=None) -> int:
    args = parse_args(argv)
    from clamp2.search.retrieval import format_metrics, rank_true_matches  # torch: only once the arguments are parsed

    # Before the features are read and ranked: a --ranks file that cannot be written was said only at the end.
    if args.ranks and (problem := output_problem(args.ranks, folder=False, what="ranks")):
        fail_usage(problem)
    progress = not args.no_progress
    try:
        queries = read_features(args.query_folder, progress=progress)
        references = read_features(args.reference_folder, progress=progress)
        keyed_queries, warnings = unique_by_key(queries)
        keyed_references, more_warnings = unique_by_key(references)
        if keyed_queries.dim != keyed_references.dim:
            raise FeatureError(f"the features in {args.query_folder} have dimension {keyed_queries.dim}, "
                               f"those in {args.reference_folder} {keyed_references.dim}")
        if not set(keyed_queries.keys) & set(keyed_references.keys):
            raise FeatureError(f"no key is in both {args.query_folder} and {args.reference_folder} "
                               f"(keys are file names up to the first '.', e.g. {keyed_queries.keys[0]!r} "
                               f"and {keyed_references.keys[0]!r})")
        result = rank_true_matches(keyed_queries.keys, keyed_queries.matrix, keyed_references.keys,
                                   keyed_references.matrix, query_norms=keyed_queries.norms,
                                   ref_norms=keyed_references.norms, device=args.device,
                                   top=TOP_IN_RANKS_FILE if args.ranks else 0, memory_mb=args.memory_mb,
                                   progress=progress)
    except (FeatureError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("\n".join(format_metrics(result.metrics)))
    if args.ranks:
        lines = (json.dumps({"key": key, "rank": int(rank), "top": [[k, s] for k, s in top]}, ensure_ascii=False)
                 for key, rank, top in zip(result.keys, result.ranks, result.top))
        if not write_text_or_say(args.ranks, "".join(line + "\n" for line in lines)):
            return 2
    return report_problems(queries.skipped + references.skipped, warnings + more_warnings)


if __name__ == "__main__":
    sys.exit(main())
