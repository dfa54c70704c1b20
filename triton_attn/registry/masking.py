"""Mask functions: turn a model's mask request into the ``attention_mask`` its attention function takes.

A model asks for a mask with the lengths and offsets of one attention call (queries are rows
``q_offset .. q_offset + q_length`` of the sequence, keys are ``kv_offset .. kv_offset + kv_length``),
the pattern as a ``mask_function(b, h, q_idx, kv_idx)`` over *absolute* positions (causal, sliding
window, packed sequences), and a 2-D padding mask. ``make_mask_function`` builds the Triton-backed
mask function, which returns a ``ModelBlockMask``; ``dense_mask_function`` returns a bool tensor for
the plain PyTorch reference implementations.

Both accept the two signatures transformers uses:

- 5.x: ``(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function, attention_mask, **kw)``
- 4.5x: ``(batch_size, cache_position, kv_length, kv_offset=0, mask_function, attention_mask, **kw)``,
  where ``cache_position`` ``[q_length]`` holds the absolute position of every query.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .. import create_block_mask, create_mask, mod_table
from ..masks import (
                     BlockMask,
                     StructuredMod,
                     and_masks,
                     causal_mask,
                     document_mask,
                     or_masks,
                     padding_mask,
                     sliding_window_mask,
                     window_block_mask,
)
from .mask_patterns import packed_pattern, pattern_of, traceable
from .model_block_mask import ModelBlockMask
from .packed import PackedSequences
from .tensor_mask_models import as_tensor_mask_form, tensor_mask_form

__all__ = ["ModelBlockMask", "MaskRequest", "ModelMaskMod", "CarriesUserMod", "make_mask_function",
           "dense_mask_function", "COMBINE_MODES", "traceable"]

COMBINE_MODES = ("and", "or", "replace")


def _as_int(value, what: str) -> int:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{what} must be an int or a one-element tensor, got shape {tuple(value.shape)}")
        value = value.item()  # StaticCache passes a 0-d tensor to avoid graph breaks
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, got {value!r}")
    if value < 0:
        raise ValueError(f"{what} must be >= 0, got {value}")
    return value


@dataclass
class MaskRequest:
    """One mask request, normalised from either transformers signature.

    ``q_positions`` is ``[q_length]`` int64 when queries are not a contiguous range (else None and the
    queries are ``q_offset + arange(q_length)``). ``padding`` is a bool ``[B, >= kv_offset + kv_length]``
    tensor, or None when nothing is padded.
    """

    batch_size: int
    q_length: int
    kv_length: int
    q_offset: int
    kv_offset: int
    q_positions: Optional[torch.Tensor]
    mask_function: Callable
    padding: Optional[torch.Tensor]
    device: torch.device

    @classmethod
    def parse(cls, batch_size, q_length=None, kv_length=None, q_offset=0, kv_offset=0, mask_function=None,
              attention_mask=None, cache_position=None, device=None) -> "MaskRequest":
        if isinstance(q_length, torch.Tensor) and q_length.dim() == 1:
            # Positional 4.5x call: (batch_size, cache_position, kv_length, kv_offset, mask_function, attention_mask)
            cache_position, kv_offset, mask_function, attention_mask = q_length, q_offset, kv_offset, mask_function
            q_length, q_offset = None, 0
        batch_size = _as_int(batch_size, "batch_size")
        if kv_length is None:
            raise TypeError("mask function: kv_length is required (the number of keys in this attention call)")
        kv_length, kv_offset = _as_int(kv_length, "kv_length"), _as_int(kv_offset, "kv_offset")
        q_positions = None
        if cache_position is not None:
            if not isinstance(cache_position, torch.Tensor) or cache_position.dim() != 1:
                raise TypeError(f"cache_position must be a 1-D tensor [q_length] of query positions, "
                                f"got {cache_position!r}")
            q_length, q_offset, q_positions = cache_position.shape[0], 0, cache_position.long()
        elif q_length is None:
            raise TypeError("mask function: give q_length (transformers 5.x) or cache_position (4.5x)")
        else:
            q_length, q_offset = _as_int(q_length, "q_length"), _as_int(q_offset, "q_offset")
        if q_length == 0 or kv_length == 0 or batch_size == 0:
            raise ValueError(f"mask function: batch_size, q_length and kv_length must be positive, "
                             f"got {batch_size}, {q_length}, {kv_length}")
        if device is None:
            device = next((t.device for t in (attention_mask, cache_position) if isinstance(t, torch.Tensor)), "cpu")
        device = torch.device(device)
        padding = _padding(attention_mask, batch_size, kv_offset + kv_length, device)
        if mask_function is not None and not callable(mask_function):
            raise TypeError(f"mask_function must be a callable (b, h, q_idx, kv_idx) -> bool tensor or None, "
                            f"got {type(mask_function).__name__}")
        return cls(batch_size, q_length, kv_length, q_offset, kv_offset,
                   None if q_positions is None else q_positions.to(device),
                   mask_function or causal_mask, padding, device)

    def query_position(self, q_idx):
        """Absolute positions of local query indices ``q_idx``."""
        if self.q_positions is not None:
            return self.q_positions[q_idx]
        return q_idx + self.q_offset


def _padding(attention_mask, batch_size: int, needed_length: int, device) -> Optional[torch.Tensor]:
    """The 2-D padding mask as bool ``[B, >= needed_length]`` (missing columns are padding), or None if none."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
        shape = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
        raise ValueError(f"mask function: attention_mask must be a 2-D padding mask [batch_size, kv_length] "
                         f"(1 = real token), got {shape}")
    if attention_mask.shape[0] != batch_size:
        raise ValueError(f"mask function: attention_mask has batch size {attention_mask.shape[0]}, "
                         f"expected batch_size={batch_size}")
    keep = attention_mask.to(device=device, dtype=torch.bool)
    missing = needed_length - keep.shape[1]
    if missing > 0:  # e.g. a static cache longer than the mask: the unseen slots hold no tokens
        keep = torch.nn.functional.pad(keep, (0, missing), value=False)
    # Nothing padded: no padding term (full tiles stay full). Under torch.compile the values are not
    # known; the closed-form layout reads the padding with tensor operations and gets the same tiles.
    if not torch.compiler.is_compiling() and bool(keep[:, :needed_length].all()):
        return None
    return keep


