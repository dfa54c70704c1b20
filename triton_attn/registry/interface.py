"""The two registries: attention functions and the mask functions paired with them by name.

They behave like HuggingFace's ``AttentionInterface`` / ``AttentionMaskInterface``: a class-wide
(global) mapping that ``register`` writes to, plus per-instance overrides set with ``obj[name] = fn``
that only that instance sees. ``ALL_ATTENTION_FUNCTIONS`` and ``ALL_MASK_ATTENTION_FUNCTIONS`` are the
shared instances that models read. A lookup answers from the instance's overrides, then the global
registrations, then the built-in names (``triton_attn``, ``sdpa``, ``eager``; see ``defaults``), which the
first read makes: importing registers nothing, and a global registration shadows a built-in.

Registration checks the function's signature, so that a wrong function fails when it is registered
rather than deep inside a forward pass.

Contracts
---------
Attention function::

    fn(module, query, key, value, attention_mask, **kwargs) -> (attn_output, attn_weights)

``query`` ``[B, Hq, Lq, D]``, ``key``/``value`` ``[B, Hkv, Lkv, D]``; ``attn_output`` ``[B, Lq, Hq, Dv]``;
``attn_weights`` may be None. ``**kwargs`` carries ``scaling``, ``dropout``, ``sliding_window``,
``softcap``, ``s_aux``, ``is_causal``, ``position_bias`` and whatever else a model forwards (our attention
functions classify every keyword in ``keywords.ATTENTION_KEYWORDS``).

Mask function (transformers 5.x keywords; the 4.5x form replaces ``q_length``/``q_offset`` by
``cache_position``)::

    fn(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask, **kwargs)
        -> whatever the paired attention function takes as ``attention_mask``
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import MutableMapping
from typing import Callable, Dict, Iterator, List, Mapping

from .defaults import builtin_functions

__all__ = [
    "AttentionInterface", "AttentionMaskInterface", "ALL_ATTENTION_FUNCTIONS", "ALL_MASK_ATTENTION_FUNCTIONS",
    "MissingMaskFunctionWarning", "check_attention_function", "check_mask_function", "check_name",
]

ATTENTION_POSITIONAL = ("module", "query", "key", "value", "attention_mask")
MASK_REQUIRED = ("batch_size", "kv_length", "mask_function", "attention_mask")
# Either q_length (transformers 5.x) or cache_position (4.5x) tells the function where the queries are.
MASK_QUERY_ALTERNATIVES = ("q_length", "cache_position")


class MissingMaskFunctionWarning(UserWarning):
    """An attention function was registered under a name that has no mask function.

    Models look the mask function up by the same name; without one they pass ``attention_mask=None``,
    so padding, sliding windows and packed sequences are silently ignored.
    """


def check_name(name) -> str:
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    return name


def _describe(fn) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__


def _signature(fn, what: str) -> inspect.Signature:
    if not callable(fn):
        raise TypeError(f"{what} must be callable, got {type(fn).__name__}")
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError) as error:  # builtins without a signature
        raise TypeError(f"{what} {_describe(fn)!r}: cannot read its signature ({error})") from error


def check_attention_function(fn: Callable) -> Callable:
    """Raise TypeError unless ``fn(module, query, key, value, attention_mask, **kwargs)`` is a valid call."""
    what = "attention function"
    sig = _signature(fn, what)
    params = list(sig.parameters.values())
    kinds = inspect.Parameter
    if not any(p.kind == kinds.VAR_KEYWORD for p in params):
        raise TypeError(
            f"{what} {_describe(fn)!r} must accept **kwargs: models pass scaling, dropout, sliding_window, softcap, "
            f"s_aux, is_causal and their own keyword arguments; its signature is {sig}")
    positional = [p for p in params if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)]
    takes_var_positional = any(p.kind == kinds.VAR_POSITIONAL for p in params)
    if len(positional) < len(ATTENTION_POSITIONAL) and not takes_var_positional:
        raise TypeError(
            f"{what} {_describe(fn)!r} must take 5 positional arguments (module, query, key, value, attention_mask) "
            f"and **kwargs, and return (attn_output, attn_weights); its signature is {sig}")
    # Positional parameters after the first five must have defaults: models never pass them.
    for p in positional[len(ATTENTION_POSITIONAL):]:
        if p.default is kinds.empty:
            raise TypeError(f"{what} {_describe(fn)!r}: parameter {p.name!r} has no default, but models pass only "
                            f"(module, query, key, value, attention_mask) positionally; its signature is {sig}")
    for p in params:
        if p.kind == kinds.KEYWORD_ONLY and p.default is kinds.empty:
            raise TypeError(f"{what} {_describe(fn)!r}: keyword-only parameter {p.name!r} needs a default, "
                            f"models do not always pass it; its signature is {sig}")
    annotation = sig.return_annotation
    if annotation not in (kinds.empty, None) and not _looks_like_pair(annotation):
        raise TypeError(f"{what} {_describe(fn)!r} must return (attn_output, attn_weights), "
                        f"but its return annotation is {annotation!r}")
    return fn


def _looks_like_pair(annotation) -> bool:
    text = annotation if isinstance(annotation, str) else repr(annotation)
    return "tuple" in text.lower() or "Tuple" in text or "Any" in text


def check_mask_function(fn: Callable) -> Callable:
    """Raise TypeError unless ``fn`` accepts the keywords transformers calls mask functions with."""
    what = "mask function"
    sig = _signature(fn, what)
    params = sig.parameters
    kinds = inspect.Parameter
    if any(p.kind == kinds.VAR_KEYWORD for p in params.values()):
        accepts = lambda name: True  # noqa: E731 -- **kwargs takes any keyword
    else:
        accepts = lambda name: name in params and params[name].kind != kinds.POSITIONAL_ONLY  # noqa: E731
    missing = [name for name in MASK_REQUIRED if not accepts(name)]
    if not any(accepts(name) for name in MASK_QUERY_ALTERNATIVES):
        missing.append("q_length (transformers 5.x) or cache_position (4.5x)")
    if missing:
        raise TypeError(
            f"{what} {_describe(fn)!r} must accept the keyword arguments batch_size, q_length, kv_length, q_offset, "
            f"kv_offset, mask_function, attention_mask (and **kwargs for the rest); missing {', '.join(missing)}; "
            f"its signature is {sig}")
    # Anything that must be given but that transformers does not pass is an error now, not at forward time.
    known = set(MASK_REQUIRED) | set(MASK_QUERY_ALTERNATIVES) | {"q_offset", "kv_offset"}
    for p in params.values():
        if p.kind in (kinds.POSITIONAL_OR_KEYWORD, kinds.KEYWORD_ONLY) and p.default is kinds.empty \
                and p.name not in known:
            raise TypeError(f"{what} {_describe(fn)!r}: parameter {p.name!r} has no default and is never passed "
                            f"by models; its signature is {sig}")
    return fn


class _Registry(MutableMapping):
    """Per-instance overrides over a class-wide mapping over the built-ins; subclasses set ``_global_mapping``,
    ``_check`` and ``builtins``."""

    _global_mapping: Dict[str, Callable] = {}
    _kind = "function"

    def __init__(self):
        self._local_mapping: Dict[str, Callable] = {}

    @staticmethod
    def _check(fn: Callable) -> Callable:
        return fn

    @classmethod
    def builtins(cls) -> Mapping[str, Callable]:
        """The names every instance knows without a registration (made on the first call, not at import)."""
        return {}

    @classmethod
    def has_global(cls, name: str) -> bool:
        """Whether ``name`` is registered globally or built in (per-instance overrides aside)."""
        return name in cls._global_mapping or name in cls.builtins()

    def __getitem__(self, name: str) -> Callable:
        if name in self._local_mapping:
            return self._local_mapping[name]
        if name in self._global_mapping:
            return self._global_mapping[name]
        try:
            return self.builtins()[name]
        except KeyError:
            raise KeyError(f"no {self._kind} registered under {name!r}; registered names: "
                           f"{', '.join(sorted(self)) or '(none)'}") from None

    def __setitem__(self, name: str, fn: Callable) -> None:
        """Override ``name`` for this instance only (other instances keep the global one)."""
        self._local_mapping[check_name(name)] = self._check(fn)

    def __delitem__(self, name: str) -> None:
        """Remove this instance's override of ``name`` (global entries are never deleted here)."""
        if name not in self._local_mapping:
            raise KeyError(f"{name!r} has no per-instance override to delete "
                           f"(global registrations stay; overrides: {sorted(self._local_mapping)})")
        del self._local_mapping[name]

    def __iter__(self) -> Iterator[str]:
        return iter({**self.builtins(), **self._global_mapping, **self._local_mapping})

    def __len__(self) -> int:
        return len(self.builtins().keys() | self._global_mapping.keys() | self._local_mapping.keys())

    def __contains__(self, name) -> bool:
        return name in self._local_mapping or self.has_global(name)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({sorted(self)})"

    def valid_keys(self) -> List[str]:
        return list(self.keys())

    @classmethod
    def register(cls, name: str, fn: Callable) -> None:
        """Register ``fn`` under ``name`` for every instance (after checking its signature)."""
        cls._global_mapping[check_name(name)] = cls._check(fn)

    @classmethod
    def unregister(cls, name: str) -> None:
        """Remove a global registration (for tests and for replacing a whole family of names); a built-in
        name it shadowed answers again."""
        if name not in cls._global_mapping:
            builtin = " (it is built in: register another function under it to shadow it)" \
                if name in cls.builtins() else ""
            raise KeyError(f"{name!r} is not registered in {cls.__name__}{builtin}")
        del cls._global_mapping[name]


