"""The SDPA route of the ``torch`` backend: calls that PyTorch's own fused CPU kernel computes exactly.

``sdpa_attention`` runs ``aten::_scaled_dot_product_flash_attention_for_cpu`` forward and its
``..._backward`` op backward -- the kernels ``F.scaled_dot_product_attention`` itself runs on CPU for every
mask form (no mask, ``is_causal``, a boolean mask turned into a ``-inf`` bias, ``enable_gqa``), so this route
is as fast as the ``sdpa`` column of ``bench/bench_attention.py``. It serves three kinds of call: no mask;
the causal family (``masks.recognize.is_causal``); a dense boolean ``keep`` mask small enough to materialize.

What the op does, checked on torch 2.13 (tests/backends/test_sdpa.py pins each point):

- ``is_causal`` is top-left aligned, ``q_idx >= kv_idx``, for any ``Lq`` and ``Lkv`` (as our masks), so
  every causal call qualifies. It masks by replacing scores, so a NaN key hidden from a row by causality
  does not reach that row.
- GQA: ``Hq`` a multiple of ``Hkv`` is handled by the op itself, forward and backward (query head ``h``
  reads K/V head ``h // (Hq / Hkv)``, as ``repeat_interleave``); K/V are never repeated. Folding the
  query heads into rows (as ``cpu_flash`` does) measured no faster here, so calls are passed as they are.
- K/V broadcast over the batch (stride 0) and ``[B, L, H, D]`` views are read correctly; a last dim of
  stride != 1 is read *wrongly* (no error), so such inputs are made contiguous first.
- A row whose every key is masked (dense ``keep`` only) gets output 0 and logsumexp 0 from the op, and
  gradients 0 in the backward (its probabilities are ``exp(-inf - 0) = 0``); the lse returned here is
  set to ``-inf`` there, our contract. ``Lq == 0`` or ``Lkv == 0`` crashes the process (SIGFPE), so empty
  calls never reach the op.
- The dense mask enters as an additive bias: a NaN or inf in a key the mask hides still reaches the row
  (``nan + -inf = nan``), where the exact paths keep it out. So with ``keep``, an output holding a NaN
  makes ``sdpa_attention`` return None (one reduction over the output), and the caller takes an exact
  path, which then gives NaN exactly in the rows that see a NaN key. Without a mask no key is hidden.
- The op's logsumexp is not differentiable (its autograd formula ignores it). A gradient flowing into the
  returned lse is handled here: ``dS = P * (dP - rowsum(dO * O) + dLSE)``, computed by the same backward
  op on inputs padded by a few columns (Q, K with zeros, V with a column of ones, dO with a column of dLSE,
  the saved output with zeros: then ``dP`` gains ``dLSE`` and the row sum does not). Exact, and only paid
  for when the lse gradient is not None.
- The logsumexp of a row that sees a NaN is NaN from the op; it is returned as ``-inf``, as the dense
  specification (``reference.dense_attention``) and the blockwise backend return it.

Dtypes (``SDPA_DTYPES``): float32 and float64, and bfloat16 / float16 (the op accumulates in float32 and
rounds once; within the numerics rule of docs/design.md, tested). The lse is float32 (float64 for float64).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

__all__ = ["SDPA_DTYPES", "available", "supports", "sdpa_attention"]

SDPA_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# Extra columns of the padded backward that carries an lse gradient (one carries it, the rest keep rows
# of a friendly width for the kernel's vector loops).
LSE_GRAD_PAD = 8


def _forward_op():
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _backward_op():
    return getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)


def available() -> bool:
    """Whether this torch build has the fused CPU flash-attention ops."""
    return _forward_op() is not None and _backward_op() is not None


def supports(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether ``sdpa_attention`` computes this call exactly: CPU tensors of one dtype in ``SDPA_DTYPES``,
    ``D == Dv > 0`` (the op requires one head size), ``Hq`` a multiple of ``Hkv``, and the ops present."""
    return (query.device.type == "cpu" and key.device.type == "cpu" and value.device.type == "cpu"
            and query.dtype in SDPA_DTYPES and key.dtype == query.dtype and value.dtype == query.dtype
            and query.shape[-1] == key.shape[-1] == value.shape[-1] > 0
            and key.shape[1] > 0 and query.shape[1] % key.shape[1] == 0 and available())


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    # The op reads rows of D contiguous elements whatever the last stride says (see the module docstring).
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _keep_4d(keep: torch.Tensor, shape: Tuple[int, int, int, int]) -> torch.Tensor:
    """``keep`` (bool, broadcastable to ``shape`` = [B, Hq, Lq, Lkv]) as a 4-d view, or a clear error."""
    if keep.dtype != torch.bool:
        raise TypeError(f"sdpa_attention: keep must be a bool tensor (True = attend), got dtype {keep.dtype}")
    if keep.dim() > 4:
        raise ValueError(f"sdpa_attention: keep must broadcast to [B, Hq, Lq, Lkv] = {list(shape)}, "
                         f"got shape {tuple(keep.shape)}")
    keep = keep.reshape((1,) * (4 - keep.dim()) + tuple(keep.shape))  # the op takes 2-d or 4-d masks only
    try:
        broadcast = torch.broadcast_shapes(keep.shape, shape)
    except RuntimeError:
        broadcast = None
    if broadcast != torch.Size(shape):
        raise ValueError(f"sdpa_attention: keep must broadcast to [B, Hq, Lq, Lkv] = {list(shape)}, "
                         f"got shape {tuple(keep.shape)}")
    return keep


