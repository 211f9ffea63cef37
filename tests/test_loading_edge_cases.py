"""Configuration and weight loading a code-driven mutation audit found untested: setting parsing and typo
checks, derived weights names and paths, offline hub resolution, checkpoint families and keys, text-length
limits, and the collectives and seeding of torch.distributed (real gloo ranks)."""

import os

import pytest

from clamp2.configuration import ConfigError, load_config, parse_value
from conftest import REPO_ROOT

CONFIG = REPO_ROOT / "code" / "config.py"


@pytest.fixture
def clean_env(monkeypatch):
    for name in list(os.environ):
        if name.startswith(("M3_", "CLAMP2_", "CLAMP3_", "PATCH_", "AUDIO_", "MAX_", "TEXT_", "TOKEN_", "RANK",
                            "LOCAL_RANK", "SAVE_EVERY", "EVAL_", "TRAIN_", "LOGIT_", "FREEZE_")):
            monkeypatch.delenv(name)
    return monkeypatch


# an integer setting given a fraction is an error, never silently truncated (PATCH_SIZE=2.5 -> 2).
@pytest.mark.parametrize("raw", ["2.5", "1e2"])
def test_an_integer_setting_refuses_a_fraction(raw):
    with pytest.raises(ConfigError, match="expected an integer"):
        parse_value("PATCH_SIZE", raw, 64)


# a misspelt CLAMP3_ setting is caught like M3_/CLAMP2_ ones (CLAMP3_VARAINT=c2 would silently give saas).
def test_a_misspelt_clamp3_setting_is_an_error(clean_env):
    clean_env.setenv("CLAMP3_VARAINT", "c2")
    with pytest.raises(ConfigError, match=r"CLAMP3_VARAINT \(did you mean CLAMP3_VARIANT\?\)"):
        load_config(CONFIG, report=False)


# every CLaMP 3 name part follows its own setting (the defaults of MAX_TEXT_LENGTH and
# MAX_AUDIO_LENGTH are both 128, so only an override tells them apart); a warm-up is named.
def test_clamp3_weights_name_follows_each_override(clean_env):
    clean_env.setenv("MAX_AUDIO_LENGTH", "64")
    clean_env.setenv("CLAMP3_WARMUP_STEPS", "10")
    cfg = load_config(CONFIG, report=False)
    assert cfg.CLAMP3_WEIGHTS_PATH == (
        "weights_clamp3_saas_h_size_768_t_model_FacebookAI_xlm-roberta-base_t_length_128_a_size_768_a_layers_12"
        "_a_length_64_s_size_768_s_layers_12_p_size_64_p_length_512_warmup_10.pth")
    assert cfg.CLAMP3_LOGS_PATH == cfg.CLAMP3_WEIGHTS_PATH.replace("weights", "logs").replace(".pth", ".txt")


# a hidden size the encoders cannot split into 64-wide heads is refused in one line.
def test_a_hidden_size_that_is_not_a_multiple_of_64_is_refused(clean_env):
    clean_env.setenv("M3_HIDDEN_SIZE", "96")
    with pytest.raises(ConfigError, match="M3_HIDDEN_SIZE=96: expected a positive multiple of 64"):
        load_config(CONFIG, report=False)


# an override equal to the default is not reported as an override.
def test_an_override_equal_to_the_default_is_not_reported(clean_env, capsys):
    clean_env.setenv("PATCH_SIZE", "64")
    cfg = load_config(CONFIG)
    assert cfg._OVERRIDES == {}
    assert "config overrides" not in capsys.readouterr().err


# only the main process (RANK 0 and LOCAL_RANK 0) prints the overrides (other node's local rank 0 does not).
def test_overrides_are_printed_by_the_main_process_only(clean_env, capsys):
    clean_env.setenv("PATCH_NUM_LAYERS", "2")
    clean_env.setenv("RANK", "2")
    clean_env.setenv("LOCAL_RANK", "0")
    load_config(CONFIG)
    assert capsys.readouterr().err == ""


# EVAL_SPLIT=0 (no held-out split) is a valid setting.
def test_eval_split_zero_is_accepted(clean_env):
    clean_env.setenv("EVAL_SPLIT", "0")
    assert load_config(CONFIG, report=False).EVAL_SPLIT == 0.0


