"""What ``music_classification/train_cls.py`` and ``inference_cls.py`` do, behind their flags.

Exit status: 0 done; 1 done, but some files were left out (each listed with its reason, and in
``metrics.json``); 2 usage or data error (one line, nothing trained).
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..checkpoint import CheckpointError, exclusive_run
from ..cli import EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE
from ..distributed import DistInfo, distributed_context, env_int
from ..files import output_problem, write_text_or_say
from ..training.data import split_eval
from .data import (FeatureError, FeatureSet, ProbeUsageError, check_classes, discover, label_map, label_of,
                   scan_features)
from .infer import load_probe, predict_features
from .model import HIDDEN_SIZE, LinearClassifier
from .report import class_table, mean_std, scores, write_report
from .train import ONE_EPOCH, ProbeResult, ProbeSettings, logs_path_for, say, train_probe

BYTES_PER_GB = 1024 ** 3
Skipped = List[Tuple[Path, str]]


def cuda_problem(device: Optional[str]) -> Optional[str]:
    if device and device.startswith("cuda") and not torch.cuda.is_available():
        return (f"--device {device}: no CUDA device is available (check nvidia-smi and that torch is a CUDA build), "
                "or use --device cpu")
    return None


def usage_problem(args) -> Optional[str]:
    """The first flag combination that cannot run, if any."""
    if cuda_problem(args.device):
        return cuda_problem(args.device)
    if getattr(args, "wandb_key", None):
        return ("--wandb_key: give the W&B key in the environment instead (export WANDB_API_KEY=...); on the "
                "command line it is visible to every user of the machine and stays in the shell's history")
    if args.batch_size < 1 or args.eval_batch_size is not None and args.eval_batch_size < 1:
        return "--batch_size and --eval_batch_size must be at least 1"
    if args.epochs < 1:
        return "--epochs must be at least 1"
    if args.learning_rate <= 0:
        return "--learning_rate must be positive"
    if args.patience < 0:
        return "--patience must be 0 (off) or more"
    if not 0 < args.eval_split < 1:
        return f"--eval_split must be between 0 and 1, got {args.eval_split}"
    if args.folds == 1 or args.folds < 0:
        return "--folds must be 0 (hold-out evaluation) or at least 2"
    if args.folds and args.eval_folders:
        return "--folds splits the training folders itself: drop --eval_folders (or drop --folds)"
    if args.warmup_steps is not None and args.warmup_steps < 0:
        return "--warmup_steps must be 0 or more"
    if args.hidden_size is not None and args.hidden_size < 1 and args.probe == "clamp2":
        return "--hidden_size must be at least 1"
    return None


def default_weights(train_folders: Sequence[str]) -> Path:
    """The reference's ``weights-<last training folder's name>.pth``."""
    last = Path(train_folders[-1])
    return Path(f"weights-{(last.name or last.resolve().name) or 'probe'}.pth")


def settings_from_args(args) -> ProbeSettings:
    weights = Path(args.weights) if args.weights else default_weights(args.train_folders)
    warmup = args.warmup_steps if args.warmup_steps is not None else (ONE_EPOCH if args.warmup else 0)
    return ProbeSettings(weights_path=weights, logs_path=Path(args.logs) if args.logs else logs_path_for(weights),
                         epochs=args.epochs, batch_size=args.batch_size,
                         eval_batch_size=args.eval_batch_size or args.batch_size, learning_rate=args.learning_rate,
                         hidden_size=(args.hidden_size or HIDDEN_SIZE) if args.probe == "clamp2" else 0,
                         warmup_steps=warmup, balanced=args.balanced,
                         patience=args.patience, seed=args.seed, precision=args.precision,
                         resume=not args.no_resume, progress=not args.no_progress, num_workers=args.num_workers,
                         checkpoint_interval=args.checkpoint_interval, wandb=args.wandb_log)


def report_dir_for(args, weights: Path) -> Path:
    return Path(args.report_dir) if args.report_dir else weights.with_name(f"{weights.stem}_report")


def list_skipped(dist_info: DistInfo, skipped: Skipped, what: str = "skipped") -> None:
    if dist_info.is_main:
        for path, reason in skipped:
            print(f"{what}: {path}: {reason}", file=sys.stderr, flush=True)


def report_written(report_dir: Path, kept: str, *args, **kwargs) -> bool:
    """:func:`write_report`; a report that cannot be written (a full disk, a read-only folder) is one line naming the
    folder and what is kept, and False (it was a traceback after the work it reports on was done and saved)."""
    try:
        write_report(report_dir, *args, **kwargs)
    except OSError as error:
        print(f"error: cannot write the report in {report_dir}: {error.strerror or error}; {kept}", file=sys.stderr,
              flush=True)
        return False
    return True


def say_warnings(dist_info: DistInfo, lines: Sequence[str]) -> None:
    if dist_info.is_main:
        for line in lines:
            print(line, file=sys.stderr, flush=True)


def skipped_record(skipped: Skipped) -> List[Dict[str, str]]:
    return [{"path": str(path), "reason": reason} for path, reason in skipped]


# -- train_cls.py ----------------------------------------------------------------------------------

def detect_probe(paths: Sequence[Path]) -> Tuple[str, Optional[str]]:
    """The probe for training files given without ``--probe``, and a line saying so: CLaMP 3's (one
    linear layer) when the first readable one is a global feature ``[1, D]`` / ``[D]``, as CLaMP 3's
    ``classification/train_cls.py --train_folder ...`` trains on them; CLaMP 2's otherwise."""
    for path in paths:
        try:
            shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
        except (OSError, ValueError, EOFError):
            continue  # unreadable: the scan lists it
        if len(shape) <= 2:
            return "clamp3", (f"{path.name} holds a global feature {list(shape)}: training CLaMP 3's probe "
                              "(one linear layer); give --probe clamp2 for CLaMP 2's")
        return "clamp2", None
    return "clamp2", None


