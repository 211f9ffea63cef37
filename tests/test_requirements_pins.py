"""requirements.txt (and environment.yml, which installs it) pins what pyproject.toml declares, within its bounds,
for the Pythons pyproject.toml admits."""

from __future__ import annotations

import importlib.metadata
import tomllib

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from conftest import REPO_ROOT


def pyproject() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def pins() -> dict:
    found = {}
    for line in (REPO_ROOT / "requirements.txt").read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            found[canonicalize_name(requirement.name)] = requirement
    return found


def test_every_declared_dependency_is_pinned_within_its_bound():
    pinned = pins()
    problems = []
    for text in pyproject()["dependencies"]:
        declared = Requirement(text)
        pin = pinned.get(canonicalize_name(declared.name))
        if pin is None:
            problems.append(f"{text}: not pinned in requirements.txt")
            continue
        version = next(iter(pin.specifier)).version
        if not declared.specifier.contains(version, prereleases=True):
            problems.append(f"{text}: requirements.txt pins {version}")
    assert not problems, "\n".join(problems)


def test_the_oldest_python_pyproject_admits_can_install_the_pins():
    """A pinned package whose own Requires-Python excludes pyproject's oldest Python makes `pip install -r
    requirements.txt` (and, for transformers>=5.23, `pip install -e .`) fail there."""
    floor = min(spec.version for spec in SpecifierSet(pyproject()["requires-python"]) if spec.operator == ">=")
    problems = []
    for name in pins():
        try:
            requires = importlib.metadata.metadata(name).get("Requires-Python")
        except importlib.metadata.PackageNotFoundError:
            continue
        if requires and not SpecifierSet(requires).contains(floor):
            problems.append(f"{name} {importlib.metadata.version(name)} requires Python {requires}")
    assert not problems, f"pyproject.toml admits Python {floor}, but:\n" + "\n".join(problems)
