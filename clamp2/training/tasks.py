"""The training tasks: M3 pre-training, CLaMP 2 and CLaMP 3 (two stages) contrastive training, as :class:`TrainTask`s.

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
- CLaMP 3: as CLaMP 2, text against the stage's modality (symbolic or audio).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..checkpoint import load_model_weights
from ..distributed import DistInfo, all_gather_rows
from ..loss import contrastive_loss
from ..models.clamp2 import CLaMP2Model
from ..models.clamp3 import MODALITIES, AudioDims, CLaMP3Model
from ..models.m3 import M3Dims, M3Model
from ..patchilizer import M3Patchilizer
from ..text_model import load_text_model, load_tokenizer
from .data import (AudioMusic, DataError, M3Dataset, SymbolicMusic, TextMusicCollator, TextMusicDataset,
                   check_music_files, clamp3_eval_text, clamp3_text_problems, clamp3_training_text, collate_m3,
                   find_music_files, has_analysis, no_text_problems, read_items, read_pairs, split_eval)
from .loop import BASE_SEED, TrainTask


# Whether a trainer's bf16/fp16 steps may use cuDNN's attention kernel (clamp2.attention.Autocast): it
# is the fastest where batch shapes repeat, and costs tens of ms of CPU to plan each new shape. Measured
# on an H200 (torch 2.11; benchmarks/bench_train.py, config.py's sizes and batches, bf16), samples/s
# with / without it: CLaMP 2 697 / 585 (batches of 128 pad to lengths that repeat: the longest text and
# piece mostly reach MAX_TEXT_LENGTH and PATCH_LENGTH); M3 77 / 128 (the number of masked patches its
# decoder reads changes every step); CLaMP 3's symbolic stage as CLaMP 2 (636 with it, before the
# lookup-gradient change, against 579 without it, after); the audio stage 1356 / 1642 (random windows).
CUDNN_ATTENTION = {"m3": False, "clamp2": True, "symbolic": True, "audio": False}


def m3_loss(model: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
    return model(batch["input_patches"], batch["input_masks"], batch["selected_indices"], batch["target_patches"])


def m3_eval_step(model: M3Model, batch: Optional[Dict[str, torch.Tensor]], counts: Sequence[int],
                 dist_info: DistInfo) -> Tuple[float, float]:
    """(Σ token losses, predicted tokens) of this rank's part of a global batch (nothing when it has none)."""
    if batch is None:
        return 0.0, 0.0
    loss_sum, predicted = model.reconstruction_sums(batch["input_patches"], batch["input_masks"],
                                                    batch["selected_indices"], batch["target_patches"])
    return loss_sum.item(), float(predicted)


def holds_lines(jsonl) -> bool:
    """Whether ``jsonl`` names a file with a non-blank line. The reference reads a missing or empty eval
    JSONL as none (and then holds out its EVAL_SPLIT split)."""
    if not jsonl or not Path(jsonl).is_file():
        return False
    with open(jsonl, encoding="utf-8", errors="replace") as handle:
        return any(line.strip() for line in handle)


def absent_or_empty(jsonl) -> str:
    return "is empty" if Path(jsonl).is_file() else "does not exist"


def m3_task(config, train_folders: Sequence[str], eval_folders: Sequence[str] = (), global_batch: int = 1) -> TrainTask:
    """M3 masked-patch reconstruction on folders of .abc/.mtf files (EVAL_SPLIT of them when no eval folder).

    ``global_batch`` (batch size × processes) is what the default split leaves for training at least.
    """
    if not train_folders:
        raise DataError("no training data: pass --train_folders or set TRAIN_FOLDERS in code/config.py")
    train_files = find_music_files(train_folders)
    if not train_files:
        raise DataError(f"no .abc or .mtf files under {', '.join(map(str, train_folders))}")
    # As the reference (whose config templates ship placeholder folders): eval folders that are missing or
    # hold no piece mean the EVAL_SPLIT split, said in the log, not an error.
    eval_folders = [folder for folder in eval_folders or [] if str(folder).strip()]  # the template's [""]: none
    absent = [str(folder) for folder in eval_folders if not Path(folder).is_dir()]
    eval_files = find_music_files([folder for folder in eval_folders if Path(folder).is_dir()])
    check_music_files(train_files + eval_files, shared=True)  # every process, sharing the reading
    notes = []
    if not eval_files:
        split = split_eval(train_files, config.EVAL_SPLIT, BASE_SEED, min_train=global_batch, min_eval=1)
        why = "no eval folders: "
        if absent:
            why = f"eval folder{'s' if len(absent) > 1 else ''} {', '.join(absent)} not found, so "
        elif eval_folders:
            why = f"no .abc or .mtf files under the eval folders {', '.join(map(str, eval_folders))}, so "
        train_files, eval_files, notes = split.train, split.eval, [f"{why}{split.reason}"]
    elif absent:
        notes.append(f"eval folder{'s' if len(absent) > 1 else ''} {', '.join(absent)} not found: evaluating on the others")
    patchilizer = M3Patchilizer(config.PATCH_SIZE, config.PATCH_LENGTH)
    return TrainTask(
        build_model=functools.partial(M3Model, M3Dims.from_config(config)),
        train_set=M3Dataset(train_files, patchilizer, config.M3_MASK_RATIO, training=True),
        eval_set=M3Dataset(eval_files, patchilizer, config.M3_MASK_RATIO, training=False),
        collate_fn=collate_m3, compute_loss=m3_loss, eval_step=m3_eval_step, notes=notes,
        cudnn_attention=CUDNN_ATTENTION["m3"])


