"""Search, retrieval metrics, feature folders, FMD, zero-shot and the CLaMP 3 sides: the cases a
code-driven mutation audit found untested. Each docstring says which wrong implementation the test
tells apart from the right one (near ties in float32, norms taken with the wrong rows, keys, ...).
"""

from __future__ import annotations

import numpy as np
import pytest

from clamp2.search.retrieval import Searcher, exact_cosine, rank_true_matches


def scaled_copies(n=400, dim=32, copies=40, seed=5):
    """Rows that are scaled copies of the query (exact cosines tie or nearly tie at 1.0, while the fast
    float32 scores differ by rounding), scattered among random rows; keys in a random order."""
    rng = np.random.default_rng(seed)
    refs = rng.normal(size=(n, dim)).astype(np.float32)
    query = rng.normal(size=dim).astype(np.float32)
    rows = rng.choice(n, size=copies, replace=False)
    refs[rows] = query * rng.uniform(0.01, 100, size=(copies, 1)).astype(np.float32)
    keys = [f"k{i:04d}" for i in rng.permutation(n)]
    return keys, query, refs


def brute_top(query, keys, refs, k):
    exact = exact_cosine(np.repeat(query[None], len(refs), axis=0), refs)
    return [(keys[i], float(exact[i])) for i in sorted(range(len(refs)), key=lambda i: (-exact[i], keys[i]))[:k]]


@pytest.mark.parametrize("backend", ["exact", "faiss"])
@pytest.mark.parametrize("seed", [5, 6, 7])
def test_single_block_top_k_keeps_near_ties_of_the_kth_score(backend, seed):
    """One block only: the exact top-k among near-tied scaled copies, which a first block pruned at the
    k-th float32 score (or a faiss threshold) without the tolerance would lose."""
    if backend == "faiss":
        pytest.importorskip("faiss")
    keys, query, refs = scaled_copies(seed=seed)
    searcher = Searcher(keys, refs, backend=backend)
    for k in (3, 5, 8):
        expected = brute_top(query, keys, refs, k)
        assert searcher.top_k(query, k) == expected
        assert searcher.top_k(np.stack([query, query]), k) == [expected, expected]


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_ranks_file_top_list_keeps_near_ties(seed):
    """The top-N list of rank_true_matches keeps near ties (the tolerance window, as in search)."""
    keys, query, refs = scaled_copies(seed=seed)
    queries = refs.copy()
    true = keys.index(min(keys))  # any query row; make it the query whose references hold the copies
    queries[true] = query
    result = rank_true_matches(keys, queries, keys, refs, top=5)
    at = result.keys.index(keys[true])
    exact = exact_cosine(np.repeat(query[None], len(refs), axis=0), refs)
    order = sorted(range(len(refs)), key=lambda i: (-exact[i], i != true, keys[i]))[:5]
    assert result.top[at] == [(keys[i], float(exact[i])) for i in order]


def test_reference_norms_are_taken_with_the_reference_rows():
    """rank_true_matches takes the reference norms with the reference rows. Queries and references list
    the common keys at different rows and the references have very different norms."""
    rng = np.random.default_rng(0)
    dim, n = 16, 60
    refs = (rng.normal(size=(n, dim)) * rng.uniform(0.01, 100, size=(n, 1))).astype(np.float32)
    queries = (refs / np.linalg.norm(refs, axis=1, keepdims=True) + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)
    ref_keys = [f"k{i:03d}" for i in range(n)]
    # The queries: the same keys in reverse order, plus 7 keys that have no reference.
    query_keys = [f"x{i}" for i in range(7)] + ref_keys[::-1]
    query_matrix = np.concatenate([rng.normal(size=(7, dim)).astype(np.float32), queries[::-1]])
    q_norms = np.linalg.norm(query_matrix.astype(np.float64), axis=1)
    r_norms = np.linalg.norm(refs.astype(np.float64), axis=1)
    with_norms = rank_true_matches(query_keys, query_matrix, ref_keys, refs, query_norms=q_norms, ref_norms=r_norms)
    without = rank_true_matches(query_keys, query_matrix, ref_keys, refs)
    assert with_norms.keys == without.keys == ref_keys
    assert with_norms.ranks.tolist() == without.ranks.tolist()
    exact_ranks = []
    for i in range(n):
        s = exact_cosine(np.repeat(queries[i][None], n, axis=0), refs)
        exact_ranks.append(1 + int(np.count_nonzero(s > s[i])))
    assert with_norms.ranks.tolist() == exact_ranks


