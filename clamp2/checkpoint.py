"""The one place that reads and writes checkpoints.

Published format (SPEC §5): a dict with ``model`` (the state dict), ``optimizer``, ``lr_sched``,
``epoch``, ``best_epoch``, ``min_eval_loss``. Our saves add ``config`` and ``format_version`` and
may add ``scaler`` and ``rng``; loading accepts that dict or a bare state dict, always with
``weights_only=True`` (a checkpoint is untrusted input), always strict.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import socket
import sys
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterator, Mapping, MutableMapping, Optional

import torch
from torch import nn

from .files import atomic_path, disk_full_error, error_chain, through_link, unreachable

FORMAT_VERSION = 1
HUB_REPO = "sander-wood/clamp2"
CLAMP3_HUB_REPO = "sander-wood/clamp3"


# The published files (SPEC: "Published artefacts"); config.py's default names give the same.
PUBLISHED_CLAMP2_WEIGHTS = ("weights_clamp2_h_size_768_lr_5e-05_batch_128_scale_1_t_length_128_t_model_"
                            "FacebookAI_xlm-roberta-base_t_dropout_True_m3_True.pth")
PUBLISHED_M3_WEIGHTS = ("weights_m3_p_size_64_p_length_512_t_layers_3_p_layers_12_h_size_768_lr_0.0001"
                        "_batch_16_mask_0.45.pth")
DEFAULT_TEXT_MODEL = "FacebookAI/xlm-roberta-base"
# CLaMP 3 (SPEC_CLAMP3, "Published artefacts"): one layout, two trainings, in sander-wood/clamp3.
_CLAMP3_SUFFIX = ("_h_size_768_t_model_FacebookAI_xlm-roberta-base_t_length_128_a_size_768_a_layers_12_a_length_128"
                  "_s_size_768_s_layers_12_p_size_64_p_length_512.pth")
PUBLISHED_CLAMP3_WEIGHTS = {"saas": "weights_clamp3_saas" + _CLAMP3_SUFFIX,  # best for audio (the default)
                            "c2": "weights_clamp3_c2" + _CLAMP3_SUFFIX}  # best for sheet music and MIDI
PUBLISHED_WEIGHTS = {HUB_REPO: {"CLaMP 2": PUBLISHED_CLAMP2_WEIGHTS, "M3": PUBLISHED_M3_WEIGHTS},
                     CLAMP3_HUB_REPO: {"CLaMP 3 SAAS": PUBLISHED_CLAMP3_WEIGHTS["saas"],
                                       "CLaMP 3 C2": PUBLISHED_CLAMP3_WEIGHTS["c2"]}}


def download_command(repo_id: str, filename: str) -> str:
    return f"hf download {repo_id} {filename}"


def where_to_get(repo: str, name: str, local_dir: str = ".") -> str:
    """What follows "check the path" for a missing weights file ``name`` of ``repo``: its download
    command when ``repo`` publishes it; otherwise the files ``repo`` does publish, since a download of
    ``name`` would only fail (a typo, a run's own file, or the name config.py derives after a size
    override)."""
    published = PUBLISHED_WEIGHTS.get(repo)
    hub = f"the Hugging Face repo {repo} (https://huggingface.co/{repo})"
    if not published or name in published.values():
        return f", or download it from {hub}: `{download_command(repo, name)} --local-dir {local_dir}`"
    listing = "; ".join(f"{what}: `{download_command(repo, file)} --local-dir {local_dir}`"
                        for what, file in published.items())
    return (f"; {name} is not a published file of {hub} (a config size override changes the name config.py "
            f"derives); the published weights are {listing}")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing or does not fit the model.

    ``problem``: the message without its advice, for callers whose file needs other advice (a run's own
    resume file is deleted or skipped, not downloaded again)."""

    def __init__(self, message: str, problem: Optional[str] = None):
        super().__init__(message)
        self.problem = problem or message


class CheckpointNotFound(FileNotFoundError):
    """The weights file is missing (the message says where to get it); nothing is downloaded."""


