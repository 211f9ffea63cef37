"""The two training tasks: M3 pre-training and CLaMP 2 contrastive training, as :class:`TrainTask`s.

Each builder reads and checks the whole data set (raising :class:`DataError` with every problem
listed), makes the datasets, and returns a model factory that the loop calls after seeding.

Eval losses, over every eval sample (the eval set is cut into global batches of batch size ×
processes, the last one partial, see :func:`~clamp2.training.data.eval_plan`):

- M3: the mean cross-entropy per reconstructed character over the whole eval set (Σ of every
  batch's token losses / number of predicted tokens). It does not depend on the batch size nor
  on the number of processes.
- CLaMP 2: each global batch's symmetric contrastive loss is computed over all its pairs (every
  rank's features gathered, as in training), and the eval loss is their mean weighted by the
  number of pairs, Σ n_k · L_k / Σ n_k. It depends on the global batch size (the number of
  candidates each pair is contrasted with), not on how a global batch is split across processes:
  one process with batch 8 and two with batch 4 give the same loss. A final global batch of one
  pair contributes 0 (nothing to contrast with).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from ..checkpoint import load_model_weights
from ..distributed import DistInfo, all_gather_rows
from ..loss import contrastive_loss
from ..models.clamp2 import CLaMP2Model
from ..models.m3 import M3Dims, M3Model
from ..patchilizer import M3Patchilizer
from ..text_model import load_text_model, load_tokenizer
from .data import (DataError, M3Dataset, TextMusicCollator, TextMusicDataset, check_music_files, collate_m3,
                   find_music_files, read_pairs, split_eval)
from .loop import BASE_SEED, Precision, TrainTask


def m3_loss(model: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    return model(batch["input_patches"], batch["input_masks"], batch["selected_indices"], batch["target_patches"])


def m3_eval_step(model: M3Model, batch: Optional[Dict[str, torch.Tensor]], counts: Sequence[int],
                 precision: Precision, dist_info: DistInfo) -> Tuple[float, float]:
    """(Σ token losses, predicted tokens) of this rank's part of a global batch (nothing when it has none)."""
    if batch is None:
        return 0.0, 0.0
    with precision.autocast():
        loss_sum, predicted = model.reconstruction_sums(batch["input_patches"], batch["input_masks"],
                                                        batch["selected_indices"], batch["target_patches"])
    return loss_sum.item(), float(predicted)


def m3_task(config, train_folders: Sequence[str], eval_folders: Sequence[str] = (), global_batch: int = 1,
            log: Callable[[str], None] = print) -> TrainTask:
    """M3 masked-patch reconstruction on folders of .abc/.mtf files (EVAL_SPLIT of them when no eval folder).

    ``global_batch`` (batch size × processes) is what the default split leaves for training at least.
    """
    if not train_folders:
        raise DataError("no training data: pass --train_folders or set TRAIN_FOLDERS in code/config.py")
    train_files = find_music_files(train_folders)
    eval_files = find_music_files(eval_folders) if eval_folders else []
    if not train_files:
        raise DataError(f"no .abc or .mtf files under {', '.join(map(str, train_folders))}")
    if eval_folders and not eval_files:
        raise DataError(f"no .abc or .mtf files under the eval folders {', '.join(map(str, eval_folders))}")
    check_music_files(train_files + eval_files)
    notes = []
    if not eval_files:
        split = split_eval(train_files, config.EVAL_SPLIT, BASE_SEED, min_train=global_batch, min_eval=1)
        train_files, eval_files, notes = split.train, split.eval, [f"no eval folders: {split.reason}"]
    patchilizer = M3Patchilizer(config.PATCH_SIZE, config.PATCH_LENGTH)
    return TrainTask(
        build_model=functools.partial(M3Model, M3Dims.from_config(config)),
        train_set=M3Dataset(train_files, patchilizer, config.M3_MASK_RATIO, training=True),
        eval_set=M3Dataset(eval_files, patchilizer, config.M3_MASK_RATIO, training=False),
        collate_fn=collate_m3, compute_loss=m3_loss, eval_step=m3_eval_step, notes=notes)


