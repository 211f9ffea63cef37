"""The one training loop of M3 and CLaMP 2 (SPEC §7): build once, train, evaluate, checkpoint, resume.

:func:`run_training` receives a :class:`TrainTask` (model factory, data sets, collate and loss
functions) and :class:`TrainSettings`, and does, in this order:

1. seed the base seed and build the model (same initial weights on every rank), then seed
   base + rank (the reference's 42 + rank) for dropout and everything after;
2. load the model from the resume checkpoint (``latest_`` + weights name) when LOAD_CKPT is set;
3. wrap it in DistributedDataParallel when several processes run;
4. build AdamW, the warm-up-then-constant schedule and the gradient scaler once, then restore their
   states, the counters and the RNG states (each rank its own) from the checkpoint;
5. per epoch: train (incomplete last batches dropped), evaluate, append the reference's log entry,
   save the best checkpoint when the eval loss improves and the latest one always (rank 0,
   atomically, config inside).

AMP (fp16 autocast + gradient scaling) or bf16 autocast apply on CUDA only; the CPU runs fp32.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from clamp2.progress import progress_bar

from ..checkpoint import (capture_rng_state, latest_path, load_state, read_checkpoint, restore_rng_state,
                          restore_training_state, resume_source, save_checkpoint, state_dict_of, unwrap)
from ..configuration import config_dict, derived_log_path
from ..distributed import (DistInfo, all_reduce_mean, barrier, broadcast_object, deterministic_mode, gather_objects,
                           seed_everything)
from .data import DataError

PRECISIONS = ("fp16", "bf16", "fp32")
BASE_SEED = 42


@dataclass
class TrainSettings:
    """Everything the loop needs besides the task; see :func:`settings_from` for their sources."""

    name: str  # "m3" or "clamp2": progress bar, messages, W&B project
    weights_path: Path
    logs_path: Path
    num_epochs: int
    batch_size: int  # per process
    learning_rate: float
    warmup_steps: int = 1000
    load_ckpt: bool = True
    deterministic: bool = True
    seed: int = BASE_SEED
    precision: str = "fp16"  # on CUDA: fp16 = AMP + gradient scaling (the reference), bf16, or fp32
    num_workers: int = 0
    max_steps_per_epoch: int = 0  # 0: whole epochs; N: stop each epoch after N optimizer steps
    wandb: bool = False
    progress: bool = True
    config: Dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainTask:
    """What differs between M3 and CLaMP 2 training."""

    build_model: Callable[[], nn.Module]
    train_set: Dataset
    eval_set: Dataset
    collate_fn: Callable
    compute_loss: Callable[[nn.Module, Dict[str, torch.Tensor]], torch.Tensor]
    # Contrastive eval losses depend on the batch size, so CLaMP 2 drops an incomplete last eval
    # batch (as the reference does); M3's token-level loss does not, so it keeps it.
    eval_drop_last: bool = True


@dataclass
class TrainResult:
    start_epoch: int  # epochs already done when this run started
    last_epoch: int
    best_epoch: int
    min_eval_loss: float
    train_losses: List[float] = field(default_factory=list)
    eval_losses: List[float] = field(default_factory=list)


# -- settings from config.py and the command line --------------------------------------------------

def add_training_arguments(parser) -> None:
    """The flags both trainers share; each defaults to config.py (M3_* / CLAMP2_* constants)."""
    # The weights file name is built in config.py: environment overrides (CLAMP2_BATCH_SIZE=64 ...)
    # rename it, these flags do not (they are recorded inside the checkpoint instead).
    parser.add_argument("--epochs", type=int, default=None, help="number of epochs (default: config NUM_EPOCH)")
    parser.add_argument("--batch_size", type=int, default=None,
                        help="batch size per process (default: config BATCH_SIZE; unlike an environment override, "
                             "the flag does not change the weights file name)")
    parser.add_argument("--learning_rate", type=float, default=None,
                        help="peak learning rate (default: config LEARNING_RATE; file name as for --batch_size)")
    parser.add_argument("--warmup_steps", type=int, default=1000, help="linear warm-up steps, then constant (1000)")
    parser.add_argument("--weights", type=Path, default=None,
                        help="best-checkpoint path; latest_<name> and the log file go beside it "
                             "(default: config WEIGHTS_PATH and LOGS_PATH)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp16",
                        help="on CUDA: fp16 = AMP with gradient scaling (default, the reference), bf16 autocast, "
                             "or fp32; the CPU always trains in fp32")
    parser.add_argument("--num_workers", type=int, default=0, help="data-loader worker processes per rank (0)")
    parser.add_argument("--max_steps_per_epoch", type=int, default=0,
                        help="end each epoch after this many optimizer steps (0 = whole epochs; for smoke runs)")
    parser.add_argument("--wandb", action="store_true", help="log to Weights & Biases (also config WANDB_LOG)")
    parser.add_argument("--no_resume", action="store_true", help="start afresh even if config LOAD_CKPT is set")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    # The legacy launcher passes --local-rank=N (torch >= 2.0) or --local_rank=N; torchrun sets LOCAL_RANK.
    parser.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, default=None,
                        help=argparse.SUPPRESS)


def settings_from(args, config, prefix: str, name: str) -> TrainSettings:
    """Command-line values over config.py's ``<prefix>NUM_EPOCH``, ``<prefix>BATCH_SIZE``, ... ."""

    def pick(value, key):
        return getattr(config, prefix + key) if value is None else value

    if args.weights is not None:
        weights, logs = Path(args.weights), Path(derived_log_path(str(args.weights)))
    else:
        weights, logs = Path(getattr(config, prefix + "WEIGHTS_PATH")), Path(getattr(config, prefix + "LOGS_PATH"))
    return TrainSettings(
        name=name, weights_path=weights, logs_path=logs,
        num_epochs=pick(args.epochs, "NUM_EPOCH"), batch_size=pick(args.batch_size, "BATCH_SIZE"),
        learning_rate=pick(args.learning_rate, "LEARNING_RATE"), warmup_steps=args.warmup_steps,
        load_ckpt=getattr(config, prefix + "LOAD_CKPT") and not args.no_resume,
        deterministic=getattr(config, prefix + "DETERMINISTIC"), precision=args.precision,
        num_workers=args.num_workers, max_steps_per_epoch=args.max_steps_per_epoch,
        wandb=args.wandb or getattr(config, prefix + "WANDB_LOG"), progress=not args.no_progress,
        config=config_dict(config))


