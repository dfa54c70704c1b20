"""Launching the decode kernels: packing, split count, config, arguments, and the combine step.

Entry points (which calls take the decode kernel is the caller's decision: ``dispatch.py``; the
tuned config comes from the caller too, as ``choose_config``: ``kernels.entry``):

- ``decode_attention``: the split-KV decode kernel on contiguous K/V, same inputs and results as
  the prefill forward (meant for short queries: ``configs.MAX_DECODE_Q_LEN``).
- ``prepare_decode`` then ``DecodeLaunch.run``: the same, planned once and run many times (``paged.py``
  plans ``paged_attention()`` calls this way: the same kernel reading K/V through the page table, with
  the mask moved to logical positions, ``masks/paged.py``).

``plan_decode`` holds every launch decision (heads per program, row tiles, splits, config), so tests
and benchmarks can see what a call will do without running it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from ...masks.block_mask import BlockMask
from ..attention.blocks import LOG2_E
from ..attention.configs import MAX_GRID_X, MAX_GRID_YZ, KernelConfig, cdiv, padded_head_dim
from ..attention.tiling import dot_precision
from ..host import (
    MaskPlan,
    fast_tanh,
    layout_arguments,
    needs_64bit_layout,
    plan_mask,
    score_captured,
    strides,
    trace_score,
)
from ..jit import functions
from ..jit.modules import launch
from ..targets import REFERENCE, device_target
from .configs import (
    choose_splits,
    default_decode_config,
    fit_decode,
    multiprocessor_count,
    needs_64bit_rows,
)

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
        """``(row tiles x head tiles, splits, 1)`` for ``num_q_blocks`` mask block rows of ``batch`` x
        ``q_heads``: axis 0 takes 2**31 - 1 programs, so any batch launches (``kernel.py``'s docstring
        says why the splits go on axis 1). Raises ``ValueError`` past CUDA's grid limits."""
        programs = num_q_blocks * self.row_tiles * (batch * q_heads // self.heads_per_tile)
        if programs > MAX_GRID_X:
            raise ValueError(f"decode launch of {programs} programs (batch {batch} x {q_heads} query heads / "
                             f"{self.heads_per_tile} per program x {num_q_blocks * self.row_tiles} row tiles) "
                             f"is more than grid axis 0 takes ({MAX_GRID_X}); split the batch")
        if self.num_splits > MAX_GRID_YZ:
            raise ValueError(f"num_splits = {self.num_splits} is more than grid axis 1 takes ({MAX_GRID_YZ})")
        return (programs, self.num_splits, 1)


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


def decode_mods(block_mask: BlockMask, score_mod: Optional[Callable], mask_plan: Optional[MaskPlan] = None, *,
                dtype: Optional[torch.dtype] = None, interpret: bool = True, target=None):
    """(mask plan, traced score_mod, generated functions) of a decode launch; ``mods.key`` is the
    structure class in its tuning key.

    dtype / interpret / target: the launch's input dtype, whether it runs under the interpreter, and its
    ``kernels.targets.Target`` (None: this process's GPU vendor): a score_mod compiled for NVIDIA with
    16-bit inputs uses the hardware ``tanh.approx.f32`` (``host.fast_tanh``), as in the prefill kernels.
    Without a dtype (or without a score_mod) the functions and their key are the exact ones."""
    mask_plan = mask_plan or plan_mask(block_mask)
    score_traced = trace_score(score_mod)
    hardware_tanh = score_traced is not None and dtype is not None and fast_tanh(dtype, interpret, target)
    return mask_plan, score_traced, functions.mod_functions(mask_plan.traced, score_traced, mask_mode=mask_plan.mode,
                                                            fast_tanh=hardware_tanh)


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
    split = plan.num_splits > 1
    arguments = dict(
        Q=query, K=key, V=value, Out=out, Lse=lse, PartOut=part_out, PartLse=part_lse,
        page_table=page_table if paged else lse, kv_lens=kv_lens if paged else lse,
        **strides("q", query, "bhmd"), **strides("k", key, "bhnd"), **strides("v", value, "bhnd"),
        **strides("o", out, "bhmd"), stride_lse_b=lse.stride(0), stride_lse_h=lse.stride(1),
        stride_page_b=page_table.stride(0) if paged else 0,
        **layout,
        q_len=q_len, kv_len=kv_len, num_q_heads=q_heads, gqa_groups=q_heads // key.shape[1],
        row_programs=block_mask.num_blocks[0] * plan.row_tiles,  # grid axis 0 per head tile (DecodePlan.grid)
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
        # 64-bit offsets only where a product can pass 2**31 (else 32-bit address math, as small launches want).
        ROW_OFFSETS_64=needs_64bit_rows(query, out, key, value, part_out if split else None, paged=paged),
        LAYOUT_OFFSETS_64=needs_64bit_layout(layout),
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


class DecodeLaunch:
    """A planned decode launch: mods, ``DecodePlan``, captured tuples and, when preallocated, the split
    partials; ``run(query, key, value)`` only builds arguments and launches (no device read, no allocation
    but its outputs when the partials are preallocated), so the same object serves every layer of a step
    and every replay of a CUDA graph that captured it. Made by ``prepare_decode``."""

    def __init__(self, block_mask: BlockMask, *, score_mod, scale: float, interpret: bool, page_table, kv_lens,
                 plan: DecodePlan, mask_plan: MaskPlan, score_traced, mods, target, device: torch.device,
                 q_shape: Tuple[int, int, int], head_dim_v: int, preallocate: bool):
        self.block_mask, self.score_mod, self.scale, self.interpret = block_mask, score_mod, scale, interpret
        self.page_table, self.kv_lens, self.plan, self.mods, self.target = page_table, kv_lens, plan, mods, target
        self.mask_captured = mask_plan.captured(device)
        self.score_captured = score_captured(score_traced, device)
        self.partials = self.new_partials(q_shape, head_dim_v, device) if preallocate else None
        self._launches: Dict[tuple, list] = {}

    def new_partials(self, q_shape: Tuple[int, int, int], head_dim_v: int, device: torch.device):
        """Float32 partial outputs [S, B, Hq, Lq, Dv] and base-2 LSEs [S, B, Hq, Lq] (None with one split)."""
        splits = self.plan.num_splits
        if splits == 1:
            return None
        return (torch.empty(splits, *q_shape, head_dim_v, dtype=torch.float32, device=device),
                torch.empty(splits, *q_shape, dtype=torch.float32, device=device))

    def run(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """out [B, Hq, Lq, Dv] (query dtype) and lse [B, Hq, Lq] float32 of query [B, Hq, Lq, D] over K/V
        (contiguous ``[B, Hkv, L, D]`` or pages ``[num_pages, Hkv, page_size, D]``, as prepared)."""

        batch, q_heads, q_len, _ = query.shape
        head_dim_v, device = value.shape[3], query.device
        out = torch.empty(batch, q_heads, q_len, head_dim_v, dtype=query.dtype, device=device)
        lse = torch.empty(batch, q_heads, q_len, dtype=torch.float32, device=device)
        tensors = {"query": query, "key": key, "value": value, "out": out, "lse": lse}
        # Every layer of a step has the same shapes and strides: the arguments are built once per layout
        # and only the tensors are put in (the host time between a step's launches is this loop's).
        signature = (query.shape, query.stride(), key.shape, key.stride(), value.shape, value.stride(), query.dtype,
                     key.dtype, device)
        launches = self._launches.get(signature)
        if launches is None:
            launches = self._build(tensors)
            if self.partials is not None or self.plan.num_splits == 1:  # no per-call partials inside
                self._launches[signature] = launches
        for kernel, grid, named, roles, options in launches:
            launch(kernel, grid, {**named, **{name: tensors[role] for name, role in roles}}, interpret=self.interpret,
                   device=device, **options)
        return out, lse

    def _build(self, tensors: Dict[str, torch.Tensor]) -> list:
        """The launches of one call as (kernel, grid, named arguments, [(argument name, per-call tensor role)],
        launch options): the named arguments hold everything but the per-call tensors."""
        from .kernel import decode_combine_kernel, decode_split_kernel

        query, key, value, out, lse = (tensors[role] for role in ("query", "key", "value", "out", "lse"))
        batch, q_heads, q_len, _ = query.shape
        head_dim_v, device = value.shape[3], query.device
        plan = self.plan
        partials = self.partials or self.new_partials((batch, q_heads, q_len), head_dim_v, device)
        part_out, part_lse = partials or (out, lse)  # unused by the kernel when NUM_SPLITS == 1
        arguments, constexprs = split_kernel_arguments(
            query, key, value, out, lse, part_out, part_lse, self.block_mask, plan, scale=self.scale,
            page_table=self.page_table, kv_lens=self.kv_lens, mask_captured=self.mask_captured,
            score_captured=self.score_captured, mods=self.mods, interpret=self.interpret, target=self.target)
        config = plan.config
        launches = [(decode_split_kernel, plan.grid(self.block_mask.num_blocks[0], batch, q_heads),
                     {**arguments, **constexprs},
                     dict(num_warps=config.num_warps, num_stages=config.num_stages, options=config.amd_options))]
        if partials is not None:
            arguments, constexprs, num_warps = combine_kernel_arguments(part_out, part_lse, out, lse, self.target)
            launches.append((decode_combine_kernel, (batch * q_heads * q_len,), {**arguments, **constexprs},
                             dict(num_warps=num_warps, num_stages=1)))
        by_identity = {id(tensor): role for role, tensor in tensors.items()}
        return [(kernel, grid, named, [(name, by_identity[id(value)]) for name, value in named.items()
                                       if id(value) in by_identity], options)
                for kernel, grid, named, options in launches]


def prepare_decode(query: torch.Tensor, kv_heads: int, head_dim_v: int, block_mask: BlockMask, *,
                   score_mod: Optional[Callable], scale: float, interpret: bool,
                   page_table: Optional[torch.Tensor] = None, kv_lens: Optional[torch.Tensor] = None,
                   config: Optional[KernelConfig] = None, num_splits: Optional[int] = None,
                   mask_plan: Optional[MaskPlan] = None, choose_config: Optional[DecodeChooser] = None,
                   preallocate: bool = False) -> DecodeLaunch:
    """Every decision of a decode launch for queries shaped like ``query`` [B, Hq, Lq, D] (only its shape,
    dtype and device are read): the mods' functions, the ``DecodePlan`` (config / num_splits forced when
    given; else ``plan_decode``'s, with ``choose_config(default, splits, structure)`` giving the tuned
    config) and, with ``preallocate``, the split partials. K/V are paged when ``page_table`` [B, pages per
    sequence] (int32) and ``kv_lens`` [B] are given. mask_plan: how the predicate reaches the kernel, when
    the caller knows (default ``plan_mask``)."""
    device = query.device
    target = None if interpret else device_target(device)
    mask_plan, score_traced, mods = decode_mods(block_mask, score_mod, mask_plan, dtype=query.dtype,
                                                interpret=interpret, target=target)
    tuned = None
    if choose_config is not None:
        def tuned(default: KernelConfig, splits: int) -> KernelConfig:
            return choose_config(default, splits, mods.key)

    plan = plan_decode(query, kv_heads, head_dim_v, block_mask, config=config, num_splits=num_splits, tuned=tuned,
                       target=target)
    return DecodeLaunch(block_mask, score_mod=score_mod, scale=scale, interpret=interpret, page_table=page_table,
                        kv_lens=kv_lens, plan=plan, mask_plan=mask_plan, score_traced=score_traced, mods=mods,
                        target=target, device=device, q_shape=tuple(query.shape[:3]), head_dim_v=head_dim_v,
                        preallocate=preallocate)


def run_decode(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: BlockMask, *,
               score_mod: Optional[Callable], scale: float, interpret: bool,
               page_table: Optional[torch.Tensor] = None, kv_lens: Optional[torch.Tensor] = None,
               config: Optional[KernelConfig] = None, num_splits: Optional[int] = None,
               mask_plan: Optional[MaskPlan] = None,
               choose_config: Optional[DecodeChooser] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """One decode launch (split kernel, then combine when split): ``prepare_decode`` then its ``run``.
    query [B, Hq, Lq, D]; K/V contiguous-by-sequence ``[B, Hkv, L, D]``, or pages ``[num_pages, Hkv,
    page_size, D]`` with ``page_table`` and ``kv_lens``. Returns out [B, Hq, Lq, Dv] (input dtype) and
    lse [B, Hq, Lq] float32."""
    prepared = prepare_decode(query, key.shape[1], value.shape[3], block_mask, score_mod=score_mod, scale=scale,
                              interpret=interpret, page_table=page_table, kv_lens=kv_lens, config=config,
                              num_splits=num_splits, mask_plan=mask_plan, choose_config=choose_config)
    return prepared.run(query, key, value)


def decode_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: BlockMask, *,
                     score_mod: Optional[Callable], scale: float, interpret: bool,
                     config: Optional[KernelConfig] = None, num_splits: Optional[int] = None,
                     choose_config: Optional[DecodeChooser] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The decode kernel on contiguous K/V: query [B, Hq, Lq, D], key [B, Hkv, Lkv, D], value [B, Hkv,
    Lkv, Dv] (validated by ``attention``). Returns out [B, Hq, Lq, Dv] (input dtype), lse [B, Hq, Lq]."""
    return run_decode(query, key, value, block_mask, score_mod=score_mod, scale=scale, interpret=interpret,
                      config=config, num_splits=num_splits, choose_config=choose_config)
