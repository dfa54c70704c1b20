"""Ring attention over torch.distributed: each rank keeps its query shard, key/value shards travel.

Forward, at step ``s`` of ``P`` rank ``r`` holds the key/value shard of rank ``(r - s) mod P``. It
posts the send of that shard to ``r + 1`` and the receive of the next one from ``r - 1``, computes
``attention(q, k_step, v_step, block_mask=step mask, return_lse=True)`` meanwhile (or nothing, when
the step's mask has no non-empty tile), then merges the partial result by its LSE in float32.

Backward rotates the key/value shards again. With the final ``out``/``lse`` saved, the gradient of
step ``s`` is that of the public ``attention()`` for the cotangents

    grad_out_s = w_s * grad_out,   grad_lse_s = w_s * (rowsum(grad_out * (out_s - out)) + grad_lse),
    w_s = exp(lse_s - lse)

(the share of the merged softmax that step ``s`` holds). dQ accumulates locally; dK/dV of a shard
accumulate in float32 on a buffer that travels one rank behind the shard and arrives home after
the last step. Every shard's gradient is summed in the same rank order on every call, so results
are deterministic for a fixed world size. Memory per rank stays O(L / P): three key/value shards
(own, in flight, arriving) and two gradient buffers; no rank ever holds the full sequence.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..api import attention
from ..masks.closure import captured_tensors
from .balance import check_sequence_length, layout_positions, resolve_load_balance
from .plan import FULL, StepMasks, global_score_mod, plan_steps
from .report import active_recorders, allowed_pairs
from .sharding import group_rank_and_size

# Message tags (gloo matches point-to-point messages by peer and tag; NCCL ignores them).
KEY_TAG, VALUE_TAG, GRAD_KEY_TAG, GRAD_VALUE_TAG = 1, 2, 3, 4


class RingExchange:
    """Point-to-point traffic around the ring: send to rank + 1, receive from rank - 1."""

    def __init__(self, group, rank: int, world_size: int):
        self.group = group
        self.world_size = world_size
        self.next_peer = self._global_rank((rank + 1) % world_size)
        self.prev_peer = self._global_rank((rank - 1) % world_size)

    def _global_rank(self, group_rank: int) -> int:
        if self.group is None or self.group is dist.group.WORLD:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    def start(self, send: Sequence[torch.Tensor], tags: Sequence[int]) -> "PendingTransfer":
        """Post the send of ``send`` and the receive of same-shaped tensors; returns without waiting."""
        received = [torch.empty_like(t) for t in send]
        ops = [dist.P2POp(dist.isend, t, self.next_peer, self.group, tag) for t, tag in zip(send, tags)]
        ops += [dist.P2POp(dist.irecv, t, self.prev_peer, self.group, tag) for t, tag in zip(received, tags)]
        return PendingTransfer(dist.batch_isend_irecv(ops), list(send), received)


class PendingTransfer:
    """Posted sends/receives; ``wait()`` returns the received tensors. Keeps the sent tensors alive."""

    def __init__(self, works, sent: List[torch.Tensor], received: List[torch.Tensor]):
        self.works, self.sent, self.received = works, sent, received

    def wait(self) -> List[torch.Tensor]:
        for work in self.works:
            work.wait()
        self.sent = []
        return self.received


class RingContext:
    """Everything a ring pass needs besides the tensors: layout, step masks, mods, options."""

    def __init__(self, plan: StepMasks, exchange: Optional[RingExchange], rank: int, score_mod: Optional[Callable],
                 scale: float, enable_gqa: bool, backend: Optional[str]):
        self.plan, self.exchange, self.rank = plan, exchange, rank
        self.score_mod, self.scale, self.enable_gqa, self.backend = score_mod, scale, enable_gqa, backend
        self.recorders = active_recorders()

    @property
    def world_size(self) -> int:
        return len(self.plan.sources)

    def step_attention(self, step: int, query, key, value):
        """attention() of the local queries against the shard visiting at ``step``: (out, lse)."""
        source = self.plan.sources[step]
        positions = self.plan.positions
        score_mod = None if self.score_mod is None else global_score_mod(
            self.score_mod, positions[self.rank], positions[source])
        block_mask = self.plan.masks[step]
        return attention(query, key, value, score_mod=score_mod, block_mask=None if block_mask is FULL else block_mask,
                         scale=self.scale, enable_gqa=self.enable_gqa, return_lse=True, backend=self.backend)


def merge_step(out_acc: torch.Tensor, lse_acc: torch.Tensor, out_step: torch.Tensor,
               lse_step: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Merge a step's (out, lse) into the running float32 (out ``[B, H, L, Dv]``, lse ``[B, H, L]``).

    ``out_acc`` is updated in place (one temporary of its size, not three).
    """
    lse_new = torch.logaddexp(lse_acc, lse_step)
    # Rows that attended to nothing so far stay -inf; exp(-inf - 0) = 0 keeps their output 0.
    anchor = torch.where(torch.isinf(lse_new), torch.zeros_like(lse_new), lse_new)
    out_acc.mul_(torch.exp(lse_acc - anchor).unsqueeze(-1))
    out_acc.add_(out_step.float() * torch.exp(lse_step - anchor).unsqueeze(-1))
    return out_acc, lse_new


