"""Both trainers under a real 2-process gloo launch (torchrun, and the legacy launcher)."""

import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from clamp2.checkpoint import read_checkpoint
from conftest import REPO_ROOT, SPEC_DIR, VECTORS, free_port
from train_corpus import corpus, split_jsonl  # noqa: F401  (fixture)

TINY_ENV = {"PATCH_LENGTH": "32", "PATCH_NUM_LAYERS": "1", "TOKEN_NUM_LAYERS": "1", "M3_HIDDEN_SIZE": "64",
            "CLAMP2_HIDDEN_SIZE": "32", "MAX_TEXT_LENGTH": "16", "M3_NUM_EPOCH": "2", "CLAMP2_NUM_EPOCH": "2"}
TEXT_MODEL = str(VECTORS / "tiny_text_model")
# --batch_size and --text_model name the files exactly as M3_BATCH_SIZE / TEXT_MODEL_NAME would.
M3_NAME = "weights_m3_p_size_64_p_length_32_t_layers_1_p_layers_1_h_size_64_lr_0.0001_batch_2_mask_0.45.pth"
CLAMP2_NAME = (f"weights_clamp2_h_size_32_lr_5e-05_batch_4_scale_1_t_length_16_t_model_{TEXT_MODEL.replace('/', '_')}"
               "_t_dropout_True_m3_True.pth")
PUBLISHED_FIELDS = {"model", "optimizer", "lr_sched", "epoch", "best_epoch", "min_eval_loss"}


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
        # Each rank is seeded 42 + rank (its own dropout masks); Python's generator, which the run leaves
        # alone, still shows the seed.
        ranks = checkpoint["rng"]["ranks"]
        assert ranks[0]["python"] != ranks[1]["python"]
    latest_state = read_checkpoint(latest)
    assert latest_state["epoch"] == 2 and latest_state["config"]["PATCH_LENGTH"] == 32
    assert logs.read_text().count("\ntrain_loss: ") == 2 and logs.read_text().startswith("Epoch 1\ntrain_loss: ")
    # Rank 0 compared a digest of every parameter with rank 1's after the last step.
    assert "parameters identical on all 2 ranks" in proc.stdout
    assert proc.stdout.count("epoch 1: train_loss") == 1  # rank 0 alone prints
    return latest_state


def log_losses(path):
    text = path.read_text()
    return ([float(x) for x in re.findall(r"^train_loss: (\S+)$", text, re.M)],
            [float(x) for x in re.findall(r"^eval_loss: (\S+)$", text, re.M)])


def m3_args(corpus):
    return ["--train_folders", str(corpus / "abc"), str(corpus / "mtf"), "--eval_folders", str(corpus / "mtf"),
            "--no_progress"]


def test_m3_on_two_ranks(tmp_path, corpus):  # noqa: F811
    args = m3_args(corpus) + ["--batch_size", "2", "--max_steps_per_epoch", "3"]
    proc = launch("torchrun", "code/train_m3.py", args, tmp_path)
    keys = published_keys("m3_state_dict.tsv", {"encoder.base.encoder.layer.": 1, "decoder.base.transformer.h.": 1})
    state = check_outputs(tmp_path, M3_NAME, keys, proc)
    assert state["lr_sched"]["last_epoch"] == 6  # 3 optimizer steps per epoch, on both ranks together
    # Stopped after epoch 1, then resumed: each rank continues its own random streams exactly.
    (tmp_path / "resumed").mkdir()
    launch("torchrun", "code/train_m3.py", args + ["--epochs", "1"], tmp_path / "resumed")
    proc = launch("torchrun", "code/train_m3.py", args, tmp_path / "resumed")
    assert "resuming from latest_" in proc.stdout
    resumed = read_checkpoint(tmp_path / "resumed" / ("latest_" + M3_NAME))
    assert resumed["epoch"] == 2 and resumed["min_eval_loss"] == state["min_eval_loss"]
    for key, value in state["model"].items():
        assert torch.equal(value, resumed["model"][key]), key


