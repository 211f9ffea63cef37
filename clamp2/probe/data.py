"""Feature files for the linear probe: labels from file names, checks, padded batches, epoch orders.

A feature file is what the extraction scripts write: ``[1, L, D]`` per-position states or a
``[1, D]`` global feature (one position). The label is the file name up to its first ``_``
(``jazz_0042.npy`` → ``jazz``), as in the reference. Every file is read once before training, so
a bad file (unreadable, wrong shape, not floating point, NaN/inf, no ``_`` in its name) is listed
with its reason and left out instead of failing an epoch hours later; inconsistent data (feature
sizes or kinds that differ between files) is a usage error, since no probe can take both.

Batches pad every file to the longest of the batch and carry a mask, so that a file's probe
output does not depend on the batch it is in (:mod:`clamp2.probe.model`).
"""

from __future__ import annotations

import hashlib
import math
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..files import find_all_files, unreachable
from ..progress import progress_bar

FEATURE_EXTENSIONS = (".npy",)
LABEL_SEPARATOR = "_"
PER_POSITION, GLOBAL = "per-position [1, L, D]", "global [1, D]"


class ProbeUsageError(ValueError):
    """The run cannot go ahead as asked (exit status 2): no data, one class, mixed feature sizes, ..."""


class FeatureError(ValueError):
    """One file cannot be used; it is skipped and listed with this reason."""


def label_of(path: str | os.PathLike) -> str:
    """The class label in a file name: the part before the first ``_``."""
    name = Path(path).name
    label, separator, _ = name.partition(LABEL_SEPARATOR)
    if not separator:
        raise FeatureError(f"no '{LABEL_SEPARATOR}' in the file name, so its label is unknown "
                           f"(name files <label>{LABEL_SEPARATOR}<anything>.npy)")
    if not label:
        raise FeatureError(f"the file name starts with '{LABEL_SEPARATOR}', so its label is empty")
    return label


def read_feature(path: str | os.PathLike) -> Tuple[np.ndarray, str]:
    """``(positions [L, D] float32, kind)`` of one feature file; :class:`FeatureError` says what is wrong."""
    try:
        array = np.load(path, allow_pickle=False)
    except PermissionError as exc:  # as a non-root user: not a damaged array; the wording extract_mert.py uses
        raise FeatureError(f"cannot read the file: {exc.strerror}") from None
    except (OSError, ValueError, EOFError) as exc:
        raise FeatureError(f"cannot read it as a .npy array ({' '.join(str(exc).split())})") from None
    if not isinstance(array, np.ndarray):
        raise FeatureError("holds an archive of arrays (.npz), not one feature array")
    if array.ndim == 3 and array.shape[0] == 1:
        positions, kind = array[0], PER_POSITION
    elif array.ndim == 2 and array.shape[0] == 1:
        positions, kind = array, GLOBAL
    elif array.ndim == 1:  # CLaMP 3's probe also takes a bare [D] vector
        positions, kind = array[None], GLOBAL
    else:
        raise FeatureError(f"shape {list(array.shape)}: expected [1, L, D] (per-position) or [1, D] / [D] "
                           "(global), as the extraction scripts write")
    if not np.issubdtype(array.dtype, np.floating):
        raise FeatureError(f"holds {array.dtype} values, not floating-point features")
    if positions.shape[0] == 0 or positions.shape[1] == 0:
        raise FeatureError(f"shape {list(array.shape)} holds no values")
    finite = np.isfinite(positions)
    if not finite.all():
        raise FeatureError(f"{int(finite.size - finite.sum())} of {finite.size} values are NaN or infinite")
    return np.ascontiguousarray(positions, dtype=np.float32), kind


