"""Launching the backward kernels: configs, checks, layouts, allocation and grids.

``attention_backward`` is the one entry point (``kernels.entry.prefill_backward`` calls it with
the tuned tiles). It runs, in order, the preprocessing kernel (``delta = rowsum(dO * O) - dLse``),
the dK/dV kernel over the transposed block layout and the dQ kernel over the forward layout
(``backward.py``), compiled on CUDA or under the Triton interpreter on CPU tensors. The kernels get
the generated functions of ``jit.functions.mod_functions(..., derivative=True)``.

With attention dropout (``dropout``: the forward's ``triton_attn.dropout.Dropout``) the dK/dV and dQ kernels
regenerate the forward's keep decisions from its seed; the delta preprocessing is unchanged (it reads the
forward's output, which is the dropped one). A dropout launch takes ``default_backward_config(...,
dropout=True)``: smaller steps, see ``configs.dropout_step``.

``dkdv_arguments`` / ``dq_arguments`` / ``preprocess_arguments`` are the kernels' signature
descriptions on the host side: the launch and the ahead-of-time build both take their named
arguments from them.

``check_backward_supported`` raises *before any kernel runs* (the caller runs it ahead of the
forward launch of a call that needs gradients) for what the Triton backward cannot do: gradients
with respect to tensors captured by a score_mod (a learnable bias table), and score_mods without a
derivative rule.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ...dropout import Dropout
from ...masks.block_mask import BlockMask
from ...masks.closure import captured_tensors
from ...masks.evaluate import mod_name
from ...masks.tracing import UntraceableModError, trace_score_mod
from ..host import (
    fast_tanh,
    layout_arguments,
    needs_64bit_layout,
    needs_64bit_rows,
    plan_mask,
    score_captured,
    strides,
    trace_score,
)
from ..jit import derivative, functions
from ..jit.modules import launch
from ..targets import REFERENCE, device_target
from .blocks import LOG2_E
from .configs import DKDV_PARTS, BackwardConfig, KernelConfig, cdiv, default_backward_config, padded_head_dim
from .tiling import (
    batch_head_axes,
    dropout_arguments,
    folds_batch_heads,
    heavy_tiles_last,
    kernel_constexprs,
    launch_grid,
)


class UnsupportedBackwardError(NotImplementedError):
    """The Triton backward cannot compute a requested gradient (the message says what to do)."""


# ---------------------------------------------------------------------------------------------
# Configs
# ---------------------------------------------------------------------------------------------

# choose_config(default, structure) -> the tiles to launch: ``structure`` is the mods' structure class
# (``ModFunctions.key[:8]``) for the tuning keys; ``kernels.tuned.backward_chooser`` makes one.
BackwardChooser = Callable[[BackwardConfig, str], BackwardConfig]


def backward_pair(config: KernelConfig, split_dkdv: bool = False) -> BackwardConfig:
    """The backward kernels' tiles for one ``bwd`` tuning candidate: the dK/dV program holds ``BLOCK_N``
    keys and steps over ``BLOCK_M`` query rows; the dQ program holds ``BLOCK_M`` rows and steps over
    ``BLOCK_N`` keys (the same pair transposed), both on the candidate's warps and stages."""
    return BackwardConfig(config, transposed_tiles(config), max_head_dim=256, split_dkdv=split_dkdv)


def transposed_tiles(config: KernelConfig) -> KernelConfig:
    """The dQ tiles for a ``bwd`` search-space entry (its BLOCK_M / BLOCK_N swapped, same warps and stages)."""
    return replace(config, BLOCK_M=config.BLOCK_N, BLOCK_N=config.BLOCK_M, max_head_dim=256)


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
# Arguments and launch
# ---------------------------------------------------------------------------------------------

DKDV_LAYOUT = ("q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")
DQ_LAYOUT = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")


def preprocess_arguments(out: torch.Tensor, grad_out: torch.Tensor, grad_lse: Optional[torch.Tensor],
                         delta: torch.Tensor) -> Dict[str, object]:
    """Runtime arguments of ``attention_backward_preprocess`` by name (``grad_lse`` None: no dLse)."""
    return dict(Out=out, DOut=grad_out, DLse=grad_lse if grad_lse is not None else delta, Delta=delta,
                **strides("o", out, "bhmd"), **strides("do", grad_out, "bhmd"),
                stride_dlse_b=grad_lse.stride(0) if grad_lse is not None else 0,
                stride_dlse_h=grad_lse.stride(1) if grad_lse is not None else 0,
                q_len=out.shape[2], num_q_heads=out.shape[1], batch_heads=out.shape[0] * out.shape[1])


