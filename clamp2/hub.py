"""Where weights come from: a local file, a local folder, or a Hugging Face hub id.

A hub id (``sander-wood/clamp2``) is resolved through ``huggingface_hub``'s own cache
(``~/.cache/huggingface/hub``, or ``HF_HUB_CACHE`` / ``HF_HOME``), so a file downloaded once with
``hf download`` is found again without network. Offline (``HF_HUB_OFFLINE=1``) only that cache is
looked at. Online, the cache is looked at first and the hub is asked only for what is missing,
after one quick reachability probe: a machine without network hears so within seconds instead of
after huggingface_hub's retries with back-off. A file that cannot be found is one line naming it
and the command that fetches it.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Optional

from . import checkpoint as _checkpoint
from .checkpoint import HUB_REPO, download_command, where_to_get

# The published names live in checkpoint.py (its messages name them); here too, where callers look.
PUBLISHED_CLAMP2_WEIGHTS = _checkpoint.PUBLISHED_CLAMP2_WEIGHTS
PUBLISHED_M3_WEIGHTS = _checkpoint.PUBLISHED_M3_WEIGHTS
PUBLISHED_CLAMP3_WEIGHTS = _checkpoint.PUBLISHED_CLAMP3_WEIGHTS
PUBLISHED_WEIGHTS = _checkpoint.PUBLISHED_WEIGHTS
DEFAULT_TEXT_MODEL = _checkpoint.DEFAULT_TEXT_MODEL

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
_TRUE = {"1", "true", "yes", "on"}


class WeightsNotFound(FileNotFoundError):
    """A weights file that is neither on disk nor in the hub cache (and cannot be downloaded)."""


def is_hub_id(text: str) -> bool:
    """``org/name`` that is not a checkpoint file name (``runs/weights.pth`` is a path)."""
    return bool(_HUB_ID.fullmatch(text)) and not text.lower().endswith((".pth", ".pt", ".bin", ".safetensors"))


def hub_offline() -> bool:
    return any(os.environ.get(name, "").strip().lower() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


# Seconds the reachability probe waits for the hub (or the proxy) to accept a connection.
PROBE_TIMEOUT = 3.0
_reachable: dict = {}


def hub_reachable(timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether the hub's endpoint (``HF_ENDPOINT``, or the HTTPS proxy) accepts a TCP connection within ``timeout``.

    Name resolution is bounded too (it runs in a daemon thread); the answer is kept per process.
    """
    import socket
    import threading
    from urllib.parse import urlparse

    from huggingface_hub import constants

    proxy = next((os.environ[n] for n in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy") if os.environ.get(n)), "")
    url = urlparse(proxy if "://" in proxy else (f"http://{proxy}" if proxy else constants.ENDPOINT))
    address = (url.hostname or "", url.port or (443 if url.scheme == "https" else 80))
    if address in _reachable:
        return _reachable[address]
    answer = []

    def connect():
        try:
            socket.create_connection(address, timeout=timeout).close()
            answer.append(True)
        except OSError:
            answer.append(False)

    thread = threading.Thread(target=connect, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    _reachable[address] = bool(answer and answer[0])
    return _reachable[address]


def resolve_weights(weights: str | os.PathLike, filename: str, *, local_files_only: Optional[bool] = None,
                    revision: Optional[str] = None, cache_dir: str | os.PathLike | None = None,
                    repo: str = HUB_REPO) -> Path:
    """The local path of ``weights``: a file, ``<folder>/<filename>``, or ``filename`` of hub repo ``weights``.

    ``local_files_only`` defaults to on when ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` is set;
    ``cache_dir`` is the hub cache (default: huggingface_hub's); ``repo`` is the one the messages
    name for a missing local file. Raises :class:`WeightsNotFound`.
    """
    path = Path(weights)
    if path.is_file():
        return path
    if path.is_dir():
        if (path / filename).is_file():
            return path / filename
        raise WeightsNotFound(f"no {filename} in folder {path}; download it with "
                              f"`{download_command(repo, filename)} --local-dir {path}` or pass the file itself")
    text = os.fspath(weights)
    if not is_hub_id(text):
        # As checkpoint.missing_weights_message: a typo is likelier than an undownloaded file.
        raise WeightsNotFound(f"weights file not found: {text}; check the path{where_to_get(repo, path.name)}; "
                              f"or pass a hub id such as {repo}")
    return _hub_file(text, filename, local_files_only=hub_offline() if local_files_only is None else local_files_only,
                     revision=revision, cache_dir=cache_dir)


def _hub_file(repo_id: str, filename: str, *, local_files_only: bool, revision: Optional[str],
              cache_dir: str | os.PathLike | None) -> Path:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    command = download_command(repo_id, filename)
    where = cache_dir or constants.HF_HUB_CACHE
    # A published file asked of the other published repo (CLaMP 3's weights of sander-wood/clamp2) and not
    # found there: the repo that publishes it, not a download command that would fail.
    home = next((repo for repo, files in PUBLISHED_WEIGHTS.items() if repo_id in PUBLISHED_WEIGHTS
                 and repo != repo_id and filename in files.values()), None)
    elsewhere = (f"{filename} is published in the Hugging Face repo {home}, not in {repo_id}: pass the hub id {home} "
                 f"(download: `{download_command(home, filename)}`)") if home else None
    try:
        if not local_files_only:
            try:  # a file cached once is used as is: no network round trip, none needed
                return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir,
                                            local_files_only=True))
            except LocalEntryNotFoundError:
                if not hub_reachable():
                    raise
        return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir,
                                    local_files_only=local_files_only))
    except LocalEntryNotFoundError:
        if elsewhere:
            raise WeightsNotFound(elsewhere) from None
        why = "downloads are off (offline)" if local_files_only else "the hub cannot be reached"
        raise WeightsNotFound(f"{filename} of {repo_id} is not in the Hugging Face cache ({where}) and {why}; "
                              f"download it where there is network with `{command}`") from None
    except RepositoryNotFoundError:
        raise WeightsNotFound(f"{repo_id} is neither a local file nor a Hugging Face repository") from None
    except RevisionNotFoundError:
        raise WeightsNotFound(f"{repo_id} has no revision {revision!r}") from None
    except EntryNotFoundError:
        if elsewhere:
            raise WeightsNotFound(elsewhere) from None
        raise WeightsNotFound(f"the Hugging Face repository {repo_id} has no file {filename}; "
                              "pass the file name that it holds") from None
    except (HfHubHTTPError, OSError) as exc:
        detail = " ".join(str(exc).split())
        raise WeightsNotFound(f"cannot fetch {filename} of {repo_id} ({detail}); download it with `{command}`") from None
