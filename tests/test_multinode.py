"""Two nodes simulated on this machine: one torchrun per node (--nnodes=2 --node_rank=0/1) on 127.0.0.1, gloo.

Each "node" gets its own copy of the input or data folder, as nodes without a shared file system have: one copy
lacks a file, or the whole folder. The run must stop on every node with an error that says so, not extract some
inputs twice and others never, nor leave one node waiting for the other at a collective (30 minutes).
"""

import os
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, TINY_ENV, VECTORS, free_port
from train_corpus import corpus  # noqa: F401  (fixture)

TRAIN_ENV = {"PATCH_LENGTH": "32", "PATCH_NUM_LAYERS": "1", "TOKEN_NUM_LAYERS": "1", "M3_HIDDEN_SIZE": "64",
             "M3_NUM_EPOCH": "2"}


def two_nodes(script, args_of_node, env_update, cwd, timeout=90):
    """``script`` under one torchrun per node, started together: [(exit status or None when it ran past
    ``timeout``, output)] per node; a node past the timeout is killed with its processes."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(env_update, OMP_NUM_THREADS="1")
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={node}",
               "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
               str(REPO_ROOT / script), *map(str, args_of_node(node))]
        procs.append(subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, start_new_session=True))
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


def node_copies(source, tmp_path, missing):
    """``node0/`` and ``node1/`` copies of ``source``; ``missing`` (relative) removed from node 1's."""
    for node in (0, 1):
        shutil.copytree(source, tmp_path / f"node{node}")
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
