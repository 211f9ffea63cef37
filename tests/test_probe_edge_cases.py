"""Linear-probe paths a code-driven mutation audit found untested: report tables and digits, plain accuracy for
the best epoch, the per-file train loss, train_cls defaults, inference output and exit status, class numbering
(first found for hold-out, sorted for k-fold), the k-fold seed, bare [D] features."""

from __future__ import annotations

import pytest

from conftest import run_main as _run


def test_confusion_matrix_rows_are_the_true_classes():
    """report.class_table: rows truth, columns prediction (as its docstring and the PNG's axes say)."""
    from clamp2.probe.report import class_table

    table = class_table([0, 0, 1], [1, 1, 1], ["a", "b"])
    assert table["confusion_matrix"] == [[0, 2], [0, 1]]
    assert table["per_class"]["a"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert table["per_class"]["b"]["precision"] == pytest.approx(1 / 3)


def test_report_txt_has_four_digits():
    from clamp2.probe.report import table_text

    text = table_text([0, 1, 1], [0, 1, 0], ["a", "b"])
    assert "0.6667" in text and "0.5000" in text


def test_epoch_scores_use_plain_accuracy_not_balanced_accuracy():
    """report.scores (eval_acc of the log, best-epoch selection): the reference's correct/total, which differs
    from the mean per-class recall when classes are unbalanced."""
    import numpy as np

    from clamp2.probe.report import scores

    probabilities = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]], dtype=np.float32)
    result = scores(probabilities, [0, 0, 0, 1])
    assert result["accuracy"] == pytest.approx(0.75)  # balanced accuracy would be 0.5
    assert result["macro_f1"] == pytest.approx((6 / 7 + 0) / 2)


def test_train_loss_is_the_mean_over_files_whatever_the_batches():
    """train.train_epoch: with batches of unequal size (2 then 1 file) the epoch loss is the mean of the per-file
    losses, not the mean of the batch means."""
    import numpy as np
    import torch
    from pathlib import Path

    from clamp2.distributed import DistInfo
    from clamp2.probe.data import EpochSampler, FeatureSet, ProbeDataset
    from clamp2.probe.model import LinearProbe, probe_loss
    from clamp2.probe.train import make_loader, train_epoch
    from clamp2.training.loop import Precision

    rng = np.random.default_rng(0)
    features = FeatureSet(arrays=[])
    for index, length in enumerate((3, 3, 3)):
        features.arrays.append(rng.normal(size=(length, 4)).astype(np.float32) * 3)
        features.paths.append(Path(f"c_{index}.npy"))
        features.labels.append("c")
        features.lengths.append(length)
        features.dims.append(4)
        features.kinds.append("per-position")
    targets = [0, 1, 1]
    torch.manual_seed(0)
    model = LinearProbe(4, 2, 8)
    dataset = ProbeDataset(features, [0, 1, 2], targets)
    with torch.no_grad():
        per_file = [float(probe_loss(model(features.features(i)[None]), torch.tensor([t]))) for i, t in enumerate(targets)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    sampler = EpochSampler(targets, shuffle=False)
    loader = make_loader(dataset, sampler, 2, 0, torch.device("cpu"))
    result = train_epoch(model, loader, optimizer, lr_sched, torch.amp.GradScaler("cpu", enabled=False),
                         Precision.choose(torch.device("cpu"), "fp32"), DistInfo())
    assert result["loss"] == pytest.approx(np.mean(per_file), rel=1e-5)
    assert len(set(round(x, 4) for x in per_file)) > 1  # unequal losses: the two means differ


# -- train_cls.py / inference_cls.py end to end (tiny data, one epoch) ------------------------------

FAST = ["--hidden_size", "16", "--learning_rate", "3e-3", "--batch_size", "8", "--no_progress"]


@pytest.fixture(scope="module")
def scripts():
    from conftest import load_script

    return load_script("music_classification/train_cls.py"), load_script("music_classification/inference_cls.py")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, scripts):
    """A probe trained one epoch on folk/jazz/rock features, and a folder of files to classify."""
    from probe_features import class_means, write_features

    root = tmp_path_factory.mktemp("probe")
    means = class_means(["folk", "jazz", "rock"], dim=8, separation=0.35, seed=3)
    write_features(root / "train", means, 10, seed=1)
    write_features(root / "eval", means, 4, seed=2, start=100)
    write_features(root / "unseen", {"blues": means["folk"]}, 1, seed=4, start=200)
    code = scripts[0].main([str(a) for a in ["--train_folders", root / "train", "--eval_folders", root / "eval",
                                               "--weights", root / "probe.pth", "--epochs", "1", *FAST]])
    assert code == 0
    return root


