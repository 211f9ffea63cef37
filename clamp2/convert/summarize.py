"""Multilingual summaries of music metadata by an LLM (SPEC §11) and their merge into training JSONL (§7).

For every metadata ``.json`` file (one per piece, with ``filepaths``) an OpenAI-compatible
chat-completions endpoint is asked for an English summary plus the same summary in one language
of the 100 CLaMP 2 languages (``clamp2/data/languages.txt``). Users run this over hundreds of
thousands of files and pay per request, so the batch driver is built so that nothing is lost or
paid for twice:

- an output that exists is skipped (re-running resumes), outputs are written atomically;
- the language of a file is a function of ``(seed, relative path)`` only, so it does not depend on
  worker scheduling or on which files were skipped on a resume;
- rate limits, 5xx answers, timeouts and connection errors are retried with capped exponential
  back-off and full jitter; other API errors fail the file without retry;
- 401/403/404 (wrong key, no access to the model, wrong model name or base URL) would fail every
  file identically, so they abort the whole run instead of paying nothing for a log full of them;
- the API key is only ever held by the client; every failure reason is redacted before it is
  logged.

Public API: :func:`load_languages`, :func:`choose_language`, :func:`load_prompt`, :func:`build_messages`,
:func:`strip_code_fence`, :func:`parse_answer`, :func:`build_output`, :func:`make_client`,
:func:`request_summary`, :func:`backoff_delay`, :func:`summarize_folder`, :func:`merge_summaries`.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import random
import re
import socket
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Callable

import openai

from clamp2.files import (ONE_FILE_THERE, atomic_write_text, disk_full_error, find_files, finished_output, log_line,
                          lower_case_extensions_first, mirror_path, output_aliases, unlink_if_link, write_file_log)

FAILURE_LOG_NAME = "failed_summaries.log"
DEFAULT_SEED = 0
# Fields the pipeline itself adds; an input that already has them must not send them as metadata.
SUMMARY_FIELDS = ("summary_en", "summary_nen")


# --------------------------------------------------------------------------------------------------
# Languages


def load_languages(path: str | os.PathLike | None = None) -> list[str]:
    """The non-English languages to choose from: the packaged list of 100, or one per line of ``path``.

    Blank lines are ignored and duplicates kept once (first occurrence), so the order, and with it
    every seeded choice, is that of the file. English is refused: ``summary_nen`` is by definition
    a non-English summary.
    """
    if path is None:
        # clamp2.data is a regular package so that this works however clamp2 itself was installed.
        text = resources.files("clamp2.data").joinpath("languages.txt").read_text(encoding="utf-8")
    else:
        text = Path(path).read_text(encoding="utf-8")
    languages = list(dict.fromkeys(line.strip() for line in text.splitlines() if line.strip()))
    if not languages:
        raise ValueError(f"no languages in {path or 'the packaged list'}")
    if any(language.casefold() == "english" for language in languages):
        raise ValueError("the language list must not contain English (summary_nen is non-English)")
    return languages


def choose_language(seed: int, relative_path: str, languages: list[str]) -> str:
    """The language of one file: ``random.Random(f"{seed}:{relative_path}").choice(languages)`` (for a name that
    is not UTF-8, seeded with its bytes).

    Seeding from the file's own relative path (POSIX form) instead of drawing from one shared
    generator makes the choice independent of worker scheduling and of which files a resumed run
    skips; a string seed is hashed with SHA-512 by ``random``, so it is stable across processes
    and Python's hash randomisation.
    """
    # Seeded with the UTF-8 bytes (what a str seed hashes); surrogateescape: a file name that is not UTF-8 reaches
    # Python as lone surrogates, which strict encoding refused (the exception ended the whole run), so it seeds with
    # its bytes as the file system has them. Every UTF-8 name draws the language it drew before.
    return random.Random(f"{seed}:{relative_path}".encode("utf-8", "surrogateescape")).choice(languages)


# --------------------------------------------------------------------------------------------------
# Prompt

SYSTEM_PROMPT = (
    "You are a music expert. You will be given the metadata of a piece of music in JSON format. "
    "Using only this metadata, write a concise, comprehensive and coherent summary of the piece "
    "in English, then translate that summary into the language given by the \"nen_language\" "
    "field. Output only JSON in exactly this format:\n"
    '{"summary_en": "<the summary in English>", "summary_nen": {"language": "<the language given '
    'by nen_language>", "summary": "<the summary in that language>"}}\n'
    "If there is too little musical information in the metadata to write a meaningful summary, "
    "output only the word None."
)

# This project's wording; the reference's structure: one rich example answered in full and one sparse
# example answered None. The reference's own wording differs (docs/differences.md); `--prompt` sends any.
FEW_SHOT_EXAMPLES: list[tuple[dict[str, Any], str]] = [
    (
        {
            "title": "Hard Times Come Again No More",
            "composer": "Stephen Foster",
            "genres": ["Folk", "Parlor song"],
            "description": "An American parlor song published in 1854 that asks listeners to "
                           "remember the poor and the suffering amid their own comforts.",
            "lyrics": "Let us pause in life's pleasures and count its many tears,\n"
                      "While we all sup sorrow with the poor;",
            "tags": ["19th century", "ballad"],
            "ensembles": ["Voice and piano"],
            "instruments": ["Voice", "Piano"],
            "nen_language": "German",
        },
        json.dumps(
            {
                "summary_en": "\"Hard Times Come Again No More\" is a parlor song by Stephen Foster, "
                              "published in 1854. Set for voice and piano, this folk ballad asks "
                              "listeners to pause amid life's pleasures and remember the poor; its "
                              "gentle, sorrowful melody and refrain turn private comfort into "
                              "compassion.",
                "summary_nen": {
                    "language": "German",
                    "summary": "„Hard Times Come Again No More“ ist ein 1854 veröffentlichtes "
                               "Salonlied von Stephen Foster. Die volksliedhafte Ballade für Gesang "
                               "und Klavier bittet die Zuhörer, inmitten der Freuden des Lebens "
                               "innezuhalten und an die Armen zu denken; ihre sanfte, wehmütige "
                               "Melodie und ihr Refrain verwandeln privates Behagen in Mitgefühl.",
                },
            },
            ensure_ascii=False,
        ),
    ),
    ({"title": "Track 07", "nen_language": "Japanese"}, "None"),
]


@dataclass(frozen=True)
class Prompt:
    """What precedes a piece's metadata: the system prompt, then (user, assistant) exchanges, sent as they are."""

    system: str
    examples: tuple[tuple[str, str], ...]


