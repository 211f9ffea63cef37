"""Pre-train M3 (masked-patch reconstruction, docs/training.md) on folders of interleaved ABC and MTF files.

    python code/train_m3.py --train_folders data/abc data/mtf [--eval_folders data/eval]
    torchrun --nproc_per_node=8 code/train_m3.py --train_folders data/abc data/mtf
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST0 --master_port=29500 \\
        code/train_m3.py --train_folders ...        # the same on node 1 with --node_rank=1
    python -m torch.distributed.launch --use_env --nproc_per_node=8 code/train_m3.py ...   # legacy launcher

Defaults come from code/config.py (M3_* constants, TRAIN_FOLDERS/EVAL_FOLDERS), each overridable
by an environment variable of the same name; a flag that sets a constant (--batch_size sets
M3_BATCH_SIZE, ...) acts exactly as that override, weights and log file names included. Without
eval folders EVAL_SPLIT of the files are held out (fewer when the rest could not fill one batch).
The learning rate is constant from the first step unless M3_WARMUP_STEPS / --warmup_steps asks for
a linear warm-up; evaluation covers every eval file. Each epoch appends to M3_LOGS_PATH, writes latest_<weights name> and, when the eval loss
improves, the weights file itself; with M3_LOAD_CKPT a run resumes from latest_ exactly where it
stopped (model, optimizer, schedule, scaler, epoch, best loss, random state). NCCL on CUDA, gloo
on CPU; AMP on CUDA only (see --precision). Exit status: 0 done, 2 bad data or configuration.
"""

from __future__ import annotations

from clamp2.cli import interrupt_in_one_line

interrupt_in_one_line()  # before torch loads: Ctrl-C is one line, never a traceback

import sys

from clamp2.cli import ArgumentParser
from clamp2.training.arguments import add_training_arguments


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--train_folders", nargs="+", default=None,
                        help="folders searched recursively for .abc/.mtf files (config TRAIN_FOLDERS)")
    parser.add_argument("--eval_folders", nargs="+", default=None,
                        help="evaluation folders (config EVAL_FOLDERS; none, missing or without pieces: EVAL_SPLIT of the training "
                             "files)")
    add_training_arguments(parser, "M3_")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # torch loads only once the arguments are parsed: --help and usage errors answer at once.
    from clamp2.checkpoint import CheckpointError, SaidOnce
    from clamp2.distributed import distributed_context
    from clamp2.training.data import DataError
    from clamp2.training.loop import flag_overrides, load_training_config, report_error, run_training, settings_from
    from clamp2.training.tasks import m3_task

    with distributed_context(args.local_rank, args.device) as dist_info:
        overrides = flag_overrides(args, "M3_", {"TRAIN_FOLDERS": args.train_folders, "EVAL_FOLDERS": args.eval_folders})
        config = load_training_config(__file__, overrides, dist_info)
        settings = settings_from(args, config, "M3_", "m3")
        try:
            # CLaMP 3's config names the folders M3_TRAIN_FOLDERS / M3_EVAL_FOLDERS: used when CLaMP 2's are empty.
            task = m3_task(config, config.TRAIN_FOLDERS or config.M3_TRAIN_FOLDERS,
                           config.EVAL_FOLDERS or config.M3_EVAL_FOLDERS,
                           global_batch=settings.batch_size * dist_info.world_size)
        except DataError as exc:  # a node's own data folders may differ: said on each node
            return report_error(exc, dist_info, each_node=True)
        try:
            run_training(task, settings, dist_info)
        except SaidOnce as exc:  # found by rank 0 for all: said once
            return report_error(exc, dist_info)
        except (DataError, CheckpointError) as exc:
            return report_error(exc, dist_info, every_rank=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
