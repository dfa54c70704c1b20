"""Launching the backward kernels: configs, checks, layouts, allocation and grids.

``attention_backward`` is the one entry point (``autograd.TritonAttentionFunction.backward``
calls it). It runs, in order, the preprocessing kernel (``delta = rowsum(dO * O) - dLse``), the
dK/dV kernel over the transposed block layout and the dQ kernel over the forward layout
(``backward.py``), compiled on CUDA or under the Triton interpreter on CPU tensors.

``check_backward_supported`` raises *before any kernel runs* (the autograd wrapper calls it
ahead of the forward launch) for what the Triton backward cannot do: gradients with respect to
tensors captured by a score_mod (a learnable bias table), and score_mods without a derivative rule.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, List, Optional, Tuple

import torch

from ...masks.block_mask import BlockMask
from ...masks.closure import captured_tensors
from ...masks.evaluate import mod_name
from ...masks.tracing import UntraceableModError, trace_score_mod
from . import backward
from ..jit import functions as codegen
from ..jit import derivative
from .backward_codegen import BackwardKernels, backward_kernels_for
from .configs import MIN_TILE, KernelConfig, fit_tile, next_power_of_two, padded_head_dim
from .forward_launch import (ENABLE_FP_FUSION, LOG2_E, _captured_args, heavy_tiles_last, kernel_constexprs,
                             launch_grid, needs_64bit_rows, plan_mask, trace_score)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class UnsupportedBackwardError(NotImplementedError):
    """The Triton backward cannot compute a requested gradient (the message says what to do)."""


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BackwardConfig:
    """Tiles of both backward kernels.

    dkdv: ``BLOCK_N`` keys per program (held with their dK/dV accumulators in registers) and
    ``BLOCK_M`` query rows per inner step. dq: ``BLOCK_M`` query rows per program and ``BLOCK_N``
    keys per inner step. max_head_dim: the largest padded head_dim the config is meant for.
    """

    dkdv: KernelConfig
    dq: KernelConfig
    max_head_dim: int

    @property
    def name(self) -> str:
        return f"dkdv_{self.dkdv.name}__dq_{self.dq.name}"

    def fitted(self, q_block_size: int, kv_block_size: int, q_len: int, kv_len: int) -> "BackwardConfig":
        """Tiles shrunk to divide the BlockMask's blocks and to not exceed short sequences."""
        dkdv_n = min(fit_tile(self.dkdv.BLOCK_N, kv_block_size), max(MIN_TILE, next_power_of_two(kv_len)))
        dkdv_m = fit_tile(self.dkdv.BLOCK_M, q_block_size)
        dkdv_n = fit_tile(dkdv_n, kv_block_size)
        return replace(self, dkdv=replace(self.dkdv, BLOCK_M=dkdv_m, BLOCK_N=dkdv_n),
                       dq=self.dq.fitted(q_block_size, kv_block_size, q_len))