def preprocess_constexprs(out: torch.Tensor, grad_out: torch.Tensor, *, has_grad_lse: bool,
                          block_m: int = 64) -> Dict[str, object]:
    """Constexprs of ``attention_backward_preprocess`` for out / grad_out [B, Hq, Lq, Dv]: 64-bit row
    offsets when either's rows reach 2**31 (``host.needs_64bit_rows``), the (batch, head) pairs folded
    over two grid axes past one axis' limit (``tiling.batch_head_axes``)."""
    head_dim_v = out.shape[3]
    return dict(HEAD_DIM_V=head_dim_v, BLOCK_DV=padded_head_dim(head_dim_v), BLOCK_M=block_m,
                HAS_DLSE=has_grad_lse, ROW_OFFSETS_64=needs_64bit_rows(out, grad_out),
                FOLD_BATCH_HEADS=folds_batch_heads(out.shape[0] * out.shape[1]))


def preprocess_grid(out: torch.Tensor, block_m: int = 64) -> Tuple[int, int, int]:
    """The preprocess kernel's grid for out [B, Hq, Lq, Dv]: row tiles x ``batch_head_axes(B * Hq)``."""
    return (cdiv(out.shape[2], block_m), *batch_head_axes(out.shape[0] * out.shape[1]))


def stats_from_lse(lse: torch.Tensor) -> torch.Tensor:
    """Softmax statistics [B, Hq, Lq, 2] (base-2 shift, 1 / sum) equivalent to ``lse`` [B, Hq, Lq], for a
    backward whose forward did not keep its own (``P = exp(scores - lse)``; rows with lse = -inf get
    1 / sum = 0, so P = 0)."""
    empty = torch.isneginf(lse)
    shift = torch.where(empty, torch.zeros_like(lse), lse * LOG2_E)
    return torch.stack([shift, (~empty).to(lse.dtype)], dim=-1).contiguous()


def _common_arguments(query, key, value, grad_out, stats, delta, *, scale: float, mask_captured: tuple,
                      score_captured: tuple, dropout: Optional[Dropout]) -> Dict[str, object]:
    q_heads, kv_heads = query.shape[1], key.shape[1]
    return dict(Q=query, K=key, V=value, DOut=grad_out, Stats=stats, Delta=delta,
                **strides("q", query, "bhmd"), **strides("k", key, "bhnd"), **strides("v", value, "bhnd"),
                **strides("do", grad_out, "bhmd"),
                q_len=query.shape[2], kv_len=key.shape[2], gqa_groups=q_heads // kv_heads,
                scale_log2=scale * LOG2_E, score_scale=scale, **dropout_arguments(dropout),
                mask_captured=mask_captured, score_captured=score_captured)


def dkdv_arguments(query, key, value, grad_out, stats, delta, grad_key, grad_value, layout: Dict[str, object], *,
                   scale: float, mask_captured: tuple, score_captured: tuple,
                   dropout: Optional[Dropout] = None) -> Dict[str, object]:
    """Runtime arguments of ``attention_backward_dkdv_kernel`` by name (``layout``: the transposed one;
    ``stats``: [B, Hq, Lq, 2] float32 softmax statistics, ``stats_from_lse``; ``dropout``: the forward's)."""
    return dict(**_common_arguments(query, key, value, grad_out, stats, delta, scale=scale, mask_captured=mask_captured,
                                    score_captured=score_captured, dropout=dropout),
                DK=grad_key, DV=grad_value, **strides("dk", grad_key, "bhnd"), **strides("dv", grad_value, "bhnd"),
                **layout, num_kv_heads=key.shape[1], batch_heads=query.shape[0] * key.shape[1])


def dq_arguments(query, key, value, grad_out, stats, delta, grad_query, layout: Dict[str, object], *, scale: float,
                 mask_captured: tuple, score_captured: tuple, dropout: Optional[Dropout] = None) -> Dict[str, object]:
    """Runtime arguments of ``attention_backward_dq_kernel`` by name (``layout``: the forward one;
    ``dropout``: the forward's)."""
    return dict(**_common_arguments(query, key, value, grad_out, stats, delta, scale=scale, mask_captured=mask_captured,
                                    score_captured=score_captured, dropout=dropout),
                DQ=grad_query, **strides("dq", grad_query, "bhmd"), **layout, num_q_heads=query.shape[1],
                batch_heads=query.shape[0] * query.shape[1])


def function_constexprs(mods: functions.ModFunctions) -> Dict[str, object]:
    """The backward kernels' generated-function constexprs."""
    return dict(MASK_FN=mods.mask_fn, SCORE_FN=mods.score_fn, SCORE_GRAD_FN=mods.score_grad_fn,
                SCORE_GRAD_CONSTANT=mods.score_grad_constant)