def missing_weights_message(path: str | os.PathLike, what: str = "weights", repo: str = HUB_REPO,
                            settings: str = "M3_WEIGHTS_PATH / CLAMP2_WEIGHTS_PATH") -> str:
    # The path may be wrong (a typo, a run's own file): checking it comes first, the download second.
    return (f"{what} file not found: {path}; check the path{where_to_get(repo, os.path.basename(str(path)))}; "
            f"then pass its path with --weights or put it where config.py expects it (or set {settings})")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _unreadable(path: Path, exc: BaseException) -> CheckpointError:
    """One line for a file torch cannot load: what the file looks like, not torch's explanation."""
    try:
        with open(path, "rb") as stream:
            head = stream.read(512)
    except OSError as error:
        return CheckpointError(f"cannot read checkpoint {path}: {error.strerror or error}")
    if not head:
        why = "the file is empty"
    elif head.startswith(b"\x93NUMPY"):
        why = "it is a NumPy array (.npy), not a PyTorch checkpoint"
    elif not head.startswith(b"PK") and b"\0" not in head:
        why = "it is a text file, not a PyTorch checkpoint"
    elif not head.startswith((b"PK", b"\x80")):  # neither a zip (torch.save) nor a pickle (legacy torch.save)
        why = "not a PyTorch checkpoint (its first bytes are neither a zip archive's nor a pickle's)"
    elif "Weights only load failed" in str(exc):
        first = next((line.strip() for line in str(exc).splitlines() if "Unsupported global" in line), "")
        why = ("it holds Python objects other than tensors and plain values, which are not loaded from "
               "untrusted files" + (f" ({first[:160]})" if first else ""))
    elif head.startswith(b"PK"):
        problem = (f"cannot read checkpoint {path}: the file is damaged or incomplete "
                   f"({_one_line(exc).split('.')[0]})")
        return CheckpointError(f"{problem}; download or copy it again", problem)
    else:
        why = f"not a PyTorch checkpoint ({_one_line(exc)[:200]})"
    problem = f"cannot read checkpoint {path}: {why}"
    return CheckpointError(f"{problem}; pass a model weights file (.pth)", problem)


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False,
                    missing_message: Optional[str] = None) -> dict:
    """Load a checkpoint file safely (``weights_only=True``); a missing file says where to get it.

    ``mmap`` maps the file instead of reading it whole: for weights that are copied into a model
    right away (not for training state that is then updated in place). ``missing_message``
    replaces the default (CLaMP 2 / M3) message for a missing file. Nothing is ever downloaded.
    """
    path = Path(path)
    problem = unreachable(path, "checkpoint")
    if problem:
        raise CheckpointError(problem)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder; pass the weights file (.pth) inside it")
    if not path.is_file():
        raise CheckpointNotFound(missing_message or missing_weights_message(path))
    try:
        # mmap: the published CLaMP 2 file carries ~2 GB of optimizer state that extraction never
        # reads; mapped, only the tensors actually used are paged in (per process under accelerate).
        obj = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except RuntimeError as exc:
        if not mmap or "mmap" not in str(exc):
            raise _unreadable(path, exc) from exc
        try:  # legacy (non-zip) serialization cannot be mapped
            obj = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as inner:
            raise _unreadable(path, inner) from inner
    except Exception as exc:  # unpickling errors, truncated zip, non-tensor objects
        raise _unreadable(path, exc) from exc
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict or state dict; "
                              "pass a model weights file (.pth)")
    return dict(obj)


def state_dict_of(checkpoint: Mapping[str, Any], source: str = "checkpoint") -> dict:
    """The model state dict of a published-format checkpoint or of a bare state dict.

    A ``model`` entry that is not a state dict (``None``, a list) is a :class:`CheckpointError`, as is a
    key present both with and without DDP's ``module.`` prefix (the reference's strict load refuses it).
    """
    if "model" in checkpoint and not isinstance(checkpoint["model"], Mapping):
        raise CheckpointError(f"{source}: its 'model' entry is a {type(checkpoint['model']).__name__}, not a state "
                              "dict; pass a model weights file (.pth)")
    state = checkpoint["model"] if "model" in checkpoint else checkpoint
    return strip_prefix(state, "module.", source)


def strip_prefix(state: Mapping[str, Any], prefix: str, source: str = "checkpoint") -> dict:
    """Remove ``prefix`` (e.g. DDP's ``module.``) from every key that has it.

    A key held both with and without ``prefix`` is a :class:`CheckpointError`: either entry would
    silently replace the other."""
    stripped: dict = {}
    for key, value in state.items():
        name = key[len(prefix):] if isinstance(key, str) and key.startswith(prefix) else key
        if name in stripped:
            raise CheckpointError(f"{source} holds both {name!r} and {prefix + name!r}: one model's weights under "
                                  f"two names; keep one of them (a state dict without the {prefix!r} prefix loads)")
        stripped[name] = value
    return stripped


