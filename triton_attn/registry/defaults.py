"""The registries' built-in names, made on the first lookup rather than at import.

``triton_attn`` (our attention function with the model's own mask pattern), and the PyTorch references
``sdpa`` and ``eager`` (with the dense mask function). ``AttentionInterface`` / ``AttentionMaskInterface``
answer a lookup from their per-instance overrides, then the global registrations, then these; so a name
registered globally (before or after the first lookup) shadows the built-in, and unregistering it brings the
built-in back. Importing ``triton_attn.registry`` makes nothing and registers nothing.
"""

from __future__ import annotations

import threading
import types
from typing import Callable, Mapping, NamedTuple, Optional

from .attention_functions import eager_attention_function, make_attention_function, sdpa_attention_function
from .masking import dense_mask_function, make_mask_function

__all__ = ["DEFAULT_NAME", "BUILTIN_NAMES", "Builtins", "builtin_functions", "builtins_made", "tag_with_name"]

DEFAULT_NAME = "triton_attn"
BUILTIN_NAMES = (DEFAULT_NAME, "sdpa", "eager")


class Builtins(NamedTuple):
    """The built-in functions by name (read-only mappings)."""

    attention: Mapping[str, Callable]
    mask: Mapping[str, Callable]


_made: Optional[Builtins] = None
# Two threads doing their first lookup at once must get the same function objects.
_lock = threading.Lock()


def tag_with_name(fn: Callable, name: str) -> Callable:
    """Append the registered ``name`` in brackets to a made function's name (tracebacks say which one ran)."""
    fn.__name__ = fn.__qualname__ = f"{fn.__name__}[{name}]"
    return fn


def _make() -> Builtins:
    attention = tag_with_name(make_attention_function(None), DEFAULT_NAME)
    mask = tag_with_name(make_mask_function(None), DEFAULT_NAME)
    return Builtins(
        attention=types.MappingProxyType({DEFAULT_NAME: attention, "sdpa": sdpa_attention_function,
                                          "eager": eager_attention_function}),
        mask=types.MappingProxyType({DEFAULT_NAME: mask, "sdpa": dense_mask_function, "eager": dense_mask_function}))


def builtin_functions() -> Builtins:
    """The built-in attention and mask functions, made on the first call and the same objects afterwards."""
    global _made
    if _made is None:
        with _lock:
            if _made is None:
                _made = _make()
    return _made


def builtins_made() -> bool:
    """Whether a lookup (or ``builtin_functions``) has made the built-ins yet."""
    return _made is not None
