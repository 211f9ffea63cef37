"""The extraction scripts' flags and their checks, without torch or transformers (SPEC §8).

``code/extract_*.py`` and ``process_data/extract_mert.py`` define their options from here, so
``--help`` and usage errors answer before torch loads.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ..attention_arguments import add_attention_argument
from ..files import input_problem, output_problem


def default_workers() -> int:
    return min(4, max(0, (os.cpu_count() or 1) - 1))


# -- command-line driver shared by code/extract_clamp2.py and code/extract_m3.py -------------------

def check_extraction_arguments(parser, args) -> None:
    """The flag checks every extraction script shares (one usage line and exit 2 instead of a traceback)."""
    if args.batch_size < 1:
        parser.error(f"--batch_size must be at least 1, got {args.batch_size}")
    if getattr(args, "batch_tokens", 0) < 0:
        parser.error(f"--batch_tokens must be 0 (off) or more, got {args.batch_tokens}")
    if getattr(args, "num_workers", 0) < 0:
        parser.error(f"--num_workers must be 0 or more, got {args.num_workers}")
    if getattr(args, "device", None) is not None:
        import torch  # only for a given --device: --help and other usage errors never load it

        try:
            torch.device(args.device)
        except RuntimeError:
            parser.error(f"--device {args.device!r} is not a torch device; use cpu, cuda or cuda:N")


def folders_problem(input_dir, output_dir) -> Optional[str]:
    """Why an extraction cannot read ``input_dir`` or write into ``output_dir``, as one line, or None."""
    return input_problem(input_dir) or output_problem(output_dir, folder=True)


def add_common_arguments(parser) -> None:
    parser.add_argument("input_dir", type=Path, help="folder searched recursively for input files")
    parser.add_argument("output_dir", type=Path, help="features are written here as <relative folder>/<stem>.npy")
    parser.add_argument("--weights", type=Path, default=None,
                        help="checkpoint file (default: config.py's weights path)")
    parser.add_argument("--batch_size", type=int, default=16, help="windows per forward pass (default 16)")
    parser.add_argument("--batch_tokens", type=int, default=0,
                        help="size batches by padded positions (windows × longest window) instead of --batch_size: "
                             "short windows share a pass by the hundred (e.g. 16384 on a GPU; default 0: off). "
                             "Same features")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="compute precision; bf16/fp16 need CUDA (default fp32, exact)")
    add_attention_argument(parser)
    parser.add_argument("--compile", action="store_true",
                        help="run the encoders through torch.compile (the first batches pay tens of seconds of "
                             "compilation; for long GPU runs). Same features up to rounding")
    parser.add_argument("--num_workers", type=int, default=default_workers(),
                        help="processes that read and tokenize files ahead of the model (default: min(4, CPU "
                             "cores - 1); 0: in the main process)")
    parser.add_argument("--files_per_chunk", type=int, default=256,
                        help="files whose windows are pooled and grouped by length at a time (default 256)")
    parser.add_argument("--overwrite", action="store_true", help="recompute features that already exist")
    parser.add_argument("--device", default=None, help="torch device (default: the accelerate process's device)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
