"""Text encoder loading by local folder or hub id, offline errors, and the small test model."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from tokenizers import AddedToken, Tokenizer
from tokenizers.models import WordLevel
from transformers import AutoConfig

from clamp2.text_model import (TextModelUnavailable, build_small_text_model, follow_saved_added_token_normalization,
                               load_text_model, load_tokenizer, max_text_length)


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


# Texts on which transformers 5's rebuilt XLM-R tokenizer and the saved tokenizer.json (what the
# original's transformers 4 loaded) disagree, and plain ones that must not change.
PIPELINE_TEXTS = [
    "A cheerful folk tune",
    "A cheerful folk tune ",            # a space before the end
    "first line </s>second line",       # a space before the separator CLaMP joins lines with
    "first line\r",                     # a CRLF file's line
    "ＡＢＣ，全角の句読点：（例）",        # full-width letters and punctuation (NFKC)
    "ﬁne ﬂute",                         # ligatures
    "cafe\u0301 decomposed",            # a combining accent
    "Ⅻ variations",
    "ctrl\x07char and zero\u200bwidth",
    "two  spaces\tand a tab",
    " leading space",
]


def saved_ids(tokenizer_json, text):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_json)).encode(text).ids


def test_tokenizer_follows_its_saved_tokenizer_json(vectors):
    """The reference's tiny text model was saved by transformers 4 (Nmt + NFKC normalizers, Metaspace split)."""
    folder = vectors / "tiny_text_model"
    tokenizer = load_tokenizer(str(folder))
    for text in PIPELINE_TEXTS:
        assert tokenizer(text)["input_ids"] == saved_ids(folder / "tokenizer.json", text), repr(text)
    assert tokenizer.sep_token == "</s>" and tokenizer.pad_token_id == 1
    assert tokenizer.decode(tokenizer("hello world")["input_ids"], skip_special_tokens=True) == "hello world"
    # The ids transformers 4.46.3 (the reference's environment) gives for this model, file and all.
    assert tokenizer("A cheerful folk tune ")["input_ids"] == [0, 4, 32, 4, 2377, 5, 3930, 11, 3185, 2985, 4, 10,
                                                               2335, 5, 4, 2]
    assert tokenizer("first line </s>second line")["input_ids"] == [0, 3185, 2629, 2324, 4, 3057, 5, 4, 2, 4, 2358,
                                                                    22, 14, 2223, 4, 3057, 5, 2]
    assert tokenizer("ＡＢＣ，全角の句読点：（例）")["input_ids"] == [0, 4, 3526, 36, 12, 3, 84, 52, 3, 51, 2]
    assert tokenizer("cafe\u0301 decomposed")["input_ids"] == [0, 4, 22, 2696, 92, 4, 2245, 22, 2408, 23, 2666,
                                                                 2231, 2]
    assert tokenizer("first line\r")["input_ids"] == [0, 3185, 2629, 2324, 4, 3057, 5, 4, 2]


def test_added_tokens_are_normalized_or_not_as_tokenizer_json_says(tmp_path, vectors):
    """tokenizer.json says <mask> and </s> are matched in normalized text, tokenizer_config.json says not."""
    folder = tmp_path / "flipped"
    shutil.copytree(vectors / "tiny_text_model", folder)
    saved = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    for token in saved["added_tokens"]:
        if token["content"] in ("<mask>", "</s>"):
            token["normalized"] = True
    (folder / "tokenizer.json").write_text(json.dumps(saved, ensure_ascii=False), encoding="utf-8")
    tokenizer = load_tokenizer(str(folder))
    # transformers 4.46.3 (tokenizers 0.20.3), the reference's environment, on this folder: NFKC makes the
    # full-width "＜mask＞" the mask token (4000); with the config's flag it would be 8 pieces.
    assert tokenizer("＜mask＞")["input_ids"] == [0, 4000, 2]
    assert tokenizer("x\n＜mask＞ y")["input_ids"] == [0, 3823, 4000, 3329, 2]
    assert tokenizer("ｂａｃｈ ＜ｍａｓｋ＞")["input_ids"] == [0, 2800, 2735, 4000, 2]
    assert tokenizer("<mask>")["input_ids"] == [0, 4000, 2]
    # unchanged where the two files agree
    assert load_tokenizer(str(vectors / "tiny_text_model"))("＜mask＞")["input_ids"] == [0, 4, 3, 2375, 16, 45, 3, 2]


def test_restoring_an_added_tokens_normalization_keeps_it_special_or_plain():
    def tokenizer(normalized: bool) -> Tokenizer:
        made = Tokenizer(WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
        made.add_special_tokens([AddedToken("<x>", normalized=normalized)])
        made.add_tokens([AddedToken("yz", normalized=normalized)])
        return made

    loaded = tokenizer(normalized=False)
    follow_saved_added_token_normalization(loaded, tokenizer(normalized=True))
    assert [(token.content, token.normalized, token.special) for token in loaded.get_added_tokens_decoder().values()] \
        == [("<x>", True, True), ("yz", True, False)]


def test_tokenizers_saved_by_transformers_5_keep_their_pipeline(tmp_path):
    tokenizer, _ = build_small_text_model(tmp_path / "small", ["a cheerful folk tune", "a sad song"],
                                          hidden_size=8, num_layers=1, num_heads=1)
    reloaded = load_tokenizer(str(tmp_path / "small"))
    for text in PIPELINE_TEXTS:
        assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"] == \
            saved_ids(tmp_path / "small" / "tokenizer.json", text), repr(text)


def test_hub_id_tokenizer_follows_the_cached_tokenizer_json(tmp_path, vectors):
    from test_api import fake_hub_cache

    folder = vectors / "tiny_text_model"
    fake_hub_cache(tmp_path / "hub", "someone/tiny-xlmr", {name: folder / name for name in os.listdir(folder)})
    code = ("import json, sys\nfrom clamp2.text_model import load_tokenizer\n"
            "tokenizer = load_tokenizer('someone/tiny-xlmr')\n"
            "print(json.dumps([tokenizer(t)['input_ids'] for t in json.loads(sys.argv[1])]))\n")
    import json

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"))
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(PIPELINE_TEXTS)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [saved_ids(folder / "tokenizer.json", text) for text in PIPELINE_TEXTS]


def test_folder_without_tokenizer_json_says_so(tmp_path, vectors):
    import shutil

    folder = tmp_path / "spm_only"
    folder.mkdir()
    shutil.copy(vectors / "tiny_text_model" / "config.json", folder)
    (folder / "sentencepiece.bpe.model").write_bytes(b"not read")
    with pytest.raises(TextModelUnavailable, match="no tokenizer.json"):
        load_tokenizer(str(folder))


def test_max_text_length_is_the_position_table_less_padding_id_plus_one(tiny_text_dir):
    """XLM-R numbers positions from padding_idx + 1: 40 positions with pad id 1 take 38 tokens."""
    config = AutoConfig.from_pretrained(tiny_text_dir)
    assert (config.max_position_embeddings, config.pad_token_id) == (40, 1)
    assert max_text_length(str(tiny_text_dir)) == 38