def sub_state_dict(state: Mapping[str, Any], prefix: str) -> dict:
    """The entries under ``prefix`` (e.g. ``encoder.`` of an M3 checkpoint), prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


# -- which model a checkpoint belongs to -----------------------------------------------------------

M3, CLAMP2, CLAMP3, PROBE, MERT = "M3", "CLaMP 2", "CLaMP 3", "linear probe", "MERT"
_ARTICLE = {M3: "an", MERT: "a"}
# What to pass instead, by the family a script needs.
_WHERE = {M3: f"config M3_WEIGHTS_PATH or --weights; published in {HUB_REPO}",
          CLAMP2: f"config CLAMP2_WEIGHTS_PATH or --weights; published in {HUB_REPO}",
          CLAMP3: "config CLAMP3_WEIGHTS_PATH or --weights; published in sander-wood/clamp3",
          PROBE: "--weights; written by music_classification/train_cls.py",
          MERT: "a MERT-v1-95M folder, e.g. m-a-p/MERT-v1-95M"}


# What loads each family instead (the second half of a family-mismatch message).
_LOADERS = {M3: "clamp2.M3.from_pretrained or code/extract_m3.py",
            CLAMP2: "clamp2.CLaMP2.from_pretrained or code/extract_clamp2.py",
            CLAMP3: "clamp2.CLaMP3.from_pretrained or code/extract_clamp3.py",
            PROBE: "music_classification/inference_cls.py",
            MERT: "process_data/extract_mert.py --model"}


def checkpoint_family(state: Mapping[str, Any] | Any) -> Optional[str]:
    """The model family whose keys ``state`` holds: ``M3``, ``CLaMP 2``, ``CLaMP 3``, ``linear probe``, ``MERT``.

    ``state`` is a checkpoint dict, a state dict or any iterable of keys; ``None`` when no family fits.
    """
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    keys = [k[len("module."):] if k.startswith("module.") else k for k in state if isinstance(k, str)]
    starts = lambda *prefixes: any(k.startswith(prefixes) for k in keys)  # noqa: E731
    if starts("symbolic_model.", "symbolic_proj.", "audio_model.", "audio_proj."):
        return CLAMP3
    if starts("music_model.", "music_proj."):
        return CLAMP2
    if starts("feature_extractor.", "feature_projection."):
        return MERT
    if starts("encoder.patch_embedding.", "encoder.base.", "decoder.base.", "decoder.token_embedding"):
        return M3
    # CLaMP 2's probe (fc1, fc2) or CLaMP 3's single linear layer (fc).
    if keys and set(keys) <= {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "fc.weight", "fc.bias"}:
        return PROBE
    return None


def family_mismatch(state: Mapping[str, Any] | Any, needed: str, source: str) -> Optional[str]:
    """``"<source> is an M3 checkpoint; expected a CLaMP 2 checkpoint (...)"``, or None when it fits.

    A state of no known family gets a line too (``is not a CLaMP 2 checkpoint``); an empty
    ``needed`` family is never checked.
    """
    found = checkpoint_family(state)
    if found == needed or not needed:
        return None
    need = f"{_ARTICLE.get(needed, 'a')} {needed} checkpoint ({_WHERE.get(needed, '--weights')})"
    if found is None:
        model = state.get("model") if isinstance(state, Mapping) else None
        keys = [k for k in (model if isinstance(model, Mapping) else state)][:3]
        sample = f" (its keys start {', '.join(map(repr, keys))})" if keys else " (it holds no weights)"
        return f"{source} is not {need.split(' (')[0]}{sample}; expected {need}"
    loader = f"; {found} checkpoints load with {_LOADERS[found]}" if found in _LOADERS else ""
    return f"{source} is {_ARTICLE.get(found, 'a')} {found} checkpoint; expected {need}{loader}"


def check_family(state: Mapping[str, Any] | Any, needed: str, source: str) -> None:
    """Raise :class:`CheckpointError` (one line, see :func:`family_mismatch`) unless ``state`` is of family ``needed``."""
    problem = family_mismatch(state, needed, source)
    if problem:
        raise CheckpointError(problem)


def describe_mismatch(model: nn.Module, state: Mapping[str, Any], limit: int = 3) -> Optional[str]:
    """A readable description of missing/unexpected keys and shape mismatches, or None if it fits."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
              for k in expected if k in state and hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(expected[k].shape)]
    not_tensors = [f"{k} ({type(state[k]).__name__})" for k in expected
                   if k in state and not isinstance(state[k], torch.Tensor)]
    if not (missing or unexpected or shapes or not_tensors):
        return None

    def fmt(title, items):
        more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
        return f"{title} ({len(items)}): " + ", ".join(items[:limit]) + more

    parts = []
    if missing:
        parts.append(fmt("missing keys", missing))
    if unexpected:
        parts.append(fmt("unexpected keys", unexpected))
    if shapes:
        parts.append(fmt("shape mismatches", shapes))
    if not_tensors:
        parts.append(fmt("not tensors", not_tensors))
    return "; ".join(parts)


