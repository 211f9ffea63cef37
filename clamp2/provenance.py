"""Which code wrote a file: the package's version number stays 0.1.0 from commit to commit, so records (an
extraction folder's settings, an index manifest, a quick-start step's marker) carry a hash of the source too."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Iterable

PACKAGE = Path(__file__).resolve().parent


def source_fingerprint(package: Path, patterns: Iterable[str]) -> str:
    """sha256 of the files of ``package`` that ``patterns`` (globs) match, names and bytes."""
    sha = hashlib.sha256()
    for pattern in patterns:
        for path in sorted(package.glob(pattern)):
            sha.update(path.relative_to(package).as_posix().encode("utf-8") + b"\0" + path.read_bytes())
    return sha.hexdigest()


@functools.cache
def code_version() -> str:
    """sha256 of this package's Python source; read once per process."""
    return source_fingerprint(PACKAGE, ("**/*.py",))


def written_by() -> str:
    """``clamp2 0.1.0 (code <12 hex digits>)``: the package that wrote a record, told apart from commit to commit."""
    from . import __version__

    return f"clamp2 {__version__} (code {code_version()[:12]})"