def ring_forward(ctx: RingContext, query: torch.Tensor, key: torch.Tensor,
                 value: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """out ``[B, Hq, L_local, Dv]`` in query.dtype and lse ``[B, Hq, L_local]`` float32."""
    batch, q_heads, q_len, _ = query.shape
    out = torch.zeros(batch, q_heads, q_len, value.shape[-1], dtype=torch.float32, device=query.device)
    lse = torch.full((batch, q_heads, q_len), float("-inf"), dtype=torch.float32, device=query.device)
    key_step, value_step = key.contiguous(), value.contiguous()
    skipped = []
    for step in range(ctx.world_size):
        pending = None
        if step < ctx.world_size - 1:
            pending = ctx.exchange.start([key_step, value_step], (KEY_TAG, VALUE_TAG))
        if ctx.plan.masks[step] is None:
            skipped.append(step)
        else:
            out_step, lse_step = ctx.step_attention(step, query, key_step, value_step)
            out, lse = merge_step(out, lse, out_step, lse_step)
        if pending is not None:
            key_step, value_step = pending.wait()
    _record_forward(ctx, skipped, query.shape[0], q_heads)
    return out.to(query.dtype), lse


def _record_forward(ctx: RingContext, skipped: List[int], batch: int, heads: int) -> None:
    if not ctx.recorders:
        return
    pairs = 0
    for mask in ctx.plan.masks:
        if mask is FULL:
            pairs += batch * heads * ctx.plan.positions.shape[1] ** 2
        elif mask is not None:
            pairs += allowed_pairs(mask, batch, heads)
    for stats in ctx.recorders:
        stats.forward_calls += 1
        stats.forward_steps_skipped += len(skipped)
        stats.forward_steps_computed += ctx.world_size - len(skipped)
        stats.allowed_pairs += pairs
        stats.skipped_steps.append(list(skipped))


def step_gradients(ctx: RingContext, step: int, query, key_step, value_step, out, lse, grad_out, grad_lse,
                   learnable: Sequence[torch.Tensor]):
    """Gradients of one ring step: (dq, dk, dv, d_learnable...) with None for unused ones."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(True) for t in (query, key_step, value_step)]
        out_step, lse_step = ctx.step_attention(step, *leaves)
    finite = torch.isfinite(lse)
    share = torch.where(finite, torch.exp(lse_step.detach() - torch.where(finite, lse, torch.zeros_like(lse))),
                        torch.zeros_like(lse))
    grad_out32 = grad_out.float()
    grad_out_step = (grad_out32 * share.unsqueeze(-1)).to(out_step.dtype)
    grad_lse_step = share * ((grad_out32 * (out_step.detach().float() - out.float())).sum(-1) + grad_lse)
    outputs = [(o, g) for o, g in ((out_step, grad_out_step), (lse_step, grad_lse_step)) if o.requires_grad]
    wrt = leaves + list(learnable)
    if not outputs:
        return [None] * len(wrt)
    return list(torch.autograd.grad([o for o, _ in outputs], wrt, [g for _, g in outputs], allow_unused=True))


def _add(total: Optional[torch.Tensor], part: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if part is None:
        return total
    return part.float() if total is None else total.add_(part.float())


def ring_backward(ctx: RingContext, query, key, value, out, lse, grad_out, grad_lse, learnable):
    """(dq, dk, dv, d_learnable list) for this rank's shards; dk/dv are summed over every rank's queries."""
    grad_query = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
    grad_learnable: List[Optional[torch.Tensor]] = [None] * len(learnable)
    key_step, value_step = key.contiguous(), value.contiguous()
    grad_pending: Optional[PendingTransfer] = None
    skipped = 0
    for step in range(ctx.world_size):
        kv_pending = None
        if step < ctx.world_size - 1:
            kv_pending = ctx.exchange.start([key_step, value_step], (KEY_TAG, VALUE_TAG))
        parts = [None] * (3 + len(learnable))
        if ctx.plan.masks[step] is None:
            skipped += 1
        else:
            parts = step_gradients(ctx, step, query, key_step, value_step, out, lse, grad_out, grad_lse, learnable)
            _add(grad_query, parts[0])
            grad_learnable = [_add(total, part) for total, part in zip(grad_learnable, parts[3:])]
        # The gradient buffer of the visiting shard arrives from the rank that visited it last step.
        if step == 0:
            grad_key = torch.zeros(key.shape, dtype=torch.float32, device=key.device)
            grad_value = torch.zeros(value.shape, dtype=torch.float32, device=value.device)
        else:
            grad_key, grad_value = grad_pending.wait()
        _add(grad_key, parts[1])
        _add(grad_value, parts[2])
        if ctx.world_size > 1:  # on to the next visitor; after the last step, that is the shard's home
            grad_pending = ctx.exchange.start([grad_key, grad_value], (GRAD_KEY_TAG, GRAD_VALUE_TAG))
        if kv_pending is not None:
            key_step, value_step = kv_pending.wait()
    if grad_pending is not None:
        grad_key, grad_value = grad_pending.wait()
    for stats in ctx.recorders:
        stats.backward_steps_skipped += skipped
        stats.backward_steps_computed += ctx.world_size - skipped
    return grad_query, grad_key, grad_value, grad_learnable


class RingAttentionFunction(torch.autograd.Function):
    """apply(ctx, query, key, value, *learnable) -> (out, lse); ``learnable``: tensors the score_mod
    captured that require grad (their gradients are this rank's share, like any replicated weight)."""

    @staticmethod
    def forward(fn_ctx, ring_ctx: RingContext, query, key, value, *learnable):
        out, lse = ring_forward(ring_ctx, query, key, value)
        fn_ctx.ring_ctx = ring_ctx
        fn_ctx.save_for_backward(query, key, value, out, lse, *learnable)
        return out, lse

    @staticmethod
    def backward(fn_ctx, grad_out, grad_lse):
        query, key, value, out, lse, *learnable = fn_ctx.saved_tensors
        grad_query, grad_key, grad_value, grad_learnable = ring_backward(
            fn_ctx.ring_ctx, query, key, value, out, lse, grad_out, grad_lse, learnable)
        grad_learnable = [torch.zeros_like(t) if g is None else g.to(t.dtype)
                          for t, g in zip(learnable, grad_learnable)]
        return (None, grad_query.to(query.dtype), grad_key.to(key.dtype), grad_value.to(value.dtype),
                *grad_learnable)


def _check_local_tensors(query, key, value, enable_gqa: bool) -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            got = f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"context_parallel_attention: {name} must be this rank's 4-D shard "
                             f"[B, H, L / P, D], got {got}")
    if not (key.shape[2] == value.shape[2] == query.shape[2]):
        raise ValueError("context_parallel_attention: query, key and value shards must have the same length "
                         f"(self-attention over one sharded sequence), got {query.shape[2]}, {key.shape[2]}, "
                         f"{value.shape[2]}")
    if query.shape[1] != key.shape[1] and not enable_gqa:
        raise ValueError(f"query has Hq={query.shape[1]} heads but key/value have Hkv={key.shape[1]}; "
                         "pass enable_gqa=True for grouped-query attention")
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"GQA needs query heads Hq={query.shape[1]} to be a multiple of key/value heads "
                         f"Hkv={key.shape[1]}")


