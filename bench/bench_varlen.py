"""Packed variable-length sequences: the varlen BlockMask's build time and index memory against the general compiler.

    python bench/bench_varlen.py                          # 64k and 1M packed tokens, CSV under bench/results/
    python bench/bench_varlen.py --sizes 65536 --repeats 200

Sequences of 256..4096 tokens (uniform, seeded) are packed up to each size; attention is causal within each
sequence (FlashAttention-2's ``flash_attn_varlen_func(..., causal=True)`` with ``cu_seqlens_q == cu_seqlens_k``).
Implementations, each on CPU with ``--threads`` torch threads:

- ``varlen_self``: ``masks.varlen.varlen_layout`` from ``cu_seqlens`` and the host ints FlashAttention-2 takes
  (``max_seqlen``), one tensor passed as both ``cu_seqlens_q`` and ``cu_seqlens_k`` (self-attention packing, as
  ``flash_attn_varlen_func(q, k, v, cu, cu, ...)`` is called in training): the index lists' width is bounded by
  ``max_seqlen`` around each query block, for any lengths, with no hint.
- ``varlen_any``: the same with ``same_sequences=False``, the bound for unrelated query and key sequences (a block
  of one-token query sequences may meet 128 sequences): with many long sequences it reaches the grid.
  ``varlen_hinted`` also passes ``min_seqlen`` (the shortest sequence), which narrows that bound to two
  sequences per block.
- ``document``: ``create_block_mask(and_masks(causal_mask, document_mask(ids)))``, the same mask through the
  general compiler (``layout="auto"``: a ``CompactBlockMask`` above 4M tiles, i.e. at 1M tokens).

Per case: the build time (min and median of ``--repeats`` builds; the compiler, slower, gets fewer), the bytes
of the index tensors (the eight FlexAttention fields; a compact mask's compressed rows, transposed ones
included, and what its dense fields would take once a kernel reads them), the widest list row, and whether the
two layouts classify every tile the same way. The target: the varlen layout under 1 ms at 64k tokens, with no
hint (``varlen_self``).

The functions (``packed_lengths``, ``varlen_case``, ``document_case``, ``run``) are meant to be reused, e.g. to
add attention timings over the same masks.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from triton_attn.masks import (  # noqa: E402
    BlockMask,
    CompactBlockMask,
    and_masks,
    causal_mask,
    create_block_mask,
    document_mask,
)
from triton_attn.masks.varlen import VarlenLayout, varlen_layout  # noqa: E402

SIZES = (65536, 1048576)
FIELDS = ("impl", "total_tokens", "sequences", "block_size", "status", "min_ms", "median_ms", "repeats",
          "index_bytes", "dense_fields_bytes", "list_width", "grid_blocks", "widest_row", "same_tiles", "layout")
TARGET_MS_64K = 1.0


# -- inputs ---------------------------------------------------------------------------------------------------
def packed_lengths(total: int, low: int = 256, high: int = 4096, seed: int = 0) -> List[int]:
    """Sequence lengths drawn uniformly from ``[low, high]`` until they sum to ``total`` (the last one cut)."""
    generator = torch.Generator().manual_seed(seed)
    lengths: List[int] = []
    while sum(lengths) < total:
        lengths.append(int(torch.randint(low, high + 1, (1,), generator=generator)))
    lengths[-1] -= sum(lengths) - total
    if lengths[-1] == 0:
        lengths.pop()
    return lengths


def cumulative(lengths: Sequence[int], device="cpu") -> torch.Tensor:
    """int32 ``[S + 1]`` cumulative lengths from 0 (FlashAttention-2's ``cu_seqlens``)."""
    return torch.tensor([0] + torch.tensor(list(lengths)).cumsum(0).tolist(), dtype=torch.int32, device=device)


def document_ids(lengths: Sequence[int]) -> torch.Tensor:
    """int64 ``[total]``: the sequence of every packed token."""
    return torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(list(lengths)))


# -- measurements ---------------------------------------------------------------------------------------------
def timed(build: Callable[[], object], repeats: int) -> Tuple[float, float, object]:
    """(min ms, median ms, last result) of ``repeats`` calls, after one warm-up call."""
    result = build()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = build()
        times.append((time.perf_counter() - start) * 1e3)
    return min(times), statistics.median(times), result


