"""``flex_attention()``: FlexAttention's entry point, order and conventions over ``attention()``.

Adds what Flex callers expect on top of ``attention``: ``kernel_options`` (tile settings and backend
hints), ``return_aux``, and the output laid out in the query's stride order.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional, Tuple

import torch

from ..masks.block_mask import BlockMask
from .attention import attention_call

__all__ = ["flex_attention", "flex_kernel_options", "in_query_stride_order", "FLEX_TILE_OPTIONS",
           "FLEX_NO_EFFECT_OPTIONS", "FLEX_BACKENDS"]


# kernel_options keys of FlexAttention, by what they become here.
FLEX_TILE_OPTIONS = ("BLOCK_M", "BLOCK_N", "num_warps", "num_stages")
# Hints about the mask or the hardware that need no action here: the kernels always handle empty
# rows, any block order, and take the log-sum-exp from the same pass.
FLEX_NO_EFFECT_OPTIONS = ("ROWS_GUARANTEED_SAFE", "BLOCKS_ARE_CONTIGUOUS", "WRITE_DQ", "FORCE_USE_FLEX_ATTENTION",
                          "PRESCALE_QK", "USE_TMA", "OUTPUT_LOGSUMEXP", "kpack", "matrix_instr_nonkdim",
                          "waves_per_eu")
FLEX_BACKENDS = {"AUTO": None, "TRITON": "triton", "TRITON_DECODE": "triton"}


def flex_kernel_options(kernel_options: Optional[dict]) -> Tuple[Optional[str], dict]:
    """(backend or None, tile settings ``{BLOCK_M: .., ...}``) from FlexAttention's ``kernel_options``.

    ``fwd_`` prefixes apply (this is the forward kernel); keys that would need the backward kernel's
    tiles or another kernel are rejected with an error naming the key."""
    if kernel_options is None:
        return None, {}
    if not isinstance(kernel_options, dict):
        raise TypeError(f"kernel_options must be a dict or None, got {type(kernel_options).__name__}")
    backend, tiles = None, {}
    for key, value in kernel_options.items():
        name = key[4:] if isinstance(key, str) and key.startswith("fwd_") else key
        if name in FLEX_TILE_OPTIONS:
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"kernel_options[{key!r}] must be an int, got {value!r}")
            _check_tile_option(key, name, value)
            tiles[name] = value
        elif name == "BACKEND":
            if value not in FLEX_BACKENDS:
                raise ValueError(f"kernel_options['BACKEND']={value!r} is not available here; "
                                 f"use one of {', '.join(FLEX_BACKENDS)}")
            backend = FLEX_BACKENDS[value]
        elif name not in FLEX_NO_EFFECT_OPTIONS:
            raise ValueError(
                f"kernel_options key {key!r} is not supported by triton_attn.flex_attention (supported: "
                f"{', '.join(FLEX_TILE_OPTIONS)} with an optional 'fwd_' prefix, BACKEND, and the hints "
                f"{', '.join(FLEX_NO_EFFECT_OPTIONS)}, which need no action here); backward tile sizes are "
                "chosen by the library's own backward configs")
    return backend, tiles


def _check_tile_option(key: str, name: str, value: int) -> None:
    """The value's own check (``KernelConfig``'s), reported with the kernel_options key, whatever the backend."""
    from dataclasses import replace

    from ..kernels.attention.configs import FORWARD_CONFIGS

    try:
        replace(FORWARD_CONFIGS[0], **{name: value})
    except ValueError as error:
        raise ValueError(f"kernel_options[{key!r}]={value!r}: {error}") from error


def _flex_config(tiles: dict, query: torch.Tensor, value: torch.Tensor, block_mask: BlockMask):
    """The forward ``KernelConfig``: the heuristic's, with the requested tile settings."""
    from dataclasses import replace

    from ..kernels.attention.configs import default_config
    from ..kernels.targets import device_target

    base = default_config(query.shape[-1], value.shape[-1], query.dtype, block_mask.BLOCK_SIZE, query.shape[2],
                          target=device_target(query.device))
    try:
        return replace(base, **tiles)
    except ValueError as error:
        raise ValueError(f"kernel_options {tiles}: {error}") from error


