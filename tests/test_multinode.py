"""Two nodes simulated on this machine: one torchrun per node (--nnodes=2 --node_rank=0/1) on 127.0.0.1, gloo.

Each "node" gets its own copy of the input or data folder, as nodes without a shared file system have: one copy
lacks a file, or the whole folder. The run must stop on every node with an error that says so, not extract some
inputs twice and others never, nor leave one node waiting for the other at a collective (30 minutes).
"""

import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, TINY_ENV, VECTORS, free_port
from train_corpus import corpus  # noqa: F401  (fixture)
from train_corpus3 import corpus3  # noqa: F401  (fixture)

# The CLaMP 3 vectors' tiny config (as tests/test_train_clamp3.py), and their tiny text model.
TINY_ENV3 = {"PATCH_LENGTH": "32", "PATCH_NUM_LAYERS": "2", "TOKEN_NUM_LAYERS": "1", "M3_HIDDEN_SIZE": "64",
             "CLAMP3_HIDDEN_SIZE": "48", "MAX_TEXT_LENGTH": "16", "AUDIO_HIDDEN_SIZE": "64", "AUDIO_NUM_LAYERS": "2",
             "MAX_AUDIO_LENGTH": "4", "CLAMP3_LOAD_M3": "0"}
TEXT_MODEL3 = VECTORS / "tiny_text_model"
TRAIN_ENV = {"PATCH_LENGTH": "32", "PATCH_NUM_LAYERS": "1", "TOKEN_NUM_LAYERS": "1", "M3_HIDDEN_SIZE": "64",
             "M3_NUM_EPOCH": "2"}


def two_nodes(script, args_of_node, env_update, cwd, timeout=90):
    """``script`` under one torchrun per node, started together: [(exit status or None when it ran past
    ``timeout``, output)] per node; a node past the timeout is killed with its processes. ``cwd``: one folder, or
    a function of the node (nodes whose working folders are not shared)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(env_update, OMP_NUM_THREADS="1")
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
               "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
               str(REPO_ROOT / script), *map(str, args_of_node(node))]
        procs.append(subprocess.Popen(cmd, cwd=cwd(node) if callable(cwd) else cwd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True))
    results = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=timeout)
            results.append((proc.returncode, out))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            results.append((None, out))
    return results


def node_copies(source, tmp_path, missing=None):
    """``node0/`` and ``node1/`` copies of ``source``; ``missing`` (relative; "": all of it) removed from node 1's."""
    for node in (0, 1):
        shutil.copytree(source, tmp_path / f"node{node}")
    if missing is None:
        return
    target = tmp_path / "node1" / missing
    shutil.rmtree(target) if target.is_dir() else target.unlink()


def test_extraction_on_nodes_that_list_other_inputs_stops_on_both(tmp_path):
    # Each process shards its own listing: with one file fewer on node 1, inputs were extracted twice or never,
    # and both nodes reported success.
    node_copies(VECTORS / "extract_in", tmp_path, "abc/airds_tune3.abc")
    out = tmp_path / "out"
    results = two_nodes("code/extract_m3.py", lambda node: [tmp_path / f"node{node}", out, "--weights",
                                                            VECTORS / "tiny_m3.pth", "--num_workers", "0",
                                                            "--no_progress"], TINY_ENV, tmp_path)
    for status, output in results:
        assert status not in (0, None), output[-3000:]
        assert "do not see the same input files (process 0: 4 inputs, process 1: 3 inputs" in output, output[-3000:]
    assert not list(out.rglob("*.npy"))


def test_extraction_on_a_node_without_the_input_folder_does_not_hang(tmp_path):
    # Node 1 found no input folder and exited before the process group was made: node 0 waited for it (30 min).
    node_copies(VECTORS / "extract_in", tmp_path, "")
    shutil.rmtree(tmp_path / "node1", ignore_errors=True)
    results = two_nodes("code/extract_m3.py", lambda node: [tmp_path / f"node{node}", tmp_path / "out", "--weights",
                                                            VECTORS / "tiny_m3.pth", "--num_workers", "0",
                                                            "--no_progress"], TINY_ENV, tmp_path, timeout=60)
    for status, output in results:
        assert status not in (0, None), output[-3000:]
        assert f"input folder not found: {tmp_path / 'node1'}" in output, output[-3000:]