# ----------------------------------------------------------------------------------------------
# feature_store


def _save(path, array):
    with open(path, "wb") as f:  # np.save(path) would append .npy to a name ending in .NPY
        np.save(f, np.asarray(array))
    return path


def test_feature_key_is_the_name_up_to_the_first_dot(tmp_path):
    """``a.1.2.npy`` is key ``a`` (up to the first dot), as in the original's ``split('.')[0]``."""
    from clamp2.search.feature_store import feature_key, read_features

    assert feature_key("a.1.2.npy") == "a" and feature_key("b.npy") == "b"
    _save(tmp_path / "a.1.2.npy", np.ones((1, 4), np.float32))
    _save(tmp_path / "b.x.y.z.npy", np.full((1, 4), 2, np.float32))
    assert read_features(tmp_path, progress=False).keys == ["a", "b"]


def test_fortran_order_files_give_their_first_row(tmp_path):
    """A Fortran-order [2, D] file gives np.load(f)[0], not its first D stored values."""
    from clamp2.search.feature_store import NpyRowReader

    rows = np.asfortranarray(np.arange(12, dtype=np.float32).reshape(2, 6) + 1)
    path = _save(tmp_path / "f.npy", rows)
    assert np.load(path).flags.f_contiguous
    assert NpyRowReader().read(path).tolist() == np.load(path)[0].tolist()


def test_unusable_files_are_skipped_with_their_reason_in_name_order(tmp_path):
    """Integer and near-zero vectors are skipped, .NPY is not read (the original reads only names ending
    in .npy), and the skipped files are listed in name order with their reasons."""
    from clamp2.search.feature_store import read_features

    _save(tmp_path / "a_trunc.npy", np.ones((1, 4), np.float32))
    (tmp_path / "a_trunc.npy").write_bytes((tmp_path / "a_trunc.npy").read_bytes()[:-4])
    _save(tmp_path / "b_tiny.npy", np.full((1, 4), 1e-10, np.float32))
    _save(tmp_path / "c_int.npy", np.ones((1, 4), np.int64))
    _save(tmp_path / "d_ok.npy", np.ones((1, 4), np.float32))
    _save(tmp_path / "e_nan.npy", np.array([[1, np.nan, 0, 0]], np.float32))
    _save(tmp_path / "E_UPPER.NPY", np.ones((1, 4), np.float32))
    features = read_features(tmp_path, progress=False)
    assert features.keys == ["d_ok"]
    reasons = [(s.path.rsplit("/", 1)[1], s.reason.split(" ")[0]) for s in features.skipped]
    assert reasons == [("a_trunc.npy", "truncated"), ("b_tiny.npy", "near-zero"), ("c_int.npy", "dtype"),
                       ("e_nan.npy", "non-finite")]


def test_a_fixed_bad_file_is_read_again_by_the_index(tmp_path):
    """A file that was unusable and has since been rewritten is read again by the index, not reported
    with its old reason."""
    import os

    from clamp2.search.feature_store import build_index, open_index

    folder, index = tmp_path / "f", tmp_path / "i"
    folder.mkdir()
    _save(folder / "a.npy", np.ones((1, 4), np.float32))
    (folder / "b.npy").write_bytes(b"not numpy")
    first = build_index(folder, index, progress=False)
    assert first.count == 1 and len(first.skipped) == 1
    _save(folder / "b.npy", np.full((1, 4), 2, np.float32))
    os.utime(folder / "b.npy", ns=(1, 10 ** 18))
    second = build_index(folder, index, progress=False)
    assert (second.count, len(second.skipped), second.changed) == (2, 0, 1)
    assert open_index(index).keys == ["a", "b"]


def _fresh_and_updated(folder, index, tmp_path):
    """(updated index, fresh build) of ``folder`` as (names, matrix, skipped names)."""
    import shutil

    from clamp2.search.feature_store import build_index, open_index

    def view(path, update):
        features = open_index(path)
        return features.names, np.asarray(features.matrix).tolist(), [s.path.rsplit("/", 1)[1] for s in update.skipped]

    updated = view(index, build_index(folder, index, progress=False))
    shutil.rmtree(tmp_path / "fresh", ignore_errors=True)
    return updated, view(tmp_path / "fresh", build_index(folder, tmp_path / "fresh", progress=False))


