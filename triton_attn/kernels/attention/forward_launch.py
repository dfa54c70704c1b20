"""Launching the forward kernel: mask plan, generated functions, config, arguments, grid.

``attention_forward`` runs the prefill forward kernel for any query length (which kernel a call
takes is the caller's decision: ``dispatch.py``). It gets how the mask predicate reaches the kernel
(``host.plan_mask``: generated function, bitmask fallback, or none), the generated ``@triton.jit``
functions (``jit.functions.mod_functions``), a ``KernelConfig`` fitted to the BlockMask, and
launches ``forward.attention_forward_kernel`` compiled (CUDA) or under the Triton interpreter (CPU
tensors). It does no tuning itself: a caller that tunes (``kernels.entry``) passes ``choose_config``.

``forward_arguments`` is the kernel's one signature description on the host side: it names every
runtime argument, and both the launch and the ahead-of-time build (``attention/aot.py``, with
example tensors) take their arguments from it.
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch

from ...dropout import Dropout
from ...masks.block_mask import BlockMask
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
from ..jit import functions
from ..jit.modules import launch
from ..targets import device_target
from .blocks import LOG2_E
from .configs import KernelConfig, default_config
from .tiling import dropout_arguments, heavy_tiles_last, kernel_constexprs, launch_grid

# choose_config(default, structure) -> the config to launch: ``structure`` is the mods' structure class
# (``ModFunctions.key[:8]``) for the tuning key; ``kernels.tuned.forward_chooser`` makes one.
ForwardChooser = Callable[[KernelConfig, str], KernelConfig]

FORWARD_LAYOUT = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")


def forward_arguments(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, out: torch.Tensor,
                      lse: torch.Tensor, layout: Dict[str, object], *, scale: float, mask_captured: tuple,
                      score_captured: tuple, stats: Optional[torch.Tensor] = None,
                      dropout: Optional[Dropout] = None) -> Dict[str, object]:
    """Every runtime argument of ``attention_forward_kernel`` by name (``layout``: ``layout_arguments``;
    ``stats``: the optional [B, Hq, Lq, 2] float32 softmax statistics for the backward; the lse
    stands in as an unused pointer without it; ``dropout``: ``dropout_arguments``)."""
    q_heads, kv_heads = query.shape[1], key.shape[1]
    return dict(
        Q=query, K=key, V=value, Out=out, Lse=lse, Stats=lse if stats is None else stats,
        **strides("q", query, "bhmd"), **strides("k", key, "bhnd"), **strides("v", value, "bhnd"),
        **strides("o", out, "bhmd"), stride_lse_b=lse.stride(0), stride_lse_h=lse.stride(1),
        **layout,
        q_len=query.shape[2], kv_len=key.shape[2], num_q_heads=q_heads, gqa_groups=q_heads // kv_heads,
        batch_heads=query.shape[0] * q_heads,
        scale_log2=scale * LOG2_E, score_scale=scale,
        **dropout_arguments(dropout),
        mask_captured=mask_captured, score_captured=score_captured,
    )



def attention_forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: BlockMask, *,
                      score_mod: Optional[Callable], scale: float, interpret: bool,
                      config: Optional[KernelConfig] = None,
                      choose_config: Optional[ForwardChooser] = None,
                      stats: Optional[torch.Tensor] = None,
                      dropout: Optional[Dropout] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Run the forward kernel.

    query [B, Hq, Lq, D], key [B, Hkv, Lkv, D], value [B, Hkv, Lkv, Dv] (validated by ``attention``).
    Returns out [B, Hq, Lq, Dv] in the input dtype and lse [B, Hq, Lq] float32 (natural log).
    ``config``: a ``KernelConfig`` (fitted to the BlockMask here). Without one: ``default_config``
    for these shapes, or what ``choose_config(default, structure)`` returns for it (the tuned winner).
    ``stats``: an empty float32 [B, Hq, Lq, 2] the kernel fills with the softmax statistics the
    backward recomputes P from (``new_softmax_stats``); None: not written.
    ``dropout``: attention dropout (``triton_attn.dropout.Dropout``; the lse and statistics stay those
    without it), None: none.
    """
    run, out, lse = prepare_forward(query, key, value, block_mask, score_mod=score_mod, scale=scale,
                                    interpret=interpret, config=config, choose_config=choose_config, stats=stats,
                                    dropout=dropout)
    run()
    return out, lse


