"""CLaMP 3 training (SPEC_CLAMP3 §17): data rules, frozen parts, stages, resume, 2 processes, learning."""

import json
import math
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from clamp2.checkpoint import read_checkpoint, save_checkpoint
from clamp2.models.clamp3 import AudioDims
from clamp2.models.m3 import M3Dims, M3Model
from clamp2.training.data import (AudioMusic, DataError, clamp3_text_problems, clamp3_training_text,
                                  read_items)
from clamp2.training.loop import make_optimizer
from clamp2.training.tasks import build_clamp3_model, clamp3_m3_weights_names, frozen_modules
from conftest import DATA_DIR, REPO_ROOT, VECTORS, free_port, load_script
from train_corpus3 import corpus3  # noqa: F401  (fixture)

TEXT_MODEL = str(VECTORS / "tiny_text_model")
# The CLaMP 3 vectors' tiny config (tests/data/vectors_clamp3/README.md): tiny_clamp3.pth fits it.
TINY_ENV = {"PATCH_LENGTH": "32", "PATCH_NUM_LAYERS": "2", "TOKEN_NUM_LAYERS": "1", "M3_HIDDEN_SIZE": "64",
            "CLAMP3_HIDDEN_SIZE": "48", "MAX_TEXT_LENGTH": "16", "AUDIO_HIDDEN_SIZE": "64", "AUDIO_NUM_LAYERS": "2",
            "MAX_AUDIO_LENGTH": "4", "CLAMP3_LOAD_M3": "0", "SAVE_EVERY": "1"}
TINY_CLAMP3 = DATA_DIR / "vectors_clamp3" / "tiny_clamp3.pth"
SEP = "</s>"


@pytest.fixture
def tiny_env(monkeypatch, tmp_path):
    for key, value in TINY_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trainers():
    return {"symbolic": load_script("code/train_clamp3_symbolic.py"), "audio": load_script("code/train_clamp3_audio.py")}


def args_for(stage, corpus, *extra, eval_set=True):
    args = ["--train_jsonl", str(corpus / f"{stage}_train.jsonl"), "--text_model", TEXT_MODEL, "--no_progress"]
    return args + (["--eval_jsonl", str(corpus / f"{stage}_eval.jsonl")] if eval_set else []) + list(extra)


def log_losses(path):
    text = path.read_text()
    return ([float(x) for x in re.findall(r"^train_loss: (\S+)$", text, re.M)],
            [float(x) for x in re.findall(r"^eval_loss: (\S+)$", text, re.M)])


def only(folder, pattern):
    found = sorted(folder.glob(pattern))
    assert len(found) == 1, found
    return found[0]


# -- data ------------------------------------------------------------------------------------------------

def test_training_text_translations_or_every_other_field():
    item = {"id": "x1", "language": "en", "title": "Reel", "tags": ["Folk", "", None, "Reel"],
            "analysis": "A reel.\n\nFast.", "translations": {"language": "German", "German": "Ein Reel."},
            "filepaths": ["a.abc"]}
    texts = [clamp3_training_text(item, SEP, random.Random(seed)) for seed in range(300)]
    assert "Ein Reel." in texts  # the translation branch
    other = {"Reel", "Folk", "A reel.", "Fast."}  # never id, language, filepaths, translations; no empty lines
    for text in texts:
        if text != "Ein Reel.":
            parts = text.split(SEP)
            assert set(parts) <= other and len(parts) == len(set(parts)) and all(parts), text
    assert len(set(texts)) > 10
    # No translation text: always the other fields.
    bare = {**item, "translations": {"language": "German", "German": ""}}
    assert all("Ein" not in clamp3_training_text(bare, SEP, random.Random(seed)) for seed in range(50))
    assert clamp3_text_problems({"analysis": " "}) and not clamp3_text_problems(item)


def test_translation_branch_is_taken_with_p_0_5():
    item = {"analysis": "A reel.", "translations": {"language": "German", "German": "Ein Reel."}}
    share = sum(clamp3_training_text(item, SEP, random.Random(seed)) == "Ein Reel." for seed in range(2000)) / 2000
    assert 0.45 < share < 0.55  # standard error 0.011


def test_audio_stage_evaluates_the_first_file_of_a_line(tmp_path):
    from clamp2.text_model import load_tokenizer
    from clamp2.training.data import PairItem, TextMusicDataset

    paths = [tmp_path / "first.npy", tmp_path / "second.npy"]
    for value, path in enumerate(paths, start=1):
        np.save(path, np.full((1, 2, 64), value, np.float32))
    item = PairItem({"analysis": "A reel."}, paths)
    dataset = TextMusicDataset([item], load_tokenizer(TEXT_MODEL), AudioMusic(64, 8), 16, training=False,
                               eval_text=lambda fields: fields["analysis"])
    assert dataset[0]["music_patches"][1:-1, 0].tolist() == [1.0, 1.0]
    training = TextMusicDataset([item], load_tokenizer(TEXT_MODEL), AudioMusic(64, 8), 16, training=True,
                                train_text=clamp3_training_text)
    drawn = set()
    for epoch in range(20):
        training.set_epoch(epoch)
        drawn.add(training[0]["music_patches"][1, 0].item())
    assert drawn == {1.0, 2.0}  # training draws either file