def test_a_file_rewritten_with_the_same_size_and_mtime_is_read_again_by_the_index(tmp_path):
    """Other values of the same size under the same modification time (``cp -p``, ``os.utime``, a rename
    over a file written in the same clock tick) are a change: the index compares the change time and inode
    too, so it never keeps the old row."""
    import os

    folder = tmp_path / "f"
    folder.mkdir()
    _save(folder / "a.npy", np.ones((1, 4), np.float32))
    _save(folder / "b.npy", np.full((1, 4), 2, np.float32))
    _save(folder / "c.npy", np.full((1, 4), 3, np.float32))
    _fresh_and_updated(folder, tmp_path / "i", tmp_path)
    before = os.stat(folder / "a.npy")
    _save(folder / "a.npy", np.arange(1, 5, dtype=np.float32)[None])
    os.utime(folder / "a.npy", ns=(before.st_atime_ns, before.st_mtime_ns))
    os.utime(folder / "c.npy", ns=(before.st_atime_ns, before.st_mtime_ns))
    os.utime(folder / "b.npy", ns=(before.st_atime_ns, before.st_mtime_ns))
    _fresh_and_updated(folder, tmp_path / "i", tmp_path)
    os.replace(folder / "c.npy", folder / "b.npy")  # same size, same mtime: b now holds c's values
    updated, fresh = _fresh_and_updated(folder, tmp_path / "i", tmp_path)
    assert updated == fresh
    assert updated[1] == [[1, 2, 3, 4], [3, 3, 3, 3]]


def test_an_index_update_finds_the_dimension_a_fresh_build_finds(tmp_path):
    """The dimension is the one most usable files have, counting the rows kept from the old index: an
    update does not keep the old dimension once most files have another (a fresh build, and the search
    tools reading the folder, would use the other)."""
    folder = tmp_path / "f"
    folder.mkdir()
    _save(folder / "a.npy", np.ones((1, 8), np.float32))
    _fresh_and_updated(folder, tmp_path / "i", tmp_path)
    for name in "bcd":
        _save(folder / f"{name}.npy", np.ones((1, 4), np.float32))
    updated, fresh = _fresh_and_updated(folder, tmp_path / "i", tmp_path)
    assert updated == fresh and updated[0] == ["b.npy", "c.npy", "d.npy"] and updated[2] == ["a.npy"]


def test_a_file_skipped_for_its_dimension_is_read_again_when_the_others_change(tmp_path):
    """'dimension 4 differs from the 8 of the other features' depends on the other files: once those are
    deleted the file is usable, not remembered as unusable (the update raised 'none of its .npy files is
    usable'). An unchanged folder still writes nothing."""
    import os

    folder = tmp_path / "f"
    folder.mkdir()
    _save(folder / "a.npy", np.ones((1, 8), np.float32))
    _save(folder / "b.npy", np.ones((1, 8), np.float32))
    _save(folder / "c.npy", np.ones((1, 4), np.float32))
    updated, _ = _fresh_and_updated(folder, tmp_path / "i", tmp_path)
    assert updated[2] == ["c.npy"]
    files = sorted(os.listdir(tmp_path / "i"))
    updated, _ = _fresh_and_updated(folder, tmp_path / "i", tmp_path)
    assert updated[2] == ["c.npy"] and sorted(os.listdir(tmp_path / "i")) == files
    (folder / "a.npy").unlink()
    (folder / "b.npy").unlink()
    updated, fresh = _fresh_and_updated(folder, tmp_path / "i", tmp_path)
    assert updated == fresh and updated[0] == ["c.npy"]


def test_unusable_files_play_no_part_in_the_choice_of_dimension(tmp_path):
    """A tie between dimensions goes to the one whose first usable file comes first: an unusable file
    (NaN) that an update does not read again cannot tip it, so the update equals a fresh build."""
    folder = tmp_path / "f"
    folder.mkdir()
    _save(folder / "b.npy", np.ones((1, 8), np.float32))
    _save(folder / "c.npy", np.full((1, 8), np.nan, np.float32))
    _fresh_and_updated(folder, tmp_path / "i", tmp_path)
    _save(folder / "a.npy", np.ones((1, 4), np.float32))
    updated, fresh = _fresh_and_updated(folder, tmp_path / "i", tmp_path)
    assert updated == fresh and updated[0] == ["a.npy"]


