"""Zero-shot classification of a folder of music by text prompts, straight from raw files.

    python semantic_search/zero_shot.py FOLDER --labels jig,reel,waltz [--prompt "a {} tune"]
    python semantic_search/zero_shot.py FOLDER --labels_file labels.txt --output predictions.json \\
        --confusion_png confusion.png --weights weights_clamp2_....pth --text_model xlm-roberta-base
    python semantic_search/zero_shot.py AUDIO_FOLDER --labels jig,reel,waltz --model clamp3 --variant saas

Every music file under FOLDER (MusicXML, MIDI, standard or interleaved ABC, MTF) is converted as the
batch pipeline converts it and encoded through the feature cache (``--cache DIR``, ``--no_cache``);
each gets the label whose prompt (the template with ``{}`` replaced by the label) has the most
similar CLaMP 2 text feature (cosine). ``{relative path: label}`` is written as JSON to
``--output``. When file names start with a label and ``_`` (``reel_0042.mid``) the accuracy,
macro-F1 and confusion matrix over those files are printed (``--confusion_png`` saves the matrix).
``--weights`` and ``--text_model`` are those of ``code/extract_clamp2.py`` (defaults from
``code/config.py``; ``--weights`` also takes a hub id such as sander-wood/clamp2). ``--model clamp3``
classifies with CLaMP 3 instead (``--variant saas|c2``, ``--mert`` for audio): audio files
(.wav/.mp3/.flac/.ogg) are then classified too. Files that cannot
be converted are listed with their reasons. Exit status: 0 all files classified, 1 some failed,
2 usage or model error.
"""

from __future__ import annotations

from clamp2.cli import interrupt_in_one_line

interrupt_in_one_line()  # before torch loads: Ctrl-C is one line, never a traceback

import json
import sys
from collections import Counter
from pathlib import Path

from clamp2.api import CLAMP2_WEIGHTS_HELP, add_model_arguments, clamp2_from_args
from clamp2.cli import ArgumentParser, fail_usage, load_script_config
from clamp2.files import input_problem, output_problem, write_text_or_say
from clamp2.search.clamp3 import CLAMP3_WEIGHTS_DEFAULT


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("folder", type=Path, help="folder searched recursively for music files")
    labels = parser.add_mutually_exclusive_group(required=True)
    labels.add_argument("--labels", help="comma-separated labels, e.g. jig,reel,waltz")
    labels.add_argument("--labels_file", type=Path,
                        help="a text file with one label per line, or 'label = its own prompt' per line")
    parser.add_argument("--prompt", default="{}", help='prompt template, {} is replaced by the label (default "{}")')
    parser.add_argument("--output", type=Path, default=Path("zero_shot.json"),
                        help="JSON file of {relative path: label} (default zero_shot.json)")
    parser.add_argument("--confusion_png", type=Path, default=None,
                        help="save the confusion matrix as a PNG (when file names carry labels)")
    parser.add_argument("--model", choices=("clamp2", "clamp3"), default="clamp2",
                        help="model family (default clamp2; clamp3 also classifies audio)")
    parser.add_argument("--variant", choices=("saas", "c2"), default=None,
                        help="CLaMP 3 weights: saas (best for audio) or c2 (sheet music/MIDI); default config.py's")
    parser.add_argument("--mert", default=None, help="MERT-v1-95M folder or hub id for CLaMP 3's audio inputs")
    add_model_arguments(parser, weights_help=f"{CLAMP2_WEIGHTS_HELP}; with --model clamp3, a CLaMP 3 checkpoint "
                                             f"file, folder or hub id (default: {CLAMP3_WEIGHTS_DEFAULT})")
    return parser.parse_args(argv)


def load_model(args, cfg):
    if args.model == "clamp3":
        from clamp2.search.clamp3 import CommandError, clamp3_from_args

        try:
            return clamp3_from_args(args, cfg)
        except CommandError as exc:
            raise ValueError(str(exc).removeprefix("Error: ")) from None
    return clamp2_from_args(args, cfg)


def main(argv=None) -> int:
    from clamp2.search import zero_shot

    args = parse_args(argv)
    try:
        if args.labels:
            labels, own_prompts = zero_shot.parse_labels(args.labels), {}
        else:
            labels, own_prompts = zero_shot.read_label_prompts(args.labels_file)
        prompts = zero_shot.prompts(labels, args.prompt, own_prompts)
    except (OSError, ValueError) as exc:
        fail_usage(str(exc))
    # Before the model loads and every file is encoded: a folder that cannot be listed (chmod 000 or 300) gave an
    # empty zero_shot.json and exit 1; an output that cannot be written was said only after all the encoding.
    problems = [input_problem(args.folder, "folder"), output_problem(args.output, folder=False)]
    if args.confusion_png:
        problems.append(output_problem(args.confusion_png, folder=False, what="confusion PNG"))
    for problem in problems:
        if problem:
            fail_usage(problem)
    cfg = load_script_config(__file__)
    try:
        model = load_model(args, cfg)
        label_features = model.encode_text(prompts)
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    encoded = model.encode_folder(args.folder, include_text=False, progress=not args.no_progress)
    for name, (_, reason) in zip(encoded.failed_names, encoded.failures):
        print(f"failed: {name}: {' '.join(reason.split())}", file=sys.stderr)
    if not len(encoded) and not encoded.failures:
        audio = "/.wav/.mp3/.flac/.ogg" if args.model == "clamp3" else ""
        fail_usage(f"no music files (.xml/.mxl/.musicxml/.mid/.midi/.abc/.mtf{audio}) under {args.folder}")

    predictions = {}
    if len(encoded):
        best, _ = zero_shot.predict(encoded.features, label_features)
        predictions = {name: labels[i] for name, i in zip(encoded.names, best)}
    if not write_text_or_say(args.output, json.dumps(predictions, indent=1, ensure_ascii=False) + "\n"):
        return 2

    counts = Counter(predictions.values())
    print(f"zero_shot: {len(predictions)} files classified ({encoded.computed} encoded, {encoded.cached} from cache), "
          f"{len(encoded.failures)} failed; predicted " + ", ".join(f"{label} {counts[label]}" for label in labels)
          + f" -> {args.output}")
    named = [(name, zero_shot.label_in_name(name, labels)) for name in predictions]
    truth = [(name, label) for name, label in named if label is not None]
    if truth:
        scores = zero_shot.evaluate([label for _, label in truth], [predictions[name] for name, _ in truth], labels)
        print(f"accuracy {scores.accuracy:.4f}, macro-F1 {scores.macro_f1:.4f} over the {scores.count} of "
              f"{len(predictions)} files whose names start with a label")
        print(zero_shot.format_confusion(scores))
        if args.confusion_png:
            zero_shot.save_confusion_png(scores, args.confusion_png, title=args.folder.name or "zero-shot")
            print(f"confusion matrix saved to {args.confusion_png}")
    elif args.confusion_png:
        print("no file name starts with a label: no confusion matrix", file=sys.stderr)
    return 1 if encoded.failures else 0


if __name__ == "__main__":
    sys.exit(main())
