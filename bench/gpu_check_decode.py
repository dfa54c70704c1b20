"""Decode and paged sections of ``bench/gpu_check.py``: the split-KV decode kernel on a real GPU.

``decode_section()``: one decode step (Lq = 1) at B = 1 and 16, caches of 4k and 32k tokens, Hq 32 /
Hkv 8, D 128, bf16. Per shape: correctness of ``triton_attn.attention`` (which routes to the decode
kernel) against a float32 SDPA reference (error at most 2x bf16 SDPA's, plus 1e-2), the split count
chosen, and microseconds per call with the K/V bytes read per second against the device's peak
memory bandwidth (``peak_bandwidth``: ``gpu_check.py`` passes the vendor number from ``gpu_peaks.py``,
or ``--copy-bandwidth``; None leaves the percentage out), for

- ``triton_attn``: the public call (builds its BlockMask and plans the launch every call),
- ``triton_attn_kernel``: the decode launcher with the BlockMask built once (the kernel's own speed),
- ``sdpa``: ``scaled_dot_product_attention(enable_gqa=True)``,
- ``flex_compiled``: compiled FlexAttention (its decoding kernel for short queries), when a
  ``gpu_check_flex.CompiledFlex`` is given: a row whose calls did not all run compiled says so.

``paged_section()``: ``triton_attn.paged_attention`` over a shuffled page table (page sizes 16 and
64) against the contiguous decode kernel on the same keys: correctness (also with ragged lengths),
microseconds, GB/s and the paged / contiguous ratio.

Bytes counted: K and V of every (batch, kv head) up to the sequence length, plus Q and the output.
A shape that does not fit in the GPU's memory (B 16 at 32k tokens with its float32 SDPA reference can
outgrow a 24 GB card) ends with a skipped row saying so; the other shapes still run.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import triton_attn as ta  # noqa: E402


def _time_us(fn: Callable, device: str, repeats: int) -> float:
    fn()  # compile / warm up outside the timing
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=10, rep=50)) * 1e3
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e6


def _bytes(q: torch.Tensor, kv_tokens: int, kv_heads: int, head_dim: int) -> float:
    element = q.element_size()
    return element * (2 * q.numel() + 2 * kv_tokens * kv_heads * head_dim)


def _errors(out: torch.Tensor, reference: torch.Tensor, baseline: torch.Tensor):
    error = float((out.float() - reference).abs().max())
    bound = 2 * float((baseline.float() - reference).abs().max()) + 1e-2
    return error, bound


def _bandwidth_note(gbs: float, peak_bandwidth: Optional[float]) -> str:
    return "" if not peak_bandwidth else f"{100 * gbs / peak_bandwidth:.0f}% of {peak_bandwidth:g} GB/s"


def _sdpa(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)


def run_shape(rows: List[dict], shape: dict, impl: str, run: Callable[[List[dict]], None]) -> None:
    """Append the rows ``run`` writes for one shape. A shape that runs out of GPU memory ends with a
    skipped row saying so (the rows written before stay) and the next shape still runs."""
    reason = None
    try:
        run(rows)
    except torch.cuda.OutOfMemoryError as error:
        reason = str(error).splitlines()[0][:120]
    if reason is not None:  # outside the handler: its traceback, holding the shape's tensors, is gone
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        rows.append(dict(shape, impl=impl, check="correctness", ok=None,
                         note=f"skipped: out of GPU memory ({reason})"))


def decode_section(*, device: str = "cuda", dtype=torch.bfloat16, batches=(1, 16), cache_lens=(4096, 32768),
                   q_heads: int = 32, kv_heads: int = 8, head_dim: int = 128, backend: str = "triton",
                   flex=None, repeats: int = 3, peak_bandwidth: Optional[float] = None) -> List[dict]:
    """Rows: correctness, then one timing row per implementation, for each (batch, cache length).
    flex: a ``gpu_check_flex.CompiledFlex`` to time too (None: not timed). peak_bandwidth: GB/s the speed
    rows' notes compare with (None: no percentage)."""
    from triton_attn.kernels.decode.launch import plan_decode
    from triton_attn.kernels.entry import decode_forward
    from triton_attn.masks.standard import full_block_mask

    def one_shape(batch: int, cache_len: int, rows: List[dict]) -> None:
        q = torch.randn(batch, q_heads, 1, head_dim, device=device, dtype=dtype)
        k = torch.randn(batch, kv_heads, cache_len, head_dim, device=device, dtype=dtype)
        v = torch.randn(batch, kv_heads, cache_len, head_dim, device=device, dtype=dtype)
        block_mask = full_block_mask(1, 1, 1, cache_len, device)
        plan = plan_decode(q, kv_heads, head_dim, block_mask)
        shape = dict(batch=batch, seq=cache_len, head_dim=head_dim, note=f"splits={plan.num_splits} "
                     f"heads_per_program={plan.heads_per_tile} {plan.config.name}")
        out = ta.attention(q, k, v, enable_gqa=True, backend=backend)
        error, bound = _errors(out, _sdpa(q.float(), k.float(), v.float()), _sdpa(q, k, v))
        rows.append(dict(shape, impl="triton_attn", check="correctness", max_error=error, bound=bound,
                         ok=error <= bound))
        scale = 1.0 / math.sqrt(head_dim)
        impls: Dict[str, Callable] = {
            "triton_attn": lambda: ta.attention(q, k, v, enable_gqa=True, backend=backend),
            "triton_attn_kernel": lambda: decode_forward(q, k, v, block_mask, score_mod=None, scale=scale,
                                                         interpret=backend == "interpret"),
            "sdpa": lambda: _sdpa(q, k, v),
        }
        if flex is not None:
            impls["flex_compiled"] = lambda: flex(q, k, v, enable_gqa=True)
        moved = _bytes(q, batch * cache_len, kv_heads, head_dim)
        for impl, fn in impls.items():
            since = flex.snapshot() if impl == "flex_compiled" else None
            try:
                us = _time_us(fn, device, repeats)
            except Exception as error:  # a failing baseline must not hide the other rows
                rows.append(dict(shape, impl=impl, check="speed", ok=impl.startswith("triton") is False,
                                 note=f"error: {type(error).__name__}: {error}"[:200]))
                continue
            verdict = None if since is None else flex.verdict(since)
            if verdict is not None and not verdict.ok:  # an eager fallback's time is no compiled row
                rows.append(dict(shape, impl=impl, check="speed", ok=False, note=f"{verdict.note}; {us:.1f} us"))
                continue
            gbs = moved / us / 1e3
            note = f"{shape['note']} {_bandwidth_note(gbs, peak_bandwidth)} {verdict.note if verdict else ''}"
            rows.append(dict(shape, impl=impl, check="speed", us=us, gb_s=gbs, note=" ".join(note.split())))
        # Returning frees the tensors (the timing lambdas die with this frame) before the next shape allocates.

    rows: List[dict] = []
    for batch in batches:
        for cache_len in cache_lens:
            run_shape(rows, dict(batch=batch, seq=cache_len, head_dim=head_dim), "triton_attn",
                       lambda out, batch=batch, cache_len=cache_len: one_shape(batch, cache_len, out))
    return rows