def _closed_form_mask(request: MaskRequest, mask_mod: Callable, family, block_size) -> BlockMask:
    causal, window = family
    return window_block_mask(mask_mod, request.batch_size, request.q_length, request.kv_length,
                             q_offset=request.q_offset, kv_offset=request.kv_offset, causal=causal, window=window,
                             padding=request.padding, BLOCK_SIZE=block_size, device=request.device)


def _request_packing(request: MaskRequest) -> Optional[PackedSequences]:
    """The ``PackedSequences`` of a request for transformers' packed-sequence pattern over this whole row (no
    padding, no offsets: its packing detection runs only without a cache and a padding mask), else None."""
    if request.padding is not None or request.q_positions is not None or request.q_offset != 0 \
            or request.kv_offset != 0 or request.q_length != request.kv_length:
        return None
    packing = packed_pattern(request.mask_function)
    if packing is None or tuple(packing.sequence_ids.shape) != (request.batch_size, request.q_length) \
            or packing.sequence_ids.device != request.device:
        return None
    return packing


def _packed_mask(request: MaskRequest, packing: PackedSequences, block_size) -> ModelBlockMask:
    """The closed-form mask of the model's pattern within each packed sequence (``window_block_mask`` with the
    sequence ids as documents: deferred on CPU, no ``[L, L]`` problem anywhere), carrying ``packing`` so that
    the attention function may run the call as varlen attention (``registry/packed.py``)."""
    if packing.window is not None:
        pattern = sliding_window_mask(packing.window)
    else:
        pattern = causal_mask if packing.causal else None
    documents = document_mask(packing.sequence_ids)
    mask_mod = documents if pattern is None else and_masks(pattern, documents)
    mask_mod.__name__ = f"packed({getattr(pattern, '__name__', 'bidirectional')})"
    block_mask = window_block_mask(mask_mod, request.batch_size, request.q_length, request.kv_length,
                                   causal=packing.causal, window=packing.window, document_ids=packing.sequence_ids,
                                   BLOCK_SIZE=block_size, device=request.device)
    wrapped = ModelBlockMask.wrap(block_mask, 0, 0)
    wrapped.packed_sequences = packing  # kept by the mask's views and copies (they copy its attributes)
    return wrapped


def _request_mask_mod(request: MaskRequest, pattern: Callable) -> Callable:
    """``pattern`` over absolute positions (and padding) as a mask_mod over this call's local indices."""
    if request.padding is not None:
        pattern = and_masks(pattern, padding_mask(request.padding))
    kv_offset = request.kv_offset
    if request.q_positions is not None:
        positions = request.q_positions

        def model_mask(b, h, q_idx, kv_idx):
            return pattern(b, h, positions[q_idx], kv_idx + kv_offset)
    else:
        q_offset = request.q_offset

        def model_mask(b, h, q_idx, kv_idx):
            return pattern(b, h, q_idx + q_offset, kv_idx + kv_offset)

    model_mask.__name__ = f"{getattr(pattern, '__name__', 'mask')}@q+{request.q_offset},kv+{kv_offset}"
    return model_mask


