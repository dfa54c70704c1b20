"""Launching the forward kernel: kernel choice, config, strides, allocation and grid.

``attention_forward`` is the one entry point. It decides how the mask predicate reaches the
kernel (inlined graph, bitmask fallback, or none), gets the generated kernel from ``codegen``,
picks a ``KernelConfig`` that fits the BlockMask, and launches it compiled (CUDA) or under the
Triton interpreter (CPU tensors).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch

from ...masks.block_mask import BlockMask
from ...masks.evaluate import mod_name
from ...masks.tracing import TracedMod, UntraceableModError, trace_mask_mod, trace_score_mod
from ..jit import functions as codegen
from . import fallback
from .configs import KernelConfig, default_config, padded_head_dim

LOG2_E = 1.4426950408889634
# Passed explicitly to every compile: Triton 3.10 flips its default to off, and the softmax wants
# ``scores * scale - shift`` as one FMA per score.
ENABLE_FP_FUSION = True
# Offsets at or past this need 64 bits.
INT32_LIMIT = 2 ** 31


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class MaskPlan:
    """How the predicate reaches the kernel: the spec's mask part and its captured tensors."""

    mode: str
    traced: Optional[TracedMod]
    tensors: List[torch.Tensor]


def plan_mask(block_mask: BlockMask) -> MaskPlan:
    """Inline the mask_mod when it traces and compiles; else the exact bitmask fallback (warns once)."""
    if int(block_mask.kv_num_blocks.max()) == 0:
        # No partial block anywhere: the predicate would never run.
        return MaskPlan(codegen.MASK_NONE, None, [])
    mask_mod = block_mask.mask_mod
    try:
        traced = trace_mask_mod(mask_mod)
        codegen.check_graph(traced)
    except (UntraceableModError, codegen.CodegenError) as error:
        fallback.warn_fallback(mask_mod, getattr(error, "operation", str(error)))
        bits, offsets = fallback.partial_block_bits(block_mask)
        return MaskPlan(codegen.MASK_BITMASK, None, [bits, offsets])
    return MaskPlan(codegen.MASK_TRACED, traced, list(traced.captured))


def scaled_scores(score, b, h, q_idx, kv_idx):
    """The identity score_mod: stands in for "no score_mod" when the scale is not positive."""
    return score


def trace_score(score_mod: Optional[Callable], scale: float = 1.0) -> Optional[TracedMod]:
    """The traced score_mod (None for none); a score_mod has no fallback, so failing raises.

    Without a score_mod the kernels take the row max of the raw ``Q K^T`` and scale afterwards,
    which needs ``scale > 0``; for ``scale <= 0`` they get the identity score_mod instead (scaled
    scores, unit factors)."""
    if score_mod is None:
        if scale > 0:
            return None
        score_mod = scaled_scores
    try:
        traced = trace_score_mod(score_mod)
        codegen.check_graph(traced)
    except (UntraceableModError, codegen.CodegenError) as error:
        raise TypeError(f"score_mod {mod_name(score_mod)!r} cannot be compiled into the Triton kernel: {error}. "
                        "Rewrite it with tensor operators and torch functions on its arguments, or use "
                        "backend='torch'.") from error
    return traced


def _captured_args(params, tensors: List[torch.Tensor], device: torch.device) -> list:
    """Pointer, sizes and strides of each captured tensor, in the generated signature's order."""
    args = []
    for param, tensor in zip(params, tensors):
        if tensor.device != device:
            tensor = tensor.to(device)
        if tensor.dtype == torch.bool:
            tensor = tensor.view(torch.uint8)  # the generated code compares against 0
        if param.rank:
            args.append(tensor)
            args.extend(int(s) for s in tensor.shape)
            args.extend(int(s) for s in tensor.stride())
        else:
            args.append(tensor)
    return args


def _layout(block_mask: BlockMask, device: torch.device):
    """Block lists as int32 contiguous tensors, and strides with 0 on broadcast (size-1) dims."""
    tensors = [t.to(device=device, dtype=torch.int32).contiguous() for t in (
        block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.full_kv_num_blocks, block_mask.full_kv_indices)]
    counts, indices = tensors[0], tensors[1]
    layout_strides = [0 if counts.shape[d] == 1 else counts.stride(d) for d in range(2)] + [counts.stride(2)]
    index_strides = [0 if indices.shape[d] == 1 else indices.stride(d) for d in range(2)] + [indices.stride(2)]
    return tensors, layout_strides, index_strides


