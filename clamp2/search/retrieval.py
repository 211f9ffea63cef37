"""Cosine search, retrieval metrics (MRR, Hit@K) and the mean-vector score (SPEC §9), exact and fast.

The reference scores every query against every reference with ``torch.cosine_similarity`` in float32,
one query at a time, and ranks with Python sorts: exact but hours at N=50,000. Here the scores come
from one float32 matrix product per block (CPU or CUDA), and every decision that the product's
rounding could get wrong is re-decided with the reference's own per-pair computation:

- ``exact_cosine`` is ``torch.cosine_similarity`` on CPU float32 rows, which gives, bit for bit,
  the number the reference computes for the pair (whatever batch the pair sits in);
- a blocked product differs from it by at most ``score_tolerance(D)`` (a worst-case float32
  rounding bound for D-term dot products of unit vectors, about 3.7e-4 for D=768), so a reference
  whose fast score lies more than that above (below) the true match's is certainly ranked above
  (below) it, and only the few in between are recomputed exactly. Ranks, top-K lists and printed
  scores are therefore the reference's, exact ties included (a tie goes to the true match; ties
  between candidates are broken by key).

Memory is bounded by the block size (``memory_mb``), never by N².

Public API: :func:`exact_cosine`, :func:`score_tolerance`, :class:`Searcher`, :func:`top_k`,
:func:`rank_true_matches`, :func:`metrics_from_ranks`, :func:`retrieval_metrics`,
:func:`mean_vector`, :func:`mean_vector_cosine`, :func:`pairwise_scores`, the printing helpers
:func:`format_search`, :func:`format_metrics`, :func:`format_score`, :func:`format_pairwise`, and
the building blocks :func:`unit_rows`, :func:`as_cpu_tensor`, :func:`full_float32_matmul`,
:func:`default_device`.
"""

from __future__ import annotations

import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from clamp2.attention import ExactFloat32
from clamp2.search.feature_store import BLOCK_ROWS, load_features
# The search tools' flags live in clamp2.search.arguments (no torch: fast --help); default_device stays importable
# from here.
from clamp2.search.arguments import default_device

__all__ = ["load_features", "score_tolerance", "exact_cosine", "Searcher", "top_k", "RankResult", "rank_true_matches", "rank_queries",
           "metrics_from_ranks", "retrieval_metrics", "mean_vector", "mean_vector_cosine", "pairwise_scores",
           "format_search", "format_metrics", "format_score", "format_pairwise", "unit_rows", "as_cpu_tensor",
           "full_float32_matmul", "default_device"]

HIT_AT = (1, 10, 100)
DEFAULT_MEMORY_MB = {"cpu": 256, "cuda": 4096}
EXACT_PIECE_ROWS = 1 << 15
# Undecided pairs are computed exactly once this many are waiting (bounded memory on degenerate data).
EXACT_BATCH_PAIRS = 1 << 21
# Rows per slice of a single-query product on the CPU (one task of a worker thread).
DOT_ROWS_PIECE = 16384
# Progress bars only for work this large (about 10 s on two CPU cores at D=768), so quick runs
# print nothing but their result.
PROGRESS_MIN_SCORES = 4 * 10 ** 8


def score_tolerance(dim: int) -> float:
    """Largest possible gap between a blocked float32 product's cosine and the reference's, doubled.

    Both are within about (2*dim + 4) float32 rounding units of the real cosine of unit vectors
    (any summation order, normalisation included); twice the sum, with a margin, is the window
    inside which two scores are re-decided exactly.
    """
    return (8 * dim + 64) * 2.0 ** -24


