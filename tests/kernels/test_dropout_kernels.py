"""Attention dropout in the prefill kernels (forward, dK/dV, dQ) under the Triton interpreter, on CPU tensors.

The kernels' keep decisions are read back with ``entry.dropout_keep_mask`` (a small kernel calling the same
``@triton.jit`` helper) and checked against an independent NumPy Philox4x32-10 of the documented counter
``((b * Hq + h) * Lq + i) * Lkv + j``; outputs and gradients are checked against a float64 dense reference
built from that mask, ``out = (softmax(s) * keep / (1 - p)) @ v`` with the lse of the softmax without
dropout, under the numerics rule (``tests/helpers/numerics.py``: the same dense formula in the input dtype
is the yardstick). Shapes stay tiny: the interpreter runs every program in NumPy.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import triton_attn as ta
from tests.helpers.numerics import BACKWARD_FACTOR, FORWARD_FACTOR, compare, random_qkv
from triton_attn.dropout import Dropout
from triton_attn.masks import causal_mask, softcap_score

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from triton_attn.kernels import entry, tuned  # noqa: E402
from triton_attn.kernels.attention import backward_launch, forward_launch  # noqa: E402
from triton_attn.kernels.attention.blocks import dropout_keep  # noqa: E402
from triton_attn.kernels.attention.configs import default_backward_config, default_config  # noqa: E402
from triton_attn.kernels.jit.modules import launch  # noqa: E402

P_DROP = 0.3


def make_dropout(p: float = P_DROP, seed: int = 0x1234_5678_9ABC_DEF) -> Dropout:
    """A ``Dropout`` whose seed has bits in both 32-bit halves (Philox's two key words)."""
    return Dropout(p, torch.tensor([seed], dtype=torch.int64))


# ---------------------------------------------------------------------------------------------
# The keep decision: Philox4x32-10 of the documented counter, as tl.rand draws it
# ---------------------------------------------------------------------------------------------

def philox_uniform(seed: int, counters: np.ndarray) -> np.ndarray:
    """``tl.rand(seed, counters)`` in NumPy: Philox4x32 with 10 rounds on (counter low, counter high, 0, 0)
    under the key (seed low, seed high), the first word mapped to a float32 in [0, 1)."""
    low32 = np.uint64(0xFFFFFFFF)
    round_a, round_b = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    key_a, key_b = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
    counters = counters.astype(np.uint64)
    c0, c1 = counters & low32, counters >> np.uint64(32)
    c2, c3 = np.zeros_like(c0), np.zeros_like(c0)
    k0, k1 = np.uint64(seed) & low32, (np.uint64(seed) >> np.uint64(32)) & low32
    for _ in range(10):
        product_b, product_a = round_b * c2, round_a * c0  # 32 x 32 bits: exact in 64
        c0, c1, c2, c3 = ((product_b >> np.uint64(32)) ^ c1 ^ k0, product_b & low32,
                          (product_a >> np.uint64(32)) ^ c3 ^ k1, product_a & low32)
        k0, k1 = (k0 + key_a) & low32, (k1 + key_b) & low32
    signed = c0.astype(np.uint32).view(np.int32)
    signed = np.where(signed < 0, ~signed, signed)
    return signed.astype(np.float32) * np.float32(4.6566127342e-10)


def reference_keep(dropout: Dropout, batch: int, q_heads: int, q_len: int, kv_len: int) -> torch.Tensor:
    """bool [B, Hq, Lq, Lkv]: the contract's keep decision, computed without Triton."""
    counters = np.arange(batch * q_heads * q_len * kv_len, dtype=np.uint64)  # the counter is the flat index
    uniform = philox_uniform(int(dropout.seed.item()), counters)
    return torch.from_numpy(uniform >= np.float32(dropout.p)).reshape(batch, q_heads, q_len, kv_len)


def test_the_mask_kernel_draws_philox_of_the_documented_counter():
    dropout = make_dropout()
    keep = entry.dropout_keep_mask(dropout, 2, 3, 37, 45, device=torch.device("cpu"), interpret=True)
    assert keep.dtype == torch.bool and keep.shape == (2, 3, 37, 45)
    assert torch.equal(keep, reference_keep(dropout, 2, 3, 37, 45))


@triton.jit
def keep_rows_kernel(Keep, dropout_seed, dropout_p, row_base, kv_len, ROWS: tl.constexpr, KEYS: tl.constexpr):
    """Keep [ROWS, KEYS] uint8: ``blocks.dropout_keep`` for rows ``row_base / kv_len + i``' first keys."""
    rows = tl.arange(0, ROWS)
    keys = tl.arange(0, KEYS)
    keep = dropout_keep(tl.load(dropout_seed), dropout_p, row_base.to(tl.int64), rows[:, None], keys[None, :], kv_len)
    tl.store(Keep + rows[:, None] * KEYS + keys[None, :], keep.to(tl.uint8))


def test_counters_past_32_bits_use_the_high_word():
    """(b * Hq + h) * Lq * Lkv passes 2**32 for large calls: the counter's high word feeds Philox too."""
    dropout = make_dropout()
    rows, keys, kv_len = 4, 16, 70_000
    row_base = 3 * 2 ** 32 // kv_len + 12_345  # (batch * Hq + head) * Lq, as the kernels pass it
    keep = torch.empty(rows, keys, dtype=torch.uint8)
    launch(keep_rows_kernel, (1,), dict(Keep=keep, dropout_seed=dropout.seed, dropout_p=dropout.p, row_base=row_base,
                                        kv_len=kv_len, ROWS=rows, KEYS=keys), interpret=True, device="cpu")
    counters = (row_base + np.arange(rows, dtype=np.uint64)[:, None]) * kv_len + np.arange(keys, dtype=np.uint64)
    assert counters.min() >= 2 ** 33
    expected = philox_uniform(int(dropout.seed.item()), counters) >= np.float32(dropout.p)
    assert np.array_equal(keep.numpy().astype(bool), expected)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_kept_fraction_is_one_minus_p(p):
    dropout = make_dropout(p, seed=20_260_101)
    keep = entry.dropout_keep_mask(dropout, 2, 3, 100, 130, device=torch.device("cpu"), interpret=True)
    count = keep.numel()
    sigma = math.sqrt(p * (1 - p) / count)
    assert abs(keep.double().mean().item() - (1 - p)) <= 5 * sigma
    # Neither rows nor keys share a pattern (the counter runs over both).
    assert not torch.equal(keep[0, 0, 0], keep[0, 0, 1]) and not torch.equal(keep[0, 0, :, 0], keep[0, 0, :, 1])


def test_the_mask_depends_on_the_seed_and_not_on_a_second_draw():
    first = entry.dropout_keep_mask(make_dropout(seed=1), 1, 2, 20, 33, device=torch.device("cpu"), interpret=True)
    again = entry.dropout_keep_mask(make_dropout(seed=1), 1, 2, 20, 33, device=torch.device("cpu"), interpret=True)
    other = entry.dropout_keep_mask(make_dropout(seed=2), 1, 2, 20, 33, device=torch.device("cpu"), interpret=True)
    assert torch.equal(first, again) and not torch.equal(first, other)


# ---------------------------------------------------------------------------------------------
# Forward and backward against the dense reference built from the mask
# ---------------------------------------------------------------------------------------------

def dropped_attention(q, k, v, allowed, keep, p: float, scale: float, score_mod=None):
    """(out, lse) of ``(softmax(s) * keep / (1 - p)) @ v`` with ``s = score_mod(scale * q k^T)`` masked by
    ``allowed`` ([B, Hq, Lq, Lkv] bools), in q's dtype; GQA by repeating K/V heads. A row with no allowed key
    gives out 0 and lse -inf (and no NaN in any gradient)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = (q @ k.transpose(-1, -2)) * scale
    if score_mod is not None:
        batch, heads, rows, keys = (torch.arange(n).view([-1 if d == i else 1 for d in range(4)])
                                    for i, n in enumerate(scores.shape))
        scores = score_mod(scores, batch, heads, rows, keys)
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, -1)
    empty = ~allowed.any(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(empty, 0.0), -1) * ~empty
    out = (probs * keep.to(q.dtype) / (1 - p)) @ v
    return out, lse


def run_reference(q, k, v, allowed, keep, p, scale, grad_out, grad_lse, dtype, score_mod=None):
    """(out, lse, dq, dk, dv) of ``dropped_attention`` computed in ``dtype`` with autograd."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    out, lse = dropped_attention(*leaves, allowed, keep, p, scale, score_mod)
    outputs, grads = [out], [grad_out.to(dtype)]
    if grad_lse is not None:
        finite = torch.isfinite(lse)
        outputs.append(torch.where(finite, lse, torch.zeros_like(lse)))
        grads.append(grad_lse.to(dtype) * finite)
    dq, dk, dv = torch.autograd.grad(outputs, leaves, grads)
    return out.detach(), lse.detach(), dq, dk, dv


def run_kernels(q, k, v, block_mask, dropout, scale, grad_out, grad_lse=None, score_mod=None):
    """(out, lse, dq, dk, dv) of the interpreted kernels through ``kernels.entry``."""
    stats = entry.new_softmax_stats(q)
    out, lse = entry.prefill_forward(q, k, v, block_mask, score_mod=score_mod, scale=scale, interpret=True,
                                     stats=stats, dropout=dropout)
    grads = entry.prefill_backward(q, k, v, out, lse, grad_out, grad_lse, block_mask, score_mod=score_mod,
                                   scale=scale, interpret=True, softmax_stats=stats, dropout=dropout)
    return (out, lse, *grads)


def check_against_reference(q, k, v, mask_mod, dropout, *, block_size, with_grad_lse=False, score_mod=None):
    batch, q_heads, q_len, head_dim = q.shape
    kv_len = k.shape[2]
    scale = head_dim ** -0.5
    block_mask = ta.create_block_mask(mask_mod, None, None, q_len, kv_len, BLOCK_SIZE=block_size)
    allowed = ta.create_mask(mask_mod, batch, q_heads, q_len, kv_len)
    keep = entry.dropout_keep_mask(dropout, batch, q_heads, q_len, kv_len, device=q.device, interpret=True)
    grad_out = torch.randn(batch, q_heads, q_len, v.shape[3]).to(q.dtype)
    grad_lse = torch.randn(batch, q_heads, q_len) if with_grad_lse else None

    got = run_kernels(q, k, v, block_mask, dropout, scale, grad_out, grad_lse, score_mod)
    golden = run_reference(q, k, v, allowed, keep, dropout.p, scale, grad_out, grad_lse, torch.float64, score_mod)
    baseline = run_reference(q, k, v, allowed, keep, dropout.p, scale, grad_out, grad_lse, q.dtype, score_mod)
    names = ("out", "lse", "dq", "dk", "dv")
    comparisons = [compare(name, actual, base, gold, FORWARD_FACTOR if index < 2 else BACKWARD_FACTOR, q.dtype)
                   for index, (name, actual, base, gold) in enumerate(zip(names, got, baseline, golden))]
    failed = [c for c in comparisons if not c.error <= c.bound]
    assert not failed, "; ".join(map(str, comparisons))
    return got, allowed


def causal_at(offset: int):
    """Causal with the queries at the end of the keys (Lq != Lkv): row i sees keys <= i + offset."""
    def mask_mod(b, h, q_idx, kv_idx):
        return causal_mask(b, h, q_idx + offset, kv_idx)
    return mask_mod


@pytest.mark.parametrize("dtype,head_dim", [(torch.float32, 32), (torch.bfloat16, 64), (torch.float32, 64),
                                            (torch.bfloat16, 32)],
                         ids=["float32-d32", "bfloat16-d64", "float32-d64", "bfloat16-d32"])
def test_forward_and_backward_match_the_dense_reference(dtype, head_dim):
    torch.manual_seed(3)
    q, k, v = random_qkv(2, 4, 2, 45, 77, head_dim, dtype=dtype)  # GQA 2, Lq != Lkv, ragged blocks
    check_against_reference(q, k, v, causal_at(32), make_dropout(), block_size=32)


def test_a_gradient_on_the_lse_sees_no_dropout():
    torch.manual_seed(4)
    q, k, v = random_qkv(1, 2, 1, 40, 56, 32, dtype=torch.float32)
    check_against_reference(q, k, v, causal_at(16), make_dropout(0.5), block_size=16, with_grad_lse=True)


def test_a_score_mod_and_its_derivative_meet_the_dropout():
    torch.manual_seed(7)
    q, k, v = random_qkv(1, 4, 2, 36, 60, 32, dtype=torch.bfloat16)
    check_against_reference(q * 3, k, v, causal_at(24), make_dropout(0.2), block_size=16,
                            score_mod=softcap_score(2.0))


def test_rows_without_a_visible_key_give_zero_and_no_nan():
    def every_third_row_empty(b, h, q_idx, kv_idx):
        return (q_idx % 3 != 0) & (kv_idx <= q_idx + 10)

    torch.manual_seed(5)
    q, k, v = random_qkv(1, 4, 2, 40, 50, 32, dtype=torch.bfloat16)
    (out, lse, dq, dk, dv), allowed = check_against_reference(q, k, v, every_third_row_empty, make_dropout(),
                                                              block_size=16)
    for tensor in (out, lse, dq, dk, dv):
        assert not torch.isnan(tensor).any()
    assert (out[:, :, ::3] == 0).all() and (dq[:, :, ::3] == 0).all()
    assert torch.isinf(lse[:, :, ::3]).all() and (lse[:, :, ::3] < 0).all()


def test_the_same_seed_gives_bitwise_equal_results_and_another_seed_does_not():
    torch.manual_seed(6)
    q, k, v = random_qkv(1, 2, 2, 33, 40, 32, dtype=torch.float16)
    block_mask = ta.create_block_mask(causal_at(7), None, None, 33, 40, BLOCK_SIZE=16)
    grad_out = torch.randn(1, 2, 33, 32).to(q.dtype)
    first = run_kernels(q, k, v, block_mask, make_dropout(seed=11), 0.2, grad_out)
    again = run_kernels(q, k, v, block_mask, make_dropout(seed=11), 0.2, grad_out)
    other = run_kernels(q, k, v, block_mask, make_dropout(seed=12), 0.2, grad_out)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), first, again):
        assert torch.equal(a, b), name
    assert torch.equal(first[1], other[1])  # the lse has no dropout
    for index in (0, 2, 3, 4):
        assert not torch.equal(first[index], other[index])


