"""The package's shape: every module imports, the import graph has no circle, the core never imports the demo."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ccclip_widgets"
#: Doors onto the core (and the demo itself): they may import the demo; nothing else may.
MAY_IMPORT_DEMO = ("ccclip_widgets.demo", "ccclip_widgets.cli", "ccclip_widgets.widgets")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = sorted(_module_name(p) for p in PACKAGE.rglob("*.py") if p.stem != "__main__")


def _imports(path: Path, *, top_level_only: bool) -> set[str]:
    """ccclip_widgets modules that ``path`` imports (resolved relative imports; ``from x import y`` adds x.y too)."""
    name = _module_name(path)
    package = name if path.stem == "__init__" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text("utf-8"))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # also imports under module-level if/try (but not inside functions or TYPE_CHECKING)
        stack, nodes = list(tree.body), []
        while stack:
            node = stack.pop()
            nodes.append(node)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, (ast.If, ast.Try)):
                stack.extend(
                    node.body + node.orelse + getattr(node, "handlers", []) + getattr(node, "finalbody", [])
                )
            if isinstance(node, ast.ExceptHandler):
                stack.extend(node.body)
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)
    known = set(MODULES)
    return {m for m in found if m in known and m != name}


def test_every_module_imports() -> None:
    for name in MODULES:
        importlib.import_module(name)


def test_module_level_import_graph_has_no_circle() -> None:
    graph = {_module_name(p): _imports(p, top_level_only=True) for p in PACKAGE.rglob("*.py")}
    # a package's __init__ importing its own submodules is how packages work, not a circle
    for name, deps in graph.items():
        graph[name] = {d for d in deps if not name.startswith(d + ".")}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                circle = " -> ".join([*path[path.index(dep) :], dep])
                pytest.fail(f"import circle: {circle}")
            if dep not in state:
                visit(dep)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_core_never_imports_the_demo() -> None:
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        name = _module_name(path)
        if name.startswith(MAY_IMPORT_DEMO):
            continue
        demo = {m for m in _imports(path, top_level_only=False) if m.startswith("ccclip_widgets.demo")}
        if demo:
            offenders.append(f"{name} imports {sorted(demo)}")
    assert not offenders, offenders
    code = (
        "import sys, ccclip_widgets.models, ccclip_widgets.embed, ccclip_widgets.train\n"
        "loaded = sorted(m for m in sys.modules if m.startswith('ccclip_widgets.demo'))\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_demo_is_a_registered_named_spec() -> None:
    from ccclip_widgets.model_registry import model_spec_loader, named_model_specs, register_model_spec

    assert "demo" in named_model_specs()
    with pytest.raises(ValueError, match="already registered"):
        register_model_spec("demo", lambda device, precision: None)
    with pytest.raises(ValueError, match="plain word"):
        register_model_spec("a:b", lambda device, precision: None)
    calls = []
    register_model_spec("ccclip-test-named", lambda device, precision: calls.append((device, precision)))
    from ccclip_widgets.models import load_model

    load_model("ccclip-test-named", "cpu", precision="fp32")
    assert calls and calls[0][1] == "fp32"
    assert model_spec_loader("no-such-name") is None


def test_every_package_is_listed_for_the_wheel() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text("utf-8"))["tool"]["setuptools"]
    on_disk = {_module_name(p) for p in PACKAGE.rglob("__init__.py")}
    assert on_disk <= set(config["packages"]), sorted(on_disk - set(config["packages"]))
    assert config["package-dir"]["ccclip_widgets.data"] == "data"
