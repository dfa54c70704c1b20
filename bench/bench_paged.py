"""Paged vs contiguous KV cache on the ``torch`` backend (CPU): one decode step per call.

    python bench/bench_paged.py                     # CSV + Markdown under bench/results/
    python bench/bench_paged.py --cache 1024 4096 --batch 1 4 --dtypes float32

Both paths see the same keys and values. The contiguous path is what a decode step calls without
pages: ``ta.attention(q, k, v, block_mask=..., enable_gqa=True)`` over ``[B, Hkv, L, D]`` with the
causal mask moved to the query's position (the BlockMask is built inside the timed call, as a
model building its mask every step does). The paged path is ``ta.paged_attention`` over a
``[num_pages, Hkv, page_size, D]`` cache whose page table is a random permutation, so every page
is somewhere else. Reported: the fastest of ``--repeats`` interleaved calls after a warm-up (and the ratio of medians),
the ratio paged / contiguous (the target is <= 1.3), and for Lq = 1 the contiguous call without any
BlockMask (every key is visible), the cheapest contiguous call there is.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import triton_attn as ta  # noqa: E402
from triton_attn.masks import causal_mask  # noqa: E402

RESULTS = ROOT / "bench" / "results"
FIELDS = ("dtype", "batch", "q_heads", "kv_heads", "head_dim", "q_len", "cache_len", "page_size",
          "contiguous_ms", "paged_ms", "ratio", "ratio_median", "contiguous_no_mask_ms")


def interleaved_ms(fns, repeats: int):
    """(min, median) milliseconds of each of ``fns``, called in turn ``repeats`` times after a warm-up.

    Interleaving gives every function the same share of whatever else the machine is doing; the min
    is the least disturbed call (the shared 2-core CI machine is rarely quiet)."""
    for fn in fns:
        fn()
    samples = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, samples):
            start = time.perf_counter()
            fn()
            out.append((time.perf_counter() - start) * 1e3)
    return [(min(s), statistics.median(s)) for s in samples]


def run_case(dtype, batch: int, q_heads: int, kv_heads: int, head_dim: int, q_len: int, cache_len: int,
             page_size: int, repeats: int) -> dict:
    generator = torch.Generator().manual_seed(0)

    def draw(*shape):
        return torch.randn(*shape, generator=generator).to(dtype)

    query = draw(batch, q_heads, q_len, head_dim)
    key, value = draw(batch, kv_heads, cache_len, head_dim), draw(batch, kv_heads, cache_len, head_dim)
    pages_per_seq = -(-cache_len // page_size)
    num_pages = batch * pages_per_seq
    page_table = torch.randperm(num_pages, generator=generator).view(batch, pages_per_seq).to(torch.int32)
    key_cache = torch.zeros(num_pages, kv_heads, page_size, head_dim, dtype=dtype)
    value_cache = torch.zeros_like(key_cache)
    padded = pages_per_seq * page_size
    for b in range(batch):
        slab_k = torch.zeros(kv_heads, padded, head_dim, dtype=dtype)
        slab_v = torch.zeros_like(slab_k)
        slab_k[:, :cache_len], slab_v[:, :cache_len] = key[b], value[b]
        key_cache[page_table[b].long()] = slab_k.view(kv_heads, pages_per_seq, page_size, head_dim).transpose(0, 1)
        value_cache[page_table[b].long()] = slab_v.view(kv_heads, pages_per_seq, page_size, head_dim).transpose(0, 1)
    kv_lens = torch.full((batch,), cache_len, dtype=torch.int32)
    offset = cache_len - q_len

    def contiguous():
        def causal_at_offset(b, h, q_idx, kv_idx):
            return causal_mask(b, h, q_idx + offset, kv_idx)
        block_mask = ta.create_block_mask(causal_at_offset, None, None, q_len, cache_len)
        return ta.attention(query, key, value, block_mask=block_mask, enable_gqa=True, backend="torch")

    def contiguous_no_mask():
        # Lq = 1 at the end of the cache sees every key: the cheapest contiguous call has no mask at all.
        return ta.attention(query, key, value, enable_gqa=True, backend="torch")

    def paged():
        return ta.paged_attention(query, key_cache, value_cache, page_table, kv_lens, backend="torch")

    torch.testing.assert_close(paged().float(), contiguous().float(), atol=2e-2, rtol=0)
    timings = interleaved_ms([contiguous, paged] + ([contiguous_no_mask] if q_len == 1 else []), repeats)
    (contiguous_ms, contiguous_median), (paged_ms, paged_median) = timings[:2]
    bare_ms = timings[2][0] if q_len == 1 else None
    return dict(dtype=str(dtype).replace("torch.", ""), batch=batch, q_heads=q_heads, kv_heads=kv_heads,
                head_dim=head_dim, q_len=q_len, cache_len=cache_len, page_size=page_size,
                contiguous_ms=round(contiguous_ms, 3), paged_ms=round(paged_ms, 3),
                ratio=round(paged_ms / contiguous_ms, 3), ratio_median=round(paged_median / contiguous_median, 3),
                contiguous_no_mask_ms=round(bare_ms, 3) if bare_ms is not None else "")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--q-len", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    rows = []
    print(" | ".join(FIELDS))
    for dtype_name in args.dtypes:
        for batch in args.batch:
            for q_len in args.q_len:
                for cache_len in args.cache:
                    row = run_case(getattr(torch, dtype_name), batch, args.q_heads, args.kv_heads, args.head_dim,
                                   q_len, cache_len, args.page_size, args.repeats)
                    rows.append(row)
                    print(" | ".join(str(row[f]) for f in FIELDS), flush=True)
    worst = max(row["ratio"] for row in rows)
    print(f"worst paged / contiguous ratio: {worst:.3f} (target <= 1.3)")
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M")
        name = f"paged_{stamp}_cpu-{platform.machine()}_torch{torch.__version__.split('+')[0]}"
        with open(RESULTS / f"{name}.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        lines = [f"# paged_attention vs attention, torch backend, CPU ({platform.processor() or platform.machine()}, "
                 f"{torch.get_num_threads()} threads), {stamp}", "",
                 "| " + " | ".join(FIELDS) + " |", "|" + "---|" * len(FIELDS)]
        lines += ["| " + " | ".join(str(row[f]) for f in FIELDS) + " |" for row in rows]
        lines += ["", f"Worst ratio paged / contiguous: {worst:.3f} (target <= 1.3)."]
        (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
        print(f"saved {RESULTS / name}.csv/.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
