"""The shape of the code: small files with one job, short functions, no import cycles, one namespace.

Limits from the design (issue 13): no file over ~500 lines, no function over ~80 lines, no cycles among
the library's modules. A limit that a change must break on purpose is raised here, in review, not
silently.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"exporter": "llmtrt.exporter", "plugins": "llmtrt.plugins", "pipelines": "llmtrt.pipelines",
            "configs": "llmtrt.configs", "llmtrt": "llmtrt"}
MAX_FILE_LINES = 500
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            if folder == "llmtrt" and path.parent != ROOT / "llmtrt":
                continue
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            name = ".".join((package, *parts)).removesuffix(".__init__")
            found[name] = path
    return found


MODULES = _modules()


def test_every_library_module_is_under_llmtrt():
    assert MODULES and all(name.startswith("llmtrt") for name in MODULES)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_file_and_function_sizes(name):
    path = MODULES[name]
    text = path.read_text(encoding="utf-8")
    lines = text.count("\n")
    assert lines <= MAX_FILE_LINES, f"{path.relative_to(ROOT)} has {lines} lines (> {MAX_FILE_LINES}): split it"
    long = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                long.append(f"{node.name} ({length} lines)")
    assert not long, f"{path.relative_to(ROOT)}: functions over {MAX_FUNCTION_LINES} lines: {', '.join(long)}"


def _imports(name: str, path: Path) -> set[str]:
    """llmtrt modules ``name`` imports (at module level or inside functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in out if m in MODULES and m != name}


def test_no_import_cycles():
    graph = {name: _imports(name, path) for name, path in MODULES.items()}
    # package __init__ modules are namespaces: an edge to a package is an edge to nothing
    graph = {n: {m for m in deps if not MODULES[m].name == "__init__.py" or MODULES[m].stat().st_size > 400}
             for n, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles[:5])


def test_the_library_never_imports_the_cli_or_tools():
    for name, path in MODULES.items():
        if ".cli" in name or name == "llmtrt.__main__":
            continue
        text = path.read_text(encoding="utf-8")
        assert "llmtrt.pipelines.cli" not in text, f"{name} imports the CLI"
        assert "from tools" not in text and "import tools" not in text, f"{name} imports a developer tool"
