"""Looking inside a mod callable: the tensors it captured (closures, defaults, partials)."""

from __future__ import annotations

import functools
from typing import Callable, Iterator, List

import torch


def _children(value) -> Iterator:
    if isinstance(value, (list, tuple)):
        yield from value
    elif isinstance(value, dict):
        yield from value.values()
    elif isinstance(value, functools.partial):
        yield value.func
        yield from value.args
        yield from value.keywords.values()


def _walk(fn, seen: set) -> Iterator:
    """Every value reachable from ``fn``'s closure cells and defaults, depth first, once each."""
    stack = [fn]
    while stack:
        value = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        yield value
        if isinstance(value, torch.Tensor):
            continue
        code_owner = getattr(value, "__func__", value)  # bound methods
        closure = getattr(code_owner, "__closure__", None) or ()
        defaults = getattr(code_owner, "__defaults__", None) or ()
        cells = []
        for cell in closure:
            try:
                cells.append(cell.cell_contents)
            except ValueError:  # an empty cell (a name not yet bound)
                continue
        stack.extend(reversed(list(cells) + list(defaults) + list(_children(value))))


def captured_tensors(fn: Callable) -> List[torch.Tensor]:
    """Tensors captured by ``fn`` (closure cells, defaults, nested mods), in a stable order."""
    return [value for value in _walk(fn, set()) if isinstance(value, torch.Tensor)]
