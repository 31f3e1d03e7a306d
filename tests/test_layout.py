"""The layout of shared/DESIGN.md, checked on the source: the library's import graph has no cycle and
never reaches the pipelines, kernels import neither diffusers nor the rest of vidaccel, scripts
import the library like any user (no ``sys.path`` edits, no other script, no private name), and files
stay short enough to read.

The graph counts every import statement wherever it stands (module level, inside a function, under
``TYPE_CHECKING``): a lazy import hides a cycle from the interpreter, not from a reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> the package it is installed as (pyproject.toml's package-dir).
LIBRARY = {"vidaccel": "vidaccel", "kernels": "vidaccel.kernels"}
PIPELINES = {"pipelines": "vidaccel.pipelines"}
SCRIPT_FOLDERS = ("demos", "benchmarks")
MAX_LIBRARY_LINES = 550  # DESIGN.md: no library file over ~500 lines
MAX_SCRIPT_LINES = 650  # ... and no script over ~600


def _modules(folder: str, package: str) -> dict[str, Path]:
    """Module name -> file for every ``.py`` under ``folder`` (``__init__`` names its package)."""
    found = {}
    for path in sorted((ROOT / folder).rglob("*.py")):
        parts = path.relative_to(ROOT / folder).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join((package, *parts))] = path
    return found


def _imported(path: Path, module: str, is_package: bool) -> list[tuple[str, list[str]]]:
    """What ``path`` (module ``module``) imports: ``(base, names)`` per statement, relative imports
    resolved (``import a.b`` is ``("a.b", [])``, ``from a import b, c`` is ``("a", ["b", "c"])``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".") if is_package else module.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((base, [alias.name for alias in node.names]))
    return found


def _graph(folders: dict[str, str] = LIBRARY) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """``(edges between library modules, every absolute name each library module imports)``. An edge
    goes to the module an import loads: ``from vidaccel import ops`` to ``vidaccel.ops``, ``from
    vidaccel import apply`` (a name, not a module) and ``import vidaccel`` to the package itself."""
    modules = {}
    for folder, package in folders.items():
        modules.update(_modules(folder, package))
    edges, names = {}, {}
    for name, path in modules.items():
        statements = _imported(path, name, path.name == "__init__.py")
        targets = set()
        for base, imported in statements:
            submodules = [f"{base}.{n}" for n in imported if f"{base}.{n}" in modules]
            targets.update(submodules)
            if base in modules and (not imported or len(submodules) < len(imported)):
                targets.add(base)
        edges[name] = targets - {name}
        names[name] = {base for base, _ in statements} | {f"{b}.{n}" for b, ns in statements for n in ns}
    return edges, names


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or ``None``."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_library_import_graph_has_no_cycle():
    edges, _ = _graph()
    assert len(edges) > 20  # the walk found the library
    assert _cycle(edges) is None, " -> ".join(_cycle(edges))
    edges, _ = _graph({**LIBRARY, **PIPELINES})  # the pipelines above it have none either
    assert len(edges) > 40
    assert _cycle(edges) is None, " -> ".join(_cycle(edges))


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_library_never_imports_the_pipelines_and_kernels_stay_below():
    _, imports = _graph()
    for module, imported in imports.items():
        upward = sorted(
            n for n in imported if n.split(".")[:2] == ["vidaccel", "pipelines"] or n == "pipelines"
        )
        assert not upward, f"{module} imports {upward}"
        if module.startswith("vidaccel.kernels"):
            outside = sorted(
                n
                for n in imported
                if n.split(".")[0] in ("vidaccel", "diffusers") and not n.startswith("vidaccel.kernels")
            )
            assert not outside, f"{module} (a kernel module) imports {outside}"


def _scripts() -> list[Path]:
    return sorted(p for folder in SCRIPT_FOLDERS for p in (ROOT / folder).rglob("*.py"))


def test_scripts_import_the_library_like_a_user():
    scripts = _scripts()
    names = {p.stem for p in scripts}
    assert len(scripts) > 10
    for path in scripts:
        text = path.read_text()
        assert "sys.path" not in text, f"{path.relative_to(ROOT)} edits sys.path"
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.module:
                top = node.module.split(".")[0]
                assert top not in names, f"{path.relative_to(ROOT)} imports the script {node.module}"
                private = [
                    a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")
                ]
                assert not private, (
                    f"{path.relative_to(ROOT)} imports private names {private} from {node.module}"
                )
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert alias.name.split(".")[0] not in names, (
                        f"{path.relative_to(ROOT)} imports the script {alias.name}"
                    )


@pytest.mark.parametrize(
    "folders, limit",
    [((*LIBRARY, "pipelines"), MAX_LIBRARY_LINES), (SCRIPT_FOLDERS, MAX_SCRIPT_LINES)],
    ids=["library", "scripts"],
)
def test_files_stay_short(folders, limit):
    long = {
        str(p.relative_to(ROOT)): n
        for folder in folders
        for p in (ROOT / folder).rglob("*.py")
        if (n := len(p.read_text().splitlines())) > limit
    }
    assert not long, f"files over {limit} lines: {long}"
