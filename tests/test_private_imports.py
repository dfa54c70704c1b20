"""No module of the package imports a private (``_name``) name from another module."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "triton_attn"


def _private_imports(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            module_parts = (node.module or "").split(".")
            for alias in node.names:
                private_name = alias.name.startswith("_") and not alias.name.startswith("__")
                private_module = any(part.startswith("_") and not part.startswith("__") for part in module_parts)
                if private_name or private_module:
                    yield (f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: "
                           f"from {'.' * node.level}{node.module or ''} import {alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("triton_attn") and any(p.startswith("_") and not p.startswith("__")
                                                                 for p in alias.name.split(".")):
                    yield f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: import {alias.name}"


def test_no_module_imports_a_private_name_from_another():
    found = [hit for path in sorted(PACKAGE.rglob("*.py")) for hit in _private_imports(path)]
    assert not found, "private names imported across modules:\n" + "\n".join(found)


def test_the_check_sees_a_private_import(tmp_path):
    sample = PACKAGE / "masks" / "__init__.py"  # any real file parses; a synthetic one must be caught
    assert list(_private_imports(sample)) == []
    bad = tmp_path / "bad.py"
    bad.write_text("from .launch import _captured_args\nfrom triton_attn.kernels import _private\n")
    hits = [line.split(": ", 1)[1] for line in _private_imports_in(bad)]
    assert hits == ["from .launch import _captured_args", "from triton_attn.kernels import _private"]


def _private_imports_in(path: Path):
    global PACKAGE
    saved, PACKAGE = PACKAGE, path.parent
    try:
        return list(_private_imports(path))
    finally:
        PACKAGE = saved
