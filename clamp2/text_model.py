"""Loading the text encoder (XLM-R) and its tokenizer from a hub id or a local folder.

Training starts from pretrained text weights (``AutoModel.from_pretrained``). Extraction from a
CLaMP 2 checkpoint only needs the architecture (``AutoModel.from_config``), because the checkpoint
holds the text model's weights: that avoids reading ~1 GB of weights that are overwritten anyway.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from transformers import AutoConfig, AutoModel, AutoTokenizer

from .attention_arguments import ATTN_IMPLEMENTATION


class TextModelUnavailable(OSError):
    """The text model or tokenizer could not be found locally or on the hub."""


def _unavailable(name: str, exc: Exception | str) -> TextModelUnavailable:
    from .hub import hub_offline

    if Path(name).exists():
        detail = " ".join(str(exc).split())[:300]
        try:
            if isinstance(exc, PermissionError):
                detail = f"this user may not read it ({exc.strerror}: {exc.filename}); fix its permissions"
            elif Path(name).is_file():
                detail = "it is a file, not a folder"
            elif not (Path(name) / "config.json").is_file():
                detail = "it has no config.json"
            elif not (Path(name) / "tokenizer.json").is_file():
                # e.g. only sentencepiece.bpe.model: transformers 5 then asks for tiktoken or sentencepiece, and
                # would not tokenize as the original did anyway (load_tokenizer follows tokenizer.json)
                detail = f"it has no tokenizer.json ({detail})"
        except PermissionError as error:  # a folder that cannot be searched: Path.is_file raises (Python < 3.14)
            detail = f"this user may not read it ({error.strerror}); fix its permissions"
        return TextModelUnavailable(f"cannot load the text model/tokenizer from the folder {name}: {detail}; pass a "
                                    f"folder saved by `hf download <hub id> --local-dir DIR` (config.json and the "
                                    f"tokenizer files; the weights too for training)")
    why = "downloads are off (HF_HUB_OFFLINE is set)" if hub_offline() else (
        exc if isinstance(exc, str) else "it could not be loaded (" + " ".join(str(exc).split())[:300] + ")")
    return TextModelUnavailable(
        f"text model '{name}' is not a local folder, it is not in the Hugging Face cache and {why}; download it where "
        f"there is network with `hf download {name}` (or `hf download {name} --local-dir DIR` and pass DIR with "
        f"--text_model; setting TEXT_MODEL_NAME=DIR instead would also rename the expected weights file)")


def _from_pretrained(load, name_or_path: str, **kwargs):
    """``load(name_or_path)`` from the local folder or the hub cache first; the hub only when reachable.

    Without this, a machine without network waits through transformers' retries with back-off
    (about a minute) before hearing that the model is missing.
    """
    from .hub import hub_offline, hub_reachable

    # A downloaded folder whose config names its own code (auto_map) is refused, never run: without this,
    # transformers asks on the terminal whether to run it (and reads the answer from a piped stdin).
    kwargs.setdefault("trust_remote_code", False)
    try:
        if Path(name_or_path).exists():
            return load(name_or_path, **kwargs)
        if hub_offline():  # explicit: transformers reads HF_HUB_OFFLINE only once, at import
            return load(name_or_path, local_files_only=True, **kwargs)
        try:
            return load(name_or_path, local_files_only=True, **kwargs)
        except (OSError, ValueError):
            if not hub_reachable():
                raise _unavailable(name_or_path, "the hub cannot be reached") from None
        return load(name_or_path, **kwargs)
    except TextModelUnavailable:
        raise
    except (OSError, ValueError) as exc:
        raise _unavailable(name_or_path, exc) from exc


def max_text_length(name_or_path: str) -> int:
    """The most tokens the text model takes: its position table less XLM-R's offset (padding id + 1)."""
    config = _from_pretrained(AutoConfig.from_pretrained, name_or_path)
    positions = getattr(config, "max_position_embeddings", None)
    if positions is None:
        return 1 << 30
    return int(positions) - (int(config.pad_token_id) + 1 if getattr(config, "pad_token_id", None) is not None else 0)


def check_max_text_length(name_or_path: str, max_length: int, setting: str = "MAX_TEXT_LENGTH") -> None:
    """One line (a :class:`TextModelUnavailable`) when ``max_length`` tokens do not fit the text model's positions."""
    limit = max_text_length(name_or_path)
    if max_length > limit:
        raise TextModelUnavailable(f"{setting}={max_length} is more than the text model '{name_or_path}' takes "
                                   f"({limit} tokens); set {setting}={limit} or less")


def load_tokenizer(name_or_path: str):
    """The tokenizer of a hub id or local folder, tokenizing as its ``tokenizer.json`` says (see below)."""
    tokenizer = _from_pretrained(AutoTokenizer.from_pretrained, name_or_path)
    saved = saved_tokenizer_file(name_or_path)
    if saved is not None:
        follow_saved_pipeline(tokenizer, saved)
    return tokenizer


def saved_tokenizer_file(name_or_path: str) -> Optional[Path]:
    """``tokenizer.json`` of a local folder or of a hub id in the local cache (where loading put it); else None."""
    folder = Path(name_or_path)
    if folder.is_dir():
        return folder / "tokenizer.json" if (folder / "tokenizer.json").is_file() else None
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(str(name_or_path), "tokenizer.json")
    except ValueError:  # not a repository id
        return None
    return Path(found) if isinstance(found, str) and Path(found).is_file() else None