# the config stored in checkpoints keeps the list settings (the training folders of the run).
def test_config_dict_keeps_list_settings(clean_env):
    from clamp2.configuration import config_dict

    clean_env.setenv("TRAIN_FOLDERS", "data/a,data/b")
    saved = config_dict(load_config(CONFIG, report=False))
    assert saved["TRAIN_FOLDERS"] == ["data/a", "data/b"] and saved["EVAL_FOLDERS"] == []


# every derived path can be overridden on its own (SPEC §1 names the log paths as constants).
def test_every_derived_path_can_be_overridden(clean_env):
    for name, value in {"M3_LOGS_PATH": "runs/m3.log", "CLAMP2_LOGS_PATH": "runs/c2.log",
                        "CLAMP3_LOGS_PATH": "runs/c3.log", "CLAMP3_WEIGHTS_PATH": "runs/w3.pth"}.items():
        clean_env.setenv(name, value)
    cfg = load_config(CONFIG, report=False)
    assert (cfg.M3_LOGS_PATH, cfg.CLAMP2_LOGS_PATH, cfg.CLAMP3_LOGS_PATH) == ("runs/m3.log", "runs/c2.log", "runs/c3.log")
    assert cfg.CLAMP3_WEIGHTS_PATH == "runs/w3.pth"
    clean_env.delenv("CLAMP3_LOGS_PATH")
    assert load_config(CONFIG, report=False).CLAMP3_LOGS_PATH == "runs/w3.txt"


# the M3 file name writes the mask ratio as Python prints it (0.5 -> "mask_0.5", as the reference f-string).
def test_m3_weights_name_writes_values_as_python_prints_them(clean_env):
    clean_env.setenv("M3_MASK_RATIO", "0.5")
    clean_env.setenv("M3_LEARNING_RATE", "0.00002")
    cfg = load_config(CONFIG, report=False)
    assert cfg.M3_WEIGHTS_PATH.endswith("_h_size_768_lr_2e-05_batch_16_mask_0.5.pth")


# the defaults that SPEC's lists leave out but the docs state (docs/training.md: CLAMP2_PAD_TO_LONGEST default 1).
def test_defaults_the_spec_lists_leave_out(clean_env):
    cfg = load_config(CONFIG, report=False)
    assert cfg.CLAMP2_PAD_TO_LONGEST is True
    assert (cfg.M3_WARMUP_STEPS, cfg.CLAMP2_WARMUP_STEPS, cfg.CLAMP3_WARMUP_STEPS) == (0, 0, 0)
    assert (cfg.M3_TRAIN_FOLDERS, cfg.M3_EVAL_FOLDERS, cfg.CLAMP3_TRAIN_JSONL, cfg.CLAMP3_EVAL_JSONL) == ([], [], "", "")


# a size mismatch of a model whose keys name no family (M3's bare patch encoder, as extract_m3 and the API
# load it) is described key by key, never called a checkpoint "of no family".
def test_an_encoder_of_other_sizes_gets_the_key_description(vectors):
    from clamp2.checkpoint import CheckpointError, load_model_weights
    from clamp2.models.m3 import M3Dims, M3PatchEncoder

    encoder = M3PatchEncoder(M3Dims(64, 32, 2, 1, 128))
    with pytest.raises(CheckpointError) as info:
        load_model_weights(encoder, vectors / "tiny_m3.pth", prefix="encoder.")
    message = str(info.value)
    assert "does not fit the model" in message and "shape mismatches" in message
    assert "is not a" not in message


