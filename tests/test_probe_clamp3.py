"""CLaMP 3's linear probe (SPEC_CLAMP3 §20) as ``train_cls.py --probe clamp3``."""

import json

import numpy as np
import pytest
import torch

from clamp2.checkpoint import read_checkpoint
from clamp2.probe.model import LinearClassifier, probe_from_state, probe_loss
from conftest import load_script
from conftest import run_main as run
from probe_features import class_means, oracle_accuracy, write_features

LABELS = ["folk", "jazz", "rock"]
FAST = ["--probe", "clamp3", "--learning_rate", "1e-1", "--batch_size", "8", "--no_progress"]


@pytest.fixture(scope="module")
def train_cls():
    return load_script("music_classification/train_cls.py")


@pytest.fixture(scope="module")
def inference_cls():
    return load_script("music_classification/inference_cls.py")


def test_model_is_one_linear_layer_and_softmax_as_the_reference():
    torch.manual_seed(0)
    model = LinearClassifier(6, 3)
    assert sorted(model.state_dict()) == ["fc.bias", "fc.weight"]
    x = torch.randn(6)
    # The reference: x.squeeze().unsqueeze(0) -> fc -> softmax(dim=1), CE on that softmax.
    expected = torch.softmax(model.fc(x.unsqueeze(0)), dim=1)
    for shaped in (x[None], x[None, None]):  # [1, D] files batch to [B, 1, D]; [D] files to [B, D]
        assert torch.equal(model(shaped), expected)
    target = torch.tensor([2])
    assert torch.equal(probe_loss(expected, target), torch.nn.CrossEntropyLoss()(expected, target))
    with pytest.raises(ValueError, match="global features"):
        model(torch.randn(1, 4, 6))


@pytest.mark.parametrize("balanced", [False, True], ids=["plain", "balanced"])
def test_clamp3_probe_learns_global_features(tmp_path, train_cls, inference_cls, capsys, balanced):
    means = class_means(LABELS, dim=8, separation=0.5, seed=3)
    write_features(tmp_path / "train", means, 40, seed=1, per_position=False)
    # an unbalanced training set: balancing must draw 20 of each label per epoch
    for extra in (tmp_path / "train").glob("folk_00[23]?.npy"):
        extra.unlink()
    eval_paths = write_features(tmp_path / "eval", means, 30, seed=2, start=100, per_position=False)
    np.save(tmp_path / "eval" / "rock_bare.npy", np.load(eval_paths[-1])[0])  # a bare [D] vector
    weights = tmp_path / "probe.pth"
    args = ["--train_folder", tmp_path / "train", "--eval_folder", tmp_path / "eval", "--weights", weights,
            "--num_epochs", "8", *FAST] + (["--balanced_training"] if balanced else [])
    code, out, err = run(train_cls, args, capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "probe_report" / "metrics.json").read_text())
    assert metrics["files"] == {"train": 100, "eval": 91, "skipped": 0}
    assert metrics["eval"]["accuracy"] >= oracle_accuracy(eval_paths, means) - 0.1
    checkpoint = read_checkpoint(weights)
    assert sorted(checkpoint["model"]) == ["fc.bias", "fc.weight"]
    assert checkpoint["input_size"] == 8 and checkpoint["labels"] == {"folk": 0, "jazz": 1, "rock": 2}
    if balanced:
        # 20 files of each label per epoch, in batches of 8: ceil(60 / 8) = 8 steps per epoch
        assert metrics["settings"]["balanced"] is True
    code, out, err = run(inference_cls, [tmp_path / "eval", tmp_path / "pred.json", "--weights", weights,
                                         "--no_progress"], capsys)
    assert code == 0, err
    assert len(json.loads((tmp_path / "pred.json").read_text())) == 91