def test_the_record_of_a_deleted_unusable_file_is_dropped(tmp_path):
    """skipped.<gen>.tsv of an update equals a fresh build's: a deleted unusable file leaves no record."""
    import json

    folder, index = tmp_path / "f", tmp_path / "i"
    folder.mkdir()
    _save(folder / "a.npy", np.ones((1, 4), np.float32))
    (folder / "b.npy").write_bytes(b"not numpy")
    _fresh_and_updated(folder, index, tmp_path)
    (folder / "b.npy").unlink()
    _fresh_and_updated(folder, index, tmp_path)
    manifest = json.loads((index / "manifest.json").read_text())
    assert (index / manifest["skipped"]).read_text() == ""


def test_a_header_that_breaks_the_tokenizer_is_an_unusable_file(tmp_path):
    """A damaged header on which NumPy's header parser raises tokenize.TokenError (not a ValueError) is
    skipped with its reason, not a traceback of every search tool."""
    import io

    from clamp2.search.feature_store import FeatureError, read_features, read_query

    buffer = io.BytesIO()
    np.save(buffer, np.ones((1, 4), np.float32))
    data = bytearray(buffer.getvalue())
    data[10] ^= 0xFF  # the header's "{"
    (tmp_path / "bad.npy").write_bytes(bytes(data))
    _save(tmp_path / "good.npy", np.ones((1, 4), np.float32))
    features = read_features(tmp_path, progress=False)
    assert features.keys == ["good"] and features.skipped[0].reason.startswith("unreadable .npy header")
    with pytest.raises(FeatureError, match="unreadable .npy header"):
        read_query(tmp_path / "bad.npy")


def test_a_reader_opens_the_next_generation_when_a_builder_deletes_the_one_it_read(tmp_path, monkeypatch):
    """A reader that read the manifest just before a builder switched it and deleted the old generation
    opens the new generation (it reported a damaged index and said to rebuild it)."""
    from clamp2.search import feature_store
    from clamp2.search.feature_store import build_index, open_index

    folder, index = tmp_path / "f", tmp_path / "i"
    folder.mkdir()
    _save(folder / "a.npy", np.ones((1, 4), np.float32))
    build_index(folder, index, progress=False)
    _save(folder / "b.npy", np.full((1, 4), 2, np.float32))
    original = np.load
    raced = []

    def load(path, *args, **kwargs):
        if str(path).endswith("norms.1.npy") and not raced:
            raced.append(path)
            build_index(folder, index, progress=False)  # another process finishes an update now
        return original(path, *args, **kwargs)

    monkeypatch.setattr(feature_store.np, "load", load)
    features = open_index(index)
    assert raced and features.names == ["a.npy", "b.npy"] and len(features.norms) == 2


def test_read_tree_keys_are_file_names(tmp_path):
    """read_tree keys are file names up to the first dot, not relative paths (its documented contract)."""
    from clamp2.search.feature_store import read_tree

    (tmp_path / "sub").mkdir()
    _save(tmp_path / "sub" / "a.1.npy", np.ones((1, 4), np.float32))
    _save(tmp_path / "b.npy", np.ones((1, 4), np.float32))
    features = read_tree(tmp_path, progress=False)
    assert features.names == ["b.npy", "sub/a.1.npy"] and features.keys == ["b", "a"]


# ----------------------------------------------------------------------------------------------
# fmd


def test_fmd_inf_sample_sizes_truncate_like_int_of_linspace():
    """FMD-inf sample sizes are truncated, not rounded: the published code takes int(n) of
    np.linspace(min_n, N, steps)."""
    from clamp2.search.fmd import estimate_gaussian, fmd_inf, sample_sizes

    assert sample_sizes(2, 10, 4) == [2, 4, 7, 10]
    assert sample_sizes(500, 1000, 4) == [500, 666, 833, 1000]
    rng = np.random.default_rng(0)
    result = fmd_inf(estimate_gaussian(rng.normal(size=(30, 3))), rng.normal(size=(10, 3)), steps=4, min_n=2)
    assert [n for n, _ in result.points] == [2, 4, 7, 10]


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_a_non_finite_square_root_is_an_error_not_a_number():
    """A non-finite matrix square root is treated as singular: an FMDError, never a nan/inf distance."""
    from clamp2.search.fmd import FMDError, Gaussian, frechet_distance

    good = Gaussian(np.zeros(2), np.eye(2))
    bad = Gaussian(np.zeros(2), np.array([[np.inf, 0.0], [0.0, 1.0]]))
    with pytest.raises(FMDError):
        frechet_distance(good, bad)


