"""Both trainers under a real 2-process gloo launch (torchrun, and the legacy launcher)."""

import os
import re
import socket
import subprocess
import sys

import pytest
import torch

from clamp2.checkpoint import read_checkpoint
from conftest import REPO_ROOT, SPEC_DIR, VECTORS
from train_corpus import corpus, split_jsonl  # noqa: F401  (fixture)

TINY_ENV = {"PATCH_LENGTH": "32", "PATCH_NUM_LAYERS": "1", "TOKEN_NUM_LAYERS": "1", "M3_HIDDEN_SIZE": "64",
            "CLAMP2_HIDDEN_SIZE": "32", "MAX_TEXT_LENGTH": "16", "M3_NUM_EPOCH": "2", "CLAMP2_NUM_EPOCH": "2"}
M3_NAME = "weights_m3_p_size_64_p_length_32_t_layers_1_p_layers_1_h_size_64_lr_0.0001_batch_16_mask_0.45.pth"
CLAMP2_NAME = ("weights_clamp2_h_size_32_lr_5e-05_batch_128_scale_1_t_length_16_t_model_FacebookAI_xlm-roberta-base"
               "_t_dropout_True_m3_True.pth")
PUBLISHED_FIELDS = {"model", "optimizer", "lr_sched", "epoch", "best_epoch", "min_eval_loss"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher, script, args, cwd):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(TINY_ENV, OMP_NUM_THREADS="1")
    module = ["torch.distributed.run"] if launcher == "torchrun" else ["torch.distributed.launch", "--use_env"]
    cmd = [sys.executable, "-m", *module, "--nproc_per_node=2", f"--master_port={free_port()}",
           str(REPO_ROOT / script), *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def published_keys(tsv, layer_counts):
    """The published state-dict keys of a config with fewer layers (``{prefix: layers kept}``)."""
    keys = []
    for line in (SPEC_DIR / tsv).read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key = line.split("\t")[0]
        for prefix, count in layer_counts.items():
            match = re.match(re.escape(prefix) + r"(\d+)\.", key)
            if match and int(match.group(1)) >= count:
                break
        else:
            keys.append(key)
    return keys


def check_outputs(folder, name, expected_keys, proc):
    best, latest = folder / name, folder / ("latest_" + name)
    logs = folder / name.replace("weights", "logs", 1).replace(".pth", ".txt")
    for path in (best, latest):
        checkpoint = read_checkpoint(path)
        assert PUBLISHED_FIELDS <= set(checkpoint)
        assert sorted(checkpoint["model"]) == sorted(expected_keys)
        assert checkpoint["rng"]["world_size"] == 2 and len(checkpoint["rng"]["ranks"]) == 2
    latest_state = read_checkpoint(latest)
    assert latest_state["epoch"] == 2 and latest_state["config"]["PATCH_LENGTH"] == 32
    assert logs.read_text().count("\ntrain_loss: ") == 2 and logs.read_text().startswith("Epoch 1\ntrain_loss: ")
    # Rank 0 compared a digest of every parameter with rank 1's after the last step.
    assert "parameters identical on all 2 ranks" in proc.stdout
    assert proc.stdout.count("epoch 1: train_loss") == 1  # rank 0 alone prints
    return latest_state


@pytest.mark.parametrize("launcher", ["torchrun", "legacy"])
def test_m3_on_two_ranks(launcher, tmp_path, corpus):  # noqa: F811
    args = ["--train_folders", str(corpus / "abc"), str(corpus / "mtf"), "--eval_folders", str(corpus / "mtf"),
            "--batch_size", "2", "--max_steps_per_epoch", "3", "--no_progress"]
    proc = launch(launcher, "code/train_m3.py", args, tmp_path)
    keys = published_keys("m3_state_dict.tsv", {"encoder.base.encoder.layer.": 1, "decoder.base.transformer.h.": 1})
    state = check_outputs(tmp_path, M3_NAME, keys, proc)
    assert state["lr_sched"]["last_epoch"] == 6  # 3 optimizer steps per epoch, on both ranks together
    if launcher == "legacy":
        return
    # Stopped after epoch 1, then resumed: each rank continues its own random streams exactly.
    (tmp_path / "resumed").mkdir()
    launch(launcher, "code/train_m3.py", args + ["--epochs", "1"], tmp_path / "resumed")
    proc = launch(launcher, "code/train_m3.py", args, tmp_path / "resumed")
    assert "resuming from latest_" in proc.stdout
    resumed = read_checkpoint(tmp_path / "resumed" / ("latest_" + M3_NAME))
    assert resumed["epoch"] == 2 and resumed["min_eval_loss"] == state["min_eval_loss"]
    for key, value in state["model"].items():
        assert torch.equal(value, resumed["model"][key]), key


def test_clamp2_on_two_ranks(tmp_path, corpus):  # noqa: F811
    train, held_out = split_jsonl(corpus)
    args = ["--train_jsonl", str(train), "--eval_jsonl", str(held_out),
            "--text_model", str(VECTORS / "tiny_text_model"), "--batch_size", "2", "--max_steps_per_epoch", "3",
            "--no_progress", "--pad_to_longest"]
    proc = launch("torchrun", "code/train_clamp2.py", args, tmp_path)
    keys = published_keys("clamp2_state_dict.tsv", {"text_model.encoder.layer.": 2,
                                                     "music_model.base.encoder.layer.": 1})
    state = check_outputs(tmp_path, CLAMP2_NAME, keys, proc)
    assert state["config"]["CLAMP2_HIDDEN_SIZE"] == 32
    assert state["model"]["music_proj.weight"].shape == torch.Size([32, 64])
