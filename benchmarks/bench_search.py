"""Throughput of the semantic-search tools against their hardware floors.

    python benchmarks/bench_search.py [--metrics_sizes 2000 50000] [--index_rows 1000000] [--batch 1000]
                                      [--dim 768] [--device cpu|cuda] [--check] [--data DIR]

1. Metrics (semantic_search_metrics.py, end to end: reading the 2N .npy files included) at each
   N of --metrics_sizes, against the floor: the N x N x D float32 matrix product alone, run in the
   same row blocks. --check also ranks with a float64 brute force and compares the printed lines.
2. Index build rate (build_index.py on the reference folder of the largest N), first build and an
   unchanged re-run.
3. Exact top-10 over --index_rows x D rows memory-mapped from a .npy (what an index holds), warm:
   one query against the floor of reading the matrix once from memory, and a batch of --batch
   queries against the floor of the dense product alone (the machine's float32 matmul rate).

Synthetic data: references ~ N(0, 1), queries = reference + N(0, 6^2) noise (MRR about 0.5 at
D=768); files are written once and cached under --data. Every figure is printed with its ratio.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from clamp2.cli import ArgumentParser
from clamp2.search.feature_store import build_index, read_features, unique_by_key
from clamp2.search.retrieval import (Searcher, as_cpu_tensor, default_device, format_metrics, full_float32_matmul,
                              metrics_from_ranks, rank_true_matches, unit_rows)

NOISE = 6.0


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=Path("/tmp/clamp2_bench_search"), help="cache of generated files")
    parser.add_argument("--metrics_sizes", type=int, nargs="*", default=[2000, 50000],
                        help="N of the N x N retrieval-metrics runs (2000 50000)")
    parser.add_argument("--index_rows", type=int, default=1_000_000, help="rows of the search matrix (0: skip)")
    parser.add_argument("--batch", type=int, default=1000, help="queries of the batched search (1: skip it)")
    parser.add_argument("--dim", type=int, default=768, help="feature size D (768)")
    parser.add_argument("--device", default=default_device(), help="torch device (default: cuda when available)")
    parser.add_argument("--check", action="store_true", help="compare the metrics with a float64 brute force")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of the search figures (best kept)")
    parser.add_argument("--metrics_repeats", type=int, default=2, help="timed repeats of the metrics (best kept)")
    return parser.parse_args(argv)


def write_features(folder: Path, keys: list[str], matrix: np.ndarray) -> None:
    """One [1, D] .npy per row (skipped when the folder is complete from an earlier run)."""
    done = folder / ".complete"
    if done.exists():
        return
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for key, row in zip(keys, matrix):
        np.save(folder / f"{key}.npy", row[None])
    done.touch()


def metrics_data(root: Path, n: int, dim: int) -> tuple[Path, Path]:
    rng = np.random.default_rng(n)
    refs = rng.normal(size=(n, dim)).astype(np.float32)
    queries = (refs + NOISE * rng.normal(size=(n, dim))).astype(np.float32)
    keys = [f"piece{i:07d}" for i in range(n)]
    folder = root / f"metrics_{n}_{dim}"
    write_features(folder / "ref", keys, refs)
    write_features(folder / "query", keys, queries)
    return folder / "query", folder / "ref"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def product_floor(queries: np.ndarray, refs: np.ndarray, device: torch.device, rows: int) -> float:
    """Seconds of the float32 product queries x refs^T alone, in blocks of ``rows`` query rows."""
    q = torch.from_numpy(queries).to(device)
    r = torch.from_numpy(refs).to(device)
    out = torch.empty(rows, len(r), device=device)
    with full_float32_matmul(), torch.no_grad():
        torch.matmul(q[:rows], r.T, out=out[:len(q[:rows])])  # warm-up
        sync(device)
        start = time.perf_counter()
        for i in range(0, len(q), rows):
            torch.matmul(q[i:i + rows], r.T, out=out[:len(q[i:i + rows])])
        sync(device)
    return time.perf_counter() - start


def float64_ranks(queries: np.ndarray, refs: np.ndarray, device: torch.device, rows: int = 2048) -> np.ndarray:
    q = torch.from_numpy(queries.astype(np.float64))
    r = torch.from_numpy(refs.astype(np.float64))
    q, r = (q / q.norm(dim=1, keepdim=True)).to(device), (r / r.norm(dim=1, keepdim=True)).to(device)
    ranks = []
    for i in range(0, len(q), rows):
        sims = q[i:i + rows] @ r.T
        true = sims.diagonal(offset=i)[:, None]
        ranks.append((1 + (sims > true).sum(1)).cpu().numpy())
    return np.concatenate(ranks)


def bench_metrics(args, device: torch.device) -> None:
    """Best of ``--metrics_repeats`` runs of each, the tool and its floor taking turns (the machine may be shared)."""
    for n in args.metrics_sizes:
        qdir, rdir = metrics_data(args.data, n, args.dim)
        start = time.perf_counter()
        read_features(qdir, progress=False), read_features(rdir, progress=False)
        first_read = time.perf_counter() - start  # from disk if the page cache lost the files
        chunk = int(max(1, min(n, (4096 if device.type == "cuda" else 256) * 2 ** 20 // (n * 12))))
        runs, floors = [], []
        for _ in range(args.metrics_repeats):
            start = time.perf_counter()
            queries, refs = read_features(qdir, progress=False), read_features(rdir, progress=False)
            (queries, _), (refs, _) = unique_by_key(queries), unique_by_key(refs)
            read = time.perf_counter() - start
            result = rank_true_matches(queries.keys, queries.matrix, refs.keys, refs.matrix,
                                       query_norms=queries.norms, ref_norms=refs.norms, device=device)
            lines = format_metrics(result.metrics)
            runs.append((time.perf_counter() - start, read))
            floors.append(product_floor(unit_rows(queries.matrix), unit_rows(refs.matrix), device, chunk))
        (elapsed, read), floor = min(runs), min(floors)
        flops = 2.0 * n * n * args.dim
        print(f"metrics N={n}: {elapsed:.2f} s (reading {2 * n} files {read:.2f} s, ranking {elapsed - read:.2f} s) "
              f"vs the {n}x{n}x{args.dim} product alone {floor:.2f} s ({flops / floor / 1e9:.1f} GFLOP/s), best of "
              f"{args.metrics_repeats}: ratio {elapsed / floor:.2f} (target <= 1.5); with the first read of the "
              f"files instead (from disk unless cached, {first_read:.2f} s): {(elapsed - read + first_read) / floor:.2f}"
              f"  [{' '.join(lines)}]")
        if args.check:
            check = format_metrics(metrics_from_ranks(float64_ranks(queries.matrix, refs.matrix, device)))
            print(f"  float64 brute force: {' '.join(check)} -> {'equal' if check == lines else 'DIFFERENT'}")


def bench_build(args) -> None:
    if not args.metrics_sizes:
        return
    n = max(args.metrics_sizes)
    _, rdir = metrics_data(args.data, n, args.dim)
    index = args.data / f"index_{n}_{args.dim}"
    shutil.rmtree(index, ignore_errors=True)
    start = time.perf_counter()
    update = build_index(rdir, index, progress=False)
    first = time.perf_counter() - start
    start = time.perf_counter()
    build_index(rdir, index, progress=False)
    again = time.perf_counter() - start
    print(f"build_index of {update.count} files: {update.count / first:.0f} files/s ({first:.2f} s); "
          f"unchanged re-run {again:.2f} s")


def search_matrix(args) -> np.ndarray:
    path = args.data / f"search_{args.index_rows}_{args.dim}.npy"
    if not path.exists():
        out = np.lib.format.open_memmap(str(path) + ".tmp", mode="w+", dtype=np.float32,
                                        shape=(args.index_rows, args.dim))
        rng = np.random.default_rng(0)
        for i in range(0, args.index_rows, 65536):
            out[i:i + 65536] = rng.normal(size=(min(65536, args.index_rows - i), args.dim)).astype(np.float32)
        out.flush()
        del out
        os.replace(str(path) + ".tmp", path)
    return np.load(path, mmap_mode="r")


def best_of(repeats: int, run) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_search(args, device: torch.device) -> None:
    if not args.index_rows:
        return
    matrix = search_matrix(args)
    keys = [f"item{i:07d}" for i in range(len(matrix))]
    rng = np.random.default_rng(1)
    count = max(2, args.batch)
    queries = (matrix[rng.choice(len(matrix), count)] + NOISE * rng.normal(size=(count, args.dim))).astype(np.float32)
    start = time.perf_counter()
    searcher = Searcher(keys, matrix, device=device)
    setup = time.perf_counter() - start
    searcher.top_k(queries[0], 10)  # warm: pages mapped (and the matrix on the device)
    single = best_of(args.repeats, lambda: searcher.top_k(queries[1], 10))
    gb = matrix.nbytes / 1e9
    if device.type == "cuda":
        resident = searcher._resident
        scan = best_of(args.repeats, lambda: (resident.sum(), sync(device)))
        where = "device memory"
    else:
        tensor = torch.from_numpy(np.asarray(matrix))
        scan = min(best_of(args.repeats, lambda: tensor.sum()),
                   best_of(args.repeats, lambda: np.add.reduce(matrix, axis=None)))
        where = "memory"
    print(f"search {len(matrix)}x{args.dim} ({gb:.2f} GB), setup {setup:.2f} s (norms)")
    print(f"  single query top-10: {single * 1e3:.1f} ms vs reading the matrix once from {where} "
          f"{scan * 1e3:.1f} ms ({gb / scan:.1f} GB/s): ratio {single / scan:.2f} (target <= 1.3)")
    if not args.batch > 1:
        return
    batch = best_of(max(1, args.repeats - 1), lambda: searcher.top_k(queries, 10))
    units = torch.from_numpy(unit_rows(queries)).to(device)
    rows = max(8192, searcher.memory // (4 * args.batch * 3))
    out = torch.empty(args.batch * rows, device=device)
    with full_float32_matmul(), torch.no_grad():
        def product():
            for i in range(0, len(matrix), rows):
                block = searcher._resident[i:i + rows] if searcher._resident is not None else \
                    as_cpu_tensor(matrix[i:i + rows]).to(device)
                torch.matmul(units, block.T, out=out[:args.batch * len(block)].view(args.batch, len(block)))
            sync(device)
        floor = best_of(max(1, args.repeats - 1), product)
    flops = 2.0 * args.batch * len(matrix) * args.dim
    print(f"  batch of {args.batch} queries top-10: {batch:.2f} s = {flops / batch / 1e9:.1f} GFLOP/s vs the product "
          f"alone {floor:.2f} s = {flops / floor / 1e9:.1f} GFLOP/s: {floor / batch * 100:.0f}% of the matmul rate "
          f"(target >= 70%)")


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    args.data.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    print(f"device {device}, torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, "
          f"load average {load:.1f} at start")
    bench_metrics(args, device)
    bench_build(args)
    bench_search(args, device)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
