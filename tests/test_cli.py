"""What every script shares: one-line config and usage errors (exit 2), progress lines in log files."""

import os
import subprocess
import sys

import pytest

from clamp2.progress import progress_bar
from conftest import REPO_ROOT

TINY = {"PATCH_LENGTH": "32", "PATCH_NUM_LAYERS": "2", "TOKEN_NUM_LAYERS": "1", "M3_HIDDEN_SIZE": "64"}


def run_script(script, *args, env=None, cwd=None):
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("M3_", "CLAMP2_"))}
    environ.update(env or {})
    return subprocess.run([sys.executable, str(REPO_ROOT / script), *map(str, args)], env=environ, cwd=cwd,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("script,args", [("code/train_m3.py", ["--train_folders", "."]),
                                         ("code/train_clamp2.py", ["--train_jsonl", "x.jsonl"]),
                                         ("code/extract_m3.py", [".", "out"]),
                                         ("code/extract_clamp2.py", [".", "out"])])
def test_misspelt_config_name_is_one_line_and_exit_2(script, args, tmp_path):
    result = run_script(script, *args, env={"M3_LEARNIN_RATE": "1"}, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "M3_LEARNING_RATE" in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_flag_is_one_line_and_exit_2(tmp_path):
    result = run_script("process_data/batch_midi2mtf.py", "in", "out", "--bogus", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == ["batch_midi2mtf.py: error: unrecognized arguments: --bogus (see --help)"]


def test_foreign_reserved_name_does_not_stop_extraction_and_progress_reaches_the_log(vectors, tmp_path):
    out = tmp_path / "features"
    log = tmp_path / "stderr.log"
    env = dict(TINY, CLAMP2_HOME="/x")
    with open(log, "w") as stderr:
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("M3_", "CLAMP2_"))}
        environ.update(env)
        code = subprocess.run([sys.executable, str(REPO_ROOT / "code" / "extract_m3.py"), str(vectors / "extract_in"),
                               str(out), "--weights", str(vectors / "tiny_m3.pth")], env=environ, cwd=tmp_path,
                              stderr=stderr, stdout=subprocess.DEVNULL, timeout=300).returncode
    assert code == 0
    text = log.read_text()
    assert "warning: ignoring CLAMP2_HOME" in text
    progress = [line for line in text.splitlines() if line.startswith("extract_m3:") and "file/s" in line]
    assert progress and "4/4" in progress[-1], text  # whole lines, not carriage-return redraws
    assert "\r" not in text
    assert len(list(out.rglob("*.npy"))) == 4


def test_progress_bar_in_a_log_is_throttled_to_whole_lines(tmp_path):
    path = tmp_path / "log.txt"
    with open(path, "w") as stream:
        with progress_bar(total=1000, desc="work", unit="item", stream=stream, log_interval=3600) as bar:
            for _ in range(1000):
                bar.update(1)
    lines = path.read_text().splitlines()
    # the first line, then nothing for an hour, then the closing line
    assert len(lines) == 2 and lines[0].startswith("work:   0%") and "1000/1000" in lines[1]


def test_disabled_progress_bar_writes_nothing(tmp_path):
    path = tmp_path / "log.txt"
    with open(path, "w") as stream:
        with progress_bar(total=3, desc="work", stream=stream, enabled=False) as bar:
            bar.update(3)
    assert path.read_text() == ""


def test_a_disabled_bar_pickles():
    # The package's bars are a tqdm subclass with a thread lock (tqdm's own fixed the multiprocessing start
    # method); made on first use, it must still be found again by pickle, as tqdm's bars are.
    import pickle

    bar = progress_bar(total=3, desc="work", enabled=False)
    again = pickle.loads(pickle.dumps(bar))
    assert type(again) is type(bar) and again.total == 3