def discover(folders: Sequence[str | os.PathLike], what: str) -> List[Path]:
    """All .npy files under ``folders``; a missing folder or no file at all is a usage error."""
    problem = next(filter(None, (unreachable(folder, f"{what} folder") for folder in folders)), None)
    if problem:
        raise ProbeUsageError(problem)
    missing = [str(folder) for folder in folders if not Path(folder).exists()]
    if missing:
        raise ProbeUsageError(f"{what} folder not found: {', '.join(missing)}")
    paths: List[Path] = []
    for folder in folders:
        # A sub-folder that cannot be listed is refused by name: its files were left out without a word.
        found = find_all_files(folder, FEATURE_EXTENSIONS, ProbeUsageError)
        if not found:
            raise ProbeUsageError(f"no .npy feature files under the {what} folder {folder} "
                                  "(extract features first, e.g. code/extract_m3.py)")
        paths.extend(found)
    return paths


@dataclass
class FeatureSet:
    """Scanned feature files: path, label (None when not needed), length, size and kind of each."""

    paths: List[Path] = field(default_factory=list)
    labels: List[Optional[str]] = field(default_factory=list)
    lengths: List[int] = field(default_factory=list)
    dims: List[int] = field(default_factory=list)
    kinds: List[str] = field(default_factory=list)
    # The arrays themselves when the set fits in the memory budget; else read again when needed.
    arrays: Optional[List[np.ndarray]] = None
    # All positions in one device tensor (see :meth:`move_to`), with each file's first row.
    resident: Optional[torch.Tensor] = None
    offsets: Optional[List[int]] = None

    def __len__(self) -> int:
        return len(self.paths)

    def features(self, index: int) -> torch.Tensor:
        if self.resident is not None:
            start = self.offsets[index]
            return self.resident[start:start + self.lengths[index]]
        if self.arrays is not None:
            return torch.from_numpy(self.arrays[index])
        return torch.from_numpy(read_feature(self.paths[index])[0])

    def move_to(self, device: torch.device) -> bool:
        """Hold the cached features in ``device`` memory (one tensor); False when they are not cached.

        On a GPU, batches are then gathered there: copying each batch from the host, not the
        probe's arithmetic, would otherwise bound the speed of large batches.
        """
        if self.arrays is None or not self.arrays:
            return False
        offsets = np.concatenate([[0], np.cumsum(self.lengths)]).tolist()
        resident = torch.empty((offsets[-1], self.dims[0]), dtype=torch.float32, device=device)
        for array, start in zip(self.arrays, offsets):
            resident[start:start + len(array)].copy_(torch.from_numpy(array))
        self.resident, self.offsets, self.arrays = resident, offsets[:-1], None
        return True

    def dim(self) -> int:
        """The feature size D shared by every file; mixed sizes or kinds are a usage error."""
        for values, what, fix in ((self.dims, "feature sizes", "extract every file with the same model"),
                                  (self.kinds, "feature kinds",
                                   "extract all with --normalize (global) or all without it (per-position)")):
            counts = Counter(values)
            if len(counts) > 1:
                examples = "; ".join(f"{value} in {count} file(s), e.g. {self.paths[values.index(value)]}"
                                     for value, count in counts.most_common())
                raise ProbeUsageError(f"mixed {what}: {examples}; {fix}")
        return self.dims[0]


GLOBAL_ONLY = ("per-position features [1, L, D]: CLaMP 3's linear probe takes one global feature per file "
               "([1, D] or [D]; extract with --get_global / --normalize)")


def scan_features(paths: Sequence[Path], need_labels: bool, expected_dim: Optional[int] = None,
                  cache_bytes: int = 0, progress: bool = True, desc: str = "checking features",
                  global_only: bool = False) -> Tuple[FeatureSet, List[Tuple[Path, str]]]:
    """Read and check every file once; returns the usable files and ``(path, reason)`` for the others.

    ``expected_dim`` (a trained probe's input size) turns a different feature size into a skip;
    ``global_only`` (CLaMP 3's probe) a per-position file.
    The arrays are kept in memory when the files' total size is at most ``cache_bytes``.
    """
    total = 0
    for path in paths:
        try:
            total += path.stat().st_size
        except OSError:
            pass
    features = FeatureSet(arrays=[] if total <= cache_bytes else None)
    skipped: List[Tuple[Path, str]] = []
    bar = progress_bar(total=len(paths), desc=desc, unit="file", enabled=progress)
    for path in paths:
        bar.update(1)
        try:
            label = label_of(path) if need_labels else None
            positions, kind = read_feature(path)
            if global_only and kind != GLOBAL:
                raise FeatureError(GLOBAL_ONLY)
            if expected_dim is not None and positions.shape[1] != expected_dim:
                raise FeatureError(f"feature size {positions.shape[1]}, the probe takes {expected_dim}")
        except FeatureError as exc:
            skipped.append((path, str(exc)))
            continue
        features.paths.append(path)
        features.labels.append(label)
        features.lengths.append(positions.shape[0])
        features.dims.append(positions.shape[1])
        features.kinds.append(kind)
        if features.arrays is not None:
            features.arrays.append(positions)
    bar.close()
    return features, skipped


