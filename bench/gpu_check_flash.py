"""``flash`` section of ``bench/gpu_check.py``: the FlashAttention-2 drop-ins on a real GPU.

Correctness (PASS/FAIL rows; the numerics rule of docs/design.md as ``gpu_check_quick.rule``: max error
against a float64 golden result at most 2x (forward) / 3x (backward) that of the same computation in the
input dtype, plus the floor), golden results from ``flash_golden`` below (FlashAttention-2's documented
semantics computed directly, bottom-right aligned; the tests' ``tests/helpers/flash_reference.py`` states
the same, but bench code does not import tests):

- ``func_<case>``: ``ta.flash_attn_func`` per head_dim (args.head_dims), forward (out, lse) and backward
  (dq, dk, dv): ``causal_gqa_alibi`` (causal with Lq != Lk, GQA 4:1, ALiBi slopes ``[B, H]``) and
  ``window_softcap`` (a two-sided window around the diagonal, softcap 5, GQA);
- ``varlen_causal``: ``ta.flash_attn_varlen_func`` over a packed batch of 8 sequences of varied lengths,
  causal, forward + backward, each sequence against its own golden result;
- ``kvcache_decode`` / ``kvcache_chunk``: ``ta.flash_attn_with_kvcache`` over a paged cache (shuffled pages,
  ragged lengths), appending 1 / 16 new tokens, causal; the pages read back must equal the reference copy
  (the in-place append) exactly;
- ``dropout``: ``flash_attn_func(dropout_p=0.1, return_dropout_mask=True)``, forward + backward against the
  golden result built from the returned keep-mask; the kept fraction near 1 - p; a second call after the
  same ``torch.manual_seed`` bitwise equal (out, mask, gradients).

Speed (CUDA only; median of CUDA-event timings): ``flash_attn_func`` forward and forward + backward at
B 4, H 16, L 2048, D 128 bf16 causal vs ``torch.nn.functional.scaled_dot_product_attention``; the same
with dropout 0.1 vs 0.0; ``flash_attn_varlen_func`` over 8 packed sequences (lengths spread 4x) vs
``flash_attn_func`` over the same batch padded to the longest. TFLOP/s count the useful (causal) work.

A step that raises is a FAIL row (out of GPU memory: a skipped row) and the next step runs. Without CUDA
(``--dry-run``, the CPU tests) the correctness steps run at tiny shapes on the given backend.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
from gpu_check_backward import time_ms
from gpu_check_quick import fill_pages, gather_pages, randn, rule, shuffled_table

import triton_attn as ta

SOFTCAP = 5.0  # small enough to bend unit-variance scores: a check that ignored it fails
DROPOUT_P = 0.1
FUNC_CASES = ("causal_gqa_alibi", "window_softcap")


def flash_shapes(args) -> dict:
    """The section's shapes: GPU sizes, or the dry run's tiny ones (``args.tiny``)."""
    if getattr(args, "tiny", args.dry_run):
        return dict(batch=2, heads=4, kv_heads=2, q_len=21, kv_len=48, head_dims=list(args.head_dims),
                    window=(9, 3), varlen_lengths=(17, 5, 40, 1, 23, 9, 31, 12), varlen_dim=16, varlen_heads=2,
                    cache_lengths=(30, 14, 47), page_size=16, cache_heads=(4, 2), cache_dim=16, chunk=16,
                    dropout=dict(batch=1, heads=2, seq=40, head_dim=16), timing=None)
    return dict(batch=2, heads=8, kv_heads=2, q_len=509, kv_len=args.check_seq, head_dims=list(args.head_dims),
                window=(192, 64), varlen_lengths=(700, 129, 1024, 64, 511, 900, 257, 333), varlen_dim=128,
                varlen_heads=8, cache_lengths=(1021, 37, 513, 2047), page_size=64, cache_heads=(16, 4),
                cache_dim=128, chunk=16, dropout=dict(batch=1, heads=4, seq=512, head_dim=128),
                timing=dict(batch=4, heads=16, seq=2048, head_dim=128,
                            varlen_lengths=(2048, 512, 1536, 768, 1792, 1024, 640, 1280)))


# -- the golden result ---------------------------------------------------------------------------------------

def flash_golden(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                 window: Tuple[int, int] = (-1, -1), softcap: float = 0.0, alibi: Optional[torch.Tensor] = None,
                 kv_lens: Optional[Sequence[int]] = None, keep: Optional[torch.Tensor] = None,
                 dropout_p: float = 0.0, compute_dtype: torch.dtype = torch.float64):
    """FlashAttention-2's attention, every step in ``compute_dtype`` (differentiable): q ``[B, Lq, H, D]``, k/v
    ``[B, Lk, Hkv, D]``; query i at key position ``i + kv_lens[b] - Lq``; causal / window ``(left, right)``
    (-1 unbounded) around it; softcap, then ALiBi ``- slope[b, h] * |diag - j|`` (alibi float32 ``[B, H]``);
    keys ``>= kv_lens[b]`` absent; ``keep`` bool ``[B, H, Lq, Lk]`` multiplies the probabilities by
    ``keep / (1 - dropout_p)``. Returns (out ``[B, Lq, H, D]``, lse ``[B, H, Lq]``); no visible key: 0, -inf."""
    batch, q_len, heads, dim = q.shape
    k_len, groups = k.shape[1], heads // k.shape[2]
    qf = q.to(compute_dtype)
    kf, vf = (t.to(compute_dtype).repeat_interleave(groups, dim=2) for t in (k, v))
    scores = torch.einsum("bihd,bjhd->bhij", qf, kf) * dim ** -0.5
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    lens = torch.tensor(list(kv_lens) if kv_lens is not None else [k_len] * batch, device=q.device).view(-1, 1, 1, 1)
    i = torch.arange(q_len, device=q.device).view(1, 1, -1, 1)
    j = torch.arange(k_len, device=q.device).view(1, 1, 1, -1)
    diag = i + lens - q_len
    visible = j < lens
    left, right = window[0], 0 if causal else window[1]
    if left >= 0:
        visible = visible & (j >= diag - left)
    if right >= 0:
        visible = visible & (j <= diag + right)
    if alibi is not None:
        scores = scores - alibi.to(compute_dtype).view(batch, heads, 1, 1) * (diag - j).abs().to(compute_dtype)
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    seen = visible.any(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(~seen, 0.0), dim=-1) * seen
    if keep is not None:
        probs = probs * keep.to(compute_dtype) / (1.0 - dropout_p)
    return torch.einsum("bhij,bjhd->bihd", probs, vf), lse


def _with_grads(fn: Callable, leaves: Sequence[torch.Tensor], grad_out: torch.Tensor, dtype) -> tuple:
    """(forward outputs..., dq, dk, dv) of ``fn(*leaves as dtype)`` (fn returns a tuple, out first); the
    gradients of <out, grad_out>."""
    inputs = [t.detach().to(dtype).requires_grad_() for t in leaves]
    outputs = fn(*inputs)
    grads = torch.autograd.grad(outputs[0], inputs, grad_out.to(outputs[0].dtype))
    return (*(t.detach() for t in outputs), *grads)


def _judge(got: tuple, golden_fn: Callable, leaves, grad_out, dtype, names=("out", "lse", "dq", "dk", "dv")) -> dict:
    """Row fields of the numerics rule: ``got`` (named ``names``) against ``golden_fn`` in float64 (golden) and in
    ``dtype`` (the baseline); forward outputs 2x, gradients (the last three) 3x."""
    golden = _with_grads(golden_fn, leaves, grad_out, torch.float64)
    baseline = _with_grads(golden_fn, leaves, grad_out, dtype)
    factors = [2.0] * (len(names) - 3) + [3.0] * 3
    return rule(list(zip(names, got, baseline, golden, factors)), dtype)


# -- correctness steps -----------------------------------------------------------------------------------------

def func_rows(shape: dict, device, dtype, backend: Optional[str]) -> List[dict]:
    """One row per (case, head_dim): flash_attn_func's out, lse, dq, dk, dv vs the golden result."""
    generator = torch.Generator().manual_seed(11)
    batch, heads, kv_heads, q_len, kv_len = (shape[key] for key in ("batch", "heads", "kv_heads", "q_len", "kv_len"))
    rows = []
    for head_dim in shape["head_dims"]:
        for case in FUNC_CASES:
            label = dict(section="flash", mask=f"func_{case}", seq=kv_len, head_dim=head_dim, batch=batch,
                         impl="flash_attn_func")

            def compare(case=case, head_dim=head_dim):
                leaves = [randn(batch, length, h, head_dim, dtype=dtype, device=device, generator=generator)
                          for length, h in ((q_len, heads), (kv_len, kv_heads), (kv_len, kv_heads))]
                grad_out = randn(batch, q_len, heads, head_dim, dtype=dtype, device=device, generator=generator)
                if case == "causal_gqa_alibi":
                    alibi = (torch.rand(batch, heads, generator=generator) * 0.3 + 0.01).to(device)
                    options = dict(causal=True, alibi_slopes=alibi)
                    golden = dict(causal=True, alibi=alibi)
                else:
                    options = dict(window_size=shape["window"], softcap=SOFTCAP)
                    golden = dict(window=shape["window"], softcap=SOFTCAP)
                got = _with_grads(lambda q, k, v: ta.flash_attn_func(q, k, v, return_attn_probs=True, backend=backend,
                                                                     **options)[:2], leaves, grad_out, dtype)
                row = _judge(got, lambda q, k, v: flash_golden(q, k, v, compute_dtype=q.dtype, **golden), leaves,
                             grad_out, dtype)
                note = f"{row['note']}; Lq {q_len} / Lk {kv_len}, H {heads} / Hkv {kv_heads}, {case.replace('_', ' ')}"
                return [{**label, **row, "note": note}]

            rows += guarded(label, compare)
    return rows


