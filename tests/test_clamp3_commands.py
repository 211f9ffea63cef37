"""clamp3_embd/search/score/eval (SPEC_CLAMP3 §18) and BLIP captions (§19).

The feature-level numbers are checked against the reference's own algorithms, written out here the
way the original inference scripts compute them (loops of torch cosines, Python sorts).
"""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from clamp2.search import clamp3
from conftest import TINY_ENV, VECTORS, DiskFullAfter, load_script

CLAMP2 = ["--model", "clamp2", "--weights", str(VECTORS / "tiny_clamp2.pth"), "--text_model",
          str(VECTORS / "tiny_text_model"), "--num_workers", "0", "--no_progress"]


@pytest.fixture(scope="module")
def scripts():
    return {name: load_script(f"semantic_search/clamp3_{name}.py") for name in ("embd", "search", "score", "eval")}


def run(script, args, capsys):
    """The script's exit code, stdout lines and stderr; eval and score on two .npy folders first print the
    original inference scripts' ``Query folder: …`` and ``Reference folder: …``, checked and left out here
    (test_feature_folders_are_named_first_as_the_original_names_them checks when they are printed)."""
    code = script.main([str(a) for a in args])
    out, err = capsys.readouterr()
    lines = out.splitlines()
    if lines[:1] and lines[0].startswith("Query folder: "):
        assert lines[:2] == [f"Query folder: {args[0]}", f"Reference folder: {args[1]}"]
        lines = lines[2:]
    return code, lines, err


# -- modality detection -------------------------------------------------------------------------------

def test_modality_table_any_case(tmp_path):
    names = {"a.txt": "txt", "b.PNG": "img", "c.jpg": "img", "d.JPEG": "img", "e.xml": "xml", "f.MusicXML": "xml",
             "g.mxl": "xml", "h.MID": "mid", "i.midi": "mid", "j.WAV": "audio", "k.mp3": "audio", "l.flac": "audio",
             "m.OGG": "audio", "n.abc": "abc", "o.mtf": "mtf", "p.npy": "npy", "q.pdf": None, "r": None}
    for name, modality in names.items():
        assert clamp3.modality_of(name) == modality, name
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.FLAC").write_bytes(b"")
    (tmp_path / "y.Ogg").write_bytes(b"")
    (tmp_path / "notes.pdf").write_bytes(b"")
    modality, files = clamp3.detect_modality(tmp_path, "reference")
    assert modality == "audio" and [f.name for f in files] == ["x.FLAC", "y.Ogg"]


