"""Host time of one ``attention()`` call on a 1-token decode step (CPU, torch backend), per checkout.

A decode step's attention is tiny (one query row over a short cache), so its time is mostly the library's
Python: validation, the route, the mask's cached derivations. This times it with ``time.perf_counter``
over many calls (median of rounds), next to ``F.scaled_dot_product_attention`` on the same tensors.

Give other checkouts (``--compare PATH ...``, e.g. a ``git worktree`` of an older commit) to measure them
in the same run: each checkout runs in its own subprocess, rounds interleaved, so a busy machine slows
every checkout alike.

Usage::

    python bench/bench_host.py                       # this checkout
    python bench/bench_host.py --compare /tmp/base    # and another one, interleaved
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Runs inside a subprocess whose sys.path starts at the checkout under test.
WORKER = r"""
import json, sys, time, torch
torch.manual_seed(0)
torch.set_num_threads(1)
import triton_attn as ta
from triton_attn.masks import causal_mask
import torch.nn.functional as F
calls, cache = int(sys.argv[1]), int(sys.argv[2])
q = torch.randn(1, 8, 1, 64)
k, v = torch.randn(1, 2, cache, 64), torch.randn(1, 2, cache, 64)
mask = ta.create_block_mask(lambda b, h, qi, ki: qi + (cache - 1) >= ki, None, None, 1, cache)
cases = {
    "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
    "attention, no mask": lambda: ta.attention(q, k, v, enable_gqa=True),
    "attention, BlockMask": lambda: ta.attention(q, k, v, block_mask=mask, enable_gqa=True),
}
result = {}
for name, call in cases.items():
    for _ in range(20):
        call()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    result[name] = (time.perf_counter() - start) / calls * 1e6
print(json.dumps(result))
"""


def run_round(checkout: Path, calls: int, cache: int) -> dict:
    code = f"import sys; sys.path.insert(0, {str(checkout)!r}); " + "exec(" + repr(WORKER) + ")"
    done = subprocess.run([sys.executable, "-c", code, str(calls), str(cache)], capture_output=True, text=True,
                          check=True, env={"PYTHONPATH": "", "PATH": "/usr/bin:/bin", "HOME": "/tmp"})
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", nargs="*", default=[], help="other checkouts to time in the same run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--cache", type=int, default=512, help="cached tokens (keys) of the decode step")
    args = parser.parse_args()
    checkouts = [ROOT] + [Path(p).resolve() for p in args.compare]
    samples = {str(c): [] for c in checkouts}
    for _ in range(args.rounds):
        for checkout in checkouts:
            samples[str(checkout)].append(run_round(checkout, args.calls, args.cache))
    print(f"host time per call, microseconds (median of {args.rounds} rounds x {args.calls} calls; "
          f"1 query row, Hq=8, Hkv=2, D=64, {args.cache} cached keys, float32 CPU, 1 thread)")
    for checkout, rounds in samples.items():
        names = rounds[0].keys()
        cells = ", ".join(f"{n}: {statistics.median(r[n] for r in rounds):.1f}" for n in names)
        print(f"{checkout}: {cells}")


if __name__ == "__main__":
    main()
