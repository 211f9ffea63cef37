"""One training run of the linear probe (SPEC §10), resumable and DDP-ready.

:func:`train_probe` follows the reference and fixes what only breaks things:

- seed 42, build the probe (same initial weights on every rank), then seed 42 + rank;
- AdamW at a constant 1e-5 by default: the reference attaches a one-epoch warm-up to an optimizer
  it then replaces, so its warm-up never applies (``warmup_steps`` > 0 gives a real one);
- batches padded and masked (:mod:`clamp2.probe.data`): any batch size gives every file the
  probabilities it gets alone; batch size 1 is the reference's;
- every epoch: train, evaluate on the whole eval set (fp32, gathered from all ranks; the
  reference's ranks each score only their own shard), append the reference's log entry plus
  losses and training F1, save the weights file when the eval accuracy improves (strictly; the
  first epoch always counts) and ``latest_<weights>`` at most every ``checkpoint_interval``
  seconds and at the end, both atomically, with the label map;
- optional early stopping after ``patience`` epochs without a better eval accuracy;
- a killed run resumes from ``latest_`` exactly (redoing the epochs after it): the data order of an epoch depends only on
  (seed, epoch), and the model has no dropout, so no random state needs restoring.

AMP (fp16 autocast with gradient scaling, the reference's) or bf16 apply on CUDA only, in training;
evaluation always runs in fp32, as in the reference.
"""

from __future__ import annotations

import hashlib
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ..checkpoint import (CheckpointError, latest_path, load_state, read_checkpoint, restore_training_state,
                          resume_source, save_checkpoint, state_dict_of, unwrap)
from ..distributed import DistInfo, barrier, broadcast_object, gather_objects, seed_everything
from ..files import atomic_write_bytes, atomic_write_text, remove_partial_files
from ..progress import progress_bar, write_line
from ..training.loop import Precision, log_problem, optimizer_step, start_wandb_run
from ..workers import exit_with_parent
from .data import EpochSampler, FeatureSet, ProbeDataset, ProbeUsageError, collate_batch
from .model import HIDDEN_SIZE, build_probe, probe_loss
from .report import HISTORY_FIELDS, macro_f1, scores
# The defaults train_cls.py shows in its help, in a module without torch (fast --help).
from .defaults import BASE_SEED, LEARNING_RATE, NUM_EPOCHS

ONE_EPOCH = -1  # warmup_steps value: one epoch of steps, the warm-up the reference meant to have


@dataclass
class ProbeSettings:
    weights_path: Path
    logs_path: Path
    epochs: int = NUM_EPOCHS
    batch_size: int = 1
    eval_batch_size: int = 1
    learning_rate: float = LEARNING_RATE
    hidden_size: int = HIDDEN_SIZE  # 0: CLaMP 3's single linear layer
    warmup_steps: int = 0
    balanced: bool = False
    patience: int = 0  # 0: no early stopping
    seed: int = BASE_SEED
    precision: str = "fp16"  # on CUDA; the CPU trains in fp32
    resume: bool = True
    progress: bool = True
    num_workers: int = 0
    # Seconds between writes of latest_ (the last epoch always writes it): with batches on a GPU an
    # epoch can take less time than writing the optimizer state.
    checkpoint_interval: float = 60.0
    wandb: bool = False  # log each epoch's metrics to Weights & Biases (the reference's --wandb_log)

    def record(self) -> Dict[str, Any]:
        """What is stored in checkpoints and metrics.json."""
        return {"epochs": self.epochs, "batch_size": self.batch_size, "learning_rate": self.learning_rate,
                "hidden_size": self.hidden_size, "warmup_steps": self.warmup_steps, "balanced": self.balanced,
                "patience": self.patience, "seed": self.seed, "precision": self.precision}


@dataclass
class ProbeResult:
    best_epoch: int
    max_eval_acc: float
    start_epoch: int  # epochs already done when this run started
    last_epoch: int
    stopped_early: bool
    history: Dict[str, List[float]] = field(default_factory=dict)
    eval_probabilities: Optional[np.ndarray] = None  # of the best probe, eval files in subset order


