"""Train CLaMP 2 (contrastive text–music learning, docs/training.md) on a JSONL of pieces and summaries.

    python code/train_clamp2.py --train_jsonl data/train.jsonl [--eval_jsonl data/eval.jsonl]
    torchrun --nproc_per_node=8 code/train_clamp2.py --train_jsonl data/train.jsonl
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST0 --master_port=29500 \\
        code/train_clamp2.py --train_jsonl ...      # the same on node 1 with --node_rank=1
    python -m torch.distributed.launch --use_env --nproc_per_node=8 code/train_clamp2.py ...   # legacy launcher

Each JSONL line holds metadata, `summary_en` (a string or a list), `summary_nen` (a
{"language", "summary"} dict, a list of them, or strings) and `filepaths`: .abc/.mtf files relative
to the JSONL's folder. The whole file is checked before training. Defaults come from code/config.py
(CLAMP2_* constants, TRAIN_JSONL/EVAL_JSONL, TEXT_MODEL_NAME), each overridable by an environment
variable of the same name; a flag that sets a constant (--batch_size sets CLAMP2_BATCH_SIZE,
--text_model TEXT_MODEL_NAME, ...) acts exactly as that override, file names included. With
CLAMP2_LOAD_M3 the music encoder starts from the M3 weights file (M3_WEIGHTS_PATH or --m3_weights)
when it exists. Batches are padded to their longest sample (--fixed_padding: to the maxima); the
learning rate is constant unless CLAMP2_WARMUP_STEPS / --warmup_steps asks for a warm-up; every
eval pair is evaluated. Each epoch appends to CLAMP2_LOGS_PATH, writes
latest_<weights name> and, when the eval loss improves, the weights file; with CLAMP2_LOAD_CKPT a
run resumes from latest_ exactly. Exit status: 0 done, 2 bad data, model or configuration.
"""

from __future__ import annotations

from clamp2.cli import interrupt_in_one_line

interrupt_in_one_line()  # before torch loads: Ctrl-C is one line, never a traceback

import functools
import sys

from clamp2.cli import ArgumentParser
from clamp2.training.arguments import add_training_arguments


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--train_jsonl", default=None, help="training pairs (config TRAIN_JSONL)")
    parser.add_argument("--eval_jsonl", default=None,
                        help="evaluation pairs (config EVAL_JSONL; none, missing or empty: EVAL_SPLIT of the training pairs)")
    parser.add_argument("--text_model", default=None,
                        help="hub id or local folder of the text encoder (config TEXT_MODEL_NAME; part of the "
                             "weights file name)")
    parser.add_argument("--m3_weights", default=None,
                        help="M3 checkpoint the music encoder starts from when CLAMP2_LOAD_M3 is set "
                             "(config M3_WEIGHTS_PATH)")
    padding = parser.add_mutually_exclusive_group()
    padding.add_argument("--pad_to_longest", action="store_const", const=True, dest="pad_to_longest",
                         help="pad each batch to its longest text and piece (config CLAMP2_PAD_TO_LONGEST=1, the "
                              "default: same losses, less compute)")
    padding.add_argument("--fixed_padding", action="store_const", const=False, dest="pad_to_longest",
                         help="pad every batch to MAX_TEXT_LENGTH and PATCH_LENGTH, as the reference "
                              "(CLAMP2_PAD_TO_LONGEST=0)")
    add_training_arguments(parser, "CLAMP2_")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # torch and transformers load only once the arguments are parsed: --help and usage errors answer at once.
    from clamp2.checkpoint import CheckpointError, SaidOnce
    from clamp2.distributed import distributed_context
    from clamp2.text_model import TextModelUnavailable, check_max_text_length
    from clamp2.training.data import DataError
    from clamp2.training.loop import flag_overrides, load_training_config, report_error, run_training, say, settings_from
    from clamp2.training.tasks import clamp2_task

    with distributed_context(args.local_rank, args.device) as dist_info:
        overrides = flag_overrides(args, "CLAMP2_", {
            "TRAIN_JSONL": args.train_jsonl, "EVAL_JSONL": args.eval_jsonl, "TEXT_MODEL_NAME": args.text_model,
            "M3_WEIGHTS_PATH": args.m3_weights, "CLAMP2_PAD_TO_LONGEST": args.pad_to_longest})
        config = load_training_config(__file__, overrides, dist_info)
        settings = settings_from(args, config, "CLAMP2_", "clamp2")
        try:
            task = clamp2_task(config, config.TRAIN_JSONL, config.EVAL_JSONL,
                               global_batch=settings.batch_size * dist_info.world_size,
                               log=functools.partial(say, dist_info))
            check_max_text_length(config.TEXT_MODEL_NAME, config.MAX_TEXT_LENGTH)
        except (DataError, TextModelUnavailable) as exc:  # a node's own data may differ: said on each node
            return report_error(exc, dist_info, each_node=True)
        try:
            run_training(task, settings, dist_info)
        except SaidOnce as exc:  # found by rank 0 for all: said once
            return report_error(exc, dist_info)
        except (DataError, CheckpointError, TextModelUnavailable) as exc:
            return report_error(exc, dist_info, every_rank=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