def test_no_modality_and_mixed_modalities_are_errors(tmp_path, scripts, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.pdf").write_bytes(b"")
    code, out, err = run(scripts["embd"], [tmp_path / "empty", tmp_path / "out", *CLAMP2], capsys)
    assert code == 1 and err.strip() == f'Error: Could not determine input modality for "{tmp_path / "empty"}"'
    mixed = tmp_path / "mixed"
    (mixed / "sub").mkdir(parents=True)
    (mixed / "a.txt").write_text("a tune")
    (mixed / "sub" / "b.mid").write_bytes(b"")
    code, out, err = run(scripts["score"], [mixed, tmp_path / "empty", *CLAMP2], capsys)
    assert code == 1
    assert "holds several query modalities: mid (1 file" in err and "txt (1 file" in err
    query = tmp_path / "query.pdf"
    query.write_bytes(b"")
    code, out, err = run(scripts["search"], [query, mixed, *CLAMP2], capsys)
    assert code == 1 and err.strip() == f'Error: Could not determine query modality for "{query}"'
    code, out, err = run(scripts["eval"], [mixed / "a.txt", tmp_path / "empty", *CLAMP2], capsys)
    assert code == 1 and "Could not determine reference modality" in err


# -- features: keys, score, eval, search ----------------------------------------------------------------

def reference_get_features(path: Path, walk=os.walk):
    """The original's get_features (os.walk's order), keyed relative to the folder (what its [3:] slice means
    for ../cache/<name>)."""
    features, filenames = {}, {}
    for root, _, files in walk(path):
        for name in files:
            if name.endswith(".npy"):
                file = Path(root) / name
                rel = file.relative_to(path)
                key = "/".join(rel.parent.parts) + "/" + file.name.split(".")[0]
                features.setdefault(key, []).append(np.load(file).squeeze())
                filenames.setdefault(key, []).append(str(file))
    return features, filenames


@pytest.fixture
def feature_folders(tmp_path):
    """Queries and references with keys in sub-folders, two queries for one key, near-ties."""
    rng = np.random.default_rng(7)
    dim = 16
    base = rng.normal(size=(30, dim)).astype(np.float32)
    queries, references = tmp_path / "q", tmp_path / "r"
    for i in range(30):
        sub = Path("part2") if i >= 20 else Path(".")
        for side in (queries, references):
            (side / sub).mkdir(parents=True, exist_ok=True)
        np.save(references / sub / f"p{i:02d}.npy", base[i][None])
        for copy in range(2 if i % 7 == 0 else 1):
            noisy = base[i] + 1.5 * rng.normal(size=dim).astype(np.float32)
            np.save(queries / sub / f"p{i:02d}.{copy}.npy", noisy[None])
    # two references with one vector: exact ties with the true match (which win them)
    np.save(references / "part2" / "p28.npy", base[27][None])
    return queries, references


def test_score_pairwise_equals_the_reference(feature_folders, tmp_path, scripts, capsys):
    queries, references = feature_folders
    out_dir = tmp_path / "results"
    code, lines, err = run(scripts["score"], [queries, references, "--output_dir", out_dir, *CLAMP2], capsys)
    assert code == 0, err
    q_feats, q_names = reference_get_features(queries)
    r_feats, r_names = reference_get_features(references)
    sims, records = [], []
    for key in sorted(q_feats):
        for feat, name in zip(q_feats[key], q_names[key]):
            s = torch.nn.functional.cosine_similarity(torch.tensor(feat), torch.tensor(r_feats[key][0]), dim=0).item()
            sims.append(s)
            records.append({"query": name, "reference": r_names[key][0], "similarity": s})
    pairwise = out_dir / "pairwise_similarities.jsonl"
    assert lines == ["There are 30 common keys between query and reference features.",
                     f"Total query features: {len(sims)}", "Total reference features: 30",
                     f"Avg. pairwise similarity: {round(sum(sims) / len(sims), 4)}",
                     f"Pairwise similarity scores saved in '{pairwise}'."]
    written = [json.loads(line) for line in pairwise.read_text().splitlines()]
    assert written == sorted(records, key=lambda r: (-r["similarity"], r["query"], r["reference"]))
    assert not (out_dir / "unmatched_files.jsonl").exists()


def test_feature_folders_are_named_first_as_the_original_names_them(feature_folders, tmp_path, scripts, capsys):
    # The original's inference/clamp3_eval.py and clamp3_score.py print both folders as given before anything else.
    queries, references = feature_folders
    for script, extra in ((scripts["eval"], []), (scripts["score"], []), (scripts["score"], ["--group"])):
        code = script.main([str(queries), str(references), "--output_dir", str(tmp_path), *extra, *CLAMP2])
        lines = capsys.readouterr().out.splitlines()
        assert code == 0 and lines[:2] == [f"Query folder: {queries}", f"Reference folder: {references}"]
        assert not any(line.startswith(("Query folder", "Reference folder")) for line in lines[2:])
    code = scripts["search"].main([str(next(queries.glob("*.npy"))), str(references), *CLAMP2])
    assert code == 0 and not capsys.readouterr().out.startswith("Query")  # the original's search prints no such line


def test_score_unmatched_keys_continue_or_stop(feature_folders, tmp_path, scripts, capsys):
    queries, references = feature_folders
    np.save(queries / "lonely.npy", np.ones((1, 16), np.float32))
    (references / "part2" / "p25.npy").unlink()
    code, lines, err = run(scripts["score"], [queries, references, "--output_dir", tmp_path, *CLAMP2], capsys)
    assert code == 0, err
    unmatched = tmp_path / "unmatched_files.jsonl"
    assert lines[0] == f"There are 2 unmatched query or reference files. Check '{unmatched}' for details."
    assert lines[1] == "There are 29 common keys between query and reference features."
    assert [json.loads(line) for line in unmatched.read_text().splitlines()] == [
        {"unmatched_query": [str(queries / "lonely.npy")]},
        {"unmatched_query": [str(queries / "part2" / "p25.0.npy")]}]
    code, lines, err = run(scripts["score"], [queries, references, "--output_dir", tmp_path, "--strict", *CLAMP2],
                           capsys)
    assert code == 1 and lines == []
    assert err.strip() == f"Error: There are 2 unmatched query or reference files. Check '{unmatched}' for details."
    # Once every key matches, the earlier run's unmatched_files.jsonl does not stay beside the new results.
    (queries / "lonely.npy").unlink()
    (queries / "part2" / "p25.0.npy").unlink()
    code, lines, err = run(scripts["score"], [queries, references, "--output_dir", tmp_path, *CLAMP2], capsys)
    assert code == 0 and lines[0] == "There are 29 common keys between query and reference features.", err
    assert not unmatched.exists()


def reference_group_lines(queries: Path, references: Path, walk=os.walk):
    """The original's --group: get_features' dict of lists flattened (files grouped by key, os.walk's order)."""
    q = [feat for feats in reference_get_features(queries, walk)[0].values() for feat in feats]
    r = [feat for feats in reference_get_features(references, walk)[0].values() for feat in feats]
    sim = torch.nn.functional.cosine_similarity(torch.tensor(np.mean(q, axis=0)), torch.tensor(np.mean(r, axis=0)),
                                                dim=0)
    return [f"Total query features: {len(q)}", f"Total reference features: {len(r)}",
            f"Group similarity: {round(sim.item(), 4)}"]


def test_score_group_equals_the_reference(feature_folders, scripts, capsys):
    queries, references = feature_folders
    code, lines, err = run(scripts["score"], [queries, references, "--group", *CLAMP2], capsys)
    assert code == 0, err
    assert lines == reference_group_lines(queries, references)


@pytest.mark.parametrize("listing", ["sorted", "reversed"])
def test_score_group_sums_in_the_references_order(tmp_path, scripts, capsys, monkeypatch, listing):
    """float32 means depend on the order of the sum: the reference's is os.walk's, grouped by key (fuzzing found
    'Group similarity: 0.0562' printed as 0.0561 with random features; here a cancellation makes it plain)."""
    real_walk = os.walk

    def walk(top, *args, **kwargs):  # a file system listing in the given order
        for folder, folders, files in real_walk(top, *args, **kwargs):
            yield folder, folders, sorted(files, reverse=listing == "reversed")

    monkeypatch.setattr(os, "walk", walk)
    queries, references = tmp_path / "q", tmp_path / "r"
    queries.mkdir(), references.mkdir()
    # sorted: a, b.0, b.1 -> (1 + 1e8) - 1e8 = 0 in float32; reversed and grouped by key: b.1, b.0, a -> 1
    for name, vector in (("a.npy", [1, 1]), ("b.0.npy", [1e8, 1]), ("b.1.npy", [-1e8, 1])):
        np.save(queries / name, np.array([vector], np.float32))
    np.save(references / "a.npy", np.array([[1, 0]], np.float32))
    code, lines, err = run(scripts["score"], [queries, references, "--group", *CLAMP2], capsys)
    assert code == 0, err
    expected = reference_group_lines(queries, references, walk=walk)
    assert expected[-1] == ("Group similarity: 0.0" if listing == "sorted" else "Group similarity: 0.3162")
    assert lines == expected


def reference_metrics(queries: Path, references: Path, walk=os.walk):
    q_feats, q_names = reference_get_features(queries, walk)
    r_feats, r_names = reference_get_features(references, walk)
    common = sorted(set(q_feats) & set(r_feats))
    ref_matrix = torch.tensor(np.array([r_feats[k][0] for k in common]))
    mrr = hit1 = hit10 = hit100 = total = 0
    ranks = []
    for idx, key in enumerate(common):
        for feat, name in zip(q_feats[key], q_names[key]):
            total += 1
            sims = torch.cosine_similarity(torch.tensor(feat).unsqueeze(0), ref_matrix)
            order = [i for i, _ in sorted(enumerate(sims.tolist()), key=lambda x: (x[1], x[0] == idx), reverse=True)]
            rank = order.index(idx) + 1
            mrr += 1 / rank
            hit1, hit10, hit100 = hit1 + (rank <= 1), hit10 + (rank <= 10), hit100 + (rank <= 100)
            ranks.append({"query": name, "reference": r_names[key][0], "rank": rank})
    lines = [f"There are {len(common)} common keys between query and reference features.",
             f"Total query features: {total}", f"Total reference features: {len(common)}",
             f"MRR: {round(mrr / total, 4)}", f"Hit@1: {round(hit1 / total, 4)}", f"Hit@10: {round(hit10 / total, 4)}",
             f"Hit@100: {round(hit100 / total, 4)}"]
    return lines, sorted(ranks, key=lambda r: (r["rank"], r["query"]))


def test_eval_equals_the_reference(feature_folders, tmp_path, scripts, capsys):
    queries, references = feature_folders
    code, lines, err = run(scripts["eval"], [queries, references, "--output_dir", tmp_path, *CLAMP2], capsys)
    assert code == 0, err
    expected, ranks = reference_metrics(queries, references)
    assert lines == expected + [f"Rank details saved in '{tmp_path / 'retrieval_ranks.jsonl'}'."]
    assert [json.loads(line) for line in (tmp_path / "retrieval_ranks.jsonl").read_text().splitlines()] == ranks
    assert any(r["rank"] > 1 for r in ranks) and lines[3] != "MRR: 1.0"  # the test data is not trivial


def test_eval_on_a_full_disk_names_the_ranks_file(feature_folders, tmp_path, scripts, capsys, monkeypatch):
    # It said "error: [Errno 28] No space left on device", naming no file.
    import clamp2.files

    queries, references = feature_folders
    DiskFullAfter(monkeypatch, clamp2.files, "atomic_write_text", 0)
    code, lines, err = run(scripts["eval"], [queries, references, "--output_dir", tmp_path, *CLAMP2], capsys)
    assert code == 1
    assert err.strip() == f"Error: cannot write {tmp_path / 'retrieval_ranks.jsonl'}: No space left on device"


def test_one_dimensional_features_read_as_their_vector(feature_folders, tmp_path, scripts, capsys):
    # The original's CLaMP 3 tools load with np.load(f).squeeze(): a [D] file is the vector of a [1, D] one.
    queries, references = feature_folders
    expected, ranks = reference_metrics(queries, references)
    for path in list(queries.rglob("*.npy"))[::3] + list(references.rglob("*.npy"))[::4]:
        np.save(path, np.load(path)[0])
    code, lines, err = run(scripts["eval"], [queries, references, "--output_dir", tmp_path, *CLAMP2], capsys)
    assert code == 0, err
    assert lines[:-1] == expected


@pytest.mark.parametrize("listing", ["sorted", "reversed"])
def test_reference_keys_of_several_files_are_reported(feature_folders, tmp_path, scripts, capsys, monkeypatch,
                                                      listing):
    """The reference keeps the file its os.walk lists first: the file system's order, which need not be sorted."""
    import os

    real_walk = os.walk

    def walk(top, *args, **kwargs):  # a file system listing in the given order
        for folder, folders, files in real_walk(top, *args, **kwargs):
            yield folder, folders, sorted(files, reverse=listing == "reversed")

    monkeypatch.setattr(os, "walk", walk)
    queries, references = feature_folders
    np.save(references / "p03.v2.npy", np.load(references / "p04.npy"))  # the key /p03 twice
    kept, other = ("p03.npy", "p03.v2.npy") if listing == "sorted" else ("p03.v2.npy", "p03.npy")
    scores = []
    for script in ("score", "eval"):
        code, lines, err = run(scripts[script], [queries, references, "--output_dir", tmp_path, *CLAMP2], capsys)
        assert code == 0, err
        assert f"warning: 2 reference files share the key '/p03' ({references / kept}, " \
               f"{references / other}): {references / kept} is used" in err
        scores.append(lines)
    expected, _ = reference_metrics(queries, references, walk=walk)
    assert scores[1][:len(expected)] == expected
    keys = len(list(references.rglob("*.npy"))) - 1  # the key /p03 counts once
    assert f"Total reference features: {keys}" in scores[0]


def test_tied_records_are_ordered_by_query_path(tmp_path, scripts, capsys):
    # Keys sort "/z" before "a/b"; paths sort "q/a/b.npy" before "q/z.npy": the JSONL lines of equal
    # similarity (equal rank) follow the paths.
    vector = np.ones((1, 16), np.float32)
    for side in ("q", "r"):
        (tmp_path / side / "a").mkdir(parents=True)
        np.save(tmp_path / side / "z.npy", vector)
        np.save(tmp_path / side / "a" / "b.npy", vector)
    q, r = tmp_path / "q", tmp_path / "r"
    for script, name in (("score", "pairwise_similarities.jsonl"), ("eval", "retrieval_ranks.jsonl")):
        code, _, err = run(scripts[script], [q, r, "--output_dir", tmp_path / script, *CLAMP2], capsys)
        assert code == 0, err
        records = [json.loads(line) for line in (tmp_path / script / name).read_text().splitlines()]
        assert [record["query"] for record in records] == [str(q / "a" / "b.npy"), str(q / "z.npy")], script


def random_features(folder: Path, count: int) -> Path:
    """``count`` random 16-d features ``m00.npy``, ``m01.npy``, … in ``folder``."""
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(count):
        np.save(folder / f"m{i:02d}.npy", rng.normal(size=(1, 16)).astype(np.float32))
    return folder


def test_search_prints_ten_results_by_default(tmp_path, scripts, capsys):
    references = random_features(tmp_path / "r", 12)
    code, lines, err = run(scripts["search"], [references / "m00.npy", references, *CLAMP2], capsys)
    assert code == 0, err
    assert lines[0] == "Top 10 results among 12 candidates:" and len(lines) == 11


def test_an_index_is_refused_naming_the_folder_it_indexes(tmp_path, scripts, capsys):
    # The CLaMP 2 tools take an index wherever a folder goes; the clamp3_* commands read its vectors and norms
    # files as two features ("dimension 16 differs from the 5 of the other features").
    from clamp2.search.feature_store import build_index

    references = random_features(tmp_path / "r", 5)
    build_index(references, tmp_path / "index", progress=False)
    for script, args in (("search", [references / "m00.npy", tmp_path / "index"]),
                         ("score", [tmp_path / "index", references])):
        code, lines, err = run(scripts[script], [*args, *CLAMP2], capsys)
        assert code == 1 and not lines
        assert err.strip() == (f"Error: {tmp_path / 'index'} is a feature index (build_index.py); the clamp3_* "
                               f"commands read feature folders, sub-folders included: give the folder it indexes "
                               f"({references})")


def test_eval_is_strict(feature_folders, tmp_path, scripts, capsys):
    queries, references = feature_folders
    np.save(references / "extra.npy", np.ones((1, 16), np.float32))
    code, lines, err = run(scripts["eval"], [queries, references, "--output_dir", tmp_path, *CLAMP2], capsys)
    assert code == 1 and lines == []
    assert "There are 1 unmatched query or reference files" in err
    assert json.loads((tmp_path / "unmatched_files.jsonl").read_text()) == {
        "unmatched_reference": [str(references / "extra.npy")]}


def test_paths_are_spelled_as_given_and_other_files_beside_features_are_ignored(feature_folders, tmp_path, scripts,
                                                                                capsys, monkeypatch):
    """The JSONL files name each feature as the reference's os.path.join over os.walk does ("./q/p00.0.npy");
    a README or a log in a feature folder is not a second modality (the reference reads only the .npy files)."""
    queries, references = feature_folders
    monkeypatch.chdir(tmp_path)
    (queries / "README.txt").write_text("features of the queries")
    (references / "part2" / "extract.log").write_bytes(b"")  # not a modality: ignored in any case
    (references / "cover.png").write_bytes(b"")
    code, lines, err = run(scripts["score"], ["./q", "r/", "--output_dir", "out", *CLAMP2], capsys)
    assert code == 0, err
    assert "note: ./q: reading its 35 .npy feature files; 1 other file ignored (e.g. q/README.txt)" in err
    assert "note: r/: reading its 30 .npy feature files; 1 other file ignored (e.g. r/cover.png)" in err
    records = [json.loads(line) for line in (tmp_path / "out" / "pairwise_similarities.jsonl").read_text().splitlines()]
    assert {r["query"] for r in records} >= {"./q/p00.0.npy", "./q/part2/p21.0.npy"}
    assert {r["reference"] for r in records} >= {"r/p00.npy", "r/part2/p21.npy"}
    # as many texts as features (zero-shot labels with a stray .npy) stay an error of two modalities
    labels = tmp_path / "labels"
    labels.mkdir()
    for name in ("jig", "reel"):
        (labels / f"{name}.txt").write_text(f"a {name}")
    np.save(labels / "stray.npy", np.ones((1, 16), np.float32))
    code, lines, err = run(scripts["search"], ["q/p00.0.npy", "labels", *CLAMP2], capsys)
    assert code == 1 and "holds several reference modalities: npy (1 file" in err and lines == []
    # a single query file is named as given too
    code, lines, err = run(scripts["score"], ["./q/p00.0.npy", "r", "--output_dir", "out", *CLAMP2], capsys)
    assert json.loads((tmp_path / "out" / "pairwise_similarities.jsonl").read_text())["query"] == "./q/p00.0.npy"


def test_search_ranks_sub_folders_with_the_reference_lines(feature_folders, scripts, capsys):
    queries, references = feature_folders
    query = queries / "part2" / "p21.0.npy"
    np.save(references / "p29.npy", np.load(references / "part2" / "p21.npy"))  # one key, two references
    code, lines, err = run(scripts["search"], [query, references, "--top_k", "5", *CLAMP2], capsys)
    assert code == 0, err
    q = torch.tensor(np.load(query)[0]).unsqueeze(0)
    # the reference's dict of features: one file per key, the last in path order
    last_of_key = {f.name.split(".")[0]: f for f in sorted(references.rglob("*.npy"),
                                                           key=lambda f: f.relative_to(references).as_posix())}
    files = list(last_of_key.values())
    assert last_of_key["p29"] == references / "part2" / "p29.npy"
    sims = torch.cosine_similarity(q, torch.tensor(np.array([np.load(f).squeeze() for f in files]))).tolist()
    best = sorted(zip(sims, list(last_of_key)), key=lambda x: (-x[0], x[1]))[:5]
    assert lines == ["Top 5 results among 30 candidates:"] + [f"{key} {round(s, 4)}" for s, key in best]
    assert "p21" in [line.split()[0] for line in lines[1:]]  # in a sub-folder, still ranked
    assert [line.split()[0] for line in lines[1:]].count("p21") == 1  # its copy under the key p29 is left out
    assert "share the key 'p29'" in err and f"{references / 'p29.npy'} left out" in err  # reported
    code, lines, err = run(scripts["search"], [query, references, "--top_k", "100", "--json", *CLAMP2], capsys)
    results = json.loads("\n".join(lines))
    assert len(results) == 30 and results[0]["rank"] == 1 and set(results[0]) == {"rank", "key", "path", "score"}
    assert [r["path"] for r in results if r["key"] == "p29"] == [str(references / "part2" / "p29.npy")]


def test_search_keeps_the_last_file_of_a_key_in_a_flat_folder(tmp_path, scripts, capsys):
    # "J.S. Bach - Prelude" and "J.S. Bach - Fugue" share the key "J": the reference's dict keeps the
    # last file in sorted order and counts keys as candidates.
    refs = tmp_path / "refs"
    refs.mkdir()
    np.save(refs / "J.S. Bach - Fugue.npy", np.array([[1, 0, 0, 0]], np.float32))
    np.save(refs / "J.S. Bach - Prelude.npy", np.array([[0, 1, 0, 0]], np.float32))
    np.save(refs / "Mozart.npy", np.array([[1, 1, 0, 0]], np.float32))
    np.save(tmp_path / "q.npy", np.array([[1, 0.1, 0, 0]], np.float32))
    code, lines, err = run(scripts["search"], [tmp_path / "q.npy", refs, *CLAMP2], capsys)
    assert code == 0, err
    assert lines == ["Top 2 results among 2 candidates:", "Mozart 0.774", "J 0.0995"]
    assert "2 references share the key 'J'" in err


def test_search_ties_are_ordered_by_key(tmp_path, scripts, capsys):
    for name in ("c", "a", "b"):
        np.save(tmp_path / f"{name}.npy", np.ones((1, 4), np.float32))
    np.save(tmp_path / "q.npy", np.ones((1, 4), np.float32))
    (tmp_path / "refs").mkdir()
    for name in ("c", "a", "b"):
        shutil.move(tmp_path / f"{name}.npy", tmp_path / "refs" / f"{name}.npy")
    code, lines, _ = run(scripts["search"], [tmp_path / "q.npy", tmp_path / "refs", *CLAMP2], capsys)
    assert code == 0 and lines == ["Top 3 results among 3 candidates:", "a 1.0", "b 1.0", "c 1.0"]
    # --top_k 0: the header alone, as the reference prints it (a negative K is a usage error)
    code, lines, _ = run(scripts["search"], [tmp_path / "q.npy", tmp_path / "refs", "--top_k", "0", *CLAMP2], capsys)
    assert code == 0 and lines == ["Top 0 results among 3 candidates:"]
    with pytest.raises(SystemExit) as info:
        run(scripts["search"], [tmp_path / "q.npy", tmp_path / "refs", "--top_k", "-1", *CLAMP2], capsys)
    assert info.value.code == 2


def test_rank_queries_equals_rank_true_matches_and_allows_shared_references():
    from clamp2.search.retrieval import rank_queries, rank_true_matches

    rng = np.random.default_rng(3)
    refs = rng.normal(size=(50, 8)).astype(np.float32)
    queries = (refs + rng.normal(size=(50, 8))).astype(np.float32)
    keys = [f"k{i:02d}" for i in range(50)]
    assert rank_queries(queries, np.arange(50), refs, memory_mb=0.001).tolist() == \
        rank_true_matches(keys, queries, keys, refs).ranks.tolist()
    shared = rank_queries(np.concatenate([queries, queries[:5]]), np.r_[np.arange(50), np.arange(5)], refs)
    assert shared[50:].tolist() == shared[:5].tolist()


# -- raw files through a model family and the cache ------------------------------------------------------

@pytest.fixture
def raw(tmp_path):
    music, texts = tmp_path / "music", tmp_path / "texts"
    (music / "sub").mkdir(parents=True)
    texts.mkdir()
    shutil.copy(VECTORS / "inputs" / "xml" / "bwv10.7.mxl", music)
    shutil.copy(VECTORS / "inputs" / "xml" / "bwv10.7.mxl", music / "sub")
    for name in ("bwv10.7", "multi"):
        shutil.copy(VECTORS / "inputs" / "txt" / f"{name}.txt", texts)
    (texts / "sub").mkdir()
    (texts / "sub" / "bwv10.txt").write_text("A chorale in a sub-folder.", encoding="utf-8")
    return music, texts


def test_embd_on_a_full_disk_names_the_feature_and_resumes(tiny_env, raw, tmp_path, scripts, capsys, monkeypatch):
    # It ended with "error: [Errno 28] No space left on device", naming no file.
    _, texts = raw
    full = DiskFullAfter(monkeypatch, np, "save", 1)  # full from the second feature on
    args = [texts, tmp_path / "f", "--get_global", "--no_cache", *CLAMP2]
    code, lines, err = run(scripts["embd"], args, capsys)
    assert code == 1 and len(full.calls) == 2
    assert err.strip().startswith(f"Error: cannot write {tmp_path / 'f'}") and err.strip().endswith(
        "No space left on device; the features written are kept: free space and run the same command again to resume")
    assert len(list((tmp_path / "f").rglob("*.npy"))) == 1 and not list((tmp_path / "f").rglob("*.partial"))
    full.free()
    code, lines, err = run(scripts["embd"], args, capsys)
    assert code == 0 and "2 features written" in err and "1 already there" in err


def test_embd_mirrors_folders_skips_existing_and_uses_the_cache(tiny_env, raw, tmp_path, scripts, capsys):
    _, texts = raw
    cache = ["--cache", tmp_path / "cache"]
    code, lines, err = run(scripts["embd"], [texts, tmp_path / "f1", "--get_global", *cache, *CLAMP2], capsys)
    assert code == 0, err
    assert lines == ["Detected input modality: txt"]
    written = sorted(p.relative_to(tmp_path / "f1").as_posix() for p in (tmp_path / "f1").rglob("*.npy"))
    assert written == ["bwv10.7.npy", "multi.npy", "sub/bwv10.npy"]
    assert np.load(tmp_path / "f1" / "multi.npy").shape == (1, 48)
    assert "3 encoded, 0 from cache" in err
    code, _, err = run(scripts["embd"], [texts, tmp_path / "f2", "--get_global", *cache, *CLAMP2], capsys)
    assert "0 encoded, 3 from cache" in err  # no model work the second time
    assert np.array_equal(np.load(tmp_path / "f1" / "multi.npy"), np.load(tmp_path / "f2" / "multi.npy"))
    (tmp_path / "f2" / "multi.npy").unlink()
    (tmp_path / "f2" / "sub" / "bwv10.npy").write_bytes(b"")  # renamed into place, its data lost in a power cut
    code, _, err = run(scripts["embd"], [texts, tmp_path / "f2", "--get_global", *cache, *CLAMP2], capsys)
    assert "2 features written" in err and "1 already there" in err
    redone = [np.load(tmp_path / folder / "sub" / "bwv10.npy") for folder in ("f1", "f2")]
    assert np.array_equal(*redone)
    code, _, err = run(scripts["embd"], [texts, tmp_path / "pp", "--no_cache", *CLAMP2], capsys)
    assert code == 0 and np.load(tmp_path / "pp" / "multi.npy").ndim == 3  # per-position without --get_global


def test_embd_refuses_a_folder_of_features_from_other_flags_and_overwrite_replaces_them(tiny_env, raw, tmp_path,
                                                                                       scripts, capsys):
    # clamp3_embd then clamp3_embd --get_global into one folder: "0 features written, 3 already there", per-position
    # features kept under the name of global ones.
    from clamp2.extraction.record import RECORD_NAME

    _, texts = raw
    out = tmp_path / "f"
    code, _, err = run(scripts["embd"], [texts, out, "--no_cache", *CLAMP2], capsys)
    assert code == 0, err
    per_position = np.load(out / "multi.npy")
    code, _, err = run(scripts["embd"], [texts, out, "--get_global", "--no_cache", *CLAMP2], capsys)
    assert code == 2 and "per_position: true then, false now" in err and "--overwrite" in err
    assert np.array_equal(np.load(out / "multi.npy"), per_position)
    code, _, err = run(scripts["embd"], [texts, out, "--get_global", "--overwrite", "--no_cache", *CLAMP2], capsys)
    assert code == 0 and "3 features written" in err
    assert np.load(out / "multi.npy").shape == (1, 48)
    assert json.loads((out / RECORD_NAME).read_text())["settings"]["per_position"] is False
    code, _, err = run(scripts["embd"], [texts, out, "--get_global", "--no_cache", *CLAMP2], capsys)
    assert code == 0 and "3 already there" in err


def test_embd_reports_inputs_that_would_write_the_same_feature(tiny_env, raw, tmp_path, scripts, capsys):
    # a.txt and a.TXT (as a.mid and a.midi, a.wav and a.flac) would both write a.npy: both fail, named;
    # the other files are written, and the exit status says some failed.
    _, texts = raw
    (texts / "multi.TXT").write_text("Another text that would write multi.npy.", encoding="utf-8")
    code, _, err = run(scripts["embd"], [texts, tmp_path / "f", "--get_global", "--no_cache", *CLAMP2], capsys)
    assert code == 1, err
    assert "failed: multi.TXT: multi.TXT, multi.txt would all write" in err
    assert "failed: multi.txt: multi.TXT, multi.txt would all write" in err
    written = sorted(p.relative_to(tmp_path / "f").as_posix() for p in (tmp_path / "f").rglob("*.npy"))
    assert written == ["bwv10.7.npy", "sub/bwv10.npy"]
    assert "2 features written" in err and "2 failed" in err


def test_raw_folders_score_and_eval(tiny_env, raw, tmp_path, scripts, capsys):
    music, texts = raw
    (texts / "multi.txt").unlink()
    model = ["--cache", tmp_path / "cache", *CLAMP2]
    code, lines, err = run(scripts["eval"], [texts, music, "--output_dir", tmp_path, *model], capsys)
    assert code == 0, err
    assert lines[:3] == ["Detected query modality: txt", "Detected reference modality: xml",
                         "There are 2 common keys between query and reference features."]
    assert [line.split(":")[0] for line in lines[5:9]] == ["MRR", "Hit@1", "Hit@10", "Hit@100"]
    ranks = [json.loads(line) for line in (tmp_path / "retrieval_ranks.jsonl").read_text().splitlines()]
    assert sorted(r["query"] for r in ranks) == [str(texts / "bwv10.7.txt"), str(texts / "sub" / "bwv10.txt")]
    # the same numbers from features written by clamp3_embd
    for side, folder in (("q", texts), ("r", music)):
        assert run(scripts["embd"], [folder, tmp_path / side, "--get_global", *model], capsys)[0] == 0
    code, feature_lines, _ = run(scripts["eval"], [tmp_path / "q", tmp_path / "r", "--output_dir", tmp_path, *model],
                                 capsys)
    assert feature_lines[0] == lines[2] and feature_lines[3:7] == lines[5:9]
    code, lines, err = run(scripts["score"], [texts, music, "--output_dir", tmp_path, *model], capsys)
    assert code == 0 and lines[2] == "There are 2 common keys between query and reference features."


def test_embd_rerun_removes_a_killed_runs_temporary_files(tiny_env, raw, tmp_path, scripts, capsys):
    # A run killed while writing its features left .<name>.npy.<token>.partial beside them; the re-run wrote every
    # feature but left the dead writer's temporary file in the output folder for good.
    _, texts = raw
    out = tmp_path / "f"
    (out / "sub").mkdir(parents=True)
    (out / ".multi.npy.0123abcd.partial").write_bytes(b"\x93NUMPY half")  # no owner: an earlier version's, dead
    (out / "sub" / ".bwv10.npy.4567cdef.partial").write_bytes(b"")
    code, _, err = run(scripts["embd"], [texts, out, "--get_global", "--no_cache", *CLAMP2], capsys)
    assert code == 0, err
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == ["bwv10.7.npy", "extraction_settings.json",
                                                                            "multi.npy", "sub", "sub/bwv10.npy"]


def test_raw_query_search(tiny_env, raw, tmp_path, scripts, capsys):
    music, texts = raw
    code, lines, err = run(scripts["search"], [texts / "multi.txt", music, "--no_cache", *CLAMP2], capsys)
    assert code == 0, err
    assert lines[:3] == ["Detected query modality: txt", "Detected reference modality: xml",
                         "Top 1 results among 1 candidates:"]
    # both scores have the key bwv10: one is ranked, as the reference's dict of features keeps one
    assert [line.split()[0] for line in lines[3:]] == ["bwv10"] and "2 references share the key 'bwv10'" in err


def test_clamp2_family_refuses_audio(tmp_path, scripts, capsys):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.wav").write_bytes(b"RIFF")
    code, _, err = run(scripts["embd"], [tmp_path / "a", tmp_path / "o", *CLAMP2], capsys)
    assert code == 1 and "CLaMP 2 cannot encode audio inputs" in err


# -- images → captions → text ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory):
    """A random BLIP captioner and processor at a tiny size, saved like the published folder."""
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    folder = tmp_path_factory.mktemp("tiny_blip")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "a", "piano", "violin", "song", "quiet", "loud",
             "the", "of", "music", "chorale"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]")
    (folder / "vocab.txt").unlink()
    ids = dict(bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id,
               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.sep_token_id)
    config = BlipConfig(text_config=dict(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=32, max_position_embeddings=32, **ids),
                        vision_config=dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                           intermediate_size=32, image_size=32, patch_size=16), projection_dim=16)
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(folder)
    return folder