def logs_path_for(weights_path: Path) -> Path:
    """``weights-x.pth`` → ``logs-x.txt`` (the reference's pair, ``x`` the training folder's name whatever
    it holds); any other ``name.pth`` → ``logs-name.txt``."""
    name = weights_path.name
    stem = name[: -len(".pth")] if name.endswith(".pth") else name
    if stem.startswith("weights"):
        return weights_path.with_name(f"logs{stem[len('weights'):]}.txt")
    return weights_path.with_name(f"logs-{stem}.txt")


def fresh_history() -> Dict[str, List[float]]:
    return {key: [] for key in HISTORY_FIELDS}


def data_fingerprint(features: FeatureSet, train_indices: Sequence[int], eval_indices: Sequence[int]) -> str:
    """A digest of which files (and labels) train and evaluate: a resumed run must see the same split."""
    digest = hashlib.sha256()
    for part, indices in (("train", train_indices), ("eval", eval_indices)):
        for index in indices:
            digest.update(f"{part}\t{features.paths[index]}\t{features.labels[index]}\n".encode())
    return digest.hexdigest()[:24]


def warmup_factor(warmup_steps: int):
    """LR factor at a step: linear from 1/warmup to 1 over ``warmup_steps`` steps, then 1 (0: always 1)."""
    def factor(step: int) -> float:
        return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    return factor


def say(dist_info: DistInfo, message: str) -> None:
    if dist_info.is_main:
        write_line(message, stream=sys.stdout)
        sys.stdout.flush()


# -- evaluation and training epochs ----------------------------------------------------------------

def make_loader(dataset: ProbeDataset, sampler: EpochSampler, batch_size: int, num_workers: int,
                device: torch.device) -> DataLoader:
    """Batches of ``dataset`` in ``sampler``'s order; features already on the device are batched in place."""
    resident = dataset.features.resident is not None
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_batch,
                      num_workers=0 if resident else num_workers, pin_memory=device.type == "cuda" and not resident,
                      worker_init_fn=exit_with_parent if num_workers and not resident else None)


@torch.no_grad()
def predict(model: torch.nn.Module, dataset: ProbeDataset, batch_size: int, dist_info: DistInfo,
            num_classes: int, num_workers: int = 0) -> np.ndarray:
    """Probabilities ``[n, classes]`` of every file of ``dataset`` in fp32, files shared out over the ranks.

    Files go by length, so batches pad little; every rank returns the whole array.
    """
    lengths = dataset.lengths()
    order = sorted(range(len(dataset)), key=lambda item: lengths[item])
    sampler = EpochSampler(dataset.targets, shuffle=False, order=order, rank=dist_info.rank,
                           world_size=dist_info.world_size)
    loader = make_loader(dataset, sampler, batch_size, num_workers, dist_info.device)
    model = unwrap(model)
    was_training = model.training
    model.eval()
    items, outputs = [], []
    for features, mask, _, positions in loader:
        mask = mask.to(dist_info.device) if mask is not None else None
        outputs.append(model(features.to(dist_info.device), mask).float().cpu())
        items.append(positions)
    model.train(was_training)
    local = (torch.cat(items).numpy(), torch.cat(outputs).numpy()) if items else (np.zeros(0, np.int64), None)
    probabilities = np.zeros((len(dataset), num_classes), dtype=np.float32)
    for positions, values in gather_objects(local):
        if values is not None:
            probabilities[positions] = values
    return probabilities


