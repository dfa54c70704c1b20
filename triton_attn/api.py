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
from .masks.block_mask_flex import QUERY_SLICED_MESSAGE, is_query_sliced
from .masks.closure import StructuredMod, captured_tensors
from .masks.compact import CompactBlockMask
from .masks.evaluate import mod_name
from .masks.safety import check_mods, check_score_result_type
from .masks.scalars import as_float
from .reference import blockwise_attention
from .versions import require_triton

BACKENDS = ("torch", "triton", "interpret")
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
DEFAULT_BLOCK_SIZE = 128
COMPACT_TILES = 1 << 22  # above this many tiles, the no-mask BlockMask uses the compact layout


def _describe(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device}"


def _validate_tensors(query, key, value, enable_gqa: bool) -> None:
    for name, t, layout in (("query", query, "[B, Hq, Lq, D]"), ("key", key, "[B, Hkv, Lkv, D]"),
                            ("value", value, "[B, Hkv, Lkv, Dv]")):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor {layout}, got {t.dim()}-D with shape {tuple(t.shape)}")
        if t.dtype not in SUPPORTED_DTYPES + (torch.float64,):
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")
        if 0 in t.shape:
            raise ValueError(f"{name} must not have an empty dimension, got shape {tuple(t.shape)}")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(f"query, key and value must share one dtype, got {query.dtype}, {key.dtype}, {value.dtype}")
    if not (query.device == key.device == value.device):
        raise ValueError(f"query, key and value must be on one device, got {query.device}, {key.device}, {value.device}")
    batch, q_heads, _, head_dim = query.shape
    if key.shape[0] not in (1, batch) or value.shape[0] not in (1, batch):
        raise ValueError(f"batch sizes differ: query has B={batch}, key {key.shape[0]}, value {value.shape[0]} "
                         f"(key/value batch must be B or 1, which broadcasts over the query's batch)")
    if key.shape[1] != value.shape[1]:
        raise ValueError(f"key and value must have the same number of heads, got {key.shape[1]} and {value.shape[1]}")
    if key.shape[2] != value.shape[2]:
        raise ValueError(f"key and value must have the same length Lkv, got {key.shape[2]} and {value.shape[2]}")
    if key.shape[3] != head_dim:
        raise ValueError(f"query and key must have the same head_dim D, got {head_dim} and {key.shape[3]}")
    for name, dim in (("query/key head_dim D", head_dim), ("value head_dim Dv", value.shape[3])):
        if dim > MAX_HEAD_DIM:
            raise ValueError(f"{name} must be at most {MAX_HEAD_DIM}, got {dim}")
    kv_heads = key.shape[1]
    if q_heads != kv_heads:
        if q_heads % kv_heads != 0:
            raise ValueError(f"GQA needs query heads Hq={q_heads} to be a multiple of key/value heads Hkv={kv_heads}")
        if not enable_gqa:
            raise ValueError(f"query has Hq={q_heads} heads but key/value have Hkv={kv_heads}; "
                             "pass enable_gqa=True for grouped-query attention")


def broadcast_kv_batch(tensor: torch.Tensor, batch: int) -> torch.Tensor:
    """Key or value ``[1, Hkv, Lkv, D]`` as a stride-0 view ``[batch, Hkv, Lkv, D]`` (no copy; its gradient
    is summed over the batch by autograd), as FlexAttention broadcasts K/V over the query's batch."""
    return tensor if tensor.shape[0] == batch else tensor.expand(batch, *tensor.shape[1:])


def _validate_block_mask(block_mask, query, key) -> BlockMask:
    if not isinstance(block_mask, BlockMask):
        if type(block_mask).__name__ == "BlockMask" and hasattr(block_mask, "kv_num_blocks"):
            block_mask = BlockMask.from_flex(block_mask)  # a FlexAttention BlockMask
        else:
            raise TypeError(f"block_mask must be a triton_attn.BlockMask (from create_block_mask) or None, "
                            f"got {type(block_mask).__name__}")
    if is_query_sliced(block_mask.mask_mod):
        raise RuntimeError(QUERY_SLICED_MESSAGE)
    q_len, kv_len = query.shape[2], key.shape[2]
    if block_mask.seq_lengths != (q_len, kv_len):
        larger = block_mask.seq_lengths[0] >= q_len and block_mask.seq_lengths[1] >= kv_len
        remedy = (f"crop it with block_mask._adjust({q_len}, {kv_len}) (exact, the upper-left corner) or rebuild it "
                  "with create_block_mask") if larger else "rebuild it with create_block_mask"
        raise ValueError(f"block_mask was built for Q_LEN={block_mask.seq_lengths[0]}, KV_LEN={block_mask.seq_lengths[1]} "
                         f"but query has Lq={q_len} and key has Lkv={kv_len}; {remedy}")
    mask_batch, mask_heads = block_mask.shape[:2]
    batch, q_heads = query.shape[:2]
    if 1 < mask_batch < batch:
        raise ValueError(f"block_mask has batch size {mask_batch}; expected 1 (broadcast) or at least query's "
                         f"B={batch}")
    if 1 < mask_heads < q_heads:
        raise ValueError(f"block_mask has {mask_heads} heads; expected 1 (broadcast) or at least query's Hq={q_heads}")
    if mask_batch > batch or mask_heads > q_heads:
        # As FlexAttention: query batch b / head h reads the mask's entry b % B_mask / h % H_mask, here the
        # first B / Hq entries (one sliced mask per mask and shape, whose mask_mod is the original).
        rows, heads = min(mask_batch, batch), min(mask_heads, q_heads)
        block_mask = block_mask.derived(f"leading_{rows}x{heads}", lambda: block_mask[:rows, :heads])
    if block_mask.device != query.device:
        block_mask = block_mask.to(query.device)
    if torch.compiler.is_compiling():  # value checks read the device; a compiled graph cannot (see README)
        return block_mask
    return block_mask.validate()  # once per mask (cached on it): lists inside the tile grid


