"""CLaMP 2, CLaMP 3 and M3 as objects one can call: raw music, audio and text in, features out.

    from clamp2 import CLaMP2, CLaMP3
    model = CLaMP2.from_pretrained("sander-wood/clamp2")          # or a local .pth file
    music = model.encode_music(["tune.mid", "score.mxl"])       # [2, 768], converted on the fly
    text = model.encode_text(["a lively Irish jig"])            # [1, 768]
    scores = model.similarity(text, music)                      # [1, 2] cosine similarities
    clamp3 = CLaMP3.from_pretrained("sander-wood/clamp3", variant="saas")   # "c2" for sheet music/MIDI
    clamp3.encode_music(["song.wav", "tune.mid", "score.mxl"])  # audio through MERT, loaded when needed

Raw files go through the project's own converters exactly as the batch pipeline does
(:mod:`clamp2.extraction.model_inputs`) and then through the extraction code of ``code/extract_*.py``
(:func:`clamp2.extraction.core.iter_features`), so a file's feature here equals the feature the scripts
write for it. The model sizes are read from the checkpoint's tensor shapes: no ``config.py`` is
needed. Nothing heavy is imported until a model is loaded.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

ERRORS = ("raise", "skip")
DEFAULT_MAX_TEXT_LENGTH = 128  # config.py's MAX_TEXT_LENGTH


class EncodeError(ValueError):
    """Some inputs could not be encoded; ``failures`` lists ``(item, reason)`` for each."""

    def __init__(self, failures: Sequence[Tuple[Any, str]]):
        from .extraction.model_inputs import describe

        self.failures = list(failures)
        shown = "; ".join(f"{describe(item)}: {reason}" for item, reason in self.failures[:3])
        more = f" (and {len(self.failures) - 3} more)" if len(self.failures) > 3 else ""
        super().__init__(f"{len(self.failures)} input(s) could not be encoded: {shown}{more}")


@dataclass
class Encoded:
    """The features of the inputs that could be encoded, and why the others could not.

    ``features`` is ``[n, D]`` (global) or a list of ``[L, H]`` arrays (per position), row ``k``
    belonging to ``items[k]``, which was input number ``indices[k]``; ``failures`` holds
    ``(item, reason)``. ``computed`` inputs ran through the model, ``cached`` came from the cache.
    """

    items: List[Any]
    features: Any
    indices: List[int]
    failures: List[Tuple[Any, str]] = field(default_factory=list)
    computed: int = 0
    cached: int = 0
    root: Optional[Path] = None

    def __len__(self) -> int:
        return len(self.items)

    @property
    def names(self) -> List[str]:
        """Each item as reports show it: the path relative to ``root`` (POSIX), else the path or content."""
        return [_name(item, self.root) for item in self.items]

    @property
    def keys(self) -> List[str]:
        """The search tools' keys (docs/metrics.md): the file name up to its first ``.``."""
        return [Path(os.fspath(item)).name.split(".")[0] if _is_path(item) else _name(item, None) for item in self.items]

    @property
    def failed_names(self) -> List[str]:
        """The failed items as :attr:`names` shows items."""
        return [_name(item, self.root) for item, _ in self.failures]

    def raise_for_failures(self) -> None:
        if self.failures:
            raise EncodeError(self.failures)


def _is_path(item: Any) -> bool:
    from .extraction.model_inputs import is_path_like

    return is_path_like(item)


def _name(item: Any, root: Optional[Path]) -> str:
    from .extraction.model_inputs import describe

    if root is not None and _is_path(item):
        try:
            return Path(item).relative_to(root).as_posix()
        except ValueError:
            pass
    return describe(item)


def cosine_similarity(a, b) -> np.ndarray:
    """Cosine similarities ``[n, m]`` of the rows of ``a`` ``[n, D]`` and ``b`` ``[m, D]`` (1-D: one row), in float32."""
    a = np.atleast_2d(np.asarray(a, dtype=np.float32))
    b = np.atleast_2d(np.asarray(b, dtype=np.float32))
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), np.float32(1e-12))
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), np.float32(1e-12))
    return a @ b.T


def _as_list(items) -> list:
    if isinstance(items, (str, bytes, os.PathLike)):
        return [items]
    return list(items)


_FLOAT32_DTYPE = None  # the SharedOverride of torch's process-wide default dtype, made on first use
_FLOAT32_DTYPE_MADE = threading.Lock()


def _float32_dtype():
    global _FLOAT32_DTYPE
    with _FLOAT32_DTYPE_MADE:
        if _FLOAT32_DTYPE is None:
            import torch

            from .attention import SharedOverride

            def to_float32():
                previous = torch.get_default_dtype()
                torch.set_default_dtype(torch.float32)
                return lambda: torch.set_default_dtype(previous)

            _FLOAT32_DTYPE = SharedOverride(to_float32)
    return _FLOAT32_DTYPE


def _float32_default(method):
    """Run ``method`` with torch's defaults at float32 on the CPU, the caller's put back afterwards.

    The models are float32 and built on the CPU, then moved to the chosen device; batches are made
    on the host and copied. A caller's ``torch.set_default_dtype(torch.float64)`` (common beside
    scientific code in a notebook) built float64 layers next to transformers' float32 text model,
    and the first text batch failed with "mat1 and mat2 must have the same dtype"; music came out
    computed partly in float64. A caller's ``torch.set_default_device("cuda")`` or ``with
    torch.device("cuda"):`` would put the host buffers (pinned memory) on the GPU. Every model build
    and forward pass of the API goes through one. The default dtype is process-wide (one
    :class:`~clamp2.attention.SharedOverride` for every thread: the first in saves, the last out
    restores), the default device per thread. The caller's random stream is not touched at all:
    models are built without drawing their initial weights
    (:func:`~clamp2.checkpoint.without_random_init`) and the extraction's loader has a generator of
    its own. (Saving and restoring the stream instead would rewind another thread's draws.)
    """
    import functools

    @functools.wraps(method)
    def with_float32_default(*args, **kwargs):
        import torch

        dtype = _float32_dtype()
        # A device as a context for this call only: it overrides a caller's set_default_device and a caller's
        # own ``with torch.device(...)`` block alike, and leaves both as they were (a global reset to the CPU
        # would not reach the block, and putting the block's device back globally would outlive it). Only
        # when needed: the context is a function mode that every torch call inside passes through.
        on_cpu = torch.device("cpu") if torch.get_default_device().type != "cpu" else contextlib.nullcontext()
        dtype.enter()
        try:
            with on_cpu:
                return method(*args, **kwargs)
        finally:
            dtype.exit()

    return with_float32_default


