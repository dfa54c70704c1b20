"""Host time of paged decode on the kernel route: ``paged_attention`` per call vs ``plan_paged`` once per step
and ``plan.run`` per layer (CPU, launches stubbed).

On a GPU a decode step's kernels take microseconds, so the Python between launches decides whether the
GPU waits. This measures that Python alone: the ``interpret`` route (the same planning and argument code as
``triton``) with the kernel launch replaced by a no-op, next to ``F.scaled_dot_product_attention`` on a
tiny problem (one query row over 16 keys: the host cost of one PyTorch attention op).
Median of ``--rounds`` rounds of ``--calls`` calls, microseconds per call.

Usage::

    python bench/bench_paged_host.py                  # B=8, Hq=32, Hkv=8, D=128, 1k tokens per sequence
    python bench/bench_paged_host.py --batch 64 --cache 4096
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import triton_attn as ta  # noqa: E402


def per_call_us(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--q-heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--cache", type=int, default=1024, help="tokens per sequence")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if importlib.util.find_spec("triton") is None:
        raise SystemExit("needs triton (the kernel route's planning code)")
    from triton_attn.kernels.decode import launch as decode_launch

    torch.manual_seed(0)
    torch.set_num_threads(1)
    pages_per_seq = -(-args.cache // args.page_size)
    num_pages = args.batch * pages_per_seq
    shape = (num_pages, args.kv_heads, args.page_size, args.head_dim)
    key_cache, value_cache = torch.randn(shape), torch.randn(shape)
    table = torch.randperm(num_pages, dtype=torch.int32).view(args.batch, pages_per_seq)
    lens = torch.full((args.batch,), args.cache, dtype=torch.int32)
    query = torch.randn(args.batch, args.q_heads, 1, args.head_dim)
    tiny_q, tiny_k, tiny_v = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 16, 8), torch.randn(1, 1, 16, 8)

    decode_launch.launch = lambda *a, **k: None  # the Python around the launches only
    plan = ta.plan_paged(table, lens, key_cache, value_cache, num_q_heads=args.q_heads, backend="interpret")
    cases = {
        "sdpa, 1 query row x 16 keys (a torch op's host cost)":
            lambda: F.scaled_dot_product_attention(tiny_q, tiny_k, tiny_v),
        "paged_attention (checks + plan + launch, per call)":
            lambda: ta.paged_attention(query, key_cache, value_cache, table, lens, backend="interpret"),
        "plan_paged (once per step)":
            lambda: ta.plan_paged(table, lens, key_cache, value_cache, num_q_heads=args.q_heads, backend="interpret"),
        "plan.update (once per step)": lambda: plan.update(table, lens),
        "plan.run (per layer)": lambda: plan.run(query, key_cache, value_cache),
    }
    samples = {name: [] for name in cases}
    for fn in cases.values():
        fn()
    for _ in range(args.rounds):
        for name, fn in cases.items():
            samples[name].append(per_call_us(fn, args.calls))
    print(f"host time per call, us (median of {args.rounds} x {args.calls}; B={args.batch}, Hq={args.q_heads}, "
          f"Hkv={args.kv_heads}, D={args.head_dim}, {args.cache} tokens/sequence, page {args.page_size}, "
          f"float32, 1 thread; kernel launches stubbed)")
    for name, values in samples.items():
        print(f"  {name:55s} {statistics.median(values):9.1f}")


if __name__ == "__main__":
    main()