def varlen_rows(shape: dict, device, dtype, backend: Optional[str]) -> List[dict]:
    """flash_attn_varlen_func over a packed causal batch: out, lse, dq, dk, dv vs per-sequence golden results."""
    generator = torch.Generator().manual_seed(12)
    lengths, heads, head_dim = shape["varlen_lengths"], shape["varlen_heads"], shape["varlen_dim"]
    total = sum(lengths)
    label = dict(section="flash", mask="varlen_causal", seq=max(lengths), head_dim=head_dim, batch=len(lengths),
                 impl="flash_attn_varlen_func")

    def compare():
        cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=device)
        leaves = [randn(total, heads, head_dim, dtype=dtype, device=device, generator=generator) for _ in range(3)]
        grad_out = randn(total, heads, head_dim, dtype=dtype, device=device, generator=generator)

        def ours(q, k, v):
            out, lse, _ = ta.flash_attn_varlen_func(q, k, v, cu, cu, max(lengths), max(lengths), causal=True,
                                                    return_attn_probs=True, backend=backend)
            return out, lse

        def per_sequence(q, k, v):
            outs, lses, start = [], [], 0
            for length in lengths:
                part = slice(start, start + length)
                out, lse = flash_golden(q[None, part], k[None, part], v[None, part], causal=True,
                                        compute_dtype=q.dtype)
                outs.append(out[0])
                lses.append(lse[0])
                start += length
            return torch.cat(outs), torch.cat(lses, dim=1)

        row = _judge(_with_grads(ours, leaves, grad_out, dtype), per_sequence, leaves, grad_out, dtype)
        return [{**label, **row, "note": f"{row['note']}; lengths {list(lengths)}"}]

    return guarded(label, compare)