def train_command(args) -> int:
    if args.probe is None and args.hidden_size is not None:  # --hidden_size is CLaMP 2's probe's
        args.probe = "clamp2"
    problem = usage_problem(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    settings = settings_from_args(args)
    # The reference's settings; the probe's kernels (linear layers, sums) are deterministic anyway.
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    with distributed_context(args.local_rank, args.device) as dist_info:
        try:
            with exclusive_run(settings.weights_path, dist_info.is_main):
                return run_training(args, settings, dist_info)
        except (ProbeUsageError, CheckpointError) as exc:  # CheckpointError: another run holds these weights
            if dist_info.is_main:
                print(f"error: {exc}", file=sys.stderr, flush=True)
            return EXIT_USAGE


def discover_eval(folders: Sequence[str], dist_info: DistInfo) -> List[Path]:
    """The eval folders' files. Folders that are missing or hold no feature file count as none, as in
    the reference and the trainers (whose config templates ship placeholder folders), with a note:
    the ``--eval_split`` hold-out is used when no file is left."""
    paths: List[Path] = []
    empty: List[str] = []
    for folder in folders:
        try:
            paths.extend(discover([folder], "eval"))
        except ProbeUsageError:
            empty.append(str(folder))
    if empty:
        what = "is missing or holds" if len(empty) == 1 else "are missing or hold"
        then = "evaluating on the others" if paths else "holding out --eval_split of the training files instead"
        say(dist_info, f"note: eval folder{'s' if len(empty) > 1 else ''} {', '.join(empty)} {what} no .npy "
                       f"file: {then}")
    return paths


def run_training(args, settings: ProbeSettings, dist_info: DistInfo) -> int:
    progress = dist_info.is_main and settings.progress
    train_paths = discover(args.train_folders, "training")
    if args.probe is None:  # neither --probe nor --hidden_size: the training features choose
        args.probe, note = detect_probe(train_paths)
        settings = replace(settings, hidden_size=HIDDEN_SIZE if args.probe == "clamp2" else 0)
        if note:
            say(dist_info, note)
    eval_paths = discover_eval(args.eval_folders, dist_info) if args.eval_folders else []
    shared = sorted(set(p.resolve() for p in train_paths) & set(p.resolve() for p in eval_paths))
    if shared:
        raise ProbeUsageError(f"{len(shared)} file(s) are both in the training and the eval folders, e.g. "
                              f"{shared[0]}: evaluation must use other files")
    features, skipped = scan_features(train_paths + eval_paths, need_labels=True,
                                      cache_bytes=int(args.cache_gb * BYTES_PER_GB), progress=progress,
                                      global_only=settings.hidden_size == 0)
    list_skipped(dist_info, skipped)
    if not len(features):
        raise ProbeUsageError(f"none of the {len(skipped)} feature files can be used (reasons listed above)")
    features.dim()  # mixed sizes or kinds: a usage error before anything is trained
    if dist_info.device.type == "cuda":
        features.move_to(dist_info.device)
    report_dir = report_dir_for(args, settings.weights_path)
    if args.folds:
        return run_cross_validation(args.folds, features, skipped, settings, report_dir, dist_info)
    eval_set = set(eval_paths)
    train_indices = [i for i, path in enumerate(features.paths) if path not in eval_set]
    eval_indices = [i for i, path in enumerate(features.paths) if path in eval_set]
    if not train_indices:
        raise ProbeUsageError("no usable training file (reasons listed above)")
    drawn_before = 0  # files the hold-out split shuffled, with the generator balanced epochs draw from next
    if not eval_paths:
        # min_train=0 keeps the reference's plain ceil(n · EVAL_SPLIT), with no floor for training.
        split = split_eval(train_indices, args.eval_split, settings.seed, min_train=0, round_up=True)
        # the training files stay in the split's shuffled order: the reference's epoch order and class
        # numbering are drawn over that order
        train_indices, eval_indices = split.train, sorted(split.eval)
        drawn_before = len(split.train) + len(split.eval)
        if not train_indices:
            raise ProbeUsageError(f"{len(eval_indices)} usable file(s) leave none for training after the "
                                  f"{args.eval_split:g} eval split: add files or give --eval_folders")
    say_warnings(dist_info, check_classes([features.labels[i] for i in train_indices], "the training set"))
    classes = label_map(features.labels[i] for i in train_indices)
    unseen = [(features.paths[i], f"label '{features.labels[i]}' has no training file, so the probe cannot "
                                  "predict it") for i in eval_indices if features.labels[i] not in classes]
    list_skipped(dist_info, unseen)
    skipped = skipped + unseen
    eval_indices = [i for i in eval_indices if features.labels[i] in classes]
    if not eval_indices:
        raise ProbeUsageError("no eval file left to select the best epoch with (reasons listed above)")

    result = train_probe(features, train_indices, eval_indices, classes, settings, dist_info, drawn_before=drawn_before)
    names = list(classes)
    targets = [classes[features.labels[i]] for i in eval_indices]
    if dist_info.is_main:
        predictions = result.eval_probabilities.argmax(axis=1).tolist()
        metrics = {
            "mode": "hold-out", "weights": str(settings.weights_path), "classes": names,
            "feature_kind": features.kinds[0], "input_size": features.dim(),
            "files": {"train": len(train_indices), "eval": len(eval_indices), "skipped": len(skipped)},
            "best_epoch": result.best_epoch, "epochs_run": result.last_epoch, "stopped_early": result.stopped_early,
            "eval": {"loss": scores(result.eval_probabilities, targets)["loss"],
                     **class_table(targets, predictions, names)},
            "settings": settings.record(), "world_size": dist_info.world_size,
            "history": result.history, "skipped": skipped_record(skipped),
        }
        title = (f"hold-out evaluation of {settings.weights_path.name}, best epoch {result.best_epoch} "
                 f"({len(eval_indices)} eval files)")
        if not report_written(report_dir, f"the weights {settings.weights_path} are saved: free space and run the "
                              "same command again to write it", metrics, names, targets, predictions,
                              [("", result.history, result.best_epoch)], title=title):
            return EXIT_SOME_FAILED
        best = metrics["eval"]
        say(dist_info, f"Best Eval Epoch : {result.best_epoch}\nMax Eval Accuracy : {result.max_eval_acc}")
        say(dist_info, f"probe training done: {ran(result, settings)}, best epoch {result.best_epoch}: eval accuracy "
                       f"{best['accuracy']:.4f}, macro-F1 {best['macro_f1']:.4f}; weights {settings.weights_path}, "
                       f"report {report_dir}{skipped_note(skipped)}")
    return EXIT_SOME_FAILED if skipped else EXIT_OK


def ran(result: ProbeResult, settings: ProbeSettings) -> str:
    if result.last_epoch == result.start_epoch:
        return f"nothing to train ({result.start_epoch} epoch(s) already done)"
    stop = " (stopped early)" if result.stopped_early else ""
    return f"epochs {result.start_epoch + 1}..{result.last_epoch} of {settings.epochs}{stop}"


def skipped_note(skipped: Skipped) -> str:
    return f"; {len(skipped)} file(s) skipped (listed above)" if skipped else ""


def fold_weights(weights: Path, fold: int) -> Path:
    return weights.with_name(f"{weights.stem}_fold{fold}{weights.suffix}")


def run_cross_validation(folds: int, features: FeatureSet, skipped: Skipped, settings: ProbeSettings,
                         report_dir: Path, dist_info: DistInfo) -> int:
    """Stratified K-fold: each fold trains a probe and picks its best epoch on the held-out fold.

    As with the hold-out split (and in the reference), the held-out files also choose the epoch, so
    fold scores are those of the best epoch. Out-of-fold predictions make the pooled report.
    """
    from sklearn.model_selection import StratifiedKFold

    labels = list(features.labels)
    say_warnings(dist_info, check_classes(labels, "the training set"))
    classes = label_map(sorted(set(labels)))
    too_few = [f"'{label}' ({count})" for label, count in sorted(Counter(labels).items()) if count < folds]
    if too_few:
        raise ProbeUsageError(f"--folds {folds} needs at least {folds} files of every label; too few: "
                              f"{', '.join(too_few)}")
    targets = np.array([classes[label] for label in labels])
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=settings.seed)
    pooled = np.zeros((len(labels), len(classes)), dtype=np.float32)
    rows, histories = [], []
    for fold, (train_indices, eval_indices) in enumerate(splitter.split(np.zeros(len(labels)), targets), start=1):
        weights = fold_weights(settings.weights_path, fold)
        fold_settings = replace(settings, weights_path=weights, logs_path=logs_path_for(weights))
        result = train_probe(features, train_indices.tolist(), eval_indices.tolist(), classes, fold_settings,
                             dist_info, name=f"fold {fold}/{folds}")
        pooled[eval_indices] = result.eval_probabilities
        fold_scores = scores(result.eval_probabilities, targets[eval_indices])
        rows.append({"fold": fold, "best_epoch": result.best_epoch, "epochs_run": result.last_epoch,
                     "stopped_early": result.stopped_early, "train": len(train_indices), "eval": len(eval_indices),
                     "weights": str(weights), **fold_scores})
        histories.append((f"fold {fold}", result.history, result.best_epoch))
        say(dist_info, f"fold {fold}/{folds}: best epoch {result.best_epoch}, accuracy {fold_scores['accuracy']:.4f}, "
                       f"macro-F1 {fold_scores['macro_f1']:.4f}")
    accuracy = mean_std([row["accuracy"] for row in rows])
    f1 = mean_std([row["macro_f1"] for row in rows])
    summary = (f"{folds}-fold cross-validation: accuracy {accuracy['mean']:.4f} ± {accuracy['std']:.4f}, "
               f"macro-F1 {f1['mean']:.4f} ± {f1['std']:.4f} (mean ± std over folds)")
    if dist_info.is_main:
        names = list(classes)
        predictions = pooled.argmax(axis=1).tolist()
        metrics = {
            "mode": f"{folds}-fold cross-validation", "weights": [row["weights"] for row in rows], "classes": names,
            "feature_kind": features.kinds[0], "input_size": features.dim(),
            "files": {"total": len(labels), "skipped": len(skipped)},
            "accuracy": accuracy, "macro_f1": f1, "folds": rows,
            "out_of_fold": class_table(targets.tolist(), predictions, names),
            "settings": settings.record(), "world_size": dist_info.world_size,
            "histories": {name: history for name, history, _ in histories}, "skipped": skipped_record(skipped),
        }
        if not report_written(report_dir, "the folds' weights are saved: free space and run the same command again "
                              "to write it", metrics, names, targets.tolist(), predictions, histories,
                              title=f"{summary}\nper-class scores of the out-of-fold predictions"):
            return EXIT_SOME_FAILED
        say(dist_info, f"{summary}; report {report_dir}{skipped_note(skipped)}")
    return EXIT_SOME_FAILED if skipped else EXIT_OK


