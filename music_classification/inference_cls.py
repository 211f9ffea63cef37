"""Classify feature files with a probe trained by train_cls.py; writes {feature_path: label} as JSON.

    python music_classification/inference_cls.py features/ predictions.json --weights probe.pth
    python music_classification/inference_cls.py features/ predictions.json --weights probe.pth --evaluate
    python music_classification/inference_cls.py probe.pth features/ predictions.json   # CLaMP 3's argument order

FEATURES is a folder (searched recursively for .npy) or one .npy file: per-position [1, L, D] or
global [1, D] features of the size the probe was trained on. Files are classified one at a time, as
the reference does; --batch_size N classifies padded, masked batches, whose probabilities agree with
one-by-one classification to float32 rounding.
--evaluate also reads each file's true label from its name (up to the first `_`) and writes
accuracy, macro-F1, per-class scores and a confusion matrix to --report_dir; files whose label the
probe never saw are listed and not scored. Exit status: 0 done, 1 some files skipped or not
scored (listed with reasons), 2 usage error (no files, missing or foreign weights).
"""

from __future__ import annotations

from clamp2.cli import interrupt_in_one_line

interrupt_in_one_line()  # before torch loads: Ctrl-C is one line, never a traceback

import sys

from clamp2.cli import ArgumentParser


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__,
                            usage="%(prog)s FEATURES OUTPUT_FILE --weights WEIGHTS [options]\n"
                                  "       %(prog)s WEIGHTS FEATURES OUTPUT_FILE [options]")
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="folder of .npy feature files (searched recursively) or one .npy file, and the JSON "
                             "file for {feature_path: label}; the CLaMP 3 reference's order WEIGHTS FEATURES "
                             "OUTPUT_FILE (no --weights) is accepted too")
    parser.add_argument("--weights", default=None, help="probe checkpoint written by train_cls.py")
    parser.add_argument("--batch_size", type=int, default=1,
                        help="files per batch (1: the reference's labels exactly); larger batches are faster and agree "
                             "to float32 rounding (a label can differ only where two classes are that close)")
    parser.add_argument("--evaluate", action="store_true",
                        help="score the predictions against the labels in the file names and write a report")
    parser.add_argument("--report_dir", default=None, help="report folder of --evaluate (default: <output>_report)")
    parser.add_argument("--cache_gb", type=float, default=4.0,
                        help="keep the features in memory between checking and classifying up to this size (4)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if len(args.paths) == 3 and args.weights is None:  # classification/inference_cls.py <weights> <folder> <json>
        args.weights, args.features, args.output_file = args.paths
    elif len(args.paths) == 2 and args.weights is not None:
        args.features, args.output_file = args.paths
    else:
        parser.error("give FEATURES OUTPUT_FILE --weights WEIGHTS, or WEIGHTS FEATURES OUTPUT_FILE")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from clamp2.probe.commands import inference_command  # torch loads only once the arguments are parsed

    return inference_command(args)


if __name__ == "__main__":
    sys.exit(main())
