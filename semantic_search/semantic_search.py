"""Top-K most similar features to one query feature (cosine similarity), as the reference prints them.

    python semantic_search/semantic_search.py QUERY.npy FEATURES [--top_k 10] [--device cpu|cuda] [--backend exact|faiss]

QUERY.npy is a global feature ([1, D], e.g. from code/extract_clamp2.py --normalize); FEATURES is a
folder of such files (keys: file names up to the first '.') or an index from build_index.py. Prints
``Top K similar items:`` and one ``key score`` line per item, best first; equal scores are ordered
by key and K is capped at the number of features. Unusable feature files are skipped and listed on
stderr (exit status 1); a bad query, folder or option is a one-line error (exit status 2).
"""

from __future__ import annotations

from clamp2.cli import interrupt_in_one_line

interrupt_in_one_line()  # before torch loads: Ctrl-C is one line, never a traceback

import sys

from clamp2.cli import ArgumentParser
from clamp2.search.feature_store import FeatureError, read_features, read_query, report_problems, unique_by_key
from clamp2.search.arguments import add_compute_arguments, resolve_compute_arguments


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("query_file", help="query feature file (.npy, shape [1, D])")
    parser.add_argument("features_folder", help="folder of .npy features, or an index made by build_index.py")
    parser.add_argument("--top_k", type=int, default=10, help="number of items to print (default: 10)")
    parser.add_argument("--backend", choices=("exact", "faiss"), default="exact",
                        help="candidate search: exact matrix products, or a flat faiss index (same results)")
    add_compute_arguments(parser)
    args = parser.parse_args(argv)
    if args.top_k < 0:
        parser.error(f"--top_k must be 0 or more, got {args.top_k}")
    return resolve_compute_arguments(args)


def main(argv=None) -> int:
    args = parse_args(argv)
    from clamp2.search.retrieval import Searcher, format_search  # torch: only once the arguments are parsed

    try:
        query = read_query(args.query_file)
        features = read_features(args.features_folder, progress=not args.no_progress)
        keyed, warnings = unique_by_key(features)
        if keyed.dim != query.shape[0]:
            raise FeatureError(f"{args.query_file} has dimension {query.shape[0]}, "
                               f"the features in {args.features_folder} {keyed.dim}")
        searcher = Searcher(keyed.keys, keyed.matrix, norms=keyed.norms, device=args.device,
                            backend=args.backend, memory_mb=args.memory_mb)
        hits = searcher.top_k(query, args.top_k, progress=not args.no_progress)
    except (FeatureError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("\n".join(format_search(hits)))
    return report_problems(features.skipped, warnings)


if __name__ == "__main__":
    sys.exit(main())
