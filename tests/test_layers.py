"""The package's imports point one way, down the layer order of docs/design.md ("Layering").

Every import counts: module level and function level (a lazy import is still a dependency), and
``importlib.import_module("triton_attn...")`` with a literal name. A name imported from the top package
(``from .. import attention``) counts as the module ``triton_attn/__init__.py`` loads it from.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import triton_attn

PACKAGE = Path(triton_attn.__file__).resolve().parent

# Lowest first. A module may import modules of its own layer or of a lower one; within a layer, zero cycles.
LAYERS: List[tuple] = [
    ("triton_attn.settings", "triton_attn.versions", "triton_attn.dropout"),
    ("triton_attn.masks",),
    ("triton_attn.reference",),
    ("triton_attn.kernels",),
    ("triton_attn.dispatch",),
    ("triton_attn.backends",),
    ("triton_attn.mod_table",),
    ("triton_attn.ops",),
    ("triton_attn.api", "triton_attn.paged_cache"),
    ("triton_attn.registry", "triton_attn.distributed"),
    ("triton_attn.models",),
    ("triton_attn.demo", "triton_attn.commands", "triton_attn.cli"),
]


def _modules() -> Dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


MODULES = _modules()


def _layer(module: str) -> int:
    for index, prefixes in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{module} is in no layer of tests/test_layers.py (add it where docs/design.md puts it)")


def _target(name: str) -> str:
    """The module behind a dotted import name (the longest prefix that is a module)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def _imports(module: str, path: Path) -> Set[str]:
    is_package = path.name == "__init__.py"
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: List[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            for alias in node.names:
                full = f"{origin}.{alias.name}"
                if full in MODULES:
                    names.append(full)
                elif origin == "triton_attn" and alias.name in triton_attn._PUBLIC:
                    names.append("triton_attn" + triton_attn._PUBLIC[alias.name])
                else:
                    names.append(origin)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)
              and node.args[0].value.startswith("triton_attn")):
            names = [node.args[0].value]
        for name in names:
            if name.startswith("triton_attn"):
                target = _target(name)
                # Importing one's own parent package is how Python loads a submodule, not a dependency.
                if target and target != module and not module.startswith(target + "."):
                    found.add(target)
    return found


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def test_every_import_points_down_the_layer_order():
    upward = [f"{module} (layer {_layer(module)}) imports {target} (layer {_layer(target)})"
              for module, targets in sorted(GRAPH.items()) if module != "triton_attn"
              for target in sorted(targets) if _layer(target) > _layer(module)]
    assert not upward, "imports pointing up the layer order:\n" + "\n".join(upward)


def _cycles() -> List[List[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    found: List[List[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in GRAPH.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in sorted(GRAPH):
        if module not in index:
            visit(module)
    return found


def test_no_import_cycles_even_through_function_level_imports():
    assert not _cycles(), "import cycles: " + "; ".join(" <-> ".join(c) for c in _cycles())


def test_the_layer_order_is_the_documented_one():
    design = (PACKAGE.parent / "docs" / "design.md").read_text()
    documented = design.split("## Layering", 1)[1].split("\n## ", 1)[0]
    for prefixes in LAYERS:
        for prefix in prefixes:
            short = prefix.removeprefix("triton_attn.")
            assert f"`{short}" in documented, f"docs/design.md's Layering section does not place {short}"