def _check_errors(errors: str) -> None:
    if errors not in ERRORS:
        raise ValueError(f"errors must be 'raise' or 'skip', not {errors!r}")


def _check_sizes(batch_size, num_workers, max_text_length=None) -> None:
    """One clear line for sizes no run can use (batch_size=-1 used to encode nothing without a failure)."""
    for name, value, least in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0),
                               ("max_text_length", max_text_length, 1)):
        if value is not None and int(value) < least:
            raise ValueError(f"{name} must be at least {least}, not {value}")


def _default_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _device_and_dtype(device, dtype: str):
    """The torch device to run on, after refusing a precision it cannot run (bf16/fp16 off CUDA).

    Called first by every ``from_pretrained``: before a download of the weights or a model build
    (seconds to minutes) that the refusal would waste.
    """
    import torch

    from .extraction.core import autocast_context

    device = torch.device(device) if device is not None else _default_device()
    autocast_context(device, dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r}, but CUDA is not available here (torch.cuda.is_available() is "
                         "False); pass device='cpu', or leave device=None to use CUDA where there is one")
    return device


def _file_identity(path: Path):
    """:func:`clamp2.cache.file_identity` (what the weights hash memo is keyed on), None if unreadable."""
    from .cache import file_identity

    try:
        return file_identity(path)
    except OSError:
        return None