# -- numerics ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Precision:
    """Autocast dtype (None: fp32) and whether gradients are scaled (fp16 only)."""

    device_type: str
    dtype: Optional[torch.dtype]

    @classmethod
    def choose(cls, device: torch.device, requested: str) -> "Precision":
        if device.type != "cuda" or requested == "fp32":
            return cls(device.type, None)
        return cls(device.type, torch.bfloat16 if requested == "bf16" else torch.float16)

    @property
    def scaled(self) -> bool:
        return self.dtype == torch.float16

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype) if self.dtype else contextlib.nullcontext()

    def __str__(self) -> str:
        return {None: "fp32", torch.float16: "fp16 AMP + gradient scaling", torch.bfloat16: "bf16 autocast"}[self.dtype]


def warmup_then_constant(optimizer, warmup_steps: int):
    """LR × min(1, step / warmup_steps): ``transformers.get_constant_schedule_with_warmup``."""
    from transformers import get_constant_schedule_with_warmup

    return get_constant_schedule_with_warmup(optimizer, num_warmup_steps=warmup_steps)


def move_batch(batch: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def train_step(model: nn.Module, batch: Dict[str, torch.Tensor], compute_loss, optimizer, lr_sched, scaler,
               precision: Precision) -> float:
    """One optimizer step on one batch; returns the loss."""
    with precision.autocast():
        loss = compute_loss(model, batch)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    lr_sched.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def train_epoch(model, loader, compute_loss, optimizer, lr_sched, scaler, precision: Precision, dist_info: DistInfo,
                settings: TrainSettings, epoch: int, wandb_run=None) -> float:
    """Mean training loss of one epoch over all ranks."""
    model.train()
    steps_in_epoch = len(loader) if not settings.max_steps_per_epoch else min(len(loader), settings.max_steps_per_epoch)
    samples_per_step = settings.batch_size * dist_info.world_size
    bar = progress_bar(total=steps_in_epoch, desc=f"{settings.name} epoch {epoch}", unit="step",
                       enabled=dist_info.is_main and settings.progress)
    total, steps, start = 0.0, 0, time.perf_counter()
    for batch in loader:
        loss = train_step(model, move_batch(batch, dist_info.device), compute_loss, optimizer, lr_sched, scaler,
                          precision)
        total += loss
        steps += 1
        lr = optimizer.param_groups[0]["lr"]
        rate = steps * samples_per_step / (time.perf_counter() - start)
        bar.update(1)
        bar.set_postfix(loss=f"{total / steps:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.1f}")
        if wandb_run is not None:
            wandb_run.log({"train_loss": loss, "lr": lr, "samples_per_s": rate})
        if steps >= steps_in_epoch:
            break
    bar.close()
    return all_reduce_mean(total / max(steps, 1), dist_info.device)


@torch.no_grad()
def evaluate(model, loader, compute_loss, precision: Precision, dist_info: DistInfo) -> float:
    """Mean eval loss over all ranks."""
    model.eval()
    total, steps = 0.0, 0
    for batch in loader:
        with precision.autocast():
            total += compute_loss(model, move_batch(batch, dist_info.device)).item()
        steps += 1
    return all_reduce_mean(total / max(steps, 1), dist_info.device)


# -- helpers ---------------------------------------------------------------------------------------

def check_data_sizes(task: TrainTask, settings: TrainSettings, world_size: int) -> None:
    """Fail before the first step when a split cannot fill one batch on every rank."""
    global_batch = settings.batch_size * world_size
    if len(task.train_set) < global_batch:
        raise DataError(f"training set has {len(task.train_set)} samples, fewer than one batch of {global_batch} "
                        f"({settings.batch_size} per process × {world_size}); incomplete batches are dropped")
    eval_needed = global_batch if task.eval_drop_last else 1
    if len(task.eval_set) < eval_needed:
        raise DataError(f"eval set has {len(task.eval_set)} samples, fewer than one batch of {eval_needed}; "
                        "give an eval set or lower the batch size")


def make_loader(dataset: Dataset, settings: TrainSettings, dist_info: DistInfo, collate_fn, shuffle: bool,
                drop_last: bool) -> DataLoader:
    if settings.num_workers:
        # Workers are forked processes: the tokenizer's own thread pool must not be used across the fork.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sampler = DistributedSampler(dataset, num_replicas=dist_info.world_size, rank=dist_info.rank, shuffle=shuffle,
                                 seed=settings.seed)
    return DataLoader(dataset, batch_size=settings.batch_size, sampler=sampler, collate_fn=collate_fn,
                      drop_last=drop_last, num_workers=settings.num_workers,
                      pin_memory=dist_info.device.type == "cuda")