def launch_grid(q_len: int, num_q_blocks: int, q_block_size: int, block_m: int, batch_heads: int) -> Tuple[int, int]:
    """``(query tiles, B * Hq)``; tiles that would start past ``q_len`` are not launched."""
    tiles_per_block = _cdiv(q_block_size, block_m)
    last_rows = q_len - (num_q_blocks - 1) * q_block_size
    return ((num_q_blocks - 1) * tiles_per_block + min(tiles_per_block, _cdiv(last_rows, block_m)), batch_heads)


def needs_64bit_rows(*tensors: torch.Tensor) -> bool:
    """Whether ``position * row stride`` can reach 2**31 in any of ``tensors`` ([B, H, L, D] views):
    the largest row offset within one (batch, head) slice, ``(L - 1) * stride(2)``, plus the last
    column's offset. Batch and head offsets are always 64-bit in the kernels."""
    for tensor in tensors:
        if tensor is None or tensor.dim() != 4:
            continue
        reach = (tensor.shape[2] - 1) * abs(tensor.stride(2)) + (tensor.shape[3] - 1) * abs(tensor.stride(3))
        if reach >= INT32_LIMIT:
            return True
    return False


def heavy_tiles_last(block_mask: BlockMask) -> bool:
    """Whether later query block rows visit more KV blocks than earlier ones (causal-like masks).

    Read once per BlockMask (a device sync) and remembered on it, like the tuning key's sparsity."""
    cached = getattr(block_mask, "_heavy_tiles_last", None)
    if cached is not None:
        return cached
    work = (block_mask.kv_num_blocks + block_mask.full_kv_num_blocks).double().flatten(0, -2).mean(0)  # [NQ]
    half = work.shape[0] // 2
    result = bool(half > 0 and float(work[-half:].sum()) > 1.25 * float(work[:half].sum()))
    try:
        block_mask._heavy_tiles_last = result
    except AttributeError:
        pass
    return result


def fast_tanh(dtype: torch.dtype, interpret: bool) -> bool:
    """The hardware ``tanh.approx.f32`` (NVIDIA only) for 16-bit inputs; float32 keeps the exact form."""
    return bool(not interpret and dtype in (torch.float16, torch.bfloat16) and torch.version.hip is None)


def kernel_constexprs(*, head_dim: int, head_dim_v: int, dtype: torch.dtype, block_size: Tuple[int, int],
                      config: KernelConfig, kv_len: int, interpret: bool, row_offsets_64: bool = False,
                      reverse_tiles: bool = False) -> dict:
    """The constexpr arguments of the forward kernel (``forward.CONSTEXPR_NAMES``) for these shapes.

    row_offsets_64: see ``needs_64bit_rows``; reverse_tiles: launch query tiles last-first
    (``heavy_tiles_last``)."""
    q_bs, kv_bs = block_size
    return dict(
        HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v,
        BLOCK_D=padded_head_dim(head_dim), BLOCK_DV=padded_head_dim(head_dim_v),
        BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_N,
        Q_BLOCK_SIZE=q_bs, KV_BLOCK_SIZE=kv_bs,
        Q_TILES_PER_BLOCK=_cdiv(q_bs, config.BLOCK_M), KV_TILES_PER_BLOCK=_cdiv(kv_bs, config.BLOCK_N),
        # Bounds checks on K/V only where a tile can overhang the sequence or its mask block.
        CHECK_KV_BOUNDS=(kv_len % kv_bs != 0) or (kv_bs % config.BLOCK_N != 0),
        # float32 inputs: 3xTF32 dots, float32-accurate on tensor cores (plain TF32 would not be).
        DOT_PRECISION="tf32x3" if dtype == torch.float32 else "tf32",
        # Triton 3.9's interpreter returns garbage for tl.dot on two bf16 operands.
        UPCAST_DOT=bool(interpret and dtype == torch.bfloat16),
        ROW_OFFSETS_64=bool(row_offsets_64),
        HEAVY_TILES_LAST=bool(reverse_tiles),
        FAST_TANH=fast_tanh(dtype, interpret),
    )


