"""The kernels' entry points, one per kernel family: tuned config (cache lookup, a search when
autotuning asks), then the launch. The top of the kernels layer: nothing inside ``kernels/`` imports it.

Which family a call takes is decided above (``dispatch.py``); inputs arrive validated (``api/``).
Tensors are [B, H, L, D] (query [B, Hq, Lq, D], key [B, Hkv, Lkv, D], value [B, Hkv, Lkv, Dv]);
``interpret`` runs the same kernels under the Triton interpreter on CPU tensors (never tuned).
``autotune``: True searches when nothing is cached, False never searches, None asks
``TRITON_ATTN_AUTOTUNE``; a cached winner is used whenever there is one (compiled launches only).
A prefill call with attention dropout (``dropout``, ``triton_attn.dropout.Dropout``) launches the default
config: the tuned winners (searched, cached and AOT-pruned without dropout) are not its.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple

import torch

from ..dropout import Dropout
from ..masks.block_mask import BlockMask
from . import tuned
from .attention import backward_launch, dropout_mask, forward_launch
from .attention.configs import KernelConfig
from .decode import launch as decode_launch
from .decode.paged import PagedDecode
from .host import new_softmax_stats

__all__ = ["prefill_forward", "prefill_backward", "dropout_keep_mask", "decode_forward", "paged_plan", "paged_forward",
           "new_softmax_stats"]


def prefill_forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: BlockMask, *,
                    score_mod: Optional[Callable], scale: float, interpret: bool, autotune: Optional[bool] = None,
                    stats: Optional[torch.Tensor] = None,
                    config: Optional[KernelConfig] = None,
                    dropout: Optional[Dropout] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The prefill forward kernel (any Lq). Returns out [B, Hq, Lq, Dv] (input dtype) and lse [B, Hq, Lq]
    float32 (natural log). ``stats``: an empty float32 [B, Hq, Lq, 2] (``new_softmax_stats``) the kernel
    fills for ``prefill_backward``; None: not written. ``config``: launch these tiles (``flex_attention``'s
    kernel_options), no tuning. ``dropout``: attention dropout, out = (P * keep / (1 - p)) @ V with the keep
    decisions of ``dropout_keep_mask``; lse and stats are those without dropout (default config)."""
    choose = None
    if config is None and not interpret and dropout is None:
        choose = tuned.forward_chooser(query, key, value, block_mask, score_mod=score_mod, scale=scale,
                                       autotune=autotune, stats=stats)
    return forward_launch.attention_forward(query, key, value, block_mask, score_mod=score_mod, scale=scale,
                                            interpret=interpret, config=config, choose_config=choose, stats=stats,
                                            dropout=dropout)