def _paged_copy(k: torch.Tensor, v: torch.Tensor, page_size: int, generator: torch.Generator):
    """K/V ``[B, Hkv, L, D]`` scattered into shuffled pages: (key_cache, value_cache, page_table)."""
    batch, kv_heads, length, dim = k.shape
    pages_per_seq = -(-length // page_size)
    order = torch.randperm(batch * pages_per_seq, generator=generator).to(k.device)
    page_table = order.view(batch, pages_per_seq).to(torch.int32)
    padded = pages_per_seq * page_size

    def scatter(t):
        cache = torch.zeros(batch * pages_per_seq, kv_heads, page_size, dim, device=t.device, dtype=t.dtype)
        slab = torch.nn.functional.pad(t, (0, 0, 0, padded - length))
        pages = slab.view(batch, kv_heads, pages_per_seq, page_size, dim).transpose(1, 2)
        cache[page_table.long().flatten()] = pages.reshape(-1, kv_heads, page_size, dim)
        return cache

    return scatter(k), scatter(v), page_table


def paged_section(*, device: str = "cuda", dtype=torch.bfloat16, batches=(1, 16), cache_lens=(4096, 32768),
                  page_sizes=(16, 64), q_heads: int = 32, kv_heads: int = 8, head_dim: int = 128,
                  backend: str = "triton", repeats: int = 3, peak_bandwidth: Optional[float] = None) -> List[dict]:
    """Rows: correctness (uniform and ragged lengths) and paged vs contiguous timings.
    peak_bandwidth: GB/s the speed rows' notes compare with (None: no percentage)."""
    generator = torch.Generator().manual_seed(0)

    def one_shape(batch: int, cache_len: int, page_size: int, rows: List[dict]) -> None:
        q = torch.randn(batch, q_heads, 1, head_dim, device=device, dtype=dtype)
        k = torch.randn(batch, kv_heads, cache_len, head_dim, device=device, dtype=dtype)
        v = torch.randn(batch, kv_heads, cache_len, head_dim, device=device, dtype=dtype)
        key_cache, value_cache, page_table = _paged_copy(k, v, page_size, generator)
        lengths = torch.full((batch,), cache_len, dtype=torch.int32, device=device)
        shape = dict(batch=batch, seq=cache_len, head_dim=head_dim, mask=f"page_size={page_size}")

        def paged(lengths=lengths):
            return ta.paged_attention(q, key_cache, value_cache, page_table, lengths, backend=backend)

        out = paged()
        error, bound = _errors(out, _sdpa(q.float(), k.float(), v.float()), _sdpa(q, k, v))
        rows.append(dict(shape, impl="paged", check="correctness", max_error=error, bound=bound,
                         ok=error <= bound))
        if batch > 1:  # ragged: sequence b holds its first lengths[b] tokens
            ragged = torch.randint(1, cache_len + 1, (batch,), generator=generator).to(torch.int32)
            ragged[0] = cache_len
            out = paged(ragged.to(device))
            keep = torch.arange(cache_len).view(1, 1, 1, -1) < ragged.view(-1, 1, 1, 1)
            keep = keep.to(device)
            reference = torch.nn.functional.scaled_dot_product_attention(
                q.float(), k.float(), v.float(), attn_mask=keep, enable_gqa=True)
            baseline = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep,
                                                                        enable_gqa=True)
            error, bound = _errors(out, reference, baseline)
            rows.append(dict(shape, impl="paged_ragged", check="correctness", max_error=error, bound=bound,
                             ok=error <= bound))
        moved = _bytes(q, batch * cache_len, kv_heads, head_dim)
        timings = {}
        for impl, fn in (("paged", paged),
                         ("contiguous", lambda: ta.attention(q, k, v, enable_gqa=True, backend=backend))):
            timings[impl] = _time_us(fn, device, repeats)
            gbs = moved / timings[impl] / 1e3
            rows.append(dict(shape, impl=impl, check="speed", us=timings[impl], gb_s=gbs,
                             note=_bandwidth_note(gbs, peak_bandwidth)))
        rows.append(dict(shape, impl="paged/contiguous", check="ratio",
                         note=f"{timings['paged'] / timings['contiguous']:.2f}x"))
        # Returning frees the tensors (``paged`` and the timing lambda die with this frame).

    rows: List[dict] = []
    for batch in batches:
        for cache_len in cache_lens:
            for page_size in page_sizes:
                shape = dict(batch=batch, seq=cache_len, head_dim=head_dim, mask=f"page_size={page_size}")
                run_shape(rows, shape, "paged",
                           lambda out, b=batch, n=cache_len, p=page_size: one_shape(b, n, p, out))
    return rows


def format_rows(rows: List[dict]) -> str:
    lines = []
    for row in rows:
        cells = [f"{key}={row[key]:.3g}" if isinstance(row[key], float) else f"{key}={row[key]}"
                 for key in ("check", "impl", "batch", "seq", "mask", "us", "gb_s", "max_error", "bound", "ok", "note")
                 if key in row]
        lines.append(", ".join(cells))
    return "\n".join(lines)


if __name__ == "__main__":
    quick = "--dry-run" in sys.argv
    options = dict(device="cpu", backend="interpret", batches=(1, 2), cache_lens=(64,), q_heads=4, kv_heads=2,
                   head_dim=16, repeats=1) if quick else {}
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if not quick:
        from gpu_peaks import device_peaks

        peaks = device_peaks("cuda")
        options["peak_bandwidth"] = peaks.gb_s if peaks is not None else None
    from gpu_check_flex import CompiledFlex, flex_limits

    with flex_limits():
        print(format_rows(decode_section(flex=None if quick else CompiledFlex(), **options)))
    print(format_rows(paged_section(page_sizes=(16,), **options) if quick else paged_section()))