def _attended_rows(keep: torch.Tensor, causal: bool, shape) -> torch.Tensor:
    """Bool [B, Hq, Lq]: whether each query row may attend to some key (``keep`` 4-d, from ``_keep_4d``)."""
    if not causal:
        return keep.any(-1).expand(shape[:3])
    # Causal too: row q attends when its first kept key is at or before q (a padding-style keep of one
    # row [B, H, 1, Lkv] stays one row until this comparison).
    first_kept = keep.to(torch.uint8).argmax(-1)  # 0 for a row with no kept key, hence the any()
    return (keep.any(-1) & (first_kept <= torch.arange(shape[2]))).expand(shape[:3])


def _public_lse(lse: torch.Tensor, empty_rows: Optional[torch.Tensor]) -> torch.Tensor:
    """The op's lse with our contract: -inf for a row with no allowed key, and for a row that saw a NaN."""
    if empty_rows is not None:
        lse = lse.masked_fill(empty_rows, -math.inf)
    # One elementwise pass, no host read (a decode step pays for every kernel launch and sync).
    return lse.nan_to_num(nan=-math.inf, posinf=math.inf, neginf=-math.inf)


def _backward(grad_out, grad_lse, query, key, value, out, lse, bias, causal: bool, scale: float):
    """(dq, dk, dv) of the op's attention; ``grad_lse`` (or None) is a gradient on the logsumexp."""
    backward = _backward_op()
    grad_out = _last_dim_contiguous(grad_out)
    if grad_lse is None:
        return backward(grad_out, query, key, value, out, lse, 0.0, causal, attn_mask=bias, scale=scale)
    # Padded columns (module docstring): scores unchanged (zero columns of Q and K), dP gains grad_lse
    # (V's column of ones times dO's column of grad_lse), rowsum(dO * O) unchanged (O's column of zeros).
    grad_lse = torch.nan_to_num(grad_lse.to(query.dtype), nan=0.0)  # a -inf row's lse gradient is 0 anyway

    def pad(t, column=None):
        extra = t.new_zeros(t.shape[:-1] + (LSE_GRAD_PAD,))
        if column is not None:
            extra[..., 0] = column
        return torch.cat([t, extra], dim=-1)

    dq, dk, dv = backward(pad(grad_out, grad_lse), pad(query), pad(key), pad(value, 1.0), pad(out), lse, 0.0,
                          causal, attn_mask=bias, scale=scale)
    head_dim = query.shape[-1]
    return dq[..., :head_dim], dk[..., :head_dim], dv[..., :head_dim]