# Register budget (255 per thread): the dK/dV program keeps K, V and two float32 accumulators of
# BLOCK_N x head_dim, about 3 * BLOCK_N * D / (32 * warps) registers per thread at 16 bits; the
# dQ program keeps Q, dO and one float32 accumulator. float32 inputs run 3xTF32 dots, whose
# hi/lo operand splits need far more registers: hence 16- and 32-wide tiles for them.
# Registers and spills of every entry are checked ahead of time by tests/test_backward_aot.py.
BACKWARD_CONFIGS: List[BackwardConfig] = [
    # 16-bit inputs
    BackwardConfig(KernelConfig(32, 64, 4, 2), KernelConfig(64, 32, 4, 2), max_head_dim=64),     # main, D <= 64
    BackwardConfig(KernelConfig(32, 64, 8, 2), KernelConfig(64, 32, 8, 2), max_head_dim=128),    # main, D <= 128
    BackwardConfig(KernelConfig(32, 32, 8, 1), KernelConfig(32, 16, 4, 1), max_head_dim=256),    # main, D <= 256
    BackwardConfig(KernelConfig(32, 128, 8, 2), KernelConfig(128, 64, 8, 2), max_head_dim=64),   # larger tiles
    # float32 inputs
    BackwardConfig(KernelConfig(32, 32, 4, 1), KernelConfig(32, 32, 4, 1), max_head_dim=64),     # main fp32, D <= 64
    BackwardConfig(KernelConfig(32, 16, 8, 1), KernelConfig(16, 32, 8, 1), max_head_dim=128),    # main fp32, D <= 128
    # fp32 at D = 256 still spills a few hundred bytes per thread (known; correct, slower).
    BackwardConfig(KernelConfig(16, 16, 8, 1), KernelConfig(16, 16, 8, 1), max_head_dim=256),
]
MAIN_BACKWARD_CONFIGS = {64: BACKWARD_CONFIGS[0], 128: BACKWARD_CONFIGS[1], 256: BACKWARD_CONFIGS[2]}
FLOAT32_BACKWARD_CONFIGS = {64: BACKWARD_CONFIGS[4], 128: BACKWARD_CONFIGS[5], 256: BACKWARD_CONFIGS[6]}
# Entries known to spill registers on sm_80/sm_90 (the AOT test allows these and only these).
SPILLING_CONFIGS = (BACKWARD_CONFIGS[6],)


def default_backward_config(head_dim: int, head_dim_v: int, dtype: torch.dtype, block_size: Tuple[int, int],
                            q_len: int, kv_len: int) -> BackwardConfig:
    """The heuristic config for these shapes, fitted to ``block_size = (Q_BS, KV_BS)``."""
    width = max(padded_head_dim(head_dim), padded_head_dim(head_dim_v))
    table = FLOAT32_BACKWARD_CONFIGS if dtype == torch.float32 else MAIN_BACKWARD_CONFIGS
    base = table[min(size for size in table if size >= width)]
    return base.fitted(block_size[0], block_size[1], q_len, kv_len)


def tuned_backward_config(query, key, value, block_mask: BlockMask, score_mod, default: BackwardConfig,
                          autotune: Optional[bool], run: Callable[[BackwardConfig], object]) -> BackwardConfig:
    """The cached ``bwd`` winner for this call's tuning key (as ``autotune.backward_pair``), else ``default``;
    with tuning on and nothing cached, times the ``bwd`` search space with ``run`` and remembers the winner."""
    from ..tuning import search as tuning

    tuning_key = tuning.make_key(query, key, value, block_mask, kernel="bwd",
                                 variant="score" if score_mod is not None else "")
    tuned = tuning.lookup(tuning_key)
    if tuned is None and tuning.autotune_requested(autotune):
        space = tuning.search_space("bwd", tuning_key.capability, head_dim=query.shape[-1], value_dim=value.shape[-1],
                                    dtype=query.dtype, block_size=block_mask.BLOCK_SIZE, q_len=query.shape[2])
        tuned = tuning.autotuner().tune(tuning_key, space, lambda candidate: run(tuning.backward_pair(candidate)),
                                        device=query.device).best
    # Nothing tuned: the heuristic pair, which need not be a transposed pair like the tuned ones.
    return default if tuned is None else tuning.backward_pair(tuned)


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------

def learnable_score_tensors(score_mod: Optional[Callable]) -> List[torch.Tensor]:
    """Tensors the score_mod reads that require grad (traced reads; closure tensors if untraceable)."""
    if score_mod is None:
        return []
    try:
        tensors = trace_score_mod(score_mod).captured
    except UntraceableModError:
        tensors = captured_tensors(score_mod)
    return [t for t in tensors if isinstance(t, torch.Tensor) and t.requires_grad]


