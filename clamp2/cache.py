"""Content-hash feature cache: a file is encoded once per model and settings, and again only when it changes.

An entry's key is the sha256 of the input's bytes (and its kind: the same bytes as ``.abc`` and as
``.txt`` are different inputs); entries live in a *namespace* per model and settings, whose name is
the sha256 of: the weights file's sha256, the model kind, global vs per-position features, the
compute precision, the window lengths, the text model's tokenizer and configuration, the converter
settings and versions, this package's own code that turns a file into a feature (:func:`code_fingerprint`:
a new version of, say, the ABC repairs must not be served the features of the old one), and
:data:`FEATURE_FORMAT`. Editing a file changes its key, so it is re-encoded; nothing ever has to be
invalidated by hand (CLaMP 3's cache, keyed by file name, silently serves stale features).

Layout under the cache folder (default: the user cache folder, ``~/.cache/clamp2`` on Linux)::

    features/<namespace>/settings.json           what the namespace holds (for ``info``)
    features/<namespace>/<key[:2]>/<key>.npy     one feature, as extraction saves it, then the sha256 of its
                                                 name and bytes
    weights/<path, size, times, inode hash>.sha256   memoized weights hashes (a 3 GB file is hashed once)

Every write is a temporary file and a rename, so several processes can fill one cache at once;
an unreadable entry, or one whose bytes do not match the sha256 that ends it, is treated as missing
and rewritten.

    clamp2-cache info [--cache DIR]      python -m clamp2.cache info
    clamp2-cache clear [--cache DIR]     python -m clamp2.cache clear
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

from .files import atomic_path, atomic_write_text
from .provenance import source_fingerprint

# 2: each entry ends with the sha256 of its .npy bytes (a damaged entry is encoded again, never served).
# 3: that sha256 also covers the entry's namespace and key (an intact entry under another name is not served).
FEATURE_FORMAT = 3
APP_NAME = "clamp2"
# The package's modules between a file's bytes and its feature: conversion, model inputs, models, weights loading.
FEATURE_CODE = ("convert/abc.py", "convert/abc_repair.py", "convert/mtf.py", "extraction/*.py", "models/*.py",
                "patchilizer.py", "text_model.py", "attention.py", "checkpoint.py")

_weights_hashes: Dict[tuple, str] = {}
_DIGEST_SIZE = 32  # the sha256 at the end of each entry


def default_cache_dir() -> Path:
    """The user cache folder (platformdirs: ``$XDG_CACHE_HOME/clamp2``, ``~/Library/Caches/clamp2``...)."""
    from platformdirs import user_cache_dir

    return Path(user_cache_dir(APP_NAME, appauthor=False))


def sha256_of_file(path: str | os.PathLike) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            sha.update(block)
    return sha.hexdigest()


def sha256_of_json(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode("utf-8")).hexdigest()


@functools.cache
def code_fingerprint() -> str:
    """sha256 of the source of :data:`FEATURE_CODE` (any edit there, even a comment, starts new entries:
    a re-encode is cheap next to a stale feature); read once per process."""
    return source_fingerprint(Path(__file__).parent, FEATURE_CODE)


def user_weights_fingerprint(path: str | os.PathLike) -> str:
    """sha256 of a weights file, memoized in the user cache folder (a 3 GB file is hashed once, not every run)."""
    try:
        cache_dir = default_cache_dir()
    except Exception:  # no home folder: hash every run
        cache_dir = None
    return weights_fingerprint(path, cache_dir)


TEXT_ARCHITECTURE_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                          "intermediate_size", "hidden_act", "max_position_embeddings", "type_vocab_size",
                          "layer_norm_eps", "pad_token_id", "position_embedding_type")


def text_fingerprint(tokenizer, config) -> str:
    """sha256 of a tokenizer and of the text encoder's configuration (what text features depend on besides weights).

    Independent of where they were loaded from: a hub id and a local copy of it give the same identity."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    # The architecture alone: the generic keys every transformers version adds or drops (use_bfloat16, torchscript,
    # return_dict, generation defaults...) would make an upgrade refuse every recorded output folder.
    values = {k: v for k, v in config.to_dict().items() if k in TEXT_ARCHITECTURE_KEYS}
    return sha256_of_json([vocabulary, values])


