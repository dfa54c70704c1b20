"""``attention()``: validation, backend choice, and the autograd entry point."""

from __future__ import annotations

import collections
import math
import warnings
import weakref
from typing import Callable, Optional, Tuple, Union

import torch

from . import settings
from .masks.block_mask import BlockMask
from .masks.closure import StructuredMod, captured_tensors
from .masks.compact import CompactBlockMask
from .masks.evaluate import mod_name
from .masks.safety import check_mods, check_score_result_type
from .masks.scalars import as_float
from .checks import (MAX_HEAD_DIM, SUPPORTED_DTYPES, broadcast_kv_batch, validate_block_mask,
                     validate_mod_devices, validate_tensors)
from .reference import blockwise_attention
from .versions import require_triton

BACKENDS = ("torch", "triton", "interpret")
DEFAULT_BLOCK_SIZE = 128
COMPACT_TILES = 1 << 22  # above this many tiles, the no-mask BlockMask uses the compact layout


def choose_backend(backend: Optional[str], device: torch.device) -> str:
    """``backend`` if given, else ``TRITON_ATTN_BACKEND``, else triton on CUDA and torch elsewhere."""
    chosen = backend or settings.backend() or ("triton" if device.type == "cuda" else "torch")
    if chosen not in BACKENDS:
        source = "backend" if backend else settings.BACKEND
        raise ValueError(f"{source} must be one of {', '.join(BACKENDS)}, got {chosen!r}")
    if chosen == "triton" and device.type != "cuda":
        raise ValueError(f"backend 'triton' needs CUDA tensors, got tensors on {device}; "
                         "use backend='interpret' (Triton interpreter) or 'torch' on CPU")
    if chosen == "interpret" and device.type != "cpu":
        raise ValueError(f"backend 'interpret' runs the Triton interpreter on CPU tensors, got tensors on {device}")
    return chosen


# (q_len, kv_len, device, block_size) -> the all-full BlockMask of a call without a mask (a few recent shapes).
_FULL_MASKS: "collections.OrderedDict" = collections.OrderedDict()
FULL_MASK_CACHE_SIZE = 16


def default_block_mask(q_len: int, kv_len: int, device) -> BlockMask:
    """The all-full BlockMask of a call without a mask, built once per shape and device."""
    if torch.compiler.is_compiling() or torch.device(device).type == "meta":
        return full_block_mask(1, 1, q_len, kv_len, device)
    cache_key = (q_len, kv_len, str(device), DEFAULT_BLOCK_SIZE)
    mask = _FULL_MASKS.get(cache_key)
    if mask is None:
        mask = _FULL_MASKS[cache_key] = full_block_mask(1, 1, q_len, kv_len, device)
        while len(_FULL_MASKS) > FULL_MASK_CACHE_SIZE:
            _FULL_MASKS.popitem(last=False)
    return mask