def kvcache_rows(shape: dict, device, dtype, backend: Optional[str]) -> List[dict]:
    """flash_attn_with_kvcache over shuffled pages: one decode step and a ``chunk``-token chunk, causal; out
    vs the golden result over the reference copy, and the pages (after the in-place append) vs that copy."""
    generator = torch.Generator().manual_seed(13)
    lengths, page = list(shape["cache_lengths"]), shape["page_size"]
    heads, kv_heads = shape["cache_heads"]
    dim, batch = shape["cache_dim"], len(lengths)
    rows = []
    for name, new in (("kvcache_decode", 1), ("kvcache_chunk", shape["chunk"])):
        label = dict(section="flash", mask=name, seq=max(lengths) + new, head_dim=dim, batch=batch,
                     impl="flash_attn_with_kvcache")

        def compare(new=new):
            capacity = -(-(max(lengths) + new) // page) * page
            table, _, num_pages = shuffled_table([n + new for n in lengths], page, capacity // page, generator)
            full = [randn(batch, kv_heads, capacity, dim, dtype=dtype, device=device, generator=generator)
                    for _ in range(2)]  # [B, Hkv, capacity, D]: the reference copy after the append
            # [pages, Hkv, page, D] holding the old tokens only, stored as FlashAttention's [pages, page, Hkv, D]
            caches = [fill_pages(t, table, lengths, page, num_pages).transpose(1, 2).contiguous() for t in full]
            new_kv = [torch.stack([t[b, :, n:n + new] for b, n in enumerate(lengths)]).transpose(1, 2).contiguous()
                      for t in full]  # [B, new, Hkv, D]
            q = randn(batch, new, heads, dim, dtype=dtype, device=device, generator=generator)
            seqlens = torch.tensor(lengths, dtype=torch.int32, device=device)
            out = ta.flash_attn_with_kvcache(q, *caches, k=new_kv[0], v=new_kv[1], cache_seqlens=seqlens,
                                             block_table=table.to(device), causal=True, backend=backend)
            kv_lens = [n + new for n in lengths]
            keys, values = (t.transpose(1, 2) for t in full)  # [B, capacity, Hkv, D]
            golden = flash_golden(q, keys, values, causal=True, kv_lens=kv_lens)[0]
            baseline = flash_golden(q, keys, values, causal=True, kv_lens=kv_lens, compute_dtype=dtype)[0]
            row = rule([("out", out, baseline, golden, 2.0)], dtype)
            appended = all(torch.equal(gather_pages(cache.transpose(1, 2), table.to(device), b, n), t[b, :, :n])
                           for cache, t in zip(caches, full) for b, n in enumerate(kv_lens))
            note = (f"{row['note']}; cache lengths {lengths} + {new}, page {page}, H {heads} / Hkv {kv_heads}; "
                    + ("pages equal the reference copy after the append" if appended
                       else "PAGES DIFFER from the reference copy (in-place append)"))
            return [{**label, **row, "ok": row["ok"] and appended, "note": note}]

        rows += guarded(label, compare)
    return rows


def dropout_rows(shape: dict, device, dtype, backend: Optional[str]) -> List[dict]:
    """flash_attn_func with dropout 0.1 (causal): out, lse, dq, dk, dv vs the golden result from the returned
    keep-mask; the kept fraction; and a second call under the same seed bitwise equal."""
    size = shape["dropout"]
    batch, heads, seq, dim = size["batch"], size["heads"], size["seq"], size["head_dim"]
    label = dict(section="flash", mask="dropout", seq=seq, head_dim=dim, batch=batch, impl="flash_attn_func_p0.1")
    generator = torch.Generator().manual_seed(14)

    def compare():
        leaves = [randn(batch, seq, heads, dim, dtype=dtype, device=device, generator=generator) for _ in range(3)]
        grad_out = randn(batch, seq, heads, dim, dtype=dtype, device=device, generator=generator)

        def call():
            torch.manual_seed(1234)  # the keep decisions come from the device's generator
            inputs = [t.detach().clone().requires_grad_() for t in leaves]
            out, keep = ta.flash_attn_func(*inputs, dropout_p=DROPOUT_P, causal=True, backend=backend,
                                           return_dropout_mask=True)
            return (out.detach(), *torch.autograd.grad(out, inputs, grad_out)), keep

        got, keep = call()
        again, keep_again = call()
        same = torch.equal(keep, keep_again) and all(torch.equal(a, b) for a, b in zip(got, again))
        # (no lse: return_attn_probs raises with dropout, as FlashAttention-2 would return its debug matrix)
        row = _judge(got, lambda q, k, v: (flash_golden(q, k, v, causal=True, keep=keep, dropout_p=DROPOUT_P,
                                                        compute_dtype=q.dtype)[0],),
                     leaves, grad_out, dtype, names=("out", "dq", "dk", "dv"))
        causal = torch.ones(seq, seq, dtype=torch.bool, device=keep.device).tril()
        kept = float(keep[..., causal].float().mean())
        near = abs(kept - (1 - DROPOUT_P)) <= (0.02 if seq >= 256 else 0.1)
        note = (f"{row['note']}; kept {kept:.4f} of the causal entries (p {DROPOUT_P}); same seed "
                + ("bitwise equal" if same else "DIFFERS (out, mask or gradients)"))
        return [{**label, **row, "ok": row["ok"] and same and near, "note": note}]

    return guarded(label, compare)


# -- speed -----------------------------------------------------------------------------------------------------

TIMING_REPEATS = 20  # CUDA-event timings per median


def causal_flops(lengths: Sequence[int], heads: int, head_dim: int) -> float:
    """Forward FLOPs of causal attention over sequences of ``lengths``: 4 * H * D per (query, visible key)."""
    return sum(4.0 * heads * head_dim * n * (n + 1) / 2 for n in lengths)


def _fwd_bwd(forward: Callable[[], torch.Tensor], leaves: Sequence[torch.Tensor], grad_out: torch.Tensor):
    def step():
        torch.autograd.grad(forward(), leaves, grad_out)
    return step


def _timed_rows(calls: dict, label: dict, flops: float, times: dict, note: str = "") -> List[dict]:
    """A forward and a forward + backward row (ms, TFLOP/s; the backward counts 2.5x the forward's work) per
    ``calls`` entry ``impl -> (forward, leaves, grad_out)``; each median goes into ``times[(impl, kind)]``."""
    rows = []
    for impl, (forward, leaves, grad_out) in calls.items():
        for kind, fn, work in (("fwd", forward, flops), ("fwd_bwd", _fwd_bwd(forward, leaves, grad_out), 3.5 * flops)):
            row = dict(label, impl=f"{impl}_{kind}")

            def measure(fn=fn, work=work, row=row, key=(impl, kind)):
                with torch.no_grad() if key[1] == "fwd" else torch.enable_grad():
                    ms = time_ms(fn, TIMING_REPEATS)
                times[key] = ms
                extra = {"note": note} if note else {}
                return [dict(row, ms=f"{ms:.4f}", tflops=work / (ms * 1e-3) / 1e12, **extra)]

            rows += guarded(row, measure, judged=False)
    return rows


def timing_rows(shape: dict, device, dtype) -> List[dict]:
    """Forward and forward + backward ms / TFLOP/s: flash_attn_func vs SDPA (causal), dropout 0.1 vs 0.0,
    varlen packed vs the same batch padded. The forward + backward counts 3.5x the forward's work."""
    size = shape["timing"]
    batch, heads, seq, dim = size["batch"], size["heads"], size["seq"], size["head_dim"]
    generator = torch.Generator().manual_seed(15)
    leaves = [randn(batch, seq, heads, dim, dtype=dtype, device=device, generator=generator).requires_grad_()
              for _ in range(3)]
    grad_out = randn(batch, seq, heads, dim, dtype=dtype, device=device, generator=generator)
    flops = causal_flops([seq] * batch, heads, dim)
    calls = {
        "flash_attn_func": lambda: ta.flash_attn_func(*leaves, causal=True),
        "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(
            *(t.transpose(1, 2) for t in leaves), is_causal=True).transpose(1, 2),
        "flash_attn_func_p0.1": lambda: ta.flash_attn_func(*leaves, dropout_p=DROPOUT_P, causal=True),
    }
    label = dict(section="flash", mask="causal", seq=seq, head_dim=dim, batch=batch)
    times: dict = {}
    rows = _timed_rows({impl: (forward, leaves, grad_out) for impl, forward in calls.items()}, label, flops, times)
    for kind in ("fwd", "fwd_bwd"):
        for other, what in (("sdpa", "sdpa / flash_attn_func"), ("flash_attn_func_p0.1", "dropout 0.1 / 0.0")):
            if ("flash_attn_func", kind) in times and (other, kind) in times:
                ratio = times[(other, kind)] / times[("flash_attn_func", kind)]
                rows.append(dict(label, impl=f"ratio_{kind}", note=f"{what}: {ratio:.2f}x ({kind})"))
    return rows + varlen_timing_rows(size, device, dtype)


def varlen_timing_rows(size: dict, device, dtype) -> List[dict]:
    """flash_attn_varlen_func over packed sequences vs flash_attn_func over the batch padded to the longest;
    TFLOP/s of the useful causal work for both."""
    lengths, heads, dim = size["varlen_lengths"], size["heads"], size["head_dim"]
    longest, total = max(lengths), sum(lengths)
    generator = torch.Generator().manual_seed(16)
    packed = [randn(total, heads, dim, dtype=dtype, device=device, generator=generator).requires_grad_()
              for _ in range(3)]
    padded = [randn(len(lengths), longest, heads, dim, dtype=dtype, device=device, generator=generator)
              .requires_grad_() for _ in range(3)]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=device)
    grads = (randn(total, heads, dim, dtype=dtype, device=device, generator=generator),
             randn(len(lengths), longest, heads, dim, dtype=dtype, device=device, generator=generator))
    flops = causal_flops(lengths, heads, dim)
    calls = {"varlen_packed": (lambda: ta.flash_attn_varlen_func(*packed, cu, cu, longest, longest, causal=True),
                               packed, grads[0]),
             "func_padded": (lambda: ta.flash_attn_func(*padded, causal=True), padded, grads[1])}
    label = dict(section="flash", mask="varlen_causal", seq=longest, head_dim=dim, batch=len(lengths))
    times: dict = {}
    rows = _timed_rows(calls, label, flops, times, note=f"lengths {list(lengths)} (useful causal work)")
    for kind in ("fwd", "fwd_bwd"):
        if ("varlen_packed", kind) in times and ("func_padded", kind) in times:
            ratio = times[("func_padded", kind)] / times[("varlen_packed", kind)]
            rows.append(dict(label, impl=f"ratio_{kind}", note=f"padded / packed: {ratio:.2f}x ({kind})"))
    return rows


