"""What attention dropout costs on the ``torch`` backend (CPU): a training step with dropout vs without.

    python bench/bench_dropout.py                      # BERT-base-like: B=8, Hq=12, L=512, D=64, float32
    python bench/bench_dropout.py --len 256 --repeats 3

A training step is ``attention(q, k, v, ...)`` forward and backward (``out.backward(grad)``), with
``dropout_p`` (default 0.1) vs 0.0, on two masks: bidirectional with a padding mask (each sequence's
length drawn in [L/2, L]) and causal. Two overheads are reported:

- same route: the blockwise loop (``backends/torch/blockwise.py``) with dropout vs without, called
  directly (its autograd recomputes each query-block row in the backward), and the same for the dense
  dropout route (``backends/torch/dense.py``) where it applies;
- user-visible: ``ta.attention(..., dropout_p=p)`` vs ``ta.attention(..., dropout_p=0.0)``, each on the route
  ``dispatch.plan_call`` gives it (without dropout PyTorch's fused kernel, ``sdpa``, takes these masks; with
  dropout it cannot, as it cannot give the keep mask).

The calls are interleaved (each repeat runs every case once, so the machine's load hits all alike); the
median is reported, the fastest too. Results: ``bench/results/dropout_<date>_<device>_torch<v>.{csv,md}``.
Target (issue): dropout costs at most 15% over no dropout.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import triton_attn as ta  # noqa: E402
from triton_attn.backends.torch.blockwise import blockwise_attention  # noqa: E402
from triton_attn.backends.torch.dense import dense_attention  # noqa: E402
from triton_attn.dropout import draw_dropout  # noqa: E402
from triton_attn.masks import causal_mask, padding_mask  # noqa: E402

RESULTS = ROOT / "bench" / "results"
TARGET = 0.15


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--len", type=int, default=512, dest="length")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--masks", default="padding,causal", help="comma-separated: padding, causal")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    return parser.parse_args(argv)


def interleaved_ms(cases: dict, repeats: int) -> dict:
    """name -> (min, median) milliseconds of each case, called in turn ``repeats`` times after a warm-up."""
    for fn in cases.values():
        fn()
    samples = {name: [] for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            samples[name].append((time.perf_counter() - start) * 1e3)
    return {name: (min(values), statistics.median(values)) for name, values in samples.items()}


def make_mask(name: str, batch: int, length: int) -> ta.BlockMask:
    if name == "causal":
        return ta.create_block_mask(causal_mask, None, None, length, length)
    generator = torch.Generator().manual_seed(1)
    lengths = torch.randint(length // 2, length + 1, (batch,), generator=generator)
    attention_mask = torch.arange(length).view(1, -1) < lengths.view(-1, 1)
    return ta.create_block_mask(padding_mask(attention_mask), batch, None, length, length)


def training_steps(query, key, value, block_mask, dropout_p: float) -> dict:
    """name -> a function running one forward + backward of that case."""
    grad = torch.randn_like(query)
    scale = query.shape[-1] ** -0.5

    def step(forward):
        def run():
            leaves = [t.detach().requires_grad_() for t in (query, key, value)]
            forward(*leaves).backward(grad)
        return run

    def attention(p):
        return step(lambda q, k, v: ta.attention(q, k, v, block_mask=block_mask, dropout_p=p))

    def blockwise(p):
        return step(lambda q, k, v: blockwise_attention(q, k, v, block_mask, score_mod=None, scale=scale,
                                                        dropout=draw_dropout(p, q.device))[0])

    def dense(p, mask):
        return step(lambda q, k, v: dense_attention(q, k, v, block_mask, mask=mask, scale=scale,
                                                    dropout=draw_dropout(p, q.device))[0])

    cases = {"attention p=0": attention(0.0), f"attention p={dropout_p}": attention(dropout_p),
             "blockwise p=0": blockwise(0.0), f"blockwise p={dropout_p}": blockwise(dropout_p)}
    route = ta.explain(query.detach().requires_grad_(), key, value, block_mask=block_mask, dropout_p=dropout_p)
    if route.family == "dense":
        cases["dense p=0"] = dense(0.0, route.sdpa_mask)
        cases[f"dense p={dropout_p}"] = dense(dropout_p, route.sdpa_mask)
    return cases


def device_name() -> str:
    return f"cpu-{platform.machine()}-x{torch.get_num_threads()}"


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = dict(batch=args.batch, heads=args.heads, length=args.length, head_dim=args.head_dim)
    query, key, value = (torch.randn(args.batch, args.heads, args.length, args.head_dim) for _ in range(3))
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = []
    for mask_name in args.masks.split(","):
        block_mask = make_mask(mask_name, args.batch, args.length)
        probe = query.detach().requires_grad_()
        routes = {p: ta.explain(probe, key, value, block_mask=block_mask, dropout_p=p) for p in (0.0, args.dropout)}
        timings = interleaved_ms(training_steps(query, key, value, block_mask, args.dropout), args.repeats)
        for name, (fastest, median) in timings.items():
            p = 0.0 if name.endswith("p=0") else args.dropout
            route = routes[p] if name.startswith("attention") else None
            rows.append(dict(mask=mask_name, case=name, dropout_p=p, **shape,
                             route=f"{route.family}/{route.call}/{route.backward}" if route else name.split()[0],
                             median_ms=round(median, 2), min_ms=round(fastest, 2)))
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    versions = dict(torch=torch.__version__.split("+")[0])
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"dropout_{stamp}_{device_name()}_torch{versions['torch']}"
    for row in rows:
        row.update(date=stamp, device=device_name(), python=platform.python_version(), **versions,
                   threads=torch.get_num_threads(), load_avg=f"{load_before:.1f}-{load_after:.1f}")
    with open(f"{stem}.csv", "w", newline="") as stream:  # not with_suffix: the versions have dots
        writer = csv.DictWriter(stream, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    lines = [f"# Attention dropout, training step (forward + backward), torch backend {stamp} ({device_name()}, "
             f"torch {versions['torch']})", "",
             f"B={args.batch}, Hq={args.heads}, L={args.length}, D={args.head_dim}, float32; dropout "
             f"{args.dropout} vs 0.0; median (min) of {args.repeats} interleaved runs after a warm-up. Load average "
             f"(1 min) {load_before:.1f} before, {load_after:.1f} after, on {os.cpu_count()} CPUs.", "",
             "| mask | case | route | median ms | min ms |", "|---|---|---|---|---|"]
    lines += [f"| {r['mask']} | {r['case']} | {r['route']} | {r['median_ms']:.1f} | {r['min_ms']:.1f} |" for r in rows]
    lines += ["", "| mask | overhead | dropout / no dropout: median (min) | target <= "
              f"{1 + TARGET:.2f}x (median) |", "|---|---|---|---|"]
    for mask_name in args.masks.split(","):
        by_case = {r["case"]: r for r in rows if r["mask"] == mask_name}
        for what, label in (("attention", "user-visible (each on its route)"), ("blockwise", "same route: blockwise"),
                            ("dense", "same route: dense")):
            if f"{what} p=0" in by_case:
                with_dropout, without = by_case[f"{what} p={args.dropout}"], by_case[f"{what} p=0"]
                ratio = with_dropout["median_ms"] / without["median_ms"]
                ratio_min = with_dropout["min_ms"] / without["min_ms"]
                verdict = "met" if ratio <= 1 + TARGET else "NOT met"
                lines.append(f"| {mask_name} | {label} | {ratio:.2f}x ({ratio_min:.2f}x) | {verdict} |")
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"results: {stem}.csv / .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
