"""Profiling the ``torch`` backend on CPU against its CPU target (issue 7), with candidate speed-ups.

The target: steady state no slower than ``torch.compile(flex_attention)`` on sliding-window and document
masks at 8k tokens (B=1, H=8, D=64, float32). This script times, on one thread and by process CPU time
(robust on a shared machine), for each mask:

- ``orig``: ``triton_attn.attention`` as it is (``reference.blockwise_attention``).
- ``exp2``: the same loop with the scale and log2(e) folded into q, ``exp2`` instead of ``exp`` (3x faster
  on this CPU) and in-place ``sub_``/``exp2_``/``masked_fill_`` when no graph is recorded.
- ``sdpa_rows``: an inference fast path: per query-block row, the full blocks go through
  ``aten::_scaled_dot_product_flash_attention_for_cpu`` (PyTorch's fused CPU flash kernel, which returns the
  log-sum-exp) over their K/V span, the partial blocks through the same op with the mask_mod's tile as an
  additive mask, and the two results are merged by their log-sum-exps.
- ``flex`` (``--flex``): ``torch.compile(flex_attention)`` (compiles on its first call, ~10-25 s).

It prints max differences against ``orig`` (out / lse) and the CPU ms of each repeat. Nothing here is used
by the library; it backs the suggestions made for ``reference.py``.

    python bench/profile_torch_backend.py --seq-len 8192 --flex
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

LOG2E = 1.4426950408889634


def exp2_row(q_tile, key, value, *, q_start, layout, block_mask, score_mod, scale):
    """``reference._query_block_row`` with exp2, the scale folded into q, and in-place ops under no_grad."""
    from triton_attn import reference as R
    from triton_attn.masks.evaluate import call_mask_mod, call_score_mod

    batch, q_heads, rows, _ = q_tile.shape
    device = q_tile.device
    kv_block = block_mask.BLOCK_SIZE[1]
    shared = layout[0][0].numel() == 1
    fetcher = R._TileFetcher(key, value, q_heads, shared)
    b, h = R._index_grids(batch, q_heads, device)
    q_idx = torch.arange(q_start, q_start + rows, device=device).view(1, 1, -1, 1)
    inplace = not torch.is_grad_enabled()
    fold = score_mod is None
    q_float = q_tile.float() * (scale * LOG2E if fold else scale)
    running_max = torch.full((batch, q_heads, rows, 1), float("-inf"), device=device)
    running_sum = torch.zeros((batch, q_heads, rows, 1), device=device)
    accumulator = torch.zeros((batch, q_heads, rows, value.shape[-1]), device=device)
    blocks_per_step = max(1, R.SCORE_BUDGET // (batch * q_heads * rows * kv_block))
    for (num_blocks, indices), is_partial in zip(layout, (True, False)):
        most = int(num_blocks.max()) if num_blocks.numel() else 0
        for j0 in range(0, most, blocks_per_step):
            j1 = min(most, j0 + blocks_per_step)
            block_valid = torch.arange(j0, j1, device=device) < num_blocks.unsqueeze(-1)
            kv_idx, keep, k_tile, v_tile = fetcher.fetch(indices[..., j0:j1], block_valid, kv_block)
            scores = fetcher.scores(q_float, k_tile)
            if score_mod is not None:
                scores = call_score_mod(score_mod, scores, b, h, q_idx, kv_idx) * LOG2E
            if is_partial:
                keep = keep & call_mask_mod(block_mask.mask_mod, b, h, q_idx, kv_idx, scores.shape)
            if not (shared and bool(keep.all())):
                scores = scores.masked_fill_(~keep, -math.inf) if inplace else scores.masked_fill(~keep, -math.inf)
            new_max = torch.maximum(running_max, scores.amax(dim=-1, keepdim=True)).detach()
            safe_max = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
            correction = torch.exp2(running_max - safe_max)
            weights = scores.sub_(safe_max).exp2_() if inplace else torch.exp2(scores - safe_max)
            running_sum = running_sum * correction + weights.sum(dim=-1, keepdim=True)
            accumulator = accumulator * correction + fetcher.weighted_values(weights, v_tile)
            running_max = new_max
    attended = running_sum > 0
    safe_sum = torch.where(attended, running_sum, torch.ones_like(running_sum))
    safe_max = torch.where(torch.isinf(running_max), torch.zeros_like(running_max), running_max)
    lse = torch.where(attended, (safe_max + torch.log2(safe_sum)) * math.log(2), torch.full_like(safe_sum, -math.inf))
    return accumulator / safe_sum, lse.squeeze(-1)


def _span(key, value, blocks, kv_block):
    """Positions, K and V of a list of KV blocks: a view when consecutive, else one index_select."""
    kv_len = key.shape[2]
    blocks = blocks.long()
    if int(blocks[-1] - blocks[0]) == blocks.numel() - 1:
        start, stop = int(blocks[0]) * kv_block, min(kv_len, (int(blocks[-1]) + 1) * kv_block)
        return torch.arange(start, stop), key[:, :, start:stop], value[:, :, start:stop]
    positions = (blocks.unsqueeze(-1) * kv_block + torch.arange(kv_block)).flatten()
    positions = positions[positions < kv_len]
    return positions, key.index_select(2, positions), value.index_select(2, positions)


def sdpa_rows(query, key, value, block_mask, scale):
    """Inference fast path (prototype): shared layout (mask broadcast over B and H), no score_mod, Hq == Hkv."""
    from triton_attn.masks.evaluate import call_mask_mod

    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    batch, heads, _, _ = query.shape
    q_block, kv_block = block_mask.BLOCK_SIZE
    zero = torch.zeros(1, 1, 1, 1, dtype=torch.long)
    outs, lses = [], []
    for row in range(block_mask.num_blocks[0]):
        q_start = row * q_block
        q_tile = query[:, :, q_start:q_start + q_block]
        rows = q_tile.shape[2]
        parts = []
        for counts, indices, partial in ((block_mask.kv_num_blocks, block_mask.kv_indices, True),
                                         (block_mask.full_kv_num_blocks, block_mask.full_kv_indices, False)):
            n = int(counts[0, 0, row])
            if n == 0:
                continue
            positions, k_tile, v_tile = _span(key, value, indices[0, 0, row, :n], kv_block)
            bias = None
            if partial:
                keep = call_mask_mod(block_mask.mask_mod, zero, zero, torch.arange(q_start, q_start + rows).view(1, 1, -1, 1),
                                     positions.view(1, 1, 1, -1), (1, 1, rows, positions.numel()))
                bias = torch.zeros(keep.shape, dtype=query.dtype).masked_fill_(~keep, -math.inf)
            out, lse = flash(q_tile, k_tile, v_tile, 0.0, False, attn_mask=bias, scale=scale)
            parts.append((torch.nan_to_num(out), torch.nan_to_num(lse, nan=-math.inf)))
        if not parts:
            outs.append(torch.zeros(batch, heads, rows, value.shape[-1], dtype=query.dtype))
            lses.append(torch.full((batch, heads, rows), -math.inf))
            continue
        if len(parts) == 1:
            out, lse = parts[0]
        else:
            (o1, l1), (o2, l2) = parts
            top = torch.maximum(l1, l2)
            top = torch.where(torch.isinf(top), torch.zeros_like(top), top)
            w1, w2 = torch.exp(l1 - top), torch.exp(l2 - top)
            total = w1 + w2
            out = (o1 * w1.unsqueeze(-1) + o2 * w2.unsqueeze(-1)) / total.clamp_min(1e-30).unsqueeze(-1)
            lse = torch.where(total > 0, top + torch.log(total), torch.full_like(total, -math.inf))
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, 2), torch.cat(lses, 2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--flex", action="store_true", help="also time torch.compile(flex_attention)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import triton_attn as ta
    from triton_attn import reference as R
    from bench_attention import Problem, make_inputs, named_mask

    original_row = R._query_block_row
    length = args.seq_len
    scale = 1 / math.sqrt(64)
    compiled_flex = None
    if args.flex:
        from torch.nn.attention.flex_attention import create_block_mask as flex_block_mask, flex_attention

        compiled_flex = torch.compile(flex_attention, dynamic=False)
    print(f"L={length}, B=1, H={args.heads}, D=64, float32, {args.threads} thread(s); process CPU ms per call")
    for mask in ("sliding_window", "document"):
        problem = Problem(mask, length, "float32", 64, 1, args.heads, "cpu")
        named = named_mask(problem)
        q, k, v, _ = make_inputs(problem)
        block_mask = ta.create_block_mask(named.mask_mod, None, None, length, length)

        def with_row(row_fn):
            def run():
                R._query_block_row = row_fn
                try:
                    return ta.attention(q, k, v, block_mask=block_mask, return_lse=True)
                finally:
                    R._query_block_row = original_row
            return run

        variants = {"orig": with_row(original_row), "exp2": with_row(exp2_row),
                    "sdpa_rows": lambda: sdpa_rows(q, k, v, block_mask, scale)}
        if compiled_flex is not None:
            flex_mask = flex_block_mask(named.mask_mod, None, None, length, length, device="cpu")
            start = time.perf_counter()
            compiled_flex(q, k, v, block_mask=flex_mask)
            print(f"{mask}: flex first call (compile) {time.perf_counter() - start:.1f} s")
            # compiled FlexAttention on CPU returns no lse (inference only)
            variants["flex"] = lambda: (compiled_flex(q, k, v, block_mask=flex_mask), None)
        reference_out, reference_lse = variants["orig"]()
        times = {name: [] for name in variants}
        diffs = {}
        for name, fn in variants.items():
            out, lse = fn()
            lse_diff = "-" if lse is None else f"{(lse - reference_lse).abs().max().item():.1e}"
            diffs[name] = f"{(out - reference_out).abs().max().item():.1e}/{lse_diff}"
        for _ in range(args.repeats):
            for name, fn in variants.items():
                start = time.process_time()
                fn()
                times[name].append(round((time.process_time() - start) * 1e3))
        for name in variants:
            print(f"{mask:<15} {name:<10} cpu ms {times[name]}  median {sorted(times[name])[len(times[name]) // 2]:>5}"
                  f"  max diff vs orig (out/lse) {diffs[name]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
