"""CLaMP 3's one-command tools (docs/search.md): modality detection, keys, score, eval and search.

What ``semantic_search/clamp3_{embd,search,score,eval}.py`` share. A *side* (query or reference)
is a folder (or one file) of raw inputs of one modality, encoded through a model family and the
content-hash feature cache (:class:`ModelFamily`), or a folder of ``.npy`` features, read
recursively. The numbers are those of :mod:`clamp2.search.retrieval` (the reference's float32
cosines, exactly); only the keys and the printed lines are CLaMP 3's:

- score/eval key: the path relative to the folder + ``/`` + the file name up to its first ``.``
  (``sub/a.1.wav`` → ``sub/a``): several query files may share a key, a reference key keeps one file;
- search key: the file name up to its first ``.``; references in sub-folders are ranked too.

Fixes of the reference kept here: modality from every file (a folder of two modalities is an error
listing them; every extension detection accepts is used, any case), the cache keyed on content,
weights and mode, no stdin prompt (``strict``), JSONL files where the caller asks, ties broken by
path (score) and query path (eval ranks) instead of hash order.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

# The original's modality table, plus the symbolic formats CLaMP 3 reads directly (abc, mtf) and features (npy).
MODALITY_BY_EXTENSION = {
    ".txt": "txt",
    ".png": "img", ".jpg": "img", ".jpeg": "img",
    ".xml": "xml", ".musicxml": "xml", ".mxl": "xml",
    ".mid": "mid", ".midi": "mid",
    ".wav": "audio", ".mp3": "audio", ".flac": "audio", ".ogg": "audio",
    ".abc": "abc", ".mtf": "mtf",
    ".npy": "npy",
}
FEATURES = "npy"
# The original's own modalities (its get_modality_from_dir); it ignores every other file, .abc and .mtf included.
REFERENCE_MODALITIES = ("txt", "img", "xml", "mid", "audio")
SYMBOLIC_AS_THEY_ARE = ("abc", "mtf")
UNMATCHED_FILE = "unmatched_files.jsonl"
PAIRWISE_FILE = "pairwise_similarities.jsonl"
RANKS_FILE = "retrieval_ranks.jsonl"


class ModalityError(ValueError):
    """The modality of an input cannot be determined, or is not one modality (exit status 1)."""


class CommandError(RuntimeError):
    """The command cannot give a result (exit status 1); the message is printed as it is."""


# -- modality ---------------------------------------------------------------------------------------

def modality_of(path: str | os.PathLike) -> Optional[str]:
    """The modality of one file name by its extension (lower-cased), or None."""
    return MODALITY_BY_EXTENSION.get(os.path.splitext(os.fspath(path))[1].lower())


def files_by_modality(path: str | os.PathLike) -> Dict[str, List[Path]]:
    """``{modality: sorted files}`` under ``path`` (a folder, searched recursively, or one file)."""
    from clamp2.files import find_all_files

    found: Dict[str, List[Path]] = {}
    # A sub-folder that cannot be listed is an error naming it (its files were left out without a word).
    for file in find_all_files(path, tuple(MODALITY_BY_EXTENSION)):
        found.setdefault(modality_of(file), []).append(file)
    return found


def embedding_inputs_by_modality(input_dir: str | os.PathLike,
                                 output_dir: str | os.PathLike) -> Dict[str, List[Path]]:
    """:func:`files_by_modality` of clamp3_embd's input folder, less the ``.npy`` files of its output folder.

    When the output folder is the input folder or lies inside it, its ``.npy`` files are this command's
    outputs: read as inputs they were a second modality and every re-run failed instead of resuming.
    A folder holding only ``.npy`` files keeps them (the caller refuses features as inputs, by name).
    """
    found = files_by_modality(input_dir)
    if FEATURES in found and len(found) > 1:
        outputs = Path(os.path.abspath(output_dir))
        inputs = [file for file in found[FEATURES] if outputs not in Path(os.path.abspath(file)).parents]
        if inputs:
            found[FEATURES] = inputs
        else:
            del found[FEATURES]
    return found


def detect_modality(path: str | os.PathLike, role: str = "input",
                    found: Optional[Dict[str, List[Path]]] = None) -> Tuple[str, List[Path]]:
    """``(modality, files)`` of a folder or file; :class:`ModalityError` when none or several.

    ``role`` names the side in the message: ``input`` (clamp3_embd), ``query``, ``reference``;
    ``found``: :func:`files_by_modality` of ``path`` when the caller has it already (one walk, not two).
    """
    if found is None:
        found = files_by_modality(path) if Path(path).exists() else {}
    if not found:
        raise ModalityError(f'Error: Could not determine {role} modality for "{path}"')
    beside = [f for m in SYMBOLIC_AS_THEY_ARE for f in found.get(m, [])]
    own = [m for m in found if m not in SYMBOLIC_AS_THEY_ARE]
    # Not beside text: the original's text pipeline (code/extract_clamp3.py on the folder) encodes .abc/.mtf too.
    if beside and len(own) == 1 and own[0] in REFERENCE_MODALITIES and own[0] != "txt" and \
            all(len(found.get(m, [])) <= len(found[own[0]]) for m in SYMBOLIC_AS_THEY_ARE):
        # .abc/.mtf beside files of one of the original's modalities, no more of each than of those (x.mid
        # with the x.mtf and x.abc made from it): the original reads the folder as that modality and
        # ignores the rest, and so does this. More .abc (or .mtf) than those (ABC tunes with a README)
        # stays an error: that is a folder of symbolic files.
        kept = len(found[own[0]])
        print(f"note: {path}: reading its {kept} {own[0]} file{'s' if kept > 1 else ''}; {len(beside)} .abc/.mtf "
              f"file{'s' if len(beside) > 1 else ''} beside {'them' if kept > 1 else 'it'} ignored, as the "
              f"original does (e.g. {sorted(beside)[0]})", file=sys.stderr)
        return own[0], found[own[0]]
    if len(found) > 1:
        listed = ", ".join(f"{m} ({len(files)} file{'s' if len(files) > 1 else ''}, e.g. {files[0]})"
                           for m, files in sorted(found.items()))
        raise ModalityError(f'Error: "{path}" holds several {role} modalities: {listed}; '
                            f"give a folder of one modality (e.g. one sub-folder each)")
    (modality, files), = found.items()
    return modality, files


# -- sides: features with CLaMP 3's keys --------------------------------------------------------------

def relative_key(relative: str) -> str:
    """CLaMP 3's score/eval key of a path relative to its folder: ``sub/a.1.wav`` → ``sub/a``, ``a.npy`` → ``/a``.

    (The reference builds ``'/'.join(parent parts) + '/' + name.split('.')[0]``, so top-level keys
    start with ``/``; only equality of keys matters.)
    """
    parent, _, name = relative.rpartition("/")
    return f"{parent}/{name.split('.')[0]}"


def name_key(relative: str) -> str:
    """CLaMP 3's search key: the file name up to its first ``.``."""
    return relative.rpartition("/")[2].split(".")[0]


