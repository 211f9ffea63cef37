"""What the features of an extraction output folder were computed with: ``<output_dir>/extraction_settings.json``.

Extraction skips existing outputs, so that a re-run resumes. Without a record of the settings, a re-run
with other weights, another flag (``--normalize``/``--get_global``, ``--all_layers``) or another precision
skipped every feature already there and reported success: the folder then mixed two kinds of features under
one name (the reference does the same). So the first run of a folder writes what its features depend on,
and a later run with other settings stops, naming what differs, unless ``--overwrite`` recomputes them all.

- no record, no features yet: the record is written, then the run extracts;
- no record, features there (an older version of this package, or the reference, wrote them): they are kept,
  said once; this run's settings are recorded from now on; unless one of them (``outputs_exist`` returns it) is
  global ``[1, D]`` and this run per-position ``[1, L, D]`` or the reverse: refused as other settings are;
- the same settings: the run resumes;
- other settings: refused (exit 2), or with ``--overwrite`` every file is extracted again, and the record is
  replaced only once every process has finished its share (a run killed half-way leaves the old record, so the
  next run is refused again, not mixed; over features that had no record, "unknown" is recorded meanwhile). An
  input that fails under the new settings loses its old feature.

What does not change a feature is not recorded: batch sizes, workers, attention kernel, ``--compile``.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Optional

RECORD_NAME = "extraction_settings.json"
RECORD_FORMAT = 1
# What only some inputs' features depend on (clamp3_embd: MERT for audio files, the captioner for images): the
# first run that uses it adds it to the record; a run without it (another modality into the same folder) is not
# refused for it.
OPTIONAL_KEYS = ("mert_sha256", "captioner_sha256")
# How a setting is named in the refusal; keys not listed are shown as they are.
# Recorded while --overwrite replaces features that had no record: a run stopped half-way is refused, not resumed.
UNKNOWN = {"features": "unknown (extracted before the folder had a record)"}
LABELS = {"tool": "tool", "weights_sha256": "weights (sha256)", "features": "features", "dtype": "precision",
          "text_sha256": "text model (sha256)", "windows": "window lengths", "mert_sha256": "MERT (sha256)",
          "captioner_sha256": "image captioner (sha256)", "config_sha256": "model configuration (sha256)"}


@dataclass
class RecordPlan:
    """What the record asks of this run (the same in every process: rank 0 decides, the others are told)."""
    problem: Optional[str] = None   # refused: the exit-2 line
    note: Optional[str] = None      # said once, then the run goes on
    write_first: bool = False       # no record yet: written before extracting
    replacing: bool = False         # other settings under --overwrite: written once every share is done
    unknown_first: bool = False     # --overwrite over unrecorded features: UNKNOWN recorded until then
    settings: Optional[Dict[str, Any]] = None


def read_record(output_dir: str | os.PathLike) -> Optional[Dict[str, Any]]:
    """The recorded settings, ``None`` without a record; ``ValueError`` naming the file when it cannot be read."""
    path = Path(output_dir) / RECORD_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        record = json.loads(text)
        settings = record["settings"]
        if not isinstance(settings, dict):
            raise TypeError("settings is not an object")
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"cannot read {path}: not a settings record ({exc})") from None
    return settings


def _shown(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text[:12] + "…" if isinstance(value, str) and len(value) == 64 else text  # a sha256: its start


def differences(recorded: Dict[str, Any], settings: Dict[str, Any]) -> str:
    keys = [key for key in settings if recorded.get(key) != settings[key]]
    keys += [key for key in recorded if key not in settings]
    return "; ".join(f"{LABELS.get(key, key)}: {_shown(recorded.get(key, '-'))} then, {_shown(settings.get(key, '-'))}"
                     " now" for key in keys)


def plan_record(output_dir: str | os.PathLike, settings: Dict[str, Any], overwrite: bool,
                outputs_exist: Callable[[], Any]) -> RecordPlan:
    """Compare this run's ``settings`` with ``output_dir``'s record (see the module's docstring)."""
    output_dir = Path(output_dir)
    fix = "pass --overwrite to extract every file again with this run's settings, or choose another output folder"
    try:
        recorded = read_record(output_dir)
    except ValueError as exc:
        if overwrite:
            return RecordPlan(replacing=True, settings=settings)
        return RecordPlan(problem=f"{exc}; it records what the features there were extracted with: {fix} "
                                  "(or remove it if you know they match this run's settings)")
    if recorded is not None:  # a run without an optional key keeps the recorded one
        settings = {**{key: value for key, value in recorded.items() if key in OPTIONAL_KEYS}, **settings}
    if recorded == settings:
        return RecordPlan(settings=settings)
    if recorded is not None and set(settings) - set(recorded) <= set(OPTIONAL_KEYS) and \
            all(recorded[key] == settings[key] for key in recorded):
        return RecordPlan(write_first=True, settings=settings)  # the first run whose inputs depend on one adds it
    if recorded is None:
        note = None
        existing = outputs_exist()
        if existing and overwrite:  # until every share is done, the folder holds features of unknown settings
            return RecordPlan(replacing=True, unknown_first=True, settings=settings)
        clash = _shape_clash(existing, settings) if existing else None
        if clash:
            return RecordPlan(problem=f"{output_dir} holds features with no record of the settings they were extracted "
                                      f"with, and {clash}; a re-run would mix the two: {fix}", settings=settings)
        if existing:
            note = (f"note: the features already in {output_dir} have no record of the settings they were extracted "
                    f"with; they are kept (--overwrite extracts them again), and {RECORD_NAME} records this run's")
        return RecordPlan(note=note, write_first=True, settings=settings)
    if overwrite:
        return RecordPlan(replacing=True, settings=settings)
    return RecordPlan(problem=f"{output_dir} holds features extracted with other settings "
                              f"({differences(recorded, settings)}); a re-run would mix the two: {fix}",
                      settings=settings)


# The number of dimensions each kind of feature file has ([1, D] and [1, L, D]).
_NDIM = {"global": 2, "per-position": 3}


def _shape_clash(existing: Any, settings: Dict[str, Any]) -> Optional[str]:
    """Why a feature found in a folder without a record cannot be of this run's kind, or None (also when it cannot
    tell): a folder an older version filled with global features, re-run per-position, would be recorded as
    per-position and mix the two."""
    expected = _NDIM.get(settings.get("features"))
    if expected is None or not isinstance(existing, (str, os.PathLike)):
        return None
    import numpy as np

    try:
        shape = np.load(existing, mmap_mode="r").shape
    except (OSError, ValueError):
        return None
    if len(shape) == expected:
        return None
    kind = {2: "global [1, D]", 3: "per-position [1, L, D]"}.get(len(shape), f"of shape {list(shape)}")
    return (f"{Path(existing).name} there is {kind} {list(shape)} while this run extracts "
            f"{settings['features']} features")


def write_record(output_dir: str | os.PathLike, settings: Dict[str, Any]) -> None:
    from ..provenance import written_by
    from ..files import atomic_write_text

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    record = {"format": RECORD_FORMAT, "settings": settings, "written_by": written_by()}
    atomic_write_text(output_dir / RECORD_NAME, json.dumps(record, indent=2, sort_keys=True) + "\n")


def begin_record(output_dir: Path, settings: Callable[[], Dict[str, Any]], overwrite: bool,
                 outputs_exist: Callable[[], Any], process_index: int = 0) -> RecordPlan:
    """Every process: rank 0 computes the settings (hashing the weights once), decides and tells the others;
    writes a missing record and says the note; a record that cannot be written is the plan's problem."""
    import torch.distributed as dist

    from ..distributed import broadcast_object

    told = dist.is_available() and dist.is_initialized()  # else each process decides (the same) alone
    plan = None
    if process_index == 0 or not told:
        plan = plan_record(output_dir, settings(), overwrite, outputs_exist)
    if process_index == 0:
        if (plan.write_first or plan.unknown_first) and not plan.problem:
            try:
                write_record(output_dir, UNKNOWN if plan.unknown_first else plan.settings)
            except OSError as exc:
                plan.problem = f"cannot write {Path(output_dir) / RECORD_NAME}: {exc.strerror or exc}"
        if plan.note and not plan.problem:
            print(plan.note, file=sys.stderr)
    return broadcast_object(plan) if told else plan


def drop_stale_features(plan: RecordPlan, failed_outputs: Iterable[Path]) -> None:
    """Under ``replacing``: the feature an input had under the old settings goes when the input fails now (each
    process its own files, before the end barrier)."""
    if plan.replacing:
        for output in failed_outputs:
            try:
                Path(output).unlink(missing_ok=True)
            except OSError as exc:
                print(f"warning: cannot remove {output} (a feature of the earlier settings whose input failed now): "
                      f"{exc.strerror or exc}; remove it by hand", file=sys.stderr)


def finish_record(plan: RecordPlan, output_dir: Path, every_share_done: bool, process_index: int = 0) -> None:
    """After the end barrier: under ``replacing``, rank 0 records the new settings once every process has done its
    share. ``OSError`` when it cannot be written."""
    if plan.replacing and every_share_done and process_index == 0:
        write_record(output_dir, plan.settings)
