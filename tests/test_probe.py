"""The linear probe (clamp2.probe, music_classification/*.py): numbers, batching, K-fold, resume, bad input."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from clamp2.checkpoint import latest_path, read_checkpoint
from clamp2.probe.data import EpochSampler, FeatureSet, ProbeDataset, collate_batch, label_of, scan_features
from clamp2.probe.model import LinearProbe, probe_loss
from clamp2.probe.report import macro_f1
from clamp2.probe.train import logs_path_for, predict
from clamp2.distributed import DistInfo
from conftest import REPO_ROOT, VECTORS, load_script
from conftest import run_main as run
from probe_features import class_means, oracle_accuracy, write_features

LABELS = ["folk", "jazz", "rock"]
# Small, fast settings: the reference's 768-wide probe at 1e-5 needs hundreds of epochs.
FAST = ["--hidden_size", "16", "--learning_rate", "3e-3", "--batch_size", "8", "--no_progress"]


@pytest.fixture(scope="module")
def train_cls():
    return load_script("music_classification/train_cls.py")


@pytest.fixture(scope="module")
def inference_cls():
    return load_script("music_classification/inference_cls.py")


@pytest.fixture
def data(tmp_path):
    """Three overlapping classes: 40 training files each, 20 held-out files each (per-position, L 3..12)."""
    means = class_means(LABELS, dim=8, separation=0.35, seed=3)
    write_features(tmp_path / "train", means, 40, seed=1)
    write_features(tmp_path / "eval", means, 20, seed=2, start=100)
    return tmp_path, means


def one_line_error(err):
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# -- the model and batching -----------------------------------------------------------------------

def random_files(count, dim, lengths, seed=0):
    rng = np.random.default_rng(seed)
    features = FeatureSet(arrays=[])
    for index in range(count):
        length = int(rng.integers(*lengths))
        features.arrays.append(rng.normal(size=(length, dim)).astype(np.float32))
        features.paths.append(Path(f"x_{index}.npy"))
        features.labels.append("x")
        features.lengths.append(length)
        features.dims.append(dim)
        features.kinds.append("per-position")
    return features


def test_batched_files_get_their_batch_size_1_output():
    torch.manual_seed(0)
    model = LinearProbe(32, 5, hidden_size=48).eval()
    features = random_files(64, 32, (1, 90))
    dataset = ProbeDataset(features, range(64), [0] * 64)
    with torch.no_grad():
        alone = torch.cat([model(features.features(i)[None]) for i in range(64)])
        packed, mask, _, _ = collate_batch([dataset[i] for i in range(64)])
        assert mask is not None and not mask.all()  # the batch really mixes lengths
        assert packed.shape == (sum(features.lengths), 32)
        padded = torch.zeros((64, mask.shape[1], 32))
        padded[mask] = packed
        padded[~mask] = 1e3  # whatever the padding holds, it must not count
        for together in (model(packed, mask), model(padded, mask)):
            assert torch.allclose(together, alone, atol=1e-5, rtol=0)
    # Through the evaluation path (files sorted by length, batches of 64, 7 and 1).
    for batch_size in (64, 7, 1):
        probabilities = predict(model, dataset, batch_size, DistInfo(), 5)
        assert np.allclose(probabilities, alone.numpy(), atol=1e-5, rtol=0)


def test_gradients_of_a_batch_equal_the_mean_of_single_file_gradients():
    torch.manual_seed(2)
    model = LinearProbe(8, 3, hidden_size=16)
    features = random_files(12, 8, (2, 20), seed=4)
    targets = [i % 3 for i in range(12)]
    dataset = ProbeDataset(features, range(12), targets)
    singles = []
    for i in range(12):
        model.zero_grad()
        probe_loss(model(features.features(i)[None]), torch.tensor([targets[i]])).backward()
        singles.append([p.grad.clone() for p in model.parameters()])
    model.zero_grad()
    packed, mask, target, _ = collate_batch([dataset[i] for i in range(12)])
    probe_loss(model(packed, mask), target).backward()
    for index, parameter in enumerate(model.parameters()):
        expected = torch.stack([grads[index] for grads in singles]).mean(dim=0)
        assert torch.allclose(parameter.grad, expected, atol=1e-6, rtol=1e-5)


def test_batch_size_1_is_the_reference_forward():
    torch.manual_seed(1)
    model = LinearProbe(16, 3, hidden_size=16)
    x = torch.randn(1, 11, 16)
    expected = torch.softmax(model.fc2(torch.relu(model.fc1(x)).mean(dim=1)), dim=1)
    assert torch.equal(model(x), expected)
    _, mask, _, _ = collate_batch([(x[0], 0, 0)])
    assert mask is None  # one file (or equal lengths) never goes through the mask


def test_loss_is_cross_entropy_of_the_softmax_output():
    probabilities = torch.softmax(torch.tensor([[2.0, 0.0, -1.0], [0.1, 0.2, 3.0]]), dim=1)
    targets = torch.tensor([0, 2])
    expected = -torch.log_softmax(probabilities, dim=1)[torch.arange(2), targets].mean()
    assert torch.allclose(probe_loss(probabilities, targets), expected)
    # ... which is not the plain negative log-likelihood of the probabilities.
    assert not torch.allclose(probe_loss(probabilities, targets), F.nll_loss(probabilities.log(), targets))


def test_macro_f1_equals_scikit_learn():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(0)
    for _ in range(20):
        targets = rng.integers(0, 6, size=int(rng.integers(1, 40)))
        predictions = rng.integers(0, 7, size=len(targets))
        assert macro_f1(targets, predictions) == pytest.approx(
            f1_score(targets, predictions, average="macro", zero_division=0), abs=1e-12)


def test_epoch_sampler_orders():
    targets = [0] * 10 + [1] * 4 + [2] * 7
    plain = EpochSampler(targets, shuffle=True, seed=5)
    plain.set_epoch(1)
    first = list(plain)
    plain.set_epoch(2)
    assert sorted(first) == list(range(21)) and first != list(plain)
    balanced = EpochSampler(targets, shuffle=True, balanced=True, seed=5)
    for epoch in (1, 2):
        balanced.set_epoch(epoch)
        drawn = list(balanced)
        assert len(drawn) == len(balanced) == 12 and len(set(drawn)) == 12
        assert [sum(targets[i] == c for i in drawn) for c in range(3)] == [4, 4, 4]
    # Two ranks: same length, together the whole (padded) order, and the same on a re-run.
    shares = []
    for rank in (0, 1):
        sampler = EpochSampler(targets, shuffle=True, seed=5, rank=rank, world_size=2)
        sampler.set_epoch(3)
        shares.append(list(sampler))
    assert len(shares[0]) == len(shares[1]) == 11 and set(shares[0]) | set(shares[1]) == set(range(21))


def test_labels_from_file_names():
    assert label_of("a/b/jazz_0001_take2.npy") == "jazz"
    for bad in ("jazz.npy", "_0001.npy"):
        with pytest.raises(ValueError):
            label_of(bad)


# -- training: accuracy, batching, K-fold ------------------------------------------------------------

@pytest.mark.parametrize("per_position", [True, False], ids=["per-position", "global"])
def test_probe_reaches_the_best_possible_held_out_accuracy(tmp_path, train_cls, capsys, per_position):
    # A global feature is one position: the same signal with all the noise, so it needs more of it.
    means = class_means(LABELS, dim=8, separation=0.12 if per_position else 0.5, seed=3)
    write_features(tmp_path / "train", means, 40, seed=1, per_position=per_position, lengths=(8, 16))
    eval_paths = write_features(tmp_path / "eval", means, 30, seed=2, start=100, per_position=per_position,
                                lengths=(8, 16))
    oracle = oracle_accuracy(eval_paths, means)
    assert 0.55 < oracle < 0.98  # classes overlap: the test can tell a good probe from a perfect one
    code, out, err = run(train_cls, ["--train_folders", tmp_path / "train", "--eval_folders", tmp_path / "eval",
                                     "--weights", tmp_path / "probe.pth", "--epochs", "25", *FAST], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "probe_report" / "metrics.json").read_text())
    accuracy = metrics["eval"]["accuracy"]
    assert oracle - 0.1 <= accuracy, (accuracy, oracle)
    assert metrics["files"] == {"train": 120, "eval": 90, "skipped": 0}
    assert metrics["feature_kind"].startswith("per-position" if per_position else "global")
    best = metrics["history"]["epoch"].index(metrics["best_epoch"])
    assert metrics["history"]["eval_acc"][best] == pytest.approx(accuracy, abs=1e-12)
    assert "Best Eval Epoch : " in out and out.count(" (best)") >= 1
    for name in ("report.txt", "confusion_matrix.png", "learning_curve.png"):
        assert (tmp_path / "probe_report" / name).stat().st_size > 0
    checkpoint = read_checkpoint(tmp_path / "probe.pth")
    assert checkpoint["labels"] == {"folk": 0, "jazz": 1, "rock": 2}
    assert checkpoint["epoch"] == metrics["best_epoch"] and checkpoint["max_eval_acc"] == pytest.approx(accuracy)
    log = (tmp_path / "logs-probe.txt").read_text()
    assert log.count("eval_f1_macro: ") == 25
    # the reference's entry, line for line
    first = log.split("\n\n")[0].splitlines()
    assert first[0] == "Epoch 1" and [line.split(": ")[0] for line in first[1:]] == [
        "train_acc", "eval_acc", "eval_f1_macro", "time"]
    assert "Best Epoch so far!" in log


def test_default_is_the_reference_setup(tmp_path, train_cls, data, capsys, monkeypatch):
    """Batch 1, constant 1e-5, 768 hidden units, ceil(0.2·n) held out, weights-<folder>.pth."""
    folder, _ = data
    monkeypatch.chdir(tmp_path)
    code, out, err = run(train_cls, ["--train_folders", folder / "train", "--epochs", "1", "--no_progress"],
                         capsys)
    assert code == 0, err
    checkpoint = read_checkpoint(tmp_path / "weights-train.pth")
    assert (tmp_path / "logs-train.txt").is_file()
    assert checkpoint["model"]["fc1.weight"].shape == (768, 8)
    assert checkpoint["optimizer"]["param_groups"][0]["lr"] == 1e-5
    assert checkpoint["config"]["batch_size"] == 1
    metrics = json.loads((tmp_path / "weights-train_report" / "metrics.json").read_text())
    assert metrics["files"]["eval"] == 24 and metrics["files"]["train"] == 96  # ceil(0.2 · 120)
    assert "batch 1 per process, fp32, learning rate 1e-05, epochs up to 1" in out


def test_hold_out_rounds_up(tmp_path, train_cls, data, capsys):
    # 0.21 · 120 = 25.2: the reference's math.ceil holds out 26 (int() would hold out 25).
    folder, _ = data
    code, _, err = run(train_cls, ["--train_folders", folder / "train", "--weights", tmp_path / "w.pth",
                                   "--epochs", "1", "--eval_split", "0.21", *FAST], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "w_report" / "metrics.json").read_text())
    assert metrics["files"]["eval"] == 26 and metrics["files"]["train"] == 94


def test_wandb_log_logs_every_epoch_and_the_key_is_refused(tmp_path, train_cls, data, capsys, monkeypatch):
    import sys
    import types

    folder, _ = data
    args = ["--train_folders", folder / "train", "--weights", tmp_path / "w.pth", "--epochs", "2", *FAST]
    code, _, err = run(train_cls, args + ["--wandb_key", "secret-123"], capsys)
    assert code == 2 and "WANDB_API_KEY" in err and "secret-123" not in err
    # wandb is an optional extra (not installed here): asked for, a note, and the probe trains all the same.
    monkeypatch.setitem(sys.modules, "wandb", None)  # as when the optional extra is not installed
    code, _, err = run(train_cls, args + ["--wandb_log", "--no_resume"], capsys)
    assert code == 0 and "`wandb` is not installed" in err
    calls = []

    class Run:
        def log(self, values, step):
            calls.append(("log", step, sorted(values)))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.init = lambda **kwargs: calls.append(("init", kwargs["project"], kwargs["name"])) or Run()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    code, _, err = run(train_cls, args + ["--wandb_log", "--no_resume"], capsys)
    assert code == 0, err
    metrics = ["eval_acc", "eval_f1_macro", "eval_loss", "learning_rate", "train_acc", "train_f1_macro", "train_loss"]
    assert calls == [("init", "clamp2-probe", "w"), ("log", 1, metrics), ("log", 2, metrics), ("finish",)]


def test_a_resume_logs_each_epoch_once(tmp_path, train_cls, data, capsys):
    # latest_ is written every --checkpoint_interval seconds, the log every epoch: a killed run may have
    # logged epochs 3 and 4 after its latest_ of epoch 2. The resume trains them again and logs them once.
    import re

    folder, _ = data
    args = ["--train_folders", folder / "train", "--weights", tmp_path / "w.pth", *FAST]
    log = tmp_path / "logs-w.txt"
    log.write_text("Epoch 1\ntrain_acc: 0.1\neval_acc: 0.1\neval_f1_macro: 0.1\ntime: then\n\n")  # an earlier run
    assert run(train_cls, args + ["--epochs", "2"], capsys)[0] == 0
    written = log.read_text()
    log.write_text(written + "Epoch 3\ntrain_acc: 0.5\neval_acc: 0.5\neval_f1_macro: 0.5\ntime: x\n\nBest Epoch so far!\n\n\n"
                   "Epoch 4\ntrain_acc: 0.5\neval_acc: 0.5\neval_f1_macro: 0.5\ntime: x\n\n")
    code, out, err = run(train_cls, args + ["--epochs", "4"], capsys)
    assert code == 0, err
    assert "2 log entries after epoch 2 removed" in out + err
    text = log.read_text()
    assert re.findall(r"^Epoch (\d+)$", text, re.M) == ["1", "1", "2", "3", "4"] and text.startswith(written)



def test_log_trimming_keeps_earlier_runs_and_line_endings(tmp_path):
    from clamp2.probe.train import drop_log_entries_after

    def entries(epochs, newline):
        return "".join(f"Epoch {e}{newline}train_acc: 0.5{newline}eval_acc: 0.5{newline}eval_f1_macro: 0.5{newline}"
                       f"time: x{newline}{newline}" + (f"Best Epoch so far!{newline}" * 3 if e == 2 else "")
                       for e in epochs)

    for newline in ("\n", "\r\n"):
        log = tmp_path / "log.txt"
        log.write_bytes((entries(range(1, 6), newline) + entries(range(1, 5), newline)).encode())
        assert drop_log_entries_after(log, 2) == 2  # the current run's 3 and 4; the earlier run's 3..5 stay
        assert log.read_bytes() == (entries(range(1, 6), newline) + entries(range(1, 3), newline)).encode()
        assert drop_log_entries_after(log, 7) == 0 and drop_log_entries_after(tmp_path / "none.txt", 1) == 0


def test_no_resume_replaces_the_old_runs_latest_from_the_start(tmp_path, train_cls, data, capsys, monkeypatch):
    # A --no_resume run killed before its first latest_ must not leave the old run's latest_ to be resumed.
    import clamp2.probe.train as probe_train

    folder, _ = data
    args = ["--train_folders", folder / "train", "--weights", tmp_path / "w.pth", *FAST]
    assert run(train_cls, args + ["--epochs", "3"], capsys)[0] == 0
    assert (tmp_path / "latest_w.pth").is_file()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(probe_train, "train_epoch", killed)
    with pytest.raises(KeyboardInterrupt):
        run(train_cls, args + ["--epochs", "3", "--no_resume"], capsys)
    assert not (tmp_path / "latest_w.pth").exists()


def test_warmup_option(tmp_path, train_cls, data, capsys):
    folder, _ = data
    code, _, err = run(train_cls, ["--train_folders", folder / "train", "--weights", tmp_path / "w.pth",
                                   "--epochs", "1", "--warmup", *FAST], capsys)
    assert code == 0, err
    checkpoint = read_checkpoint(tmp_path / "w.pth")
    # One epoch of 96 / 8 = 12 steps: the factor has reached 1 after the epoch.
    assert checkpoint["lr_sched"]["last_epoch"] == 12 and checkpoint["history"]["learning_rate"][0] < 3e-3 / 10


def test_inference_labels_do_not_depend_on_batch_size(tmp_path, train_cls, inference_cls, data, capsys):
    folder, _ = data
    assert run(train_cls, ["--train_folders", folder / "train", "--weights", tmp_path / "p.pth",
                           "--epochs", "3", *FAST], capsys)[0] == 0
    outputs = []
    for batch_size in (1, 64):
        out_file = tmp_path / f"pred{batch_size}.json"
        code, out, err = run(inference_cls, [folder / "eval", out_file, "--weights", tmp_path / "p.pth",
                                             "--batch_size", batch_size, "--no_progress"], capsys)
        assert code == 0, err
        outputs.append(json.loads(out_file.read_text()))
    assert outputs[0] == outputs[1] and len(outputs[0]) == 60
    assert set(outputs[0].values()) <= set(LABELS)
    assert all(Path(key).parent == folder / "eval" for key in outputs[0])
    from clamp2.probe.infer import load_probe, predict_features

    probe = load_probe(tmp_path / "p.pth")
    features, _ = scan_features(sorted((folder / "eval").glob("*.npy")), need_labels=False, cache_bytes=10**9,
                                progress=False)
    one, many = (predict_features(probe, features, b, torch.device("cpu")) for b in (1, 64))
    assert np.abs(one - many).max() < 1e-5


def test_classes_differing_only_in_case_or_normalization_are_trained_apart_with_a_warning(tmp_path, train_cls, data,
                                                                                        capsys):
    # As in the reference, the label is the file name up to the first "_": Folk_… and folk_… (or a label a Mac wrote
    # in NFD beside the same one typed in NFC) were two classes without a word.
    import unicodedata

    folder, _ = data
    for index, path in enumerate(sorted((folder / "train").glob("folk_*.npy"))):
        if index % 2:
            path.rename(path.with_name("Folk" + path.name[len("folk"):]))
    for path in sorted((folder / "train").glob("jazz_*.npy"))[:20]:
        path.rename(path.with_name(unicodedata.normalize("NFD", "jäzz") + path.name[len("jazz"):]))
    for path in sorted((folder / "train").glob("jazz_*.npy")):
        path.rename(path.with_name(unicodedata.normalize("NFC", "jäzz") + path.name[len("jazz"):]))
    code, out, err = run(train_cls, ["--train_folders", folder / "train", "--weights", tmp_path / "p.pth",
                                     "--epochs", "1", *FAST], capsys)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: the classes")]
    assert len(warnings) == 2, err
    assert "'Folk', 'folk'" in warnings[0] and "'j\\xe4zz'" in warnings[1] and "'ja\\u0308zz'" in warnings[1]
    assert len(read_checkpoint(tmp_path / "p.pth")["labels"]) == 5  # still five classes, as in the reference


def test_a_report_that_cannot_be_written_is_one_line_and_a_rerun_writes_it(tmp_path, train_cls, inference_cls, data,
                                                                          capsys, monkeypatch):
    # A full disk at the report's plots: a traceback once the probe was trained and saved.
    import errno

    from clamp2.probe import report

    folder, _ = data
    plot = report.plot_confusion_matrix

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report, "plot_confusion_matrix", full)
    args = ["--train_folders", folder / "train", "--weights", tmp_path / "p.pth", "--epochs", "1", *FAST]
    code, out, err = run(train_cls, args, capsys)
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"error: cannot write the report in {tmp_path / 'p_report'}: No space left on device; the weights "
        f"{tmp_path / 'p.pth'} are saved: free space and run the same command again to write it")
    code, out, err = run(inference_cls, [folder / "eval", tmp_path / "o.json", "--weights", tmp_path / "p.pth",
                                         "--evaluate", "--no_progress"], capsys)
    assert code == 1 and "Traceback" not in err and (tmp_path / "o.json").exists()
    assert f"the predictions {tmp_path / 'o.json'} are written" in err
    monkeypatch.setattr(report, "plot_confusion_matrix", plot)
    assert run(train_cls, args, capsys)[0] == 0
    assert (tmp_path / "p_report" / "confusion_matrix.png").exists()


def test_inference_under_torchrun_runs_in_process_0_alone(tmp_path, train_cls, inference_cls, data, capsys,
                                                          monkeypatch):
    # Every process classified every file and wrote the same output file.
    folder, _ = data
    assert run(train_cls, ["--train_folders", folder / "train", "--weights", tmp_path / "p.pth", "--epochs", "1",
                           *FAST], capsys)[0] == 0
    monkeypatch.setenv("WORLD_SIZE", "2")
    for rank in ("1", "0"):
        monkeypatch.setenv("RANK", rank)
        out_file = tmp_path / f"pred{rank}.json"
        code, out, err = run(inference_cls, [folder / "eval", out_file, "--weights", tmp_path / "p.pth",
                                             "--no_progress"], capsys)
        assert code == 0, err
        assert out_file.exists() == (rank == "0") and ("classified 60 file(s)" in out) == (rank == "0")
    assert "process 0 classifies every file" in err


def test_inference_keys_spell_the_folder_as_given(tmp_path, train_cls, inference_cls, data, capsys, monkeypatch):
    # The reference's keys are os.path.join(root, file) from os.walk(folder as typed): ./f/a.npy stays so.
    import os
    import shutil

    folder, _ = data
    assert run(train_cls, ["--train_folders", folder / "train", "--weights", tmp_path / "p.pth",
                           "--epochs", "1", *FAST], capsys)[0] == 0
    names = sorted(p.name for p in (folder / "eval").glob("*.npy"))[:2]
    (tmp_path / "f" / "sub").mkdir(parents=True)
    shutil.copy(folder / "eval" / names[0], tmp_path / "f")
    shutil.copy(folder / "eval" / names[1], tmp_path / "f" / "sub")
    monkeypatch.chdir(tmp_path)
    for given in ("./f", "f/", str(tmp_path / "f")):
        expected = {os.path.join(root, name) for root, _, files in os.walk(given) for name in files}
        code, _, err = run(inference_cls, [given, "o.json", "--weights", "p.pth", "--no_progress"], capsys)
        assert code == 0, err
        assert set(json.loads((tmp_path / "o.json").read_text())) == expected
    code, _, err = run(inference_cls, [f"./f/{names[0]}", "o.json", "--weights", "p.pth", "--no_progress"], capsys)
    assert code == 0 and list(json.loads((tmp_path / "o.json").read_text())) == [f"./f/{names[0]}"]


def test_batched_training_reaches_batch_1_accuracy(tmp_path, train_cls, data, capsys):
    folder, means = data
    oracle = oracle_accuracy(sorted((folder / "eval").glob("*.npy")), means)
    results = {}
    for batch_size, learning_rate in ((1, "1e-3"), (64, "1e-2")):
        report = tmp_path / f"r{batch_size}"
        code, _, err = run(train_cls, ["--train_folders", folder / "train", "--eval_folders", folder / "eval",
                                       "--weights", tmp_path / f"b{batch_size}.pth", "--report_dir", report,
                                       "--epochs", "15", "--hidden_size", "16", "--learning_rate", learning_rate,
                                       "--batch_size", batch_size, "--no_progress"], capsys)
        assert code == 0, err
        results[batch_size] = json.loads((report / "metrics.json").read_text())["eval"]["accuracy"]
    assert min(results.values()) >= oracle - 0.12, (results, oracle)


def test_k_fold_prints_mean_and_std(tmp_path, train_cls, data, capsys):
    folder, _ = data
    np.save(folder / "train" / "nolabel.npy", np.zeros((1, 4, 8), np.float32))  # no "_": listed and left out
    code, out, err = run(train_cls, ["--train_folders", folder / "train", "--weights", tmp_path / "cv.pth",
                                     "--folds", "3", "--epochs", "4", "--patience", "2", *FAST], capsys)
    assert code == 1, err  # done, but a file was left out
    assert "nolabel.npy" in err
    metrics = json.loads((tmp_path / "cv_report" / "metrics.json").read_text())
    accuracies = [fold["accuracy"] for fold in metrics["folds"]]
    assert len(accuracies) == 3 and [fold["eval"] for fold in metrics["folds"]] == [40, 40, 40]
    assert metrics["accuracy"]["mean"] == pytest.approx(np.mean(accuracies))
    assert metrics["accuracy"]["std"] == pytest.approx(np.std(accuracies))
    line = [line for line in out.splitlines() if line.startswith("3-fold cross-validation:")][0]
    assert f"accuracy {np.mean(accuracies):.4f} ± {np.std(accuracies):.4f}, macro-F1 " in line
    # Every file is predicted once, by the fold that held it out.
    assert sum(c["support"] for c in metrics["out_of_fold"]["per_class"].values()) == 120
    for fold in metrics["folds"]:
        checkpoint = read_checkpoint(fold["weights"])
        assert checkpoint["max_eval_acc"] == pytest.approx(fold["accuracy"], abs=1e-12)
    assert (tmp_path / "cv_report" / "learning_curve.png").is_file()
    # A re-run finds every fold done and gives the same summary.
    code, again, _ = run(train_cls, ["--train_folders", folder / "train", "--weights", tmp_path / "cv.pth",
                                     "--folds", "3", "--epochs", "4", "--patience", "2", *FAST], capsys)
    assert code == 1 and line in again and "resuming from" in again


def test_early_stopping(tmp_path, train_cls, data, capsys):
    folder, _ = data
    code, out, err = run(train_cls, ["--train_folders", folder / "train", "--weights", tmp_path / "p.pth",
                                     "--epochs", "200", "--patience", "3", "--learning_rate", "5e-2",
                                     "--hidden_size", "16", "--batch_size", "32", "--no_progress"], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "p_report" / "metrics.json").read_text())
    assert metrics["stopped_early"] and metrics["epochs_run"] == metrics["best_epoch"] + 3 < 200
    assert "stopped early" in out


# -- resuming -------------------------------------------------------------------------------------

def weights_of(path):
    return read_checkpoint(path)["model"]


def test_missing_eval_folder_means_the_split_and_old_checkpoints_say_why_they_stop(tmp_path, train_cls, data, capsys):
    folder, _ = data
    args = ["--train_folders", folder / "train", "--eval_folders", tmp_path / "<YOUR_EVALUATION_DATA_FOLDER>",
            "--weights", tmp_path / "p.pth", "--epochs", "1", *FAST]
    code, out, err = run(train_cls, args, capsys)
    assert code == 0, err
    assert "holds no .npy file: holding out --eval_split of the training files instead" in out
    metrics = json.loads((tmp_path / "p_report" / "metrics.json").read_text())
    assert metrics["files"]["eval"] == math.ceil(0.2 * (metrics["files"]["train"] + metrics["files"]["eval"]))
    # a latest_ checkpoint of the version before the reference's epoch order cannot continue this run
    latest = read_checkpoint(latest_path(tmp_path / "p.pth"))
    del latest["epoch_order"]
    torch.save(latest, latest_path(tmp_path / "p.pth"))
    code, _, err = run(train_cls, args[:-len(FAST) - 2] + ["--epochs", "2", *FAST], capsys)
    assert code == 2 and "written by an earlier version of this tool" in err and "--no_resume" in err


def test_log_name_pairs_with_the_weights_name():
    # the reference: weights-<training folder>.pth beside logs-<training folder>.txt, whatever the folder's name
    assert logs_path_for(Path("weights-in_depth_weights.pth")) == Path("logs-in_depth_weights.txt")
    assert logs_path_for(Path("out/weights-feats.pth")) == Path("out/logs-feats.txt")
    assert logs_path_for(Path("probe.pth")) == Path("logs-probe.txt")


@pytest.mark.parametrize("balanced", [[], ["--balanced"]], ids=["plain", "balanced"])
def test_resume_continues_exactly(tmp_path, train_cls, data, capsys, balanced):
    # With --balanced the draws continue one Python generator (after the hold-out split's shuffle):
    # a resumed run replays the epochs it skips.
    folder, _ = data
    common = ["--train_folders", folder / "train", *FAST, *balanced]
    assert run(train_cls, common + ["--weights", tmp_path / "full.pth", "--epochs", "6"], capsys)[0] == 0
    assert run(train_cls, common + ["--weights", tmp_path / "part.pth", "--epochs", "3"], capsys)[0] == 0
    code, out, _ = run(train_cls, common + ["--weights", tmp_path / "part.pth", "--epochs", "6"], capsys)
    assert code == 0 and "resuming from" in out and "epochs 4..6 of 6" in out
    full, part = weights_of(latest_path(tmp_path / "full.pth")), weights_of(latest_path(tmp_path / "part.pth"))
    assert all(torch.equal(full[key], part[key]) for key in full)
    assert read_checkpoint(latest_path(tmp_path / "part.pth"))["history"]["epoch"] == [1, 2, 3, 4, 5, 6]


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, train_cls, data, capsys):
    folder, _ = data
    common = ["--train_folders", str(folder / "train"), *FAST, "--batch_size", "1", "--epochs", "40",
              "--checkpoint_interval", "0"]
    assert run(train_cls, common + ["--weights", tmp_path / "full.pth"], capsys)[0] == 0
    killed = tmp_path / "killed.pth"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / "music_classification/train_cls.py"), *common,
                                "--weights", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env=env)
    deadline = time.time() + 120
    while not latest_path(killed).is_file() and time.time() < deadline and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    done = read_checkpoint(latest_path(killed))["epoch"]
    assert 1 <= done < 40
    code, out, err = run(train_cls, common + ["--weights", killed], capsys)
    assert code == 0, err
    assert f"resuming from {latest_path(killed)}: epoch {done} done" in out
    full, resumed = weights_of(latest_path(tmp_path / "full.pth")), weights_of(latest_path(killed))
    assert all(torch.equal(full[key], resumed[key]) for key in full)
    assert not list(tmp_path.glob(".*partial"))


def test_resume_refuses_other_data(tmp_path, train_cls, data, capsys):
    folder, _ = data
    args = ["--train_folders", folder / "train", "--weights", tmp_path / "p.pth", "--epochs", "1", *FAST]
    assert run(train_cls, args, capsys)[0] == 0
    write_features(folder / "train", class_means(["blues"], 8, 0.35), 40)
    code, _, err = run(train_cls, args, capsys)
    assert code == 2 and "--no_resume" in one_line_error(err) and "classes" in err
    code, out, err = run(train_cls, args + ["--no_resume"], capsys)
    assert code == 0, err
    labels = read_checkpoint(tmp_path / "p.pth")["labels"]
    assert sorted(labels) == ["blues", "folk", "jazz", "rock"] and sorted(labels.values()) == [0, 1, 2, 3]


def test_unreadable_latest_checkpoint_is_one_line(tmp_path, train_cls, data, capsys):
    folder, _ = data
    latest_path(tmp_path / "p.pth").write_bytes(b"PK\x03\x04 truncated")
    code, _, err = run(train_cls, ["--train_folders", folder / "train", "--weights", tmp_path / "p.pth",
                                   "--epochs", "1", *FAST], capsys)
    assert code == 2 and str(latest_path(tmp_path / "p.pth")) in one_line_error(err) and "--no_resume" in err
    assert "download" not in err  # the advice for a downloaded weights file, not for a run's own resume file


# -- bad input ---------------------------------------------------------------------------------------

def test_bad_files_are_listed_and_skipped(tmp_path, train_cls, data, capsys):
    folder, _ = data
    train = folder / "train"
    np.save(train / "nolabel.npy", np.zeros((1, 4, 8), np.float32))
    bad = np.ones((1, 4, 8), np.float32)
    bad[0, 1, 2] = np.nan
    np.save(train / "jazz_nan.npy", bad)
    (train / "rock_broken.npy").write_bytes(b"not a numpy file")
    np.save(train / "folk_shape.npy", np.zeros((2, 4, 8), np.float32))
    np.save(train / "folk_ints.npy", np.zeros((1, 4, 8), np.int64))
    np.save(train / "folk_empty.npy", np.zeros((1, 0, 8), np.float32))
    eval_folder = folder / "eval"
    np.save(eval_folder / "blues_0001.npy", np.zeros((1, 4, 8), np.float32))
    code, out, err = run(train_cls, ["--train_folders", train, "--eval_folders", eval_folder,
                                     "--weights", tmp_path / "p.pth", "--epochs", "1", *FAST], capsys)
    assert code == 1 and "Traceback" not in err
    reasons = {line.split(": ")[1]: line for line in err.splitlines() if line.startswith("skipped: ")}
    assert set(Path(p).name for p in reasons) == {"nolabel.npy", "jazz_nan.npy", "rock_broken.npy", "folk_shape.npy",
                                                  "folk_ints.npy", "folk_empty.npy", "blues_0001.npy"}
    assert "label is unknown" in reasons[str(train / "nolabel.npy")]
    assert "NaN or infinite" in reasons[str(train / "jazz_nan.npy")]
    assert "cannot read" in reasons[str(train / "rock_broken.npy")]
    assert "expected [1, L, D]" in reasons[str(train / "folk_shape.npy")]
    assert "not floating-point" in reasons[str(train / "folk_ints.npy")]
    assert "no training file" in reasons[str(eval_folder / "blues_0001.npy")]
    metrics = json.loads((tmp_path / "p_report" / "metrics.json").read_text())
    assert len(metrics["skipped"]) == 7 and metrics["files"] == {"train": 120, "eval": 60, "skipped": 7}
    assert "7 file(s) skipped (listed above)" in out


@pytest.mark.parametrize("case", ["missing", "empty", "one class", "mixed sizes", "mixed kinds", "folds too many",
                                  "folds with eval", "bad flag", "all bad", "overlap"])
def test_usage_errors_are_one_line(tmp_path, train_cls, capsys, case):
    folder = tmp_path / "f"
    folder.mkdir()
    args = ["--train_folders", folder, "--weights", tmp_path / "p.pth", "--epochs", "1", "--no_progress"]
    expected = {"missing": "not found", "empty": "no .npy feature files", "one class": "only the class 'jazz'",
                "mixed sizes": "mixed feature sizes", "mixed kinds": "mixed feature kinds",
                "folds too many": "too few: 'rock' (2)", "folds with eval": "drop --eval_folders",
                "bad flag": "--folds must be", "all bad": "none of the 2 feature files", "overlap": "both in the"}[case]
    if case == "missing":
        args[1] = tmp_path / "nowhere"
    elif case == "one class":
        write_features(folder, class_means(["jazz"], 4, 1.0), 5)
    elif case in ("mixed sizes", "mixed kinds"):
        write_features(folder, class_means(["jazz", "rock"], 4, 1.0), 5)
        write_features(folder / "more", class_means(["jazz"], 6 if case == "mixed sizes" else 4, 1.0), 2,
                       per_position=case == "mixed sizes")
    elif case == "folds too many":
        write_features(folder, class_means(["jazz"], 4, 1.0), 5)
        write_features(folder, class_means(["rock"], 4, 1.0), 2)
        args += ["--folds", "3"]
    elif case == "folds with eval":
        args += ["--folds", "3", "--eval_folders", folder]
    elif case == "bad flag":
        args += ["--folds", "1"]
    elif case == "all bad":
        (folder / "a.npy").write_bytes(b"x")
        (folder / "b_1.npy").write_bytes(b"x")
    elif case == "overlap":
        write_features(folder / "sub", class_means(["jazz", "rock"], 4, 1.0), 3)
        args += ["--eval_folders", folder / "sub"]
    code, _, err = run(train_cls, args, capsys)
    assert code == 2
    assert expected in one_line_error(err) if case != "all bad" else expected in err.splitlines()[-1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_without_a_device_is_one_line(tmp_path, train_cls, inference_cls, capsys):
    code, _, err = run(train_cls, ["--train_folders", tmp_path, "--device", "cuda"], capsys)
    assert code == 2 and "no CUDA device" in one_line_error(err)
    code, _, err = run(inference_cls, [tmp_path, tmp_path / "o.json", "--weights", "w.pth", "--device", "cuda"],
                       capsys)
    assert code == 2 and "no CUDA device" in one_line_error(err)


def test_argparse_errors_are_one_line(train_cls, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_cls.main(["--batch_size", "x", "--train_folders", "f"])
    assert exit_info.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_inference_bad_input(tmp_path, train_cls, inference_cls, data, capsys):
    folder, _ = data
    assert run(train_cls, ["--train_folders", folder / "train", "--weights", tmp_path / "p.pth",
                           "--epochs", "2", *FAST], capsys)[0] == 0
    out_file = tmp_path / "out.json"
    for weights, expected in ((tmp_path / "none.pth", "probe weights not found"),
                              (VECTORS / "tiny_m3.pth", "is an M3 checkpoint; expected a linear probe")):
        code, _, err = run(inference_cls, [folder / "eval", out_file, "--weights", weights], capsys)
        assert code == 2 and expected in one_line_error(err)
    code, _, err = run(inference_cls, [tmp_path / "nothing", out_file, "--weights", tmp_path / "p.pth"], capsys)
    assert code == 2 and "not found" in one_line_error(err)

    test = tmp_path / "test"
    write_features(test, class_means(["jazz", "blues"], 8, 0.35), 3)
    np.save(test / "unlabelled.npy", np.zeros((1, 5, 8), np.float32))
    np.save(test / "jazz_wide.npy", np.zeros((1, 5, 12), np.float32))
    code, out, err = run(inference_cls, [test, out_file, "--weights", tmp_path / "p.pth", "--evaluate",
                                         "--no_progress"], capsys)
    assert code == 1 and "Traceback" not in err
    predictions = json.loads(out_file.read_text())
    assert len(predictions) == 7 and str(test / "jazz_wide.npy") not in predictions
    assert f"skipped: {test / 'jazz_wide.npy'}: feature size 12, the probe takes 8" in err
    assert err.count("not scored: ") == 4  # three blues files and the unlabelled one
    assert f"not scored: {test / 'blues_0000.npy'}: label 'blues' is not one the probe was trained on" in err
    metrics = json.loads((tmp_path / "out_report" / "metrics.json").read_text())
    assert metrics["files"] == {"scored": 3, "not_scored": 4, "skipped": 1}
    assert "classified 7 file(s)" in out and "1 skipped, 4 not scored (listed above)" in out


def test_reference_checkpoint_works_for_inference(tmp_path, inference_cls, data, capsys):
    """A checkpoint in the reference's format (labels in first-seen order, no extra fields)."""
    folder, _ = data
    torch.manual_seed(0)
    model = LinearProbe(8, 3, hidden_size=768)
    torch.save({"model": model.state_dict(), "optimizer": {}, "lr_sched": {}, "epoch": 7, "best_epoch": 7,
                "max_eval_acc": 0.5, "labels": {"rock": 0, "folk": 1, "jazz": 2}}, tmp_path / "ref.pth")
    code, _, err = run(inference_cls, [folder / "eval" / "jazz_0100.npy", tmp_path / "o.json",
                                       "--weights", tmp_path / "ref.pth", "--no_progress"], capsys)
    assert code == 0, err
    array = torch.from_numpy(np.load(folder / "eval" / "jazz_0100.npy"))
    expected = ["rock", "folk", "jazz"][int(model(array).argmax())]
    assert json.loads((tmp_path / "o.json").read_text()) == {str(folder / "eval" / "jazz_0100.npy"): expected}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_amp_training_and_inference(tmp_path, train_cls, inference_cls, data, capsys):
    """fp16 AMP with gradient scaling on the GPU (features held on the device); inference equals the CPU's."""
    folder, means = data
    oracle = oracle_accuracy(sorted((folder / "eval").glob("*.npy")), means)
    code, out, err = run(train_cls, ["--train_folders", folder / "train", "--eval_folders", folder / "eval",
                                     "--weights", tmp_path / "p.pth", "--epochs", "15", "--device", "cuda",
                                     "--hidden_size", "16", "--learning_rate", "3e-3", "--batch_size", "8",
                                     "--no_progress"], capsys)
    assert code == 0, err
    assert "on cuda" in out and "fp16 AMP + gradient scaling" in out
    metrics = json.loads((tmp_path / "p_report" / "metrics.json").read_text())
    assert metrics["eval"]["accuracy"] >= oracle - 0.15
    from clamp2.probe.infer import load_probe, predict_features

    features, _ = scan_features(sorted((folder / "eval").glob("*.npy")), need_labels=False, cache_bytes=10**9,
                                progress=False)
    cpu = predict_features(load_probe(tmp_path / "p.pth"), features, 1, torch.device("cpu"))
    features.move_to(torch.device("cuda"))
    probe = load_probe(tmp_path / "p.pth", torch.device("cuda"))
    for batch_size in (1, 64):
        assert np.abs(predict_features(probe, features, batch_size, torch.device("cuda")) - cpu).max() < 1e-5