def set_epoch(loader: DataLoader, epoch: int) -> None:
    loader.sampler.set_epoch(epoch)
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


def start_wandb(settings: TrainSettings, dist_info: DistInfo):
    """A W&B run on rank 0 when asked for; the key comes from the environment (WANDB_API_KEY)."""
    if not (settings.wandb and dist_info.is_main):
        return None
    try:
        import wandb
    except ImportError:
        print("note: W&B logging was asked for but `wandb` is not installed (pip install wandb); "
              "training goes on without it", file=sys.stderr)
        return None
    return wandb.init(project=f"clamp2-{settings.name}", name=settings.weights_path.stem, config=settings.config,
                      resume="allow")


def training_record(settings: TrainSettings, dist_info: DistInfo, precision: Precision) -> Dict[str, Any]:
    """What the command line changed beside config.py (stored in checkpoints next to the config)."""
    return {"batch_size": settings.batch_size, "world_size": dist_info.world_size,
            "learning_rate": settings.learning_rate, "warmup_steps": settings.warmup_steps,
            "num_epochs": settings.num_epochs, "precision": str(precision),
            "max_steps_per_epoch": settings.max_steps_per_epoch, "seed": settings.seed}


def restore_random_state(rng: Optional[Dict[str, Any]], seed: int, epoch: int, dist_info: DistInfo) -> int:
    """Restore this rank's generators from a checkpoint's ``rng`` entry; returns the data seed to use.

    A checkpoint from another number of processes (or without the entry, e.g. the reference's)
    cannot continue each rank's streams: they are re-seeded and the run is not bit-exact.
    """
    if rng and rng.get("world_size") == dist_info.world_size:
        restore_rng_state(rng["ranks"][dist_info.rank])
        return int(rng["data_seed"])
    written_by = f"{rng.get('world_size')} processes" if rng else "a run without random states"
    say(dist_info, f"note: the checkpoint was written by {written_by} and this run has {dist_info.world_size}: "
                   "random streams are re-seeded, so the resumed run is not bit-exact")
    seed_everything(seed + dist_info.rank + epoch)
    return int(rng["data_seed"]) if rng else seed


def append_log(path: Path, epoch: int, train_loss: float, eval_loss: float) -> None:
    """The reference's per-epoch entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(f"Epoch {epoch}\ntrain_loss: {train_loss}\neval_loss: {eval_loss}\ntime: {time.asctime()}\n\n")


def quiet_libraries() -> None:
    """Silence transformers' notices and loading bars (called on ranks other than 0: one copy is enough)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def report_error(exc: Exception, dist_info: DistInfo, every_rank: bool = False) -> int:
    """Print an error once (rank 0) or, for errors that may hit one rank alone, on each rank; returns 2.

    Data checks before training give every rank the same error; a file that fails mid-training fails
    on the rank that reads it, and torchrun then stops the others.
    """
    if dist_info.is_main or every_rank:
        where = f" (rank {dist_info.rank})" if every_rank and dist_info.is_distributed else ""
        print(f"error{where}: {exc}", file=sys.stderr, flush=True)
    return 2


def say(dist_info: DistInfo, message: str) -> None:
    if dist_info.is_main:
        print(message, flush=True)


