"""One-call registration: a mask_mod / score_mod becomes a named attention implementation.

``register_attention(name, mask_mod=..., score_mod=...)`` makes the Triton-backed attention function
and its paired mask function, registers both under ``name`` in our registries and, when transformers
is importable, in ``transformers.AttentionInterface`` / ``transformers.AttentionMaskInterface`` (through
their class-level ``register``, the mapping transformers' mask code consults). transformers is only
imported inside these calls, never when ``triton_attn`` is imported.
"""

from __future__ import annotations

import importlib.util
import numbers
import warnings
from typing import Callable, NamedTuple, Optional, Tuple

from .. import api
from ..masks import block_mask as block_masks
from .attention_functions import make_attention_function
from .defaults import DEFAULT_NAME, tag_with_name
from .interface import AttentionInterface, AttentionMaskInterface, MissingMaskFunctionWarning, check_name
from .masking import check_combine, make_mask_function

__all__ = ["register_attention", "check_options", "register_transformers", "RegisteredAttention", "DEFAULT_NAME",
           "TRANSFORMERS_BUILTIN_NAMES", "transformers_available"]

# Names transformers defines itself: registering over them would silently change every model using them.
TRANSFORMERS_BUILTIN_NAMES = frozenset({"eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3",
                                        "flash_attention_4", "paged|eager"})


class RegisteredAttention(NamedTuple):
    """What ``register_attention`` registered: the name and its two functions."""

    name: str
    attention_function: Callable
    mask_function: Callable
    in_transformers: bool


def transformers_available() -> bool:
    """Whether transformers can be imported (checked without importing it)."""
    return importlib.util.find_spec("transformers") is not None


def _transformers_interfaces():
    from transformers import AttentionInterface as HFAttentionInterface
    from transformers import AttentionMaskInterface as HFAttentionMaskInterface

    return HFAttentionInterface, HFAttentionMaskInterface


def _want_transformers(transformers: Optional[bool]) -> bool:
    if transformers is None:
        return transformers_available()
    if not isinstance(transformers, bool):
        raise TypeError(f"transformers must be True, False or None (register there if importable), "
                        f"got {transformers!r}")
    if transformers and not transformers_available():
        raise ImportError("transformers=True but transformers is not installed; pip install transformers, "
                          "or pass transformers=False to register in triton_attn's registries only")
    return transformers


def check_options(backend, block_size, mask_heads=None):
    """``register_attention``'s kernel options, checked now rather than on the first model call:
    (backend, block_size, mask_heads) normalized (numpy ints become ints), or a ValueError naming
    the option."""
    if backend is not None and backend not in api.BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, api.BACKENDS))} or None (pick by device), "
                         f"got {backend!r}")
    try:
        block_size = block_masks.normalize_block_size(block_size)
    except ValueError:
        raise ValueError(f"block_size must be a positive int or a (q_block_size, kv_block_size) pair of them, "
                         f"got {block_size!r}") from None
    if mask_heads is not None and not isinstance(mask_heads, bool) and isinstance(mask_heads, numbers.Integral):
        mask_heads = int(mask_heads)  # make_mask_function checks the value
    return backend, block_size, mask_heads


def register_attention(name: str, mask_mod: Optional[Callable] = None, score_mod: Optional[Callable] = None, *,
                       combine: str = "and", backend: Optional[str] = None, block_size=128,
                       mask_heads: Optional[int] = None, transformers: Optional[bool] = None,
                       ignore_keywords=()) -> RegisteredAttention:
    """Make a Triton-backed attention implementation and register it, with its mask function, as ``name``.

    mask_mod: ``(b, h, q_idx, kv_idx) -> bool`` over absolute token positions; combined with the model's
        own pattern (causal, sliding window, packed sequences) by ``combine``: ``"and"`` (default; both
        must allow), ``"or"`` (either allows), ``"replace"`` (only ``mask_mod``). Padding always applies.
    score_mod: ``(score, b, h, q_idx, kv_idx) -> score`` over absolute positions, after the model's softcap.
    backend: passed to ``triton_attn.attention`` (None: triton on CUDA, torch on CPU).
    block_size: ``BLOCK_SIZE`` of the block masks. mask_heads: number of query heads when ``mask_mod``
        depends on ``h`` (default: one mask shared by all heads).
    transformers: also register in transformers' interfaces: None = when importable, True = required, False = no.
    ignore_keywords: keywords a model passes to attention functions that ``keywords.ATTENTION_KEYWORDS`` does not
        know and that you vouch do not change attention (a str or a collection of str); any other unknown
        keyword is an error at the first call (known ones are implemented, ignored as harmless, or refused).

    Use it with ``AutoModelForCausalLM.from_config(config, attn_implementation=name)``,
    ``model.set_attn_implementation(name)``, or the ``triton_attn.models`` models.
    """
    check_name(name)
    if name in TRANSFORMERS_BUILTIN_NAMES or name.startswith("paged|"):
        raise ValueError(f"name {name!r} is one of transformers' own implementations; pick another name "
                         f"(reserved: {', '.join(sorted(TRANSFORMERS_BUILTIN_NAMES))}, and any 'paged|' name)")
    check_combine(combine)
    backend, block_size, mask_heads = check_options(backend, block_size, mask_heads)
    in_transformers = _want_transformers(transformers)
    attention_function = tag_with_name(
        make_attention_function(score_mod, backend=backend, ignore_keywords=ignore_keywords), name)
    mask_function = tag_with_name(
        make_mask_function(mask_mod, combine=combine, block_size=block_size, mask_heads=mask_heads), name)
    AttentionInterface.register(name, attention_function, mask_function=mask_function)
    if in_transformers:
        hf_attention, hf_mask = _transformers_interfaces()
        hf_mask.register(name, mask_function)
        hf_attention.register(name, attention_function)
    return RegisteredAttention(name, attention_function, mask_function, in_transformers)


def register_transformers(*names: str) -> Tuple[str, ...]:
    """Register implementations from our registries in transformers' (default: ``"triton_attn"``, built in).

    Each name's attention function goes to ``transformers.AttentionInterface`` and its mask function,
    when it has one, to ``transformers.AttentionMaskInterface``; a name without a mask function warns
    (``MissingMaskFunctionWarning``). Returns the names registered. Imports transformers.
    """
    names = names or (DEFAULT_NAME,)
    if not transformers_available():
        raise ImportError("register_transformers needs transformers; pip install transformers")
    hf_attention, hf_mask = _transformers_interfaces()
    attention_functions, mask_functions = AttentionInterface(), AttentionMaskInterface()  # no overrides: global
    for name in names:
        check_name(name)
        if name in TRANSFORMERS_BUILTIN_NAMES:
            raise ValueError(f"{name!r} is one of transformers' own implementations and is not re-registered there")
        if name not in attention_functions:
            raise KeyError(f"{name!r} is not registered in triton_attn.registry.AttentionInterface; registered: "
                           f"{', '.join(sorted(attention_functions))}")
        mask_function = mask_functions.get(name)
        if mask_function is not None:
            hf_mask.register(name, mask_function)
        else:
            warnings.warn(f"{name!r} has no mask function: transformers models using attn_implementation={name!r} "
                          "will call it with attention_mask=None (padding and sliding windows ignored); register "
                          "one in triton_attn.registry.AttentionMaskInterface first, or use register_attention",
                          MissingMaskFunctionWarning, stacklevel=2)
        hf_attention.register(name, attention_functions[name])
    return tuple(names)