def dkdv_constexprs(*, tiles: KernelConfig, q_len: int, block_size: Tuple[int, int], part: str = "dkdv",
                    dropout: bool = False, **shapes) -> dict:
    """Shape constexprs of the dK/dV kernel: the forward's, the query-side bounds check, the scores'
    orientation (keys first for 16-bit inputs, see backward.py), which gradients ``part`` computes:
    "dkdv" both (one kernel), "dk" or "dv" one of them (``BackwardConfig.split_dkdv``), and whether the
    forward had dropout."""
    values = kernel_constexprs(config=tiles, block_size=block_size, **shapes)
    values["DROPOUT"] = bool(dropout)
    q_bs = block_size[0]
    values["CHECK_Q_BOUNDS"] = (q_len % q_bs != 0) or (q_bs % tiles.BLOCK_M != 0)
    values["KEYS_FIRST"] = shapes["dtype"] != torch.float32
    values["COMPUTE_DK"], values["COMPUTE_DV"] = DKDV_PARTS[part]
    return values


def dq_constexprs(*, tiles: KernelConfig, q_len: int, dropout: bool = False, **shapes) -> dict:
    """Shape constexprs of the dQ kernel (the forward's, and whether the forward had dropout)."""
    return dict(kernel_constexprs(config=tiles, **shapes), DROPOUT=bool(dropout))


