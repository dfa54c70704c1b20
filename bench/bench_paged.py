"""Paged vs contiguous KV cache on the ``torch`` backend (CPU).

    python bench/bench_paged.py                     # CSV + Markdown under bench/results/
    python bench/bench_paged.py --cache 4096 --batch 1 --dtypes float32 --no-generate

Three measurements, each timing the contiguous path against the paged one (``--repeats`` calls,
interleaved so both see the same machine load; the fastest call is reported, and the ratio of
medians too):

- ``attention``: one decode step's attention alone over an existing cache: ``ta.attention(q, k, v,
  block_mask=..., enable_gqa=True)`` on ``[B, Hkv, L, D]`` (the causal BlockMask moved to the query
  position is built in the timed call, as a model building its mask every step does) vs
  ``ta.paged_attention`` on a ``[num_pages, Hkv, page_size, D]`` pool whose page table is a random
  permutation. For Lq = 1 the contiguous call without any BlockMask is timed too (every key is
  visible there): the cheapest contiguous call there is.
- ``step``: a whole decode step of one layer's cache: the contiguous cache appends the new keys and
  values (``torch.cat``, as ``triton_attn.models.KVCache`` does) and attends; the paged cache writes them
  into their pages (``PagedKVCache.write``) and attends.
- ``generate``: ``ReferenceDecoder.generate(cache="contiguous")`` vs ``generate(cache="paged")`` end to
  end (prompt, then one token per step).

The torch backend has no kernel that reads pages in place: ``paged_attention`` reads the pages one
chunk at a time (about 2 MB of keys and as much of values, ``backends/torch/paged.py``) into a buffer
that stays in cache and attends each chunk with PyTorch's fused CPU kernel, merging the chunks by
their log-sum-exps. What the ``attention`` rows price is that copy of each chunk, which one thread
cannot overlap with the attention as the contiguous kernel overlaps its reads. A contiguous cache
pays a full pass over K/V when it grows by concatenation, which the ``step`` and ``generate`` rows
include.
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
FIELDS = ("what", "dtype", "batch", "q_heads", "kv_heads", "head_dim", "q_len", "cache_len", "page_size",
          "contiguous_ms", "paged_ms", "ratio", "ratio_median", "contiguous_no_mask_ms")


def interleaved_ms(fns, repeats: int):
    """(min, median) milliseconds of each of ``fns``, called in turn ``repeats`` times after a warm-up."""
    for fn in fns:
        fn()
    samples = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, samples):
            start = time.perf_counter()
            fn()
            out.append((time.perf_counter() - start) * 1e3)
    return [(min(s), statistics.median(s)) for s in samples]


def _row(what, timings, **shape) -> dict:
    (contiguous_ms, contiguous_median), (paged_ms, paged_median) = timings[:2]
    return dict(what=what, **shape, contiguous_ms=round(contiguous_ms, 3), paged_ms=round(paged_ms, 3),
                ratio=round(paged_ms / contiguous_ms, 3), ratio_median=round(paged_median / contiguous_median, 3),
                contiguous_no_mask_ms=round(timings[2][0], 3) if len(timings) > 2 else "")


def attention_and_step(dtype, batch: int, q_heads: int, kv_heads: int, head_dim: int, q_len: int, cache_len: int,
                       page_size: int, repeats: int):
    """The ``attention`` and ``step`` rows of one shape."""
    generator = torch.Generator().manual_seed(0)

    def draw(*shape):
        return torch.randn(*shape, generator=generator).to(dtype)

    query = draw(batch, q_heads, q_len, head_dim)
    key, value = draw(batch, kv_heads, cache_len, head_dim), draw(batch, kv_heads, cache_len, head_dim)
    pages_per_seq = -(-cache_len // page_size)
    cache = ta.PagedKVCache(batch * pages_per_seq, page_size, kv_heads, head_dim, dtype=dtype)
    cache.shuffle_free_pages(generator)
    seqs = cache.allocate(batch)
    cache.append(seqs, key, value)
    page_table, kv_lens = cache.page_table(seqs), cache.kv_lens(seqs)
    offset = cache_len - q_len

    def contiguous():
        def causal_at_offset(b, h, q_idx, kv_idx):
            return causal_mask(b, h, q_idx + offset, kv_idx)
        block_mask = ta.create_block_mask(causal_at_offset, None, None, q_len, cache_len)
        return ta.attention(query, key, value, block_mask=block_mask, enable_gqa=True, backend="torch")

    def contiguous_no_mask():
        return ta.attention(query, key, value, enable_gqa=True, backend="torch")

    def paged():
        return ta.paged_attention(query, *cache.layer(0), page_table, kv_lens, backend="torch")

    torch.testing.assert_close(paged().float(), contiguous().float(), atol=2e-2, rtol=0)
    shape = dict(dtype=str(dtype).replace("torch.", ""), batch=batch, q_heads=q_heads, kv_heads=kv_heads,
                 head_dim=head_dim, q_len=q_len, cache_len=cache_len, page_size=page_size)
    rows = [_row("attention", interleaved_ms([contiguous, paged] + ([contiguous_no_mask] if q_len == 1 else []),
                                             repeats), **shape)]

    # A decode step: the last q_len tokens arrive now (their keys/values are appended, then attended).
    old_key, old_value = key[:, :, :offset].clone(), value[:, :, :offset].clone()
    new_key, new_value = key[:, :, offset:].clone(), value[:, :, offset:].clone()

    def contiguous_step():
        full_key, full_value = torch.cat([old_key, new_key], dim=2), torch.cat([old_value, new_value], dim=2)

        def causal_at_offset(b, h, q_idx, kv_idx):
            return causal_mask(b, h, q_idx + offset, kv_idx)
        block_mask = ta.create_block_mask(causal_at_offset, None, None, q_len, cache_len)
        return ta.attention(query, full_key, full_value, block_mask=block_mask, enable_gqa=True, backend="torch")

    def paged_step():
        cache.write(0, seqs, new_key, new_value)  # the positions are already reserved: rewrite them
        return ta.paged_attention(query, *cache.layer(0), cache.page_table(seqs), cache.kv_lens(seqs),
                                  backend="torch")

    rows.append(_row("step", interleaved_ms([contiguous_step, paged_step], repeats), **shape))
    return rows


def generate_rows(dtype, repeats: int, prompt: int, new_tokens: int):
    """The ``generate`` row: a 2-layer ReferenceDecoder (hidden 512, 8 heads / 2 KV heads, D 64), batch 2."""
    from triton_attn.models import ModelConfig, ReferenceDecoder

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=256, hidden_size=512, num_layers=2, num_heads=8, num_kv_heads=2)
    model = ReferenceDecoder(config).eval().to(dtype)
    ids = torch.randint(0, 256, (2, prompt))
    contiguous = model.generate(ids, max_new_tokens=new_tokens)
    paged = model.generate(ids, max_new_tokens=new_tokens, cache="paged")
    same = bool(torch.equal(contiguous, paged))
    timings = interleaved_ms([lambda: model.generate(ids, max_new_tokens=new_tokens),
                              lambda: model.generate(ids, max_new_tokens=new_tokens, cache="paged")], repeats)
    return [_row(f"generate {prompt}+{new_tokens} tokens{'' if same else ' (TOKENS DIFFER)'}", timings,
                 dtype=str(dtype).replace("torch.", ""), batch=2, q_heads=8, kv_heads=2, head_dim=64, q_len=1,
                 cache_len=prompt + new_tokens, page_size=16)]


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
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--no-generate", action="store_true")
    parser.add_argument("--prompt", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine a parallel region stalls whenever the "
                             "other core is busy, which times the machine's load, not the code)")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    print(" | ".join(FIELDS))
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for batch in args.batch:
            for q_len in args.q_len:
                for cache_len in args.cache:
                    for row in attention_and_step(dtype, batch, args.q_heads, args.kv_heads, args.head_dim, q_len,
                                                  cache_len, args.page_size, args.repeats):
                        rows.append(row)
                        print(" | ".join(str(row[f]) for f in FIELDS), flush=True)
        if not args.no_generate:
            for row in generate_rows(dtype, max(3, args.repeats // 3), args.prompt, args.new_tokens):
                rows.append(row)
                print(" | ".join(str(row[f]) for f in FIELDS), flush=True)
    for what in ("attention", "step", "generate"):
        ratios = [row["ratio"] for row in rows if row["what"].startswith(what)]
        if ratios:
            print(f"{what}: worst paged / contiguous ratio {max(ratios):.3f} (target <= 1.3)")
    if not args.no_save:
        RESULTS.mkdir(parents=True, exist_ok=True)
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M")
        name = f"paged_{stamp}_cpu-{platform.machine()}_torch{torch.__version__.split('+')[0]}"
        with open(RESULTS / f"{name}.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        lines = [f"# paged_attention vs the contiguous path, torch backend, CPU ({platform.machine()}, "
                 f"{torch.get_num_threads()} threads), {stamp}", "",
                 "| " + " | ".join(FIELDS) + " |", "|" + "---|" * len(FIELDS)]
        lines += ["| " + " | ".join(str(row[f]) for f in FIELDS) + " |" for row in rows]
        (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
        print(f"saved {RESULTS / name}.csv/.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