def test_fmd_script_exits_1_when_a_file_is_skipped(tmp_path, capsys):
    """clamp2_fmd.py prints the FMD of the usable files and exits 1 when some file was skipped."""
    from conftest import load_script

    rng = np.random.default_rng(0)
    for side in ("r", "t"):
        (tmp_path / side).mkdir()
        for i in range(6):
            _save(tmp_path / side / f"{side}{i}.npy", rng.normal(size=(1, 3)).astype(np.float32))
    (tmp_path / "t" / "zz_bad.npy").write_bytes(b"not numpy")
    script = load_script("semantic_search/clamp2_fmd.py")
    assert script.main([str(tmp_path / "r"), str(tmp_path / "t"), "--no_progress"]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith("FMD (mle) between") and "zz_bad.npy" in captured.err


# ----------------------------------------------------------------------------------------------
# zero-shot


def test_the_longest_label_a_name_starts_with_wins():
    """With labels 'pop' and 'pop rock', pop_rock_1.abc is 'pop rock' (whatever the label order)."""
    from clamp2.search.zero_shot import label_in_name

    assert label_in_name("pop_rock_1.abc", ["pop", "pop rock"]) == "pop rock"
    assert label_in_name("pop_rock_1.abc", ["pop rock", "pop"]) == "pop rock"
    assert label_in_name("pop_1.abc", ["pop", "pop rock"]) == "pop"


# ----------------------------------------------------------------------------------------------
# clamp2_search.py / clamp2_eval.py on feature folders (no model is built)


def _features(folder, keys, seed=0, dim=8):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for key in keys:
        _save(folder / f"{key}.npy", rng.normal(size=(1, dim)).astype(np.float32))
    return folder


NO_MODEL = ["--weights", "/nonexistent/clamp2.pth", "--no_progress"]


def test_clamp2_search_on_features_json_exit_status_and_readme(tmp_path, capsys):
    """A feature folder with a README is still read as features; JSON scores keep 6 decimals, not 4;
    exit 1 when a file was skipped."""
    import json

    from conftest import load_script

    script = load_script("semantic_search/clamp2_search.py")
    folder = _features(tmp_path / "f", [f"k{i:02d}" for i in range(12)])
    (folder / "README.txt").write_text("features of twelve tunes\n")
    query = tmp_path / "q.npy"
    _save(query, np.load(folder / "k03.npy"))
    assert script.main([str(query), str(folder), "--json", "--top_k", "3"] + NO_MODEL) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in results][0] == "k03" and len(results) == 3
    assert any(r["score"] != round(r["score"], 4) for r in results[1:])  # 6 decimals, not 4
    (folder / "zz_bad.npy").write_bytes(b"not numpy")
    assert script.main([str(query), str(folder), "--top_k", "3"] + NO_MODEL) == 1
    assert "zz_bad.npy" in capsys.readouterr().err


def test_clamp2_search_query_errors_are_the_querys(tmp_path, capsys):
    """A .TXT query is a text query (not an unsupported type); a blank query is refused before the model."""
    from conftest import load_script

    script = load_script("semantic_search/clamp2_search.py")
    folder = _features(tmp_path / "f", ["a", "b"])
    assert script.main(["   ", str(folder)] + NO_MODEL) == 2
    assert "the query is empty" in capsys.readouterr().err
    upper = tmp_path / "QUERY.TXT"
    upper.write_text("a jig")
    assert script.main([str(upper), str(folder)] + NO_MODEL) == 2
    assert "unsupported type" not in capsys.readouterr().err  # a text query: it fails on the missing weights


def test_clamp2_eval_on_features_duplicates_ranks_and_exit_status(tmp_path, capsys):
    """Files of a feature folder that share a key: the last wins, as the metrics script does; the ranks
    file lists the top 10; exit 1 when a file was skipped."""
    import json

    from conftest import load_script

    script = load_script("semantic_search/clamp2_eval.py")
    keys = [f"k{i:02d}" for i in range(12)]
    queries, refs = _features(tmp_path / "q", keys, seed=1), _features(tmp_path / "r", keys, seed=2)
    _save(refs / "k00.v2.npy", np.load(queries / "k00.npy"))  # same key, sorted last: it is the reference
    ranks = tmp_path / "ranks.jsonl"
    assert script.main([str(queries), str(refs), "--ranks", str(ranks)] + NO_MODEL) == 0
    lines = [json.loads(x) for x in ranks.read_text().splitlines()]
    assert [x["key"] for x in lines] == keys and all(len(x["top"]) == 10 for x in lines)
    assert lines[0]["rank"] == 1 and lines[0]["top"][0][0] == "k00" and lines[0]["top"][0][1] > 0.9999
    capsys.readouterr()
    (refs / "zz_bad.npy").write_bytes(b"not numpy")
    assert script.main([str(queries), str(refs)] + NO_MODEL) == 1
    assert "zz_bad.npy" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# clamp3 sides


