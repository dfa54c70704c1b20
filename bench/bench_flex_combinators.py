"""torch's ``and_masks``/``or_masks`` BlockMask build time against the same predicate written with ``&``/``|``.

    python bench/bench_flex_combinators.py                  # 16k and 64k, CSV under bench/results/
    python bench/bench_flex_combinators.py --sizes 4096

Both forms go through ``triton_attn.create_block_mask``. torch's combinators start from
``b.new_ones(())`` / ``b.new_zeros(())``, which the tracer records as constants, so they get the
interval compiler like the ``&`` form (before, they fell back to the exact O(L^2) builder). Each
case is built ``--repeats`` times after a 1k-token warm-up; the best time is reported with the
ratio combinator / operator (the target is <= 1.5).
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WINDOW = 64


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _window(b, h, q_idx, kv_idx):
    return q_idx - kv_idx < WINDOW


def _sink(b, h, q_idx, kv_idx):
    return kv_idx < 4


def forms():
    from torch.nn.attention.flex_attention import and_masks, or_masks

    return {
        "and_masks(causal, window)": (and_masks(_causal, _window),
                                      lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & (q_idx - kv_idx < WINDOW)),
        "or_masks(and_masks(causal, window), sink)": (
            or_masks(and_masks(_causal, _window), _sink),
            lambda b, h, q_idx, kv_idx: ((q_idx >= kv_idx) & (q_idx - kv_idx < WINDOW)) | (kv_idx < 4)),
    }


def best_time(build, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        build()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch

    import triton_attn as ta

    rows = []
    for name, (combinator, operator_form) in forms().items():
        for mod in (combinator, operator_form):
            ta.create_block_mask(mod, None, None, 1024, 1024)  # warm-up
        for size in args.sizes:
            times = {label: best_time(lambda: ta.create_block_mask(mod, None, None, size, size), args.repeats)
                     for label, mod in (("combinator", combinator), ("operator", operator_form))}
            same = torch.equal(ta.create_block_mask(combinator, None, None, size, size).to_dense(),
                               ta.create_block_mask(operator_form, None, None, size, size).to_dense())
            rows.append({"mask": name, "seq_len": size, "combinator_s": f"{times['combinator']:.4f}",
                         "operator_s": f"{times['operator']:.4f}",
                         "ratio": f"{times['combinator'] / times['operator']:.2f}", "same_block_mask": same})
            print(rows[-1], flush=True)
    stamp = _dt.datetime.now(_dt.timezone.utc)
    out = args.out or ROOT / "bench" / "results" / f"flex_combinators_{stamp:%Y%m%d-%H%M}_cpu{os.cpu_count()}.csv"
    with open(out, "w", newline="") as f:
        f.write(f"# date: {stamp:%Y-%m-%d %H:%M} UTC\n# machine: {platform.machine()} / {os.cpu_count()} cores / "
                f"{platform.system()}\n# torch: {torch.__version__}\n")
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
