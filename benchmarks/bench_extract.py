"""Throughput of music feature extraction (files/s, windows/s, MFU) on corpus-derived ABC and MTF.

    python benchmarks/bench_extract.py [--files 120] [--batch_sizes 1 16] [--device cpu|cuda] [--dtypes fp32 bf16]
    python benchmarks/bench_extract.py --device cuda --dtypes fp32 bf16 --batch_sizes 16 --batch_tokens 16384 \
        --files 400 --reference_files 0 [--compile]          # the GPU table of docs/performance.md
    python benchmarks/bench_extract.py --files 8 --batch_sizes 4 --batch_tokens 2048 --reference_files 0 \
        --patch_length 128 --layers 2                         # a CPU run in seconds
    python benchmarks/bench_abc_corpus.py --out /tmp/abc_tunes && python benchmarks/bench_extract.py \
        --music_dir /tmp/abc_tunes/interleaved --files 0 ...  # music21's 12,978 ABC tunes (short pieces)
    python benchmarks/bench_extract.py --music_dir /tmp/abc_tunes/interleaved --files 0 --reference_files 0 \
        --host_only --batch_sizes 64 --scratch .     # the host's ceiling: files/s with a model that costs nothing

Builds (once, cached in --data) interleaved ABC and MTF files from music21's corpus, then times
the M3 per-position path (extract_m3) and the CLaMP 2 global music path (extract_clamp2
--normalize) at the default model size with random weights (speed does not depend on the values),
against the reference's scheme: one window at a time, every window padded to PATCH_LENGTH.

Each line: files/s, windows/s, the share of computed positions that are padding, the model's
TFLOP/s counted from the real (unpadded) window lengths (the M3 patch embedding, a lookup's
additions under bf16/fp16, the encoder's 24·L·h² + 4·L²·h per layer, the projection; padding is
not useful work) and on CUDA the MFU against
--peak_tflops (default by device name: H100/H200 SXM 989 bf16, 67 fp32; PCIe/NVL less), and the exactness check: the
largest difference and the smallest cosine of every file's feature against the first fp32 run of
that path (the per-window batches of --batch_sizes' first value).

Each line ends with where the main process spent the run (``HostTimes``): waiting for the
tokenizing workers, padding, in the model's forward calls, waiting for the device's outputs,
waiting for the writer threads, and the rest (planning, gathering, combining).

``--host_only`` swaps the model for one that returns zeros: what is left is the host's share of
an extraction (read, tokenize in --num_workers processes, pad, copy, gather, write the .npy files
from writer threads). Its files/s is the ceiling no device can pass, and the line gives the model
FLOP rate at which a device keeps pace with it. Short pieces are host-bound: music21's tunes have
22 patches on average, so even 5,000 tunes/s is only ~20 TFLOP/s of model work.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from clamp2.benchmarking import device_peak_tflops, deviation
from clamp2.cli import ArgumentParser
from clamp2.quickstart.music21_corpus import build_music_files, corpus_musicxml_paths
from clamp2.attention import set_attention
from clamp2.attention_arguments import ATTN_IMPLEMENTATIONS
from clamp2.extraction.arguments import default_workers
from clamp2.extraction.core import (KindRunner, MusicEncoder, autocast_context, compile_runners, extract_jobs,
                                    plan_batches, plan_jobs, window_starts)
from clamp2.models.m3 import M3Dims, M3PatchEncoder
from clamp2.models.common import masked_mean, transformer_flops
from clamp2.patchilizer import NUM_CLASSES, M3Patchilizer


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("/tmp/clamp2_bench_music"), help="cache of corpus-derived files")
    parser.add_argument("--files", type=int, default=120,
                        help="number of music files (half ABC, half MTF; with --music_dir the first N, 0 = all)")
    parser.add_argument("--music_dir", type=Path, default=None,
                        help="time the .abc/.mtf files under this folder instead of the corpus-derived set (e.g. "
                             "the interleaved tunes of bench_abc_corpus.py --out DIR: DIR/interleaved)")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 16],
                        help="windows per forward pass, each timed (1 16)")
    parser.add_argument("--dtypes", nargs="+", default=["fp32"], help="fp32, bf16, fp16 (the latter two on CUDA)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda when available)")
    parser.add_argument("--reference_files", type=int, default=20,
                        help="files timed with the reference scheme (it is slow); 0 to skip")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--batch_tokens", type=int, nargs="*", default=[],
                        help="also time batches sized by padded positions (extract_*.py --batch_tokens)")
    parser.add_argument("--compile", action="store_true", help="also time each configuration with --compile")
    parser.add_argument("--attention", choices=ATTN_IMPLEMENTATIONS, default="sdpa", help="attention kernel (sdpa)")
    parser.add_argument("--peak_tflops", type=float, default=None, help="device peak for MFU (default: by name)")
    parser.add_argument("--num_workers", type=int, default=default_workers(),
                        help="tokenizing processes, as extract_*.py --num_workers (default: theirs)")
    parser.add_argument("--files_per_chunk", type=int, default=256,
                        help="files whose windows are sorted and batched together, as extract_*.py (default 256; "
                             "thousands of short pieces fill a token budget with less padding)")
    parser.add_argument("--host_only", action="store_true",
                        help="replace the model by one that returns zeros: files/s of the host side alone (read, "
                             "tokenize, pad, copy, gather, write), the ceiling of any device")
    parser.add_argument("--writer_threads", type=int, default=None,
                        help="threads writing the .npy files (default: the extraction scripts', up to 4)")
    parser.add_argument("--scratch", type=Path, default=None,
                        help="folder for the features written, made if missing (default: the system's temporary folder)")
    parser.add_argument("--patch_length", type=int, default=None, help="PATCH_LENGTH (default 512)")
    parser.add_argument("--layers", type=int, default=None, help="PATCH_NUM_LAYERS (default 12)")
    return parser.parse_args(argv)


def real_flops(lengths, dims: M3Dims, per_position: bool, lookup: bool = False) -> float:
    """Forward FLOPs of every window at its real length: patch embedding, encoder, (global) projection.

    Under autocast the patch embedding is a lookup (M3PatchEncoder.embed_by_lookup): its additions
    are counted, not the one-hot matmul it replaces.
    """
    total = 0.0
    for n in lengths:
        for start in window_starts(n, dims.patch_length):
            length = min(dims.patch_length, n - start)
            embedding = dims.patch_size if lookup else 2.0 * NUM_CLASSES * dims.patch_size
            total += length * embedding * dims.hidden_size
            total += transformer_flops(1, length, dims.hidden_size, dims.patch_num_layers)
            total += 0 if per_position else 2.0 * dims.hidden_size * 768
    return total


def padding_share(lengths, dims: M3Dims, batch_size: int, batch_tokens: int, files_per_chunk: int) -> float:
    """Padded positions / computed positions, batches planned as the extraction core plans them."""
    real = padded = 0
    for first in range(0, len(lengths), files_per_chunk):
        windows = [min(dims.patch_length, n - s) for n in lengths[first:first + files_per_chunk]
                   for s in window_starts(n, dims.patch_length)]
        for batch in plan_batches(windows, batch_size, batch_tokens):
            real += sum(windows[i] for i in batch)
            padded += len(batch) * max(windows[i] for i in batch)
    return 1 - real / padded


def compare(out: Path, reference: Path) -> str:
    """Largest |difference| and smallest cosine of the features in ``out`` against ``reference``."""
    return deviation((np.load(path), np.load(out / path.relative_to(reference)))
                     for path in sorted(reference.rglob("*.npy")))


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
    if args.music_dir is None:
        cached = sorted(args.data.glob("*/*.abc")) + sorted(args.data.glob("*/*.mtf"))
        if len(cached) < args.files:  # built once; a machine without music21 can reuse a copied cache
            scores = corpus_musicxml_paths(per_composer=None)[: (args.files + 1) // 2]
            build_music_files(args.data, scores)
    dims = M3Dims(patch_length=args.patch_length or M3Dims.patch_length,
                  patch_num_layers=args.layers or M3Dims.patch_num_layers)
    torch.manual_seed(0)
    encoder = set_attention(M3PatchEncoder(dims).eval().to(device), args.attention)
    proj = torch.nn.Linear(dims.hidden_size, 768).eval().to(device)
    patchilizer = M3Patchilizer(dims.patch_size, dims.patch_length)
    encode = MusicEncoder(patchilizer)
    if args.music_dir is not None:
        files = sorted(f for f in args.music_dir.rglob("*") if f.suffix in (".abc", ".mtf"))[: args.files or None]
        if not files:
            print(f"bench_extract: error: no .abc or .mtf files under {args.music_dir}")
            return 2
    else:
        files = (sorted(args.data.rglob("*.abc"))[: args.files // 2]
                 + sorted(args.data.rglob("*.mtf"))[: args.files // 2])
    lengths = [len(encode(f)) for f in files]
    n_windows = sum(len(window_starts(n, dims.patch_length)) for n in lengths)
    print(f"device {device}, torch threads {torch.get_num_threads()}, {args.attention} attention, {len(files)} files "
          f"({sum(f.suffix == '.abc' for f in files)} abc, {sum(f.suffix == '.mtf' for f in files)} mtf), "
          f"{n_windows} windows, mean {sum(lengths) / len(lengths):.0f} patches/file, {args.num_workers} tokenizing "
          f"workers; model forward {real_flops(lengths, dims, False) / 1e12:.1f} TFLOP in all")

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

    zeros = {}

    def host_zeros(shape, where: torch.device) -> torch.Tensor:
        """The --host_only model's output: a view of zeros made once per device (grown when a batch needs more)."""
        size = int(np.prod(shape))
        if zeros.get(str(where)) is None or zeros[str(where)].numel() < size:
            zeros[str(where)] = torch.zeros(size, device=where)
        return zeros[str(where)][:size].view(shape)

    batchings = [(b, 0) for b in args.batch_sizes] + [(args.batch_sizes[0], t) for t in args.batch_tokens]
    wanted = set(files)  # once: each pass keeps the planned jobs of these files
    if args.scratch is not None:
        args.scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
        references = {}
        for per_position, name in ((True, "extract_m3 (per-position)"), (False, "extract_clamp2 --normalize (music)")):
            for dtype in args.dtypes:
                flops = real_flops(lengths, dims, per_position, lookup=dtype != "fp32")
                precision = autocast_context(device, dtype)

                def forward(ids, masks, per_position=per_position, precision=precision):
                    if args.host_only:
                        # A view of zeros made once: a fresh torch.zeros per batch is a parallel fill of
                        # megabytes, which on the CPU contends with the tokenizing workers for the cores and
                        # was most of the "host" time measured here (2-5x the rest, on 2 busy cores).
                        shape = ids.shape[:2] if per_position else ids.shape[:1]
                        return host_zeros((*shape, dims.hidden_size if per_position else 768), ids.device)
                    with precision:
                        states = encoder(ids, masks)
                        return states if per_position else proj(masked_mean(states, masks))

                for compiled in (False, True) if args.compile else (False,):
                    runner = {"music": KindRunner(encode, forward, dims.patch_length, 0)}
                    if compiled:
                        runner = compile_runners(runner)
                    for batch_size, batch_tokens in batchings:
                        out = Path(scratch) / f"{per_position}_{dtype}_{compiled}_{batch_size}_{batch_tokens}"
                        plan = plan_jobs(args.music_dir or args.data, out, text=False)
                        jobs = [j for j in plan.jobs if j.path in wanted]
                        if len(jobs) != len(files):  # the rates below would count files never extracted
                            reasons = [reason for path, reason in plan.failures if path in wanted]
                            raise SystemExit(f"bench_extract: {len(files) - len(jobs)} of {len(files)} files would not "
                                             f"be extracted ({reasons[0] if reasons else 'their outputs exist'})")
                        # Start-up (compilation with --compile, cuBLAS handles, kernel choice for new shapes,
                        # the allocator's pool) is paid once, not timed: the first files run untimed.
                        extract_jobs(jobs[:8], runner, device, per_position, batch_size=batch_size,
                                     files_per_chunk=args.files_per_chunk, batch_tokens=batch_tokens)
                        start = time.perf_counter()
                        result = extract_jobs(jobs, runner, device, per_position, batch_size=batch_size,
                                              files_per_chunk=args.files_per_chunk, num_workers=args.num_workers,
                                              batch_tokens=batch_tokens, writer_threads=args.writer_threads)
                        if device.type == "cuda":
                            torch.cuda.synchronize()
                        elapsed = time.perf_counter() - start
                        reference = references.setdefault(per_position, out)
                        batching = f"tokens {batch_tokens}" if batch_tokens else f"batch {batch_size}"
                        label = "host only (zeros for a model)" if args.host_only else dtype
                        padding = padding_share(lengths, dims, batch_size, batch_tokens, args.files_per_chunk)
                        line = (f"{name}, {batching}, {label}{', compiled' if compiled else ''}: "
                                f"{len(jobs) / elapsed:.2f} files/s, {n_windows / elapsed:.2f} windows/s "
                                f"({elapsed:.1f} s), padding {padding:.0%}")
                        peak = device_peak_tflops(device, "bf16" if args.host_only else dtype, args.peak_tflops)
                        if args.host_only:
                            # The model's FLOPs at the host's pace: a device slower than this is the bound.
                            line += f", the model keeps pace at {flops / elapsed / 1e12:.3f} TFLOP/s"
                            if peak:
                                line += f" ({flops / elapsed / (peak * 1e12):.1%} of {peak:g})"
                            print(f"{line}; {result.times.summary()}", flush=True)
                            continue
                        line += f", {flops / elapsed / 1e12:.3f} TFLOP/s real"
                        if peak:
                            line += f", MFU {flops / elapsed / (peak * 1e12):.1%} of {peak:g}"
                        if out != reference:
                            line += f"; vs first fp32: {compare(out, reference)}"
                        print(f"{line}; {result.times.summary()}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
