"""Train a linear probe on extracted features (docs/classification.md): the label is the file name up to its first `_`.

    python music_classification/train_cls.py --train_folders features/train --weights probe.pth
    python music_classification/train_cls.py --train_folders feats --eval_folders feats_eval --weights probe.pth
    python music_classification/train_cls.py --train_folders feats --batch_size 64 --patience 20 --weights probe.pth
    python music_classification/train_cls.py --train_folders feats --folds 5 --batch_size 64 --patience 20
    torchrun --nproc_per_node=4 music_classification/train_cls.py --train_folders feats --weights probe.pth
    python music_classification/train_cls.py --probe clamp3 --train_folder clamp3_global_feats --balanced_training

Inputs are the .npy files of code/extract_m3.py, code/extract_clamp2.py or code/extract_clamp3.py:
per-position [1, L, D] or global [1, D] (D is read from the files). Per-position features (or
--probe clamp2, or --hidden_size) train CLaMP 2's probe, the reference's: Linear(D→768) and ReLU per
position, mean over positions, Linear → classes, softmax, cross-entropy on that softmax; global
features train CLaMP 3's (below) unless --probe clamp2 is given. Both take AdamW at a constant 1e-5; up to 1000 epochs; EVAL_SPLIT 0.2 of the files (seeded) when no
eval folder is given (or the eval folders are missing or empty, as in the reference). Defaults are the reference's (music_classification/config.py there), so a
plain run reproduces its numbers; --batch_size pads and masks positions, so any batch size gives
every file the output it gets alone (training steps differ: fewer, larger ones).

Writes the best probe by eval accuracy (with its label map) to --weights, latest_<weights> every
minute and at the end (a re-run resumes from it), the reference's per-epoch log (logs-<name>.txt), and a report
folder: metrics.json, report.txt (per-class precision/recall/F1), confusion_matrix.png,
learning_curve.png. CLaMP 3's probe (--probe clamp3, or global features): one Linear(D→classes)
and softmax on global features ([1, D] or [D]; per-position files are listed and left out), same
loss, optimizer, split, balancing and checkpoints (plus input_size); the reference's argument names
(--train_folder, --eval_folder, --num_epochs, --balanced_training) are accepted. --folds K runs stratified K-fold cross-validation and prints mean ± std.
gloo on CPU, NCCL on CUDA; AMP on CUDA only. Exit status: 0 done, 1 done but files were skipped
(listed with reasons), 2 usage or data error.
"""

from __future__ import annotations

from clamp2.cli import interrupt_in_one_line

interrupt_in_one_line()  # before torch loads: Ctrl-C is one line, never a traceback

import argparse
import sys

from clamp2.cli import ArgumentParser
from clamp2.probe.defaults import BASE_SEED, EVAL_SPLIT, HIDDEN_SIZE, LEARNING_RATE, NUM_EPOCHS


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--probe", choices=("clamp2", "clamp3"), default=None,
                        help="clamp2: the CLaMP 2 probe (hidden layer, mean over positions; any features); clamp3: "
                             "CLaMP 3's single linear layer on global [1, D] / [D] features (per-position files "
                             "are listed and left out). Default: clamp3 when the training features are global, clamp2 when "
                             "they are per-position [1, L, D]")
    parser.add_argument("--train_folders", "--train_folder", nargs="+", required=True,
                        help="folders searched recursively for .npy features named <label>_<anything>.npy")
    parser.add_argument("--eval_folders", "--eval_folder", nargs="+", default=None,
                        help="evaluation folders (default: --eval_split of the training files, seeded)")
    parser.add_argument("--weights", default=None,
                        help="best-probe file (default: weights-<last training folder name>.pth, as the reference)")
    parser.add_argument("--logs", default=None, help="per-epoch log file (default: logs-<name>.txt beside --weights)")
    parser.add_argument("--report_dir", default=None, help="report folder (default: <weights name>_report)")
    parser.add_argument("--epochs", "--num_epochs", type=int, default=NUM_EPOCHS, help=f"maximum epochs ({NUM_EPOCHS})")
    parser.add_argument("--batch_size", type=int, default=1,
                        help="files per step and process (1, the reference's); padded and masked")
    parser.add_argument("--eval_batch_size", type=int, default=None,
                        help="files per evaluation batch (default: --batch_size); results do not depend on it")
    parser.add_argument("--learning_rate", type=float, default=LEARNING_RATE, help=f"AdamW learning rate ({LEARNING_RATE:g})")
    parser.add_argument("--hidden_size", type=int, default=None,
                        help=f"hidden size of the clamp2 probe ({HIDDEN_SIZE}; the clamp3 probe has none); "
                             "giving it chooses the clamp2 probe")
    parser.add_argument("--warmup", action="store_true",
                        help="warm the learning rate up linearly over the first epoch (the reference meant to, but "
                             "its warm-up never applies; default: constant)")
    parser.add_argument("--warmup_steps", type=int, default=None, help="warm up over this many steps instead")
    parser.add_argument("--balanced", "--balanced_training", action="store_true",
                        help="every epoch, draw as many files of each label as the rarest label has "
                             "(the reference's BALANCED_TRAINING)")
    parser.add_argument("--eval_split", type=float, default=EVAL_SPLIT,
                        help=f"share of the training files held out when no --eval_folders ({EVAL_SPLIT})")
    parser.add_argument("--patience", type=int, default=0,
                        help="stop after this many epochs without a better eval accuracy (0: never, the reference)")
    parser.add_argument("--folds", type=int, default=0, help="stratified K-fold cross-validation with K folds")
    parser.add_argument("--seed", type=int, default=BASE_SEED, help=f"base seed ({BASE_SEED}; rank r uses seed + r)")
    parser.add_argument("--precision", choices=("fp16", "bf16", "fp32"), default="fp16",
                        help="training on CUDA: fp16 AMP with gradient scaling (the reference), bf16 or fp32; "
                             "the CPU and evaluation always use fp32")
    parser.add_argument("--cache_gb", type=float, default=4.0,
                        help="keep the features in memory when the files total at most this many GB per "
                             "process (4); larger sets are read from disk every epoch")
    parser.add_argument("--num_workers", type=int, default=0, help="data-loader worker processes (0)")
    parser.add_argument("--checkpoint_interval", type=float, default=60.0,
                        help="seconds between writes of latest_<weights> (60; 0: every epoch); the best probe is "
                             "written whenever it improves, latest_ always at the end")
    parser.add_argument("--no_resume", action="store_true", help="start afresh even if latest_<weights> exists")
    parser.add_argument("--wandb_log", action="store_true",
                        help="log each epoch's metrics to Weights & Biases (pip install wandb; the key from "
                             "WANDB_API_KEY in the environment)")
    parser.add_argument("--wandb_key", default=None,
                        help="not taken: a key on the command line is visible to every user; set WANDB_API_KEY")
    parser.add_argument("--no_progress", action="store_true", help="no progress bars")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    # The legacy launcher passes --local-rank=N or --local_rank=N; torchrun sets LOCAL_RANK.
    parser.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, default=None,
                        help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from clamp2.probe.commands import train_command  # torch loads only once the arguments are parsed

    return train_command(args)


if __name__ == "__main__":
    sys.exit(main())
