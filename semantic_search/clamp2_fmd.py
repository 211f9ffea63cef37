"""Fréchet Music Distance (FMD) between two sets of global features, as the published FMD defines it.

    python semantic_search/clamp2_fmd.py REF_FEATURES TEST_FEATURES [--estimator mle|ledoit_wolf|oas|shrinkage|bootstrap]
    python semantic_search/clamp2_fmd.py REF_FEATURES TEST_FEATURES --inf [--steps 25] [--min_n 500] [--seed 0]
    python semantic_search/clamp2_fmd.py REF_FEATURES TEST_FEATURES --per_file per_file.jsonl

Each side is a folder of [1, D] .npy features or an index from build_index.py; every usable file
counts (at least 2 per side). Each set becomes a Gaussian (float64 mean and covariance by the chosen
estimator: np.cov for mle, scikit-learn's LedoitWolf/OAS/ShrunkCovariance(0.1), or the average over
1,000 seeded bootstrap resamples) and the Fréchet distance with scipy.linalg.sqrtm is printed as
``FMD (<estimator>) between '<ref>' and '<test>': x.xxxx`` (a value below 0, which only rounding
gives, prints as 0.0000).

--inf prints FMD-inf: FMD of --steps test samples (drawn with replacement, sizes --min_n .. N) fitted
linearly against 1/n; the intercept, slope and R^2. --per_file FILE writes one JSON line per test
file: its distance to the reference set (its vector as the mean, the reference covariance).
Unusable files are skipped and listed (exit 1); too few vectors, different dimensions or a
covariance with no real square root are one-line errors (exit 2).
"""

from __future__ import annotations

from clamp2.cli import interrupt_in_one_line

interrupt_in_one_line()  # before torch loads: Ctrl-C is one line, never a traceback

import json
import sys

from clamp2.cli import ArgumentParser, fail_usage
from clamp2.search.feature_store import FeatureError, read_features, report_problems
from clamp2.files import output_problem, write_text_or_say
from clamp2.search.fmd import (ESTIMATORS, FMDError, check_inf_arguments, estimate_gaussian, fmd_inf, frechet_distance,
                        per_file_fmd)
from clamp2.progress import progress_bar


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("reference", help="reference features: folder of .npy files or an index")
    parser.add_argument("test", help="test features: folder of .npy files or an index")
    parser.add_argument("--estimator", choices=ESTIMATORS, default="mle", help="covariance estimator (default: mle)")
    parser.add_argument("--inf", action="store_true", help="also print FMD-inf (extrapolation to infinite n)")
    parser.add_argument("--steps", type=int, default=25, help="FMD-inf: number of sample sizes (default: 25)")
    parser.add_argument("--min_n", type=int, default=500, help="FMD-inf: smallest sample size (default: 500)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap and FMD-inf samples (default: 0)")
    parser.add_argument("--per_file", default=None, metavar="FILE",
                        help="write each test file's FMD to the reference set (JSON lines)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    # Before the features are read and the Gaussians fitted: a --per_file output that cannot be written was said
    # only at the end.
    if args.per_file and (problem := output_problem(args.per_file, folder=False, what="per-file FMD")):
        fail_usage(problem)
    warned: set[str] = set()

    def warn(message: str) -> None:
        if message not in warned:
            warned.add(message)
            print(f"warning: {message}", file=sys.stderr)

    try:
        reference = read_features(args.reference, progress=not args.no_progress)
        test = read_features(args.test, progress=not args.no_progress)
        if reference.dim != test.dim:
            raise FeatureError(f"the features in {args.reference} have dimension {reference.dim}, "
                               f"those in {args.test} {test.dim}")
        for features in (reference, test):
            if len(features) < 2:
                raise FeatureError(f"{features.source}: a covariance needs at least 2 usable feature files, "
                                   f"found {len(features)}")
        if args.inf:
            check_inf_arguments(args.steps, args.min_n, len(test))
        ref_gaussian = estimate_gaussian(reference.matrix, args.estimator, seed=args.seed)
        test_gaussian = estimate_gaussian(test.matrix, args.estimator, seed=args.seed)
        distance = frechet_distance(ref_gaussian, test_gaussian, on_singular=warn)
        # A squared distance: below 0 only by rounding (identical sets give -1e-5 .. -1e-12), printed as 0.
        lines = [f"FMD ({args.estimator}) between '{args.reference}' and '{args.test}': "
                 f"{distance if distance > 0 else 0.0:.4f}"]
        if args.inf:
            with progress_bar(total=args.steps, desc="FMD-inf", unit="sample", enabled=not args.no_progress) as bar:
                result = fmd_inf(ref_gaussian, test.matrix, steps=args.steps, min_n=args.min_n, seed=args.seed,
                                 on_singular=warn, progress=bar.update)
            lines.append(f"FMD-inf ({args.estimator} reference) between '{args.reference}' and '{args.test}': "
                         f"{result.score:.4f} (R^2 {result.r2:.4f}, slope {result.slope:.4f}, "
                         f"{args.steps} sample sizes from {args.min_n} to {len(test)})")
        if args.per_file:
            distances = per_file_fmd(ref_gaussian, test.matrix, on_singular=warn)
            if not write_text_or_say(args.per_file, "".join(
                    json.dumps({"key": key, "file": name, "fmd": float(value)}, ensure_ascii=False) + "\n"
                    for key, name, value in zip(test.keys, test.names, distances))):
                return 2
    except (FeatureError, FMDError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return report_problems(reference.skipped + test.skipped)


if __name__ == "__main__":
    sys.exit(main())