def index_bytes(block_mask: BlockMask) -> int:
    """Bytes of a mask's index tensors: the eight fields, or a compact mask's compressed rows (both directions)."""
    if isinstance(block_mask, CompactBlockMask):
        return int(block_mask.nbytes(include_transposed=True))
    return sum(getattr(block_mask, name).numel() * getattr(block_mask, name).element_size()
               for name in BlockMask._TENSOR_FIELDS)


def dense_fields_bytes(block_mask: BlockMask) -> int:
    """Bytes of FlexAttention's dense fields over the block grid (what a compact mask builds for a kernel)."""
    nq, nkv = block_mask.num_blocks
    return 4 * (2 * nq + 2 * nkv + 4 * nq * nkv)


def widest_row(block_mask: BlockMask) -> int:
    counts = block_mask.kv_num_blocks + block_mask.full_kv_num_blocks
    return int(counts.max()) if counts.numel() else 0


VARLEN_CASES = ("varlen_self", "varlen_any", "varlen_hinted")


def varlen_case(lengths: Sequence[int], *, case: str, repeats: int,
                block_size: int = 128) -> Tuple[Dict, VarlenLayout]:
    """One timed varlen build (causal, Lq = Lk per sequence) and its row of results; ``case``: one of
    ``VARLEN_CASES`` (see the module docstring)."""
    cu = cumulative(lengths)
    total = sum(lengths)
    shortest = min(lengths) if case == "varlen_hinted" else 1
    same_sequences = None if case == "varlen_self" else False  # None: cu_seqlens_q is cu_seqlens_k, so True

    def build():
        return varlen_layout(cu, cu, max(lengths), max(lengths), total_q=total, total_k=total, causal=True,
                             BLOCK_SIZE=block_size, min_seqlen_q=shortest, min_seqlen_k=shortest,
                             same_sequences=same_sequences)

    best, median, layout = timed(build, repeats)
    mask = layout.block_mask
    row = dict(impl=case, total_tokens=total, sequences=len(lengths),
               block_size=block_size, status="ok", min_ms=round(best, 4), median_ms=round(median, 4),
               repeats=repeats, index_bytes=index_bytes(mask), dense_fields_bytes=dense_fields_bytes(mask),
               list_width=mask.kv_indices.shape[-1], grid_blocks=mask.num_blocks[1], widest_row=widest_row(mask),
               layout=type(mask).__name__)
    return row, layout


def document_case(lengths: Sequence[int], *, repeats: int, block_size: int = 128) -> Tuple[Dict, BlockMask]:
    """One timed build of the same mask by the general compiler (documents + causal, ``layout="auto"``)."""
    total = sum(lengths)
    mask_mod = and_masks(causal_mask, document_mask(document_ids(lengths)))
    best, median, mask = timed(lambda: create_block_mask(mask_mod, None, None, total, total, BLOCK_SIZE=block_size),
                               repeats)
    row = dict(impl="document", total_tokens=total, sequences=len(lengths), block_size=block_size, status="ok",
               min_ms=round(best, 4), median_ms=round(median, 4), repeats=repeats, index_bytes=index_bytes(mask),
               dense_fields_bytes=dense_fields_bytes(mask),
               list_width="" if isinstance(mask, CompactBlockMask) else mask.kv_indices.shape[-1],
               grid_blocks=mask.num_blocks[1], widest_row="", layout=type(mask).__name__)
    return row, mask


def same_tiles(ours: BlockMask, theirs: BlockMask) -> bool:
    """Whether two masks over the same grid classify every tile alike (partial, full, empty)."""
    return (torch.equal(ours.partial_blocks(), theirs.partial_blocks())
            and torch.equal(ours.full_blocks(), theirs.full_blocks()))