def follow_saved_pipeline(tokenizer, tokenizer_file: str | os.PathLike) -> None:
    """Give ``tokenizer`` the normalizer, pre-tokenizer, post-processor and decoder of ``tokenizer_file``.

    The original CLaMP code ran transformers 4, whose fast tokenizers load ``tokenizer.json`` as it
    is. transformers 5 rebuilds an XLM-R tokenizer from the file's vocabulary alone: it keeps a
    SentencePiece ``Precompiled`` normalizer but drops every other one (the ``Nmt``/``NFKC`` of
    the tiny vectors' model, the published model's collapse of repeated spaces) and splits words
    with ``WhitespaceSplit`` before ``Metaspace``. Text then tokenizes differently wherever those
    matter: a space before a line's end or before ``</s>`` (CLaMP joins lines with it), a ``\\r``
    of a CRLF file, full-width letters and punctuation, ligatures, decomposed accents, control and
    zero-width characters (``tests/test_text_model.py``). The vocabulary and model are the same, so
    taking these four parts from the file gives transformers 4's ids.
    """
    from tokenizers import Tokenizer

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow (Python) tokenizer: nothing rebuilt
        return
    saved = Tokenizer.from_file(os.fspath(tokenizer_file))
    backend.normalizer = saved.normalizer
    backend.pre_tokenizer = saved.pre_tokenizer
    if saved.post_processor is not None:
        backend.post_processor = saved.post_processor
    backend.decoder = saved.decoder
    follow_saved_added_token_normalization(backend, saved)


def follow_saved_added_token_normalization(backend, saved) -> None:
    """Match each added token (``<mask>``, ``</s>``, ...) in normalized text or not, as ``tokenizer.json`` says.

    Where ``tokenizer_config.json``'s ``added_tokens_decoder`` says otherwise (files from different saves, or
    edited), transformers 4 (tokenizers 0.20) showed the config's flag but still matched the token as the file
    says; transformers 5 matches it as the config says. With a ``normalized`` ``<mask>`` the two then differ on
    a full-width ``＜mask＞`` (NFKC) or on two spaces before ``<mask>`` (``Replace`` to ``▁``, then ``lstrip``).
    The other flags (``lstrip``, ``rstrip``, ``single_word``) are the config's under both.
    """
    from tokenizers import AddedToken

    loaded = backend.get_added_tokens_decoder()
    restored = []
    for token_id, token in saved.get_added_tokens_decoder().items():
        current = loaded.get(token_id)
        if current is not None and current.content == token.content and current.normalized != token.normalized:
            restored.append(AddedToken(current.content, single_word=current.single_word, lstrip=current.lstrip,
                                       rstrip=current.rstrip, normalized=token.normalized, special=current.special))
    # Each kept as it was: add_special_tokens would make a plain added token special (skipped when decoding).
    backend.add_special_tokens([token for token in restored if token.special])
    backend.add_tokens([token for token in restored if not token.special])


def load_text_model(name_or_path: str, pretrained: bool = True):
    """The text encoder with its pooler, in float32, attention by
    :data:`~clamp2.attention_arguments.ATTN_IMPLEMENTATION`; ``pretrained=False`` builds it from the config alone.

    float32 explicitly: transformers 5 otherwise takes the dtype of the saved config (a bf16 copy
    would give bf16 features or clash with the float32 projection).
    """
    import torch

    if pretrained:
        return _from_pretrained(AutoModel.from_pretrained, name_or_path, dtype=torch.float32,
                                attn_implementation=ATTN_IMPLEMENTATION)
    return AutoModel.from_config(_from_pretrained(AutoConfig.from_pretrained, name_or_path), dtype=torch.float32,
                                 attn_implementation=ATTN_IMPLEMENTATION)


def build_small_text_model(out_dir: str | os.PathLike, texts, hidden_size: int = 32, num_layers: int = 2,
                           num_heads: int = 2, max_positions: int = 130, max_words: int = 2000, seed: int = 0):
    """Save a small XLM-R-architecture encoder and a Unigram tokenizer built from ``texts`` to ``out_dir``.

    For tests and demos on machines that cannot download ``xlm-roberta-base``. The vocabulary is
    deterministic (word pieces scored by log frequency, then single characters), with XLM-R's
    special ids (``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>`` 3, ``<mask>`` last). Returns
    ``(tokenizer, model)``.
    """
    import math
    from collections import Counter

    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel, XLMRobertaTokenizer

    counts = Counter(word for text in texts for word in text.lower().split())
    chars = sorted({c for word in counts for c in word} | set("abcdefghijklmnopqrstuvwxyz0123456789.,;:'-"))
    total = sum(counts.values()) or 1
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:max_words]
    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + word, math.log(n / total)) for word, n in top]
    floor = math.log(1 / total) - 2.0
    vocab += [("\u2581", floor)] + [(c, floor - 1.0) for c in chars] + [("\u2581" + c, floor - 2.0) for c in chars]
    seen, unique = set(), []
    for piece, score in vocab:
        if piece not in seen:
            seen.add(piece)
            unique.append((piece, score))
    unique.append(("<mask>", 0.0))
    tokenizer = XLMRobertaTokenizer(vocab=unique)
    config = XLMRobertaConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, num_hidden_layers=num_layers,
                              num_attention_heads=num_heads, intermediate_size=hidden_size * 4,
                              max_position_embeddings=max_positions, type_vocab_size=1, pad_token_id=1,
                              bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5)
    torch.manual_seed(seed)
    model = XLMRobertaModel(config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    model.save_pretrained(out_dir)
    return tokenizer, model
