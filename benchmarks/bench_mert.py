"""Throughput of MERT feature extraction (seconds of audio per second), batched vs the reference's scheme.

    python benchmarks/bench_mert.py [--size full|tiny] [--files 4] [--seconds 30] [--batch_size 8]
                                    [--device cpu|cuda] [--dtypes fp32 bf16] [--peak_tflops T]
                                    [--attention sdpa|eager] [--compile] [--audio chorales|synthetic]

Renders --files music21 corpus chorales to 44.1 kHz stereo WAV (once, cached in --data; ``--audio
synthetic`` writes seeded tones instead, for a machine without music21: decoding and the model cost
the same whatever the samples are), then times,
in the same run and on the same files, end to end from the audio files (decoding and resampling
included):
- batched: this project's driver (MertFeatureExtractor.iter_files): full windows of many files
  in one forward pass, files decoded in DataLoader workers while the model runs;
- reference scheme: decode a file, then one 5-s window per forward pass (batch 1), as the
  reference extract_mert.py does;
- the host alone: the workers' decoding (and resampling and z-score) with no model, the rate no
  device can pass; with --resample_on_device also decoding only, and the batched driver again
  with resampling and the z-score on the device (MertFeatureExtractor(resample_on_device=True)).
The model is MERT-form with random weights (speed does not depend on the values): MERT-v1-95M's
sizes (--size full) or the test vectors' tiny sizes. MFU = model FLOPs (conv front end +
transformer, clamp2.models.mert.forward_flops) per second / --peak_tflops (default by device name,
clamp2.benchmarking: H100/H200 SXM dense bf16 989, fp32 67, PCIe/NVL less; none on CPU, where only TFLOP/s is printed).
Each batched line after the first compares its features with the first (fp32, plain) run's.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from clamp2.benchmarking import device_peak_tflops, deviation
from clamp2.cli import ArgumentParser

TINY = Path(__file__).resolve().parents[1] / "tests" / "data" / "vectors_clamp3" / "tiny_mert" / "config.json"
FULL_SIZES = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
              "conv_dim": [512] * 7, "num_conv_pos_embeddings": 128, "num_conv_pos_embedding_groups": 16}
CHORALES = ("bach/bwv66.6", "bach/bwv26.6", "bach/bwv10.7", "bach/bwv101.7", "bach/bwv102.7", "bach/bwv103.6",
            "bach/bwv104.6", "bach/bwv108.6")


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("/tmp/clamp2_bench_audio"), help="cache of rendered WAV files")
    parser.add_argument("--size", choices=("full", "tiny"), default="full",
                        help="MERT-v1-95M's sizes (random weights) or the tests' tiny config")
    parser.add_argument("--files", type=int, default=4, help="number of audio files (4)")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each file (pieces are looped)")
    parser.add_argument("--batch_size", type=int, default=8, help="MERT windows per forward pass (8)")
    parser.add_argument("--num_workers", type=int, default=None,
                        help="decoding processes (default: process_data/extract_mert.py's default)")
    parser.add_argument("--resample_on_device", action="store_true",
                        help="also time the driver with resampling and the z-score on --device (workers only decode)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda when available)")
    parser.add_argument("--dtypes", nargs="+", default=["fp32"], help="fp32, bf16, fp16 (the latter two on CUDA)")
    parser.add_argument("--peak_tflops", type=float, default=None, help="peak of the device for MFU")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--skip_reference", action="store_true", help="do not time the reference's one-file scheme")
    parser.add_argument("--attention", choices=("sdpa", "eager"), default="sdpa",
                        help="attention kernel (clamp2.attention; default sdpa, as extraction uses)")
    parser.add_argument("--audio", choices=("chorales", "synthetic"), default="chorales",
                        help="what the WAV files hold: music21's chorales rendered with a SoundFont, or seeded "
                             "tones (no music21 needed; the timing does not depend on the samples)")
    parser.add_argument("--compile", action="store_true",
                        help="also time the batched driver with the model through torch.compile (compilation untimed)")
    return parser.parse_args(argv)


def synthetic_piece(index: int, sample_rate: int) -> np.ndarray:
    """Eight seconds of seeded stereo tones, a new pitch every half second (``[frames, 2]`` float32)."""
    rng = np.random.default_rng(index)
    times = np.arange(int(0.5 * sample_rate)) / sample_rate
    notes = []
    for frequency in 110.0 * 2 ** (rng.integers(0, 36, size=16) / 12):
        note = sum(np.sin(2 * np.pi * k * frequency * times) / k for k in (1, 2, 3)) * np.exp(-3 * times)
        notes.append(note)
    mono = np.concatenate(notes).astype(np.float32)
    return np.stack([mono, np.roll(mono, sample_rate // 100)], axis=1)


def audio_files(folder: Path, count: int, seconds: float, source: str = "chorales") -> list:
    from clamp2.quickstart.audio_render import write_audio

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        name = CHORALES[i % len(CHORALES)] if source == "chorales" else f"tones{i % len(CHORALES)}"
        path = folder / f"{i:03d}_{name.replace('/', '_')}_{seconds:g}s.wav"
        if not path.exists():
            if source == "chorales":
                from clamp2.quickstart.audio_render import corpus_midi, synthesize_midi

                piece = synthesize_midi(corpus_midi(name, folder / (name.replace("/", "_") + ".mid")), 44100)
            else:
                piece = synthetic_piece(i % len(CHORALES), 44100)
            frames = int(seconds * 44100)
            looped = np.tile(piece, (frames // len(piece) + 1, 1))[:frames]
            write_audio(path, looped * np.float32(0.7 / max(np.abs(looped).max(), 1e-9)), 44100)
        paths.append(path)
    return paths


def reference_scheme(model, paths, device, precision) -> int:
    """Decode a file, then one window per forward pass at batch 1 (the reference's loop)."""
    from clamp2.extraction.audio import load_windows

    windows = 0
    for path in paths:
        wave, bounds = load_windows(path)
        rows = []
        for start, end in bounds:
            x = torch.from_numpy(wave[start:end])[None].to(device)
            with torch.inference_mode(), precision:
                out = model(x, output_hidden_states=True)
                rows.append(torch.stack([h.float().mean(dim=1) for h in out.hidden_states]).mean(0).cpu())
            windows += 1
    return windows


def host_alone(paths, num_workers: int, decode_only: bool) -> float:
    """Seconds the extraction's decoding workers take over ``paths`` with no model."""
    from clamp2.extraction.mert import _WaveDataset, _identity

    loader = torch.utils.data.DataLoader(_WaveDataset(paths, decode_only=decode_only), batch_size=1,
                                         num_workers=num_workers, collate_fn=_identity)
    start = time.perf_counter()
    failed = [error for [(_, _, _, error)] in loader if error is not None]
    assert not failed, failed
    return time.perf_counter() - start


def main(argv=None) -> int:
    args = parse_args(argv)
    from clamp2.attention import set_attention
    from clamp2.extraction.audio import MERT_SAMPLE_RATE, load_windows
    from clamp2.extraction.core import autocast_context
    from clamp2.extraction.mert import MertFeatureExtractor
    from clamp2.models.mert import build_mert, forward_flops

    from clamp2.extraction.arguments import default_workers

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.num_workers is None:
        args.num_workers = default_workers()
    device = torch.device(args.device)
    paths = audio_files(args.data, args.files, args.seconds, args.audio)
    bounds = [load_windows(p)[1] for p in paths]
    audio_seconds = sum(e - s for b in bounds for s, e in b) / MERT_SAMPLE_RATE
    windows = sum(len(b) for b in bounds)
    values = json.loads(TINY.read_text())
    if args.size == "full":
        values.update(FULL_SIZES)
    torch.manual_seed(0)
    model = set_attention(build_mert(values).to(device), args.attention)
    flops = sum(forward_flops(model.config, e - s) for b in bounds for s, e in b)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"MERT {args.size} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, {args.attention} "
          f"attention) on {name}; "
          f"{len(paths)} files, {audio_seconds:.0f} s of audio, {windows} windows, "
          f"{flops / windows / 1e9:.1f} GFLOP per window; {args.num_workers} decoding workers")
    for decode_only in (False, True) if args.resample_on_device else (False,):
        elapsed = host_alone(paths, args.num_workers, decode_only)
        what = "decode only" if decode_only else "decode, resample, z-score"
        print(f"{'host alone (' + what + ')':<40}      {audio_seconds / elapsed:8.1f} s of audio/s  "
              f"{windows / elapsed:7.2f} windows/s  (the model keeps pace at {flops / elapsed / 1e12:.3f} TFLOP/s)",
              flush=True)

    def report(label, dtype, elapsed, exactness=""):
        line = (f"{label:<40} {dtype}: {audio_seconds / elapsed:8.1f} s of audio/s  {windows / elapsed:7.2f} windows/s"
                f"  {flops / elapsed / 1e12:7.3f} TFLOP/s")
        peak = device_peak_tflops(device, dtype, args.peak_tflops)
        if peak:
            line += f"  MFU {100 * flops / elapsed / (peak * 1e12):5.1f}% of {peak:g} TFLOP/s"
        print(line + exactness, flush=True)
        return elapsed

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    variants = [(False, False)] + [(True, False)] * args.compile + [(False, True)] * args.resample_on_device
    first = None  # the first run's features: every later run's exactness is measured against them
    for dtype in args.dtypes:
        for compiled, on_device in variants:
            extractor = MertFeatureExtractor(model, device, dtype, args.batch_size, resample_on_device=on_device)
            if compiled:
                # HuBERT's forward asks transformers' lru_cache'd is_torch_distributed_available(); Dynamo traces
                # through the cache and warns that it did, with a stack, once per process: noise in the table.
                warnings.filterwarnings("ignore", message="Dynamo detected a call to a `functools.lru_cache`")
                extractor.model = torch.compile(model, dynamic=True)
            list(extractor.iter_files(paths[:1]))  # warm-up (kernels, allocator; compilation)
            sync()
            start = time.perf_counter()
            features = {index: array for index, array, _ in extractor.iter_files(paths, num_workers=args.num_workers)}
            sync()
            elapsed = time.perf_counter() - start
            assert all(features.get(index) is not None for index in range(len(paths))), "a file failed to extract"
            label = (f"batched (batch {args.batch_size}{', compiled' if compiled else ''}"
                     f"{', resampled on device' if on_device else ''})")
            exactness = "" if first is None else f"  vs first: {deviation((first[i], features[i]) for i in first)}"
            elapsed = report(label, dtype, elapsed, exactness)
            first = features if first is None else first
            if not (compiled or on_device):
                batched = elapsed  # the plain driver's time: the speed-up against the reference scheme
        if not args.skip_reference:
            start = time.perf_counter()
            reference_scheme(model, paths, device, autocast_context(device, dtype))
            sync()
            reference = report("reference (1 window/pass)", dtype, time.perf_counter() - start)
            print(f"speed-up {dtype}: {reference / batched:.2f}x", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
