"""Search and retrieval metrics straight from raw files: what ``clamp2_search.py`` and
``clamp2_eval.py`` share.

A *target* is a feature index (``build_index.py``), a folder of ``.npy`` features, or a folder of
raw music/text files, which is encoded through the model and the feature cache (a second run on
the same files does no model work). A *query* is a ``.npy`` feature, a ``.txt`` file, a music file
or a sentence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Callable, List, Tuple

import numpy as np

# The encoder's music extensions (extraction.model_inputs, which loads torch; a test keeps them equal).
MUSIC_SUFFIXES = (".xml", ".mxl", ".musicxml", ".mid", ".midi", ".abc", ".mtf")


@dataclass
class Collection:
    names: List[str]  # what reports show: relative paths (raw) or keys (features)
    keys: List[str]  # SPEC keys: file name up to the first "."
    matrix: np.ndarray  # float32 [N, D]
    failures: List[Tuple[str, str]]  # (name, reason) of inputs that could not be used
    computed: int = 0
    cached: int = 0
    warnings: List[str] = field(default_factory=list)  # one line per key that several files share


def holds_features(path: Path) -> bool:
    """An index, or a folder with ``.npy`` files directly in it (the original's feature folders).

    A folder holding raw music files as well, or more ``.txt`` files than ``.npy`` ones (a README
    beside features is fine), is a ``ValueError`` naming both: read as features, its music or texts
    would be left out without a word. A hidden ``.npy`` beside raw files is ignored, as every hidden
    file is.
    """
    from clamp2.files import find_files, input_problem

    from .feature_store import is_index

    if is_index(path):
        return True
    if not path.is_dir():
        return False
    # A folder that may be searched but not listed (chmod 300): find_files leaves its own listing error out, and
    # iterdir below raised a bare "[Errno 13] Permission denied: 'music'".
    if problem := input_problem(path, "folder"):
        raise ValueError(problem)
    found = find_files(path, MUSIC_SUFFIXES + (".txt", ".npy"))  # one listing for both kinds; hidden names left out
    visible = [p.name for p in found if p.parent == path and p.name.endswith(".npy")]
    raw = [p for p in found if p.suffix.lower() != ".npy"]
    texts = sum(p.suffix.lower() == ".txt" for p in raw)
    if not visible:  # only hidden .npy files, if any: features when nothing else is there
        return not raw and any(p.name.endswith(".npy") for p in path.iterdir())
    if len(raw) > texts or texts > len(visible):
        raise ValueError(f"{path} holds .npy features ({len(visible)}, e.g. {visible[0]}) and raw music or text "
                         f"files ({len(raw)}, e.g. {raw[0].relative_to(path)}): give a folder of one kind")
    return True


def load_collection(path: Path, model_factory: Callable[[], object], *, include_text: bool = True,
                    progress: bool = True) -> Collection:
    """The global features of a target: read from an index/feature folder, or encoded from raw files."""
    if holds_features(path):
        from .feature_store import read_features, unique_by_key

        features = read_features(path, progress=progress)
        unique, warnings = unique_by_key(features)
        failures = [(str(s.path), s.reason) for s in features.skipped]
        return Collection(list(unique.keys), list(unique.keys), np.asarray(unique.matrix, dtype=np.float32), failures,
                          warnings=warnings)
    encoded = model_factory().encode_folder(path, include_text=include_text, progress=progress)
    failures = [(name, " ".join(reason.split())) for name, (_, reason) in zip(encoded.failed_names, encoded.failures)]
    matrix = np.asarray(encoded.features, dtype=np.float32) if len(encoded) else np.zeros((0, 0), np.float32)
    return Collection(encoded.names, encoded.keys, matrix, failures, encoded.computed, encoded.cached)


def encode_query(query: str, model_factory: Callable[[], object]) -> Tuple[np.ndarray, str]:
    """``(vector [D], description)`` of a query: a ``.npy`` feature, a ``.txt`` or music file, or a sentence."""
    path = Path(query)
    if path.is_file():
        if path.suffix.lower() == ".npy":
            from .feature_store import read_query

            return read_query(path), f"feature {path}"
        if path.suffix.lower() == ".txt" or path.suffix.lower() in MUSIC_SUFFIXES:
            encoded = model_factory().encode_files([path], progress=False, errors="skip")
            if encoded.failures:
                raise ValueError(f"cannot encode the query {path}: {' '.join(encoded.failures[0][1].split())}")
            return np.asarray(encoded.features[0], dtype=np.float32), f"file {path}"
        raise ValueError(f"query file {path}: unsupported type (use .npy, .txt or a music file: "
                         f"{', '.join(MUSIC_SUFFIXES)})")
    if not query.strip():
        raise ValueError("the query is empty")
    return np.asarray(model_factory().encode_text([query])[0], dtype=np.float32), f"text {query!r}"


def lazy_model(make: Callable[[], object]) -> Callable[[], object]:
    """A factory that builds the model on first use only (feature-only runs never load it)."""
    holder: List[object] = []

    def get():
        if not holder:
            holder.append(make())
        return holder[0]

    return get


def feature_file_name(name: str) -> str:
    """The feature file extraction writes for the raw file ``name`` (a path relative to its folder)."""
    return PurePosixPath(name).with_suffix(".npy").as_posix()


def one_per_key(collection: Collection, source: Path) -> Collection:
    """One row per key, for pairing by key, as the batch pipeline would give it: of files that share a
    key, the one whose feature file (:func:`feature_file_name`) sorts last wins, as in a feature
    folder (``feature_store.unique_by_key``: the reference's dict of features), with a warning."""
    rows: dict = {}
    for row, key in enumerate(collection.keys):
        rows.setdefault(key, []).append(row)
    if len(rows) == len(collection.keys):
        return collection
    winner = {key: max(shared, key=lambda r: (feature_file_name(collection.names[r]), collection.names[r]))
              for key, shared in rows.items()}
    warnings = [f"warning: {len(shared)} files of {source} share the key {key!r} "
                f"({', '.join(collection.names[r] for r in shared)}): {collection.names[winner[key]]} is used"
                for key, shared in rows.items() if len(shared) > 1]
    kept = [winner[key] for key in rows]  # first occurrence's place, the winner's row
    return Collection([collection.names[r] for r in kept], [collection.keys[r] for r in kept], collection.matrix[kept],
                      collection.failures, collection.computed, collection.cached, collection.warnings + warnings)