def _user_content(example: Any) -> str:
    # Metadata as the reference sends it: indented by 4, non-ASCII as it is; a string is sent unchanged.
    return example if isinstance(example, str) else json.dumps(example, ensure_ascii=False, indent=4)


DEFAULT_PROMPT = Prompt(SYSTEM_PROMPT, tuple((_user_content(example), answer) for example, answer in FEW_SHOT_EXAMPLES))


# The reference script keeps its prompt in five string variables of its request function.
REFERENCE_PROMPT_NAMES = ("system", "user1", "assistant1", "user2", "assistant2")


def prompt_of_reference_script(path: str | os.PathLike) -> Prompt:
    """The prompt of the reference's ``process_data/gpt4_summarize.py`` (github.com/sanderwood/clamp2), read
    from a copy of that file: its string assignments ``system``, ``user1``, ``assistant1``, ``user2``,
    ``assistant2``, parsed, never run. Read as Python reads source (universal newlines), so a CRLF
    checkout gives the strings the script itself sends.
    """
    import ast

    where = os.fspath(path)
    try:
        # Bytes, as Python reads a script: a byte-order mark or a coding line is honoured.
        tree = ast.parse(Path(path).read_bytes(), filename=where)
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError) as error:
        raise ValueError(f"{where}: cannot read it as Python source ({one_line(str(error))})") from None
    found: dict[str, str] = {}
    assignments = [node for node in ast.walk(tree) if isinstance(node, ast.Assign)]
    for node in sorted(assignments, key=lambda node: (node.lineno, node.col_offset)):  # the first in the file
        if len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                and node.targets[0].id in REFERENCE_PROMPT_NAMES and isinstance(node.value, ast.Constant) \
                and isinstance(node.value.value, str):
            found.setdefault(node.targets[0].id, node.value.value)
    missing = [name for name in REFERENCE_PROMPT_NAMES if name not in found]
    if missing:
        raise ValueError(f"{where}: not the reference's gpt4_summarize.py: no string assigned to "
                         f"{', '.join(missing)}")
    return Prompt(found["system"], ((found["user1"], found["assistant1"]), (found["user2"], found["assistant2"])))


def load_prompt(path: str | os.PathLike) -> Prompt:
    """A prompt file: ``{"system": str, "examples": [{"user": str or object, "assistant": str}, ...]}``,
    or a copy of the reference's ``gpt4_summarize.py`` (a ``.py`` file: :func:`prompt_of_reference_script`).

    A ``user`` string is sent as written (hand-written few-shot text, as some prompts have); an object is
    sent as the metadata is, ``json.dumps(indent=4, ensure_ascii=False)``. Raises ValueError naming the
    file and what is wrong.
    """
    where = os.fspath(path)
    if where.lower().endswith(".py"):
        return prompt_of_reference_script(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"{where}: cannot read a JSON prompt file ({one_line(str(error))})") from None
    expected = '{"system": "<system prompt>", "examples": [{"user": ..., "assistant": "..."}, ...]}'
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected {expected}")
    unknown = sorted(set(data) - {"system", "examples"})
    if unknown:
        raise ValueError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                         f"expected {expected}")
    if not isinstance(data.get("system"), str) or not data["system"].strip():
        raise ValueError(f"{where}: expected {expected} with a non-empty system prompt")
    examples = data.get("examples", [])
    if not isinstance(examples, list):
        raise ValueError(f"{where}: \"examples\" must be a list of {{\"user\", \"assistant\"}} objects")
    exchanges = []
    for number, example in enumerate(examples, 1):
        if not isinstance(example, dict) or set(example) != {"user", "assistant"} \
                or not isinstance(example["assistant"], str) or not isinstance(example["user"], (str, dict)):
            raise ValueError(f"{where}: example {number} must be {{\"user\": <text or object>, "
                             f"\"assistant\": <text>}}")
        exchanges.append((_user_content(example["user"]), example["assistant"]))
    return Prompt(data["system"], tuple(exchanges))