# -- inference_cls.py ------------------------------------------------------------------------------

def inference_command(args) -> int:
    world_size, rank = env_int("WORLD_SIZE", 1), env_int("RANK", 0)
    if world_size > 1:
        # Under torchrun every process classified every file and wrote the same output: the features are
        # precomputed and a linear probe over them takes seconds, so process 0 does it alone.
        if rank != 0:
            return EXIT_OK
        print(f"note: launched with WORLD_SIZE={world_size}: process 0 classifies every file, the others stop "
              "(one process is enough for precomputed features)", file=sys.stderr)
    # The output is checked before every feature is read: a read-only folder was said only once all were classified.
    problem = cuda_problem(args.device) or ("--batch_size must be at least 1" if args.batch_size < 1 else None) \
        or output_problem(args.output_file, folder=False)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        probe = load_probe(args.weights, device)
        paths = discover([args.features], "features")
        features, skipped = scan_features(paths, need_labels=False, expected_dim=probe.input_size,
                                          cache_bytes=int(args.cache_gb * BYTES_PER_GB), progress=not args.no_progress,
                                          global_only=isinstance(probe.model, LinearClassifier))
    except ProbeUsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"loaded {args.weights}: epoch {probe.epoch}, eval accuracy {probe.max_eval_acc:.4f}, "
          f"{len(probe.class_names)} classes, features of size {probe.input_size}", flush=True)
    list_skipped(DistInfo(), skipped)
    if device.type == "cuda":
        features.move_to(device)
    probabilities = predict_features(probe, features, args.batch_size, device) if len(features) else None
    predictions = probabilities.argmax(axis=1).tolist() if probabilities is not None else []
    results = {as_given(path, args.features): probe.class_names[index]
               for path, index in zip(features.paths, predictions)}
    if not write_text_or_say(args.output_file, json.dumps(results)):  # the reference's json.dump: one line, ASCII
        return EXIT_USAGE
    unscored: Skipped = []
    reported = True
    if args.evaluate:
        unscored, reported = evaluate_predictions(args, probe.class_names, features, probabilities, skipped)
    problems = len(skipped) + len(unscored)
    print(f"classified {len(results)} file(s) into {args.output_file}"
          f"{f'; {len(skipped)} skipped' if skipped else ''}"
          f"{f', {len(unscored)} not scored' if unscored else ''}{' (listed above)' if problems else ''}", flush=True)
    return EXIT_SOME_FAILED if problems or not reported else EXIT_OK


