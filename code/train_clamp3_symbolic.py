"""Train CLaMP 3's symbolic stage (text ↔ sheet music / MIDI, docs/training.md) on a JSONL of pieces.

    python code/train_clamp3_symbolic.py --train_jsonl data/train.jsonl [--eval_jsonl data/eval.jsonl]
    torchrun --nproc_per_node=8 code/train_clamp3_symbolic.py --train_jsonl data/train.jsonl
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST0 --master_port=29500 \\
        code/train_clamp3_symbolic.py --train_jsonl ...   # the same on node 1 with --node_rank=1
    python -m torch.distributed.launch --use_env --nproc_per_node=8 code/train_clamp3_symbolic.py ...

Each JSONL line holds `analysis` (the English text, evaluated on), `translations` ({"language": ...,
<texts>}), any other metadata, and `filepaths`: .abc/.mtf files relative to the JSONL's folder.
The audio encoder is frozen (FREEZE_TEXT / --freeze_text freezes the text side too); with
CLAMP3_LOAD_M3 the symbolic encoder starts from the M3 file (published name first). Defaults come
from code/config.py (CLAMP3_* constants), each overridable by an environment variable of the same
name; a flag that sets a constant acts exactly as its override, file names included. Each epoch
appends to CLAMP3_LOGS_PATH, writes latest_<weights name>, the weights file when the eval loss
improves, and every SAVE_EVERY epochs <weights>_E.pth; checkpoints record `modality` "symbolic".
A run resumes exactly from a symbolic checkpoint; from an audio one (or one without `modality`) it
takes the weights and starts a new stage at epoch 1 (the staged recipe: docs/training.md).
Exit status: 0 done, 2 bad data, model, checkpoint or configuration.
"""

from __future__ import annotations

from clamp2.cli import interrupt_in_one_line

interrupt_in_one_line()  # before torch loads: Ctrl-C is one line, never a traceback

import sys

from clamp2.training.arguments import parse_clamp3_args

MODALITY = "symbolic"


def parse_args(argv=None):
    return parse_clamp3_args(MODALITY, __doc__, argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from clamp2.training import clamp3  # torch loads only once the arguments are parsed (a fast --help)

    return clamp3.main(MODALITY, __file__, args)


if __name__ == "__main__":
    sys.exit(main())