def reference_probe_weights(train_folder, eval_split, epochs, learning_rate, balanced):
    """The reference's classification/train_cls.py, restated for one CPU process (no AMP, batch 1),
    on a folder that lists in sorted order: its fc weights after ``epochs`` epochs."""
    import math
    import os
    import random

    random.seed(42)
    torch.manual_seed(42)
    train_files = sorted(os.path.join(root, f) for root, _, files in os.walk(train_folder) for f in files
                         if f.endswith(".npy"))
    random.shuffle(train_files)
    train_files = train_files[math.ceil(len(train_files) * eval_split):]
    label2idx, label2files = {}, {}
    for f in train_files:
        label = os.path.basename(f).split("_")[0]
        label2idx.setdefault(label, len(label2idx))
        label2files.setdefault(label, []).append(f)

    def epoch_files():  # BalancedTensorDataset._update_epoch_filenames
        fewest = min(len(files) for files in label2files.values())
        drawn = [f for files in label2files.values() for f in random.sample(files, fewest)]
        random.shuffle(drawn)
        return drawn

    files = epoch_files() if balanced else train_files
    fc = torch.nn.Linear(np.load(train_files[0]).squeeze().shape[0], len(label2idx))
    optimizer = torch.optim.AdamW(fc.parameters(), lr=learning_rate)
    for epoch in range(1, epochs + 1):
        generator = torch.Generator()
        generator.manual_seed(0 + epoch)  # DistributedSampler(seed=0).set_epoch(epoch)
        for index in torch.randperm(len(files), generator=generator).tolist():
            x = torch.from_numpy(np.load(files[index]))[None]
            target = torch.tensor([label2idx[os.path.basename(files[index]).split("_")[0]]])
            probabilities = torch.softmax(fc(x.squeeze().unsqueeze(0)), dim=1)
            torch.nn.CrossEntropyLoss()(probabilities, target).backward()
            optimizer.step()
            fc.zero_grad(set_to_none=True)
        if balanced:
            files = epoch_files()  # on_epoch_end
    return label2idx, {f"fc.{key}": value for key, value in fc.state_dict().items()}


@pytest.mark.parametrize("balanced", [False, True], ids=["plain", "balanced"])
def test_training_follows_the_reference_step_for_step(tmp_path, train_cls, capsys, balanced):
    # Same files, same split, same class numbering, same order of steps: the same weights.
    means = class_means(LABELS, dim=8, separation=0.5, seed=3)
    write_features(tmp_path / "train", means, 14, seed=1, per_position=False)
    for extra in (tmp_path / "train").glob("folk_001?.npy"):
        extra.unlink()  # 10 folk, 14 jazz, 14 rock: balancing draws
    weights = tmp_path / "probe.pth"
    args = ["--train_folder", tmp_path / "train", "--weights", weights, "--num_epochs", "3", "--probe", "clamp3",
            "--learning_rate", "3e-3", "--no_progress"] + (["--balanced_training"] if balanced else [])
    code, out, err = run(train_cls, args, capsys)
    assert code == 0, err
    labels, expected = reference_probe_weights(tmp_path / "train", 0.2, 3, 3e-3, balanced)
    latest = read_checkpoint(weights.with_name("latest_" + weights.name))
    assert latest["labels"] == labels and latest["epoch"] == 3
    assert set(latest["model"]) == set(expected)
    for key in expected:
        torch.testing.assert_close(latest["model"][key], expected[key], rtol=0, atol=1e-7)


def test_balanced_training_draws_the_rarest_label_count(tmp_path):
    from clamp2.probe.data import EpochSampler

    sampler = EpochSampler([0] * 20 + [1] * 5 + [2] * 9, shuffle=True, balanced=True, seed=42)
    order = list(sampler)
    assert len(order) == len(sampler) == 15
    assert sorted(np.bincount([([0] * 20 + [1] * 5 + [2] * 9)[i] for i in order]).tolist()) == [5, 5, 5]


