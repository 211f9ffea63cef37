"""Synthetic feature files with a known class structure, for the linear-probe tests and benchmark.

Each class has a mean vector; a file's positions are its class mean plus Gaussian noise, so the
best possible accuracy is that of the nearest-true-mean rule (:func:`oracle_accuracy`), which the
trained probe should approach on held-out files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Sequence

import numpy as np


def class_means(labels: Sequence[str], dim: int, separation: float, seed: int = 0) -> Dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {label: rng.normal(size=dim).astype(np.float32) * separation for label in labels}


def write_features(folder: Path, means: Dict[str, np.ndarray], files_per_class: int, noise: float = 1.0,
                   lengths=(3, 12), per_position: bool = True, seed: int = 1, start: int = 0) -> list[Path]:
    """``<label>_<n>.npy`` files: ``[1, L, D]`` (L drawn from ``lengths``) or ``[1, D]``."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for label, mean in means.items():
        for number in range(start, start + files_per_class):
            length = int(rng.integers(lengths[0], lengths[1] + 1)) if per_position else 1
            positions = mean + noise * rng.normal(size=(length, len(mean))).astype(np.float32)
            array = positions[None] if per_position else positions
            path = folder / f"{label}_{number:04d}.npy"
            np.save(path, array.astype(np.float32))
            paths.append(path)
    return paths


def oracle_accuracy(paths: Sequence[Path], means: Dict[str, np.ndarray]) -> float:
    """Accuracy of assigning each file to the class whose true mean is nearest its mean position."""
    labels = list(means)
    centers = np.stack([means[label] for label in labels])
    correct = 0
    for path in paths:
        array = np.load(path)
        positions = array[0] if array.ndim == 3 else array
        guess = labels[int(np.argmin(((centers - positions.mean(axis=0)) ** 2).sum(axis=1)))]
        correct += guess == Path(path).name.split("_")[0]
    return correct / len(paths)
