"""Training throughput: samples/s, the loss after a fixed number of steps and (CUDA) MFU of M3, CLaMP 2 and
both CLaMP 3 stages.

    python benchmarks/bench_train.py                                 # CPU, small config, every variant
    python benchmarks/bench_train.py --configs small default --steps 3 --warmup 1 --threads 2
    python benchmarks/bench_train.py --device cuda --precision bf16  # default config, MFU (< 3 min on an H200)
    python benchmarks/bench_train.py --variants m3 m3-before --profile   # where a step's time goes
    python benchmarks/bench_train.py --device cuda --precision bf16 --compile --warmup 5   # the trainers' --compile

Batches are real: pieces of music21's corpus converted to interleaved ABC and MTF (built once,
cached in --data) with texts made from their metadata, run through the trainers' datasets
(random truncation, corruption, text dropout), collated, then fed to the trainers' own
:func:`clamp2.training.loop.train_step` (forward, backward, AdamW, schedule; AMP and gradient
scaling for fp16). Models start from seeded random weights (no downloads; the text encoder has
XLM-R's shape, the tokenizer is the tests' tiny one), so the loss after ``--warmup + --steps``
steps is a fingerprint: the same on every run of one machine and precision. Each line gives the
median step time (on the CPU also samples per CPU-second of the process, steadier than wall time
on a shared machine), and ``data``: the samples per second one DataLoader worker makes (the
batches are made in this process, as a worker makes them) and so how many workers
(``--num_workers``) keep the device fed. ``back to back``: the same timed batches again, one after
another as ``train_epoch`` runs them (each loss read once the next step is queued), timed as a
whole: the rate of a training run, with no idle device between steps.

Variants (``--variants``): ``m3`` and ``clamp2`` train as the trainers do now (fused AdamW; M3's
decoder over length groups; patches embedded by column lookup; CLaMP 2 batches padded to their
longest text and piece).
``*-reference`` computes as the reference does (AdamW's default kernel; the one-hot Linear patch
embedding; M3 decodes all PATCH_SIZE
positions of every patch; CLaMP 2 padded to MAX_TEXT_LENGTH/PATCH_LENGTH; determinism = seeds and
cuDNN flags). ``*-before`` is this project before issue 19: the reference's computation plus
``torch.use_deterministic_algorithms`` (which also fills every new tensor with NaN).
``clamp3s`` / ``clamp3a`` are CLaMP 3's symbolic and audio stages as their trainers run them (the
other modality frozen and out of the optimizer, batches padded to their longest sample, fused
AdamW); ``clamp3s-reference`` / ``clamp3a-reference`` compute as the reference's trainers (unfused
AdamW over the trainable parameters, texts and music padded to MAX_TEXT_LENGTH and
PATCH_LENGTH / MAX_AUDIO_LENGTH). The audio stage's inputs are MERT-shaped arrays ``[1, n, width]``
(n = the piece's ABC line count, at least 1; seeded random values, cached beside the corpus), run
through the trainer's dataset (zero rows, random head/tail/middle windows).
The losses of variants differ only by rounding and, with dropout, by the masks drawn for
differently shaped batches.

Configs: ``small`` = PATCH_LENGTH 64, 2 patch layers, 1 token layer, hidden 128; a 2-layer XLM-R of
hidden 128, MAX_TEXT_LENGTH 64, CLaMP 2 hidden 128; batches of 8. ``default`` = config.py's sizes
(PATCH_LENGTH 512, 12 + 3 layers, hidden 768, XLM-R base's shape, MAX_TEXT_LENGTH 128) with
config.py's batches on CUDA (16 M3, 128 CLaMP 2) and 4 / 8 on CPU (--m3_batch/--clamp2_batch).

MFU = model FLOPs per second / the device's peak at --precision (``--peak_tflops``; known for
H100/H200 SXM 989 bf16/fp16 dense, 67 fp32, PCIe/NVL cards less; A100 312 and 19.5:
``clamp2.benchmarking``). Model FLOPs are counted from the shapes of each batch as padded: a linear
layer of n_in → n_out over N positions is 2·N·n_in·n_out FLOPs forward; an attention layer over
sequences of length L (B of them, width h) adds 4·B·L²·h (scores and weighted sum); training is 3×
forward (backward = 2×), except the M3 patch embedding, whose one-hot input needs no gradient (2×);
the lookup the trainers use counts one addition per looked-up value instead of the one-hot matmul
(the reference variants count the matmul), forward and, in fp32, backward; under bf16/fp16 autocast
its weight gradient is the one-hot GEMM (as the reference's), counted as such. Per transformer layer
of width h and MLP 4h that is 24·N·h² + 4·B·L²·h forward. M3: the patch embedding (128·PATCH_SIZE →
h) and the encoder over B × L patches, the decoder over each picked patch at the length it is
decoded at (its length group's; PATCH_SIZE for the reference) plus its 128-way head. CLaMP 2: the
text encoder over B × T tokens, the music encoder over B × L patches and both projections (the
contrastive loss is negligible). CLaMP 3: the same with the stage's encoder (M3 over patches, or the
audio BERT over B × L rows of AUDIO_HIDDEN_SIZE); the frozen encoder of the other modality does not
run.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from clamp2.attention_arguments import ATTN_IMPLEMENTATION
from clamp2.benchmarking import device_peak_tflops
from clamp2.cli import ArgumentParser
from clamp2.quickstart.music21_corpus import build_music_files, corpus_musicxml_paths, piece_name
from clamp2.models.m3 import DECODE_LENGTH_STEP, M3Dims, M3Model, M3PatchEncoder
from clamp2.models.clamp2 import CLaMP2Model
from clamp2.models.clamp3 import AudioDims, CLaMP3Model
from clamp2.models.common import compile_transformers, transformer_flops as encoder_flops
from clamp2.patchilizer import NUM_CLASSES, M3Patchilizer
from clamp2.text_model import load_tokenizer
from clamp2.training.data import (AudioMusic, M3Dataset, PairItem, SymbolicMusic, TextMusicCollator,
                                  TextMusicDataset, TrainBatches, clamp3_training_text, collate_m3, read_pairs)
from clamp2.training.loop import Precision, lr_schedule, make_optimizer, one_step_late, train_step
from clamp2.training.tasks import CUDNN_ATTENTION, ContrastiveStep, frozen_modules, m3_loss

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = REPO_ROOT / "tests" / "data" / "vectors" / "tiny_text_model"
VARIANTS = ("m3", "m3-reference", "m3-before", "clamp2", "clamp2-reference", "clamp2-before", "clamp3s",
            "clamp3s-reference", "clamp3a", "clamp3a-reference")
MODALITY = {"clamp3s": "symbolic", "clamp3a": "audio"}


@dataclass(frozen=True)
class BenchConfig:
    dims: M3Dims
    text_hidden: int
    text_layers: int
    max_text_length: int
    clamp2_hidden: int
    m3_batch: int
    clamp2_batch: int
    m3_batch_cuda: int
    clamp2_batch_cuda: int
    audio: AudioDims = AudioDims()


CONFIGS = {
    "small": BenchConfig(M3Dims(64, 64, 2, 1, 128), 128, 2, 64, 128, 8, 8, 8, 8, AudioDims(128, 2, 16)),
    "default": BenchConfig(M3Dims(), 768, 12, 128, 768, 4, 8, 16, 128),
}


# -- data ----------------------------------------------------------------------------------------------

# Composers whose scores convert in seconds; the few long scores (tens of seconds each) are left out.
COMPOSERS = ("bach", "mozart", "haydn", "handel", "monteverdi", "joplin")
MAX_SCORE_BYTES = 30_000


def build_data(folder: Path, scores: int) -> Path:
    """Corpus pieces as ABC + MTF and a JSONL of pairs with metadata and summaries (cached)."""
    jsonl = folder / "pairs.jsonl"
    if jsonl.is_file():  # built by an earlier run (or copied to a machine without music21)
        return jsonl
    paths = [path for path in corpus_musicxml_paths(COMPOSERS, per_composer=math.ceil(scores / len(COMPOSERS)))
             if path.stat().st_size <= MAX_SCORE_BYTES][:scores]
    build_music_files(folder, paths, progress=False)
    lines = []
    for index, path in enumerate(paths):
        name = piece_name(path)
        files = [f"{kind}/{name}.{kind}" for kind in ("abc", "mtf") if (folder / kind / f"{name}.{kind}").is_file()]
        if not files:
            continue
        composer = path.parent.name.capitalize()
        # Summaries of varied lengths, as real ones are.
        detail = " It moves through several keys and closes with a cadence." * (index % 4)
        lines.append(json.dumps({
            "title": path.stem, "composer": composer, "genres": ["Classical"],
            "summary_en": f"A piece by {composer}, {path.stem}.{detail}",
            "summary_nen": {"language": "German", "summary": f"Ein Stück von {composer}.{detail}"},
            "filepaths": files}))
    jsonl.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return jsonl


def batches_of(dataset, collate, batch_size: int, count: int) -> tuple:
    """``count`` batches of the first epochs, as one process of the trainer draws them, and the seconds taken.

    They are made in this process exactly as one DataLoader worker makes them (read, tokenize,
    corrupt or drop text, collate), so ``count * batch_size / seconds`` is one worker's rate.
    """
    started = time.perf_counter()
    if len(dataset) < batch_size:
        sys.exit(f"error: {len(dataset)} samples, fewer than one batch of {batch_size}: raise --scores")
    sampler = TrainBatches(len(dataset), batch_size, seed=42)
    batches, epoch = [], 0
    while len(batches) < count:
        epoch += 1
        sampler.set_epoch(epoch)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        for indices in sampler:
            batches.append(collate([dataset[i] for i in indices]))
            if len(batches) == count:
                break
    return batches[:count], time.perf_counter() - started


def audio_pairs(pairs: list, folder: Path, width: int) -> list:
    """Each pair with a MERT-shaped array ``[1, n, width]`` instead of its music (cached, seeded by its name)."""
    import numpy as np

    items = []
    for item in pairs:
        path = folder / f"audio_{width}" / (item.music_paths[0].stem + ".npy")
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            rows = max(1, item.music_paths[0].read_text(encoding="utf-8").count("\n"))
            seed = int.from_bytes(path.stem.encode()[:8].ljust(8, b"\0"), "little")
            np.save(path, np.random.default_rng(seed).normal(0, 0.5, (1, rows, width)).astype(np.float32))
        items.append(PairItem(item.fields, [path]))
    return items


def repeated(items: list, batch_size: int) -> list:
    """``items`` repeated to fill two batches (each copy draws its own crops, corruption and texts)."""
    return items * math.ceil(2 * batch_size / len(items))


# -- models and FLOPs ----------------------------------------------------------------------------------

def decode_full_length(decoder) -> None:
    """Decode every picked patch over all PATCH_SIZE positions in one call, as the reference does."""
    decoder.grouped_loss_sum = decoder.loss_sum


def text_encoder(config: BenchConfig):
    from transformers import AutoModel, XLMRobertaConfig

    # XLM-R base's published shape (vocabulary included) when hidden is 768; a narrower copy otherwise.
    text_config = XLMRobertaConfig(vocab_size=250002, hidden_size=config.text_hidden,
                                   num_hidden_layers=config.text_layers, num_attention_heads=config.text_hidden // 64,
                                   intermediate_size=config.text_hidden * 4,
                                   max_position_embeddings=config.max_text_length + 2, type_vocab_size=1,
                                   pad_token_id=1, bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5)
    return AutoModel.from_config(text_config, attn_implementation=ATTN_IMPLEMENTATION)


def patch_embedding_flops(batch: int, length: int, dims: M3Dims, lookup: bool = True) -> float:
    """Forward FLOPs of the patch embedding: the one-hot Linear's matmul, or the lookup's additions.

    Counted as computed, so that MFU does not credit the lookup with the one-hot's multiplications by zero.
    """
    if lookup:
        return 1.0 * batch * length * dims.patch_size * dims.hidden_size
    return 2.0 * batch * length * NUM_CLASSES * dims.patch_size * dims.hidden_size


def patch_embedding_train_flops(batch: int, length: int, dims: M3Dims, lookup: bool = True,
                                autocast: bool = False) -> float:
    """Forward and backward FLOPs of the patch embedding, as computed (its one-hot input needs no gradient).

    The one-hot Linear: its matmul, then the weight gradient's matmul of the same size. The lookup: its
    additions forward; backward, embedding_bag's additions in fp32, but under autocast (bf16/fp16)
    LookupSum's weight gradient, the one-hot GEMM the reference computes too (clamp2/models/m3.py).
    """
    forward = patch_embedding_flops(batch, length, dims, lookup)
    if lookup and autocast:
        return forward + patch_embedding_flops(batch, length, dims, lookup=False)
    return 2 * forward


def embed_as_reference(model) -> None:
    """Train with the one-hot Linear patch embedding, as the reference does (not the column lookup)."""
    for module in model.modules():
        if isinstance(module, M3PatchEncoder):
            module.lookup_in_training = False


def decoded_lengths(batch: dict, dims: M3Dims, grouped: bool) -> torch.Tensor:
    """The length each picked patch is decoded at: its DECODE_LENGTH_STEP group's, or PATCH_SIZE."""
    targets = batch["target_patches"].reshape(len(batch["target_patches"]), -1, dims.patch_size)
    picked = targets[batch["selected_indices"].bool()]
    if not grouped:
        return torch.full((len(picked),), dims.patch_size)
    last = ((picked != 0) * torch.arange(1, dims.patch_size + 1)).amax(dim=1)
    return ((last + DECODE_LENGTH_STEP - 1) // DECODE_LENGTH_STEP * DECODE_LENGTH_STEP).clamp(max=dims.patch_size)


def m3_train_flops(batch: dict, dims: M3Dims, grouped: bool, lookup: bool = True, autocast: bool = False) -> float:
    b, n = batch["input_masks"].shape
    h = dims.hidden_size
    decoder = sum(encoder_flops(1, int(length), h, dims.token_num_layers) + 2.0 * int(length) * h * NUM_CLASSES
                  for length in decoded_lengths(batch, dims, grouped))
    forward = encoder_flops(b, n, h, dims.patch_num_layers) + decoder
    return 3 * forward + patch_embedding_train_flops(b, n, dims, lookup, autocast)


def clamp3_train_flops(batch: dict, config: BenchConfig, modality: str, lookup: bool = True,
                       autocast: bool = False) -> float:
    if modality == "symbolic":
        return clamp2_train_flops(batch, config, lookup, autocast)
    b, t = batch["text_masks"].shape
    n = batch["music_masks"].shape[1]
    audio = config.audio
    forward = (encoder_flops(b, t, config.text_hidden, config.text_layers)
               + encoder_flops(b, n, audio.hidden_size, audio.num_layers)
               + 2.0 * b * (config.text_hidden + audio.hidden_size) * config.clamp2_hidden)
    return 3 * forward


def clamp2_train_flops(batch: dict, config: BenchConfig, lookup: bool = True, autocast: bool = False) -> float:
    b, t = batch["text_masks"].shape
    n = batch["music_masks"].shape[1]
    dims = config.dims
    forward = (encoder_flops(b, t, config.text_hidden, config.text_layers)
               + encoder_flops(b, n, dims.hidden_size, dims.patch_num_layers)
               + 2.0 * b * (config.text_hidden + dims.hidden_size) * config.clamp2_hidden)
    return 3 * forward + patch_embedding_train_flops(b, n, dims, lookup, autocast)


# -- measuring -------------------------------------------------------------------------------------------

def measure(model, batches, compute_loss, device, precision: Precision, steps: int, warmup: int,
            variant: str, profile: bool = False) -> tuple[float, float, float, float]:
    """(median wall seconds per step, median CPU seconds of this process per step, loss of the last step,
    seconds per step back to back).

    The median times each step alone: the device idle at its start, its loss read at its end. Then
    the same batches run back to back as ``train_epoch`` runs them (a loss read once the next step
    is queued), timed as a whole: the steady rate of a training run (not with ``profile``).
    """
    model = model.to(device).train()
    batches = [{k: v.to(device) for k, v in batch.items()} for batch in batches]
    now = "-" not in variant
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(model, 1e-4) if now else torch.optim.AdamW(trainable, lr=1e-4)
    lr_sched = lr_schedule(optimizer, 0)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.scaled)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(variant.endswith("-before"), warn_only=True)
    times, cpu_times, loss = [], [], float("nan")
    profiler = None
    try:
        for step in range(warmup + steps):
            if profile and step == warmup:
                profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]
                                                  + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda"
                                                     else []))
                profiler.__enter__()
            if device.type == "cuda":
                torch.cuda.synchronize()
            start, cpu_start = time.perf_counter(), time.process_time()
            loss = train_step(model, batches[step], compute_loss, optimizer, lr_sched, scaler, precision).item()
            if step >= warmup:
                times.append(time.perf_counter() - start)
                cpu_times.append(time.process_time() - cpu_start)
        steady = float("nan")
        if not profile and steps:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for late in one_step_late(train_step(model, batches[step], compute_loss, optimizer, lr_sched, scaler,
                                                 precision) for step in range(warmup, warmup + steps)):
                late.item()
            steady = (time.perf_counter() - start) / steps
    finally:
        if profiler is not None:
            profiler.__exit__(None, None, None)
        torch.use_deterministic_algorithms(previous)
    if profiler is not None:
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(f"profile of {variant}, {steps} steps:\n" + profiler.key_averages().table(sort_by=sort, row_limit=12))
    return statistics.median(times), statistics.median(cpu_times), loss, steady


