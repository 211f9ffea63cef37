"""The command line both CLaMP 3 trainers share (code/train_clamp3_symbolic.py, code/train_clamp3_audio.py).

The two stages differ only in their modality: what the music files are (.abc/.mtf patches or MERT
.npy rows) and which encoder is frozen. Everything else is the shared loop (:mod:`.loop`) and the
CLaMP 3 task (:func:`~clamp2.training.tasks.clamp3_task`).
"""

from __future__ import annotations

import functools

from ..checkpoint import CheckpointError, SaidOnce
from ..distributed import distributed_context
from ..text_model import TextModelUnavailable
from .data import DataError
from .loop import (check_data_sizes, flag_overrides, load_training_config, report_error, run_training, say,
                   settings_from)
from .tasks import clamp3_task


def main(modality: str, script_file: str, args) -> int:
    """Train the ``modality`` stage as ``args`` (from :func:`~clamp2.training.arguments.parse_clamp3_args`) and
    code/config.py say; exit status."""
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
        except (DataError, TextModelUnavailable) as exc:  # a node's own data may differ: said on each node
            return report_error(exc, dist_info, each_node=True)
        try:
            run_training(task, settings, dist_info)
        except SaidOnce as exc:
            return report_error(exc, dist_info)  # found by rank 0 for all: said once
        except (DataError, CheckpointError, TextModelUnavailable) as exc:
            return report_error(exc, dist_info, every_rank=True)
    return 0