def check_backward_supported(score_mod: Optional[Callable]) -> None:
    """Raise ``UnsupportedBackwardError`` if the Triton backward cannot differentiate this call.

    Called before the forward kernel of a call that needs gradients, so nothing runs in vain.
    """
    learnable = learnable_score_tensors(score_mod)
    if learnable:
        shapes = ", ".join(f"{tuple(t.shape)} {t.dtype}" for t in learnable)
        raise UnsupportedBackwardError(
            f"score_mod {mod_name(score_mod)!r} captures tensor(s) that require grad ({shapes}); the 'triton' "
            "backend does not compute gradients for tensors captured by a score_mod. Use backend='torch' to "
            "train them, or detach them (or call under torch.no_grad()) if they need no gradient.")
    if score_mod is None:
        return
    try:
        derivative.score_derivative(trace_score_mod(score_mod).graph)
    except derivative.NotDifferentiableError as error:
        raise UnsupportedBackwardError(
            f"score_mod {mod_name(score_mod)!r} cannot be differentiated by the 'triton' backend ({error}); "
            "use backend='torch' for training with it.") from error
    except UntraceableModError:
        pass  # the forward launch reports this with its own message


# ---------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------

def _layout(num_blocks: torch.Tensor, indices: torch.Tensor, full_num_blocks: torch.Tensor,
            full_indices: torch.Tensor, device: torch.device):
    """Block lists as int32 contiguous tensors, and strides with 0 on broadcast (size-1) dims."""
    tensors = [t.to(device=device, dtype=torch.int32).contiguous()
               for t in (num_blocks, indices, full_num_blocks, full_indices)]
    counts, index = tensors[0], tensors[1]
    layout_strides = [0 if counts.shape[d] == 1 else counts.stride(d) for d in range(2)] + [counts.stride(2)]
    index_strides = [0 if index.shape[d] == 1 else index.stride(d) for d in range(2)] + [index.stride(2)]
    return tensors, layout_strides, index_strides


def transposed_fallback_block_ids(block_mask: BlockMask, offsets: torch.Tensor) -> torch.Tensor:
    """int32 ``[Bm, Hm, NKV, NQ]`` (like ``q_indices``): for transposed slot ``s`` of column ``c``,
    the index in the fallback ``bits`` of block (``q_indices[..., c, s]``, ``c``).

    ``offsets`` [Bm, Hm, NQ]: the index in ``bits`` of each row's first partial block (fallback.py).
    """
    kv_num, kv_indices = block_mask.kv_num_blocks.long(), block_mask.kv_indices.long()
    num_q_blocks, num_kv_blocks = block_mask.num_blocks
    slots = torch.arange(kv_indices.shape[-1], device=kv_indices.device)
    valid = slots < kv_num.unsqueeze(-1)                                            # [Bm, Hm, NQ, S]
    block_id = offsets.long().unsqueeze(-1) + slots                                  # bits index per slot
    dense = torch.zeros(*kv_num.shape, num_kv_blocks + 1, dtype=torch.long, device=kv_indices.device)
    dense.scatter_(-1, torch.where(valid, kv_indices, num_kv_blocks), torch.where(valid, block_id, 0))
    by_column = dense[..., :num_kv_blocks].transpose(-1, -2)                         # [Bm, Hm, NKV, NQ]
    rows = block_mask.q_indices.long().clamp(max=num_q_blocks - 1)
    return torch.gather(by_column, -1, rows).to(torch.int32).contiguous()


# ---------------------------------------------------------------------------------------------
# Launch
# ---------------------------------------------------------------------------------------------

_PREPROCESS = {}


def _preprocess_kernel(interpret: bool):
    if interpret not in _PREPROCESS:
        if interpret:
            _PREPROCESS[interpret] = codegen.InterpretedKernel(backward.attention_backward_preprocess)
        else:
            from triton.runtime.jit import JITFunction

            _PREPROCESS[interpret] = JITFunction(backward.attention_backward_preprocess,
                                                 do_not_specialize=["q_len"])
    return _PREPROCESS[interpret]


