"""A run ended by a signal at any moment (SIGTERM from a cluster's time limit or scancel, SIGHUP from a dropped ssh
connection, SIGKILL): nothing partial stays after a re-run, and a re-run finishes the work with everything logged."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO_ROOT

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="POSIX signals")


def test_a_rerun_of_build_index_removes_the_temporary_file_a_killed_run_left(tmp_path, capsys):
    # build_index killed while writing vectors.1.npy (SIGTERM, SIGKILL) left .vectors.1.npy.<token>.partial, as
    # large as the index, and no later run removed it.
    from clamp2.files import _open_temporary
    from conftest import load_script

    feats, index = tmp_path / "feats", tmp_path / "index"
    feats.mkdir()
    for i in range(3):
        np.save(feats / f"k{i}.npy", np.full((1, 4), i + 1, dtype=np.float32))
    index.mkdir()
    fd, _ = _open_temporary(str(index / "vectors.1.npy"))  # named as its writer names it
    os.write(fd, b"\x93NUMPY half")
    os.close(fd)
    assert load_script("semantic_search/build_index.py").main([str(feats), str(index)]) == 0
    assert sorted(p.name for p in index.iterdir() if p.name.endswith(".partial")) == []
    want = np.repeat(np.arange(1, 4, dtype=np.float32), 4).reshape(3, 4)
    assert np.array_equal(np.load(index / "vectors.1.npy"), want)


def warn_slowly_and_copy(path):
    import warnings

    warnings.warn(f"unequal bars in {path.stem}")
    time.sleep(0.2)
    return path.read_text()


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGKILL"])
def test_a_batch_killed_mid_run_keeps_every_warning_once_resumed(tmp_path, capsys, signal_name):
    # The workers wrote each output, then the main process logged its warnings: killed in between (the workers
    # outlive it by up to half a second and finish the files they hold), the outputs were there and the re-run
    # skipped them, their warnings lost from warnings_<tool>.log.
    from pathlib import Path

    from clamp2.convert import batch_runner

    inputs, out = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    for index in range(30):
        (inputs / f"{index:02d}.txt").write_text(str(index))
    code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]\n"
            "import test_terminate as t\n"
            "from clamp2.convert import batch_runner\n"
            "batch_runner.convert_folder(sys.argv[3], sys.argv[4], convert=t.warn_slowly_and_copy,"
            " extensions=['.txt'], output_suffix='.out', tool='test', workers=2, progress=False)\n")
    process = subprocess.Popen([sys.executable, "-c", code, str(Path(__file__).parent), str(REPO_ROOT), str(inputs),
                                str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list(out.glob("*.out")) and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(getattr(signal, signal_name))
    process.wait()
    time.sleep(1.5)  # the workers' last files
    assert 0 < len(list(out.glob("*.out"))) < 30, "the run was not killed mid-way"
    assert batch_runner.convert_folder(inputs, out, convert=warn_slowly_and_copy, extensions=[".txt"],
                                       output_suffix=".out", tool="test", workers=1, progress=False) == 0
    capsys.readouterr()
    logged = (out / "warnings_test.log").read_text().splitlines()
    assert logged == [f"{index:02d}.txt\tunequal bars in {index:02d}" for index in range(30)]
