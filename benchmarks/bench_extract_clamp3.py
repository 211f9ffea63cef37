"""Throughput of CLaMP 3 feature extraction (symbolic and audio) against the original's scheme.

    python benchmarks/bench_extract_clamp3.py [--symbolic_files 40] [--audio_files 40] [--threads 2] [--global_only]
    taskset -c 0,1 python benchmarks/bench_extract_clamp3.py --threads 2      # the issue's 2-core setting
    python benchmarks/bench_extract_clamp3.py --device cuda --dtype bf16 --batch_tokens 16384 --global_only

CLaMP 3 at the published sizes (M3 symbolic encoder and audio BERT: 12 layers, 768 wide; random
weights: speed does not depend on the values; the text tower is not timed: it is CLaMP 2's) on
interleaved ABC and MTF built from music21's corpus (cached in --data, as bench_extract.py) and on
MERT feature arrays of songs of 30 s to 10 min (random values, [1, n, 768]). The original's scheme
runs one window at a time, every symbolic window padded to PATCH_LENGTH and every audio window to
MAX_AUDIO_LENGTH; this project's runs the same files through code/extract_clamp3.py's runners on
the shared extraction core (windows of many files grouped by length, padded to the longest). Both
are timed in the same run on the same files, global features (--get_global) and per-position.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from clamp2.cli import ArgumentParser
from clamp2.extraction.core import (AudioEncoder, KindRunner, MusicEncoder, autocast_context, extract_jobs, plan_jobs,
                                    window_starts)
from clamp2.models.clamp3 import AudioDims, CLaMP3Model
from clamp2.models.m3 import M3Dims
from clamp2.patchilizer import PAD_TOKEN_ID, M3Patchilizer
from clamp2.quickstart.music21_corpus import build_music_files, corpus_musicxml_paths

KINDS = {".abc": "symbolic", ".mtf": "symbolic", ".npy": "audio"}


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("/tmp/clamp2_bench_music"), help="cache of corpus-derived files")
    parser.add_argument("--symbolic_files", type=int, default=40, help="ABC + MTF files (half each)")
    parser.add_argument("--audio_files", type=int, default=40, help="MERT feature arrays (30 s to 10 min of audio)")
    parser.add_argument("--batch_size", type=int, default=16, help="windows per forward pass (16)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--global_only", action="store_true", help="time --get_global only")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32", help="bf16/fp16: CUDA autocast")
    parser.add_argument("--batch_tokens", type=int, default=0, help="extract_clamp3.py --batch_tokens (0: off)")
    return parser.parse_args(argv)


def tiny_text_tower():
    from transformers import XLMRobertaConfig, XLMRobertaModel

    return XLMRobertaModel(XLMRobertaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                            intermediate_size=64, max_position_embeddings=40))


def reference_scheme(model, files, runners, get_global):
    """The original: per file, per window, one forward pass with the window padded to the maximum length."""
    for path, kind in files:
        runner = runners[kind]
        sequence = runner.encode(path)
        outputs = []
        for start in window_starts(len(sequence), runner.max_length):
            window = sequence[start:start + runner.max_length]
            padded = torch.full((1, runner.max_length) + tuple(window.shape[1:]), runner.pad_value, dtype=runner.dtype)
            padded[0, : len(window)] = window
            masks = torch.zeros(1, runner.max_length, dtype=torch.long)
            masks[0, : len(window)] = 1
            outputs.append(runner.forward(padded, masks))
    return outputs


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = args.data
    half = args.symbolic_files // 2
    if len(sorted(data.glob("abc/*.abc"))) < half or len(sorted(data.glob("mtf/*.mtf"))) < half:
        build_music_files(data, corpus_musicxml_paths(per_composer=None)[: max(half, 60)])
    audio_dir = data / "mert_clamp3"
    audio_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(args.audio_files):
        path = audio_dir / f"song{i:03d}.npy"
        if not path.exists():  # 30 s to 10 min: 6 to 120 five-second segments
            np.save(path, rng.standard_normal((1, int(rng.integers(6, 121)), 768)).astype(np.float32))
    symbolic = sorted(data.glob("abc/*.abc"))[:half] + sorted(data.glob("mtf/*.mtf"))[:half]
    audio = sorted(audio_dir.glob("*.npy"))[: args.audio_files]

    torch.manual_seed(0)
    dims, audio_dims = M3Dims(), AudioDims()
    device = torch.device(args.device)
    model = CLaMP3Model(tiny_text_tower(), dims, audio_dims, hidden_size=768).eval().to(device)
    precision = autocast_context(device, args.dtype)
    encode_symbolic = MusicEncoder(M3Patchilizer(dims.patch_size, dims.patch_length), remove_unit_length=True,
                                   also_mtf=True)
    lengths = [len(encode_symbolic(p)) for p in symbolic]
    audio_rows = [int(np.load(p, mmap_mode="r").shape[1]) + 2 for p in audio]
    windows = (sum(len(window_starts(n, dims.patch_length)) for n in lengths),
               sum(len(window_starts(n, audio_dims.max_length)) for n in audio_rows))
    print(f"torch threads {torch.get_num_threads()}; {len(symbolic)} symbolic files (mean {np.mean(lengths):.0f} patches, "
          f"{windows[0]} windows), {len(audio)} MERT files (mean {np.mean(audio_rows):.0f} rows, {windows[1]} windows)")

    results = {}
    for get_global in ((True,) if args.global_only else (True, False)):
        def forward(states, global_):
            def run(inputs, masks):
                with precision:
                    return global_(inputs, masks) if get_global else states(inputs, masks)
            return run

        runners = {"symbolic": KindRunner(encode_symbolic, forward(model.symbolic_states, model.symbolic_global),
                                          dims.patch_length, PAD_TOKEN_ID),
                   "audio": KindRunner(AudioEncoder(768), forward(model.audio_states, model.audio_global),
                                       audio_dims.max_length, 0.0, dtype=torch.float32)}
        mode = "global" if get_global else "per-position"
        for label, files in (("symbolic", symbolic), ("audio", audio)):
            with torch.inference_mode():
                start = time.perf_counter()
                reference_scheme(model, [(p, KINDS[p.suffix]) for p in files], runners, get_global)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                reference = time.perf_counter() - start
            with tempfile.TemporaryDirectory() as out:
                plan = plan_jobs(data, Path(out), kinds=KINDS)
                wanted = set(files)
                jobs = [job for job in plan.jobs if job.path in wanted]
                start = time.perf_counter()
                result = extract_jobs(jobs, runners, device, not get_global, batch_size=args.batch_size,
                                      files_per_chunk=256, num_workers=0, batch_tokens=args.batch_tokens)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                ours = time.perf_counter() - start
                assert result.written == len(files), result.failures[:3]
            results[(mode, label)] = reference / ours
            print(f"{mode:12s} {label:8s}: original scheme {reference:7.1f} s ({len(files) / reference:6.2f} files/s), "
                  f"extract_clamp3 {ours:7.1f} s ({len(files) / ours:6.2f} files/s): {reference / ours:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