def _constexprs(*, head_dim: int, head_dim_v: int, dtype: torch.dtype, block_size: Tuple[int, int],
                tiles: KernelConfig, q_len: int, kv_len: int, interpret: bool, dkdv: bool,
                row_offsets_64: bool = False, reverse_tiles: bool = False) -> dict:
    """The forward kernel's constexprs for these tiles, plus the dK/dV kernel's query-side bounds check."""
    values = kernel_constexprs(head_dim=head_dim, head_dim_v=head_dim_v, dtype=dtype, block_size=block_size,
                               config=tiles, kv_len=kv_len, interpret=interpret, row_offsets_64=row_offsets_64,
                               reverse_tiles=reverse_tiles)
    if dkdv:
        q_bs = block_size[0]
        values["CHECK_Q_BOUNDS"] = (q_len % q_bs != 0) or (q_bs % tiles.BLOCK_M != 0)
    return values


def dkdv_constexprs(**kwargs) -> dict:
    """Constexprs of the dK/dV kernel (``backward.DKDV_CONSTEXPR_NAMES``); see ``_constexprs``."""
    return _constexprs(dkdv=True, **kwargs)


def dq_constexprs(**kwargs) -> dict:
    """Constexprs of the dQ kernel (``backward.DQ_CONSTEXPR_NAMES``); see ``_constexprs``."""
    return _constexprs(dkdv=False, **kwargs)


def _launch(kernel: codegen.GeneratedKernel, grid, args, constexprs, tiles: KernelConfig, interpret: bool,
            device: torch.device) -> None:
    if interpret:
        kernel.interpreted()[grid](*args, **constexprs)
    else:
        with torch.cuda.device(device):
            kernel.jit()[grid](*args, **constexprs, num_warps=tiles.num_warps, num_stages=tiles.num_stages,
                               enable_fp_fusion=ENABLE_FP_FUSION)


