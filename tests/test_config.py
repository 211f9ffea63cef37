"""code/config.py: reference names/defaults, typed environment overrides, derived paths."""

import pytest

from clamp2.configuration import ConfigError, config_dict, derived_log_path, load_config, parse_value
from conftest import REPO_ROOT

CONFIG = REPO_ROOT / "code" / "config.py"

SPEC_DEFAULTS = {
    "EVAL_SPLIT": 0.01, "PATCH_SIZE": 64, "PATCH_LENGTH": 512, "PATCH_NUM_LAYERS": 12, "TOKEN_NUM_LAYERS": 3,
    "M3_HIDDEN_SIZE": 768, "M3_NUM_EPOCH": 100, "M3_LEARNING_RATE": 1e-4, "M3_BATCH_SIZE": 16,
    "M3_MASK_RATIO": 0.45, "M3_DETERMINISTIC": True, "M3_LOAD_CKPT": True, "CLAMP2_HIDDEN_SIZE": 768,
    "TEXT_MODEL_NAME": "FacebookAI/xlm-roberta-base", "CLAMP2_NUM_EPOCH": 100, "CLAMP2_LEARNING_RATE": 5e-5,
    "CLAMP2_BATCH_SIZE": 128, "LOGIT_SCALE": 1, "MAX_TEXT_LENGTH": 128, "TEXT_DROPOUT": True,
    "CLAMP2_DETERMINISTIC": True, "CLAMP2_LOAD_M3": True, "CLAMP2_LOAD_CKPT": True,
    "M3_WANDB_LOG": False, "CLAMP2_WANDB_LOG": False,
}

# SPEC_CLAMP3 §12.
SPEC_CLAMP3_DEFAULTS = {
    "CLAMP3_HIDDEN_SIZE": 768, "AUDIO_HIDDEN_SIZE": 768, "AUDIO_NUM_LAYERS": 12, "MAX_AUDIO_LENGTH": 128,
    "CLAMP3_NUM_EPOCH": 100, "CLAMP3_LEARNING_RATE": 1e-5, "CLAMP3_BATCH_SIZE": 256, "FREEZE_TEXT": False,
    "CLAMP3_DETERMINISTIC": True, "CLAMP3_LOAD_M3": True, "CLAMP3_WANDB_LOG": False, "CLAMP3_LOAD_CKPT": True,
    "SAVE_EVERY": 5, "CLAMP3_VARIANT": "saas",
}
PUBLISHED_CLAMP3_SUFFIX = ("_h_size_768_t_model_FacebookAI_xlm-roberta-base_t_length_128_a_size_768_a_layers_12"
                           "_a_length_128_s_size_768_s_layers_12_p_size_64_p_length_512")


@pytest.fixture
def clean_env(monkeypatch):
    import os

    for name in list(os.environ):
        if name in SPEC_DEFAULTS or name in SPEC_CLAMP3_DEFAULTS or name.startswith(("M3_", "CLAMP2_", "CLAMP3_")) \
                or name in ("TRAIN_FOLDERS", "EVAL_FOLDERS"):
            monkeypatch.delenv(name)
    return monkeypatch


def test_defaults_and_published_file_names(clean_env):
    cfg = load_config(CONFIG)
    for name, value in SPEC_DEFAULTS.items():
        assert getattr(cfg, name) == value, name
        assert type(getattr(cfg, name)) is type(value), name
    assert cfg.M3_WEIGHTS_PATH == "weights_m3_p_size_64_p_length_512_t_layers_3_p_layers_12_h_size_768_lr_0.0001_batch_16_mask_0.45.pth"
    assert cfg.CLAMP2_WEIGHTS_PATH == ("weights_clamp2_h_size_768_lr_5e-05_batch_128_scale_1_t_length_128_t_model_"
                                       "FacebookAI_xlm-roberta-base_t_dropout_True_m3_True.pth")
    assert cfg.M3_LOGS_PATH == "logs_m3_p_size_64_p_length_512_t_layers_3_p_layers_12_h_size_768_lr_0.0001_batch_16_mask_0.45.txt"
    assert cfg.CLAMP2_LOGS_PATH == cfg.CLAMP2_WEIGHTS_PATH.replace("weights", "logs").replace(".pth", ".txt")
    assert cfg._OVERRIDES == {}
    for name in ("TRAIN_FOLDERS", "EVAL_FOLDERS", "TRAIN_JSONL", "EVAL_JSONL"):
        assert hasattr(cfg, name)


