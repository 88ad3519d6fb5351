"""The package layout holds (docs/architecture.md): no import circles, every import goes down the layers, and no
module outside families/ names a model family in a string literal.

Imports are read from the source (every `import` statement, those inside functions too), so a lazy import that
climbs a layer is caught as well as a module-level one.
"""

from __future__ import annotations

import ast
from pathlib import Path

from sdcli.families import FAMILIES

PACKAGE = Path(__file__).resolve().parents[1] / "sdcli"

# Lowest first: a module may import its own group and the groups before it, never one after it.
LAYERS = [
    {"runtime"}, {"quant"}, {"formats"}, {"models"}, {"families"}, {"text"}, {"sampling"}, {"loading", "upscale"}, {"control"},
    {"config"}, {"jobs"}, {"output"}, {"pipeline", "text_conditioning", "seamless"}, {"app"},
    {"cli_guard", "cli_options", "cli_help", "cli_params"},
    {"cli", "__main__", "__init__"},
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The sdcli modules `path` imports (absolute or relative), resolved to module names."""
    own = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = own.rsplit(".", 1)[0] if not own.endswith("__init__") else own.removesuffix(".__init__")
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "sdcli"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "sdcli":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
    return {m for m in found if m in modules and m != own.removesuffix(".__init__")}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) for name, path in modules.items()}


def _group(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _rank(module: str) -> int:
    group = _group(module)
    for i, layer in enumerate(LAYERS):
        if group in layer:
            return i
    raise AssertionError(f"{module}: in no layer of tests/test_architecture.py (add its package to LAYERS)")


def test_every_import_goes_down_the_layers():
    climbs = [f"{src} -> {dst}" for src, dsts in _graph().items() for dst in dsts
              if dst != "sdcli" and _rank(dst) > _rank(src)]
    assert not climbs, "imports into a higher layer:\n" + "\n".join(sorted(climbs))


def test_no_import_circles():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    circles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                circles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_the_checker_sees_a_climb_and_a_circle(tmp_path):
    """The rules above are not vacuous: a lazy import of app/ from runtime/ is a climb, and two modules importing
    each other are a circle."""
    graph = _graph()
    assert "sdcli.runtime.errors" in graph["sdcli.app.render"] | graph["sdcli.pipeline"]
    assert _rank("sdcli.app.render") > _rank("sdcli.runtime.device")
    fake = tmp_path / "m.py"
    fake.write_text("def f():\n    from sdcli.app import render\n")
    assert "sdcli.app.render" in _imports_of_file(fake, "sdcli.runtime.m")


def _imports_of_file(path: Path, as_module: str) -> set[str]:
    modules = _modules()
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sdcli"):
            found |= {f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in modules}
    return found


def test_no_family_name_outside_families():
    """Family knowledge is declared once (families/): a module elsewhere that compares with "sdxl" is a branch
    on the family that a new family would have to find and extend."""
    names = {f.name for f in FAMILIES}
    hits = []
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "families":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in names:
                hits.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {node.value!r}")
    assert not hits, "family names outside families/:\n" + "\n".join(hits)
