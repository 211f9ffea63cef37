"""The package's layout: every import between its modules goes down the layers of ``clamp2/__init__.py``, none in a cycle.

Function-level imports count too: a lazy import from a lower layer into a higher one is still a
dependency in the wrong direction.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "clamp2"

# Top to bottom of the docstring's map: a module may import from its own layer or the layers before it.
LAYERS = [
    {"configuration", "cli", "progress", "files", "distributed", "checkpoint", "hub", "attention_arguments", "attention",
     "patchilizer",
     "text_model", "loss", "data", "benchmarking", "workers", "provenance"},
    {"models"},
    {"convert"},
    {"extraction"},
    {"training"},
    {"cache"},
    {"api"},
    {"search"},
    {"probe"},
    {"quickstart"},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set) -> set:
    """The package's modules that ``path`` imports, anywhere in the file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        for candidate in candidates:
            if candidate in modules and candidate != name:
                found.add(candidate)
    return found


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    for index, layer in enumerate(LAYERS):
        if top in layer:
            return index
    raise AssertionError(f"{module} is in no layer of tests/test_layout.py: add it to the map in clamp2/__init__.py and here")


@pytest.fixture(scope="module")
def graph():
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imported_modules(p, modules) for p in paths}


def test_every_module_is_in_a_layer(graph):
    for module in graph:
        if module != "clamp2":
            layer_of(module)


def test_imports_go_down_the_layers(graph):
    upward = [f"{module} → {target}" for module, targets in graph.items() if module != "clamp2"
              for target in targets if target != "clamp2" and layer_of(target) > layer_of(module)]
    assert upward == []


def test_no_import_cycle(graph):
    # A package imports its own sub-modules only through its __init__ docstring, never in code.
    state, cycles = {}, []

    def visit(module, stack):
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                cycles.append(" → ".join(stack[stack.index(target):] + [target]))
            elif target not in state:
                visit(target, stack + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_no_old_module_paths_left():
    # Issue 24 moved these; nothing may import them again (no shims either).
    removed = ["batch", "corpus", "demo_corpus", "extract", "feature_store", "fmd", "inputs", "quickstart_report",
               "raw_search", "retrieval", "summarize", "zero_shot"]
    for name in removed:
        assert not (PACKAGE / f"{name}.py").exists(), name
    assert not (PACKAGE / "models.py").exists()
    assert not (PACKAGE / "quickstart.py").exists()