# ---------------------------------------------------------------------------------------------
# Compiled launches: dropout takes the default tiles for dropout, never the tuner
# ---------------------------------------------------------------------------------------------

def test_compiled_dropout_launches_skip_the_tuner_and_take_the_dropout_tiles(monkeypatch):
    def no_tuning(*args, **kwargs):
        raise AssertionError("a dropout launch consulted the tuner")

    monkeypatch.setattr(tuned, "forward_chooser", no_tuning)
    monkeypatch.setattr(tuned, "backward_chooser", no_tuning)
    calls = []
    for module in (forward_launch, backward_launch):
        monkeypatch.setattr(module, "launch", lambda kernel, grid, named, **options: calls.append(named))
    q, k, v = random_qkv(1, 4, 2, 256, 256, 64, dtype=torch.float16)
    block_mask = ta.create_block_mask(causal_mask, None, None, 256, 256, BLOCK_SIZE=128)
    dropout = make_dropout()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out, lse = entry.prefill_forward(q, k, v, block_mask, score_mod=None, scale=0.125, interpret=False,
                                         autotune=True, dropout=dropout)
        entry.prefill_backward(q, k, v, out, lse, torch.randn_like(out), None, block_mask, score_mod=None,
                               scale=0.125, interpret=False, autotune=True, dropout=dropout)
    forward, *backward = calls
    expected = default_config(64, 64, q.dtype, (128, 128), 256, dropout=True)
    assert forward["DROPOUT"] and forward["dropout_seed"] is dropout.seed and forward["dropout_p"] == dropout.p
    assert (forward["BLOCK_M"], forward["BLOCK_N"]) == (expected.BLOCK_M, expected.BLOCK_N)
    tiles = default_backward_config(64, 64, q.dtype, (128, 128), 256, 256, dropout=True)
    dkdv, dq = [named for named in backward if "DK" in named], [named for named in backward if "DQ" in named]
    assert dkdv and dq and all(named["DROPOUT"] and named["dropout_seed"] is dropout.seed for named in dkdv + dq)
    assert (dkdv[0]["BLOCK_M"], dkdv[0]["BLOCK_N"]) == (tiles.dkdv.BLOCK_M, tiles.dkdv.BLOCK_N)
    assert (dq[0]["BLOCK_M"], dq[0]["BLOCK_N"]) == (tiles.dq.BLOCK_M, tiles.dq.BLOCK_N)
