"""``flash_attn_with_kvcache`` (FlashAttention-2's signature over our paged path) against FlashAttention-2's
semantics in float64 (``tests/helpers/flash_reference.py``).

Each case builds a cache (rows, or shuffled pages with a block table), lets the call append k / v (rotated
when rotary tables are given) and attend, and checks: the cache against our own copy updated by plain
indexing, and out / lse against ``flash_reference`` over that copy, under the numerics rule (the yardstick:
the same attention computed in the input dtype). Backends: ``torch`` and ``interpret``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Tuple

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import triton_attn as ta
from tests.helpers.flash_reference import flash_reference
from tests.helpers.numerics import FORWARD_FACTOR, compare
from triton_attn.dispatch import MAX_DECODE_Q_LEN


@dataclass
class Case:
    """One call's configuration. page_size None: a row cache [B_cache, L_cache, Hkv, D]."""
    backend: str = "torch"
    dtype: torch.dtype = torch.float32
    batch: int = 2
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    q_len: int = 1
    new_len: int = 1
    page_size: Optional[int] = None
    cache_len: int = 128                      # row cache: L_cache; paged: max_blocks_per_seq * page_size
    batch_idx: bool = False
    causal: bool = False
    window: Tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    alibi: Optional[str] = None               # "H" or "BH"
    leftpad: bool = False
    rotary: Optional[Tuple[int, bool]] = None  # (rotary_dim, interleaved)
    seqlens_as: str = "int32"                 # "int32", "int64", "int" (one length for all)
    short: bool = False                       # some cache_seqlens + L_new < Lq
    extra: dict = field(default_factory=dict)


def rotate_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                     interleaved: bool) -> torch.Tensor:
    """x [B, L, heads, D] rotated at positions [B, L] through complex multiplication (float32)."""
    rotary_dim = 2 * cos.shape[1]
    part = x[..., :rotary_dim].float()
    if interleaved:
        pairs = part.reshape(*part.shape[:-1], rotary_dim // 2, 2)
    else:
        pairs = torch.stack(part.chunk(2, dim=-1), dim=-1)
    turn = torch.complex(cos[positions].float(), sin[positions].float()).unsqueeze(2)    # [B, L, 1, R/2]
    turned = torch.view_as_real(torch.view_as_complex(pairs.contiguous()) * turn)
    turned = turned.flatten(-2) if interleaved else torch.cat(turned.unbind(-1), dim=-1)
    return torch.cat([turned.to(x.dtype), x[..., rotary_dim:]], dim=-1)


def same_dtype_attention(q, k, v, *, lens, starts, causal, window, softcap, slopes, scale):
    """FlashAttention-2's attention computed in the inputs' dtype (the yardstick of the numerics rule):
    q [B, Lq, H, D], k / v [B, Lk, Hkv, D]; returns (out [B, Lq, H, Dv], lse [B, H, Lq] float32)."""
    batch, q_len, heads, _ = q.shape
    groups = heads // k.shape[2]
    k, v = k.repeat_interleave(groups, dim=2), v.repeat_interleave(groups, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q, k) * scale
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    i = torch.arange(q_len).view(1, 1, -1, 1)
    j = torch.arange(k.shape[1]).view(1, 1, 1, -1)
    diag = i + lens.view(-1, 1, 1, 1) - q_len
    visible = (j < lens.view(-1, 1, 1, 1)) & (j >= starts.view(-1, 1, 1, 1))
    left, right = window[0], 0 if causal else window[1]
    if left >= 0:
        visible = visible & (j >= diag - left)
    if right >= 0:
        visible = visible & (j <= diag + right)
    if slopes is not None:
        scores = scores - (slopes.view(batch, heads, 1, 1) * (diag - j).abs()).to(scores.dtype)
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores.float(), dim=-1)
    probs = torch.softmax(scores.masked_fill(~visible.any(-1, keepdim=True), 0.0), dim=-1)
    probs = probs.masked_fill(~visible.any(-1, keepdim=True), 0.0)
    return torch.einsum("bhij,bjhd->bihd", probs, v), lse


