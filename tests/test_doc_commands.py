"""The commands users copy from README.md, docs/*.md and the scripts' --help texts parse as written.

Every shell command that names a repository script (code blocks and inline `python ...` commands) is
split into its arguments and given to that script's own ``parse_args``, without running it: the
script exists, every flag exists and takes the value form shown, the positionals are complete. The
docs' placeholders are read as a user fills them in: ``[--flag X]`` is given, ``a|b`` takes ``a``,
``[--x | --y]`` takes ``--x``, ``...`` is dropped and ``E``/``N``/``B``/``K`` are numbers.
A `--flag` mentioned anywhere in the docs' prose exists in some script's --help (or is a launcher's).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import shlex
import sys

import pytest

from conftest import REPO_ROOT

SCRIPT = re.compile(r"\b((?:process_data|code|semantic_search|music_classification|benchmarks)/\w+\.py)\b")
PLACEHOLDERS = {"E": "1", "N": "2", "B": "16", "K": "5"}
# Flags of other programs that the docs mention (torchrun, accelerate, pip, hf download, SLURM's sbatch).
FOREIGN_FLAGS = {"--nproc_per_node", "--nnodes", "--node_rank", "--master_addr", "--master_port", "--use_env",
                 "--multi_gpu", "--num_processes", "--cpu", "--no-deps", "--local-dir", "--include",
                 "--job-name", "--nodes", "--ntasks-per-node", "--gpus-per-node", "--cpus-per-task", "--time",
                 "--requeue"}
DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]


def shell_lines(text: str, code_only: bool = False):
    """(line number, command) of the shell code blocks (continuations joined) and inline commands."""
    in_block, language, pending = False, "", ""
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            in_block, language, pending = not in_block, line[3:].strip(), ""
            continue
        if in_block and language in ("bash", "sh", ""):
            if line.lstrip().startswith("#"):
                continue
            line = re.split(r"\s#\s", line)[0]
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            line, pending = pending + line, ""
            yield from ((number, part.strip()) for part in re.split(r"&&|;", line))
        elif not in_block and not code_only:
            for match in re.finditer(r"`([^`]*\b(?:python|torchrun)\b[^`]*)`", line):
                yield number, match.group(1)


def script_commands(lines):
    """(line, script, argv) of the commands that run a repository script."""
    for number, command in lines:
        command = re.split(r"\s#\s", command)[0].strip()
        command = re.sub(r"^srun (?:--\S+ )*bash -c '(.*)'$", r"\1", command)  # a SLURM batch script's, one node's
        if command.startswith(("curl", "hf ", "wget")) or command.rstrip().endswith("..."):
            continue
        if not re.match(r"^(\S+=\S+\s+)*(nice -n \d+ )?(\S*/)?(python\S*|torchrun|accelerate)\b", command):
            continue
        scripts = SCRIPT.findall(command)
        if scripts:
            yield number, scripts[0], argv_of(command, scripts[0])


def argv_of(command: str, script: str) -> list[str]:
    rest = command.split(script, 1)[1]
    rest = re.sub(r"\[([^\[\]]*)\]", lambda m: m.group(1).split(" | ")[0], rest)
    tokens = [t for t in shlex.split(rest) if t not in ("...", "|")]
    tokens = [t.split("|")[0] if re.fullmatch(r"[\w\-]+(\|[\w\-]+)+", t) else t for t in tokens]
    return [PLACEHOLDERS.get(t, t) for t in tokens]


_modules: dict = {}


def script_module(script: str):
    """The script imported as a module (registered, so its dataclasses resolve), once per session."""
    if script not in _modules:
        name = "doc_script_" + script.replace("/", "_")[:-3]
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / script)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        _modules[script] = module
    return _modules[script]


def parse(script: str, argv: list[str]) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of the script's parse_args on argv; 0 when it returns."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            script_module(script).parse_args(argv)
    except SystemExit as stop:
        return (stop.code or 0), out.getvalue(), err.getvalue()
    return 0, out.getvalue(), err.getvalue()


def all_scripts() -> list[str]:
    return sorted(str(p.relative_to(REPO_ROOT)) for folder in ("process_data", "code", "semantic_search",
                                                                "music_classification", "benchmarks")
                  for p in (REPO_ROOT / folder).glob("*.py") if p.name != "config.py")


def help_text(script: str) -> str:
    status, out, err = parse(script, ["--help"])
    assert status == 0, f"{script} --help: exit {status}: {err}"
    return out


def doc_commands():
    for doc in DOCS:
        for number, script, argv in script_commands(shell_lines(doc.read_text(encoding="utf-8"))):
            yield pytest.param(script, argv, id=f"{doc.relative_to(REPO_ROOT)}:{number}")


def test_the_docs_hold_commands():
    assert len(list(doc_commands())) > 80


@pytest.mark.parametrize("script,argv", list(doc_commands()))
def test_documented_command_parses(script, argv):
    assert (REPO_ROOT / script).is_file(), f"{script} does not exist"
    status, _, err = parse(script, argv)
    assert status == 0, f"{script} {shlex.join(argv)}: exit {status}: {err.strip()}"


@pytest.mark.parametrize("script", all_scripts())
def test_help_examples_parse(script):
    """The usage examples in each script's --help (and the commands it names of other scripts)."""
    text = re.sub(r"\\\n\s*", " ", help_text(script))
    problems = []
    for _, other, argv in script_commands((n, line.strip()) for n, line in enumerate(text.splitlines(), 1)):
        status, _, err = parse(other, argv)
        if status:
            problems.append(f"{other} {shlex.join(argv)}: exit {status}: {err.strip()}")
    assert not problems, f"--help of {script}:\n" + "\n".join(problems)


def test_flags_named_in_the_docs_exist():
    known = set(FOREIGN_FLAGS)
    for script in all_scripts():
        known |= set(re.findall(r"--[A-Za-z0-9_\-]+", help_text(script)))
    unknown = [f"{doc.relative_to(REPO_ROOT)}:{number}: {flag}"
               for doc in DOCS for number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1)
               for flag in re.findall(r"(?<![\w-])(--[A-Za-z][A-Za-z0-9_\-]*[A-Za-z0-9_])", line) if flag not in known]
    assert not unknown, "flags in the docs that no script takes:\n" + "\n".join(unknown)


def test_help_names_constants_that_exist():
    """A --help that says which code/config.py constant a flag sets names it as the file and the environment
    spell it: the trainers' shared flags once said `config NUM_EPOCH`, and `NUM_EPOCH=5` set nothing
    (the constant is M3_NUM_EPOCH / CLAMP2_NUM_EPOCH / CLAMP3_NUM_EPOCH)."""
    from clamp2.cli import repository_config_path
    from clamp2.configuration import load_config

    constants = {name for name in dir(load_config(repository_config_path(), report=False)) if name.isupper()}
    unknown = []
    for script in all_scripts():
        text = re.sub(r"\s+", " ", help_text(script))
        named = re.findall(r"config(?:\.py's|\.py)? ([A-Z][A-Z0-9_]{2,})", text)
        unknown += [f"{script}: config {name}" for name in named if name not in constants]
    assert not unknown, "--help names constants that code/config.py does not have:\n" + "\n".join(unknown)