@dataclass
class Side:
    """Global features of one side, one row per usable file, in sorted path order."""

    root: Path
    modality: str
    relative: List[str]  # paths relative to root (POSIX); a single file: its name
    matrix: np.ndarray  # float32 [N, D]
    failures: List[Tuple[str, str]] = field(default_factory=list)  # (path, reason)
    computed: int = 0
    cached: int = 0
    captions: List[Tuple[str, str]] = field(default_factory=list)  # (image, caption) of image inputs
    given: str = ""  # the folder or file as the caller spelled it ("./q", "q/"); Path(...) would drop "./"

    def __len__(self) -> int:
        return len(self.relative)

    def path(self, i: int) -> str:
        """The file of row ``i`` as the JSONL files name it: the folder, as given, joined with its relative path
        (``os.path.join`` over ``os.walk``, as the reference does), or the file as given."""
        given = self.given or os.fspath(self.root)
        return given if self.root.is_file() else os.path.join(given, self.relative[i])

    @property
    def pair_keys(self) -> List[str]:
        return [relative_key(r) for r in self.relative]

    @property
    def name_keys(self) -> List[str]:
        return [name_key(r) for r in self.relative]


def read_feature_side(root: Path, progress: bool = False) -> Side:
    """A folder of ``.npy`` features (recursively) or one ``.npy`` file; unusable files are failures."""
    from .feature_store import FeatureError, read_query, read_tree

    if root.is_file():
        try:
            return Side(root, FEATURES, [root.name], read_query(root)[None])
        except FeatureError as exc:
            raise CommandError(f"Error: {exc}") from None
    try:
        features = read_tree(root, progress=progress)
    except FeatureError as exc:
        raise CommandError(f"Error: {exc}") from None
    failures = [(s.path, s.reason) for s in features.skipped]
    return Side(root, FEATURES, list(features.names), np.asarray(features.matrix, dtype=np.float32), failures)