# -- found by a mutation audit of the training machinery: each fails on a plausible one-line bug --------

@pytest.mark.parametrize("accuracies", [[0.5, 0.5, 0.5], [0.0, 0.0, 0.0]], ids=["tie", "zero"])
def test_the_first_of_equal_eval_accuracies_is_the_best_epoch(tmp_path, train_cls, data, capsys, monkeypatch,
                                                              accuracies):
    import clamp2.probe.train as probe_train
    real, seen = probe_train.scores, iter(accuracies)
    monkeypatch.setattr(probe_train, "scores", lambda *a: {**real(*a), "accuracy": next(seen)})
    folder, _ = data
    code, _, err = run(train_cls, ["--train_folders", folder / "train", "--weights", tmp_path / "p.pth",
                                   "--epochs", "3", *FAST], capsys)
    assert code == 0, err
    assert read_checkpoint(tmp_path / "p.pth")["epoch"] == 1
    assert read_checkpoint(tmp_path / "latest_p.pth")["best_epoch"] == 1


def test_the_first_warm_up_step_runs_at_one_over_w_of_the_rate(tmp_path, train_cls, data, capsys):
    folder, _ = data
    code, _, err = run(train_cls, ["--train_folders", folder / "train", "--weights", tmp_path / "w.pth",
                                   "--epochs", "1", "--warmup", *FAST], capsys)
    assert code == 0, err
    assert read_checkpoint(tmp_path / "w.pth")["history"]["learning_rate"][0] == pytest.approx(3e-3 / 12)