def context_parallel_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                               mask_mod: Optional[Callable] = None, score_mod: Optional[Callable] = None,
                               group=None, load_balance="head_tail", scale: Optional[float] = None,
                               enable_gqa: bool = False, return_lse: bool = False, backend: Optional[str] = None):
    """Attention over a sequence sharded across the ranks of ``group`` (ring attention).

    query: ``[B, Hq, L / P, D]``, key: ``[B, Hkv, L / P, D]``, value: ``[B, Hkv, L / P, Dv]``: this rank's
    shards, as ``shard_sequence(..., load_balance=load_balance)`` cuts them (L divisible by 2 x P).
    mask_mod / score_mod see global positions; B and H broadcast as in ``create_block_mask``.
    Returns this rank's out ``[B, Hq, L / P, Dv]`` (and lse ``[B, Hq, L / P]`` float32 with
    ``return_lse``), equal to the matching rows of ``attention()`` on the full sequence. Every rank
    of the group must call it with the same shapes and arguments.
    """
    _check_local_tensors(query, key, value, enable_gqa)
    rank, world_size = group_rank_and_size(group)
    seq_len = query.shape[2] * world_size
    check_sequence_length(seq_len, world_size,
                          f"the global sequence length (query.shape[2] x world size = {query.shape[2]} x {world_size})")
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    balancer = resolve_load_balance(load_balance)
    positions = layout_positions(balancer, seq_len, world_size)
    plan = plan_steps(mask_mod, query.shape[0], query.shape[1], positions, rank, balancer.key(),
                      balancer.alignment(seq_len, world_size), query.device)
    exchange = RingExchange(group, rank, world_size) if world_size > 1 else None
    ring_ctx = RingContext(plan, exchange, rank, score_mod, scale, enable_gqa, backend)
    learnable = [t for t in captured_tensors(score_mod) if t.requires_grad] if score_mod is not None else []
    out, lse = RingAttentionFunction.apply(ring_ctx, query, key, value, *learnable)
    return (out, lse) if return_lse else out