def refuse_index(root: Path) -> None:
    """A feature index (``build_index.py``) holds the top level of one folder, named as there: the clamp3_*
    commands read feature folders with their sub-folders and name each file by its path, so the folder it
    indexes is what they take (its own .npy files read as features gave nonsense)."""
    from .feature_store import FeatureError, is_index, read_manifest

    try:
        if not is_index(root):
            return
        source = read_manifest(root).get("source")
    except FeatureError as exc:
        raise CommandError(f"Error: {exc}") from None
    raise CommandError(f"Error: {root} is a feature index (build_index.py); the clamp3_* commands read feature "
                       f"folders, sub-folders included: give the folder it indexes"
                       + (f" ({source})" if source else ""))


def load_side(path: str | os.PathLike, role: str, family: Optional["ModelFamily"], *, progress: bool = False) -> Side:
    """The features of a query/reference: ``.npy`` features as they are, raw files through ``family``."""
    root = Path(path)
    refuse_index(root)
    found = files_by_modality(root) if root.exists() else {}
    others = sorted(f for modality, files in found.items() if modality != FEATURES for f in files)
    if FEATURES in found and others and set(found) <= {FEATURES, "txt", "img"} and \
            len(others) < len(found[FEATURES]):
        # A feature folder with a README or a cover beside the features: the reference's scripts read only
        # the .npy files of a feature folder, and so does this. Music beside .npy files, or as many texts
        # or images as features (labels for zero-shot, say, with a stray .npy), stay an error of several
        # modalities: that is a folder of raw inputs, not of features.
        print(f"note: {path}: reading its {len(found[FEATURES])} .npy feature files; {len(others)} other "
              f"file{'s' if len(others) > 1 else ''} ignored (e.g. {others[0]})", file=sys.stderr)
        modality = FEATURES
    else:
        modality, files = detect_modality(root, role, found)
    if modality == FEATURES:
        side = read_feature_side(root, progress)
    elif family is None:
        raise CommandError(f"Error: {path} holds raw {modality} files; this command takes .npy features only")
    else:
        side = family.encode(files, root, modality, progress=progress)
    side.given = os.fspath(path)
    return side


# -- model families: raw files → global features through the API and its cache -----------------------