def _package_versions() -> Dict[str, str]:
    from importlib import metadata

    versions = {}
    for name in ("abctoolkit", "mido", "unidecode"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "?"
    return versions


def _load_state(path: Path):
    """(checkpoint dict, model state dict) of a weights file, memory-mapped."""
    from .checkpoint import read_checkpoint, state_dict_of

    checkpoint = read_checkpoint(path, mmap=True)
    return checkpoint, state_dict_of(checkpoint, str(path))


def _infer_dims(state, encoder_prefix: str, decoder_prefix: Optional[str], path: Path):
    from .checkpoint import CheckpointError
    from .models.m3 import infer_m3_dims

    try:
        return infer_m3_dims(state, encoder_prefix, decoder_prefix)
    except KeyError as missing:
        family = {"music_model.": "CLaMP 2", "symbolic_model.": "CLaMP 3"}.get(encoder_prefix, "M3")
        raise CheckpointError(f"{path} is not a {family} checkpoint (no entry {missing})") from None


class _Extractor:
    """What CLaMP2 and M3 share: raw inputs → cache lookup → conversion + model (extract.py) → cache."""

    model_kind = ""

    def __init__(self, *, weights_path: Path, device, dtype: str, batch_size: int, cache, num_workers: int,
                 files_per_chunk: int):
        from .cache import FeatureCache

        self.weights_path = Path(weights_path)
        _check_sizes(batch_size, num_workers)
        self.device = _device_and_dtype(device, dtype)
        self.dtype = dtype
        self.batch_size = int(batch_size)
        self.num_workers = int(num_workers)
        self.files_per_chunk = int(files_per_chunk)
        if cache is True:
            cache = FeatureCache()
        elif cache is not None and cache is not False and not isinstance(cache, FeatureCache):
            cache = FeatureCache(cache)
        self.cache = cache or None
        self._namespaces: Dict[tuple, Any] = {}
        # The weights' hash is taken now, next to the loading: weights replaced later (a training run
        # saving to the same path) must not name the namespace of features this model computes.
        self._weights_sha256 = self._weights_hash() if self.cache is not None else None
        # Without a cache the (slow) hash waits for one being set; the file's identity says then whether the
        # file still holds the weights this model loaded.
        self._weights_identity = _file_identity(self.weights_path)
        self._weights_changed_warned = False
        self._cache_write_warned = False  # an unwritable cache is said once per model, not on every call

    def _weights_hash(self) -> str:
        from .cache import weights_fingerprint

        return weights_fingerprint(self.weights_path, self.cache.root)

    def _precision(self):
        from .extraction.core import autocast_context

        return autocast_context(self.device, self.dtype)

    def _forward(self, per_position_fn, global_fn, per_position: bool):
        def run(ids, masks):
            with self._precision():
                return per_position_fn(ids, masks) if per_position else global_fn(ids, masks)
        return run

    # subclasses: the runners of each input kind, and what besides the weights the features depend on
    def _runners(self, per_position: bool) -> Dict[str, Any]:
        raise NotImplementedError

    def _settings(self, per_position: bool) -> Dict[str, Any]:
        raise NotImplementedError

    def feature_settings(self, per_position: bool) -> Dict[str, Any]:
        """What this model's features depend on: the cache namespace's settings without this package's version and
        code (an output folder's record, :mod:`clamp2.extraction.record`, outlives an upgrade)."""
        from .cache import user_weights_fingerprint

        sha256 = self._weights_sha256 or (self._weights_hash() if self.cache is not None
                                          else user_weights_fingerprint(self.weights_path))
        # The variant is a name for weights: the same weights (sha256) under another file name are the same features.
        return {"model": self.model_kind, "weights_sha256": sha256, "per_position": per_position, "dtype": self.dtype,
                **{k: v for k, v in self._settings(per_position).items() if k != "variant"}}

    def _cache_namespace(self, per_position: bool):
        from .cache import code_fingerprint
        from .extraction.model_inputs import CONVERTER_SETTINGS

        identity = (str(self.cache.root), per_position)
        if identity not in self._namespaces:
            if self._weights_sha256 is None:  # the cache was set after construction
                if _file_identity(self.weights_path) != self._weights_identity:
                    # Its hash would name other weights' namespace: features of these would be served to those.
                    if not self._weights_changed_warned:
                        from .progress import write_line

                        write_line(f"warning: {self.weights_path} changed since this model loaded it; its features "
                                   "are not cached (load the model again to cache them)")
                        self._weights_changed_warned = True
                    return None
                self._weights_sha256 = self._weights_hash()
            settings = {"model": self.model_kind, "weights_sha256": self._weights_sha256,
                        "per_position": per_position, "dtype": self.dtype, "converters": CONVERTER_SETTINGS,
                        "versions": _package_versions(), "code_sha256": code_fingerprint(),
                        **self._settings(per_position)}
            about = {"weights": self.weights_path.name}
            self._namespaces[identity] = self.cache.namespace(settings, about)
        return self._namespaces[identity]

    accepts_audio = False  # CLaMP 3 also reads audio files and MERT features

    def _resolve(self, items: list, allow_text: bool, abc_format: str):
        from .extraction.core import InputError
        from .extraction.model_inputs import resolve

        raws: List[Any] = [None] * len(items)
        failures: Dict[int, str] = {}
        for i, item in enumerate(items):
            try:
                raws[i] = resolve(item, abc_format=abc_format, allow_text=allow_text, allow_audio=self.accepts_audio)
            except InputError as exc:
                failures[i] = str(exc)
        return raws, failures

    def _runner_kind(self, raw) -> str:
        """Which of :meth:`_runners` encodes ``raw``."""
        from .extraction.model_inputs import TEXT

        return "text" if raw.kind == TEXT else "music"

    def _entry_kind(self, raw) -> str:
        """What besides the input's bytes and the namespace its cached feature depends on (its kind)."""
        from .extraction.model_inputs import effective_kind

        return effective_kind(raw)

    def _prepare(self, raws: Dict[int, Any], failures: Dict[int, str]) -> None:
        """Last step before the model, in this process: CLaMP 3 turns audio files into MERT features here."""

    @_float32_default
    def _encode(self, items: list, raws: list, failures: Dict[int, str], per_position: bool, *, use_cache: bool,
                progress: bool, desc: str, root: Optional[Path] = None, width: Optional[int] = None) -> Encoded:
        from .cache import entry_key
        from .extraction.core import iter_features
        from .progress import progress_bar, write_line

        namespace = self._cache_namespace(per_position) if use_cache and self.cache is not None else None
        features: Dict[int, np.ndarray] = {}
        keys: Dict[int, str] = {}
        todo: List[int] = []
        cached = computed = 0
        bar = progress_bar(total=len(items), desc=desc, unit="file", enabled=progress)
        try:
            for i, raw in enumerate(raws):
                if raw is None:
                    bar.update(1)
                    continue
                if namespace is not None:
                    try:
                        keys[i] = entry_key(self._entry_kind(raw), raw.digest())
                    except OSError as exc:
                        failures[i] = f"cannot read: {exc}"
                        bar.update(1)
                        continue
                    hit = namespace.get(keys[i])
                    if hit is not None:
                        features[i] = hit
                        cached += 1
                        bar.update(1)
                        continue
                todo.append(i)
            runners = self._runners(per_position)
            ready = {i: raws[i] for i in todo}
            self._prepare(ready, failures)
            for i in [i for i in todo if i in failures]:
                bar.update(1)
            todo = [i for i in todo if i not in failures]
            sources = [(self._runner_kind(ready[i]), ready[i]) for i in todo]
            for j, feature, error in iter_features(sources, runners, self.device, per_position,
                                                   batch_size=self.batch_size, files_per_chunk=self.files_per_chunk,
                                                   num_workers=self.num_workers if len(sources) > 1 else 0):
                i = todo[j]
                if error is not None:
                    failures[i] = error
                else:
                    features[i] = feature
                    computed += 1
                    if namespace is not None:
                        try:
                            namespace.put(keys[i], feature)
                        except OSError as exc:
                            if not self._cache_write_warned:
                                write_line(f"warning: cannot write to the feature cache {self.cache.root}: {exc} "
                                           "(features are computed, not cached; said once)")
                                self._cache_write_warned = True
                bar.update(1)
        finally:
            bar.close()
        ok = sorted(features)
        if per_position:
            stacked: Any = [features[i][0] for i in ok]
        elif ok:
            stacked = np.stack([features[i][0] for i in ok])
        else:
            stacked = np.zeros((0, width or 0), dtype=np.float32)
        return Encoded(items=[items[i] for i in ok], features=stacked, indices=ok,
                       failures=[(items[i], failures[i]) for i in sorted(failures)],
                       computed=computed, cached=cached, root=root)

    def _encode_items(self, items, per_position: bool, *, allow_text: bool, abc_format: str, progress: bool,
                      root: Optional[Path] = None, width: Optional[int] = None) -> Encoded:
        items = _as_list(items)
        raws, failures = self._resolve(items, allow_text, abc_format)
        return self._encode(items, raws, failures, per_position, use_cache=True, progress=progress,
                            desc=self.model_kind, root=root, width=width)

    def _folder_files(self, folder, include_text: bool) -> Tuple[List[Path], List[Tuple[Path, str]]]:
        """(the input files under ``folder``, [(path, reason)] for what could not be searched or read:
        a folder that cannot be listed, a FIFO, socket or device named like an input), as the scripts list them."""
        from .files import find_files
        from .extraction.model_inputs import AUDIO_INPUT_EXTENSIONS, MUSIC_INPUT_EXTENSIONS, TEXT_INPUT_EXTENSIONS

        folder = Path(folder)
        if not folder.exists():
            raise FileNotFoundError(f"folder not found: {folder}")
        problems: List[Tuple[Path, str]] = []
        files = find_files(folder, MUSIC_INPUT_EXTENSIONS + (AUDIO_INPUT_EXTENSIONS if self.accepts_audio else ())
                           + (TEXT_INPUT_EXTENSIONS if include_text else ()), problems)
        return files, problems

    def _encode_folder(self, folder, per_position: bool, *, include_text: bool, errors: str, progress: bool,
                       abc_format: str, width: Optional[int] = None) -> Encoded:
        _check_errors(errors)
        files, problems = self._folder_files(folder, include_text)
        encoded = self._encode_items(files, per_position, allow_text=include_text, abc_format=abc_format,
                                     progress=progress, root=Path(folder), width=width)
        encoded.failures = encoded.failures + problems
        if errors == "raise":
            encoded.raise_for_failures()
        return encoded

    similarity = staticmethod(cosine_similarity)


class _JointSpace(_Extractor):
    """What CLaMP2 and CLaMP3 share: a text tower, a joint space, and the text/music/folder methods."""

    def __init__(self, model, tokenizer, *, weights_path: Path, text_model: str,
                 max_text_length: int = DEFAULT_MAX_TEXT_LENGTH, device=None, dtype: str = "fp32",
                 batch_size: int = 16, cache=None, num_workers: int = 0, files_per_chunk: int = 64):
        super().__init__(weights_path=weights_path, device=device, dtype=dtype, batch_size=batch_size, cache=cache,
                         num_workers=num_workers, files_per_chunk=files_per_chunk)
        self.model = model.eval().to(self.device)
        self.tokenizer = tokenizer
        self.text_model_name = text_model
        self.max_text_length = int(max_text_length)
        self._text_fingerprint: Optional[str] = None

    @property
    def dim(self) -> int:
        """Size of the joint space (768 for the published models)."""
        return int(self.model.text_proj.out_features)

    @staticmethod
    def _text_settings(checkpoint, text_model: Optional[str], max_text_length: Optional[int]):
        """(text model name, tokenizer, text encoder, max text length) for a checkpoint: the arguments,
        else the checkpoint's own config, else XLM-R base and 128."""
        from .hub import DEFAULT_TEXT_MODEL
        from .text_model import load_text_model, load_tokenizer

        saved = checkpoint.get("config") if isinstance(checkpoint.get("config"), dict) else {}
        text_name = text_model or saved.get("TEXT_MODEL_NAME") or DEFAULT_TEXT_MODEL
        tokenizer = load_tokenizer(text_name)
        text_encoder = load_text_model(text_name, pretrained=False)
        # XLM-R's positions start after the pad id: a small text model may take fewer than 128 tokens.
        config = text_encoder.config
        limit = config.max_position_embeddings - (config.pad_token_id or 0) - 1
        if max_text_length is None:
            max_text_length = min(int(saved.get("MAX_TEXT_LENGTH") or DEFAULT_MAX_TEXT_LENGTH), limit)
        elif int(max_text_length) > limit:
            # Asked for explicitly (config.py's MAX_TEXT_LENGTH in the scripts): one line, not an index error later.
            raise ValueError(f"MAX_TEXT_LENGTH={max_text_length} is more than the text model '{text_name}' takes "
                             f"({limit} tokens); set MAX_TEXT_LENGTH={limit} or less")
        return text_name, tokenizer, text_encoder, int(max_text_length)

    def _text_runner(self, per_position: bool):
        from .extraction.core import KindRunner, TextEncoder
        from .extraction.model_inputs import RawTextEncoder

        return KindRunner(RawTextEncoder(TextEncoder(self.tokenizer)),
                          self._forward(self.model.text_states, self.model.text_global, per_position),
                          self.max_text_length, self.tokenizer.pad_token_id)

    def _text_cache_settings(self) -> Dict[str, Any]:
        return {"max_text_length": self.max_text_length, "text": self.text_fingerprint()}

    def text_fingerprint(self) -> str:
        """sha256 of the tokenizer and of the text encoder's configuration (what text features depend on)."""
        if self._text_fingerprint is None:
            from .cache import text_fingerprint

            self._text_fingerprint = text_fingerprint(self.tokenizer, self.model.text_model.config)
        return self._text_fingerprint

    def encode_text(self, texts, normalize: bool = True):
        """Features of texts: ``[n, dim]`` (``normalize``) or a list of per-token ``[L, text hidden]``.

        A text is encoded as a ``.txt`` file holding it: non-empty lines, de-duplicated, joined
        with the tokenizer's separator. A text without any non-empty line raises :class:`EncodeError`.
        """
        from .extraction.model_inputs import TEXT, RawInput

        texts = [texts] if isinstance(texts, str) else list(texts)
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"encode_text takes strings, not {type(text).__name__}")
        raws = [RawInput(TEXT, data=text) for text in texts]
        encoded = self._encode(texts, raws, {}, not normalize, use_cache=False, progress=False, desc="text",
                               width=self.dim)
        encoded.raise_for_failures()
        return encoded.features

    def encode_music(self, items, normalize: bool = True, *, errors: str = "raise", progress: bool = False,
                     abc_format: str = "auto"):
        """Features of music: paths or content of MusicXML, MIDI, standard/interleaved ABC or MTF
        (and, for CLaMP 3, audio files and MERT features).

        ``normalize``: one global feature per input, ``[n, dim]``; else a list of per-position
        ``[L, hidden]`` arrays. ``errors="raise"`` raises :class:`EncodeError` naming every input
        that could not be converted (after encoding the others, which are cached);
        ``errors="skip"`` returns an :class:`Encoded` that lists them with their reasons.
        """
        _check_errors(errors)
        encoded = self._encode_items(items, not normalize, allow_text=False, abc_format=abc_format,
                                     progress=progress, width=self.dim)
        if errors == "skip":
            return encoded
        encoded.raise_for_failures()
        return encoded.features

    def encode_files(self, items, normalize: bool = True, *, errors: str = "raise", progress: bool = True,
                     abc_format: str = "auto", root: str | os.PathLike | None = None) -> Encoded:
        """Like :meth:`encode_music`, ``.txt`` files (texts) allowed too; always an :class:`Encoded`."""
        _check_errors(errors)
        encoded = self._encode_items(items, not normalize, allow_text=True, abc_format=abc_format,
                                     progress=progress, root=Path(root) if root is not None else None, width=self.dim)
        if errors == "raise":
            encoded.raise_for_failures()
        return encoded

    def encode_folder(self, folder: str | os.PathLike, normalize: bool = True, *, include_text: bool = True,
                      errors: str = "skip", progress: bool = True, abc_format: str = "auto") -> Encoded:
        """Every supported file under ``folder`` (recursive, hidden files skipped), through the cache.

        The result's ``names`` are paths relative to ``folder``; failures are listed, not raised,
        unless ``errors="raise"``.
        """
        return self._encode_folder(folder, not normalize, include_text=include_text, errors=errors,
                                   progress=progress, abc_format=abc_format, width=self.dim)