def forward_mods(query: torch.Tensor, block_mask: BlockMask, *, score_mod: Optional[Callable], scale: float,
                 interpret: bool, target=None):
    """(mask plan, traced score_mod, generated functions) of a forward launch; ``mods.key[:8]`` is the
    structure class in its tuning key. target: the launch's ``kernels.targets.Target`` (default: the query's
    device's)."""
    mask_plan = plan_mask(block_mask)
    score_traced = trace_score(score_mod, scale)
    if target is None and not interpret:
        target = device_target(query.device)
    mods = functions.mod_functions(mask_plan.traced, score_traced, mask_mode=mask_plan.mode,
                                   fast_tanh=fast_tanh(query.dtype, interpret, target))
    return mask_plan, score_traced, mods


def prepare_forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: BlockMask, *,
                    score_mod: Optional[Callable], scale: float, interpret: bool,
                    config: Optional[KernelConfig] = None, choose_config: Optional[ForwardChooser] = None,
                    stats: Optional[torch.Tensor] = None,
                    dropout: Optional[Dropout] = None) -> Tuple[Callable[[], None], torch.Tensor, torch.Tensor]:
    """Everything ``attention_forward`` does on the host, once: ``(launch, out, lse)``, where ``launch()``
    runs the kernel alone into ``out`` / ``lse`` (what the autotuner times)."""
    from .forward import attention_forward_kernel

    batch, q_heads, q_len, head_dim = query.shape
    kv_len, head_dim_v = key.shape[2], value.shape[3]
    device = query.device
    q_bs, kv_bs = block_mask.BLOCK_SIZE

    target = None if interpret else device_target(device)
    mask_plan, score_traced, mods = forward_mods(query, block_mask, score_mod=score_mod, scale=scale,
                                                 interpret=interpret, target=target)
    if config is None:
        config = default_config(head_dim, head_dim_v, query.dtype, (q_bs, kv_bs), q_len, target=target,
                                dropout=dropout is not None)
        if choose_config is not None:
            config = choose_config(config, mods.key[:8])
    config = config.fitted(q_bs, kv_bs, q_len)

    out = torch.empty(batch, q_heads, q_len, head_dim_v, dtype=query.dtype, device=device)
    lse = torch.empty(batch, q_heads, q_len, dtype=torch.float32, device=device)
    layout = layout_arguments(block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.full_kv_num_blocks,
                              block_mask.full_kv_indices, device, FORWARD_LAYOUT, "m")
    arguments = forward_arguments(query, key, value, out, lse, layout, scale=scale,
                                  mask_captured=mask_plan.captured(device),
                                  score_captured=score_captured(score_traced, device), stats=stats,
                                  dropout=dropout)
    constexprs = kernel_constexprs(head_dim=head_dim, head_dim_v=head_dim_v, dtype=query.dtype,
                                   block_size=(q_bs, kv_bs), config=config, kv_len=kv_len, interpret=interpret,
                                   row_offsets_64=needs_64bit_rows(query, key, value, out),
                                   layout_offsets_64=needs_64bit_layout(layout), batch_heads=batch * q_heads,
                                   reverse_tiles=heavy_tiles_last(block_mask), target=target)
    constexprs["STORE_STATS"] = stats is not None
    constexprs["DROPOUT"] = dropout is not None
    grid = launch_grid(q_len, block_mask.num_blocks[0], q_bs, config.BLOCK_M, batch * q_heads)
    named = {**arguments, "MASK_FN": mods.mask_fn, "SCORE_FN": mods.score_fn, **constexprs}

    def run() -> None:
        launch(attention_forward_kernel, grid, named, interpret=interpret, device=device,
               num_warps=config.num_warps, num_stages=config.num_stages, options=config.amd_options)

    return run, out, lse
