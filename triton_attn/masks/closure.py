"""Looking inside a mod callable: the tensors it captured (closures, defaults, partials)."""

from __future__ import annotations

import functools
import hashlib
from typing import Callable, Iterator, List, Tuple

import torch


def _children(value) -> Iterator:
    if isinstance(value, (list, tuple)):
        yield from value
    elif isinstance(value, dict):
        yield from value.values()
    elif isinstance(value, StructuredMod):  # its state in place of closure cells
        yield from value.structure()
        yield from value.tensors()
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


def mod_fingerprint(fn: Callable, include_tensor_values: bool = True) -> str:
    """A hash of ``fn``'s code and everything it captured (used to cache per-mod plans).

    With ``include_tensor_values=False`` captured tensors contribute only dtype and rank, so
    the same mod over different data (document ids of another batch) shares the key. With
    values included, a CUDA tensor is copied to the host: call it once per plan, not per launch.
    """
    digest = hashlib.sha256()
    for value in _walk(fn, set()):
        code = getattr(getattr(value, "__func__", value), "__code__", None)
        if code is not None:
            digest.update(code.co_code)
            digest.update(repr(code.co_consts).encode())
            digest.update(repr(code.co_names).encode())
        elif isinstance(value, torch.Tensor):
            digest.update(f"tensor:{value.dtype}:{value.dim()}".encode())
            if include_tensor_values:
                digest.update(f"{tuple(value.shape)}".encode())
                digest.update(value.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        elif isinstance(value, (int, float, bool, str, type(None))):
            digest.update(f"{type(value).__name__}:{value!r}".encode())
        elif isinstance(value, (list, tuple, dict, functools.partial)):
            digest.update(f"{type(value).__name__}:{len(value) if hasattr(value, '__len__') else ''}".encode())
        else:
            digest.update(f"{type(value).__qualname__}".encode())
    return digest.hexdigest()[:32]


def positions_by_identity(items, pool) -> Tuple[int, ...]:
    """For each of ``items``, the index of the same object in ``pool`` (e.g. which of a StructuredMod's
    ``tensors()`` is each captured input of its traced graph)."""
    return tuple(next(i for i, candidate in enumerate(pool) if candidate is item) for item in items)


class StructuredMod:
    """A mod whose traced structure is known from constants alone, with its tensors kept apart.

    Subclasses give ``structure()`` (a hashable tuple of Python constants: ints, bools, None),
    ``tensors()`` (the tensors it reads) and ``build(structure, tensors)`` (a mod of that structure over
    other tensors). Under ``torch.compile`` a mod built inside the graph has tensors with unknown
    values, but its table key depends only on the structure and each tensor's dtype and rank
    (``ops.compiled_mod``), so it never needs the values.
    """

    def structure(self) -> tuple:
        raise NotImplementedError

    def tensors(self) -> tuple:
        raise NotImplementedError

    @classmethod
    def build(cls, structure: tuple, tensors: tuple) -> "StructuredMod":
        raise NotImplementedError

    @classmethod
    def stand_in(cls, structure: tuple, tensor_specs: tuple) -> "StructuredMod":
        """A mod of ``structure`` over placeholder tensors of the given ``(dtype, rank)`` specs, whose trace
        gives the table key. The default placeholders have size 1 on every dimension, which is right for
        tensors that are only indexed with the mod's arguments; a subclass whose tensors include a
        captured mod's overrides it (that mod's graph may depend on its tensors' sizes)."""
        return cls.build(structure, tuple(torch.zeros((1,) * rank, dtype=dtype) for dtype, rank in tensor_specs))
