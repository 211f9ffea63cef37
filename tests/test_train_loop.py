"""The shared training loop through the trainers' ``main`` (one process): resume, learning, padding, errors."""

import json
import math
import re
import warnings

import pytest
import torch

from clamp2.checkpoint import read_checkpoint, save_checkpoint
from clamp2.models.clamp2 import CLaMP2Model
from clamp2.models.m3 import M3Dims, M3Model
from clamp2.patchilizer import M3Patchilizer
from clamp2.text_model import load_text_model, load_tokenizer
from clamp2.training.data import TextMusicCollator, TextMusicDataset, read_pairs
from clamp2.training.tasks import build_clamp2_model
from conftest import VECTORS, load_script
from train_corpus import corpus, split_jsonl  # noqa: F401  (fixture)

TINY_ENV = {"PATCH_LENGTH": "32", "PATCH_NUM_LAYERS": "1", "TOKEN_NUM_LAYERS": "1", "M3_HIDDEN_SIZE": "64",
            "CLAMP2_HIDDEN_SIZE": "32", "MAX_TEXT_LENGTH": "16", "CLAMP2_LOAD_M3": "0"}
TEXT_MODEL = str(VECTORS / "tiny_text_model")
TINY_DIMS = M3Dims(64, 32, 1, 1, 64)


@pytest.fixture
def tiny_env(monkeypatch, tmp_path):
    for key, value in TINY_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)  # config.py's default file names land here, never in the checkout


@pytest.fixture(autouse=True)
def one_thread():
    # Two cores shared by several jobs: more threads only spin against each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trainers():
    return {"m3": load_script("code/train_m3.py"), "clamp2": load_script("code/train_clamp2.py")}


def data_args(name, corpus):
    if name == "m3":
        return ["--train_folders", str(corpus / "abc"), str(corpus / "mtf"), "--eval_folders", str(corpus / "mtf")]
    train, held_out = split_jsonl(corpus)
    return ["--train_jsonl", str(train), "--eval_jsonl", str(held_out), "--text_model", TEXT_MODEL]


def log_losses(path):
    text = path.read_text()
    return ([float(x) for x in re.findall(r"^train_loss: (\S+)$", text, re.M)],
            [float(x) for x in re.findall(r"^eval_loss: (\S+)$", text, re.M)])