def full_block_mask(batch: int, heads: int, q_len: int, kv_len: int, device,
                    block_size: Union[int, Tuple[int, int]] = DEFAULT_BLOCK_SIZE) -> BlockMask:
    """A BlockMask with every tile full (plain attention), built without evaluating anything."""
    q_bs, kv_bs = (block_size, block_size) if isinstance(block_size, int) else block_size
    nq, nkv = -(-q_len // q_bs), -(-kv_len // kv_bs)
    if batch * heads * nq * nkv > COMPACT_TILES:
        # Long sequences: dense [NQ, NKV] index fields would be ~1 GB at 1M tokens; the compact
        # layout stores compressed rows (the interval compiler classifies every tile full at once).
        from .masks import create_block_mask, full_mask

        return create_block_mask(full_mask, None, None, q_len, kv_len, device=device, BLOCK_SIZE=(q_bs, kv_bs),
                                 layout="compact")
    full = torch.ones(batch, heads, nq, nkv, dtype=torch.bool, device=device)
    block_mask = BlockMask.from_block_maps(torch.zeros_like(full), full, BLOCK_SIZE=(q_bs, kv_bs),
                                           seq_lengths=(q_len, kv_len), mask_mod=None)
    block_mask.visits_every_tile = True  # lets mod checks be cached across calls (masks/safety.py)
    return block_mask


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
              score_mod: Optional[Callable] = None, block_mask: Optional[BlockMask] = None,
              scale: Optional[float] = None, enable_gqa: bool = False, return_lse: bool = False,
              backend: Optional[str] = None, autotune: Optional[bool] = None):
    """Fused attention with a block-sparse mask and an optional score_mod.

    query: [B, Hq, Lq, D]; key: [B, Hkv, Lkv, D]; value: [B, Hkv, Lkv, Dv]; key/value may have batch 1,
    broadcast over the query's batch without a copy (their gradients are summed over it).
    score_mod(score, b, h, q_idx, kv_idx) -> score, applied to every computed score.
    block_mask: from ``create_block_mask``; None attends everywhere. A mask with more batch entries
    (or heads) than the query is read at the first B (Hq) of them, as FlexAttention does.
    scale: defaults to 1/sqrt(D). enable_gqa: allow Hq a multiple of Hkv.
    backend: "triton" (CUDA), "interpret" (the Triton kernels on CPU tensors), "torch"; None picks.
    autotune: on the triton backend, with no tuned config cached for this problem, search the
    config table now and remember the winner on disk (default: off, unless TRITON_ATTN_AUTOTUNE=1).
    Returns out [B, Hq, Lq, Dv] in the input dtype, and with return_lse=True also lse [B, Hq, Lq]
    float32 (natural log; -inf for rows that attend to nothing, whose output is 0).
    float64 inputs run on the torch backend only, computed in float64, lse float64 too.
    Raises ValueError / TypeError naming the bad argument (README, "Errors and guarantees"); the
    Triton backends raise what the torch backend raises for a mod that indexes a captured tensor
    out of range, divides an integer by zero, or returns a bool or integer score.
    """
    validate_tensors(query, key, value, enable_gqa)
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    else:
        scale = as_float(scale, "scale", expected="a finite float or None")
    if autotune is not None and not isinstance(autotune, bool):
        raise TypeError(f"autotune must be True, False or None, got {autotune!r}")
    chosen = choose_backend(backend, query.device)
    if chosen != "torch" and score_mod is not None:
        chosen = score_mod_backend(score_mod, chosen, (query, key, value))
    if chosen != "torch" and query.dtype == torch.float64:
        raise TypeError(f"query/key/value must be float16, bfloat16 or float32 on backend {chosen!r}, got float64")
    if block_mask is None:
        block_mask = default_block_mask(query.shape[2], key.shape[2], query.device)
    block_mask = validate_block_mask(block_mask, query, key)
    key, value = broadcast_kv_batch(key, query.shape[0]), broadcast_kv_batch(value, query.shape[0])
    compiling = torch.compiler.is_compiling()
    if not compiling:  # (closure walks and a probe call; under torch.compile the kernels check the tensors)
        validate_mod_devices(score_mod, "score_mod", query.device)
        if score_mod is not None:
            # Every backend, even where no tile would run the mod; scores are float64 for float64 inputs.
            score_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
            check_score_result_type(score_mod, query.device, score_dtype)
        # Once per mask and device: a mask's mask_mod and what it captures are fixed when it is built.
        block_mask.derived(f"mask_mod_on_{query.device}",
                           lambda: validate_mod_devices(block_mask.mask_mod, "block_mask.mask_mod", query.device))

    if chosen != "torch" and not compiling:
        require_triton(interpret=chosen == "interpret")  # a clear error for a missing or too old Triton
        # A kernel cannot raise: fail here where the torch backend would (cached per mod and shape).
        check_mods(score_mod, block_mask, query.shape[0], query.shape[1], query.shape[2], key.shape[2], query.device)

    if _op_applies(block_mask, score_mod, compiling, chosen, (query, key, value)):
        from . import ops

        if compiling:
            mask, score = ops.compiled_mod(block_mask.mask_mod, "mask"), ops.compiled_mod(score_mod, "score")
        else:
            mask, score = ops.register_mod(block_mask.mask_mod, "mask"), ops.register_mod(score_mod, "score")
        out, lse = ops.attention_op(query, key, value, block_mask, mask, score, scale=float(scale), backend=chosen,
                                    autotune=autotune)
    elif chosen == "torch":
        out, lse = blockwise_attention(query, key, value, block_mask, score_mod=score_mod, scale=float(scale))
    else:
        from .kernels.attention.autograd import triton_attention  # Triton is imported only when used

        out, lse = triton_attention(query, key, value, block_mask, score_mod=score_mod, scale=float(scale),
                                    interpret=chosen == "interpret", autotune=autotune)
    return (out, lse) if return_lse else out


