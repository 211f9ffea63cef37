"""Search, metrics and score (SPEC §9): the reference's printed numbers, exact ties included, at any block size.

The oracles below are written from SPEC §9's description of the reference: one query at a time,
``torch.cosine_similarity(query[None], refs)`` in float32, Python sorts. The package must print the
same lines however it blocks the work (tiny ``memory_mb`` forces many blocks).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from clamp2.search.feature_store import FeatureError, NpyRowReader, build_index, load_features, read_features, unique_by_key
from clamp2.search.retrieval import (Searcher, exact_cosine, format_metrics, mean_vector, mean_vector_cosine,
                                     rank_true_matches, retrieval_metrics, score_tolerance, top_k)
from conftest import VECTORS, load_script

GLOBAL = VECTORS / "expected" / "feat_clamp2_global"


# ----------------------------------------------------------------------------------------------
# Oracles: the reference's algorithm, spelled out


def folder_features(folder) -> dict:
    """The reference's ``get_features``: sorted listing, ``.npy`` files, key up to the first '.'."""
    features = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".npy"):
            features[name.split(".")[0]] = np.load(os.path.join(folder, name))[0]
    return features


def oracle_ranks(queries: dict, refs: dict, only=None) -> dict:
    common = sorted(set(queries) & set(refs))
    ref_matrix = torch.tensor(np.array([refs[k] for k in common]))
    ranks = {}
    for idx, key in enumerate(common):
        if only is not None and key not in only:
            continue
        sims = torch.cosine_similarity(torch.tensor(queries[key]).unsqueeze(0), ref_matrix).tolist()
        ranks[key] = 1 + sum(s > sims[idx] for s in sims)
    return ranks


def oracle_metric_lines(queries: dict, refs: dict) -> list[str]:
    ranks = list(oracle_ranks(queries, refs).values())
    n = len(ranks)
    mrr = sum(1 / r for r in ranks) / n
    return [f"MRR: {round(mrr, 4)}"] + [f"Hit@{k}: {round(sum(r <= k for r in ranks) / n, 4)}" for k in (1, 10, 100)]


def oracle_top(query: np.ndarray, features: dict, k: int, true_key=None) -> list[tuple[str, float]]:
    keys = list(features)
    refs = torch.tensor(np.array([features[x] for x in keys]))
    sims = torch.cosine_similarity(torch.tensor(query).unsqueeze(0), refs)
    order = sorted(range(len(keys)), key=lambda i: (-sims[i].item(), keys[i] != true_key, keys[i]))
    return [(keys[i], sims[i].item()) for i in order[:k]]


def oracle_search_lines(query_file, folder, k: int) -> list[str]:
    hits = oracle_top(np.load(query_file)[0], folder_features(folder), k)
    return [f"Top {len(hits)} similar items:"] + [f"{key} {score}" for key, score in hits]


def oracle_score_line(ref, test) -> str:
    def mean(folder):
        return np.mean([np.load(os.path.join(folder, f))[0] for f in os.listdir(folder) if f.endswith(".npy")], axis=0)

    a, b = mean(ref), mean(test)
    similarity = np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b))
    return f"Cosine similarity between '{ref}' and '{test}': {similarity:.4f}"


def write_folder(folder, keys, matrix):
    folder.mkdir(parents=True, exist_ok=True)
    for key, row in zip(keys, matrix):
        np.save(folder / f"{key}.npy", np.asarray(row, dtype=np.float32)[None])
    return folder


def tie_data(n=300, dim=48, seed=0):
    """References with exact duplicates at scattered rows (block boundaries included) and scaled copies."""
    rng = np.random.default_rng(seed)
    refs = rng.normal(size=(n, dim)).astype(np.float32)
    for target in (1, 63, 64, 65, 127, 128, n - 1):
        refs[target % n] = refs[0]
    refs[n - 12] = refs[2] * 2  # exactly the same direction: an exact tie
    refs[n - 11] = refs[3] * 3  # the same direction up to float32 rounding: a near-tie
    queries = (refs + 1.2 * rng.normal(size=refs.shape)).astype(np.float32)
    queries[5] = refs[0]  # the copies of refs[0] score 1.0, above its true match
    queries[0] = refs[0]  # ties with the other copies: rank 1 (ties favour the true match)
    queries[64 % n] = refs[0]
    queries[10] = refs[2]
    queries[n - 12] = refs[2]
    queries[n - 11] = refs[3]
    keys = [f"k{i:04d}" for i in range(n)]
    return keys, queries, refs


