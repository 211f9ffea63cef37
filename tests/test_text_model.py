"""Text encoder loading by local folder or hub id, offline errors, and the small test model."""

import os
import subprocess
import sys

import pytest
import torch

from clamp2.text_model import TextModelUnavailable, build_small_text_model, load_text_model, load_tokenizer


def test_local_folder_loads_pretrained_and_config_only(tiny_text_dir):
    tokenizer = load_tokenizer(str(tiny_text_dir))
    assert (tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id) == (1, 0, 2)
    ids = tokenizer("chorale by bach")["input_ids"]
    assert ids[0] == 0 and ids[-1] == 2 and tokenizer.unk_token_id not in ids
    pretrained = load_text_model(str(tiny_text_dir))
    skeleton = load_text_model(str(tiny_text_dir), pretrained=False)
    assert pretrained.state_dict().keys() == skeleton.state_dict().keys()
    assert "pooler.dense.weight" in pretrained.state_dict()
    with torch.inference_mode():
        out = pretrained(torch.tensor([ids])).last_hidden_state
    assert out.shape == (1, len(ids), 32)


def test_vocabulary_is_deterministic(tmp_path):
    texts = ["b a a", "c a"]
    t1, _ = build_small_text_model(tmp_path / "one", texts, hidden_size=8, num_layers=1, num_heads=1)
    t2, _ = build_small_text_model(tmp_path / "two", texts, hidden_size=8, num_layers=1, num_heads=1)
    assert t1.get_vocab() == t2.get_vocab()
    assert t1("a b c")["input_ids"] == t2("a b c")["input_ids"]


def test_reference_tiny_text_model_loads(vectors):
    tokenizer = load_tokenizer(str(vectors / "tiny_text_model"))
    model = load_text_model(str(vectors / "tiny_text_model"), pretrained=False)
    assert tokenizer.sep_token == "</s>" and model.config.hidden_size == 32


def test_missing_hub_model_offline_is_a_plain_error(tmp_path):
    # huggingface_hub reads HF_HUB_OFFLINE at import time, so this runs in a fresh interpreter.
    code = ("from clamp2.text_model import load_tokenizer, TextModelUnavailable\n"
            "try:\n    load_tokenizer('no-such-org/no-such-model')\n"
            "except TextModelUnavailable as e:\n    print(e)\n    raise SystemExit(3)\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert "no-such-org/no-such-model" in proc.stdout and "HF_HUB_OFFLINE is set" in proc.stdout
    assert "--text_model" in proc.stdout


def test_missing_local_folder_is_a_plain_error(tmp_path):
    with pytest.raises(TextModelUnavailable, match="missing_dir"):
        load_text_model(str(tmp_path / "missing_dir"))


def test_text_model_loads_in_float32_whatever_the_saved_dtype(tmp_path, vectors):
    import json
    import shutil

    copy = tmp_path / "bf16_model"
    shutil.copytree(vectors / "tiny_text_model", copy)
    config = json.loads((copy / "config.json").read_text())
    config["torch_dtype"] = config["dtype"] = "bfloat16"
    (copy / "config.json").write_text(json.dumps(config))
    for pretrained in (True, False):
        model = load_text_model(str(copy), pretrained=pretrained)
        assert {p.dtype for p in model.parameters()} == {torch.float32}
