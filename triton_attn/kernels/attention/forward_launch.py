"""Launching the forward kernel: mask plan, generated functions, config, arguments, grid.

``attention_forward`` is the one entry point. It decides how the mask predicate reaches the
kernel (generated function, bitmask fallback, or none: ``plan_mask``), gets the generated
``@triton.jit`` functions (``jit.functions.mod_functions``), picks a ``KernelConfig`` that fits
the BlockMask, and launches ``forward.attention_forward_kernel`` compiled (CUDA) or under the
Triton interpreter (CPU tensors).

``forward_arguments`` is the kernel's one signature description on the host side: it names every
runtime argument, and both the launch and the ahead-of-time build (``attention/aot.py``, with
example tensors) take their arguments from it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from ...masks.block_mask import BlockMask
from ...masks.evaluate import mod_name
from ...masks.tracing import TracedMod, UntraceableModError, trace_mask_mod, trace_score_mod
from ..jit import functions
from ..jit.modules import launch
from . import fallback
from .blocks import LOG2_E
from .configs import KernelConfig, cdiv, default_config, padded_head_dim

# Offsets at or past this need 64 bits.
INT32_LIMIT = 2 ** 31


def new_softmax_stats(query: torch.Tensor) -> torch.Tensor:
    """An empty float32 [B, Hq, Lq, 2] for the forward's softmax statistics (shift, 1 / sum per row)."""
    return torch.empty(*query.shape[:3], 2, dtype=torch.float32, device=query.device)


@dataclass
class MaskPlan:
    """How the predicate reaches the kernels: the mask mode, the traced mask_mod (traced mode only),
    and a function that builds the predicate's captured tuple for a device."""

    mode: str
    traced: Optional[TracedMod]
    captured: Callable[[torch.device], tuple]


def plan_mask(block_mask: BlockMask) -> MaskPlan:
    """Inline the mask_mod when it traces and compiles; else the exact bitmask fallback (warns once)."""
    if not block_mask.launch_plan.has_partial_blocks:
        # No partial block anywhere: the predicate would never run. (The plan was computed when the
        # mask was built: reading it here does not sync with the device.)
        return MaskPlan(functions.MASK_NONE, None, lambda device: ())
    mask_mod = block_mask.mask_mod
    try:
        traced = trace_mask_mod(mask_mod)
        functions.check_graph(traced)
    except (UntraceableModError, functions.CodegenError) as error:
        fallback.warn_fallback(mask_mod, getattr(error, "operation", str(error)))
        return MaskPlan(functions.MASK_BITMASK, None, lambda device: fallback.bitmask_captured(block_mask, device))
    return MaskPlan(functions.MASK_TRACED, traced,
                    lambda device: functions.captured_tuple(traced.captured, device))


def scaled_scores(score, b, h, q_idx, kv_idx):
    """The identity score_mod: stands in for "no score_mod" when the scale is not positive."""
    return score


def trace_score(score_mod: Optional[Callable], scale: float = 1.0) -> Optional[TracedMod]:
    """The traced score_mod (None for none); a score_mod has no fallback, so failing raises.

    Without a score_mod the kernels take the row max of the raw ``Q K^T`` and scale afterwards,
    which needs ``scale > 0``; for ``scale <= 0`` they get the identity score_mod instead."""
    if score_mod is None:
        if scale > 0:
            return None
        score_mod = scaled_scores
    try:
        traced = trace_score_mod(score_mod)
        functions.check_graph(traced)
    except (UntraceableModError, functions.CodegenError) as error:
        raise TypeError(f"score_mod {mod_name(score_mod)!r} cannot be compiled into the Triton kernel: {error}. "
                        "Rewrite it with tensor operators and torch functions on its arguments, or use "
                        "backend='torch'.") from error
    return traced


def score_captured(score: Optional[TracedMod], device: torch.device) -> tuple:
    """The score function's captured tuple (empty without a score_mod)."""
    return functions.captured_tuple(score.captured, device) if score is not None else ()