def as_cpu_tensor(array: np.ndarray) -> torch.Tensor:
    """A float32 CPU tensor sharing the array's memory (a read-only memory map included)."""
    array = np.ascontiguousarray(array, dtype=np.float32)
    with warnings.catch_warnings():
        # A read-only memory map is only ever read here.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def exact_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two float32 ``[M, D]`` arrays, as the reference computes it.

    This is ``torch.cosine_similarity`` in float32 on the CPU; its value for a pair does not depend
    on the other rows computed with it, so the result equals the reference's number bit for bit.
    """
    a = np.asarray(a, dtype=np.float32).reshape(-1, np.shape(a)[-1])
    b = np.asarray(b, dtype=np.float32).reshape(-1, np.shape(b)[-1])
    out = np.empty(len(a), dtype=np.float32)
    for start in range(0, len(a), EXACT_PIECE_ROWS):
        stop = start + EXACT_PIECE_ROWS
        out[start:stop] = torch.cosine_similarity(as_cpu_tensor(a[start:stop]), as_cpu_tensor(b[start:stop])).numpy()
    return out


def full_float32_matmul() -> ExactFloat32:
    """Matrix products in true float32 (no TF32/bf16 shortcuts, whose error exceeds the tolerance)."""
    return ExactFloat32()


def _norms(matrix: np.ndarray) -> np.ndarray:
    out = np.empty(len(matrix), dtype=np.float64)
    for start in range(0, len(matrix), BLOCK_ROWS):
        block = np.asarray(matrix[start:start + BLOCK_ROWS], dtype=np.float64)
        out[start:start + BLOCK_ROWS] = np.sqrt(np.einsum("ij,ij->i", block, block))
    return out


def unit_rows(matrix: np.ndarray, norms: Optional[np.ndarray] = None) -> np.ndarray:
    """float32 rows divided by their (float64) norms."""
    norms = _norms(matrix) if norms is None else np.asarray(norms, dtype=np.float64)
    out = np.empty(matrix.shape, dtype=np.float32)
    for start in range(0, len(matrix), BLOCK_ROWS):
        stop = start + BLOCK_ROWS
        out[start:stop] = matrix[start:stop] / norms[start:stop, None]
    return out


def _resolve_device(device: str | torch.device) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available (no GPU, or a CPU-only torch build)")
    return device


def _memory_bytes(device: torch.device, memory_mb: Optional[float]) -> int:
    if memory_mb is None:
        memory_mb = DEFAULT_MEMORY_MB.get(device.type, DEFAULT_MEMORY_MB["cpu"])
    return int(memory_mb * 2 ** 20)


def _progress(total: int, desc: str, unit: str, enabled: bool):
    from clamp2.progress import progress_bar

    return progress_bar(total=total, desc=desc, unit=unit, enabled=enabled)


def _sorted_hits(rows: Sequence[int], scores: Sequence[float], keys: Sequence[str], k: int,
                 first: Optional[int] = None) -> list[tuple[str, float]]:
    """The best ``k`` of the candidates: score descending, then ``first`` (the true match), then key."""
    order = sorted(range(len(rows)), key=lambda i: (-scores[i], rows[i] != first, keys[rows[i]], rows[i]))
    return [(keys[rows[i]], float(scores[i])) for i in order[:k]]


def _group(query_rows: np.ndarray, count: int) -> list[np.ndarray]:
    """Positions of each query's entries in ``query_rows`` (ascending query ids 0..count-1)."""
    order = np.argsort(query_rows, kind="stable")
    bounds = np.searchsorted(query_rows[order], np.arange(count + 1))
    return [order[bounds[q]:bounds[q + 1]] for q in range(count)]


# ----------------------------------------------------------------------------------------------
# Search


