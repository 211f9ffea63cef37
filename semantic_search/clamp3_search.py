"""CLaMP 3 search: the references most similar to one query file, any modality to any (docs/search.md).

    python semantic_search/clamp3_search.py query.txt music_folder/ --top_k 10
    python semantic_search/clamp3_search.py photo.jpg audio_folder/          # image → caption → music
    python semantic_search/clamp3_search.py tune.mid audio_folder/ --json
    python semantic_search/clamp3_search.py query.npy features/              # features, as the original

QUERY is one file: text (.txt), an image (.png/.jpg/.jpeg: captioned by BLIP, the caption printed
and searched as text), audio, MIDI, MusicXML, ABC, MTF, or a .npy feature. REF_DIR is a folder of one
modality (sub-folders included), encoded by CLaMP 3 through the feature cache (a second run does no
model work), or a folder of .npy features. Prints ``Top K results among N candidates:`` then
``key similarity`` (key: file name up to its first '.'; float32 cosine rounded to 4 places; equal
scores by key); --json prints [{rank, key, path, score}] instead. Zero-shot classification: a music
query against a folder of one .txt per label.
Exit status: 0 ok, 1 no result or some files could not be used (listed), 2 usage or model error.
"""

from __future__ import annotations

from clamp2.cli import interrupt_in_one_line

interrupt_in_one_line()  # before torch loads: Ctrl-C is one line, never a traceback

import json
import sys
from pathlib import Path

from clamp2.cli import ArgumentParser, fail_usage, load_script_config
from clamp2.files import not_found
from clamp2.search.clamp3 import add_arguments


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("query_file", help="one query file of any supported modality, or a .npy feature")
    parser.add_argument("ref_dir", help="references: raw files of one modality or .npy features")
    parser.add_argument("--top_k", type=int, default=10, help="results to print (default 10; capped at the references)")
    parser.add_argument("--json", action="store_true", help="print a JSON list of {rank, key, path, score}")
    add_arguments(parser, outputs=False)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    from clamp2.search import clamp3

    args = parse_args(argv)
    if args.top_k < 0:  # 0 prints the header alone, as the reference and semantic_search.py do
        fail_usage(f"--top_k must be 0 or more, got {args.top_k}")
    if problem := not_found(args.query_file, "query file", Path.is_file) or not_found(args.ref_dir):
        fail_usage(problem)
    family = clamp3.family_from_args(args, load_script_config(__file__, report=False))

    def work() -> int:
        query, references = sides = clamp3.load_sides(family, ((args.query_file, "query"), (args.ref_dir, "reference")),
                                                      not args.no_progress, announce=not args.json)
        if not len(query):
            raise clamp3.CommandError(f"Error: the query {args.query_file} could not be encoded")
        hits, warnings, candidates = clamp3.search(query.matrix[0], references, args.top_k, device=args.device or "cpu")
        for warning in warnings:
            print(warning, file=sys.stderr)
        if args.json:
            result = [{"rank": rank, "key": key, "path": references.path(references.relative.index(relative)),
                       "score": score} for rank, (key, relative, score) in enumerate(hits, 1)]
            if query.captions:
                result = {"caption": query.captions[0][1], "results": result}
            print(json.dumps(result, indent=1, ensure_ascii=False))
        else:
            print("\n".join(clamp3.search_lines(hits, candidates)))
        return clamp3.exit_status(sides)

    return clamp3.run_command(work)


if __name__ == "__main__":
    sys.exit(main())