def drop_nulls(metadata: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in metadata.items() if value is not None}


def request_metadata(metadata: dict[str, Any], language: str) -> dict[str, Any]:
    """What the model sees: the fields without nulls, ``filepaths`` or earlier summaries, plus ``nen_language``."""
    sent = {key: value for key, value in drop_nulls(metadata).items()
            if key != "filepaths" and key not in SUMMARY_FIELDS}
    sent["nen_language"] = language
    return sent


def build_messages(metadata: dict[str, Any], language: str, prompt: Prompt = DEFAULT_PROMPT) -> list[dict[str, str]]:
    """System prompt, the few-shot exchanges, then this piece's metadata as the user message."""
    messages = [{"role": "system", "content": prompt.system}]
    for user, answer in prompt.examples:
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": answer})
    messages.append({"role": "user", "content": _user_content(request_metadata(metadata, language))})
    return messages


# --------------------------------------------------------------------------------------------------
# Answers


class AnswerError(ValueError):
    """The model's answer cannot be used; the message is the reason logged for the file."""


_CODE_FENCE = re.compile(r"^```[A-Za-z0-9_-]*[ \t]*\n?(.*?)\n?[ \t]*```$", re.DOTALL)


def strip_code_fence(text: str) -> str:
    """The answer without surrounding whitespace and a Markdown fence (```json ... ```), which chat
    models add often enough that refusing it would pay again for a usable answer."""
    stripped = text.strip()
    match = _CODE_FENCE.match(stripped)
    return match.group(1).strip() if match else stripped


def _non_empty_string(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


MIN_SECRET_LENGTH = 12  # real API keys are far longer (OpenAI's 51+ characters, Azure's 32)


def parse_answer(content: str | None, language: str,
                 finish_reason: str | None = None, secret: str | None = None) -> tuple[str, dict[str, str]]:
    """``(summary_en, summary_nen)`` from the model's answer, or :class:`AnswerError` with the reason.

    Failures: no content, ``None`` (too little musical information), invalid JSON (a truncated
    answer says so), not an object, missing or empty summaries, or a ``summary_nen.language``
    other than the one asked for. The language is compared ignoring case and surrounding spaces,
    and the returned ``summary_nen`` names it as the list does, so the data stays canonical.
    """
    if content is None or not content.strip():
        raise AnswerError("empty answer")
    # A key as short as the dummies local servers take ("none", "x", "EMPTY", "ollama") is no secret, and
    # a word of any summary: looking for it failed every answer that used that word.
    secret = secret if secret and len(secret) >= MIN_SECRET_LENGTH else None
    if secret and secret in content:  # the server has the key; a summary must not carry it into the data
        raise AnswerError("answer contains the API key")
    text = strip_code_fence(content)
    if text.strip("`'\". ").casefold() == "none":
        raise AnswerError("model answered None (too little musical information)")
    try:
        answer = json.loads(text)
    except json.JSONDecodeError as error:
        if finish_reason == "length":
            raise AnswerError("answer truncated (finish_reason=length), invalid JSON") from None
        raise AnswerError(f"invalid JSON in answer ({error.msg}: character {error.pos})") from None
    if not isinstance(answer, dict):
        raise AnswerError(f"answer is JSON {type(answer).__name__}, not an object")
    for key in SUMMARY_FIELDS:
        if key not in answer:
            raise AnswerError(f"answer has no {key}")
    summary_en, summary_nen = answer["summary_en"], answer["summary_nen"]
    if not _non_empty_string(summary_en):
        raise AnswerError("summary_en is empty or not a string")
    if not isinstance(summary_nen, dict):
        raise AnswerError("summary_nen is not an object")
    if not _non_empty_string(summary_nen.get("summary")):
        raise AnswerError("summary_nen.summary is empty or not a string")
    answered = summary_nen.get("language")
    if not isinstance(answered, str) or answered.strip().casefold() != language.casefold():
        raise AnswerError(f"summary_nen.language is {answered!r}, asked for {language!r}")
    if secret and (secret in summary_en or secret in summary_nen["summary"]):  # quoted with JSON escapes
        raise AnswerError("answer contains the API key")
    return summary_en.strip(), {"language": language, "summary": summary_nen["summary"].strip()}


def build_output(metadata: dict[str, Any], summary_en: str, summary_nen: dict[str, str]) -> dict[str, Any]:
    """The output record: input fields without nulls, then ``summary_en``, ``summary_nen``, ``filepaths``.

    An input's own ``nen_language`` is left out, as the reference pops it: it was only the request's.
    """
    record = {key: value for key, value in drop_nulls(metadata).items()
              if key not in ("filepaths", "nen_language") and key not in SUMMARY_FIELDS}
    record["summary_en"] = summary_en
    record["summary_nen"] = summary_nen
    record["filepaths"] = metadata["filepaths"]
    return record


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """One input file as a dict; :class:`ValueError` with the reason when it cannot be summarised.

    ``filepaths`` is required before any request is paid for: a summary without music files is
    useless for training and would be dropped by the merge.
    """
    try:
        with open(path, encoding="utf-8") as f:
            metadata = json.load(f)
    except UnicodeDecodeError as error:
        raise ValueError(f"input is not UTF-8 ({error.reason})") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"input is not valid JSON ({error})") from None  # json names line and column
    if not isinstance(metadata, dict):
        raise ValueError(f"input is JSON {type(metadata).__name__}, not an object")
    filepaths = metadata.get("filepaths")
    if (not isinstance(filepaths, list) or not filepaths
            or not all(_non_empty_string(entry) for entry in filepaths)):
        raise ValueError("input has no filepaths list of file names")
    return metadata