class AttentionMaskInterface(_Registry):
    """Mask functions by name: ``AttentionMaskInterface.register("doc_causal", fn)``, ``masks["doc_causal"]``."""

    _global_mapping: Dict[str, Callable] = {}
    _kind = "mask function"

    @staticmethod
    def _check(fn: Callable) -> Callable:
        return check_mask_function(fn)

    @classmethod
    def builtins(cls) -> Mapping[str, Callable]:
        return builtin_functions().mask


class AttentionInterface(_Registry):
    """Attention functions by name: ``AttentionInterface.register("doc_causal", fn)``, ``functions["sdpa"]``.

    Registering a name that has no mask function in ``AttentionMaskInterface`` warns
    (``MissingMaskFunctionWarning``): models would call it with ``attention_mask=None``. Pass
    ``mask_function=`` to register both at once, or use ``register_attention``.
    """

    _global_mapping: Dict[str, Callable] = {}
    _kind = "attention function"

    @staticmethod
    def _check(fn: Callable) -> Callable:
        return check_attention_function(fn)

    @classmethod
    def builtins(cls) -> Mapping[str, Callable]:
        return builtin_functions().attention

    @classmethod
    def register(cls, name: str, fn: Callable, *, mask_function: Callable = None) -> None:
        """Register ``fn`` under ``name`` globally, and ``mask_function`` under the same name if given."""
        check_name(name)
        check_attention_function(fn)
        if mask_function is not None:
            AttentionMaskInterface.register(name, mask_function)
        elif not AttentionMaskInterface.has_global(name):
            warn_missing_mask(name, "triton_attn.registry.AttentionMaskInterface")
        cls._global_mapping[name] = fn

    def get_interface(self, name: str, default: Callable = None) -> Callable:
        """The function registered under ``name``; ``default`` only for ``"eager"`` if not registered."""
        if name == "eager" and name not in self and default is not None:
            return default
        return self[name]


def warn_missing_mask(name: str, where: str) -> None:
    warnings.warn(
        f"attention function {name!r} was registered without a mask function under the same name in {where}: "
        f"models using attn_implementation={name!r} will call it with attention_mask=None, silently ignoring "
        f"padding, sliding windows and packed sequences. Register one with AttentionMaskInterface.register({name!r}, "
        f"mask_fn), pass mask_function= to register(), or use triton_attn.registry.register_attention({name!r}, ...), "
        f"which registers both.", MissingMaskFunctionWarning, stacklevel=3)


ALL_ATTENTION_FUNCTIONS: AttentionInterface = AttentionInterface()
ALL_MASK_ATTENTION_FUNCTIONS: AttentionMaskInterface = AttentionMaskInterface()