class Problem:
    """Random inputs of a ``Case`` and the reference copy of its cache."""

    def __init__(self, case: Case, generator: torch.Generator):
        self.case = c = case
        draw = lambda *shape: torch.randn(*shape, generator=generator).to(c.dtype)  # noqa: E731
        randint = lambda low, high: int(torch.randint(low, high + 1, (1,), generator=generator))  # noqa: E731
        head_dim = c.head_dim
        if c.page_size is None:
            rows = c.batch + (2 if c.batch_idx else 0)
            self.k_cache, self.v_cache = draw(rows, c.cache_len, c.kv_heads, head_dim), draw(rows, c.cache_len,
                                                                                            c.kv_heads, head_dim)
            self.block_table = None
            self.cache_batch_idx = (torch.randperm(rows, generator=generator)[:c.batch].to(torch.int32)
                                    if c.batch_idx else None)
        else:
            per_seq = c.cache_len // c.page_size
            num_blocks = c.batch * per_seq + 3
            self.k_cache = draw(num_blocks, c.page_size, c.kv_heads, head_dim)
            self.v_cache = draw(num_blocks, c.page_size, c.kv_heads, head_dim)
            pages = torch.randperm(num_blocks, generator=generator)[:c.batch * per_seq]       # shuffled pages
            self.block_table = pages.view(c.batch, per_seq).to(torch.int32)
            self.cache_batch_idx = None
        self.q = draw(c.batch, c.q_len, c.heads, head_dim)
        self.k = draw(c.batch, c.new_len, c.kv_heads, head_dim) if c.new_len else None
        self.v = draw(c.batch, c.new_len, c.kv_heads, head_dim) if c.new_len else None
        top = c.cache_len - c.new_len
        if c.short:
            seqlens = [randint(0, max(0, c.q_len - c.new_len - 1)) for _ in range(c.batch)]
        else:
            seqlens = [randint(max(0, c.q_len - c.new_len), top) for _ in range(c.batch)]
        seqlens[0] = top if not c.short else seqlens[0]
        if c.seqlens_as == "int":
            seqlens = [seqlens[0]] * c.batch
        self.seqlens = seqlens
        self.leftpad = [randint(0, s) for s in seqlens] if c.leftpad else [0] * c.batch
        self.rotary = None
        if c.rotary is not None:
            seqlen_ro = c.cache_len + 4
            angles = torch.rand(seqlen_ro, c.rotary[0] // 2, generator=generator) * 2 * math.pi
            self.rotary = (angles.cos().to(c.dtype), angles.sin().to(c.dtype))
        self.slopes = None
        if c.alibi == "H":
            self.slopes = torch.rand(c.heads, generator=generator)
        elif c.alibi == "BH":
            self.slopes = torch.rand(c.batch, c.heads, generator=generator)

    def arguments(self) -> dict:
        c = self.case
        cache_seqlens = {"int": self.seqlens[0], "int32": torch.tensor(self.seqlens, dtype=torch.int32),
                         "int64": torch.tensor(self.seqlens, dtype=torch.int64)}[c.seqlens_as]
        cos, sin = self.rotary if self.rotary is not None else (None, None)
        return dict(k=self.k, v=self.v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=cache_seqlens,
                    cache_batch_idx=self.cache_batch_idx, block_table=self.block_table,
                    cache_leftpad=torch.tensor(self.leftpad, dtype=torch.int32) if c.leftpad else None,
                    causal=c.causal, window_size=c.window, softcap=c.softcap, alibi_slopes=self.slopes,
                    rotary_interleaved=True if c.rotary is None else c.rotary[1], backend=c.backend, **c.extra)

    def location(self, b: int, position: int):
        """(cache index tuple) of logical position ``position`` of sequence b."""
        if self.block_table is None:
            row = b if self.cache_batch_idx is None else int(self.cache_batch_idx[b])
            return row, position
        return int(self.block_table[b, position // self.case.page_size]), position % self.case.page_size

    def expected(self):
        """(k_cache, v_cache after the append, written bool mask of the cache rows, q as attended,
        K [B, Lk, Hkv, D], V) by plain indexing."""
        c = self.case
        k_cache, v_cache = self.k_cache.clone(), self.v_cache.clone()
        written = torch.zeros(k_cache.shape[:2], dtype=torch.bool)
        q, k = self.q, self.k
        if k is not None and self.rotary is not None:
            cos, sin = self.rotary
            start = torch.tensor(self.seqlens).view(-1, 1)
            k = rotate_reference(k, cos, sin, start + torch.arange(c.new_len), c.rotary[1])
            per_row = c.causal or tuple(c.window) != (-1, -1)
            q = rotate_reference(q, cos, sin, start + (torch.arange(c.q_len) if per_row else 0) +
                                 torch.zeros(c.q_len, dtype=torch.long), c.rotary[1])
        lengths = [s + c.new_len for s in self.seqlens]
        for b in range(c.batch):
            for t in range(c.new_len):
                where = self.location(b, self.seqlens[b] + t)
                k_cache[where], v_cache[where] = k[b, t], self.v[b, t]
                written[where] = True
        longest = max(1, max(lengths))
        key = torch.zeros(c.batch, longest, c.kv_heads, c.head_dim, dtype=c.dtype)
        value = torch.zeros_like(key)
        for b in range(c.batch):
            for position in range(lengths[b]):
                where = self.location(b, position)
                key[b, position], value[b, position] = k_cache[where], v_cache[where]
        return k_cache, v_cache, written, q, key, value


def check_case(case: Case, seed: int = 0, return_lse: bool = True):
    generator = torch.Generator().manual_seed(seed)
    problem = Problem(case, generator)
    k_cache, v_cache = problem.k_cache.clone(), problem.v_cache.clone()
    q_before = problem.q.clone()
    result = ta.flash_attn_with_kvcache(problem.q, k_cache, v_cache, **problem.arguments(),
                                        return_softmax_lse=return_lse)
    out, lse = result if return_lse else (result, None)
    expected_k, expected_v, written, q, key, value = problem.expected()
    assert torch.equal(problem.q, q_before), "q changed"
    for name, got, want in (("k_cache", k_cache, expected_k), ("v_cache", v_cache, expected_v)):
        assert torch.equal(got[~written], want[~written]), f"{name} changed outside the appended tokens"
        torch.testing.assert_close(got[written], want[written], msg=f"{name}: appended tokens")  # rotary: ulps

    lens = torch.tensor([s + case.new_len for s in problem.seqlens])
    starts = torch.tensor(problem.leftpad)
    scale = case.extra.get("softmax_scale") or case.head_dim ** -0.5
    slopes = problem.slopes
    gold_out, gold_lse = flash_reference(q, key, value, causal=case.causal, window=case.window, softcap=case.softcap,
                                         alibi_slopes=slopes, scale=scale, kv_lens=lens.tolist(),
                                         key_start=starts.tolist())
    full_slopes = None if slopes is None else (slopes.expand(case.batch, case.heads) if slopes.dim() == 1 else slopes)
    base_out, base_lse = same_dtype_attention(q, key, value, lens=lens, starts=starts, causal=case.causal,
                                              window=case.window, softcap=case.softcap, slopes=full_slopes,
                                              scale=scale)
    assert out.shape == (case.batch, case.q_len, case.heads, case.head_dim) and out.dtype == case.dtype
    assert out.is_contiguous()
    comparisons = [compare("out", out, base_out, gold_out, FORWARD_FACTOR, case.dtype)]
    if return_lse:
        assert lse.shape == (case.batch, case.heads, case.q_len) and lse.dtype == torch.float32
        comparisons.append(compare("lse", lse, base_lse, gold_lse, FORWARD_FACTOR, case.dtype))
    failed = [c for c in comparisons if not c.error <= c.bound]
    assert not failed, f"{case}: " + "; ".join(map(str, comparisons))


BF16, FP32 = torch.bfloat16, torch.float32

CASES = {
    "torch-fp32-paged16-gqa-causal-rotary": Case(
        backend="torch", dtype=FP32, head_dim=64, batch=3, q_len=1, new_len=1, page_size=16, cache_len=160,
        causal=True, rotary=(32, True)),
    "interpret-bf16-rows-idx-mqa-window-softcap-alibiH-leftpad-neox": Case(
        backend="interpret", dtype=BF16, head_dim=80, heads=3, kv_heads=1, q_len=3, new_len=3, cache_len=96,
        batch_idx=True, causal=True, window=(8, -1), softcap=5.0, alibi="H", leftpad=True, rotary=(32, False)),
    "interpret-fp32-paged32-noncausal-alibiBH-int-seqlens-rotary": Case(
        backend="interpret", dtype=FP32, head_dim=128, heads=2, kv_heads=2, q_len=3, new_len=1, page_size=32,
        cache_len=128, alibi="BH", seqlens_as="int", rotary=(64, True)),
    "torch-bf16-rows-chunked-prefill-leftpad": Case(
        backend="torch", dtype=BF16, head_dim=32, q_len=MAX_DECODE_Q_LEN + 4, new_len=MAX_DECODE_Q_LEN + 4,
        cache_len=160, causal=True, leftpad=True, rotary=(16, True), seqlens_as="int64"),
    "interpret-bf16-paged16-chunked-prefill-gqa": Case(
        backend="interpret", dtype=BF16, head_dim=64, q_len=MAX_DECODE_Q_LEN + 4, new_len=MAX_DECODE_Q_LEN + 4,
        page_size=16, cache_len=96, causal=True),
    "torch-fp32-paged32-prefill-past-one-query-block": Case(
        backend="torch", dtype=FP32, q_len=140, new_len=140, page_size=32, cache_len=288, causal=True, leftpad=True),
    "interpret-fp32-rows-two-sided-window-softcap-scale": Case(
        backend="interpret", dtype=FP32, head_dim=32, heads=2, kv_heads=1, q_len=4, new_len=2, cache_len=64,
        window=(5, 2), softcap=3.0, alibi="BH", extra={"softmax_scale": 0.2}),
    "torch-fp32-rows-short-sequences-causal": Case(
        backend="torch", dtype=FP32, q_len=6, new_len=1, cache_len=64, causal=True, short=True, leftpad=True),
    "interpret-bf16-paged16-short-sequences-noncausal": Case(
        backend="interpret", dtype=BF16, q_len=5, new_len=0, page_size=16, cache_len=64, short=True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_flash_reference(name):
    check_case(CASES[name])


def test_whole_cache_without_seqlens_and_out_only():
    case = Case(backend="torch", dtype=BF16, head_dim=64, heads=2, kv_heads=1, q_len=2, new_len=0, cache_len=48,
                causal=True)
    generator = torch.Generator().manual_seed(1)
    problem = Problem(case, generator)
    out = ta.flash_attn_with_kvcache(problem.q, problem.k_cache, problem.v_cache, causal=True, backend="torch")
    gold, _ = flash_reference(problem.q, problem.k_cache, problem.v_cache, causal=True)
    base, _ = same_dtype_attention(problem.q, problem.k_cache, problem.v_cache, lens=torch.full((2,), 48),
                                   starts=torch.zeros(2, dtype=torch.long), causal=True, window=(-1, -1),
                                   softcap=0.0, slopes=None, scale=64 ** -0.5)
    comparison = compare("out", out, base, gold, FORWARD_FACTOR, BF16)
    assert comparison.error <= comparison.bound, str(comparison)


def test_num_splits_is_a_hint_and_rows_without_keys():
    """num_splits 0, 1, 3 give the same result; a row that sees no key (causal, before the first key) is 0
    with lse -inf."""
    generator = torch.Generator().manual_seed(2)
    problem = Problem(Case(backend="interpret", q_len=4, new_len=0, cache_len=32, causal=True), generator)
    results = []
    for splits in (0, 1, 3):
        results.append(ta.flash_attn_with_kvcache(problem.q, problem.k_cache, problem.v_cache, cache_seqlens=2,
                                                  causal=True, num_splits=splits, return_softmax_lse=True,
                                                  backend="interpret"))
    for out, lse in results[1:]:
        assert torch.equal(out, results[0][0]) and torch.equal(lse, results[0][1])
    out, lse = results[0]
    assert torch.equal(out[:, :2], torch.zeros_like(out[:, :2]))          # rows 0, 1 sit before key 0
    assert torch.isneginf(lse[..., :2]).all() and torch.isfinite(lse[..., 2:]).all()


@pytest.mark.parametrize("backend", ["torch", "interpret"])
def test_short_sequences_never_see_the_filler_page(backend):
    """seqlen_k < Lq moves positions right by filler table slots naming page 0: a NaN there changes nothing."""
    generator = torch.Generator().manual_seed(4)
    k_cache, v_cache = torch.randn(3, 64, 1, 32, generator=generator), torch.randn(3, 64, 1, 32, generator=generator)
    k_cache[0], v_cache[0] = float("nan"), float("nan")     # row 0 = page 0, used by no sequence
    q = torch.randn(2, 5, 2, 32, generator=generator)
    seqlens, rows = torch.tensor([2, 40], dtype=torch.int32), torch.tensor([2, 1], dtype=torch.int32)
    out, lse = ta.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, cache_batch_idx=rows,
                                         return_softmax_lse=True, backend=backend)
    gold_out, gold_lse = flash_reference(q, k_cache[rows.long()], v_cache[rows.long()], kv_lens=[2, 40])
    torch.testing.assert_close(out, gold_out.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, gold_lse.float(), rtol=1e-5, atol=1e-5)


@st.composite
def cases(draw):
    page_size = draw(st.sampled_from([None, 16, 32]))
    heads, kv_heads = draw(st.sampled_from([(2, 1), (4, 2), (2, 2), (3, 1)]))
    q_len = draw(st.sampled_from([1, 2, 5]))
    new_len = draw(st.sampled_from([0, 1, q_len]))
    head_dim = draw(st.sampled_from([32, 64]))
    return Case(
        backend=draw(st.sampled_from(["torch", "torch", "interpret"])),
        dtype=draw(st.sampled_from([FP32, BF16])), batch=draw(st.integers(1, 3)), heads=heads, kv_heads=kv_heads,
        head_dim=head_dim, q_len=q_len, new_len=new_len, page_size=page_size,
        cache_len=draw(st.sampled_from([64, 96, 128])),
        batch_idx=page_size is None and draw(st.booleans()), causal=draw(st.booleans()),
        window=(draw(st.sampled_from([-1, -1, 0, 3, 20])), draw(st.sampled_from([-1, -1, 0, 2]))),
        softcap=draw(st.sampled_from([0.0, 0.0, 4.0])), alibi=draw(st.sampled_from([None, None, "H", "BH"])),
        leftpad=draw(st.booleans()),
        rotary=draw(st.sampled_from([None, (head_dim // 2, True), (head_dim, False)])) if new_len else None,
        seqlens_as=draw(st.sampled_from(["int32", "int64", "int"])), short=draw(st.sampled_from([False] * 4 + [True])))


@settings(max_examples=15, deadline=None)
@given(case=cases(), seed=st.integers(0, 2 ** 16))
def test_random_calls_match_flash_reference(case, seed):
    check_case(case, seed)


# -- errors ------------------------------------------------------------------------------------------

def _base(paged: bool):
    generator = torch.Generator().manual_seed(3)
    case = Case(q_len=2, new_len=2, page_size=16 if paged else None, cache_len=64, batch_idx=not paged,
                rotary=(16, True))
    problem = Problem(case, generator)
    arguments = dict(q=problem.q, k_cache=problem.k_cache, v_cache=problem.v_cache, **problem.arguments())
    return problem, arguments


ERRORS = [
    (False, lambda a: a.update(q=a["q"][0]), ValueError, r"q must be a 4-D tensor"),
    (False, lambda a: a.update(k_cache=a["k_cache"].double()), TypeError, r"k_cache must be float16"),
    (False, lambda a: a.update(v_cache=a["v_cache"][:, :32]), ValueError, r"v_cache must be"),
    (False, lambda a: a.update(q=a["q"][..., :16]), ValueError, r"q and k_cache must have the same head_dim"),
    (False, lambda a: a.update(q=a["q"][:, :, :3]), ValueError, r"H=3 must be a multiple of k_cache's heads Hkv=2"),
    (False, lambda a: a.update(k_cache=a["k_cache"][:, :40], v_cache=a["v_cache"][:, :40]), ValueError,
     r"L_cache .* multiple of 16"),
    (True, lambda a: a.update(block_table=a["block_table"].long()), TypeError, r"block_table must be int32"),
    (True, lambda a: a.update(cache_batch_idx=torch.zeros(2, dtype=torch.int32)), ValueError,
     r"cache_batch_idx cannot be used with block_table"),
    (False, lambda a: a.update(cache_batch_idx=a["cache_batch_idx"].long()), TypeError,
     r"cache_batch_idx must be int32"),
    (False, lambda a: a.update(cache_seqlens=a["cache_seqlens"].float()), TypeError,
     r"cache_seqlens must be int32 or int64"),
    (False, lambda a: a.update(cache_seqlens=None), ValueError, r"cache_seqlens must be given with k and v"),
    (False, lambda a: a.update(cache_seqlens=-1), ValueError, r"cache_seqlens must be an int >= 0"),
    (False, lambda a: a.update(v=None), ValueError, r"k and v must be given together"),
    (False, lambda a: a.update(k=a["k"][:, :1]), ValueError, r"k and v must have the same L_new"),
    (False, lambda a: a.update(k=a["k"].to(torch.float16)), TypeError, r"k must have its cache's dtype"),
    (False, lambda a: a.update(k=None, v=None), ValueError, r"rotary_cos / rotary_sin need k and v"),
    (False, lambda a: a.update(rotary_sin=None), ValueError, r"rotary_cos and rotary_sin must be given together"),
    (False, lambda a: a.update(rotary_cos=torch.zeros(70, 20), rotary_sin=torch.zeros(70, 20)), ValueError,
     r"rotary_dim = 2 \* rotary_cos.shape\[1\] = 40 must be at most head_dim D=32"),
    (False, lambda a: a.update(cache_leftpad=torch.zeros(2, dtype=torch.int64)), TypeError,
     r"cache_leftpad must be int32"),
    (False, lambda a: a.update(cache_leftpad=torch.full((2,), 1000, dtype=torch.int32)), ValueError,
     r"cache_leftpad\[0\]=1000 must lie in \[0, cache_seqlens\[0\]="),
    (False, lambda a: a.update(cache_seqlens=torch.tensor([1, 63], dtype=torch.int32)), ValueError,
     r"cache_seqlens\[1\] \+ L_new = 63 \+ 2 = 65 exceeds the cache: a row of k_cache holds L_cache = 64"),
    (True, lambda a: a["block_table"].__setitem__((1, 0), 99), ValueError,
     r"block_table\[1, 0\]=99 is not a block of k_cache"),
    (False, lambda a: a["cache_batch_idx"].__setitem__(1, -1), ValueError,
     r"cache_batch_idx\[1\]=-1 is not a row of k_cache"),
    (False, lambda a: a.update(window_size=(2,)), ValueError, r"window_size must be a pair"),
    (False, lambda a: a.update(causal=1), TypeError, r"causal must be a bool"),
    (False, lambda a: a.update(softcap=-1.0), ValueError, r"softcap must be a float >= 0"),
    (False, lambda a: a.update(alibi_slopes=torch.ones(3)), ValueError, r"alibi_slopes must be \[H\] = \[4\]"),
    (False, lambda a: a.update(alibi_slopes=torch.ones(4, dtype=torch.float64)), TypeError,
     r"alibi_slopes must be float32"),
    (False, lambda a: a.update(softmax_scale=float("nan")), TypeError, r"softmax_scale must be a finite float"),
    (False, lambda a: a.update(num_splits=-1), ValueError, r"num_splits must be an int >= 0"),
    (False, lambda a: a.update(return_softmax_lse=None), TypeError, r"return_softmax_lse must be a bool"),
    (False, lambda a: a.update(backend="cuda"), ValueError, r"backend must be one of"),
    (False, lambda a: a.update(block_table=None, cache_batch_idx=torch.zeros(2, dtype=torch.int32, device="meta")),
     ValueError, r"cache_batch_idx must be on q's device cpu"),
    (False, lambda a: a.update(k=a["k"].requires_grad_()), NotImplementedError, r"has no backward pass"),
]


@pytest.mark.parametrize("paged,mutate,error,match", ERRORS, ids=[e[3][:40] for e in ERRORS])
def test_errors_name_the_argument_and_leave_the_cache(paged, mutate, error, match):
    problem, arguments = _base(paged)
    mutate(arguments)
    k_cache, v_cache = arguments["k_cache"].clone(), arguments["v_cache"].clone()
    with pytest.raises(error, match=match):
        ta.flash_attn_with_kvcache(**arguments)
    assert torch.equal(arguments["k_cache"], k_cache) and torch.equal(arguments["v_cache"], v_cache)
