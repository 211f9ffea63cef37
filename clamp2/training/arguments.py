"""The trainers' flags, without torch or transformers: ``code/train_*.py`` define their options from
here, so ``--help`` and usage errors answer before torch loads. Import them from here: neither
:mod:`clamp2.training.loop` nor :mod:`clamp2.training.clamp3` re-exports them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import ArgumentParser
from ..configuration import CLAMP3_VARIANTS

PRECISIONS = ("fp16", "bf16", "fp32")
# Batches each data-loader worker prepares ahead (torch's default is 2): a slow batch (long texts to
# tokenize, long pieces to patch) must not leave the GPU waiting.
PREFETCH_BATCHES = 4

# Loader workers per rank on CUDA by default: one worker makes ~300 samples/s of CLaMP 2 or M3 at
# config.py's sizes (benchmarks/bench_train.py's data column), and an H200 trains ~1,000 a second.
CUDA_LOADER_WORKERS = 4


# -- settings from config.py and the command line --------------------------------------------------

def add_training_arguments(parser, prefix: str) -> None:
    """The flags every trainer shares; those that set a config constant act exactly as its override.

    ``prefix`` (``M3_``, ``CLAMP2_``, ``CLAMP3_``) is the one :func:`flag_overrides` is given, so the help
    names the constants a flag sets as they are spelt in code/config.py and in the environment.
    """
    p = prefix
    parser.add_argument("--epochs", type=int, default=None, help=f"number of epochs (config {p}NUM_EPOCH)")
    parser.add_argument("--batch_size", type=int, default=None,
                        help=f"batch size per process (config {p}BATCH_SIZE; part of the weights file name)")
    parser.add_argument("--learning_rate", type=float, default=None,
                        help=f"learning rate (config {p}LEARNING_RATE; part of the weights file name)")
    parser.add_argument("--warmup_steps", type=int, default=None,
                        help=f"linear LR warm-up steps, then constant (config {p}WARMUP_STEPS, default 0: constant "
                             "from the first step; a non-zero value is part of the weights file name)")
    parser.add_argument("--weights", type=Path, default=None,
                        help="best-checkpoint path; latest_<name> and the log file go beside it "
                             f"(config {p}WEIGHTS_PATH, {p}LOGS_PATH derived from it)")
    parser.add_argument("--wandb", action="store_true", help=f"log to Weights & Biases (config {p}WANDB_LOG=1)")
    parser.add_argument("--no_resume", action="store_true", help=f"start afresh (config {p}LOAD_CKPT=0)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp16",
                        help="on CUDA: fp16 = AMP with gradient scaling (default, the reference), bf16 autocast, "
                             "or fp32; the CPU always trains in fp32")
    parser.add_argument("--num_workers", type=int, default=None,
                        help="data-loader worker processes per rank; they stay up across epochs and keep "
                             f"{PREFETCH_BATCHES} batches each ready (default: up to {CUDA_LOADER_WORKERS} on CUDA, as "
                             "the node's cores allow; 0 on the CPU). Same training with any number")
    parser.add_argument("--compile", action="store_true",
                        help="run the encoders and decoders through torch.compile (the first steps pay the "
                             "compilation; for long GPU runs). Same training up to rounding")
    parser.add_argument("--max_steps_per_epoch", type=int, default=0,
                        help="end each epoch after this many optimizer steps (0 = whole epochs; for smoke runs)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    # The legacy launcher passes --local-rank=N (torch >= 2.0) or --local_rank=N; torchrun sets LOCAL_RANK.
    parser.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, default=None,
                        help=argparse.SUPPRESS)


def parse_clamp3_args(modality: str, description: str, argv=None):
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