class CLaMP2(_JointSpace):
    """CLaMP 2: text and music encoders into one space (features of dimension :attr:`dim`)."""

    model_kind = "clamp2"

    def __repr__(self) -> str:
        dims = self.model.music_model.dims
        return (f"CLaMP2({self.weights_path.name}, dim={self.dim}, patch_length={dims.patch_length}, "
                f"text_model={self.text_model_name!r}, device={self.device}, dtype={self.dtype})")

    @classmethod
    @_float32_default
    def from_pretrained(cls, weights: str | os.PathLike = "sander-wood/clamp2", text_model: Optional[str] = None, *,
                        filename: Optional[str] = None, max_text_length: Optional[int] = None, device=None,
                        dtype: str = "fp32", batch_size: int = 16, cache=None, num_workers: int = 0,
                        local_files_only: Optional[bool] = None, revision: Optional[str] = None,
                        hub_cache_dir: str | os.PathLike | None = None) -> "CLaMP2":
        """Load a CLaMP 2 checkpoint: a ``.pth`` file, a folder holding ``filename``, or a hub id.

        The model sizes come from the checkpoint's shapes. ``text_model`` (a hub id or a local
        folder) supplies the tokenizer and the text encoder's configuration; its weights are in the
        checkpoint. It defaults to the checkpoint's own ``TEXT_MODEL_NAME`` when it stores a
        config, else ``FacebookAI/xlm-roberta-base``; ``max_text_length`` likewise (else 128).
        ``cache``: ``None``/``False`` (no feature cache), ``True`` (the user cache folder), a folder
        or a :class:`~clamp2.cache.FeatureCache`.
        """
        from .checkpoint import CLAMP2, check_family, load_state, without_random_init
        from .hub import PUBLISHED_CLAMP2_WEIGHTS, resolve_weights
        from .models.clamp2 import CLaMP2Model

        _check_sizes(batch_size, num_workers, max_text_length)
        _device_and_dtype(device, dtype)  # refused before a download or a build
        path = resolve_weights(weights, filename or PUBLISHED_CLAMP2_WEIGHTS, local_files_only=local_files_only,
                               revision=revision, cache_dir=hub_cache_dir)
        checkpoint, state = _load_state(path)
        check_family(state, CLAMP2, str(path))
        dims = _infer_dims(state, "music_model.", None, path)
        with without_random_init():  # the strict load below fills every weight
            text_name, tokenizer, text_encoder, max_text_length = cls._text_settings(checkpoint, text_model,
                                                                                     max_text_length)
            model = CLaMP2Model(text_encoder, dims, hidden_size=int(state["music_proj.weight"].shape[0]))
        load_state(model, state, source=f"checkpoint {path} (text model configuration from {text_name})")
        return cls(model, tokenizer, weights_path=path, text_model=text_name, max_text_length=max_text_length,
                   device=device, dtype=dtype, batch_size=batch_size, cache=cache, num_workers=num_workers)

    def _runners(self, per_position: bool):
        from .extraction.core import KindRunner, MusicEncoder
        from .extraction.model_inputs import RawMusicEncoder
        from .patchilizer import PAD_TOKEN_ID, M3Patchilizer

        dims = self.model.music_model.dims
        return {
            "text": self._text_runner(per_position),
            "music": KindRunner(RawMusicEncoder(MusicEncoder(M3Patchilizer(dims.patch_size, dims.patch_length))),
                                self._forward(self.model.music_states, self.model.music_global, per_position),
                                dims.patch_length, PAD_TOKEN_ID),
        }

    def _settings(self, per_position: bool) -> Dict[str, Any]:
        dims = self.model.music_model.dims
        return {"patch_size": dims.patch_size, "patch_length": dims.patch_length, **self._text_cache_settings()}