# ----------------------------------------------------------------------------------------------
# The exact per-pair computation


def test_exact_cosine_is_the_reference_number_whatever_the_batch():
    rng = np.random.default_rng(1)
    for n, dim in ((1, 48), (33, 768), (1000, 768), (257, 7)):
        refs = (rng.normal(size=(n, dim)) * rng.uniform(0.01, 100, size=(n, 1))).astype(np.float32)
        query = rng.normal(size=dim).astype(np.float32)
        reference = torch.cosine_similarity(torch.tensor(query).unsqueeze(0), torch.tensor(refs)).numpy()
        rows = rng.permutation(n)[: min(n, 50)]
        got = exact_cosine(np.repeat(query[None], len(rows), 0), refs[rows])
        assert np.array_equal(got.view(np.int32), reference[rows].view(np.int32))


def test_score_tolerance_covers_the_float32_product_error():
    rng = np.random.default_rng(2)
    dim = 768
    a = rng.normal(size=(200, dim)).astype(np.float32)
    b = rng.normal(size=(3000, dim)).astype(np.float32) + a[:1]
    exact = np.array([exact_cosine(np.repeat(row[None], len(b), 0), b) for row in a[:20]])
    a_unit = a[:20] / np.linalg.norm(a[:20].astype(np.float64), axis=1, keepdims=True)
    b_unit = b / np.linalg.norm(b.astype(np.float64), axis=1, keepdims=True)
    fast = a_unit.astype(np.float32) @ b_unit.astype(np.float32).T
    assert np.abs(fast - exact).max() < score_tolerance(dim) / 20  # a worst-case bound: far from reached


# ----------------------------------------------------------------------------------------------
# Metrics


@pytest.mark.parametrize("memory_mb", [None, 0.01, 0.2])
def test_ranks_equal_the_reference_with_exact_ties_and_any_block(memory_mb):
    keys, queries, refs = tie_data()
    result = rank_true_matches(keys, queries, keys, refs, memory_mb=memory_mb)
    expected = oracle_ranks(dict(zip(keys, queries)), dict(zip(keys, refs)))
    assert result.keys == sorted(expected)
    assert result.ranks.tolist() == [expected[k] for k in result.keys]
    assert result.ranks[keys.index("k0000")] == 1 and result.ranks[keys.index("k0064")] == 1
    assert format_metrics(result.metrics) == oracle_metric_lines(dict(zip(keys, queries)), dict(zip(keys, refs)))


def test_only_common_keys_take_part():
    keys, queries, refs = tie_data(n=120)
    q_keys = keys[:100] + [f"only_query_{i}" for i in range(5)]
    r_keys = keys[20:] + [f"only_ref_{i}" for i in range(5)]
    q = np.concatenate([queries[:100], queries[:5]])
    r = np.concatenate([refs[20:], refs[:5]])
    got = retrieval_metrics(q_keys, q, r_keys, r)
    assert format_metrics(got) == oracle_metric_lines(dict(zip(q_keys, q)), dict(zip(r_keys, r)))
    with pytest.raises(ValueError, match="no key is in both"):
        retrieval_metrics(["a"], q[:1], ["b"], r[:1])