def write_image(path: Path, seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray((rng.random((40, 50, 3)) * 255).astype("uint8")).save(path)


def test_caption_is_the_blip_pipeline(tiny_blip, tmp_path):
    """The original's call (``generate`` without arguments) under its transformers 4 stops at 20 tokens in all,
    the start token included; transformers 5 alone would generate 20 after it."""
    from transformers import BlipForConditionalGeneration, BlipProcessor

    from clamp2.search.captions import Captioner, caption_images, write_caption

    image = tmp_path / "photo.JPEG"
    write_image(image, 1)
    processor = BlipProcessor.from_pretrained(tiny_blip)
    model = BlipForConditionalGeneration.from_pretrained(tiny_blip).eval()
    from PIL import Image

    output = model.generate(**processor(Image.open(image).convert("RGB"), return_tensors="pt"), max_length=20)
    assert output.shape[1] == 20  # this random BLIP runs to the cap: the case where the length matters
    expected = processor.decode(output[0], skip_special_tokens=True)
    assert expected and Captioner.from_pretrained(tiny_blip).caption(image) == expected
    from clamp2.cache import FeatureCache

    cache = FeatureCache(tmp_path / "cache")
    first, failed = caption_images([image], tiny_blip, cache=cache)
    assert failed == [] and first[0].text == expected and not first[0].cached
    second, _ = caption_images([image], tiny_blip, cache=cache)
    assert second[0].text == expected and second[0].cached  # no BLIP the second time
    write_caption(expected, tmp_path / "photo.txt")
    assert (tmp_path / "photo.txt").read_bytes() == expected.encode("utf-8")  # no trailing newline


def test_transparent_image_is_converted_to_rgb_as_the_original(tiny_blip, tmp_path):
    """The original opens every image with .convert("RGB") (alpha dropped); BLIP's processor given the RGBA
    image itself would composite it, other pixels (sheet music exported as a transparent PNG)."""
    from PIL import Image

    from clamp2.search.captions import Captioner

    rng = np.random.default_rng(3)
    image = tmp_path / "score.png"
    Image.fromarray((rng.random((40, 50, 4)) * 255).astype("uint8"), "RGBA").save(image)
    captioner = Captioner.from_pretrained(tiny_blip)
    seen = []
    generate = captioner.model.generate
    captioner.model.generate = lambda **inputs: seen.append(inputs["pixel_values"]) or generate(**inputs)
    captioner.caption(image)
    with Image.open(image) as opened:
        as_original = captioner.processor(opened.convert("RGB"), return_tensors="pt")["pixel_values"]
        as_given = captioner.processor(opened, return_tensors="pt")["pixel_values"]
    assert not torch.allclose(as_given, as_original, atol=0.1)  # the conversion matters for this image
    assert len(seen) == 1 and torch.equal(seen[0], as_original)


def bomb_png(path: Path, width: int = 20000, height: int = 20000) -> None:
    """A 60-byte PNG whose header claims width x height pixels: PIL refuses to open it (DecompressionBombError)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b""))


def test_decompression_bomb_is_one_failure_not_the_end_of_the_batch(tiny_env, tiny_blip, tmp_path, scripts, capsys):
    """PIL's DecompressionBombError is not an OSError: one such image stopped caption_images, and clamp3_embd
    ended in a traceback with no feature written for the good images."""
    from clamp2.search.captions import caption_images

    (tmp_path / "photos").mkdir()
    write_image(tmp_path / "photos" / "good.png", 1)
    bomb_png(tmp_path / "photos" / "huge.png")
    captions, failed = caption_images([tmp_path / "photos" / "good.png", tmp_path / "photos" / "huge.png"], tiny_blip)
    assert [c.image.name for c in captions] == ["good.png"]
    assert len(failed) == 1 and failed[0][0].name == "huge.png" and "decompression bomb" in failed[0][1]
    model = ["--captioner", tiny_blip, "--cache", tmp_path / "cache", *CLAMP2]
    code, lines, err = run(scripts["embd"], [tmp_path / "photos", tmp_path / "feats", "--get_global", *model], capsys)
    assert code == 1 and lines[0] == "Detected input modality: img" and lines[1].startswith('Caption of "good.png": ')
    assert [line for line in err.splitlines() if line.startswith("failed:")] == \
        [f"failed: {tmp_path / 'photos' / 'huge.png'}: {failed[0][1]}"]
    assert sorted(p.name for p in (tmp_path / "feats").glob("*.npy")) == ["good.npy"]


def test_empty_caption_is_named_as_the_other_image_failures(tiny_env, tiny_blip, tmp_path, scripts, capsys,
                                                            monkeypatch):
    """An empty caption fails as an empty text file does (docs/differences.md); the failure names the image by its
    path as walked, as an image that cannot be captioned is named, not by its path relative to the folder."""
    from clamp2.search import captions

    (tmp_path / "photos" / "sub").mkdir(parents=True)
    write_image(tmp_path / "photos" / "sub" / "blank.png", 1)
    (tmp_path / "photos" / "sub" / "broken.png").write_bytes(b"not an image")
    caption = captions.Captioner.caption
    monkeypatch.setattr(captions.Captioner, "caption",
                        lambda self, path: "" if Path(path).name == "blank.png" else caption(self, path))
    model = ["--captioner", tiny_blip, "--cache", tmp_path / "cache", *CLAMP2]
    code, lines, err = run(scripts["embd"], [tmp_path / "photos", tmp_path / "feats", "--get_global", *model], capsys)
    assert code == 1 and lines == ["Detected input modality: img", 'Caption of "sub/blank.png": ']
    failed = sorted(line for line in err.splitlines() if line.startswith("failed:"))
    sub = tmp_path / "photos" / "sub"
    assert len(failed) == 2 and failed[0].startswith(f"failed: {sub / 'blank.png'}: no non-empty line of text")
    assert failed[1].startswith(f"failed: {sub / 'broken.png'}: cannot caption: cannot identify image file")
    assert not (tmp_path / "feats").exists() or not any((tmp_path / "feats").rglob("*.npy"))


def test_caption_length_follows_the_text_config(tiny_blip, tmp_path):
    import json
    import shutil

    from transformers import BlipForConditionalGeneration, BlipProcessor

    from clamp2.search.captions import Captioner, caption_max_length

    assert caption_max_length(tiny_blip) == 20  # not in config.json: transformers 4's default
    folder = tmp_path / "blip12"
    shutil.copytree(tiny_blip, folder)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["max_length"] = 12  # a transformers 4 config.json carries it; transformers 4 obeyed it
    (folder / "config.json").write_text(json.dumps(config))
    assert caption_max_length(folder) == 12
    image = tmp_path / "photo.png"
    write_image(image, 2)
    processor = BlipProcessor.from_pretrained(folder)
    model = BlipForConditionalGeneration.from_pretrained(folder).eval()
    from PIL import Image

    output = model.generate(**processor(Image.open(image).convert("RGB"), return_tensors="pt"), max_length=12)
    assert output.shape[1] == 12
    assert Captioner.from_pretrained(folder).caption(image) == processor.decode(output[0], skip_special_tokens=True)


def test_captioner_not_downloaded_is_a_clear_error(tmp_path, monkeypatch):
    from clamp2.search.captions import CaptionerError, captioner_folder

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import importlib

    import huggingface_hub.constants

    importlib.reload(huggingface_hub.constants)
    try:
        with pytest.raises(CaptionerError, match="nothing is downloaded here.*`hf download Salesforce/blip-image-captioning-base`"):
            captioner_folder("Salesforce/blip-image-captioning-base")
    finally:
        monkeypatch.undo()
        importlib.reload(huggingface_hub.constants)


def test_image_query_searches_its_caption(tiny_env, tiny_blip, raw, tmp_path, scripts, capsys):
    music, _ = raw
    (tmp_path / "photos" / "sub").mkdir(parents=True)
    write_image(tmp_path / "photos" / "sub" / "cover.png", 2)
    model = ["--captioner", tiny_blip, "--cache", tmp_path / "cache", *CLAMP2]
    code, lines, err = run(scripts["search"], [tmp_path / "photos" / "sub" / "cover.png", music, *model], capsys)
    assert code == 0, err
    assert lines[0] == "Detected query modality: img" and lines[1].startswith('Caption of "cover.png": ')
    caption = lines[1].split(": ", 1)[1]
    assert lines[2:4] == ["Detected reference modality: xml", "Top 1 results among 1 candidates:"]
    # the same ranking as a text query holding the caption
    (tmp_path / "caption.txt").write_text(caption, encoding="utf-8")
    code, text_lines, _ = run(scripts["search"], [tmp_path / "caption.txt", music, *model], capsys)
    assert text_lines[1:] == lines[2:]
    code, lines, err = run(scripts["embd"], [tmp_path / "photos", tmp_path / "feats", "--get_global", *model], capsys)
    assert code == 0 and lines == ["Detected input modality: img", f'Caption of "sub/cover.png": {caption}']
    assert np.load(tmp_path / "feats" / "sub" / "cover.npy").shape == (1, 48)


def test_features_of_the_original_extractor(tmp_path, scripts, capsys):
    """The reference vectors' CLaMP 3 global features (written by the original's extract_clamp3.py)."""
    features = Path(__file__).parent / "data" / "vectors_clamp3" / "expected" / "feat_clamp3_global"
    texts = tmp_path / "txt"
    shutil.copytree(features / "txt", texts)
    (texts / "multi.npy").unlink()
    code, lines, err = run(scripts["eval"], [texts, features / "abc", "--output_dir", tmp_path, *CLAMP2], capsys)
    assert code == 0, err
    assert lines[:-1] == reference_metrics(texts, features / "abc")[0]
    code, lines, err = run(scripts["score"], [texts, features / "mtf", "--output_dir", tmp_path, *CLAMP2], capsys)
    assert code == 0 and "There are 1 unmatched" in lines[0]  # handmade_sysex has no text
    code, lines, _ = run(scripts["search"], [features / "txt" / "multi.npy", features / "audio", *CLAMP2], capsys)
    q = torch.tensor(np.load(features / "txt" / "multi.npy")[0]).unsqueeze(0)
    # the reference's get_info: a dict by key over sorted(os.listdir()), so bwv26.6_44k1… replaces bwv26.6_16k…
    features_of = {f.split(".")[0]: np.load(features / "audio" / f)[0] for f in sorted(os.listdir(features / "audio"))}
    sims = torch.cosine_similarity(q, torch.tensor(np.array(list(features_of.values())))).tolist()
    best = sorted(zip(sims, list(features_of)), key=lambda x: (-x[0], x[1]))
    assert lines == ["Top 2 results among 2 candidates:"] + [f"{key} {round(s, 4)}" for s, key in best]


# -- CLaMP 3 itself (the tiny reference checkpoint and MERT) -------------------------------------------

VECTORS3 = Path(__file__).parent / "data" / "vectors_clamp3"
TINY3_ENV = {**TINY_ENV, "AUDIO_HIDDEN_SIZE": "64", "AUDIO_NUM_LAYERS": "2", "MAX_AUDIO_LENGTH": "4"}
CLAMP3 = ["--weights", str(VECTORS3 / "tiny_clamp3.pth"), "--text_model", str(VECTORS / "tiny_text_model"),
          "--mert", str(VECTORS3 / "tiny_mert"), "--num_workers", "0", "--no_progress"]


@pytest.fixture
def demo(tmp_path, monkeypatch):
    """One folder per modality: WAV, MIDI, MusicXML and text (the reference vectors' inputs)."""
    for key, value in TINY3_ENV.items():
        monkeypatch.setenv(key, value)
    folders = {name: tmp_path / "demo" / name for name in ("audio", "midi", "xml", "text")}
    for folder in folders.values():
        folder.mkdir(parents=True)
    shutil.copy(VECTORS3 / "inputs" / "audio" / "bwv26.6_44k1_stereo_s16.wav", folders["audio"])
    shutil.copy(VECTORS3 / "inputs" / "audio" / "banish_misfortune_48k_stereo_f32.wav", folders["audio"])  # 0.5 s
    for name in ("bwv26.6.mid", "banish_misfortune.mid"):
        shutil.copy(VECTORS3 / "inputs" / "midi" / name, folders["midi"])
    shutil.copy(VECTORS3 / "inputs" / "xml" / "bwv26.6.mxl", folders["xml"])
    for name in ("bwv26.6.txt", "banish_misfortune.txt"):
        shutil.copy(VECTORS3 / "inputs" / "txt" / name, folders["text"])
    return folders


def test_clamp3_four_commands_on_raw_folders(demo, tmp_path, scripts, capsys):
    model = ["--cache", tmp_path / "cache", *CLAMP3]
    expected = VECTORS3 / "expected" / "feat_clamp3_global"
    code, lines, err = run(scripts["embd"], [demo["audio"], tmp_path / "f" / "audio", "--get_global", *model], capsys)
    assert code == 1 and lines == ["Detected input modality: audio"]  # the 0.5 s file has no MERT window
    assert "banish_misfortune_48k_stereo_f32.wav: shorter than 1 s" in err and "1 encoded, 0 from cache" in err
    feature = np.load(tmp_path / "f" / "audio" / "bwv26.6_44k1_stereo_s16.npy")
    np.testing.assert_allclose(feature, np.load(expected / "audio" / "bwv26.6_44k1_stereo_s16.npy"), atol=1e-5)
    for name in ("midi", "xml", "text"):
        code, lines, err = run(scripts["embd"], [demo[name], tmp_path / "f" / name, "--get_global", *model], capsys)
        assert code == 0, err
    np.testing.assert_allclose(np.load(tmp_path / "f" / "text" / "bwv26.6.npy"), np.load(expected / "txt" / "bwv26.6.npy"),
                               atol=1e-5)

    code, lines, err = run(scripts["search"], [demo["text"] / "bwv26.6.txt", demo["midi"], *model], capsys)
    assert code == 0, err
    assert lines[:3] == ["Detected query modality: txt", "Detected reference modality: mid",
                         "Top 2 results among 2 candidates:"]
    # the same lines from the features clamp3_embd wrote
    code, feature_lines, _ = run(scripts["search"], [tmp_path / "f" / "text" / "bwv26.6.npy", tmp_path / "f" / "midi",
                                                     *model], capsys)
    assert feature_lines == lines[2:]
    code, lines, err = run(scripts["score"], [demo["midi"], demo["xml"], "--output_dir", tmp_path, *model], capsys)
    assert code == 0, err
    assert lines[2:5] == [f"There are 1 unmatched query or reference files. Check '{tmp_path / 'unmatched_files.jsonl'}' "
                          "for details.", "There are 1 common keys between query and reference features.",
                          "Total query features: 1"]
    code, lines, err = run(scripts["eval"], [demo["text"], demo["midi"], "--output_dir", tmp_path, *model], capsys)
    assert code == 0, err
    assert lines[2] == "There are 2 common keys between query and reference features."
    code, lines, err = run(scripts["eval"], [demo["text"], demo["audio"], "--output_dir", tmp_path, *model], capsys)
    assert code == 1 and "unmatched" in err  # audio keys are the rendering names: nothing mirrors the texts

    # a second run of any command on the same folders does no model work: everything is in the cache
    code, _, err = run(scripts["embd"], [demo["midi"], tmp_path / "again", "--get_global", *model], capsys)
    assert "0 encoded, 2 from cache" in err


def test_abc_and_mtf_beside_one_of_the_originals_modalities_are_ignored(demo, tmp_path, scripts, capsys):
    # The original's modality table has no .abc or .mtf: x.mid with the x.mtf converted beside it is read as
    # MIDI (the .mtf never opened); more .abc/.mtf than MIDI files is a folder of symbolic files, an error.
    midi = demo["midi"]
    (midi / "bwv26.6.mtf").write_text("not opened")
    code, lines, err = run(scripts["embd"], [midi, tmp_path / "f", "--get_global", *CLAMP3], capsys)
    assert code == 0, err
    assert lines == ["Detected input modality: mid"]
    assert f"note: {midi}: reading its 2 mid files; 1 .abc/.mtf file beside them ignored" in err
    assert sorted(p.name for p in (tmp_path / "f").glob("*.npy")) == ["banish_misfortune.npy", "bwv26.6.npy"]
    (midi / "bwv26.6.abc").write_text("X:1\n")  # an .abc and an .mtf per MIDI file at most: still MIDI
    code, lines, err = run(scripts["embd"], [midi, tmp_path / "f", "--get_global", *CLAMP3], capsys)
    assert code == 0 and "2 .abc/.mtf files beside them ignored" in err
    for name in ("a.abc", "b.abc"):
        (midi / name).write_text("X:1\n")
    code, lines, err = run(scripts["embd"], [midi, tmp_path / "g", "--get_global", *CLAMP3], capsys)
    assert code == 1 and "holds several input modalities: abc (3 files" in err and "mid (2 files" in err


def test_zero_shot_with_clamp3(demo, tmp_path, capsys):
    zero_shot = load_script("semantic_search/zero_shot.py")
    folder = tmp_path / "mixed"
    shutil.copytree(demo["midi"], folder)
    shutil.copy(demo["audio"] / "bwv26.6_44k1_stereo_s16.wav", folder)
    code = zero_shot.main([str(folder), "--labels", "jig,chorale", "--model", "clamp3", "--output",
                           str(tmp_path / "z.json"), "--no_cache", *CLAMP3])
    assert code == 0, capsys.readouterr().err
    assert sorted(json.loads((tmp_path / "z.json").read_text())) == ["banish_misfortune.mid", "bwv26.6.mid",
                                                                      "bwv26.6_44k1_stereo_s16.wav"]


def test_a_file_that_cannot_be_encoded_makes_the_exit_status_1(tmp_path, scripts, capsys, monkeypatch):
    # The results of the other files are printed; the status says that one was left out.
    for key, value in TINY3_ENV.items():
        monkeypatch.setenv(key, value)
    references = tmp_path / "abc"
    shutil.copytree(VECTORS3 / "extract_in" / "abc", references)
    (references / "broken.abc").write_bytes(b"\xff\xfe not UTF-8")
    query = VECTORS3 / "extract_in" / "txt" / "bwv26.6.txt"
    code, lines, err = run(scripts["search"], [query, references, "--no_cache", *CLAMP3], capsys)
    assert code == 1 and "Top 2 results among 2 candidates:" in lines
    assert f"failed: {references / 'broken.abc'}: not UTF-8" in err


def test_embd_never_leaves_a_half_written_feature(demo, tmp_path, scripts, capsys, monkeypatch):
    # A save that dies halfway (a full disk) leaves no .npy under the output's name: a re-run, which skips
    # existing outputs, writes it whole.
    real_save = np.save

    def dying_save(file, array, *args, **kwargs):
        if "bwv26.6" in getattr(file, "name", ""):
            file.write(b"\x93NUMPY half")
            raise OSError(28, "No space left on device")
        return real_save(file, array, *args, **kwargs)

    out = tmp_path / "f"
    monkeypatch.setattr(np, "save", dying_save)
    code, _, err = run(scripts["embd"], [demo["midi"], out, "--get_global", *CLAMP3], capsys)
    assert code != 0 and "No space left on device" in err
    assert not (out / "bwv26.6.npy").exists() and not list(out.rglob("*.partial"))
    monkeypatch.setattr(np, "save", real_save)
    code, _, err = run(scripts["embd"], [demo["midi"], out, "--get_global", *CLAMP3], capsys)
    assert code == 0, err
    assert np.load(out / "bwv26.6.npy").shape == (1, 48)


# -- edge cases from a code-driven mutation audit of the clamp3_* commands --------------------------------

def _npy(path, vector):
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.asarray(vector, dtype=np.float32)[None])


