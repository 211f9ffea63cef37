"""CLaMP 3 score: how close generated music is to references, file by file or as two groups (docs/search.md).

    python semantic_search/clamp3_score.py generated/ references/                  # pairwise, by key
    python semantic_search/clamp3_score.py generated/ references/ --group          # mean vs mean
    python semantic_search/clamp3_score.py gen_features/ ref_features/ --strict --output_dir results/

Each side is a folder of one modality (audio .wav/.mp3/.flac/.ogg, MIDI, MusicXML, ABC, MTF, .txt or
images, detected from the extensions, sub-folders included) encoded by CLaMP 3 through the feature
cache (a second run does no model work), or a folder of .npy features. Pairwise: keys are the path
relative to the folder + '/' + the file name up to its first '.' (so the folders mirror each other;
several queries may share a key: a.1.wav, a.2.wav); every query feature is scored against its key's
reference (float32 cosine) into pairwise_similarities.jsonl, best first. Unmatched keys go to
unmatched_files.jsonl and the run goes on with the common keys (--strict: stop, exit 1).
--group: cosine of the mean query feature and the mean reference feature.
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
    parser.add_argument("query_dir", help="queries (e.g. generated music): raw files of one modality or .npy")
    parser.add_argument("ref_dir", help="references: raw files of one modality or .npy features")
    parser.add_argument("--group", action="store_true", help="score the mean vectors instead of same-key pairs")
    parser.add_argument("--strict", action="store_true", help="stop (exit 1) when some key has no counterpart")
    add_arguments(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from clamp2.search import clamp3

    args = parse_args(argv)
    for folder in (args.query_dir, args.ref_dir):
        if problem := not_found(folder):
            fail_usage(problem)
    # Before the model loads and both sides are encoded: a read-only --output_dir was said only at the end.
    if not args.group and (problem := output_problem(args.output_dir, folder=True)):
        fail_usage(problem)
    family = clamp3.family_from_args(args, load_script_config(__file__, report=False))

    def work() -> int:
        sides = clamp3.load_sides(family, ((args.query_dir, "query"), (args.ref_dir, "reference")), not args.no_progress,
                                   name_feature_folders=True)
        if args.group:
            lines = clamp3.group_score(*sides)
        else:
            lines = clamp3.pairwise_score(*sides, args.output_dir, strict=args.strict)
        print("\n".join(lines))
        return clamp3.exit_status(sides)

    return clamp3.run_command(work)


if __name__ == "__main__":
    sys.exit(main())