def test_metrics_at_2000_equal_the_reference_and_a_float64_brute_force():
    rng = np.random.default_rng(3)
    n, dim = 2000, 768
    refs = rng.normal(size=(n, dim)).astype(np.float32)
    refs[1500:1510] = refs[7]  # a block of duplicates
    queries = (refs + 8.0 * rng.normal(size=refs.shape)).astype(np.float32)  # Hit@1 about one half
    keys = [f"{i:05d}" for i in range(n)]
    result = rank_true_matches(keys, queries, keys, refs, memory_mb=4)
    # The reference's loop is slow: check every 10th query, the duplicates' and the tied ones.
    checked = set(keys[::10]) | set(keys[1500:1510]) | {keys[7]}
    expected = oracle_ranks(dict(zip(keys, queries)), dict(zip(keys, refs)), only=checked)
    assert {k: r for k, r in zip(keys, result.ranks.tolist()) if k in checked} == expected
    unit_q = queries.astype(np.float64) / np.linalg.norm(queries.astype(np.float64), axis=1, keepdims=True)
    unit_r = refs.astype(np.float64) / np.linalg.norm(refs.astype(np.float64), axis=1, keepdims=True)
    sims = unit_q @ unit_r.T
    ranks64 = 1 + (sims > np.diag(sims)[:, None] + 1e-12).sum(1)
    metrics64 = {"MRR": np.mean(1 / ranks64), **{f"Hit@{k}": np.mean(ranks64 <= k) for k in (1, 10, 100)}}
    assert format_metrics(result.metrics) == format_metrics(metrics64)
    assert 0.05 < result.metrics["Hit@1"] < 0.95 and result.ranks.max() > 100  # the test is not trivial


def test_ranks_file_lists_true_rank_and_top10(tmp_path, capsys):
    keys, queries, refs = tie_data(n=150)
    qdir, rdir = write_folder(tmp_path / "q", keys, queries), write_folder(tmp_path / "r", keys, refs)
    script = load_script("semantic_search/semantic_search_metrics.py")
    assert script.main([str(qdir), str(rdir), "--ranks", str(tmp_path / "ranks.jsonl"), "--memory_mb", "0.01"]) == 0
    assert capsys.readouterr().out.splitlines() == oracle_metric_lines(folder_features(qdir), folder_features(rdir))
    lines = [json.loads(line) for line in (tmp_path / "ranks.jsonl").read_text().splitlines()]
    ranks = oracle_ranks(folder_features(qdir), folder_features(rdir))
    refs_by_key = folder_features(rdir)
    assert [x["key"] for x in lines] == sorted(keys)
    for line in lines:
        assert line["rank"] == ranks[line["key"]]
        expected = oracle_top(folder_features(qdir)[line["key"]], refs_by_key, 10, true_key=line["key"])
        assert [tuple(t) for t in line["top"]] == expected
        if line["rank"] <= 10:
            assert line["top"][line["rank"] - 1][0] == line["key"]


# ----------------------------------------------------------------------------------------------
# The three tools on the reference's vectors


@pytest.fixture
def global_folders(tmp_path):
    """The conformance vectors' global features, and one folder with all of them under distinct keys."""
    both = tmp_path / "all"
    both.mkdir()
    for kind in ("txt", "abc", "mtf"):
        for f in (GLOBAL / kind).iterdir():
            shutil.copy(f, both / f"{kind}_{f.name}")
    return {kind: GLOBAL / kind for kind in ("txt", "abc", "mtf")} | {"all": both}


def test_search_prints_the_reference_lines(global_folders, capsys):
    script = load_script("semantic_search/semantic_search.py")
    for folder in global_folders.values():
        for query in sorted(GLOBAL.glob("*/*.npy")):
            for k in (1, 3, 10):
                assert script.main([str(query), str(folder), "--top_k", str(k), "--device", "cpu"]) == 0
                assert capsys.readouterr().out.splitlines() == oracle_search_lines(query, folder, k)


def test_metrics_and_score_print_the_reference_lines(global_folders, capsys):
    metrics = load_script("semantic_search/semantic_search_metrics.py")
    score = load_script("semantic_search/clamp2_score.py")
    for q in global_folders.values():
        for r in global_folders.values():
            if set(folder_features(q)) & set(folder_features(r)):
                assert metrics.main([str(q), str(r)]) == 0
                expected = oracle_metric_lines(folder_features(q), folder_features(r))
                assert capsys.readouterr().out.splitlines() == expected
            assert score.main([str(q), str(r)]) == 0
            assert capsys.readouterr().out.splitlines() == [oracle_score_line(q, r)]


