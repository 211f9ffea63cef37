"""CLaMP 2 score: cosine similarity between the mean feature vectors of two folders.

    python semantic_search/clamp2_score.py REF_FEATURES TEST_FEATURES [--pairwise]

Every usable .npy file of each folder (or every row of an index from build_index.py) is averaged in
float32 in the folder's listing order, as the reference does; prints
``Cosine similarity between '<ref>' and '<test>': x.xxxx``.

--pairwise also scores the same-key pairs (keys: file names up to the first '.'): their count, mean,
standard deviation and minimum cosine similarity, and the 5 lowest keys. Unusable files are skipped
and listed (exit 1); a dimension mismatch or a missing folder is a one-line error (exit 2).
"""

from __future__ import annotations

from clamp2.cli import interrupt_in_one_line

interrupt_in_one_line()  # before torch loads: Ctrl-C is one line, never a traceback

import sys

from clamp2.cli import ArgumentParser
from clamp2.search.feature_store import FeatureError, read_features, report_problems, unique_by_key

LOWEST_KEYS = 5


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("reference", help="reference features: folder of .npy files or an index")
    parser.add_argument("test", help="test features: folder of .npy files or an index")
    parser.add_argument("--pairwise", action="store_true",
                        help=f"also score same-key pairs (mean, std, min, {LOWEST_KEYS} lowest keys)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar (shown only for long runs)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # torch loads only once the arguments are parsed: --help and usage errors answer at once.
    from clamp2.search.retrieval import format_pairwise, format_score, mean_vector_cosine, pairwise_scores

    warnings: list[str] = []
    try:
        # The reference averages in os.listdir order; float32 sums depend on it.
        reference = read_features(args.reference, sort=False, progress=not args.no_progress)
        test = read_features(args.test, sort=False, progress=not args.no_progress)
        if reference.dim != test.dim:
            raise FeatureError(f"the features in {args.reference} have dimension {reference.dim}, "
                               f"those in {args.test} {test.dim}")
    except FeatureError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_score(args.reference, args.test, mean_vector_cosine(reference.matrix, test.matrix)))
    if args.pairwise:
        keyed = []
        for features in (reference, test):
            unique, found = unique_by_key(features.take(sorted(range(len(features)), key=features.names.__getitem__)))
            keyed.append(unique)
            warnings.extend(found)
        try:
            keys, scores = pairwise_scores(keyed[0].keys, keyed[0].matrix, keyed[1].keys, keyed[1].matrix)
        except ValueError as error:
            print(f"error: --pairwise: {error}", file=sys.stderr)
            return 2
        print("\n".join(format_pairwise(keys, scores, LOWEST_KEYS)))
    return report_problems(reference.skipped + test.skipped, warnings)


if __name__ == "__main__":
    sys.exit(main())