class CLaMP3(_JointSpace):
    """CLaMP 3: text, symbolic music (MusicXML, MIDI, ABC, MTF) and audio in one space (docs/clamp3.md).

    Audio files go through MERT (:mod:`clamp2.extraction.mert`), loaded on the first audio file;
    MERT features already extracted (``.npy`` of ``process_data/extract_mert.py``,
    or such an array) are read directly.
    """

    model_kind = "clamp3"
    accepts_audio = True

    def __init__(self, model, tokenizer, *, variant: Optional[str] = None, mert=None, mert_batch_size: int = 8,
                 **kwargs):
        super().__init__(model, tokenizer, **kwargs)
        self.variant = variant
        self.mert_source = mert
        self.mert_batch_size = int(mert_batch_size)
        self._mert = None
        self._mert_identity: Optional[str] = None
        self._mert_loading = threading.Lock()  # two threads' first audio files load MERT once

    def __repr__(self) -> str:
        dims = self.model.symbolic_model.dims
        return (f"CLaMP3({self.weights_path.name}, variant={self.variant!r}, dim={self.dim}, "
                f"patch_length={dims.patch_length}, audio_length={self.model.audio_dims.max_length}, "
                f"text_model={self.text_model_name!r}, device={self.device}, dtype={self.dtype})")

    @classmethod
    @_float32_default
    def from_pretrained(cls, weights: str | os.PathLike = "sander-wood/clamp3", text_model: Optional[str] = None, *,
                        variant: Optional[str] = None, mert=None, filename: Optional[str] = None,
                        max_text_length: Optional[int] = None, device=None, dtype: str = "fp32",
                        batch_size: int = 16, cache=None, num_workers: int = 0, mert_batch_size: int = 8,
                        local_files_only: Optional[bool] = None, revision: Optional[str] = None,
                        hub_cache_dir: str | os.PathLike | None = None) -> "CLaMP3":
        """Load a CLaMP 3 checkpoint: a ``.pth`` file, a folder, or a hub id (``sander-wood/clamp3``).

        ``variant`` picks the published file in a folder or hub repo: ``"saas"`` (the default, best
        for audio) or ``"c2"`` (best for sheet music and MIDI); ``filename`` names another. The
        sizes come from the checkpoint's shapes; ``text_model`` and ``max_text_length`` as for
        :meth:`CLaMP2.from_pretrained`. ``mert``: MERT-v1-95M as a local folder or a hub id
        (default ``m-a-p/MERT-v1-95M``), loaded only when an audio file is encoded. ``cache`` as
        for CLaMP 2; cached features are keyed by the weights file, variant and settings too.
        """
        from .checkpoint import CLAMP3, CLAMP3_HUB_REPO, check_family, load_state, without_random_init
        from .configuration import CLAMP3_VARIANTS, check_choice
        from .hub import PUBLISHED_CLAMP3_WEIGHTS, resolve_weights
        from .models.clamp3 import CLaMP3Model, infer_audio_dims

        if variant is not None:
            check_choice("variant", variant, CLAMP3_VARIANTS)
        _check_sizes(batch_size, num_workers, max_text_length)
        _device_and_dtype(device, dtype)  # refused before a download or a build
        path = resolve_weights(weights, filename or PUBLISHED_CLAMP3_WEIGHTS[variant or "saas"],
                               local_files_only=local_files_only, revision=revision, cache_dir=hub_cache_dir,
                               repo=CLAMP3_HUB_REPO)
        checkpoint, state = _load_state(path)
        check_family(state, CLAMP3, str(path))
        dims = _infer_dims(state, "symbolic_model.", None, path)
        audio_dims = infer_audio_dims(state)
        with without_random_init():  # the strict load below fills every weight
            text_name, tokenizer, text_encoder, max_text_length = cls._text_settings(checkpoint, text_model,
                                                                                     max_text_length)
            model = CLaMP3Model(text_encoder, dims, audio_dims,
                                hidden_size=int(state["symbolic_proj.weight"].shape[0]))
        load_state(model, state, source=f"checkpoint {path} (text model configuration from {text_name})")
        if variant is None:  # named by the file: the published names say which training it is
            variant = next((v for v in CLAMP3_VARIANTS if path.name.startswith(f"weights_clamp3_{v}_")), None)
        return cls(model, tokenizer, variant=variant, mert=mert, mert_batch_size=mert_batch_size, weights_path=path,
                   text_model=text_name, max_text_length=max_text_length, device=device, dtype=dtype,
                   batch_size=batch_size, cache=cache, num_workers=num_workers)

    # -- audio --------------------------------------------------------------------------------

    def _mert_folder(self):
        from .models.mert import MERT_HUB_ID, resolve_mert_folder

        return resolve_mert_folder(self.mert_source or MERT_HUB_ID)

    def mert_identity(self) -> str:
        """sha256 of MERT's config and weights (what features of audio files depend on besides CLaMP 3)."""
        if self._mert_identity is None:
            from .cache import sha256_of_file, sha256_of_json, weights_fingerprint
            from .models.mert import weights_file

            folder = self._mert_folder()
            root = self.cache.root if self.cache is not None else None
            self._mert_identity = sha256_of_json([sha256_of_file(folder / "config.json"),
                                                  weights_fingerprint(weights_file(folder), root)])
        return self._mert_identity

    @_float32_default
    def mert_extractor(self):
        """The MERT feature extractor (:class:`~clamp2.extraction.mert.MertFeatureExtractor`), loaded on first use."""
        with self._mert_loading:
            if self._mert is None:
                from .extraction.mert import MertFeatureExtractor
                from .models.mert import load_mert

                self._mert = MertFeatureExtractor(load_mert(self._mert_folder()), self.device, self.dtype,
                                                  batch_size=self.mert_batch_size)
        return self._mert

    def _audio_unavailable(self) -> Optional[str]:
        try:
            import importlib

            importlib.import_module(f"{__package__}.extraction.mert")
        except ImportError:
            return ("audio files need MERT features, and this installation has no MERT module: run "
                    "process_data/extract_mert.py and encode the .npy files it writes")
        return None

    def _entry_kind(self, raw) -> str:
        from .extraction.model_inputs import AUDIO

        if raw.kind != AUDIO:
            return super()._entry_kind(raw)
        # An audio file's feature depends on MERT too: its key holds MERT's identity.
        try:
            return f"{raw.kind}:{self.mert_identity()}"
        except (ImportError, OSError, ValueError):
            return f"{raw.kind}:unavailable"  # _prepare reports why; nothing is cached for it

    def _prepare(self, raws: Dict[int, Any], failures: Dict[int, str]) -> None:
        """Audio files → their MERT features ``[1, n, D]`` (as ``process_data/extract_mert.py`` saves them)."""
        import io

        from .extraction.model_inputs import AUDIO, MERT, RawInput, _as_file, audio_suffix

        audio = [i for i, raw in raws.items() if raw.kind == AUDIO]
        if not audio:
            return
        problem = self._audio_unavailable()
        if problem is None:
            try:
                extractor = self.mert_extractor()
            except (OSError, RuntimeError, ValueError) as exc:
                problem = f"cannot load MERT: {' '.join(str(exc).split())}"
        for i in audio:
            if problem is not None:
                failures[i] = problem
                continue
            raw = raws[i]
            suffix = raw.path.suffix if raw.path is not None else (audio_suffix(raw.content()) or ".wav")
            try:
                with _as_file(raw, suffix) as path:
                    rows = extractor.features(path)
            except ValueError as exc:  # AudioError: undecodable, empty, shorter than 1 s
                failures[i] = str(exc)
                continue
            except Exception as exc:  # noqa: BLE001 - one bad file must never stop the others
                failures[i] = f"{type(exc).__name__}: {exc}"
                continue
            buffer = io.BytesIO()
            np.save(buffer, rows[None].astype(np.float32, copy=False))
            raws[i] = RawInput(MERT, data=buffer.getvalue())

    # -- runners ------------------------------------------------------------------------------

    def _runner_kind(self, raw) -> str:
        from .extraction.model_inputs import AUDIO, MERT, TEXT

        return "text" if raw.kind == TEXT else "audio" if raw.kind in (AUDIO, MERT) else "symbolic"

    def _runners(self, per_position: bool):
        import torch

        from .extraction.core import AudioEncoder, KindRunner, MusicEncoder
        from .extraction.model_inputs import RawAudioEncoder, RawMusicEncoder
        from .patchilizer import PAD_TOKEN_ID, M3Patchilizer

        dims, audio = self.model.symbolic_model.dims, self.model.audio_dims
        model = self.model
        # CLaMP 3 reads MIDI in its own MTF mode and removes every "L:1/8\n".
        symbolic = RawMusicEncoder(MusicEncoder(M3Patchilizer(dims.patch_size, dims.patch_length),
                                                remove_unit_length=True, also_mtf=True), midi_mode="clamp3")
        return {
            "text": self._text_runner(per_position),
            "symbolic": KindRunner(symbolic, self._forward(model.symbolic_states, model.symbolic_global, per_position),
                                   dims.patch_length, PAD_TOKEN_ID),
            "audio": KindRunner(RawAudioEncoder(AudioEncoder(audio.hidden_size)),
                                self._forward(model.audio_states, model.audio_global, per_position),
                                audio.max_length, 0.0, dtype=torch.float32),
        }

    def _settings(self, per_position: bool) -> Dict[str, Any]:
        from .extraction.model_inputs import CLAMP3_CONVERTER_SETTINGS

        dims, audio = self.model.symbolic_model.dims, self.model.audio_dims
        return {"variant": self.variant, "patch_size": dims.patch_size, "patch_length": dims.patch_length,
                "audio_length": audio.max_length, "remove_unit_length": "abc and mtf",
                "converters": CLAMP3_CONVERTER_SETTINGS, **self._text_cache_settings()}

    def encode_audio(self, items, normalize: bool = True, *, errors: str = "raise", progress: bool = False):
        """Features of audio: audio files (``.wav/.flac/.ogg/.mp3``, paths or bytes, through MERT) or MERT
        features (``.npy`` paths or bytes, or arrays ``[1, n, D]``). As :meth:`encode_music` otherwise."""
        from .extraction.core import InputError
        from .extraction.model_inputs import AUDIO, MERT

        _check_errors(errors)
        from .extraction.model_inputs import is_array

        # One array of MERT features is one input; an array of paths (NumPy strings) is a list of them.
        items = [items] if is_array(items) and items.dtype.kind not in "US" else _as_list(items)
        raws, failures = self._resolve(items, allow_text=False, abc_format="auto")
        for i, raw in enumerate(raws):
            if raw is not None and raw.kind not in (AUDIO, MERT):
                raws[i], failures[i] = None, str(InputError("not audio: encode symbolic music with encode_music"))
        encoded = self._encode(items, raws, failures, not normalize, use_cache=True, progress=progress,
                               desc=self.model_kind, width=self.dim)
        if errors == "skip":
            return encoded
        encoded.raise_for_failures()
        return encoded.features


