"""The one training loop of M3, CLaMP 2 and CLaMP 3 (SPEC §7, SPEC_CLAMP3 §17): build once, train, evaluate,
checkpoint, resume.

:func:`run_training` receives a :class:`TrainTask` (model factory, data sets, collate, loss and
eval functions) and :class:`TrainSettings`, and does, in this order:

1. seed the base seed and build the model (same initial weights on every rank), print its
   parameter count, then seed base + rank (the reference's 42 + rank) for dropout and the rest;
2. load the model from the resume checkpoint (``latest_`` + weights name) when LOAD_CKPT is set;
3. wrap it in DistributedDataParallel when several processes run;
4. build AdamW (fused kernel), the LR schedule and the gradient scaler once, then restore their states, the
   counters and the RNG states (each rank its own) from the checkpoint;
5. per epoch: train on full global batches (:class:`~clamp2.training.data.TrainBatches`),
   evaluate every eval sample (:func:`evaluate`), append the reference's log entry, save the best
   checkpoint when the eval loss improves and the latest one always (rank 0, atomically, config
   inside), and every SAVE_EVERY epochs a copy ``…_{epoch}.pth`` when asked; at the end print the best
   eval epoch and its loss.

Stages (CLaMP 3, a task with ``stage`` set): checkpoints record it under ``modality``. A resume
whose latest checkpoint has the same ``modality`` continues exactly; another ``modality``, or none,
is a stage switch: the best file's weights (latest's when there is none) start a new stage at
epoch 1 with a fresh optimizer, schedule and best loss. A stage that starts at epoch 1 refuses to
overwrite existing ``…_{epoch}.pth`` copies (another stage's) unless told to.

Learning rate: constant from the first step by default, which is what the reference actually
trains with (it attaches a warm-up to an optimizer it then replaces); WARMUP_STEPS > 0 ramps it
linearly, step k of the first WARMUP_STEPS using LR · k / WARMUP_STEPS. A resumed run continues at
the rate its checkpoint was trained with, the reference's checkpoints included.

AMP (fp16 autocast + gradient scaling) or bf16 autocast apply on CUDA only; the CPU runs fp32.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset

from ..attention import Autocast
from ..checkpoint import (CLAMP3_CONFIG_HINT, CONFIG_HINT, CheckpointError, SaidOnce, StartRefused,
                          capture_rng_state, copy_checkpoint, exclusive_run, latest_path, load_state, read_checkpoint,
                          restore_rng_state, restore_training_state, resume_source, save_checkpoint, state_dict_of,
                          unwrap)
from ..cli import fail_usage, load_script_config
from ..configuration import config_dict, epoch_weights_path, overrides_of
from ..files import atomic_write_text, output_problem, remove_partial_files_of, unreachable
from ..distributed import (DistInfo, all_reduce_mean, all_reduce_sum, barrier, broadcast_object, deterministic_mode,
                           env_int, gather_objects, seed_everything)
from ..models.common import compile_transformers, count_parameters
from ..progress import plural, progress_bar
from ..workers import exit_with_parent
from .data import DataError, EvalBatches, StoppedElsewhere, TrainBatches, announce_data_error, gather_agreeing
# The trainers' flags live in a module without torch (fast --help).
from .arguments import CUDA_LOADER_WORKERS, PREFETCH_BATCHES

BASE_SEED = 42

# (flag, constant after the M3_/CLAMP2_ prefix): flags that set a config.py constant. They are
# applied as that constant's environment override, so file names follow them the same way.
SHARED_FLAG_CONSTANTS = (("epochs", "NUM_EPOCH"), ("batch_size", "BATCH_SIZE"), ("learning_rate", "LEARNING_RATE"),
                         ("warmup_steps", "WARMUP_STEPS"), ("weights", "WEIGHTS_PATH"))


@dataclass
class TrainSettings:
    """Everything the loop needs besides the task; see :func:`settings_from` for their sources."""

    name: str  # "m3" or "clamp2": progress bar, messages, W&B project
    weights_path: Path
    logs_path: Path
    num_epochs: int
    batch_size: int  # per process
    learning_rate: float
    warmup_steps: int = 0
    load_ckpt: bool = True
    deterministic: bool = True
    seed: int = BASE_SEED
    precision: str = "fp16"  # on CUDA: fp16 = AMP + gradient scaling (the reference), bf16, or fp32
    num_workers: Optional[int] = None  # None: training_workers() (loader processes on CUDA, none on the CPU)
    max_steps_per_epoch: int = 0  # 0: whole epochs; N: stop each epoch after N optimizer steps
    wandb: bool = False
    progress: bool = True
    prefix: str = ""  # "M3_", "CLAMP2_" or "CLAMP3_": names the config constants in messages
    save_every: int = 0  # > 0: also keep a copy of the checkpoint every this many epochs (…_{epoch}.pth)
    overwrite_epoch_files: bool = False  # a new stage may overwrite existing …_{epoch}.pth copies
    compile: bool = False  # torch.compile the transformers inside the model (--compile)
    config: Dict[str, Any] = field(default_factory=dict)


# eval_step(model, batch or None, counts, dist_info) → (loss sum, weight) of this rank's part of one
# global batch, in float32; the eval loss is Σ loss sums / Σ weights over all batches and ranks.
EvalStep = Callable[[nn.Module, Optional[Dict[str, torch.Tensor]], Sequence[int], DistInfo], Tuple[float, float]]


@dataclass
class TrainTask:
    """What differs between M3 and CLaMP 2 training."""

    build_model: Callable[[], nn.Module]
    train_set: Dataset
    eval_set: Dataset
    collate_fn: Callable
    compute_loss: Callable[[nn.Module, Dict[str, torch.Tensor]], torch.Tensor]
    eval_step: EvalStep
    notes: List[str] = field(default_factory=list)  # said once training starts (e.g. how the eval split was made)
    stage: Optional[str] = None  # CLaMP 3: "symbolic" or "audio", saved as the checkpoints' ``modality``
    cudnn_attention: bool = False  # its batches keep their shapes: cuDNN's attention pays (tasks.CUDNN_ATTENTION)


@dataclass
class TrainResult:
    start_epoch: int  # epochs already done when this run started
    last_epoch: int
    best_epoch: int
    min_eval_loss: float
    train_losses: List[float] = field(default_factory=list)
    eval_losses: List[float] = field(default_factory=list)


# -- settings from config.py and the command line --------------------------------------------------

def flag_overrides(args, prefix: str, extra: Mapping[str, Any] = ()) -> Dict[str, Any]:
    """``{constant: value}`` for the flags given: the shared ones under ``prefix``, plus ``extra``."""
    overrides = {prefix + constant: getattr(args, flag) for flag, constant in SHARED_FLAG_CONSTANTS
                 if getattr(args, flag) is not None}
    if args.wandb:
        overrides[prefix + "WANDB_LOG"] = True
    if args.no_resume:
        overrides[prefix + "LOAD_CKPT"] = False
    overrides.update({name: value for name, value in dict(extra).items() if value is not None})
    return overrides


def environment_text(value: Any) -> str:
    """``value`` written as an environment override that parses back to it (see clamp2.configuration)."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, (list, tuple)):
        return json.dumps([str(item) for item in value])
    if isinstance(value, float):
        return repr(value)
    return str(value)