def _tuned_config(query, key, value, block_mask: BlockMask, score_mod, scale: float, default: KernelConfig,
                  autotune: Optional[bool]) -> KernelConfig:
    """The cached winner for this call's tuning key, or ``default``; searches only when asked."""
    from ..tuning import search as tuning

    tuning_key = tuning.make_key(query, key, value, block_mask, variant="score" if score_mod is not None else "")
    head_dim, head_dim_v = query.shape[-1], value.shape[-1]
    return tuning.select_config(
        tuning_key, default, autotune=autotune, device=query.device,
        candidates=lambda: tuning.search_space("fwd", tuning_key.capability, head_dim=head_dim, value_dim=head_dim_v,
                                               dtype=query.dtype, block_size=block_mask.BLOCK_SIZE,
                                               q_len=query.shape[2]),
        run=lambda candidate: attention_forward(query, key, value, block_mask, score_mod=score_mod, scale=scale,
                                                interpret=False, config=candidate))


def attention_forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: BlockMask, *,
                      score_mod: Optional[Callable], scale: float, interpret: bool,
                      config: Optional[KernelConfig] = None,
                      autotune: Optional[bool] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernel.

    query [B, Hq, Lq, D], key [B, Hkv, Lkv, D], value [B, Hkv, Lkv, Dv] (validated by ``attention``).
    Returns out [B, Hq, Lq, Dv] in the input dtype and lse [B, Hq, Lq] float32 (natural log).
    ``config``: a ``KernelConfig`` (fitted to the BlockMask here). Without one: the tuned winner
    for this problem's key from the tuning cache, else ``default_config`` at once; a search runs
    only when ``autotune=True`` (or ``TRITON_ATTN_AUTOTUNE=1``), so a first call never stalls.
    """
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads, kv_len, head_dim_v = key.shape[1], key.shape[2], value.shape[3]
    device = query.device
    q_bs, kv_bs = block_mask.BLOCK_SIZE
    num_q_blocks = block_mask.num_blocks[0]

    mask_plan = plan_mask(block_mask)
    score_traced = trace_score(score_mod, scale)
    kernel = codegen.kernel_for(codegen.KernelSpec(mask_plan.mode, mask_plan.traced, score_traced))
    if config is None:
        config = default_config(head_dim, head_dim_v, query.dtype, (q_bs, kv_bs), q_len)
        if not interpret:
            config = _tuned_config(query, key, value, block_mask, score_mod, scale, config, autotune)
    config = config.fitted(q_bs, kv_bs, q_len)

    out = torch.empty(batch, q_heads, q_len, head_dim_v, dtype=query.dtype, device=device)
    lse = torch.empty(batch, q_heads, q_len, dtype=torch.float32, device=device)
    layout, layout_strides, index_strides = _layout(block_mask, device)
    captured = list(mask_plan.tensors) + (list(score_traced.captured) if score_traced is not None else [])

    args = [query, key, value, out, lse,
            *query.stride(), *key.stride(), *value.stride(), *out.stride(), lse.stride(0), lse.stride(1),
            *layout, *layout_strides, *index_strides,
            q_len, kv_len, q_heads, q_heads // kv_heads,
            scale * LOG2_E, scale,
            *_captured_args(kernel.captured, captured, device)]
    constexprs = kernel_constexprs(head_dim=head_dim, head_dim_v=head_dim_v, dtype=query.dtype,
                                   block_size=(q_bs, kv_bs), config=config, kv_len=kv_len, interpret=interpret,
                                   row_offsets_64=needs_64bit_rows(query, key, value, out),
                                   reverse_tiles=heavy_tiles_last(block_mask))
    grid = launch_grid(q_len, num_q_blocks, q_bs, config.BLOCK_M, batch * q_heads)
    if interpret:
        kernel.interpreted()[grid](*args, **constexprs)
    else:
        with torch.cuda.device(device):
            kernel.jit()[grid](*args, **constexprs, num_warps=config.num_warps, num_stages=config.num_stages,
                               enable_fp_fusion=ENABLE_FP_FUSION)
    return out, lse
