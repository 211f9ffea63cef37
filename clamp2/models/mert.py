"""MERT-v1-95M (SPEC §16) as a ``transformers.HubertModel``: no remote code, no nnAudio.

MERT's own class (``MusicHubertModel``, loaded with ``trust_remote_code``) breaks on transformers
5; at MERT-v1-95M's settings (no CQT front end, no deepnorm, no attention relaxation) it is a
HuBERT encoder with the same keys and bit-identical hidden states, so the published folder's
``config.json`` values build a ``HubertModel`` and its weights load strictly into it.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch

from ..attention_arguments import ATTN_IMPLEMENTATION
from ..checkpoint import CheckpointError, describe_mismatch, read_checkpoint, without_random_init
from ..files import unreachable
from ..hub import WeightsNotFound, is_hub_id, resolve_weights

MERT_HUB_ID = "m-a-p/MERT-v1-95M"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
DOWNLOAD_COMMAND = f"hf download {MERT_HUB_ID}"

# Fields of MERT's config that HubertModel cannot reproduce: the values at which both are the same model.
_MERT_ONLY = {"feature_extractor_cqt": False, "deepnorm": False, "attention_relax": -1.0}
# Checkpoint-era names of the positional convolution's weight norm → torch's parametrization names.
_LEGACY_WEIGHT_NORM = {"weight_g": "parametrizations.weight.original0", "weight_v": "parametrizations.weight.original1"}


class MertNotFound(WeightsNotFound):
    """A MERT folder or hub id whose files are not on this machine."""


def hubert_config(values: Mapping[str, Any]):
    """A ``HubertConfig`` from a MERT ``config.json`` dict (``model_type "mert_model"``).

    Only HubertConfig's own fields are passed (``auto_map`` and the rest are MERT's remote-code
    bookkeeping); a MERT-only feature switched on is refused, since HubertModel would silently
    compute something else.
    """
    from transformers import HubertConfig

    for key, neutral in _MERT_ONLY.items():
        if key in values and values[key] not in (neutral, None) and not (key == "attention_relax" and values[key] <= 0):
            raise ValueError(f"MERT config sets {key}={values[key]!r}; only {key}={neutral!r} (MERT-v1-95M's) "
                             "is supported")
    fields = set(inspect.signature(HubertConfig.__init__).parameters) - {"self", "transformers_version",
                                                                         "architectures", "dtype"}
    return HubertConfig(**{k: v for k, v in values.items() if k in fields}, attn_implementation=ATTN_IMPLEMENTATION)


def build_mert(values: Mapping[str, Any]):
    """A randomly initialised MERT-form ``HubertModel`` (eval mode) from config.json values."""
    from transformers import HubertModel

    return HubertModel(hubert_config(values)).eval()


# MERT-v1-95M's config.json values that matter (SPEC §16); build_small_mert scales the sizes down.
MERT_V1_95M_CONFIG = {
    "model_type": "mert_model", "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
    "intermediate_size": 3072, "hidden_act": "gelu", "layer_norm_eps": 1e-5, "feat_extract_norm": "group",
    "feat_extract_activation": "gelu", "conv_dim": [512] * 7, "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
    "conv_stride": [5, 2, 2, 2, 2, 2, 2], "conv_bias": False, "num_conv_pos_embeddings": 128,
    "num_conv_pos_embedding_groups": 16, "do_stable_layer_norm": False, "feat_proj_layer_norm": True,
    "mask_time_prob": 0.05, "feature_extractor_cqt": False, "deepnorm": False, "attention_relax": -1.0,
    "sample_rate": 24000}


def build_small_mert(out_dir: str | os.PathLike, hidden_size: int = 64, num_layers: int = 2, conv_dim: int = 32,
                     seed: int = 0) -> Path:
    """Save a MERT-architecture folder (config.json + pytorch_model.bin) with random weights and small sizes.

    For tests and demos on machines that cannot download MERT-v1-95M: the same front end (seven
    strided convolutions at MERT's kernels and strides, 24 kHz, 75 frames/s) and encoder, narrower and
    shallower, untrained. ``hidden_size`` is the feature width (a multiple of 64 for CLaMP 3's audio
    encoder). ``process_data/extract_mert.py --model <out_dir>`` reads it as it reads the published one.
    """
    from ..files import atomic_path, atomic_write_text

    out = Path(out_dir)
    values = dict(MERT_V1_95M_CONFIG, hidden_size=hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=max(1, hidden_size // 64), intermediate_size=4 * hidden_size,
                  conv_dim=[conv_dim] * 7, num_conv_pos_embedding_groups=4, num_conv_pos_embeddings=16)
    torch.manual_seed(seed)
    model = build_mert(values)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "pytorch_model.bin") as tmp:
        torch.save(model.state_dict(), tmp)
    atomic_write_text(out / "config.json", json.dumps(values, indent=1))
    return out


def rename_legacy_keys(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``…conv.weight_g``/``weight_v`` (the published file) → ``…conv.parametrizations.weight.original0/1``."""
    renamed = {}
    for key, value in state.items():
        head, _, last = key.rpartition(".")
        if last in _LEGACY_WEIGHT_NORM and head.endswith("conv"):
            key = f"{head}.{_LEGACY_WEIGHT_NORM[last]}"
        renamed[key] = value
    return renamed


def read_state_dict(path: str | os.PathLike) -> Dict[str, torch.Tensor]:
    """The tensors of ``model.safetensors`` or ``pytorch_model.bin`` (``weights_only=True``), legacy names renamed."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - a corrupt file is one clear error
            raise CheckpointError(f"cannot read MERT weights {path}: {exc}") from exc
    else:
        state = read_checkpoint(path)
    # Some exports prefix the encoder (``hubert.`` / ``model.``) — the published file does not.
    return rename_legacy_keys(state)


def load_mert_state(model, state: Mapping[str, torch.Tensor], source: str) -> None:
    problem = describe_mismatch(model, state)
    if problem:
        raise CheckpointError(f"{source} does not fit the MERT model of its config.json:\n{problem}")
    model.load_state_dict(state, strict=True)


def resolve_mert_folder(source: str | os.PathLike = MERT_HUB_ID) -> Path:
    """The local folder of a MERT model: ``source`` itself, or hub id ``source`` in the Hugging Face cache.

    Never downloads: a hub id not in the cache is :class:`MertNotFound` naming ``hf download``.
    """
    path = Path(source)
    # A folder this user may not search (chmod 000, or one above it): is_dir/is_file raise a bare PermissionError.
    problem = unreachable(path, "MERT model folder") or unreachable(path / "config.json", "MERT config")
    if problem:
        raise CheckpointError(f"{problem}; fix its permissions")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise MertNotFound(f"no config.json in MERT folder {path}; download the model with "
                               f"`{DOWNLOAD_COMMAND} --local-dir {path}`")
        return path
    text = os.fspath(source)
    if not is_hub_id(text):
        raise MertNotFound(f"MERT model folder not found: {text}; download it with "
                           f"`{DOWNLOAD_COMMAND} --local-dir {text}` or pass the hub id {MERT_HUB_ID}")
    try:
        config = resolve_weights(text, "config.json", local_files_only=True)
    except WeightsNotFound:
        command = DOWNLOAD_COMMAND if text == MERT_HUB_ID else f"hf download {text}"
        raise MertNotFound(f"MERT model {text} is not in the Hugging Face cache (no downloads at run time); "
                           f"download it where there is network with `{command}`") from None
    return config.parent


def weights_file(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise MertNotFound(f"no {' or '.join(WEIGHT_FILES)} in MERT folder {folder}; download the model with "
                       f"`{DOWNLOAD_COMMAND}`")


def load_mert(source: str | os.PathLike = MERT_HUB_ID, device: Optional[torch.device] = None):
    """MERT from a local folder or a cached hub id: config.json → HubertModel, strict weights, eval mode."""
    folder = resolve_mert_folder(source)
    try:
        values = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except PermissionError as exc:  # chmod 000 on config.json alone
        raise CheckpointError(f"cannot read MERT config {folder / 'config.json'}: {exc.strerror}; fix its "
                              "permissions") from None
    weights = weights_file(folder)
    with without_random_init():  # the strict load below fills every weight
        model = build_mert(values)
    load_mert_state(model, read_state_dict(weights), source=f"MERT weights {weights}")
    model.eval()
    return model.to(device) if device is not None else model


def forward_flops(config, samples: int) -> int:
    """Multiply-adds × 2 of one forward pass over ``samples`` samples (conv front end + transformer)."""
    flops, length, channels = 0, samples, 1
    for dim, kernel, stride in zip(config.conv_dim, config.conv_kernel, config.conv_stride):
        length = (length - kernel) // stride + 1
        flops += 2 * channels * dim * kernel * length
        channels = dim
    frames, hidden = length, config.hidden_size
    flops += 2 * channels * hidden * frames  # feature projection
    flops += 2 * hidden * (hidden // config.num_conv_pos_embedding_groups) * config.num_conv_pos_embeddings * frames
    per_layer = 2 * frames * (4 * hidden * hidden + 2 * hidden * config.intermediate_size)  # QKVO + FFN
    per_layer += 2 * 2 * frames * frames * hidden  # scores and weighted sum
    return flops + config.num_hidden_layers * per_layer