def label_map(labels: Sequence[str]) -> Dict[str, int]:
    """Class index of each label, in the order first found, as the reference numbers them (its
    ``label2idx`` over the training files)."""
    classes: Dict[str, int] = {}
    for label in labels:
        classes.setdefault(label, len(classes))
    return classes


def check_classes(labels: Sequence[str], what: str) -> List[str]:
    """Raises when ``labels`` name fewer than two classes; returns a warning line per group of classes whose
    names differ only in case or Unicode normalization (``Jig``/``jig``; ``Ländler`` as a Mac writes it, NFD, and
    as typed, NFC): they stay apart, as in the reference, but are likely one class."""
    from ..files import name_key

    classes = sorted(set(labels))
    if len(classes) < 2:
        found = f"only the class '{classes[0]}'" if classes else "no class"
        raise ProbeUsageError(f"{what} has {found}: a classifier needs files of at least two labels "
                              f"(the label is the file name up to the first '{LABEL_SEPARATOR}')")
    alike: Dict[str, List[str]] = {}
    for label in classes:
        alike.setdefault(name_key(label), []).append(label)
    return [f"warning: the classes {', '.join(ascii(label) for label in group)} of {what} differ only in case or "
            "Unicode normalization: they are trained as different classes (rename the files if they are one)"
            for group in alike.values() if len(group) > 1]


# -- batches -------------------------------------------------------------------------------------

def pack_positions(items: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """A batch of files ``[L_i, D]``: ``(features, mask)``.

    Equal lengths (batch size 1 always): ``[B, L, D]`` and no mask, the reference's plain mean.
    Otherwise the positions of all files one after another, ``[sum L_i, D]``, and a ``[B, L_max]``
    mask of which padded slots they fill: no padding is ever pushed through the first layer.
    """
    lengths = [len(item) for item in items]
    longest = max(lengths)
    if min(lengths) == longest:
        return torch.stack(list(items)), None
    mask = torch.arange(longest).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    return torch.cat(list(items)), mask


class ProbeDataset(Dataset):
    """Item ``i``: ``(features [L, D], class index, i)`` of the ``i``-th file of a subset."""

    def __init__(self, features: FeatureSet, indices: Sequence[int], targets: Sequence[int]):
        self.features = features
        self.indices = list(indices)
        self.targets = list(targets)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int):
        return self.features.features(self.indices[item]), self.targets[item], item

    def lengths(self) -> List[int]:
        return [self.features.lengths[index] for index in self.indices]


def collate_batch(samples):
    """``(features, mask or None, targets, items)`` of a list of dataset items (see :func:`pack_positions`)."""
    tensors, targets, items = zip(*samples)
    features, mask = pack_positions(tensors)
    return features, mask, torch.tensor(targets, dtype=torch.long), torch.tensor(items, dtype=torch.long)


REFERENCE_SEED = 42  # the reference's seed; its DistributedSampler's own seed is 0