def m3_args(node, tmp_path):
    data = tmp_path / f"node{node}"
    return ["--train_folders", data / "abc", data / "mtf", "--eval_folders", data / "mtf", "--no_progress",
            "--batch_size", "2", "--max_steps_per_epoch", "2", "--epochs", "1"]


def test_training_on_nodes_with_other_data_stops_with_one_error(tmp_path, corpus):  # noqa: F811
    # 36 samples on node 0, 35 on node 1: each drew batches from its own list (and a full epoch, 9 batches against
    # 8, waited at a collective for 30 minutes).
    node_copies(corpus, tmp_path, "abc/essen_05.abc")
    (tmp_path / "run").mkdir()
    results = two_nodes("code/train_m3.py", lambda node: m3_args(node, tmp_path), TRAIN_ENV, tmp_path / "run")
    assert all(status not in (0, None) for status, _ in results), results[0][1][-3000:]
    assert "the ranks do not see the same training data (rank 0: 36 training, 6 eval samples; rank 1: 35 training" \
        in results[0][1], results[0][1][-3000:]
    assert not list((tmp_path / "run").glob("*.pth"))


def test_training_on_a_node_without_a_data_folder_says_so_there(tmp_path, corpus):  # noqa: F811
    # Rank 1's DataError was said by rank 0 alone, which did not have it: node 1 exited 2 without a word.
    node_copies(corpus, tmp_path, "mtf")
    (tmp_path / "run").mkdir()
    results = two_nodes("code/train_m3.py", lambda node: m3_args(node, tmp_path), TRAIN_ENV, tmp_path / "run")
    assert all(status not in (0, None) for status, _ in results)
    assert f"error (rank 1): data folder not found: {tmp_path / 'node1' / 'mtf'}" in results[1][1], \
        results[1][1][-3000:]
    # ...and node 0, which met rank 1's absence at its next collective as a gloo traceback, says it too.
    assert f"error: rank 1 of 2 stopped: data folder not found: {tmp_path / 'node1' / 'mtf'}" in results[0][1], \
        results[0][1][-3000:]
    assert "Connection closed" not in results[0][1]


# -- CLaMP 3 training: both stages ----------------------------------------------------------------------

CLAMP3_ENV = {**TINY_ENV3, "SAVE_EVERY": "0"}


def clamp3_args(stage, data):
    return ["--train_jsonl", data / f"{stage}_train.jsonl", "--eval_jsonl", data / f"{stage}_eval.jsonl",
            "--text_model", TEXT_MODEL3, "--no_progress", "--batch_size", "4", "--epochs", "1",
            "--max_steps_per_epoch", "2", "--learning_rate", "1e-3", "--weights", "w.pth"]


def clamp3_nodes(tmp_path, corpus3, missing=None):  # noqa: F811
    """Each node's own copy of the corpus (``missing`` removed from node 1's) and its own working folder."""
    node_copies(corpus3, tmp_path, missing)
    for node in (0, 1):
        (tmp_path / f"run{node}").mkdir()
    return lambda node: tmp_path / f"run{node}"


def test_clamp3_node_missing_a_file_stops_every_node_saying_it(tmp_path, corpus3):  # noqa: F811
    # Node 1's copy lacks a file its JSONL names: rank 1 said so and left; rank 0 met its absence at the next
    # collective, a gloo "Connection closed by peer" traceback, and node 0 never learnt why.
    run = clamp3_nodes(tmp_path, corpus3, "abc/erk_010.abc")
    results = two_nodes("code/train_clamp3_symbolic.py", lambda node: clamp3_args("symbolic", tmp_path / f"node{node}"),
                        CLAMP3_ENV, run)
    assert all(status not in (0, None) for status, _ in results), results[0][1][-3000:]
    missing = f"missing file {tmp_path / 'node1' / 'abc' / 'erk_010.abc'}"
    assert f"error: rank 1 of 2 stopped: {missing}" in results[0][1], results[0][1][-3000:]
    assert f"error (rank 1): {missing}" in results[1][1], results[1][1][-3000:]
    assert "Connection closed" not in results[0][1] + results[1][1]
    assert not list(run(0).iterdir()) and not list(run(1).iterdir())


# -- MERT extraction (its own planning, beside run_extraction's) ----------------------------------------

VECTORS3 = REPO_ROOT / "tests" / "data" / "vectors_clamp3"