def as_given(path: Path, given: str | os.PathLike) -> str:
    """``path`` as the reference's ``os.path.join(root, file)`` from ``os.walk(given)`` names it.

    The folder keeps the spelling it was given in (``./feats/a.npy``, not ``feats/a.npy``); a single
    file given is named as given.
    """
    root = Path(given)
    if not root.is_dir():
        return os.fspath(given)
    return os.path.join(os.fspath(given), *path.relative_to(root).parts)


def evaluate_predictions(args, class_names: Sequence[str], features: FeatureSet, probabilities: Optional[np.ndarray],
                         skipped: Skipped) -> Tuple[Skipped, bool]:
    """Score predictions against the labels in the file names; returns the files that could not be scored, and
    whether the report (if any) was written."""
    classes = {name: index for index, name in enumerate(class_names)}
    scored, targets, unscored = [], [], []
    for row, path in enumerate(features.paths):
        try:
            label = label_of(path)
        except FeatureError as exc:
            unscored.append((path, str(exc)))
            continue
        if label not in classes:
            unscored.append((path, f"label '{label}' is not one the probe was trained on ({', '.join(class_names)})"))
            continue
        scored.append(row)
        targets.append(classes[label])
    list_skipped(DistInfo(), unscored, what="not scored")
    output = Path(args.output_file)
    report_dir = Path(args.report_dir) if args.report_dir else output.with_name(f"{output.stem}_report")
    if not scored:
        print("note: no file could be scored against its label (reasons listed above); no report written",
              file=sys.stderr)
        return unscored, True
    predictions = probabilities[scored].argmax(axis=1).tolist()
    metrics = {"mode": "inference", "weights": str(args.weights), "classes": list(class_names),
               "files": {"scored": len(scored), "not_scored": len(unscored), "skipped": len(skipped)},
               "eval": {"loss": scores(probabilities[scored], targets)["loss"],
                        **class_table(targets, predictions, class_names)},
               "skipped": skipped_record(skipped), "not_scored": skipped_record(unscored)}
    if not report_written(report_dir, f"the predictions {args.output_file} are written", metrics, class_names, targets,
                          predictions, [], title=f"{Path(args.weights).name} on {args.features} ({len(scored)} files)"):
        return unscored, False
    print(f"accuracy {metrics['eval']['accuracy']:.4f}, macro-F1 {metrics['eval']['macro_f1']:.4f} on "
          f"{len(scored)} file(s); report {report_dir}", flush=True)
    return unscored, True
