"""Feature extraction (SPEC §8): windows, their combination, and a fast batched driver.

A file's feature depends on the file alone. Windows are consecutive slices of the model's maximum
length (the last one replaced by the final full-length slice); the reference runs every window
alone, padded to the maximum. Here windows of many files are sorted by length and run together,
padded only to the longest in their batch; padded positions are masked, so the numbers are the
same (tests check this within 1e-5). A batch holds ``batch_size`` windows, or with ``batch_tokens``
as many as fit that many padded positions (short windows then share a pass by the hundred). On CUDA
the inputs go through pinned host memory with asynchronous copies, and a batch's outputs are fetched
only after the next batch is queued, so copies and host work overlap the model's compute.
"""

from __future__ import annotations

import io
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from unidecode import unidecode

from ..attention import Autocast, ExactFloat32, keep_overrides_eager
from ..distributed import (before_process_group, end_with_launcher, env_int, launched_by_a_launcher,
                           others_finish_first, prepare_end_barrier, wait_for_all_processes)
from ..files import (DiskFull, atomic_write_bytes, disk_full_error, find_files, finished_output, mirror_outputs,
                     mirror_path, remove_partial_files_of, say_disk_full, write_file_log)
from ..patchilizer import MTF_FIRST_WORD, M3Patchilizer, split_lines
from ..workers import exit_with_parent

TEXT_EXTENSIONS = (".txt",)
MUSIC_EXTENSIONS = (".abc", ".mtf")
AUDIO_EXTENSIONS = (".npy",)  # MERT features (SPEC_CLAMP3 §15)


class InputError(ValueError):
    """A file that cannot be turned into model input (empty, undecodable, no content)."""


# -- windows -------------------------------------------------------------------------------------

def window_starts(length: int, max_length: int) -> List[int]:
    """Start of each window: consecutive slices, the last replaced by the final full-length slice."""
    if length <= max_length:
        return [0]
    starts = list(range(0, length, max_length))
    starts[-1] = length - max_length
    return starts


def window_weights(length: int, max_length: int) -> List[int]:
    """Weights of the windows' global features: max length each, the remainder for the last."""
    full, remainder = divmod(length, max_length)
    if length <= max_length:
        return [max(length, 1)]
    return [max_length] * full + ([remainder] if remainder else [])


def combine_global(window_features: torch.Tensor, length: int, max_length: int) -> torch.Tensor:
    """Weighted mean of per-window global features [W, H] → [H]."""
    weights = torch.tensor(window_weights(length, max_length), dtype=window_features.dtype).view(-1, 1)
    return (window_features * weights).sum(dim=0) / weights.sum()


def combine_positions(window_states: Sequence[torch.Tensor], length: int, max_length: int) -> torch.Tensor:
    """Per-position states of the whole sequence [L, H]; the last window gives only new positions."""
    remainder = length % max_length
    parts = list(window_states)
    if len(parts) > 1 and remainder:
        parts[-1] = parts[-1][-remainder:]
    return torch.cat(parts, dim=0)


# -- reading files -------------------------------------------------------------------------------

def read_text_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"not UTF-8 text ({exc.reason} at byte {exc.start}); re-save it as UTF-8") from None


def text_lines(text: str) -> List[str]:
    """Non-empty lines, de-duplicated in first-occurrence order (the reference's set order is random)."""
    seen = dict.fromkeys(line for line in text.split("\n") if line)
    return list(seen)