class EpochSampler(Sampler[int]):
    """This process's share of one epoch's order of a subset, identical on every rank: the reference's.

    The reference wraps its training files in torch's ``DistributedSampler`` (seed 0, ``set_epoch(epoch)``):
    each epoch visits them in ``torch.randperm(n)`` order, the generator seeded 0 + epoch, over the
    files in the order its data set holds them (``order``; the hold-out split's shuffled order). The
    default seed (42) gives that order; another ``--seed`` seeds the generator from a hash of (seed,
    epoch). It depends on (seed, epoch) alone, so a resumed run sees exactly the orders an
    uninterrupted one would.

    ``balanced`` is the reference's BalancedTensorDataset: every epoch, as many files of each class
    as the rarest class has (``random.sample`` per class, classes in the order first found, then
    ``random.shuffle``), drawn from Python's generator seeded ``seed``, which first shuffled the
    ``drawn_before`` files of the hold-out split (0: no split); epoch e visits the e-th draw in the
    randperm order above. ``shuffle`` off keeps ``order`` (e.g. by length, so evaluation batches pad
    little). The order is padded by repeating its start to a multiple of the number of processes,
    and each rank takes every ``world_size``-th item, like DistributedSampler.
    """

    def __init__(self, targets: Sequence[int], *, shuffle: bool, balanced: bool = False, seed: int = REFERENCE_SEED,
                 rank: int = 0, world_size: int = 1, order: Optional[Sequence[int]] = None, drawn_before: int = 0):
        self.targets = list(targets)
        self.shuffle, self.balanced, self.seed = shuffle, balanced, seed
        self.rank, self.world_size = rank, world_size
        self.order = list(order) if order is not None else list(range(len(self.targets)))
        self.drawn_before = drawn_before
        self.epoch = 0
        self._stream: Optional[random.Random] = None
        self._drawn: Tuple[int, List[int]] = (0, [])  # (epoch, that epoch's balanced list)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _permutation(self, size: int) -> List[int]:
        generator = torch.Generator()
        if self.seed == REFERENCE_SEED:
            generator.manual_seed(self.epoch)  # DistributedSampler: its seed 0 + epoch
        else:  # another seed, other orders (not the default's shifted by an epoch)
            digest = hashlib.sha256(f"{self.seed}:probe:{self.epoch}".encode()).digest()
            generator.manual_seed(int.from_bytes(digest[:8], "little"))
        return torch.randperm(size, generator=generator).tolist()

    def balanced_list(self, epoch: int) -> List[int]:
        """The reference's balanced file list of ``epoch`` (1-based): the stream's ``epoch``-th draw."""
        epoch = max(epoch, 1)
        if self._stream is not None and self._drawn[0] == epoch:
            return list(self._drawn[1])
        if self._stream is None or self._drawn[0] > epoch:
            self._stream = random.Random(self.seed)
            if self.drawn_before:
                self._stream.shuffle(list(range(self.drawn_before)))  # what the hold-out split drew
            self._drawn = (0, [])
        by_class: Dict[int, List[int]] = {}
        for item, target in enumerate(self.targets):
            by_class.setdefault(target, []).append(item)
        fewest = min(len(items) for items in by_class.values())
        drawn_epoch, drawn = self._drawn
        while drawn_epoch < epoch:
            drawn = [item for items in by_class.values() for item in self._stream.sample(items, fewest)]
            self._stream.shuffle(drawn)
            drawn_epoch += 1
        self._drawn = (drawn_epoch, drawn)
        return list(drawn)

    def epoch_order(self) -> List[int]:
        if self.balanced:
            drawn = self.balanced_list(self.epoch)
            return [drawn[i] for i in self._permutation(len(drawn))]
        if not self.shuffle:
            return list(self.order)
        return [self.order[i] for i in self._permutation(len(self.order))]

    def __iter__(self) -> Iterator[int]:
        order = self.epoch_order()
        padded = math.ceil(len(order) / self.world_size) * self.world_size
        order = (order * math.ceil(padded / len(order)))[:padded]
        return iter(order[self.rank::self.world_size])

    def __len__(self) -> int:
        if self.balanced:
            counts = Counter(self.targets)
            size = min(counts.values()) * len(counts)
        else:
            size = len(self.order)
        return math.ceil(size / self.world_size)