class ContrastiveStep:
    """CLaMP 2's training loss of a batch (picklable, unlike a closure)."""

    def __init__(self, logit_scale: float):
        self.logit_scale = logit_scale

    def __call__(self, model: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        return model(batch["text_inputs"], batch["text_masks"], batch["music_inputs"], batch["music_masks"],
                     self.logit_scale)


class ContrastiveEval:
    """(n · loss, n) of a global batch of n pairs, on rank 0 (the others return zeros: every rank computes it)."""

    def __init__(self, logit_scale: float):
        self.logit_scale = logit_scale

    def __call__(self, model: CLaMP2Model, batch: Optional[Dict[str, torch.Tensor]], counts: Sequence[int],
                 precision: Precision, dist_info: DistInfo) -> Tuple[float, float]:
        if batch is None:
            text = music = torch.zeros(0, model.text_proj.out_features, device=dist_info.device)
        else:
            with precision.autocast():
                text = model.text_global(batch["text_inputs"], batch["text_masks"])
                music = model.music_global(batch["music_inputs"], batch["music_masks"])
        # Float32 on every rank: all_gather needs one dtype, and a rank without samples has no autocast output.
        text, music = all_gather_rows(text.float(), counts), all_gather_rows(music.float(), counts)
        if not dist_info.is_main:
            return 0.0, 0.0
        pairs = len(text)
        return contrastive_loss(text, music, self.logit_scale).item() * pairs, float(pairs)


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


def clamp2_task(config, train_jsonl: str, eval_jsonl: str = "", global_batch: int = 1,
                log: Callable[[str], None] = print) -> TrainTask:
    """Contrastive text–music training on a JSONL of pairs (EVAL_SPLIT of them when no eval JSONL).

    The text encoder is TEXT_MODEL_NAME (a hub id or a local folder); the music encoder starts from
    M3_WEIGHTS_PATH when CLAMP2_LOAD_M3 is set; batches are padded to their longest text and piece
    when CLAMP2_PAD_TO_LONGEST is set. ``global_batch`` is what the default split leaves for training
    at least.
    """
    if not train_jsonl:
        raise DataError("no training data: pass --train_jsonl or set TRAIN_JSONL in code/config.py")
    train_items = read_pairs(train_jsonl, require_non_english=config.TEXT_DROPOUT)
    notes = []
    if eval_jsonl:
        eval_items = read_pairs(eval_jsonl, require_non_english=False)
        if len(eval_items) == 1:
            notes.append(f"note: {eval_jsonl} holds 1 pair: its contrastive loss is 0 whatever the model (nothing to "
                         "contrast it with), so the first epoch stays the best")
    else:
        split = split_eval(train_items, config.EVAL_SPLIT, BASE_SEED, min_train=global_batch, min_eval=2)
        train_items, eval_items, notes = split.train, split.eval, [f"no eval JSONL: {split.reason}"]
    tokenizer = load_tokenizer(config.TEXT_MODEL_NAME)
    patchilizer = M3Patchilizer(config.PATCH_SIZE, config.PATCH_LENGTH)
    dims = M3Dims.from_config(config)
    m3_weights = Path(config.M3_WEIGHTS_PATH) if config.CLAMP2_LOAD_M3 else None

    def dataset(items, training):
        return TextMusicDataset(items, tokenizer, patchilizer, config.MAX_TEXT_LENGTH, training=training,
                                text_dropout=config.TEXT_DROPOUT)

    return TrainTask(
        build_model=functools.partial(build_clamp2_model, config.TEXT_MODEL_NAME, dims, config.CLAMP2_HIDDEN_SIZE,
                                      m3_weights, log),
        train_set=dataset(train_items, True), eval_set=dataset(eval_items, False),
        collate_fn=TextMusicCollator(tokenizer.pad_token_id, config.MAX_TEXT_LENGTH, config.PATCH_LENGTH,
                                     config.PATCH_SIZE, config.CLAMP2_PAD_TO_LONGEST),
        compute_loss=ContrastiveStep(config.LOGIT_SCALE), eval_step=ContrastiveEval(config.LOGIT_SCALE), notes=notes)