class Searcher:
    """Exact top-K cosine search over a fixed matrix; build once, query many times.

    ``matrix`` is float32 ``[N, D]`` (a read-only memory map of an index is fine: it is read block
    by block). ``keys`` break ties. ``backend="faiss"`` uses a flat inner-product faiss index for
    the candidates (same results; faiss-cpu must be installed). On CUDA the matrix is copied to the
    device once when it takes less than half of the free device memory, else streamed per call.
    """

    def __init__(self, keys: Sequence[str], matrix: np.ndarray, *, norms: Optional[np.ndarray] = None,
                 device: str | torch.device = "cpu", backend: str = "exact", memory_mb: Optional[float] = None):
        if backend not in ("exact", "faiss"):
            raise ValueError(f"unknown backend {backend!r}: use 'exact' or 'faiss'")
        if len(keys) != len(matrix):
            raise ValueError(f"{len(keys)} keys for {len(matrix)} rows")
        self.keys = list(keys)
        self.matrix = matrix
        self.dim = int(matrix.shape[1])
        self.device = _resolve_device(device)
        self.backend = backend
        self.memory = _memory_bytes(self.device, memory_mb)
        norms = _norms(matrix) if norms is None else np.asarray(norms, dtype=np.float64)
        self.inverse_norms = (1.0 / norms).astype(np.float32)
        self.tolerance = score_tolerance(self.dim)
        self._resident: Optional[torch.Tensor] = None
        self._faiss = None

    def __len__(self) -> int:
        return len(self.keys)

    def top_k(self, queries: np.ndarray, k: int, *, progress: bool = False):
        """The ``k`` (capped at N) most similar rows of each query: ``[(key, score), ...]`` best first.

        ``queries`` is ``[D]`` (returns one list) or ``[Q, D]`` (returns a list per query). Scores are
        the reference's float32 cosines as Python floats; equal scores are ordered by key.
        """
        queries = np.asarray(queries, dtype=np.float32)
        single = queries.ndim == 1
        queries = queries[None] if single else queries
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries of shape {tuple(queries.shape)} do not match features of dimension {self.dim}")
        k = max(0, min(int(k), len(self)))
        if k == 0 or len(queries) == 0:
            hits = [[] for _ in range(len(queries))]
        else:
            if self.backend == "faiss":
                query_rows, rows = self._faiss_candidates(queries, k)
            else:
                query_rows, rows = self._exact_candidates(queries, k, progress)
            scores = exact_cosine(queries[query_rows], _take_rows(self.matrix, rows))
            hits = [_sorted_hits(rows[p], scores[p], self.keys, k) for p in _group(query_rows, len(queries))]
        return hits[0] if single else hits

    def _device_blocks(self, block_rows: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """``(start, rows, inverse norms)`` blocks of the matrix on the device."""
        if self.device.type == "cuda" and self._resident is None:
            free, _ = torch.cuda.mem_get_info(self.device)
            if self.matrix.nbytes < 0.5 * free:
                self._resident = torch.empty(self.matrix.shape, dtype=torch.float32, device=self.device)
                for start in range(0, len(self), BLOCK_ROWS * 16):
                    self._resident[start:start + BLOCK_ROWS * 16] = as_cpu_tensor(
                        self.matrix[start:start + BLOCK_ROWS * 16]).to(self.device)
                self._resident_inverse = torch.from_numpy(self.inverse_norms).to(self.device)
        for start in range(0, len(self), block_rows):
            stop = min(start + block_rows, len(self))
            if self._resident is not None:
                yield start, self._resident[start:stop], self._resident_inverse[start:stop]
            else:
                yield (start, as_cpu_tensor(self.matrix[start:stop]).to(self.device, non_blocking=True),
                       torch.from_numpy(self.inverse_norms[start:stop]).to(self.device))

    def _exact_candidates(self, queries: np.ndarray, k: int, progress: bool) -> tuple[np.ndarray, np.ndarray]:
        """(query, row) pairs that can be in a query's exact top ``k``: fast score >= k-th best - tolerance.

        The k-th best fast score of each query only rises block after block, so a block needs one
        comparison pass against it; the few entries that pass are kept and update it.
        """
        units = torch.from_numpy(unit_rows(queries)).to(self.device)
        block_rows = max(BLOCK_ROWS, self.memory // (4 * len(queries) * 3))
        best: Optional[np.ndarray] = None  # [Q, <=k] best fast scores so far
        kth = np.full(len(queries), -np.inf, dtype=np.float32)
        found_q, found_j, found_s = [], [], []
        bar = _progress(len(self), "searching", "row", progress and len(queries) * len(self) >= PROGRESS_MIN_SCORES)
        buffer = torch.empty(len(queries) * min(block_rows, len(self)), dtype=torch.float32, device=self.device)
        with full_float32_matmul(), torch.no_grad():
            for start, block, inverse in self._device_blocks(block_rows):
                scores = buffer[:len(queries) * len(block)].view(len(queries), len(block))
                if len(queries) == 1 and self.device.type == "cpu":
                    _dot_rows(block.numpy(), units[0].numpy(), inverse.numpy(), scores[0].numpy())
                else:
                    if len(queries) == 1:
                        torch.matmul(block, units[0], out=scores[0])
                    else:
                        torch.matmul(units, block.T, out=scores)
                    scores.mul_(inverse)
                if best is None or best.shape[1] < k:
                    values = scores.topk(min(k, scores.shape[1]), dim=1).values.cpu().numpy()
                    best = values if best is None else _largest_columns(np.concatenate([best, values], 1), k)
                    if best.shape[1] == k:
                        kth = best.min(axis=1)
                    query_rows, rows, values = _pairs_at_least(scores, kth - self.tolerance)
                else:
                    query_rows, rows, values = _pairs_at_least(scores, kth - self.tolerance)
                    better = values > kth[query_rows]
                    if better.any():
                        improved, gains = query_rows[better], values[better]
                        for q, where in zip(np.unique(improved), _group_sorted(improved)):
                            best[q] = _largest_columns(np.concatenate([best[q], gains[where]])[None], k)[0]
                        kth = best.min(axis=1)
                found_q.append(query_rows)
                found_j.append(rows + start)
                found_s.append(values)
                bar.update(block.shape[0])
        bar.close()
        query_rows, rows, values = np.concatenate(found_q), np.concatenate(found_j), np.concatenate(found_s)
        keep = values >= (kth - self.tolerance)[query_rows]
        return query_rows[keep], rows[keep]

    def _faiss_candidates(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The same candidate pairs from a flat faiss inner-product index of the unit rows."""
        try:
            import faiss
        except ImportError:
            raise ValueError("--backend faiss needs faiss: pip install faiss-cpu "
                             "(or pip install -e .[faiss])") from None
        if self._faiss is None:
            index = faiss.IndexFlatIP(self.dim)
            for start in range(0, len(self), BLOCK_ROWS * 8):
                index.add(unit_rows(np.asarray(self.matrix[start:start + BLOCK_ROWS * 8]),
                                     1.0 / self.inverse_norms[start:start + BLOCK_ROWS * 8].astype(np.float64)))
            self._faiss = index
        units = unit_rows(queries)
        found_q, found_j = [], []
        pending = np.arange(len(queries))
        depth = min(len(self), k + 16)
        while len(pending):
            scores, rows = self._faiss.search(units[pending], depth)
            threshold = scores[:, k - 1] - self.tolerance
            # The window may reach past what was fetched: fetch deeper for those queries.
            deeper = (scores[:, -1] >= threshold) & (depth < len(self))
            done = ~deeper
            mask = (scores[done] >= threshold[done, None]) & (rows[done] >= 0)
            q_local, col = np.nonzero(mask)
            found_q.append(pending[done][q_local])
            found_j.append(rows[done][q_local, col])
            pending = pending[deeper]
            depth = min(len(self), depth * 4)
        return np.concatenate(found_q).astype(np.int64), np.concatenate(found_j).astype(np.int64)


def _dot_rows(rows: np.ndarray, vector: np.ndarray, scale: np.ndarray, out: np.ndarray) -> None:
    """``out = (rows @ vector) * scale`` on the CPU at memory speed.

    BLAS matrix-vector products ran at a third of the memory bandwidth here; NumPy's ``vecdot``
    (one fused dot per row, no temporary) on slices in parallel threads reads the rows once.
    """
    dot = getattr(np, "vecdot", None) or (lambda a, b, out: np.einsum("ij,j->i", a, b, out=out))
    slices = [slice(start, start + DOT_ROWS_PIECE) for start in range(0, len(rows), DOT_ROWS_PIECE)]

    def run(part: slice) -> None:
        dot(rows[part], vector, out=out[part])
        out[part] *= scale[part]

    workers = min(len(slices), max(1, torch.get_num_threads()))
    if workers == 1:
        for part in slices:
            run(part)
        return
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(run, slices))


def _largest_columns(values: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` largest entries of each row (unordered)."""
    if values.shape[1] <= k:
        return values
    return np.partition(values, values.shape[1] - k, axis=1)[:, -k:]


def _group_sorted(ids: np.ndarray) -> list[np.ndarray]:
    """Positions of each distinct id of ``ids``, in ascending id order."""
    order = np.argsort(ids, kind="stable")
    _, starts = np.unique(ids[order], return_index=True)
    return np.split(order, starts[1:])


def _pairs_at_least(scores: torch.Tensor, threshold: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(row, column, score)`` of the entries at or above their row's threshold, as NumPy arrays.

    On the CPU the comparison runs in NumPy: torch's boolean reductions there are several times slower.
    """
    if scores.device.type == "cpu":
        values = scores.numpy()
        rows, cols = np.nonzero(values >= threshold[:, None])
        return rows, cols, values[rows, cols]
    rows, cols = (scores >= torch.from_numpy(threshold).to(scores.device)[:, None]).nonzero(as_tuple=True)
    return rows.cpu().numpy(), cols.cpu().numpy(), scores[rows, cols].cpu().numpy()


def _count_per_row(scores: torch.Tensor, threshold: np.ndarray, strict: bool) -> np.ndarray:
    """How many entries of each row are above (``strict``) or at least at its threshold."""
    if scores.device.type == "cpu":
        values = scores.numpy()
        mask = values > threshold[:, None] if strict else values >= threshold[:, None]
        return np.count_nonzero(mask, axis=1)
    limit = torch.from_numpy(threshold).to(scores.device)[:, None]
    return ((scores > limit) if strict else (scores >= limit)).sum(1).cpu().numpy()


def _take_rows(matrix: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``matrix[rows]`` as float32 (no copy when ``rows`` is every row in order; a memory map is read
    in ascending order)."""
    if len(rows) == len(matrix) and np.array_equal(rows, np.arange(len(matrix))):
        return np.asarray(matrix, dtype=np.float32)
    if len(rows) == 0:
        return np.empty((0, matrix.shape[1]), dtype=np.float32)
    if not isinstance(matrix, np.memmap):
        return np.asarray(matrix[rows], dtype=np.float32)
    unique, inverse = np.unique(rows, return_inverse=True)
    return np.asarray(matrix[unique], dtype=np.float32)[inverse]


def top_k(queries: np.ndarray, keys: Sequence[str], matrix: np.ndarray, k: int, *,
          norms: Optional[np.ndarray] = None, device: str | torch.device = "cpu", backend: str = "exact",
          memory_mb: Optional[float] = None, progress: bool = False):
    """One-shot ``Searcher(keys, matrix, ...).top_k(queries, k)``."""
    return Searcher(keys, matrix, norms=norms, device=device, backend=backend,
                    memory_mb=memory_mb).top_k(queries, k, progress=progress)


# ----------------------------------------------------------------------------------------------
# Metrics


@dataclass
class RankResult:
    """Per common key (sorted): the rank of its true match and, if asked, its top references."""

    keys: list[str]
    ranks: np.ndarray  # int64, 1 = the true match scored highest (ties go to it)
    top: Optional[list[list[tuple[str, float]]]] = None

    @property
    def metrics(self) -> dict[str, float]:
        return metrics_from_ranks(self.ranks)


def metrics_from_ranks(ranks: np.ndarray) -> dict[str, float]:
    """MRR and Hit@1/10/100 of true-match ranks (``math.fsum``: no order-dependent rounding)."""
    ranks = np.asarray(ranks)
    if len(ranks) == 0:
        raise ValueError("no common key: metrics need at least one query with a reference of the same key")
    total = len(ranks)
    metrics = {"MRR": math.fsum(1.0 / r for r in ranks.tolist()) / total}
    for k in HIT_AT:
        metrics[f"Hit@{k}"] = int(np.count_nonzero(ranks <= k)) / total
    return metrics


def _index_of(keys: Sequence[str], what: str) -> dict[str, int]:
    index = {key: i for i, key in enumerate(keys)}
    if len(index) != len(keys):
        raise ValueError(f"{what} keys repeat: give one row per key (feature_store.unique_by_key)")
    return index


def rank_true_matches(query_keys: Sequence[str], query_matrix: np.ndarray, ref_keys: Sequence[str],
                      ref_matrix: np.ndarray, *, query_norms: Optional[np.ndarray] = None,
                      ref_norms: Optional[np.ndarray] = None, device: str | torch.device = "cpu",
                      top: int = 0, memory_mb: Optional[float] = None, progress: bool = False) -> RankResult:
    """Rank of each query's same-key reference among the references of the common keys.

    Only keys present on both sides take part (SPEC §9). The rank is 1 + the number of references
    whose reference-exact float32 cosine is strictly higher than the true match's. ``top`` > 0 also
    returns each query's best ``top`` references (key, score), ties: true match first, then key.
    """
    q_index, r_index = _index_of(query_keys, "query"), _index_of(ref_keys, "reference")
    common = sorted(set(q_index) & set(r_index))
    if not common:
        raise ValueError("no key is in both sets (keys are file names up to the first '.')")
    if query_matrix.shape[1] != ref_matrix.shape[1]:
        raise ValueError(f"query features have dimension {query_matrix.shape[1]}, "
                         f"reference features {ref_matrix.shape[1]}")
    q_rows = np.array([q_index[k] for k in common], dtype=np.int64)
    r_rows = np.array([r_index[k] for k in common], dtype=np.int64)
    queries, refs = _take_rows(query_matrix, q_rows), _take_rows(ref_matrix, r_rows)
    q_norms = None if query_norms is None else np.asarray(query_norms)[q_rows]
    r_norms = None if ref_norms is None else np.asarray(ref_norms)[r_rows]
    ranks, tops = _rank_rows(queries, refs, np.arange(len(common), dtype=np.int64), common, query_norms=q_norms,
                             ref_norms=r_norms, device=device, top=top, memory_mb=memory_mb, progress=progress)
    return RankResult(common, ranks, tops)


def rank_queries(query_matrix: np.ndarray, true_rows: Sequence[int], ref_matrix: np.ndarray, *,
                 device: str | torch.device = "cpu", memory_mb: Optional[float] = None,
                 progress: bool = False) -> np.ndarray:
    """Rank of reference ``true_rows[i]`` for query ``i`` among all rows of ``ref_matrix`` (1 = best).

    As :func:`rank_true_matches` (reference-exact float32 cosines, ties go to the true match), but
    several queries may share one true reference (CLaMP 3's evaluation: ``a.1.wav`` and ``a.2.wav``
    both look for reference ``a``).
    """
    query_matrix = np.asarray(query_matrix, dtype=np.float32)
    ref_matrix = np.asarray(ref_matrix, dtype=np.float32)
    if query_matrix.shape[1] != ref_matrix.shape[1]:
        raise ValueError(f"query features have dimension {query_matrix.shape[1]}, "
                         f"reference features {ref_matrix.shape[1]}")
    true_rows = np.asarray(true_rows, dtype=np.int64)
    if len(true_rows) != len(query_matrix):
        raise ValueError(f"{len(true_rows)} true rows for {len(query_matrix)} queries")
    if len(query_matrix) == 0:
        raise ValueError("no query: metrics need at least one query with a reference of the same key")
    ranks, _ = _rank_rows(query_matrix, ref_matrix, true_rows, None, device=device, memory_mb=memory_mb,
                          progress=progress)
    return ranks


def _rank_rows(queries: np.ndarray, refs: np.ndarray, true_rows: np.ndarray, keys: Optional[list], *,
               query_norms: Optional[np.ndarray] = None, ref_norms: Optional[np.ndarray] = None,
               device: str | torch.device = "cpu", top: int = 0, memory_mb: Optional[float] = None,
               progress: bool = False) -> tuple[np.ndarray, Optional[list]]:
    """Ranks of ``refs[true_rows[i]]`` for each query ``i``, and (``top`` > 0, ``keys`` of the refs)
    each query's best ``top`` references."""
    device = _resolve_device(device)
    q, n, tolerance = len(queries), len(refs), score_tolerance(queries.shape[1])
    ref_units = torch.from_numpy(unit_rows(refs, ref_norms)).to(device)
    query_units = unit_rows(queries, query_norms)
    chunk = int(max(1, min(q, _memory_bytes(device, memory_mb) // (n * 12))))
    ranks = np.empty(q, dtype=np.int64)
    tops: list = [None] * q if top > 0 else None
    pending = _PendingPairs()
    bar = _progress(q, "ranking queries", "query", progress and q * n >= PROGRESS_MIN_SCORES)
    # One score buffer for all blocks: fresh 100 MB allocations cost page faults every block.
    buffer = torch.empty(chunk * n, dtype=torch.float32, device=device)
    with full_float32_matmul(), torch.no_grad():
        for start in range(0, q, chunk):
            stop = min(q, start + chunk)
            scores = buffer[:(stop - start) * n].view(stop - start, n)
            torch.matmul(torch.from_numpy(query_units[start:stop]).to(device), ref_units.T, out=scores)
            ranks[start:stop], unsure = _chunk_ranks(scores, start, true_rows[start:stop], tolerance)
            pending.unsure.append(unsure)
            if top > 0:
                kth = scores.topk(min(top, n), dim=1).values[:, -1].cpu().numpy()
                rows, cols, _ = _pairs_at_least(scores, kth - np.float32(tolerance))
                pending.top.append((rows + start, cols))
            if pending.size() > EXACT_BATCH_PAIRS or stop == q:
                pending.resolve(queries, refs, true_rows, ranks, tops, keys, top)
            bar.update(stop - start)
    bar.close()
    return ranks, tops


class _PendingPairs:
    """(query, reference) pairs waiting for the exact cosine, computed together: fewer, larger calls."""

    def __init__(self):
        self.unsure: list[tuple[np.ndarray, np.ndarray]] = []
        self.top: list[tuple[np.ndarray, np.ndarray]] = []

    def size(self) -> int:
        return sum(len(q) for q, _ in self.unsure + self.top)

    def resolve(self, queries: np.ndarray, refs: np.ndarray, true_rows: np.ndarray, ranks: np.ndarray,
                tops: Optional[list], keys: Optional[list], top: int) -> None:
        """Add the unsure references that beat their true match to ``ranks``; fill ``tops``."""
        empty = np.empty(0, dtype=np.int64)
        unsure_q = np.concatenate([q for q, _ in self.unsure] + [empty])
        unsure_r = np.concatenate([r for _, r in self.unsure] + [empty])
        asked = np.unique(unsure_q)
        top_q = np.concatenate([q for q, _ in self.top] + [empty])
        top_r = np.concatenate([r for _, r in self.top] + [empty])
        exact = exact_cosine(_take_rows(queries, np.concatenate([unsure_q, asked, top_q])),
                             _take_rows(refs, np.concatenate([unsure_r, true_rows[asked], top_r])))
        true_exact = np.zeros(len(ranks), dtype=np.float32)
        true_exact[asked] = exact[len(unsure_q):len(unsure_q) + len(asked)]
        ranks += np.bincount(unsure_q, weights=exact[:len(unsure_q)] > true_exact[unsure_q],
                             minlength=len(ranks)).astype(np.int64)
        if tops is not None and len(top_q):
            top_scores = exact[len(unsure_q) + len(asked):]
            for q, where in zip(np.unique(top_q), _group_sorted(top_q)):
                tops[q] = _sorted_hits(top_r[where], top_scores[where], keys, min(top, len(keys)), first=true_rows[q])
        self.unsure, self.top = [], []


def _chunk_ranks(scores: torch.Tensor, start: int, true_rows: np.ndarray,
                 tolerance: float) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Ranks from the product for queries ``start ...`` (true match of row i: column ``true_rows[i]``), and the
    (query, reference) pairs too close to the true match's score to be placed without the exact cosine."""
    columns = torch.from_numpy(np.ascontiguousarray(true_rows)).to(scores.device)
    true_scores = scores.gather(1, columns[:, None])[:, 0].cpu().numpy()
    high, low = true_scores + np.float32(tolerance), true_scores - np.float32(tolerance)
    above = _count_per_row(scores, high, strict=True)
    near = _count_per_row(scores, low, strict=False) - above - 1
    ranks = above.astype(np.int64) + 1
    unsure = np.flatnonzero(near > 0)
    if not len(unsure):
        return ranks, (np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64))
    pair_row, pair_ref, pair_fast = _pairs_at_least(scores[torch.from_numpy(unsure).to(scores.device)], low[unsure])
    keep = (pair_fast <= high[unsure][pair_row]) & (pair_ref != true_rows[unsure][pair_row])
    return ranks, (unsure[pair_row[keep]] + start, pair_ref[keep])


def retrieval_metrics(query_keys: Sequence[str], query_matrix: np.ndarray, ref_keys: Sequence[str],
                      ref_matrix: np.ndarray, **options) -> dict[str, float]:
    """``{"MRR": .., "Hit@1": .., "Hit@10": .., "Hit@100": ..}`` over the common keys (see ``rank_true_matches``)."""
    return rank_true_matches(query_keys, query_matrix, ref_keys, ref_matrix, **options).metrics


# ----------------------------------------------------------------------------------------------
# Mean-vector score and same-key pairs


def mean_vector(matrix: np.ndarray, rows: Optional[Sequence[int]] = None) -> np.ndarray:
    """``np.mean(list_of_rows, axis=0)`` in float32, as the reference, without stacking all rows.

    NumPy adds the rows of an axis-0 reduction one after another in float32, so the blocked sum
    below (each block reduced after the running total) is the same number. ``rows``: the mean of
    ``matrix[rows]`` (in that order), without that copy of the whole matrix.
    """
    count = len(matrix) if rows is None else len(rows)
    total = np.zeros(matrix.shape[1], dtype=np.float32)
    for start in range(0, count, BLOCK_ROWS):
        part = matrix[start:start + BLOCK_ROWS] if rows is None else matrix[np.asarray(rows[start:start + BLOCK_ROWS],
                                                                                        dtype=np.intp)]
        block = np.asarray(part, dtype=np.float32)
        total = np.add.reduce(np.concatenate([total[None], block]), axis=0)
    return np.true_divide(total, np.intp(count), out=total, casting="unsafe")


def mean_vector_cosine(ref_matrix: np.ndarray, test_matrix: np.ndarray) -> np.float32:
    """Cosine similarity of the two mean vectors in float32 NumPy (dot over the product of norms)."""
    ref_mean, test_mean = mean_vector(ref_matrix), mean_vector(test_matrix)
    return np.dot(ref_mean, test_mean) / (np.linalg.norm(ref_mean) * np.linalg.norm(test_mean))


def pairwise_scores(ref_keys: Sequence[str], ref_matrix: np.ndarray, test_keys: Sequence[str],
                    test_matrix: np.ndarray) -> tuple[list[str], np.ndarray]:
    """Common keys (sorted) and the exact cosine of each same-key (reference, test) pair."""
    r_index, t_index = _index_of(ref_keys, "reference"), _index_of(test_keys, "test")
    common = sorted(set(r_index) & set(t_index))
    if not common:
        raise ValueError("no key is in both sets (keys are file names up to the first '.')")
    r_rows = np.array([r_index[k] for k in common], dtype=np.int64)
    t_rows = np.array([t_index[k] for k in common], dtype=np.int64)
    return common, exact_cosine(_take_rows(ref_matrix, r_rows), _take_rows(test_matrix, t_rows))


# ----------------------------------------------------------------------------------------------
# Printed lines


def format_search(hits: Sequence[tuple[str, float]]) -> list[str]:
    """The reference's output: ``Top K similar items:`` then ``key score`` (score as Python prints it)."""
    return [f"Top {len(hits)} similar items:"] + [f"{key} {float(score)}" for key, score in hits]


def format_metrics(metrics: dict[str, float]) -> list[str]:
    """``MRR: x``, ``Hit@1: x``, ... with ``round(x, 4)`` (so 0.5 prints as ``0.5``)."""
    return [f"{name}: {round(metrics[name], 4)}" for name in ("MRR",) + tuple(f"Hit@{k}" for k in HIT_AT)]


def format_score(reference: str, test: str, similarity: float) -> str:
    return f"Cosine similarity between '{reference}' and '{test}': {similarity:.4f}"


def format_pairwise(keys: Sequence[str], scores: np.ndarray, lowest: int = 5) -> list[str]:
    """Mean, population std and min of same-key scores, and the ``lowest`` keys (ties by key)."""
    values = np.asarray(scores, dtype=np.float64)
    order = sorted(range(len(keys)), key=lambda i: (float(scores[i]), keys[i]))[:lowest]
    return [f"Same-key pairs: {len(keys)}, mean {values.mean():.4f}, std {values.std():.4f}, min {values.min():.4f}",
            "Lowest: " + ", ".join(f"{keys[i]} {float(scores[i]):.4f}" for i in order)]
