"""The package installed as a library (a wheel, ``pip install git+...``), not run from the checkout.

A copy of ``clamp2/`` in a folder on PYTHONPATH stands for the installed package: ``Path(__file__)`` of its
modules then points outside any checkout, as in a site-packages. The sdist and the wheel are built here
with setuptools' own PEP 517 hooks (no network, no ``build`` package).
"""

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from conftest import REPO_ROOT

SKIP = shutil.ignore_patterns("__pycache__", "*.pyc")


def installed_copy(tmp_path: Path) -> Path:
    """``clamp2/`` copied into ``tmp_path/site`` (outside the checkout): the folder to put on PYTHONPATH."""
    site = tmp_path / "site"
    shutil.copytree(REPO_ROOT / "clamp2", site / "clamp2", ignore=SKIP)
    return site


def run_installed(site: Path, code: str, cwd: Path, **env) -> subprocess.CompletedProcess:
    environ = dict(os.environ, PYTHONPATH=str(site), **env)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=environ, capture_output=True, text=True,
                          timeout=120)


def build(tmp_path: Path, hook: str) -> Path:
    """``build_sdist``/``build_wheel`` of a copy of the project's packaging inputs (the checkout is left alone)."""
    source = tmp_path / "source"
    shutil.copytree(REPO_ROOT / "clamp2", source / "clamp2", ignore=SKIP)
    for name in ("pyproject.toml", "README.md", "MANIFEST.in", "LICENSE"):
        if (REPO_ROOT / name).is_file():
            shutil.copy(REPO_ROOT / name, source / name)
    (source / "tests").mkdir()
    for name in ("conftest.py", "test_installed.py"):
        shutil.copy(REPO_ROOT / "tests" / name, source / "tests" / name)
    out = tmp_path / "dist"
    code = f"from setuptools import build_meta; print(build_meta.{hook}({str(out)!r}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=source, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return out / done.stdout.strip().splitlines()[-1]


def package_files() -> set:
    return {path.relative_to(REPO_ROOT).as_posix() for path in (REPO_ROOT / "clamp2").rglob("*")
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"}


def test_the_wheel_holds_every_module_and_the_package_data_and_nothing_else(tmp_path):
    wheel = build(tmp_path, "build_wheel")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {name for name in names if not name.startswith("clamp2-0.1.0.dist-info/")} == package_files()
    assert "clamp2/data/languages.txt" in names


def test_the_sdist_ships_the_package_not_a_test_suite_that_cannot_run(tmp_path):
    # setuptools adds tests/test*.py by default, without conftest.py and tests/data: a suite that cannot run.
    sdist = build(tmp_path, "build_sdist")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert not [name for name in names if name.startswith("tests")]
    assert package_files() <= names and "README.md" in names and "pyproject.toml" in names


def test_a_search_script_of_a_checkout_reads_that_checkouts_config_when_clamp2_is_installed(tmp_path):
    # pip install . (not -e) or pip install git+...: clamp2's modules are outside the checkout, and
    # semantic_search/ has no config.py of its own; the scripts used to stop at site-packages/code/config.py.
    site = installed_copy(tmp_path)
    code = ("import clamp2.cli as cli, sys; assert cli.__file__.startswith(sys.argv[1]), cli.__file__; "
            "print(cli.load_script_config(sys.argv[2], report=False).__file__)")
    done = subprocess.run([sys.executable, "-c", code, str(site), str(REPO_ROOT / "semantic_search" / "zero_shot.py")],
                          cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(site)), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == REPO_ROOT / "code" / "config.py"


def test_a_script_without_any_config_says_what_to_do(tmp_path):
    site = installed_copy(tmp_path)
    lonely = tmp_path / "mine" / "zero_shot.py"
    lonely.parent.mkdir()
    shutil.copy(REPO_ROOT / "semantic_search" / "zero_shot.py", lonely)
    done = run_installed(site, f"import clamp2.cli as cli; cli.load_script_config({str(lonely)!r})", tmp_path)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "config.py not found" in done.stderr and "clone of the repository" in done.stderr


def test_the_quick_start_outside_a_checkout_is_one_line_before_any_work(tmp_path):
    # It used to build the corpus, then fail with a FileNotFoundError traceback on process_data/batch_xml2abc.py.
    site = installed_copy(tmp_path)
    code = ("import sys; from pathlib import Path; from clamp2.quickstart.pipeline import Quickstart, Settings; "
            "sys.exit(Quickstart(Path('out'), Settings.tiny(), progress=False).run())")
    done = run_installed(site, code, tmp_path)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "clone of the repository" in done.stderr
    assert not (tmp_path / "out" / "data").exists()


def test_the_quick_start_script_runs_its_own_checkouts_scripts_when_clamp2_is_installed(tmp_path):
    # code/quickstart.py points the pipeline at its checkout: it gets past the check above to the usual
    # usage errors (a missing --weights file here, to stop before any work).
    site = installed_copy(tmp_path)
    environ = dict(os.environ, PYTHONPATH=str(site))
    done = subprocess.run([sys.executable, str(REPO_ROOT / "code" / "quickstart.py"), "--out", str(tmp_path / "out"),
                           "--weights", str(tmp_path / "missing.pth"), "--text_model", str(tmp_path)],
                          cwd=tmp_path, env=environ, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "missing.pth: no such file" in done.stderr and "clone of the repository" not in done.stderr


# The distribution that provides each top-level module the package imports (where the names differ).
DISTRIBUTION = {"sklearn": "scikit-learn", "PIL": "pillow", "faiss": "faiss-cpu", "huggingface_hub": "huggingface-hub"}


def test_every_module_the_package_imports_is_a_declared_dependency():
    # pip installs what pyproject.toml declares, nothing from requirements.txt: an import that is only there
    # (or only a dependency of a dependency) is a bug for pip users.
    import ast
    import re

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    declared = project["dependencies"] + [d for extra in project["optional-dependencies"].values() for d in extra]
    names = {re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0].lower().replace("_", "-") for d in declared}
    imported = set()
    for path in (REPO_ROOT / "clamp2").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    third_party = {name for name in imported if name not in sys.stdlib_module_names and name != "clamp2"}
    missing = sorted(name for name in third_party
                     if DISTRIBUTION.get(name, name).lower().replace("_", "-") not in names)
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