# every spelling of "offline" keeps resolve_weights to the cache, and the message says so
# (not "the hub cannot be reached", which is what a machine without network hears when online).
@pytest.mark.parametrize("name,value", [("HF_HUB_OFFLINE", "1"), ("HF_HUB_OFFLINE", "true"), ("HF_HUB_OFFLINE", "YES"),
                                        ("TRANSFORMERS_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "on")])
def test_offline_settings_keep_hub_ids_to_the_cache(tmp_path, monkeypatch, name, value):
    from clamp2 import hub
    from clamp2.hub import WeightsNotFound, resolve_weights

    for other in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(other, raising=False)
    monkeypatch.setenv(name, value)
    asked = []
    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: asked.append(1) or False)
    (tmp_path / "hub").mkdir()
    with pytest.raises(WeightsNotFound) as info:
        resolve_weights("sander-wood/clamp2", "weights_x.pth", cache_dir=tmp_path / "hub")
    assert "downloads are off (offline)" in str(info.value) and not asked


# the cache folder given (hub_cache_dir) is the one looked in, online as well as offline.
def test_online_resolution_looks_in_the_given_cache_first(tmp_path, monkeypatch, vectors):
    from test_api import fake_hub_cache

    from clamp2 import hub
    from clamp2.hub import resolve_weights

    for other in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(other, raising=False)
    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: False)
    cache = fake_hub_cache(tmp_path / "hub", "someone/weights", {"w.pth": vectors / "tiny_m3.pth"})
    found = resolve_weights("someone/weights", "w.pth", local_files_only=False, cache_dir=cache)
    assert found.name == "w.pth" and "snapshots" in found.parts and str(cache) in str(found)


# the reference's line after loading, word for word (sanderwood/clamp3 code/extract_clamp3.py).
def test_loaded_message_is_the_reference_line():
    from clamp2.checkpoint import loaded_message

    assert loaded_message({"epoch": 7, "min_eval_loss": 0.25}) == \
        "Successfully Loaded CLaMP 3 Checkpoint from Epoch 7 with loss 0.25"
    assert loaded_message({"epoch": 1, "min_eval_loss": 1.0}, "CLaMP 2") == \
        "Successfully Loaded CLaMP 2 Checkpoint from Epoch 1 with loss 1.0"


# a checkpoint of a torch.compile'd model holds the model's own keys (no "_orig_mod." prefix).
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.compile's own import of torch.jit
def test_a_compiled_model_saves_its_own_keys(tmp_path):
    import torch

    from clamp2.checkpoint import read_checkpoint, save_checkpoint, unwrap
    from clamp2.models.m3 import M3Dims, M3Model

    model = M3Model(M3Dims(64, 32, 2, 1, 64))
    compiled = torch.compile(model)
    assert unwrap(compiled) is model
    save_checkpoint(tmp_path / "w.pth", compiled)
    assert list(read_checkpoint(tmp_path / "w.pth")["model"]) == list(model.state_dict())


# a checkpoint without the counters (a bare state dict) resumes with no best loss yet (inf), so the
# next evaluation is an improvement and writes the best file.
def test_counters_of_a_checkpoint_without_them():
    from clamp2.checkpoint import restore_training_state

    assert restore_training_state({}) == {"epoch": 0, "best_epoch": 0, "min_eval_loss": float("inf")}


# XLM-R takes max_position_embeddings - (padding id + 1) tokens (tiny model: 20 - 2 = 18): 18 fits, 19 does not.
def test_max_text_length_is_the_position_table_less_the_offset(vectors):
    from clamp2.text_model import TextModelUnavailable, check_max_text_length, max_text_length

    folder = str(vectors / "tiny_text_model")
    assert max_text_length(folder) == 18
    check_max_text_length(folder, 18)
    with pytest.raises(TextModelUnavailable, match="MAX_TEXT_LENGTH=19 is more than"):
        check_max_text_length(folder, 19)


# CLaMP 3's single-layer probe (fc) is recognised as a probe, and passing it as CLaMP 3 weights says so.
def test_a_clamp3_probe_is_named_as_a_probe():
    import torch

    from clamp2.checkpoint import CLAMP3, PROBE, checkpoint_family, family_mismatch

    state = {"fc.weight": torch.zeros(3, 8), "fc.bias": torch.zeros(3)}
    assert checkpoint_family({"model": state}) == PROBE
    message = family_mismatch(state, CLAMP3, "checkpoint p.pth")
    assert message.startswith("checkpoint p.pth is a linear probe checkpoint; expected a CLaMP 3 checkpoint")
    assert message.endswith("linear probe checkpoints load with music_classification/inference_cls.py")


# a missing "folder/file.pth" is a mistyped path, never a hub repository to look up.
@pytest.mark.parametrize("text", ["runs/weights.pth", "runs/w.PT", "a/b.bin", "a/b.safetensors"])
def test_a_missing_weights_path_is_not_a_hub_id(tmp_path, monkeypatch, text):
    from clamp2.hub import WeightsNotFound, is_hub_id, resolve_weights

    monkeypatch.chdir(tmp_path)
    assert not is_hub_id(text)
    with pytest.raises(WeightsNotFound, match=f"weights file not found: {text}; check the path"):
        resolve_weights(text, "x.pth", local_files_only=True)


# an explicit revision is the one resolved: a revision that is not in the cache is not replaced by main's file.
def test_an_explicit_revision_is_not_replaced_by_main(tmp_path, vectors):
    from test_api import fake_hub_cache

    from clamp2.hub import WeightsNotFound, resolve_weights

    cache = fake_hub_cache(tmp_path / "hub", "someone/weights", {"w.pth": vectors / "tiny_m3.pth"})
    assert resolve_weights("someone/weights", "w.pth", local_files_only=True, cache_dir=cache).name == "w.pth"
    with pytest.raises(WeightsNotFound, match="not in the Hugging Face cache"):
        resolve_weights("someone/weights", "w.pth", revision="v2", local_files_only=True, cache_dir=cache)


# offline, a text model that is not cached is refused without asking the network (no reachability probe,
# no download even when transformers was imported before HF_HUB_OFFLINE was set).
def test_offline_text_model_lookup_never_probes_the_hub(monkeypatch):
    from clamp2 import hub
    from clamp2.text_model import TextModelUnavailable, load_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    asked = []
    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: asked.append(1) or False)
    with pytest.raises(TextModelUnavailable, match="HF_HUB_OFFLINE is set"):
        load_tokenizer("no-such-org/no-such-model")
    assert asked == []


