"""Training data of M3, CLaMP 2 and CLaMP 3 (SPEC §7, SPEC_CLAMP3 §17): files, JSONL pairs, texts, batches.

One pair dataset serves CLaMP 2 and both CLaMP 3 stages, parametrised by its text rule (CLaMP 2's
metadata/summaries or CLaMP 3's translations/metadata) and its music source (M3 patches of
.abc/.mtf files, or MERT feature rows of .npy files).

Every random draw of a sample comes from its own ``random.Random`` seeded by (data seed, epoch,
index), not from the process-wide generators: a sample is then the same whatever the number of
data-loader workers or ranks, and a resumed run sees exactly the samples an uninterrupted run
would. Evaluation samples do not depend on the epoch, so eval losses of different epochs compare.

The whole data set is checked before training (:func:`check_music_files`, :func:`read_pairs`),
so a missing file fails the launch, not a step hours later.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Dataset, Sampler

from ..extraction.core import mert_array_problem, mert_values_problem
from ..files import find_all_files, input_problem, not_found, unreachable
from ..patchilizer import PAD_TOKEN_ID, TRUNCATE_MODES, M3Patchilizer, split_lines, truncate
from .corruption import corrupt_patches

MUSIC_EXTENSIONS = (".abc", ".mtf")
ABC_UNIT_LENGTH = "L:1/8\n"
INSTRUMENT_REMOVAL_PROB = 0.9
# Fields of a JSONL line that are not metadata (never part of a metadata text).
NON_METADATA_FIELDS = ("summary_en", "summary_nen", "filepaths")
# CLaMP 3 (SPEC_CLAMP3 §17): fields never used as text.
CLAMP3_NON_TEXT_FIELDS = ("id", "filepaths", "language", "translations")
AUDIO_EXTENSIONS = (".npy",)
MAX_LISTED = 20  # problems listed in full before "... and N more"


class DataError(ValueError):
    """A problem with the training data found before training starts."""


class StoppedElsewhere(DataError):
    """Another rank's data error, learnt at a collective of the launch check (:func:`gather_agreeing`): every rank
    stops with it; rank 0 says it once (the rank that found it says it on its node)."""


# What a rank sends to the launch check's collectives: its share, or the data error that stops it.
_SHARE, _ERROR = "share", "error"


def gather_agreeing(obj, step: str) -> list:
    """``obj`` of every rank, in rank order, at one of the collectives that check the data before training (every
    rank calls them in the same order: :func:`checked_in_shares`, then the trainers' ``same_data_everywhere``).
    ``step``: which of them this is, the same words on every node.

    Raises :class:`StoppedElsewhere` when a rank sent its data error instead (:func:`announce_data_error`): a node's
    own copy of the data (no shared file system) may lack a file, and that rank raised and left while the others
    waited at such a collective; they met its absence as a gloo "Connection closed by peer" traceback, or as a
    mismatched collective, never the error. Also when the ranks are at different steps: a node whose copy lacks the
    eval JSONL splits the training pairs (no collective) while the others check the eval files; one rank's file
    check met another's data record, a traceback on every node."""
    from ..distributed import gather_objects

    views = gather_objects((_SHARE, step, obj))
    for rank, (kind, _, value) in enumerate(views):
        if kind == _ERROR:
            raise StoppedElsewhere(f"rank {rank} of {len(views)} stopped: {value} (every rank stops)")
    if any(seen != step for _, seen, _ in views):
        described = "; ".join(f"rank {rank}: {seen}" for rank, (_, seen, _) in enumerate(views))
        raise StoppedElsewhere(f"the ranks do not see the same training data ({described}; a node lacks a file, "
                               "such as the eval JSONL, that another has): every node needs the same data folders "
                               "and JSONL files (a shared file system, or identical copies)")
    return [value for _, _, value in views]


def announce_data_error(message: str) -> None:
    """The failing rank's side of :func:`gather_agreeing`: one collective, met by the one each other rank is at."""
    from ..distributed import gather_objects

    gather_objects((_ERROR, None, message))


def sample_rng(seed: int, stream: str, epoch: int, index: int) -> random.Random:
    # A string seed is hashed with SHA-512 by random.Random: stable across processes and runs.
    return random.Random(f"{seed}:{stream}:{epoch}:{index}")


def listing(title: str, items: Sequence[str]) -> str:
    """``title (n): a, b, c ... and k more`` on one line (an error is one line, however many items it names)."""
    more = f" ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return f"{title} ({len(items)}): {'; '.join(items[:MAX_LISTED])}{more}"


@dataclass(frozen=True)
class EvalSplit:
    """The items a run trains and evaluates on when no eval set is given, and why (for the log)."""

    train: list
    eval: list
    reason: str


def split_eval(items: Sequence, fraction: float, seed: int, min_train: int = 1, min_eval: int = 1,
               round_up: bool = False) -> EvalSplit:
    """Hold out int(fraction · n) items (ceil with ``round_up``), after a seeded shuffle, for evaluation,
    within limits.

    The reference's training scripts hold out ``int(len(data) * eval_ratio)`` items, its linear probe
    ``math.ceil``. The count is raised to ``min_eval`` (CLaMP 2 passes 2: one pair has nothing to
    contrast with; the reference divides by zero on an empty eval set) and lowered so that
    ``min_train`` items (one global batch) stay for training. When fewer than ``min_eval`` items can
    be spared, nothing is held out and the training items are evaluated too, so a small data set can
    always train. The seed is the base seed, not base + rank, so every rank holds the same split (the
    reference shuffles after seeding 42 + rank, so its ranks disagree on the split).
    """
    shuffled = list(items)
    random.Random(seed).shuffle(shuffled)
    total = len(shuffled)
    wanted = math.ceil(total * fraction) if round_up else int(total * fraction)
    count = min(max(wanted, min_eval), total - min_train)
    if count < min_eval:
        return EvalSplit(shuffled, shuffled,
                         f"no item held out for evaluation: of {total} items {min_train} are needed to fill one "
                         f"global batch and an eval set needs {min_eval}; the eval loss is computed on the training "
                         "items (give an eval set for a held-out loss)")
    why = f"EVAL_SPLIT {fraction:g} of {total}, rounded {'up' if round_up else 'down'}"
    if count > wanted:
        why = f"EVAL_SPLIT {fraction:g} of {total} gives {wanted}, raised to the minimum of {min_eval}"
    elif count < wanted:
        why = f"EVAL_SPLIT {fraction:g} of {total} gives {wanted}, lowered so that {min_train} items fill one global batch"
    return EvalSplit(shuffled[count:], shuffled[:count], f"{count} of {total} items held out for evaluation ({why})")


def read_music(path: Path, remove_unit_length: bool = True) -> str:
    """A music file's text; ABC loses its ``L:1/8`` line (the unit length every converted file has) unless
    ``remove_unit_length`` is False."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read the music file {path}: {exc}") from exc
    if remove_unit_length and path.suffix.lower() == ".abc":
        text = text.replace(ABC_UNIT_LENGTH, "")
    return text


def remove_instrument_info(text: str) -> str:
    """Drop instrument names from ABC ``V:`` lines and set MTF ``program_change`` programs to 0.

    A changed line always ends with ``\\n``, even if it was the file's last line (as in the reference).
    """
    lines = split_lines(text)
    if not lines:
        return text
    mtf = lines[0].split(" ")[0] == "ticks_per_beat"
    cleaned = []
    for line in lines:
        if not mtf and line.startswith("V:"):
            cut = line.find(" nm=")
            if cut == -1:
                cut = line.find(" snm=")
            if cut != -1:
                line = line[:cut] + "\n"
        elif mtf and line.startswith("program_change"):
            line = " ".join(line.split(" ")[:-1]) + " 0\n"
        cleaned.append(line)
    return "".join(cleaned)


# -- M3: folders of .abc / .mtf ------------------------------------------------------------------

def find_music_files(folders: Sequence[str | os.PathLike]) -> List[Path]:
    """All .abc/.mtf files under ``folders`` (sorted per folder); a missing folder is an error."""
    problems = [problem for problem in (input_problem(f, "data folder") for f in folders) if problem]
    if problems:
        raise DataError(problems[0] if len(problems) == 1 else listing("data folders that cannot be read", problems))
    files: List[Path] = []
    for folder in folders:
        files.extend(find_all_files(folder, MUSIC_EXTENSIONS, DataError))
    return files


def text_problem(path: Path) -> Optional[str]:
    """Why ``path`` cannot be read as :func:`read_music` reads it in training (UTF-8), or None: checked when a run
    starts, so that such a file fails the launch, not the epoch that first draws it hours later."""
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}); re-save it as UTF-8"
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror or exc}"
    return None


def checked_in_shares(entries: Sequence, check: Callable[[Any], Optional[str]],
                      say: Callable[[Any, str], str] = lambda entry, problem: problem,
                      shared: bool = False) -> List[str]:
    """``say(entry, problem)`` for each entry ``check`` finds a problem in, in the entries' order.

    ``shared``, under a launch of several processes: each checks its share and all get every problem, so a launch
    check that reads every file (the text check, an audio array's header) reads it once per run, not once per process
    (2 M files, 8 processes a node: 80 GB read instead of 10). Every process must call it then, with the same
    entries (the trainers do); otherwise (a caller on one process) this process checks them all."""
    distributed = shared and torch.distributed.is_available() and torch.distributed.is_initialized()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
    mine = [(index, say(entries[index], problem)) for index in range(rank, len(entries), world)
            if (problem := check(entries[index]))]
    shares = gather_agreeing(mine, "checking the data files") if distributed else [mine]
    return [problem for _, problem in sorted(pair for share in shares for pair in share)]


def check_music_files(paths: Sequence[Path], shared: bool = False) -> None:
    """Fail listing every file that is missing, unreadable, empty (an empty file is not a piece) or not UTF-8 text:
    before training, not when a batch first draws it."""
    missing, unreadable, empty, readable = [], [], [], []
    for path in paths:
        try:
            size = path.stat().st_size
        except OSError:
            missing.append(str(path))
            continue
        if size == 0:
            empty.append(str(path))
        elif not os.access(path, os.R_OK):
            unreadable.append(str(path))
        else:
            readable.append(path)
    not_text = checked_in_shares(readable, text_problem, shared=shared)
    problems = []
    if missing:
        problems.append(listing("missing files", missing))
    if unreadable:
        problems.append(listing("files this user may not read (permission denied)", unreadable))
    if empty:
        problems.append(listing("empty files", empty))
    if not_text:
        problems.append(listing("files that cannot be read as text", not_text))
    if problems:
        raise DataError("\n".join(problems))


class M3Dataset(Dataset):
    """Music files → (corrupted input patches, mask, picked positions, original patches)."""

    def __init__(self, paths: Sequence[Path], patchilizer: M3Patchilizer, mask_ratio: float, training: bool,
                 seed: int = 42):
        self.paths = list(paths)
        self.patchilizer = patchilizer
        self.mask_ratio = mask_ratio
        self.training = training
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        stream, epoch = ("train", self.epoch) if self.training else ("eval", 0)
        rng = sample_rng(self.seed, stream, epoch, index)
        patches = self.patchilizer.encode_array(read_music(self.paths[index]), add_special_patches=True,
                                                truncate_patches=True, random_truncate=self.training, rng=rng)
        target = torch.from_numpy(patches).long()
        inputs, selected = corrupt_patches(target, self.mask_ratio, self.training, rng)
        return {"input_patches": inputs, "input_masks": torch.ones(len(target)), "selected_indices": selected,
                "target_patches": target}


def collate_m3(samples: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """Pad every field to the longest sample of the batch (pad id 0, mask 0, not selected)."""
    return {key: pad_sequence([s[key] for s in samples], batch_first=True, padding_value=PAD_TOKEN_ID)
            for key in samples[0]}


# -- CLaMP 2: JSONL of (metadata, summaries, music files) -----------------------------------------

@dataclass
class PairItem:
    """One JSONL line: its fields and its music files (absolute, checked to exist)."""

    fields: Dict[str, Any]
    music_paths: List[Path]
    line_number: int = 0
    source: str = ""


def english_summaries(fields: Dict[str, Any]) -> List[str]:
    """``summary_en`` as a list: the README documents a string, the reference indexes a list."""
    return _strings(fields.get("summary_en"))


def non_english_summaries(fields: Dict[str, Any]) -> List[str]:
    """``summary_nen`` as a list of texts: a ``{"language", "summary"}`` dict, a list of them, or strings."""
    value = fields.get("summary_nen")
    items = value if isinstance(value, list) else [value]
    texts = []
    for item in items:
        if isinstance(item, dict):
            item = item.get("summary")
        if isinstance(item, str) and item.strip():
            texts.append(item)
    return texts


def _strings(value) -> List[str]:
    items = value if isinstance(value, list) else [value]
    return [item for item in items if isinstance(item, str) and item.strip()]


def distinct_lines(values: Sequence[str]) -> List[str]:
    """The non-empty lines of ``values``, de-duplicated in first-occurrence order first.

    The reference de-duplicates with a ``set`` (order depends on the hash seed) and keeps empty
    lines for its fallback; here the order is first occurrence and empty lines never appear.
    """
    unique = list(dict.fromkeys(value for value in values if value))
    return [line for line in "\n".join(unique).split("\n") if line]


def text_values(fields: Dict[str, Any], excluded: Sequence[str]) -> List[str]:
    """Every string value and string list item of the fields not in ``excluded``, in field order."""
    values: List[str] = []
    for key, value in fields.items():
        if key in excluded or value is None:
            continue
        if isinstance(value, str):
            values.append(value)
        elif isinstance(value, list):
            values.extend(v for v in value if isinstance(v, str))
    return values


def metadata_lines(fields: Dict[str, Any]) -> List[str]:
    """Non-empty lines of every metadata value (strings and list items), values de-duplicated in order."""
    return distinct_lines(text_values(fields, NON_METADATA_FIELDS))


def dropout_join(lines: Sequence[str], sep_token: str, rng: random.Random) -> str:
    """Each line kept with p 0.5 (all when none survives), shuffled, joined with the sep token."""
    kept = [line for line in lines if rng.random() < 0.5] or list(lines)
    rng.shuffle(kept)
    return sep_token.join(kept)


def training_text(fields: Dict[str, Any], sep_token: str, rng: random.Random) -> str:
    """TEXT_DROPOUT: random metadata lines (p 0.5), else an English (p 0.5) or non-English summary.

    A piece with no metadata line falls through to the summaries rather than train on an empty text.
    """
    if rng.random() < 0.5:
        lines = metadata_lines(fields)
        if lines:
            return dropout_join(lines, sep_token, rng)
    non_english = non_english_summaries(fields)
    if rng.random() < 0.5 or not non_english:
        return rng.choice(english_summaries(fields))
    return rng.choice(non_english)


def clamp3_training_text(fields: Dict[str, Any], sep_token: str, rng: random.Random) -> str:
    """CLaMP 3's TEXT_DROPOUT (SPEC_CLAMP3 §17): translations (p 0.5), else every other text field.

    The translation branch takes the ``translations`` values except ``language``; when it is not
    taken or yields no text, the candidates are the strings and string list items of every field
    but ``id``/``filepaths``/``language``/``translations`` (the English ``analysis`` included).
    """
    candidates: List[str] = []
    if rng.random() < 0.5:
        translations = fields.get("translations")
        if isinstance(translations, dict):
            candidates = [value for key, value in translations.items() if key != "language" and isinstance(value, str)
                          and value]
    if not candidates:
        candidates = text_values(fields, CLAMP3_NON_TEXT_FIELDS)
    return dropout_join(distinct_lines(candidates), sep_token, rng)


def clamp3_eval_text(fields: Dict[str, Any]) -> str:
    return fields["analysis"]


def eval_text(fields: Dict[str, Any]) -> str:
    return english_summaries(fields)[0]


def eval_music_path(paths: Sequence[Path]) -> Path:
    """The .abc if listed first, else the second entry (the only one when there is one: the reference fails).

    ``.abc`` in lower case, as the reference's ``endswith(".abc")``: ``["t.ABC", "t.mtf"]`` evaluates t.mtf.
    """
    if paths[0].name.endswith(".abc") or len(paths) == 1:
        return paths[0]
    return paths[1]


def resolve_relative(root: Path, relative: str) -> Optional[Path]:
    """``root / relative`` (``..`` allowed: the reference joins ``root + '/' + relative``), None when
    ``relative`` is empty or absolute (the reference's join would not read an absolute path)."""
    if not relative or os.path.isabs(relative):
        return None
    joined = root / relative
    if ".." in Path(relative).parts:
        # The file system takes ``link/..`` to the link target's parent, as the reference's open() does; a lexical
        # normpath named the folder holding the link instead.
        return Path(os.path.realpath(joined.parent)) / joined.name
    return Path(os.path.normpath(joined))


def clamp2_text_problems(fields: Dict[str, Any], require_non_english: bool) -> List[str]:
    problems = [] if english_summaries(fields) else ["no 'summary_en' text"]
    if require_non_english and not non_english_summaries(fields):
        problems.append("no 'summary_nen' summary (needed by TEXT_DROPOUT)")
    return problems


def has_analysis(fields: Dict[str, Any]) -> bool:
    analysis = fields.get("analysis")
    return isinstance(analysis, str) and bool(analysis.strip())


def no_text_problems(fields: Dict[str, Any]) -> List[str]:
    """Training lines of CLaMP 3 with TEXT_DROPOUT: any fields make a text (the reference's text_dropout)."""
    return []


def clamp3_text_problems(fields: Dict[str, Any]) -> List[str]:
    return [] if has_analysis(fields) else ["no 'analysis' text (the evaluation text)"]


def read_pairs(jsonl: str | os.PathLike, require_non_english: bool, shared: bool = False) -> List[PairItem]:
    """CLaMP 2's JSONL (SPEC §7), checked whole: see :func:`read_items`.

    ``summary_en`` is needed by every line (evaluation text), ``summary_nen`` by training lines
    when TEXT_DROPOUT is on (``require_non_english``).
    """
    return read_items(jsonl, lambda fields: clamp2_text_problems(fields, require_non_english), SymbolicMusic,
                      shared=shared)


def jsonl_lines(jsonl: Path) -> Iterator[str]:
    """The lines of a JSONL file; one that cannot be read or is not UTF-8 is a :class:`DataError` naming it
    (the trainers print that as their one-line error; a ``UnicodeDecodeError`` was a traceback)."""
    try:
        with open(jsonl, encoding="utf-8") as handle:
            yield from handle  # the caller's own errors are raised in its frame, not here
    except UnicodeDecodeError as exc:  # decoded a block at a time: the line is unknown
        raise DataError(f"{jsonl} is not UTF-8 text ({exc.reason}); re-save it as UTF-8") from None
    except OSError as exc:
        raise DataError(f"cannot read {jsonl}: {exc.strerror or exc}") from None


def read_items(jsonl: str | os.PathLike, text_problems: Callable[[Dict[str, Any]], List[str]], music,
               shared: bool = False) -> List[PairItem]:
    """Parse and check a whole JSONL; every problem (bad line, unsafe, missing or bad file) is reported at once.

    ``filepaths`` are relative to the JSONL's folder (``..`` included, as the reference joins them);
    absolute paths are rejected; each must have one of ``music.extensions`` and pass ``music.check`` (e.g. an
    audio array's shape). ``text_problems(fields)`` lists what a line lacks. One problem gives a
    one-line message. ``shared``: every process of the run calls it, and they share the reading of the files
    (:func:`checked_in_shares`); never from one process alone, which would wait for the others.
    """
    jsonl = Path(jsonl)
    problem = not_found(jsonl, "JSONL file", Path.is_file)
    if problem:
        raise DataError(problem)
    # The folder the JSONL is in, as named (links in it resolved): a JSONL that is itself a link keeps its files
    # beside the link, as the reference's os.path.dirname(TRAIN_JSONL) + '/' + path reads them.
    root = Path(os.path.realpath(jsonl.parent))
    items: List[PairItem] = []
    problems: List[str] = []
    missing: List[str] = []
    to_check: List[tuple] = []  # (where, path): read by music.check once the lines are parsed
    for number, line in enumerate(jsonl_lines(jsonl), start=1):
        if not line.strip():
            continue
        where = f"{jsonl}:{number}"
        try:
            fields = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{where}: not valid JSON ({exc.msg})")
            continue
        if not isinstance(fields, dict):
            problems.append(f"{where}: not a JSON object")
            continue
        filepaths = fields.get("filepaths")
        if isinstance(filepaths, str):
            filepaths = [filepaths]
        if not isinstance(filepaths, list) or not filepaths:
            problems.append(f"{where}: no 'filepaths'")
            continue
        problems.extend(f"{where}: {problem}" for problem in text_problems(fields))
        paths = []
        for relative in filepaths:
            path = resolve_relative(root, relative) if isinstance(relative, str) else None
            if path is None:
                problems.append(f"{where}: file path {relative!r} is not a path relative to the JSONL's "
                                f"folder {root}")
            elif path.suffix.lower() not in music.extensions:
                problems.append(f"{where}: {relative!r} is not {music.kind}")
            elif problem := unreachable(path, "music file"):
                problems.append(f"{where}: {problem}")
            elif path.is_dir():
                problems.append(f"{where}: {path} is a folder, not a file")
            elif not path.is_file():
                missing.append(f"{path} ({where})")
            else:
                to_check.append((where, path))
                paths.append(path)
        items.append(PairItem(fields, paths, number, str(jsonl)))
    problems.extend(checked_in_shares(to_check, lambda entry: music.check(entry[1]),
                                      lambda entry, problem: f"{entry[0]}: {problem}", shared=shared))
    if len(problems) + len(missing) == 1:
        raise DataError(problems[0] if problems else f"missing file {missing[0]}")
    if missing:
        problems.append(listing("missing files", missing))
    if problems:
        raise DataError(listing(f"{jsonl} has problems", problems))
    if not items:
        raise DataError(f"{jsonl} holds no items")
    return items


# -- music sources: what a pair's file becomes ---------------------------------------------------------

class SymbolicMusic:
    """.abc/.mtf files → M3 patches (CLaMP 2, CLaMP 3's symbolic stage): ``L:1/8`` removed, instrument
    information removed with p 0.9 in training, truncated to PATCH_LENGTH (at random in training).
    Evaluation reads the .abc if listed first, else the second file.

    Where ``L:1/8`` goes, as each reference does: CLaMP 2 removes it from ``.abc`` files as they are read,
    before the instrument removal; CLaMP 3 (``clamp3=True``) from every file, ABC and MTF alike, after it,
    in its patchilizer (SPEC_CLAMP3 §13).
    """

    extensions = MUSIC_EXTENSIONS
    kind = "an .abc or .mtf file"
    pad_value = PAD_TOKEN_ID

    def __init__(self, patchilizer: M3Patchilizer, clamp3: bool = False):
        self.patchilizer = patchilizer
        self.clamp3 = clamp3

    @staticmethod
    def check(path: Path) -> Optional[str]:
        if not path.stat().st_size:
            return f"{path} is empty"
        return text_problem(path)

    @staticmethod
    def eval_path(paths: Sequence[Path]) -> Path:
        return eval_music_path(paths)

    def load(self, path: Path, training: bool, rng: random.Random) -> torch.Tensor:
        music = read_music(path, remove_unit_length=not self.clamp3)
        if training and rng.random() < INSTRUMENT_REMOVAL_PROB:
            music = remove_instrument_info(music)
        if self.clamp3:
            music = music.replace(ABC_UNIT_LENGTH, "")
        patches = self.patchilizer.encode_array(music, add_special_patches=True, truncate_patches=True,
                                                random_truncate=training, rng=rng)
        return torch.from_numpy(patches).long()


def audio_array_problem(path: Path, width: int) -> Optional[str]:
    """Why a MERT feature file cannot be a CLaMP 3 input, or None (reads the .npy header only).

    The rule of extraction (:func:`~clamp2.extraction.core.mert_array_problem`): what the reference
    trains on is read the same, float16 and integers as float32.
    """
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:  # not a .npy file, truncated header, pickled objects
        return f"cannot read {path} as a .npy array ({exc})"
    problem = mert_array_problem(array.shape, array.dtype, width)
    return f"{path}: {problem} (extract_mert.py writes MERT features)" if problem else None


class AudioMusic:
    """MERT feature files → CLaMP 3 audio rows (SPEC_CLAMP3 §15, §17): a zero row, one row per 5-s segment,
    a zero row; longer than MAX_AUDIO_LENGTH → a head, tail or middle window in training (uniform),
    the head in evaluation. Evaluation reads the first file."""

    extensions = AUDIO_EXTENSIONS
    kind = "a .npy file of MERT features"
    pad_value = 0.0

    def __init__(self, width: int, max_length: int):
        self.width, self.max_length = width, max_length

    def check(self, path: Path) -> Optional[str]:
        return audio_array_problem(path, self.width)

    @staticmethod
    def eval_path(paths: Sequence[Path]) -> Path:
        return paths[0]

    def load(self, path: Path, training: bool, rng: random.Random) -> torch.Tensor:
        try:
            array = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise DataError(f"cannot read the audio features {path}: {exc}") from exc
        # The shape may have changed since the check before training; the values are read only now.
        problem = mert_array_problem(array.shape, array.dtype, self.width) or mert_values_problem(array)
        if problem:
            raise DataError(f"{path}: {problem}")
        rows = np.ascontiguousarray(array.reshape(-1, self.width), dtype=np.float32)
        zero = torch.zeros(1, self.width)
        rows = torch.cat([zero, torch.from_numpy(rows), zero])
        if len(rows) > self.max_length:
            mode = rng.choice(TRUNCATE_MODES) if training else "head"
            first = truncate(range(len(rows)), self.max_length, mode, rng)[0]
            rows = rows[first:first + self.max_length]
        return rows


def music_source(music) -> Any:
    """An M3Patchilizer stands for :class:`SymbolicMusic` (CLaMP 2's callers pass one)."""
    return SymbolicMusic(music) if isinstance(music, M3Patchilizer) else music


class TextMusicDataset(Dataset):
    """Pairs → (text token ids, music: patches or audio rows), unpadded: the collator pads.

    ``music`` is a music source (:class:`SymbolicMusic`, :class:`AudioMusic`) or an M3Patchilizer;
    ``train_text``/``eval_text`` are the text rule (CLaMP 2's by default, CLaMP 3's
    :func:`clamp3_training_text`/:func:`clamp3_eval_text`).
    """

    def __init__(self, items: Sequence[PairItem], tokenizer, music, max_text_length: int,
                 training: bool, text_dropout: bool = True, seed: int = 42,
                 train_text: Callable = training_text, eval_text: Callable = eval_text):
        self.items = list(items)
        self.tokenizer = tokenizer
        self.music = music_source(music)
        self.max_text_length = max_text_length
        self.training = training
        self.text_dropout = text_dropout
        self.seed = seed
        self.epoch = 0
        self.train_text, self.eval_text = train_text, eval_text

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.items)

    def text_ids(self, text: str, rng: random.Random) -> List[int]:
        # verbose=False: long lyrics would otherwise warn about the model's maximum length every time.
        ids = self.tokenizer(text, add_special_tokens=True, verbose=False)["input_ids"]
        if len(ids) > self.max_text_length:
            mode = rng.choice(TRUNCATE_MODES) if self.training else "head"
            ids = truncate(ids, self.max_text_length, mode, rng)
        return ids

    def __getitem__(self, index: int) -> Dict[str, torch.Tensor]:
        item = self.items[index]
        rng = sample_rng(self.seed, "train" if self.training else "eval", self.epoch if self.training else 0, index)
        if self.training and self.text_dropout:
            text = self.train_text(item.fields, self.tokenizer.sep_token, rng)
        else:
            text = self.eval_text(item.fields)
        text_ids = self.text_ids(text, rng)
        path = rng.choice(item.music_paths) if self.training else self.music.eval_path(item.music_paths)
        return {"text_ids": torch.tensor(text_ids, dtype=torch.long),
                "music_patches": self.music.load(path, self.training, rng)}


@dataclass(frozen=True)
class TextMusicCollator:
    """Pad texts and music to the fixed maxima (the reference) or to the batch's longest sample.

    Padded positions are masked out everywhere, so both give the same numbers (SPEC §8); the
    longest-sample padding only saves compute. Music is patches (``[L, patch_size]`` ids, padded
    with pad patches) or audio rows (``[L, width]`` floats, padded with zero rows: ``music_pad``
    0.0); ``music_length`` is PATCH_LENGTH or MAX_AUDIO_LENGTH.
    """

    text_pad_id: int
    max_text_length: int
    music_length: int
    patch_size: int  # the size of one music position: PATCH_SIZE ids or AUDIO_HIDDEN_SIZE values
    pad_to_longest: bool = False
    music_pad: float = PAD_TOKEN_ID

    def __call__(self, samples: Sequence[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        texts = [s["text_ids"] for s in samples]
        music = [s["music_patches"] for s in samples]
        text_length = max(len(t) for t in texts) if self.pad_to_longest else self.max_text_length
        music_length = max(len(m) for m in music) if self.pad_to_longest else self.music_length
        text_inputs = torch.full((len(samples), text_length), self.text_pad_id, dtype=torch.long)
        text_masks = torch.zeros(len(samples), text_length)
        music_inputs = torch.full((len(samples), music_length, self.patch_size), self.music_pad, dtype=music[0].dtype)
        music_masks = torch.zeros(len(samples), music_length)
        for row, (text, patches) in enumerate(zip(texts, music)):
            text_inputs[row, :len(text)] = text
            text_masks[row, :len(text)] = 1
            music_inputs[row, :len(patches)] = patches
            music_masks[row, :len(patches)] = 1
        return {"text_inputs": text_inputs, "text_masks": text_masks, "music_inputs": music_inputs,
                "music_masks": music_masks}


# -- which samples each process takes --------------------------------------------------------------

class TrainBatches(Sampler):
    """This process's part of every full global batch of a fresh permutation per epoch.

    Epoch e shuffles the n samples with a generator seeded ``seed + e``; global batch k is
    ``order[k·G:(k+1)·G]`` with G = batch_size × world_size, and rank r takes the slice
    ``[r·B:(r+1)·B]`` of it. Only the incomplete last global batch is dropped (other samples each
    epoch, so every sample is seen), and one process with batch G sees the same global batches as
    W processes with batch G/W.
    """

    def __init__(self, num_samples: int, batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 42):
        self.num_samples, self.batch_size, self.world_size, self.rank = num_samples, batch_size, world_size, rank
        self.seed = seed
        self.epoch = 0

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples // self.global_batch

    def __iter__(self) -> Iterator[List[int]]:
        generator = torch.Generator()
        generator.manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        for start in range(0, len(self) * self.global_batch, self.global_batch):
            first = start + self.rank * self.batch_size
            yield order[first:first + self.batch_size]


def eval_plan(num_samples: int, batch_size: int, world_size: int = 1) -> List[List[int]]:
    """How many samples each rank evaluates in each global batch, e.g. ``[[2, 2]]`` for 4 on 2 ranks.

    The eval set, in its order, is cut into global batches of batch_size × world_size samples,
    the last one partial; a global batch is split into contiguous parts, one per rank, whose sizes
    differ by at most one (all ``batch_size`` in a full batch). Every sample is evaluated once, and
    every rank takes part in every global batch, even with nothing to evaluate in it.
    """
    global_batch = batch_size * world_size
    plan = []
    for start in range(0, num_samples, global_batch):
        base, extra = divmod(min(global_batch, num_samples - start), world_size)
        plan.append([base + (1 if rank < extra else 0) for rank in range(world_size)])
    return plan


class EvalBatches(Sampler):
    """This process's non-empty parts of the global batches of :func:`eval_plan`."""

    def __init__(self, num_samples: int, batch_size: int, world_size: int = 1, rank: int = 0):
        self.plan = eval_plan(num_samples, batch_size, world_size)
        self.rank = rank

    def __len__(self) -> int:
        return sum(1 for counts in self.plan if counts[self.rank])

    def __iter__(self) -> Iterator[List[int]]:
        start = 0
        for counts in self.plan:
            first = start + sum(counts[:self.rank])
            if counts[self.rank]:
                yield list(range(first, first + counts[self.rank]))
            start += sum(counts)