class ModelFamily:
    """Raw files of one modality → a :class:`Side`, through a model of the API (built on first use).

    ``make_model`` returns an object with ``encode_files(paths, normalize, errors="skip", progress,
    root)`` → :class:`clamp2.api.Encoded` (text and symbolic music; audio too for CLaMP 3);
    images become captions first (:mod:`clamp2.search.captions`), then text files.
    """

    def __init__(self, name: str, make_model: Callable[[], object], modalities: Sequence[str], *,
                 cache=None, captioner: str | os.PathLike | None = None, device=None):
        from .raw_files import lazy_model

        self.name = name
        self.model = lazy_model(make_model)
        self.modalities = tuple(modalities)
        self.cache = cache
        self.captioner = captioner
        self.device = device

    def check(self, modality: str) -> None:
        if modality not in self.modalities and not (modality == "img" and "txt" in self.modalities):
            raise CommandError(f"Error: {self.name} cannot encode {modality} inputs "
                               f"(it takes {', '.join(self.modalities)})")

    def encode(self, files: Sequence[Path], root: Path, modality: str, *, normalize: bool = True,
               progress: bool = False) -> Side:
        """Global (``normalize``) or per-position features of ``files`` (all of ``modality``) under ``root``."""
        self.check(modality)
        base = root if root.is_dir() else root.parent
        if modality == "img":
            return self._encode_images(files, root, base, normalize, progress)
        encoded = self.model().encode_files(list(files), normalize, errors="skip", progress=progress, root=base)
        return _side_of(root, modality, encoded, normalize)

    def _encode_images(self, files, root: Path, base: Path, normalize: bool, progress: bool) -> Side:
        from .captions import BLIP_MODEL, caption_images, write_caption

        captions, failed = caption_images(files, self.captioner or BLIP_MODEL, cache=self.cache, device=self.device,
                                          progress=progress)
        with tempfile.TemporaryDirectory(prefix="clamp3_captions_") as temp:
            texts = []
            for caption in captions:
                text_path = _caption_path(temp, caption.image, base)
                write_caption(caption.text, text_path)
                texts.append(text_path)
            encoded = self.model().encode_files(texts, normalize, errors="skip", progress=progress, root=temp) \
                if texts else None
            images = {_caption_path(temp, c.image, base): c.image for c in captions}
            side = _side_of(root, "img", encoded, normalize, rename=lambda item: images[Path(item)].relative_to(base))
        # every image failure by the image's path as walked, as the caption failures and other modalities' are
        side.failures = [(str(path), reason) for path, reason in failed] + \
            [(os.fspath(base / name), reason) for name, reason in side.failures]
        side.captions = [(c.image.relative_to(base).as_posix(), c.text) for c in captions]
        return side


def _caption_path(temp: str, image: Path, base: Path) -> Path:
    # a.png and a.jpg side by side must not share a caption file
    relative = image.relative_to(base)
    return Path(temp) / relative.with_name(relative.name + ".txt")


def _side_of(root: Path, modality: str, encoded, normalize: bool, rename: Callable = None) -> Side:
    if encoded is None:
        return Side(root, modality, [], np.zeros((0, 0), np.float32))
    base = root if root.is_dir() else root.parent
    relative = [(rename(item) if rename else Path(item).relative_to(base)).as_posix() for item in encoded.items]
    failures = [(os.fspath(rename(item) if rename else item), " ".join(reason.split()))
                for item, reason in encoded.failures]
    if normalize:
        matrix = np.asarray(encoded.features, dtype=np.float32) if len(encoded) else np.zeros((0, 0), np.float32)
    else:
        matrix = list(encoded.features)
    return Side(root, modality, relative, matrix, failures, encoded.computed, encoded.cached)


# -- output files -----------------------------------------------------------------------------------

def write_jsonl(path: Path, records: Sequence[dict]) -> None:
    """The records, one JSON line each; a file that cannot be written (a full or read-only disk) is a
    :class:`CommandError` naming it (``f.write`` names no file)."""
    from clamp2.files import atomic_write_text, unwritable

    try:
        atomic_write_text(path, "".join(json.dumps(record) + "\n" for record in records))
    except OSError as error:
        raise CommandError(f"Error: {unwritable(path, error)}") from None


def _groups(keys: Sequence[str]) -> Dict[str, List[int]]:
    groups: Dict[str, List[int]] = {}
    for row, key in enumerate(keys):
        groups.setdefault(key, []).append(row)
    return groups


@dataclass
class Matching:
    """Queries and references paired by CLaMP 3's keys."""

    common: List[str]  # sorted
    query_rows: Dict[str, List[int]]
    reference_row: Dict[str, int]  # one file per reference key (the reference's choice: kept_first)
    unmatched: List[dict]  # the unmatched_files.jsonl records
    duplicates: List[str]  # warnings: reference keys of several files


def walk_positions(root: Path) -> Dict[str, int]:
    """Each ``.npy`` file under ``root`` (relative POSIX path) by its place in ``os.walk``'s own order.

    That is the file system's listing order (hash order on ext4, not sorted): the order in which the
    reference's eval and score list a feature folder, keeping a shared key's first file.
    """
    positions: Dict[str, int] = {}
    for folder, _, names in os.walk(root):
        for name in names:
            if name.endswith(".npy"):
                positions.setdefault(Path(os.path.relpath(os.path.join(folder, name), root)).as_posix(), len(positions))
    return positions


