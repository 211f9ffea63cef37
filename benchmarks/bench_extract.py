"""Throughput of music feature extraction (files/s, windows/s) on corpus-derived ABC and MTF.

    python benchmarks/bench_extract.py [--files 120] [--batch_sizes 1 16] [--device cpu|cuda] [--dtypes fp32 bf16]

Builds (once, cached in --data) interleaved ABC and MTF files from music21's corpus, then times
the M3 per-position path (extract_m3) and the CLaMP 2 global music path (extract_clamp2
--normalize) at the default model size with random weights (speed does not depend on the values),
against the reference's scheme: one window at a time, every window padded to PATCH_LENGTH.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from clamp2.cli import ArgumentParser
from clamp2.quickstart.music21_corpus import build_music_files, corpus_musicxml_paths
from clamp2.extraction.core import KindRunner, MusicEncoder, autocast_context, extract_jobs, plan_jobs, window_starts
from clamp2.models.m3 import M3Dims, M3PatchEncoder
from clamp2.models.common import masked_mean
from clamp2.patchilizer import M3Patchilizer


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("/tmp/clamp2_bench_music"), help="cache of corpus-derived files")
    parser.add_argument("--files", type=int, default=120, help="number of music files (half ABC, half MTF)")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--dtypes", nargs="+", default=["fp32"], help="fp32, bf16, fp16 (the latter two on CUDA)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reference_files", type=int, default=20,
                        help="files timed with the reference scheme (it is slow); 0 to skip")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return parser.parse_args(argv)


def reference_scheme(encoder, windows_per_file, patch_length, device):
    """One window per forward pass, padded to PATCH_LENGTH, as the reference extractor runs."""
    for windows in windows_per_file:
        for w in windows:
            ids = torch.zeros(1, patch_length, w.shape[1], dtype=torch.long)
            ids[0, : len(w)] = w
            masks = torch.zeros(1, patch_length, dtype=torch.long)
            masks[0, : len(w)] = 1
            encoder(ids.to(device), masks.to(device))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cached = sorted(args.data.glob("*/*.abc")) + sorted(args.data.glob("*/*.mtf"))
    if len(cached) < args.files:  # built once; a machine without music21 can reuse a copied cache
        scores = corpus_musicxml_paths(per_composer=None)[: (args.files + 1) // 2]
        build_music_files(args.data, scores)
    dims = M3Dims()
    torch.manual_seed(0)
    encoder = M3PatchEncoder(dims).eval().to(device)
    proj = torch.nn.Linear(dims.hidden_size, 768).eval().to(device)
    patchilizer = M3Patchilizer(dims.patch_size, dims.patch_length)
    encode = MusicEncoder(patchilizer)
    files = sorted(args.data.rglob("*.abc"))[: args.files // 2] + sorted(args.data.rglob("*.mtf"))[: args.files // 2]
    lengths = [len(encode(f)) for f in files]
    n_windows = sum(len(window_starts(n, dims.patch_length)) for n in lengths)
    print(f"device {device}, torch threads {torch.get_num_threads()}, {len(files)} files "
          f"({sum(f.suffix == '.abc' for f in files)} abc, {sum(f.suffix == '.mtf' for f in files)} mtf), "
          f"{n_windows} windows, mean {sum(lengths) / len(lengths):.0f} patches/file")

    with torch.inference_mode():
        if args.reference_files:
            subset = files[: args.reference_files // 2] + files[len(files) // 2: len(files) // 2 + args.reference_files // 2]
            per_file = []
            for f in subset:
                ids = encode(f).long()
                per_file.append([ids[s:s + dims.patch_length] for s in window_starts(len(ids), dims.patch_length)])
            start = time.perf_counter()
            reference_scheme(encoder, per_file, dims.patch_length, device)
            elapsed = time.perf_counter() - start
            w = sum(len(x) for x in per_file)
            print(f"reference scheme (batch 1, padded to {dims.patch_length}), fp32: {len(subset) / elapsed:.2f} files/s, "
                  f"{w / elapsed:.2f} windows/s over {len(subset)} files")

    import tempfile

    for dtype in args.dtypes:
        precision = autocast_context(device, dtype)
        for per_position, name in ((True, "extract_m3 (per-position)"), (False, "extract_clamp2 --normalize (music)")):
            def forward(ids, masks, per_position=per_position):
                with precision:
                    states = encoder(ids, masks)
                    return states if per_position else proj(masked_mean(states, masks))

            runner = {"music": KindRunner(encode, forward, dims.patch_length, 0)}
            for batch_size in args.batch_sizes:
                with tempfile.TemporaryDirectory() as out:
                    plan = plan_jobs(args.data, Path(out), text=False)
                    jobs = [j for j in plan.jobs if j.path in set(files)]
                    start = time.perf_counter()
                    extract_jobs(jobs, runner, device, per_position, batch_size=batch_size, files_per_chunk=256,
                                 num_workers=0)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    elapsed = time.perf_counter() - start
                print(f"{name}, batch {batch_size}, {dtype}: {len(jobs) / elapsed:.2f} files/s, "
                      f"{n_windows / elapsed:.2f} windows/s ({elapsed:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
