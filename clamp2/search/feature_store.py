"""Global features on disk: a folder of ``[1, D]`` ``.npy`` files, or an index that packs them.

A *folder* is read as the reference's semantic-search tools read it (SPEC §9): the ``.npy`` files
directly inside it (not its sub-folders), in sorted order, each giving ``np.load(f)[0]`` under the
key ``name.split(".")[0]`` (so ``bwv10.7.npy`` is key ``bwv10``). Reading 100,000 small files is
dominated by per-file overhead, so the ``.npy`` header is parsed once per distinct header (every
file of an extraction run has the same one) and the row is taken straight from the bytes.

An *index* (``build_index``) holds the same rows in one memory-mapped float32 matrix, so a
collection of 10^6 features opens instantly and is searched without loading it::

    INDEX_DIR/manifest.json        format, version, generation, dim, count, normalized, file names
    INDEX_DIR/vectors.<gen>.npy    float32 [count, dim], rows in sorted file-name order
    INDEX_DIR/norms.<gen>.npy      float64 [count], the L2 norm of each row
    INDEX_DIR/keys.<gen>.txt       one key per row
    INDEX_DIR/files.<gen>.tsv      name, size, mtime_ns, ctime_ns, inode per row (what a re-run compares)
    INDEX_DIR/skipped.<gen>.tsv    name, size, mtime_ns, ctime_ns, inode, reason of each unusable file

A re-run reads only new or changed files (size, modification time, change time or inode differs),
drops rows of deleted files, writes the next generation and switches ``manifest.json`` atomically, so
a reader never sees a half-written index.

A file that cannot be used (unreadable, not ``[1, D]``, another dimension than most of the first
1,000 usable files, NaN/inf, an all-zero vector) is skipped and reported with its reason; it never becomes a
silently wrong number.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tokenize
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

from clamp2.provenance import written_by
from clamp2.files import atomic_path, atomic_write_text, disk_full_error, remove_partial_files_of

NPY_SUFFIX = ".npy"
INDEX_FORMAT = "clamp2-feature-index"
INDEX_VERSION = 1
# What counts as a usable feature and how it becomes a row. An index keeps its rows and skipped records from run to
# run, so when these rules change (bump this), an index built under older rules is read again in full on its next
# update: 1-D features, once skipped, would otherwise stay out of it for good. Manifests without it: 1.
INDEX_READER = 2
MANIFEST = "manifest.json"
# Tries to open an index whose generation a builder switches meanwhile.
OPEN_ATTEMPTS = 5
# Below this norm torch.cosine_similarity clamps the norm (eps=1e-8), so the "cosine" it returns is
# not a cosine; above the upper bound the float32 sum of squares nears its overflow (norm ~1.8e19, where
# the reference's torch cosine turns to 0 or NaN); below it the reference's cosine is exact.
MIN_NORM, MAX_NORM = 1e-8, 1e19
NORMALIZED_TOLERANCE = 1e-4
# Rows checked/copied per block: large enough for vectorised checks, small enough for memory.
BLOCK_ROWS = 8192
# Progress bars only for reads this long (seconds), so small runs print nothing but their result.
PROGRESS_MIN_ITEMS = 50_000
# The features' dimension is the one most of the first usable files have.
DIMENSION_SAMPLE = 1000
# Files are read by this many threads, each taking this many files at a time.
READ_THREADS, READ_SLICE = 8, 256
# The reason of a file skipped for its dimension: it depends on the other files, so an update that reads
# any file reads it again.
DIMENSION_REASON = "dimension "
_FIRST_READ = 1 << 16
_MAGIC = b"\x93NUMPY"


class FeatureError(ValueError):
    """Features cannot be used at all (missing folder, no usable file, ...): a usage error (exit 2)."""


class BadFeatureFile(ValueError):
    """One file cannot be used; the message is the reason."""


@dataclass(frozen=True)
class SkippedFile:
    path: str
    reason: str

    def line(self) -> str:
        return f"skipped {self.path}: {self.reason}"


def feature_key(name: str) -> str:
    """The reference's key of a feature file: its name up to the first ``.``."""
    return name.split(".")[0]


@dataclass
class FeatureSet:
    """Rows of features with their file names; ``matrix`` may be a read-only memory map."""

    source: str
    names: list[str]
    matrix: np.ndarray  # float32 [N, D]
    norms: np.ndarray  # float64 [N]
    skipped: list[SkippedFile] = field(default_factory=list)
    keys: list[str] = field(default=None)  # type: ignore[assignment]

    def __post_init__(self):
        if self.keys is None:
            self.keys = [feature_key(n) for n in self.names]

    def __len__(self) -> int:
        return len(self.names)

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    def take(self, rows: np.ndarray | list[int]) -> "FeatureSet":
        """The given rows (a copy in memory), same source."""
        rows = np.asarray(rows, dtype=np.int64)
        return FeatureSet(self.source, [self.names[i] for i in rows], _gather(self.matrix, rows),
                          np.asarray(self.norms)[rows], list(self.skipped), [self.keys[i] for i in rows])