# a feature folder with music files beside the .npy files is a folder of several modalities,
# not features (only a README .txt or a cover image beside features is ignored).
@pytest.mark.parametrize("other", ["c.mid", "c.abc", "c.wav"])
def test_music_beside_features_is_several_modalities(tmp_path, other):
    for name in ("a.npy", "b.npy"):
        _npy(tmp_path / name, [1.0, 0.0, 0.0])
    (tmp_path / other).write_bytes(b"")
    with pytest.raises(clamp3.ModalityError, match="several reference modalities"):
        clamp3.load_side(tmp_path, "reference", None)


def test_a_readme_beside_features_is_ignored(tmp_path, capsys):
    for name in ("a.npy", "b.npy"):
        _npy(tmp_path / name, [1.0, 0.0, 0.0])
    (tmp_path / "README.txt").write_text("about")
    side = clamp3.load_side(tmp_path, "reference", None)
    assert side.modality == "npy" and side.relative == ["a.npy", "b.npy"]


# a failure reason spread over lines is printed as one line (stderr "failed: name: reason").
def test_failure_reasons_are_one_line(tmp_path):
    from clamp2.api import Encoded

    encoded = Encoded(items=[], features=np.zeros((0, 4), np.float32), indices=[],
                      failures=[(tmp_path / "x.mid", "cannot convert:\n  bad   header\n")])
    side = clamp3._side_of(tmp_path, "mid", encoded, True)
    assert side.failures == [(str(tmp_path / "x.mid"), "cannot convert: bad header")]


