"""English + one-other-language summaries of music metadata by an LLM.

    export OPENAI_API_KEY=sk-...
    python process_data/gpt4_summarize.py metadata/ summaries/ --model gpt-4o
    # any OpenAI-compatible endpoint (vLLM, Ollama, a proxy), more parallel requests:
    python process_data/gpt4_summarize.py metadata/ summaries/ --model Qwen2.5-72B-Instruct \\
        --base_url http://localhost:8000/v1 --workers 32
    # then one training JSONL:
    python process_data/merge_jsonl.py summaries/ data/train.jsonl --data_root data/

Every ``.json`` under ``input_dir`` (one metadata object per piece, with ``filepaths``) gives
``output_dir/<same folder>/<stem>.json``: the metadata without nulls plus ``summary_en``,
``summary_nen`` and ``filepaths``. The key is read only from ``OPENAI_API_KEY`` and never written
anywhere. Re-running resumes: existing outputs are skipped and only missing ones are requested
(files that failed before are requested again). Each file's language is drawn from
``(--seed, relative path)``, so it is the same whatever the scheduling or the files skipped.

Failures (bad input, a ``None`` answer, invalid JSON, missing/empty summaries, wrong language,
retries exhausted) go to ``output_dir/failed_summaries.log`` as ``path<TAB>reason`` and to stderr.
Rate limits, 5xx, timeouts and connection errors are retried (``--max_retries`` re-sends,
full-jitter exponential back-off between ``--backoff_base`` and ``--backoff_cap`` seconds).
401/403/404 (wrong key, no access, wrong model or base URL) abort the run at once; a server that
fails 10 files in a row (or twice ``--workers``), each after its retries, stops it (exit 1; re-run to resume).
The last stdout line is ``done N, skipped N, failed N, retries N``. Exit status: 0 all done,
1 some files failed, 2 usage error or aborted run.
"""

from __future__ import annotations

from clamp2.cli import interrupt_in_one_line

interrupt_in_one_line()  # before torch loads: Ctrl-C is one line, never a traceback

import argparse
import os
import sys
from pathlib import Path
from clamp2.cli import ArgumentParser