CONFIG_HINT = "PATCH_*, M3_HIDDEN_SIZE, CLAMP2_HIDDEN_SIZE, TEXT_MODEL_NAME"
CLAMP3_CONFIG_HINT = ("PATCH_*, M3_HIDDEN_SIZE, CLAMP3_HIDDEN_SIZE, AUDIO_HIDDEN_SIZE, AUDIO_NUM_LAYERS, "
                      "MAX_AUDIO_LENGTH, TEXT_MODEL_NAME")


# Initialisers that only draw random values: torch.nn.init's, under their names (transformers 5 swaps its own
# functions of the same names into torch.nn.init while it builds a model), and the in-place random Tensor methods.
_RANDOM_INITIALISERS = frozenset({"uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_",
                                  "xavier_uniform_", "xavier_normal_", "orthogonal_", "sparse_"})
_INITIALISER_MODULES = ("torch.nn.init", "transformers.initialization")
_RANDOM_TENSOR_METHODS = frozenset({"uniform_", "normal_", "random_", "bernoulli_", "exponential_", "cauchy_",
                                    "log_normal_", "geometric_"})


class _NoRandomInitialisation(torch.overrides.TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", None)
        if ((name in _RANDOM_INITIALISERS and getattr(func, "__module__", None) in _INITIALISER_MODULES)
                or (name in _RANDOM_TENSOR_METHODS and getattr(func, "__objclass__", None) in (torch.Tensor, torch._C.TensorBase))):
            tensor = args[0] if args else (kwargs or {})["tensor"]
            with torch.no_grad():  # zeros, not memory's leftovers: no NaN reaches an initialiser's arithmetic
                return tensor.zero_()
        return func(*args, **(kwargs or {}))


def without_random_init():
    """Build a model without drawing its random initial weights; for a model a strict load then fills.

    Drawing them cost seconds (8.8 s for XLM-R large's 560M weights on a 2-core VM) only to be
    overwritten, and moved torch's global random stream: a seeded training run that loaded or
    evaluated a model through the API drew differently afterwards. Weights come out zero; buffers
    that no checkpoint holds (position ids) are built as usual. A torch function mode, so it acts in
    the calling thread only. Never around a model that trains from its initial weights.
    """
    return _NoRandomInitialisation()


def load_state(model: nn.Module, state: Mapping[str, Any], source: str = "checkpoint",
               config_hint: str = CONFIG_HINT) -> None:
    """Strictly load ``state`` into ``model``; a mismatch names the keys (and hints at the config)."""
    problem = describe_mismatch(model, state)
    if problem:
        # A checkpoint of another family (an M3 file where CLaMP 2 is needed) is named as such.
        check_family(state, checkpoint_family(model.state_dict()) or "", source)
        raise CheckpointError(
            f"{source} does not fit the model: {problem}; "
            f"check that config.py (or its environment overrides: {config_hint}) matches the checkpoint."
        )
    model.load_state_dict(state, strict=True)


def load_model_weights(model: nn.Module, path: str | os.PathLike, prefix: str = "") -> dict:
    """Load a model's weights from ``path`` (published dict or bare state dict); returns the checkpoint.

    ``prefix`` selects a sub-module's entries, e.g. ``"encoder."`` to start CLaMP 2's music encoder
    from an M3 checkpoint.
    """
    checkpoint = read_checkpoint(path, mmap=True)
    state = state_dict_of(checkpoint, f"checkpoint {path}")
    expected = {prefix + key: None for key in model.state_dict()}
    check_family(state, checkpoint_family(expected) or "", f"checkpoint {path}")
    if prefix:
        state = sub_state_dict(state, prefix)
    load_state(model, state, source=f"checkpoint {path}" + (f" (entries '{prefix}*')" if prefix else ""))
    return checkpoint


def load_clamp3_weights(model: nn.Module, path: str | os.PathLike, missing_message: Optional[str] = None) -> dict:
    """Load a CLaMP 3 checkpoint (SAAS or C2 layout, or a bare state dict) strictly; returns the checkpoint.

    Only ``model`` (and, for the report, ``epoch`` / ``min_eval_loss``) is read: files without the
    optimizer and scheduler states load too. A CLaMP 2 or M3 checkpoint is named as such.
    """
    checkpoint = read_checkpoint(path, mmap=True, missing_message=missing_message or missing_weights_message(
        path, repo=CLAMP3_HUB_REPO, settings="CLAMP3_VARIANT / CLAMP3_WEIGHTS_PATH"))
    state = state_dict_of(checkpoint, f"checkpoint {path}")
    check_family(state, CLAMP3, f"checkpoint {path}")
    load_state(model, state, source=f"checkpoint {path}", config_hint=CLAMP3_CONFIG_HINT)
    return checkpoint


def loaded_message(checkpoint: Mapping[str, Any], family: str = "CLaMP 3") -> str:
    """The reference's line after loading: ``Successfully Loaded CLaMP 3 Checkpoint from Epoch 1 with loss 1.0``
    (its extract_m3.py names no family: ``family=""`` gives ``Successfully Loaded Checkpoint from ...``)."""
    return (f"Successfully Loaded {family + ' ' if family else ''}Checkpoint from Epoch {checkpoint.get('epoch', '?')} "
            f"with loss {checkpoint.get('min_eval_loss', '?')}")


def in_published_order(state: Mapping[str, Any]) -> "OrderedDict[str, Any]":
    """``state`` with each ``…embeddings.position_embeddings.weight`` right after its word embeddings.

    The published checkpoints were saved under transformers 4, whose XLM-R registered the position
    embeddings second; transformers 5 registers them after the embeddings' LayerNorm. Same keys and
    values; this keeps a trained checkpoint's key order the published one (``tests/data/*_state_dict.tsv``).
    """
    suffix = "embeddings.position_embeddings.weight"
    moved = {key for key in state if key.endswith(suffix)
             and key[:-len(suffix)] + "embeddings.word_embeddings.weight" in state}
    ordered: "OrderedDict[str, Any]" = OrderedDict()
    for key, value in state.items():
        if key in moved:
            continue
        ordered[key] = value
        if key.endswith("embeddings.word_embeddings.weight"):
            position = key[:-len("word_embeddings.weight")] + "position_embeddings.weight"
            if position in moved:
                ordered[position] = state[position]
    return ordered


def save_checkpoint(path: str | os.PathLike, model: nn.Module, *, optimizer=None, lr_sched=None, scaler=None,
                    epoch: int = 0, best_epoch: int = 0, min_eval_loss: float = float("inf"),
                    config: Optional[Mapping[str, Any]] = None, extra: Optional[Mapping[str, Any]] = None) -> None:
    """Write a published-format checkpoint atomically (temporary file in the same folder, then rename)."""
    payload: MutableMapping[str, Any] = {
        "model": in_published_order(unwrap(model).state_dict()),
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
    with _written_or_said(path), atomic_path(through_link(path)) as tmp:
        # Through a Python file: a failed write (ENOSPC) then raises an OSError that says so; torch's own C++ file
        # writer only says "unexpected pos".
        with open(tmp, "wb") as f:
            torch.save(payload, f)
        _on_disk(tmp)


def copy_checkpoint(source: str | os.PathLike, path: str | os.PathLike) -> None:
    """Copy a checkpoint file atomically and durably (the best file and epoch copies are copies of ``latest_``)."""
    with _written_or_said(path), atomic_path(through_link(path)) as tmp:
        shutil.copyfile(source, tmp)
        _on_disk(tmp)


@contextlib.contextmanager
def _written_or_said(path: str | os.PathLike) -> Iterator[None]:
    """A checkpoint that cannot be written is a CheckpointError naming it and the cause (one line), not torch's
    C++ writer's "unexpected pos" traceback; the file it would replace is left as it was."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        full = disk_full_error(exc)
        cause = full or next((e for e in error_chain(exc) if isinstance(e, OSError)), None)
        if cause is None:
            raise
        then = ": free space and run the same command again to resume" if full else ""
        raise CheckpointError(f"cannot write checkpoint {path}: {cause.strerror or cause}; the previous checkpoint "
                              f"is kept{then}") from exc


def _on_disk(path: Path) -> None:
    """fsync before the rename: after a crash of the machine (not just the process) the renamed file could
    otherwise be empty or short, and a resume would stop at it instead of using the previous one. Opened
    for writing: Windows' FlushFileBuffers needs write access."""
    with open(path, "r+b") as written:
        os.fsync(written.fileno())


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel / compiled wrapper."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def latest_path(weights_path: str | os.PathLike) -> Path:
    """``latest_`` + the weights file name, in the same folder (the reference prefixes the whole path)."""
    path = Path(weights_path)
    return path.with_name("latest_" + path.name)


def run_lock_path(weights_path: str | os.PathLike) -> Path:
    """``<weights name>.lock`` beside the weights: held by the training run that writes them."""
    path = Path(weights_path)
    return path.with_name(path.name + ".lock")


class SaidOnce(CheckpointError):
    """Found by rank 0 for every rank, which all raise it: the trainers say it once (on rank 0), not once per rank."""


class StartRefused(SaidOnce):
    """A run refused before it starts, found by rank 0 for every rank (said once): another run holds the weights'
    lock, or a new stage would overwrite another stage's files."""


@contextlib.contextmanager
def exclusive_run(weights_path: str | os.PathLike, is_main: bool = True) -> Iterator[None]:
    """Hold the weights' run lock for the ``with`` block (on rank 0, ``is_main``), or raise :class:`CheckpointError`
    naming the run that holds it (on every rank: a refusal found by rank 0 stops them all).

    Two runs given the same weights path (two shells, a job restarted while the first still runs on another node)
    would overwrite each other's ``latest_``, best and epoch files and interleave their log entries. The lock is a
    POSIX record lock (``fcntl.lockf``) on the lock file: the kernel (or the NFS lock manager) drops it when its
    process ends, killed or not, so a dead run never blocks the next. The file holds the holder's pid and host (for
    the message) and is removed when the run ends; a killed run's stays, unlocked, and the next run takes it. Where
    ``fcntl`` is missing (Windows) nothing is locked.
    """
    from .distributed import broadcast_object

    with contextlib.ExitStack() as held:
        refused = None
        if is_main:
            try:
                held.enter_context(_run_lock(weights_path))
            except CheckpointError as exc:
                refused = str(exc)
        refused = broadcast_object(refused)
        if refused:
            raise StartRefused(refused)  # every rank raises it: the trainers say it once (rank 0)
        yield


@contextlib.contextmanager
def _run_lock(weights_path: str | os.PathLike) -> Iterator[None]:
    lock = run_lock_path(weights_path)
    fd = _lock_file(lock, weights_path)
    if fd is None:
        yield
        return
    try:
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, started {time.asctime()}\n".encode(), 0)
        except OSError as exc:  # a full disk (or quota): said as the lock file's other write problems are
            raise CheckpointError(f"cannot write beside {weights_path}: {exc.strerror or exc} ({lock})") from None
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()  # while still held: a run starting now locks a new file (the inode check below)
        os.close(fd)  # releases the lock


def _lock_file(lock: Path, weights_path: str | os.PathLike) -> Optional[int]:
    """A descriptor of ``lock`` holding its record lock; None where there are no such locks; CheckpointError
    naming the holder when another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows
        return None
    while True:
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:  # on rank 0 alone: raised as CheckpointError, the refusal every rank gets
            raise CheckpointError(f"cannot write beside {weights_path}: {exc.strerror or exc} ({lock})") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 300, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            if exc.errno in (errno.EACCES, errno.EAGAIN):
                raise CheckpointError(f"another training run writes {weights_path} ({holder}, lock {lock}); wait "
                                      "for it to end, or give this run its own --weights") from None
            # A file system without record locks (Lustre mounted without flock, some FUSE mounts: ENOSYS, ENOLCK,
            # EOPNOTSUPP): run unguarded, as before the lock existed, rather than refuse every run there.
            print(f"note: {lock.parent} does not support file locks ({exc.strerror}); nothing stops a second run "
                  f"from writing {Path(weights_path).name} at the same time", file=sys.stderr, flush=True)
            with contextlib.suppress(OSError):
                lock.unlink()
            return None
        try:
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # locked a file the previous holder removed as it ended: lock the one now there


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