def layout_arguments(num_blocks: torch.Tensor, indices: torch.Tensor, full_num_blocks: torch.Tensor,
                     full_indices: torch.Tensor, device: torch.device, names: Tuple[str, str, str, str], row: str
                     ) -> Dict[str, object]:
    """One block layout as named kernel arguments: int32 contiguous lists, strides 0 on broadcast dims.

    ``names``: the four list parameters; ``row``: the stride suffix of the walked dim ("m" or "n").
    """
    tensors = [t.to(device=device, dtype=torch.int32).contiguous()
               for t in (num_blocks, indices, full_num_blocks, full_indices)]
    counts, index = tensors[0], tensors[1]
    arguments: Dict[str, object] = dict(zip(names, tensors))
    for prefix, tensor in (("layout", counts), ("index", index)):
        for dim, suffix in enumerate(("b", "h", row)):
            broadcast = dim < 2 and tensor.shape[dim] == 1
            arguments[f"stride_{prefix}_{suffix}"] = 0 if broadcast else tensor.stride(dim)
    return arguments


def strides(prefix: str, tensor: torch.Tensor, dims: str) -> Dict[str, int]:
    """``{stride_<prefix><dim>: stride}`` for a 4-D tensor, dims named by ``dims`` (e.g. "bhmd")."""
    return {f"stride_{prefix}{d}": tensor.stride(i) for i, d in enumerate(dims)}


def forward_arguments(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, out: torch.Tensor,
                      lse: torch.Tensor, layout: Dict[str, object], *, scale: float, mask_captured: tuple,
                      score_captured: tuple, stats: Optional[torch.Tensor] = None) -> Dict[str, object]:
    """Every runtime argument of ``attention_forward_kernel`` by name (``layout``: ``layout_arguments``;
    ``stats``: the optional [B, Hq, Lq, 2] float32 softmax statistics for the backward; the lse
    stands in as an unused pointer without it)."""
    q_heads, kv_heads = query.shape[1], key.shape[1]
    return dict(
        Q=query, K=key, V=value, Out=out, Lse=lse, Stats=lse if stats is None else stats,
        **strides("q", query, "bhmd"), **strides("k", key, "bhnd"), **strides("v", value, "bhnd"),
        **strides("o", out, "bhmd"), stride_lse_b=lse.stride(0), stride_lse_h=lse.stride(1),
        **layout,
        q_len=query.shape[2], kv_len=key.shape[2], num_q_heads=q_heads, gqa_groups=q_heads // kv_heads,
        scale_log2=scale * LOG2_E, score_scale=scale,
        mask_captured=mask_captured, score_captured=score_captured,
    )


FORWARD_LAYOUT = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")


def launch_grid(q_len: int, num_q_blocks: int, q_block_size: int, block_m: int, batch_heads: int) -> Tuple[int, int]:
    """``(query tiles, B * Hq)``; tiles that would start past ``q_len`` are not launched."""
    tiles_per_block = cdiv(q_block_size, block_m)
    last_rows = q_len - (num_q_blocks - 1) * q_block_size
    return ((num_q_blocks - 1) * tiles_per_block + min(tiles_per_block, cdiv(last_rows, block_m)), batch_heads)