class M3(_Extractor):
    """The M3 music encoder: per-patch features ``[L, hidden]`` (``L:1/8`` lines removed from ABC first)."""

    model_kind = "m3"

    def __init__(self, encoder, *, weights_path: Path, device=None, dtype: str = "fp32", batch_size: int = 16,
                 cache=None, num_workers: int = 0, files_per_chunk: int = 64):
        super().__init__(weights_path=weights_path, device=device, dtype=dtype, batch_size=batch_size, cache=cache,
                         num_workers=num_workers, files_per_chunk=files_per_chunk)
        self.encoder = encoder.eval().to(self.device)

    def __repr__(self) -> str:
        dims = self.encoder.dims
        return (f"M3({self.weights_path.name}, hidden={dims.hidden_size}, patch_length={dims.patch_length}, "
                f"device={self.device}, dtype={self.dtype})")

    @classmethod
    @_float32_default
    def from_pretrained(cls, weights: str | os.PathLike = "sander-wood/clamp2", *, filename: Optional[str] = None,
                        device=None, dtype: str = "fp32", batch_size: int = 16, cache=None, num_workers: int = 0,
                        local_files_only: Optional[bool] = None, revision: Optional[str] = None,
                        hub_cache_dir: str | os.PathLike | None = None) -> "M3":
        """Load the M3 encoder from an M3 checkpoint (a ``.pth`` file, a folder or a hub id); sizes from its shapes."""
        from .checkpoint import M3 as M3_FAMILY, check_family, load_state, sub_state_dict, without_random_init
        from .hub import PUBLISHED_M3_WEIGHTS, resolve_weights
        from .models.m3 import M3PatchEncoder

        _check_sizes(batch_size, num_workers)
        _device_and_dtype(device, dtype)  # refused before a download or a build
        path = resolve_weights(weights, filename or PUBLISHED_M3_WEIGHTS, local_files_only=local_files_only,
                               revision=revision, cache_dir=hub_cache_dir)
        _, state = _load_state(path)
        check_family(state, M3_FAMILY, str(path))  # a CLaMP 2 / CLaMP 3 / probe file is named as such
        dims = _infer_dims(state, "encoder.", "decoder.", path)
        with without_random_init():  # the strict load below fills every weight
            encoder = M3PatchEncoder(dims)
        load_state(encoder, sub_state_dict(state, "encoder."), source=f"checkpoint {path} (entries 'encoder.*')")
        return cls(encoder, weights_path=path, device=device, dtype=dtype, batch_size=batch_size, cache=cache,
                   num_workers=num_workers)

    @property
    def dim(self) -> int:
        return int(self.encoder.dims.hidden_size)

    def _runners(self, per_position: bool):
        from .extraction.core import KindRunner, MusicEncoder
        from .extraction.model_inputs import RawMusicEncoder
        from .patchilizer import PAD_TOKEN_ID, M3Patchilizer

        dims = self.encoder.dims
        encode = RawMusicEncoder(MusicEncoder(M3Patchilizer(dims.patch_size, dims.patch_length), remove_unit_length=True))
        return {"music": KindRunner(encode, self._forward(self.encoder, self.encoder, True), dims.patch_length,
                                    PAD_TOKEN_ID)}

    def _settings(self, per_position: bool) -> Dict[str, Any]:
        dims = self.encoder.dims
        return {"patch_size": dims.patch_size, "patch_length": dims.patch_length, "remove_unit_length": True}

    def encode(self, items, *, errors: str = "raise", progress: bool = False, abc_format: str = "auto"):
        """Per-patch features of music (paths or content, any supported format): a list of ``[L, hidden]``.

        ``errors`` as in :meth:`CLaMP2.encode_music`.
        """
        _check_errors(errors)
        encoded = self._encode_items(items, True, allow_text=False, abc_format=abc_format, progress=progress)
        if errors == "skip":
            return encoded
        encoded.raise_for_failures()
        return encoded.features

    def encode_folder(self, folder: str | os.PathLike, *, errors: str = "skip", progress: bool = True,
                      abc_format: str = "auto") -> Encoded:
        return self._encode_folder(folder, True, include_text=False, errors=errors, progress=progress,
                                   abc_format=abc_format)