# clamp3_search breaks equal scores by key, also when references sit in sub-folders
# (path order "b.npy" < "sub/a.npy" is not key order "a" < "b").
def test_search_ties_by_key_across_sub_folders(tmp_path):
    _npy(tmp_path / "b.npy", [1.0, 0.0, 0.0])
    _npy(tmp_path / "sub" / "a.npy", [1.0, 0.0, 0.0])
    _npy(tmp_path / "c.npy", [0.0, 1.0, 0.0])
    side = clamp3.load_side(tmp_path, "reference", None)
    hits, warnings, candidates = clamp3.search(np.array([1.0, 0.0, 0.0], np.float32), side, 3)
    assert [key for key, _, _ in hits] == ["a", "b", "c"] and candidates == 3 and not warnings
    assert [relative for _, relative, _ in hits] == ["sub/a.npy", "b.npy", "c.npy"]


# the average pairwise similarity is printed rounded to 4 places, as the original's round(x, 4).
def test_pairwise_average_is_rounded_to_four_places(tmp_path):
    q, r = tmp_path / "q", tmp_path / "r"
    angle = np.arccos(0.123456)
    _npy(q / "a.npy", [1.0, 0.0])
    _npy(r / "a.npy", [np.cos(angle), np.sin(angle)])
    queries = clamp3.load_side(q, "query", None)
    references = clamp3.load_side(r, "reference", None)
    out = tmp_path / "out"
    out.mkdir()
    lines = clamp3.pairwise_score(queries, references, out, say=lambda line: None)
    assert lines[3] == "Avg. pairwise similarity: 0.1235"


