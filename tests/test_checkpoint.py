"""Checkpoint helper: published dict or bare state dict, strict, weights_only, atomic saves."""

import os
import random

import numpy as np
import pytest
import torch

from clamp2.checkpoint import (CheckpointError, latest_path, load_model_weights, read_checkpoint, save_checkpoint,
                               strip_prefix)
from clamp2.models.m3 import M3Dims, M3Model, M3PatchEncoder

TINY = M3Dims(64, 32, 2, 1, 64)


def fresh(seed):
    torch.manual_seed(seed)
    return M3Model(TINY)


def same_params(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_published_tiny_checkpoint_has_published_fields(vectors):
    ckpt = read_checkpoint(vectors / "tiny_m3.pth")
    assert {"model", "optimizer", "lr_sched", "epoch", "best_epoch", "min_eval_loss"} <= set(ckpt)


def test_save_then_load_dict_format(tmp_path):
    src, dst = fresh(0), fresh(1)
    opt = torch.optim.AdamW(src.parameters(), lr=1e-3)
    path = tmp_path / "w.pth"
    save_checkpoint(path, src, optimizer=opt, epoch=3, best_epoch=2, min_eval_loss=0.5, config={"PATCH_LENGTH": 32})
    assert not same_params(src, dst)
    ckpt = load_model_weights(dst, path)
    assert same_params(src, dst)
    assert ckpt["epoch"] == 3 and ckpt["min_eval_loss"] == 0.5 and ckpt["config"] == {"PATCH_LENGTH": 32}
    assert [p.name for p in tmp_path.iterdir()] == ["w.pth"]  # no temporary file left


def test_bare_state_dict_and_ddp_prefix(tmp_path):
    src, dst = fresh(0), fresh(1)
    torch.save({"module." + k: v for k, v in src.state_dict().items()}, tmp_path / "bare.pth")
    load_model_weights(dst, tmp_path / "bare.pth")
    assert same_params(src, dst)


def test_encoder_entries_of_m3_checkpoint(tmp_path, vectors):
    encoder = M3PatchEncoder(TINY)
    load_model_weights(encoder, vectors / "tiny_m3.pth", prefix="encoder.")
    full = M3Model(TINY)
    load_model_weights(full, vectors / "tiny_m3.pth")
    assert same_params(encoder, full.encoder)


def test_mismatch_names_the_keys(tmp_path):
    src = fresh(0)
    state = src.state_dict()
    state.pop("encoder.patch_embedding.bias")
    state["encoder.extra.weight"] = torch.zeros(1)
    state["decoder.base.lm_head.weight"] = torch.zeros(3, 3)
    torch.save({"model": state}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as info:
        load_model_weights(fresh(1), tmp_path / "bad.pth")
    msg = str(info.value)
    assert "missing keys (1): encoder.patch_embedding.bias" in msg
    assert "unexpected keys (1): encoder.extra.weight" in msg
    assert "decoder.base.lm_head.weight: checkpoint (3, 3) vs model (128, 64)" in msg


def test_missing_file_says_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_model_weights(fresh(0), tmp_path / "weights_clamp2_x.pth")
    assert "sander-wood/clamp2" in str(info.value) and "weights_clamp2_x.pth" in str(info.value)


class Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("mmap", [False, True])
def test_untrusted_pickle_is_refused(tmp_path, capfd, legacy, mmap):
    # The legacy (non-zip) format cannot be memory-mapped: it takes a second torch.load, weights-only too.
    path = tmp_path / "evil.pth"
    torch.save({"model": Payload()}, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        read_checkpoint(path, mmap=mmap)
    assert "pwned" not in capfd.readouterr().out


def test_a_checkpoint_that_is_not_a_dict_is_named(tmp_path):
    path = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match="holds a Tensor, not a dict"):
        read_checkpoint(path)


def test_random_bytes_are_not_called_python_objects(tmp_path):
    # Before: "holds Python objects other than tensors ..." (the weights-only unpickler's failure), as for a pickle.
    path = tmp_path / "noise.pth"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(CheckpointError, match=r"noise.pth: not a PyTorch checkpoint \(its first bytes"):
        read_checkpoint(path)


def test_a_checkpoint_is_on_disk_before_it_is_renamed(tmp_path, monkeypatch):
    # A machine that crashes right after the rename must not leave an empty or short checkpoint under the name.
    import clamp2.files

    events = []
    fsync, replace = os.fsync, clamp2.files._replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), fsync(fd))[1])
    monkeypatch.setattr(clamp2.files, "_replace", lambda tmp, path: (events.append("rename"), replace(tmp, path))[1])
    save_checkpoint(tmp_path / "w.pth", fresh(0), epoch=1)
    assert events == ["fsync", "rename"] and read_checkpoint(tmp_path / "w.pth")["epoch"] == 1
    from clamp2.checkpoint import copy_checkpoint  # the best file and epoch copies too

    copy_checkpoint(tmp_path / "w.pth", tmp_path / "w_1.pth")
    assert events == ["fsync", "rename"] * 2 and read_checkpoint(tmp_path / "w_1.pth")["epoch"] == 1


