"""Looking inside a mod callable: the tensors it can reach (closures, defaults, globals, attributes).

A mod reads tensors from wherever a Python function can reach them, and each must be found: the kernels
take them as arguments, the gradient of one that requires grad must reach it, and caches keyed by the mod
must notice when one is rebound. ``reachable(fn)`` walks, depth first and once each:

- a function's closure cells, defaults (positional and keyword-only), and the names its code (nested
  code objects -- lambdas, comprehensions, inner functions -- included) reads: globals (then builtins),
  free variables, and attribute chains from those, from ``self`` of a method, or from a parameter's
  default (``module.G``, ``self.table``, ``cfg.bias``), read statically (``inspect.getattr_static``; an
  ``nn.Module``'s parameters, buffers and submodules from its own dicts; a property's getter is walked
  rather than called), so nothing runs;
- a bound method's ``__self__`` and function; a ``functools.partial``'s function, args and keywords;
  a callable object's ``__call__`` (an ``nn.Module``'s ``forward``) bound to it, when it is the mod
  itself, a partial's function, or named by an attribute chain;
- list / tuple / dict items, and a ``StructuredMod``'s structure and tensors.

Not found: a tensor reached through computed names (``getattr(self, name)``, ``globals()[...]``), or
held only inside another object's attributes that no code names. ``tracing.py`` compares what the
traced mod read with what this walk finds, and a tensor that requires grad and is not found is an error.
"""

from __future__ import annotations

import builtins
import dis
import functools
import hashlib
import inspect
import types
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Tuple

import torch

_MISSING = object()
_ROOT_KINDS = {"LOAD_GLOBAL": "global", "LOAD_NAME": "global", "LOAD_DEREF": "free", "LOAD_CLASSDEREF": "free",
               "LOAD_FAST": "local", "LOAD_FAST_CHECK": "local", "LOAD_FAST_LOAD_FAST": "local",
               "LOAD_FAST_BORROW": "local", "LOAD_FAST_BORROW_LOAD_FAST_BORROW": "local"}
_ATTRIBUTE_OPS = {"LOAD_ATTR", "LOAD_METHOD"}


class _Read(NamedTuple):
    kind: str          # "global" | "free" | "local"
    name: str
    chain: Tuple[str, ...]
    nested: bool       # read by a nested code object (its locals are not the function's)


@functools.lru_cache(maxsize=4096)
def _name_reads(code: types.CodeType, nested: bool = False) -> Tuple[_Read, ...]:
    """The names ``code`` reads and the attribute chains read from them, nested code objects included."""
    reads = []
    instructions = list(dis.get_instructions(code))
    for at, instruction in enumerate(instructions):
        kind = _ROOT_KINDS.get(instruction.opname)
        if kind is None:
            continue
        names = instruction.argval if isinstance(instruction.argval, tuple) else (instruction.argval,)
        chain = []
        for following in instructions[at + 1:]:
            if following.opname not in _ATTRIBUTE_OPS:
                break
            chain.append(following.argval)
        for position, name in enumerate(names):
            if isinstance(name, str):
                last = position == len(names) - 1
                reads.append(_Read(kind, name, tuple(chain) if last else (), nested))
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            reads.extend(_name_reads(constant, True))
    return tuple(dict.fromkeys(reads))


def _static_attribute(owner, name: str):
    """``owner.name`` without running code: module dicts, instance/class dicts, nn.Module's own dicts.
    A method comes back bound (as ``(function, self)``), a property as its getter bound to ``owner``."""
    if isinstance(owner, types.ModuleType):
        return vars(owner).get(name, _MISSING)
    try:
        value = inspect.getattr_static(owner, name)
    except AttributeError:
        if isinstance(owner, torch.nn.Module):
            for store in ("_parameters", "_buffers", "_modules"):
                found = vars(owner).get(store, {})
                if name in found:
                    return found[name]
        return _MISSING
    except Exception:  # an object whose introspection fails: not walked
        return _MISSING
    if isinstance(value, staticmethod):
        return value.__func__
    if isinstance(value, classmethod):
        return _Bound(value.__func__, owner if isinstance(owner, type) else type(owner))
    if isinstance(value, types.MemberDescriptorType):  # a __slots__ entry
        try:
            return value.__get__(owner)
        except AttributeError:
            return _MISSING
    if isinstance(value, property):
        return _Bound(value.fget, owner) if value.fget is not None and not isinstance(owner, type) else _MISSING
    if (isinstance(value, types.FunctionType) and not isinstance(owner, type)
            and name not in getattr(owner, "__dict__", {})):
        return _Bound(value, owner)
    return value


class _Bound(NamedTuple):
    """A function to walk with ``self`` bound (a method reached through an attribute, a callable object)."""
    function: Callable
    self_value: object


def _call_function(value) -> Optional[_Bound]:
    """The code a callable object runs when called: ``forward`` for an nn.Module, else ``__call__``."""
    if isinstance(value, (types.FunctionType, types.MethodType, types.BuiltinFunctionType, functools.partial, type,
                          types.ModuleType, torch.Tensor, StructuredMod)):
        return None
    if isinstance(value, torch.nn.Module):
        forward = getattr(type(value), "forward", None)
        return _Bound(forward, value) if isinstance(forward, types.FunctionType) else None
    call = getattr(type(value), "__call__", None)
    return _Bound(call, value) if isinstance(call, types.FunctionType) else None