def _collectives_worker(rank, world_size, port, out_dir):
    import json
    from pathlib import Path

    import torch

    from conftest import join_as_rank

    join_as_rank(rank, world_size, port)
    import time

    from clamp2.distributed import (all_gather_rows, all_reduce_mean, all_reduce_sum, distributed_context,
                                    prepare_end_barrier, wait_for_all_processes)

    with distributed_context(device="cpu"):
        prepare_end_barrier()
        mean = all_reduce_mean(float(rank), torch.device("cpu"))
        sums = all_reduce_sum([1.0, float(rank)], torch.device("cpu"))
        rows = torch.tensor([[0.0], [1.0]]) if rank == 0 else torch.tensor([[10.0]])
        gathered = all_gather_rows(rows, [2, 1]).flatten().tolist()
        start = time.monotonic()
        if rank == 1:
            time.sleep(1.5)  # the rank whose shard is longer
        wait_for_all_processes()
        waited = time.monotonic() - start >= 1.0
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps({"mean": mean, "sums": sums, "rows": gathered,
                                                                "waited": waited}))


# the collectives of training (eval loss mean over ranks; text/music rows of every rank, padding cut)
# and extraction's end barrier (every rank waits for the slowest).
def test_collectives_over_two_ranks(tmp_path):
    import json

    from conftest import free_port, spawn_ranks

    spawn_ranks(_collectives_worker, (2, free_port(), str(tmp_path)))
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == \
            {"mean": 0.5, "sums": [2.0, 1.0], "rows": [0.0, 1.0, 10.0], "waited": True}


# the device index comes from LOCAL_RANK (rank within the node), not the global RANK.
def test_local_rank_comes_from_local_rank(monkeypatch):
    from clamp2.distributed import setup

    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "1")
    info = setup(device="cpu")
    assert (info.rank, info.local_rank, info.world_size) == (5, 1, 1)


# seeding covers NumPy; deterministic mode turns cuDNN autotuning off and restores the settings.
def test_seeding_and_deterministic_mode():
    import numpy as np
    import torch

    from clamp2.distributed import deterministic_mode, seed_everything

    seed_everything(3)
    first = (np.random.rand(), torch.rand(1).item())
    seed_everything(3)
    assert (np.random.rand(), torch.rand(1).item()) == first
    before = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    with deterministic_mode(True):
        assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == (True, False)
    assert (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) == before