def _validate_mod_devices(mod: Optional[Callable], what: str, device: torch.device) -> None:
    if mod is None:
        return
    if not callable(mod):
        raise TypeError(f"{what} must be callable or None, got {type(mod).__name__}")
    for tensor in captured_tensors(mod):
        if tensor.device != device:
            raise ValueError(f"{what} {mod_name(mod)!r} captures a tensor on {tensor.device} "
                             f"(shape {tuple(tensor.shape)}) but query is on {device}; move it to {device}")


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
    _validate_tensors(query, key, value, enable_gqa)
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
    block_mask = _validate_block_mask(block_mask, query, key)
    key, value = broadcast_kv_batch(key, query.shape[0]), broadcast_kv_batch(value, query.shape[0])
    compiling = torch.compiler.is_compiling()
    if not compiling:  # (closure walks and a probe call; under torch.compile the kernels check the tensors)
        _validate_mod_devices(score_mod, "score_mod", query.device)
        if score_mod is not None:
            # Every backend, even where no tile would run the mod; scores are float64 for float64 inputs.
            score_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
            check_score_result_type(score_mod, query.device, score_dtype)
        # Once per mask and device: a mask's mask_mod and what it captures are fixed when it is built.
        block_mask.derived(f"mask_mod_on_{query.device}",
                           lambda: _validate_mod_devices(block_mask.mask_mod, "block_mask.mask_mod", query.device))

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

    from .kernels.attention.configs import FORWARD_CONFIGS

    try:
        replace(FORWARD_CONFIGS[0], **{name: value})
    except ValueError as error:
        raise ValueError(f"kernel_options[{key!r}]={value!r}: {error}") from error


def _flex_config(tiles: dict, query: torch.Tensor, value: torch.Tensor, block_mask: BlockMask):
    """The forward ``KernelConfig``: the heuristic's, with the requested tile settings."""
    from dataclasses import replace

    from .kernels.attention.configs import default_config

    base = default_config(query.shape[-1], value.shape[-1], query.dtype, block_mask.BLOCK_SIZE, query.shape[2])
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
    kwargs = dict(score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa, backend=backend)
    out, lse = _flex_forward(query, key, value, tiles, **kwargs) if tiles else (None, None)
    if out is None:
        out, lse = attention(query, key, value, return_lse=True, **kwargs)
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


def _flex_forward(query, key, value, tiles: dict, *, score_mod, block_mask, scale, enable_gqa, backend):
    """The forward kernel with the requested tiles, or (None, None) where ``attention`` should run instead:
    on the torch backend (no tiles there), for score_mods the kernels cannot compile, and for calls
    that need gradients (the autograd path uses the tuned or heuristic config; warned once)."""
    _validate_tensors(query, key, value, enable_gqa)
    chosen = choose_backend(backend, query.device)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if chosen == "torch" or query.dtype == torch.float64 or (
            score_mod is not None and score_mod_fallback_reason(score_mod, False) is not None):
        return None, None  # attention() runs it (or raises its error for float64 on a Triton backend)
    if needs_grad:
        if "grad" not in _TILES_WARNED:
            _TILES_WARNED.add("grad")
            warnings.warn("kernel_options tile settings apply to calls that need no gradient; this call uses the "
                          "tuned or heuristic forward config", UserWarning, stacklevel=3)
        return None, None
    if block_mask is None:
        block_mask = full_block_mask(1, 1, query.shape[2], key.shape[2], query.device)
    block_mask = _validate_block_mask(block_mask, query, key)
    config = _flex_config(tiles, query, value, block_mask)
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    _validate_mod_devices(score_mod, "score_mod", query.device)
    _validate_mod_devices(block_mask.mask_mod, "block_mask.mask_mod", query.device)
    from .kernels.attention.forward_launch import attention_forward

    key, value = broadcast_kv_batch(key, query.shape[0]), broadcast_kv_batch(value, query.shape[0])
    return attention_forward(query, key, value, block_mask, score_mod=score_mod, scale=float(scale),
                             interpret=chosen == "interpret", config=config)


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
    _validate_mod_devices(mask_mod, "mask_mod", query.device)
    _validate_mod_devices(score_mod, "score_mod", query.device)
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