class ContrastiveStep:
    """The contrastive training loss of a batch (picklable, unlike a closure); CLaMP 3 names its modality."""

    def __init__(self, logit_scale: float, modality: Optional[str] = None):
        self.logit_scale = logit_scale
        self.modality = modality

    def __call__(self, model: nn.Module, batch: Dict[str, torch.Tensor]) -> torch.Tensor:
        if self.modality is None:
            return model(batch["text_inputs"], batch["text_masks"], batch["music_inputs"], batch["music_masks"],
                         self.logit_scale)
        return model(batch["text_inputs"], batch["text_masks"], batch["music_inputs"], batch["music_masks"],
                     self.modality, self.logit_scale)


class ContrastiveEval:
    """(n · loss, n) of a global batch of n pairs, on rank 0 (the others return zeros: every rank computes it)."""

    def __init__(self, logit_scale: float, modality: Optional[str] = None):
        self.logit_scale = logit_scale
        self.modality = modality

    def __call__(self, model: nn.Module, batch: Optional[Dict[str, torch.Tensor]], counts: Sequence[int],
                 dist_info: DistInfo) -> Tuple[float, float]:
        if batch is None:
            text = music = torch.zeros(0, model.text_proj.out_features, device=dist_info.device)
        else:
            text = model.text_global(batch["text_inputs"], batch["text_masks"])
            music_inputs = (batch["music_inputs"], batch["music_masks"])
            music = (model.music_global(*music_inputs) if self.modality is None
                     else model.music_global(self.modality, *music_inputs))
        text, music = all_gather_rows(text, counts), all_gather_rows(music, counts)
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
    train_items = read_pairs(train_jsonl, require_non_english=config.TEXT_DROPOUT, shared=True)
    notes = []
    if holds_lines(eval_jsonl):
        eval_items = read_pairs(eval_jsonl, require_non_english=False, shared=True)
        if len(eval_items) == 1:
            notes.append(f"note: {eval_jsonl} holds 1 pair: its contrastive loss is 0 whatever the model (nothing to "
                         "contrast it with), so the first epoch stays the best")
    else:
        # As the reference, and as CLaMP 3's trainer: a missing eval JSONL means the EVAL_SPLIT split, said in the log.
        split = split_eval(train_items, config.EVAL_SPLIT, BASE_SEED, min_train=global_batch, min_eval=2)
        missing = f"EVAL_JSONL {eval_jsonl} {absent_or_empty(eval_jsonl)}, so " if eval_jsonl else "no eval JSONL: "
        train_items, eval_items, notes = split.train, split.eval, [f"{missing}{split.reason}"]
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
        compute_loss=ContrastiveStep(config.LOGIT_SCALE), eval_step=ContrastiveEval(config.LOGIT_SCALE), notes=notes,
        cudnn_attention=CUDNN_ATTENTION["clamp2"])


# -- CLaMP 3: the symbolic and the audio stage ---------------------------------------------------------

FROZEN = {"symbolic": ("audio_model", "audio_proj"), "audio": ("symbolic_model", "symbolic_proj")}
TEXT_MODULES = ("text_model", "text_proj")


def frozen_modules(modality: str, freeze_text: bool) -> Tuple[str, ...]:
    """The modules a stage does not train (SPEC_CLAMP3 §17): the other modality's, plus the text side on request."""
    return FROZEN[modality] + (TEXT_MODULES if freeze_text else ())


def clamp3_m3_weights_names(config) -> List[str]:
    """The M3 files CLaMP 3 starts its symbolic encoder from, in the order tried (SPEC_CLAMP3 §12 *fix*):
    the published name (config's M3_WEIGHTS_PATH), then the CLaMP 3 code's field order."""
    clamp3_order = (f"weights_m3_h_size_{config.M3_HIDDEN_SIZE}_t_layers_{config.TOKEN_NUM_LAYERS}"
                    f"_p_layers_{config.PATCH_NUM_LAYERS}_p_size_{config.PATCH_SIZE}_p_length_{config.PATCH_LENGTH}"
                    f"_lr_{config.M3_LEARNING_RATE}_batch_{config.M3_BATCH_SIZE}_mask_{config.M3_MASK_RATIO}.pth")
    published = str(config.M3_WEIGHTS_PATH)
    return [published] + ([str(Path(published).with_name(clamp3_order))]
                          if Path(published).name != clamp3_order else [])