class _SdpaFunction(torch.autograd.Function):
    """The op pair with an lse that carries gradients (``_backward``)."""

    @staticmethod
    def forward(ctx, query, key, value, bias, empty_rows, causal, scale):
        out, lse = _forward_op()(query, key, value, 0.0, causal, attn_mask=bias, scale=scale)
        ctx.save_for_backward(query, key, value, bias, out, lse)
        ctx.causal, ctx.scale = causal, scale
        ctx.set_materialize_grads(False)
        return out, _public_lse(lse, empty_rows)

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        query, key, value, bias, out, lse = ctx.saved_tensors
        if grad_out is None and grad_lse is None:
            return None, None, None, None, None, None, None
        grad_out = torch.zeros_like(out) if grad_out is None else grad_out
        dq, dk, dv = _backward(grad_out, grad_lse, query, key, value, out, lse, bias, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None, None, None


def _empty_result(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
    """No query rows, heads or batch, or no keys: out 0 and lse -inf everywhere, gradients 0 (the op would
    crash on ``Lq == 0`` or ``Lkv == 0``)."""
    batch, q_heads, q_len, _ = query.shape
    lse_dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    lse = torch.full((batch, q_heads, q_len), -math.inf, dtype=lse_dtype)
    out = query.new_zeros(batch, q_heads, q_len, value.shape[-1])
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        # Exact zeros that depend on the inputs (sums over no element), so that autograd gives zero
        # gradients rather than None, whatever the inputs hold.
        out = out + (query[..., :0].sum() + key[..., :0].sum() + value[..., :0].sum())
    return out, lse


def sdpa_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, causal: bool,
                   keep: Optional[torch.Tensor], scale: float
                   ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """Attention through PyTorch's fused CPU kernels, differentiable w.r.t. query, key and value (and
    through the returned lse).

    query [B, Hq, Lq, D]; key, value [B, Hkv, Lkv, D] (Hq a multiple of Hkv; K/V may be stride-0 views over
    B); ``causal``: attend where ``q_idx >= kv_idx`` (top-left); ``keep``: None or a bool mask broadcastable
    to [B, Hq, Lq, Lkv] (True = attend), combined with ``causal`` if both are given; ``scale`` multiplies
    the scores. ``supports(query, key, value)`` must hold.

    Returns (out [B, Hq, Lq, D] in the input dtype, with the op's layout -- the query's stride order --
    lse [B, Hq, Lq] natural log, float32 or float64 for float64): rows with no allowed key give 0 and -inf,
    and gradients 0. Returns None when ``keep`` is given and the output holds a NaN (a NaN/inf key or value
    the mask hides may have leaked in through the additive bias; the caller takes an exact path).
    """
    if not supports(query, key, value):
        raise ValueError(
            "sdpa_attention: expected CPU query/key/value of one dtype in "
            f"{[str(d) for d in SDPA_DTYPES]} with one head size and Hq a multiple of Hkv, got "
            f"query {query.dtype} {tuple(query.shape)} on {query.device}, key {key.dtype} {tuple(key.shape)}, "
            f"value {value.dtype} {tuple(value.shape)}" + ("" if available() else " (this torch has no fused CPU op)"))
    if query.numel() == 0 or key.shape[2] == 0:
        return _empty_result(query, key, value)
    query, key, value = (_last_dim_contiguous(t) for t in (query, key, value))
    shape = (query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    causal, scale = bool(causal), float(scale)
    bias = empty_rows = None
    if keep is not None:
        keep = _keep_4d(keep, shape)
        bias = torch.zeros(keep.shape, dtype=query.dtype).masked_fill_(~keep, -math.inf)
        attended = _attended_rows(keep, causal, shape)
        empty_rows = None if bool(attended.all()) else ~attended
    if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        out, lse = _SdpaFunction.apply(query, key, value, bias, empty_rows, causal, scale)
    else:
        out, lse = _forward_op()(query, key, value, 0.0, causal, attn_mask=bias, scale=scale)
        lse = _public_lse(lse, empty_rows)
    if bias is not None and math.isnan(float(out.detach().sum())):
        return None
    return out, lse
