"""Classify feature files with a probe trained by train_cls.py; writes {feature_path: label} as JSON.

    python music_classification/inference_cls.py features/ predictions.json --weights probe.pth
    python music_classification/inference_cls.py features/ predictions.json --weights probe.pth --evaluate

FEATURES is a folder (searched recursively for .npy) or one .npy file: per-position [1, L, D] or
global [1, D] features of the size the probe was trained on. Files are classified in padded,
masked batches (--batch_size), which give exactly the labels of one-by-one classification.
--evaluate also reads each file's true label from its name (up to the first `_`) and writes
accuracy, macro-F1, per-class scores and a confusion matrix to --report_dir; files whose label the
probe never saw are listed and not scored. Exit status: 0 done, 1 some files skipped or not
scored (listed with reasons), 2 usage error (no files, missing or foreign weights).
"""

from __future__ import annotations

import sys

from clamp2.cli import ArgumentParser
from clamp2.probe.commands import inference_command


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("features", help="folder of .npy feature files (searched recursively) or one .npy file")
    parser.add_argument("output_file", help="JSON file for {feature_path: label}")
    parser.add_argument("--weights", required=True, help="probe checkpoint written by train_cls.py")
    parser.add_argument("--batch_size", type=int, default=16, help="files per batch (16); labels do not depend on it")
    parser.add_argument("--evaluate", action="store_true",
                        help="score the predictions against the labels in the file names and write a report")
    parser.add_argument("--report_dir", default=None, help="report folder of --evaluate (default: <output>_report)")
    parser.add_argument("--cache_gb", type=float, default=4.0,
                        help="keep the features in memory between checking and classifying up to this size (4)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    return inference_command(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
