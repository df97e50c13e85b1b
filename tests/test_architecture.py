"""The package layout is part of the design: every import inside mote_local points to a lower layer (or
within its own subpackage), and no module imports another that imports it back."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import mote_local

PACKAGE = Path(mote_local.__file__).parent

# lowest first; a module may import its own layer's package and anything below
LAYERS = [
    {"errors"},
    {"atomic", "cache", "progress", "prompts"},
    {"binding"},
    {"modelfile"},
    {"steering"},
    {"engine", "synthetic"},
    {"ftri"},
    {"evaluation"},  # a sweep reads fTRI's ranking
    {"serve"},
    {"cli"},  # the mote command registers every command, the server's too
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import; write the absolute mote_local.… path")
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mote_local."):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module == "mote_local":
            found.update(f"mote_local.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("mote_local."))
    return found


def _top(module: str) -> str:
    return module.split(".")[1]


def test_every_top_level_name_has_a_layer():
    tops = {_top(m) for m in _modules() if m != "mote_local"} - {"data"}
    assert tops <= set(RANK), f"give {sorted(tops - set(RANK))} a layer in LAYERS"


def test_imports_point_down():
    modules = _modules()
    upward = []
    for name, path in modules.items():
        if name == "mote_local":
            continue
        for target in _imports(path):
            if target not in modules:
                continue  # a name imported from a module, not a module
            if _top(target) != _top(name) and RANK[_top(target)] >= RANK[_top(name)]:
                upward.append(f"{name} -> {target}")
    assert not upward, "imports that do not point to a lower layer: " + ", ".join(sorted(upward))


def test_no_import_cycles():
    modules = _modules()
    graph = {name: {t for t in _imports(path) if t in modules and t != name} for name, path in modules.items()}
    # a package's __init__ importing its own submodules is how re-exports work, not a cycle
    for name in graph:
        graph[name] = {t for t in graph[name] if not t.startswith(name + ".")}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(nxt) :] + [node, nxt]))
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    bad = tmp_path / "mote_local"
    (bad / "engine").mkdir(parents=True)
    (bad / "__init__.py").write_text("")
    (bad / "engine" / "__init__.py").write_text("")
    (bad / "engine" / "model.py").write_text("from mote_local.cli.commands import main\n")
    (bad / "cli").mkdir()
    (bad / "cli" / "__init__.py").write_text("")
    (bad / "cli" / "commands.py").write_text("from mote_local.engine.model import x\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", bad)
    try:
        test_imports_point_down()
    except AssertionError as err:
        assert "mote_local.engine.model -> mote_local.cli.commands" in str(err)
    else:
        raise AssertionError("an upward import went unnoticed")
    try:
        test_no_import_cycles()
    except AssertionError as err:
        assert "import cycle" in str(err)
    else:
        raise AssertionError("a cycle went unnoticed")
