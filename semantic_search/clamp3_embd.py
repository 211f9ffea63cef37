"""CLaMP 3 features of a folder: one .npy per input file, in mirrored folders (docs/search.md).

    python semantic_search/clamp3_embd.py audio/ features/audio --get_global
    python semantic_search/clamp3_embd.py scores/ features/scores --get_global --variant c2
    python semantic_search/clamp3_embd.py photos/ features/photos --get_global   # BLIP captions → text

INPUT_DIR holds one modality (detected from the extensions, sub-folders included): text (.txt),
images (.png/.jpg/.jpeg, captioned by BLIP, each caption printed), sheet music (.xml/.musicxml/.mxl),
MIDI (.mid/.midi), audio (.wav/.mp3/.flac/.ogg, through MERT), ABC or MTF. Each file becomes
OUTPUT_DIR/<same sub-folder>/<name without its extension>.npy: [1, D] with --get_global, else the
per-position states [1, L, H]; inputs that would write the same .npy (a.mid and a.midi) fail, named.
Existing outputs are kept and their inputs skipped (a re-run resumes; one with other weights or flags is
refused, naming the difference: OUTPUT_DIR/extraction_settings.json; --overwrite encodes everything again;
.npy files in an OUTPUT_DIR inside INPUT_DIR, or equal to it, are outputs, never read as inputs);
features come through the content-hash cache, so inputs seen before (by any command) cost no model
work. Exit status: 0 ok, 1 some files could not be encoded (listed) or no modality, 2 usage or model error.
"""

from __future__ import annotations

from clamp2.cli import interrupt_in_one_line

interrupt_in_one_line()  # before torch loads: Ctrl-C is one line, never a traceback

import sys
from pathlib import Path

from clamp2.cli import ArgumentParser, fail_usage, load_script_config
from clamp2.files import not_found
from clamp2.search.clamp3 import add_arguments


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("input_dir", type=Path, help="folder of raw inputs of one modality (or one file)")
    parser.add_argument("output_dir", type=Path, help="folder for the .npy features (mirrors input_dir)")
    parser.add_argument("--get_global", action="store_true",
                        help="one global [1, D] feature per file (else per-position [1, L, H])")
    parser.add_argument("--overwrite", action="store_true",
                        help="encode every file again, also those with a feature in OUTPUT_DIR (needed to replace "
                             "features of other weights or flags)")
    add_arguments(parser, outputs=False)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    import numpy as np

    from clamp2.extraction.record import begin_record, drop_stale_features, finish_record
    from clamp2.files import atomic_path, finished_output, mirror_outputs, mirror_path, remove_partial_files_of
    from clamp2.search import clamp3

    args = parse_args(argv)
    if problem := not_found(args.input_dir, "input folder"):
        fail_usage(problem)
    family = clamp3.family_from_args(args, load_script_config(__file__, report=False))

    def work() -> int:
        found = clamp3.embedding_inputs_by_modality(args.input_dir, args.output_dir)
        modality, files = clamp3.detect_modality(args.input_dir, "input", found)
        if modality == clamp3.FEATURES:
            raise clamp3.CommandError(f"Error: {args.input_dir} holds .npy features already, not raw inputs")
        print(f"Detected input modality: {modality}")
        root = args.input_dir if args.input_dir.is_dir() else args.input_dir.parent
        outputs, collisions = mirror_outputs(files, root, args.output_dir, ".npy")
        remove_partial_files_of(outputs.values())  # a killed run's temporary files (a live writer's stay)
        for file, reason in collisions:
            print(f"failed: {file.relative_to(root)}: {reason}", file=sys.stderr)

        def settings():  # of the model only: one folder may hold the features of several modalities
            model = family.model()
            found = {"tool": "clamp3_embd", **model.feature_settings(per_position=not args.get_global)}
            try:  # what only this modality's features depend on (record.OPTIONAL_KEYS)
                if modality == "audio" and hasattr(model, "mert_identity"):
                    found["mert_sha256"] = model.mert_identity()
                elif modality == "img":
                    from clamp2.search.captions import BLIP_MODEL, folder_fingerprint, captioner_folder

                    found["captioner_sha256"] = folder_fingerprint(captioner_folder(args.captioner or BLIP_MODEL),
                                                                    None)
            except (ImportError, OSError, ValueError):
                pass  # not loadable: every such input fails, named, and nothing is written for it
            return found

        record = begin_record(args.output_dir, settings, args.overwrite,
                              lambda: any(finished_output(output) for output in outputs.values()))
        if record.problem:
            raise ValueError(record.problem)
        # An empty output is redone.
        todo = [file for file, output in outputs.items() if args.overwrite or not finished_output(output)]
        side = family.encode(todo, args.input_dir, modality, normalize=args.get_global,
                             progress=not args.no_progress) if todo else None
        written = 0
        if side is not None:
            clamp3.say_captions(side)
            clamp3.say_failures(side)
            for relative, feature in zip(side.relative, side.matrix):
                output = outputs[root / relative]
                try:
                    with atomic_path(output) as tmp:
                        with open(tmp, "wb") as f:
                            np.save(f, np.asarray(feature, dtype=np.float32)[None])
                except OSError as exc:  # a full disk: every later file would fail too
                    raise clamp3.CommandError(f"Error: cannot write {output}: {exc.strerror or exc}; the features "
                                              "written are kept: free space and run the same command again to "
                                              "resume") from None
                written += 1
        failures = collisions + (side.failures if side is not None else [])
        if record.replacing:  # the failed inputs' features of the earlier settings
            stale = []
            for name, _ in failures:
                try:
                    stale.append(outputs.get(root / name) or mirror_path(root / name, root, args.output_dir, ".npy"))
                except ValueError:  # not under the input folder: it has no feature here
                    pass
            drop_stale_features(record, stale)
        finish_record(record, args.output_dir, every_share_done=True)
        source = f" ({side.computed} encoded, {side.cached} from cache)" if side is not None else ""
        print(f"clamp3_embd: {written} features written to {args.output_dir}{source}, {len(outputs) - len(todo)} "
              f"already there, {len(failures)} failed", file=sys.stderr)
        return 1 if failures else 0

    return clamp3.run_command(work)


if __name__ == "__main__":
    sys.exit(main())