@pytest.mark.parametrize("name", ["m3", "clamp2"])
def test_killed_and_resumed_run_equals_uninterrupted_run(name, tiny_env, tmp_path, corpus, trainers):  # noqa: F811
    main = trainers[name].main
    common = data_args(name, corpus) + ["--batch_size", "4", "--no_progress", "--learning_rate", "1e-3",
                                        "--warmup_steps", "5"]
    whole, parts = tmp_path / "whole" / "weights_t.pth", tmp_path / "parts" / "weights_t.pth"
    assert main(common + ["--weights", str(whole), "--epochs", "3"]) == 0
    # "Killed" after epoch 1: all that survives is what epoch 1 saved; the rerun resumes from latest_.
    assert main(common + ["--weights", str(parts), "--epochs", "1"]) == 0
    assert read_checkpoint(parts.with_name("latest_weights_t.pth"))["epoch"] == 1
    assert main(common + ["--weights", str(parts), "--epochs", "3"]) == 0

    a = read_checkpoint(whole.with_name("latest_weights_t.pth"))
    b = read_checkpoint(parts.with_name("latest_weights_t.pth"))
    assert a["epoch"] == b["epoch"] == 3 and a["best_epoch"] == b["best_epoch"]
    assert a["min_eval_loss"] == b["min_eval_loss"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert a["lr_sched"] == b["lr_sched"]
    for state_a, state_b in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert log_losses(whole.with_name("logs_t.txt")) == log_losses(parts.with_name("logs_t.txt"))
    assert len(log_losses(parts.with_name("logs_t.txt"))[0]) == 3


class Killed(BaseException):
    """What a SIGKILL leaves: the process stops where it is, nothing after runs."""


def test_a_run_killed_after_saving_latest_owes_nothing_once_resumed(tiny_env, tmp_path, corpus, trainers,  # noqa: F811
                                                                    monkeypatch, capsys):
    # An epoch saves latest_ first, then the best file (a copy), then the log entry. Killed in between, the
    # resume starts after that epoch: it must write the best file and the log entry the epoch owed, so the
    # files equal an uninterrupted run's (before, the best file kept epoch 1 for good and the log lost or,
    # with the old order, repeated an entry); and it removes the temporary file a killed save left.
    from clamp2.training import loop

    main = trainers["m3"].main
    common = data_args("m3", corpus) + ["--batch_size", "4", "--no_progress", "--learning_rate", "1e-3"]
    whole, parts = tmp_path / "whole" / "weights_t.pth", tmp_path / "parts" / "weights_t.pth"
    assert main(common + ["--weights", str(whole), "--epochs", "2"]) == 0
    assert read_checkpoint(whole)["epoch"] == 2  # epoch 2 improved: its files include the best file

    owed = loop.epoch_files_owed

    def killed_at_epoch_2(settings, epoch, best, save_every=None):
        if epoch == 2 and save_every is None:  # the epoch's own saves, not a resume's catch-up
            raise Killed
        return owed(settings, epoch, best, save_every)

    monkeypatch.setattr(loop, "epoch_files_owed", killed_at_epoch_2)
    with pytest.raises(Killed):
        main(common + ["--weights", str(parts), "--epochs", "2"])
    monkeypatch.setattr(loop, "epoch_files_owed", owed)
    assert read_checkpoint(parts)["epoch"] == 1 and read_checkpoint(parts.with_name("latest_weights_t.pth"))["epoch"] == 2
    assert len(log_losses(parts.with_name("logs_t.txt"))[0]) == 1
    leftover = parts.with_name(".weights_t.pth.x1.partial")
    leftover.write_bytes(b"half a checkpoint")
    capsys.readouterr()

    assert main(common + ["--weights", str(parts), "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "nothing to do" in out and f"written now: {parts}, " in out
    assert not leftover.exists()
    a, b = read_checkpoint(whole), read_checkpoint(parts)
    assert a["epoch"] == b["epoch"] == 2 and a["min_eval_loss"] == b["min_eval_loss"]
    assert all(torch.equal(a["model"][key], b["model"][key]) for key in a["model"])
    assert log_losses(whole.with_name("logs_t.txt")) == log_losses(parts.with_name("logs_t.txt"))
    assert main(common + ["--weights", str(parts), "--epochs", "2"]) == 0  # owes nothing now: writes nothing
    assert "written now" not in capsys.readouterr().out
    assert len(log_losses(parts.with_name("logs_t.txt"))[0]) == 2


def test_resuming_with_other_settings_names_them_and_a_folder_in_the_way_is_refused_at_once(
        tiny_env, tmp_path, corpus, trainers, monkeypatch, capsys):  # noqa: F811
    # Settings the weights' shapes cannot catch (the mask ratio here) used to resume without a word; a folder
    # where latest_ goes was found only when the first epoch saved, after a whole epoch of training.
    main = trainers["m3"].main
    args = data_args("m3", corpus) + ["--batch_size", "4", "--no_progress", "--max_steps_per_epoch", "1",
                                      "--weights", str(tmp_path / "w.pth")]
    assert main(args + ["--epochs", "1"]) == 0
    monkeypatch.setenv("M3_MASK_RATIO", "0.5")
    capsys.readouterr()
    assert main(args + ["--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "note: this run's settings differ from those" in out and "M3_MASK_RATIO 0.45 there, 0.5 here" in out
    assert "NUM_EPOCH" not in out.split("note:")[1].splitlines()[0]
    (tmp_path / "latest_x.pth").mkdir()
    assert main(data_args("m3", corpus) + ["--batch_size", "4", "--no_progress", "--weights", str(tmp_path / "x.pth"),
                                           "--epochs", "1"]) == 2
    assert "latest_x.pth is a folder, where this run writes a checkpoint file" in capsys.readouterr().err


def test_a_config_record_from_before_flags_is_not_compared():
    # checkpoints of the first week recorded code/config.py's values without the flags: no training data, the
    # default batch size; the run's own values were in "training"
    from clamp2.training.loop import settings_that_differ

    early = {"config": {"TRAIN_FOLDERS": [], "TRAIN_JSONL": "", "M3_BATCH_SIZE": 16},
             "training": {"batch_size": 4}}
    assert settings_that_differ(early, {"TRAIN_FOLDERS": ["abc"], "TRAIN_JSONL": "", "M3_BATCH_SIZE": 4}) == []
    later = {"config": {"TRAIN_FOLDERS": ["abc"], "TRAIN_JSONL": "", "M3_BATCH_SIZE": 16}}
    assert settings_that_differ(later, {"TRAIN_FOLDERS": ["abc"], "TRAIN_JSONL": "", "M3_BATCH_SIZE": 4}) == [
        "M3_BATCH_SIZE 16 there, 4 here"]


def test_ranks_that_see_different_checkpoints_refuse_to_start(monkeypatch, tmp_path):
    # Nodes without a shared weights folder: each rank reads its own latest_ (or none) and they would train apart.
    from clamp2.checkpoint import CheckpointError
    from clamp2.training import loop

    class TwoRanks:
        is_distributed, rank = True, 0

    source = tmp_path / "latest_w.pth"
    for views in ([("latest_w.pth", 3, None), ("latest_w.pth", 3, None)], [("latest_w.pth", 3, None), (None, None, None)]):
        monkeypatch.setattr(loop, "gather_objects", lambda seen, views=views: [seen] + views[1:])
        if views[1] == views[0]:
            loop.same_checkpoint_everywhere(source, {"epoch": 3}, TwoRanks())
        else:
            with pytest.raises(CheckpointError, match=r"rank 0: latest_w.pth \(epoch 3\); rank 1: no checkpoint.*same "
                                                      r"weights folder"):
                loop.same_checkpoint_everywhere(source, {"epoch": 3}, TwoRanks())


def test_an_optimizer_state_that_does_not_fit_names_the_file_and_the_setting(tmp_path):
    # CLaMP 3's FREEZE_TEXT is not in the weights name: toggling it resumes the same latest_, whose optimizer state
    # covers other parameters. Before: torch's ValueError and a traceback naming neither the file nor the cause.
    from types import SimpleNamespace

    from clamp2.checkpoint import CheckpointError
    from clamp2.training import loop

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    written = torch.optim.AdamW(model.parameters())
    checkpoint = {"optimizer": written.state_dict(), "config": {"FREEZE_TEXT": False, "CLAMP3_WEIGHTS_PATH": "a.pth"}}
    settings = SimpleNamespace(config={"FREEZE_TEXT": True, "CLAMP3_WEIGHTS_PATH": "b.pth"})
    fewer = torch.optim.AdamW(model[1].parameters())  # the first layer frozen now
    source = tmp_path / "latest_w.pth"
    with pytest.raises(CheckpointError, match=r"latest_w.pth does not fit this run's trained parameters .*settings "
                                              r"that differ: FREEZE_TEXT False there, True here; resume with"):
        loop.restore_state_of(checkpoint, source, settings, fewer, None, None)
    same = torch.optim.AdamW(model.parameters())
    assert loop.restore_state_of(checkpoint, source, settings, same, None, None)["epoch"] == 0

    def out_of_memory(state):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    same.load_state_dict = out_of_memory  # not a misfit of the checkpoint: it must come through as itself
    with pytest.raises(RuntimeError, match="out of memory"):
        loop.restore_state_of(checkpoint, source, settings, same, None, None)


def test_a_worse_epoch_does_not_overwrite_the_best_weights(tiny_env, tmp_path, corpus, trainers,  # noqa: F811
                                                           monkeypatch):
    # The tiny runs improve every epoch, so "best" and "latest" were never told apart (found by a mutation audit).
    import itertools

    from clamp2.training import loop

    losses = itertools.chain([1.0, 2.0], itertools.repeat(3.0))
    monkeypatch.setattr(loop, "evaluate", lambda *args, **kwargs: next(losses))
    weights = tmp_path / "weights_t.pth"
    args = data_args("m3", corpus) + ["--batch_size", "4", "--no_progress", "--weights", str(weights),
                                      "--epochs", "2", "--max_steps_per_epoch", "1"]
    assert trainers["m3"].main(args) == 0
    assert read_checkpoint(weights)["epoch"] == 1 and read_checkpoint(weights)["min_eval_loss"] == 1.0
    assert read_checkpoint(weights.with_name("latest_weights_t.pth"))["epoch"] == 2


def test_nothing_left_to_do_after_the_last_epoch(tiny_env, tmp_path, corpus, trainers, capsys):  # noqa: F811
    weights = str(tmp_path / "weights_t.pth")
    args = data_args("m3", corpus) + ["--batch_size", "4", "--no_progress", "--weights", weights,
                                      "--epochs", "1", "--max_steps_per_epoch", "2"]
    assert trainers["m3"].main(args) == 0
    before = (tmp_path / "latest_weights_t.pth").read_bytes()
    assert trainers["m3"].main(args) == 0
    assert (tmp_path / "latest_weights_t.pth").read_bytes() == before
    assert "resuming from" in capsys.readouterr().out


def test_m3_learns_with_the_default_settings(tiny_env, tmp_path, corpus, trainers, monkeypatch, capsys):  # noqa: F811
    # config.py's learning rate and schedule (constant 1e-4 from the first step), a small model.
    import sys

    monkeypatch.setenv("M3_HIDDEN_SIZE", "128")
    monkeypatch.setitem(sys.modules, "wandb", None)  # as when the optional extra is not installed
    args = data_args("m3", corpus) + ["--batch_size", "2", "--no_progress", "--epochs", "3", "--wandb"]
    assert trainers["m3"].main(args) == 0
    out, err = capsys.readouterr()
    assert "learning rate 0.0001, constant from the first step" in out
    _, held_out = log_losses(next(tmp_path.glob("logs_m3_*.txt")))
    assert held_out[-1] < 0.8 * math.log(128)  # uniform guessing over 128 characters: 4.85
    assert "wandb" in err  # asked for, not installed: a note, and training goes on


def test_clamp2_learns_at_a_constant_rate(tiny_env, tmp_path, corpus, trainers, monkeypatch):  # noqa: F811
    # Whole pieces fit (64 patches) and texts are fixed (no dropout): 35 pairs can be memorised. The
    # default schedule (constant from the first step) at a rate for a tiny model: config.py's 5e-5
    # takes thousands of steps (the reference's own runs barely leave chance in 30 small epochs).
    monkeypatch.setenv("PATCH_LENGTH", "64")
    monkeypatch.setenv("TEXT_DROPOUT", "0")
    pairs = corpus / "pairs.jsonl"
    held_out = corpus / "first8.jsonl"
    held_out.write_text("".join(pairs.read_text().splitlines(keepends=True)[:8]))
    args = ["--train_jsonl", str(pairs), "--eval_jsonl", str(held_out), "--text_model", TEXT_MODEL, "--batch_size",
            "8", "--no_progress", "--weights", str(tmp_path / "weights_t.pth"), "--epochs", "12", "--learning_rate",
            "2e-3"]
    assert trainers["clamp2"].main(args) == 0
    train, _ = log_losses(tmp_path / "logs_t.txt")
    assert train[0] > 2.0  # ln 8 = 2.08: chance level for batches of 8
    assert min(train[-3:]) < 0.8 * math.log(8)


def test_console_facts_and_a_small_data_set_without_eval_file(tiny_env, tmp_path, corpus, trainers,  # noqa: F811
                                                              capsys):
    # 10 pairs, batches of 8: the 1% split would hold out 1 pair (a contrastive loss needs 2) and two
    # would leave 8: the split says so and training goes on.
    small = corpus / "small.jsonl"
    small.write_text("".join((corpus / "pairs.jsonl").read_text().splitlines(keepends=True)[:10]))
    args = ["--train_jsonl", str(small), "--text_model", TEXT_MODEL, "--batch_size", "8", "--no_progress",
            "--weights", str(tmp_path / "weights_t.pth"), "--epochs", "2"]
    assert trainers["clamp2"].main(args) == 0
    out = capsys.readouterr().out
    assert re.search(r"^clamp2 model: [\d,]+ parameters$", out, re.M)
    assert "no eval JSONL: 2 of 10 items held out for evaluation" in out
    assert "8 training samples, 1 global batches of 8" in out or "8 training samples, 1 global batch" in out
    best_epoch = read_checkpoint(tmp_path / "weights_t.pth")["best_epoch"]
    assert re.search(rf"best eval epoch {best_epoch}, eval loss \d+\.\d+", out)


def test_a_training_set_smaller_than_one_global_batch_names_a_batch_size(tiny_env, tmp_path, corpus,  # noqa: F811
                                                                          trainers, capsys):
    args = ["--train_folders", str(corpus / "mtf"), "--eval_folders", str(corpus / "mtf"), "--batch_size", "8",
            "--no_progress"]
    assert trainers["m3"].main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "6 samples, fewer than one global batch of 8 (8 per process × 1 process)" in errors[0]
    assert "use --batch_size 6 (or M3_BATCH_SIZE=6)" in errors[0]
    assert trainers["m3"].main(args[:-3] + ["--batch_size", "6", "--epochs", "1", "--no_progress"]) == 0


def test_flags_name_files_exactly_as_environment_overrides(tiny_env, tmp_path, corpus, trainers,  # noqa: F811
                                                          monkeypatch):
    settings = {"M3_BATCH_SIZE": ("--batch_size", "4"), "M3_LEARNING_RATE": ("--learning_rate", "2e-4"),
                "M3_WARMUP_STEPS": ("--warmup_steps", "3"), "M3_NUM_EPOCH": ("--epochs", "1")}
    runs = {}
    for how in ("flags", "environment"):
        folder = tmp_path / how
        folder.mkdir()
        monkeypatch.chdir(folder)
        args = data_args("m3", corpus) + ["--no_progress", "--max_steps_per_epoch", "1"]
        with monkeypatch.context() as env:
            for name, (flag, value) in settings.items():
                if how == "flags":
                    args += [flag, value]
                else:
                    env.setenv(name, value)
            assert trainers["m3"].main(args) == 0
        runs[how] = sorted(path.name for path in folder.iterdir())
    assert runs["flags"] == runs["environment"] and len(runs["flags"]) == 3
    assert "_lr_0.0002_batch_4_mask_0.45_warmup_3.pth" in runs["flags"][-1]
    a, b = (read_checkpoint(tmp_path / how / runs[how][-1]) for how in ("flags", "environment"))
    assert a["config"] == b["config"]


def test_clamp2_flags_name_files_exactly_as_environment_overrides(tiny_env, tmp_path, corpus, trainers,  # noqa: F811
                                                                 monkeypatch):
    train, held_out = split_jsonl(corpus)
    settings = {"TRAIN_JSONL": ("--train_jsonl", str(train)), "EVAL_JSONL": ("--eval_jsonl", str(held_out)),
                "TEXT_MODEL_NAME": ("--text_model", TEXT_MODEL), "CLAMP2_BATCH_SIZE": ("--batch_size", "4"),
                "CLAMP2_NUM_EPOCH": ("--epochs", "1"), "CLAMP2_PAD_TO_LONGEST": ("--fixed_padding", None)}
    runs = {}
    for how in ("flags", "environment"):
        folder = tmp_path / how
        folder.mkdir()
        monkeypatch.chdir(folder)
        args = ["--no_progress", "--max_steps_per_epoch", "1"]
        with monkeypatch.context() as env:
            for name, (flag, value) in settings.items():
                if how == "flags":
                    args += [flag] + ([value] if value is not None else [])
                else:
                    env.setenv(name, value if value is not None else "0")
            assert trainers["clamp2"].main(args) == 0
        runs[how] = sorted(path.name for path in folder.iterdir())
    assert runs["flags"] == runs["environment"] and "_batch_4_" in runs["flags"][-1]
    assert "_t_model_" + TEXT_MODEL.replace("/", "_") in runs["flags"][-1]
    a, b = (read_checkpoint(tmp_path / how / runs[how][-1]) for how in ("flags", "environment"))
    assert a["config"] == b["config"] and a["config"]["CLAMP2_PAD_TO_LONGEST"] is False


def reference_checkpoint(model, path, steps=30, learning_rate=1e-4):
    """A checkpoint as the reference trainer writes it: its warm-up scheduler drives a first AdamW,
    a second AdamW (which it then trains with, at the full rate) is saved."""
    from transformers import get_constant_schedule_with_warmup

    first = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    lr_sched = get_constant_schedule_with_warmup(first, num_warmup_steps=1000)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": the reference's own pattern
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(steps):
            for parameter in model.parameters():
                parameter.grad = torch.full_like(parameter, 1e-3)
            optimizer.step()
            lr_sched.step()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "lr_sched": lr_sched.state_dict(),
                "epoch": 1, "best_epoch": 1, "min_eval_loss": 4.0}, path)
    assert lr_sched.get_last_lr()[0] < 4e-6  # what the scheduler believes; the optimizer ran at 1e-4


def test_resuming_a_reference_checkpoint_keeps_its_learning_rate(tiny_env, tmp_path, corpus, trainers,  # noqa: F811
                                                                 capsys):
    weights = tmp_path / "weights_t.pth"
    reference_checkpoint(M3Model(TINY_DIMS), weights)
    args = data_args("m3", corpus) + ["--batch_size", "4", "--no_progress", "--weights", str(weights),
                                      "--epochs", "2", "--max_steps_per_epoch", "2"]
    assert trainers["m3"].main(args) == 0
    out = capsys.readouterr().out
    assert "resuming from" in out and "epoch 1 done" in out
    assert "continuing at the checkpoint's learning rate 0.0001, constant: the rate its optimizer trained with" in out
    latest = read_checkpoint(tmp_path / "latest_weights_t.pth")
    assert latest["epoch"] == 2 and latest["optimizer"]["param_groups"][0]["lr"] == 1e-4
    assert latest["optimizer"]["param_groups"][0]["fused"] is True  # the reference's unfused AdamW state, run fused
    assert latest["lr_sched"]["_last_lr"] == [1e-4] and latest["lr_sched"]["lr_lambdas"] == [{"warmup_steps": 0}]


def test_resuming_mid_warm_up_continues_it(tiny_env, tmp_path, corpus, trainers, capsys):  # noqa: F811
    weights = str(tmp_path / "weights_t.pth")
    common = data_args("m3", corpus) + ["--batch_size", "4", "--no_progress", "--weights", weights,
                                        "--max_steps_per_epoch", "2", "--learning_rate", "1e-3"]
    assert trainers["m3"].main(common + ["--epochs", "1", "--warmup_steps", "10"]) == 0
    assert "learning rate 0.0001, warming up to 0.001 in 10 more steps" in capsys.readouterr().out
    # Resumed without the flag (config.py says 0): the checkpoint's warm-up goes on at step 3 of 10.
    assert trainers["m3"].main(common + ["--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "continuing at the checkpoint's learning rate 0.0003, warming up to 0.001 in 8 more steps" in out
    assert "M3_WARMUP_STEPS 0 apply to fresh runs" in out
    latest = read_checkpoint(tmp_path / "latest_weights_t.pth")
    assert latest["optimizer"]["param_groups"][0]["lr"] == pytest.approx(5e-4)  # step 5 of 10 comes next


def test_eval_loss_of_m3_does_not_depend_on_the_batch_size(tiny_env, tmp_path, corpus, trainers):  # noqa: F811
    # Learning rate 0: the eval after epoch 1 scores the initial model, the same in both runs.
    losses = []
    for batch_size in ("1", "4"):
        weights = tmp_path / batch_size / "weights_t.pth"
        args = data_args("m3", corpus) + ["--batch_size", batch_size, "--no_progress", "--weights", str(weights),
                                          "--epochs", "1", "--max_steps_per_epoch", "1", "--learning_rate", "0"]
        assert trainers["m3"].main(args) == 0
        losses.append(log_losses(weights.with_name("logs_t.txt"))[1][0])
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


def test_padding_to_the_longest_sample_changes_no_number(corpus):  # noqa: F811
    tokenizer = load_tokenizer(TEXT_MODEL)
    items = read_pairs(corpus / "pairs.jsonl", require_non_english=True)
    dataset = TextMusicDataset(items, tokenizer, M3Patchilizer(64, 32), 16, training=False)
    # The six shortest pieces: both padding modes then differ in length.
    samples = sorted((dataset[i] for i in range(len(dataset))), key=lambda s: len(s["music_patches"]))[:6]
    torch.manual_seed(0)
    model = CLaMP2Model(load_text_model(TEXT_MODEL), TINY_DIMS, 32).eval()
    results = []
    for pad_to_longest in (False, True):
        batch = TextMusicCollator(tokenizer.pad_token_id, 16, 32, 64, pad_to_longest)(samples)
        model.zero_grad()
        loss = model(batch["text_inputs"], batch["text_masks"], batch["music_inputs"], batch["music_masks"])
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
                        batch["music_inputs"].shape[1]))
    (fixed_loss, fixed_grads, fixed_len), (short_loss, short_grads, short_len) = results
    assert short_len < fixed_len  # the batch really was shorter
    assert torch.allclose(fixed_loss, short_loss, atol=1e-5)
    assert fixed_grads.keys() == short_grads.keys()
    for name in fixed_grads:
        assert torch.allclose(fixed_grads[name], short_grads[name], atol=1e-5), name


def test_music_encoder_starts_from_an_m3_checkpoint(tmp_path):
    torch.manual_seed(3)
    m3 = M3Model(TINY_DIMS)
    save_checkpoint(tmp_path / "m3.pth", m3, epoch=1)
    torch.manual_seed(4)
    model = build_clamp2_model(TEXT_MODEL, TINY_DIMS, 32, tmp_path / "m3.pth", log=lambda message: None)
    assert all(torch.equal(a, b) for a, b in zip(model.music_model.state_dict().values(),
                                                 m3.encoder.state_dict().values()))
    notes = []
    build_clamp2_model(TEXT_MODEL, TINY_DIMS, 32, tmp_path / "absent.pth", log=notes.append)
    assert "absent.pth does not exist" in notes[0]


def test_bad_data_fails_before_training_with_every_problem(tiny_env, tmp_path, corpus, trainers, capsys):  # noqa: F811
    lines = (corpus / "pairs.jsonl").read_text().splitlines()
    bad = [json.loads(line) for line in lines[:6]]
    bad[1]["filepaths"] = ["abc/gone.abc"]
    bad[2]["filepaths"] = ["mtf/gone.mtf"]
    bad[3]["filepaths"] = ["../escape.abc"]
    jsonl = corpus / "bad_pairs.jsonl"
    jsonl.write_text("".join(json.dumps(item) + "\n" for item in bad))
    code = trainers["clamp2"].main(["--train_jsonl", str(jsonl), "--text_model", TEXT_MODEL, "--no_progress",
                                    "--weights", str(tmp_path / "weights_t.pth")])
    err = capsys.readouterr().err
    assert code == 2 and "missing files (3)" in err and "escape.abc" in err  # ../ is allowed, as the reference's join
    assert not (tmp_path / "latest_weights_t.pth").exists()
    code = trainers["m3"].main(["--train_folders", str(tmp_path / "nowhere"), "--no_progress"])
    assert code == 2 and "data folder not found: " in capsys.readouterr().err


def test_a_missing_eval_source_means_the_split(tiny_env, tmp_path, corpus, trainers, capsys):  # noqa: F811
    # The reference reads a missing eval JSONL or folder (its config templates ship placeholders) as
    # none: the EVAL_SPLIT split, which the log names.
    small = corpus / "small.jsonl"
    small.write_text("".join((corpus / "pairs.jsonl").read_text().splitlines(keepends=True)[:10]))
    code = trainers["clamp2"].main(["--train_jsonl", str(small), "--eval_jsonl", str(tmp_path / "placeholder.jsonl"),
                                    "--text_model", TEXT_MODEL, "--batch_size", "8", "--no_progress", "--epochs", "1",
                                    "--weights", str(tmp_path / "weights_t.pth")])
    out = capsys.readouterr().out
    assert code == 0 and f"EVAL_JSONL {tmp_path / 'placeholder.jsonl'} does not exist, so 2 of 10 items held out" in out
    (tmp_path / "empty.jsonl").write_text("\n \n")
    code = trainers["clamp2"].main(["--train_jsonl", str(small), "--eval_jsonl", str(tmp_path / "empty.jsonl"),
                                    "--text_model", TEXT_MODEL, "--batch_size", "8", "--no_progress", "--epochs", "1",
                                    "--weights", str(tmp_path / "weights_e.pth")])
    out = capsys.readouterr().out
    assert code == 0 and f"EVAL_JSONL {tmp_path / 'empty.jsonl'} is empty, so 2 of 10 items held out" in out
    code = trainers["m3"].main(["--train_folders", str(corpus / "abc"), "--eval_folders", "<YOUR_EVALUATION_DATA_FOLDER>",
                                "--batch_size", "2", "--no_progress", "--epochs", "1",
                                "--weights", str(tmp_path / "weights_m3.pth")])
    out = capsys.readouterr().out
    assert code == 0 and "eval folder <YOUR_EVALUATION_DATA_FOLDER> not found, so 1 of " in out


def test_legacy_launcher_rank_flags(trainers):
    for flags in (["--local_rank", "1"], ["--local-rank=1"]):
        assert trainers["m3"].parse_args(flags).local_rank == 1
        assert trainers["clamp2"].parse_args(flags).local_rank == 1


def test_m3_decoding_in_length_groups_equals_decoding_every_position(corpus):  # noqa: F811
    from clamp2.training.data import M3Dataset, collate_m3
    from clamp2.training.tasks import m3_loss

    files = sorted(corpus.rglob("*.abc")) + sorted(corpus.rglob("*.mtf"))
    dataset = M3Dataset(files, M3Patchilizer(64, 32), 0.45, training=True)
    batch = collate_m3([dataset[i] for i in range(8)])
    torch.manual_seed(0)
    model = M3Model(TINY_DIMS).eval()  # no dropout: both ways see the same numbers
    targets = batch["target_patches"].reshape(8, -1, 64)[batch["selected_indices"].bool()]
    lengths = ((targets != 0) * torch.arange(1, 65)).amax(dim=1)
    assert lengths.max() > 48 and lengths.float().mean() < 32  # several groups, most patches short

    def grads():
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    loss = m3_loss(model, batch)
    loss.backward()
    grouped = grads()
    model.zero_grad()
    features = model.encoder(batch["input_patches"].reshape(8, -1, 64), batch["input_masks"])
    whole_sum, predicted = model.decoder.loss_sum(features[batch["selected_indices"].bool()], targets)
    assert predicted == int((targets[:, 1:] != 0).sum())
    (whole_sum / predicted).backward()
    assert torch.allclose(loss, whole_sum / predicted, atol=1e-6)
    whole = grads()
    assert grouped.keys() == whole.keys()
    for name in whole:
        assert torch.allclose(grouped[name], whole[name], atol=1e-6), name


def test_m3_decodes_in_groups_on_the_cpu_and_on_a_gpu_only_when_asked():
    decoder = M3Model(TINY_DIMS).decoder
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert decoder.decodes_in_groups(cpu) and not decoder.decodes_in_groups(cuda)
    decoder.decode_groups_on_gpu = True  # benchmarks/bench_train.py --m3_decode_groups
    assert decoder.decodes_in_groups(cuda)
    assert not M3Model(TINY_DIMS).decoder.decodes_in_groups(cuda)  # a setting of that model only


def masked_decoder_loss_sum(decoder, features, targets):
    """The reference's decoder loss: GPT-2 under the targets' padding mask, whatever the pads' places."""
    token_embeds = torch.nn.functional.embedding(targets, decoder.base.transformer.wte.weight)
    inputs_embeds = torch.cat((features.unsqueeze(1), token_embeds[:, 1:, :]), dim=1)
    is_pad = targets == 0
    logits = decoder.base(inputs_embeds=inputs_embeds, attention_mask=(~is_pad).long()).logits
    labels = targets[:, 1:].masked_fill(is_pad[:, 1:], -100)
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                             ignore_index=-100, reduction="sum")


def decoder_case(corpus):  # noqa: F811
    """A tiny M3 (eval: no dropout), the selected patches of 4 real tunes, random encoder vectors."""
    from clamp2.training.data import M3Dataset, collate_m3

    dataset = M3Dataset(sorted(corpus.rglob("*.abc")), M3Patchilizer(64, 32), 0.45, training=True)
    batch = collate_m3([dataset[i] for i in range(4)])
    torch.manual_seed(0)
    model = M3Model(TINY_DIMS).eval()
    targets = batch["target_patches"].reshape(4, -1, 64)[batch["selected_indices"].bool()]
    features = torch.randn(len(targets), TINY_DIMS.hidden_size, generator=torch.Generator().manual_seed(1))
    return model.decoder, targets, features.requires_grad_(True)


def assert_equals_the_masked_pass(decoder, features, targets, loss_sum, predicted):
    assert predicted == int((targets[:, 1:] != 0).sum())
    reference = masked_decoder_loss_sum(decoder, features, targets)
    assert torch.allclose(loss_sum, reference, rtol=1e-6, atol=1e-5)
    ours_grad, = torch.autograd.grad(loss_sum, features)
    reference_grad, = torch.autograd.grad(reference, features)
    assert torch.allclose(ours_grad, reference_grad, atol=1e-6)


@pytest.mark.parametrize("inner_nul", [False, True])
def test_m3_decoder_loss_equals_the_padding_masked_pass(corpus, inner_nul):  # noqa: F811
    # Real patches pad only at their end, so the decoder drops the padding mask (causal attention alone
    # gives each predicted position the same keys). A NUL character inside a patch is a pad id that
    # the mask must still hide: then the mask is kept.
    decoder, targets, features = decoder_case(corpus)
    is_pad = targets == 0
    assert bool((is_pad[:, 1:] >= is_pad[:, :-1]).all()) and is_pad.any()  # trailing pads, as real data has
    if inner_nul:
        long_rows = (~is_pad).sum(dim=1) > 8
        assert long_rows.any()
        targets = targets.clone()
        targets[long_rows, 4] = 0
    assert_equals_the_masked_pass(decoder, features, targets, *decoder.loss_sum(features, targets))


def test_m3_grouped_decoding_equals_the_masked_pass_with_one_host_sync(corpus, monkeypatch):  # noqa: F811
    # Length groups (the CPU's way, and a GPU's with decode_groups_on_gpu): one host sync for all groups
    # together on real patches (pads only trail), and a group holding a patch with a NUL inside keeps
    # the padding mask (transformers then reads the mask: its own syncs, in that rare case only).
    decoder, real, features = decoder_case(corpus)
    assert len(((((real != 0) * torch.arange(1, 65)).amax(dim=1) + 15) // 16).unique()) >= 3
    with_nul = real.clone()
    with_nul[(real != 0).sum(dim=1) > 20, 4] = 0  # NULs inside the longer patches only: some groups masked
    for targets in (real, with_nul):
        syncs = []
        for method in ("tolist", "item", "nonzero", "__bool__", "__int__"):
            original = getattr(torch.Tensor, method)
            monkeypatch.setattr(torch.Tensor, method,
                                lambda self, *a, _name=method, _original=original, **k: syncs.append(_name)
                                or _original(self, *a, **k))
        loss_sum, predicted = decoder.grouped_loss_sum(features, targets)
        monkeypatch.undo()
        if targets is real:
            assert syncs == ["tolist"]
        assert_equals_the_masked_pass(decoder, features, targets, loss_sum, predicted)


def test_each_steps_loss_is_read_after_the_next_step_is_queued(tiny_env, tmp_path, corpus, trainers,  # noqa: F811
                                                               monkeypatch):
    # Reading a loss waits for its whole step on a GPU: read once the next step is queued, the device
    # always has a step to run. The epoch's loss is still the mean of every step's.
    from clamp2.training import loop

    events, losses = [], []
    train_step = loop.train_step

    class Unread:
        def __init__(self, loss, index):
            self.loss, self.index = loss, index

        def item(self):
            events.append(("read", self.index))
            return self.loss.item()

    def recording_step(*args, **kwargs):
        index = len(losses)
        events.append(("step", index))
        loss = train_step(*args, **kwargs)
        losses.append(loss.item())
        return Unread(loss, index)

    epoch_losses = []
    train_epoch = loop.train_epoch
    monkeypatch.setattr(loop, "train_step", recording_step)
    monkeypatch.setattr(loop, "train_epoch", lambda *a, **k: epoch_losses.append(train_epoch(*a, **k)) or epoch_losses[-1])
    args = data_args("m3", corpus) + ["--batch_size", "2", "--no_progress", "--epochs", "1",
                                      "--max_steps_per_epoch", "3", "--weights", str(tmp_path / "weights.pth")]
    assert trainers["m3"].main(args) == 0
    assert events == [("step", 0), ("step", 1), ("read", 0), ("step", 2), ("read", 1), ("read", 2)]
    assert epoch_losses == [pytest.approx(sum(losses) / 3, rel=1e-12)]


@pytest.mark.parametrize("name,cudnn", [("m3", False), ("clamp2", True)])
def test_trainer_lets_cudnn_attention_in_as_measured(name, cudnn, tiny_env, tmp_path, corpus, trainers,  # noqa: F811
                                                     monkeypatch):
    # bf16/fp16 on CUDA: CLaMP 2's batches keep their shapes (cuDNN's attention pays), M3's do not.
    from conftest import record_cudnn_attention

    chosen = record_cudnn_attention(monkeypatch)
    args = data_args(name, corpus) + ["--batch_size", "4", "--no_progress", "--epochs", "1",
                                      "--max_steps_per_epoch", "1", "--weights", str(tmp_path / "weights_t.pth")]
    assert trainers[name].main(args) == 0
    assert chosen == [cudnn]


@pytest.mark.parametrize("name", ["m3", "clamp2"])
def test_evaluation_runs_in_float32_when_training_in_bf16(name, tiny_env, tmp_path, corpus, trainers,  # noqa: F811
                                                          monkeypatch):
    # The reference's eval_epoch has no autocast: its eval loss, which picks the best checkpoint, is
    # float32 whatever AMP the steps train with. bf16 autocast on the CPU stands in for CUDA's.
    from clamp2.training import loop

    monkeypatch.setattr(loop.Precision, "choose", classmethod(lambda cls, device, *_: cls(device.type, torch.bfloat16)))
    autocast = {True: [], False: []}  # by model.training: was autocast on where the model computed its outputs

    def recorded(function):
        def call(model, *args, **kwargs):
            autocast[model.training].append(torch.is_autocast_enabled("cpu"))
            return function(model, *args, **kwargs)
        return call

    # What training and evaluation compute through: M3's loss sums, CLaMP 2's text encoder.
    monkeypatch.setattr(M3Model, "reconstruction_sums", recorded(M3Model.reconstruction_sums))
    monkeypatch.setattr(CLaMP2Model, "text_global", recorded(CLaMP2Model.text_global))
    args = data_args(name, corpus) + ["--batch_size", "2", "--no_progress", "--epochs", "1",
                                      "--max_steps_per_epoch", "1", "--weights", str(tmp_path / "weights_t.pth")]
    assert trainers[name].main(args) == 0
    assert autocast[True] and all(autocast[True]), "training did not run under bf16 autocast: the test proves nothing"
    assert autocast[False] and not any(autocast[False])


def test_persistent_workers_draw_each_epoch_as_the_main_process(tiny_env, tmp_path, corpus, trainers):  # noqa: F811
    # Workers live across epochs with their own copy of the data set; the epoch travels with each
    # index, so epoch 2's crops and corruption are epoch 2's, as without workers.
    common = data_args("m3", corpus) + ["--batch_size", "4", "--no_progress", "--epochs", "2",
                                        "--max_steps_per_epoch", "3"]
    inline, workers = tmp_path / "w0" / "weights_t.pth", tmp_path / "w2" / "weights_t.pth"
    assert trainers["m3"].main(common + ["--weights", str(inline), "--num_workers", "0"]) == 0
    assert trainers["m3"].main(common + ["--weights", str(workers), "--num_workers", "2"]) == 0
    assert log_losses(workers.with_name("logs_t.txt")) == log_losses(inline.with_name("logs_t.txt"))


def test_compile_flag_compiles_the_transformers_in_place(tiny_env, tmp_path, corpus, trainers, monkeypatch,  # noqa: F811
                                                         capsys):
    # The eager backend traces as inductor would, without the C++ compilation a CPU test cannot afford.
    import clamp2.training.loop as loop

    original = loop.compile_transformers
    monkeypatch.setattr(loop, "compile_transformers", lambda model: original(model, backend="eager"))
    common = data_args("m3", corpus) + ["--batch_size", "4", "--no_progress", "--epochs", "1",
                                        "--max_steps_per_epoch", "2"]
    plain, compiled = tmp_path / "plain" / "weights_t.pth", tmp_path / "compiled" / "weights_t.pth"
    assert trainers["m3"].main(common + ["--weights", str(plain)]) == 0
    assert trainers["m3"].main(common + ["--weights", str(compiled), "--compile"]) == 0
    assert "compiling encoder.base, decoder.base (torch.compile, dynamic shapes)" in capsys.readouterr().out
    a, b = read_checkpoint(plain), read_checkpoint(compiled)
    assert list(a["model"]) == list(b["model"])  # compiled in place: the checkpoint keys do not change
    (train_a, eval_a), (train_b, eval_b) = log_losses(plain.with_name("logs_t.txt")), log_losses(compiled.with_name(
        "logs_t.txt"))
    assert train_b == pytest.approx(train_a, rel=1e-5) and eval_b == pytest.approx(eval_a, rel=1e-5)


def test_loader_workers_default_to_some_on_cuda_and_none_on_the_cpu(monkeypatch):
    """One worker makes ~300 samples/s at config.py's sizes: a GPU needs several, a CPU run none."""
    import dataclasses

    from clamp2.distributed import DistInfo
    from clamp2.training.arguments import CUDA_LOADER_WORKERS
    from clamp2.training.loop import TrainSettings, training_workers

    fields = {f.name: None for f in dataclasses.fields(TrainSettings) if f.default is dataclasses.MISSING
              and f.default_factory is dataclasses.MISSING}
    settings = TrainSettings(**fields)
    assert settings.num_workers is None
    cpu, cuda = DistInfo(device=torch.device("cpu")), DistInfo(device=torch.device("cuda"))
    monkeypatch.setattr("os.cpu_count", lambda: 64)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert training_workers(settings, cpu) == 0
    assert training_workers(settings, cuda) == CUDA_LOADER_WORKERS == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # 8 ranks share the node's 64 cores: 7 each, one kept free
    assert training_workers(settings, cuda) == 4
    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert training_workers(settings, cuda) == 1
    assert training_workers(dataclasses.replace(settings, num_workers=3), cpu) == 3

# -- found by a mutation audit of the training machinery: each fails on a plausible one-line bug --------

def _run_with_losses(loop, monkeypatch, trainers, corpus, weights, losses, epochs, extra=()):  # noqa: F811
    """M3 runs of one step per epoch whose eval losses are ``losses``."""
    it = iter(losses)
    monkeypatch.setattr(loop, "evaluate", lambda *a, **k: next(it))
    args = data_args("m3", corpus) + ["--batch_size", "4", "--no_progress", "--weights", str(weights),
                                      "--epochs", str(epochs), "--max_steps_per_epoch", "1", *extra]
    assert trainers["m3"].main(args) == 0


def test_a_tie_keeps_the_earlier_best_epoch(tiny_env, tmp_path, corpus, trainers, monkeypatch):  # noqa: F811
    from clamp2.training import loop
    weights = tmp_path / "weights_t.pth"
    _run_with_losses(loop, monkeypatch, trainers, corpus, weights, [1.0, 1.0], 2)
    assert read_checkpoint(weights)["epoch"] == 1


def test_latest_records_the_best_not_the_last_epoch_and_a_resume_keeps_it(tiny_env, tmp_path, corpus, trainers,  # noqa: F811
                                                                           monkeypatch):
    from clamp2.training import loop
    weights = tmp_path / "weights_t.pth"
    _run_with_losses(loop, monkeypatch, trainers, corpus, weights, [1.0, 3.0], 2)
    latest = read_checkpoint(weights.with_name("latest_weights_t.pth"))
    assert latest["best_epoch"] == 1 and latest["min_eval_loss"] == 1.0
    _run_with_losses(loop, monkeypatch, trainers, corpus, weights, [2.0], 3)  # resumed: 2.0 is no better than 1.0
    assert read_checkpoint(weights)["epoch"] == 1


def test_step_k_of_the_warm_up_uses_k_over_w_and_then_the_full_rate(tiny_env, tmp_path, corpus, trainers,  # noqa: F811
                                                                    monkeypatch):
    rates = []
    step = torch.optim.AdamW.step

    def recording(self, *a, **k):
        rates.append(self.param_groups[0]["lr"])
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    args = data_args("m3", corpus) + ["--batch_size", "4", "--no_progress", "--weights", str(tmp_path / "w.pth"),
                                      "--epochs", "1", "--max_steps_per_epoch", "4", "--warmup_steps", "2",
                                      "--learning_rate", "1e-3"]
    assert trainers["m3"].main(args) == 0
    assert rates == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3])


def test_log_entries_are_the_references_exactly(tiny_env, tmp_path, corpus, trainers):  # noqa: F811
    weights = tmp_path / "weights_t.pth"
    args = data_args("m3", corpus) + ["--batch_size", "4", "--no_progress", "--weights", str(weights),
                                      "--epochs", "2", "--max_steps_per_epoch", "1"]
    assert trainers["m3"].main(args) == 0
    text = weights.with_name("logs_t.txt").read_text()
    assert re.fullmatch(r"(Epoch \d+\ntrain_loss: \S+\neval_loss: \S+\ntime: [^\n]+\n\n){2}", text)


def test_clamp2_eval_loss_weights_each_global_batch_by_its_pairs(tiny_env, tmp_path, corpus, trainers,  # noqa: F811
                                                                 monkeypatch):
    # 6 eval pairs, batch 4: global batches of 4 and 2; eval loss = (4 L4 + 2 L2) / 6.
    from clamp2.training import tasks
    seen = []
    real = tasks.contrastive_loss

    def recording(text, music, scale=1.0):
        loss = real(text, music, scale)
        if not torch.is_grad_enabled():
            seen.append((len(text), loss.item()))
        return loss

    monkeypatch.setattr(tasks, "contrastive_loss", recording)
    train, held_out = split_jsonl(corpus, eval_count=6)
    weights = tmp_path / "weights_t.pth"
    args = ["--train_jsonl", str(train), "--eval_jsonl", str(held_out), "--text_model", TEXT_MODEL, "--batch_size",
            "4", "--no_progress", "--weights", str(weights), "--epochs", "1", "--max_steps_per_epoch", "1"]
    assert trainers["clamp2"].main(args) == 0
    assert [n for n, _ in seen] == [4, 2]
    expected = sum(n * loss for n, loss in seen) / 6
    assert read_checkpoint(weights)["min_eval_loss"] == pytest.approx(expected, rel=1e-6)


class Indices(torch.utils.data.Dataset):
    def __len__(self):
        return 23

    def __getitem__(self, index):
        return index


def test_two_ranks_take_the_halves_of_one_process_global_batches():
    from pathlib import Path

    from clamp2.distributed import DistInfo
    from clamp2.training.loop import TrainSettings, TrainTask, make_loaders, set_epoch

    task = TrainTask(build_model=None, train_set=Indices(), eval_set=Indices(), collate_fn=list,
                     compute_loss=None, eval_step=None)

    def batches(batch_size, world_size, rank):
        settings = TrainSettings(name="t", weights_path=Path("w.pth"), logs_path=Path("l.txt"), num_epochs=1,
                                 batch_size=batch_size, learning_rate=0.0, num_workers=0)
        train, _ = make_loaders(task, settings, DistInfo(rank=rank, world_size=world_size), seed=42)
        set_epoch(train, 2)
        return list(train)

    one = batches(6, 1, 0)
    ranks = [batches(3, 2, rank) for rank in range(2)]
    assert [a + b for a, b in zip(*ranks)] == one


def test_no_secret_of_the_environment_reaches_a_checkpoint_or_log(tiny_env, tmp_path, corpus, trainers, monkeypatch,  # noqa: F811
                                                                   capsys):
    # Checkpoints store the run's settings and environment-derived config: never a key.
    secret = "sk-SECRET-wandb-1234567890"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    args = data_args("m3", corpus) + ["--batch_size", "4", "--no_progress", "--weights", str(tmp_path / "w.pth"),
                                      "--epochs", "1", "--max_steps_per_epoch", "1"]
    assert trainers["m3"].main(args) == 0
    out, err = capsys.readouterr()
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert any(path.suffix == ".pth" for path in written)  # torch's zip stores the pickle uncompressed
    assert all(secret.encode() not in path.read_bytes() for path in written) and secret not in out + err


def test_an_unreadable_latest_names_the_best_file_and_no_resume(tiny_env, tmp_path, corpus, trainers,  # noqa: F811
                                                                capsys):
    # A latest_ cut short (a full disk) was answered with the advice for a downloaded file ("download or copy it
    # again"); it is the run's own resume file: delete it to resume from the best file, or --no_resume.
    main = trainers["m3"].main
    common = data_args("m3", corpus) + ["--batch_size", "4", "--no_progress", "--weights", str(tmp_path / "w.pth")]
    assert main(common + ["--epochs", "1"]) == 0
    latest = tmp_path / "latest_w.pth"
    latest.write_bytes(latest.read_bytes()[:1000])
    capsys.readouterr()
    assert main(common + ["--epochs", "2"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and str(latest) in err[0]
    err = err[0]
    assert f"delete it to resume from {tmp_path / 'w.pth'}" in err and "--no_resume" in err and "download" not in err


def test_a_resume_on_other_data_says_so(tiny_env, tmp_path, corpus, trainers, capsys):  # noqa: F811
    # A training or eval set changed between runs resumed without a word: the run is not the uninterrupted one,
    # and the best epoch is chosen by comparing eval losses of two eval sets.
    import shutil

    data = tmp_path / "data"
    for kind in ("abc", "mtf"):
        shutil.copytree(corpus / kind, data / kind)
    main = trainers["m3"].main
    common = ["--train_folders", str(data / "abc"), str(data / "mtf"), "--eval_folders", str(data / "mtf"),
              "--batch_size", "4", "--no_progress", "--weights", str(tmp_path / "w.pth")]
    assert main(common + ["--epochs", "1"]) == 0
    assert main(common + ["--epochs", "2"]) == 0
    assert "other data" not in capsys.readouterr().out
    for path in sorted((data / "abc").glob("*.abc"))[:8]:
        path.unlink()
    assert main(common + ["--epochs", "3"]) == 0
    out = capsys.readouterr().out
    assert f"note: {tmp_path / 'latest_w.pth'} was trained on other data (train 36 samples there, 28 here)" in out
    assert "--no_resume" in out


def test_a_second_run_on_the_same_weights_is_refused_while_the_first_runs(tiny_env, tmp_path, corpus,  # noqa: F811
                                                                          trainers, capsys):
    # Two runs given one weights path (two shells, a job restarted while the first still runs) overwrote each other's
    # latest_ and best files and wrote every epoch's log entry twice, both exiting 0. The first run holds a POSIX
    # record lock on <weights>.lock: the second is refused, naming it; a killed holder's lock is gone with it.
    from conftest import run_lock_held

    weights = tmp_path / "w.pth"
    args = data_args("m3", corpus) + ["--batch_size", "4", "--no_progress", "--epochs", "1", "--weights", str(weights)]
    with run_lock_held(weights) as holder:
        assert trainers["m3"].main(args) == 2
        err = capsys.readouterr().err
        assert "another training run writes" in err and f"pid {holder.pid} on node7" in err, err
        assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pth.lock"]
    assert trainers["m3"].main(args) == 0  # the killed run's lock does not block the next run
    assert weights.is_file() and len(log_losses(tmp_path / "w.txt")[0]) == 1
    assert not (tmp_path / "w.pth.lock").exists()  # removed as the run ended
