"""transformers' ``mask_function`` closures, read: which pattern a model asked for.

transformers builds the pattern of a mask request from closures (``and_masks``, ``or_masks``, the causal and
sliding-window functions, ``remap_positions_for_packed_sequence``, ``packed_sequence_mask_function``).
Reading their qualified names and closure variables (never calling them), this module

- rebuilds them from our combinators so that the pattern traces (``traceable``),
- names a closed-form family: causal, causal sliding window, bidirectional (``closed_form_family``,
  ``pattern_of``),
- recognises packed sequences: a closed-form family within each sequence of a row whose positions restart
  (``packed_pattern``), so that the mask is built in closed form and the attention function can run the
  call as varlen attention (``registry/packed.py``).

Anything not recognised is left to the general path (traced, or read from a table). Inside ``torch.compile``
a closure built in the graph exposes no cells: nothing is recognised there.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..masks import and_masks, causal_mask, or_masks
from .packed import PackedSequences

__all__ = ["traceable", "closed_form_family", "pattern_of", "packed_pattern"]


def _closure_vars(fn: Callable) -> dict:
    """The closure variables of ``fn`` by name; {} when it has none or they cannot be read: an empty cell, or a
    closure built inside a ``torch.compile`` graph, whose ``__closure__`` dynamo does not expose (AttributeError)."""
    code = getattr(fn, "__code__", None)
    try:
        cells = fn.__closure__ if code is not None else None
        if not cells:
            return {}
        return {name: cell.cell_contents for name, cell in zip(code.co_freevars, cells)}
    except (ValueError, AttributeError):
        return {}


def _qualified_name(fn: Callable) -> str:
    # Read from the code object: under torch.compile, comparing ``fn.__qualname__`` with a string gives
    # False (torch 2.13), while the code object's names compare as constants.
    code = getattr(fn, "__code__", None)
    if code is not None:
        return code.co_qualname if hasattr(code, "co_qualname") else code.co_name
    return getattr(fn, "__qualname__", getattr(fn, "__name__", ""))


def traceable(mask_function: Callable, _depth: int = 0) -> Callable:
    """transformers' mask combinators rebuilt from ours, so that the pattern traces (and Triton inlines it).

    transformers' ``and_masks``/``or_masks`` start from ``q_idx.new_ones(())`` and call ``.to(device)``,
    which symbolic tracing cannot follow; their leaves (causal, sliding overlay, padding, packed
    sequences) are plain index arithmetic and trace fine. Recognised by qualified name and closure
    variables; anything else is returned unchanged (it still works, through the exact fallback).
    """
    module = getattr(mask_function, "__module__", None) or ""
    if _depth > 32 or not module.startswith("transformers."):
        return mask_function
    qualname = _qualified_name(mask_function)
    env = _closure_vars(mask_function)
    parts = env.get("mask_functions")
    if qualname in ("and_masks.<locals>.and_mask", "or_masks.<locals>.or_mask") and isinstance(parts, tuple) \
            and parts and all(callable(part) for part in parts):
        parts = [traceable(part, _depth + 1) for part in parts]
        return (and_masks if qualname.startswith("and") else or_masks)(*parts)
    inner, positions = env.get("mask_function"), env.get("position_ids")
    if qualname == "remap_positions_for_packed_sequence.<locals>.inner_mask" and callable(inner) \
            and isinstance(positions, torch.Tensor):
        inner = traceable(inner, _depth + 1)

        def packed_positions(b, h, q_idx, kv_idx):
            return inner(b, h, positions[b, q_idx], positions[b, kv_idx])

        packed_positions.__name__ = f"packed({getattr(inner, '__name__', 'mask')})"
        return packed_positions
    return mask_function


def closed_form_family(mask_function: Callable, _depth: int = 0):
    """``(causal, window)`` when ``mask_function`` is causal, a causal sliding window or bidirectional
    (ours or transformers'), else None. Those families have a closed-form layout (``masks/closed_form.py``).

    Recognised by qualified name and closure variables, as ``traceable`` does; window None = unbounded.
    """
    module = getattr(mask_function, "__module__", None) or ""
    name = _qualified_name(mask_function)
    env = _closure_vars(mask_function)
    if mask_function is causal_mask or (module.startswith("transformers.") and name == "causal_mask_function"):
        return True, None
    if module.startswith("transformers.") and name == "bidirectional_mask_function":
        return False, None
    if module == "triton_attn.masks.library" and name == "sliding_window_mask.<locals>.sliding_window" \
            and isinstance(env.get("window"), int):
        return True, env["window"]
    if module.startswith("transformers.") and name == "sliding_window_overlay.<locals>.inner_mask" \
            and isinstance(env.get("sliding_window"), int):
        return "overlay", env["sliding_window"]
    parts = env.get("mask_functions")
    if module.startswith("transformers.") and name == "and_masks.<locals>.and_mask" and isinstance(parts, tuple) \
            and _depth < 8:
        causal, window = False, None
        for part in parts:
            family = closed_form_family(part, _depth + 1) if callable(part) else None
            if family is None:
                return None
            part_causal, part_window = family
            causal = causal or part_causal is True
            if part_window is not None:
                window = part_window if window is None else min(window, part_window)
            if part_causal == "overlay" and not any(closed_form_family(p, _depth + 1) == (True, None) for p in parts):
                return None  # an overlay alone is not causal; only "overlay and causal" is the window family
        return causal, window
    return None


def pattern_of(mask_function: Callable):
    """``(causal, window)`` of a closed-form family (``closed_form_family``), else ``"table"``."""
    family = closed_form_family(mask_function)
    return family if family is not None and family[0] != "overlay" else "table"


_TRANSFORMERS_AND = "and_masks.<locals>.and_mask"
_REMAP = "remap_positions_for_packed_sequence.<locals>.inner_mask"
_DOCUMENTS = "packed_sequence_mask_function.<locals>.inner_mask"


def _from_transformers(fn) -> bool:
    return callable(fn) and (getattr(fn, "__module__", None) or "").startswith("transformers.")


def packed_pattern(mask_function: Callable) -> Optional[PackedSequences]:
    """The ``PackedSequences`` of transformers' packed-sequence pattern, else None.

    transformers asks for ``and_masks(remap_positions_for_packed_sequence(pattern, position_ids),
    packed_sequence_mask_function(sequence_ids))`` when the positions restart inside a row (no padding, no
    cache): ``pattern`` over the positions, within one sequence. Recognised when ``pattern`` is a closed-form
    family (causal, causal sliding window, bidirectional) and the tensors are ``[B, L]`` integers. Within a
    sequence the positions step by 1 (a sequence starts wherever they do not), so the pattern over positions
    is the same pattern over row indices, and the whole mask is "that family, within each sequence".
    """
    if not _from_transformers(mask_function) or _qualified_name(mask_function) != _TRANSFORMERS_AND:
        return None
    parts = _closure_vars(mask_function).get("mask_functions")
    if not isinstance(parts, tuple) or len(parts) != 2 or not all(_from_transformers(part) for part in parts):
        return None
    remap, documents = parts
    if _qualified_name(remap) != _REMAP or _qualified_name(documents) != _DOCUMENTS:
        return None
    remap_vars = _closure_vars(remap)
    inner, positions = remap_vars.get("mask_function"), remap_vars.get("position_ids")
    sequence_ids = _closure_vars(documents).get("packed_sequence_mask")
    family = closed_form_family(inner) if callable(inner) else None
    if family is None or family[0] == "overlay":
        return None
    for tensor in (positions, sequence_ids):
        if not isinstance(tensor, torch.Tensor) or tensor.dim() != 2 or tensor.dtype.is_floating_point \
                or tensor.dtype.is_complex or tensor.dtype == torch.bool:
            return None
    if positions.shape != sequence_ids.shape or positions.device != sequence_ids.device:
        return None
    causal, window = family
    return PackedSequences(positions, sequence_ids, bool(causal), window)
