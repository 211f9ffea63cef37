"""The shared training loop through the trainers' ``main`` (one process): resume, learning, padding, errors."""

import json
import re

import pytest
import torch

from clamp2.checkpoint import read_checkpoint, save_checkpoint
from clamp2.models import CLaMP2Model, M3Dims, M3Model
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


def test_nothing_left_to_do_after_the_last_epoch(tiny_env, tmp_path, corpus, trainers, capsys):  # noqa: F811
    weights = str(tmp_path / "weights_t.pth")
    args = data_args("m3", corpus) + ["--batch_size", "4", "--no_progress", "--weights", weights,
                                      "--epochs", "1", "--max_steps_per_epoch", "2"]
    assert trainers["m3"].main(args) == 0
    before = (tmp_path / "latest_weights_t.pth").read_bytes()
    assert trainers["m3"].main(args) == 0
    assert (tmp_path / "latest_weights_t.pth").read_bytes() == before
    assert "resuming from" in capsys.readouterr().out


def test_m3_learns(tiny_env, tmp_path, corpus, trainers, capsys):  # noqa: F811
    weights = str(tmp_path / "weights_t.pth")
    args = data_args("m3", corpus) + ["--batch_size", "4", "--no_progress", "--weights", weights,
                                      "--epochs", "6", "--learning_rate", "1e-3", "--warmup_steps", "10", "--wandb"]
    assert trainers["m3"].main(args) == 0
    train, held_out = log_losses(tmp_path / "logs_t.txt")
    assert train[-1] < 0.6 * train[0] and held_out[-1] < 0.7 * held_out[0]
    assert "wandb" in capsys.readouterr().err  # asked for, not installed: a note, and training goes on


def test_clamp2_learns(tiny_env, tmp_path, corpus, trainers, monkeypatch):  # noqa: F811
    # Whole pieces fit (64 patches) and texts are fixed (no dropout): 35 pairs can be memorised.
    monkeypatch.setenv("PATCH_LENGTH", "64")
    monkeypatch.setenv("TEXT_DROPOUT", "0")
    pairs = corpus / "pairs.jsonl"
    held_out = corpus / "first8.jsonl"
    held_out.write_text("".join(pairs.read_text().splitlines(keepends=True)[:8]))
    args = ["--train_jsonl", str(pairs), "--eval_jsonl", str(held_out), "--text_model", TEXT_MODEL, "--batch_size",
            "8", "--no_progress", "--weights", str(tmp_path / "weights_t.pth"), "--epochs", "30", "--learning_rate",
            "2e-3", "--warmup_steps", "10"]
    assert trainers["clamp2"].main(args) == 0
    train, _ = log_losses(tmp_path / "logs_t.txt")
    assert train[0] > 2.0  # ln 8 = 2.08: chance level for batches of 8
    assert min(train[-5:]) < 0.65 * train[0]


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
    assert code == 2 and "missing files (2)" in err and "'../escape.abc' is not inside" in err
    assert not (tmp_path / "latest_weights_t.pth").exists()
    code = trainers["m3"].main(["--train_folders", str(tmp_path / "nowhere"), "--no_progress"])
    assert code == 2 and "data folders not found (1)" in capsys.readouterr().err


def test_legacy_launcher_rank_flags(trainers):
    for flags in (["--local_rank", "1"], ["--local-rank=1"]):
        assert trainers["m3"].parse_args(flags).local_rank == 1
        assert trainers["clamp2"].parse_args(flags).local_rank == 1