# --------------------------------------------------------------------------------------------------
# Requests


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try one request: ``max_retries`` re-sends after the first attempt, each after a
    full-jitter delay of ``uniform(0, min(backoff_cap, backoff_base * 2**retry))`` seconds, each
    attempt limited to ``timeout`` seconds."""

    max_retries: int = 5
    timeout: float = 60.0
    backoff_base: float = 1.0
    backoff_cap: float = 60.0


RETRYABLE_ERRORS = (openai.RateLimitError, openai.APITimeoutError, openai.APIConnectionError,
                    openai.InternalServerError)
# Errors that would be the same for every file of the run.
FATAL_ERRORS = (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError)


class SummaryRequestError(Exception):
    """A request that produced no answer; ``reason`` is redacted, ``retries`` counts re-sends."""

    def __init__(self, reason: str, retries: int):
        super().__init__(reason)
        self.reason = reason
        self.retries = retries


class RequestFailed(SummaryRequestError):
    """This file failed (non-retryable error, or retries exhausted)."""


class ServerUnavailable(RequestFailed):
    """Retries ran out on rate limits, 5xx answers, time-outs or connection errors: the server, not the file."""


class FatalAPIError(SummaryRequestError):
    """The run cannot succeed for any file (wrong key, no access, wrong model or URL)."""


class RequestCancelled(SummaryRequestError):
    """The run was aborted while this request waited; the file is neither done nor failed."""


@dataclass
class RequestResult:
    content: str | None
    finish_reason: str | None
    retries: int


# A chat completion with two summaries is a few kB; a server sending more is broken or hostile, and the client
# would hold all of it (several times over while parsing) in each worker's memory.
MAX_RESPONSE_BYTES = 16 << 20


class ResponseTooLarge(openai.OpenAIError):
    """The answer passed :data:`MAX_RESPONSE_BYTES`; an OpenAIError, so the client raises it as it is (no retry)."""


class _Deadline:
    """One HTTP request's wall-clock limit: when it passes, the request's socket is shut down.

    The client's ``timeout`` bounds each socket operation, so a server sending a byte every few seconds, or
    chunks forever, was never timed out. The socket comes from the transport's ``trace`` extension (its
    ``connect_tcp``/``start_tls`` results), hence a fresh connection per request (no keep-alive).
    """

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.expired = threading.Event()
        self._sockets: list = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def trace(self, name: str, info: dict) -> None:
        stream = info.get("return_value") if name.endswith(".complete") else None
        sock = stream.get_extra_info("socket") if hasattr(stream, "get_extra_info") else None
        if sock is not None:
            with self._lock:
                self._sockets.append(sock)
            if self.expired.is_set():
                self._shut(sock)

    def _expire(self) -> None:
        self.expired.set()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            self._shut(sock)

    @staticmethod
    def _shut(sock) -> None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # wakes a recv blocked in another thread, unlike close()

    def cancel(self) -> None:
        self._timer.cancel()


def make_client(api_key: str, base_url: str | None = None, timeout: float = 60.0) -> openai.OpenAI:
    """The official client with its own retries off: :func:`request_summary` retries and counts.

    ``base_url=None`` keeps the client's default (``OPENAI_BASE_URL`` or api.openai.com). Each request's
    ``timeout`` bounds the whole request (connect to last byte), and an answer over
    :data:`MAX_RESPONSE_BYTES` raises :class:`ResponseTooLarge` as it arrives.
    """
    # httpx (openai 1.x) or httpx2: the HTTP library the client's own default client is built on.
    httpx = importlib.import_module(next(cls.__module__ for cls in openai.DefaultHttpxClient.__mro__
                                         if cls.__module__.startswith("httpx")).split(".")[0])

    class BoundedStream(httpx.SyncByteStream):
        def __init__(self, inner, deadline: _Deadline | None):
            self.inner, self.deadline = inner, deadline

        def __iter__(self):
            size = 0
            for chunk in self.inner:
                size += len(chunk)
                if size > MAX_RESPONSE_BYTES:
                    raise ResponseTooLarge(f"response larger than {MAX_RESPONSE_BYTES >> 20} MiB")
                yield chunk

        def close(self):
            if self.deadline is not None:
                self.deadline.cancel()
            self.inner.close()

    def on_request(request) -> None:
        deadline = _Deadline(float((request.extensions.get("timeout") or {}).get("read") or timeout))
        request.extensions["trace"] = deadline.trace
        request.extensions["clamp2_deadline"] = deadline

    def on_response(response) -> None:
        response.stream = BoundedStream(response.stream, response.request.extensions.get("clamp2_deadline"))

    class DeadlineClient(openai.DefaultHttpxClient):
        def send(self, request, **kwargs):
            try:
                return super().send(request, **kwargs)
            except BaseException as error:
                # No response (refused, reset, DNS, TLS): no stream to close, so its timer is cancelled here (each
                # kept a thread alive for --timeout seconds: hundreds against a server that is down).
                failed = getattr(error, "_request", None) or request
                deadline = failed.extensions.get("clamp2_deadline")
                if deadline is not None:
                    deadline.cancel()
                raise

    http_client = DeadlineClient(
        timeout=timeout, limits=httpx.Limits(max_connections=1000, max_keepalive_connections=0),
        event_hooks={"request": [on_request], "response": [on_response]})
    return openai.OpenAI(api_key=api_key, base_url=base_url, timeout=timeout, max_retries=0, http_client=http_client)


def _timed_out(error: BaseException) -> bool:
    """Whether a connection error is this module's deadline shutting the socket (a time-out, so named)."""
    deadline = getattr(getattr(error, "request", None), "extensions", {}).get("clamp2_deadline")
    return deadline is not None and deadline.expired.is_set()