def mert_on_two_nodes(tmp_path, out_of_node, missing=None):
    """extract_mert.py on two nodes, each with its own copy of the audio inputs (``missing`` removed from node 1's;
    the clip under a second, which fails by design, left out): (inputs, results)."""
    inputs = tmp_path / "inputs"
    shutil.copytree(VECTORS3 / "inputs" / "audio", inputs,
                    ignore=shutil.ignore_patterns("banish_misfortune_48k_stereo_f32.wav"))
    node_copies(inputs, tmp_path, missing)
    return inputs, two_nodes("process_data/extract_mert.py",
                             lambda node: [tmp_path / f"node{node}", out_of_node(node), "--model",
                                           VECTORS3 / "tiny_mert", "--num_workers", "0", "--no_progress"],
                             {}, tmp_path, timeout=120)


def test_mert_on_two_nodes_writes_every_input_once(tmp_path):
    inputs, results = mert_on_two_nodes(tmp_path, lambda node: tmp_path / "out")
    assert all(status == 0 for status, _ in results), results[0][1][-3000:] + results[1][1][-3000:]
    written = sorted(path.relative_to(tmp_path / "out").with_suffix("").as_posix()
                     for path in (tmp_path / "out").rglob("*.npy"))
    assert written == sorted(path.relative_to(inputs).with_suffix("").as_posix()
                             for path in inputs.rglob("*") if path.is_file())
    counts = [int(re.search(r"\(process \d/2\): extracted (\d+)", output).group(1)) for _, output in results]
    assert sum(counts) == len(written) and all(counts), counts


def test_mert_on_nodes_with_other_inputs_stops_every_node(tmp_path):
    _, results = mert_on_two_nodes(tmp_path, lambda node: tmp_path / "out", missing="bwv26.6_16k_stereo_s16.flac")
    for status, output in results:
        assert status not in (0, None), output[-3000:]
        assert "do not see the same input files" in output, output[-3000:]
    assert not list((tmp_path / "out").rglob("*.npy"))


def test_extraction_on_nodes_with_their_own_output_folders_stops_every_node(tmp_path):
    # Each node's output folder on its own disk (two folders here): each process wrote its share to its own disk,
    # both said success, and node 0's folder held half of the features and a record of a complete run.
    node_copies(VECTORS / "extract_in", tmp_path)
    results = two_nodes("code/extract_m3.py", lambda node: [tmp_path / f"node{node}", tmp_path / f"out{node}",
                                                            "--weights", VECTORS / "tiny_m3.pth", "--num_workers", "0",
                                                            "--no_progress"], TINY_ENV, tmp_path)
    for status, output in results:
        assert status not in (0, None), output[-3000:]
        assert "is not one folder for every process: process 1 of 2 cannot see the file process 0 wrote" in output, \
            output[-3000:]
    assert not [path for path in tmp_path.glob("out*/**/*") if path.is_file()]  # no feature, record or probe left


def test_mert_on_nodes_with_their_own_output_folders_stops_every_node(tmp_path):
    _, results = mert_on_two_nodes(tmp_path, lambda node: tmp_path / f"out{node}")
    for status, output in results:
        assert status not in (0, None), output[-3000:]
        assert "is not one folder for every process: process 1 of 2 cannot see the file process 0 wrote" in output, \
            output[-3000:]
    assert not [path for path in tmp_path.glob("out*/**/*") if path.is_file()]


def test_clamp3_node_without_the_eval_jsonl_stops_every_node_saying_it(tmp_path, corpus3):  # noqa: F811
    # Node 1's copy lacks the eval JSONL: node 1 split the training pairs (no collective), node 0 checked the eval
    # JSONL's files at a collective; node 0's check then met node 1's data record and both ended in tracebacks.
    run = clamp3_nodes(tmp_path, corpus3, "symbolic_eval.jsonl")
    results = two_nodes("code/train_clamp3_symbolic.py", lambda node: clamp3_args("symbolic", tmp_path / f"node{node}"),
                        CLAMP3_ENV, run)
    assert all(status not in (0, None) for status, _ in results), results[0][1][-3000:]
    for _, output in results:
        assert "]: Traceback" not in output, output[-3000:]  # a rank's own; torchrun prints its own for any failure
    assert "error: the ranks do not see the same training data (rank 0: checking the data files; rank 1: comparing " \
           "the samples" in results[0][1], results[0][1][-3000:]