class CarriesUserMod(StructuredMod):
    """A ``StructuredMod`` of a model attention call that calls a registered user mod: its own tensors
    (offsets, padding, ...; ``own_count`` of them, first in ``tensors()``) and then the tensors the user
    mod captured (``mod_table.register_mod`` order). ``USER_KIND`` is ``"mask"`` or ``"score"``; the user mod
    object itself sits in the structure (``user_source``)."""

    USER_KIND = "mask"

    def hold_user(self, user_mod: Optional[Callable], user_source: Optional[Callable], user_tensors) -> None:
        """``user_source``: the registered mod (the structure; ``user_mod`` when None); ``user_mod``: what is
        called, that mod or its graph bound to other tensors (``user_tensors``) when rebuilt by ``build``."""
        self.user_mod, self.user_source = user_mod, user_mod if user_source is None else user_source
        self.user_tensors = tuple(user_tensors)

    @classmethod
    def own_count(cls, structure: tuple) -> int:
        raise NotImplementedError

    @classmethod
    def user_source(cls, structure: tuple) -> Optional[Callable]:
        raise NotImplementedError

    @classmethod
    def split(cls, structure: tuple, tensors: tuple):
        """``(iterator over the own tensors, the user mod bound to the rest)``: the user mod itself when
        the rest are its own tensors, else its traced graph over them (``mod_table.rebind_mod``)."""
        count, source = cls.own_count(structure), cls.user_source(structure)
        user = None if source is None else mod_table.rebind_mod(source, cls.USER_KIND, tuple(tensors[count:]))
        return iter(tensors[:count]), user

    @classmethod
    def stand_in(cls, structure: tuple, tensor_specs: tuple) -> "CarriesUserMod":
        # The user mod's own tensors stand in for themselves: its graph may depend on their sizes.
        own = tuple(torch.zeros((1,) * rank, dtype=dtype) for dtype, rank in tensor_specs[:cls.own_count(structure)])
        source = cls.user_source(structure)
        user = () if source is None else tuple(mod_table.register_mod(source, cls.USER_KIND)[1])
        return cls.build(structure, own + user)