def _op_applies(block_mask: BlockMask, score_mod: Optional[Callable], compiling: bool, chosen: str,
                tensors) -> bool:
    """Whether the call goes through the custom ops (``ops.py``). Three cases keep the direct route: a
    compact BlockMask (the ops take the dense index tensors, which a compact mask builds only on demand);
    with gradients on, a score_mod whose captured tensors require grad (the ops differentiate
    q, k and v only; the direct route reaches those tensors through the closure); and an eager CPU call
    on the torch backend that needs no gradient, which is exactly the op's CPU implementation without the
    dispatcher, the mod table and the flattened mask (a decode step's host time: bench/bench_generate.py)."""
    if isinstance(block_mask, CompactBlockMask):
        return False
    if chosen == "torch" and not compiling and tensors[0].device.type == "cpu" and not (
            torch.is_grad_enabled() and any(t.requires_grad for t in tensors)):
        return False
    if score_mod is not None and torch.is_grad_enabled() and not compiling:
        if any(t.requires_grad for t in captured_tensors(score_mod)):
            return False
    return True


def _cuda_tile_refiner(*args):
    """The mask compiler's refiner for CUDA tiles: the Triton kernel of ``kernels/refine.py``.

    Imported on first use, so ``import triton_attn`` does not import Triton; None (eager
    refinement) when Triton is not usable here or ``TRITON_ATTN_GPU_REFINE=0`` (read per call).
    """
    if not settings.gpu_refine():
        return None
    try:
        require_triton()
        from .kernels import refine
    except ImportError:
        return None
    return refine.cuda_refiner(*args)


def _install_gpu_tile_refiner() -> None:
    """On CUDA, the mask compiler refines undecided tiles with a Triton kernel. ``masks/`` knows no
    Triton, so the choice is made here (``TRITON_ATTN_GPU_REFINE=0`` keeps the eager refinement)."""
    from .masks import compiler

    compiler.TILE_REFINERS.setdefault("cuda", _cuda_tile_refiner)


_install_gpu_tile_refiner()


# ---------------------------------------------------------------------------------------------
# Score mods the Triton kernels cannot compile, and the FlexAttention drop-in
# ---------------------------------------------------------------------------------------------

class ScoreModFallbackWarning(UserWarning):
    """A score_mod the Triton kernels cannot compile runs on the PyTorch blockwise backend instead."""


_FALLBACK_WARNED: set = set()


# score_mod -> {needs_grad: reason or None}: the verdict depends on the traced graph's structure, which a
# score_mod keeps across calls, so a decode loop does not re-trace it for this check on every step.
_FALLBACK_VERDICTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def score_mod_fallback_reason(score_mod: Callable, needs_grad: bool) -> Optional[str]:
    """Why the Triton kernels cannot run ``score_mod`` (its value, and its derivative when
    ``needs_grad``); None when they can."""
    try:
        verdicts = _FALLBACK_VERDICTS.setdefault(score_mod, {})
    except TypeError:  # not weakly referenceable: decide every time
        verdicts = {}
    if needs_grad not in verdicts:
        verdicts[needs_grad] = _fallback_reason(score_mod, needs_grad)
    return verdicts[needs_grad]


def _fallback_reason(score_mod: Callable, needs_grad: bool) -> Optional[str]:
    from .kernels.jit import derivative
    from .kernels.jit.expressions import CodegenError, Emitter
    from .masks.tracing import UntraceableModError, trace_score_mod

    try:
        graph = trace_score_mod(score_mod).graph
        Emitter("v", "cap").value(graph)
        if needs_grad:
            Emitter("d", "cap").value(derivative.score_derivative(graph))
    except (UntraceableModError, CodegenError, derivative.NotDifferentiableError) as error:
        return str(error)
    return None


# Inside torch.compile the verdict is a constant of the graph: dynamo runs the check once while tracing (the
# tracer's symbols cannot be traced by dynamo). See ops.mod_key for why the mark is set by hand.
score_mod_fallback_reason._dynamo_marked_constant = True


def structured_fallback_reason(mod_type: type, structure: tuple, tensor_specs: tuple,
                               needs_grad: bool) -> Optional[str]:
    """``score_mod_fallback_reason`` of a ``StructuredMod`` from constants only: its stand-in over
    placeholder tensors of the given ``(dtype, rank)`` (a mod built inside a compiled graph cannot be
    passed to a constant function; its structure can)."""
    return _fallback_reason(mod_type.stand_in(structure, tensor_specs), needs_grad)