class TextEncoder:
    """``.txt`` → token ids: lines joined with the tokenizer's sep token, special tokens added."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, path: Path) -> torch.Tensor:
        return self.encode_text(read_text_file(path))

    def encode_text(self, text: str) -> torch.Tensor:
        """The ids of a text as a ``.txt`` file holding it gives them."""
        lines = text_lines(text)
        if not lines:
            raise InputError("no non-empty line of text")
        joined = self.tokenizer.sep_token.join(lines)
        # verbose=False: a long text is windowed here, so the tokenizer's length warning is noise.
        ids = self.tokenizer(joined, verbose=False)["input_ids"]
        return torch.tensor(ids, dtype=torch.long)


class MusicEncoder:
    """``.abc``/``.mtf`` → patches [N, patch_size] with special patches, no truncation.

    ``remove_unit_length`` drops ``L:1/8\\n`` from ABC first (M3 extraction does, CLaMP 2 does not);
    with ``also_mtf`` from MTF too (CLaMP 3 removes it from every file, SPEC_CLAMP3 §13).
    """

    def __init__(self, patchilizer: M3Patchilizer, remove_unit_length: bool = False, also_mtf: bool = False):
        self.patchilizer = patchilizer
        self.remove_unit_length = remove_unit_length
        self.also_mtf = also_mtf

    def __call__(self, path: Path) -> torch.Tensor:
        return self.encode_text(read_text_file(path))

    def encode_text(self, text: str) -> torch.Tensor:
        """The patches of interleaved ABC or MTF text, as a file holding it gives them."""
        # The reference's test, a plain prefix (the patchilizer's own MTF test is the first word).
        if self.remove_unit_length and (self.also_mtf or not text.startswith(MTF_FIRST_WORD)):
            text = text.replace("L:1/8\n", "")
        given = text
        if not text.isascii():
            text = unidecode(text)  # what the patchilizer does first; once here, its own call is then a no-op
        # Empty once transliterated to ASCII (a byte-order mark alone, emoji only): the reference crashes
        # in encode, as on an empty file. Non-empty ASCII text always has a line.
        if not text or (not given.isascii() and not split_lines(text)):
            raise InputError("empty music file" + (" (after removing L:1/8)" if self.remove_unit_length else "")
                             + (" (nothing left in ASCII)" if given else ""))
        # uint8 (ASCII ids) changes nothing on the model side but makes the host→device copy 8× smaller.
        return torch.from_numpy(self.patchilizer.encode_array(text, add_special_patches=True))


def mert_array_problem(shape: Sequence[int], dtype: np.dtype, width: int) -> Optional[str]:
    """Why an array of this shape and dtype is not CLaMP 3 audio input (MERT features), or None.

    The reference reads any array as rows, ``reshape(-1, width)``, between two float32 zero rows:
    ``torch.cat`` promotes float16 and integer arrays to float32 (read so here), but float64 or
    complex ones to types its float32 model refuses. A leading dimension other than 1 holds every
    MERT layer's states, which the reference would silently read as more segments (SPEC_CLAMP3 §15).
    Extraction and training share this rule.
    """
    dtype = np.dtype(dtype)
    if dtype.hasobject or dtype.kind not in "fiuc":
        return "not a numeric array of MERT features"
    if len(shape) == 0:
        return f"a scalar, not MERT features [1, n, {width}]"
    if shape[-1] != width:
        return (f"last dimension {shape[-1]}, but the audio encoder takes {width}-wide MERT features "
                f"(array shape {list(shape)})")
    if any(size != 1 for size in shape[:-2]):
        return (f"array shape {list(shape)}: expected [1, n, {width}], the mean over MERT's layers "
                "(process_data/extract_mert.py without --all_layers; the reference's --mean_features)")
    if dtype.kind == "c" or (dtype.kind == "f" and dtype.itemsize > 4):
        return f"{dtype} array: MERT features are float32 (save them with .astype(np.float32))"
    return None


def mert_values_problem(array: np.ndarray) -> Optional[str]:
    """Why the values of a MERT feature array are not usable (NaN or infinite), or None.

    Such a value makes every feature of the file NaN (and every score against it); the reference
    writes that silently. extract_mert.py refuses audio that would produce them.
    """
    if array.dtype.kind == "f" and array.size and not np.isfinite(array).all():
        bad = int(array.size - np.isfinite(array).sum())
        return f"{bad} of its {array.size} values are NaN or infinite: the MERT features are damaged"
    return None


class AudioEncoder:
    """MERT features (``.npy``) → rows [n + 2, width]: one all-zero row before and one after (SPEC_CLAMP3 §15).

    The array is read as ``[-1, width]`` float32; :func:`mert_array_problem` says which arrays are
    refused and why (float64, another width, every layer's states ``[13, n, 768]`` from the
    reference's extract_mert.py without ``--mean_features`` or ours with ``--all_layers``).
    """

    def __init__(self, width: int):
        self.width = int(width)

    def __call__(self, source) -> torch.Tensor:
        try:
            array = np.load(source, allow_pickle=False)
        except PermissionError as exc:  # a file this user may not read (chmod 000) is not a damaged array
            raise InputError(f"cannot read the file: {exc.strerror or exc}") from None
        except (ValueError, OSError, EOFError) as exc:
            raise InputError(f"not a NumPy .npy array ({' '.join(str(exc).split())})") from None
        return self.encode_array(array)

    def encode_array(self, array: np.ndarray) -> torch.Tensor:
        """The rows of a MERT feature array as a ``.npy`` file holding it gives them."""
        if not isinstance(array, np.ndarray):
            raise InputError("not a numeric array of MERT features")
        problem = mert_array_problem(array.shape, array.dtype, self.width) or mert_values_problem(array)
        if problem:
            raise InputError(problem)
        rows = array.reshape(-1, self.width).astype(np.float32, copy=False)
        zero = np.zeros((1, self.width), dtype=np.float32)
        return torch.from_numpy(np.concatenate([zero, rows, zero]))


# -- jobs ----------------------------------------------------------------------------------------

@dataclass
class Job:
    path: Path
    output: Path
    kind: str  # a KindRunner's key: "text", "music" (CLaMP 2/M3); "text", "symbolic", "audio" (CLaMP 3)


@dataclass
class Plan:
    jobs: List[Job] = field(default_factory=list)
    skipped: List[Path] = field(default_factory=list)
    failures: List[Tuple[Path, str]] = field(default_factory=list)


def kinds_of_extensions(include_text: bool) -> Dict[str, str]:
    """CLaMP 2 / M3 inputs: extension → kind."""
    kinds = {ext: "music" for ext in MUSIC_EXTENSIONS}
    if include_text:
        kinds.update({ext: "text" for ext in TEXT_EXTENSIONS})
    return kinds


def plan_jobs(input_dir: Path, output_dir: Path, text: bool = True, overwrite: bool = False,
              kinds: Optional[Dict[str, str]] = None) -> Plan:
    """Inputs → output paths (mirrored folders, ``.npy``); collisions are failures, existing outputs skipped.

    ``kinds`` maps extensions to runner kinds (default: music, and text when ``text``). ``.npy`` inputs
    (CLaMP 3's MERT features) in an output folder inside the input folder are left out: they are
    outputs, not inputs.
    Other inputs are taken wherever they are, as the reference takes them (the output folder may be
    the input folder, hold it, or lie inside it).
    Under several processes call it with ``overwrite=True`` (a plan that depends only on the file
    listing, identical in every process), shard ``jobs``, then :func:`skip_existing` per process:
    outputs written meanwhile by a faster process must not shift the shards.
    """
    kinds = kinds if kinds is not None else kinds_of_extensions(text)
    # As strings: a Path's .parents per input cost more than the rest of the plan together.
    # Real paths: an input or output folder named through a link (or holding the other through one) is still seen.
    outputs_prefix = os.path.join(os.path.realpath(output_dir), "")
    unsearchable: List[Tuple[Path, str]] = []
    inputs = find_files(input_dir, kinds, unsearchable)
    inputs_prefix = os.path.join(os.path.realpath(input_dir), "")
    if outputs_prefix != inputs_prefix and outputs_prefix.startswith(inputs_prefix):  # output inside the input folder
        # find_files follows no folder link, so an input's real folder is the input folder's plus its relative one.
        inputs = [path for path in inputs
                  if not (path.suffix.lower() in AUDIO_EXTENSIONS
                          and os.path.join(inputs_prefix, os.path.relpath(path, input_dir)).startswith(outputs_prefix))]
    outputs, collisions = mirror_outputs(inputs, input_dir, output_dir, ".npy")
    plan = Plan(failures=unsearchable + collisions)
    for path, output in outputs.items():
        if finished_output(output) and not overwrite:
            plan.skipped.append(path)
            continue
        plan.jobs.append(Job(path, output, kinds[path.suffix.lower()]))
    return plan


# -- batched model runs --------------------------------------------------------------------------

def _numpy_window(window) -> bool:
    return isinstance(window, np.ndarray) or (window.device.type == "cpu" and not window.requires_grad
                                              and window.dtype != torch.bfloat16)


def pad_batch(windows: Sequence[torch.Tensor | np.ndarray], pad_value: float, dtype: Optional[torch.dtype] = None,
              pin_memory: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest window; returns ids (or rows) and the 0/1 attention mask (int64) as tensors.

    Windows are tensors or NumPy arrays (what :class:`WindowStream` keeps on the host). The ids come
    as ``dtype`` (default: the windows'), both tensors in page-locked memory with ``pin_memory``.
    Host windows are padded by NumPy straight into the result: one pass, in this thread. A torch copy
    or conversion of the batch afterwards (``.pin_memory()``, ``.long()``) is a parallel region, which
    waits for a core from every thread of torch's pool: while the tokenizing workers keep the cores
    busy, that wait cost milliseconds a batch (``bench_extract.py --host_only``, 2 cores, 2 torch
    threads: most of the main process's time went to the ``.long()`` of patch ids).
    """
    lengths = [len(w) for w in windows]
    longest = max(lengths)
    if all(_numpy_window(w) for w in windows) and dtype != torch.bfloat16:  # NumPy has no bfloat16
        # Through NumPy: a slice assignment per window costs ~1 µs, where torch's pad_sequence (or indexing)
        # pays ~40 µs of dispatch per window; 12,978 short tunes are ~400 batches of 64 windows, all padded
        # on the main process (docs/performance.md, the host side).
        arrays = [w if isinstance(w, np.ndarray) else w.numpy() for w in windows]
        shape = (len(arrays), longest, *arrays[0].shape[1:])
        ids = _host_tensor(shape, dtype or torch.from_numpy(arrays[0][:0]).dtype, pin_memory)
        padded = ids.numpy()
        padded.fill(pad_value)
        for row, (array, length) in enumerate(zip(arrays, lengths)):
            padded[row, :length] = array
    else:
        ids = torch.nn.utils.rnn.pad_sequence([torch.as_tensor(w) for w in windows], batch_first=True,
                                              padding_value=pad_value)
        ids = ids.to(dtype or ids.dtype)
        ids = ids.pin_memory() if pin_memory and ids.device.type == "cpu" else ids
    masks = _host_tensor((len(lengths), longest), torch.int64, pin_memory)
    np.less(np.arange(longest)[None, :], np.asarray(lengths)[:, None], out=masks.numpy(), casting="unsafe")
    return ids, masks


def _host_tensor(shape: Tuple[int, ...], dtype: torch.dtype, pin_memory: bool) -> torch.Tensor:
    """An uninitialised CPU tensor, page-locked with ``pin_memory`` (PyTorch caches those blocks)."""
    return torch.empty(shape, dtype=dtype, pin_memory=pin_memory)


def plan_batches(lengths: Sequence[int], batch_size: int, batch_tokens: int = 0) -> List[List[int]]:
    """Indices of the windows of each forward pass, longest windows first.

    Sorted by length, so each batch pads little. ``batch_tokens`` > 0 sizes batches by padded
    positions instead of by count: a batch takes windows while (its windows) × (its longest) ≤
    ``batch_tokens``, and holds at least one window; ``batch_size`` is then not a limit.
    """
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    if batch_tokens <= 0:
        return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    batches: List[List[int]] = []
    for i in order:
        # The first window of a batch is its longest: it sets the padded length.
        if batches and (len(batches[-1]) + 1) * max(lengths[batches[-1][0]], 1) <= batch_tokens:
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


def launch_batch(windows: Sequence[torch.Tensor], forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 pad_value: float, device: torch.device, dtype: torch.dtype = torch.long,
                 times: Optional["HostTimes"] = None) -> torch.Tensor:
    """Pad ``windows`` into one batch, copy it to ``device`` and run ``forward``; on CUDA it returns queued.

    ``times``, if given, gains the seconds spent padding and in the copies and ``forward`` call."""
    padding = time.perf_counter()
    if device.type == "cuda":
        # Pinned pages let the copy run asynchronously, behind the previous batch's compute; the ids travel
        # in their own (small) dtype and are converted on the device.
        ids, masks = pad_batch(windows, pad_value, pin_memory=True)
    else:
        ids, masks = pad_batch(windows, pad_value, dtype=dtype)
    launch = time.perf_counter()
    if times is not None:
        times.padding += launch - padding
    ids = ids.to(device, non_blocking=True).to(dtype)
    masks = masks.to(device, non_blocking=True)
    result = forward(ids, masks)
    if times is not None:
        times.forward += time.perf_counter() - launch
    return result


@dataclass
class HostTimes:
    """Where an extraction's main process spent its wall time, in seconds: what bounds short pieces.

    The main process plans batches, pads them and launches the model, gathers each batch's outputs
    into files' features and hands those to the writer threads; tokenizing runs in worker processes
    and writing in threads. Its time splits into:

    - ``workers``: waiting for the tokenizing workers' next task (their start-up included);
    - ``padding``: padding windows into batches;
    - ``forward``: in the model's forward calls (the compute itself on the CPU; the kernel launches
      and input copies on CUDA, where the call returns before the device is done);
    - ``device``: waiting for a batch's outputs to reach host memory (on CUDA: the device is behind);
    - ``writers``: waiting for the writer threads, which hold at most a few chunks' features;
    - the rest (``other``): planning, gathering, combining windows, bookkeeping, the caller's work.

    A host-bound run (``bench_extract.py --host_only`` on short pieces) spends its time in ``other``,
    ``padding`` and ``workers``/``writers``; a device-bound one in ``device`` (CUDA) or ``forward`` (CPU).
    """

    total: float = 0.0
    workers: float = 0.0
    padding: float = 0.0
    forward: float = 0.0
    device: float = 0.0
    writers: float = 0.0

    WAITS = ("workers", "padding", "forward", "device", "writers")

    @property
    def other(self) -> float:
        return max(0.0, self.total - sum(getattr(self, name) for name in self.WAITS))

    def summary(self) -> str:
        """``"main process: workers 41%, padding 3%, …, other 20% of 2.50 s"``."""
        if self.total <= 0:
            return "main process: no time measured"
        shares = ", ".join(f"{name} {getattr(self, name) / self.total:.0%}" for name in self.WAITS + ("other",))
        return f"main process: {shares} of {self.total:.2f} s"


class HostCopy:
    """A batch's output, copied to host memory (float32) as soon as the device has computed it.

    The copy is queued right behind the batch that makes it: fetching ``.cpu()`` later would queue
    it behind the batches launched since, and wait for those too, leaving the device idle while
    the host gathers. On CUDA it goes into pinned memory, asynchronously; :meth:`wait` blocks
    only until this copy is done. On the CPU it is the tensor itself.
    """

    __slots__ = ("host", "done")

    def __init__(self, result: torch.Tensor):
        result = result.float()
        self.done = None
        if result.device.type == "cuda":
            self.host = torch.empty(result.shape, dtype=result.dtype, pin_memory=True)
            self.host.copy_(result, non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record()
        else:
            self.host = result.cpu()

    def wait(self) -> torch.Tensor:
        if self.done is not None:
            self.done.synchronize()
        return self.host


@dataclass
class KindRunner:
    """How one input kind (text, music, audio) is encoded and run.

    ``encode`` gives a sequence ``[n, ...]``; windows of ``max_length`` are padded with ``pad_value``
    and handed to ``forward`` as ``dtype`` (ids: long; MERT rows: float32).
    """

    encode: Callable[[Path], torch.Tensor]
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    max_length: int
    pad_value: float
    dtype: torch.dtype = torch.long


def compile_runners(runners: Dict[str, KindRunner], backend: str = "inductor") -> Dict[str, KindRunner]:
    """The runners with their forward passes through ``torch.compile`` (``--compile``).

    Dynamic shapes: batches come in every length up to the maximum, and a static graph per length
    would recompile at each new one. Padded positions stay masked, so the features are the
    uncompiled ones up to rounding. The first batches of each kind pay the compilation (tens of
    seconds): worth it for long runs on a GPU.
    """
    import dataclasses

    keep_overrides_eager()  # the fp32 context's process-wide switch, outside the graphs
    return {kind: dataclasses.replace(runner, forward=torch.compile(runner.forward, dynamic=True, backend=backend))
            for kind, runner in runners.items()}


def file_feature(outputs: Sequence[torch.Tensor | np.ndarray], length: int, max_length: int,
                 per_position: bool) -> np.ndarray:
    """A file's ``[1, ...]`` float32 feature from its windows' outputs (:func:`combine_global` / ``_positions``);
    outputs are CPU tensors or NumPy arrays."""
    if len(outputs) == 1:
        # Most short pieces have one window: the same arithmetic in numpy, without torch's per-call cost.
        feature = outputs[0] if isinstance(outputs[0], np.ndarray) else outputs[0].numpy()
        if per_position:
            feature = feature.copy()  # a view of the whole padded batch otherwise: keep only this file's rows
        else:
            weight = np.float32(window_weights(length, max_length)[0])
            feature = (feature * weight) / weight  # combine_global's rounding: the sum of one term is exact
        return feature[np.newaxis].astype(np.float32, copy=False)
    outputs = [torch.from_numpy(o) if isinstance(o, np.ndarray) else o for o in outputs]
    if per_position:
        feature = combine_positions(outputs, length, max_length)
    else:
        feature = combine_global(torch.stack(outputs), length, max_length)
    return feature.unsqueeze(0).numpy().astype(np.float32, copy=False)


class _OpenFile:
    """A file whose windows are in flight: their outputs so far, and how many are still to come."""

    __slots__ = ("outputs", "remaining", "length", "max_length")

    def __init__(self, windows: int, length: int, max_length: int):
        self.outputs: List[Optional[np.ndarray]] = [None] * windows
        self.remaining = windows
        self.length = length
        self.max_length = max_length


class WindowStream:
    """Runs files' windows in batches as the files arrive; gives each file's feature once its windows are done.

    :meth:`add` plans a group of files' windows (:func:`plan_batches`, per kind) and launches their
    batches; a batch's outputs are fetched only after the next batch is launched, across groups
    too, so on CUDA the device always has queued work while the host gathers outputs, pads the next
    batch or takes the next chunk of files. :meth:`finish` fetches what is still queued. Both return
    ``(index, feature, None)`` of the files completed, features as :func:`file_feature` gives them.
    """

    def __init__(self, runners: Dict[str, KindRunner], device: torch.device, per_position: bool,
                 batch_size: int = 16, batch_tokens: int = 0, times: Optional[HostTimes] = None):
        self.runners = runners
        self.device = device
        self.per_position = per_position
        self.batch_size = batch_size
        self.batch_tokens = batch_tokens
        self.open_files: Dict[int, _OpenFile] = {}
        self.queued: Optional[Tuple[list, HostCopy]] = None
        self.times = times if times is not None else HostTimes()

    def add(self, encoded: Dict[int, torch.Tensor | np.ndarray],
            kinds: Sequence[str]) -> List[Tuple[int, np.ndarray, None]]:
        """Launch the windows of ``encoded`` (index → ids; ``kinds[index]`` its runner's key)."""
        done: List[Tuple[int, np.ndarray, None]] = []
        # Returned as a list, never yielded from inside: inference mode must not leak to a caller's generator.
        with torch.inference_mode():
            for kind, runner in self.runners.items():
                windows = []  # (file index, window slot, ids)
                for i, ids in encoded.items():
                    if kinds[i] != kind:
                        continue
                    # NumPy on the host: len() and slicing cost ~0.2 µs there, ~2-3 µs on a tensor, several
                    # times per file (thousands of short tunes a second pass through here).
                    if isinstance(ids, torch.Tensor) and _numpy_window(ids):
                        ids = ids.numpy()
                    length = len(ids)
                    starts = window_starts(length, runner.max_length)
                    self.open_files[i] = _OpenFile(len(starts), length, runner.max_length)
                    windows += [(i, slot, ids[start:start + runner.max_length]) for slot, start in enumerate(starts)]
                for batch in plan_batches([len(w[2]) for w in windows], self.batch_size, self.batch_tokens):
                    members = [windows[j] for j in batch]
                    result = HostCopy(launch_batch([w[2] for w in members], runner.forward, runner.pad_value,
                                                   self.device, runner.dtype, self.times))
                    # Fetching waits for the device: fetch the previous batch now that this one is queued.
                    if self.queued is not None:
                        done += self._collect(*self.queued)
                    self.queued = (members, result)
        return done

    def finish(self) -> List[Tuple[int, np.ndarray, None]]:
        """Fetch the batch still queued; every file added so far is then complete."""
        done: List[Tuple[int, np.ndarray, None]] = []
        if self.queued is not None:
            with torch.inference_mode():
                done = self._collect(*self.queued)
            self.queued = None
        return done

    def _collect(self, members: list, result: HostCopy) -> List[Tuple[int, np.ndarray, None]]:
        waiting = time.perf_counter()
        result = result.wait().numpy()  # float32 host memory: rows are NumPy views, no torch call per file
        self.times.device += time.perf_counter() - waiting
        done = []
        for row, (i, slot, ids) in enumerate(members):
            open_file = self.open_files[i]
            open_file.outputs[slot] = result[row, : len(ids)] if self.per_position else result[row]
            open_file.remaining -= 1
            if not open_file.remaining:
                del self.open_files[i]
                done.append((i, file_feature(open_file.outputs, open_file.length, open_file.max_length,
                                             self.per_position), None))
        return done


_NPY_HEADERS: Dict[Tuple[Tuple[int, ...], str], bytes] = {}


def npy_parts(array: np.ndarray) -> Tuple[bytes, memoryview]:
    """``np.save``'s file as (header, the array's bytes): the header built once per shape, the bytes not copied."""
    array = np.ascontiguousarray(array)
    key = (array.shape, array.dtype.str)
    header = _NPY_HEADERS.get(key)
    if header is None:
        buffer = io.BytesIO()
        np.lib.format.write_array_header_1_0(buffer, np.lib.format.header_data_from_array_1_0(array))
        header = buffer.getvalue()
        if len(_NPY_HEADERS) < 1024:  # per-position features come in every length: keep the cache small
            _NPY_HEADERS[key] = header
    return header, memoryview(array.reshape(-1)).cast("B")


def npy_bytes(array: np.ndarray) -> bytes:
    """The bytes ``np.save`` writes for ``array`` (a numeric array)."""
    return b"".join(npy_parts(array))


def save_npy(path: Path, array: np.ndarray) -> None:
    atomic_write_bytes(path, *npy_parts(array))


class _EncodeDataset(torch.utils.data.Dataset):
    """Encodes files in DataLoader workers so reading/tokenizing overlaps the model's compute.

    It holds only the encoders (picklable under any start method, and no model copied into the
    workers) and returns numpy arrays: those travel by value, whereas every tensor returned by a
    worker would hold an open file descriptor until consumed (thousands with large chunks).
    """

    def __init__(self, sources: Sequence, encoders: Dict[str, Callable[[Any], torch.Tensor]]):
        # A source is a Job or a (kind, input) pair, the input being whatever that kind's encoder takes.
        self.sources = [(s.kind, s.path) if isinstance(s, Job) else tuple(s) for s in sources]
        self.encoders = encoders

    def __len__(self):
        return len(self.sources)

    def __getitem__(self, index):
        kind, source = self.sources[index]
        try:
            return index, self.encoders[kind](source).numpy(), None
        except InputError as exc:
            return index, None, str(exc)
        except Exception as exc:  # noqa: BLE001 - one bad file must never stop the batch
            return index, None, f"{type(exc).__name__}: {exc}"


def _identity(items):
    return items


def _pack_task(items):
    """A worker's task as it travels to the main process: the ids of all its files in one array.

    Unpickling a list of thousands of small arrays cost the main process ~12 µs an array (measured:
    4,096 tune windows; 44 µs on 2 busy cores), one array and its bounds ~4 µs a file, views included.
    Tasks whose arrays differ in dtype or trailing shape (text beside music) travel as they are.
    """
    arrays = [ids for _, ids, _ in items if ids is not None]
    if len(arrays) < 2 or any(a.dtype != arrays[0].dtype or a.shape[1:] != arrays[0].shape[1:] for a in arrays):
        return items
    return _PACKED, [index for index, _, _ in items], [error for _, _, error in items], \
        [len(a) if a is not None else -1 for _, a, _ in items], np.concatenate(arrays)


_PACKED = "packed"  # the first element of a packed task (a list of items never starts with a str)


def _task_items(task) -> Iterator[Tuple[int, Optional[np.ndarray], Optional[str]]]:
    """``(index, ids, error)`` of each file of a task, packed or not; packed ids are views of its one array."""
    if not task or task[0] != _PACKED:
        yield from task
        return
    _, indices, errors, lengths, packed = task
    start = 0
    for index, error, length in zip(indices, errors, lengths):
        if length < 0:
            yield index, None, error
        else:
            yield index, packed[start:start + length], None
            start += length


@dataclass
class ExtractResult:
    written: int = 0
    failures: List[Tuple[Path, str]] = field(default_factory=list)
    times: HostTimes = field(default_factory=HostTimes)


def worker_piece(files_per_chunk: int, num_workers: int) -> int:
    """Files a tokenizing worker encodes per task: a chunk's share of each worker, at least MIN_PIECE.

    A chunk is split across all the workers, so its windows are ready after ``1/num_workers`` of
    its tokenizing time and every worker is busy even when the run holds fewer chunks than workers
    (music21's 12,978 tunes in chunks of 4,096: before, 4 of 8 workers each tokenized a whole
    chunk, and the device waited for all of the first one).
    """
    if num_workers <= 1:
        return files_per_chunk
    return min(files_per_chunk, max(MIN_PIECE, -(-files_per_chunk // num_workers)))


# Smallest worker task: below it, a task's hand-off (pickling, a pipe round trip) outweighs the files.
MIN_PIECE = 16


def iter_features(sources: Sequence, runners: Dict[str, KindRunner], device: torch.device, per_position: bool,
                  batch_size: int = 16, files_per_chunk: int = 64, num_workers: int = 0,
                  batch_tokens: int = 0, times: Optional[HostTimes] = None
                  ) -> Iterator[Tuple[int, Optional[np.ndarray], Optional[str]]]:
    """``(index, feature, None)`` or ``(index, None, reason)`` for every source, in completion order.

    ``sources`` are :class:`Job` s or ``(kind, input)`` pairs; ``runners[kind].encode(input)`` gives the
    ids, in ``num_workers`` processes (tasks of :func:`worker_piece` files). Features are ``[1, H]``
    (global) or ``[1, L, H]`` (per position) float32, as saved in ``.npy``. Batches: the windows of
    each chunk of ``files_per_chunk`` consecutive sources per :func:`plan_batches` (``batch_size``
    windows, or ``batch_tokens`` padded positions), run by a :class:`WindowStream`. A chunk is the
    same set of files whatever the workers, so the features are too. ``times``, if given, gains where
    this generator waited (:class:`HostTimes`; its ``total`` is the caller's to set).
    """
    encoders = {kind: runner.encode for kind, runner in runners.items()}
    dataset = _EncodeDataset(sources, encoders)
    kinds = [kind for kind, _ in dataset.sources]
    piece = worker_piece(files_per_chunk, num_workers)
    # Two tasks per worker in flight: about the next two chunks, tokenized while the main process runs this one.
    # A generator of its own: the loader draws its workers' base seed from it, not from torch's global stream (a
    # caller's seeded run that extracted through the API drew differently afterwards). The workers draw nothing.
    loader = torch.utils.data.DataLoader(dataset, batch_size=piece, shuffle=False,
                                         num_workers=num_workers, collate_fn=_pack_task if num_workers else _identity,
                                         persistent_workers=False, prefetch_factor=2 if num_workers else None,
                                         worker_init_fn=exit_with_parent if num_workers else None,
                                         generator=torch.Generator())
    times = times if times is not None else HostTimes()
    stream = WindowStream(runners, device, per_position, batch_size, batch_tokens, times)
    encoded: Dict[int, np.ndarray] = {}
    tasks = iter(loader)  # tasks arrive in order (the DataLoader's in_order), so chunks fill one by one
    while True:
        waiting = time.perf_counter()
        task = next(tasks, None)
        times.workers += time.perf_counter() - waiting
        if task is None:
            break
        for index, ids, error in _task_items(task):
            if error is not None:
                yield index, None, error
            else:
                encoded[index] = ids
            # A chunk's last source (or the run's): its windows go to the device now, not with the next task.
            if (index + 1) % files_per_chunk == 0 or index + 1 == len(dataset):
                yield from stream.add(encoded, kinds)
                encoded = {}
    yield from stream.finish()


def default_writer_threads() -> int:
    return min(4, os.cpu_count() or 1)


def _save_group(group: Sequence[Tuple[Job, np.ndarray]]) -> List[Optional[str]]:
    """Save each feature of ``group``; per job None or why its file could not be written."""
    errors: List[Optional[str]] = []
    for job, feature in group:
        try:
            save_npy(job.output, feature)
            errors.append(None)
        except OSError as exc:
            if disk_full_error(exc) is not None:  # every later file would fail too: the run stops
                raise DiskFull(f"cannot write {job.output}: {exc.strerror}") from exc
            errors.append(f"cannot write {job.output}: {exc}")
    return errors


@contextmanager
def heap_frozen():
    """Python's cyclic garbage collector leaves the objects that exist now alone until the block ends.

    An extraction allocates millions of short-lived objects, so the collector runs hundreds of times,
    and each of its full passes walked every object of the process: the imported libraries and one
    Job (with its paths) per input. On music21's 12,978 tunes that was 0.55-0.85 s of the main
    process's 2.5-7.6 s (``gc.callbacks``, this 2-core VM); with the heap frozen, 0.02-0.06 s. The
    frozen objects are not garbage the run could free. Nothing is changed when the caller froze
    objects itself (``gc.freeze`` has one permanent generation: leaving the block would unfreeze theirs);
    the interpreter's own frozen objects (``clamp2.INTERPRETER_FROZEN``, immortal) are not a caller's.
    """
    import gc

    import clamp2

    if gc.get_freeze_count() > clamp2.INTERPRETER_FROZEN:
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def extract_jobs(jobs: Sequence[Job], runners: Dict[str, KindRunner], device: torch.device, per_position: bool,
                 batch_size: int = 16, files_per_chunk: int = 64, num_workers: int = 0,
                 on_file_done: Optional[Callable[[Job, Optional[str]], None]] = None,
                 batch_tokens: int = 0, writer_threads: Optional[int] = None) -> ExtractResult:
    """Extract and save the feature of every job; a bad file is recorded and skipped, never fatal.

    Features are saved by ``writer_threads`` threads (default up to 4), a group of files at a time,
    while the model runs: a file write is a few system calls that release the GIL, and thousands
    of short files a second would otherwise spend more time in them than on the device. Each save
    is atomic; an interrupted run waits for the saves in progress, so it never leaves a partial
    ``.npy``. ``on_file_done`` is called in this thread, once per job, when its feature is on disk
    or it has failed. The result's ``times`` says where this thread spent the run (:class:`HostTimes`).
    """
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    result = ExtractResult()

    def done(job, error):
        if error is not None:
            result.failures.append((job.path, error))
        else:
            result.written += 1
        if on_file_done:
            on_file_done(job, error)

    def settle(group, future):
        waiting = time.perf_counter()
        errors = future.result()
        result.times.writers += time.perf_counter() - waiting
        for (job, _), error in zip(group, errors):
            done(job, error)

    threads = writer_threads or default_writer_threads()
    saving: deque = deque()  # (group, future) in submission order
    group: List[Tuple[Job, np.ndarray]] = []
    started = time.perf_counter()
    with heap_frozen(), ThreadPoolExecutor(max_workers=threads, thread_name_prefix="save_npy") as pool:
        for index, feature, error in iter_features(jobs, runners, device, per_position, batch_size=batch_size,
                                                   files_per_chunk=files_per_chunk, num_workers=num_workers,
                                                   batch_tokens=batch_tokens, times=result.times):
            job = jobs[index]
            if error is not None:
                done(job, error)
                continue
            group.append((job, feature))
            if len(group) >= SAVE_GROUP:
                saving.append((group, pool.submit(_save_group, group)))
                group = []
            # Report finished saves as they come; bound the features held in memory.
            while saving and (saving[0][1].done() or len(saving) * SAVE_GROUP > 4 * files_per_chunk):
                settle(*saving.popleft())
        if group:
            saving.append((group, pool.submit(_save_group, group)))
        while saving:
            settle(*saving.popleft())
    result.times.total = time.perf_counter() - started
    return result


# Files per writer task: fewer thread hand-offs than one per file, yet the progress bar moves smoothly.
SAVE_GROUP = 16


def skip_existing(jobs: Sequence[Job]) -> Tuple[List[Job], List[Path]]:
    todo, skipped = [], []
    for job in jobs:
        (skipped.append(job.path) if finished_output(job.output) else todo.append(job))
    return todo, skipped


def shard(items: Sequence, index: int, count: int) -> list:
    """This process's share of ``items`` under ``accelerate launch`` (round-robin, order kept)."""
    return list(items[index::count])


def plan_digest(plan: "Plan", input_dir: Path) -> Tuple[int, str]:
    """(inputs, sha256 of their names relative to ``input_dir``, in the plan's order): what every process of a launch
    must see alike, since each shards its own listing."""
    import hashlib

    digest = hashlib.sha256()
    paths = [job.path for job in plan.jobs] + [path for path, _ in plan.failures]
    for path in paths:
        try:
            name = Path(path).relative_to(input_dir).as_posix()
        except ValueError:
            name = str(path)
        digest.update(name.encode("utf-8", "surrogateescape") + b"\n")
    return len(paths), digest.hexdigest()[:16]


def agreed_problem(problem: Optional[str], inputs: Optional[Tuple[int, str]] = None,
                   output_dir: Optional[Path] = None) -> Optional[str]:
    """Under a launch of several processes (every process calls it, right after :func:`process_state`; the scripts
    keep a problem with their folders until then when WORLD_SIZE > 1): the problem that
    stops the run, the same in every process. A process alone with a problem (a node without the input folder) left
    at once while the others waited for it at a collective until the group's timeout (30 minutes); processes that
    list other inputs (nodes with their own copies of the folder, one missing a file) each sharded their own
    listing, and inputs were extracted twice or never, reported as a success. ``inputs``: :func:`plan_digest`.
    With ``output_dir``, every process must also write to the same folder (:func:`unshared_output_problem`)."""
    from ..distributed import gather_objects

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return problem
    views = gather_objects((problem, inputs))
    problems = [(index, seen) for index, (seen, _) in enumerate(views) if seen]
    if problems:
        index, first = problems[0]
        if all(seen == first for _, seen in problems) and len(problems) == len(views):
            return first
        return f"process {index} of {len(views)}: {first} (every process stops)"
    listed = [seen for _, seen in views]
    if any(seen != listed[0] for seen in listed):
        counts = ", ".join(f"process {index}: {count} inputs" for index, (count, _) in enumerate(listed))
        return (f"the processes do not see the same input files ({counts}; or other names): every node needs the "
                "same input folder (a shared file system, or identical copies), or files would be extracted twice "
                "or never")
    return unshared_output_problem(output_dir) if output_dir is not None else None


# A file process 0 leaves in the output folder for the others to find (hidden: no tool lists it).
SHARED_FOLDER_PROBE = ".clamp2_same_folder_"


def _appears(path: Path) -> bool:
    # A network file system may show another node's new file a moment late: look again before saying it is not there.
    for delay in (0.0, 0.1, 0.3, 0.6, 1.0, 2.0, 4.0):
        time.sleep(delay)
        try:
            if path.exists():
                return True
        except OSError:  # a folder above it this process may not search (EACCES before Python 3.14): not seen
            return False
    return False


def unshared_output_problem(output_dir: Path) -> Optional[str]:
    """Under a launch of several processes (every process calls it): a problem when some process's ``output_dir`` is
    not the folder process 0 writes to, as on nodes each with its own disk at that path. Each process writes its
    share of the features to its own folder, and process 0 records the run as complete: the nodes' disks each held
    part of the features, and every process reported success. Process 0 leaves a probe file; every process looks
    for it. A folder process 0 cannot write to is left to the first feature it writes, which says so."""
    from ..distributed import broadcast_object, gather_objects

    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    first = torch.distributed.get_rank() == 0
    # Every process makes the folder, not process 0 alone: one that looked for it before it existed (the scripts'
    # folder checks) may keep that "not there" answer on NFS for up to a minute, and its own mkdir asks the server.
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass
    probe = None
    if first:
        try:
            name = f"{SHARED_FOLDER_PROBE}{os.urandom(8).hex()}"
            os.close(os.open(output_dir / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
            probe = name
        except OSError:
            pass
    probe = broadcast_object(probe)
    seen = gather_objects(probe is None or _appears(output_dir / probe))
    if first and probe is not None:
        try:
            (output_dir / probe).unlink()
        except OSError:
            pass
    blind = [str(index) for index, found in enumerate(seen) if not found]
    if not blind:
        return None
    return (f"the output folder {output_dir} is not one folder for every process: process{'es' * (len(blind) > 1)} "
            f"{', '.join(blind)} of {len(seen)} cannot see the file process 0 wrote there (nodes with their own "
            "disks?); give every node the same output folder on a shared file system, or the features would be "
            "scattered over the nodes' disks")


def process_state(device_arg: Optional[str]):
    """(accelerate state, device) of this process; files are split by the state's process index.

    accelerate sets up several CPU processes only when asked for the CPU, so ask whenever CUDA is
    not in use; a launch that still ends up with one process per WORLD_SIZE>1 would extract every
    file in every process, so it is refused.
    """
    from accelerate import PartialState

    use_cpu = device_arg == "cpu" or (device_arg is None and not torch.cuda.is_available())
    world_size = env_int("WORLD_SIZE", 1)
    if world_size > 1:
        before_process_group(free_at_exit=True)
    elif launched_by_a_launcher():
        end_with_launcher()
    state = PartialState(cpu=use_cpu)
    if world_size > 1 and state.num_processes == 1:
        raise RuntimeError(f"launched with WORLD_SIZE={world_size} but accelerate set up a single process; "
                           "launch with `accelerate launch` or `torchrun`, or pass --device cpu")
    device = torch.device(device_arg) if device_arg else state.device
    prepare_end_barrier()
    return state, device


def autocast_context(device: torch.device, dtype: str):
    """fp32 is exact and the default (TF32 off: :class:`ExactFloat32`); bf16/fp16 autocast only on CUDA."""
    if dtype not in ("fp32", "bf16", "fp16"):  # anything else ran fp16 on CUDA
        raise ValueError(f"dtype must be 'fp32', 'bf16' or 'fp16', not {dtype!r}")
    if dtype == "fp32":
        return ExactFloat32()
    if device.type != "cuda":
        raise ValueError(f"--dtype {dtype} needs a CUDA device; on {device.type} use fp32")
    return Autocast("cuda", torch.bfloat16 if dtype == "bf16" else torch.float16)


# -- command-line driver shared by code/extract_clamp2.py and code/extract_m3.py -------------------

def write_failure_log(output_dir: Path, name: str, failures: Sequence[Tuple[Path, str]],
                      input_dir: Optional[Path] = None) -> Optional[Path]:
    """``relative/path<TAB>reason`` lines, the format of the batch converters' logs.

    A run without failures removes the log of an earlier run, so the folder tells the current state.
    """
    log = output_dir / name
    if not failures:
        log.unlink(missing_ok=True)
        return None

    def shown(path: Path) -> str:
        try:
            return path.relative_to(input_dir).as_posix() if input_dir else str(path)
        except ValueError:
            return str(path)

    write_file_log(log, [(shown(path), " ".join(reason.split())) for path, reason in failures])
    return log


def clear_earlier_run(jobs: Sequence[Job], output_dir: Path, tool: str, process_index: int, num_processes: int) -> None:
    """Before a process extracts ``jobs``: remove what a killed run was writing for them (this process's files
    only: the others' may be being written) and, on the first process, failure logs of another process count."""
    remove_partial_files_of(job.output for job in jobs)
    if process_index == 0:
        remove_other_failure_logs(output_dir, tool, num_processes)


def remove_other_failure_logs(output_dir: Path, tool: str, num_processes: int) -> None:
    """Failure logs an earlier run with another number of processes left (``failed_<tool>_<i>.log`` or
    ``failed_<tool>.log``): this run writes only its own, and a stale one would list fixed files as failing."""
    own = {f"failed_{tool}_{i}.log" for i in range(num_processes)} if num_processes > 1 else {f"failed_{tool}.log"}
    try:
        names = [entry.name for entry in os.scandir(output_dir)]
    except OSError:
        return
    for name in names:
        index = name[len(f"failed_{tool}_"):-len(".log")] if name.startswith(f"failed_{tool}_") else None
        if name.endswith(".log") and name not in own and (name == f"failed_{tool}.log"
                                                          or ((index or "").isascii() and (index or "").isdigit())):
            (output_dir / name).unlink(missing_ok=True)


def planned_outputs_of(failures, input_dir: Path, output_dir: Path) -> List[Path]:
    """The outputs that the plan's failed inputs (inputs sharing one output, a FIFO named like one) would have
    written; not a folder that could not be listed (``sub/`` is no input of ``sub.npy``)."""
    found = []
    for path, _ in failures:
        try:
            if not os.path.isdir(path):
                found.append(mirror_path(path, input_dir, output_dir, ".npy"))
        except (ValueError, OSError):  # not under the input folder
            pass
    return found


def extract_share(work: Callable[[], Any], tool: str, process_index: int, num_processes: int) -> Optional[Any]:
    """This process's share of an extraction: ``work()``'s result, or ``None`` after a full disk (said in one
    line: not one failure per remaining file, nor a traceback writing the log on the full disk). An unexpected
    error waits for the other processes' shares, then propagates (torchrun would stop them)."""
    full: Optional[DiskFull] = None
    with others_finish_first(f"{tool} (process {process_index}/{num_processes})"):
        try:
            return work()
        except DiskFull as error:
            full = error
    say_disk_full(str(full), "extract the remaining files")
    return None


def run_extraction(args, runners: Dict[str, KindRunner], per_position: bool, include_text: bool, device: torch.device,
                   process_index: int = 0, num_processes: int = 1, tool: str = "extract",
                   kinds: Optional[Dict[str, str]] = None,
                   record_settings: Optional[Callable[[], Dict[str, Any]]] = None) -> int:
    """Plan, shard across processes, extract, report. Returns the exit status (0 ok, 1 some failed, 2 usage).

    ``kinds`` (extension → runner kind) defaults to music, and text when ``include_text``.
    ``record_settings`` gives what the features depend on, checked against and kept in the output folder's
    :mod:`record <clamp2.extraction.record>` (rank 0 calls it).
    """
    from .record import RECORD_NAME, begin_record, drop_stale_features, finish_record
    import sys

    from clamp2.progress import progress_bar, write_line

    kinds = kinds if kinds is not None else kinds_of_extensions(include_text)
    problem, plan = None, Plan()
    if not args.input_dir.is_dir():
        problem = f"input folder not found: {args.input_dir}"
    else:
        plan = plan_jobs(args.input_dir, args.output_dir, overwrite=True, kinds=kinds)
        if os.path.abspath(args.input_dir) == os.path.abspath(args.output_dir) and \
                any(job.path.suffix.lower() in AUDIO_EXTENSIONS for job in plan.jobs):
            problem = ("the output folder is the input folder: its .npy inputs would be overwritten by their "
                       "features; choose another output folder")
        elif not plan.jobs and not plan.failures:
            problem = f"no input files ({', '.join(sorted(kinds))}) under {args.input_dir}"
    # Every process plans alone and shards its own plan: they must agree, or leave together.
    problem = agreed_problem(problem, plan_digest(plan, args.input_dir), args.output_dir)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    record = None
    if record_settings is not None:
        record = begin_record(args.output_dir, record_settings, args.overwrite,
                              lambda: next((job.output for job in plan.jobs if finished_output(job.output)), None),
                              process_index)
        if record.problem:
            if process_index == 0:
                print(f"error: {record.problem}", file=sys.stderr)
            return 2
    jobs = shard(plan.jobs, process_index, num_processes)
    skipped: List[Path] = []
    if not args.overwrite:
        jobs, skipped = skip_existing(jobs)
    clear_earlier_run(jobs, args.output_dir, tool, process_index, num_processes)
    failures = list(plan.failures) if process_index == 0 else []
    # One progress bar, on the main process (it shows that process's share).
    bar = progress_bar(total=len(jobs), desc=tool, unit="file", enabled=not args.no_progress and process_index == 0)

    def on_done(job, error):
        bar.update(1)
        if error is not None:
            write_line(f"failed: {job.path}: {error}")

    for path, reason in failures:
        write_line(f"failed: {path}: {reason}")
    if getattr(args, "compile", False):
        runners = compile_runners(runners)
    try:
        def work():
            return extract_jobs(jobs, runners, device, per_position, batch_size=args.batch_size,
                                files_per_chunk=args.files_per_chunk, num_workers=args.num_workers,
                                on_file_done=on_done, batch_tokens=getattr(args, "batch_tokens", 0))

        result = extract_share(work, tool, process_index, num_processes)
    finally:
        bar.close()
    if result is None:  # a full disk, said
        wait_for_all_processes(done=False)
        return 1
    failures += result.failures
    if record is not None:
        outputs = {job.path: job.output for job in jobs}
        drop_stale_features(record, (outputs[path] for path, _ in result.failures if path in outputs))
        if process_index == 0:  # inputs that share one output (a.abc and a.txt): its feature is of the old settings
            drop_stale_features(record, planned_outputs_of(plan.failures, args.input_dir, args.output_dir))
    suffix = f"_{process_index}" if num_processes > 1 else ""
    log = write_failure_log(args.output_dir, f"failed_{tool}{suffix}.log", failures, args.input_dir)
    where = f" (process {process_index}/{num_processes})" if num_processes > 1 else ""
    print(f"{tool}{where}: extracted {result.written}, skipped {len(skipped)} existing, failed {len(failures)}"
          + (f" (see {log})" if log else ""), file=sys.stderr)
    # A process that exits 1 first must not make torchrun stop the others.
    every_share_done = wait_for_all_processes()
    if record is not None:
        try:
            finish_record(record, args.output_dir, every_share_done, process_index)
        except OSError as exc:
            print(f"error: cannot write {args.output_dir / RECORD_NAME}: {exc.strerror or exc}", file=sys.stderr)
            return 1
    return 1 if failures else 0