def test_without_probe_the_feature_shape_chooses(tmp_path, train_cls, capsys):
    # CLaMP 3's README: train_cls.py --train_folder <global features> trains its linear probe.
    means = class_means(LABELS, dim=8, separation=0.5, seed=3)
    write_features(tmp_path / "global", means, 6, seed=1, per_position=False)
    write_features(tmp_path / "positions", means, 6, seed=1, per_position=True)
    common = ["--num_epochs", "1", "--learning_rate", "1e-1", "--no_progress"]
    code, out, err = run(train_cls, ["--train_folder", tmp_path / "global", "--weights", tmp_path / "g.pth", *common],
                         capsys)
    assert code == 0, err
    assert "training CLaMP 3's probe (one linear layer); give --probe clamp2 for CLaMP 2's" in out
    assert sorted(read_checkpoint(tmp_path / "g.pth")["model"]) == ["fc.bias", "fc.weight"]
    code, out, err = run(train_cls, ["--train_folder", tmp_path / "positions", "--weights", tmp_path / "p.pth", *common],
                         capsys)
    assert code == 0, err
    assert "CLaMP 3" not in out and "fc1.weight" in read_checkpoint(tmp_path / "p.pth")["model"]
    code, out, err = run(train_cls, ["--train_folder", tmp_path / "global", "--weights", tmp_path / "g2.pth",
                                     "--probe", "clamp2", *common], capsys)
    assert code == 0, err
    assert "fc1.weight" in read_checkpoint(tmp_path / "g2.pth")["model"]


def test_balanced_draws_do_not_depend_on_resuming_or_processes():
    from clamp2.probe.data import EpochSampler

    targets = [0] * 9 + [1] * 4 + [2] * 6
    stepped = EpochSampler(targets, shuffle=True, balanced=True, drawn_before=23)
    orders = []
    for epoch in range(1, 6):
        stepped.set_epoch(epoch)
        orders.append(list(stepped))
    assert orders[0] != orders[1]  # a new draw every epoch
    fresh = EpochSampler(targets, shuffle=True, balanced=True, drawn_before=23)
    fresh.set_epoch(5)  # a run resumed at epoch 5
    assert list(fresh) == orders[4] and list(fresh) == orders[4]
    fresh.set_epoch(3)
    assert list(fresh) == orders[2]
    # two processes: their shares of an epoch are the one draw (padded to an even length as DistributedSampler), interleaved
    shares = []
    for rank in (0, 1):
        sampler = EpochSampler(targets, shuffle=True, balanced=True, drawn_before=23, rank=rank, world_size=2)
        sampler.set_epoch(4)
        shares.append(list(sampler))
    whole = orders[3] + orders[3][:len(orders[3]) % 2]
    assert shares == [whole[0::2], whole[1::2]]


def test_per_position_files_are_rejected_with_a_message(tmp_path, train_cls, capsys):
    means = class_means(LABELS, dim=8, separation=0.5, seed=3)
    write_features(tmp_path / "train", means, 10, seed=1, per_position=True)
    code, out, err = run(train_cls, ["--train_folder", tmp_path / "train", "--weights", tmp_path / "p.pth",
                                     "--num_epochs", "2", *FAST], capsys)
    assert code == 2
    assert "CLaMP 3's linear probe takes one global feature per file" in err
    assert err.strip().splitlines()[-1].startswith("error: none of the 30 feature files can be used")
    assert not (tmp_path / "p.pth").exists()
    # mixed folder: per-position files are listed and left out, the global ones train
    write_features(tmp_path / "train", means, 10, seed=5, per_position=False, start=500)
    code, out, err = run(train_cls, ["--train_folder", tmp_path / "train", "--weights", tmp_path / "p.pth",
                                     "--num_epochs", "2", *FAST], capsys)
    assert code == 1, err
    assert err.count("CLaMP 3's linear probe takes one global feature") == 30