def prefill_backward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, out: torch.Tensor,
                     lse: torch.Tensor, grad_out: Optional[torch.Tensor], grad_lse: Optional[torch.Tensor],
                     block_mask: BlockMask, *, score_mod: Optional[Callable], scale: float, interpret: bool,
                     autotune: Optional[bool] = None, softmax_stats: Optional[torch.Tensor] = None,
                     dropout: Optional[Dropout] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of the prefill forward, shaped and typed like (query, key, value).

    out [B, Hq, Lq, Dv] and lse [B, Hq, Lq] from the forward; grad_out like out, grad_lse like lse
    (either None = zero). ``softmax_stats``: the forward's [B, Hq, Lq, 2] statistics (None: derived
    from lse). ``dropout``: the forward's ``Dropout`` (same p and seed; default config). Raises
    ``backward_launch.UnsupportedBackwardError`` before any launch for what the Triton backward cannot
    differentiate."""
    choose = None
    if not interpret and dropout is None:
        choose = tuned.backward_chooser(query, key, value, out, lse, grad_out, grad_lse, block_mask,
                                        score_mod=score_mod, scale=scale, autotune=autotune,
                                        softmax_stats=softmax_stats)
    return backward_launch.attention_backward(query, key, value, out, lse, grad_out, grad_lse, block_mask,
                                              score_mod=score_mod, scale=scale, interpret=interpret,
                                              choose_config=choose, softmax_stats=softmax_stats, dropout=dropout)


def dropout_keep_mask(dropout: Dropout, batch: int, q_heads: int, q_len: int, kv_len: int, *,
                      device: torch.device, interpret: bool) -> torch.Tensor:
    """The keep decisions of ``dropout`` in a prefill call of these sizes, as the kernels make them: bool
    [B, Hq, Lq, Lkv], True where the probability of (batch, query head, query row, key) is kept (for tests
    and ``return_dropout_mask=True``). Made by a small kernel on ``device`` (``interpret``: under the
    Triton interpreter, CPU tensors)."""
    return dropout_mask.dropout_keep_mask(dropout, batch, q_heads, q_len, kv_len, device=device, interpret=interpret)


def decode_forward(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, block_mask: BlockMask, *,
                   score_mod: Optional[Callable], scale: float, interpret: bool,
                   autotune: Optional[bool] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The split-KV decode kernel on contiguous K/V (meant for Lq <= ``decode.configs.MAX_DECODE_Q_LEN``;
    no softmax statistics, so no backward). Returns out [B, Hq, Lq, Dv] and lse [B, Hq, Lq] float32,
    as ``prefill_forward`` does."""
    choose = None
    if not interpret:
        choose = tuned.decode_chooser(query, key, value, block_mask, score_mod=score_mod, scale=scale,
                                      autotune=autotune)
    return decode_launch.run_decode(query, key, value, block_mask, score_mod=score_mod, scale=scale,
                                    interpret=interpret, choose_config=choose)


def paged_plan(page_table: torch.Tensor, kv_lens: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, *,
               num_q_heads: int, q_len: int, mask_mod: Optional[Callable], score_mod: Optional[Callable],
               scale: float, interpret: bool, lengths: Optional[Sequence[int]] = None) -> PagedDecode:
    """``paged_attention`` on the decode kernel (any Lq), planned: a ``decode.paged.PagedDecode`` whose
    ``run(query, key_cache, value_cache)`` launches with no device read. page_table int32 [B, max_pages],
    kv_lens int32 [B] (``lengths``: the same as ints, when read), K/V pages [num_pages, Hkv, page_size, D /
    Dv] (mods at logical positions: ``masks/paged.py``). Tuned like decode; searches only when
    ``TRITON_ATTN_AUTOTUNE`` asks."""
    make_chooser = None
    if not interpret:
        def make_chooser(query, block_mask, logical_score_mod, plan_table, plan_lens):
            # A search launches with the plan's own buffers, which its logical mask reads.
            return tuned.decode_chooser(query, key_cache, value_cache, block_mask, score_mod=logical_score_mod,
                                        scale=scale, page_table=plan_table, kv_lens=plan_lens, autotune=None)
    return PagedDecode(page_table, kv_lens, key_cache, value_cache, num_q_heads=num_q_heads, q_len=q_len,
                       mask_mod=mask_mod, score_mod=score_mod, scale=scale, interpret=interpret, lengths=lengths,
                       make_chooser=make_chooser)


def paged_forward(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, page_table: torch.Tensor,
                  kv_lens: torch.Tensor, *, mask_mod: Optional[Callable], score_mod: Optional[Callable], scale: float,
                  interpret: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """One ``paged_attention`` call: ``paged_plan`` then its ``run``. query [B, Hq, Lq, D] at the end of each
    sequence. Returns out [B, Hq, Lq, Dv] and lse [B, Hq, Lq] float32."""
    plan = paged_plan(page_table, kv_lens, key_cache, value_cache, num_q_heads=query.shape[1], q_len=query.shape[2],
                      mask_mod=mask_mod, score_mod=score_mod, scale=scale, interpret=interpret)
    return plan.run(query, key_cache, value_cache)