# -- the section -----------------------------------------------------------------------------------------------

def guarded(label: dict, step: Callable[[], List[dict]], judged: bool = True) -> List[dict]:
    """``step()``'s rows, or one row for ``label`` when it raises: out of GPU memory a skipped row, anything
    else a FAIL row (``judged``; a timing that raises is a FAIL row too: it did not run)."""
    try:
        return step()
    except torch.cuda.OutOfMemoryError as error:
        failure = dict(label, ok="", note=f"skipped: out of GPU memory ({str(error).splitlines()[0][:120]})")
    except Exception as error:  # one step must not hide the others
        failure = dict(label, ok=False, note=f"error: {type(error).__name__}: {error}"[:300])
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return [failure]


def correctness_steps(shape: dict, device, dtype, backend: Optional[str]) -> List[Tuple[str, Callable]]:
    """(name, step) of the correctness checks, in run order; each step returns rows."""
    return [("func", lambda: func_rows(shape, device, dtype, backend)),
            ("varlen", lambda: varlen_rows(shape, device, dtype, backend)),
            ("kvcache", lambda: kvcache_rows(shape, device, dtype, backend)),
            ("dropout", lambda: dropout_rows(shape, device, dtype, backend))]


def run_flash(args, device, dtype, writer_row) -> bool:
    """The correctness rows, then (CUDA) the timings; False when a check failed."""
    backend = "interpret" if args.dry_run else "triton"
    shape = flash_shapes(args)
    steps = correctness_steps(shape, device, dtype, backend)
    if device.type == "cuda" and shape["timing"] is not None:
        steps.append(("timing", lambda: timing_rows(shape, device, dtype)))
    all_ok = True
    for name, step in steps:
        for row in guarded(dict(section="flash", mask=name), step):
            all_ok &= row.get("ok") is not False
            writer_row(row)
    return all_ok