def kept_first(side: Side, groups: Dict[str, List[int]]) -> Dict[str, List[int]]:
    """``groups`` with the row the reference keeps for each shared key put first: the first its walk lists
    (feature folders), else the first in path order (inputs encoded here have no folder listing of features)."""
    shared = [key for key, rows in groups.items() if len(rows) > 1]
    if not shared or side.modality != FEATURES or not side.root.is_dir():
        return groups
    positions = walk_positions(side.root)
    ordered = dict(groups)
    for key in shared:
        rows = groups[key]
        kept = min(rows, key=lambda row: (positions.get(side.relative[row], len(positions)), row))
        ordered[key] = [kept] + [row for row in rows if row != kept]
    return ordered


def match_keys(queries: Side, references: Side) -> Matching:
    query_rows = _groups(queries.pair_keys)
    ref_rows = kept_first(references, _groups(references.pair_keys))
    common = sorted(set(query_rows) & set(ref_rows))
    unmatched = [{"unmatched_query": [queries.path(i) for i in query_rows[k]]} for k in sorted(query_rows)
                 if k not in ref_rows]
    unmatched += [{"unmatched_reference": [references.path(ref_rows[k][0])]} for k in sorted(ref_rows)
                  if k not in query_rows]
    duplicates = [f"warning: {len(rows)} reference files share the key {k!r} ("
                  f"{', '.join(references.path(i) for i in rows)}): {references.path(rows[0])} is used"
                  for k, rows in sorted(ref_rows.items()) if len(rows) > 1]
    return Matching(common, query_rows, {k: rows[0] for k, rows in ref_rows.items()}, unmatched, duplicates)


def unmatched_message(count: int, path: Path) -> str:
    return f"There are {count} unmatched query or reference files. Check '{path}' for details."


def common_keys_line(count: int) -> str:
    return f"There are {count} common keys between query and reference features."


def report_unmatched(matching: Matching, output_dir: Path, strict: bool, say: Callable[[str], None]) -> None:
    """Warn of reference keys held by several files, write ``unmatched_files.jsonl`` and say so;
    ``strict`` makes unmatched files an error (:class:`CommandError`).

    With nothing unmatched, a file of that name left by an earlier run in ``output_dir`` is removed:
    beside this run's results it would describe a matching that no longer holds.
    """
    for warning in matching.duplicates:  # the reference keeps one of them without a word
        print(warning, file=sys.stderr)
    path = output_dir / UNMATCHED_FILE
    if not matching.unmatched:
        path.unlink(missing_ok=True)
        return
    write_jsonl(path, matching.unmatched)
    message = unmatched_message(len(matching.unmatched), path)
    if strict:
        raise CommandError(f"Error: {message}")
    say(message)


def _check_dims(queries: Side, references: Side) -> None:
    if len(queries) and len(references) and queries.matrix.shape[1] != references.matrix.shape[1]:
        raise CommandError(f"Error: query features have dimension {queries.matrix.shape[1]}, "
                           f"reference features {references.matrix.shape[1]}")


def _need_rows(side: Side, role: str) -> None:
    if not len(side):
        raise CommandError(f"Error: no usable {role} file in {side.root}")


# -- clamp3_score -----------------------------------------------------------------------------------