def test_symbolic_stage_removes_unit_length_everywhere_after_the_instrument_removal(tmp_path):
    """SPEC_CLAMP3 §13: every "L:1/8\\n", ABC and MTF alike, in the patchilizer, after the instrument removal;
    CLaMP 2 removes it from .abc files as read (both as their references do)."""
    from clamp2.patchilizer import M3Patchilizer
    from clamp2.training.data import SymbolicMusic

    abc_named_mtf = tmp_path / "tune.mtf"
    abc_named_mtf.write_text("X:1\nL:1/8\nK:C\nV:1 L:1/8\nnm=\"Flute\"\n[V:1]GABc|dedB|\n", encoding="utf-8")
    inline = tmp_path / "inline.abc"
    inline.write_text('X:1\nK:C\nV:1 L:1/8\n nm="Flute"\n[V:1]GABc|dedB|\n', encoding="utf-8")

    class Always(random.Random):  # instrument removal always drawn
        def random(self):
            return 0.0

    def patches(source, path):
        ids = source.load(path, training=True, rng=Always(0))
        return [bytes(row[1:].tolist()).split(b"\x02")[0].decode() for row in ids[1:-1]]

    clamp3, clamp2 = (SymbolicMusic(M3Patchilizer(64, 32), clamp3=flag) for flag in (True, False))
    assert "L:1/8\n" not in patches(clamp3, abc_named_mtf) and "L:1/8\n" in patches(clamp2, abc_named_mtf)
    # "V:1 L:1/8\n nm=...": CLaMP 3 looks for the instrument while the lines are still apart (none on the V:
    # line), then joins them; CLaMP 2 joins them first, and the joined V: line loses its instrument
    assert patches(clamp3, inline)[:3] == ["X:1\n", "K:C\n", 'V:1  nm="Flute"\n']
    assert patches(clamp2, inline)[:3] == ["X:1\n", "K:C\n", "V:1 \n"]


def test_audio_rows_zero_rows_windows_and_padding(tmp_path):
    features = np.arange(1, 7, dtype=np.float32)[None, :, None].repeat(64, axis=2)  # [1, 6, 64]: rows 1..6
    np.save(tmp_path / "a.npy", features)
    music = AudioMusic(64, 4)
    rows = music.load(tmp_path / "a.npy", training=False, rng=random.Random(0))
    assert rows[:, 0].tolist() == [0, 1, 2, 3]  # zero row + segments + zero row = 8 rows; eval: the head
    windows = {tuple(music.load(tmp_path / "a.npy", True, random.Random(seed))[:, 0].tolist()) for seed in range(60)}
    # head, tail (ends in the closing zero row) and middle windows starting at 1..4
    assert windows == {(0, 1, 2, 3), (1, 2, 3, 4), (2, 3, 4, 5), (3, 4, 5, 6), (4, 5, 6, 0)}
    # float16 and integers are read as float32, as the reference's torch.cat with float32 zero rows promotes them.
    np.save(tmp_path / "half.npy", features.astype(np.float16))
    assert music.check(tmp_path / "half.npy") is None
    half = music.load(tmp_path / "half.npy", training=False, rng=random.Random(0))
    assert half.dtype == torch.float32 and torch.equal(half, rows)
    np.save(tmp_path / "short.npy", features[:, :1])
    short = music.load(tmp_path / "short.npy", training=True, rng=random.Random(0))
    assert short[:, 0].tolist() == [0, 1, 0]
    from clamp2.training.data import TextMusicCollator

    batch = TextMusicCollator(1, 16, 4, 64, pad_to_longest=False, music_pad=0.0)(
        [{"text_ids": torch.tensor([0, 5, 2]), "music_patches": short}, {"text_ids": torch.tensor([0, 2]),
                                                                         "music_patches": rows}])
    assert batch["music_inputs"].shape == (2, 4, 64) and batch["music_inputs"].dtype == torch.float32
    assert batch["music_masks"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]] and batch["music_inputs"][0, 3].abs().sum() == 0