ENV_KEY = "OPENAI_API_KEY"


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(
        description="Summarise music metadata JSON files in English and one of 100 other languages "
                    "with an OpenAI-compatible chat-completions endpoint (key from $OPENAI_API_KEY).")
    parser.add_argument("input_dir", help="folder of metadata .json files (searched recursively)")
    parser.add_argument("output_dir", help="folder for the summary .json files (mirrors input folders)")
    parser.add_argument("--model", required=True, help="model name, e.g. gpt-4o")
    parser.add_argument("--base_url", default=None,
                        help="API base URL, e.g. http://localhost:8000/v1 (default: the client's, "
                             "$OPENAI_BASE_URL or api.openai.com)")
    parser.add_argument("--workers", type=int, default=8, help="concurrent requests (default 8)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the per-file language choice (default 0)")
    parser.add_argument("--languages", default=None,
                        help="file of languages, one per line (default: the 100 CLaMP 2 languages)")
    parser.add_argument("--prompt", default=None, metavar="FILE",
                        help='the system prompt and few-shot exchanges to send instead of this project\'s: a JSON '
                             'file {"system": "...", "examples": [{"user": "<text or metadata object>", '
                             '"assistant": "..."}]}, or a copy of the reference\'s process_data/gpt4_summarize.py '
                             '(github.com/sanderwood/clamp2), whose prompt strings are read, not run')
    parser.add_argument("--max_retries", type=int, default=5,
                        help="re-sends per file after rate limits, 5xx, timeouts (default 5)")
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds allowed per request, connection to last byte (default 60)")
    parser.add_argument("--backoff_base", type=float, default=1.0,
                        help="first back-off ceiling in seconds, doubled per retry (default 1)")
    parser.add_argument("--backoff_cap", type=float, default=60.0,
                        help="largest back-off in seconds (default 60)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    if args.max_retries < 0:
        parser.error("--max_retries must be 0 or more")
    if args.timeout <= 0 or args.backoff_base < 0 or args.backoff_cap < 0:
        parser.error("--timeout must be positive and the back-off times non-negative")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from clamp2.files import find_files, input_problem, output_problem, say_disk_full, unreachable
    from clamp2.convert.summarize import (DEFAULT_PROMPT, FAILURE_LOG_NAME, RetryPolicy, load_languages,
                                          load_prompt, make_client, summarize_folder)

    api_key = os.environ.get(ENV_KEY, "").strip()
    if not api_key:
        print(f"error: {ENV_KEY} is not set; run `export {ENV_KEY}=<your key>` first "
              "(the key is read only from the environment)", file=sys.stderr)
        return 2
    # Sent as an HTTP header: a pasted zero-width space, inner newline or accented letter failed every file.
    if not all(" " < character < "\x7f" for character in api_key):
        print(f"error: {ENV_KEY} cannot be sent: it has a space, a control character or a non-ASCII character "
              "(a copy-paste artefact?); set it again", file=sys.stderr)
        return 2
    input_dir, output_dir = Path(args.input_dir), Path(args.output_dir)
    problem = unreachable(input_dir, "input folder") or unreachable(output_dir, "output folder")
    if problem or not input_dir.is_dir():
        print(f"error: {problem or f'input folder {input_dir} does not exist'}", file=sys.stderr)
        return 2
    # As a non-root user: an input folder at chmod 000/300 was "no .json files under"; an output folder that cannot be
    # written a PermissionError traceback (its mkdir, or the failure log) once the requests were set up.
    if problem := input_problem(input_dir, "input folder") or output_problem(output_dir, folder=True):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    # Outputs are .json too: inside the input folder they would be read as inputs next run.
    if output_dir.resolve().is_relative_to(input_dir.resolve()):
        print(f"error: output folder {output_dir} must not be inside the input folder {input_dir}",
              file=sys.stderr)
        return 2
    if not find_files(input_dir, [".json"]):
        print(f"error: no .json files under {input_dir}", file=sys.stderr)
        return 2
    try:
        languages = load_languages(args.languages)
    except (OSError, ValueError) as error:
        print(f"error: languages: {error}", file=sys.stderr)
        return 2
    try:
        prompt = load_prompt(args.prompt) if args.prompt is not None else DEFAULT_PROMPT
    except ValueError as error:
        print(f"error: prompt: {error}", file=sys.stderr)
        return 2

    policy = RetryPolicy(max_retries=args.max_retries, timeout=args.timeout,
                         backoff_base=args.backoff_base, backoff_cap=args.backoff_cap)
    client = make_client(api_key, args.base_url, args.timeout)
    try:
        counts = summarize_folder(input_dir, output_dir, client, args.model, languages=languages,
                                  seed=args.seed, workers=args.workers, policy=policy,
                                  secret=api_key, progress=not args.no_progress, prompt=prompt)
    finally:
        client.close()
    if counts.aborted:
        print(f"error: aborted, the API refused the run ({counts.aborted}); check {ENV_KEY}, "
              "--model and --base_url", file=sys.stderr)
    if counts.server_down:
        streak, reason = counts.server_down
        print(f"error: stopped: the server failed the last {streak} files in a row, each after its retries (last: "
              f"{reason}); run the same command again once it answers (finished summaries are kept)", file=sys.stderr)
    if counts.disk_full:
        say_disk_full(counts.disk_full, "summarize the remaining files")
    if counts.failed:
        print(f"{counts.failed} failed, listed in {output_dir / FAILURE_LOG_NAME}", file=sys.stderr)
    print(counts.summary_line())
    if counts.aborted:
        return 2
    return 1 if counts.failed or counts.disk_full else 0


if __name__ == "__main__":
    sys.exit(main())