def redact(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text


def one_line(text: str, limit: int = 300) -> str:
    """A reason fit for a ``path<TAB>reason`` log line: no tabs or newlines, bounded length."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def describe_error(error: BaseException, secret: str | None = None) -> str:
    if isinstance(error, openai.APIStatusError):
        text = f"HTTP {error.status_code} {type(error).__name__}: {error.message}"
    elif isinstance(error, openai.APIConnectionError) and _timed_out(error):
        text = "APITimeoutError: Request timed out."
    else:
        text = f"{type(error).__name__}: {error}"
    return one_line(redact(text, secret))


def retry_after_seconds(error: BaseException) -> float | None:
    """The server's ``Retry-After`` (seconds form) when it sent one, else None."""
    response = getattr(error, "response", None)
    if response is None:
        return None
    try:
        value = float(response.headers.get("retry-after", ""))
    except (TypeError, ValueError):
        return None
    return value if value >= 0 else None


def backoff_delay(retry: int, policy: RetryPolicy, rng: random.Random | None = None,
                  retry_after: float | None = None) -> float:
    """Seconds to wait before re-send number ``retry + 1``.

    Full jitter spreads the retries of many workers hit by the same rate limit instead of
    re-sending them in lock-step; a server's ``Retry-After`` is honoured, but never beyond the cap.
    """
    rng = rng or random
    delay = rng.uniform(0.0, min(policy.backoff_cap, policy.backoff_base * 2 ** retry))
    if retry_after is not None:
        delay = max(delay, min(retry_after, policy.backoff_cap))
    return delay


def request_summary(client: openai.OpenAI, model: str, messages: list[dict[str, str]],
                    policy: RetryPolicy = RetryPolicy(), *, secret: str | None = None,
                    stop: threading.Event | None = None,
                    rng: random.Random | None = None) -> RequestResult:
    """One chat completion with retries; raises a :class:`SummaryRequestError` subclass on failure.

    ``stop`` (set when the run aborts) is checked before every attempt and interrupts back-off, so
    an abort sends no further paid requests.
    """
    stop = stop or threading.Event()
    retries = 0
    while True:
        if stop.is_set():
            raise RequestCancelled("run aborted", retries)
        try:
            response = client.chat.completions.create(model=model, messages=messages,
                                                      timeout=policy.timeout)
        except FATAL_ERRORS as error:
            raise FatalAPIError(describe_error(error, secret), retries) from None
        except RETRYABLE_ERRORS as error:
            if isinstance(error.__cause__, ResponseTooLarge):  # openai 1.x wraps it as a connection error
                raise RequestFailed(describe_error(error.__cause__, secret), retries) from None
            if retries >= policy.max_retries:
                raise ServerUnavailable(f"gave up after {retries} retries: {describe_error(error, secret)}",
                                        retries) from None
            delay = backoff_delay(retries, policy, rng, retry_after_seconds(error))
            retries += 1
            if stop.wait(delay):
                raise RequestCancelled("run aborted", retries) from None
            continue
        except openai.OpenAIError as error:
            raise RequestFailed(describe_error(error, secret), retries) from None
        except json.JSONDecodeError as error:  # a body said to be JSON that is not (a proxy's page)
            raise RequestFailed(f"response is not JSON ({one_line(redact(str(error), secret))})", retries) from None
        return RequestResult(*_answer_of(response, retries), retries)


def _answer_of(response: Any, retries: int) -> tuple[str | None, str | None]:
    """``(content, finish_reason)`` of a chat completion; a body of another shape (a proxy's HTML page, a list, a
    content of parts) fails its file with what it is, not with a Python attribute error."""
    choices = getattr(response, "choices", None)
    if isinstance(choices, list) and not choices:
        raise RequestFailed("response has no choices", retries)
    if not isinstance(choices, list):
        what = "text" if isinstance(response, str) else "JSON without choices" if choices is None else \
            "choices that are not a list"
        raise RequestFailed(f"response has no choices (the server answered {what}, not a chat completion)", retries)
    choice = choices[0]
    message = getattr(choice, "message", None)
    content = getattr(message, "content", None)
    if not isinstance(content, (str, type(None))):
        raise RequestFailed(f"answer content is JSON {type(content).__name__}, not text", retries)
    finish_reason = getattr(choice, "finish_reason", None)
    return content, finish_reason if isinstance(finish_reason, str) else None


# --------------------------------------------------------------------------------------------------
# Batch driver


@dataclass
class SummaryCounts:
    done: int = 0
    skipped: int = 0
    failed: int = 0
    retries: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)
    aborted: str | None = None  # the fatal error's reason when the run stopped early
    # When the run stopped because the server failed this many files in a row (retries exhausted on each): the last
    # reason. A dead or overloaded endpoint would otherwise cost every remaining file its retries (hours).
    server_down: tuple[int, str] | None = None
    disk_full: str | None = None  # the output that a full disk (or quota) refused, when the run stopped at it

    def summary_line(self) -> str:
        return f"done {self.done}, skipped {self.skipped}, failed {self.failed}, retries {self.retries}"