def pairwise_score(queries: Side, references: Side, output_dir: Path, *, strict: bool = False,
                   say: Callable[[str], None] = print) -> List[str]:
    """Pairwise mode: every query feature against its key's reference; returns the printed lines."""
    from .retrieval import exact_cosine

    _need_rows(queries, "query")
    _need_rows(references, "reference")
    _check_dims(queries, references)
    matching = match_keys(queries, references)
    report_unmatched(matching, output_dir, strict, say)
    if not matching.common:
        raise CommandError("Error: no key is in both folders (keys are the path relative to the folder and the "
                           "file name up to its first '.'): the folders must mirror each other")
    rows = [(i, matching.reference_row[k]) for k in matching.common for i in matching.query_rows[k]]
    q_rows = np.array([q for q, _ in rows], dtype=np.int64)
    r_rows = np.array([r for _, r in rows], dtype=np.int64)
    scores = exact_cosine(queries.matrix[q_rows], references.matrix[r_rows])
    records = [{"query": queries.path(q), "reference": references.path(r), "similarity": float(s)}
               for q, r, s in zip(q_rows.tolist(), r_rows.tolist(), scores.tolist())]
    records.sort(key=lambda item: (-item["similarity"], item["query"], item["reference"]))
    path = output_dir / PAIRWISE_FILE
    write_jsonl(path, records)
    return [common_keys_line(len(matching.common)),
            f"Total query features: {len(records)}",
            f"Total reference features: {len(matching.reference_row)}",
            f"Avg. pairwise similarity: {round(math.fsum(r['similarity'] for r in records) / len(records), 4)}",
            f"Pairwise similarity scores saved in '{path}'."]


def group_order(side: Side) -> List[int]:
    """Rows in the order the reference's ``--group`` averages them (a float32 sum depends on it).

    Its ``get_features`` walks the folder (``os.walk``'s own order: the file system's, not sorted) into a
    dict of lists by key, and ``--group`` flattens that dict: the files of a key together, keys in the order
    of their first file. Inputs encoded here (no feature folder to walk) are taken in path order, grouped alike.
    """
    if side.modality == FEATURES and side.root.is_dir():
        positions = walk_positions(side.root)
        walked = sorted(range(len(side)), key=lambda row: (positions.get(side.relative[row], len(positions)), row))
    else:
        walked = list(range(len(side)))
    keys = side.pair_keys
    by_key: Dict[str, List[int]] = {}
    for row in walked:
        by_key.setdefault(keys[row], []).append(row)
    return [row for rows in by_key.values() for row in rows]


def group_score(queries: Side, references: Side) -> List[str]:
    """Group mode: cosine (float32, eps 1e-8) of the mean query and the mean reference feature, each mean summed
    in the reference's order (:func:`group_order`)."""
    import torch

    from .retrieval import mean_vector

    _need_rows(queries, "query")
    _need_rows(references, "reference")
    _check_dims(queries, references)
    # The rows in the reference's order, a block at a time: indexing the whole matrix first copied the collection.
    means = [torch.from_numpy(mean_vector(side.matrix, group_order(side))) for side in (queries, references)]
    similarity = torch.nn.functional.cosine_similarity(*means, dim=0)
    return [f"Total query features: {len(queries)}", f"Total reference features: {len(references)}",
            f"Group similarity: {round(similarity.item(), 4)}"]


# -- clamp3_eval ------------------------------------------------------------------------------------

def evaluate(queries: Side, references: Side, output_dir: Path, *, device="cpu",
             say: Callable[[str], None] = print) -> List[str]:
    """MRR and Hit@1/10/100 over the query features; strict about unmatched keys. Returns the lines after
    the common-keys line (which is said first)."""
    from .retrieval import format_metrics, metrics_from_ranks, rank_queries

    _need_rows(queries, "query")
    _need_rows(references, "reference")
    _check_dims(queries, references)
    matching = match_keys(queries, references)
    report_unmatched(matching, output_dir, True, say)
    say(common_keys_line(len(matching.common)))
    position = {k: j for j, k in enumerate(matching.common)}
    q_rows = [i for k in matching.common for i in matching.query_rows[k]]
    true_rows = [position[k] for k in matching.common for _ in matching.query_rows[k]]
    refs = references.matrix[[matching.reference_row[k] for k in matching.common]]
    ranks = rank_queries(queries.matrix[q_rows], true_rows, refs, device=device)
    records = [{"query": queries.path(i), "reference": references.path(matching.reference_row[matching.common[t]]),
                "rank": int(r)} for i, t, r in zip(q_rows, true_rows, ranks.tolist())]
    records.sort(key=lambda item: (item["rank"], item["query"]))
    path = output_dir / RANKS_FILE
    write_jsonl(path, records)
    return ([f"Total query features: {len(q_rows)}", f"Total reference features: {len(matching.common)}"]
            + format_metrics(metrics_from_ranks(ranks)) + [f"Rank details saved in '{path}'."])