def test_failed_save_keeps_previous_file(tmp_path):
    path = tmp_path / "w.pth"
    save_checkpoint(path, fresh(0), epoch=1)
    before = path.read_bytes()
    # A lambda cannot be pickled: torch.save fails after it has started writing the archive.
    with pytest.raises(Exception):
        save_checkpoint(path, fresh(1), epoch=2, extra={"unpicklable": lambda: 0})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pth"]


def test_latest_path_and_strip_prefix(tmp_path):
    assert latest_path("runs/a/weights_x.pth").as_posix() == "runs/a/latest_weights_x.pth"
    assert strip_prefix({"module.a": 1, "b": 2}, "module.") == {"a": 1, "b": 2}


def test_legacy_serialization_loads_without_mmap(tmp_path):
    src, dst = fresh(0), fresh(1)
    torch.save({"model": src.state_dict()}, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    load_model_weights(dst, tmp_path / "old.pth")  # mapped loading falls back to reading
    assert same_params(src, dst)


def test_models_built_for_a_strict_load_draw_no_random_weights():
    # Drawing the initial weights cost seconds for the published sizes (8.8 s for XLM-R large on 2 cores) only to
    # be overwritten, and moved torch's global random stream. Buffers no checkpoint holds are built as usual, and
    # another thread building meanwhile still gets its random initial weights (a per-thread torch function mode).
    import threading

    from transformers import AutoModel, XLMRobertaConfig

    from clamp2.checkpoint import without_random_init
    from clamp2.models.mert import MERT_V1_95M_CONFIG, build_mert

    config = XLMRobertaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=64, max_position_embeddings=40)
    mert = dict(MERT_V1_95M_CONFIG, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                conv_dim=[16] * 7, num_conv_pos_embedding_groups=2)
    normal = AutoModel.from_config(config)
    other_thread = {}

    def build_elsewhere():
        other_thread["model"] = M3PatchEncoder(M3Dims(16, 8, 1, 3, 64))

    with without_random_init():
        elsewhere = threading.Thread(target=build_elsewhere)
        elsewhere.start()
        elsewhere.join()
        torch.manual_seed(0)
        state = torch.random.get_rng_state()
        models = [AutoModel.from_config(config), M3PatchEncoder(M3Dims(16, 8, 1, 3, 64)), build_mert(mert)]
    assert torch.equal(torch.random.get_rng_state(), state)
    for model in models:
        assert all(not parameter.any() for parameter in model.parameters() if parameter.dim() > 1)
    for name, buffer in normal.named_buffers():
        assert torch.equal(dict(models[0].named_buffers())[name], buffer), name
    assert any(parameter.any() for parameter in other_thread["model"].parameters() if parameter.dim() > 1)


# -- found by a mutation audit: each fails on a plausible one-line bug the suite missed -----------------


def test_checkpoint_keeps_the_grad_scaler(tmp_path):
    from clamp2.checkpoint import read_checkpoint, restore_training_state, save_checkpoint

    model = torch.nn.Linear(2, 2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    save_checkpoint(tmp_path / "w.pth", model, scaler=scaler, epoch=3)
    checkpoint = read_checkpoint(tmp_path / "w.pth")
    assert checkpoint["scaler"]["scale"] == 1024.0
    fresh = torch.amp.GradScaler("cpu", init_scale=2.0)
    restore_training_state(checkpoint, scaler=fresh)
    assert fresh.get_scale() == 1024.0


def test_resume_prefers_latest_over_best(tmp_path):
    from clamp2.checkpoint import latest_path, resume_source

    best = tmp_path / "weights.pth"
    best.write_bytes(b"best")
    latest_path(best).write_bytes(b"latest")
    assert resume_source(best) == latest_path(best)
    latest_path(best).unlink()
    assert resume_source(best) == best


def test_rng_state_round_trip_covers_numpy():
    from clamp2.checkpoint import capture_rng_state, restore_rng_state

    state = capture_rng_state()
    want = (random.random(), np.random.random(), torch.rand(1).item())
    restore_rng_state(state)
    assert (random.random(), np.random.random(), torch.rand(1).item()) == want


def test_saved_xlmr_keys_follow_the_published_order_and_load_back(tmp_path):
    from transformers import XLMRobertaConfig, XLMRobertaModel

    from clamp2.models.clamp2 import CLaMP2Model

    text = XLMRobertaModel(XLMRobertaConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                            intermediate_size=16, max_position_embeddings=20, type_vocab_size=1,
                                            pad_token_id=1))
    model = CLaMP2Model(text, M3Dims(patch_length=8, patch_num_layers=1, token_num_layers=1, hidden_size=64),
                        hidden_size=8)
    save_checkpoint(tmp_path / "w.pth", model, epoch=1)
    keys = list(read_checkpoint(tmp_path / "w.pth")["model"])
    assert keys[:5] == ["text_model.embeddings." + name for name in (
        "word_embeddings.weight", "position_embeddings.weight", "token_type_embeddings.weight",
        "LayerNorm.weight", "LayerNorm.bias")]  # transformers 4's order, as the published files
    assert sorted(keys) == sorted(model.state_dict())
    load_model_weights(model, tmp_path / "w.pth")  # strict, by key