# a query of another dimension than the references is §18's "Error: ..." (exit 1), not a matmul error.
def test_search_query_of_another_dimension_is_a_command_error(tmp_path):
    _npy(tmp_path / "a.npy", [1.0, 0.0, 0.0])
    side = clamp3.load_side(tmp_path, "reference", None)
    with pytest.raises(clamp3.CommandError, match="the query has dimension 2, the references 3"):
        clamp3.search(np.array([1.0, 0.0], np.float32), side, 3)


# -- the scripts, edge cases ---------------------------------------------------------------------------------------

# clamp3_embd on a folder of .npy features says so (exit 1), before any model is built.
def test_embd_refuses_a_feature_folder_with_its_own_message(tmp_path, scripts, capsys):
    _npy(tmp_path / "feats" / "a.npy", [1.0, 0.0])
    code, lines, err = run(scripts["embd"], [tmp_path / "feats", tmp_path / "out", "--model", "clamp2",
                                             "--weights", tmp_path / "missing.pth", "--no_progress"], capsys)
    assert code == 1 and err.strip() == f"Error: {tmp_path / 'feats'} holds .npy features already, not raw inputs"
    assert not (tmp_path / "out").exists()


# clamp3_search --json prints JSON alone on stdout (no "Detected ... modality" lines), raw query or not.
def test_search_json_of_a_raw_query_is_json_alone(tiny_env, raw, tmp_path, scripts, capsys):
    music, texts = raw
    code, lines, err = run(scripts["search"], [texts / "multi.txt", music, "--json", "--no_cache", *CLAMP2], capsys)
    assert code == 0, err
    result = json.loads("\n".join(lines))
    assert [(r["rank"], r["key"]) for r in result] == [(1, "bwv10")]
    assert result[0]["path"] == str(music / "sub" / "bwv10.7.mxl")


