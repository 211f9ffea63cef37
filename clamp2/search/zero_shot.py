"""Zero-shot classification: each piece gets the label whose prompt's text feature is closest (cosine).

Labels become prompts through a template (``"{}"`` → the label itself, ``"a {} tune"``...). When file
names start with a label and ``_`` (``jig_001.abc``), those labels are the truth for the
accuracy, the macro-F1 and the confusion matrix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..files import name_key


def parse_labels(text: str) -> List[str]:
    """``"jig, reel,waltz"`` → ``["jig", "reel", "waltz"]``; empty pieces dropped, duplicates refused."""
    return check_labels([part.strip() for part in text.split(",") if part.strip()])


def read_label_prompts(path: str | os.PathLike) -> tuple[List[str], Dict[str, str]]:
    """Labels, one per line, each optionally with its own prompt: ``jig = a lively jig in 6/8 time``.

    Returns the labels and ``{label: prompt}`` for those that have one (the others use the template).
    """
    labels: List[str] = []
    own: Dict[str, str] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        label, _, prompt = (part.strip() for part in line.partition("="))
        if not label or (_ and not prompt):
            raise ValueError(f"{path}: cannot read {line!r}: write 'label' or 'label = prompt'")
        labels.append(label)
        if prompt:
            own[label] = prompt
    return check_labels(labels), own


def check_labels(labels: List[str]) -> List[str]:
    if len(labels) < 2:
        raise ValueError(f"zero-shot classification needs at least two labels, got {len(labels)}")
    seen = set()
    for label in labels:
        # As file names carry them (case-insensitive, spaces as _): "slow air" and "slow_air" would both be
        # the truth of slow_air_1.mid, whichever came first.
        if _name_key(label) in seen:
            raise ValueError(f"label {label!r} is given twice (ignoring case, a space and _ being the same)")
        seen.add(_name_key(label))
    return labels


def prompts(labels: Sequence[str], template: str = "{}", own: Optional[Dict[str, str]] = None) -> List[str]:
    """Each label's prompt: its own one from ``own`` if given, else ``template`` with ``{}`` → the label."""
    if template.count("{}") != 1:
        raise ValueError(f"the prompt template must hold exactly one {{}} (where the label goes), got {template!r}")
    own = own or {}
    texts = [own.get(label, template.replace("{}", label)) for label in labels]
    for i, text in enumerate(texts):
        if text in texts[:i]:  # the same text feature: the later label could never be predicted
            raise ValueError(f"labels {labels[texts.index(text)]!r} and {labels[i]!r} have the same prompt {text!r}")
    return texts


def predict(music: np.ndarray, label_features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(best label index per piece ``[n]``, cosine similarities ``[n, k]``); ties go to the first label."""
    from ..api import cosine_similarity

    scores = cosine_similarity(music, label_features)
    return scores.argmax(axis=1), scores


def _name_key(label: str) -> str:
    # name_key: case-folded and NFC, so that a label typed in NFC finds a file name a Mac wrote in NFD.
    return name_key(label).replace(" ", "_")


def label_in_name(path: str | os.PathLike, labels: Sequence[str]) -> Optional[str]:
    """The label a file name starts with (``<label>_...``, case-insensitive, spaces as ``_``); the longest wins."""
    name = name_key(Path(path).name)
    matches = [label for label in labels if name.startswith(_name_key(label) + "_")]
    return max(matches, key=len) if matches else None


@dataclass
class Scores:
    labels: List[str]
    confusion: np.ndarray  # [k, k]: rows true label, columns predicted
    accuracy: float
    macro_f1: float
    count: int


def evaluate(true: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> Scores:
    """Accuracy, macro-F1 over the labels that occur in ``true`` or ``predicted`` (scikit-learn's
    default), and the confusion matrix over ``labels``."""
    index = {label: i for i, label in enumerate(labels)}
    confusion = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for t, p in zip(true, predicted):
        confusion[index[t], index[p]] += 1
    count = int(confusion.sum())
    if count == 0:
        raise ValueError("no file to evaluate")
    hits = np.diag(confusion)
    per_true, per_predicted = confusion.sum(axis=1), confusion.sum(axis=0)
    present = (per_true + per_predicted) > 0
    precision = np.divide(hits, per_predicted, out=np.zeros(len(labels)), where=per_predicted > 0)
    recall = np.divide(hits, per_true, out=np.zeros(len(labels)), where=per_true > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros(len(labels)), where=both > 0)
    return Scores(list(labels), confusion, float(hits.sum() / count), float(f1[present].mean()), count)


def format_confusion(scores: Scores) -> str:
    """The confusion matrix as a text table (rows: true label, columns: predicted)."""
    names = list(scores.labels)
    corner = "true \\ predicted"
    first = max([len(n) for n in names] + [len(corner)])
    width = max([len(n) for n in names] + [len(str(scores.confusion.max())), 4])
    lines = [corner.ljust(first) + " " + " ".join(n.rjust(width) for n in names)]
    for name, row in zip(names, scores.confusion):
        lines.append(name.ljust(first) + " " + " ".join(str(v).rjust(width) for v in row))
    return "\n".join(lines)


def save_confusion_png(scores: Scores, path: str | os.PathLike, title: str = "zero-shot") -> None:
    """The confusion matrix as a PNG (matplotlib, no display needed), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..files import atomic_path

    k = len(scores.labels)
    fig, ax = plt.subplots(figsize=(max(4.0, 1.5 + 0.6 * k), max(3.5, 1.2 + 0.6 * k)), dpi=120)
    ax.imshow(scores.confusion, cmap="Blues")
    ax.set_xticks(range(k), scores.labels, rotation=45, ha="right")
    ax.set_yticks(range(k), scores.labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{title}\naccuracy {scores.accuracy:.3f}, macro-F1 {scores.macro_f1:.3f}", fontsize=8)
    top = scores.confusion.max() or 1
    for (i, j), value in np.ndenumerate(scores.confusion):
        ax.text(j, i, str(value), ha="center", va="center", color="white" if value > top / 2 else "black", fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