# a state dict holding both "k" and "module.k" (the reference's strict load: unexpected key) is refused,
# never loaded with whichever of the two comes last.
@pytest.mark.parametrize("extra_first", [False, True])
def test_a_key_with_and_without_the_ddp_prefix_is_refused(tmp_path, extra_first):
    src = fresh(0)
    state = src.state_dict()
    clash = {"module.encoder.patch_embedding.bias": torch.full_like(state["encoder.patch_embedding.bias"], 7.0)}
    state = {**clash, **state} if extra_first else {**state, **clash}
    torch.save({"model": state, "epoch": 1, "min_eval_loss": 1.0}, tmp_path / "both.pth")
    with pytest.raises(CheckpointError,
                       match=r"both.pth.*encoder.patch_embedding.bias.*module.encoder.patch_embedding.bias"):
        load_model_weights(fresh(1), tmp_path / "both.pth")


# a published-format dict whose "model" entry is not a state dict (None) is one CheckpointError naming the
# file, not a TypeError from the family check (the scripts caught neither and printed a traceback).
@pytest.mark.parametrize("model", [None, "weights", [1, 2]])
def test_a_model_entry_that_is_not_a_state_dict_is_named(tmp_path, model):
    torch.save({"model": model, "epoch": 1, "min_eval_loss": 1.0}, tmp_path / "none.pth")
    with pytest.raises(CheckpointError, match=r"none.pth"):
        load_model_weights(fresh(1), tmp_path / "none.pth")


# a state dict entry that is not a tensor is named with the file, not left to torch's multi-line error.
def test_a_value_that_is_not_a_tensor_is_named(tmp_path):
    state = fresh(0).state_dict()
    state["encoder.patch_embedding.bias"] = 3
    torch.save({"model": state, "epoch": 1, "min_eval_loss": 1.0}, tmp_path / "int.pth")
    with pytest.raises(CheckpointError, match=r"int.pth does not fit the model: .*not tensors \(1\): "
                                              r"encoder.patch_embedding.bias \(int\)"):
        load_model_weights(fresh(1), tmp_path / "int.pth")


def test_the_run_lock_is_skipped_with_a_note_where_the_file_system_has_no_locks(tmp_path, monkeypatch, capsys):
    # Lustre mounted without flock answers ENOSYS: every run there would be refused as if another held the lock.
    import errno

    fcntl = pytest.importorskip("fcntl")
    from clamp2.checkpoint import exclusive_run

    def no_locks(fd, operation):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "lockf", no_locks)
    ran = []
    with exclusive_run(tmp_path / "w.pth"):
        ran.append(True)
    assert ran  # the run went on, unguarded
    assert "does not support file locks (Function not implemented)" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_held_run_lock_and_an_unwritable_folder_are_checkpoint_errors(tmp_path):
    pytest.importorskip("fcntl")
    from clamp2.checkpoint import exclusive_run, run_lock_path

    weights = tmp_path / "w.pth"
    with exclusive_run(weights):
        # Record locks belong to the process (and closing any descriptor of the file in it drops them: the lock
        # file is not read here), so the refusal is shown by a child.
        import subprocess
        import sys

        code = ("import sys; from clamp2.checkpoint import exclusive_run, CheckpointError\n"
                "try:\n    exclusive_run(sys.argv[1]).__enter__()\nexcept CheckpointError as e:\n    print(e)")
        done = subprocess.run([sys.executable, "-c", code, str(weights)], capture_output=True, text=True)
        out = done.stdout + done.stderr
        assert f"another training run writes {weights} (pid {os.getpid()} on " in out
    assert not run_lock_path(weights).exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(CheckpointError, match="cannot write beside"):
        exclusive_run(tmp_path / "file" / "w.pth").__enter__()


def test_a_held_run_lock_is_a_start_refusal_said_once(tmp_path):
    # Under torchrun every rank raises the refusal rank 0 found; the trainers printed CheckpointErrors on every rank
    # ("error (rank 0): another training run ...", "error (rank 1): ..."). A StartRefused they say once.
    import re

    from conftest import run_lock_held

    from clamp2.checkpoint import StartRefused, exclusive_run

    weights = tmp_path / "w.pth"
    with run_lock_held(weights) as holder:
        refusal = re.escape(f"another training run writes {weights} (pid {holder.pid} on")
        with pytest.raises(StartRefused, match=refusal):
            exclusive_run(weights).__enter__()
