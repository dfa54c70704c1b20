"""Launching the decode kernels: packing, split count, config, arguments, and the combine step.

Entry points (which calls take the decode kernel is the caller's decision: ``dispatch.py``; the
tuned config comes from the caller too, as ``choose_config``: ``kernels.entry``):

- ``decode_attention``: the split-KV decode kernel on contiguous K/V, same inputs and results as
  the prefill forward (meant for short queries: ``configs.MAX_DECODE_Q_LEN``).
- ``paged_problem`` then ``run_decode``: ``paged_attention()`` (any Lq), the same kernel reading K/V
  through the page table, with the mask moved to logical positions (``masks/paged.py``).

``plan_decode`` holds every launch decision (heads per program, row tiles, splits, config), so tests
and benchmarks can see what a call will do without running it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Tuple

import torch

from ...masks.block_mask import BlockMask
from ..attention.blocks import LOG2_E
from ..attention.configs import KernelConfig, cdiv, padded_head_dim
from ..attention.tiling import dot_precision
from ..host import MaskPlan, layout_arguments, plan_mask, score_captured, strides, trace_score, traced_mask_plan
from ..jit import functions
from ..jit.modules import launch
from ..targets import REFERENCE, device_target
from .configs import choose_splits, default_decode_config, fit_decode, multiprocessor_count

DECODE_LAYOUT = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")

# choose_config(default, num_splits, structure) -> the config to launch with ``num_splits`` splits;
# ``structure``: the mods' structure class (``ModFunctions.key``) for the tuning key
# (``kernels.tuned.decode_chooser`` makes one).
DecodeChooser = Callable[[KernelConfig, int, str], KernelConfig]


@dataclass(frozen=True)
class DecodePlan:
    """What one decode launch does.

    heads_per_tile: query heads sharing a program (the GQA group when the mask is the same for all
    heads, else 1); packed_rows: rows of one mask block row (heads x query rows);
    row_tiles: programs per mask block row; num_splits: programs per KV row; config: tiles, warps, stages.
    """

    heads_per_tile: int
    packed_rows: int
    row_tiles: int
    num_splits: int
    config: KernelConfig

    def grid(self, num_q_blocks: int, batch: int, q_heads: int) -> Tuple[int, int, int]:
        return (self.num_splits, num_q_blocks * self.row_tiles, batch * q_heads // self.heads_per_tile)


def max_visits(block_mask: BlockMask) -> int:
    """At most how many non-empty blocks one row of ``block_mask`` holds (from its launch plan: no device read)."""
    plan = block_mask.launch_plan
    return plan.max_partial_blocks + plan.max_full_blocks


@functools.lru_cache(maxsize=None)
def _sm_count(device_type: str, index: Optional[int]) -> int:
    return multiprocessor_count(torch.device(device_type, index) if index is not None else torch.device(device_type))


def plan_decode(query: torch.Tensor, kv_heads: int, head_dim_v: int, block_mask: BlockMask, *,
                config: Optional[KernelConfig] = None, num_splits: Optional[int] = None,
                tuned: Optional[Callable[[KernelConfig, int], KernelConfig]] = None,
                sm_count: Optional[int] = None, target=None) -> DecodePlan:
    """The launch decisions for ``query`` [B, Hq, Lq, D] over ``block_mask`` (see ``DecodePlan``).

    num_splits: force a split count (None: ``configs.choose_splits`` from the SM count and the
    mask's non-empty blocks). tuned(default, splits): the tuning cache's winner, if any. sm_count:
    the SMs to fill (default: the query's device; a target's ``sm_count`` for another one). target: the
    ``kernels.targets.Target`` whose tables to read (default: the query's device's; sm_80's on CPU).
    """
    batch, q_heads, q_len, head_dim = query.shape
    groups = q_heads // kv_heads
    q_bs, kv_bs = block_mask.BLOCK_SIZE
    heads_per_tile = groups if block_mask.shape[1] == 1 else 1
    rows = min(q_bs, q_len) * heads_per_tile
    target = target if target is not None else device_target(query.device)
    chosen = config or default_decode_config(head_dim, head_dim_v, query.dtype, rows, target=target)
    fitted = fit_decode(chosen, rows, kv_bs)
    row_tiles = cdiv(rows, fitted.BLOCK_M)
    programs = block_mask.num_blocks[0] * row_tiles * batch * q_heads // heads_per_tile
    if num_splits is None:
        sm_count = sm_count or _sm_count(query.device.type, query.device.index)
        num_splits = choose_splits(programs, max(1, max_visits(block_mask)), sm_count)
    if config is None and tuned is not None:
        fitted = fit_decode(tuned(chosen, num_splits), rows, kv_bs)
        row_tiles = cdiv(rows, fitted.BLOCK_M)
    return DecodePlan(heads_per_tile, rows, row_tiles, num_splits, fitted)


def decode_mods(block_mask: BlockMask, score_mod: Optional[Callable], mask_plan: Optional[MaskPlan] = None):
    """(mask plan, traced score_mod, generated functions) of a decode launch; ``mods.key`` is the
    structure class in its tuning key."""
    mask_plan = mask_plan or plan_mask(block_mask)
    score_traced = trace_score(score_mod)
    return mask_plan, score_traced, functions.mod_functions(mask_plan.traced, score_traced, mask_mode=mask_plan.mode)


def split_kernel_arguments(query, key, value, out, lse, part_out, part_lse, block_mask: BlockMask, plan: DecodePlan, *,
                           scale: float, page_table: Optional[torch.Tensor], kv_lens: Optional[torch.Tensor],
                           mask_captured: tuple, score_captured: tuple, mods, interpret: bool, target=None):
    """(runtime arguments, constexprs) of ``decode_split_kernel`` by name, for a launch or an AOT build.

    K/V are ``[B, Hkv, L, D]``, or pages ``[num_pages, Hkv, page_size, D]`` with ``page_table``;
    target: the ``kernels.targets.Target`` compiled for (its dot precision)."""
    q_len, q_heads, head_dim = query.shape[2], query.shape[1], query.shape[3]
    head_dim_v = value.shape[3]
    paged = page_table is not None
    kv_len = page_table.shape[1] * key.shape[2] if paged else key.shape[2]
    q_bs, kv_bs = block_mask.BLOCK_SIZE
    config = plan.config
    layout = layout_arguments(block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.full_kv_num_blocks,
                              block_mask.full_kv_indices, block_mask.kv_num_blocks.device, DECODE_LAYOUT, "m")
    arguments = dict(
        Q=query, K=key, V=value, Out=out, Lse=lse, PartOut=part_out, PartLse=part_lse,
        page_table=page_table if paged else lse, kv_lens=kv_lens if paged else lse,
        **strides("q", query, "bhmd"), **strides("k", key, "bhnd"), **strides("v", value, "bhnd"),
        **strides("o", out, "bhmd"), stride_lse_b=lse.stride(0), stride_lse_h=lse.stride(1),
        stride_page_b=page_table.stride(0) if paged else 0,
        **layout,
        q_len=q_len, kv_len=kv_len, num_q_heads=q_heads, gqa_groups=q_heads // key.shape[1],
        scale_log2=scale * LOG2_E, score_scale=scale,
        mask_captured=mask_captured, score_captured=score_captured,
    )
    constexprs = dict(
        MASK_FN=mods.mask_fn, SCORE_FN=mods.score_fn,
        HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v,
        BLOCK_D=padded_head_dim(head_dim), BLOCK_DV=padded_head_dim(head_dim_v),
        BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_N,
        Q_BLOCK_SIZE=q_bs, KV_BLOCK_SIZE=kv_bs,
        KV_TILES_PER_BLOCK=cdiv(kv_bs, config.BLOCK_N), ROW_TILES_PER_BLOCK=plan.row_tiles,
        HEADS_PER_TILE=plan.heads_per_tile, NUM_SPLITS=plan.num_splits,
        PAGED=paged, PAGE_SIZE=key.shape[2] if paged else 1,
        # Paged: the last page of a sequence is ragged (kv_lens), so keys are always bounds-checked.
        CHECK_KV_BOUNDS=paged or (kv_len % kv_bs != 0) or (kv_bs % config.BLOCK_N != 0),
        DOT_PRECISION=dot_precision(query.dtype, target),
        UPCAST_DOT=bool(interpret and query.dtype == torch.bfloat16),
    )
    return arguments, constexprs


def combine_kernel_arguments(part_out: torch.Tensor, part_lse: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                             target=None):
    """(runtime arguments, constexprs, num_warps) of ``decode_combine_kernel``; part_out float32
    [S, B, Hq, Lq, Dv] and part_lse [S, B, Hq, Lq], contiguous; target: the ``kernels.targets.Target``
    whose warps to use (None: sm_80's; AMD wavefronts are 64 wide, so half as many)."""
    splits, batch, q_heads, q_len, head_dim_v = part_out.shape
    arguments = dict(PartOut=part_out, PartLse=part_lse, Out=out, Lse=lse,
                     **strides("o", out, "bhmd"), stride_lse_b=lse.stride(0), stride_lse_h=lse.stride(1),
                     num_rows=batch * q_heads * q_len, q_len=q_len, num_q_heads=q_heads)
    constexprs = dict(HEAD_DIM_V=head_dim_v, BLOCK_DV=padded_head_dim(head_dim_v), NUM_SPLITS=splits,
                      BLOCK_SPLITS=max(2, 1 << (splits - 1).bit_length()))
    return arguments, constexprs, (target or REFERENCE).tables.combine_num_warps(head_dim_v)


class PagedProblem(NamedTuple):
    """A ``paged_attention`` call in the terms of ``run_decode``: the BlockMask over logical positions
    (``masks.paged.paged_block_mask``), the score_mod at logical positions, the mask plan when known
    without tracing the user's mask (None: ``plan_mask``), and the page table and lengths, contiguous."""

    block_mask: BlockMask
    score_mod: Optional[Callable]
    mask_plan: Optional[MaskPlan]
    page_table: torch.Tensor
    kv_lens: torch.Tensor


def paged_problem(query: torch.Tensor, key_cache: torch.Tensor, page_table: torch.Tensor, kv_lens: torch.Tensor, *,
                  mask_mod: Optional[Callable], score_mod: Optional[Callable]) -> PagedProblem:
    """``paged_attention``'s query [B, Hq, Lq, D] over pages ``key_cache`` [num_pages, Hkv, page_size, D]
    (inputs validated by the API) as a ``PagedProblem``; see ``masks/paged.py`` for the logical positions.

    The default causal mask takes the closed-form BlockMask (``masks.paged.causal_paged_block_mask``) and
    needs no device read: its launch plan (hence the split count) comes from the page table's capacity."""
    from ...masks.paged import logical_score_mod, paged_block_mask
    from ...masks.tracing import trace_mask_mod

    q_len, capacity = query.shape[2], page_table.shape[1] * key_cache.shape[2]
    block_mask = paged_block_mask(mask_mod, kv_lens, q_len, query.shape[1], capacity)
    mask_plan = None
    if mask_mod is None and q_len <= block_mask.BLOCK_SIZE[0]:
        mask_plan = traced_mask_plan(trace_mask_mod(block_mask.mask_mod))
    return PagedProblem(block_mask, logical_score_mod(score_mod, kv_lens, q_len), mask_plan,
                        page_table.contiguous(), kv_lens.contiguous())


def run_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: BlockMask, *,
               score_mod: Optional[Callable], scale: float, interpret: bool,
               page_table: Optional[torch.Tensor] = None, kv_lens: Optional[torch.Tensor] = None,
               config: Optional[KernelConfig] = None, num_splits: Optional[int] = None,
               mask_plan: Optional[MaskPlan] = None,
               choose_config: Optional[DecodeChooser] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """One decode launch (split kernel, then combine when split): query [B, Hq, Lq, D]; K/V
    contiguous-by-sequence ``[B, Hkv, L, D]``, or pages ``[num_pages, Hkv, page_size, D]`` when
    ``page_table`` [B, pages per sequence] (int32) and ``kv_lens`` [B] are given (``paged_problem``).
    Returns out [B, Hq, Lq, Dv] (input dtype) and lse [B, Hq, Lq] float32.

    config / num_splits: force them (None: ``plan_decode``'s, with ``choose_config(default, splits,
    structure)`` giving the config when passed). mask_plan: how the predicate reaches the kernel,
    when the caller knows (default ``plan_mask``)."""
    from .kernel import decode_combine_kernel, decode_split_kernel

    batch, q_heads, q_len, head_dim = query.shape
    kv_heads, head_dim_v = key.shape[1], value.shape[3]
    device = query.device

    mask_plan, score_traced, mods = decode_mods(block_mask, score_mod, mask_plan)
    tuned = None
    if choose_config is not None:
        def tuned(default: KernelConfig, splits: int) -> KernelConfig:
            return choose_config(default, splits, mods.key)

    target = None if interpret else device_target(device)
    plan = plan_decode(query, kv_heads, head_dim_v, block_mask, config=config, num_splits=num_splits, tuned=tuned,
                       target=target)
    config = plan.config
    splits = plan.num_splits

    out = torch.empty(batch, q_heads, q_len, head_dim_v, dtype=query.dtype, device=device)
    lse = torch.empty(batch, q_heads, q_len, dtype=torch.float32, device=device)
    if splits > 1:
        part_out = torch.empty(splits, batch, q_heads, q_len, head_dim_v, dtype=torch.float32, device=device)
        part_lse = torch.empty(splits, batch, q_heads, q_len, dtype=torch.float32, device=device)
    else:
        part_out, part_lse = out, lse  # unused by the kernel when NUM_SPLITS == 1
    arguments, constexprs = split_kernel_arguments(
        query, key, value, out, lse, part_out, part_lse, block_mask, plan, scale=scale, page_table=page_table,
        kv_lens=kv_lens, mask_captured=mask_plan.captured(device), score_captured=score_captured(score_traced, device),
        mods=mods, interpret=interpret, target=target)
    grid = plan.grid(block_mask.num_blocks[0], batch, q_heads)
    launch(decode_split_kernel, grid, {**arguments, **constexprs}, interpret=interpret, device=device,
           num_warps=config.num_warps, num_stages=config.num_stages, options=config.amd_options)
    if splits > 1:
        arguments, constexprs, num_warps = combine_kernel_arguments(part_out, part_lse, out, lse, target)
        launch(decode_combine_kernel, (batch * q_heads * q_len,), {**arguments, **constexprs}, interpret=interpret,
               device=device, num_warps=num_warps, num_stages=1)
    return out, lse


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: BlockMask, *,
                     score_mod: Optional[Callable], scale: float, interpret: bool,
                     config: Optional[KernelConfig] = None, num_splits: Optional[int] = None,
                     choose_config: Optional[DecodeChooser] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The decode kernel on contiguous K/V: query [B, Hq, Lq, D], key [B, Hkv, Lkv, D], value [B, Hkv,
    Lkv, Dv] (validated by ``attention``). Returns out [B, Hq, Lq, Dv] (input dtype), lse [B, Hq, Lq]."""
    return run_decode(query, key, value, block_mask, score_mod=score_mod, scale=scale, interpret=interpret,
                      config=config, num_splits=num_splits, choose_config=choose_config)