def one_process(script, args, cwd):
    """The same trainer in one process (a subprocess too: nothing of torch.distributed stays behind)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(TINY_ENV, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(REPO_ROOT / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def test_m3_eval_loss_is_the_same_on_one_and_two_processes(tmp_path, corpus):  # noqa: F811
    # The legacy launcher; learning rate 0, so the eval after epoch 1 scores the initial model. 6 eval
    # files in batches of 4 per process: a partial global batch, 3 files per rank.
    args = m3_args(corpus) + ["--learning_rate", "0", "--epochs", "1", "--max_steps_per_epoch", "1"]
    launch("legacy", "code/train_m3.py", args + ["--batch_size", "4"], tmp_path)
    (tmp_path / "one").mkdir()
    one_process("code/train_m3.py", args + ["--batch_size", "5"], tmp_path / "one")
    two_train, two = log_losses(next(tmp_path.glob("logs_m3_*.txt")))
    one_train, one = log_losses(next((tmp_path / "one").glob("logs_m3_*.txt")))
    assert len(one) == len(two) == 1 and one[0] == pytest.approx(two[0], abs=1e-5)
    # The logged training loss is the mean over the ranks (other batches, other dropout: close, not equal).
    assert two_train[0] == pytest.approx(one_train[0], rel=0.3)


def test_clamp2_on_two_ranks_with_an_eval_set_smaller_than_a_batch(tmp_path, corpus):  # noqa: F811
    # 4 eval pairs, batches of 4 per process: one partial global batch of 4, 2 pairs per rank.
    train, held_out = split_jsonl(corpus, eval_count=4)
    args = ["--train_jsonl", str(train), "--eval_jsonl", str(held_out), "--text_model", TEXT_MODEL,
            "--batch_size", "4", "--max_steps_per_epoch", "3", "--no_progress"]
    proc = launch("torchrun", "code/train_clamp2.py", args, tmp_path)
    assert "4 eval samples in 1 global batch" in proc.stdout
    assert "Loading weights" not in proc.stderr  # --no_progress silences transformers' bars too
    keys = published_keys("clamp2_state_dict.tsv", {"text_model.encoder.layer.": 2,
                                                     "music_model.base.encoder.layer.": 1})
    state = check_outputs(tmp_path, CLAMP2_NAME, keys, proc)
    assert state["config"]["CLAMP2_HIDDEN_SIZE"] == 32
    assert state["model"]["music_proj.weight"].shape == torch.Size([32, 64])
    _, evals = log_losses(tmp_path / CLAMP2_NAME.replace("weights", "logs", 1).replace(".pth", ".txt"))
    assert all(0 < loss < 2 * math.log(4) for loss in evals)  # a real contrastive loss over 4 pairs


def test_clamp2_eval_loss_is_the_same_on_one_and_two_processes(tmp_path, corpus):  # noqa: F811
    # 9 eval pairs in global batches of 8: a full one (4 + 4 across the ranks, features gathered) and
    # one of a single pair, which rank 1 has no part in; one process with batch 8 sees the same batches.
    train, held_out = split_jsonl(corpus, eval_count=9)
    args = ["--train_jsonl", str(train), "--eval_jsonl", str(held_out), "--text_model", TEXT_MODEL,
            "--learning_rate", "0", "--epochs", "1", "--max_steps_per_epoch", "1", "--no_progress"]
    launch("torchrun", "code/train_clamp2.py", args + ["--batch_size", "4"], tmp_path)
    (tmp_path / "one").mkdir()
    one_process("code/train_clamp2.py", args + ["--batch_size", "8"], tmp_path / "one")
    two = log_losses(next(tmp_path.glob("logs_clamp2_*.txt")))[1]
    one = log_losses(next((tmp_path / "one").glob("logs_clamp2_*.txt")))[1]
    assert len(one) == len(two) == 1 and one[0] == pytest.approx(two[0], abs=1e-5)
    assert 0.5 < one[0] < 2 * math.log(8)


def test_ranks_end_when_the_launcher_is_killed_while_they_start(tmp_path, corpus):  # noqa: F811
    # The launcher SIGKILLed as soon as its ranks exist (they are still importing torch): they used to note their
    # parent only after the imports, by then PID 1, and waited on the dead launcher's store for minutes.
    import signal
    import time

    train, held_out = split_jsonl(corpus, eval_count=4)
    weights = tmp_path / "orphans.pth"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(TINY_ENV, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(REPO_ROOT / "code/train_clamp2.py"), "--train_jsonl", str(train), "--eval_jsonl", str(held_out),
           "--text_model", TEXT_MODEL, "--batch_size", "4", "--no_progress", "--weights", str(weights)]
    launcher = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)

    def ranks():
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                line = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
            except OSError:
                continue
            if str(weights) in line and int(pid) != launcher.pid:
                found.append(int(pid))
        return found

    def loading_torch(pid):  # the scripts import clamp2 first, then torch: a rank mapping torch's library is past it
        try:
            return "libtorch" in open(f"/proc/{pid}/maps").read()
        except OSError:
            return False

    deadline = time.time() + 60
    while not (len(ranks()) == 2 and all(map(loading_torch, ranks()))) and time.time() < deadline:
        time.sleep(0.02)
    started = ranks()
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.wait()
    deadline = time.time() + 20
    while ranks() and time.time() < deadline:
        time.sleep(0.2)
    left = ranks()
    for pid in left:  # this test's own processes, by id
        os.kill(pid, signal.SIGKILL)
    assert len(started) == 2 and left == [], (started, left)


def test_a_process_forked_after_the_import_watches_its_own_parent():
    # clamp2 notes the launcher when imported; a child forked later (its parent is the importing process) must watch
    # that parent, not the launcher above it, or it would end at once.
    code = ("import os, time\n"
            "from clamp2 import distributed\n"
            "child = os.fork()\n"
            "if child == 0:\n"
            "    distributed.before_process_group()\n"
            "    time.sleep(1.5)\n"
            "    os._exit(7)\n"
            "print(os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["7"], result.stderr


@pytest.mark.parametrize("launcher_variable", ["ACCELERATE_USE_CPU", "TORCHELASTIC_RUN_ID"])
def test_one_process_started_by_a_launcher_ends_with_it(launcher_variable, tmp_path):
    # accelerate exits on a Ctrl-C sent to it alone without stopping its one child: the extraction went on to the
    # end of its folder, beside a re-run. Here the launcher exits as soon as its child has set up.
    ready = tmp_path / "ready"
    child = ("import pathlib, sys, time\n"
             "from clamp2.extraction.core import process_state\n"
             "process_state('cpu')\n"
             f"pathlib.Path({str(ready)!r}).write_text('x')\n"
             "time.sleep(60)\n")
    launcher = ("import os, pathlib, subprocess, sys, time\n"
                "child = subprocess.Popen([sys.executable, '-c', sys.argv[1]], stdout=subprocess.DEVNULL,\n"
                "                         stderr=subprocess.DEVNULL)\n"
                "print(child.pid, flush=True)\n"
                f"while not pathlib.Path({str(ready)!r}).exists() and child.poll() is None:\n"
                "    time.sleep(0.05)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env[launcher_variable] = "1" if launcher_variable.startswith("ACCELERATE") else "run"
    result = subprocess.run([sys.executable, "-c", launcher, child], capture_output=True, text=True, env=env,
                            timeout=120)
    pid = int(result.stdout.split()[0])
    assert ready.exists(), result.stderr
    deadline = time.time() + 10
    while os.path.exists(f"/proc/{pid}") and time.time() < deadline:
        time.sleep(0.1)
    alive = os.path.exists(f"/proc/{pid}") and "Z" not in open(f"/proc/{pid}/stat").read().split()[2]
    if alive:
        os.kill(pid, signal.SIGKILL)
    assert not alive


def test_a_checkpoint_rank_0_cannot_write_stops_every_rank_with_one_line(tmp_path, corpus):  # noqa: F811
    # Rank 0 said one line and left; rank 1 met its exit at the next collective: a long "Connection closed by peer"
    # traceback with gloo (NCCL would wait for its timeout). A full disk at epoch 2's save, as the writer says it.
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(
        "import clamp2.checkpoint as checkpoint\n"
        "real = checkpoint.save_checkpoint\n"
        "def save_checkpoint(path, model, **fields):\n"
        "    if fields.get('epoch') == 2:\n"
        "        raise checkpoint.CheckpointError(f'cannot write checkpoint {path}: No space left on device; the '\n"
        "                                         'previous checkpoint is kept')\n"
        "    return real(path, model, **fields)\n"
        "checkpoint.save_checkpoint = save_checkpoint\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(TINY_ENV, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    args = m3_args(corpus) + ["--batch_size", "2", "--max_steps_per_epoch", "2"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}", str(REPO_ROOT / "code" / "train_m3.py"), *args],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    said = [line for line in proc.stderr.splitlines() if "No space left on device" in line]
    assert len(said) == 1 and "cannot write checkpoint" in said[0], proc.stderr[-3000:]
    # Both ranks end with the trainers' status for a checkpoint error; the only traceback is torchrun's own report.
    # Under load torchrun may end the slower rank (SIGTERM, -15) once the faster one has exited: after the line.
    ends = [line.split(":")[1].split()[0] for line in proc.stderr.splitlines() if line.strip().startswith("exitcode")]
    assert "2" in ends and set(ends) <= {"2", "-15"}, proc.stderr[-3000:]
    assert proc.stderr.count("Traceback") == 1, proc.stderr[-3000:]
    assert "ChildFailedError" in proc.stderr and "Connection closed by peer" not in proc.stderr
    assert read_checkpoint(tmp_path / ("latest_" + M3_NAME))["epoch"] == 1
