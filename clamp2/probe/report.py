"""Scores and the final report of a probe: per-class table, ``metrics.json``, PNG figures.

Macro-F1 is scikit-learn's ``f1_score(average="macro")`` over the labels that occur in the
targets or the predictions, as the reference computes it. Figures are drawn with matplotlib's
Agg canvas directly (no display, no global backend switch), so they work on headless nodes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch

from ..files import atomic_path, atomic_write_text
from .model import probe_loss

MAX_ANNOTATED_CLASSES = 30  # confusion-matrix cells get their count written in up to this many classes
HISTORY_FIELDS = ("epoch", "train_loss", "train_acc", "train_f1_macro", "eval_loss", "eval_acc", "eval_f1_macro",
                  "learning_rate", "seconds")


def macro_f1(targets: Sequence[int], predictions: Sequence[int]) -> float:
    """scikit-learn's ``f1_score(average="macro", zero_division=0)``, without its per-call overhead.

    It is computed twice per epoch for up to 1000 epochs, where scikit-learn's argument checks
    alone would cost minutes; a test checks the two agree.
    """
    targets_a, predictions_a = np.asarray(targets, dtype=np.int64), np.asarray(predictions, dtype=np.int64)
    labels = np.union1d(targets_a, predictions_a)
    if not len(labels):
        return 0.0
    hits = np.array([np.sum((targets_a == label) & (predictions_a == label)) for label in labels], dtype=np.float64)
    true = np.array([np.sum(targets_a == label) for label in labels], dtype=np.float64)
    predicted = np.array([np.sum(predictions_a == label) for label in labels], dtype=np.float64)
    denominator = true + predicted  # F1 = 2·TP / (2·TP + FP + FN) = 2·TP / (true + predicted)
    f1 = np.divide(2 * hits, denominator, out=np.zeros_like(hits), where=denominator > 0)
    return float(f1.mean())


def scores(probabilities: np.ndarray, targets: Sequence[int]) -> Dict[str, float]:
    """Loss (cross-entropy on the probabilities), accuracy and macro-F1 of a set of predictions."""
    targets_t = torch.as_tensor(np.asarray(targets), dtype=torch.long)
    probabilities_t = torch.as_tensor(probabilities, dtype=torch.float32)
    predictions = probabilities_t.argmax(dim=1)
    return {"loss": float(probe_loss(probabilities_t, targets_t)),
            "accuracy": float((predictions == targets_t).double().mean()),
            "macro_f1": macro_f1(targets_t.tolist(), predictions.tolist())}


def class_table(targets: Sequence[int], predictions: Sequence[int], class_names: Sequence[str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix (rows: truth)."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    labels = list(range(len(class_names)))
    precision, recall, f1, support = precision_recall_fscore_support(targets, predictions, labels=labels,
                                                                     zero_division=0)
    targets_a, predictions_a = np.asarray(targets), np.asarray(predictions)
    return {
        "accuracy": float((targets_a == predictions_a).mean()) if len(targets_a) else 0.0,
        "macro_f1": macro_f1(targets, predictions),
        "per_class": {name: {"precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
                             "support": int(support[i])} for i, name in enumerate(class_names)},
        "confusion_matrix": confusion_matrix(targets, predictions, labels=labels).tolist(),
    }


def table_text(targets: Sequence[int], predictions: Sequence[int], class_names: Sequence[str]) -> str:
    from sklearn.metrics import classification_report

    return classification_report(targets, predictions, labels=list(range(len(class_names))),
                                 target_names=list(class_names), digits=4, zero_division=0)


def mean_std(values: Sequence[float]) -> Dict[str, float]:
    """Mean and standard deviation (numpy's, ddof 0, as scikit-learn's cross-validation reports use)."""
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "std": float(array.std())}


# -- files -----------------------------------------------------------------------------------------

def write_json(path: Path, data: Mapping) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def save_figure(figure, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], class_names: Sequence[str], path: Path,
                          title: str = "Confusion matrix") -> None:
    """Counts, coloured by the share of each true class (row), so rare classes are readable too."""
    from matplotlib.figure import Figure

    counts = np.asarray(matrix, dtype=np.int64)
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape, dtype=np.float64), where=totals > 0)
    size = max(4.0, 0.45 * len(class_names) + 2.5)
    figure = Figure(figsize=(size + 1.2, size))
    axes = figure.add_subplot()
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="share of the true class")
    ticks = np.arange(len(class_names))
    axes.set_xticks(ticks, labels=list(class_names), rotation=90 if len(class_names) > 6 else 0)
    axes.set_yticks(ticks, labels=list(class_names))
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    if len(class_names) <= MAX_ANNOTATED_CLASSES:
        for row in range(len(class_names)):
            for column in range(len(class_names)):
                axes.text(column, row, str(counts[row, column]), ha="center", va="center", fontsize=8,
                          color="white" if shares[row, column] > 0.5 else "black")
    save_figure(figure, path)


def plot_learning_curves(histories: Sequence[Tuple[str, Mapping[str, List[float]], int]], path: Path) -> None:
    """Loss, accuracy and macro-F1 per epoch (train dashed, eval solid) of one or several runs; best epochs marked."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(15, 4.2))
    panels = (("loss", "train_loss", "eval_loss"), ("accuracy", "train_acc", "eval_acc"),
              ("macro-F1", "train_f1_macro", "eval_f1_macro"))
    for column, (title, train_key, eval_key) in enumerate(panels):
        axes = figure.add_subplot(1, 3, column + 1)
        for index, (name, history, best_epoch) in enumerate(histories):
            color = f"C{index % 10}"
            prefix = f"{name} " if name else ""
            axes.plot(history["epoch"], history[train_key], "--", color=color, label=f"{prefix}train")
            axes.plot(history["epoch"], history[eval_key], "-", color=color, label=f"{prefix}eval")
            if best_epoch:
                axes.axvline(best_epoch, color=color, linestyle=":", linewidth=1)
        axes.set_title(title)
        axes.set_xlabel("epoch")
        axes.grid(alpha=0.3)
        if column == 0 and len(histories) <= 10:
            axes.legend(fontsize=8)
    figure.suptitle("learning curves (dotted: best epoch by eval accuracy)")
    save_figure(figure, path)


def write_report(report_dir: Path, metrics: Mapping, class_names: Sequence[str], targets: Sequence[int],
                 predictions: Sequence[int], histories: Sequence[Tuple[str, Mapping[str, List[float]], int]],
                 title: Optional[str] = None) -> List[Path]:
    """``metrics.json``, ``report.txt``, ``confusion_matrix.png`` and (with histories) ``learning_curve.png``."""
    report_dir.mkdir(parents=True, exist_ok=True)
    paths = [report_dir / name for name in ("metrics.json", "report.txt", "confusion_matrix.png")]
    write_json(paths[0], metrics)
    header = f"{title}\n\n" if title else ""
    atomic_write_text(paths[1], header + table_text(targets, predictions, class_names))
    plot_confusion_matrix(class_table(targets, predictions, class_names)["confusion_matrix"], class_names, paths[2],
                          title=title or "Confusion matrix")
    if histories:
        paths.append(report_dir / "learning_curve.png")
        plot_learning_curves(histories, paths[3])
    return paths
