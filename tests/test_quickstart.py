"""The quick start end to end at a tiny size: real corpus music → trained models → report, beating chance."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT


def run_quickstart(out, *extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("M3_", "CLAMP2_"))}
    return subprocess.run([sys.executable, str(REPO_ROOT / "code" / "quickstart.py"), "--out", str(out), "--tiny",
                           "--no_progress", *extra], env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick start")  # a space: every printed command must still paste
    result = run_quickstart(out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result


def test_artefacts_and_numbers(tiny_run):
    out, result = tiny_run
    for name in ("report.md", "metrics.json", "zero_shot.json", "zero_shot_confusion.png", "probe/confusion_matrix.png",
                 "plots/training_curves.png", "plots/similarity_matrix.png", "plots/feature_map.png",
                 "data/train.jsonl", "data/test.jsonl", "models/weights_clamp2_small.pth"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())["results"]
    chance = metrics["chance_mrr"]
    assert metrics["held_out_pieces"] == 12 and chance == pytest.approx(0.2586, abs=1e-4)
    text_to_music = metrics["retrieval"]["text→music (ABC)"]["MRR"]
    assert text_to_music > chance  # the trained model retrieves held-out music from text better than chance
    assert set(metrics["retrieval"]) == {"text→music (ABC)", "text→music (MTF)", "other-language text→music (ABC)",
                                         "ABC→MTF (same piece)"}
    assert 0 <= metrics["zero_shot"]["accuracy"] <= 1 and 0 <= metrics["probe"]["accuracy"] <= 1
    assert "text→music (ABC) MRR" in result.stdout and "(chance 0.26" in result.stdout
    commands = [line.split(": ", 1)[1] for line in result.stdout.splitlines()
                if line.startswith("-- ") and "semantic_search_metrics.py" in line]
    assert len(commands) == 4
    for words in map(shlex.split, commands):  # each metrics command as printed, runnable from the repository
        assert words[:2] == ["python", "semantic_search/semantic_search_metrics.py"] and len(words) == 4
        assert all(Path(folder).is_dir() for folder in words[2:]), words
    report = (out / "report.md").read_text()
    assert "| text→music (ABC) |" in report and "## Fréchet Music Distance between collections" in report
    assert "2 layers, 1 epoch)" in report and "1 epochs" not in report  # --tiny trains M3 for one epoch


def test_rerun_resumes_and_other_settings_are_refused(tiny_run):
    out, _ = tiny_run
    again = run_quickstart(out)
    assert again.returncode == 0
    assert again.stdout.count("done in an earlier run") == 8  # every step but the report
    other = run_quickstart(out, "--clamp2_epochs", "3")
    assert other.returncode == 2 and "quickstart: error: " in other.stderr
    assert "holds a run with other settings (clamp2_epochs)" in other.stderr


def test_report_collection_table_bolds_the_closest_cell_of_each_row():
    from clamp2.quickstart.report import _collection_table

    table = {"A": {"A": 1.0, "B": 3.0}, "B": {"A": None, "B": 2.5}, "C": {"A": None, "B": None}}
    fmd = _collection_table({k: dict(v, C=None) for k, v in table.items()}, digits=2, lower_is_closer=True)
    assert fmd[0] == "| held out \\ train | A | B | C |" and fmd[1] == "| --- | --- | --- | --- |"
    assert fmd[2:] == ["| A | **1.00** | 3.00 | n/a |", "| B | n/a | **2.50** | n/a |", "| C | n/a | n/a | n/a |", ""]
    score = _collection_table({"A": {"A": 0.25, "B": 0.75}, "B": {"A": 0.5, "B": 0.5}}, digits=3, lower_is_closer=False)
    assert score[2:] == ["| A | 0.250 | **0.750** |", "| B | **0.500** | 0.500 |", ""]  # a tie: the first column
