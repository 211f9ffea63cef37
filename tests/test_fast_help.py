"""``--help`` and usage errors of every script answer before torch or transformers load (seconds on a laptop,
tens of seconds on a cluster file system): argument definitions live in modules without them, and the scripts
import them only once the arguments are parsed."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

SCRIPTS = sorted(str(p.relative_to(REPO_ROOT)) for folder in ("process_data", "code", "semantic_search",
                                                               "music_classification")
                 for p in (REPO_ROOT / folder).glob("*.py") if p.name != "config.py")

# Runs the script as ``python SCRIPT ARGS`` would, once with --help and once with an unknown flag, and prints
# the exit statuses and whether torch or transformers were imported by then.
PROBE = """
import json, runpy, sys
script, seen = sys.argv[1], []
for args in (["--help"], ["--no_such_flag"]):
    sys.argv = [script, *args]
    try:
        runpy.run_path(script, run_name="__main__")
        status = 0
    except SystemExit as exc:
        status = exc.code
    seen.append([status, sorted(m for m in ("torch", "transformers") if m in sys.modules)])
print(json.dumps(seen))
"""


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_and_usage_errors_do_not_import_torch_or_transformers(script, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", PROBE, str(REPO_ROOT / script)], capture_output=True, text=True,
                            cwd=tmp_path, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    (help_status, after_help), (error_status, after_error) = json.loads(result.stdout.strip().splitlines()[-1])
    assert help_status == 0 and "usage:" in result.stdout, result.stdout
    assert error_status == 2 and ": error: " in result.stderr, result.stderr  # the first usage error argparse finds
    assert after_help == [], f"{script} --help imported {after_help}"
    assert after_error == [], f"{script} with a wrong flag imported {after_error}"