def build_clamp3_model(text_model: str, m3_dims: M3Dims, audio_dims: AudioDims, hidden_size: int,
                       frozen: Sequence[str], m3_names: Sequence[str] = (),
                       log: Callable[[str], None] = print) -> CLaMP3Model:
    """Pretrained text encoder, M3 patch encoder (from the first existing M3 file of ``m3_names``), audio
    BERT; the ``frozen`` modules get ``requires_grad`` False (not in the optimizer, still in train mode)."""
    model = CLaMP3Model(load_text_model(text_model), m3_dims, audio_dims, hidden_size)
    if m3_names:
        found = next((Path(name) for name in m3_names if Path(name).is_file()), None)
        if found is not None:
            load_model_weights(model.symbolic_model, found, prefix="encoder.")
            log(f"symbolic encoder initialised from the M3 checkpoint {found}")
        else:
            log(f"note: CLAMP3_LOAD_M3 is set but no M3 file exists ({' or '.join(m3_names)}): the symbolic "
                "encoder starts from random weights")
    for name in frozen:
        for parameter in getattr(model, name).parameters():
            parameter.requires_grad_(False)
    return model


def clamp3_task(config, modality: str, train_jsonl: str, eval_jsonl: str = "", global_batch: int = 1,
                pad_to_longest: bool = True, log: Callable[[str], None] = print) -> TrainTask:
    """One CLaMP 3 stage (``modality`` symbolic or audio) on a JSONL of SPEC_CLAMP3 §17 (EVAL_SPLIT of it when
    there is no eval JSONL: its files resolve against the training JSONL's folder).

    The text encoder is TEXT_MODEL_NAME; with CLAMP3_LOAD_M3 the symbolic encoder starts from an M3
    file (:func:`clamp3_m3_weights_names`); the other modality's encoder (and with FREEZE_TEXT the
    text side) is frozen. Checkpoints record ``modality``: see the loop's stage rules.
    """
    if modality not in MODALITIES:
        raise ValueError(f"unknown CLaMP 3 modality {modality!r}")
    if not train_jsonl:
        raise DataError("no training data: pass --train_jsonl or set CLAMP3_TRAIN_JSONL in code/config.py")
    audio_dims = AudioDims.from_config(config)
    if modality == "symbolic":
        music = SymbolicMusic(M3Patchilizer(config.PATCH_SIZE, config.PATCH_LENGTH), clamp3=True)
        music_length, position_size = config.PATCH_LENGTH, config.PATCH_SIZE
    else:
        music = AudioMusic(audio_dims.hidden_size, audio_dims.max_length)
        music_length, position_size = audio_dims.max_length, audio_dims.hidden_size
    # With TEXT_DROPOUT a training line's text comes from all its fields: as in the reference, only
    # evaluation needs `analysis` (and training without dropout).
    train_items = read_items(train_jsonl, no_text_problems if config.TEXT_DROPOUT else clamp3_text_problems, music,
                             shared=True)
    notes = []
    if holds_lines(eval_jsonl):
        eval_items = read_items(eval_jsonl, clamp3_text_problems, music, shared=True)
    else:
        # Only lines with an evaluation text can be held out; the others train.
        unheld = [item for item in train_items if not has_analysis(item.fields)]
        if len(unheld) == len(train_items):
            raise DataError(f"{train_jsonl}: no line has an 'analysis' text to evaluate on: add some, or give an "
                            "eval JSONL (--eval_jsonl / CLAMP3_EVAL_JSONL)")
        split = split_eval([item for item in train_items if has_analysis(item.fields)], config.EVAL_SPLIT, BASE_SEED,
                           min_train=max(global_batch - len(unheld), 0), min_eval=2)
        train_items, eval_items = split.train + unheld, split.eval
        missing = f"CLAMP3_EVAL_JSONL {eval_jsonl} {absent_or_empty(eval_jsonl)}, so " if eval_jsonl else "no eval JSONL: "
        notes.append(f"{missing}{split.reason}")
    tokenizer = load_tokenizer(config.TEXT_MODEL_NAME)
    frozen = frozen_modules(modality, config.FREEZE_TEXT)
    notes.append(f"clamp3 {modality} stage: {', '.join(frozen)} frozen")

    def dataset(items, training):
        return TextMusicDataset(items, tokenizer, music, config.MAX_TEXT_LENGTH, training=training,
                                text_dropout=config.TEXT_DROPOUT, train_text=clamp3_training_text,
                                eval_text=clamp3_eval_text)

    return TrainTask(
        build_model=functools.partial(build_clamp3_model, config.TEXT_MODEL_NAME, M3Dims.from_config(config),
                                      audio_dims, config.CLAMP3_HIDDEN_SIZE, frozen,
                                      clamp3_m3_weights_names(config) if config.CLAMP3_LOAD_M3 else (), log),
        train_set=dataset(train_items, True), eval_set=dataset(eval_items, False),
        collate_fn=TextMusicCollator(tokenizer.pad_token_id, config.MAX_TEXT_LENGTH, music_length, position_size,
                                     pad_to_longest, music.pad_value),
        compute_loss=ContrastiveStep(config.LOGIT_SCALE, modality),
        eval_step=ContrastiveEval(config.LOGIT_SCALE, modality), notes=notes, stage=modality,
        cudnn_attention=CUDNN_ATTENTION[modality])
