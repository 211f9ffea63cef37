"""CLaMP 3 retrieval metrics: MRR and Hit@1/10/100 of each query's own reference (docs/search.md).

    python semantic_search/clamp3_eval.py texts/ audio/                     # text → music retrieval
    python semantic_search/clamp3_eval.py txt_features/ mid_features/ --output_dir results/

Each side is a folder of one modality (audio, MIDI, MusicXML, ABC, MTF, .txt or images, detected
from the extensions, sub-folders included) encoded by CLaMP 3 through the feature cache, or a folder
of .npy features. Keys are the path relative to the folder + '/' + the file name up to its first '.';
every key must be on both sides (else unmatched_files.jsonl and exit 1). Every query feature (several
may share a key) ranks the references of all keys by float32 cosine (ties go to its true match);
metrics are averaged over query features; retrieval_ranks.jsonl lists each rank, best first.
Exit status: 0 ok, 1 no result or some files could not be used (listed), 2 usage or model error.
"""

from __future__ import annotations

from clamp2.cli import interrupt_in_one_line

interrupt_in_one_line()  # before torch loads: Ctrl-C is one line, never a traceback

import sys

from clamp2.cli import ArgumentParser, fail_usage, load_script_config
from clamp2.files import not_found, output_problem
from clamp2.search.clamp3 import add_arguments


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("query_dir", help="queries: raw files of one modality or .npy features")
    parser.add_argument("ref_dir", help="references: raw files of one modality or .npy features")
    add_arguments(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from clamp2.search import clamp3

    args = parse_args(argv)
    for folder in (args.query_dir, args.ref_dir):
        if problem := not_found(folder):
            fail_usage(problem)
    # Before the model loads and both sides are encoded: a read-only --output_dir was said only at the end.
    if problem := output_problem(args.output_dir, folder=True):
        fail_usage(problem)
    family = clamp3.family_from_args(args, load_script_config(__file__, report=False))

    def work() -> int:
        sides = clamp3.load_sides(family, ((args.query_dir, "query"), (args.ref_dir, "reference")), not args.no_progress,
                                   name_feature_folders=True)
        print("\n".join(clamp3.evaluate(*sides, args.output_dir, device=args.device or "cpu")))
        return clamp3.exit_status(sides)

    return clamp3.run_command(work)


if __name__ == "__main__":
    sys.exit(main())