def run(sizes: Sequence[int], repeats: int, compiler_repeats: int, check: bool = True) -> List[Dict]:
    """Every case at every size; rows in the order written to the CSV."""
    rows = []
    for total in sizes:
        lengths = packed_lengths(total)
        reference_row, reference = document_case(lengths, repeats=max(1, compiler_repeats if total <= 65536 else 1))
        for case in VARLEN_CASES:
            row, layout = varlen_case(lengths, case=case, repeats=repeats if total <= 65536 else
                                      max(3, repeats // 10))
            if check:
                row["same_tiles"] = same_tiles(layout.block_mask, reference)
            rows.append(row)
        rows.append(reference_row)
    return rows


# -- output ---------------------------------------------------------------------------------------------------
# -- attention: packed varlen against the same batch padded ----------------------------------------------------
ATTENTION_FIELDS = ("spread", "lengths", "heads", "head_dim", "mode", "impl", "min_ms", "median_ms", "repeats",
                    "vs_padded_ours", "vs_padded_sdpa")


def spread_lengths(count: int, low: int, spread: int, seed: int) -> List[int]:
    """``count`` lengths drawn uniformly in ``[low, low * spread]`` (seeded)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, low * spread + 1, (count,), generator=generator).tolist()


def attention_cases(lengths: Sequence[int], heads: int, head_dim: int, mode: str, repeats: int) -> List[Dict]:
    """One packed batch three ways, causal, float32 on CPU: ``flash_attn_varlen_func`` on the packed tokens
    (``varlen``), ``attention()`` on the batch padded to ``[B, H, max, D]`` with a causal + padding BlockMask
    (``padded_ours``), and PyTorch's ``scaled_dot_product_attention`` on the padded batch with a bool mask
    (``padded_sdpa``). ``mode``: ``inference`` (forward under no_grad) or ``training`` (forward + backward).
    Each time includes what the call builds per step (the varlen layout; the padded BlockMask is built once,
    as a model would per batch, and timed separately into the padded row)."""
    from triton_attn import attention, flash_attn_varlen_func
    from triton_attn.masks import padding_mask

    batch, longest, total = len(lengths), max(lengths), sum(lengths)
    cu = cumulative(lengths)
    generator = torch.Generator().manual_seed(1)
    packed = [torch.randn(total, heads, head_dim, generator=generator) for _ in range(3)]
    padded = [torch.zeros(batch, heads, longest, head_dim) for _ in range(3)]
    valid = torch.zeros(batch, longest, dtype=torch.bool)
    for b, (start, n) in enumerate(zip(cu.tolist(), lengths)):
        for source, target in zip(packed, padded):
            target[b, :, :n] = source[start:start + n].transpose(0, 1)
        valid[b, :n] = True
    training = mode == "training"
    sdpa_mask = torch.ones(longest, longest, dtype=torch.bool).tril() & valid[:, None, None, :]
    sdpa_mask = sdpa_mask | ~valid[:, None, :, None]  # padded query rows see everything (their output is dropped)

    def run_varlen():
        q, k, v = (t.detach().requires_grad_(training) for t in packed)
        out = flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, causal=True)
        if training:
            out.sum().backward()

    def run_padded_ours():
        q, k, v = (t.detach().requires_grad_(training) for t in padded)
        block_mask = create_block_mask(and_masks(causal_mask, padding_mask(valid)), batch, None, longest, longest)
        out = attention(q, k, v, block_mask=block_mask)
        if training:
            (out * valid[:, None, :, None]).sum().backward()

    def run_padded_sdpa():
        q, k, v = (t.detach().requires_grad_(training) for t in padded)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask)
        if training:
            (out * valid[:, None, :, None]).sum().backward()

    rows = []
    for name, fn in (("varlen", run_varlen), ("padded_ours", run_padded_ours), ("padded_sdpa", run_padded_sdpa)):
        with torch.set_grad_enabled(training):
            fn()  # warm-up (traces, first-call costs)
            low, median, _ = timed(fn, repeats)
        rows.append(dict(lengths=f"{min(lengths)}..{max(lengths)} x{batch}", heads=heads, head_dim=head_dim,
                         mode=mode, impl=name, min_ms=round(low, 3), median_ms=round(median, 3), repeats=repeats))
    by_impl = {row["impl"]: row["min_ms"] for row in rows}
    for row in rows:
        row["vs_padded_ours"] = round(row["min_ms"] / by_impl["padded_ours"], 3)
        row["vs_padded_sdpa"] = round(row["min_ms"] / by_impl["padded_sdpa"], 3)
    return rows


def run_attention(spreads: Sequence[int], count: int, low: int, heads: int, head_dim: int, modes: Sequence[str],
                  repeats: int) -> List[Dict]:
    """``attention_cases`` for each length spread (longest / shortest allowed) and mode."""
    rows = []
    for spread in spreads:
        lengths = spread_lengths(count, low, spread, seed=spread)
        for mode in modes:
            for row in attention_cases(lengths, heads, head_dim, mode, repeats):
                rows.append({"spread": spread, **row})
    return rows


def machine_header(threads: int) -> Dict[str, str]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{cpu} / {os.cpu_count()} cores / {platform.system()}",
            "torch": torch.__version__, "python": platform.python_version(), "torch_threads": str(threads),
            "load_average_start": " ".join(f"{x:.2f}" for x in os.getloadavg())}


def write_csv(rows: List[Dict], header: Dict[str, str], path: Path, fields: Sequence[str] = FIELDS) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        for key, value in header.items():
            f.write(f"# {key}: {value}\n")
        writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="packed tokens per case")
    parser.add_argument("--repeats", type=int, default=100, help="varlen builds per case at <= 64k (1M: a tenth)")
    parser.add_argument("--compiler-repeats", type=int, default=5, help="create_block_mask builds at <= 64k")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--no-check", action="store_true", help="skip the tile-by-tile comparison")
    parser.add_argument("--out", type=Path, default=None,
                        help="CSV path (default: bench/results/varlen_<date>_cpu-<arch>_torch<version>.csv)")
    parser.add_argument("--attention", action="store_true",
                        help="time attention instead: packed varlen vs the same batch padded (causal, float32)")
    parser.add_argument("--spreads", type=int, nargs="+", default=[1, 2, 4, 8],
                        help="--attention: longest / shortest length allowed in a batch")
    parser.add_argument("--sequences", type=int, default=16, help="--attention: sequences per batch")
    parser.add_argument("--shortest", type=int, default=64, help="--attention: the shortest length allowed")
    parser.add_argument("--modes", nargs="+", default=["inference", "training"], choices=["inference", "training"])
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    header = machine_header(args.threads)
    if args.attention:
        main_attention(args, header)
        return
    rows = run(args.sizes, args.repeats, args.compiler_repeats, check=not args.no_check)
    header["load_average_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M")
    out = args.out or RESULTS / f"varlen_{stamp}_cpu-{platform.machine()}_torch{torch.__version__.split('+')[0]}.csv"
    write_csv(rows, header, out)
    for row in rows:
        print(f"{row['impl']:>14} {row['total_tokens']:>8} tokens: {row['min_ms']:>10.3f} ms min, "
              f"{row['median_ms']:>10.3f} median; index {row['index_bytes'] / 2**20:8.2f} MiB "
              f"(dense fields {row['dense_fields_bytes'] / 2**20:8.1f} MiB); width {row['list_width']} of "
              f"{row['grid_blocks']}, widest {row['widest_row']}; same tiles: {row.get('same_tiles', '')}")
    unhinted = [r for r in rows if r["impl"] == "varlen_self" and r["total_tokens"] == 65536]
    if unhinted:
        verdict = "met" if unhinted[0]["min_ms"] < TARGET_MS_64K else "missed"
        print(f"target (varlen_self, no hint, under {TARGET_MS_64K} ms at 64k tokens): {verdict}")
    print(f"wrote {out}")


def main_attention(args, header: Dict[str, str]) -> None:
    rows = run_attention(args.spreads, args.sequences, args.shortest, 8, 64, args.modes, max(3, args.repeats // 20))
    header["load_average_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M")
    out = args.out or RESULTS / (f"varlen_attention_{stamp}_cpu-{platform.machine()}_"
                                 f"torch{torch.__version__.split('+')[0]}.csv")
    write_csv(rows, header, out, ATTENTION_FIELDS)
    for row in rows:
        print(f"spread {row['spread']:>2}x {row['lengths']:>16} {row['mode']:>9} {row['impl']:>12}: "
              f"{row['min_ms']:>9.2f} ms min ({row['median_ms']:.2f} median); vs padded ours "
              f"{row['vs_padded_ours']:.2f}x, vs padded sdpa {row['vs_padded_sdpa']:.2f}x")
    for spread in args.spreads:
        for mode in args.modes:
            ratio = [r["vs_padded_ours"] for r in rows if r["spread"] == spread and r["mode"] == mode
                     and r["impl"] == "varlen"]
            if ratio and spread >= 4:
                verdict = "faster" if ratio[0] < 1.0 else "NOT faster"
                print(f"target (spread {spread}x, {mode}: varlen faster than padded): {verdict} ({ratio[0]:.2f}x)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
