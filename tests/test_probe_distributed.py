"""train_cls.py under a real 2-process gloo launch (torchrun): one shared evaluation, rank 0 writes."""

import json
import os
import subprocess
import sys

import pytest

from clamp2.checkpoint import latest_path, read_checkpoint
from conftest import REPO_ROOT, free_port, load_script
from probe_features import class_means, write_features


def test_two_ranks(tmp_path, capsys):
    means = class_means(["folk", "jazz", "rock"], dim=8, separation=0.12, seed=3)
    write_features(tmp_path / "train", means, 20, seed=1)
    write_features(tmp_path / "eval", means, 5, seed=2, start=100)  # 15 files: one rank gets a repeated one
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    weights = tmp_path / "probe.pth"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
               str(REPO_ROOT / "music_classification/train_cls.py"), "--train_folders", str(tmp_path / "train"),
               "--eval_folders", str(tmp_path / "eval"), "--weights", str(weights), "--epochs", "4",
               "--batch_size", "4", "--balanced", "--hidden_size", "16", "--learning_rate", "3e-3", "--no_progress"]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("Best Eval Epoch : ") == 1 and proc.stdout.count("probe epoch 1:") == 1
    assert "2 process(es) on cpu, batch 4 per process" in proc.stdout
    latest = read_checkpoint(latest_path(weights))
    assert latest["world_size"] == 2 and latest["epoch"] == 4
    # Balanced: 20 files of each of 3 classes, 60 per epoch over 2 ranks of batch 4: 8 steps each.
    assert latest["lr_sched"]["last_epoch"] == 4 * 8
    metrics = json.loads((tmp_path / "probe_report" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["files"]["eval"] == 15

    # The same probe, evaluated by one process, scores exactly what the two ranks logged together.
    inference = load_script("music_classification/inference_cls.py")
    code = inference.main([str(tmp_path / "eval"), str(tmp_path / "pred.json"), "--weights", str(weights),
                           "--evaluate", "--no_progress"])
    capsys.readouterr()
    assert code == 0
    alone = json.loads((tmp_path / "pred_report" / "metrics.json").read_text())["eval"]
    best = metrics["history"]["epoch"].index(metrics["best_epoch"])
    assert alone["accuracy"] == pytest.approx(metrics["history"]["eval_acc"][best], abs=1e-12)
    assert alone["loss"] == pytest.approx(metrics["history"]["eval_loss"][best], abs=1e-6)
    assert alone["accuracy"] == pytest.approx(read_checkpoint(weights)["max_eval_acc"], abs=1e-12)
