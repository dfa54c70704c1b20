"""The table of traced mods: how a mask_mod or score_mod travels through the custom ops as a string.

Custom ops take only tensors, numbers and strings, so a mod becomes a string key into ``MOD_TABLE``
plus the list of tensors it captured (``register_mod``); the op's implementation gets the callable back
with ``resolve_mod``. A traceable mod's key is its structure hash (``TracedMod.key``: the graph and the
dtype/rank of each captured tensor), so every mod of one structure shares one entry and one kernel,
and new captured data (another batch's document ids) is just another tensor list. A mod that cannot
be traced (the torch backend evaluates it eagerly) is keyed by identity and keeps its tensors in its
closure.

Inside ``torch.compile`` the key is a constant of the graph and the captured tensors are fetched
along closure paths (``compiled_mod``): dynamo can read a closure cell, not trace the tracer.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from .masks.closure import StructuredMod, positions_by_identity
from .masks.evaluate import mod_name
from .masks.tracing import TracedMod, UntraceableModError, evaluate, trace_mask_mod, trace_score_mod

__all__ = ["MOD_TABLE", "BoundMod", "register_mod", "resolve_mod", "rebind_mod", "compiled_mod", "mod_key",
           "fetch_captured", "structured_mod_key"]

KINDS = ("mask", "score")
# Mods that cannot be traced are kept by identity; at most this many (the oldest are dropped).
EAGER_MOD_LIMIT = 1024


@dataclass
class ModEntry:
    """A mod in the table: its trace (None for an eagerly evaluated mod) and the last callable seen."""

    traced: Optional[TracedMod]
    function: Callable


MOD_TABLE: "collections.OrderedDict[str, ModEntry]" = collections.OrderedDict()


class BoundMod:
    """A traced mod's graph bound to new captured tensors: callable like the mod it was traced from.

    The torch backend calls it on index tensors (the graph is evaluated by ``tracing.evaluate``);
    the kernels read ``traced_mod`` instead of tracing it again.
    """

    def __init__(self, traced: TracedMod, captured: Sequence[torch.Tensor]):
        self.traced_mod = TracedMod(traced.kind, traced.graph, list(captured), traced.name)
        self.__name__ = traced.name

    def __call__(self, *args):
        names = ("score",) + tuple(("b", "h", "q_idx", "kv_idx")) if self.traced_mod.kind == "score" \
            else ("b", "h", "q_idx", "kv_idx")
        return evaluate(self.traced_mod, dict(zip(names, args)), self.traced_mod.captured)


def _trace(mod: Callable, kind: str) -> TracedMod:
    return trace_mask_mod(mod) if kind == "mask" else trace_score_mod(mod)


def register_mod(mod: Optional[Callable], kind: str) -> Tuple[str, List[torch.Tensor]]:
    """``(key, captured tensors)`` of ``mod`` in ``MOD_TABLE`` (``("", [])`` for None)."""
    if mod is None:
        return "", []
    try:
        traced = _trace(mod, kind)
    except (UntraceableModError, TypeError):
        key = f"{kind}/eager/{id(mod)}"
        MOD_TABLE[key] = ModEntry(None, mod)
        MOD_TABLE.move_to_end(key)
        eager = [k for k, entry in MOD_TABLE.items() if entry.traced is None]
        for stale in eager[:max(0, len(eager) - EAGER_MOD_LIMIT)]:
            del MOD_TABLE[stale]
        # A StructuredMod's tensors travel even when it is evaluated eagerly: resolve_mod rebuilds it over them.
        return key, list(mod.tensors()) if isinstance(mod, StructuredMod) else []
    key = f"{kind}/{traced.key}"
    MOD_TABLE[key] = ModEntry(traced, mod)
    return key, list(traced.captured)


def resolve_mod(key: str, captured: Sequence[torch.Tensor]) -> Optional[Callable]:
    """The callable behind ``key`` with ``captured`` as its tensors: the registered mod itself when they
    are the tensors it captured, else its graph bound to them (``BoundMod``)."""
    if not key:
        return None
    entry = MOD_TABLE.get(key)
    if entry is None:
        raise KeyError(f"triton_attn: mod key {key!r} is not in the mod table (an untraceable mod was dropped "
                       f"after {EAGER_MOD_LIMIT} newer ones, or the key comes from another process)")
    own = entry.function.tensors() if entry.traced is None and isinstance(entry.function, StructuredMod) \
        else () if entry.traced is None else entry.traced.captured
    if len(own) == len(captured) and all(a is b for a, b in zip(own, captured)):
        return entry.function
    if entry.traced is None:  # an untraceable StructuredMod over other tensors
        return type(entry.function).build(entry.function.structure(), tuple(captured))
    return BoundMod(entry.traced, captured)


def rebind_mod(mod: Callable, kind: str, captured: Sequence[torch.Tensor]) -> Callable:
    """``mod`` reading ``captured`` in place of the tensors it captured (``register_mod``'s order): ``mod``
    itself when they are its own tensors, else its traced graph bound to them. For a ``StructuredMod``
    that holds a user mod in its structure and that mod's tensors apart (``build``)."""
    key, _ = register_mod(mod, kind)
    return resolve_mod(key, captured)


# -- mods inside torch.compile: the key is a constant, the tensors are fetched along closure paths ---------

def _closure_children(value):
    """(step, child) pairs one level below ``value``: closure cells, defaults and container items."""
    code_owner = getattr(value, "__func__", value)
    for index, cell in enumerate(getattr(code_owner, "__closure__", None) or ()):
        try:
            yield ("cell", index), cell.cell_contents
        except ValueError:
            continue
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield ("item", index), item


def _closure_path(mod: Callable, tensor: torch.Tensor, depth: int = 6):
    """Steps from ``mod`` to ``tensor`` through closure cells and tuple/list items, or None."""
    frontier, seen = [(mod, ())], {id(mod)}
    for _ in range(depth):
        following = []
        for value, path in frontier:
            for step, child in _closure_children(value):
                if child is tensor:
                    return path + (step,)
                if id(child) not in seen and not isinstance(child, torch.Tensor):
                    seen.add(id(child))
                    following.append((child, path + (step,)))
        frontier = following
    return None


def mod_key(mod: Callable, kind: str) -> Tuple[str, Tuple]:
    """``(key, paths)`` for ``torch.compile``: the table key (computed once, when the graph is traced) and
    the closure path of each captured tensor, along which ``fetch_captured`` reads them on every call."""
    key, captured = register_mod(mod, kind)
    learnable = [t for t in captured if t.requires_grad] if kind == "score" and torch.is_grad_enabled() else []
    if learnable:  # the ops differentiate q, k and v only: never drop these gradients silently
        shapes = ", ".join(f"{tuple(t.shape)} {t.dtype}" for t in learnable)
        raise ValueError(f"score_mod {mod_name(mod)!r} captures tensor(s) that require grad ({shapes}); under "
                         "torch.compile triton_attn does not compute their gradients. Train them outside "
                         "torch.compile, or detach them (or use torch.no_grad()) if they need no gradient.")
    paths = tuple(_closure_path(mod, tensor) for tensor in captured)
    if any(path is None for path in paths):
        raise ValueError(f"{kind}_mod {mod_name(mod)!r} reads a tensor that is not in its closure (a global?); "
                         "under torch.compile captured tensors must be closure variables of the mod")
    return key, paths


# torch.compiler.assume_constant_result(mod_key): dynamo runs it once while tracing and keeps the result as a
# constant. The decorator only sets this attribute, but importing it imports torch._dynamo (over a second),
# which `import triton_attn` must not pay; tests/test_compile.py checks that the mark is honoured.
mod_key._dynamo_marked_constant = True


def fetch_captured(mod: Callable, paths: Tuple) -> List[torch.Tensor]:
    """The tensors at ``paths`` (from ``mod_key``) in ``mod``'s closure; traceable by dynamo."""
    tensors = []
    for path in paths:
        value = mod
        for kind, index in path:
            value = value.__closure__[index].cell_contents if kind == "cell" else value[index]
        tensors.append(value)
    return tensors


def structured_mod_key(mod_type: type, structure: tuple, tensor_specs: Tuple, kind: str) -> Tuple[str, Tuple[int, ...]]:
    """``(key, order)`` of a ``StructuredMod`` from constants only: a mod of ``structure`` over stand-in
    tensors of the given ``(dtype, rank)`` (``StructuredMod.stand_in``) is registered (the key ignores
    tensor values), and ``order`` says which of the mod's ``tensors()`` is each captured input of the
    traced graph."""
    stand_in = mod_type.stand_in(structure, tensor_specs)
    key, captured = register_mod(stand_in, kind)
    return key, positions_by_identity(captured, stand_in.tensors())


structured_mod_key._dynamo_marked_constant = True  # see mod_key


def compiled_mod(mod: Optional[Callable], kind: str) -> Tuple[str, List[torch.Tensor]]:
    """``(key, captured tensors)`` of ``mod`` inside ``torch.compile``. A ``StructuredMod`` (the model mask
    of ``registry.masking``, often built inside the compiled graph) is keyed by its structure; any other
    mod must exist before the graph (its closure is read along constant paths, see ``mod_key``)."""
    if mod is None:
        return "", []
    if isinstance(mod, StructuredMod):
        tensors = mod.tensors()
        key, order = structured_mod_key(type(mod), mod.structure(), tuple((t.dtype, t.dim()) for t in tensors), kind)
        return key, [tensors[i] for i in order]
    key, paths = mod_key(mod, kind)
    return key, fetch_captured(mod, paths)