def test_default_inference_batch_gives_the_reference_labels_even_on_near_ties(inference_cls):
    # Batches of files of several lengths are masked and packed: probabilities agree with one-by-one
    # classification to about one float32 rounding, so where two classes are within that of each other the
    # label can differ. The default batch size must give the reference's labels exactly (its loop: one file at
    # a time); found by differential fuzzing (two classes whose weights differ by 1e-6).
    from clamp2.probe.infer import TrainedProbe, predict_features

    batch_size = inference_cls.parse_args(["feats", "out.json", "--weights", "w.pth"]).batch_size
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    for trial in range(40):
        model = LinearProbe(8, 2, hidden_size=32).eval()
        with torch.no_grad():
            model.fc2.weight[1] = model.fc2.weight[0]
            model.fc2.bias[1] = model.fc2.bias[0]
            model.fc2.weight[1, 0] += 1e-6
        features = random_files(16, 8, (1, 60), seed=int(rng.integers(1 << 30)))
        with torch.no_grad():
            alone = torch.cat([model(features.features(i)[None]) for i in range(len(features))]).argmax(dim=1)
        probe = TrainedProbe(model, ["a", "b"], 1, 0.5)
        labels = predict_features(probe, features, batch_size, torch.device("cpu")).argmax(axis=1)
        assert labels.tolist() == alone.tolist(), f"trial {trial}"