def attention_backward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, grad_out: Optional[torch.Tensor], grad_lse: Optional[torch.Tensor],
                       block_mask: BlockMask, *, score_mod: Optional[Callable], scale: float, interpret: bool,
                       config: Optional[BackwardConfig] = None,
                       autotune: Optional[bool] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the fused attention.

    query [B, Hq, Lq, D], key [B, Hkv, Lkv, D], value [B, Hkv, Lkv, Dv]; out [B, Hq, Lq, Dv] and
    lse [B, Hq, Lq] (float32, natural log) from the forward; grad_out like out, grad_lse like lse
    (either may be None = zero). Returns (dq, dk, dv) shaped and typed like query, key, value.
    Deterministic: every gradient element is summed by one program in a fixed order.
    ``config``: default the tuned winner for this problem (tuning cache, kernel "bwd"), else the
    heuristic table; ``autotune=True`` (or TRITON_ATTN_AUTOTUNE=1) searches when nothing is cached.
    """
    check_backward_supported(score_mod)
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads, kv_len, head_dim_v = key.shape[1], key.shape[2], value.shape[3]
    device, dtype = query.device, query.dtype
    q_bs, kv_bs = block_mask.BLOCK_SIZE

    # Everything that can fail (tracing, code generation, derivative) happens before any launch.
    mask_plan = plan_mask(block_mask)
    score_traced = trace_score(score_mod, scale)
    kernels: BackwardKernels = backward_kernels_for(codegen.KernelSpec(mask_plan.mode, mask_plan.traced, score_traced))
    if config is None:
        config = default_backward_config(head_dim, head_dim_v, dtype, (q_bs, kv_bs), q_len, kv_len)
        if not interpret:
            config = tuned_backward_config(
                query, key, value, block_mask, score_mod, config, autotune,
                run=lambda candidate: attention_backward(query, key, value, out, lse, grad_out, grad_lse, block_mask,
                                                         score_mod=score_mod, scale=scale, interpret=False,
                                                         config=candidate))
    config = config.fitted(q_bs, kv_bs, q_len, kv_len)

    dq = torch.empty_like(query, memory_format=torch.contiguous_format)
    dk = torch.empty_like(key, memory_format=torch.contiguous_format)
    dv = torch.empty_like(value, memory_format=torch.contiguous_format)
    if grad_out is None:
        dq.zero_(), dk.zero_(), dv.zero_()
        if grad_lse is None:
            return dq, dk, dv
        grad_out = torch.zeros_like(out)
    lse = lse.contiguous()
    if grad_lse is not None:
        grad_lse = grad_lse.contiguous()  # often an expanded (stride 0) tensor; the kernel reads rows at stride 1
    delta = torch.empty(batch, q_heads, q_len, dtype=torch.float32, device=device)

    # 1. delta = rowsum(dO * O) - dLse
    pre_block = 64
    pre_args = [out, grad_out, grad_lse if grad_lse is not None else delta, delta,
                *out.stride(), *grad_out.stride(),
                *((grad_lse.stride(0), grad_lse.stride(1)) if grad_lse is not None else (0, 0)),
                q_len, q_heads]
    pre_constexprs = dict(HEAD_DIM_V=head_dim_v, BLOCK_DV=padded_head_dim(head_dim_v), BLOCK_M=pre_block,
                          HAS_DLSE=grad_lse is not None)
    pre_grid = (_cdiv(q_len, pre_block), batch * q_heads)
    if interpret:
        _preprocess_kernel(True)[pre_grid](*pre_args, **pre_constexprs)
    else:
        with torch.cuda.device(device):
            _preprocess_kernel(False)[pre_grid](*pre_args, **pre_constexprs, num_warps=4,
                                                enable_fp_fusion=ENABLE_FP_FUSION)

    shapes = dict(head_dim=head_dim, head_dim_v=head_dim_v, dtype=dtype, block_size=(q_bs, kv_bs),
                  q_len=q_len, kv_len=kv_len, interpret=interpret,
                  row_offsets_64=needs_64bit_rows(query, key, value, grad_out, dq, dk, dv),
                  reverse_tiles=heavy_tiles_last(block_mask))
    score_captured = list(score_traced.captured) if score_traced is not None else []
    common = [query, key, value, grad_out, lse, delta]
    io_strides = [*query.stride(), *key.stride(), *value.stride(), *grad_out.stride()]

    # 2. dK, dV: one program per key tile per (batch, KV head), over the transposed layout.
    layout, layout_strides, index_strides = _layout(block_mask.q_num_blocks, block_mask.q_indices,
                                                    block_mask.full_q_num_blocks, block_mask.full_q_indices, device)
    dkdv_tensors = list(mask_plan.tensors)
    if mask_plan.mode == codegen.MASK_BITMASK:
        bits, offsets = mask_plan.tensors
        dkdv_tensors = [bits, transposed_fallback_block_ids(block_mask, offsets).to(device)]
    tiles = config.dkdv
    args = [*common, dk, dv, *io_strides, *dk.stride(), *dv.stride(), *layout, *layout_strides, *index_strides,
            q_len, kv_len, kv_heads, q_heads // kv_heads, scale * LOG2_E, scale,
            *_captured_args(kernels.dkdv.captured, dkdv_tensors + score_captured, device)]
    grid = launch_grid(kv_len, block_mask.num_blocks[1], kv_bs, tiles.BLOCK_N, batch * kv_heads)
    _launch(kernels.dkdv, grid, args, dkdv_constexprs(tiles=tiles, **shapes), tiles, interpret, device)

    # 3. dQ: one program per query tile per (batch, query head), over the forward layout.
    layout, layout_strides, index_strides = _layout(block_mask.kv_num_blocks, block_mask.kv_indices,
                                                    block_mask.full_kv_num_blocks, block_mask.full_kv_indices, device)
    tiles = config.dq
    args = [*common, dq, *io_strides, *dq.stride(), *layout, *layout_strides, *index_strides,
            q_len, kv_len, q_heads, q_heads // kv_heads, scale * LOG2_E, scale,
            *_captured_args(kernels.dq.captured, list(mask_plan.tensors) + score_captured, device)]
    grid = launch_grid(q_len, block_mask.num_blocks[0], q_bs, tiles.BLOCK_M, batch * q_heads)
    _launch(kernels.dq, grid, args, dq_constexprs(tiles=tiles, **shapes), tiles, interpret, device)
    return dq, dk, dv