def test_clamp3_defaults_give_the_published_file_names(clean_env):
    cfg = load_config(CONFIG, report=False)
    for name, value in SPEC_CLAMP3_DEFAULTS.items():
        assert getattr(cfg, name) == value and type(getattr(cfg, name)) is type(value), name
    assert cfg.CLAMP3_WEIGHTS_PATH == "weights_clamp3_saas" + PUBLISHED_CLAMP3_SUFFIX + ".pth"
    assert cfg.CLAMP3_LOGS_PATH == "logs_clamp3_saas" + PUBLISHED_CLAMP3_SUFFIX + ".txt"
    clean_env.setenv("CLAMP3_VARIANT", "c2")
    assert load_config(CONFIG, report=False).CLAMP3_WEIGHTS_PATH == "weights_clamp3_c2" + PUBLISHED_CLAMP3_SUFFIX + ".pth"


def test_env_overrides_are_typed_and_derived_paths_follow(clean_env, capsys):
    clean_env.setenv("PATCH_NUM_LAYERS", "2")
    clean_env.setenv("M3_HIDDEN_SIZE", "128")
    clean_env.setenv("M3_LEARNING_RATE", "3e-4")
    clean_env.setenv("TEXT_DROPOUT", "false")
    clean_env.setenv("TRAIN_FOLDERS", "data/a,data/b")
    clean_env.setenv("EVAL_FOLDERS", '["x y", "z"]')
    clean_env.setenv("TEXT_MODEL_NAME", "some/model")
    cfg = load_config(CONFIG)
    assert cfg.PATCH_NUM_LAYERS == 2 and cfg.M3_HIDDEN_SIZE == 128
    assert cfg.M3_LEARNING_RATE == 3e-4 and isinstance(cfg.M3_LEARNING_RATE, float)
    assert cfg.TEXT_DROPOUT is False
    assert cfg.TRAIN_FOLDERS == ["data/a", "data/b"] and cfg.EVAL_FOLDERS == ["x y", "z"]
    assert cfg.M3_WEIGHTS_PATH == "weights_m3_p_size_64_p_length_512_t_layers_3_p_layers_2_h_size_128_lr_0.0003_batch_16_mask_0.45.pth"
    assert "_t_model_some_model_t_dropout_False_" in cfg.CLAMP2_WEIGHTS_PATH
    assert cfg.M3_LOGS_PATH.startswith("logs_m3_") and cfg.M3_LOGS_PATH.endswith("_h_size_128_lr_0.0003_batch_16_mask_0.45.txt")
    err = capsys.readouterr().err
    assert "PATCH_NUM_LAYERS=2 (default 12)" in err and "M3_HIDDEN_SIZE=128" in err
    assert "PATCH_SIZE" not in err  # only values that differ are printed
    assert config_dict(cfg)["PATCH_NUM_LAYERS"] == 2


def test_derived_paths_can_be_overridden_directly(clean_env):
    clean_env.setenv("M3_WEIGHTS_PATH", "runs/weights_small.pth")
    cfg = load_config(CONFIG)
    assert cfg.M3_WEIGHTS_PATH == "runs/weights_small.pth"
    assert cfg.M3_LOGS_PATH == "runs/logs_small.txt"


@pytest.mark.parametrize("name,value", [("PATCH_SIZE", "six"), ("M3_DETERMINISTIC", "maybe"), ("EVAL_SPLIT", "1%")])
def test_bad_values_fail_with_the_name(clean_env, name, value):
    clean_env.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        load_config(CONFIG, report=False)


def test_unknown_reserved_name_fails_with_suggestion(clean_env):
    clean_env.setenv("M3_HIDEN_SIZE", "128")
    with pytest.raises(ConfigError, match="M3_HIDEN_SIZE.*did you mean M3_HIDDEN_SIZE"):
        load_config(CONFIG, report=False)


def test_parse_value_types():
    assert parse_value("X", "ON", False) is True
    assert parse_value("X", "0", True) is False
    assert parse_value("X", " 7 ", 1) == 7
    assert parse_value("X", "1", 0.5) == 1.0
    assert parse_value("X", "1,2", [3]) == [1, 2]
    assert parse_value("X", "", []) == []
    assert derived_log_path("a/weights_x.pth") == "a/logs_x.txt"
    # the reference replaces every occurrence in the name (a text model path holding "weights" or "pth")
    assert derived_log_path("weights/weights_t_model__data_weights_depth.pth") == "weights/logs_t_model__data_logs_detxt.txt"
    assert derived_log_path("model.pt") == "model.pt.txt"


def test_other_tools_reserved_names_only_warn(clean_env, capsys):
    clean_env.setenv("CLAMP2_HOME", "/x")  # a cluster setting of another tool, not a misspelling
    cfg = load_config(CONFIG, report=False)
    assert cfg.PATCH_SIZE == 64
    err = capsys.readouterr().err
    assert err.strip() == "warning: ignoring CLAMP2_HOME: not a constant of code/config.py"


def test_misspelling_names_the_closest_constant(clean_env):
    clean_env.setenv("M3_LEARNIN_RATE", "1")
    with pytest.raises(ConfigError, match=r"M3_LEARNIN_RATE \(did you mean M3_LEARNING_RATE\?\)"):
        load_config(CONFIG, report=False)
