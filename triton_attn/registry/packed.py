"""Packed sequences of a model call run as FlashAttention-2's varlen attention.

A batch packed without padding (``DataCollatorWithFlattening``) is one row ``[1, L]`` holding several
sequences. transformers tells attention functions about it in two ways:

- ``position_ids`` ``[1, L]`` restart inside the row (a step other than +1 starts a sequence: the rule of
  transformers' ``find_packed_sequence_indices``). Its mask creation then asks our mask function for the
  model's pattern within each sequence, which returns a closed-form ``ModelBlockMask`` carrying the
  ``PackedSequences`` (``masking.py``, ``mask_patterns.packed_pattern``);
- FlashAttention's keywords ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (int ``[S + 1]``, cumulative lengths) and
  ``max_length_q`` / ``max_length_k`` (``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``).

``plan_varlen`` decides whether one attention call may run as ``flash_attn_varlen_func`` over the packed rows
(no padding, no ``[L, L]`` mask: each query block visits only its own sequence's key blocks) with the result of
the mask path, and with which sequences; ``run_varlen`` runs it. The attention function asks only when
nothing else shapes the scores (no position bias, sinks, sparse indices or user score_mod).

The sequences come from, in this order: the keywords (with our packed mask they must describe its sequences:
checked on CPU tensors, where it is free; on a GPU that is the caller's duty, as in FlashAttention); the
packed mask's positions; with no mask at all, ``position_ids`` (as transformers' flash path does). Deriving
them from positions reads the device once (the number of sequences and the longest, together), remembered
per positions tensor while it is unchanged (its version), so a forward pass reads once, not once per layer.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from .. import flash_attn_varlen_func
from .model_block_mask import ModelBlockMask

__all__ = ["PackedSequences", "SequenceBoundaries", "VarlenPlan", "plan_varlen", "run_varlen",
           "sequence_boundaries"]

VARLEN_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class SequenceBoundaries:
    """Packed sequences of one row: ``cu_seqlens`` int32 ``[count + 1]`` (cumulative lengths from 0 to the row
    length), ``count`` sequences, the ``longest`` of them (host ints)."""

    cu_seqlens: torch.Tensor
    count: int
    longest: int


@dataclass(eq=False)
class PackedSequences:
    """Sequences packed along the rows of a mask request: ``positions`` int ``[B, L]`` (the positions the
    model's pattern is over; they step by 1 within a sequence), ``sequence_ids`` int ``[B, L]`` (non-decreasing
    sequence index of every token, transformers' ``packed_sequence_mask``), and the pattern within each
    sequence: ``causal`` and ``window`` (keys with ``q - kv < window``; None: unbounded)."""

    positions: torch.Tensor
    sequence_ids: torch.Tensor
    causal: bool
    window: Optional[int]
    boundaries: Optional[SequenceBoundaries] = None  # of row 0, remembered by the first call that needs them


@dataclass(frozen=True)
class VarlenPlan:
    """How a call runs as varlen attention: the sequences (``cu_seqlens_q`` / ``cu_seqlens_k`` int32 ``[S + 1]``,
    host ints ``max_seqlen_q`` / ``max_seqlen_k``) and the pattern within each (``causal``; ``window``: keys with
    ``q - kv < window``, None unbounded)."""

    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    causal: bool
    window: Optional[int]


# -- reading the device once per positions tensor ---------------------------------------------------------
_REMEMBERED: Dict[int, Tuple[weakref.ref, int, object]] = {}


def _version(tensor: torch.Tensor) -> Optional[int]:
    """The tensor's version counter (bumped by every in-place change), None for an inference tensor (no counter)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


def _remembered(tensor: torch.Tensor, compute: Callable[[], object]) -> object:
    """``compute()``, remembered while ``tensor`` is the same object with the same version: the layers of one
    forward pass share their ``position_ids`` object. Inference tensors have no version and are not remembered
    (a buffer changed in place could not be told apart)."""
    version = _version(tensor)
    if version is None:
        return compute()
    key = id(tensor)
    found = _REMEMBERED.get(key)
    if found is not None and found[0]() is tensor and found[1] == version:
        return found[2]
    value = compute()
    _REMEMBERED[key] = (weakref.ref(tensor, lambda _, key=key: _REMEMBERED.pop(key, None)), version, value)
    return value


def _derive_boundaries(positions: torch.Tensor) -> SequenceBoundaries:
    """The sequences of one row of positions ``[L]``: one starts at 0 and wherever the step is not +1. One
    read of the device: the count and the longest, together."""
    length, device = positions.shape[0], positions.device
    starts = torch.ones(length, dtype=torch.bool, device=device)
    starts[1:] = (positions[1:] - positions[:-1]) != 1
    sequence = torch.cumsum(starts, 0) - 1                                                   # int64 [L]
    # First row of every sequence, the row length past the last one: cumulative lengths, padded to L + 1.
    first = torch.full((length + 1,), length, dtype=torch.int64, device=device)
    first.scatter_reduce_(0, sequence, torch.arange(length, device=device), reduce="amin")
    count, longest = torch.stack([sequence[-1] + 1, (first[1:] - first[:-1]).max()]).tolist()
    return SequenceBoundaries(first[:count + 1].to(torch.int32), int(count), int(longest))


def sequence_boundaries(positions: torch.Tensor) -> SequenceBoundaries:
    """The packed sequences of positions ``[1, L]`` (or ``[L]``), remembered per tensor (see the module
    docstring)."""
    return _remembered(positions, lambda: _derive_boundaries(positions.reshape(-1)))


def _host_int(value, what: str) -> int:
    """``max_length_*`` as a host int: an int, or a one-element integer tensor (read once per tensor)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_floating_point:
        return int(_remembered(value, lambda: int(value.reshape(()).item())))
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be an int >= 0 (the longest packed sequence), got {value!r}")
    return value


def _keyword_cu(value, what: str, device: torch.device) -> torch.Tensor:
    """``cu_seq_lens_*`` as int32 ``[S + 1]`` on the query's device, or a ValueError naming it."""
    if not isinstance(value, torch.Tensor) or value.dim() != 1 or value.numel() < 2 \
            or value.dtype not in (torch.int32, torch.int64):
        got = f"{value.dtype} of shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) \
            else type(value).__name__
        raise ValueError(f"{what} must be an int32 tensor [number of sequences + 1] (cumulative lengths from 0), "
                         f"got {got}")
    if value.device != device:
        raise ValueError(f"{what} must be on the query's device {device}, got {value.device}")
    return value.to(torch.int32)


def _mask_packing(mask, length: int, device: torch.device) -> Optional[PackedSequences]:
    """The ``PackedSequences`` of our own packed mask for ``length`` queries and keys in one row, when the call
    may run as varlen: the mask as our mask function built it (allowed view, no folded bias, offsets 0)."""
    packing = getattr(mask, "packed_sequences", None) if isinstance(mask, ModelBlockMask) else None
    if not isinstance(packing, PackedSequences) or mask.view != "allowed" or mask.bias is not None \
            or mask.q_offset != 0 or mask.kv_offset != 0 or mask.q_positions is not None:
        return None
    if tuple(packing.positions.shape) != (1, length) or packing.positions.device != device \
            or tuple(mask.seq_lengths) != (length, length):
        return None
    return packing


def _same_tensor_data(a, b: torch.Tensor) -> bool:
    """Whether ``a`` views exactly ``b``'s elements (same memory, shape and strides): no device read."""
    return isinstance(a, torch.Tensor) and a.device == b.device and a.dtype == b.dtype \
        and a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


def _packing_boundaries(packing: PackedSequences, position_ids) -> SequenceBoundaries:
    """The sequences of a packed mask. The layers of a forward pass share the model's ``position_ids`` object
    (the mask's positions are a view of it, one per mask kind): remembered there when it is that tensor."""
    if packing.boundaries is None:
        source = position_ids if _same_tensor_data(position_ids, packing.positions) else packing.positions
        packing.boundaries = sequence_boundaries(source)
    return packing.boundaries


def plan_varlen(query: torch.Tensor, key: torch.Tensor, attention_mask, *, causal: bool,
                sliding_window: Optional[int], position_ids=None, cu_seq_lens_q=None, cu_seq_lens_k=None,
                max_length_q=None, max_length_k=None) -> Optional[VarlenPlan]:
    """The ``VarlenPlan`` of one attention call (query ``[1, Hq, Lq, D]``, key ``[1, Hkv, Lkv, D]``), or None to
    take the mask path. The caller has excluded everything else that shapes the scores.

    - ``attention_mask`` our packed mask (``_mask_packing``; Lq = Lkv): its pattern within each sequence; the
      sequences from the keywords (on CPU checked against the mask's, a ValueError when they differ) or from
      its positions;
    - ``attention_mask`` None: ``causal`` / ``sliding_window`` (the module's flags; the window includes the
      current token) within each sequence of the keywords (all four given, as transformers' flash path wants
      them), else of ``position_ids`` ``[1, L]`` with Lq = Lkv = L when they hold more than one sequence;
    - any other mask (a plain causal one included: the model did not ask for packing): None.
    """
    if torch.compiler.is_compiling() or query.shape[0] != 1 or query.dtype not in VARLEN_DTYPES:
        return None
    q_len, kv_len = query.shape[2], key.shape[2]
    packing = None
    if attention_mask is not None:
        packing = _mask_packing(attention_mask, q_len, query.device) if q_len == kv_len else None
        if packing is None:
            return None
        causal, sliding_window = packing.causal, packing.window
    if sliding_window is not None and int(sliding_window) < 1:
        return None  # no key at all: the mask path says what that means
    window = None if sliding_window is None else int(sliding_window)
    if all(value is not None for value in (cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k)):
        cu_q = _keyword_cu(cu_seq_lens_q, "cu_seq_lens_q", query.device)
        # One tensor for both when the caller passed one (self-attention packing): the layout then bounds its lists
        # by the longest sequence alone (masks/varlen.py, same_sequences).
        cu_k = cu_q if cu_seq_lens_k is cu_seq_lens_q else _keyword_cu(cu_seq_lens_k, "cu_seq_lens_k", query.device)
        max_q, max_k = _host_int(max_length_q, "max_length_q"), _host_int(max_length_k, "max_length_k")
        if packing is not None and query.device.type == "cpu":  # free here; on a GPU trusted, as in FlashAttention
            found = _packing_boundaries(packing, position_ids)
            for what, cu in (("cu_seq_lens_q", cu_q), ("cu_seq_lens_k", cu_k)):
                if not torch.equal(cu, found.cu_seqlens):
                    raise ValueError(f"{what} {cu.tolist()} does not describe the packed sequences of position_ids "
                                     f"(cumulative lengths {found.cu_seqlens.tolist()}); pass both from the same "
                                     "packing (DataCollatorWithFlattening does)")
        return VarlenPlan(cu_q, cu_k, max_q, max_k, bool(causal), window)
    if packing is not None:
        found = _packing_boundaries(packing, position_ids)
    elif isinstance(position_ids, torch.Tensor) and q_len == kv_len and q_len > 1 \
            and tuple(position_ids.shape) == (1, q_len) and position_ids.device == query.device \
            and not position_ids.dtype.is_floating_point:
        found = sequence_boundaries(position_ids)
        if found.count < 2:  # one sequence: the plain pattern, which the mask path runs as well
            return None
    else:
        return None
    return VarlenPlan(found.cu_seqlens, found.cu_seqlens, found.longest, found.longest, bool(causal), window)


def run_varlen(plan: VarlenPlan, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
               scale: Optional[float], softcap: Optional[float], dropout_p: float,
               backend: Optional[str]) -> torch.Tensor:
    """query ``[1, Hq, L, D]``, key / value ``[1, Hkv, Lk, D / Dv]`` -> ``[1, L, Hq, Dv]``: each sequence of the
    plan attends to itself only (``flash_attn_varlen_func`` over ``[L, H, D]`` views, nothing copied).

    Our window includes the current token: FlashAttention's reach is ``window - 1`` keys to the left, and to
    the right 0 when causal (else ``window - 1``, the bidirectional window)."""
    reach = -1 if plan.window is None else plan.window - 1
    packed = (t[0].transpose(0, 1) for t in (query, key, value))                     # [L, H, D] views
    out = flash_attn_varlen_func(*packed, plan.cu_seqlens_q, plan.cu_seqlens_k, plan.max_seqlen_q,
                                 plan.max_seqlen_k, dropout_p=dropout_p, softmax_scale=scale, causal=plan.causal,
                                 window_size=(reach, 0 if plan.causal else reach), softcap=softcap or 0.0,
                                 backend=backend)
    return out.unsqueeze(0)
