"""Imports inside ``kernels/`` point one way (function-level imports included):

host helpers, configs and targets <- launchers <- AOT builds <- ``tuned`` <- ``entry`` (and the AOT
matrix, ``matrix``, which only commands and tests import).

A launcher neither tunes nor decides a route, so it imports no AOT build, no tuning module, nothing
above it; the host helpers import no launcher; nothing in ``kernels/`` imports ``entry``.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Set

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "triton_attn"
KERNELS = "triton_attn.kernels"

HOST = {f"{KERNELS}.host", f"{KERNELS}.attention.tiling", f"{KERNELS}.attention.configs",
        f"{KERNELS}.decode.configs", f"{KERNELS}.targets", f"{KERNELS}.targets.target", f"{KERNELS}.targets.nvidia",
        f"{KERNELS}.targets.amd"}
LAUNCHERS = {f"{KERNELS}.attention.forward_launch", f"{KERNELS}.attention.backward_launch",
             f"{KERNELS}.attention.dropout_mask",
             f"{KERNELS}.decode.launch"}
AOT = {f"{KERNELS}.attention.aot", f"{KERNELS}.decode.aot", f"{KERNELS}.tuning.aot"}
ABOVE_AOT = {f"{KERNELS}.tuned", f"{KERNELS}.entry", f"{KERNELS}.matrix"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted((PACKAGE / "kernels").rglob("*.py"))}


def imported_modules(name: str) -> Set[str]:
    """The package modules ``name`` imports anywhere in its file (module or function level); ``from m
    import x`` counts as ``m.x`` where that is a module, else as ``m``."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("triton_attn"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.startswith("triton_attn"):
                found.update(f"{source}.{alias.name}" if f"{source}.{alias.name}" in MODULES else source
                             for alias in node.names)
    return found - {name}


GRAPH: Dict[str, Set[str]] = {name: {m for m in imported_modules(name) if m in MODULES} for name in MODULES}


def test_the_groups_name_real_modules():
    for name in HOST | LAUNCHERS | AOT | ABOVE_AOT:
        assert name in MODULES, name


@pytest.mark.parametrize("name", sorted(HOST))
def test_host_helpers_import_no_launcher_and_nothing_above(name):
    assert not GRAPH[name] & (LAUNCHERS | AOT | ABOVE_AOT), GRAPH[name]


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_launchers_import_no_aot_build_no_tuning_and_nothing_above(name):
    tuning = {m for m in MODULES if m.startswith(f"{KERNELS}.tuning")}
    assert not GRAPH[name] & (AOT | tuning | ABOVE_AOT), GRAPH[name]


@pytest.mark.parametrize("name", sorted(AOT))
def test_aot_builds_import_nothing_above_them(name):
    assert not GRAPH[name] & ABOVE_AOT, GRAPH[name]


def test_nothing_in_kernels_imports_entry_or_the_matrix():
    for top in (f"{KERNELS}.entry", f"{KERNELS}.matrix"):
        importers = {name for name, imports in GRAPH.items() if top in imports}
        assert not importers, importers


def test_no_import_cycle_among_kernels_modules():
    """Depth-first search for a back edge over every import, function-level ones included."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list) -> None:
        state[name] = 1
        for target in sorted(GRAPH[name]):
            if target.startswith(name + "."):  # a package importing its own submodule is not a cycle
                continue
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target] if target in path else [name, target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, path + [target])
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])


def test_the_check_sees_a_function_level_import(tmp_path, monkeypatch):
    """A launcher that imports an AOT build inside a function is caught (the regression this guards)."""
    fake = tmp_path / "forward_launch.py"
    fake.write_text("def tuned():\n    from .aot import aot_compile_fn\n")
    monkeypatch.setitem(MODULES, f"{KERNELS}.attention.forward_launch", fake)
    assert f"{KERNELS}.attention.aot" in imported_modules(f"{KERNELS}.attention.forward_launch")