class ModelMaskMod(CarriesUserMod):
    """The mask_mod of one model attention call: the model's pattern at this call's positions, a user
    mask_mod combined with it, and the padding, kept as constants plus tensors.

    ``structure()`` is ``(pattern, user_mod, combine, padded, positional)``: ``pattern`` is ``(causal, window)``
    for a closed-form family (causal / sliding window / bidirectional), ``"table"`` for any other pattern
    (read from a bool table of this call), or None when ``combine="replace"`` drops it; ``user_mod`` is the
    registered mask_mod object itself (it exists before any compiled graph). ``tensors()``: ``q_offset`` /
    ``kv_offset`` (int64 0-d: absolute position of query row 0 / key column 0), the padding (bool
    ``[B, >= kv_offset + kv_length]``) when padded, the query positions (int64 ``[q_length]``) when
    positional (transformers 4.5x ``cache_position``), the pattern table (bool ``[B, q_length, kv_length]``)
    for a ``"table"`` pattern, then ``user_tensors``, the tensors the user mod captured (``mod_table.register_mod``
    order, read when the mask function was made: inside a compiled graph a mod's closure cannot be read
    once the graph has called the mod). A model mask built inside ``torch.compile`` thus has a table key
    known without tensor values (``mod_table.compiled_mod``), every decode step (a new offset) shares it, and new
    padding / new values of the user mod's tensors are new tensor inputs.
    """

    def __init__(self, pattern, q_offset: torch.Tensor, kv_offset: torch.Tensor, padding: Optional[torch.Tensor] = None,
                 q_positions: Optional[torch.Tensor] = None, table: Optional[torch.Tensor] = None,
                 user_mod: Optional[Callable] = None, combine: str = "and", user_tensors: tuple = (), *,
                 user_source: Optional[Callable] = None):
        self.pattern, self.padding, self.q_positions, self.table = pattern, padding, q_positions, table
        self.q_offset, self.kv_offset, self.combine = q_offset, kv_offset, combine
        self.hold_user(user_mod, user_source, user_tensors)
        if pattern is None or pattern == "table":
            kind = "replace" if pattern is None else "pattern"
        else:
            causal, window = pattern
            kind = f"sliding_window_{window}" if window is not None else "causal" if causal else "full"
        if self.user_source is not None:
            kind = f"{kind}+{combine}({getattr(self.user_source, '__name__', 'mask_mod')})"
        self.__name__ = f"{kind}+padding" if padding is not None else kind

    @classmethod
    def of_request(cls, request: MaskRequest, pattern, user_mod: Optional[Callable] = None, combine: str = "and",
                   user_tensors: tuple = ()) -> "ModelMaskMod":
        def scalar(value: int) -> torch.Tensor:
            return torch.tensor(value, dtype=torch.int64, device=request.device)

        table = _pattern_table(request) if pattern == "table" else None
        return cls(pattern, scalar(request.q_offset), scalar(request.kv_offset), request.padding, request.q_positions,
                   table, user_mod, combine, user_tensors)

    def __call__(self, b, h, q_idx, kv_idx):
        key = kv_idx + self.kv_offset
        query = q_idx + self.q_offset if self.q_positions is None else self.q_positions[q_idx]
        if self.pattern is None:
            allowed = None
        elif self.pattern == "table":
            allowed = self.table[b, q_idx, kv_idx]
        else:
            causal, window = self.pattern
            distance = query - key
            if window is not None:
                allowed = (distance >= 0) & (distance < window)
            elif causal:
                allowed = distance >= 0
            else:
                allowed = distance == distance
        if self.user_mod is not None:
            user = self.user_mod(b, h, query, key)
            allowed = user if allowed is None else allowed & user if self.combine == "and" else allowed | user
        return allowed if self.padding is None else allowed & self.padding[b, key]

    def structure(self) -> tuple:
        return self.pattern, self.user_source, self.combine, self.padding is not None, self.q_positions is not None

    def _own_tensors(self) -> tuple:
        optional = (self.padding, self.q_positions, self.table)
        return (self.q_offset, self.kv_offset) + tuple(t for t in optional if t is not None)

    def tensors(self) -> tuple:
        return self._own_tensors() + self.user_tensors

    @classmethod
    def own_count(cls, structure: tuple) -> int:
        pattern, _, _, padded, positional = structure
        return 2 + int(padded) + int(positional) + int(pattern == "table")

    @classmethod
    def user_source(cls, structure: tuple) -> Optional[Callable]:
        return structure[1]

    @classmethod
    def build(cls, structure: tuple, tensors: tuple) -> "ModelMaskMod":
        pattern, user_source, combine, padded, positional = structure
        own, user_mod = cls.split(structure, tensors)
        q_offset, kv_offset = next(own), next(own)
        padding = next(own) if padded else None
        q_positions = next(own) if positional else None
        table = next(own) if pattern == "table" else None
        return cls(pattern, q_offset, kv_offset, padding, q_positions, table, user_mod, combine,
                   tuple(tensors[cls.own_count(structure):]), user_source=user_source)


def _pattern_table(request: MaskRequest) -> torch.Tensor:
    """bool ``[B, q_length, kv_length]``: the request's pattern (without padding) at this call's positions.

    Evaluated on index tensors, so transformers' own combinators work as they are (no ``traceable``: inside
    torch.compile, reading the cells of a closure built in the graph and then calling it trips dynamo)."""
    unpadded = _request_mask_mod(dataclasses.replace(request, padding=None), request.mask_function)
    return create_mask(unpadded, request.batch_size, None, request.q_length, request.kv_length,
                       device=request.device)[:, 0]


def combine_patterns(model_pattern: Callable, mask_mod: Optional[Callable], combine: str) -> Callable:
    """The model's own pattern combined with a user ``mask_mod``: ``and`` / ``or`` / ``replace``."""
    if mask_mod is None:
        return model_pattern
    if combine == "and":
        return and_masks(model_pattern, mask_mod)
    if combine == "or":
        return or_masks(model_pattern, mask_mod)
    return mask_mod


def check_combine(combine) -> str:
    if combine not in COMBINE_MODES:
        raise ValueError(f"combine must be one of {', '.join(map(repr, COMBINE_MODES))}, got {combine!r}")
    return combine