def run(variant: str, name: str, config: BenchConfig, device: torch.device, precision_name: str, data, args) -> None:
    task = variant.split("-")[0]
    precision = Precision.choose(device, precision_name, CUDNN_ATTENTION[MODALITY.get(task, task)])
    cuda = device.type == "cuda"
    count = args.warmup + args.steps
    patchilizer = M3Patchilizer(config.dims.patch_size, config.dims.patch_length)
    lookup = "-" not in variant  # the reference variants embed patches through the one-hot Linear
    autocast = precision.dtype is not None
    torch.manual_seed(0)
    if task == "m3":
        batch_size = args.m3_batch or (config.m3_batch_cuda if cuda else config.m3_batch)
        dataset = M3Dataset(repeated(data["music"], batch_size), patchilizer, 0.45, training=True)
        batches, load_seconds = batches_of(dataset, collate_m3, batch_size, count)
        model, loss_fn = M3Model(config.dims), m3_loss
        if "-" in variant:
            decode_full_length(model.decoder)
        elif args.m3_decode_groups:
            model.decoder.decode_groups_on_gpu = True
        flops = [m3_train_flops(b, config.dims, grouped="-" not in variant, lookup=lookup, autocast=autocast)
                 for b in batches]
    elif task in MODALITY:
        modality = MODALITY[task]
        batch_size = args.clamp2_batch or (config.clamp2_batch_cuda if cuda else config.clamp2_batch)
        tokenizer = data["tokenizer"]
        if modality == "symbolic":
            music, items, length, size = SymbolicMusic(patchilizer), data["pairs"], config.dims.patch_length, \
                config.dims.patch_size
        else:
            music, length, size = AudioMusic(config.audio.hidden_size, config.audio.max_length), \
                config.audio.max_length, config.audio.hidden_size
            items = audio_pairs(data["pairs"], args.data, config.audio.hidden_size)
        dataset = TextMusicDataset(repeated(items, batch_size), tokenizer, music, config.max_text_length,
                                   training=True, train_text=clamp3_training_text)
        collate = TextMusicCollator(tokenizer.pad_token_id, config.max_text_length, length, size,
                                    pad_to_longest="-" not in variant, music_pad=music.pad_value)
        batches, load_seconds = batches_of(dataset, collate, batch_size, count)
        model = CLaMP3Model(text_encoder(config), config.dims, config.audio, config.clamp2_hidden)
        for module in frozen_modules(modality, False):
            getattr(model, module).requires_grad_(False)
        loss_fn = ContrastiveStep(1.0, modality)
        flops = [clamp3_train_flops(b, config, modality, lookup, autocast) for b in batches]
    else:
        batch_size = args.clamp2_batch or (config.clamp2_batch_cuda if cuda else config.clamp2_batch)
        tokenizer = data["tokenizer"]
        dataset = TextMusicDataset(repeated(data["pairs"], batch_size), tokenizer, patchilizer, config.max_text_length,
                                   training=True)
        collate = TextMusicCollator(tokenizer.pad_token_id, config.max_text_length, config.dims.patch_length,
                                    config.dims.patch_size, pad_to_longest="-" not in variant)
        batches, load_seconds = batches_of(dataset, collate, batch_size, count)
        model, loss_fn = CLaMP2Model(text_encoder(config), config.dims, config.clamp2_hidden), ContrastiveStep(1.0)
        flops = [clamp2_train_flops(b, config, lookup, autocast) for b in batches]
    if not lookup:
        embed_as_reference(model)
    label = f"{variant:20s} {name:8s} {device.type:4s} {str(precision):28s} batch {batch_size:4d}"
    if task == "m3" and args.m3_decode_groups and cuda and "-" not in variant:
        label += " groups"
    if args.compile:
        compile_transformers(model, backend=args.compile_backend)  # as the trainers' --compile; --warmup absorbs it
        label += " compiled" if args.compile_backend == "inductor" else f" compiled ({args.compile_backend})"
    try:
        seconds, cpu_seconds, loss, steady = measure(model, batches, loss_fn, device, precision, args.steps,
                                                     args.warmup, variant, args.profile)
    except torch.cuda.OutOfMemoryError:
        print(f"{label}  out of memory", flush=True)
        return
    finally:
        del model
        if cuda:
            torch.cuda.empty_cache()
    line = (f"{label}  {batch_size / seconds:9.2f} samples/s  {seconds * 1000:9.1f} ms/step  "
            f"loss after {count} steps {loss:.6f}")
    # One loading worker's rate against the step's: how many DataLoader workers keep the device fed.
    loaded = count * batch_size / load_seconds
    line += f"  data {loaded:8.1f} samples/s per worker (≥ {math.ceil(batch_size / seconds / loaded)} to keep pace)"
    if not cuda:
        # Per CPU-second of this process: what the step costs, steadier than wall time on a shared machine.
        line += f"  {batch_size / cpu_seconds:9.2f} samples/CPU-s"
    peak = device_peak_tflops(device, precision_name, args.peak_tflops)
    if cuda and peak:
        achieved = statistics.median(flops[args.warmup:]) / seconds
        line += f"  {achieved / 1e12:7.1f} TFLOP/s  MFU {achieved / (peak * 1e12):6.1%}"
    if not math.isnan(steady):
        line += f"  back to back {batch_size / steady:9.2f} samples/s"
        if cuda and peak:
            line += f" (MFU {statistics.mean(flops[args.warmup:]) / steady / (peak * 1e12):6.1%})"
    print(line, flush=True)


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to train (cpu)")
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=None,
                        help="default: small on CPU, default on CUDA")
    parser.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32",
                        help="fp16/bf16 autocast on CUDA only (the CPU trains in fp32)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=None,
                        help="default: all on CPU; m3, clamp2, clamp3s and clamp3a on CUDA")
    parser.add_argument("--steps", type=int, default=8, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--m3_batch", type=int, default=None, help="M3 batch size (default: 16 on CUDA, 4 on CPU)")
    parser.add_argument("--clamp2_batch", type=int, default=None,
                        help="CLaMP 2 batch size (default: 128 on CUDA, 8 on CPU)")
    parser.add_argument("--scores", type=int, default=36, help="corpus scores (each gives an ABC and an MTF file)")
    parser.add_argument("--data", type=Path, default=Path("/tmp/clamp2_bench_train"), help="cache of the data")
    parser.add_argument("--profile", action="store_true",
                        help="print torch.profiler's top operators of the timed steps of each variant")
    parser.add_argument("--peak_tflops", type=float, default=None, help="device peak for MFU (default: by name)")
    parser.add_argument("--m3_decode_groups", action="store_true",
                        help="M3 on CUDA: decode in length groups, as on the CPU, instead of one full-length pass "
                             "(M3TokenDecoder.decode_groups_on_gpu); the label says 'groups'")
    parser.add_argument("--compile", action="store_true",
                        help="compile the transformers as the trainers' --compile (raise --warmup: the first steps "
                             "compile)")
    parser.add_argument("--compile_backend", default="inductor",
                        help="torch.compile backend of --compile (eager: traces the graphs without generating kernels, "
                             "seconds instead of minutes on a CPU; proves the wiring, not the speed)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    configs = args.configs or (["default"] if device.type == "cuda" else ["small"])
    variants = args.variants or (["m3", "clamp2", "clamp3s", "clamp3a"] if device.type == "cuda" else list(VARIANTS))
    started = time.perf_counter()
    pairs = read_pairs(build_data(args.data, args.scores), require_non_english=True)
    data = {"music": [path for item in pairs for path in item.music_paths], "pairs": pairs,
            "tokenizer": load_tokenizer(str(TOKENIZER))}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", {torch.cuda.get_device_name()}" if device.type == "cuda" else "")
          + f"; {len(data['music'])} music files, {len(data['pairs'])} pairs ({time.perf_counter() - started:.0f} s)",
          flush=True)
    for name in configs:
        for variant in variants:
            run(variant, name, CONFIGS[name], device, args.precision, data, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
