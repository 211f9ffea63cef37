"""Tests of clamp2.convert.summarize and its scripts against a real chat-completions server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import random
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import openai
import pytest

from clamp2.convert import summarize
from clamp2.convert.summarize import (AnswerError, RetryPolicy, backoff_delay, build_messages, build_output,
                                      choose_language, load_languages, load_prompt, make_client, parse_answer,
                                      request_summary, strip_code_fence)
from conftest import SPEC_DIR, DiskFullAfter, load_script

SECRET = "sk-test-SECRET-123"
FAST = ["--timeout", "1.0", "--backoff_base", "0.01", "--backoff_cap", "0.05", "--max_retries", "3",
        "--no_progress"]


# --------------------------------------------------------------------------------------------------
# A scripted OpenAI-compatible server


def valid_answer(language: str, title: str) -> str:
    return json.dumps({"summary_en": f"A summary of {title}.",
                       "summary_nen": {"language": language, "summary": f"[{language}] {title}"}},
                      ensure_ascii=False)


class LocalServer:
    """An HTTP server on 127.0.0.1 for one test, serving from a thread while its ``with`` block lasts."""

    def serve(self, handler: type, daemon_threads: bool = False) -> None:
        self.stopping = threading.Event()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = daemon_threads
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


class ScriptedLLM(LocalServer):
    """``POST /v1/chat/completions`` answering by the requested piece's title.

    ``script[title]`` is a list of steps used one per request (the last repeats): "ok", "fenced",
    "none", "invalid", "wrong_language", "slow" (sleeps past the client timeout, then answers),
    or an HTTP status code to fail with.
    """

    def __init__(self, script: dict[str, list], slow_seconds: float = 3.0, retry_after: str = "0"):
        self.script = script
        self.slow_seconds = slow_seconds
        self.retry_after = retry_after  # the Retry-After header of a 429
        self.requests: list[dict] = []  # {"title", "language", "authorization", "body", "path", "time"}
        self.lock = threading.Lock()
        llm = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                return

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                llm.handle(self, body)

        self.serve(Handler)

    def titles_requested(self) -> list[str]:
        return sorted(request["title"] for request in self.requests)

    def handle(self, handler: BaseHTTPRequestHandler, body: dict) -> None:
        metadata = json.loads(body["messages"][-1]["content"])
        title, language = metadata["title"], metadata["nen_language"]
        with self.lock:
            attempt = sum(1 for request in self.requests if request["title"] == title)
            self.requests.append({"title": title, "language": language, "body": body,
                                  "path": handler.path, "time": time.monotonic(),
                                  "authorization": handler.headers.get("Authorization")})
        steps = self.script[title]
        step = steps[min(attempt, len(steps) - 1)]
        if isinstance(step, int):
            message = f"scripted {step}"
            if step == 401:  # a careless server echoing the key: it must still never be logged
                message = f"Incorrect API key provided: {SECRET}"
            return self.reply(handler, step, {"error": {"message": message, "type": "test"}},
                              {"Retry-After": self.retry_after} if step == 429 else {})
        if step == "slow":
            if self.stopping.wait(self.slow_seconds):
                return
            content = valid_answer(language, title)
        elif step == "ok":
            content = valid_answer(language, title)
        elif step == "fenced":
            content = "```json\n" + valid_answer(language, title) + "\n```"
        elif step == "none":
            content = "None"
        elif step == "invalid":
            content = '{"summary_en": "cut off'
        elif step == "echo_key":  # an answer quoting the key where the failure reason quotes the answer
            content = json.dumps({"summary_en": "x", "summary_nen": {"language": f"key {SECRET}", "summary": "y"}})
        elif step == "wrong_language":
            other = "Welsh" if language != "Welsh" else "Basque"
            content = valid_answer(other, title)
        else:
            raise AssertionError(step)
        self.reply(handler, 200, {
            "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": content}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    @staticmethod
    def reply(handler, status: int, payload: dict, headers: dict | None = None) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode()
        try:
            handler.send_response(status)
            handler.send_header("Content-Type", "application/json")
            handler.send_header("Content-Length", str(len(data)))
            for name, value in (headers or {}).items():
                handler.send_header(name, value)
            handler.end_headers()
            handler.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and hung up
            return


@pytest.fixture
def api_env(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    for name in ("OPENAI_BASE_URL", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                 "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def write_metadata(root: Path, relative: str, title: str, **fields) -> Path:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"title": title, "composer": None, "genres": ["Folk"], **fields,
              "filepaths": [f"abc/{Path(relative).stem}.abc", f"mtf/{Path(relative).stem}.mtf"]}
    path.write_text(json.dumps(record, ensure_ascii=False), encoding="utf-8")
    return path


def assert_secret_absent(root: Path, *texts: str) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    for text in texts:
        assert SECRET not in text


# --------------------------------------------------------------------------------------------------
# Pure functions


def test_packaged_languages_match_spec():
    languages = load_languages()
    assert len(languages) == 100 and "English" not in languages
    spec_list = SPEC_DIR / "languages.txt"
    if spec_list.is_file():
        assert languages == [line for line in spec_list.read_text(encoding="utf-8").splitlines() if line]


def test_load_languages_from_file(tmp_path):
    (tmp_path / "few.txt").write_text("Welsh\n\nBasque\nWelsh\n", encoding="utf-8")
    assert load_languages(tmp_path / "few.txt") == ["Welsh", "Basque"]
    (tmp_path / "en.txt").write_text("English\nWelsh\n", encoding="utf-8")
    with pytest.raises(ValueError):
        load_languages(tmp_path / "en.txt")


def test_choose_language_depends_only_on_seed_and_path():
    languages = load_languages()
    paths = [f"folder/{i}.json" for i in range(300)]
    first = [choose_language(0, path, languages) for path in paths]
    assert first == [choose_language(0, path, languages) for path in reversed(paths)][::-1]
    assert choose_language(0, "folder/7.json", languages) == first[7]
    assert len(set(first)) > 50  # spread over the list, not one language
    assert [choose_language(1, path, languages) for path in paths] != first
    # Stable across processes (a string seed is hashed with SHA-512, not hash()).
    assert choose_language(0, "a/b.json", languages) == random.Random("0:a/b.json").choice(languages)


def test_build_messages_sends_clean_metadata_after_two_examples():
    metadata = {"title": "Été", "composer": None, "genres": ["Chanson"], "filepaths": ["abc/x.abc"]}
    messages = build_messages(metadata, "Welsh")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert "None" in messages[0]["content"] and "nen_language" in messages[0]["content"]
    rich_answer = json.loads(messages[2]["content"])
    assert rich_answer["summary_nen"]["language"] == json.loads(messages[1]["content"])["nen_language"]
    assert messages[4]["content"] == "None"
    # indented by 4, non-ASCII as it is: json.dumps(metadata, ensure_ascii=False, indent=4), as the reference
    assert messages[5]["content"] == '{\n    "title": "Été",\n    "genres": [\n        "Chanson"\n    ],\n' \
                                     '    "nen_language": "Welsh"\n}'
    assert metadata["filepaths"] == ["abc/x.abc"]  # the caller's dict is untouched


def test_strip_code_fence():
    assert strip_code_fence('```json\n{"a": 1}\n```') == '{"a": 1}'
    assert strip_code_fence('  ```\n{"a": 1}```  ') == '{"a": 1}'
    assert strip_code_fence('{"a": 1}') == '{"a": 1}'


@pytest.mark.parametrize("content, reason", [
    (None, "empty answer"),
    ("None", "None"),
    ("`None`", "None"),
    ('{"summary_en": "x"', "invalid JSON"),
    ("[1, 2]", "not an object"),
    ('{"summary_nen": {"language": "Welsh", "summary": "y"}}', "no summary_en"),
    ('{"summary_en": "x"}', "no summary_nen"),
    ('{"summary_en": " ", "summary_nen": {"language": "Welsh", "summary": "y"}}', "summary_en is empty"),
    ('{"summary_en": "x", "summary_nen": {"language": "Welsh", "summary": ""}}', "summary is empty"),
    ('{"summary_en": "x", "summary_nen": {"language": "Basque", "summary": "y"}}', "asked for 'Welsh'"),
    ('{"summary_en": "x", "summary_nen": "y"}', "not an object"),
])
def test_parse_answer_failures(content, reason):
    with pytest.raises(AnswerError, match=reason.replace("(", r"\(")):
        parse_answer(content, "Welsh")


def test_parse_answer_accepts_fenced_answer_and_canonicalises_language():
    content = '```json\n{"summary_en": " x ", "summary_nen": {"language": "welsh ", "summary": "y"}}\n```'
    assert parse_answer(content, "Welsh") == ("x", {"language": "Welsh", "summary": "y"})
    with pytest.raises(AnswerError, match="truncated"):
        parse_answer('{"summary_en": "x', "Welsh", finish_reason="length")


def test_build_output_order_and_nulls():
    metadata = {"title": "T", "lyrics": None, "filepaths": ["abc/t.abc"], "tags": ["a"]}
    record = build_output(metadata, "en", {"language": "Welsh", "summary": "cy"})
    assert list(record) == ["title", "tags", "summary_en", "summary_nen", "filepaths"]
    # an input's own nen_language was only the request's (replaced there by the drawn language): not kept
    metadata["nen_language"] = "French"
    assert list(build_output(metadata, "en", {"language": "Welsh", "summary": "cy"})) == list(record)


def test_backoff_delay_full_jitter_with_cap():
    policy = RetryPolicy(backoff_base=1.0, backoff_cap=5.0)
    rng = random.Random(0)
    delays = [backoff_delay(retry, policy, rng) for retry in range(10) for _ in range(50)]
    assert all(0.0 <= d <= 5.0 for d in delays)
    assert max(backoff_delay(0, policy, rng) for _ in range(200)) <= 1.0
    assert max(delays) > 4.0  # ceilings grow to the cap
    assert backoff_delay(0, policy, rng, retry_after=3.0) >= 3.0
    assert backoff_delay(0, policy, rng, retry_after=100.0) == 5.0


# --------------------------------------------------------------------------------------------------
# The script against the local server


SCRIPT = {
    "good": ["ok"],
    "fenced": ["fenced"],
    "none": ["none"],
    "invalid": ["invalid"],
    "wrong language": ["wrong_language"],
    "rate limited": [429, "ok"],
    "flaky": [500, 500, "ok"],
    "slow": ["slow", "ok"],
    "always 500": [500],
    "bad request": [400],
}


def make_inputs(root: Path) -> None:
    write_metadata(root, "good.json", "good", description="A lively reel.")
    write_metadata(root, "nested/deeper/fenced.json", "fenced", lyrics="Ça ira, ça ira")
    write_metadata(root, "nested/none.json", "none")
    write_metadata(root, "invalid.json", "invalid")
    write_metadata(root, "wrong.json", "wrong language")
    write_metadata(root, "rate.json", "rate limited")
    write_metadata(root, "flaky.json", "flaky")
    write_metadata(root, "slow.json", "slow")
    write_metadata(root, "always500.json", "always 500")
    write_metadata(root, "badrequest.json", "bad request")
    (root / "broken.json").write_text("{not json", encoding="utf-8")
    (root / "nested" / "list.json").write_text("[1, 2]", encoding="utf-8")
    (root / "notes.txt").write_text("not an input", encoding="utf-8")


def test_summarize_end_to_end_failures_retries_and_resume(tmp_path, api_env, capsys):
    script = load_script("process_data/gpt4_summarize.py")
    inputs, outputs = tmp_path / "metadata", tmp_path / "summaries"
    make_inputs(inputs)
    argv = [str(inputs), str(outputs), "--model", "test-model", "--workers", "4", "--seed", "3", *FAST]
    with ScriptedLLM(SCRIPT) as llm:
        argv += ["--base_url", llm.base_url]
        assert script.main(argv) == 1
        first = capsys.readouterr()

        # 429 then ok: 1 retry; 500, 500, ok: 2; timeout then ok: 1; 500 forever: 3 (the cap).
        assert first.out.strip().splitlines()[-1] == "done 5, skipped 0, failed 7, retries 7"
        written = sorted(p.relative_to(outputs).as_posix() for p in outputs.rglob("*.json"))
        assert written == ["flaky.json", "good.json", "nested/deeper/fenced.json", "rate.json", "slow.json"]
        assert not list(outputs.rglob("*.partial"))

        good = json.loads((outputs / "good.json").read_text(encoding="utf-8"))
        language = choose_language(3, "good.json", load_languages())
        assert good == {"title": "good", "genres": ["Folk"], "description": "A lively reel.",
                        "summary_en": "A summary of good.",
                        "summary_nen": {"language": language, "summary": f"[{language}] good"},
                        "filepaths": ["abc/good.abc", "mtf/good.mtf"]}
        fenced_text = (outputs / "nested/deeper/fenced.json").read_text(encoding="utf-8")
        assert "Ça ira" in fenced_text and fenced_text.startswith('{\n    "title"')  # indent=4, UTF-8

        log_lines = (outputs / "failed_summaries.log").read_text(encoding="utf-8").splitlines()
        reasons = dict(line.split("\t") for line in log_lines)
        assert list(reasons) == sorted(reasons)  # 4 workers answer in any order; the finished log is sorted
        assert sorted(reasons) == ["always500.json", "badrequest.json", "broken.json", "invalid.json",
                                   "nested/list.json", "nested/none.json", "wrong.json"]
        assert "None" in reasons["nested/none.json"]
        assert "invalid JSON" in reasons["invalid.json"]
        assert "asked for" in reasons["wrong.json"]
        assert "gave up after 3 retries" in reasons["always500.json"] and "500" in reasons["always500.json"]
        assert "HTTP 400" in reasons["badrequest.json"]
        assert "not valid JSON" in reasons["broken.json"]
        assert "not an object" in reasons["nested/list.json"]
        for path in reasons:
            assert f"failed: {path}" in first.err

        # Requests: bad inputs never sent; the model saw no filepaths and no nulls.
        counts = {title: llm.titles_requested().count(title) for title in SCRIPT}
        assert counts == {"good": 1, "fenced": 1, "none": 1, "invalid": 1, "wrong language": 1,
                          "rate limited": 2, "flaky": 3, "slow": 2, "always 500": 4, "bad request": 1}
        assert all(r["authorization"] == f"Bearer {SECRET}" for r in llm.requests)
        assert all(r["path"] == "/v1/chat/completions" for r in llm.requests)
        sent = json.loads(llm.requests[0]["body"]["messages"][-1]["content"])
        assert "filepaths" not in sent and "composer" not in sent
        first_languages = {r["title"]: r["language"] for r in llm.requests}

        # Re-run: only the files without output are requested, with the same languages.
        before = len(llm.requests)
        assert script.main(argv) == 1
        second = capsys.readouterr()
        rerun = llm.requests[before:]
        assert sorted(r["title"] for r in rerun if r["title"] != "always 500") == [
            "bad request", "invalid", "none", "wrong language"]
        assert all(first_languages[r["title"]] == r["language"] for r in rerun)
        assert second.out.strip().splitlines()[-1] == "done 0, skipped 5, failed 7, retries 3"
        assert len((outputs / "failed_summaries.log").read_text(encoding="utf-8").splitlines()) == 7

    assert_secret_absent(tmp_path, first.out, first.err, second.out, second.err)


def test_collisions_odd_errors_and_echoed_keys_fail_one_file_each(tmp_path, api_env, capsys, monkeypatch):
    # x.json and x.JSON would write one x.json: one request (for x.json, as the original, which takes lower-case
    # extensions only), the other named as a collision. A write that
    # fails in an unforeseen way, and an answer quoting the key, fail their own file; the key is never shown.
    import errno

    import clamp2.convert.summarize as summarize

    script = load_script("process_data/gpt4_summarize.py")
    inputs, outputs = tmp_path / "metadata", tmp_path / "summaries"
    write_metadata(inputs, "tune.json", "tune")
    write_metadata(inputs, "tune.JSON", "tune upper")
    write_metadata(inputs, "disk.json", "disk")
    write_metadata(inputs, "echo.json", "echo")
    write_metadata(inputs, "good.json", "good")
    real_write = summarize.atomic_write_text

    def write(path, text, *args, **kwargs):
        if Path(path).name == "disk.json":
            raise OSError(errno.EIO, "Input/output error")
        return real_write(path, text, *args, **kwargs)

    monkeypatch.setattr(summarize, "atomic_write_text", write)
    script_steps = {"tune": ["ok"], "tune upper": ["ok"], "disk": ["ok"], "echo": ["echo_key"], "good": ["ok"]}
    with ScriptedLLM(script_steps) as llm:
        assert script.main([str(inputs), str(outputs), "--base_url", llm.base_url, "--model", "test-model",
                            "--workers", "1", *FAST]) == 1
        assert llm.titles_requested() == ["disk", "echo", "good", "tune"]  # not tune.JSON, though it sorts first
    out, err = capsys.readouterr()
    assert out.strip().splitlines()[-1] == "done 2, skipped 0, failed 3, retries 0"
    reasons = dict(line.split("\t") for line in (outputs / "failed_summaries.log").read_text().splitlines())
    assert sorted(reasons) == ["disk.json", "echo.json", "tune.JSON"]
    assert "tune.json" in reasons["tune.JSON"] and "Input/output error" in reasons["disk.json"]
    assert sorted(p.name for p in outputs.glob("*.json")) == ["good.json", "tune.json"]
    assert_secret_absent(tmp_path, out, err)


def test_a_full_disk_stops_the_paid_requests_with_one_line(tmp_path, api_env, capsys, monkeypatch):
    # Each later answer would be paid for and then lost to the same full disk: the run stops at the first.
    import clamp2.convert.summarize as summarize

    script = load_script("process_data/gpt4_summarize.py")
    inputs, outputs = tmp_path / "metadata", tmp_path / "summaries"
    for title in ("a", "b", "c", "d"):
        write_metadata(inputs, f"{title}.json", title)
    full = DiskFullAfter(monkeypatch, summarize, "atomic_write_text", 1)  # b.json, the second, does not fit
    with ScriptedLLM({title: ["ok"] for title in ("a", "b", "c", "d")}) as llm:
        assert script.main([str(inputs), str(outputs), "--base_url", llm.base_url, "--model", "test-model",
                            "--workers", "1", *FAST]) == 1
        assert llm.titles_requested() == ["a", "b"]
    out, err = capsys.readouterr()
    assert err.count("No space left on device") == 1 and "failed:" not in err
    assert f"error: cannot write {outputs / 'b.json'}: No space left on device; stopped: free space" in err
    assert sorted(p.name for p in outputs.glob("*.json")) == ["a.json"]
    full.free()
    with ScriptedLLM({title: ["ok"] for title in ("b", "c", "d")}) as llm:
        assert script.main([str(inputs), str(outputs), "--base_url", llm.base_url, "--model", "test-model",
                            "--workers", "1", *FAST]) == 0
        assert llm.titles_requested() == ["b", "c", "d"]


def test_summarize_all_done_exits_zero_and_rerun_sends_nothing(tmp_path, api_env, capsys):
    script = load_script("process_data/gpt4_summarize.py")
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    write_metadata(inputs, "a/one.json", "good")
    write_metadata(inputs, "b/two.json", "fenced")
    languages_file = tmp_path / "languages.txt"
    languages_file.write_text("Welsh\n", encoding="utf-8")
    with ScriptedLLM(SCRIPT) as llm:
        argv = [str(inputs), str(outputs), "--model", "m", "--base_url", llm.base_url,
                "--languages", str(languages_file), *FAST]
        assert script.main(argv) == 0
        assert capsys.readouterr().out.strip().endswith("done 2, skipped 0, failed 0, retries 0")
        assert {r["language"] for r in llm.requests} == {"Welsh"}
        assert script.main(argv) == 0
        out = capsys.readouterr().out
        assert out.strip().endswith("done 0, skipped 2, failed 0, retries 0")
        assert len(llm.requests) == 2
        (outputs / "a/one.json").write_bytes(b"")  # emptied by a power cut after its rename: asked again
        assert script.main(argv) == 0
        assert capsys.readouterr().out.strip().endswith("done 1, skipped 1, failed 0, retries 0")
        assert len(llm.requests) == 3 and json.loads((outputs / "a/one.json").read_text(encoding="utf-8"))
    record = json.loads((outputs / "b/two.json").read_text(encoding="utf-8"))
    assert record["summary_nen"]["language"] == "Welsh"
    assert (outputs / "failed_summaries.log").read_text(encoding="utf-8") == ""


def write_prompt(path: Path) -> Path:
    # A hand-written few-shot text (not valid JSON: some prompts have such) and a metadata object.
    path.write_text(json.dumps({
        "system": "Summarise the piece.\nReturn `None` when unsure.\n}\n",
        "examples": [{"user": '{"title": ""Brejeiro" is a tango", "tags": ["a", "b"]}', "assistant": '{\n  "summary_en": "x"\n}'},
                     {"user": {"title": "Untitled", "nen_language": "Russian"}, "assistant": "None"}]},
        ensure_ascii=False), encoding="utf-8")
    return path


def test_prompt_file_is_sent_as_written(tmp_path, api_env, capsys):
    prompt = load_prompt(write_prompt(tmp_path / "prompt.json"))
    messages = build_messages({"title": "Été", "composer": None}, "Welsh", prompt)
    assert [m["content"] for m in messages] == [
        "Summarise the piece.\nReturn `None` when unsure.\n}\n",
        '{"title": ""Brejeiro" is a tango", "tags": ["a", "b"]}', '{\n  "summary_en": "x"\n}',
        '{\n    "title": "Untitled",\n    "nen_language": "Russian"\n}', "None",
        '{\n    "title": "Été",\n    "nen_language": "Welsh"\n}']
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    default = build_messages({"title": "x"}, "Welsh")
    assert default[0]["content"] == summarize.SYSTEM_PROMPT and len(default) == 2 * len(summarize.FEW_SHOT_EXAMPLES) + 2

    script = load_script("process_data/gpt4_summarize.py")
    inputs = tmp_path / "in"
    write_metadata(inputs, "a.json", "good")
    with ScriptedLLM(SCRIPT) as llm:
        argv = [str(inputs), str(tmp_path / "out"), "--model", "m", "--base_url", llm.base_url, *FAST]
        assert script.main(argv + ["--prompt", str(tmp_path / "prompt.json")]) == 0
        capsys.readouterr()
        sent = llm.requests[0]["body"]["messages"]
        assert [m["content"] for m in sent[:5]] == [m["content"] for m in messages[:5]]
        assert json.loads(sent[5]["content"])["title"] == "good"

        for bad, reason in [("{", "cannot read a JSON prompt file"), ('{"system": ""}', "non-empty system prompt"),
                            ('{"system": "s", "examples": {}}', "must be a list"),
                            ('{"system": "s", "examples": [{"user": "u"}]}', "example 1 must be"),
                            ('{"system": "s", "extra": 1}', "unknown key 'extra'"),
                            ('{"system": "s", "examples": [{"user": "u", "assistant": "a", "x": 1}]}', "example 1 must be"),
                            ('{"system": "s", "examples": [{"user": ["u"], "assistant": "a"}]}', "example 1 must be"),
                            ('[]', "expected {")]:
            (tmp_path / "bad.json").write_text(bad, encoding="utf-8")
            assert script.main(argv + ["--prompt", str(tmp_path / "bad.json")]) == 2
            err = capsys.readouterr().err
            assert "bad.json" in err and reason in err, (bad, err)
        assert script.main(argv + ["--prompt", ""]) == 2  # an empty name is not the default prompt
        assert "prompt" in capsys.readouterr().err
        assert len(llm.requests) == 1  # a bad prompt file sends nothing


def test_prompt_read_from_a_copy_of_the_reference_script(tmp_path):
    # The reference keeps its prompt in five string variables of its request function (a CRLF checkout):
    # they are read without running the file, as Python would read them.
    script = tmp_path / "Reference_Summarize.PY"
    source = ('# -*- coding: utf-8 -*-\n' 'import os\nraise SystemExit("never run")\n\ndef process_json(metadata, language):\n'
              '    system = """Summarise.\nUse JSON.\n"""\n    user1 = """{\n    "title": "A"\n}\n"""\n'
              '    assistant1 = """{\n    "summary_en": "A."\n}\n"""\n    user2 = "{}"\n    assistant2 = "None"\n'
              'system = "a later assignment, even outside the function, is not the prompt"\n')
    script.write_bytes(b"\xef\xbb\xbf" + source.replace("\n", "\r\n").encode("utf-8"))  # a BOM, as Windows editors write
    prompt = load_prompt(script)
    assert prompt == summarize.Prompt("Summarise.\nUse JSON.\n", (('{\n    "title": "A"\n}\n', '{\n    "summary_en": "A."\n}\n'),
                                                                  ("{}", "None")))
    script.write_text("system = 'x'\nuser1 = 'y'\nuser2 = 2\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no string assigned to assistant1, user2, assistant2"):
        load_prompt(script)
    script.write_text("def (:\n", encoding="utf-8")
    with pytest.raises(ValueError, match="cannot read it as Python source"):
        load_prompt(script)


def test_unauthorized_aborts_run_without_leaking_key(tmp_path, api_env, capsys):
    script = load_script("process_data/gpt4_summarize.py")
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    for i in range(6):
        write_metadata(inputs, f"{i}.json", "unauthorized")
    with ScriptedLLM({"unauthorized": [401]}) as llm:
        code = script.main([str(inputs), str(outputs), "--model", "m", "--base_url", llm.base_url,
                            "--workers", "1", *FAST])
        assert code == 2
        assert len(llm.requests) == 1  # stopped at the first 401, no retries, nothing else sent
    captured = capsys.readouterr()
    assert "aborted" in captured.err and "OPENAI_API_KEY" in captured.err and "***" in captured.err
    assert captured.out.strip().endswith("done 0, skipped 0, failed 0, retries 0")
    assert not list(outputs.rglob("*.json"))
    assert_secret_absent(tmp_path, captured.out, captured.err)


def test_usage_errors(tmp_path, monkeypatch, capsys):
    script = load_script("process_data/gpt4_summarize.py")
    inputs = tmp_path / "in"
    write_metadata(inputs, "a.json", "good")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert script.main([str(inputs), str(tmp_path / "out"), "--model", "m"]) == 2
    assert "export OPENAI_API_KEY" in capsys.readouterr().err

    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    assert script.main([str(tmp_path / "missing"), str(tmp_path / "out"), "--model", "m"]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert script.main([str(tmp_path / "empty"), str(tmp_path / "out"), "--model", "m"]) == 2
    assert "no .json files" in capsys.readouterr().err
    assert script.main([str(inputs), str(inputs / "out"), "--model", "m"]) == 2
    assert "inside the input folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        script.main([str(inputs), str(tmp_path / "out")])  # --model is required
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        script.main(["--help"])
    assert exit_info.value.code == 0
    assert "OPENAI_API_KEY" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------------
# merge_jsonl


def write_summary(root: Path, relative: str, filepaths, summary_en="An English summary.",
                  summary_nen=None) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"title": Path(relative).stem, "summary_en": summary_en,
              "summary_nen": summary_nen or {"language": "Welsh", "summary": "Crynodeb."},
              "filepaths": filepaths}
    path.write_text(json.dumps(record, ensure_ascii=False, indent=4), encoding="utf-8")


def test_merge_jsonl(tmp_path, capsys):
    script = load_script("process_data/merge_jsonl.py")
    data = tmp_path / "data"
    for name in ("abc/a.abc", "mtf/a.mtf", "abc/b.abc", "abc/c.abc"):
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        (data / name).write_text("x", encoding="utf-8")
    outside = tmp_path / "secret.abc"
    outside.write_text("x", encoding="utf-8")
    summaries = tmp_path / "summaries"
    write_summary(summaries, "z/a.json", ["abc/a.abc", "mtf/a.mtf"])
    write_summary(summaries, "b.json", ["abc/b.abc"], summary_en=["One.", "Two."],
                  summary_nen=[{"language": "Welsh", "summary": "Un."},
                               {"language": "Basque", "summary": "Bat."}])
    write_summary(summaries, "c.json", [str((data / "abc/c.abc").resolve())])  # absolute, inside
    write_summary(summaries, "missing.json", ["abc/missing.abc"])
    write_summary(summaries, "escape.json", ["../secret.abc"])
    write_summary(summaries, "absolute.json", [str(outside)])
    write_summary(summaries, "nosummary.json", ["abc/a.abc"], summary_en="")
    (summaries / "failed_summaries.log").write_text("x.json\treason\n", encoding="utf-8")

    out = tmp_path / "jsonl" / "train.jsonl"
    assert script.main([str(summaries), str(out), "--data_root", str(data)]) == 1
    captured = capsys.readouterr()
    for name in ("missing.json", "escape.json", "absolute.json", "nosummary.json"):
        assert f"skipped: {name}" in captured.err
    assert "does not exist" in captured.err and "outside the data root" in captured.err
    assert "wrote 3 records" in captured.out and "skipped 4" in captured.out

    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["title"] for r in records] == ["b", "c", "a"]  # b.json, c.json, z/a.json
    assert records[0]["summary_en"] == ["One.", "Two."] and isinstance(records[0]["summary_nen"], list)
    assert records[2]["filepaths"] == ["../data/abc/a.abc", "../data/mtf/a.mtf"]
    assert records[1]["filepaths"] == ["../data/abc/c.abc"]
    for record in records:  # relative to the JSONL's own folder, as training reads them
        assert all((out.parent / p).is_file() for p in record["filepaths"])


def test_merge_jsonl_runs_again_over_its_own_output(tmp_path, capsys):
    # A re-run (after a Ctrl-C, or to add summaries) stopped at "cannot create output file X: X is a file".
    script = load_script("process_data/merge_jsonl.py")
    (tmp_path / "abc").mkdir()
    (tmp_path / "abc" / "a.abc").write_text("x", encoding="utf-8")
    write_summary(tmp_path / "summaries", "a.json", ["abc/a.abc"])
    out = tmp_path / "train.jsonl"
    argv = [str(tmp_path / "summaries"), str(out), "--data_root", str(tmp_path)]
    assert script.main(argv) == 0
    first = out.read_bytes()
    write_summary(tmp_path / "summaries", "b.json", ["abc/a.abc"])
    assert script.main(argv) == 0, capsys.readouterr().err
    assert out.read_bytes().startswith(first) and len(out.read_bytes().splitlines()) == 2


def test_merge_jsonl_default_root_is_jsonl_folder(tmp_path, capsys):
    script = load_script("process_data/merge_jsonl.py")
    (tmp_path / "abc").mkdir()
    (tmp_path / "abc" / "é.abc").write_text("x", encoding="utf-8")
    write_summary(tmp_path / "summaries", "é.json", ["abc/é.abc"], summary_en="Ünïcode")
    out = tmp_path / "train.jsonl"
    assert script.main([str(tmp_path / "summaries"), str(out)]) == 0
    text = out.read_text(encoding="utf-8")
    assert text.endswith("\n") and len(text.splitlines()) == 1 and "Ünïcode" in text  # ensure_ascii=False
    assert json.loads(text)["filepaths"] == ["abc/é.abc"]
    capsys.readouterr()
    assert script.main([str(tmp_path / "nowhere"), str(out)]) == 2


def test_module_has_public_api():
    for name in ("load_languages", "choose_language", "load_prompt", "build_messages", "parse_answer", "make_client",
                 "request_summary", "summarize_folder", "merge_summaries", "RetryPolicy"):
        assert hasattr(summarize, name)


# -- edge cases from a code-driven mutation audit ------------------------------------------------------

def test_earlier_summaries_are_not_sent():
    metadata = {"title": "T", "summary_en": "old", "summary_nen": {"language": "Welsh", "summary": "hen"},
                "filepaths": ["abc/t.abc"]}
    sent = json.loads(build_messages(metadata, "Basque")[-1]["content"])
    assert sent == {"title": "T", "nen_language": "Basque"}


def test_empty_filepaths_entry_fails_before_any_request(tmp_path, api_env, capsys):
    script = load_script("process_data/gpt4_summarize.py")
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a.json").write_text(json.dumps({"title": "good", "filepaths": ["", "abc/a.abc"]}), encoding="utf-8")
    with ScriptedLLM({"good": ["ok"]}) as llm:
        assert script.main([str(inputs), str(tmp_path / "out"), "--model", "m", "--base_url", llm.base_url, *FAST]) == 1
        assert llm.requests == []
    log = (tmp_path / "out" / "failed_summaries.log").read_text(encoding="utf-8")
    assert log.startswith("a.json\t") and log.endswith("\n") and log.count("\n") == 1 and "filepaths" in log


def test_retry_after_gap(api_env):
    # The server's Retry-After (1 s) is waited even when the client's own backoff would retry at once.
    with ScriptedLLM({"t": [429, "ok"]}, retry_after="1") as llm:
        client = make_client(SECRET, llm.base_url, 5.0)
        try:
            policy = RetryPolicy(max_retries=2, timeout=5.0, backoff_base=0.0, backoff_cap=5.0)
            request_summary(client, "m", build_messages({"title": "t"}, "Welsh"), policy)
        finally:
            client.close()
    times = [request["time"] for request in llm.requests]
    assert len(times) == 2 and times[1] - times[0] >= 0.9


def test_not_found_and_forbidden_abort_the_run(tmp_path, api_env, capsys):
    script = load_script("process_data/gpt4_summarize.py")
    for status in (404, 403):
        inputs = tmp_path / f"in{status}"
        for i in range(4):
            write_metadata(inputs, f"{i}.json", "refused")
        with ScriptedLLM({"refused": [status]}) as llm:
            code = script.main([str(inputs), str(tmp_path / f"out{status}"), "--model", "m",
                                "--base_url", llm.base_url, "--workers", "1", *FAST])
            assert code == 2 and len(llm.requests) == 1, status
        assert "aborted" in capsys.readouterr().err


def test_language_drawn_from_relative_path_with_default_seed(tmp_path, api_env, capsys):
    script = load_script("process_data/gpt4_summarize.py")
    languages = load_languages()
    # a nested file whose language differs by path-vs-name and by seed 0 vs 1
    name = next(f"n{i}.json" for i in range(1000)
                if len({choose_language(0, f"deep/{f'n{i}.json'}", languages),
                        choose_language(0, f"n{i}.json", languages),
                        choose_language(1, f"deep/{f'n{i}.json'}", languages)}) == 3)
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    write_metadata(inputs, f"deep/{name}", "good")
    with ScriptedLLM({"good": ["ok"]}) as llm:
        assert script.main([str(inputs), str(outputs), "--model", "m", "--base_url", llm.base_url, *FAST]) == 0
        assert [r["language"] for r in llm.requests] == [choose_language(0, f"deep/{name}", languages)]


def test_output_bytes(tmp_path, api_env, capsys):
    script = load_script("process_data/gpt4_summarize.py")
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    (inputs / "x.json").write_text(json.dumps({"title": "good", "composer": None, "lyrics": "Ça ira",
                                               "genres": ["Folk"], "filepaths": ["abc/x.abc"]}), encoding="utf-8")
    with ScriptedLLM({"good": ["ok"]}) as llm:
        assert script.main([str(inputs), str(outputs), "--model", "m", "--base_url", llm.base_url,
                            "--seed", "0", *FAST]) == 0
    language = choose_language(0, "x.json", load_languages())
    expected = json.dumps({"title": "good", "lyrics": "Ça ira", "genres": ["Folk"], "summary_en": "A summary of good.",
                           "summary_nen": {"language": language, "summary": f"[{language}] good"},
                           "filepaths": ["abc/x.abc"]}, indent=4, ensure_ascii=False)
    assert (outputs / "x.json").read_bytes() == expected.encode("utf-8")  # no trailing newline, input key order


def test_cli_defaults():
    args = load_script("process_data/gpt4_summarize.py").parse_args(["in", "out", "--model", "m"])
    assert (args.seed, args.max_retries, args.timeout, args.workers, args.backoff_base, args.backoff_cap) == \
        (0, 5, 60.0, 8, 1.0, 60.0)


def test_key_with_surrounding_whitespace_is_trimmed(tmp_path, api_env, monkeypatch, capsys):
    monkeypatch.setenv("OPENAI_API_KEY", f"  {SECRET}\n")
    script = load_script("process_data/gpt4_summarize.py")
    inputs = tmp_path / "in"
    write_metadata(inputs, "a.json", "good")
    with ScriptedLLM({"good": ["ok"]}) as llm:
        assert script.main([str(inputs), str(tmp_path / "out"), "--model", "m", "--base_url", llm.base_url, *FAST]) == 0
        assert [r["authorization"] for r in llm.requests] == [f"Bearer {SECRET}"]


def test_failure_count_on_stderr_and_log_sorted_with_collisions(tmp_path, api_env, capsys):
    script = load_script("process_data/gpt4_summarize.py")
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    write_metadata(inputs, "a.json", "none")
    write_metadata(inputs, "b.json", "good")
    write_metadata(inputs, "b.JSON", "good upper")
    with ScriptedLLM({"none": ["none"], "good": ["ok"], "good upper": ["ok"]}) as llm:
        assert script.main([str(inputs), str(outputs), "--model", "m", "--base_url", llm.base_url,
                            "--workers", "1", *FAST]) == 1
    err = capsys.readouterr().err
    assert f"2 failed, listed in {outputs / 'failed_summaries.log'}" in err
    log = (outputs / "failed_summaries.log").read_text(encoding="utf-8").splitlines()
    assert [line.split("\t")[0] for line in log] == ["a.json", "b.JSON"]  # the collision is found first, logged sorted


def test_reason_is_bounded():
    assert len(summarize.one_line("x" * 1000)) == 300


# -- merge ---------------------------------------------------------------------------------------


def _data(root: Path, *names: str) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("x", encoding="utf-8")


def test_merge_bytes_order_and_key_order(tmp_path, capsys):
    script = load_script("process_data/merge_jsonl.py")
    _data(tmp_path, "abc/1.abc", "abc/2.abc")
    summaries = tmp_path / "summaries"
    (summaries / "a").mkdir(parents=True)
    first = {"filepaths": ["abc/1.abc"], "title": "Ünï", "summary_en": "E.",
             "summary_nen": {"language": "Welsh", "summary": "W."}}
    (summaries / "a-b.json").write_text(json.dumps(first), encoding="utf-8")
    second = dict(first, filepaths=["abc/2.abc"], title="two")
    (summaries / "a" / "b.json").write_text(json.dumps(second), encoding="utf-8")
    out = tmp_path / "train.jsonl"
    assert script.main([str(summaries), str(out)]) == 0
    # ordered by the relative POSIX path string ("a-b.json" < "a/b.json"); keys kept in the file's order
    assert out.read_bytes() == (json.dumps(first, ensure_ascii=False) + "\n"
                                + json.dumps(second, ensure_ascii=False) + "\n").encode("utf-8")


def test_merge_refuses_empty_and_incomplete_records(tmp_path, capsys):
    script = load_script("process_data/merge_jsonl.py")
    _data(tmp_path, "abc/a.abc")
    (tmp_path / "adir").mkdir()
    summaries = tmp_path / "summaries"
    write_summary(summaries, "empty_en.json", ["abc/a.abc"], summary_en=[])
    write_summary(summaries, "no_lang.json", ["abc/a.abc"], summary_nen={"summary": "W."})
    write_summary(summaries, "no_files.json", [])
    write_summary(summaries, "dir.json", ["adir"])
    write_summary(summaries, "ok.json", ["abc/a.abc"])
    out = tmp_path / "train.jsonl"
    assert script.main([str(summaries), str(out)]) == 1
    err = capsys.readouterr().err
    for name in ("empty_en.json", "no_lang.json", "no_files.json", "dir.json"):
        assert f"skipped: {name}" in err
    assert [json.loads(line)["title"] for line in out.read_text(encoding="utf-8").splitlines()] == ["ok"]


def test_non_utf8_file_names_are_summarised_and_logged(tmp_path, api_env, capsys):
    # A Latin-1 name reaches Python as lone surrogates: the language draw and the failure log encoded it strictly,
    # and the UnicodeEncodeError ended the whole run (no summary line, later files never sent).
    script = load_script("process_data/gpt4_summarize.py")
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    for name, text in ((b"bad_caf\xe9.json", b"{not json"), (b"caf\xe9.json", b'{"title": "latin", "filepaths": ["abc/x.abc"]}')):
        with open(os.path.join(os.fsencode(inputs), name), "wb") as f:
            f.write(text)
    write_metadata(inputs, "z.json", "good")
    with ScriptedLLM({"latin": ["ok"], "good": ["ok"]}) as llm:
        code = script.main([str(inputs), str(outputs), "--model", "m", "--base_url", llm.base_url, *FAST])
        assert code == 1 and llm.titles_requested() == ["good", "latin"]
        name = "caf" + b"\xe9".decode("utf-8", "surrogateescape") + ".json"
        assert llm.requests[[r["title"] for r in llm.requests].index("latin")]["language"] \
            == random.Random(b"0:caf\xe9.json").choice(load_languages())  # seeded with the name's bytes
    assert choose_language(0, "é/x.json", load_languages()) == random.Random("0:é/x.json").choice(load_languages())
    assert (outputs / name).is_file() and (outputs / "z.json").is_file()
    assert (outputs / "failed_summaries.log").read_bytes().startswith(b"bad_caf\xe9.json\tinput is not valid JSON")
    captured = capsys.readouterr()
    assert captured.out.strip().splitlines()[-1] == "done 2, skipped 0, failed 1, retries 0"
    assert "failed: bad_caf\\xe9.json" in captured.err


def test_merge_jsonl_from_a_linked_folder_is_read_by_training(tmp_path, capsys):
    # The JSONL's folder reached through a link: training reads filepaths from its real folder
    # (jsonl.resolve().parent), as the file system resolves ``..``; lexical ``..`` from the link named other files.
    from clamp2.training.data import read_pairs
    script = load_script("process_data/merge_jsonl.py")
    data = tmp_path / "data"
    (data / "abc").mkdir(parents=True)
    (data / "abc" / "a.abc").write_text("X:1\n", encoding="utf-8")
    write_summary(tmp_path / "summaries", "a.json", ["abc/a.abc"])
    (tmp_path / "real" / "deep").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real" / "deep", target_is_directory=True)
    out = tmp_path / "link" / "train.jsonl"
    assert script.main([str(tmp_path / "summaries"), str(out), "--data_root", str(data)]) == 0
    record = json.loads(out.read_text(encoding="utf-8"))
    assert record["filepaths"] == ["../../data/abc/a.abc"]
    assert [[p.resolve() for p in item.music_paths] for item in read_pairs(out, True)] == [[(data / "abc" / "a.abc").resolve()]]
    # without ``..`` the path stays as it was (a plain descent is the same from the link and from its target)
    out = tmp_path / "link" / "in_place.jsonl"
    (tmp_path / "real" / "deep" / "abc").mkdir()
    (tmp_path / "real" / "deep" / "abc" / "a.abc").write_text("X:1\n", encoding="utf-8")
    assert script.main([str(tmp_path / "summaries"), str(out)]) == 0
    assert json.loads(out.read_text(encoding="utf-8"))["filepaths"] == ["abc/a.abc"]


def test_merge_leaves_out_a_record_with_a_lone_surrogate(tmp_path, capsys):
    # "\ud800" is valid JSON (json.load gives a lone surrogate) but no UTF-8 text: the JSONL's write raised at the
    # end, so one such file (an ASCII-escaped hand-made or foreign summary) lost the whole merge.
    script = load_script("process_data/merge_jsonl.py")
    (tmp_path / "a.abc").write_text("x", encoding="utf-8")
    write_summary(tmp_path / "summaries", "good.json", ["a.abc"])
    (tmp_path / "summaries" / "lone.json").write_text(
        '{"summary_en": "bad \\ud800", "summary_nen": {"language": "Welsh", "summary": "y"}, "filepaths": ["a.abc"]}',
        encoding="ascii")
    out = tmp_path / "train.jsonl"
    assert script.main([str(tmp_path / "summaries"), str(out)]) == 1
    captured = capsys.readouterr()
    assert "skipped: lone.json: text that is not valid Unicode" in captured.err
    assert "wrote 1 records" in captured.out
    assert [json.loads(line)["title"] for line in out.read_text(encoding="utf-8").splitlines()] == ["good"]


# --------------------------------------------------------------------------------------------------
# A hostile server (audit_summaries): slow or endless answers, huge bodies, a key in the answer


class HostileServer(LocalServer):
    """One raw answer per request on 127.0.0.1: ``mode`` "drip" (a valid answer, one byte per 0.2 s,
    headers included), "endless" (chunked spaces forever), "huge" (a 40 MiB completion) or "key"
    (a valid answer whose summaries quote the key)."""

    def __init__(self, mode: str):
        self.mode = mode
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                return

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests += 1
                try:
                    server.answer(self, body)
                except (BrokenPipeError, ConnectionResetError, OSError):
                    return

        self.serve(Handler, daemon_threads=True)

    def answer(self, handler, body: dict) -> None:
        metadata = json.loads(body["messages"][-1]["content"])
        language = metadata["nen_language"]
        content = valid_answer(language, metadata["title"])
        if self.mode == "key":
            content = json.dumps({"summary_en": f"Your key is {SECRET}.",
                                  "summary_nen": {"language": language, "summary": SECRET}})
        completion = {"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                      "choices": [{"index": 0, "finish_reason": "stop",
                                   "message": {"role": "assistant", "content": content}}]}
        if self.mode == "parts":  # content as a list of parts, as some servers send
            completion["choices"][0]["message"]["content"] = [{"type": "text", "text": content}]
        data = json.dumps(completion).encode()
        if self.mode in ("html", "html_as_json"):  # a proxy's login or error page with status 200
            data = b"<html><body>Please sign in</body></html>"
        wfile = handler.wfile
        if self.mode == "huge":
            data = data.replace(b"A summary", b"A summary" + b"x" * (40 << 20))
        if self.mode == "endless":
            wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
            while not self.stopping.wait(0.05):
                wfile.write(b"1000\r\n" + b" " * 0x1000 + b"\r\n")
                wfile.flush()
            return
        kind = b"text/html" if self.mode == "html" else b"application/json"
        head = b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n" % (kind, len(data))
        response = head + data
        if self.mode == "drip":
            for i in range(len(response)):
                if self.stopping.wait(0.2):
                    return
                wfile.write(response[i:i + 1])
                wfile.flush()
            return
        wfile.write(response)


@pytest.mark.parametrize("mode", ["drip", "endless"])
def test_timeout_bounds_the_whole_request(tmp_path, api_env, capsys, mode):
    # --timeout is per request, not per socket read: a server that trickles bytes (one per 0.2 s) or
    # streams whitespace forever fails the file after about --timeout, instead of hanging the batch.
    script = load_script("process_data/gpt4_summarize.py")
    write_metadata(tmp_path / "in", "a.json", "a")
    codes = []
    with HostileServer(mode) as server:
        argv = [str(tmp_path / "in"), str(tmp_path / "out"), "--model", "m", "--base_url", server.base_url,
                "--workers", "1", "--timeout", "1.0", "--max_retries", "1", "--backoff_base", "0.01",
                "--backoff_cap", "0.05", "--no_progress"]
        run = threading.Thread(target=lambda: codes.append(script.main(argv)), daemon=True)
        run.start()
        run.join(timeout=15)  # a hang fails the test instead of hanging the suite
        assert not run.is_alive(), "the run hangs on a server that never finishes its answer"
    captured = capsys.readouterr()
    assert codes == [1]
    assert server.requests == 2  # the time-out is retried like any other
    reason = (tmp_path / "out" / "failed_summaries.log").read_text(encoding="utf-8")
    assert "gave up after 1 retries" in reason and "Timeout" in reason, reason
    assert captured.out.strip().endswith("done 0, skipped 0, failed 1, retries 1")


def test_a_huge_answer_fails_its_file_without_being_read_whole(tmp_path, api_env, capsys, monkeypatch):
    # 40 MiB of answer: refused at the cap (lowered here to 1 MiB), not retried, not held in memory.
    monkeypatch.setattr(summarize, "MAX_RESPONSE_BYTES", 1 << 20, raising=False)
    script = load_script("process_data/gpt4_summarize.py")
    write_metadata(tmp_path / "in", "a.json", "a")
    with HostileServer("huge") as server:
        code = script.main([str(tmp_path / "in"), str(tmp_path / "out"), "--model", "m", "--base_url",
                            server.base_url, "--workers", "1", *FAST])
    capsys.readouterr()
    assert code == 1 and server.requests == 1
    reason = (tmp_path / "out" / "failed_summaries.log").read_text(encoding="utf-8")
    assert "larger than 1 MiB" in reason, reason


def test_an_answer_quoting_the_key_is_not_written(tmp_path, api_env, capsys):
    # The server has the key; a summary quoting it would carry it into the training data.
    script = load_script("process_data/gpt4_summarize.py")
    write_metadata(tmp_path / "in", "a.json", "a")
    with HostileServer("key") as server:
        code = script.main([str(tmp_path / "in"), str(tmp_path / "out"), "--model", "m", "--base_url",
                            server.base_url, "--workers", "1", *FAST])
    captured = capsys.readouterr()
    assert code == 1
    assert "answer contains the API key" in (tmp_path / "out" / "failed_summaries.log").read_text(encoding="utf-8")
    assert_secret_absent(tmp_path, captured.out, captured.err)


@pytest.mark.parametrize("key", ["sk-test\u200bSECRET", "sk-test\nSECRET", "sk-tést"])
def test_a_key_that_cannot_be_sent_is_a_usage_error(tmp_path, api_env, capsys, monkeypatch, key):
    # A pasted zero-width space, an inner newline or a non-ASCII letter failed every file (the newline one as a
    # "Connection error", retried): one line before any request, naming neither the key nor its characters.
    monkeypatch.setenv("OPENAI_API_KEY", key)
    script = load_script("process_data/gpt4_summarize.py")
    write_metadata(tmp_path / "in", "a.json", "a")
    with ScriptedLLM({"a": ["ok"]}) as llm:
        code = script.main([str(tmp_path / "in"), str(tmp_path / "out"), "--model", "m", "--base_url",
                            llm.base_url, *FAST])
        assert llm.requests == []
    captured = capsys.readouterr()
    assert code == 2
    assert "OPENAI_API_KEY" in captured.err and "cannot be sent" in captured.err
    assert "SECRET" not in captured.err + captured.out and "sk-t" not in captured.err + captured.out


@pytest.mark.skipif(os.name == "nt", reason="POSIX links")
def test_a_failure_log_that_is_a_link_is_replaced_not_written_through(tmp_path, api_env, capsys):
    script = load_script("process_data/gpt4_summarize.py")
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    write_metadata(inputs, "one.json", "good")
    outputs.mkdir()
    (tmp_path / "outside.log").write_text("precious\n", encoding="utf-8")
    (outputs / "failed_summaries.log").symlink_to(tmp_path / "outside.log")
    with ScriptedLLM(SCRIPT) as llm:
        assert script.main([str(inputs), str(outputs), "--model", "m", "--base_url", llm.base_url, *FAST]) == 0
    assert (tmp_path / "outside.log").read_text(encoding="utf-8") == "precious\n"
    assert not (outputs / "failed_summaries.log").is_symlink()


def test_a_server_failing_file_after_file_stops_the_run(tmp_path, api_env, capsys):
    # 500s forever cost every file 1 + --max_retries requests (~5 h for 10,000 files at the defaults) before the run
    # ended with all failed. After server_down_streak files in a row fail so, the run stops; a re-run resumes.
    script = load_script("process_data/gpt4_summarize.py")
    for index in range(40):
        write_metadata(tmp_path / "in", f"p{index:02d}.json", f"p{index:02d}")
    with ScriptedLLM({f"p{index:02d}": [500] for index in range(40)}) as llm:
        code = script.main([str(tmp_path / "in"), str(tmp_path / "out"), "--model", "m", "--base_url", llm.base_url,
                            "--workers", "2", *FAST])
        sent = len(llm.requests)
    captured = capsys.readouterr()
    assert code == 1
    assert "failed the last 10 files in a row, each after its retries" in captured.err
    assert "run the same command again once it answers" in captured.err
    failed = (tmp_path / "out" / "failed_summaries.log").read_text(encoding="utf-8").splitlines()
    assert 10 <= len(failed) <= 12 and all("gave up after 3 retries: HTTP 500" in line for line in failed)
    # The files in flight when it stopped send no further attempt (cancelled: a re-run sends them); none after.
    assert 4 * len(failed) <= sent < 4 * len(failed) + 4 * 2


def test_files_failing_among_answered_ones_do_not_stop_the_run(tmp_path, api_env, capsys):
    # An answer, even one that fails its file, shows the server up: only failures in a row count.
    script = load_script("process_data/gpt4_summarize.py")
    steps = {}
    for index in range(24):
        write_metadata(tmp_path / "in", f"p{index:02d}.json", f"p{index:02d}")
        steps[f"p{index:02d}"] = [500] if index % 8 else ["invalid"]
    with ScriptedLLM(steps) as llm:
        code = script.main([str(tmp_path / "in"), str(tmp_path / "out"), "--model", "m", "--base_url", llm.base_url,
                            "--workers", "1", *FAST])
    captured = capsys.readouterr()
    assert code == 1 and "in a row" not in captured.err
    assert len((tmp_path / "out" / "failed_summaries.log").read_text(encoding="utf-8").splitlines()) == 24


@pytest.mark.parametrize("mode, reason", [
    ("html", "response has no choices (the server answered text, not a chat completion)"),
    ("html_as_json", "response is not JSON (Expecting value: line 1 column 1 (char 0))"),
    ("parts", "answer content is JSON list, not text")])
def test_an_answer_of_another_shape_fails_its_file_saying_what_it_is(tmp_path, api_env, capsys, mode, reason):
    # Was "AttributeError: 'str' object has no attribute 'choices'" / "'list' object has no attribute 'strip'".
    script = load_script("process_data/gpt4_summarize.py")
    write_metadata(tmp_path / "in", "a.json", "a")
    with HostileServer(mode) as server:
        code = script.main([str(tmp_path / "in"), str(tmp_path / "out"), "--model", "m", "--base_url",
                            server.base_url, "--workers", "1", *FAST])
    capsys.readouterr()
    assert code == 1 and server.requests == 1
    assert (tmp_path / "out" / "failed_summaries.log").read_text(encoding="utf-8") == f"a.json\t{reason}\n"


def test_a_request_that_gets_no_answer_leaves_no_timer_thread(tmp_path):
    # Each request's whole-request deadline is a timer thread, cancelled when its answer is closed; a refused
    # connection has no answer, and its timer lived on for --timeout seconds: one thread per request.
    import socket

    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    client = summarize.make_client("sk-test", f"http://127.0.0.1:{port}/v1", timeout=60.0)
    before = threading.active_count()
    for _ in range(30):
        with pytest.raises(openai.APIConnectionError):
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert threading.active_count() - before < 5, threading.enumerate()


@pytest.mark.parametrize("key", ["none", "a", "EMPTY", "ollama"])
def test_a_dummy_key_of_a_local_server_is_not_looked_for_in_answers(key):
    # vLLM, Ollama and llama.cpp take any key; "none" or "a" was found in answers using that word, failing them all.
    answer = json.dumps({"summary_en": "A lively jig in D major, none too fast, for a fiddle and EMPTY stage.",
                         "summary_nen": {"language": "French", "summary": "Une gigue, ollama."}})
    assert parse_answer(answer, "French", "stop", key)[0].startswith("A lively jig")
