"""The one place that reads and writes checkpoints.

Published format (SPEC §5): a dict with ``model`` (the state dict), ``optimizer``, ``lr_sched``,
``epoch``, ``best_epoch``, ``min_eval_loss``. Our saves add ``config`` and ``format_version`` and
may add ``scaler`` and ``rng``; loading accepts that dict or a bare state dict, always with
``weights_only=True`` (a checkpoint is untrusted input), always strict.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, MutableMapping, Optional

import torch
from torch import nn

from .files import atomic_path

FORMAT_VERSION = 1
HUB_REPO = "sander-wood/clamp2"
HUB_URL = f"https://huggingface.co/{HUB_REPO}"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing or does not fit the model."""


def missing_weights_message(path: str | os.PathLike, what: str = "weights") -> str:
    name = os.path.basename(str(path))
    return (
        f"{what} file not found: {path}\n"
        f"  Download '{name}' from the Hugging Face repo {HUB_REPO} ({HUB_URL}/tree/main), e.g.\n"
        f"    hf download {HUB_REPO} {name} --local-dir .\n"
        f"  then pass its path with --weights or put it where config.py expects it "
        f"(or set M3_WEIGHTS_PATH / CLAMP2_WEIGHTS_PATH)."
    )


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> dict:
    """Load a checkpoint file safely (``weights_only=True``); a missing file says where to get it.

    ``mmap`` maps the file instead of reading it whole: for weights that are copied into a model
    right away (not for training state that is then updated in place).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(missing_weights_message(path))
    try:
        # mmap: the published CLaMP 2 file carries ~2 GB of optimizer state that extraction never
        # reads; mapped, only the tensors actually used are paged in (per process under accelerate).
        obj = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except RuntimeError as exc:
        if not mmap or "mmap" not in str(exc):
            raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
        try:  # legacy (non-zip) serialization cannot be mapped
            obj = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as inner:
            raise CheckpointError(f"cannot read checkpoint {path}: {inner}") from inner
    except Exception as exc:  # unpickling errors, truncated zip, non-tensor objects
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict or state dict")
    return dict(obj)


def state_dict_of(checkpoint: Mapping[str, Any]) -> dict:
    """The model state dict of a published-format checkpoint or of a bare state dict."""
    state = checkpoint["model"] if "model" in checkpoint and isinstance(checkpoint["model"], Mapping) else checkpoint
    return strip_prefix(state, "module.")


def strip_prefix(state: Mapping[str, Any], prefix: str) -> dict:
    """Remove ``prefix`` (e.g. DDP's ``module.``) from every key that has it."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}


def sub_state_dict(state: Mapping[str, Any], prefix: str) -> dict:
    """The entries under ``prefix`` (e.g. ``encoder.`` of an M3 checkpoint), prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def describe_mismatch(model: nn.Module, state: Mapping[str, Any], limit: int = 10) -> Optional[str]:
    """A readable description of missing/unexpected keys and shape mismatches, or None if it fits."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(expected[k].shape)]
    if not (missing or unexpected or shapes):
        return None

    def fmt(title, items):
        more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
        return f"  {title} ({len(items)}): " + ", ".join(items[:limit]) + more

    parts = []
    if missing:
        parts.append(fmt("missing keys", missing))
    if unexpected:
        parts.append(fmt("unexpected keys", unexpected))
    if shapes:
        parts.append(fmt("shape mismatches", shapes))
    return "\n".join(parts)


def load_state(model: nn.Module, state: Mapping[str, Any], source: str = "checkpoint") -> None:
    """Strictly load ``state`` into ``model``; a mismatch names the keys (and hints at the config)."""
    problem = describe_mismatch(model, state)
    if problem:
        raise CheckpointError(
            f"{source} does not fit the model:\n{problem}\n"
            "  Check that config.py (or its environment overrides: PATCH_*, M3_HIDDEN_SIZE, "
            "CLAMP2_HIDDEN_SIZE, TEXT_MODEL_NAME) matches the checkpoint."
        )
    model.load_state_dict(state, strict=True)


def load_model_weights(model: nn.Module, path: str | os.PathLike, prefix: str = "") -> dict:
    """Load a model's weights from ``path`` (published dict or bare state dict); returns the checkpoint.

    ``prefix`` selects a sub-module's entries, e.g. ``"encoder."`` to start CLaMP 2's music encoder
    from an M3 checkpoint.
    """
    checkpoint = read_checkpoint(path, mmap=True)
    state = state_dict_of(checkpoint)
    if prefix:
        state = sub_state_dict(state, prefix)
    load_state(model, state, source=f"checkpoint {path}" + (f" (entries '{prefix}*')" if prefix else ""))
    return checkpoint


def save_checkpoint(path: str | os.PathLike, model: nn.Module, *, optimizer=None, lr_sched=None, scaler=None,
                    epoch: int = 0, best_epoch: int = 0, min_eval_loss: float = float("inf"),
                    config: Optional[Mapping[str, Any]] = None, extra: Optional[Mapping[str, Any]] = None) -> None:
    """Write a published-format checkpoint atomically (temporary file in the same folder, then rename)."""
    payload: MutableMapping[str, Any] = {
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "lr_sched": lr_sched.state_dict() if lr_sched is not None else None,
        "epoch": int(epoch),
        "best_epoch": int(best_epoch),
        # Python floats only: a numpy scalar would make weights_only loading fail.
        "min_eval_loss": float(min_eval_loss),
        "format_version": FORMAT_VERSION,
    }
    if scaler is not None:
        payload["scaler"] = scaler.state_dict()
    if config is not None:
        payload["config"] = dict(config)
    if extra:
        payload.update(extra)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel / compiled wrapper."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def latest_path(weights_path: str | os.PathLike) -> Path:
    """``latest_`` + the weights file name, in the same folder (the reference prefixes the whole path)."""
    path = Path(weights_path)
    return path.with_name("latest_" + path.name)


# -- resuming training ---------------------------------------------------------------------------

def resume_source(weights_path: str | os.PathLike) -> Optional[Path]:
    """The checkpoint a resumed run starts from: ``latest_`` if present, else the best file, else None.

    The best file alone (e.g. written by the reference, which has no usable latest file) is used
    rather than ignored, so a fresh start never overwrites trained weights.
    """
    latest = latest_path(weights_path)
    if latest.is_file():
        return latest
    return Path(weights_path) if Path(weights_path).is_file() else None


def capture_rng_state() -> dict:
    """This process's Python, NumPy, torch and CUDA generator states, in ``weights_only``-loadable types."""
    import random

    import numpy as np

    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state` (CUDA states only where CUDA is in use)."""
    import random

    import numpy as np

    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    numpy = state["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def restore_training_state(checkpoint: Mapping[str, Any], *, optimizer=None, lr_sched=None, scaler=None) -> dict:
    """Load optimizer, scheduler and scaler states (in that order); return the counters.

    The model is loaded before (it must be, so that the optimizer's state maps onto its
    parameters); the RNG state is restored last, by the caller, once nothing else draws numbers.
    """
    if optimizer is not None and checkpoint.get("optimizer"):
        optimizer.load_state_dict(checkpoint["optimizer"])
    if lr_sched is not None and checkpoint.get("lr_sched"):
        lr_sched.load_state_dict(checkpoint["lr_sched"])
    if scaler is not None and checkpoint.get("scaler"):
        scaler.load_state_dict(checkpoint["scaler"])
    return {"epoch": int(checkpoint.get("epoch", 0)), "best_epoch": int(checkpoint.get("best_epoch", 0)),
            "min_eval_loss": float(checkpoint.get("min_eval_loss", float("inf")))}