def make_mask_function(mask_mod: Optional[Callable] = None, *, combine: str = "and", block_size=128,
                       mask_heads: Optional[int] = None) -> Callable:
    """The Triton-backed mask function: returns a ``ModelBlockMask`` ``[B, H or 1, q_length, kv_length]``, or
    for a model that computes with its mask (``config.model_type`` in ``TENSOR_MASK_MODELS``) a dense tensor of
    that shape: sdpa's bool mask (True = attend), or eager's additive float mask for a model without sdpa.

    mask_mod: an extra ``(b, h, q_idx, kv_idx) -> bool`` over absolute positions, combined with the
    model's pattern: ``"and"`` (both must allow; default), ``"or"`` (either), ``"replace"`` (the model's
    pattern is dropped; padding still applies). mask_heads: the number of query heads when
    ``mask_mod`` depends on ``h`` (default: the mask is shared by all heads).
    block_size: ``BLOCK_SIZE`` of ``create_block_mask``.
    Without ``mask_mod``, transformers' packed-sequence pattern (``position_ids`` restarting inside a row, no
    cache, no padding) gets the closed-form mask of the model's pattern within each sequence, whose
    ``packed_sequences`` (``packed.PackedSequences``) let the attention function run the call as varlen
    attention.
    """
    if mask_mod is not None and not callable(mask_mod):
        raise TypeError(f"mask_mod must be a callable (b, h, q_idx, kv_idx) -> bool tensor or None, "
                        f"got {type(mask_mod).__name__}")
    check_combine(combine)
    # The tensors mask_mod captured, read now (see ModelMaskMod): the same objects, so values changed in place
    # are seen by eager and compiled calls alike.
    user_tensors = () if mask_mod is None else tuple(mod_table.register_mod(mask_mod, "mask")[1])
    if mask_heads is not None and (isinstance(mask_heads, bool) or not isinstance(mask_heads, int) or mask_heads <= 0):
        raise ValueError(f"mask_heads must be a positive int (the number of query heads) or None, got {mask_heads!r}")

    def triton_attn_mask(batch_size, q_length=None, kv_length=None, q_offset=0, kv_offset=0, mask_function=None,
                         attention_mask=None, *, cache_position=None, device=None, **kwargs):
        """Mask function: the ``ModelBlockMask`` of one attention call, or a dense tensor mask for a model in
        ``TENSOR_MASK_MODELS`` (see ``make_mask_function``)."""
        if isinstance(attention_mask, BlockMask):  # already prepared (4-D): returned as is, as transformers does
            return attention_mask
        request = MaskRequest.parse(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function,
                                    attention_mask, cache_position, device)
        form = tensor_mask_form(kwargs.get("config"))
        if form is not None:  # the model computes with its mask (tensor_mask_models): sdpa's / eager's tensor
            model_mask = _request_mask_mod(request, combine_patterns(traceable(request.mask_function), mask_mod,
                                                                     combine))
            allowed = create_mask(model_mask, request.batch_size, mask_heads, request.q_length, request.kv_length,
                                  device=request.device)
            return as_tensor_mask_form(allowed, form, kwargs.get("dtype"))
        packing = _request_packing(request) if mask_mod is None and not torch.compiler.is_compiling() else None
        if packing is not None:  # position_ids restarting inside rows: the pattern within each sequence
            return _packed_mask(request, packing, block_size)
        pattern = None if mask_mod is not None and combine == "replace" else pattern_of(request.mask_function)
        if pattern != "table" and pattern is not None and mask_mod is None and request.q_positions is None:
            # causal / sliding / bidirectional (+ padding) at an offset: every decode step comes here
            block_mask = _closed_form_mask(request, ModelMaskMod.of_request(request, pattern), pattern, block_size)
        else:
            if pattern == "table" and not torch.compiler.is_compiling():
                # Eagerly the model's own pattern is traced (the compiler analyses it); inside torch.compile
                # it is a closure built in the graph, which cannot be keyed, so it is read from a table.
                model_mask = _request_mask_mod(request, combine_patterns(traceable(request.mask_function), mask_mod,
                                                                         combine))
            else:
                model_mask = ModelMaskMod.of_request(request, pattern, mask_mod, combine, user_tensors)
            block_mask = create_block_mask(model_mask, request.batch_size, mask_heads, request.q_length,
                                           request.kv_length, device=request.device, BLOCK_SIZE=block_size)
        return ModelBlockMask.wrap(block_mask, request.q_offset, request.kv_offset, request.q_positions)

    triton_attn_mask.mask_mod = mask_mod
    triton_attn_mask.combine = combine
    return triton_attn_mask


def dense_mask_function(batch_size, q_length=None, kv_length=None, q_offset=0, kv_offset=0, mask_function=None,
                        attention_mask=None, *, cache_position=None, device=None, **kwargs) -> torch.Tensor:
    """Mask function of the PyTorch reference implementations: bool ``[B, 1, q_length, kv_length]``, True = attend."""
    request = MaskRequest.parse(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function,
                                attention_mask, cache_position, device)
    return create_mask(_request_mask_mod(request, traceable(request.mask_function)), request.batch_size, None,
                       request.q_length, request.kv_length, device=request.device)