structured_fallback_reason._dynamo_marked_constant = True


def score_mod_backend(score_mod: Callable, chosen: str, tensors) -> str:
    """``chosen``, or "torch" (warning once per score_mod name) when the kernels cannot compile the score_mod.

    The blockwise backend is plain PyTorch, so it runs on the same (CUDA or CPU) tensors, exactly."""
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    if torch.compiler.is_compiling() and isinstance(score_mod, StructuredMod):
        specs = tuple((t.dtype, t.dim()) for t in score_mod.tensors())
        reason = structured_fallback_reason(type(score_mod), score_mod.structure(), specs, needs_grad)
    else:
        reason = score_mod_fallback_reason(score_mod, needs_grad)
    if reason is None:
        return chosen
    name = mod_name(score_mod)
    if name not in _FALLBACK_WARNED:
        _FALLBACK_WARNED.add(name)
        warnings.warn(f"score_mod {name!r} cannot be compiled into the Triton kernel ({reason}); running it on "
                      "the PyTorch blockwise backend instead (exact, slower).", ScoreModFallbackWarning, stacklevel=3)
    return "torch"


# -- paged attention -------------------------------------------------------------------------------------

PAGE_SIZE_MULTIPLE = 16  # the smallest key tile of the kernels


def _validate_paged(query, key_cache, value_cache, page_table, kv_lens) -> None:
    """Shapes, dtypes and devices of a ``paged_attention`` call, then the values of the page table and
    lengths (one small device-to-host read of the violations)."""
    for name, t, layout in (("query", query, "[B, Hq, Lq, D]"), ("key_cache", key_cache, "[num_pages, Hkv, page_size, D]"),
                            ("value_cache", value_cache, "[num_pages, Hkv, page_size, Dv]"),
                            ("page_table", page_table, "int32 [B, max_pages]"), ("kv_lens", kv_lens, "int32 [B]")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
        rank = layout.count(",") + 1
        if t.dim() != rank:
            raise ValueError(f"{name} must be a {rank}-D tensor {layout}, got {t.dim()}-D with shape {tuple(t.shape)}")
        if t.device != query.device:
            raise ValueError(f"{name} must be on query's device {query.device}, got {t.device}")
    for name, t in (("query", query), ("key_cache", key_cache), ("value_cache", value_cache)):
        if t.dtype not in SUPPORTED_DTYPES + (torch.float64,):
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
        if any(s == 0 for s in t.shape):
            raise ValueError(f"{name} must not have an empty dimension, got shape {tuple(t.shape)}")
    if not (query.dtype == key_cache.dtype == value_cache.dtype):
        raise TypeError(f"query, key_cache and value_cache must share one dtype, got {query.dtype}, "
                        f"{key_cache.dtype}, {value_cache.dtype}")
    for name, t in (("page_table", page_table), ("kv_lens", kv_lens)):
        if t.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {t.dtype}")
    batch, q_heads, q_len, head_dim = query.shape
    num_pages, kv_heads, page_size, key_dim = key_cache.shape
    if tuple(value_cache.shape[:3]) != (num_pages, kv_heads, page_size):
        raise ValueError(f"value_cache must be [num_pages, Hkv, page_size, Dv] = [{num_pages}, {kv_heads}, {page_size}, Dv] "
                         f"like key_cache, got shape {tuple(value_cache.shape)}")
    if key_dim != head_dim:
        raise ValueError(f"query and key_cache must have the same head_dim D, got {head_dim} and {key_dim}")
    for name, dim in (("query/key_cache head_dim D", head_dim), ("value_cache head_dim Dv", value_cache.shape[3])):
        if dim > MAX_HEAD_DIM:
            raise ValueError(f"{name} must be at most {MAX_HEAD_DIM}, got {dim}")
    if q_heads % kv_heads:
        raise ValueError(f"query heads Hq={q_heads} must be a multiple of the cache's key/value heads Hkv={kv_heads}")
    if page_size % PAGE_SIZE_MULTIPLE:
        raise ValueError(f"key_cache page_size (dim 2) must be a multiple of {PAGE_SIZE_MULTIPLE}, got {page_size}")
    if page_table.shape[0] != batch or kv_lens.shape[0] != batch:
        raise ValueError(f"page_table [B, max_pages] and kv_lens [B] must have query's batch size B={batch}, "
                         f"got page_table {tuple(page_table.shape)} and kv_lens {tuple(kv_lens.shape)}")
    if page_table.shape[1] == 0:
        raise ValueError("page_table must have at least one page per sequence, got max_pages=0")
    capacity = page_table.shape[1] * page_size
    lengths = kv_lens.long()
    pages_used = (lengths + page_size - 1) // page_size                                     # [B]
    in_use = torch.arange(page_table.shape[1], device=page_table.device) < pages_used.unsqueeze(1)
    bad_page = in_use & ((page_table < 0) | (page_table >= num_pages))
    problems = torch.stack([lengths.max(), lengths.min(), bad_page.any().long()]).tolist()
    longest, shortest, any_bad_page = problems
    if longest > capacity:
        worst = int(lengths.argmax())
        raise ValueError(f"kv_lens[{worst}]={longest} exceeds the page table's capacity max_pages * page_size = "
                         f"{page_table.shape[1]} * {page_size} = {capacity}")
    if shortest < q_len:
        worst = int(lengths.argmin())
        raise ValueError(f"kv_lens[{worst}]={shortest} is shorter than the query (Lq={q_len}): the query rows are "
                         "the last Lq tokens of each sequence, so kv_lens must count them")
    if any_bad_page:
        b, j = (int(i) for i in bad_page.nonzero()[0])
        raise ValueError(f"page_table[{b}, {j}]={int(page_table[b, j])} is not a page of key_cache "
                         f"(expected 0 <= page < num_pages={num_pages}); sequence {b} uses its first "
                         f"{int(pages_used[b])} pages")


def paged_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    page_table: torch.Tensor, kv_lens: torch.Tensor, *, mask_mod: Optional[Callable] = None,
                    score_mod: Optional[Callable] = None, scale: Optional[float] = None,
                    return_lse: bool = False, backend: Optional[str] = None):
    """Attention of new query rows over a paged KV cache.

    query: [B, Hq, Lq, D]; key_cache: [num_pages, Hkv, page_size, D]; value_cache: [num_pages, Hkv,
    page_size, Dv]; page_table: int32 [B, max_pages] (logical page j of sequence b is physical page
    ``page_table[b, j]``); kv_lens: int32 [B], the length of each sequence including the query rows.
    Query row i of sequence b sits at logical position ``kv_lens[b] - Lq + i``; ``mask_mod(b, h, q_idx,
    kv_idx)`` and ``score_mod`` see logical positions, and mask_mod defaults to causal. Positions
    ``>= kv_lens[b]`` are never attended. GQA when Hq is a multiple of Hkv; page_size a multiple of 16.
    backend: "triton" (CUDA), "interpret" (the same kernel on CPU tensors), "torch" (gathers pages);
    None picks. Returns out [B, Hq, Lq, Dv] (and lse [B, Hq, Lq] float32 with return_lse=True).
    """
    _validate_paged(query, key_cache, value_cache, page_table, kv_lens)
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise TypeError(f"scale must be a finite float or None, got {scale!r}")
    chosen = choose_backend(backend, query.device)
    if chosen != "torch" and query.dtype == torch.float64:
        raise TypeError(f"query/key_cache/value_cache must be float16, bfloat16 or float32 on backend {chosen!r}, "
                        "got float64")
    validate_mod_devices(mask_mod, "mask_mod", query.device)
    validate_mod_devices(score_mod, "score_mod", query.device)
    if chosen != "torch" and torch.is_grad_enabled() and any(
            t.requires_grad for t in (query, key_cache, value_cache)):
        raise NotImplementedError(f"paged_attention has no backward pass on backend {chosen!r} (it serves inference); "
                                  "call it under torch.no_grad(), detach the inputs, or use backend='torch'")
    if chosen == "torch":
        from .paged import paged_attention_torch

        out, lse = paged_attention_torch(query, key_cache, value_cache, page_table, kv_lens, mask_mod=mask_mod,
                                         score_mod=score_mod, scale=float(scale))
    else:
        from .kernels.decode.launch import paged_decode  # Triton is imported only when used

        out, lse = paged_decode(query, key_cache, value_cache, page_table, kv_lens, mask_mod=mask_mod,
                                score_mod=score_mod, scale=float(scale), interpret=chosen == "interpret")
    return (out, lse) if return_lse else out
