"""The command line both CLaMP 3 trainers share (code/train_clamp3_symbolic.py, code/train_clamp3_audio.py).

The two stages differ only in their modality: what the music files are (.abc/.mtf patches or MERT
.npy rows) and which encoder is frozen. Everything else is the shared loop (:mod:`.loop`) and the
CLaMP 3 task (:func:`~clamp2.training.tasks.clamp3_task`).
"""

from __future__ import annotations

import functools

from ..checkpoint import CheckpointError
from ..cli import ArgumentParser
from ..configuration import CLAMP3_VARIANTS
from ..distributed import distributed_context
from ..text_model import TextModelUnavailable
from .data import DataError
from .loop import (StartRefused, add_training_arguments, check_data_sizes, flag_overrides, load_training_config, report_error,
                   run_training, say, settings_from)
from .tasks import clamp3_task


def parse_args(modality: str, description: str, argv=None):
    parser = ArgumentParser(description=description)
    music = "MERT feature .npy files" if modality == "audio" else ".abc/.mtf files"
    parser.add_argument("--train_jsonl", default=None,
                        help=f"training pairs, {music} relative to its folder (config CLAMP3_TRAIN_JSONL)")
    parser.add_argument("--eval_jsonl", default=None,
                        help="evaluation pairs (config CLAMP3_EVAL_JSONL; none or missing: EVAL_SPLIT of the "
                             "training pairs)")
    parser.add_argument("--text_model", default=None,
                        help="hub id or local folder of the text encoder (config TEXT_MODEL_NAME; part of the "
                             "weights file name)")
    parser.add_argument("--variant", choices=CLAMP3_VARIANTS, default=None,
                        help="published variant the weights file is named after (config CLAMP3_VARIANT)")
    parser.add_argument("--m3_weights", default=None,
                        help="M3 checkpoint the symbolic encoder starts from when CLAMP3_LOAD_M3 is set (config "
                             "M3_WEIGHTS_PATH; the CLaMP 3 code's name for it is tried next)")
    parser.add_argument("--freeze_text", action="store_const", const=True, default=None,
                        help="freeze the text encoder and its projection too (config FREEZE_TEXT=1)")
    parser.add_argument("--save_every", type=int, default=None,
                        help="keep a copy <weights>_E.pth every this many epochs (config SAVE_EVERY; 0: none)")
    parser.add_argument("--overwrite_epoch_files", action="store_true",
                        help="let a new stage overwrite the <weights>_E.pth copies an earlier stage left")
    parser.add_argument("--fixed_padding", action="store_true",
                        help="pad every batch to MAX_TEXT_LENGTH and the music maximum, as the reference (default: "
                             "to the batch's longest sample; same losses, less compute)")
    add_training_arguments(parser, "CLAMP3_")
    return parser.parse_args(argv)


def main(modality: str, script_file: str, args) -> int:
    """Train the ``modality`` stage as ``args`` (from :func:`parse_args`) and code/config.py say; exit status."""
    with distributed_context(args.local_rank, args.device) as dist_info:
        overrides = flag_overrides(args, "CLAMP3_", {
            "CLAMP3_TRAIN_JSONL": args.train_jsonl, "CLAMP3_EVAL_JSONL": args.eval_jsonl,
            "TEXT_MODEL_NAME": args.text_model, "CLAMP3_VARIANT": args.variant, "M3_WEIGHTS_PATH": args.m3_weights,
            "FREEZE_TEXT": args.freeze_text, "SAVE_EVERY": args.save_every})
        config = load_training_config(script_file, overrides, dist_info)
        settings = settings_from(args, config, "CLAMP3_", f"clamp3 {modality}")
        if config.SAVE_EVERY < 0:
            return report_error(ValueError(f"SAVE_EVERY is {config.SAVE_EVERY}; it must be at least 0"), dist_info)
        settings.save_every, settings.overwrite_epoch_files = config.SAVE_EVERY, args.overwrite_epoch_files
        try:
            task = clamp3_task(config, modality, config.CLAMP3_TRAIN_JSONL, config.CLAMP3_EVAL_JSONL,
                               global_batch=settings.batch_size * dist_info.world_size,
                               pad_to_longest=not args.fixed_padding, log=functools.partial(say, dist_info))
            check_data_sizes(task, settings, dist_info.world_size)
        except (DataError, TextModelUnavailable) as exc:
            return report_error(exc, dist_info)
        try:
            run_training(task, settings, dist_info)
        except StartRefused as exc:
            return report_error(exc, dist_info)  # found by rank 0 for all: said once
        except (DataError, CheckpointError, TextModelUnavailable) as exc:
            return report_error(exc, dist_info, every_rank=True)
    return 0