def test_symbolic_files_made_from_midi_beside_it_are_ignored(tmp_path, capsys):
    """x.mid with the x.abc and x.mtf made from it (as many of each) is a folder of MIDI."""
    from clamp2.search.clamp3 import detect_modality

    for name in ("x.mid", "x.abc", "x.mtf", "y.mid", "y.abc"):
        (tmp_path / name).write_bytes(b"")
    modality, files = detect_modality(tmp_path, "query")
    assert modality == "mid" and [f.name for f in files] == ["x.mid", "y.mid"]


def test_images_of_one_stem_get_their_own_caption_files(tmp_path):
    """a.png and a.jpg side by side do not share one caption file (one would be lost)."""
    from clamp2.search.clamp3 import _caption_path

    base = tmp_path / "imgs"
    paths = {_caption_path(str(tmp_path / "t"), base / name, base) for name in ("a.png", "a.jpg", "sub/a.png")}
    assert len(paths) == 3


def test_an_unmatched_reference_key_lists_the_one_file_kept(tmp_path):
    """As in the original ({"unmatched_reference": [rn[k]]}), an unmatched reference key names
    only the file kept for that key, even when several files share it."""
    from clamp2.search.clamp3 import Side, match_keys

    zeros = np.ones((3, 4), np.float32)
    queries = Side(tmp_path / "q", "abc", ["b.abc"], zeros[:1], given="q")
    references = Side(tmp_path / "r", "abc", ["a.1.abc", "a.2.abc", "b.abc"], zeros, given="r")
    matching = match_keys(queries, references)
    assert matching.unmatched == [{"unmatched_reference": ["r/a.1.abc"]}]


def test_large_finite_vectors_keep_the_original_cosine(tmp_path):
    """torch's float32 cosine, the original's, is exact until the sum of squares overflows (norm ~1.8e19):
    a vector of norm 4.3e18 is ranked with that score, not skipped as too large (fuzzing against the original)."""
    import torch

    from clamp2.search.feature_store import read_features

    big = np.arange(1, 9, dtype=np.float32)[None] * np.float32(3e17)  # norm 4.28e18
    other = np.array([[1, 0, 2, 0, 3, 0, 4, 0]], np.float32)
    _save(tmp_path / "big.npy", big)
    _save(tmp_path / "other.npy", other)
    features = read_features(tmp_path, progress=False)
    assert features.keys == ["big", "other"] and not features.skipped
    query = np.ones(8, np.float32)
    expected = torch.cosine_similarity(torch.tensor(query)[None], torch.tensor(np.concatenate([big, other]))).tolist()
    assert Searcher(features.keys, features.matrix).top_k(query, 2) == sorted(zip(features.keys, expected),
                                                                              key=lambda t: -t[1])


def test_a_non_finite_covariance_is_an_error_with_a_scipy_that_refuses_it(monkeypatch):
    """SciPy before 1.16 raises ValueError for a non-finite matrix in sqrtm (1.16+ returns a non-finite root):
    the FMD must still be an FMDError, never a bare ValueError."""
    import scipy.linalg

    from clamp2.search.fmd import FMDError, Gaussian, frechet_distance

    real_sqrtm = scipy.linalg.sqrtm

    def old_sqrtm(matrix, *args, **kwargs):  # scipy<1.16: np.asarray_chkfinite first
        return real_sqrtm(np.asarray_chkfinite(matrix), *args, **kwargs)

    monkeypatch.setattr(scipy.linalg, "sqrtm", old_sqrtm)
    good = Gaussian(np.zeros(2), np.eye(2))
    bad = Gaussian(np.zeros(2), np.array([[np.inf, 0.0], [0.0, 1.0]]))
    with pytest.raises(FMDError):
        frechet_distance(good, bad)
    assert frechet_distance(good, good) == pytest.approx(0.0, abs=1e-12)


