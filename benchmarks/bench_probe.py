"""Linear-probe training speed: epochs/s at batch size 1 (the reference's) vs padded batches.

    python benchmarks/bench_probe.py                                   # 2,000 files of L≈100, D 768
    python benchmarks/bench_probe.py --files 300 --batch_sizes 1 64    # smaller, e.g. on a laptop CPU
    python benchmarks/bench_probe.py --device cuda --precisions fp32 fp16

One epoch is what train_cls.py does per epoch: a training pass over 80% of the files
(clamp2.probe.train.train_epoch: forward, cross-entropy on the softmax, backward, AdamW) and an
fp32 evaluation of the other 20% (clamp2.probe.train.predict). Files are synthetic per-position
features held in memory (as train_cls.py keeps sets under --cache_gb), with lengths drawn
uniformly from --length ± 20%, so batches really pad. Each line gives epochs/s, training
files/s and the speed-up over batch size 1; a last check prints the largest difference between
the evaluation probabilities at batch size 1 and at the largest batch size (same weights).
"""

from __future__ import annotations

import statistics
import sys
import time

import numpy as np
import torch

from clamp2.cli import ArgumentParser
from clamp2.distributed import DistInfo
from clamp2.probe.data import EpochSampler, FeatureSet, ProbeDataset
from clamp2.probe.model import LinearProbe
from clamp2.probe.train import make_loader, predict, train_epoch
from clamp2.training.loop import Precision

CLASSES = 10


def synthetic_features(files: int, length: int, dim: int, seed: int = 0) -> tuple[FeatureSet, list[int]]:
    rng = np.random.default_rng(seed)
    means = rng.normal(size=(CLASSES, dim)).astype(np.float32) * 0.1
    features, targets = FeatureSet(arrays=[]), []
    low, high = max(1, int(length * 0.8)), int(length * 1.2)
    for index in range(files):
        target = index % CLASSES
        positions = int(rng.integers(low, high + 1))
        features.arrays.append(means[target] + rng.normal(size=(positions, dim)).astype(np.float32))
        features.paths.append(f"c{target}_{index}.npy")
        features.labels.append(f"c{target}")
        features.lengths.append(positions)
        features.dims.append(dim)
        features.kinds.append("per-position")
        targets.append(target)
    return features, targets


def epoch_seconds(features: FeatureSet, targets: list[int], batch_size: int, device: torch.device,
                  precision: Precision, epochs: int, hidden: int) -> float:
    """Median seconds of one training + evaluation epoch (after one untimed epoch)."""
    split = int(len(targets) * 0.8)
    train_set = ProbeDataset(features, range(split), targets[:split])
    eval_set = ProbeDataset(features, range(split, len(targets)), targets[split:])
    torch.manual_seed(0)
    model = LinearProbe(features.dims[0], CLASSES, hidden).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.scaled)
    sampler = EpochSampler(train_set.targets, shuffle=True, seed=42)
    loader = make_loader(train_set, sampler, batch_size, 0, device)
    info = DistInfo(device=device)
    times = []
    for epoch in range(epochs + 1):
        sampler.set_epoch(epoch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        train_epoch(model, loader, optimizer, lr_sched, scaler, precision, info)
        predict(model, eval_set, batch_size, info, CLASSES)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if epoch:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def largest_difference(features: FeatureSet, targets: list[int], batch_size: int, device: torch.device,
                       hidden: int) -> float:
    torch.manual_seed(0)
    model = LinearProbe(features.dims[0], CLASSES, hidden).to(device)
    dataset = ProbeDataset(features, range(len(targets)), targets)
    info = DistInfo(device=device)
    return float(np.abs(predict(model, dataset, 1, info, CLASSES)
                        - predict(model, dataset, batch_size, info, CLASSES)).max())


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=2000, help="number of feature files (2000)")
    parser.add_argument("--length", type=int, default=100, help="mean positions per file (100)")
    parser.add_argument("--dim", type=int, default=768, help="feature size D (768)")
    parser.add_argument("--hidden", type=int, default=768, help="probe hidden size (768)")
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 64], help="batch sizes timed (1 64)")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per setting (median; 2)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "fp16", "bf16"), default=["fp32"],
                        help="training precision on CUDA (the CPU is fp32); evaluation is always fp32")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    features, targets = synthetic_features(args.files, args.length, args.dim)
    if device.type == "cuda":
        features.move_to(device)  # as train_cls.py does with cached features
    print(f"torch {torch.__version__}, {device.type}"
          + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else f", {torch.get_num_threads()} threads")
          + f"; {args.files} files, L {min(features.lengths)}..{max(features.lengths)}, D {args.dim}, "
            f"hidden {args.hidden}", flush=True)
    precisions = args.precisions if device.type == "cuda" else ["fp32"]
    for precision_name in precisions:
        precision = Precision.choose(device, precision_name)
        baseline = None
        for batch_size in args.batch_sizes:
            seconds = epoch_seconds(features, targets, batch_size, device, precision, args.epochs, args.hidden)
            baseline = baseline or seconds
            print(f"{str(precision):28s} batch {batch_size:4d}  {1 / seconds:8.3f} epochs/s  "
                  f"{int(args.files * 0.8) / seconds:9.1f} training files/s  {baseline / seconds:6.1f}x",
                  flush=True)
    difference = largest_difference(features, targets, max(args.batch_sizes), device, args.hidden)
    print(f"largest |p(batch 1) - p(batch {max(args.batch_sizes)})| over all files: {difference:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
