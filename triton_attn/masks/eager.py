"""Real tensors a mod computes while it is traced, and where they came from.

While ``tracing.py`` calls a mod with symbolic arguments, torch calls with no traced value among their
arguments (``table[0]``, ``bias * 2``, ``scale.item()``) run eagerly under ``EagerTorch``, a
``TorchFunctionMode``, and ``EagerResults`` remembers each result's origin:

- *recipes*: basic indexing (ints, constant slices, ``...``, 0-d integer tensors) of a tensor: the tracer
  replays the index on a lazy view of the indexed tensor, so the kernel reads the original tensor;
- *derived* results of any other call, with the tensors from outside the trace they were computed from
  (none for ``detach`` / ``.data``, cut from autograd on purpose);
- *watched* tensors: sources whose values the trace baked in (a derived tensor that became a kernel
  argument, a value read as a Python number): the trace is valid while their versions are unchanged.

Metadata reads (``.shape``, ``.dtype``, ``.size()``, ...) are not values and are not recorded.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
from torch.overrides import TorchFunctionMode

from .graph import UntraceableModError

# Torch calls that read a tensor's metadata, not its values (properties are seen as their ``__get__``).
_METADATA = {"shape", "dtype", "device", "ndim", "requires_grad", "is_cuda", "is_cpu", "is_meta", "layout", "names",
             "is_leaf", "grad_fn", "is_sparse", "is_quantized", "size", "dim", "numel", "nelement", "ndimension",
             "__len__", "stride", "is_floating_point", "is_complex", "is_contiguous", "element_size", "data_ptr",
             "storage_offset", "get_device", "__repr__", "__format__"}
_DETACHING = {"detach", "data"}  # results the user has cut from autograd on purpose


class HiddenTensorError(ValueError):
    """A score_mod reads a tensor that requires grad where ``closure.captured_tensors`` cannot find it."""


def flatten_args(values):
    """The leaves of nested tuples / lists of call arguments, in order."""
    for value in values:
        if isinstance(value, (tuple, list)):
            yield from flatten_args(value)
        else:
            yield value


def _torch_name(func) -> str:
    name = getattr(func, "__name__", "")
    if name == "__get__":  # a property: the descriptor names it
        return getattr(getattr(func, "__self__", None), "__name__", "")
    return name


def basic_index(index) -> bool:
    """Ints, constant slices, Ellipsis and 0-d integer tensors only (a view of the indexed tensor)."""
    entries = index if isinstance(index, tuple) else (index,)
    for entry in entries:
        if entry is Ellipsis or (isinstance(entry, int) and not isinstance(entry, bool)):
            continue
        if isinstance(entry, slice) and all(b is None or (isinstance(b, int) and not isinstance(b, bool))
                                            for b in (entry.start, entry.stop, entry.step)):
            continue
        if isinstance(entry, torch.Tensor) and entry.dim() == 0 and not entry.dtype.is_floating_point \
                and entry.dtype != torch.bool:
            continue
        return False
    return True


class EagerResults:
    """Origins of the real tensors made during one trace (see the module docstring)."""

    def __init__(self):
        self._recipes: Dict[int, tuple] = {}   # id(result) -> (result, indexed tensor, index)
        self._derived: Dict[int, tuple] = {}   # id(result) -> (result, source tensors)
        self.watched: Dict[int, torch.Tensor] = {}

    def recipe(self, tensor: torch.Tensor) -> Optional[Tuple[torch.Tensor, object]]:
        """``(indexed tensor, index)`` when ``tensor`` is plain indexing of another tensor, else None."""
        entry = self._recipes.get(id(tensor))
        return (entry[1], entry[2]) if entry is not None and entry[0] is tensor else None

    def is_derived(self, tensor: torch.Tensor) -> bool:
        entry = self._derived.get(id(tensor))
        return entry is not None and entry[0] is tensor

    def watch(self, tensors) -> None:
        for tensor in tensors:
            self.watched.setdefault(id(tensor), tensor)

    def sources_of(self, tensor: torch.Tensor) -> tuple:
        """The tensors from outside the trace that ``tensor`` was computed from (itself if none)."""
        recipe = self.recipe(tensor)
        if recipe is not None:
            entries = recipe[1] if isinstance(recipe[1], tuple) else (recipe[1],)
            indices = [e for e in entries if isinstance(e, torch.Tensor)]
            return self.sources_of(recipe[0]) + tuple(s for e in indices for s in self.sources_of(e))
        entry = self._derived.get(id(tensor))
        if entry is not None and entry[0] is tensor:
            return entry[1]
        return (tensor,)

    def check_captured(self, tensor: torch.Tensor) -> None:
        """``tensor`` becomes a kernel argument: refuse a derived one whose sources require grad (the kernels
        read it as given, and the mod makes a new one on every call, so no gradient would reach the source);
        watch the sources of any other derived one."""
        entry = self._derived.get(id(tensor))
        if entry is None or entry[0] is not tensor:
            return
        learnable = [t for t in entry[1] if t.requires_grad]
        if learnable:
            source = learnable[0]
            raise UntraceableModError(
                f"a tensor computed inside the mod from a captured tensor that requires grad (shape "
                f"{tuple(source.shape)}, {source.dtype})",
                "the kernels read their tensor arguments as given, so the gradient would not reach it; index "
                "the captured tensor itself with the traced arguments (plain indexing stays traceable)")
        self.watch(entry[1])

    def record(self, func, args, kwargs, result) -> None:
        """An eager torch call during the trace."""
        name = _torch_name(func)
        if name in _METADATA:
            return
        inputs = [v for v in flatten_args(list(args) + list(kwargs.values())) if isinstance(v, torch.Tensor)]
        outputs = [r for r in flatten_args([result]) if isinstance(r, torch.Tensor)]
        if func is torch.Tensor.__getitem__ and len(outputs) == 1 and isinstance(args[0], torch.Tensor) \
                and basic_index(args[1]):
            self._recipes[id(result)] = (result, args[0], args[1])
            return
        unique = {} if name in _DETACHING else {id(s): s for t in inputs for s in self.sources_of(t)}
        sources = tuple(unique.values())
        if not outputs:  # a value read as a Python number (.item(), int(), bool()): baked into the graph
            self.watch(sources)
            return
        for output in outputs:
            if not any(output is t for t in inputs):  # (``x.float()`` of a float tensor is ``x`` itself)
                self._derived[id(output)] = (output, sources)


class EagerTorch(TorchFunctionMode):
    """While a mod is traced: torch calls without a traced value (``is_traced``) run eagerly and are recorded."""

    def __init__(self, results: EagerResults, is_traced: Callable[[object], bool]):
        super().__init__()
        self.results, self.is_traced = results, is_traced

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if not any(self.is_traced(v) for v in flatten_args(list(args) + list(kwargs.values()))):
            self.results.record(func, args, kwargs, result)
        return result
