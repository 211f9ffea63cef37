"""Multi-process extraction: an unexpected error in one process's share (a file that runs the device out of
memory) must not stop the others' shares: torchrun ends every process as soon as one exits non-zero."""

import json
import os
import time
from pathlib import Path

from conftest import VECTORS, free_port, join_as_rank, load_script, spawn_ranks

TINY_ENV = {"PATCH_LENGTH": "32", "PATCH_NUM_LAYERS": "2", "TOKEN_NUM_LAYERS": "1", "M3_HIDDEN_SIZE": "64",
            "CLAMP2_HIDDEN_SIZE": "48", "MAX_TEXT_LENGTH": "16"}


def worker(rank, port, inp, out, record):
    join_as_rank(rank, 2, port)
    os.environ.update(TINY_ENV, OMP_NUM_THREADS="1")
    import torch

    torch.set_num_threads(1)
    import clamp2.extraction.core as core

    launch = core.launch_batch

    def patched(*args, **kwargs):
        if rank == 1:
            raise RuntimeError("out of memory (simulated)")
        time.sleep(0.3)  # process 0's share takes a while
        return launch(*args, **kwargs)

    core.launch_batch = patched
    script = load_script("code/extract_m3.py")
    try:
        outcome = script.main([inp, out, "--weights", str(VECTORS / "tiny_m3.pth"), "--num_workers", "0",
                               "--no_progress", "--batch_size", "1"])
    except RuntimeError as exc:
        outcome = f"raised {exc}"
        # When process 1's error surfaces, process 0 must have finished its share (under torchrun, exiting now
        # would stop it).
    Path(record, f"rank{rank}.json").write_text(json.dumps(
        {"outcome": str(outcome), "outputs_then": sorted(p.name for p in Path(out).glob("*.npy"))}))
    if rank == 1 and len(list(Path(out).glob("*.npy"))) < 4:
        from clamp2.distributed import wait_for_all_processes

        wait_for_all_processes()  # process 0's end-of-run barrier, which the error skipped


def test_an_error_in_one_process_lets_the_others_finish_their_share(tmp_path):
    inp, out, record = tmp_path / "in", tmp_path / "out", tmp_path / "record"
    for folder in (inp, out, record):
        folder.mkdir()
    piece = (VECTORS / "extract_in" / "abc" / "bwv10.7.abc").read_text(encoding="utf-8")
    for index in range(8):  # round-robin: process 0 gets p0, p2, p4, p6
        (inp / f"p{index}.abc").write_text(piece, encoding="utf-8")
    spawn_ranks(worker, (free_port(), str(inp), str(out), str(record)), timeout=240)
    rank0 = json.loads((record / "rank0.json").read_text())
    rank1 = json.loads((record / "rank1.json").read_text())
    assert rank0["outcome"] == "0"
    assert rank1["outcome"] == "raised out of memory (simulated)"
    assert rank1["outputs_then"] == ["p0.npy", "p2.npy", "p4.npy", "p6.npy"], "process 0 was not done yet"