def train_epoch(model, loader: DataLoader, optimizer, lr_sched, scaler, precision: Precision,
                dist_info: DistInfo) -> Dict[str, float]:
    """One pass over this rank's share; loss, accuracy and macro-F1 over the files of all ranks."""
    device = dist_info.device
    model.train()
    # Accumulated on the device: a .item() per step would wait for the GPU at every step.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    predictions, targets = [], []
    for features, mask, target, _ in loader:
        features, target = features.to(device, non_blocking=True), target.to(device, non_blocking=True)
        mask = mask.to(device, non_blocking=True) if mask is not None else None
        with precision.autocast():
            probabilities = model(features, mask)
            loss = probe_loss(probabilities, target)
        optimizer_step(loss, optimizer, lr_sched, scaler)
        loss_sum += loss.detach().double() * len(target)
        predictions.append(probabilities.detach().argmax(dim=1))
        targets.append(target)
    local = (float(loss_sum), torch.cat(predictions).tolist() if predictions else [],
             torch.cat(targets).tolist() if targets else [])
    gathered = gather_objects(local)
    all_predictions = [p for _, preds, _ in gathered for p in preds]
    all_targets = [t for _, _, tgts in gathered for t in tgts]
    count = max(len(all_targets), 1)
    return {"loss": sum(total for total, _, _ in gathered) / count,
            "accuracy": sum(int(p == t) for p, t in zip(all_predictions, all_targets)) / count,
            "macro_f1": macro_f1(all_targets, all_predictions) if all_targets else 0.0}