@dataclass
class _Outcome:
    relative_path: str
    status: str  # "done", "failed", "unavailable" (the server), "unread" (the input), "fatal" or "cancelled"
    reason: str = ""
    retries: int = 0


def _relative_posix(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def server_down_streak(workers: int) -> int:
    """Files failing in a row, each after its retries, that stop a run: twice the files in flight (a short outage
    fails those at once), at least 10. A re-run resumes, so stopping costs little; going on costs hours."""
    return max(10, 2 * max(1, workers))


def summarize_folder(input_dir: str | os.PathLike, output_dir: str | os.PathLike,
                     client: openai.OpenAI, model: str, *, languages: list[str] | None = None,
                     seed: int = DEFAULT_SEED, workers: int = 8,
                     policy: RetryPolicy = RetryPolicy(), secret: str | None = None,
                     progress: bool = True, prompt: Prompt = DEFAULT_PROMPT,
                     echo: Callable[[str], None] | None = None) -> SummaryCounts:
    """Summarise every ``.json`` under ``input_dir`` into ``output_dir/<rel folder>/<stem>.json``.

    Existing outputs are skipped; the rest go to a pool of ``workers`` threads. Each failure is
    written as ``relative_path<TAB>reason`` to ``output_dir/failed_summaries.log`` (rewritten by
    every run, flushed per line so it survives a crash) and passed to ``echo`` (default: stderr).
    A file that failed is simply retried by the next run, since it has no output. A fatal API
    error (401/403/404) stops the run: queued files are not sent, in-flight ones give up before
    their next attempt, and ``counts.aborted`` holds the reason. So does a server that fails
    :func:`server_down_streak` files in a row, each after its retries (``counts.server_down``).
    """
    from clamp2.progress import progress_bar, write_line

    input_dir, output_dir = Path(input_dir), Path(output_dir)
    languages = languages if languages is not None else load_languages()
    counts = SummaryCounts()
    stop = threading.Event()
    echo = echo or write_line

    jobs: list[tuple[str, Path, Path]] = []
    claimed: dict[Path, str] = {}
    problems: list[tuple[Path, str]] = []  # a sub-folder that cannot be listed: a failure, not left out
    sources = find_files(input_dir, [".json"], problems)
    early_failures = [(_relative_posix(path, input_dir), reason) for path, reason in problems]
    planned: list[tuple[str, Path, Path]] = []
    for input_path in lower_case_extensions_first(sources):
        relative_path = _relative_posix(input_path, input_dir)
        output_path = mirror_path(input_path, input_dir, output_dir, ".json")
        # a.json and a.JSON in one folder would share an output: never overwrite silently.
        if output_path in claimed:
            early_failures.append((relative_path, f"same output as {claimed[output_path]}"))
            continue
        claimed[output_path] = relative_path
        planned.append((relative_path, input_path, output_path))
    aliases = output_aliases(output for _, _, output in planned)  # Song.json and song.json on macOS or Windows
    for relative_path, input_path, output_path in planned:
        if output_path in aliases:
            early_failures.append((relative_path, f"same output as {claimed[aliases[output_path]]} ({ONE_FILE_THERE})"))
        elif finished_output(output_path):
            counts.skipped += 1
        else:
            jobs.append((relative_path, input_path, output_path))

    def summarize_one(relative_path: str, input_path: Path, output_path: Path) -> _Outcome:
        if stop.is_set():
            return _Outcome(relative_path, "cancelled")
        try:
            metadata = read_metadata(input_path)
        except (OSError, ValueError) as error:
            return _Outcome(relative_path, "unread", one_line(str(error)))
        language = choose_language(seed, relative_path, languages)
        retries = 0
        try:
            result = request_summary(client, model, build_messages(metadata, language, prompt), policy,
                                     secret=secret, stop=stop)
            retries = result.retries
            summary_en, summary_nen = parse_answer(result.content, language, result.finish_reason, secret)
            text = json.dumps(build_output(metadata, summary_en, summary_nen), indent=4,
                              ensure_ascii=False)
            atomic_write_text(output_path, text)
        except FatalAPIError as error:
            stop.set()  # before returning, so no queued file starts a request after this one
            return _Outcome(relative_path, "fatal", error.reason, error.retries)
        except RequestCancelled as error:
            return _Outcome(relative_path, "cancelled", error.reason, error.retries)
        except ServerUnavailable as error:
            return _Outcome(relative_path, "unavailable", error.reason, error.retries)
        except RequestFailed as error:
            return _Outcome(relative_path, "failed", error.reason, error.retries)
        except AnswerError as error:
            return _Outcome(relative_path, "failed", one_line(redact(str(error), secret)), retries)
        except Exception as error:  # noqa: BLE001 - one odd file must not end a paid-for batch
            full = disk_full_error(error)
            if full is not None:  # every later answer would be paid for and lost too: the run stops
                stop.set()
                return _Outcome(relative_path, "disk_full", f"cannot write {output_path}: {full.strerror}", retries)
            return _Outcome(relative_path, "failed", describe_error(error, secret), retries)
        return _Outcome(relative_path, "done", retries=retries)

    output_dir.mkdir(parents=True, exist_ok=True)
    unlink_if_link(output_dir / FAILURE_LOG_NAME)  # a link there is replaced, never written through
    # surrogateescape: a file name that is not UTF-8 is logged as its bytes (strict encoding raised mid-run).
    with open(output_dir / FAILURE_LOG_NAME, "w", encoding="utf-8", errors="surrogateescape", newline="\n") as log, \
            progress_bar(total=len(jobs), desc="summaries", unit="file", enabled=progress) as bar:

        streak_limit = server_down_streak(workers)
        streak = 0

        def record(outcome: _Outcome) -> None:
            nonlocal streak
            counts.retries += outcome.retries
            # Any answer (even one that fails its file) shows the server up; files cancelled or unread say nothing.
            if outcome.status == "unavailable":
                streak += 1
            elif outcome.status not in ("cancelled", "unread"):
                streak = 0
            if outcome.status == "done":
                counts.done += 1
            elif outcome.status in ("failed", "unavailable", "unread"):
                fail(outcome.relative_path, outcome.reason)
                if streak >= streak_limit and counts.server_down is None:
                    counts.server_down = (streak, outcome.reason)
                    stop.set()
            elif outcome.status == "fatal" and counts.aborted is None:
                counts.aborted = outcome.reason
            elif outcome.status == "disk_full" and counts.disk_full is None:
                counts.disk_full = outcome.reason
            bar.update(1)

        def fail(relative_path: str, reason: str) -> None:
            counts.failed += 1
            counts.failures.append((relative_path, reason))
            log.write(log_line(relative_path, reason))
            log.flush()
            echo(f"failed: {relative_path}: {reason}")

        for relative_path, reason in early_failures:
            fail(relative_path, reason)
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            futures = [pool.submit(summarize_one, *job) for job in jobs]
            handled = set()
            try:
                for future in as_completed(futures):
                    handled.add(future)
                    record(future.result())
                    if stop.is_set():
                        break
            except BaseException:
                # Ctrl-C: leaving the pool would otherwise run every queued (paid) request first.
                stop.set()
                for future in futures:
                    future.cancel()
                raise
            if stop.is_set():
                for future in futures:
                    future.cancel()
                # Requests already answered are kept (and paid for); the rest return cancelled.
                for future in futures:
                    if future not in handled and not future.cancelled():
                        record(future.result())
    if len(counts.failures) > 1 and counts.disk_full is None:  # written as answers came; sorted at the end
        write_file_log(output_dir / FAILURE_LOG_NAME, counts.failures)
    return counts


# --------------------------------------------------------------------------------------------------
# Merge into training JSONL


@dataclass
class MergeResult:
    written: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason)


