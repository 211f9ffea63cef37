"""Paths that point elsewhere (audit_paths): a training JSONL that is a link, ``link/..`` in its file paths, a
music file that is not UTF-8, batch logs and cache entries that are links, extraction folders named through links."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clamp2.training.data import DataError, read_pairs

pytestmark = pytest.mark.skipif(os.name == "nt", reason="POSIX links and FIFOs")


def pair(*paths):
    return {"summary_en": ["x"], "summary_nen": [{"language": "German", "summary": "y"}], "filepaths": list(paths)}


def test_a_jsonl_that_is_a_link_reads_the_files_beside_the_link(tmp_path):
    # The reference joins os.path.dirname(TRAIN_JSONL) + '/' + path: the link's folder, not its target's.
    (tmp_path / "data").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "data" / "a.abc").write_text("K:G\nabc|\n")
    (tmp_path / "elsewhere" / "a.abc").write_text("K:G\ncde|\n")  # another piece of the same name
    real = tmp_path / "elsewhere" / "pairs.jsonl"
    real.write_text(json.dumps(pair("a.abc")) + "\n")
    (tmp_path / "data" / "pairs.jsonl").symlink_to(real)
    items = read_pairs(tmp_path / "data" / "pairs.jsonl", require_non_english=True)
    assert [p.read_text() for p in items[0].music_paths] == ["K:G\nabc|\n"]


def test_dot_dot_after_a_folder_link_leaves_the_links_target_as_the_file_system_does(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "elsewhere" / "sub").mkdir(parents=True)
    (tmp_path / "elsewhere" / "b.abc").write_text("K:G\nb|\n")
    (tmp_path / "data" / "link").symlink_to(tmp_path / "elsewhere" / "sub", target_is_directory=True)
    jsonl = tmp_path / "data" / "pairs.jsonl"
    jsonl.write_text(json.dumps(pair("link/../b.abc")) + "\n")
    items = read_pairs(jsonl, require_non_english=True)  # the reference's open() reads elsewhere/b.abc
    assert [p.read_text() for p in items[0].music_paths] == ["K:G\nb|\n"]


def test_a_music_file_that_is_not_utf8_fails_the_launch_naming_its_line(tmp_path):
    (tmp_path / "ok.abc").write_text("K:G\nabc|\n")
    (tmp_path / "latin1.abc").write_bytes("T:caf\xe9\nK:G\nabc|\n".encode("latin-1"))
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text(json.dumps(pair("ok.abc")) + "\n" + json.dumps(pair("latin1.abc")) + "\n")
    with pytest.raises(DataError, match=r"pairs\.jsonl:2: .*latin1\.abc is not UTF-8"):
        read_pairs(jsonl, require_non_english=True)


def test_a_folder_named_in_a_jsonl_is_called_a_folder_not_missing(tmp_path):
    (tmp_path / "ok.abc").write_text("K:G\nabc|\n")
    (tmp_path / "dir.abc").mkdir()
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text(json.dumps(pair("ok.abc")) + "\n" + json.dumps(pair("dir.abc")) + "\n")
    with pytest.raises(DataError, match=r"pairs\.jsonl:2: .*dir\.abc is a folder, not a file") as raised:
        read_pairs(jsonl, require_non_english=True)
    assert "missing" not in str(raised.value)


def upper(path):
    text = Path(path).read_text()
    if text == "bad":
        raise ValueError("a bad file")
    return text.upper()


@pytest.mark.parametrize("failures", [0, 1, 2])
def test_a_batch_log_that_is_a_link_is_replaced_never_written_through(tmp_path, failures, capsys):
    from clamp2.convert.batch_runner import convert_folder

    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "in" / "ok.txt").write_text("ok")
    for k in range(failures):
        (tmp_path / "in" / f"bad{k}.txt").write_text("bad")
    for name in ("failed_t.log", "warnings_t.log"):
        (tmp_path / f"outside_{name}").write_text("precious\n")
        (tmp_path / "out" / name).symlink_to(tmp_path / f"outside_{name}")
    convert_folder(tmp_path / "in", tmp_path / "out", convert=upper, extensions=[".txt"], output_suffix=".out",
                   tool="t", workers=1, progress=False)
    for name in ("failed_t.log", "warnings_t.log"):
        assert (tmp_path / f"outside_{name}").read_text() == "precious\n"
        assert not (tmp_path / "out" / name).is_symlink()
    assert len((tmp_path / "out" / "failed_t.log").read_text().splitlines()) == failures


@pytest.mark.parametrize("link", ["input", "output"])
def test_extraction_leaves_out_its_own_outputs_when_a_folder_is_named_through_a_link(tmp_path, link):
    # Run 1 wrote in/feats/x.npy; run 2 must not take it as a MERT input (a feature of a feature, deeper each run).
    from clamp2.extraction.core import plan_jobs

    (tmp_path / "in" / "feats").mkdir(parents=True)
    np.save(tmp_path / "in" / "x.npy", np.zeros((1, 3, 768), np.float32))
    np.save(tmp_path / "in" / "feats" / "x.npy", np.zeros((1, 768), np.float32))
    (tmp_path / "inlink").symlink_to(tmp_path / "in", target_is_directory=True)
    (tmp_path / "outlink").symlink_to(tmp_path / "in" / "feats", target_is_directory=True)
    input_dir, output_dir = ((tmp_path / "inlink", tmp_path / "in" / "feats") if link == "input"
                             else (tmp_path / "in", tmp_path / "outlink"))
    plan = plan_jobs(input_dir, output_dir, overwrite=True, kinds={".npy": "audio"})
    assert [job.path.name for job in plan.jobs] == ["x.npy"] and plan.jobs[0].path.parent == input_dir


def test_a_cache_entry_that_is_a_link_to_a_fifo_is_missing_not_a_hang(tmp_path):
    # An entry is only ever written as a regular file: a link (to a FIFO, /dev/zero, /etc/passwd) is not read.
    code = f"""
