"""What every command-line script shares: one-line usage errors and loading ``code/config.py``.

Scripts exit 0 on success, 1 when some inputs failed (listed), 2 for a usage or configuration
error, which is always one line on stderr (``<script>: error: ...``), never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import NoReturn

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (and a pointer to ``--help``) instead of usage + error."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def fail_usage(message: str) -> NoReturn:
    """Print ``error: message`` on one line and exit with the usage status (2)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


def load_script_config(script_file: str | os.PathLike, report: bool = True) -> ModuleType:
    """``code/config.py`` (beside the script, or the repository's), with environment overrides applied.

    A bad override (misspelt name, wrong type) is one line and exit status 2.
    """
    from clamp2.configuration import ConfigError, load_config

    path = Path(script_file).resolve().with_name("config.py")
    if not path.is_file():
        path = repository_config_path()
    try:
        return load_config(path, report=report)
    except (ConfigError, FileNotFoundError) as error:
        fail_usage(str(error))


def repository_config_path() -> Path:
    """The repository's ``code/config.py`` (the package sits beside ``code/`` in a checkout)."""
    return Path(__file__).resolve().parents[1] / "code" / "config.py"