def extraction_settings(tool: str, weights: str | os.PathLike, global_features: bool, dtype: str, windows: list,
                        tokenizer=None, text_config=None, **more: Any) -> Dict[str, Any]:
    """What an extraction script's features depend on, for its output folder's record
    (:mod:`clamp2.extraction.record`): tool, weights, global or per-position, precision, window lengths, and the
    text model when it encodes text."""
    settings = {"tool": tool, "weights_sha256": user_weights_fingerprint(weights),
                "features": "global" if global_features else "per-position", "dtype": dtype, "windows": list(windows)}
    if tokenizer is not None:
        settings["text_sha256"] = text_fingerprint(tokenizer, text_config)
    settings.update(more)
    return settings


def file_identity(path: str | os.PathLike) -> tuple:
    """(real path, size, mtime, change time, inode): what tells that a file was replaced, even by a copy
    with the same size and modification time. Raises ``OSError`` when the file cannot be read."""
    real = os.path.realpath(path)
    stat = os.stat(real)
    return real, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino


def weights_fingerprint(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> str:
    """sha256 of a weights file, memoized by (real path, size, mtime, change time, inode) in memory and
    under ``cache_dir``: other weights copied over the file with the same size and modification time
    (``cp -p``, ``os.utime``) still have another change time or inode, so they are hashed again."""
    identity = file_identity(path)
    real = identity[0]
    if identity in _weights_hashes:
        return _weights_hashes[identity]
    memo = None
    if cache_dir is not None:
        memo = Path(cache_dir) / "weights" / (sha256_of_json(list(identity)) + ".sha256")
        try:
            digest = (_read_regular_file(memo) or b"").decode("ascii").strip()
            if len(digest) == 64:
                _weights_hashes[identity] = digest
                return digest
        except UnicodeDecodeError:
            pass
    digest = sha256_of_file(real)
    _weights_hashes[identity] = digest
    if memo is not None:
        try:
            atomic_write_text(memo, digest + "\n")
        except OSError:
            pass  # a read-only cache only costs the hashing again
    return digest


class FeatureCache:
    """A cache folder; :meth:`namespace` gives the entries of one model and settings."""

    def __init__(self, root: str | os.PathLike | None = None):
        if root is not None and not os.fspath(root):
            # Path("") is the current folder: an unset variable (os.environ.get("CACHE", "")) would fill it.
            raise ValueError("the feature cache path is empty; give a folder, True for the default cache "
                             f"({default_cache_dir()}), or None for no cache")
        self.root = Path(root) if root is not None else default_cache_dir()

    def __repr__(self) -> str:
        return f"FeatureCache({str(self.root)!r})"

    @property
    def features_dir(self) -> Path:
        return self.root / "features"

    def namespace(self, settings: Mapping[str, Any], about: Optional[Mapping[str, Any]] = None) -> "CacheNamespace":
        """The entries for ``settings`` (hashed into the name); ``about`` is only shown by ``info``."""
        settings = {"feature_format": FEATURE_FORMAT, **settings}
        return CacheNamespace(self.features_dir / sha256_of_json(settings)[:24], settings, dict(about or {}))

    def info(self) -> List[dict]:
        """One dict per namespace: its folder, settings, about, entry count and size in bytes."""
        found = []
        if not self.features_dir.is_dir():
            return found
        for folder in sorted(p for p in self.features_dir.iterdir() if p.is_dir()):
            try:
                described = json.loads((folder / "settings.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                described = {}
            files = [p for p in folder.glob("*/*.npy")]
            found.append({"folder": folder, "settings": described.get("settings", {}),
                          "about": described.get("about", {}), "entries": len(files),
                          "bytes": sum(_size(p) for p in files)})
        return found

    def clear(self) -> int:
        """Remove every entry and memo; returns the number of features removed."""
        removed = sum(entry["entries"] for entry in self.info())
        for name in ("features", "weights"):
            folder = self.root / name
            if folder.is_symlink():  # moved to another disk and linked: its contents go, the link stays
                if not folder.is_dir():  # a dangling link (that disk not mounted): nothing here to clear
                    continue
                for child in folder.iterdir():
                    shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
            elif folder.exists():
                shutil.rmtree(folder)  # an entry that cannot be removed (a read-only disk) is an OSError
        return removed


class CacheNamespace:
    def __init__(self, folder: Path, settings: Dict[str, Any], about: Dict[str, Any]):
        self.folder, self.settings, self.about = folder, settings, about
        self._described = False

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.npy"

    def get(self, key: str):
        """The cached feature, or None (absent, unreadable, or its bytes do not match their sha256:
        it will be rewritten)."""
        import io

        import numpy as np

        data = _read_regular_file(self.path(key))
        if data is None:
            return None
        body, digest = data[:-_DIGEST_SIZE], data[-_DIGEST_SIZE:]
        if len(data) <= _DIGEST_SIZE or self._digest(key, body) != digest:
            return None
        try:
            return np.load(io.BytesIO(body), allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None

    def put(self, key: str, feature) -> None:
        """Store ``feature``: its ``.npy`` bytes followed by their sha256."""
        import io

        import numpy as np

        if not self._described:
            self._describe()
        buffer = io.BytesIO()
        np.save(buffer, feature)
        body = buffer.getvalue()
        with atomic_path(self.path(key)) as tmp:
            with open(tmp, "wb") as f:
                f.write(body + self._digest(key, body))

    def _digest(self, key: str, body: bytes) -> bytes:
        """sha256 of an entry's name (namespace, key) and bytes: a valid entry copied or renamed under another
        key (another file's feature, another shape) does not match and is encoded again."""
        return hashlib.sha256(f"{self.folder.name}/{key}\0".encode("utf-8") + body).digest()

    def _describe(self) -> None:
        target = self.folder / "settings.json"
        if not target.exists():
            atomic_write_text(target, json.dumps({"settings": self.settings, "about": self.about}, indent=1,
                                                 sort_keys=True, default=str) + "\n")
        self._described = True


def _read_regular_file(path: Path) -> Optional[bytes]:
    """The bytes of ``path`` if it is a regular file (not a link, FIFO or device: entries are only ever written as
    regular files; reading a link to a FIFO waited forever, one to /dev/zero filled the memory), else None."""
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read()
    except OSError:
        return None
    finally:
        os.close(fd)


def entry_key(kind: str, digest: str) -> str:
    return hashlib.sha256(f"{kind}\0{digest}".encode("ascii")).hexdigest()


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


# -- options shared by the scripts -------------------------------------------------------------------

def add_cache_arguments(parser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--cache", type=Path, default=None, metavar="DIR",
                       help=f"feature cache folder (default: {default_cache_dir()})")
    group.add_argument("--no_cache", action="store_true", help="encode every file, read and write no cache")


def cache_from_args(args) -> Optional[FeatureCache]:
    return None if args.no_cache else FeatureCache(args.cache)


# -- clamp2-cache ------------------------------------------------------------------------------------

def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def parse_args(argv=None):
    from .cli import ArgumentParser

    parser = ArgumentParser(prog="clamp2-cache", description="Show or empty the CLaMP 2 feature cache.\n\n"
                            "    clamp2-cache info [--cache DIR]\n    clamp2-cache clear [--cache DIR]")
    parser.add_argument("command", choices=("info", "clear"))
    parser.add_argument("--cache", type=Path, default=None, metavar="DIR",
                        help=f"cache folder (default: {default_cache_dir()})")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cache = FeatureCache(args.cache)
    if args.command == "clear":
        try:
            removed = cache.clear()
        except OSError as error:
            left = sum(n["entries"] for n in cache.info())
            print(f"error: cannot clear the feature cache {cache.root}: {error.strerror or error}; "
                  f"{left} cached features are left", file=sys.stderr)
            return 1
        print(f"removed {removed} cached features from {cache.root}")
        return 0
    namespaces = cache.info()
    total = sum(n["entries"] for n in namespaces)
    size = sum(n["bytes"] for n in namespaces)
    print(f"{cache.root}: {total} features, {_megabytes(size)}, {len(namespaces)} model/settings groups")
    for n in namespaces:
        settings, about = n["settings"], n["about"]
        shape = "global" if settings.get("per_position") is False else "per-position"
        # An older version's groups (another format, other code between a file and its feature) are never read
        # again; they look the same as this version's otherwise.
        stale = (settings.get("feature_format") != FEATURE_FORMAT
                 or settings.get("code_sha256", code_fingerprint()) != code_fingerprint())
        print(f"  {n['folder'].name}  {settings.get('model', '?')} {about.get('weights', '?')}  {shape} "
              f"{settings.get('dtype', '?')}  {n['entries']} features, {_megabytes(n['bytes'])}"
              + ("  (another version's: never read by this one; `clear` removes it)" if stale else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