class Killed(BaseException):
    """What a SIGKILL leaves: the process stops where it is, nothing after runs."""


def test_a_run_killed_around_its_saves_logs_each_epoch_once(tmp_path, train_cls, data, capsys, monkeypatch):
    # A run killed in its first epoch after its log entry but before its first checkpoint left that entry, and
    # its re-run (nothing to resume from) logged epoch 1 again. The log is written after the saves now; a run
    # killed between them gets the entry from its resume.
    import re

    from clamp2.probe import train as probe_train

    folder, _ = data
    common = ["--train_folders", folder / "train", *FAST, "--epochs", "3", "--checkpoint_interval", "0"]

    def entries(path):
        return re.sub(r"^time: .*$", "", path.read_text(), flags=re.M)

    assert run(train_cls, common + ["--weights", tmp_path / "whole.pth"], capsys)[0] == 0
    save, log = probe_train.save_checkpoint, probe_train.append_log
    for killed_in, epoch in (("save_checkpoint", 1), ("append_log", 2)):
        weights = tmp_path / f"{killed_in}.pth"
        original = save if killed_in == "save_checkpoint" else log
        calls = []

        def kill_at(*args, original=original, epoch=epoch, **kwargs):
            calls.append(1)
            if len(calls) == (1 if original is save else epoch):
                raise Killed
            return original(*args, **kwargs)

        monkeypatch.setattr(probe_train, killed_in, kill_at)
        with pytest.raises(Killed):
            run(train_cls, common + ["--weights", weights], capsys)
        monkeypatch.setattr(probe_train, killed_in, original)
        assert run(train_cls, common + ["--weights", weights], capsys)[0] == 0
        assert entries(logs_path_for(weights)) == entries(tmp_path / "logs-whole.txt"), killed_in


def test_a_second_run_on_the_same_weights_is_refused_while_the_first_runs(tmp_path, train_cls, data, capsys):
    # Two runs on one --weights overwrote each other's files and wrote every epoch twice in logs-<name>.txt.
    from conftest import run_lock_held

    folder, _ = data
    weights = tmp_path / "w.pth"
    args = ["--train_folders", folder / "train", "--weights", weights, "--epochs", "1", *FAST]
    with run_lock_held(weights) as holder:
        code, _, err = run(train_cls, args, capsys)
        assert code == 2 and f"pid {holder.pid} on node7" in one_line_error(err)
        assert not weights.exists() and not latest_path(weights).exists()
    assert run(train_cls, args, capsys)[0] == 0 and weights.is_file() and not (tmp_path / "w.pth.lock").exists()