def test_search_ties_are_broken_by_key_and_k_is_capped(tmp_path, capsys):
    keys, queries, refs = tie_data(n=140)
    folder = write_folder(tmp_path / "f", keys[::-1], refs[::-1])  # file order differs from key order
    np.save(tmp_path / "query.npy", refs[:1])
    script = load_script("semantic_search/semantic_search.py")
    for k in (0, 5, 9, 139, 140, 500):
        assert script.main([str(tmp_path / "query.npy"), str(folder), "--top_k", str(k), "--memory_mb", "0.001"]) == 0
        out = capsys.readouterr().out.splitlines()
        assert out == oracle_search_lines(tmp_path / "query.npy", folder, k)
        assert script.main([str(tmp_path / "query.npy"), str(folder), "--top_k", str(k), "--backend", "faiss"]) == 0
        assert capsys.readouterr().out.splitlines() == out
    assert out[0] == "Top 140 similar items:"
    copies = ["k0000", "k0001", "k0063", "k0064", "k0065", "k0127", "k0139"]
    assert [line.split()[0] for line in out[1:8]] == copies and len({line.split()[1] for line in out[1:8]}) == 1


def test_searcher_over_many_blocks_equals_one_block(monkeypatch):
    # Blocks of 64 rows over 400 (the real size is >= 8192 rows): best rows in later blocks, copies and
    # near-ties across block boundaries, single queries (the NumPy path) and batches (the matmul path).
    import clamp2.search.retrieval as retrieval

    keys, queries, refs = tie_data(n=400, dim=32)
    features = dict(zip(keys, refs))
    expected = [oracle_top(q, features, 12) for q in queries[:40]]
    monkeypatch.setattr(retrieval, "BLOCK_ROWS", 64)
    searcher = Searcher(keys, refs, memory_mb=0.0001)
    assert searcher.top_k(queries[:40], 12) == expected
    assert [searcher.top_k(q, 12) for q in queries[:40]] == expected
    assert searcher.top_k(refs[399], 3) == oracle_top(refs[399], features, 3)
    # Scaled copies of the query in every block: exact cosines tie at 1.0 (ordered by key, the smallest keys in
    # the later blocks) while their fast float32 scores differ by rounding: a later block must keep rows within
    # the tolerance below the k-th best fast score, or an exact tie is lost.
    rng = np.random.default_rng(5)
    refs = rng.normal(size=(400, 32)).astype(np.float32)
    query = rng.normal(size=32).astype(np.float32)
    refs[np.linspace(5, 395, 40).astype(int)] = query * rng.uniform(0.01, 100, size=(40, 1)).astype(np.float32)
    keys = [f"k{399 - i:04d}" for i in range(400)]
    exact = exact_cosine(np.repeat(query[None], 400, axis=0), refs)
    expected = [(keys[i], float(exact[i])) for i in sorted(range(400), key=lambda i: (-exact[i], keys[i]))[:5]]
    searcher = Searcher(keys, refs, memory_mb=0.0001)
    assert searcher.top_k(query, 5) == expected and searcher.top_k(query[None], 5) == [expected]