# -- the loop ----------------------------------------------------------------------------------------

def run_training(task: TrainTask, settings: TrainSettings, dist_info: DistInfo) -> TrainResult:
    """Train ``task`` as configured by ``settings`` on this process; see the module docstring."""
    with deterministic_mode(settings.deterministic):
        return _run(task, settings, dist_info)


def _run(task: TrainTask, settings: TrainSettings, dist_info: DistInfo) -> TrainResult:
    device = dist_info.device
    if not dist_info.is_main:
        quiet_libraries()
    check_data_sizes(task, settings, dist_info.world_size)
    precision = Precision.choose(device, settings.precision)
    # Non-deterministic runs draw a fresh seed (shared by all ranks, so their data stays disjoint).
    seed = settings.seed if settings.deterministic else broadcast_object(random.SystemRandom().randrange(2**31))

    seed_everything(seed)
    model = task.build_model().to(device)
    seed_everything(seed + dist_info.rank)

    source = resume_source(settings.weights_path) if settings.load_ckpt else None
    checkpoint = read_checkpoint(source) if source is not None else None
    if checkpoint is not None:
        load_state(model, state_dict_of(checkpoint), source=f"checkpoint {source}")

    if dist_info.is_distributed:
        # Both text encoders' poolers are outside the loss: DDP must not wait for their gradients.
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                        find_unused_parameters=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.learning_rate)
    lr_sched = warmup_then_constant(optimizer, settings.warmup_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.scaled)

    counters = {"epoch": 0, "best_epoch": 0, "min_eval_loss": float("inf")}
    data_seed = seed
    if checkpoint is not None:
        counters = restore_training_state(checkpoint, optimizer=optimizer, lr_sched=lr_sched, scaler=scaler)
        data_seed = restore_random_state(checkpoint.get("rng"), seed, counters["epoch"], dist_info)
        say(dist_info, f"resuming from {source}: epoch {counters['epoch']} done, best epoch {counters['best_epoch']} "
                       f"(eval loss {counters['min_eval_loss']:.6g})")
        del checkpoint  # optimizer state included, it can hold gigabytes of host memory per rank

    for dataset in (task.train_set, task.eval_set):
        if hasattr(dataset, "seed"):
            dataset.seed = data_seed
    train_loader = make_loader(task.train_set, settings, dist_info, task.collate_fn, shuffle=True, drop_last=True)
    eval_loader = make_loader(task.eval_set, settings, dist_info, task.collate_fn, shuffle=False,
                              drop_last=task.eval_drop_last)
    wandb_run = start_wandb(settings, dist_info)
    say(dist_info, f"{settings.name}: {len(task.train_set)} training / {len(task.eval_set)} eval samples, "
                   f"{dist_info.world_size} process(es) on {device.type}, batch {settings.batch_size} per process, "
                   f"{precision}, epochs {counters['epoch'] + 1}..{settings.num_epochs}")

    result = TrainResult(counters["epoch"], counters["epoch"], counters["best_epoch"], counters["min_eval_loss"])
    latest = latest_path(settings.weights_path)
    for epoch in range(counters["epoch"] + 1, settings.num_epochs + 1):
        started = time.time()
        set_epoch(train_loader, epoch)
        set_epoch(eval_loader, epoch)
        train_loss = train_epoch(model, train_loader, task.compute_loss, optimizer, lr_sched, scaler, precision,
                                 dist_info, settings, epoch, wandb_run)
        eval_loss = evaluate(model, eval_loader, task.compute_loss, precision, dist_info)
        improved = eval_loss < result.min_eval_loss
        if improved:
            result.best_epoch, result.min_eval_loss = epoch, eval_loss
        result.last_epoch = epoch
        result.train_losses.append(train_loss)
        result.eval_losses.append(eval_loss)
        # Every rank's generators, so a resumed run continues each rank's streams exactly.
        rng_states = gather_objects(capture_rng_state())
        if dist_info.is_main:
            append_log(settings.logs_path, epoch, train_loss, eval_loss)
            fields = dict(optimizer=optimizer, lr_sched=lr_sched, scaler=scaler, epoch=epoch,
                          best_epoch=result.best_epoch, min_eval_loss=result.min_eval_loss, config=settings.config,
                          extra={"rng": {"world_size": dist_info.world_size, "data_seed": data_seed,
                                         "ranks": rng_states},
                                 "training": training_record(settings, dist_info, precision)})
            if improved:
                save_checkpoint(settings.weights_path, model, **fields)
            save_checkpoint(latest, model, **fields)
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
    say(dist_info, f"{settings.name} training done: {ran}, best epoch {result.best_epoch} "
                   f"(eval loss {result.min_eval_loss:.6g}); best: {settings.weights_path}, latest: {latest}{sync}")
    return result