def needs_64bit_rows(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether ``position * row stride`` can reach 2**31 in any of these [B, H, L, D] tensors: the
    largest offset inside one (batch, head) slice. Batch and head offsets are always 64-bit."""
    for tensor in tensors:
        if tensor is None or tensor.dim() != 4:
            continue
        reach = (tensor.shape[2] - 1) * abs(tensor.stride(2)) + (tensor.shape[3] - 1) * abs(tensor.stride(3))
        if reach >= INT32_LIMIT:
            return True
    return False


def heavy_tiles_last(block_mask: BlockMask) -> bool:
    """Whether later query block rows visit clearly more KV blocks than earlier ones (causal-like).

    Read once per BlockMask (a device sync) and remembered on it, like the tuning key's sparsity."""
    cached = getattr(block_mask, "_heavy_tiles_last", None)
    if cached is not None:
        return cached
    work = (block_mask.kv_num_blocks + block_mask.full_kv_num_blocks).double().flatten(0, -2).mean(0)  # [NQ]
    half = work.shape[0] // 2
    result = bool(half > 0 and float(work[-half:].sum()) > 1.25 * float(work[:half].sum()))
    try:
        block_mask._heavy_tiles_last = result
    except AttributeError:  # a class with __slots__: recompute next time
        pass
    return result


def fast_tanh(dtype: torch.dtype, interpret: bool) -> bool:
    """Whether score functions use the hardware ``tanh.approx.f32``: compiled for NVIDIA, 16-bit inputs."""
    return bool(not interpret and dtype in (torch.float16, torch.bfloat16) and torch.version.hip is None)


def kernel_constexprs(*, head_dim: int, head_dim_v: int, dtype: torch.dtype, block_size: Tuple[int, int],
                      config: KernelConfig, kv_len: int, interpret: bool, row_offsets_64: bool = False,
                      reverse_tiles: bool = False) -> dict:
    """The shape constexprs of the forward kernel (and of the dQ / dK/dV kernels) for these shapes.

    row_offsets_64: ``needs_64bit_rows``; reverse_tiles: launch query tiles last-first
    (``heavy_tiles_last``)."""
    q_bs, kv_bs = block_size
    return dict(
        HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v,
        BLOCK_D=padded_head_dim(head_dim), BLOCK_DV=padded_head_dim(head_dim_v),
        BLOCK_M=config.BLOCK_M, BLOCK_N=config.BLOCK_N,
        Q_BLOCK_SIZE=q_bs, KV_BLOCK_SIZE=kv_bs,
        Q_TILES_PER_BLOCK=cdiv(q_bs, config.BLOCK_M), KV_TILES_PER_BLOCK=cdiv(kv_bs, config.BLOCK_N),
        # Bounds checks on K/V only where a tile can overhang the sequence or its mask block.
        CHECK_KV_BOUNDS=(kv_len % kv_bs != 0) or (kv_bs % config.BLOCK_N != 0),
        # float32 inputs: 3xTF32 dots, float32-accurate on tensor cores (plain TF32 would not be).
        DOT_PRECISION="tf32x3" if dtype == torch.float32 else "tf32",
        # Triton 3.9's interpreter returns garbage for tl.dot on two bf16 operands.
        UPCAST_DOT=bool(interpret and dtype == torch.bfloat16),
        ROW_OFFSETS_64=bool(row_offsets_64),
        HEAVY_TILES_LAST=bool(reverse_tiles),
    )


def _tuned_config(query, key, value, block_mask: BlockMask, score_mod, scale: float, default: KernelConfig,
                  autotune: Optional[bool], structure: str, stats: Optional[torch.Tensor]) -> KernelConfig:
    """The cached winner for this call's tuning key, or ``default``; searches only when asked.

    A search prunes by compiling each candidate once for this GPU (``attention.aot.aot_compile_fn``:
    configs that spill or do not fit in shared memory are skipped) and times the kernel launch alone
    (``prepare_forward``): no tracing, layout or allocation inside the timed region."""
    from ..tuning import search as tuning

    tuning_key = tuning.make_key(query, key, value, block_mask, variant="score" if score_mod is not None else "",
                                 structure=structure)
    head_dim, head_dim_v = query.shape[-1], value.shape[-1]

    def compile_fn(candidate: KernelConfig):
        from .aot import aot_compile_fn

        return aot_compile_fn(tuning_key.capability, head_dim=head_dim, value_dim=head_dim_v, dtype=query.dtype,
                              block_size=block_mask.BLOCK_SIZE, kernel="fwd", mask_mod=block_mask.mask_mod,
                              score_mod=score_mod, kv_len=key.shape[2])(candidate)

    return tuning.select_config(
        tuning_key, default, autotune=autotune, device=query.device,
        candidates=lambda: tuning.search_space("fwd", tuning_key.capability, head_dim=head_dim, value_dim=head_dim_v,
                                               dtype=query.dtype, block_size=block_mask.BLOCK_SIZE,
                                               q_len=query.shape[2]),
        compile_fn=compile_fn,
        run=lambda candidate: prepare_forward(query, key, value, block_mask, score_mod=score_mod, scale=scale,
                                              interpret=False, config=candidate, stats=stats)[0])


def attention_forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: BlockMask, *,
                      score_mod: Optional[Callable], scale: float, interpret: bool,
                      config: Optional[KernelConfig] = None,
                      autotune: Optional[bool] = None,
                      stats: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernel.

    query [B, Hq, Lq, D], key [B, Hkv, Lkv, D], value [B, Hkv, Lkv, Dv] (validated by ``attention``).
    Returns out [B, Hq, Lq, Dv] in the input dtype and lse [B, Hq, Lq] float32 (natural log).
    ``config``: a ``KernelConfig`` (fitted to the BlockMask here). Without one: the tuned winner
    for this problem's key from the tuning cache, else ``default_config`` at once; a search runs
    only when ``autotune=True`` (or ``TRITON_ATTN_AUTOTUNE=1``), so a first call never stalls.
    ``stats``: an empty float32 [B, Hq, Lq, 2] the kernel fills with the softmax statistics the
    backward recomputes P from (``new_softmax_stats``); None: not written.
    """
    if config is None and stats is None:
        from ..decode.launch import decode_attention, use_decode

        # Short queries (inference: no softmax statistics for a backward) take the split-KV decode kernel.
        if use_decode(query, key, block_mask):
            return decode_attention(query, key, value, block_mask, score_mod=score_mod, scale=scale,
                                    interpret=interpret, autotune=autotune)
    run, out, lse = prepare_forward(query, key, value, block_mask, score_mod=score_mod, scale=scale,
                                    interpret=interpret, config=config, autotune=autotune, stats=stats)
    run()
    return out, lse


def prepare_forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: BlockMask, *,
                    score_mod: Optional[Callable], scale: float, interpret: bool,
                    config: Optional[KernelConfig] = None, autotune: Optional[bool] = None,
                    stats: Optional[torch.Tensor] = None) -> Tuple[Callable[[], None], torch.Tensor, torch.Tensor]:
    """Everything ``attention_forward`` does on the host, once: ``(launch, out, lse)``, where ``launch()``
    runs the kernel alone into ``out`` / ``lse`` (what the autotuner times)."""
    from .forward import attention_forward_kernel

    batch, q_heads, q_len, head_dim = query.shape
    kv_len, head_dim_v = key.shape[2], value.shape[3]
    device = query.device
    q_bs, kv_bs = block_mask.BLOCK_SIZE

    mask_plan = plan_mask(block_mask)
    score_traced = trace_score(score_mod, scale)
    mods = functions.mod_functions(mask_plan.traced, score_traced, mask_mode=mask_plan.mode,
                                   fast_tanh=fast_tanh(query.dtype, interpret))
    if config is None:
        config = default_config(head_dim, head_dim_v, query.dtype, (q_bs, kv_bs), q_len)
        if not interpret:
            config = _tuned_config(query, key, value, block_mask, score_mod, scale, config, autotune,
                                   structure=mods.key[:8], stats=stats)
    config = config.fitted(q_bs, kv_bs, q_len)

    out = torch.empty(batch, q_heads, q_len, head_dim_v, dtype=query.dtype, device=device)
    lse = torch.empty(batch, q_heads, q_len, dtype=torch.float32, device=device)
    layout = layout_arguments(block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.full_kv_num_blocks,
                              block_mask.full_kv_indices, device, FORWARD_LAYOUT, "m")
    arguments = forward_arguments(query, key, value, out, lse, layout, scale=scale,
                                  mask_captured=mask_plan.captured(device),
                                  score_captured=score_captured(score_traced, device), stats=stats)
    constexprs = kernel_constexprs(head_dim=head_dim, head_dim_v=head_dim_v, dtype=query.dtype,
                                   block_size=(q_bs, kv_bs), config=config, kv_len=kv_len, interpret=interpret,
                                   row_offsets_64=needs_64bit_rows(query, key, value, out),
                                   reverse_tiles=heavy_tiles_last(block_mask))
    constexprs["STORE_STATS"] = stats is not None
    grid = launch_grid(q_len, block_mask.num_blocks[0], q_bs, config.BLOCK_M, batch * q_heads)
    named = {**arguments, "MASK_FN": mods.mask_fn, "SCORE_FN": mods.score_fn, **constexprs}

    def run() -> None:
        launch(attention_forward_kernel, grid, named, interpret=interpret, device=device,
               num_warps=config.num_warps, num_stages=config.num_stages)

    return run, out, lse