def _function_successors(function: types.FunctionType, self_value) -> Iterator[tuple]:
    """(value, top-level?) pairs a function reaches: cells, defaults, and the names its code reads."""
    code = function.__code__
    cells: Dict[str, object] = {}
    for name, cell in zip(code.co_freevars, function.__closure__ or ()):
        try:
            cells[name] = cell.cell_contents
        except ValueError:  # an empty cell (a name not yet bound)
            continue
    yield from ((value, False) for value in cells.values())
    defaults = list(function.__defaults__ or ())
    keyword_defaults = dict(function.__kwdefaults__ or {})
    yield from ((value, False) for value in defaults + list(keyword_defaults.values()))
    parameters = code.co_varnames[:code.co_argcount + code.co_kwonlyargcount]
    locals_known = dict(zip(code.co_varnames[code.co_argcount - len(defaults):code.co_argcount], defaults))
    locals_known.update(keyword_defaults)
    if self_value is not None and parameters:
        locals_known[parameters[0]] = self_value
    namespace = function.__globals__
    for read in _name_reads(code):
        if read.kind == "global":
            value = namespace.get(read.name, _MISSING)
            if value is _MISSING:
                value = vars(builtins).get(read.name, _MISSING)
        elif read.kind == "free":
            value = cells.get(read.name, _MISSING)
        else:
            value = _MISSING if read.nested else locals_known.get(read.name, _MISSING)
        for attribute in read.chain:
            if value is _MISSING or isinstance(value, _Bound):  # (an attribute of a method: not followed)
                break
            yield value, False  # the root and each link: ``G.item()`` reads G
            value = _static_attribute(value, attribute)
        if value is not _MISSING:
            yield value, bool(read.chain)


def _successors(value, self_value, top: bool) -> Iterator[tuple]:
    """(value, self, top-level?) triples one step below ``value``."""
    if isinstance(value, _Bound):
        yield value.self_value, None, False
        yield value.function, value.self_value, False
        return
    if isinstance(value, types.MethodType):
        yield value.__self__, None, False
        yield value.__func__, value.__self__, False
        return
    if isinstance(value, types.FunctionType):
        for child, named in _function_successors(value, self_value):
            yield child, None, named
        return
    if isinstance(value, (list, tuple)):
        yield from ((item, None, False) for item in value)
    elif isinstance(value, dict):
        yield from ((item, None, False) for item in value.values())
    elif isinstance(value, StructuredMod):  # its state in place of closure cells
        yield from ((item, None, False) for item in value.structure())
        yield from ((item, None, False) for item in value.tensors())
    elif isinstance(value, functools.partial):
        yield value.func, None, True
        yield from ((item, None, False) for item in value.args)
        yield from ((item, None, False) for item in value.keywords.values())
    elif top:
        call = _call_function(value)
        if call is not None:
            yield call.function, value, False


_CONTAINERS = (list, tuple, dict)


def _walk_tagged(fn, seen: set) -> Iterator[Tuple[object, bool]]:
    """(value, held by a container?) for every value reachable from ``fn``, depth first, once each."""
    yielded: set = set()
    stack = [(fn, None, True, False)]
    while stack:
        value, self_value, top, contained = stack.pop()
        if isinstance(value, _Bound):
            stack.append((value.self_value, None, False, False))
            value, self_value = value.function, value.self_value
        key = id(value) if self_value is None else (id(value), id(self_value))
        if key in seen:
            continue
        seen.add(key)
        if id(value) not in yielded:
            yielded.add(id(value))
            yield value, contained
        if isinstance(value, torch.Tensor):
            continue
        inside = isinstance(value, _CONTAINERS)
        stack.extend(reversed([(child, bound, child_top, inside)
                               for child, bound, child_top in _successors(value, self_value, top)]))


def _walk(fn, seen: set) -> Iterator:
    """Every value reachable from ``fn`` (see the module docstring), depth first, once each."""
    return (value for value, _ in _walk_tagged(fn, seen))


def reachable(fn: Callable) -> List[object]:
    """Every value reachable from ``fn``, in a stable order (see the module docstring)."""
    return list(_walk(fn, set()))


def reach_identity(fn: Callable) -> tuple:
    """Identities of what ``fn`` reads: its cells, defaults, globals and attributes (rebinding one changes
    this), every tensor and callable it can reach, but not the plain items of a container it holds (a list
    it appends to, a dict it caches in), which would change it on every call."""
    return tuple(id(value) for value, contained in _walk_tagged(fn, set())
                 if not contained or isinstance(value, (torch.Tensor, _CONTAINERS)) or callable(value))


def captured_tensors(fn: Callable) -> List[torch.Tensor]:
    """Tensors ``fn`` can reach (closure cells, defaults, globals, attributes, nested mods), in a stable order."""
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
