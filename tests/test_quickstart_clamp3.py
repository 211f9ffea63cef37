"""The CLaMP 3 quick start end to end at a tiny size: corpus → audio → random MERT → two stages → report."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT


def run_quickstart(out, *extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("M3_", "CLAMP2_", "CLAMP3_", "AUDIO_"))}
    return subprocess.run([sys.executable, str(REPO_ROOT / "code" / "quickstart.py"), "--clamp3", "--out", str(out),
                           "--tiny", "--no_progress", *extra], env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart_clamp3")
    result = run_quickstart(out)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out, result


def test_artefacts_and_numbers(tiny_run):
    out, result = tiny_run
    for name in ("report.md", "metrics.json", "zero_shot.json", "zero_shot_confusion.png", "probe/confusion_matrix.png",
                 "plots/training_curves.png", "plots/similarity_matrix.png", "plots/feature_map.png",
                 "plots/mert_map.png", "data/clamp3_symbolic_train.jsonl", "data/clamp3_audio_train.jsonl",
                 "models/mert_small/config.json", "models/latest_weights_clamp3_small.pth",
                 "models/logs_clamp3_symbolic.txt", "models/logs_clamp3_small.txt"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert len(list((out / "data" / "audio" / "test").glob("*.wav"))) == 12
    record = json.loads((out / "data" / "clamp3_audio_train.jsonl").read_text().splitlines()[0])
    assert record["filepaths"][0].startswith("mert/train/") and record["analysis"] and record["translations"]["language"]
    saved = json.loads((out / "metrics.json").read_text())
    metrics = saved["results"]
    assert metrics["held_out_pieces"] == 12 and metrics["audio_front_end"] == "random"
    assert set(metrics["retrieval"]) == {"text→ABC", "text→audio", "ABC→audio (same piece)", "MTF→audio (same piece)"}
    assert metrics["retrieval"]["text→ABC"]["MRR"] > metrics["chance_mrr"]
    assert 0 <= metrics["zero_shot"]["accuracy"] <= 1 and 0 <= metrics["probe"]["accuracy"] <= 1
    assert set(metrics["clamp3_score_test_vs_train"]) == {"chorale", "germanfolk", "chinesefolk", "jig", "reel",
                                                          "hornpipe"}
    assert list(saved["step_seconds"]) == ["corpus", "convert", "pairs", "text model", "M3", "audio", "MERT",
                                           "CLaMP 3 symbolic", "CLaMP 3 audio", "features", "evaluate", "report"]
    assert "text→audio MRR" in result.stdout and "RANDOM weights" in result.stdout
    report = (out / "report.md").read_text()
    assert "| text→audio |" in report and "a MERT with random weights" in report and "first 10 seconds" in report


def test_rerun_resumes_and_options_are_checked(tiny_run):
    out, _ = tiny_run
    again = run_quickstart(out)
    assert again.returncode == 0
    assert again.stdout.count("done in an earlier run") == 11  # every step but the report
    other = run_quickstart(out, "--audio_epochs", "3")
    assert other.returncode == 2 and "holds a run with other settings (audio_epochs)" in other.stderr
    mixed = subprocess.run([sys.executable, str(REPO_ROOT / "code" / "quickstart.py"), "--out", str(out / "x"),
                            "--mert", "somewhere"], capture_output=True, text=True)
    assert mixed.returncode == 2 and "--mert go with --clamp3" in mixed.stderr