@contextlib.contextmanager
def environment(values: Mapping[str, str]):
    """``os.environ`` with ``values`` set while active, restored afterwards."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def load_training_config(script_file: str, overrides: Mapping[str, Any], dist_info: DistInfo):
    """``code/config.py`` with the environment's overrides and then the flags' (``overrides``) applied.

    A flag is passed to config.py as the environment override of its constant, so it changes
    everything that constant changes, the derived weights and log file names included. The values
    that differ from config.py are printed once.
    """
    with environment({name: environment_text(value) for name, value in overrides.items()}):
        config = load_script_config(script_file, report=False)
    changed = overrides_of(config)
    if changed and dist_info.is_main:
        items = ", ".join(f"{name}={value!r} (default {default!r})" for name, (default, value) in changed.items())
        print(f"settings changed from code/config.py (flags and environment): {items}", file=sys.stderr, flush=True)
    return config


def settings_from(args, config, prefix: str, name: str) -> TrainSettings:
    """The loop's settings: config.py's ``<prefix>*`` constants (flags already applied) and run-time flags."""

    def constant(key):
        return getattr(config, prefix + key)

    for key, least in (("BATCH_SIZE", 1), ("NUM_EPOCH", 0), ("WARMUP_STEPS", 0), ("LEARNING_RATE", 0)):
        if constant(key) < least:
            fail_usage(f"{prefix}{key} is {constant(key)}; it must be at least {least} (code/config.py, its "
                       "environment override or the flag)")
    return TrainSettings(
        name=name, prefix=prefix, weights_path=Path(constant("WEIGHTS_PATH")), logs_path=Path(constant("LOGS_PATH")),
        num_epochs=constant("NUM_EPOCH"), batch_size=constant("BATCH_SIZE"), learning_rate=constant("LEARNING_RATE"),
        warmup_steps=constant("WARMUP_STEPS"), load_ckpt=constant("LOAD_CKPT"), deterministic=constant("DETERMINISTIC"),
        precision=args.precision, num_workers=args.num_workers, max_steps_per_epoch=args.max_steps_per_epoch,
        wandb=constant("WANDB_LOG"), progress=not args.no_progress, config=config_dict(config),
        compile=getattr(args, "compile", False))


# -- numerics ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Precision:
    """Autocast dtype (None: fp32) and whether gradients are scaled (fp16 only)."""

    device_type: str
    dtype: Optional[torch.dtype]
    cudnn_attention: bool = False  # may sdpa use cuDNN's kernel under autocast (clamp2.attention.Autocast)

    @classmethod
    def choose(cls, device: torch.device, requested: str, cudnn_attention: bool = False) -> "Precision":
        if device.type != "cuda" or requested == "fp32":
            return cls(device.type, None)
        return cls(device.type, torch.bfloat16 if requested == "bf16" else torch.float16, cudnn_attention)

    @property
    def scaled(self) -> bool:
        return self.dtype == torch.float16

    def autocast(self):
        return Autocast(self.device_type, self.dtype, self.cudnn_attention) if self.dtype else contextlib.nullcontext()

    def __str__(self) -> str:
        return {None: "fp32", torch.float16: "fp16 AMP + gradient scaling", torch.bfloat16: "bf16 autocast"}[self.dtype]


class LinearWarmup:
    """LR factor after ``step`` optimizer steps: min(1, (step + 1) / warmup_steps), 1 without warm-up.

    A class, not a closure: LambdaLR saves its attributes in ``lr_sched``, so a resumed run
    continues the schedule its checkpoint was trained with.
    """

    def __init__(self, warmup_steps: int):
        self.warmup_steps = warmup_steps

    def __call__(self, step: int) -> float:
        return 1.0 if self.warmup_steps <= 0 else min(1.0, (step + 1) / self.warmup_steps)


def lr_schedule(optimizer, warmup_steps: int) -> LambdaLR:
    """Linear warm-up over ``warmup_steps`` optimizer steps, then constant (constant from step 1 when 0)."""
    return LambdaLR(optimizer, LinearWarmup(warmup_steps))


def describe_schedule(lr_sched: LambdaLR) -> str:
    peak, warmup, done = lr_sched.base_lrs[0], lr_sched.lr_lambdas[0].warmup_steps, lr_sched.last_epoch
    if warmup <= 0:
        return f"learning rate {peak:g}, constant"
    if done >= warmup:
        return f"learning rate {peak:g} (its {warmup}-step warm-up done)"
    return f"learning rate {peak * LinearWarmup(warmup)(done):.3g}, warming up to {peak:g} in {warmup - done} more steps"


def adopt_checkpoint_schedule(checkpoint: Mapping[str, Any], optimizer, lr_sched: LambdaLR) -> str:
    """Make ``lr_sched`` (its state already loaded) continue at the LR the checkpoint trained with; say how.

    - this project's checkpoints save the warm-up length with the schedule: nothing to do;
    - earlier ones of this project recorded it under ``training``;
    - the reference's scheduler drove an optimizer that was then replaced, so its state (a
      warm-up of a few hundred steps, say) never applied: the rate it trained with is its
      optimizer's, constant.
    """
    saved = ((checkpoint.get("lr_sched") or {}).get("lr_lambdas") or [None])[0]
    if isinstance(saved, Mapping) and "warmup_steps" in saved:
        return describe_schedule(lr_sched)
    training = checkpoint.get("training")
    if isinstance(training, Mapping) and "warmup_steps" in training:
        lr_sched.lr_lambdas[0].warmup_steps = int(training["warmup_steps"])
        return describe_schedule(lr_sched)
    rates = [group["lr"] for group in optimizer.param_groups]
    lr_sched.lr_lambdas[0].warmup_steps = 0
    lr_sched.base_lrs = list(rates)
    lr_sched._last_lr = list(rates)
    for group in optimizer.param_groups:
        group["initial_lr"] = group["lr"]
    return (f"{describe_schedule(lr_sched)}: the rate its optimizer trained with (the reference's warm-up "
            "scheduler drives an optimizer it then replaces, so it never applied)")


def make_optimizer(model: nn.Module, learning_rate: float) -> torch.optim.AdamW:
    """AdamW with the reference's settings over the trainable parameters, computed by the fused kernel.

    Frozen parameters (``requires_grad`` False: CLaMP 3's other modality) are not in it, as in the reference.

    Same update up to rounding (~3e-8 after 50 steps), one pass per tensor instead of a dozen:
    3-4× faster on the CPU, where CLaMP 2's 250k-token text embedding otherwise makes the optimizer
    ~60% of a small model's step.
    """
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate, fused=True)


def keep_fused(optimizer: torch.optim.AdamW) -> None:
    """Run a restored optimizer fused: a loaded state brings its own settings (the reference's: unfused).

    The fused kernel keeps each step counter as a float32 tensor beside its parameter.
    """
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = True, None
        for parameter in group["params"]:
            state = optimizer.state.get(parameter)
            if state and "step" in state:
                state["step"] = state["step"].to(device=parameter.device, dtype=torch.float32)


def move_batch(batch: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def train_step(model: nn.Module, batch: Dict[str, torch.Tensor], compute_loss, optimizer, lr_sched, scaler,
               precision: Precision) -> torch.Tensor:
    """One optimizer step on one batch; returns the loss as a tensor, on a GPU not computed yet.

    Reading it (``.item()``) waits for the whole step: :func:`train_epoch` reads it once the next
    step is queued, so the device never runs dry between steps.
    """
    with precision.autocast():
        loss = compute_loss(model, batch)
    optimizer_step(loss, optimizer, lr_sched, scaler)
    return loss.detach()


def one_step_late(steps: Iterable) -> Iterator:
    """Each item of ``steps`` once the next one is made (the last at the end): a step's loss is read
    while the device already has the following step queued."""
    unread = None
    for step in steps:
        if unread is not None:
            yield unread[0]
        unread = (step,)
    if unread is not None:
        yield unread[0]


def optimizer_step(loss: torch.Tensor, optimizer, lr_sched, scaler) -> None:
    """Backward (scaled for fp16 AMP), optimizer and schedule step, gradients cleared."""
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    lr_sched.step()
    optimizer.zero_grad(set_to_none=True)


def train_epoch(model, loader, compute_loss, optimizer, lr_sched, scaler, precision: Precision, dist_info: DistInfo,
                settings: TrainSettings, epoch: int, wandb_run=None) -> float:
    """Mean training loss of one epoch over all ranks."""
    model.train()
    steps_in_epoch = len(loader) if not settings.max_steps_per_epoch else min(len(loader), settings.max_steps_per_epoch)
    samples_per_step = settings.batch_size * dist_info.world_size
    bar = progress_bar(total=steps_in_epoch, desc=f"{settings.name} epoch {epoch}", unit="step",
                       enabled=dist_info.is_main and settings.progress)
    total, steps, start = 0.0, 0, time.perf_counter()

    def finish(loss: torch.Tensor, lr: float) -> None:
        nonlocal total, steps
        loss = loss.item()
        total += loss
        steps += 1
        rate = steps * samples_per_step / (time.perf_counter() - start)
        # No forced refresh: in a log file the bar writes a line at most every 30 s (clamp2.progress).
        bar.set_postfix(loss=f"{total / steps:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.1f}", refresh=False)
        bar.update(1)
        if wandb_run is not None:
            wandb_run.log({"train_loss": loss, "lr": lr, "samples_per_s": rate})

    # The learning rate is read after each step, as the schedule has moved it.
    steps_run = ((train_step(model, move_batch(batch, dist_info.device), compute_loss, optimizer, lr_sched, scaler,
                             precision), optimizer.param_groups[0]["lr"])
                 for batch in itertools.islice(loader, steps_in_epoch))
    for loss, lr in one_step_late(steps_run):
        finish(loss, lr)
    bar.close()
    return all_reduce_mean(total / max(steps, 1), dist_info.device)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, eval_step: EvalStep, dist_info: DistInfo) -> float:
    """The eval loss over every eval sample: Σ loss sums / Σ weights of the task's ``eval_step``.

    Every rank walks the same global batches (:func:`~clamp2.training.data.eval_plan`), with an
    empty part (``batch`` None) where the eval set ran out before reaching it. The model is used
    unwrapped: no gradient, so DistributedDataParallel has nothing to synchronise. It runs in float32
    whatever ``--precision`` trains with, as the reference's ``eval_epoch`` does (no autocast): the
    eval loss picks the best checkpoint, and fp16 rounding must not pick a different epoch.
    """
    model.eval()
    net = unwrap(model)
    batches = iter(loader)
    loss_sum, weight = 0.0, 0.0
    for counts in loader.batch_sampler.plan:
        batch = move_batch(next(batches), dist_info.device) if counts[dist_info.rank] else None
        part_sum, part_weight = eval_step(net, batch, counts, dist_info)
        loss_sum, weight = loss_sum + part_sum, weight + part_weight
    loss_sum, weight = all_reduce_sum([loss_sum, weight], dist_info.device)
    return loss_sum / weight


# -- helpers ---------------------------------------------------------------------------------------

def check_data_sizes(task: TrainTask, settings: TrainSettings, world_size: int) -> None:
    """Fail before the first step when the training set cannot fill one global batch; say what would."""
    global_batch = settings.batch_size * world_size
    samples = len(task.train_set)
    if samples >= global_batch:
        return
    fits = samples // world_size
    if fits:
        hint = f"use --batch_size {fits} (or {settings.prefix}BATCH_SIZE={fits}) or less"
    else:
        hint = f"use at most {samples} processes with --batch_size 1"
    raise DataError(f"the training set has {samples} samples, fewer than one global batch of {global_batch} "
                    f"({settings.batch_size} per process × {plural(world_size, 'process', 'es')}): {hint}")


def training_workers(settings: TrainSettings, dist_info: DistInfo) -> int:
    """``--num_workers``, or by default: none on the CPU (the workers would take the cores the model
    uses), up to CUDA_LOADER_WORKERS per rank on CUDA, leaving each rank of the node a core."""
    if settings.num_workers is not None:
        return settings.num_workers
    if dist_info.device.type != "cuda":
        return 0
    ranks_here = max(1, env_int("LOCAL_WORLD_SIZE", 1))
    return max(0, min(CUDA_LOADER_WORKERS, (os.cpu_count() or 1) // ranks_here - 1))


def loader_options(settings: TrainSettings, dist_info: DistInfo) -> Dict[str, Any]:
    """Worker processes that persist across epochs and prefetch; pinned batches on CUDA (copied asynchronously)."""
    workers = training_workers(settings, dist_info)
    options: Dict[str, Any] = {"num_workers": workers, "pin_memory": dist_info.device.type == "cuda"}
    if workers:
        # Workers are forked processes: the tokenizer's own thread pool must not be used across the fork.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        # Persistent workers keep their copy of the data set: the epoch reaches it with each index
        # (EpochIndexedBatches), not through set_epoch in this process.
        options.update(persistent_workers=True, prefetch_factor=PREFETCH_BATCHES, worker_init_fn=exit_with_parent)
    return options


class PersistentLoader(DataLoader):
    """A DataLoader whose persistent workers leave the random streams as fresh workers each epoch would.

    A fresh iterator draws its workers' base seed from torch's global generator; the persistent
    one is reused and draws nothing, which would shift every later dropout mask. The draw is made
    anyway, so a run's numbers do not depend on ``--num_workers`` (the samples themselves come
    from per-sample generators, never from the workers' seed).
    """

    def __iter__(self):
        if self.persistent_workers and self.num_workers > 0 and self._iterator is not None:
            torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        return super().__iter__()


class EpochIndexedBatches:
    """A batch sampler whose indices carry the epoch, ``(epoch, index)``, for :class:`EpochDataset`.

    Workers that persist across epochs hold their own copy of the data set, made at the first
    epoch: ``set_epoch`` in the main process never reaches it, and each epoch would draw the first
    epoch's crops, corruption and texts again. Other attributes (``plan``) are the sampler's.
    """

    def __init__(self, batches):
        self.batches = batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.batches, "set_epoch"):
            self.batches.set_epoch(epoch)

    def __iter__(self):
        epoch = self.epoch
        return ([(epoch, index) for index in batch] for batch in self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def __getattr__(self, name):
        if name == "batches":  # not yet set (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.batches, name)


class EpochDataset(Dataset):
    """The data set seen through ``(epoch, index)`` items: the epoch is set, then the sample drawn."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item):
        epoch, index = item
        self.set_epoch(epoch)
        return self.dataset[index]

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


def make_loaders(task: TrainTask, settings: TrainSettings, dist_info: DistInfo, seed: int) -> Tuple[DataLoader,
                                                                                                       DataLoader]:
    options = loader_options(settings, dist_info)
    batches = TrainBatches(len(task.train_set), settings.batch_size, dist_info.world_size, dist_info.rank, seed)
    train = PersistentLoader(EpochDataset(task.train_set), collate_fn=task.collate_fn, **options,
                             batch_sampler=EpochIndexedBatches(batches))
    evaluation = PersistentLoader(task.eval_set, collate_fn=task.collate_fn, **options,
                                  batch_sampler=EvalBatches(len(task.eval_set), settings.batch_size,
                                                            dist_info.world_size, dist_info.rank))
    return train, evaluation


def set_epoch(loader: DataLoader, epoch: int) -> None:
    if hasattr(loader.batch_sampler, "set_epoch"):
        loader.batch_sampler.set_epoch(epoch)
    if hasattr(loader.dataset, "set_epoch"):
        loader.dataset.set_epoch(epoch)


def parameter_digest(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in unwrap(model).state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def check_in_sync(model: nn.Module, dist_info: DistInfo) -> str:
    """The parameters' digest, after checking that every rank holds the same parameters."""
    digests = gather_objects(parameter_digest(model))
    if len(set(digests)) != 1:
        raise RuntimeError(f"ranks hold different parameters after training (digests by rank: {digests})")
    return digests[0]


def start_wandb_run(enabled: bool, dist_info: DistInfo, project: str, name: str, config: Dict[str, Any]):
    """A W&B run on rank 0 when asked for, else None; the key comes from the environment (WANDB_API_KEY).

    wandb is imported only here: it is an optional extra, and a missing one is a note, not an error.
    """
    if not (enabled and dist_info.is_main):
        return None
    try:
        import wandb
    except ImportError:
        print("note: W&B logging was asked for but `wandb` is not installed (pip install wandb); "
              "training goes on without it", file=sys.stderr)
        return None
    return wandb.init(project=project, name=name, config=config, resume="allow")


def start_wandb(settings: TrainSettings, dist_info: DistInfo):
    return start_wandb_run(settings.wandb, dist_info, f"clamp2-{settings.name}", settings.weights_path.stem,
                           settings.config)


def training_record(settings: TrainSettings, dist_info: DistInfo, precision: Precision) -> Dict[str, Any]:
    """What this run used beside config.py (stored in checkpoints next to the config)."""
    return {"batch_size": settings.batch_size, "world_size": dist_info.world_size,
            "learning_rate": settings.learning_rate, "warmup_steps": settings.warmup_steps,
            "num_epochs": settings.num_epochs, "precision": str(precision),
            "max_steps_per_epoch": settings.max_steps_per_epoch, "seed": settings.seed,
            "save_every": settings.save_every}


def sample_names(dataset: Dataset) -> Iterator[str]:
    """What names each sample of a training data set: its music files (names, not folders: data moved elsewhere is
    the same data) and, for JSONL pairs, the line."""
    for path in getattr(dataset, "paths", None) or ():
        yield Path(path).name
    for item in getattr(dataset, "items", None) or ():
        yield f"{item.line_number}\t" + "\t".join(Path(path).name for path in item.music_paths)


def data_record(task: TrainTask) -> Dict[str, Any]:
    """Sample counts and a digest of which samples train and evaluate (stored in checkpoints as ``data``)."""
    record = {}
    for part, dataset in (("train", task.train_set), ("eval", task.eval_set)):
        digest = hashlib.sha256()
        for name in sample_names(dataset):
            digest.update(name.encode("utf-8", "surrogateescape") + b"\n")
        record[part] = {"samples": len(dataset), "digest": digest.hexdigest()[:16]}
    return record


def data_change(checkpoint: Mapping[str, Any], source: Path, data: Mapping[str, Any]) -> Optional[str]:
    """A note when a resume trains or evaluates on other samples than the checkpoint's run did (none for checkpoints
    written before the record existed): the run is not the uninterrupted one, and the best epoch is chosen by
    comparing eval losses of two eval sets."""
    saved = checkpoint.get("data")
    if not isinstance(saved, Mapping) or dict(saved) == dict(data):
        return None
    changed = [f"{part} {saved[part].get('samples')} samples there, {data[part]['samples']} here"
               + ("" if saved[part].get("samples") != data[part]["samples"] else " (other files)")
               for part in ("train", "eval") if isinstance(saved.get(part), Mapping) and saved[part] != data[part]]
    return (f"note: {source} was trained on other data ({'; '.join(changed)}): this run does not continue it as an "
            "uninterrupted run would, and a changed eval set makes its eval losses incomparable with the best "
            f"epoch's; pass --no_resume to train afresh, or give this run its own --weights")


def restore_random_state(rng: Optional[Dict[str, Any]], seed: int, epoch: int, dist_info: DistInfo) -> int:
    """Restore this rank's generators from a checkpoint's ``rng`` entry; returns the data seed to use.

    A checkpoint from another number of processes (or without the entry, e.g. the reference's)
    cannot continue each rank's streams: they are re-seeded and the run is not bit-exact.
    """
    ranks = rng.get("ranks") if rng else None
    if rng and rng.get("world_size") == dist_info.world_size and isinstance(ranks, list) and len(ranks) == dist_info.world_size:
        restore_rng_state(rng["ranks"][dist_info.rank])
        return int(rng["data_seed"])
    written_by = f"{rng.get('world_size')} processes" if rng else "a run without random states"
    say(dist_info, f"note: the checkpoint was written by {written_by} and this run has {dist_info.world_size}: "
                   "random streams are re-seeded, so the resumed run is not bit-exact")
    seed_everything(seed + dist_info.rank + epoch)
    return int(rng["data_seed"]) if rng else seed


def log_problem(path: Path) -> Optional[str]:
    """Why the per-epoch log cannot be appended to (a read-only file, a folder this user may not write), or None."""
    reached = unreachable(path, "log file")
    if reached:
        return f"{reached}; fix its permissions or give the run another log path"
    if path.exists() and not path.is_dir():
        # Appended to where it is: its own permission counts, not its folder's (a log made beforehand in a folder
        # this user may not write to, or /dev/null, were refused).
        return None if os.access(path, os.W_OK) else (f"cannot write log file {path}: it is read-only; fix its "
                                                       "permissions or give the run another log path")
    return output_problem(path, folder=False, what="log")  # a folder, or a folder it would be made in: one line


def append_log(path: Path, epoch: int, train_loss: float, eval_loss: float) -> None:
    """The reference's per-epoch entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(f"Epoch {epoch}\ntrain_loss: {train_loss}\neval_loss: {eval_loss}\ntime: {time.asctime()}\n\n")


def hide_library_bars() -> None:
    """No transformers loading bars (``--no_progress``, and ranks other than 0)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def quiet_libraries() -> None:
    """Silence transformers' notices and loading bars (called on ranks other than 0: one copy is enough)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hide_library_bars()


def report_error(exc: Exception, dist_info: DistInfo, every_rank: bool = False, each_node: bool = False) -> int:
    """Print an error once (rank 0) or, for errors that may hit one rank alone, on each rank; returns 2.

    Data checks before training give every rank the same error; a file that fails mid-training fails
    on the rank that reads it, and torchrun then stops the others. ``each_node``: also on the first process of
    every node (LOCAL_RANK 0), for errors of what a node reads (its data folders: a node without the shared file
    system, or with its own copy, finds an error that rank 0 does not, and nothing said it).
    """
    if isinstance(exc, StoppedElsewhere):  # another rank's error, said there (each_node) and here once
        every_rank = each_node = False
    elif each_node and dist_info.is_distributed:
        # The others wait at the launch check's next collective: they learn it there and stop with it, not with a
        # gloo "Connection closed by peer" traceback once this rank has exited.
        announce_data_error(str(exc))
    if dist_info.is_main or every_rank or (each_node and dist_info.local_rank == 0):
        where = f" (rank {dist_info.rank})" if (every_rank and dist_info.is_distributed) or \
            (each_node and not dist_info.is_main) else ""
        print(f"error{where}: {exc}", file=sys.stderr, flush=True)
    return 2


def say(dist_info: DistInfo, message: str) -> None:
    if dist_info.is_main:
        print(message, flush=True)


def settings_that_differ(checkpoint: Mapping[str, Any], config: Mapping[str, Any]) -> List[str]:
    """``"KEY old there, new here"`` for each config value this run changes against the checkpoint's record
    (paths and epoch counts left out: those change between runs by design)."""
    saved = checkpoint.get("config") if isinstance(checkpoint.get("config"), Mapping) else {}
    sources = [value for key, value in saved.items() if "TRAIN_" in key and key.endswith(("FOLDERS", "JSONL"))]
    if sources and not any(sources):
        # Written before flags entered the record (to 2026-11-30): it holds code/config.py's values, not the run's
        # (no training data at all): comparing it named settings the run never had ("BATCH_SIZE 16 there").
        return []
    return [f"{key} {saved[key]!r} there, {value!r} here" for key, value in config.items()
            if key in saved and saved[key] != value and not key.endswith("_PATH") and "EPOCH" not in key]


def restore_state_of(checkpoint: Mapping[str, Any], source: Path, settings: TrainSettings, optimizer, lr_sched,
                     scaler) -> dict:
    """:func:`restore_training_state`; an optimizer state that does not fit this run's trained parameters
    (another FREEZE_TEXT, another model) is one line naming the file and the settings that differ."""
    try:
        return restore_training_state(checkpoint, optimizer=optimizer, lr_sched=lr_sched, scaler=scaler)
    except (ValueError, KeyError, IndexError) as exc:  # not RuntimeError: out of memory is not a misfit
        differ = settings_that_differ(checkpoint, settings.config)
        why = f"; settings that differ: {'; '.join(differ[:4])}" if differ else ""
        raise CheckpointError(f"the training state in {source} does not fit this run's trained parameters "
                              f"({' '.join(str(exc).split())[:160]}){why}; resume with the settings it was written "
                              "with, or give this run its own --weights") from exc


def read_resume_checkpoint(source: Path, settings: TrainSettings) -> Dict[str, Any]:
    """:func:`read_checkpoint` of the file a run resumes from; one that cannot be read (cut short by a full disk
    or a copy, damaged) is named with this run's ways on, not with those of a downloaded weights file."""
    try:
        return read_checkpoint(source)
    except CheckpointError as exc:
        text = exc.problem
        best = Path(settings.weights_path)
        way = (f"delete it to resume from {best}" if Path(source) != best and best.is_file()
               else "move it away")
        raise CheckpointError(f"{text}; it is the file this run resumes from: {way}, or pass --no_resume to train "
                              f"afresh (replacing {best} and {latest_path(best)})") from None


def stage_switch(weights_path: Path, source: Path, checkpoint: Dict[str, Any], stage: str):
    """(source, checkpoint, message) of a stage switch: the best file's weights (the reference reads it; the
    latest when there is no best file) start ``stage`` afresh."""
    best = Path(weights_path)
    if Path(source) != best and best.is_file():
        try:
            source, checkpoint = best, read_checkpoint(best)
        except CheckpointError as exc:  # the earlier stage's own file: written again or deleted, not downloaded
            raise CheckpointError(unreadable_stage_file(exc.problem, best, source, checkpoint, stage)) from None
    previous = checkpoint.get("modality")
    written = (f"written by the {previous} stage" if previous
               else "without a 'modality' entry (not written by a CLaMP 3 stage)")
    return source, checkpoint, (f"new {stage} stage: {source} was {written}, epoch {checkpoint.get('epoch', '?')}; "
                                f"its weights start the {stage} stage at epoch 1 (fresh optimizer, schedule, best "
                                "loss)")


def unreadable_stage_file(problem: str, best: Path, latest: Path, checkpoint: Mapping[str, Any], stage: str) -> str:
    """The line for an earlier stage's best file that cannot be read (``latest``'s ``checkpoint`` points to it)."""
    previous = checkpoint.get("modality") or "earlier"
    best_epoch, last = checkpoint.get("best_epoch", "?"), checkpoint.get("epoch", "?")
    copy = Path(epoch_weights_path(str(best), best_epoch)) if isinstance(best_epoch, int) else None
    restore = f"copy {copy} (that epoch's copy) over it, " if copy is not None and copy.is_file() else ""
    return (f"{problem}; it is the {previous} stage's best file (epoch {best_epoch}), which this {stage} stage starts "
            f"from: {restore}re-run the {previous} stage (--no_resume trains it again), or delete it to start from "
            f"{latest} (epoch {last}, that stage's last epoch)")


def refuse_overwriting_epoch_files(settings: TrainSettings) -> None:
    """A stage starting at epoch 1 must not overwrite the ``…_{epoch}.pth`` copies an earlier stage left."""
    if settings.save_every <= 0 or settings.overwrite_epoch_files:
        return
    copies = [Path(epoch_weights_path(str(settings.weights_path), epoch))
              for epoch in range(settings.save_every, settings.num_epochs + 1, settings.save_every)]
    existing = broadcast_object([str(path) for path in copies if path.is_file()])
    if existing:
        more = f" and {len(existing) - 1} more" if len(existing) > 1 else ""
        raise StartRefused(f"this new stage would overwrite {existing[0]}{more} (epoch copies of an earlier stage): "
                           "move them away, give this stage its own --weights, or pass --overwrite_epoch_files")


def epoch_files_owed(settings: TrainSettings, epoch: int, best: bool, save_every: Optional[int] = None) -> List[Path]:
    """Copies of ``latest_`` an epoch writes after it: the best file (when the eval loss improved), the epoch copy
    (every ``save_every`` epochs: the run's own by default; a resume passes that of the run that wrote the epoch)."""
    save_every = settings.save_every if save_every is None else save_every
    owed = [Path(settings.weights_path)] if best else []
    if save_every and epoch % save_every == 0:
        owed.append(Path(epoch_weights_path(str(settings.weights_path), epoch)))
    return owed


LOG_ENTRY = re.compile(r"^Epoch (\S+)\ntrain_loss: (\S+)\neval_loss: (\S+)$", re.M)  # one epoch's entry in a log


def logged_entries(path: Path) -> List[Tuple[str, str, str]]:
    """(epoch, train_loss, eval_loss) as written in each entry of a log file (none when it is missing)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    return LOG_ENTRY.findall(text)


def drop_log_entries_after(path: Path, checkpoint: Mapping[str, Any]) -> int:
    """Remove the log entries after the checkpoint's own epoch entry (its epoch and losses); return how many.

    A resume from the best file (``latest_`` deleted) redoes the epochs after it, whose entries the log holds.
    Entries before it (an earlier stage's, in CLaMP 3's shared log) stay; a log without the entry is left alone."""
    losses = checkpoint.get("losses")
    if not isinstance(losses, Mapping):
        return 0
    try:
        text = path.read_text(encoding="utf-8")
    except (FileNotFoundError, UnicodeDecodeError):
        return 0
    entries = list(LOG_ENTRY.finditer(text))
    own = (str(checkpoint.get("epoch")), str(losses.get("train")), str(losses.get("eval")))
    found = [index for index, entry in enumerate(entries) if entry.groups() == own]
    if not found or found[-1] == len(entries) - 1:
        return 0
    atomic_write_text(path, text[:entries[found[-1] + 1].start()])
    return len(entries) - 1 - found[-1]


def remove_killed_saves(settings: TrainSettings, epochs: int = 0) -> int:
    """Delete the temporary files that killed saves of this run's checkpoints left (each as large as one); epoch
    copies up to ``epochs`` too, when more than this run's (a killed run with a higher --epochs)."""
    weights = Path(settings.weights_path)
    paths = [weights, latest_path(weights)] + [Path(epoch_weights_path(str(weights), epoch))
                                               for epoch in range(1, max(settings.num_epochs, epochs) + 1)]
    return remove_partial_files_of(paths)  # one listing of the folder, not one per epoch copy


def same_data_everywhere(data: Mapping[str, Any], dist_info: DistInfo) -> None:
    """Every rank must train and evaluate on the same samples (:func:`data_record`): nodes with their own copies of
    the data folders, one missing a file, each drew its own batches from its own list, and a rank with fewer
    batches waited for the others at a collective until the group's 30-minute timeout."""
    if not dist_info.is_distributed:
        return
    views = gather_agreeing(dict(data), "comparing the samples")
    if any(view != views[0] for view in views):
        described = "; ".join(f"rank {rank}: {view['train']['samples']} training, {view['eval']['samples']} eval "
                              f"samples" for rank, view in enumerate(views))
        raise SaidOnce(f"the ranks do not see the same training data ({described}; or other files): every node "
                       "needs the same data folders and JSONL files (a shared file system, or identical copies)")


def same_checkpoint_everywhere(source: Optional[Path], checkpoint: Optional[Mapping[str, Any]],
                               dist_info: DistInfo) -> None:
    """Every rank must resume from the same checkpoint: ranks on nodes without a shared weights folder would
    each read their own (or none) and train apart, then hang at a collective the others never reach."""
    if not dist_info.is_distributed:
        return
    seen = (Path(source).name if source is not None else None,
            int(checkpoint.get("epoch", 0)) if checkpoint is not None else None,
            checkpoint.get("modality") if checkpoint is not None else None)
    views = gather_objects(seen)
    if any(view != views[0] for view in views):
        described = "; ".join(f"rank {rank}: " + (f"{name} (epoch {epoch})" if name else "no checkpoint")
                              for rank, (name, epoch, _) in enumerate(views))
        raise CheckpointError(f"the ranks do not see the same checkpoint to resume from ({described}); every node "
                              "needs the same weights folder (a shared file system, or a copy on each node)")


def catch_up_epoch_files(settings: TrainSettings, source: Path, checkpoint: Mapping[str, Any],
                         stage: Optional[str], dist_info: DistInfo) -> List[str]:
    """Write what the last epoch of ``latest_`` (``source``) still owes, when a run was killed after saving it.

    An epoch saves ``latest_``, then the best file and the epoch copy (copies of it), then the log entry;
    a kill in between left them out, and a resume starts at the next epoch. Each is written now, from
    ``latest_``, unless it already holds that epoch of this stage. Says, and returns, what was written.
    """
    weights = Path(settings.weights_path)
    epoch = int(checkpoint.get("epoch", 0))
    if Path(source) != latest_path(weights) or epoch <= 0:
        return []
    written = []
    # The epoch copies of the run that wrote it (another stage's, or before a changed --save_every): none when
    # the checkpoint does not say (written before this record existed).
    record = checkpoint.get("training") if isinstance(checkpoint.get("training"), Mapping) else {}
    save_every = int(record.get("save_every") or 0)
    for owed in epoch_files_owed(settings, epoch, int(checkpoint.get("best_epoch", 0)) == epoch, save_every):
        if owed.is_file():  # written already, or left by an earlier stage or run (then replaced)
            try:
                present = read_checkpoint(owed, mmap=True)
                done = int(present.get("epoch", -1)) == epoch and present.get("modality") == stage
                del present  # unmapped before the file may be replaced (Windows refuses to replace a mapped file)
                if done:
                    continue
            except CheckpointError:
                pass  # unreadable: replaced by the copy
        copy_checkpoint(source, owed)
        written.append(str(owed))
    losses = checkpoint.get("losses")
    # The entry itself, losses included: CLaMP 3's two stages share a log, and both have an epoch 1.
    if isinstance(losses, Mapping) and (str(epoch), str(losses.get("train")), str(losses.get("eval"))) \
            not in logged_entries(settings.logs_path):
        append_log(settings.logs_path, epoch, losses.get("train"), losses.get("eval"))
        written.append(f"{settings.logs_path} (epoch {epoch})")
    if written:
        say(dist_info, f"the run that wrote {source} stopped before the rest of its epoch's files; "
                       f"written now: {', '.join(written)}")
    return written


# -- the loop ----------------------------------------------------------------------------------------

def run_training(task: TrainTask, settings: TrainSettings, dist_info: DistInfo) -> TrainResult:
    """Train ``task`` as configured by ``settings`` on this process; see the module docstring."""
    # The data check first: it is the launch check's last collective (gather_agreeing), where a rank learns that
    # another stopped on its data; exclusive_run's broadcast would meet that rank's announcement instead.
    data = data_record(task)
    same_data_everywhere(data, dist_info)
    with deterministic_mode(settings.deterministic), exclusive_run(settings.weights_path, dist_info.is_main):
        return _run(task, settings, dist_info, data)


def _run(task: TrainTask, settings: TrainSettings, dist_info: DistInfo, data: Mapping[str, Any]) -> TrainResult:
    device = dist_info.device
    if not dist_info.is_main:
        quiet_libraries()
    elif not settings.progress:  # --no_progress silences transformers' loading bars too
        hide_library_bars()
    for note in task.notes:
        say(dist_info, note)
    check_data_sizes(task, settings, dist_info.world_size)
    precision = Precision.choose(device, settings.precision, task.cudnn_attention)
    # Non-deterministic runs draw a fresh seed (shared by all ranks, so their data stays disjoint).
    seed = settings.seed if settings.deterministic else broadcast_object(random.SystemRandom().randrange(2**31))

    seed_everything(seed)
    model = task.build_model().to(device)
    if settings.compile:
        say(dist_info, f"compiling {', '.join(compile_transformers(model))} (torch.compile, dynamic shapes)")
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = count_parameters(model)
    say(dist_info, f"{settings.name} model: {total:,} parameters" + (f", {trained:,} trained" if trained != total else ""))
    seed_everything(seed + dist_info.rank)

    for path in (Path(settings.weights_path), latest_path(settings.weights_path)):
        if path.is_dir():  # found only when the first epoch saves, otherwise
            raise CheckpointError(f"{path} is a folder, where this run writes a checkpoint file; move it away or "
                                  "give the run another --weights")
    refused = broadcast_object(log_problem(settings.logs_path) if dist_info.is_main else None)
    if refused:  # found at the first epoch's end otherwise, as a PermissionError traceback after that epoch's work
        raise StartRefused(refused)
    if dist_info.is_main:
        remove_killed_saves(settings)
    source = resume_source(settings.weights_path) if settings.load_ckpt else None
    checkpoint = read_resume_checkpoint(source, settings) if source is not None else None
    record = checkpoint.get("training") if checkpoint is not None else None
    if dist_info.is_main and isinstance(record, Mapping) and int(record.get("num_epochs") or 0) > settings.num_epochs:
        remove_killed_saves(settings, int(record["num_epochs"]))  # the epoch copies a longer run was writing
    same_checkpoint_everywhere(source, checkpoint, dist_info)
    new_stage = None
    if checkpoint is not None and task.stage is not None and checkpoint.get("modality") != task.stage:
        # The earlier stage's last epoch may have been killed after its latest_: write the best file (and the
        # rest) it owed first, or the switch would start from the best file of the epoch before.
        # Only a stage's own file can owe its stage's files: another family's (or a file without 'modality') is
        # not copied to the best-file path before load_state refuses it or the switch takes its weights.
        if dist_info.is_main and Path(source) == latest_path(settings.weights_path) and checkpoint.get("modality"):
            catch_up_epoch_files(settings, source, checkpoint, checkpoint.get("modality"), dist_info)
        barrier()  # the other ranks read the best file next
        source, checkpoint, new_stage = stage_switch(settings.weights_path, source, checkpoint, task.stage)
    if checkpoint is not None:
        load_state(model, state_dict_of(checkpoint), source=f"checkpoint {source}",
                   config_hint=CLAMP3_CONFIG_HINT if task.stage is not None else CONFIG_HINT)
    if checkpoint is None or new_stage is not None:
        refuse_overwriting_epoch_files(settings)
    if checkpoint is None and task.stage == "audio":
        why = (f"no checkpoint at {settings.weights_path} or its latest_" if settings.load_ckpt
               else f"{settings.prefix}LOAD_CKPT is off (--no_resume)")
        say(dist_info, f"note: {why}: the audio stage starts from initial weights and keeps its symbolic encoder "
                       "frozen as initialised; the staged recipe runs the symbolic stage with the same --weights "
                       "first (docs/training.md)")

    if dist_info.is_distributed:
        # Both text encoders' poolers are outside the loss: DDP must not wait for their gradients.
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                        find_unused_parameters=True)
    optimizer = make_optimizer(model, settings.learning_rate)
    lr_sched = lr_schedule(optimizer, settings.warmup_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.scaled)

    counters = {"epoch": 0, "best_epoch": 0, "min_eval_loss": float("inf")}
    data_seed = seed
    schedule = describe_schedule(lr_sched) + (" from the first step" if not settings.warmup_steps else "")
    if new_stage is not None:
        say(dist_info, new_stage)
    elif checkpoint is not None:
        counters = restore_state_of(checkpoint, source, settings, optimizer, lr_sched, scaler)
        keep_fused(optimizer)
        if checkpoint.get("optimizer") and checkpoint.get("lr_sched"):
            schedule = "continuing at the checkpoint's " + adopt_checkpoint_schedule(checkpoint, optimizer, lr_sched)
            if (lr_sched.base_lrs[0], lr_sched.lr_lambdas[0].warmup_steps) != (settings.learning_rate,
                                                                                settings.warmup_steps):
                schedule += (f" ({settings.prefix}LEARNING_RATE {settings.learning_rate:g} and {settings.prefix}"
                             f"WARMUP_STEPS {settings.warmup_steps} apply to fresh runs)")
        data_seed = restore_random_state(checkpoint.get("rng"), seed, counters["epoch"], dist_info)
        say(dist_info, f"resuming from {source}: epoch {counters['epoch']} done, best epoch {counters['best_epoch']} "
                       f"(eval loss {counters['min_eval_loss']:.6g})")
        moved = data_change(checkpoint, source, data)
        if moved:
            say(dist_info, moved)
        changed = settings_that_differ(checkpoint, settings.config)
        if changed:  # the weights' shapes catch size changes; these (mask ratio, logit scale, ...) they cannot
            say(dist_info, f"note: this run's settings differ from those {source} was trained with: "
                           f"{'; '.join(changed[:6])}{'; ...' if len(changed) > 6 else ''}")
        if dist_info.is_main:
            catch_up_epoch_files(settings, source, checkpoint, task.stage, dist_info)
            dropped = drop_log_entries_after(settings.logs_path, checkpoint)
            if dropped:
                entries = "entry" if dropped == 1 else "entries"
                say(dist_info, f"{dropped} log {entries} after epoch {counters['epoch']} removed from "
                               f"{settings.logs_path}: this run redoes those epochs from {source}")
    del checkpoint  # optimizer state included, it can hold gigabytes of host memory per rank

    for dataset in (task.train_set, task.eval_set):
        if hasattr(dataset, "seed"):
            dataset.seed = data_seed
    train_loader, eval_loader = make_loaders(task, settings, dist_info, data_seed)
    wandb_run = start_wandb(settings, dist_info)
    global_batch = settings.batch_size * dist_info.world_size
    eval_batches = len(eval_loader.batch_sampler.plan)
    say(dist_info, f"{settings.name}: {len(task.train_set)} training samples, {len(train_loader)} global batches of "
                   f"{global_batch} per epoch ({len(task.train_set) % global_batch} left out, others each epoch); "
                   f"{plural(len(task.eval_set), 'eval sample')} in {plural(eval_batches, 'global batch', 'es')}")
    say(dist_info, f"{dist_info.world_size} process(es) on {device.type}, batch {settings.batch_size} per process, "
                   f"{precision}, {schedule}; epochs {counters['epoch'] + 1}..{settings.num_epochs}")

    result = TrainResult(counters["epoch"], counters["epoch"], counters["best_epoch"], counters["min_eval_loss"])
    latest = latest_path(settings.weights_path)
    for epoch in range(counters["epoch"] + 1, settings.num_epochs + 1):
        started = time.time()
        set_epoch(train_loader, epoch)
        train_loss = train_epoch(model, train_loader, task.compute_loss, optimizer, lr_sched, scaler, precision,
                                 dist_info, settings, epoch, wandb_run)
        eval_loss = evaluate(model, eval_loader, task.eval_step, dist_info)
        improved = eval_loss < result.min_eval_loss
        if improved:
            result.best_epoch, result.min_eval_loss = epoch, eval_loss
        result.last_epoch = epoch
        result.train_losses.append(train_loss)
        result.eval_losses.append(eval_loss)
        # Every rank's generators, so a resumed run continues each rank's streams exactly.
        rng_states = gather_objects(capture_rng_state())
        unsaved: Optional[str] = None  # why rank 0 could not save this epoch
        if dist_info.is_main:
            fields = dict(optimizer=optimizer, lr_sched=lr_sched, scaler=scaler, epoch=epoch,
                          best_epoch=result.best_epoch, min_eval_loss=result.min_eval_loss, config=settings.config,
                          extra={"rng": {"world_size": dist_info.world_size, "data_seed": data_seed,
                                         "ranks": rng_states},
                                 "training": training_record(settings, dist_info, precision),
                                 "losses": {"train": float(train_loss), "eval": float(eval_loss)}, "data": data,
                                 **({"modality": task.stage} if task.stage else {})})
            # latest_ first: it is what a resume reads, and it says which of the epoch's other files (best, epoch
            # copy, log entry) a run killed after it still owes; a resume writes those (catch_up_epoch_files).
            try:
                save_checkpoint(latest, model, **fields)
                for owed in epoch_files_owed(settings, epoch, improved):
                    copy_checkpoint(latest, owed)
            except CheckpointError as exc:  # a full disk: every rank stops with it, below
                unsaved = str(exc)
        # The other ranks would meet rank 0's exit at their next collective (a traceback each with gloo; NCCL
        # waits for its timeout): they hear of a failed save and stop with it, said once.
        unsaved = broadcast_object(unsaved)
        if unsaved is not None:
            raise SaidOnce(unsaved)
        if dist_info.is_main:
            append_log(settings.logs_path, epoch, train_loss, eval_loss)
            if wandb_run is not None:
                wandb_run.log({"epoch": epoch, "epoch_train_loss": train_loss, "eval_loss": eval_loss})
            print(f"epoch {epoch}: train_loss {train_loss:.6f} eval_loss {eval_loss:.6f}"
                  f"{' (best)' if improved else ''} [{time.time() - started:.1f} s]", flush=True)
        barrier()

    digest = check_in_sync(model, dist_info) if dist_info.is_distributed else None
    if wandb_run is not None:
        wandb_run.finish()
    sync = f"; parameters identical on all {dist_info.world_size} ranks (sha256 {digest})" if digest else ""
    ran = (f"epochs {result.start_epoch + 1}..{result.last_epoch}" if result.last_epoch > result.start_epoch
           else f"nothing to do ({result.start_epoch} of {settings.num_epochs} epochs already done)")
    say(dist_info, f"{settings.name} training done: {ran}; best eval epoch {result.best_epoch}, eval loss "
                   f"{result.min_eval_loss:.6f}; best: {settings.weights_path}, latest: {latest}{sync}")
    return result
