"""The repository stands alone: no tracked file refers to a path above the repository root.

Users clone this repository with nothing beside it, so tests, benchmarks, docs and scripts may
only read what is inside it (test data lives in tests/data/).
"""

import re
import subprocess
from pathlib import Path

from conftest import REPO_ROOT

TEXT_SUFFIXES = {".py", ".md", ".txt", ".toml", ".yml", ".yaml", ".cfg", ".ini", ".sh", ".json", ""}
# Built from pieces so this file does not match itself.
FORBIDDEN = [re.escape(".." + "/shared"), re.escape("shared" + "/spec"), re.escape("/" + "work/"),
             r"\.parent\s*/\s*[\"']" + "shared"]
MARKDOWN_LINK = re.compile(r"\]\(([^)#\s]+)")


def tracked_files() -> list[Path]:
    try:
        listing = subprocess.run(["git", "ls-files", "-z"], cwd=REPO_ROOT, capture_output=True, check=True).stdout
        names = [name for name in listing.decode().split("\0") if name]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (e.g. an unpacked archive)
        names = [str(p.relative_to(REPO_ROOT)) for p in REPO_ROOT.rglob("*")
                 if p.is_file() and ".venv" not in p.parts and ".git" not in p.parts]
    return [REPO_ROOT / name for name in names]


def text_of(path: Path) -> str | None:
    if path.suffix not in TEXT_SUFFIXES or path.stat().st_size > 2_000_000:
        return None
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None


def test_no_tracked_file_points_outside_the_repository():
    offenders = []
    pattern = re.compile("|".join(FORBIDDEN))
    for path in tracked_files():
        text = text_of(path)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if pattern.search(line):
                offenders.append(f"{path.relative_to(REPO_ROOT)}:{number}: {line.strip()[:120]}")
    assert not offenders, "tracked files refer to paths outside the repository:\n" + "\n".join(offenders)


def test_markdown_links_stay_inside_the_repository():
    offenders = []
    root = REPO_ROOT.resolve()
    for path in tracked_files():
        if path.suffix != ".md":
            continue
        for target in MARKDOWN_LINK.findall(path.read_text(encoding="utf-8")):
            if "://" in target or target.startswith("mailto:"):
                continue
            resolved = (path.parent / target).resolve()
            if root not in resolved.parents and resolved != root:
                offenders.append(f"{path.relative_to(REPO_ROOT)} -> {target}")
            elif not resolved.exists():
                offenders.append(f"{path.relative_to(REPO_ROOT)} -> {target} (missing)")
    assert not offenders, "markdown links leave the repository or point nowhere:\n" + "\n".join(offenders)


def test_reference_data_is_inside_the_repository():
    data = REPO_ROOT / "tests" / "data"
    for name in ("m3_state_dict.tsv", "clamp2_state_dict.tsv", "languages.txt", "vectors/tiny_m3.pth",
                 "vectors/tiny_clamp2.pth", "vectors/tiny_text_model/tokenizer.json"):
        assert (data / name).is_file(), name


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub makes of a page's headings: lower case, punctuation dropped (letters, digits,
    "-" and "_" kept), spaces to "-", a repeated heading numbered."""
    anchors: set[str] = set()
    in_code = False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        heading = None if in_code else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
            anchor, n = slug, 0
            while anchor in anchors:
                n += 1
                anchor = f"{slug}-{n}"
            anchors.add(anchor)
    return anchors


def test_markdown_anchors_name_headings_that_exist():
    offenders = []
    for path in tracked_files():
        if path.suffix != ".md":
            continue
        for target in re.findall(r"\]\(([^)\s]*#[^)\s]+)\)", path.read_text(encoding="utf-8")):
            if "://" in target:
                continue
            page, anchor = target.split("#", 1)
            page_path = (path.parent / page) if page else path
            if page_path.suffix == ".md" and page_path.is_file():
                if anchor not in github_anchors(page_path.read_text(encoding="utf-8")):
                    offenders.append(f"{path.relative_to(REPO_ROOT)} -> {target}")
    assert not offenders, "markdown links to headings that do not exist:\n" + "\n".join(offenders)
