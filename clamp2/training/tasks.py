"""The two training tasks: M3 pre-training and CLaMP 2 contrastive training, as :class:`TrainTask`s.

Each builder reads and checks the whole data set (raising :class:`DataError` with every problem
listed), makes the datasets, and returns a model factory that the loop calls after seeding.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import torch
from torch import nn

from ..checkpoint import load_model_weights
from ..models import CLaMP2Model, M3Dims, M3Model
from ..patchilizer import M3Patchilizer
from ..text_model import load_text_model, load_tokenizer
from .data import (DataError, M3Dataset, TextMusicCollator, TextMusicDataset, check_music_files, collate_m3,
                   find_music_files, read_pairs, split_eval)
from .loop import BASE_SEED, TrainTask


def m3_loss(model: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    return model(batch["input_patches"], batch["input_masks"], batch["selected_indices"], batch["target_patches"])


def m3_task(config, train_folders: Sequence[str], eval_folders: Sequence[str] = ()) -> TrainTask:
    """M3 masked-patch reconstruction on folders of .abc/.mtf files (EVAL_SPLIT of them when no eval folder)."""
    if not train_folders:
        raise DataError("no training data: pass --train_folders or set TRAIN_FOLDERS in code/config.py")
    train_files = find_music_files(train_folders)
    eval_files = find_music_files(eval_folders) if eval_folders else []
    if not train_files:
        raise DataError(f"no .abc or .mtf files under {', '.join(map(str, train_folders))}")
    if eval_folders and not eval_files:
        raise DataError(f"no .abc or .mtf files under the eval folders {', '.join(map(str, eval_folders))}")
    check_music_files(train_files + eval_files)
    if not eval_files:
        train_files, eval_files = split_eval(train_files, config.EVAL_SPLIT, BASE_SEED)
    patchilizer = M3Patchilizer(config.PATCH_SIZE, config.PATCH_LENGTH)
    return TrainTask(
        build_model=functools.partial(M3Model, M3Dims.from_config(config)),
        train_set=M3Dataset(train_files, patchilizer, config.M3_MASK_RATIO, training=True),
        eval_set=M3Dataset(eval_files, patchilizer, config.M3_MASK_RATIO, training=False),
        collate_fn=collate_m3, compute_loss=m3_loss, eval_drop_last=False)


class ContrastiveStep:
    """CLaMP 2's loss of a batch (picklable, unlike a closure)."""

    def __init__(self, logit_scale: float):
        self.logit_scale = logit_scale

    def __call__(self, model: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        return model(batch["text_inputs"], batch["text_masks"], batch["music_inputs"], batch["music_masks"],
                     self.logit_scale)


def build_clamp2_model(text_model: str, dims: M3Dims, hidden_size: int, m3_weights: Optional[Path],
                       log: Callable[[str], None] = print) -> CLaMP2Model:
    """Pretrained text encoder + M3 patch encoder, the latter from an M3 checkpoint when one is given and exists."""
    model = CLaMP2Model(load_text_model(text_model), dims, hidden_size)
    if m3_weights is not None:
        if Path(m3_weights).is_file():
            load_model_weights(model.music_model, m3_weights, prefix="encoder.")
            log(f"music encoder initialised from the M3 checkpoint {m3_weights}")
        else:
            log(f"note: CLAMP2_LOAD_M3 is set but {m3_weights} does not exist: the music encoder starts from "
                "random weights")
    return model


def clamp2_task(config, train_jsonl: str, eval_jsonl: str = "", text_model: Optional[str] = None,
                m3_weights: Optional[Path] = None, pad_to_longest: bool = False,
                log: Callable[[str], None] = print) -> TrainTask:
    """Contrastive text–music training on a JSONL of pairs (EVAL_SPLIT of them when no eval JSONL).

    ``text_model`` (default TEXT_MODEL_NAME) may be a local copy of the configured model; the
    weights file name keeps following TEXT_MODEL_NAME. ``m3_weights`` is used when CLAMP2_LOAD_M3
    is set (default M3_WEIGHTS_PATH).
    """
    if not train_jsonl:
        raise DataError("no training data: pass --train_jsonl or set TRAIN_JSONL in code/config.py")
    train_items = read_pairs(train_jsonl, require_non_english=config.TEXT_DROPOUT)
    if eval_jsonl:
        eval_items = read_pairs(eval_jsonl, require_non_english=False)
    else:
        train_items, eval_items = split_eval(train_items, config.EVAL_SPLIT, BASE_SEED)
    text_model = text_model or config.TEXT_MODEL_NAME
    tokenizer = load_tokenizer(text_model)
    patchilizer = M3Patchilizer(config.PATCH_SIZE, config.PATCH_LENGTH)
    dims = M3Dims.from_config(config)
    if config.CLAMP2_LOAD_M3:
        m3_weights = Path(m3_weights if m3_weights is not None else config.M3_WEIGHTS_PATH)
    else:
        m3_weights = None

    def dataset(items, training):
        return TextMusicDataset(items, tokenizer, patchilizer, config.MAX_TEXT_LENGTH, training=training,
                                text_dropout=config.TEXT_DROPOUT)

    return TrainTask(
        build_model=functools.partial(build_clamp2_model, text_model, dims, config.CLAMP2_HIDDEN_SIZE, m3_weights,
                                      log),
        train_set=dataset(train_items, True), eval_set=dataset(eval_items, False),
        collate_fn=TextMusicCollator(tokenizer.pad_token_id, config.MAX_TEXT_LENGTH, config.PATCH_LENGTH,
                                     config.PATCH_SIZE, pad_to_longest),
        compute_loss=ContrastiveStep(config.LOGIT_SCALE), eval_drop_last=True)