# for an image query, --json holds the caption beside the results.
def test_search_json_of_an_image_query_holds_its_caption(tiny_env, tiny_blip, raw, tmp_path, scripts, capsys):
    music, _ = raw
    write_image(tmp_path / "cover.png", 2)
    model = ["--captioner", tiny_blip, "--cache", tmp_path / "cache", *CLAMP2]
    code, lines, err = run(scripts["search"], [tmp_path / "cover.png", music, *model], capsys)
    assert code == 0, err
    caption = lines[1].split(": ", 1)[1]
    code, lines, err = run(scripts["search"], [tmp_path / "cover.png", music, "--json", *model], capsys)
    assert code == 0, err
    result = json.loads("\n".join(lines))
    assert result["caption"] == caption and [r["key"] for r in result["results"]] == ["bwv10"]


# clamp3_score, clamp3_eval and clamp3_search: an unusable file on either side is named and makes the status 1, the
# results of the others still printed.
@pytest.mark.parametrize("name", ["score", "eval", "search"])
def test_an_unusable_feature_file_makes_the_exit_status_1(tmp_path, scripts, capsys, name):
    q, r = tmp_path / "q", tmp_path / "r"
    for folder in (q, r):
        _npy(folder / "a.npy", [1.0, 0.0, 0.0])
        _npy(folder / "b.npy", [0.0, 1.0, 0.0])
    _npy(r / "zero.npy", [0.0, 0.0, 0.0])  # all zeros: skipped
    _npy(q / "zero.npy", [0.0, 0.0, 0.0])
    query = q / "a.npy" if name == "search" else q
    code, lines, err = run(scripts[name], [query, r, "--model", "clamp2", "--weights", tmp_path / "missing.pth",
                                           "--no_progress", *([] if name == "search" else ["--output_dir", tmp_path])],
                           capsys)
    assert code == 1, err
    assert f"failed: {r / 'zero.npy'}" in err
    if name == "score":
        assert "Avg. pairwise similarity: 1.0" in lines and "Total query features: 2" in lines
    elif name == "eval":
        assert "Total query features: 2" in lines
    else:
        assert lines[:2] == ["Top 2 results among 2 candidates:", "a 1.0"]