@pytest.mark.parametrize("array, message", [
    (np.zeros((13, 5, 64), np.float32), "array shape [13, 5, 64]: expected [1, n, 64], the mean over MERT's layers"),
    (np.zeros((1, 5, 32), np.float32), "last dimension 32, but the audio encoder takes 64-wide MERT features"),
    (np.zeros((1, 5, 64), np.float64), "float64 array: MERT features are float32"),
    (None, "missing file"),
])
def test_bad_audio_files_fail_in_one_line(tmp_path, tiny_env, trainers, capsys, array, message):
    if array is not None:
        np.save(tmp_path / "bad.npy", array)
    line = {"analysis": "A tune.", "filepaths": ["bad.npy"]}
    (tmp_path / "pairs.jsonl").write_text(json.dumps(line) + "\n")
    with pytest.raises(DataError) as error:
        read_items(tmp_path / "pairs.jsonl", clamp3_text_problems, AudioMusic(64, 4))
    assert message in str(error.value) and "\n" not in str(error.value)
    assert trainers["audio"].main(["--train_jsonl", str(tmp_path / "pairs.jsonl"), "--text_model", TEXT_MODEL]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith("error: ") and message in errors[0]


def test_audio_features_with_nan_fail_when_read_for_a_step(tmp_path):
    # The check before training reads headers only; the values are checked when a step reads the file (a NaN
    # there made the loss NaN from that step on).
    import random

    rows = np.zeros((1, 5, 64), np.float32)
    rows[0, 2, 7] = np.nan
    np.save(tmp_path / "damaged.npy", rows)
    audio = AudioMusic(64, 4)
    assert audio.check(tmp_path / "damaged.npy") is None
    with pytest.raises(DataError, match=r"damaged.npy: 1 of its 320 values are NaN or infinite"):
        audio.load(tmp_path / "damaged.npy", True, random.Random(0))


def test_training_lines_need_analysis_only_without_text_dropout(tiny_env, corpus3, tmp_path):  # noqa: F811
    # The reference reads `analysis` for evaluation (and for training without TEXT_DROPOUT) only.
    from types import SimpleNamespace

    from clamp2.training.tasks import clamp3_task

    lines = [json.loads(line) for line in (corpus3 / "symbolic_train.jsonl").read_text().splitlines()]
    for item in lines[::2]:
        del item["analysis"]
    jsonl = corpus3 / "no_analysis.jsonl"  # beside the corpus: its filepaths are relative to this folder
    jsonl.write_text("".join(json.dumps(item) + "\n" for item in lines))
    sizes = dict(TEXT_MODEL_NAME=TEXT_MODEL, PATCH_SIZE=64, PATCH_LENGTH=32, MAX_TEXT_LENGTH=16, EVAL_SPLIT=0.2,
                 AUDIO_HIDDEN_SIZE=64, AUDIO_NUM_LAYERS=2, MAX_AUDIO_LENGTH=4, M3_HIDDEN_SIZE=64, PATCH_NUM_LAYERS=2,
                 TOKEN_NUM_LAYERS=1, CLAMP3_HIDDEN_SIZE=48, FREEZE_TEXT=False, CLAMP3_LOAD_M3=False, LOGIT_SCALE=1.0)
    quiet = dict(log=lambda message: None)
    task = clamp3_task(SimpleNamespace(**sizes, TEXT_DROPOUT=True), "symbolic", str(jsonl), **quiet)
    held_out = [item.fields for item in task.eval_set.items]
    assert held_out and all("analysis" in fields for fields in held_out)  # only lines with an eval text
    assert len(task.train_set.items) + len(held_out) == len(lines)
    with pytest.raises(DataError, match="no 'analysis' text"):
        clamp3_task(SimpleNamespace(**sizes, TEXT_DROPOUT=False), "symbolic", str(jsonl), **quiet)


def test_a_training_set_smaller_than_one_global_batch(tiny_env, corpus3, trainers, capsys):  # noqa: F811
    assert trainers["symbolic"].main(args_for("symbolic", corpus3, "--batch_size", "200")) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "fewer than one global batch of 200" in errors[0]


# -- model: frozen parts, M3 start -----------------------------------------------------------------------

def test_each_stage_freezes_the_other_modality_and_optionally_the_text():
    dims, audio = M3Dims(64, 32, 2, 1, 64), AudioDims(64, 2, 4)
    for modality, freeze_text in (("symbolic", False), ("audio", False), ("audio", True)):
        frozen = frozen_modules(modality, freeze_text)
        model = build_clamp3_model(TEXT_MODEL, dims, audio, 48, frozen, log=lambda message: None)
        optimized = {id(p) for group in make_optimizer(model, 1e-4).param_groups for p in group["params"]}
        for name, module in model.named_children():
            trained = all(id(p) in optimized for p in module.parameters())
            assert trained == (name not in frozen) and all(p.requires_grad == trained for p in module.parameters())
        model.train()  # frozen modules still run in training mode (dropout), as the reference
        assert all(module.training for module in model.modules())
    assert frozen_modules("symbolic", True) == ("audio_model", "audio_proj", "text_model", "text_proj")


def test_frozen_modules_run_in_training_mode_in_the_loop(tiny_env, tmp_path, corpus3, trainers, monkeypatch):  # noqa: F811
    """The reference calls model.train() on the whole model: a frozen text encoder still drops out."""
    from clamp2.training import loop

    modes = []
    train_step = loop.train_step

    def recording_step(model, *args, **kwargs):
        modes.append({name: module.training for name, module in model.named_modules()})
        return train_step(model, *args, **kwargs)

    monkeypatch.setattr(loop, "train_step", recording_step)
    monkeypatch.setenv("FREEZE_TEXT", "true")
    args = args_for("audio", corpus3, "--batch_size", "8", "--max_steps_per_epoch", "2", "--epochs", "1",
                    "--weights", str(tmp_path / "w.pth"))
    assert trainers["audio"].main(args) == 0
    assert len(modes) == 2 and all(all(step.values()) for step in modes)
    assert {"text_model", "text_proj", "symbolic_model"} <= set(modes[0])


def test_symbolic_encoder_starts_from_an_m3_file_published_name_first(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    class Config:
        M3_HIDDEN_SIZE, TOKEN_NUM_LAYERS, PATCH_NUM_LAYERS, PATCH_SIZE, PATCH_LENGTH = 64, 1, 2, 64, 32
        M3_LEARNING_RATE, M3_BATCH_SIZE, M3_MASK_RATIO = 1e-4, 16, 0.45
        M3_WEIGHTS_PATH = "weights_m3_p_size_64_p_length_32_t_layers_1_p_layers_2_h_size_64_lr_0.0001_batch_16_mask_0.45.pth"

    names = clamp3_m3_weights_names(Config)
    assert names == [Config.M3_WEIGHTS_PATH, "weights_m3_h_size_64_t_layers_1_p_layers_2_p_size_64_p_length_32_lr_"
                                             "0.0001_batch_16_mask_0.45.pth"]
    dims = M3Dims(64, 32, 2, 1, 64)
    for seed, name in ((3, names[1]), (4, names[0])):  # the CLaMP 3 order alone, then both: the published wins
        torch.manual_seed(seed)
        m3 = M3Model(dims)
        save_checkpoint(name, m3, epoch=1)
        notes = []
        model = build_clamp3_model(TEXT_MODEL, dims, AudioDims(64, 2, 4), 48, (), names, log=notes.append)
        assert name in notes[0]
        assert all(torch.equal(a, b) for a, b in zip(model.symbolic_model.state_dict().values(),
                                                     m3.encoder.state_dict().values()))


# -- checkpoints: resume, stages ------------------------------------------------------------------------

def test_killed_and_resumed_audio_stage_equals_uninterrupted(tiny_env, tmp_path, corpus3, trainers):  # noqa: F811
    main = trainers["audio"].main
    common = args_for("audio", corpus3, "--batch_size", "8", "--learning_rate", "1e-3", "--max_steps_per_epoch", "3")
    whole, parts = tmp_path / "whole" / "weights_t.pth", tmp_path / "parts" / "weights_t.pth"
    assert main(common + ["--weights", str(whole), "--epochs", "3"]) == 0
    assert main(common + ["--weights", str(parts), "--epochs", "1"]) == 0
    assert main(common + ["--weights", str(parts), "--epochs", "3"]) == 0
    a, b = read_checkpoint(whole.with_name("latest_weights_t.pth")), read_checkpoint(parts.with_name("latest_weights_t.pth"))
    assert a["epoch"] == b["epoch"] == 3 and a["modality"] == b["modality"] == "audio"
    assert a["min_eval_loss"] == b["min_eval_loss"] and a["lr_sched"] == b["lr_sched"]
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert log_losses(whole.with_name("logs_t.txt")) == log_losses(parts.with_name("logs_t.txt"))
    for epoch in (1, 2, 3):  # SAVE_EVERY=1: a copy per epoch
        assert read_checkpoint(whole.with_name(f"weights_t_{epoch}.pth"))["epoch"] == epoch


def test_a_kill_in_the_first_epoch_of_a_new_stage_resumes_that_stage(tiny_env, tmp_path, corpus3, trainers,  # noqa: F811
                                                                     monkeypatch):
    # The audio stage's first epoch killed right after its latest_ was saved. Before (best file first, then
    # latest_): the best file already held the audio epoch while latest_ still held the symbolic stage, so the
    # resume "switched stage" again, from the audio stage's own epoch-1 weights with a fresh optimizer, and the
    # symbolic stage's weights were gone. Now the resume continues the audio stage as an uninterrupted run does.
    from clamp2.training import loop

    common = ["--batch_size", "8", "--learning_rate", "1e-3", "--max_steps_per_epoch", "3"]
    whole, parts = tmp_path / "whole" / "weights_t.pth", tmp_path / "parts" / "weights_t.pth"
    for weights in (whole, parts):
        assert trainers["symbolic"].main(args_for("symbolic", corpus3, *common, "--weights", str(weights),
                                                  "--epochs", "1")) == 0
    audio = args_for("audio", corpus3, *common, "--overwrite_epoch_files", "--epochs", "2")
    assert trainers["audio"].main(audio + ["--weights", str(whole)]) == 0
    owed = loop.epoch_files_owed

    def killed(settings, epoch, best, save_every=None):
        if save_every is None:  # the epoch's own saves (a resume's catch-up passes the writer's save_every)
            raise KeyboardInterrupt  # stands for SIGKILL here: nothing after this line of the epoch runs
        return owed(settings, epoch, best, save_every)

    monkeypatch.setattr(loop, "epoch_files_owed", killed)
    with pytest.raises(KeyboardInterrupt):
        trainers["audio"].main(audio + ["--weights", str(parts)])
    monkeypatch.setattr(loop, "epoch_files_owed", owed)
    assert read_checkpoint(parts)["modality"] == "symbolic"
    assert read_checkpoint(parts.with_name("latest_weights_t.pth"))["modality"] == "audio"
    assert trainers["audio"].main(audio + ["--weights", str(parts)]) == 0
    a, b = read_checkpoint(whole.with_name("latest_weights_t.pth")), read_checkpoint(parts.with_name("latest_weights_t.pth"))
    assert a["epoch"] == b["epoch"] == 2 and a["modality"] == b["modality"] == "audio"
    assert a["min_eval_loss"] == b["min_eval_loss"] and a["lr_sched"] == b["lr_sched"]
    assert all(torch.equal(a["model"][key], b["model"][key]) for key in a["model"])
    assert log_losses(whole.with_name("logs_t.txt")) == log_losses(parts.with_name("logs_t.txt"))
    for epoch in (1, 2):
        assert read_checkpoint(parts.with_name(f"weights_t_{epoch}.pth"))["modality"] == "audio"


def test_a_stage_switch_after_a_kill_between_latest_and_the_best_file(tiny_env, tmp_path, corpus3, trainers,  # noqa: F811
                                                                       monkeypatch, capsys):
    # The symbolic stage killed after its last epoch's latest_, before the best file: the audio stage must start
    # from that epoch's weights (the best), as after an uninterrupted symbolic stage; before, it started from the
    # stale best file of the epoch before (found by a review of the save order).
    from clamp2.training import loop

    common = ["--batch_size", "8", "--learning_rate", "1e-3", "--max_steps_per_epoch", "3"]
    whole, parts = tmp_path / "whole" / "weights_t.pth", tmp_path / "parts" / "weights_t.pth"
    symbolic = args_for("symbolic", corpus3, *common, "--epochs", "2")
    assert trainers["symbolic"].main(symbolic + ["--weights", str(whole)]) == 0
    assert read_checkpoint(whole)["epoch"] == 2  # epoch 2 improved: its best file is what the audio stage reads
    owed = loop.epoch_files_owed

    def killed_at_epoch_2(settings, epoch, best, save_every=None):
        if epoch == 2 and save_every is None:  # the epoch's own saves, not a resume's catch-up
            raise KeyboardInterrupt  # stands for SIGKILL
        return owed(settings, epoch, best, save_every)

    monkeypatch.setattr(loop, "epoch_files_owed", killed_at_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        trainers["symbolic"].main(symbolic + ["--weights", str(parts)])
    monkeypatch.setattr(loop, "epoch_files_owed", owed)
    assert read_checkpoint(parts)["epoch"] == 1
    audio = args_for("audio", corpus3, *common, "--overwrite_epoch_files", "--epochs", "1")
    capsys.readouterr()
    for weights in (whole, parts):
        assert trainers["audio"].main(audio + ["--weights", str(weights)]) == 0
    out = capsys.readouterr().out
    assert out.count("was written by the symbolic stage, epoch 2") == 2 and "written now: " in out
    a, b = read_checkpoint(whole), read_checkpoint(parts)
    assert a["modality"] == b["modality"] == "audio"
    assert all(torch.equal(a["model"][key], b["model"][key]) for key in a["model"])
    assert log_losses(whole.with_name("logs_t.txt")) == log_losses(parts.with_name("logs_t.txt"))


def test_a_stage_switch_after_a_complete_stage_owes_nothing_whatever_save_every(tiny_env, tmp_path, corpus3,  # noqa: F811
                                                                                 trainers, capsys):
    # What an epoch owed is judged by the save_every of the run that wrote it: the audio stage's own (2 here) had
    # "caught up" a weights_t_2.pth the symbolic stage (0) never wrote, then refused to start beside it.
    weights = tmp_path / "w" / "weights_t.pth"
    common = ["--batch_size", "8", "--learning_rate", "1e-3", "--max_steps_per_epoch", "3", "--weights", str(weights)]
    assert trainers["symbolic"].main(args_for("symbolic", corpus3, *common, "--epochs", "2", "--save_every", "0")) == 0
    assert read_checkpoint(weights)["training"]["save_every"] == 0
    capsys.readouterr()
    assert trainers["audio"].main(args_for("audio", corpus3, *common, "--epochs", "2", "--save_every", "2")) == 0
    assert "stopped before the rest of its epoch's files" not in capsys.readouterr().out  # nothing was killed
    assert read_checkpoint(weights.with_name("weights_t_2.pth"))["modality"] == "audio"


@pytest.mark.parametrize("stage,cudnn", [("symbolic", True), ("audio", False)])
def test_stage_lets_cudnn_attention_in_as_measured(stage, cudnn, tiny_env, tmp_path, corpus3, trainers,  # noqa: F811
                                                   monkeypatch):
    # bf16/fp16 on CUDA: the symbolic stage's batches keep their shapes as CLaMP 2's; the audio stage's
    # random windows do not.
    from conftest import record_cudnn_attention

    chosen = record_cudnn_attention(monkeypatch)
    args = args_for(stage, corpus3, "--batch_size", "8", "--epochs", "1", "--max_steps_per_epoch", "1",
                    "--weights", str(tmp_path / "weights_t.pth"))
    assert trainers[stage].main(args) == 0
    assert chosen == [cudnn]


def test_published_format_file_starts_a_new_stage(tiny_env, tmp_path, corpus3, trainers, capsys):  # noqa: F811
    # The vectors' tiny CLaMP 3 (modality "audio") and a copy without 'modality': weights only, new stage.
    for name, fields in (("audio_file", {}), ("no_modality", {"drop": True})):
        folder = tmp_path / name
        folder.mkdir()
        checkpoint = torch.load(TINY_CLAMP3, weights_only=True)
        if fields:
            del checkpoint["modality"]
        torch.save(checkpoint, folder / "weights_t.pth")
        args = args_for("symbolic", corpus3, "--batch_size", "8", "--epochs", "1", "--max_steps_per_epoch", "1",
                        "--learning_rate", "0", "--weights", str(folder / "weights_t.pth"))
        assert trainers["symbolic"].main(args) == 0
        out = capsys.readouterr().out
        written = "written by the audio stage" if not fields else "without a 'modality' entry"
        assert f"new symbolic stage: {folder / 'weights_t.pth'} was {written}" in out
        latest = read_checkpoint(folder / "latest_weights_t.pth")
        assert latest["epoch"] == 1 and latest["modality"] == "symbolic"
        assert all(torch.equal(value, checkpoint["model"][key]) for key, value in latest["model"].items())


# -- two processes ---------------------------------------------------------------------------------------

def launch(script, args, cwd, expect=0):
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(TINY_ENV, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(REPO_ROOT / script), *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def test_two_processes_symbolic_then_audio(tiny_env, tmp_path, corpus3, trainers, capsys):  # noqa: F811
    # Learning rate 0: each stage's eval after epoch 1 scores the same weights as one process with the
    # whole global batch of 8 (16 eval pairs: 2 global batches, 4 + 4 per rank, features gathered).
    common = ["--learning_rate", "0", "--epochs", "1", "--max_steps_per_epoch", "2"]
    launch("code/train_clamp3_symbolic.py", args_for("symbolic", corpus3, "--batch_size", "4", *common), tmp_path)
    weights = only(tmp_path, "weights_clamp3_saas_*_p_length_32.pth")
    assert read_checkpoint(weights)["modality"] == "symbolic"
    copy = weights.with_name(weights.stem + "_1.pth")
    before = copy.read_bytes()
    # The audio stage would overwrite the symbolic stage's epoch copy: refused, in one line, nothing written.
    assert trainers["audio"].main(args_for("audio", corpus3, "--batch_size", "8", *common)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "would overwrite" in errors[0] and "--overwrite_epoch_files" in errors[0]
    assert copy.read_bytes() == before
    proc = launch("code/train_clamp3_audio.py",
                  args_for("audio", corpus3, "--batch_size", "4", "--overwrite_epoch_files", *common), tmp_path)
    assert "new audio stage" in proc.stdout and "was written by the symbolic stage" in proc.stdout
    assert "parameters identical on all 2 ranks" in proc.stdout
    audio = read_checkpoint(weights)
    assert audio["modality"] == "audio" and audio["epoch"] == 1 and read_checkpoint(copy)["modality"] == "audio"
    two = log_losses(weights.with_name(weights.name.replace("weights", "logs", 1).replace(".pth", ".txt")))[1]
    assert len(two) == 2  # one epoch per stage, in the shared log

    for stage, loss in zip(("symbolic", "audio"), two):
        folder = tmp_path / f"one_{stage}"
        folder.mkdir()
        os.chdir(folder)
        assert trainers[stage].main(args_for(stage, corpus3, "--batch_size", "8", *common)) == 0
        one = log_losses(only(folder, "logs_*.txt"))[1]
        assert one[0] == pytest.approx(loss, abs=1e-5)
        assert 0.5 * math.log(8) < loss < 1.5 * math.log(8)


def test_two_processes_refused_by_the_run_lock_say_it_once(tiny_env, tmp_path, corpus3):  # noqa: F811
    # A second 2-process run on weights another run holds: the refusal rank 0 found was printed by every rank.
    from conftest import run_lock_held

    weights = tmp_path / "w.pth"
    args = args_for("symbolic", corpus3, "--batch_size", "4", "--epochs", "1", "--max_steps_per_epoch", "1",
                    "--weights", str(weights), eval_set=False)
    with run_lock_held(weights):
        proc = launch("code/train_clamp3_symbolic.py", args, tmp_path, expect=1)  # torchrun's 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith("error: another training run writes"), errors
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pth.lock"]


# -- learning --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage", ["symbolic", "audio"])
def test_a_small_run_learns_held_out_pairs(stage, tiny_env, tmp_path, corpus3, trainers, monkeypatch):  # noqa: F811
    # The eval pairs are held out; their texts name the meter, which the music shows (corpus3's docstring).
    monkeypatch.setenv("PATCH_LENGTH", "64")
    monkeypatch.setenv("MAX_AUDIO_LENGTH", "8")
    monkeypatch.setenv("TEXT_DROPOUT", "0")
    monkeypatch.setenv("SAVE_EVERY", "0")
    args = args_for(stage, corpus3, "--batch_size", "8", "--epochs", "8", "--learning_rate", "1e-3",
                    "--weights", str(tmp_path / "weights_t.pth"))
    assert trainers[stage].main(args) == 0
    _, held_out = log_losses(tmp_path / "logs_t.txt")
    assert held_out[0] > 0.85 * math.log(8)
    assert min(held_out) < 0.85 * math.log(8)  # ln 8 = 2.08: chance for eval batches of 8

# -- found by a mutation audit of the training machinery: each fails on a plausible one-line bug --------

def test_a_stage_starts_from_the_best_epoch_of_the_previous_one(tiny_env, tmp_path, corpus3, trainers,  # noqa: F811
                                                                 monkeypatch):
    from clamp2.training import loop
    weights = tmp_path / "weights_t.pth"
    losses = iter([1.0, 2.0])  # symbolic epoch 2 is worse: its best file holds epoch 1
    real = loop.evaluate
    monkeypatch.setattr(loop, "evaluate", lambda *a, **k: next(losses))
    common = ["--batch_size", "8", "--learning_rate", "1e-3", "--max_steps_per_epoch", "2", "--weights", str(weights)]
    assert trainers["symbolic"].main(args_for("symbolic", corpus3, *common, "--epochs", "2", "--save_every", "0")) == 0
    best = read_checkpoint(weights)
    assert best["epoch"] == 1
    monkeypatch.setattr(loop, "evaluate", real)
    audio = args_for("audio", corpus3, "--batch_size", "8", "--learning_rate", "0", "--max_steps_per_epoch", "1",
                     "--weights", str(weights), "--epochs", "1", "--save_every", "0")
    assert trainers["audio"].main(audio) == 0
    started = read_checkpoint(weights.with_name("latest_weights_t.pth"))
    assert started["modality"] == "audio"
    for key in ("text_proj.weight", "symbolic_proj.weight"):  # untouched by the audio stage at rate 0
        assert torch.equal(started["model"][key], best["model"][key]), key


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_an_unreadable_best_file_of_the_earlier_stage_says_rerun_or_delete(damage, tiny_env, tmp_path, corpus3,  # noqa: F811
                                                                            trainers, monkeypatch, capsys):
    # The symbolic stage's last epoch is not its best: the audio stage reads the best file, which is damaged. Its
    # line told to "download or copy it again" (or to "pass a model weights file"), for a file no hub has.
    from clamp2.training import loop
    weights = tmp_path / "weights_t.pth"
    losses = iter([1.0, 2.0])
    real = loop.evaluate
    monkeypatch.setattr(loop, "evaluate", lambda *a, **k: next(losses))
    common = ["--batch_size", "8", "--max_steps_per_epoch", "1", "--weights", str(weights), "--epochs", "2",
              "--save_every", "0"]
    assert trainers["symbolic"].main(args_for("symbolic", corpus3, *common)) == 0
    monkeypatch.setattr(loop, "evaluate", real)
    weights.write_bytes(weights.read_bytes()[:len(weights.read_bytes()) // 2] if damage == "truncated" else b"")
    capsys.readouterr()
    assert trainers["audio"].main(args_for("audio", corpus3, *common)) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and str(weights) in errors[0], errors
    assert "download" not in errors[0] and "pass a model weights file" not in errors[0]
    assert "symbolic stage's best file (epoch 1)" in errors[0] and "re-run the symbolic stage" in errors[0]
    assert f"delete it to start from {weights.with_name('latest_weights_t.pth')} (epoch 2" in errors[0]


def test_a_resume_from_the_best_file_drops_the_log_entries_it_redoes(tiny_env, tmp_path, corpus3, trainers,  # noqa: F811
                                                                      monkeypatch):
    # latest_ deleted by hand: the run resumes from the best file (epoch 2 of 3) and redoes epoch 3. Its log kept
    # the first run's epoch 3 too (Epoch 1, 2, 3, 3); the probe's log was trimmed, the trainers' was not.
    from clamp2.training import loop
    weights = tmp_path / "weights_t.pth"
    losses = iter([1.0, 0.5, 0.7, 0.7])
    monkeypatch.setattr(loop, "evaluate", lambda *a, **k: next(losses))
    common = ["--batch_size", "8", "--max_steps_per_epoch", "1", "--weights", str(weights), "--epochs", "3",
              "--save_every", "0"]
    assert trainers["symbolic"].main(args_for("symbolic", corpus3, *common)) == 0
    whole = (tmp_path / "logs_t.txt").read_text()
    weights.with_name("latest_weights_t.pth").unlink()
    assert trainers["symbolic"].main(args_for("symbolic", corpus3, *common)) == 0
    entries = re.findall(r"^Epoch (\d+)$", (tmp_path / "logs_t.txt").read_text(), re.M)
    assert entries == ["1", "2", "3"]
    # the best file holds epoch 2's whole state: the redone epoch 3 is the first run's, bit for bit
    assert log_losses(tmp_path / "logs_t.txt") == (
        [float(x) for x in re.findall(r"^train_loss: (\S+)$", whole, re.M)],
        [float(x) for x in re.findall(r"^eval_loss: (\S+)$", whole, re.M)])


def test_epoch_copy_temporaries_above_a_lowered_epoch_count_are_removed(tiny_env, tmp_path, corpus3, trainers):  # noqa: F811
    # A run with --epochs 3 killed while writing weights_t_3.pth's temporary, re-run with --epochs 2: the cleanup
    # looked for epoch copies 1..2 only, and the temporary (as large as a checkpoint) stayed.
    from clamp2.files import _temporary_name
    weights = tmp_path / "weights_t.pth"
    common = ["--batch_size", "8", "--max_steps_per_epoch", "1", "--weights", str(weights), "--save_every", "1"]
    assert trainers["symbolic"].main(args_for("symbolic", corpus3, *common, "--epochs", "3")) == 0
    left = tmp_path / os.path.basename(_temporary_name("weights_t_3.pth"))
    left.write_bytes(weights.read_bytes()[:100])
    assert trainers["symbolic"].main(args_for("symbolic", corpus3, *common, "--epochs", "2")) == 0
    assert not left.exists()


def test_another_familys_latest_file_is_refused_before_anything_is_written(tiny_env, tmp_path, corpus3,  # noqa: F811
                                                                          trainers, capsys):
    # A CLaMP 2 checkpoint as latest_ (no best file): the stage switch's catch-up copied it to the best-file path and
    # said "the run that wrote it stopped before the rest of its epoch's files; written now: weights_t.pth" before
    # the family error: a false line, and a second foreign file left. Only a stage's own file can owe stage files.
    weights = tmp_path / "weights_t.pth"
    latest = weights.with_name("latest_weights_t.pth")
    latest.write_bytes((VECTORS / "tiny_clamp2.pth").read_bytes())
    capsys.readouterr()
    args = args_for("audio", corpus3, "--batch_size", "8", "--max_steps_per_epoch", "1", "--epochs", "1",
                    "--weights", str(weights))
    assert trainers["audio"].main(args) == 2
    captured = capsys.readouterr()
    assert "written now" not in captured.out + captured.err
    assert len([line for line in captured.err.splitlines() if line.startswith("error")]) == 1, captured.err
    assert sorted(path.name for path in tmp_path.iterdir() if path.suffix == ".pth") == ["latest_weights_t.pth"]


def test_an_audio_stage_without_any_checkpoint_says_it_starts_from_initial_weights(tiny_env, tmp_path, corpus3,  # noqa: F811
                                                                                 trainers, capsys):
    # No symbolic stage's file at --weights: the audio stage trains from initial weights (the reference does too),
    # its frozen symbolic encoder never trained. It said nothing; now one note line names it and the recipe.
    weights = tmp_path / "weights_t.pth"
    args = args_for("audio", corpus3, "--batch_size", "8", "--max_steps_per_epoch", "1", "--epochs", "1",
                    "--weights", str(weights))
    assert trainers["audio"].main(args) == 0
    notes = [line for line in capsys.readouterr().out.splitlines() if "symbolic stage" in line and "note:" in line]
    assert len(notes) == 1 and "initial weights" in notes[0] and str(weights) in notes[0], notes
    assert read_checkpoint(weights.with_name("latest_weights_t.pth"))["modality"] == "audio"
    # a symbolic stage (no earlier stage to start from) and a resumed audio stage say nothing of the kind
    assert trainers["audio"].main(args + ["--epochs", "2"]) == 0
    assert "initial weights" not in capsys.readouterr().out
    symbolic = args_for("symbolic", corpus3, "--batch_size", "8", "--max_steps_per_epoch", "1", "--epochs", "1",
                        "--weights", str(tmp_path / "s" / "weights_t.pth"))
    (tmp_path / "s").mkdir()
    assert trainers["symbolic"].main(symbolic) == 0
    assert "initial weights" not in capsys.readouterr().out