import os
from clamp2.cache import FeatureCache, entry_key
import numpy as np
ns = FeatureCache({str(tmp_path / 'cache')!r}).namespace({{'model': 't'}})
key = entry_key('abc', '0' * 64)
ns.put(key, np.ones((1, 4), np.float32))
os.unlink(ns.path(key)); os.mkfifo({str(tmp_path / 'fifo')!r}); os.symlink({str(tmp_path / 'fifo')!r}, ns.path(key))
print(ns.get(key))
ns.put(key, np.ones((1, 4), np.float32))
print(os.path.islink(ns.path(key)), ns.get(key).tolist())
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20)
    assert result.stdout.split("\n")[:2] == ["None", "False [[1.0, 1.0, 1.0, 1.0]]"], result.stderr


def test_a_checkpoint_named_by_a_link_is_written_to_the_links_target_and_the_link_stays(tmp_path):
    # The user keeps weights on another disk: run/w.pth -> bigdisk/w.pth (the reference's torch.save writes through).
    import torch

    from clamp2.checkpoint import copy_checkpoint, read_checkpoint, save_checkpoint

    (tmp_path / "run").mkdir()
    (tmp_path / "bigdisk").mkdir()
    (tmp_path / "bigdisk" / "w.pth").write_bytes(b"old")
    (tmp_path / "run" / "w.pth").symlink_to(tmp_path / "bigdisk" / "w.pth")
    (tmp_path / "run" / "best.pth").symlink_to(tmp_path / "bigdisk" / "best.pth")  # dangling: created there
    save_checkpoint(tmp_path / "run" / "w.pth", torch.nn.Linear(2, 2), epoch=2)
    copy_checkpoint(tmp_path / "run" / "w.pth", tmp_path / "run" / "best.pth")
    for name in ("w.pth", "best.pth"):
        assert (tmp_path / "run" / name).is_symlink()
        assert read_checkpoint(tmp_path / "bigdisk" / name)["epoch"] == 2


def check_shares_worker(rank, world_size, port, folder):
    import torch

    from conftest import join_as_rank

    join_as_rank(rank, world_size, port)
    torch.set_num_threads(1)
    from clamp2.distributed import distributed_context
    from clamp2.training import data

    reads = []
    text_problem = data.text_problem

    def counted(path):
        reads.append(Path(path).name)
        return text_problem(path)

    data.text_problem = counted  # which files this process reads
    with distributed_context(device="cpu"):
        try:
            data.check_music_files(sorted(Path(folder).glob("*.abc")), shared=True)
            message = ""
        except DataError as exc:
            message = str(exc)
        if rank == 0:  # one process alone (a user's own call): it checks everything itself, waiting for nobody
            alone = len(reads)
            data.check_music_files(sorted(Path(folder).glob("p[01].abc")))
            assert len(reads) == alone + 2
    (Path(folder) / f"rank{rank}.json").write_text(json.dumps({"reads": reads, "message": message}))


def test_the_launch_check_reads_each_file_once_per_run_and_every_process_says_all_problems(tmp_path):
    # Every process read every music file at launch (2 M files, 8 processes a node: 80 GB read instead of 10): each
    # reads its share now, and all get every problem, in order, so they stop alike.
    from conftest import free_port, spawn_ranks

    for index in range(7):
        body = "T:caf\xe9\nK:G\nabc|\n".encode("latin-1") if index in (2, 5) else b"K:G\nabc|\n"
        (tmp_path / f"p{index}.abc").write_bytes(body)
    spawn_ranks(check_shares_worker, (2, free_port(), str(tmp_path)), timeout=90)
    records = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert sorted(records[0]["reads"][:-2] + records[1]["reads"]) == [f"p{index}.abc" for index in range(7)]
    assert records[0]["reads"] and records[1]["reads"]
    assert records[0]["message"] == records[1]["message"]
    assert "files that cannot be read as text (2): " in records[0]["message"]
    assert records[0]["message"].index("p2.abc") < records[0]["message"].index("p5.abc")