# -- captions, edge cases ------------------------------------------------------------------------------------------

# captions are cached per captioner: another captioner's files give a fresh caption, not the cached one.
def test_caption_cache_is_keyed_on_the_captioner(tiny_blip, tmp_path):
    from clamp2.cache import FeatureCache
    from clamp2.search.captions import caption_images

    write_image(tmp_path / "a.png", 3)
    other = tmp_path / "other_blip"
    shutil.copytree(tiny_blip, other)
    config = json.loads((other / "config.json").read_text())
    config["text_config"]["max_length"] = 5
    (other / "config.json").write_text(json.dumps(config))
    cache = FeatureCache(tmp_path / "cache")
    first, _ = caption_images([tmp_path / "a.png"], tiny_blip, cache=cache)
    again, _ = caption_images([tmp_path / "a.png"], tiny_blip, cache=cache)
    second, _ = caption_images([tmp_path / "a.png"], other, cache=cache)
    assert [c.cached for c in first + again + second] == [False, True, False]


# an image PIL cannot read is a failure named with its reason; the other images are captioned.
def test_an_unreadable_image_is_a_failure_not_a_crash(tiny_blip, tmp_path):
    from clamp2.search.captions import caption_images

    write_image(tmp_path / "a.png", 3)
    (tmp_path / "b.png").write_bytes(b"not a png")
    captions, failures = caption_images([tmp_path / "a.png", tmp_path / "b.png"], tiny_blip)
    assert [c.image.name for c in captions] == ["a.png"]
    assert [(p.name, reason.split(":")[0]) for p, reason in failures] == [("b.png", "cannot caption")]


# The original's text pipeline runs code/extract_clamp3.py on the folder itself, which encodes every .txt, .abc,
# .mtf (and .npy) file in it: a tune.abc beside a README.txt is encoded as music beside the text, silently mixing
# two modalities. Unlike .abc/.mtf beside MIDI, MusicXML, audio or images (whose converters never open them),
# this is an error that names the files, not a note that they are ignored.
@pytest.mark.parametrize("symbolic", ["tune.abc", "tune.mtf"])
def test_abc_or_mtf_beside_text_is_several_modalities(tmp_path, symbolic):
    (tmp_path / "README.txt").write_text("about the tune")
    (tmp_path / symbolic).write_text("X:1\nK:C\nC|\n")
    with pytest.raises(clamp3.ModalityError, match="several input modalities") as error:
        clamp3.detect_modality(tmp_path, "input")
    assert symbolic in str(error.value) and "README.txt" in str(error.value)


@pytest.mark.parametrize("inside", ["features", "."])
def test_embd_resumes_with_its_output_folder_inside_the_input_folder(tiny_env, raw, tmp_path, scripts, capsys, inside):
    # The original's re-run skips (its output folder exists); here a re-run resumes. The .npy files this
    # command wrote into a folder inside the input folder (or into the input folder itself) are its
    # outputs, not inputs: a re-run must not read them as a second modality.
    _, texts = raw
    output = texts / inside
    args = [texts, output, "--get_global", "--no_cache", *CLAMP2]
    code, lines, err = run(scripts["embd"], args, capsys)
    assert code == 0, err
    assert "3 features written" in err
    (output / "multi.npy").unlink()
    code, lines, err = run(scripts["embd"], args, capsys)
    assert code == 0, err
    assert lines == ["Detected input modality: txt"]
    assert "1 features written" in err and "2 already there" in err


def test_caption_takes_the_text_configs_generation_settings(tiny_blip, tmp_path):
    """transformers 4 generated BLIP's captions with every generation setting of its text config (no_repeat_ngram_size,
    min_length, repetition_penalty ...); transformers 5 reads none of them, so they are passed as arguments."""
    import json
    import shutil

    from PIL import Image
    from transformers import BlipForConditionalGeneration, BlipProcessor

    from clamp2.search.captions import Captioner, CaptionerError

    folder = tmp_path / "blip"
    shutil.copytree(tiny_blip, folder)
    config = json.loads((folder / "config.json").read_text())
    config["text_config"].update(no_repeat_ngram_size=1, top_k=50)  # top_k at transformers 4's default: not passed
    (folder / "config.json").write_text(json.dumps(config))
    image = tmp_path / "photo.png"
    write_image(image, 1)
    processor = BlipProcessor.from_pretrained(folder)
    model = BlipForConditionalGeneration.from_pretrained(folder).eval()
    inputs = processor(Image.open(image).convert("RGB"), return_tensors="pt")
    plain = model.generate(**inputs, max_length=20)
    expected = model.generate(**inputs, max_length=20, no_repeat_ngram_size=1)
    assert not torch.equal(plain, expected)  # the setting matters for this model
    captioner = Captioner.from_pretrained(folder)
    assert captioner.generation_kwargs == {"max_length": 20, "no_repeat_ngram_size": 1}
    assert captioner.caption(image) == processor.decode(expected[0], skip_special_tokens=True)
    # Group beam search: transformers 5 runs it only as downloaded code (a ValueError on the first image).
    config["text_config"].update(num_beams=2, num_beam_groups=2, diversity_penalty=0.5)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CaptionerError, match="group beam search .*num_beam_groups 2"):
        Captioner.from_pretrained(folder)