def attention_backward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, grad_out: Optional[torch.Tensor], grad_lse: Optional[torch.Tensor],
                       block_mask: BlockMask, *, score_mod: Optional[Callable], scale: float, interpret: bool,
                       config: Optional[BackwardConfig] = None,
                       choose_config: Optional[BackwardChooser] = None,
                       softmax_stats: Optional[torch.Tensor] = None,
                       dropout: Optional[Dropout] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the fused attention.

    query [B, Hq, Lq, D], key [B, Hkv, Lkv, D], value [B, Hkv, Lkv, Dv]; out [B, Hq, Lq, Dv] and
    lse [B, Hq, Lq] (float32, natural log) from the forward; grad_out like out, grad_lse like lse
    (either may be None = zero). Returns (dq, dk, dv) shaped and typed like query, key, value.
    Deterministic: every gradient element is summed by one program in a fixed order.
    ``config``: default the heuristic table's (``default_backward_config``), or what
    ``choose_config(default, structure)`` returns for it (the tuned tiles: ``kernels.tuned``).
    ``softmax_stats``: the forward's [B, Hq, Lq, 2] statistics (``host.new_softmax_stats``),
    which recompute P exactly as the forward normalized it; None: derived from ``lse``.
    ``dropout``: the forward's ``Dropout`` (the same seed: its keep-mask is regenerated), None: none.
    """
    launches, grads = prepare_backward(query, key, value, out, lse, grad_out, grad_lse, block_mask,
                                       score_mod=score_mod, scale=scale, interpret=interpret, config=config,
                                       choose_config=choose_config, softmax_stats=softmax_stats, dropout=dropout)
    for launch_kernel in launches.values():
        launch_kernel()
    return grads


def prepare_backward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, out: torch.Tensor,
                     lse: torch.Tensor, grad_out: Optional[torch.Tensor], grad_lse: Optional[torch.Tensor],
                     block_mask: BlockMask, *, score_mod: Optional[Callable], scale: float, interpret: bool,
                     config: Optional[BackwardConfig] = None, choose_config: Optional[BackwardChooser] = None,
                     softmax_stats: Optional[torch.Tensor] = None, dropout: Optional[Dropout] = None):
    """Everything ``attention_backward`` does on the host, once: ``(launches, (dq, dk, dv))`` with
    ``launches`` the kernels by name ("preprocess", "dkdv" -- or "dv" and "dk" when ``split_dkdv`` --,
    "dq"; none when there is no gradient to propagate), to be run in that (insertion) order (what the
    autotuner times, one kernel at a time)."""
    check_backward_supported(score_mod)
    batch, q_heads, q_len, head_dim = query.shape
    kv_heads, kv_len, head_dim_v = key.shape[1], key.shape[2], value.shape[3]
    device, dtype = query.device, query.dtype
    q_bs, kv_bs = block_mask.BLOCK_SIZE

    # Everything that can fail (tracing, code generation, derivative) happens before any launch.
    from .backward import attention_backward_dkdv_kernel, attention_backward_dq_kernel, attention_backward_preprocess

    target = None if interpret else device_target(device)
    mask_plan = plan_mask(block_mask)
    score_traced = trace_score(score_mod, scale)
    mods = functions.mod_functions(mask_plan.traced, score_traced, mask_mode=mask_plan.mode, derivative=True,
                                   fast_tanh=fast_tanh(dtype, interpret, target))
    if config is None:
        config = default_backward_config(head_dim, head_dim_v, dtype, (q_bs, kv_bs), q_len, kv_len, target=target,
                                         dropout=dropout is not None)
        if choose_config is not None:
            config = choose_config(config, mods.key[:8])
    config = config.fitted(q_bs, kv_bs, q_len, kv_len)

    dq = torch.empty_like(query, memory_format=torch.contiguous_format)
    dk = torch.empty_like(key, memory_format=torch.contiguous_format)
    dv = torch.empty_like(value, memory_format=torch.contiguous_format)
    if grad_out is None:
        dq.zero_(), dk.zero_(), dv.zero_()
        if grad_lse is None:
            return {}, (dq, dk, dv)
        grad_out = torch.zeros_like(out)
    stats = stats_from_lse(lse) if softmax_stats is None else softmax_stats.contiguous()
    if grad_lse is not None:
        grad_lse = grad_lse.contiguous()  # often an expanded (stride 0) tensor; the kernel reads rows at stride 1
    delta = torch.empty(batch, q_heads, q_len, dtype=torch.float32, device=device)

    def launcher(kernel, grid, named: Dict[str, object], tiles: Optional[KernelConfig]) -> Callable[[], None]:
        if tiles is None:  # the delta kernel: no tiles to tune
            options = dict(num_warps=(target or REFERENCE).tables.preprocess_warps)
        else:
            options = dict(num_warps=tiles.num_warps, num_stages=tiles.num_stages, options=tiles.amd_options)
        return lambda: launch(kernel, grid, named, interpret=interpret, device=device, **options)

    # 1. delta = rowsum(dO * O) - dLse
    launches = {"preprocess": launcher(
        attention_backward_preprocess, preprocess_grid(out),
        {**preprocess_arguments(out, grad_out, grad_lse, delta),
         **preprocess_constexprs(out, grad_out, has_grad_lse=grad_lse is not None)}, None)}

    shapes = dict(head_dim=head_dim, head_dim_v=head_dim_v, dtype=dtype, block_size=(q_bs, kv_bs),
                  q_len=q_len, kv_len=kv_len, interpret=interpret,
                  row_offsets_64=needs_64bit_rows(query, key, value, grad_out, dq, dk, dv),
                  reverse_tiles=heavy_tiles_last(block_mask), target=target)
    captured = dict(scale=scale, mask_captured=mask_plan.captured(device),
                    score_captured=score_captured(score_traced, device), dropout=dropout)

    # 2. dK, dV: one program per key tile per (batch, KV head), over the transposed layout; one launch,
    # or (split_dkdv) one for dV and one for dK.
    tiles = config.dkdv
    layout = layout_arguments(block_mask.q_num_blocks, block_mask.q_indices, block_mask.full_q_num_blocks,
                              block_mask.full_q_indices, device, DKDV_LAYOUT, "n")
    arguments = dkdv_arguments(query, key, value, grad_out, stats, delta, dk, dv, layout, **captured)
    grid = launch_grid(kv_len, block_mask.num_blocks[1], kv_bs, tiles.BLOCK_N, batch * kv_heads)
    for part in config.dkdv_parts:
        launches[part] = launcher(attention_backward_dkdv_kernel, grid,
                                  {**arguments, **function_constexprs(mods),
                                   **dkdv_constexprs(tiles=tiles, part=part, batch_heads=batch * kv_heads,
                                                     layout_offsets_64=needs_64bit_layout(layout),
                                                     dropout=dropout is not None, **shapes)},
                                  tiles)

    # 3. dQ: one program per query tile per (batch, query head), over the forward layout.
    tiles = config.dq
    layout = layout_arguments(block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.full_kv_num_blocks,
                              block_mask.full_kv_indices, device, DQ_LAYOUT, "m")
    arguments = dq_arguments(query, key, value, grad_out, stats, delta, dq, layout, **captured)
    grid = launch_grid(q_len, block_mask.num_blocks[0], q_bs, tiles.BLOCK_M, batch * q_heads)
    launches["dq"] = launcher(attention_backward_dq_kernel, grid,
                              {**arguments, **function_constexprs(mods),
                               **dq_constexprs(tiles=tiles, batch_heads=batch * q_heads,
                                               layout_offsets_64=needs_64bit_layout(layout),
                                               dropout=dropout is not None, **shapes)}, tiles)
    return launches, (dq, dk, dv)