def test_an_index_built_by_an_older_reader_is_read_again_in_full(tmp_path):
    """An index keeps its skipped records while a file is unchanged. A file an older version could not read (1-D
    features, before they were taken) is usable now: an update of such an index (no ``reader`` in its manifest)
    reads every file again, and until then search names what it leaves out instead of missing it silently."""
    import json

    from clamp2.search import feature_store
    from clamp2.search.feature_store import build_index, open_index, read_features

    folder, index = tmp_path / "f", tmp_path / "i"
    folder.mkdir()
    _save(folder / "a.npy", np.ones((1, 4), np.float32))
    build_index(folder, index, progress=False)
    # What an older version left: b.npy (1-D) recorded as unusable, a manifest without a reader number.
    _save(folder / "b.npy", np.full(4, 2, np.float32))
    manifest = json.loads((index / "manifest.json").read_text())
    stat = feature_store._stat(folder / "b.npy")
    with open(index / manifest["skipped"], "a") as skipped:
        skipped.write("\t".join(["b.npy", *map(str, stat), "expected [1, D] or [D], got shape (4,)"]) + "\n")
    assert build_index(folder, index, progress=False).count == 1  # same rules: the record stands
    manifest = json.loads((index / "manifest.json").read_text())
    with open(index / manifest["skipped"], "w") as skipped:
        skipped.write("\t".join(["b.npy", *map(str, stat), "expected [1, D] or [D], got shape (4,)"]) + "\n")
    del manifest["reader"]
    (index / "manifest.json").write_text(json.dumps(manifest))

    seen = read_features(index)
    assert seen.keys == ["a"] and [s.path for s in seen.skipped] == [str(index / "b.npy")]
    assert "run build_index.py again" in seen.skipped[0].reason
    update = build_index(folder, index, progress=False)
    assert (update.count, update.reread, update.changed, update.added, len(update.skipped)) == (2, 2, 0, 0, 0)
    assert "read again 2 (indexed by an older version)" in update.summary()
    assert open_index(index).keys == ["a", "b"] and not read_features(index).skipped
    assert np.asarray(open_index(index).matrix).tolist() == [[1, 1, 1, 1], [2, 2, 2, 2]]
    again = build_index(folder, index, progress=False)
    assert (again.unchanged, again.reread) == (2, 0) and "read again" not in again.summary()
    from clamp2.search.feature_store import built_by_older_reader
    readers = (True, "2", 1, 2, 3)  # JSON true or a string is no reader number
    assert [built_by_older_reader({"reader": value}) for value in readers] == [True, True, True, False, False]
    # Which code wrote it, told apart from commit to commit (the version number stays 0.1.0).
    import re

    from clamp2.provenance import code_version
    written_by = json.loads((index / "manifest.json").read_text())["written_by"]
    assert re.fullmatch(r"clamp2 \S+ \(code [0-9a-f]{12}\)", written_by) and code_version()[:12] in written_by


@pytest.mark.parametrize("dtype", [np.float64, np.float16])
def test_features_saved_as_float64_or_float16_are_searched_as_their_float32_values(tmp_path, capsys, dtype):
    """docs/differences.md: a hand-saved float64 (NumPy's default) or float16 folder gives the float32 folder's
    printed scores and order, not scores computed in the file's dtype (the original's)."""
    from conftest import load_script

    script = load_script("semantic_search/semantic_search.py")
    rng = np.random.default_rng(3)
    rows = rng.normal(size=(6, 8)).astype(dtype)
    query = rng.normal(size=(1, 8)).astype(dtype)
    outputs = []
    for saved in (dtype, np.float32):
        folder = tmp_path / np.dtype(saved).name
        folder.mkdir()
        for i, row in enumerate(rows):
            np.save(folder / f"k{i}.npy", row[None].astype(saved))
        np.save(tmp_path / f"q_{np.dtype(saved).name}.npy", query.astype(saved))
        assert script.main([str(tmp_path / f"q_{np.dtype(saved).name}.npy"), str(folder), "--top_k", "6"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and len(outputs[0].splitlines()) >= 6
    cosine = float(np.dot(query[0].astype(np.float64), rows[0].astype(np.float64))
                   / np.linalg.norm(query[0].astype(np.float64)) / np.linalg.norm(rows[0].astype(np.float64)))
    assert f"k0 {cosine!r}" not in outputs[0]  # not the float64 cosine (every digit printed)
