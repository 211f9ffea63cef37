"""Search a collection with one query, straight from raw files (or features, or an index).

    python semantic_search/clamp2_search.py "a lively jig in 6/8" my_midi_folder/ --top_k 10
    python semantic_search/clamp2_search.py query.txt music/ --weights weights_clamp2_....pth --text_model xlm-roberta-base
    python semantic_search/clamp2_search.py tune.mid music/ --json          # music → music
    python semantic_search/clamp2_search.py query.npy features/             # features, as semantic_search.py

QUERY is a sentence, a .txt file, a music file (MusicXML, MIDI, standard or interleaved ABC, MTF) or
a .npy feature. TARGET is a folder of raw music/text files (searched recursively, converted as the
batch pipeline converts them and encoded through the feature cache: the first run extracts with a
progress bar, a second run on the same files does no model work), a folder of [1, D] .npy features
(not both in one folder), or an index from build_index.py. Prints rank, cosine similarity and path
(the key, for features or an index), best first (equal scores ordered by path; --json for
machines). --weights/--text_model as code/extract_clamp2.py (defaults from code/config.py; --weights
also takes a hub id). Exit status: 0 ok, 1 some target files could not be used (listed), 2 usage or
model error.
"""

from __future__ import annotations

from clamp2.cli import interrupt_in_one_line

interrupt_in_one_line()  # before torch loads: Ctrl-C is one line, never a traceback

import json
import sys
from pathlib import Path

from clamp2.api import add_model_arguments, clamp2_from_args
from clamp2.cli import ArgumentParser, fail_usage, load_script_config
from clamp2.files import not_found


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("query", help="a sentence, a .txt file, a music file or a .npy feature")
    parser.add_argument("target", type=Path, help="folder of raw music/text files, folder of .npy features, or an index")
    parser.add_argument("--top_k", type=int, default=10, help="results to print (default 10; capped at the collection size)")
    parser.add_argument("--json", action="store_true", help="print a JSON list of {rank, score, path}")
    parser.add_argument("--no_text", action="store_true", help="search only the music files of a raw folder")
    add_model_arguments(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # torch loads only once the arguments are parsed: --help and usage errors answer at once.
    from clamp2.search.raw_files import encode_query, lazy_model, load_collection
    from clamp2.search.retrieval import top_k

    if args.top_k < 1:
        fail_usage(f"--top_k must be at least 1, got {args.top_k}")
    if problem := not_found(args.target, "target"):
        fail_usage(problem)
    cfg = load_script_config(__file__)
    model = lazy_model(lambda: clamp2_from_args(args, cfg))
    try:
        query, described = encode_query(args.query, model)
        collection = load_collection(args.target, model, include_text=not args.no_text, progress=not args.no_progress)
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    for name, reason in collection.failures:
        print(f"failed: {name}: {reason}", file=sys.stderr)
    if not len(collection.names):
        fail_usage(f"nothing to search in {args.target}")
    if query.shape[0] != collection.matrix.shape[1]:
        fail_usage(f"the query has dimension {query.shape[0]}, the target {collection.matrix.shape[1]}")
    try:
        # Rows are searched by name, so equal scores come out in path order.
        hits = top_k(query[None, :], collection.names, collection.matrix, args.top_k, device=args.device or "cpu")[0]
    except ValueError as exc:
        fail_usage(str(exc))
    results = [{"rank": rank, "score": round(float(score), 6), "path": name} for rank, (name, score) in enumerate(hits, 1)]
    if args.json:
        print(json.dumps(results, indent=1, ensure_ascii=False))
    else:
        width = len(str(len(results)))
        for item in results:
            print(f"{item['rank']:>{width}}  {item['score']:.4f}  {item['path']}")
    source = f"{collection.computed} encoded, {collection.cached} from cache" if collection.computed or collection.cached \
        else "features"
    print(f"clamp2_search: {described} against {len(collection.names)} items of {args.target} ({source}), "
          f"{len(collection.failures)} failed", file=sys.stderr)
    return 1 if collection.failures else 0


if __name__ == "__main__":
    sys.exit(main())