def test_reference_checkpoint_loads_for_inference(tmp_path, inference_cls, capsys):
    """The reference's format: fc.* weights, labels in first-seen order, input_size, no extra fields."""
    means = class_means(LABELS, dim=8, separation=0.5, seed=3)
    paths = write_features(tmp_path / "feats", means, 3, seed=1, per_position=False)
    torch.manual_seed(0)
    model = LinearClassifier(8, 3)
    torch.save({"model": model.state_dict(), "optimizer": {}, "lr_sched": {}, "epoch": 4, "best_epoch": 4,
                "max_eval_acc": 0.5, "labels": {"rock": 0, "folk": 1, "jazz": 2}, "input_size": 8},
               tmp_path / "weights-feats.pth")
    assert isinstance(probe_from_state(torch.load(tmp_path / "weights-feats.pth", weights_only=True)["model"]), LinearClassifier)
    code, out, err = run(inference_cls, [tmp_path / "feats", tmp_path / "o.json", "--weights",
                                         tmp_path / "weights-feats.pth", "--no_progress"], capsys)
    assert code == 0, err
    predicted = json.loads((tmp_path / "o.json").read_text())
    for path in paths:
        x = torch.from_numpy(np.load(path))
        assert predicted[str(path)] == ["rock", "folk", "jazz"][int(model(x).argmax())]
    # The reference's command line (weights first, no --weights) and its file: json.dump's one ASCII line.
    code, _, err = run(inference_cls, [tmp_path / "weights-feats.pth", tmp_path / "feats", tmp_path / "r.json",
                                       "--no_progress"], capsys)
    assert code == 0, err
    assert (tmp_path / "r.json").read_text() == json.dumps(predicted)
    for wrong in ([tmp_path / "feats", tmp_path / "x.json"], [tmp_path / "w.pth", tmp_path / "feats", tmp_path / "x.json",
                                                            "--weights", tmp_path / "w.pth"]):
        with pytest.raises(SystemExit) as info:
            inference_cls.main([str(a) for a in wrong])
        assert info.value.code == 2
    assert "give FEATURES OUTPUT_FILE --weights WEIGHTS, or WEIGHTS FEATURES OUTPUT_FILE" in capsys.readouterr().err


class Killed(BaseException):
    """What a SIGKILL leaves: the process stops where it is, nothing after runs."""


@pytest.mark.parametrize("folds", [0, 2], ids=["hold-out", "2-fold"])
def test_a_run_killed_between_its_last_best_file_and_latest_writes_latest_on_resume(tmp_path, train_cls, capsys,
                                                                                     monkeypatch, folds):
    # The last epoch improved: its best file is saved, then latest_; a kill between the two left no latest_, and
    # the re-run resumed from the best file with no epoch left to train, so latest_ (and its best_model) never came.
    from clamp2.probe import train as probe_train

    means = class_means(LABELS, dim=8, separation=0.5, seed=3)
    write_features(tmp_path / "train", means, 12, seed=1, per_position=False)
    common = ["--train_folder", tmp_path / "train", "--num_epochs", "1", "--balanced_training", "--warmup",
              *FAST] + (["--folds", str(folds)] if folds else [])
    assert run(train_cls, common + ["--weights", tmp_path / "whole.pth"], capsys)[0] == 0
    save = probe_train.save_checkpoint

    def kill_at_latest(path, *args, **kwargs):
        if path.name.startswith("latest_"):
            raise Killed
        return save(path, *args, **kwargs)

    monkeypatch.setattr(probe_train, "save_checkpoint", kill_at_latest)
    with pytest.raises(Killed):
        run(train_cls, common + ["--weights", tmp_path / "part.pth"], capsys)
    monkeypatch.setattr(probe_train, "save_checkpoint", save)
    code, out, err = run(train_cls, common + ["--weights", tmp_path / "part.pth"], capsys)
    assert code == 0, err
    for name in ["_fold1"] if folds else [""]:  # the killed fold (a later one never started, and trains now)
        whole = read_checkpoint(tmp_path / f"latest_whole{name}.pth")
        part = read_checkpoint(tmp_path / f"latest_part{name}.pth")
        assert "stopped before its last latest_; written now" in out
        assert (part["epoch"], part["best_epoch"], part["history"]["eval_acc"]) == (
            whole["epoch"], whole["best_epoch"], whole["history"]["eval_acc"])
        for key in ("model", "best_model"):
            assert all(torch.equal(value, whole[key][k]) for k, value in part[key].items())
        assert part["optimizer"]["state"].keys() == whole["optimizer"]["state"].keys()
        assert all(torch.equal(part["optimizer"]["state"][i]["exp_avg"], whole["optimizer"]["state"][i]["exp_avg"])
                   for i in whole["optimizer"]["state"])
        assert part["lr_sched"] == whole["lr_sched"]