def _check_summaries(record: dict[str, Any]) -> None:
    """SPEC §7 *fix*: ``summary_en`` may be a string or a list of strings, ``summary_nen`` an
    object or a list of objects; each must carry text."""
    summary_en = record.get("summary_en")
    items = summary_en if isinstance(summary_en, list) else [summary_en]
    if not items or not all(_non_empty_string(item) for item in items):
        raise ValueError("summary_en is missing or empty (string or list of strings expected)")
    summary_nen = record.get("summary_nen")
    items = summary_nen if isinstance(summary_nen, list) else [summary_nen]
    if not items or not all(isinstance(item, dict) and _non_empty_string(item.get("summary"))
                            and _non_empty_string(item.get("language")) for item in items):
        raise ValueError("summary_nen is missing or malformed (object or list of objects with "
                         "language and summary expected)")


def resolve_filepath(entry: Any, data_root: str | os.PathLike, jsonl_dir: str | os.PathLike) -> str:
    """``entry`` (relative to ``data_root``, or absolute inside it) rewritten relative to ``jsonl_dir``.

    Raises :class:`ValueError` when the entry is not a non-empty string, leaves the data root
    (``..`` or an absolute path elsewhere) or names no existing file. The containment test is
    lexical (``normpath``), so a symlink the user placed inside the root is followed, not refused.
    """
    if not _non_empty_string(entry):
        raise ValueError(f"filepaths entry {entry!r} is not a file name")
    root = os.path.normpath(os.path.abspath(data_root))
    candidate = os.path.normpath(os.path.join(root, entry))  # join keeps an absolute entry as is
    if os.path.commonpath([root, candidate]) != root:
        raise ValueError(f"filepaths entry {entry!r} is outside the data root {root}")
    if not os.path.isfile(candidate):
        raise ValueError(f"filepaths entry {entry!r} does not exist under the data root {root}")
    relative = os.path.relpath(candidate, os.path.abspath(jsonl_dir))
    if relative == ".." or relative.startswith(".." + os.sep):
        # ``..`` leaves the JSONL's folder as the file system does, from its real folder (training reads from
        # jsonl.resolve().parent): from a folder reached through a link, the lexical ``..`` named other files.
        relative = os.path.relpath(os.path.realpath(candidate), os.path.realpath(jsonl_dir))
    return Path(relative).as_posix()