# -- command-line options shared by the scripts that load CLaMP 2 ------------------------------------

def configured_max_text_length(cfg) -> Optional[int]:
    """config.py's MAX_TEXT_LENGTH when it was set to something other than the published 128, else None
    (the checkpoint's own setting, capped at what the text model takes). A value that was asked for
    and does not fit the text model is then one clear error instead of a silent cut."""
    value = int(cfg.MAX_TEXT_LENGTH)
    return None if value == DEFAULT_MAX_TEXT_LENGTH else value


CLAMP2_WEIGHTS_HELP = ("CLaMP 2 checkpoint file, folder or hub id such as sander-wood/clamp2 "
                       "(default: config.py's CLAMP2_WEIGHTS_PATH)")


def add_model_arguments(parser, *, weights_help: str = CLAMP2_WEIGHTS_HELP) -> None:
    """``--weights``, ``--text_model``, ``--batch_size``, ``--dtype``, ``--device``, ``--num_workers``,
    ``--cache``/``--no_cache``, ``--no_progress``: the options of ``code/extract_clamp2.py`` plus the cache.

    ``weights_help`` replaces the help of ``--weights`` for scripts whose default model is not CLaMP 2."""
    from .cache import add_cache_arguments

    parser.add_argument("--weights", default=None, help=weights_help)
    parser.add_argument("--text_model", default=None,
                        help="text model hub id or local folder for the tokenizer/architecture (default: config TEXT_MODEL_NAME)")
    parser.add_argument("--batch_size", type=int, default=16, help="windows per forward pass (default 16)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="compute precision; bf16/fp16 need CUDA (default fp32, exact)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--num_workers", type=int, default=min(4, max(0, (os.cpu_count() or 1) - 1)),
                        help="processes that convert and tokenize files ahead of the model (default: min(4, CPU "
                             "cores - 1); 0: in the main process)")
    add_cache_arguments(parser)
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")


def clamp2_from_args(args, cfg) -> CLaMP2:
    """The model the options ask for; defaults from ``code/config.py`` (``cfg``). Raises OSError/RuntimeError/ValueError."""
    from .cache import cache_from_args

    return CLaMP2.from_pretrained(args.weights or cfg.CLAMP2_WEIGHTS_PATH, text_model=args.text_model or cfg.TEXT_MODEL_NAME,
                                  max_text_length=configured_max_text_length(cfg), device=args.device, dtype=args.dtype,
                                  batch_size=args.batch_size, cache=cache_from_args(args), num_workers=args.num_workers)