# -- clamp3_search ----------------------------------------------------------------------------------

def search(query: np.ndarray, references: Side, top_k: int, *,
           device="cpu") -> Tuple[List[Tuple[str, str, float]], List[str], int]:
    """The ``top_k`` (capped) references most similar to ``query`` [D]: ``(key, relative path, score)``
    best first (ties by key), warnings about keys shared by several references, and the number of
    candidates.

    One reference per key, as the reference's dict of features: of the files sharing a key, the last
    in path order is ranked (in a flat folder, the last of ``sorted(os.listdir())``, the one the
    reference keeps) and the others are reported.
    """
    from .retrieval import top_k as best

    _need_rows(references, "reference")
    if query.shape[0] != references.matrix.shape[1]:
        raise CommandError(f"Error: the query has dimension {query.shape[0]}, the references "
                           f"{references.matrix.shape[1]}")
    keys = references.name_keys
    files_of: Dict[str, List[int]] = {}
    for i in sorted(range(len(keys)), key=lambda i: references.relative[i]):
        files_of.setdefault(keys[i], []).append(i)
    # Rows ordered by key: the searcher breaks ties by key.
    order = [files_of[key][-1] for key in sorted(files_of)]
    labels = [f"{keys[i]}\0{references.relative[i]}" for i in order]
    hits = best(query[None], labels, references.matrix[order], top_k, device=device)[0]
    warnings = [f"warning: {len(rows)} references share the key {key!r} (keys are file names up to the first "
                f"'.'): {references.path(rows[-1])} is ranked, "
                f"{', '.join(references.path(i) for i in rows[:-1])} left out"
                for key, rows in sorted(files_of.items()) if len(rows) > 1]
    return [(label.split("\0")[0], label.split("\0")[1], score) for label, score in hits], warnings, len(order)


def search_lines(hits: Sequence[Tuple[str, str, float]], candidates: int) -> List[str]:
    """``Top {K} results among {N} candidates:`` then ``{key} {round(sim, 4)}`` per result."""
    return [f"Top {len(hits)} results among {candidates} candidates:"] + [f"{key} {round(score, 4)}"
                                                                         for key, _, score in hits]


# -- command line -----------------------------------------------------------------------------------

FAMILIES = ("clamp3", "clamp2")
CLAMP2_MODALITIES = ("txt", "xml", "mid", "abc", "mtf")
CLAMP3_MODALITIES = CLAMP2_MODALITIES + ("audio",)
CLAMP3_HUB_ID = "sander-wood/clamp3"


# What clamp3_from_args loads when --weights is not given (the --weights help of the scripts).
CLAMP3_WEIGHTS_DEFAULT = ("config.py's CLAMP3_WEIGHTS_PATH for --variant when that file is in the working folder, "
                          f"else the hub id {CLAMP3_HUB_ID}")


def add_arguments(parser, *, outputs: bool = True) -> None:
    """The model, cache and output options the four ``clamp3_*`` scripts share."""
    from ..api import add_model_arguments

    parser.add_argument("--model", choices=FAMILIES, default="clamp3",
                        help="model family that encodes raw files (default clamp3; clamp2 takes no audio)")
    parser.add_argument("--variant", choices=("saas", "c2"), default=None,
                        help="published CLaMP 3 weights: saas (best for audio) or c2 (best for sheet music and "
                             "MIDI); default: config.py's CLAMP3_VARIANT")
    parser.add_argument("--mert", default=None,
                        help="MERT-v1-95M folder or hub id for audio inputs (default m-a-p/MERT-v1-95M, from the "
                             "Hugging Face cache)")
    parser.add_argument("--captioner", default=None,
                        help="BLIP captioner folder or hub id for image inputs (default "
                             "Salesforce/blip-image-captioning-base, from the Hugging Face cache)")
    if outputs:
        parser.add_argument("--output_dir", type=Path, default=Path("."),
                            help="where the JSONL files are written (default: the current directory)")
    add_model_arguments(parser, weights_help=f"CLaMP 3 checkpoint file, folder or hub id (default: "
                                             f"{CLAMP3_WEIGHTS_DEFAULT}); with --model clamp2, a CLaMP 2 one "
                                             "(default: config.py's CLAMP2_WEIGHTS_PATH)")