def merge_summaries(summaries_dir: str | os.PathLike, jsonl_path: str | os.PathLike,
                    data_root: str | os.PathLike | None = None,
                    echo: Callable[[str], None] | None = None) -> MergeResult:
    """Write every summary ``.json`` under ``summaries_dir`` as one line of ``jsonl_path``.

    Records are ordered by relative path (deterministic output), written with
    ``ensure_ascii=False`` through an atomic write. ``filepaths`` are read relative to
    ``data_root`` (default: the JSONL's folder) and written relative to the JSONL's folder, as
    training reads them (SPEC §7). A record that is not valid JSON, lacks usable summaries, or has
    a bad ``filepaths`` entry is reported through ``echo`` and left out. Summary shapes are kept as
    they are.
    """
    summaries_dir, jsonl_path = Path(summaries_dir), Path(jsonl_path)
    jsonl_dir = jsonl_path.parent
    data_root = Path(data_root) if data_root is not None else jsonl_dir
    echo = echo or (lambda line: print(line, file=sys.stderr))
    result = MergeResult()
    lines = []
    problems: list[tuple[Path, str]] = []
    paths = sorted(find_files(summaries_dir, [".json"], problems),
                   key=lambda path: _relative_posix(path, summaries_dir))
    for path, reason in problems:  # a sub-folder that cannot be listed: reported, not left out silently
        relative_path = _relative_posix(path, summaries_dir)
        echo(f"skipped: {relative_path}: {reason}")
        result.skipped.append((relative_path, reason))
    for path in paths:
        relative_path = _relative_posix(path, summaries_dir)
        try:
            try:
                with open(path, encoding="utf-8") as f:
                    record = json.load(f)
            except (UnicodeDecodeError, json.JSONDecodeError) as error:
                raise ValueError(f"not valid JSON ({error})") from None
            except OSError as error:  # left out and named, as a bad file (the JSONL's own write is the caller's)
                raise ValueError(f"cannot read it ({error.strerror or error})") from None
            if not isinstance(record, dict):
                raise ValueError(f"JSON {type(record).__name__}, not an object")
            _check_summaries(record)
            filepaths = record.get("filepaths")
            if not isinstance(filepaths, list) or not filepaths:
                raise ValueError("no filepaths list")
            record["filepaths"] = [resolve_filepath(entry, data_root, jsonl_dir) for entry in filepaths]
            line = json.dumps(record, ensure_ascii=False) + "\n"
            try:
                line.encode("utf-8")
            except UnicodeEncodeError:  # a "\ud800" escape: valid JSON, not text; the JSONL's write raised at the end
                raise ValueError("text that is not valid Unicode (a lone surrogate escape such as \\ud800)") from None
        except ValueError as error:
            result.skipped.append((relative_path, one_line(str(error))))
            echo(f"skipped: {relative_path}: {one_line(str(error))}")
            continue
        lines.append(line)
    atomic_write_text(jsonl_path, "".join(lines))
    result.written = len(lines)
    return result
