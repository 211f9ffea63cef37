"""MERT features of audio files (SPEC §16), batched: ``process_data/extract_mert.py`` and the API.

The reference runs one 5-second window at a time. Here full windows (120,000 samples) of many files
go through the model together; a short last window is never padded (the first conv layer's
GroupNorm normalises over the whole window, padding included, so padding would change the
numbers) but runs with other short windows of exactly its length, or alone. Files are decoded and
resampled in DataLoader workers while the model runs. A file's feature does not depend on which
files share its batches beyond float32 rounding (tests check 1e-5): full windows come out the same
to the bit; short windows batched with others of their length have moved by up to ~1.2e-6.

Per window the 13 hidden states (the encoder input after the positional convolution and
LayerNorm, then the 12 layer outputs) are averaged over their frames; the file's array is the
mean over those states, ``[1, n, D]`` float32 (what CLaMP 3 reads), or with ``all_layers`` the
states themselves, ``[L+1, n, D]`` (CLaMP 3 refuses that form).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..files import DiskFull, disk_full_error, find_files, mirror_outputs
from ..workers import exit_with_parent
from .audio import (AUDIO_EXTENSIONS, WINDOW_SAMPLES, AudioError, load_mono, load_wave, mert_input,
                    normalize_tensor, resample_tensor, track_windows, z_score_may_overflow)
from .core import (HostCopy, Job, Plan, autocast_context, clear_earlier_run, save_npy, shard, skip_existing,
                   write_failure_log)


class MertFeatureExtractor:
    """A loaded MERT model turned into per-window and per-file features.

        extractor = MertFeatureExtractor(load_mert("m-a-p/MERT-v1-95M"), device, "fp32", batch_size=8)
        extractor.features("song.flac")          # [n, 768]: one layer-mean row per 5 s
        for index, array, error in extractor.iter_files(paths, num_workers=2): ...

    ``dtype`` is ``fp32`` (exact), or ``bf16``/``fp16`` autocast on CUDA; frame and layer means are
    always taken in float32. With ``resample_on_device`` the workers only decode and average the
    channels; resampling and the z-score run on the model's device (fp32, TF32 off), which takes
    most of a worker's time per file off the host. On the CPU the resampling is the same to the
    bit and the z-score sums in another order (~1e-7 relative).
    """

    def __init__(self, model, device: Optional[torch.device] = None, dtype: str = "fp32", batch_size: int = 8,
                 all_layers: bool = False, resample_on_device: bool = False):
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.eval().to(self.device)
        self.dtype = dtype
        self.batch_size = batch_size
        self.all_layers = all_layers
        self.resample_on_device = resample_on_device
        self._precision = autocast_context(self.device, dtype)

    def launch_states(self, windows: torch.Tensor) -> torch.Tensor:
        """[B, samples] normalized windows of one length → [B, L+1, D] on the device: each hidden state's
        frame mean. On CUDA it returns with the work queued."""
        with torch.inference_mode(), self._precision:
            out = self.model(windows.to(self.device, non_blocking=True), output_hidden_states=True)
            # Mean per state rather than one stacked [B, L+1, T, D] tensor: 13x less memory at batch 64.
            return torch.stack([state.float().mean(dim=1) for state in out.hidden_states], dim=1)

    def file_array(self, window_states: torch.Tensor) -> np.ndarray:
        """[n, L+1, D] of a file's windows → what is saved: [1, n, D] layer mean, or [L+1, n, D]."""
        states = window_states.transpose(0, 1)  # [L+1, n, D]
        if not self.all_layers:
            states = states.mean(dim=0, keepdim=True)
        return states.contiguous().numpy().astype(np.float32, copy=False)

    def _launch_groups(self, windows: Sequence[torch.Tensor]) -> List[Tuple[List[int], HostCopy]]:
        """Equal-length windows batched together: ``(positions in windows, states on their way to the host)``."""
        by_length: Dict[int, List[int]] = {}
        for i, window in enumerate(windows):
            by_length.setdefault(len(window), []).append(i)
        launched = []
        for members in by_length.values():
            for start in range(0, len(members), self.batch_size):
                chunk = members[start:start + self.batch_size]
                launched.append((chunk, HostCopy(self.launch_states(torch.stack([windows[i] for i in chunk])))))
        return launched

    @staticmethod
    def _fetch_groups(launched, count: int) -> List[torch.Tensor]:
        out: List[Optional[torch.Tensor]] = [None] * count
        for chunk, states in launched:
            states = states.wait()
            for row, i in enumerate(chunk):
                out[i] = states[row]
        return out

    def _run_groups(self, windows: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """States of windows of any lengths, input order kept."""
        return self._fetch_groups(self._launch_groups(windows), len(windows))

    def _track(self, path) -> Tuple[torch.Tensor, List[Tuple[int, int]]]:
        """(normalized 24 kHz wave, window bounds) of a file, resampled where ``resample_on_device`` says."""
        return self._track_of(*read_samples(path, decode_only=self.resample_on_device))

    def _track_of(self, samples: np.ndarray, rate: Optional[int]) -> Tuple[torch.Tensor, List[Tuple[int, int]]]:
        """:meth:`_track` of what :func:`read_samples` gave: a wave to resample on the device when ``rate`` is set."""
        if rate is None:
            return torch.from_numpy(samples), track_windows(len(samples))
        wave = torch.from_numpy(samples)
        if self.device.type == "cuda":
            wave = wave.pin_memory()
        wave = normalize_tensor(resample_tensor(wave.to(self.device, non_blocking=True), rate))
        return wave, track_windows(len(wave))

    def features(self, path) -> np.ndarray:
        """One audio file → ``[n, D]`` float32, the layer-mean row of each 5-s window (CLaMP 3's input).

        Raises :class:`~clamp2.extraction.audio.AudioError` for an undecodable, empty or < 1 s file.
        """
        wave, bounds = self._track(path)
        states = torch.stack(self._run_groups([wave[s:e] for s, e in bounds]))
        return states.mean(dim=1).numpy().astype(np.float32, copy=False)

    def iter_files(self, paths: Sequence, num_workers: int = 0,
                   prefetch_files: int = 4) -> Iterator[Tuple[int, Optional[np.ndarray], Optional[str]]]:
        """``(index, array, None)`` or ``(index, None, reason)`` per path, in completion order.

        Full windows of consecutive files fill batches of ``batch_size``; short last windows wait
        (at most ``batch_size`` of them) to share a batch with windows of exactly their length. A
        batch's states are fetched only after the next batch is queued, so on CUDA the device has
        work while the host takes the next files.
        """
        loader = torch.utils.data.DataLoader(
            _WaveDataset(paths, decode_only=self.resample_on_device), batch_size=1, shuffle=False,
            num_workers=num_workers, collate_fn=_identity,
            prefetch_factor=max(1, prefetch_files // max(num_workers, 1)) if num_workers else None,
            worker_init_fn=exit_with_parent if num_workers else None)
        pending: Dict[int, List[Optional[torch.Tensor]]] = {}
        full: List[Tuple[int, int, torch.Tensor]] = []
        short: List[Tuple[int, int, torch.Tensor]] = []
        queued: List[Tuple[list, list]] = []  # (entries, launched groups) not fetched yet

        def fetch() -> Iterator[Tuple[int, np.ndarray, None]]:
            entries, launched = queued.pop(0)
            touched = []
            for (index, k, _), state in zip(entries, self._fetch_groups(launched, len(entries))):
                pending[index][k] = state
                touched.append(index)
            for index in dict.fromkeys(touched):
                if index in pending and all(s is not None for s in pending[index]):
                    yield index, self.file_array(torch.stack(pending.pop(index))), None

        def run(entries) -> Iterator[Tuple[int, np.ndarray, None]]:
            queued.append((entries, self._launch_groups([window for _, _, window in entries])))
            if len(queued) > 1:
                yield from fetch()

        for [(index, samples, rate, error)] in loader:
            if error is None:
                try:
                    wave, bounds = self._track_of(samples, rate)
                except AudioError as exc:
                    error = str(exc)
            if error is not None:
                yield index, None, error
                continue
            pending[index] = [None] * len(bounds)
            for k, (start, end) in enumerate(bounds):
                (full if end - start == WINDOW_SAMPLES else short).append((index, k, wave[start:end]))
            while len(full) >= self.batch_size:
                batch, full = full[:self.batch_size], full[self.batch_size:]
                yield from run(batch)
            if len(short) >= self.batch_size:
                batch, short = short, []
                yield from run(batch)
        if full or short:
            yield from run(full + short)
        while queued:
            yield from fetch()


class _WaveDataset(torch.utils.data.Dataset):
    """Decodes in DataLoader workers: ``(index, samples, rate, error)``, numpy out (no shared-memory fds).

    ``samples`` is the normalized 24 kHz wave (``rate`` None), or with ``decode_only`` the channel
    mean at the file's ``rate``, for the device to resample.
    """

    def __init__(self, paths: Sequence, decode_only: bool = False):
        self.paths = list(paths)
        self.decode_only = decode_only

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        try:
            return (index, *read_samples(self.paths[index], self.decode_only), None)
        except AudioError as exc:
            return index, None, None, str(exc)
        except Exception as exc:  # noqa: BLE001 - one bad file must never stop the batch
            return index, None, None, f"{type(exc).__name__}: {exc}"


def read_samples(path, decode_only: bool = False) -> Tuple[np.ndarray, Optional[int]]:
    """The host's share of a file's MERT input: ``(normalized 24 kHz wave, None)``, or with ``decode_only``
    ``(channel mean, its sample rate)`` for the device to resample and z-score."""
    if decode_only:
        mono, rate = load_mono(path)
        # Checked here, not on the device: a device-side check would wait for the queued batches. Where
        # numpy's sums may overflow, the reference's z-score is all zeros (a finite mean, an infinite
        # variance) or NaN, and torch's sums need not agree: such a file is z-scored here, as without
        # the flag (which also fails it when its z-score is not finite).
        if z_score_may_overflow(mono, rate):
            return mert_input(mono, rate), None
        return mono, rate
    return load_wave(path), None


def _identity(items):
    return items


# -- folders -------------------------------------------------------------------------------------

def plan_audio_jobs(input_dir: Path, output_dir: Path) -> Plan:
    """Audio files → mirrored ``.npy`` outputs; two inputs with one output are failures (SPEC §16)."""
    unsearchable: List[Tuple[Path, str]] = []
    outputs, collisions = mirror_outputs(find_files(input_dir, AUDIO_EXTENSIONS, unsearchable), input_dir, output_dir,
                                         ".npy")
    return Plan(jobs=[Job(path, output, "audio") for path, output in outputs.items()],
                failures=unsearchable + collisions)


@dataclass
class FolderRun:
    written: int
    skipped: int
    failures: List[Tuple[Path, str]]
    log: Optional[Path]


def extract_folder(extractor: MertFeatureExtractor, input_dir: Path, output_dir: Path, *, overwrite: bool = False,
                   num_workers: int = 0, process_index: int = 0, num_processes: int = 1, progress: bool = True,
                   tool: str = "extract_mert", plan: Optional[Plan] = None) -> FolderRun:
    """Every audio file under ``input_dir`` → ``output_dir/<relative folder>/<stem>.npy``; failures logged.

    Raises :class:`clamp2.files.DiskFull` at the first output a full disk (or quota) refuses.

    The plan depends on the file listing only, so every process of an ``accelerate launch`` shards
    the same list; existing outputs are skipped per process afterwards. ``plan``: the caller's
    :func:`plan_audio_jobs` of the same folders (not listed twice).
    """
    from ..progress import progress_bar, write_line

    plan = plan if plan is not None else plan_audio_jobs(input_dir, output_dir)
    jobs = shard(plan.jobs, process_index, num_processes)
    skipped: List[Path] = []
    if not overwrite:
        jobs, skipped = skip_existing(jobs)
    clear_earlier_run(jobs, output_dir, tool, process_index, num_processes)
    failures = list(plan.failures) if process_index == 0 else []
    for path, reason in failures:
        write_line(f"failed: {path}: {reason}")
    written = 0
    bar = progress_bar(total=len(jobs), desc=tool, unit="file", enabled=progress and process_index == 0)
    try:
        for index, array, error in extractor.iter_files([job.path for job in jobs], num_workers=num_workers):
            job = jobs[index]
            if error is None:
                try:
                    save_npy(job.output, array)
                    written += 1
                except OSError as exc:
                    if disk_full_error(exc) is not None:  # every later file would fail too: the run stops
                        raise DiskFull(f"cannot write {job.output}: {exc.strerror}") from exc
                    error = f"cannot write {job.output}: {exc}"
            if error is not None:
                failures.append((job.path, error))
                write_line(f"failed: {job.path}: {error}")
            bar.update(1)
    finally:
        bar.close()
    suffix = f"_{process_index}" if num_processes > 1 else ""
    log = write_failure_log(output_dir, f"failed_{tool}{suffix}.log", failures, input_dir)
    return FolderRun(written, len(skipped), failures, log)


def summary_line(run: FolderRun, tool: str = "extract_mert", process_index: int = 0, num_processes: int = 1) -> str:
    where = f" (process {process_index}/{num_processes})" if num_processes > 1 else ""
    return (f"{tool}{where}: extracted {run.written}, skipped {run.skipped} existing, failed {len(run.failures)}"
            + (f" (see {run.log})" if run.log else ""))


def print_summary(run: FolderRun, **kwargs) -> None:
    print(summary_line(run, **kwargs), file=sys.stderr)


__all__ = ["MertFeatureExtractor", "plan_audio_jobs", "extract_folder", "summary_line", "FolderRun"]