def test_searcher_batches_equal_single_queries_and_faiss(tmp_path):
    keys, queries, refs = tie_data(n=400, dim=32)
    searcher = Searcher(keys, refs, memory_mb=0.05)
    batch = searcher.top_k(queries[:40], 12)
    assert batch == [searcher.top_k(q, 12) for q in queries[:40]]
    assert batch == [oracle_top(q, dict(zip(keys, refs)), 12) for q in queries[:40]]
    assert Searcher(keys, refs, backend="faiss").top_k(queries[:40], 12) == batch
    assert Searcher(keys, refs, backend="faiss").top_k(refs[0], 8) == searcher.top_k(refs[0], 8)
    assert top_k(queries[:3], keys, refs, 1000) == [oracle_top(q, dict(zip(keys, refs)), 400) for q in queries[:3]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gives_the_same_numbers():
    keys, queries, refs = tie_data(n=3000, dim=768)
    assert rank_true_matches(keys, queries, keys, refs, device="cuda").ranks.tolist() == \
        rank_true_matches(keys, queries, keys, refs, device="cpu").ranks.tolist()
    assert Searcher(keys, refs, device="cuda").top_k(queries[:50], 10) == Searcher(keys, refs).top_k(queries[:50], 10)


# ----------------------------------------------------------------------------------------------
# Score


def test_mean_vector_is_numpy_mean_of_the_rows():
    rng = np.random.default_rng(4)
    for n in (1, 2, 8191, 8192, 20000):
        rows = (rng.normal(size=(n, 16)) * rng.uniform(0.1, 1e4, size=(n, 1))).astype(np.float32)
        assert np.array_equal(mean_vector(rows), np.mean(list(rows), axis=0))
    # The score is the cosine of those float32 means, as the reference computes it, to the bit.
    a = (rng.normal(size=(3000, 16)) * rng.uniform(0.1, 1e4, size=(3000, 1))).astype(np.float32)
    b = (rng.normal(size=(2000, 16)) * rng.uniform(0.1, 1e4, size=(2000, 1))).astype(np.float32)
    a_mean, b_mean = np.mean(list(a), axis=0), np.mean(list(b), axis=0)
    expected = np.dot(a_mean, b_mean) / (np.linalg.norm(a_mean) * np.linalg.norm(b_mean))
    assert mean_vector_cosine(a, b) == expected


def test_score_pairwise(tmp_path, capsys):
    keys, queries, refs = tie_data(n=50)
    qdir, rdir = write_folder(tmp_path / "q", keys, queries), write_folder(tmp_path / "r", keys[10:], refs[10:])
    script = load_script("semantic_search/clamp2_score.py")
    assert script.main([str(rdir), str(qdir), "--pairwise"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == oracle_score_line(rdir, qdir)
    sims = {k: torch.cosine_similarity(torch.tensor(refs[i])[None], torch.tensor(queries[i])[None]).item()
            for i, k in enumerate(keys) if i >= 10}
    values = np.array(list(sims.values()))
    assert out[1] == (f"Same-key pairs: 40, mean {values.mean():.4f}, std {values.std():.4f}, "
                      f"min {values.min():.4f}")
    lowest = sorted(sims, key=lambda k: (sims[k], k))[:5]
    assert out[2] == "Lowest: " + ", ".join(f"{k} {sims[k]:.4f}" for k in lowest)


# ----------------------------------------------------------------------------------------------
# Index


def test_index_gives_the_folder_results_and_updates_incrementally(tmp_path, capsys, monkeypatch):
    keys, queries, refs = tie_data(n=200)
    folder = write_folder(tmp_path / "f", keys, refs)
    qdir = write_folder(tmp_path / "q", keys, queries)
    index = tmp_path / "index"
    builder = load_script("semantic_search/build_index.py")
    assert builder.main([str(folder), str(index)]) == 0
    assert "added 200" in capsys.readouterr().out
    manifest = json.loads((index / "manifest.json").read_text())
    assert (manifest["dim"], manifest["count"], manifest["normalized"]) == (48, 200, False)
    vectors = np.load(index / manifest["vectors"], mmap_mode="r")
    assert vectors.dtype == np.float32 and np.array_equal(vectors, refs)

    metrics = load_script("semantic_search/semantic_search_metrics.py")
    search = load_script("semantic_search/semantic_search.py")
    score = load_script("semantic_search/clamp2_score.py")
    assert metrics.main([str(qdir), str(folder)]) == 0
    from_folder = capsys.readouterr().out
    assert metrics.main([str(qdir), str(index)]) == 0
    assert capsys.readouterr().out == from_folder
    np.save(tmp_path / "query.npy", queries[3:4])
    assert search.main([str(tmp_path / "query.npy"), str(index), "--top_k", "20"]) == 0
    assert capsys.readouterr().out.splitlines() == oracle_search_lines(tmp_path / "query.npy", folder, 20)
    assert score.main([str(index), str(qdir)]) == 0
    assert capsys.readouterr().out.strip().split(": ")[-1] == oracle_score_line(folder, qdir).split(": ")[-1]

    # Unchanged: nothing is rewritten.
    before = sorted(os.listdir(index))
    assert builder.main([str(folder), str(index)]) == 0
    assert "unchanged 200" in capsys.readouterr().out and sorted(os.listdir(index)) == before
    # Add, change, delete: only those files are read; the rest is copied from the old index.
    np.save(folder / "new.npy", refs[7:8] * 5)
    np.save(folder / "k0003.npy", refs[9:10])
    os.utime(folder / "k0003.npy", ns=(1, 1))
    (folder / "k0004.npy").unlink()
    (folder / "bad.npy").write_bytes(b"not numpy")
    read = []
    original_read = NpyRowReader.read
    monkeypatch.setattr(NpyRowReader, "read", lambda self, path: read.append(os.path.basename(path)) or
                        original_read(self, path))
    assert builder.main([str(folder), str(index)]) == 1
    out, err = capsys.readouterr()
    assert "added 1, changed 1, removed 1, unchanged 198, skipped 1" in out
    assert f"skipped {folder / 'bad.npy'}: not a .npy file" in err
    assert sorted(set(read)) == ["bad.npy", "k0003.npy", "new.npy"]
    updated = read_features(index)
    from_folder = read_features(folder)
    assert updated.names == from_folder.names and np.array_equal(updated.matrix, from_folder.matrix)
    assert np.array_equal(updated.norms, from_folder.norms)
    assert not [n for n in os.listdir(index) if n.endswith(".partial") or n.startswith("vectors.1.")]
    # The bad file is remembered: reported again, not read again, the index is up to date.
    read.clear()
    assert builder.main([str(folder), str(index)]) == 1
    out, err = capsys.readouterr()
    assert "unchanged 200" in out and "not a .npy file" in err and read == []


def test_an_interrupted_update_leaves_the_previous_index_whole(tmp_path, monkeypatch):
    keys, _, refs = tie_data(n=60)
    folder = write_folder(tmp_path / "f", keys[:30], refs[:30])
    build_index(folder, tmp_path / "index")
    before = sorted(os.listdir(tmp_path / "index"))
    write_folder(folder, keys[30:], refs[30:])
    calls = []

    def interrupted(self, path):
        calls.append(path)
        if len(calls) == 20:
            raise KeyboardInterrupt
        return original(self, path)

    original = NpyRowReader.read
    monkeypatch.setattr(NpyRowReader, "read", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_index(folder, tmp_path / "index")
    assert sorted(os.listdir(tmp_path / "index")) == before
    monkeypatch.setattr(NpyRowReader, "read", original)
    assert np.array_equal(read_features(tmp_path / "index").matrix, refs[:30])
    assert build_index(folder, tmp_path / "index").added == 30
    assert np.array_equal(read_features(tmp_path / "index").matrix, refs)


def test_index_row_count_shrinks_in_place_when_files_are_skipped(tmp_path):
    keys, _, refs = tie_data(n=30)
    folder = write_folder(tmp_path / "f", keys, refs)
    np.save(folder / "zz_zero.npy", np.zeros((1, 48), np.float32))
    update = build_index(folder, tmp_path / "index")
    assert update.count == 30 and len(update.skipped) == 1
    features = read_features(tmp_path / "index")
    assert features.matrix.shape == (30, 48) and np.array_equal(features.matrix, refs)


# ----------------------------------------------------------------------------------------------
# Bad input: one line naming the file, exit 2 (usage) or 1 (files skipped), never a traceback


def run(script_path, argv, capsys):
    status = load_script(script_path).main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return status, out, err


def test_bad_inputs(tmp_path, capsys):
    keys, queries, refs = tie_data(n=20)
    good = write_folder(tmp_path / "good", keys, refs)
    qdir = write_folder(tmp_path / "q", keys, queries)
    empty = tmp_path / "empty"
    empty.mkdir()
    other = write_folder(tmp_path / "other", ["x", "y"], np.ones((2, 48)))
    small = write_folder(tmp_path / "small", keys, refs[:, :16])
    metrics, search = "semantic_search/semantic_search_metrics.py", "semantic_search/semantic_search.py"
    score, fmd = "semantic_search/clamp2_score.py", "semantic_search/clamp2_fmd.py"

    status, _, err = run(metrics, [str(empty), str(good)], capsys)
    assert status == 2 and err == f"error: {empty}: no .npy files in the folder\n"
    status, _, err = run(metrics, [str(tmp_path / "missing"), str(good)], capsys)
    assert status == 2 and "no such folder" in err
    status, _, err = run(metrics, [str(other), str(good)], capsys)
    assert status == 2 and "no key is in both" in err and len(err.splitlines()) == 1
    status, _, err = run(metrics, [str(small), str(good)], capsys)
    assert status == 2 and "dimension 16" in err and "48" in err
    status, _, err = run(score, [str(small), str(good)], capsys)
    assert status == 2 and "dimension" in err
    status, _, err = run(fmd, [str(other), str(good)], capsys)
    assert status == 0
    one = write_folder(tmp_path / "one", ["a"], refs[:1])
    status, _, err = run(fmd, [str(one), str(good)], capsys)
    assert status == 2 and "at least 2" in err and str(one) in err

    # Unusable files are skipped, listed and make the exit status 1; the numbers leave them out.
    clean = write_folder(tmp_path / "q_clean", keys, queries)
    np.save(qdir / "nan.npy", np.full((1, 48), np.nan, np.float32))
    np.save(qdir / "zero.npy", np.zeros((1, 48), np.float32))
    np.save(qdir / "dim.npy", np.ones((1, 16), np.float32))
    np.save(qdir / "positions.npy", np.ones((1, 5, 48), np.float32))
    (qdir / "broken.npy").write_bytes(b"\x93NUMPY garbage")
    status, out, err = run(metrics, [str(qdir), str(good)], capsys)
    assert status == 1
    assert out.splitlines() == oracle_metric_lines(folder_features(clean), folder_features(good))
    reasons = {line.split(": ", 1)[0]: line for line in err.splitlines() if line.startswith("skipped ")}
    assert set(reasons) == {f"skipped {qdir / n}" for n in ("nan.npy", "zero.npy", "dim.npy", "positions.npy",
                                                            "broken.npy")}
    assert "NaN" in reasons[f"skipped {qdir / 'nan.npy'}"] and "all-zero" in reasons[f"skipped {qdir / 'zero.npy'}"]
    assert "per-position" in reasons[f"skipped {qdir / 'positions.npy'}"]
    assert "dimension 16 differs from the 48 of the other features" in reasons[f"skipped {qdir / 'dim.npy'}"]

    # A bad query is a usage error; so is a negative K.
    np.save(tmp_path / "zero_query.npy", np.zeros((1, 48), np.float32))
    status, out, err = run(search, [str(tmp_path / "zero_query.npy"), str(good)], capsys)
    assert status == 2 and out == "" and "zero_query.npy: all-zero vector" in err
    status, _, err = run(search, [str(tmp_path / "nothing.npy"), str(good)], capsys)
    assert status == 2 and "nothing.npy" in err
    np.save(tmp_path / "q16.npy", np.ones((1, 16), np.float32))
    status, _, err = run(search, [str(tmp_path / "q16.npy"), str(good)], capsys)
    assert status == 2 and "dimension 16" in err
    with pytest.raises(SystemExit) as exit_info:
        load_script(search).main([str(tmp_path / "q16.npy"), str(good), "--top_k", "-1"])
    assert exit_info.value.code == 2


def test_load_features_is_strict_and_reads_folders_and_indexes_alike(tmp_path):
    keys, _, refs = tie_data(n=40)
    folder = write_folder(tmp_path / "f", keys, refs)
    build_index(folder, tmp_path / "index")
    for path in (folder, tmp_path / "index"):
        got_keys, matrix = load_features(path)
        assert got_keys == keys and matrix.dtype == np.float32 and np.array_equal(matrix, refs)
    np.save(folder / "zero.npy", np.zeros((1, 48), np.float32))
    with pytest.raises(FeatureError, match="zero.npy: all-zero"):
        load_features(folder)


def test_duplicate_keys_keep_the_last_file_as_the_reference(tmp_path, capsys):
    keys, queries, refs = tie_data(n=30)
    folder = write_folder(tmp_path / "r", keys, refs)
    np.save(folder / "k0001.v2.npy", refs[20:21])  # same key k0001, sorted after k0001.npy: it wins
    qdir = write_folder(tmp_path / "q", keys, queries)
    status, out, err = run("semantic_search/semantic_search_metrics.py", [str(qdir), str(folder)], capsys)
    assert status == 0 and out.splitlines() == oracle_metric_lines(folder_features(qdir), folder_features(folder))
    assert "share the key 'k0001'" in err and "k0001.v2.npy is used" in err
    keyed, _ = unique_by_key(read_features(folder))
    assert np.array_equal(keyed.matrix[keyed.keys.index("k0001")], refs[20])


def test_mean_vector_of_rows_is_the_mean_of_the_indexed_matrix():
    rng = np.random.default_rng(5)
    matrix = rng.standard_normal((20_000, 16)).astype(np.float32)  # over two blocks of BLOCK_ROWS
    rows = list(rng.permutation(len(matrix))[:17_000])
    assert np.array_equal(mean_vector(matrix, rows), mean_vector(matrix[rows]))
    assert np.array_equal(mean_vector(matrix, rows), np.mean(list(matrix[rows]), axis=0))


def test_group_score_does_not_copy_the_collection():
    # clamp3_score --group indexed each side's whole matrix into the reference's order before averaging:
    # a second copy of the collection (200,000 x 768 features: +614 MB peak). tracemalloc sees NumPy's buffers.
    import tracemalloc
    from pathlib import Path

    from clamp2.search.clamp3 import FEATURES, Side, group_score

    rng = np.random.default_rng(6)
    sides = [Side(Path("/nonexistent/side"), FEATURES, [f"k{i % 100}.{i}.npy" for i in range(n)],
                  rng.standard_normal((n, 128)).astype(np.float32)) for n in (60_000, 40_000)]
    tracemalloc.start()
    try:
        lines = group_score(*sides)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert lines[-1].startswith("Group similarity: ")
    assert peak < sides[0].matrix.nbytes / 2


def test_read_tree_fills_one_matrix_in_place(tmp_path, monkeypatch):
    # read_tree (clamp3_score, clamp3_eval, clamp3_search on feature folders) kept every block, then
    # concatenated them: two copies of the collection at once (200,000 x 768: +614 MB peak).
    import gc
    import tracemalloc

    from clamp2.search import feature_store

    monkeypatch.setattr(feature_store, "BLOCK_ROWS", 256)
    rng = np.random.default_rng(7)
    rows = rng.standard_normal((8000, 512)).astype(np.float32)
    for i, row in enumerate(rows):
        folder = tmp_path / f"part{i % 3}"
        folder.mkdir(exist_ok=True)
        np.save(folder / f"k{i:05d}.npy", row[None])
    gc.collect()
    tracemalloc.start()
    try:
        features = feature_store.read_tree(tmp_path, progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    order = [int(name.split("/k")[1][:5]) for name in features.names]
    assert np.array_equal(features.matrix, rows[order]) and len(order) == len(rows)
    assert peak < 1.8 * rows.nbytes, peak / rows.nbytes  # 1.35 here; 2.09 when every block was kept
