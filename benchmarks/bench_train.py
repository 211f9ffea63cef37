"""Training throughput: samples/s of one CLaMP 2 and one M3 optimizer step (the trainers' own step).

    python benchmarks/bench_train.py                      # small config on CPU (+ default config on GPU if any)
    python benchmarks/bench_train.py --device cuda --configs default --precisions fp32 fp16 bf16
    python benchmarks/bench_train.py --configs small --steps 20 --threads 2

Each measurement builds the model once, runs ``--warmup`` untimed steps, then times ``--steps``
steps of :func:`clamp2.training.loop.train_step` (forward, backward, AdamW, schedule; AMP and
gradient scaling when the precision is fp16) and prints one line per (task, config, precision).
Models are randomly initialised (no downloads). Music batches are real pieces (the spec vectors'
files, patched and repeated to fill the window) padded to PATCH_LENGTH as the reference does; texts
are random token ids of MAX_TEXT_LENGTH, so every sample costs the most it can.

- ``small``: PATCH_LENGTH 64, 2 patch layers, 1 token layer, hidden 128; a 2-layer XLM-R of hidden 128,
  MAX_TEXT_LENGTH 64, CLaMP 2 hidden 128; batches of 8.
- ``default``: config.py's defaults (PATCH_LENGTH 512, 12 + 3 layers, hidden 768, XLM-R base size,
  MAX_TEXT_LENGTH 128), batches of 16 (M3) and 32 (CLaMP 2) per GPU unless --m3_batch/--clamp2_batch.
"""

from __future__ import annotations

import math
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from clamp2.cli import ArgumentParser
from clamp2.models import CLaMP2Model, M3Dims, M3Model
from clamp2.patchilizer import M3Patchilizer
from clamp2.training.corruption import corrupt_patches
from clamp2.training.data import collate_m3, read_music
from clamp2.training.loop import Precision, train_step, warmup_then_constant
from clamp2.training.tasks import ContrastiveStep, m3_loss

REPO_ROOT = Path(__file__).resolve().parents[1]
MUSIC_DIR = REPO_ROOT / "tests" / "data" / "vectors" / "extract_in"


@dataclass(frozen=True)
class BenchConfig:
    dims: M3Dims
    text_hidden: int
    text_layers: int
    max_text_length: int
    clamp2_hidden: int
    m3_batch: int
    clamp2_batch: int


CONFIGS = {
    "small": BenchConfig(M3Dims(64, 64, 2, 1, 128), 128, 2, 64, 128, 8, 8),
    "default": BenchConfig(M3Dims(), 768, 12, 128, 768, 16, 32),
}


def text_encoder(config: BenchConfig):
    from transformers import AutoModel, XLMRobertaConfig

    # XLM-R base's published shape (vocabulary included) when hidden is 768; a narrower copy otherwise.
    text_config = XLMRobertaConfig(vocab_size=250002, hidden_size=config.text_hidden,
                                   num_hidden_layers=config.text_layers, num_attention_heads=config.text_hidden // 64,
                                   intermediate_size=config.text_hidden * 4,
                                   max_position_embeddings=config.max_text_length + 2, type_vocab_size=1,
                                   pad_token_id=1, bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5)
    return AutoModel.from_config(text_config)


def music_windows(dims: M3Dims, count: int) -> list[torch.Tensor]:
    """``count`` windows of PATCH_LENGTH real patches (pieces repeated to fill the window)."""
    patchilizer = M3Patchilizer(dims.patch_size, dims.patch_length)
    files = sorted(MUSIC_DIR.glob("*/*.abc")) + sorted(MUSIC_DIR.glob("*/*.mtf"))
    if not files:
        sys.exit(f"no music files under {MUSIC_DIR}: the checkout is incomplete")
    windows = []
    for index in range(count):
        patches = patchilizer.encode(read_music(files[index % len(files)]), add_special_patches=True)
        patches = (patches * math.ceil(dims.patch_length / len(patches)))[: dims.patch_length]
        windows.append(torch.tensor(patches))
    return windows


def m3_batch(dims: M3Dims, batch_size: int) -> dict:
    rng = random.Random(0)
    samples = []
    for window in music_windows(dims, batch_size):
        inputs, selected = corrupt_patches(window, 0.45, training=True, rng=rng)
        samples.append({"input_patches": inputs, "input_masks": torch.ones(len(window)), "selected_indices": selected,
                        "target_patches": window})
    return collate_m3(samples)


def clamp2_batch(config: BenchConfig, batch_size: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    music = torch.stack(music_windows(config.dims, batch_size))
    return {"text_inputs": torch.randint(5, 4000, (batch_size, config.max_text_length), generator=generator),
            "text_masks": torch.ones(batch_size, config.max_text_length),
            "music_inputs": music, "music_masks": torch.ones(batch_size, config.dims.patch_length)}


def measure(model, batch, compute_loss, device, precision: Precision, steps: int, warmup: int) -> float:
    """Median seconds per step."""
    model = model.to(device).train()
    batch = {k: v.to(device) for k, v in batch.items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    lr_sched = warmup_then_constant(optimizer, 1000)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.scaled)
    times = []
    for step in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        train_step(model, batch, compute_loss, optimizer, lr_sched, scaler, precision)  # .item() synchronises
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(task: str, name: str, config: BenchConfig, device: torch.device, precision_name: str, args) -> None:
    precision = Precision.choose(device, precision_name)
    torch.manual_seed(0)
    if task == "m3":
        batch_size = args.m3_batch or config.m3_batch
        model, batch, loss = M3Model(config.dims), m3_batch(config.dims, batch_size), m3_loss
    else:
        batch_size = args.clamp2_batch or config.clamp2_batch
        model = CLaMP2Model(text_encoder(config), config.dims, config.clamp2_hidden)
        batch, loss = clamp2_batch(config, batch_size), ContrastiveStep(1.0)
    try:
        seconds = measure(model, batch, loss, device, precision, args.steps, args.warmup)
    except torch.cuda.OutOfMemoryError:
        print(f"{task:7s} {name:8s} {device.type:5s} {str(precision):28s} batch {batch_size:4d}  out of memory")
        return
    finally:
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"{task:7s} {name:8s} {device.type:5s} {str(precision):28s} batch {batch_size:4d}  "
          f"{batch_size / seconds:9.1f} samples/s  {seconds * 1000:8.1f} ms/step", flush=True)


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="default: the small config on CPU, plus the default config on CUDA when available")
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=None)
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "fp16", "bf16"), default=None,
                        help="CUDA only (CPU is fp32); default fp32 and fp16 (AMP)")
    parser.add_argument("--tasks", nargs="+", choices=("clamp2", "m3"), default=["clamp2", "m3"])
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--m3_batch", type=int, default=None)
    parser.add_argument("--clamp2_batch", type=int, default=None)
    return parser.parse_args(argv)


def plan(args) -> list[tuple[str, torch.device, str]]:
    if args.device is not None:
        device = torch.device(args.device)
        configs = args.configs or (["default"] if device.type == "cuda" else ["small"])
        precisions = (args.precisions or ["fp32", "fp16"]) if device.type == "cuda" else ["fp32"]
        return [(c, device, p) for c in configs for p in precisions]
    runs = [(c, torch.device("cpu"), "fp32") for c in (args.configs or ["small"])]
    if torch.cuda.is_available():
        runs += [(c, torch.device("cuda"), p) for c in (args.configs or ["default"])
                 for p in (args.precisions or ["fp32", "fp16"])]
    return runs


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no CUDA device"))
    for name, device, precision in plan(args):
        for task in args.tasks:
            run(task, name, CONFIGS[name], device, precision, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