_TILES_WARNED: set = set()


def flex_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, score_mod: Optional[Callable] = None,
                   block_mask: Optional[BlockMask] = None, scale: Optional[float] = None, enable_gqa: bool = False,
                   return_lse: bool = False, kernel_options: Optional[dict] = None, *, return_aux=None):
    """``torch.nn.attention.flex_attention.flex_attention`` on this library's kernels.

    Same positional order, defaults and returns: ``out [B, Hq, Lq, Dv]``; ``(out, lse)`` with
    ``return_lse=True``; ``(out, AuxOutput(lse, max_scores))`` with ``return_aux=AuxRequest(...)``
    (``lse [B, Hq, Lq]`` float32, natural log). ``block_mask`` may be ours or FlexAttention's.
    As Flex: ``out`` is laid out in memory in the query's stride order (``in_query_stride_order``), K/V
    of batch 1 broadcast over the query's batch, float64 inputs (torch backend) give a float64 lse.
    ``kernel_options``: ``BLOCK_M``/``BLOCK_N``/``num_warps``/``num_stages`` set the forward
    kernel's config (calls that need no gradient), ``BACKEND`` picks the kernel, the remaining
    Flex hints need no action; anything else is rejected by name. The backend is chosen as in
    ``attention`` (Triton on CUDA, PyTorch on CPU, ``TRITON_ATTN_BACKEND`` overrides).
    """
    if return_lse and return_aux is not None:
        raise ValueError("pass either return_lse or return_aux, not both (return_aux=AuxRequest(lse=True) "
                         "replaces return_lse)")
    if return_aux is not None and getattr(return_aux, "max_scores", False):
        raise ValueError("return_aux=AuxRequest(max_scores=True) is not supported by triton_attn.flex_attention; "
                         "request lse only")
    backend, tiles = flex_kernel_options(kernel_options)
    if tiles and torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad
                                                 for t in (query, key, value)) and "grad" not in _TILES_WARNED:
        _TILES_WARNED.add("grad")
        warnings.warn("kernel_options tile settings apply to calls that need no gradient; this call uses the "
                      "tuned or heuristic forward config", UserWarning, stacklevel=2)
    out, lse = attention_call(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scale,
                              enable_gqa=enable_gqa, backend=backend,
                              tiles=(lambda q, v, mask: _flex_config(tiles, q, v, mask)) if tiles else None)
    out = in_query_stride_order(out, query)
    if return_aux is not None:
        try:
            from torch.nn.attention.flex_attention import AuxOutput
        except ImportError:  # an older torch without AuxOutput: the same two fields
            from collections import namedtuple

            AuxOutput = namedtuple("AuxOutput", ["lse", "max_scores"])
        return out, AuxOutput(lse=lse if getattr(return_aux, "lse", False) else None, max_scores=None)
    return (out, lse) if return_lse else out


def in_query_stride_order(out: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """``out`` [B, Hq, Lq, Dv] laid out in memory in the order of ``query``'s strides, as FlexAttention
    returns it: dims filled innermost-first by ascending query stride (on a tie the inner dim first),
    and head_dim innermost whatever the query's. A query viewed from ``[B, L, H, D]`` gives an output that
    ``.transpose(1, 2)`` turns back into a contiguous ``[B, L, H, Dv]``. ``out`` itself when it already
    has that layout (a contiguous query), else one copy (differentiable)."""
    order = sorted(range(4), key=lambda dim: (query.stride(dim), -dim))
    strides = _strides_filled_in(out.shape, order)
    if strides[-1] != 1:  # kernels read rows of head_dim: keep it innermost
        order = [3] + [dim for dim in order if dim != 3]
        strides = _strides_filled_in(out.shape, order)
    if tuple(out.stride()) == tuple(strides):
        return out
    return out.new_empty_strided(out.shape, strides).copy_(out)


def _strides_filled_in(shape, order) -> list:
    strides, step = [0] * len(shape), 1
    for dim in order:
        strides[dim] = step
        step *= shape[dim]
    return strides