def append_log(path: Path, epoch: int, train: Mapping[str, float], evaluation: Mapping[str, float],
               improved: bool) -> None:
    """The reference's entry, line for line (train_acc, eval_acc, eval_f1_macro, time), so that parsers
    of its logs read ours; the losses and the training F1 are in the report's history."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(f"Epoch {epoch}\ntrain_acc: {train['accuracy']}\neval_acc: {evaluation['accuracy']}\n"
                     f"eval_f1_macro: {evaluation['macro_f1']}\ntime: {time.asctime()}\n\n")
        if improved:
            handle.write("Best Epoch so far!\n\n\n")


# -- resuming --------------------------------------------------------------------------------------

def drop_log_entries_after(path: Path, epoch: int) -> int:
    """Remove the log entries that follow epoch ``epoch``'s last entry; return how many.

    ``latest_`` is written every ``checkpoint_interval`` seconds but the log every epoch, so a killed run
    logged epochs that its resume redoes: without this they would be logged twice. Entries of earlier
    runs (the log is appended to, as the reference's) come before and stay.
    """
    try:
        with open(path, encoding="utf-8", newline="") as handle:  # line endings kept as written (CRLF on Windows)
            text = handle.read()
    except (FileNotFoundError, UnicodeDecodeError):
        return 0
    headers = list(re.finditer(r"^Epoch (\d+)\r?$", text, re.M))
    ours = [i for i, header in enumerate(headers) if int(header.group(1)) == epoch]
    if not ours or ours[-1] == len(headers) - 1:
        return 0
    atomic_write_text(path, text[:headers[ours[-1] + 1].start()])
    return len(headers) - 1 - ours[-1]


def log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def relog_epoch(path: Path, offset: int, epoch: int, best_epoch: int, history: Mapping[str, List[float]]) -> int:
    """Make the log end with the entry of ``epoch``, the one a resume continues after; return how many entries were
    removed. ``offset`` is the log's size before that entry, as the checkpoint recorded: what follows the entry came
    from epochs a killed run did not save (its resume redoes them); a run killed between its save and its log entry
    left the entry out, and it is written now from the checkpoint's history."""
    try:
        with open(path, "rb") as handle:
            text = handle.read()
    except FileNotFoundError:
        text = b""
    kept, tail = text[:offset], text[offset:]
    headers = [m.start() for m in re.finditer(rb"^Epoch \d+\r?$", tail, re.M)]
    if headers[:1] == [0] and re.match(rb"Epoch %d\r?\n" % epoch, tail):
        if len(headers) == 1:
            return 0  # the log ends with the entry: nothing to do
        atomic_write_bytes(path, kept + tail[:headers[1]])
        return len(headers) - 1
    index = list(history["epoch"]).index(epoch)
    atomic_write_bytes(path, kept)
    append_log(path, epoch, {"accuracy": history["train_acc"][index]},
               {"accuracy": history["eval_acc"][index], "macro_f1": history["eval_f1_macro"][index]},
               best_epoch == epoch)
    return len(headers)


# Probe checkpoints record this: ones written before the epoch order and class numbering became the
# reference's (epoch orders of another kind) cannot continue a run of this version.
EPOCH_ORDER = "reference"


def probe_kind(hidden_size) -> str:
    return "CLaMP 3's probe (no hidden layer)" if hidden_size == 0 else f"CLaMP 2's probe of hidden size {hidden_size}"


def load_resume_checkpoint(settings: ProbeSettings, classes: Mapping[str, int], input_size: int,
                           fingerprint: str) -> tuple[Optional[dict], Optional[Path]]:
    """The checkpoint to resume from (``latest_``, else the weights file), checked against this run's data."""
    source = resume_source(settings.weights_path) if settings.resume else None
    if source is None:
        return None, None
    fix = f"pass --no_resume to train afresh (it overwrites {settings.weights_path}) or choose another --weights"
    try:
        checkpoint = read_checkpoint(source)
    except CheckpointError as exc:
        raise ProbeUsageError(f"{exc.problem}; delete it or {fix}") from None
    problems = []
    if "data_fingerprint" not in checkpoint:
        problems.append("was not written by this tool's training")
    elif checkpoint.get("epoch_order") != EPOCH_ORDER:
        problems.append("was written by an earlier version of this tool, whose epoch order and class numbering "
                        "are not the reference's")
    elif dict(checkpoint.get("labels", {})) != dict(classes):
        saved = dict(checkpoint.get("labels", {}))
        if sorted(saved) != sorted(classes):
            problems.append(f"has the classes {sorted(saved)}, the data {sorted(classes)}")
        else:  # the same names, numbered otherwise (the data's first files changed)
            problems.append(f"numbers the classes {saved}, the data {dict(classes)}")
    elif checkpoint.get("input_size") != input_size:
        problems.append(f"takes features of size {checkpoint.get('input_size')}, the data has {input_size}")
    elif checkpoint.get("hidden_size") != settings.hidden_size:
        problems.append(f"is {probe_kind(checkpoint.get('hidden_size'))}, this run trains "
                        f"{probe_kind(settings.hidden_size)} (--probe and --hidden_size choose)")
    elif checkpoint["data_fingerprint"] != fingerprint:
        problems.append("was trained and evaluated on other files (or another split)")
    if problems:
        raise ProbeUsageError(f"cannot resume from {source}: it {problems[0]}; {fix}")
    return checkpoint, source


def copy_state(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {key: value.detach().cpu().clone() for key, value in unwrap(model).state_dict().items()}


# -- the run ---------------------------------------------------------------------------------------

def train_probe(features: FeatureSet, train_indices: Sequence[int], eval_indices: Sequence[int],
                classes: Mapping[str, int], settings: ProbeSettings, dist_info: DistInfo,
                name: str = "probe", drawn_before: int = 0) -> ProbeResult:
    """Train a probe on ``train_indices`` of ``features``, select the best epoch on ``eval_indices``.

    ``train_indices`` in the reference's order of its training files (the epoch order is drawn over it);
    ``drawn_before``: the number of files the hold-out split shuffled (see :class:`EpochSampler`)."""
    device = dist_info.device
    train_set = ProbeDataset(features, train_indices, [classes[features.labels[i]] for i in train_indices])
    eval_set = ProbeDataset(features, eval_indices, [classes[features.labels[i]] for i in eval_indices])
    input_size, num_classes = features.dim(), len(classes)
    fingerprint = data_fingerprint(features, train_indices, eval_indices)
    latest = latest_path(settings.weights_path)
    # A log this user may not append to was found at the first epoch's end, a traceback with the weights written.
    refused = broadcast_object(log_problem(settings.logs_path) if dist_info.is_main else None)
    if refused:
        raise ProbeUsageError(refused)
    if dist_info.is_main:
        for path in (settings.weights_path, latest):  # what a writer killed mid-save left behind
            remove_partial_files(path)
        if not settings.resume:
            # Afresh: a kill before this run's first latest_ must not leave the old run's to be resumed.
            latest.unlink(missing_ok=True)
    barrier()
    checkpoint, source = load_resume_checkpoint(settings, classes, input_size, fingerprint)
    precision = Precision.choose(device, settings.precision)

    seed_everything(settings.seed)
    model = build_probe(input_size, num_classes, settings.hidden_size).to(device)
    seed_everything(settings.seed + dist_info.rank)
    if checkpoint is not None:
        load_state(model, state_dict_of(checkpoint), source=f"checkpoint {source}")
    trained = (DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
               if dist_info.is_distributed else model)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=settings.learning_rate)
    sampler = EpochSampler(train_set.targets, shuffle=True, balanced=settings.balanced, seed=settings.seed,
                           rank=dist_info.rank, world_size=dist_info.world_size, drawn_before=drawn_before)
    loader = make_loader(train_set, sampler, settings.batch_size, settings.num_workers, device)
    warmup_steps = len(loader) if settings.warmup_steps == ONE_EPOCH else settings.warmup_steps
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_factor(warmup_steps))
    scaler = torch.amp.GradScaler(device.type, enabled=precision.scaled)

    history, best_epoch, max_eval_acc, start_epoch = fresh_history(), 0, -1.0, 0
    best_state = copy_state(model)
    if checkpoint is not None:
        counters = restore_training_state(checkpoint, optimizer=optimizer, lr_sched=lr_sched, scaler=scaler)
        start_epoch, best_epoch = counters["epoch"], counters["best_epoch"]
        max_eval_acc = float(checkpoint["max_eval_acc"])
        history = {key: list(checkpoint["history"][key]) for key in HISTORY_FIELDS}
        best_state = dict(checkpoint.get("best_model") or state_dict_of(checkpoint))
        say(dist_info, f"{name}: resuming from {source}: epoch {start_epoch} done, best epoch {best_epoch} "
                       f"(eval accuracy {max_eval_acc:.4f})")
        if dist_info.is_main:
            dropped = (relog_epoch(settings.logs_path, int(checkpoint["log_offset"]), start_epoch, best_epoch, history)
                       if "log_offset" in checkpoint else drop_log_entries_after(settings.logs_path, start_epoch))
            if dropped:
                say(dist_info, f"{name}: {dropped} log entr{'ies' if dropped > 1 else 'y'} after epoch {start_epoch} "
                               f"removed from {settings.logs_path}: the run that wrote them stopped before saving "
                               "those epochs")
        last_of_its_run = int(dict(checkpoint.get("config") or {}).get("epochs", -1)) == start_epoch
        if dist_info.is_main and source != latest and last_of_its_run and start_epoch >= settings.epochs:
            # Killed between its last epoch's best file and latest_ (written after it): the best file is that epoch's
            # whole state, and no epoch is left to write latest_, so it is written now, as the run would have.
            save_checkpoint(latest, model, epoch=start_epoch, best_epoch=best_epoch,
                            extra={**checkpoint, "best_model": best_state})
            say(dist_info, f"{name}: the run that wrote {source} stopped before its last latest_; "
                           f"written now: {latest}")
        del checkpoint

    def should_stop(epoch: int) -> bool:
        return bool(settings.patience) and best_epoch > 0 and epoch - best_epoch >= settings.patience

    parameters = sum(p.numel() for p in model.parameters())
    say(dist_info, f"{name}: {len(train_set)} training / {len(eval_set)} eval files, {num_classes} classes, "
                   f"features {features.kinds[0]} with D={input_size}, {parameters} parameters; "
                   f"{dist_info.world_size} process(es) on {device.type}, batch {settings.batch_size} per process, {precision}, "
                   f"learning rate {settings.learning_rate:g}"
                   f"{f' (warm-up {warmup_steps} steps)' if warmup_steps else ''}, epochs up to {settings.epochs}"
                   f"{f', early stopping after {settings.patience}' if settings.patience else ''}")
    stopped_early = should_stop(start_epoch)
    last_epoch, last_saved = start_epoch, time.monotonic()
    wandb_run = start_wandb_run(settings.wandb and start_epoch < settings.epochs, dist_info, "clamp2-probe",
                                settings.weights_path.stem, settings.record())
    bar = progress_bar(total=settings.epochs, initial=min(start_epoch, settings.epochs), desc=name, unit="epoch",
                       enabled=dist_info.is_main and settings.progress)
    for epoch in range(start_epoch + 1, settings.epochs + 1):
        if stopped_early:
            break
        started = time.perf_counter()
        sampler.set_epoch(epoch)
        learning_rate = optimizer.param_groups[0]["lr"]
        train = train_epoch(trained, loader, optimizer, lr_sched, scaler, precision, dist_info)
        evaluation = scores(predict(trained, eval_set, settings.eval_batch_size, dist_info, num_classes,
                                    settings.num_workers), eval_set.targets)
        improved = evaluation["accuracy"] > max_eval_acc
        if improved:
            best_epoch, max_eval_acc, best_state = epoch, evaluation["accuracy"], copy_state(model)
        seconds = time.perf_counter() - started
        for key, value in (("epoch", epoch), ("train_loss", train["loss"]), ("train_acc", train["accuracy"]),
                           ("train_f1_macro", train["macro_f1"]), ("eval_loss", evaluation["loss"]),
                           ("eval_acc", evaluation["accuracy"]), ("eval_f1_macro", evaluation["macro_f1"]),
                           ("learning_rate", learning_rate), ("seconds", seconds)):
            history[key].append(value)
        last_epoch = epoch
        stopped_early = should_stop(epoch)
        if dist_info.is_main:
            best_eval_loss = history["eval_loss"][history["epoch"].index(best_epoch)]
            fields = dict(optimizer=optimizer, lr_sched=lr_sched, scaler=scaler, epoch=epoch, best_epoch=best_epoch,
                          min_eval_loss=best_eval_loss, config=settings.record())
            extra = {"max_eval_acc": float(max_eval_acc), "labels": dict(classes), "input_size": input_size,
                     "hidden_size": settings.hidden_size, "feature_kind": features.kinds[0],
                     "data_fingerprint": fingerprint, "epoch_order": EPOCH_ORDER, "history": history,
                     "world_size": dist_info.world_size, "log_offset": log_size(settings.logs_path)}
            if improved:
                save_checkpoint(settings.weights_path, trained, extra=extra, **fields)
            if (stopped_early or epoch == settings.epochs
                    or time.monotonic() - last_saved >= settings.checkpoint_interval):
                save_checkpoint(latest, trained, extra={**extra, "best_model": best_state}, **fields)
                last_saved = time.monotonic()
            # After the saves: a run killed before them leaves no entry of an epoch its resume redoes (a run killed
            # in its first epoch has no checkpoint to say which entries were its own).
            append_log(settings.logs_path, epoch, train, evaluation, improved)
            if wandb_run is not None:
                wandb_run.log({key: history[key][-1] for key in ("train_loss", "train_acc", "train_f1_macro",
                                                                 "eval_loss", "eval_acc", "eval_f1_macro",
                                                                 "learning_rate")}, step=epoch)
            bar.update(1)
            write_line(f"{name} epoch {epoch}: train loss {train['loss']:.4f} acc {train['accuracy']:.4f} "
                       f"F1 {train['macro_f1']:.4f} | eval loss {evaluation['loss']:.4f} "
                       f"acc {evaluation['accuracy']:.4f} F1 {evaluation['macro_f1']:.4f}"
                       f"{' (best)' if improved else ''} [{seconds:.2f} s]", stream=sys.stdout)
        barrier()
    bar.close()
    if wandb_run is not None:
        wandb_run.finish()
    if stopped_early and last_epoch > start_epoch:
        say(dist_info, f"{name}: stopped early: no better eval accuracy in {settings.patience} epochs "
                       f"since epoch {best_epoch}")

    unwrap(model).load_state_dict(best_state)
    probabilities = predict(model, eval_set, settings.eval_batch_size, dist_info, num_classes, settings.num_workers)
    return ProbeResult(best_epoch=best_epoch, max_eval_acc=max_eval_acc, start_epoch=start_epoch,
                       last_epoch=max(last_epoch, start_epoch), stopped_early=stopped_early, history=history,
                       eval_probabilities=probabilities)
