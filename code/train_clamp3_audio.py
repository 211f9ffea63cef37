"""Train CLaMP 3's audio stage (text ↔ MERT audio features, docs/training.md) on a JSONL of pieces.

    python code/train_clamp3_audio.py --train_jsonl data/audio_train.jsonl [--eval_jsonl data/audio_eval.jsonl]
    torchrun --nproc_per_node=8 code/train_clamp3_audio.py --train_jsonl data/audio_train.jsonl
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --master_addr=HOST0 --master_port=29500 \\
        code/train_clamp3_audio.py --train_jsonl ...      # the same on node 1 with --node_rank=1
    python -m torch.distributed.launch --use_env --nproc_per_node=8 code/train_clamp3_audio.py ...

Each JSONL line holds `analysis` (the English text, evaluated on), `translations` ({"language": ...,
<texts>}), any other metadata, and `filepaths`: MERT feature files (.npy [1, n, AUDIO_HIDDEN_SIZE]
float32 from process_data/extract_mert.py) relative to the JSONL's folder. The symbolic encoder is
frozen (FREEZE_TEXT / --freeze_text freezes the text side too). Defaults come from code/config.py
(CLAMP3_* constants), each overridable by an environment variable of the same name; a flag that
sets a constant acts exactly as its override, file names included. Each epoch appends to
CLAMP3_LOGS_PATH, writes latest_<weights name>, the weights file when the eval loss improves, and
every SAVE_EVERY epochs <weights>_E.pth; checkpoints record `modality` "audio". A run resumes
exactly from an audio checkpoint; from a symbolic one (or one without `modality`) it takes the
weights and starts a new stage at epoch 1 (the staged recipe: docs/training.md).
Exit status: 0 done, 2 bad data, model, checkpoint or configuration.
"""

from __future__ import annotations

from clamp2.cli import interrupt_in_one_line

interrupt_in_one_line()  # before torch loads: Ctrl-C is one line, never a traceback

import sys

from clamp2.training.arguments import parse_clamp3_args

MODALITY = "audio"


def parse_args(argv=None):
    return parse_clamp3_args(MODALITY, __doc__, argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from clamp2.training import clamp3  # torch loads only once the arguments are parsed (a fast --help)

    return clamp3.main(MODALITY, __file__, args)


if __name__ == "__main__":
    sys.exit(main())