def _gather(matrix: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``matrix[rows]`` in blocks (a memory map is read once, in order, without a giant temporary)."""
    out = np.empty((len(rows), matrix.shape[1]), dtype=np.float32)
    for start in range(0, len(rows), BLOCK_ROWS * 8):
        out[start:start + BLOCK_ROWS * 8] = matrix[rows[start:start + BLOCK_ROWS * 8]]
    return out


def unique_by_key(features: FeatureSet) -> tuple[FeatureSet, list[str]]:
    """One row per key, as the reference's dict of features: the last file of a key wins.

    Returns the keyed set (the same object when no key repeats) and one warning line per repeated key.
    """
    position: dict[str, int] = {}
    for row, key in enumerate(features.keys):
        position[key] = row
    if len(position) == len(features.keys):
        return features, normalization_twins(position, features.source)
    seen: dict[str, list[str]] = {}
    for name, key in zip(features.names, features.keys):
        seen.setdefault(key, []).append(name)
    warnings = [f"warning: {len(names)} files of {features.source} share the key {key!r} "
                f"({', '.join(names)}): {names[-1]} is used, as the original CLaMP 2 does"
                for key, names in seen.items() if len(names) > 1]
    # Order of first occurrence (a dict keeps the first insertion's place), value of the last.
    rows = np.fromiter(position.values(), dtype=np.int64, count=len(position))
    return features.take(rows), warnings + normalization_twins(position, features.source)


def normalization_twins(keys, source) -> list[str]:
    """A warning line per group of keys that differ only in Unicode normalization (``Für`` as typed, NFC, and as a
    Mac writes file names, NFD): one piece whose feature was written twice when its input folder came back from a
    Mac, shown as two results that look the same. Both are kept (they are two files, as in the reference)."""
    import unicodedata

    groups: dict[str, list[str]] = {}
    for key in keys:
        if not key.isascii():  # ASCII has one normal form: the usual corpus costs one check per key
            groups.setdefault(unicodedata.normalize("NFC", key), []).append(key)
    return [f"warning: the keys {', '.join(ascii(key) for key in group)} of {source} differ only in Unicode "
            "normalization (the same name as typed and as a Mac writes it): both are kept; remove one if they are "
            "one piece" for group in groups.values() if len(group) > 1]


class NpyRowReader:
    """Reads the first row of ``.npy`` files, parsing each distinct header once."""

    def __init__(self):
        self._layouts: dict[bytes, tuple] = {}

    def read(self, path: str | os.PathLike) -> np.ndarray:
        """``np.load(path)[0]`` for a ``[k, D]`` floating-point file (the vector of a ``[D]`` one), else
        ``BadFeatureFile``."""
        try:
            with open(path, "rb", buffering=0) as f:
                data = f.read(_FIRST_READ)
                dtype, shape, fortran, header_len = self._layout(data)
                total = header_len + int(np.prod(shape)) * dtype.itemsize
                if len(data) < total:
                    if len(data) == _FIRST_READ:
                        data += f.read()
                    if len(data) < total:
                        raise BadFeatureFile(f"truncated .npy file ({len(data)} bytes, its header needs {total})")
        except OSError as error:
            raise BadFeatureFile(f"cannot read: {error.strerror or error}") from None
        if fortran and shape[0] > 1:
            return np.frombuffer(data, dtype, count=int(np.prod(shape)), offset=header_len).reshape(shape, order="F")[0]
        return np.frombuffer(data, dtype, count=shape[1], offset=header_len)

    def _layout(self, data: bytes) -> tuple:
        if data[:6] != _MAGIC or len(data) < 10:
            raise BadFeatureFile("not a .npy file (no NumPy header)")
        if data[6] == 1:
            header_len = 10 + int.from_bytes(data[8:10], "little")
        elif data[6] in (2, 3):
            header_len = 12 + int.from_bytes(data[8:12], "little")
        else:
            raise BadFeatureFile(f"unsupported .npy format version {data[6]}")
        header = data[:header_len]
        layout = self._layouts.get(header)
        if layout is None:
            layout = self._layouts[header] = _parse_header(header, header_len)
        if isinstance(layout, str):
            raise BadFeatureFile(layout)
        return layout


def _parse_header(header: bytes, header_len: int):
    """``(dtype, shape, fortran, header_len)`` of a usable file, or the reason it is not usable."""
    fp = io.BytesIO(header)
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
    except (ValueError, SyntaxError, UnicodeDecodeError, tokenize.TokenError) as error:
        return f"unreadable .npy header ({' '.join(str(error).split())})"
    if dtype.hasobject or dtype.kind != "f":
        return f"dtype {dtype}: features must be floating-point"
    if len(shape) == 1 and shape[0] > 0:
        shape = (1, shape[0])  # one vector [D], as CLaMP 3's tools read it (np.load(f).squeeze())
    if len(shape) == 3:
        return (f"shape {shape} holds per-position features; search needs global features [1, D] "
                f"(extract with --normalize)")
    if len(shape) != 2 or shape[0] < 1:
        return f"shape {shape}: expected global features of shape [1, D]"
    if shape[1] == 0:
        return f"shape {shape}: empty feature vector"
    return dtype, tuple(int(s) for s in shape), bool(fortran), header_len


def check_rows(block: np.ndarray) -> tuple[np.ndarray, dict[int, str]]:
    """Float64 L2 norms of a float32 block and ``{row: reason}`` for rows that have no cosine."""
    finite = np.isfinite(block).all(axis=1)
    as64 = block.astype(np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", as64, as64))
    bad: dict[int, str] = {}
    for row in np.flatnonzero(~finite | ~(norms >= MIN_NORM) | ~(norms < MAX_NORM)):
        if not finite[row]:
            bad[int(row)] = "non-finite values (NaN or inf) in float32"
        elif norms[row] == 0:
            bad[int(row)] = "all-zero vector: cosine similarity is undefined"
        elif norms[row] < MIN_NORM:
            bad[int(row)] = f"near-zero vector (norm {norms[row]:.3g}): cosine similarity is undefined"
        else:
            bad[int(row)] = f"values too large (norm {norms[row]:.3g}) for a float32 cosine"
    return norms, bad


def list_feature_names(folder: str | os.PathLike, sort: bool = True) -> list[str]:
    """Names of the ``.npy`` files directly in ``folder``: sorted, or in ``os.listdir`` order."""
    try:
        names = [n for n in os.listdir(folder) if n.endswith(NPY_SUFFIX)]
    except FileNotFoundError:
        raise FeatureError(f"{folder}: no such folder") from None
    except NotADirectoryError:
        raise FeatureError(f"{folder}: not a folder of .npy features or an index built by build_index.py") from None
    except OSError as error:
        raise FeatureError(f"{folder}: cannot list the folder ({error.strerror or error})") from None
    # ._x.npy beside x.npy: the AppleDouble file macOS writes beside every file it copies to a USB drive, a network
    # share or a zip; not a feature (it was "skipped: not a .npy file", and the exit status 1, once per feature).
    present = set(names)
    names = [n for n in names if not (n.startswith("._") and n[2:] in present)]
    return sorted(names) if sort else names


@dataclass
class _Block:
    names: list[str]
    matrix: np.ndarray
    norms: np.ndarray


def _stream_rows(folder: Path, names: list[str], *, dim: Optional[int] = None,
                 reuse: Optional[Callable[[int], Optional[np.ndarray]]] = None,
                 skipped: list[SkippedFile], progress: bool = True,
                 desc: str = "reading features") -> Iterator[_Block]:
    """Usable rows of ``names`` in blocks, in order; unusable files go to ``skipped``.

    ``dim``, when not given, is the one most of the first usable files have. ``reuse(i)`` may return
    the row of name ``i`` from an existing index (already checked), so the file is not read again.
    """
    reader = NpyRowReader()
    paths = [os.path.join(os.fspath(folder), name) for name in names]  # str paths: pathlib costs at 10^5 files
    early: dict[int, np.ndarray | str] = {}  # rows read to find the dimension, used once more below
    sample: list[np.ndarray | str] = []  # the rows (read or reused) the dimension is found from, in name order
    pool = ThreadPoolExecutor(READ_THREADS) if len(names) > READ_SLICE else None

    def read(i: int) -> np.ndarray | str:
        if i in early:
            return early.pop(i)
        try:
            return reader.read(paths[i])
        except BadFeatureFile as error:
            return str(error)

    def read_many(indices: list[int]) -> list[np.ndarray | str]:
        # Threads overlap the open/read system calls (and the disk, when the files are not cached).
        if pool is None or len(indices) <= READ_SLICE:
            return [read(i) for i in indices]
        slices = [indices[k:k + READ_SLICE] for k in range(0, len(indices), READ_SLICE)]
        return [row for rows in pool.map(lambda part: [read(i) for i in part], slices) for row in rows]

    try:
        if dim is None:
            for first in range(0, len(names), DIMENSION_SAMPLE):
                chunk = range(first, min(first + DIMENSION_SAMPLE, len(names)))
                reused = {i: reuse(i) for i in chunk} if reuse is not None else {}
                fresh = [i for i in chunk if reused.get(i) is None]
                early.update(zip(fresh, read_many(fresh)))
                # Rows kept from an index count as if read again: an update finds the dimension a fresh build finds.
                sample.extend(early[i] if reused.get(i) is None else reused[i] for i in chunk)
                dim = _common_dimension([r for r in sample if not isinstance(r, str)])
                if dim is not None:
                    break
            sample.clear()  # its rows are in `early` until read once more: not held to the end
        yield from _checked_blocks(names, paths, dim, reuse, read_many, skipped, progress, desc)
    finally:
        if pool is not None:
            pool.shutdown()


def _checked_blocks(names: list[str], paths: list[str], dim: Optional[int],
                    reuse: Optional[Callable[[int], Optional[np.ndarray]]], read_many: Callable,
                    skipped: list[SkippedFile], progress: bool, desc: str) -> Iterator[_Block]:
    from clamp2.progress import progress_bar

    bar = progress_bar(total=len(names), desc=desc, unit="file",
                       enabled=progress and len(names) >= PROGRESS_MIN_ITEMS)
    try:
        for start in range(0, len(names), BLOCK_ROWS):
            rows: list[np.ndarray] = []
            kept: list[int] = []
            indices = range(start, min(start + BLOCK_ROWS, len(names)))
            got = [reuse(i) if reuse is not None else None for i in indices]
            fresh = [i for i, row in zip(indices, got) if row is None]
            for i, row in zip(fresh, read_many(fresh)):
                got[i - start] = row
            for i, row in zip(indices, got):
                if isinstance(row, str):
                    skipped.append(SkippedFile(paths[i], row))
                elif dim is None:  # no file has a cosine: say why for each
                    skipped.append(SkippedFile(paths[i], check_rows(np.asarray(row, dtype=np.float32)[None])[1][0]))
                elif row.shape[0] != dim:
                    skipped.append(SkippedFile(paths[i], f"{DIMENSION_REASON}{row.shape[0]} differs from the {dim} "
                                                         f"of the other features"))
                else:
                    rows.append(row)
                    kept.append(i)
            bar.update(min(start + BLOCK_ROWS, len(names)) - start)
            if not rows:
                continue
            block = np.empty((len(rows), dim), dtype=np.float32)
            for j, row in enumerate(rows):
                block[j] = row
            norms, bad = check_rows(block)
            if bad:
                keep = np.ones(len(rows), dtype=bool)
                for j, reason in bad.items():
                    keep[j] = False
                    skipped.append(SkippedFile(paths[kept[j]], reason))
                kept = [i for i, k in zip(kept, keep) if k]
                block, norms = block[keep], norms[keep]
            if kept:
                yield _Block([names[i] for i in kept], block, norms)
    finally:
        bar.close()


def _common_dimension(rows: list[np.ndarray]) -> Optional[int]:
    """The dimension most of these rows have, counting only rows with a cosine (ties: the one whose first
    such row comes first; rows without a cosine play no part, so an update that does not read the
    unusable files again finds the dimension a fresh build finds)."""
    counts: dict[int, int] = {}
    first: dict[int, int] = {}
    for dim in dict.fromkeys(row.shape[0] for row in rows):
        at = [i for i, r in enumerate(rows) if r.shape[0] == dim]
        _, bad = check_rows(np.stack([np.asarray(rows[i], dtype=np.float32) for i in at]))
        usable = [i for j, i in enumerate(at) if j not in bad]
        if usable:
            counts[dim], first[dim] = len(usable), usable[0]
    return max(counts, key=lambda dim: (counts[dim], -first[dim])) if counts else None


def read_folder(folder: str | os.PathLike, *, sort: bool = True, progress: bool = True) -> FeatureSet:
    """Every usable ``.npy`` file directly in ``folder``: sorted by name, or in ``os.listdir`` order."""
    names = list_feature_names(folder, sort=sort)
    if not names:
        raise FeatureError(f"{folder}: no .npy files in the folder")
    skipped: list[SkippedFile] = []
    matrix: Optional[np.ndarray] = None  # filled in place: no second copy of a large collection
    kept: list[str] = []
    norms: list[np.ndarray] = []
    for block in _stream_rows(Path(folder), names, skipped=skipped, progress=progress):
        if matrix is None:
            matrix = np.empty((len(names), block.matrix.shape[1]), dtype=np.float32)
        matrix[len(kept):len(kept) + len(block.names)] = block.matrix
        kept.extend(block.names)
        norms.append(block.norms)
    if matrix is None:
        raise FeatureError(f"{folder}: none of its {len(names)} .npy files is usable "
                           f"(first: {skipped[0].path}: {skipped[0].reason})")
    skipped.sort(key=lambda s: s.path)
    return FeatureSet(str(folder), kept, matrix[:len(kept)], np.concatenate(norms), skipped)


def read_tree(folder: str | os.PathLike, *, progress: bool = True) -> FeatureSet:
    """Every usable ``.npy`` file under ``folder``, sub-folders included (CLaMP 3's tools walk them).

    ``names`` are the paths relative to ``folder`` (POSIX, sorted); ``keys`` stay the file names up
    to their first ``.``. A folder without any ``.npy`` file is a ``FeatureError``.
    """
    from clamp2.files import find_all_files

    root = Path(folder)
    if not root.is_dir():
        raise FeatureError(f"{folder}: no such folder")
    names = [path.relative_to(root).as_posix() for path in find_all_files(root, (NPY_SUFFIX,), FeatureError)]
    if not names:
        raise FeatureError(f"{folder}: no .npy files in the folder or its sub-folders")
    skipped: list[SkippedFile] = []
    matrix: Optional[np.ndarray] = None  # filled in place, as read_folder does: no second copy of the collection
    kept: list[str] = []
    norms: list[np.ndarray] = []
    for block in _stream_rows(root, names, skipped=skipped, progress=progress):
        if matrix is None:
            matrix = np.empty((len(names), block.matrix.shape[1]), dtype=np.float32)
        matrix[len(kept):len(kept) + len(block.names)] = block.matrix
        kept.extend(block.names)
        norms.append(block.norms)
    matrix = matrix[:len(kept)] if matrix is not None else np.zeros((0, 0), np.float32)
    norms = np.concatenate(norms) if norms else np.zeros(0)
    skipped.sort(key=lambda s: s.path)
    return FeatureSet(str(folder), kept, matrix, norms, skipped, [feature_key(Path(n).name) for n in kept])


def is_index(path: str | os.PathLike) -> bool:
    try:
        return (Path(path) / MANIFEST).is_file()
    except PermissionError as error:  # a folder that cannot be searched (chmod 000); Python 3.14 answers False
        raise FeatureError(f"cannot reach feature folder or index {path}: {error.strerror} (fix its "
                           "permissions)") from None


def read_features(path: str | os.PathLike, *, sort: bool = True, progress: bool = True) -> FeatureSet:
    """A feature folder or an index, every usable row (keys may repeat; see ``unique_by_key``)."""
    if is_index(path):
        return open_index(path)
    return read_folder(path, sort=sort, progress=progress)


def load_features(path: str | os.PathLike, *, progress: bool = False) -> tuple[list[str], np.ndarray]:
    """``(keys, matrix)`` of a folder or index, one row per key, as the reference's ``get_features``.

    Strict: any unusable file is a ``FeatureError`` naming it (use ``read_features`` to skip them).
    ``matrix`` is float32 ``[N, D]`` (read-only memory map for an index with unique keys).
    """
    features = read_features(path, progress=progress)
    if features.skipped:
        first = features.skipped[0]
        raise FeatureError(f"{len(features.skipped)} unusable file(s) in {path}; first: {first.path}: {first.reason}")
    features, _ = unique_by_key(features)
    return features.keys, features.matrix


def read_query(path: str | os.PathLike) -> np.ndarray:
    """The float32 vector ``np.load(path)[0]`` of one feature file, checked; ``FeatureError`` if unusable."""
    try:
        row = NpyRowReader().read(path)
    except BadFeatureFile as error:
        raise FeatureError(f"{path}: {error}") from None
    block = np.asarray(row, dtype=np.float32)[None]
    _, bad = check_rows(block)
    if bad:
        raise FeatureError(f"{path}: {bad[0]}")
    return block[0]


# ----------------------------------------------------------------------------------------------
# The index


@dataclass
class IndexUpdate:
    """What ``build_index`` did."""

    count: int
    dim: int
    added: int = 0
    changed: int = 0
    removed: int = 0
    unchanged: int = 0
    skipped: list[SkippedFile] = field(default_factory=list)
    reread: int = 0  # unchanged files read again: the index was built by an older version's reader

    def summary(self) -> str:
        reread = f", read again {self.reread} (indexed by an older version)" if self.reread else ""
        return (f"index of {self.count} features (dim {self.dim}): added {self.added}, changed {self.changed}, "
                f"removed {self.removed}, unchanged {self.unchanged}{reread}, skipped {len(self.skipped)}")


INDEX_FILE_KINDS = ("vectors", "norms", "keys", "files", "skipped")


def built_by_older_reader(manifest: dict) -> bool:
    reader = manifest.get("reader", 1)
    return isinstance(reader, bool) or not isinstance(reader, int) or reader < INDEX_READER  # JSON true is no number


def read_manifest(index_dir: Path) -> dict:
    try:
        manifest = json.loads((index_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise FeatureError(f"{index_dir / MANIFEST}: unreadable index manifest ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != INDEX_FORMAT:
        raise FeatureError(f"{index_dir / MANIFEST}: not a feature index made by build_index.py")
    if manifest.get("version") != INDEX_VERSION:
        raise FeatureError(f"{index_dir}: index format version {manifest.get('version')} is not supported "
                           f"(this code reads version {INDEX_VERSION}); rebuild it with build_index.py")
    for kind in INDEX_FILE_KINDS:  # an update deletes the old generation's files: never one outside the index
        name = manifest.get(kind)
        if not isinstance(name, str) or name in ("", ".", "..") or "/" in name or os.sep in name:
            raise FeatureError(f"{index_dir / MANIFEST}: its {kind} entry {name!r} is not a file name in the index "
                               "folder; rebuild the index with build_index.py")
    return manifest


def _read_lines(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="surrogateescape")
    return text.split("\n")[:-1] if text else []


def _open_index(index_dir: Path) -> tuple[FeatureSet, dict, list[list[str]], list[list[str]]]:
    """The index as a ``FeatureSet`` plus its manifest, its per-row file records and skipped records.

    A builder deletes the previous generation just after switching the manifest: a reader that read the
    old manifest and then misses one of its files reads the new manifest and opens that generation.
    """
    for attempt in range(OPEN_ATTEMPTS):
        manifest = read_manifest(index_dir)
        try:
            matrix = np.load(index_dir / manifest["vectors"], mmap_mode="r")
            norms = np.load(index_dir / manifest["norms"])
            keys = _read_lines(index_dir / manifest["keys"])
            files = [line.split("\t") for line in _read_lines(index_dir / manifest["files"])]
            bad = [line.split("\t") for line in _read_lines(index_dir / manifest["skipped"])]
            break
        except (OSError, ValueError, KeyError) as error:
            switched = read_manifest(index_dir).get("generation") != manifest.get("generation")
            if attempt + 1 < OPEN_ATTEMPTS and switched:
                continue  # a builder switched generations meanwhile
            if isinstance(error, PermissionError):  # not damage: a rebuild would not help
                raise FeatureError(f"{index_dir}: cannot read the index's {Path(error.filename or '').name or 'files'}"
                                   f" ({error.strerror}); fix its permissions") from None
            raise FeatureError(f"{index_dir}: damaged index ({error}); rebuild it with build_index.py") from None
    count, dim = manifest["count"], manifest["dim"]
    if (matrix.dtype != np.float32 or matrix.shape != (count, dim) or norms.shape != (count,)
            or len(keys) != count or len(files) != count):
        raise FeatureError(f"{index_dir}: damaged index (the manifest says {count} x {dim}, the files disagree); "
                           f"rebuild it with build_index.py")
    # Files an older version's reader left out may be usable now: said where the index is used, not silently missing.
    stale = [SkippedFile(str(index_dir / b[0]), f"left out of the index by an older version ({b[-1]}); run "
                         "build_index.py again to read it with this one") for b in bad] \
        if built_by_older_reader(manifest) else []
    return FeatureSet(str(index_dir), [f[0] for f in files], matrix, norms, stale, keys), manifest, files, bad


def open_index(index_dir: str | os.PathLike) -> FeatureSet:
    """An index as a ``FeatureSet`` whose matrix is a read-only memory map (nothing is loaded)."""
    return _open_index(Path(index_dir))[0]


def _stat(path: Path) -> tuple[int, ...] | str:
    """What a re-run compares: size, modification time, change time and inode. The change time cannot
    be set back (``os.utime`` sets it to now) and a rename or a replacement changes it or the inode, so
    a file rewritten with the same size and the same modification time is read again. Or why the file
    cannot be stat'ed (``Permission denied``: a folder that may be listed but not searched, chmod 600)."""
    try:
        st = os.stat(path)
    except OSError as error:
        return error.strerror or str(error)
    return st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino


def _identity(fields: list[str]) -> Optional[tuple[int, ...]]:
    try:
        return tuple(int(f) for f in fields)
    except ValueError:
        return None


def _set_npy_rows(path: Path, rows: int, dim: int) -> None:
    """Rewrite the header of a float32 ``[capacity, dim]`` .npy to ``rows`` rows and cut the rest.

    NumPy pads headers so the row count can change in place; a copy is the fallback.
    """
    with open(path, "r+b") as f:
        data = f.read(_FIRST_READ)
        old_len = 10 + int.from_bytes(data[8:10], "little")
        buffer = io.BytesIO()
        np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": (rows, dim)})
        header = buffer.getvalue()
        if len(header) == old_len:
            f.seek(0)
            f.write(header)
            f.truncate(old_len + rows * dim * 4)
            return
    data = np.load(path, mmap_mode="r")[:rows].copy()
    np.save(path, data)


def _reserve(path: Path) -> None:
    """Allocate a memory-mapped file's blocks before it is filled: a full disk (or quota) is then an OSError here,
    not a SIGBUS that kills the process without a word at the first page no block is left for."""
    if not hasattr(os, "posix_fallocate"):  # Windows, macOS
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as exc:
        if disk_full_error(exc) is not None:
            raise
    finally:
        os.close(fd)


def _write_lines(path: Path, lines: Iterable[str]) -> None:
    # surrogateescape keeps undecodable file names byte-exact.
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
            f.writelines(line + "\n" for line in lines)


def build_index(features_dir: str | os.PathLike, index_dir: str | os.PathLike, *,
                progress: bool = True) -> IndexUpdate:
    """Create or update the index of the ``.npy`` files directly in ``features_dir``.

    Only new or changed files (size or mtime) are read; rows of deleted files are dropped; files
    that were unusable and have not changed are reported again without being read. Raises
    ``FeatureError`` when there is nothing to index.
    """
    features_dir, index_dir = Path(features_dir), Path(index_dir)
    if features_dir.resolve() == index_dir.resolve():
        raise FeatureError(f"{index_dir}: the index folder must differ from the features folder")
    names = list_feature_names(features_dir)
    if not names:
        raise FeatureError(f"{features_dir}: no .npy files in the folder")
    old = None
    old_rows: dict[str, tuple[Optional[tuple[int, ...]], int]] = {}
    old_bad: dict[str, tuple[Optional[tuple[int, ...]], str]] = {}
    manifest: dict = {}
    reread_all = False
    if is_index(index_dir):
        old, manifest, files, bad = _open_index(index_dir)
        reread_all = built_by_older_reader(manifest)
        # Records of an index written before the change time and inode were kept have two numbers:
        # they never match, so such an index is read again once.
        old_rows = {f[0]: (_identity(f[1:]), row) for row, f in enumerate(files)}
        old_bad = {b[0]: (_identity(b[1:-1]), b[-1]) for b in bad}

    skipped: list[SkippedFile] = []
    bad_records: list[str] = []
    recheck: dict[str, SkippedFile] = {}
    to_store: list[str] = []
    reuse_rows: list[int] = []
    stats: dict[str, tuple[int, ...]] = {}
    unchanged = changed = reread = 0
    for name in names:
        path = features_dir / name
        stat = _stat(path)
        if any(c in name for c in "\t\n\r"):
            skipped.append(SkippedFile(str(path), "file name contains a tab or line break"))
            continue
        if isinstance(stat, str):
            skipped.append(SkippedFile(str(path), f"cannot read its size and modification time: {stat}"))
            continue
        stats[name] = stat
        if reread_all:
            same = (name in old_rows and old_rows[name][0] == stat) or (name in old_bad and old_bad[name][0] == stat)
            reread += same
            changed += not same and (name in old_rows or name in old_bad)
            to_store.append(name)
            reuse_rows.append(-1)
            continue
        if name in old_bad and old_bad[name][0] == stat:
            if not old_bad[name][1].startswith(DIMENSION_REASON):
                skipped.append(SkippedFile(str(path), old_bad[name][1]))
                bad_records.append("\t".join([name, *map(str, stat), old_bad[name][1]]))
                continue
            # Skipped for its dimension: that depends on the other files, so it is read again when they change.
            recheck[name] = SkippedFile(str(path), old_bad[name][1])
        row = old_rows[name][1] if name in old_rows and old_rows[name][0] == stat else -1
        unchanged += row >= 0
        changed += row < 0 and (name in old_rows or name in old_bad) and name not in recheck
        to_store.append(name)
        reuse_rows.append(row)
    removed = sum(1 for n in old_rows if n not in stats)
    gone_bad = any(n not in stats for n in old_bad)  # the record of a deleted unusable file is dropped too
    nothing_new = all(r >= 0 or n in recheck for n, r in zip(to_store, reuse_rows))
    if old is not None and removed == 0 and not gone_bad and nothing_new and len(to_store) - len(recheck) == len(old):
        skipped = sorted(skipped + list(recheck.values()), key=lambda s: s.path)
        return IndexUpdate(len(old), old.dim, unchanged=unchanged, skipped=skipped)
    if not to_store:
        first = skipped[0]
        raise FeatureError(f"{features_dir}: none of its {len(names)} .npy files is usable "
                           f"(first: {first.path}: {first.reason})")

    def reuse(i: int) -> Optional[np.ndarray]:
        return old.matrix[reuse_rows[i]] if reuse_rows[i] >= 0 else None

    generation = int(manifest.get("generation", 0)) + 1
    files_now = {kind: f"{kind}.{generation}.{ext}" for kind, ext in
                 (("vectors", "npy"), ("norms", "npy"), ("keys", "txt"), ("files", "tsv"), ("skipped", "tsv"))}
    index_dir.mkdir(parents=True, exist_ok=True)
    # What a run killed mid-write (SIGTERM, SIGKILL, a cluster's time limit) left: its temporary files (the vectors'
    # is as large as the index), which nothing else would ever remove.
    remove_partial_files_of([index_dir / name for name in files_now.values()] + [index_dir / MANIFEST])
    kept_names: list[str] = []
    norm_blocks: list[np.ndarray] = []
    fresh_skipped: list[SkippedFile] = []
    try:
        with atomic_path(index_dir / files_now["vectors"]) as tmp:
            out = None
            count = 0
            for block in _stream_rows(features_dir, to_store, reuse=reuse,
                                      skipped=fresh_skipped, progress=progress, desc="indexing features"):
                if out is None:
                    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32,
                                                    shape=(len(to_store), block.matrix.shape[1]))
                    _reserve(tmp)
                out[count:count + len(block.names)] = block.matrix
                count += len(block.names)
                kept_names.extend(block.names)
                norm_blocks.append(block.norms)
            if out is None:
                first = (skipped + fresh_skipped)[0]
                raise FeatureError(f"{features_dir}: none of its {len(names)} .npy files is usable "
                                   f"(first: {first.path}: {first.reason})")
            dim = int(out.shape[1])
            out.flush()
            del out
            if count < len(to_store):
                _set_npy_rows(tmp, count, dim)
        for item in fresh_skipped:
            name = Path(item.path).name
            bad_records.append("\t".join([name, *map(str, stats[name]), ' '.join(item.reason.split())]))
        skipped.extend(fresh_skipped)
        norms = np.concatenate(norm_blocks)
        with atomic_path(index_dir / files_now["norms"]) as tmp:
            with open(tmp, "wb") as f:
                np.save(f, norms)
        _write_lines(index_dir / files_now["keys"], (feature_key(n) for n in kept_names))
        _write_lines(index_dir / files_now["files"], ("\t".join([n, *map(str, stats[n])]) for n in kept_names))
        _write_lines(index_dir / files_now["skipped"], sorted(bad_records))
        new_manifest = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "generation": generation,
                        "dim": dim, "count": count, "dtype": "float32",
                        "reader": INDEX_READER, "written_by": written_by(),
                        "normalized": bool(np.all(np.abs(norms - 1.0) <= NORMALIZED_TOLERANCE)),
                        "source": str(features_dir.resolve()), **files_now}
        atomic_write_text(index_dir / MANIFEST, json.dumps(new_manifest, indent=1) + "\n")
    except BaseException:
        # Not in the manifest: this generation's files (the vectors as large as the index) would hold the space
        # a re-run needs, and nothing would ever remove them. The previous generation stays the index.
        try:
            switched = read_manifest(index_dir).get("generation") == generation
        except FeatureError:  # a first index: no manifest yet
            switched = False
        if not switched:
            for name in files_now.values():
                with contextlib.suppress(OSError):
                    (index_dir / name).unlink()
        raise
    if old is not None:
        del old
        for kind in files_now:
            name = manifest.get(kind)
            if name and name not in files_now.values():
                with contextlib.suppress(OSError):
                    (index_dir / name).unlink()
    added = sum(1 for n in kept_names if n not in old_rows and n not in old_bad)
    skipped.sort(key=lambda s: s.path)
    return IndexUpdate(count, dim, added=added, changed=changed, removed=removed, unchanged=unchanged,
                       skipped=skipped, reread=reread)


def report_problems(skipped: Iterable[SkippedFile], warnings: Iterable[str] = ()) -> int:
    """Print warnings and skipped files (one line each) on stderr; the exit status: 1 if any file was skipped."""
    import sys

    skipped = list(skipped)
    for line in warnings:
        print(line, file=sys.stderr)
    for item in skipped:
        print(item.line(), file=sys.stderr)
    if skipped:
        print(f"{len(skipped)} file(s) skipped; the results above leave them out", file=sys.stderr)
    return 1 if skipped else 0