def test_train_cls_defaults_are_the_references(scripts):
    """No early stopping and fp16 AMP (on CUDA) by default, as the reference trains."""
    args = scripts[0].parse_args(["--train_folders", "x"])
    assert args.patience == 0 and args.precision == "fp16" and args.batch_size == 1 and args.epochs == 1000


def test_predictions_json_is_the_references_one_line(trained, scripts, capsys):
    """inference_cls.py writes json.dump(results): one line, no indentation."""
    import json

    output = trained / "pred.json"
    code, _, err = _run(scripts[1], [trained / "eval", output, "--weights", trained / "probe.pth"], capsys)
    assert code == 0, err
    text = output.read_text()
    assert "\n" not in text and text == json.dumps(json.loads(text))
    assert len(json.loads(text)) == 12


def test_unscored_files_make_exit_status_1_and_the_report_goes_beside_the_output(trained, scripts, capsys):
    import shutil

    folder = trained / "mixed"
    shutil.copytree(trained / "eval", folder)
    shutil.copy(next((trained / "unseen").glob("*.npy")), folder)
    output = trained / "mixed.json"
    code, out, err = _run(scripts[1], [folder, output, "--weights", trained / "probe.pth", "--evaluate"], capsys)
    assert code == 1, (out, err)
    assert "not scored" in err and "blues" in err
    assert (trained / "mixed_report" / "metrics.json").is_file()


@pytest.fixture(scope="module")
def two_folders(tmp_path_factory):
    """Training folders whose first-found label order (rock, folk, jazz) is not the sorted one."""
    from probe_features import class_means, write_features

    root = tmp_path_factory.mktemp("two")
    means = class_means(["folk", "jazz", "rock"], dim=8, separation=0.35, seed=3)
    write_features(root / "a", {"rock": means["rock"]}, 6, seed=1)
    write_features(root / "b", {"folk": means["folk"], "jazz": means["jazz"]}, 6, seed=2)
    write_features(root / "eval", {"folk": means["folk"], "jazz": means["jazz"], "rock": means["rock"]}, 2, seed=5,
                   start=100)
    # unequal eval support per class, so a misnamed per-class row shows
    (root / "eval" / "folk_0101.npy").unlink()
    return root


def test_hold_out_report_names_classes_by_their_numbers(two_folders, scripts, capsys, tmp_path):
    """metrics.json classes / per_class follow the checkpoint's label map (first found), not sorted names."""
    import json

    from clamp2.checkpoint import read_checkpoint

    code, _, err = _run(scripts[0], ["--train_folders", two_folders / "a", two_folders / "b", "--eval_folders",
                                     two_folders / "eval", "--weights", tmp_path / "p.pth", "--epochs", "1", *FAST],
                        capsys)
    assert code == 0, err
    labels = read_checkpoint(tmp_path / "p.pth")["labels"]
    assert labels == {"rock": 0, "folk": 1, "jazz": 2}
    metrics = json.loads((tmp_path / "p_report" / "metrics.json").read_text())
    assert metrics["classes"] == ["rock", "folk", "jazz"]
    assert {name: row["support"] for name, row in metrics["eval"]["per_class"].items()} == {
        "rock": 2, "folk": 1, "jazz": 2}


def test_k_fold_numbers_classes_in_sorted_order_and_seeds_the_split(two_folders, scripts, capsys, tmp_path,
                                                                     monkeypatch):
    import json

    import sklearn.model_selection

    from clamp2.checkpoint import read_checkpoint

    seen = []
    real = sklearn.model_selection.StratifiedKFold

    def spy(*args, **kwargs):
        seen.append(kwargs.get("random_state"))
        return real(*args, **kwargs)

    monkeypatch.setattr(sklearn.model_selection, "StratifiedKFold", spy)
    code, _, err = _run(scripts[0], ["--train_folders", two_folders / "a", two_folders / "b", "--weights",
                                     tmp_path / "cv.pth", "--folds", "2", "--epochs", "1", "--seed", "7", *FAST],
                        capsys)
    assert code == 0, err
    assert seen == [7]
    metrics = json.loads((tmp_path / "cv_report" / "metrics.json").read_text())
    assert metrics["classes"] == ["folk", "jazz", "rock"]
    assert read_checkpoint(tmp_path / "cv_fold1.pth")["labels"] == {"folk": 0, "jazz": 1, "rock": 2}


def test_a_bare_vector_feature_chooses_clamp3s_probe(tmp_path):
    """commands.detect_probe: [D] files are global features as [1, D] ones (CLaMP 3's probe takes both)."""
    import numpy as np

    from clamp2.probe.commands import detect_probe

    np.save(tmp_path / "jazz_0.npy", np.zeros(8, np.float32))
    assert detect_probe([tmp_path / "jazz_0.npy"])[0] == "clamp3"