def family_from_args(args, cfg) -> ModelFamily:
    """The model family the options ask for (built on first use: feature-only runs load nothing)."""
    from ..api import clamp2_from_args
    from ..cache import cache_from_args

    cache = cache_from_args(args)
    if args.model == "clamp2":
        return ModelFamily("CLaMP 2", lambda: clamp2_from_args(args, cfg), CLAMP2_MODALITIES, cache=cache,
                           captioner=args.captioner, device=args.device)
    return ModelFamily("CLaMP 3", lambda: clamp3_from_args(args, cfg), CLAMP3_MODALITIES, cache=cache,
                       captioner=args.captioner, device=args.device)


def clamp3_from_args(args, cfg):
    """The CLaMP 3 model of the options; defaults from ``code/config.py``.

    ``--weights`` (a file, a folder or a hub id; ``--variant`` picks the published file in a folder
    or hub repo), else config.py's file name for the variant when that file exists here, else the
    published file of ``sander-wood/clamp3`` from the Hugging Face cache (downloaded when missing
    and the hub is reachable, unless ``HF_HUB_OFFLINE`` is set).
    """
    from ..api import CLaMP3, configured_max_text_length
    from ..cache import cache_from_args
    from ..configuration import clamp3_weights_name

    weights = args.weights
    if weights is None:
        name = cfg.CLAMP3_WEIGHTS_PATH if args.variant is None else clamp3_weights_name(cfg, args.variant)
        weights = name if Path(name).is_file() else CLAMP3_HUB_ID
    return CLaMP3.from_pretrained(weights, text_model=args.text_model or cfg.TEXT_MODEL_NAME,
                                  variant=args.variant or (None if args.weights else cfg.CLAMP3_VARIANT),
                                  mert=args.mert, max_text_length=configured_max_text_length(cfg), device=args.device,
                                  dtype=args.dtype, batch_size=args.batch_size, cache=cache_from_args(args),
                                  num_workers=args.num_workers)


def say_failures(side: Side, stream=None) -> None:
    import sys

    for name, reason in side.failures:
        print(f"failed: {name}: {reason}", file=stream or sys.stderr)


def say_captions(side: Side) -> None:
    for image, caption in side.captions:
        print(f'Caption of "{image}": {caption}')


def load_sides(family: "ModelFamily", paths_and_roles, progress: bool = True, announce: bool = True,
               name_feature_folders: bool = False) -> List[Side]:
    """Each (path, role) read or encoded, with §18's ``Detected {role} modality`` line and captions
    (``announce``) and every failed file named on stderr. ``name_feature_folders`` (eval, score): when every side is
    a folder of .npy features, ``Query folder: …`` and ``Reference folder: …`` as given, the first lines the
    original's ``inference/clamp3_eval.py`` and ``clamp3_score.py`` print."""
    sides = []
    for path, role in paths_and_roles:
        side = load_side(path, role, family, progress=progress)
        if announce:
            if side.modality != FEATURES:
                print(f"Detected {role} modality: {side.modality}")
            say_captions(side)
        say_failures(side)
        sides.append(side)
    if name_feature_folders and all(side.modality == FEATURES for side in sides):
        for path, role in paths_and_roles:
            print(f"{role.capitalize()} folder: {path}")
    return sides


def exit_status(sides: Sequence[Side]) -> int:
    """0, or 1 when some file of either side could not be used (they were named as they failed)."""
    return 1 if any(side.failures for side in sides) else 0


def run_command(work: Callable[[], int]) -> int:
    """A clamp3_* command's work with its errors as exit codes: §18's own messages (``Error: …``) as
    printed and 1; anything else that names a bad input or model one ``error:`` line and 2."""
    import sys

    try:
        return work()
    except (ModalityError, CommandError) as exc:
        print(exc, file=sys.stderr)
        return 1
    except (OSError, RuntimeError, ValueError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
