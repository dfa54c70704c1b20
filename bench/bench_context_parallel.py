"""Context-parallel attention on CPU processes joined by gloo: time, memory, skipped steps, balance.

For each process count (1, 2, 4 by default) the ranks are spawned once, bound to 127.0.0.1, and run
every (sequence length, mask, load balance) problem. Each rank makes its own random shards, so no
rank ever holds the full sequence; every rank runs one intra-op thread (N ranks on N cores).
Per problem:

- ``plan_s``: building this rank's per-step BlockMasks (``plan_steps``; cached for later calls), slowest rank;
- ``fwd_s``: a forward call with the plan cached, slowest rank; ``rank_fwd_s`` per rank;
- ``fwd_bwd_s``: forward + backward of a second call, for lengths in ``--backward-lengths``;
- ``peak_mb`` / ``peak_bwd_mb``: per rank, peak resident memory during the plan and forward call
  (resp. the forward + backward call) above the resident memory before it (``VmHWM`` reset through
  ``/proc/self/clear_refs`` after ``malloc_trim``; glibc's mmap threshold is pinned at 1 MiB so large
  tensors are returned to the OS when freed), i.e. what attention itself added on top of its inputs;
- ``skipped``: ring steps skipped per rank; ``pairs``: allowed (q, kv) pairs per rank over the computed
  steps (counted from the step BlockMasks, as ``record_ring_stats`` does) and ``imbalance`` = max / mean.

Masks (``SHAPES`` gives their heads): ``causal`` and ``document`` (causal within packed documents of
random lengths, mean L / 8) with one head of 16, so 64k tokens of quadratic work finish in minutes on
2 cores; ``sliding_window`` (256 tokens) with 8 heads of 64, little work over large tensors, where
the per-rank memory shows the O(L / P) scaling. Load balances: none, head_tail (and per_document for
the document mask).

Usage::

    python bench/bench_context_parallel.py                       # 1/2/4 processes, 16k/32k/64k tokens
    python bench/bench_context_parallel.py --procs 2 --lengths 16384 --masks causal
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout, installed or not
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

RESULTS = ROOT / "bench" / "results"
FIELDS = ["procs", "seq_len", "mask", "load_balance", "plan_s", "fwd_s", "fwd_bwd_s", "rank_fwd_s", "peak_mb",
          "peak_bwd_mb", "skipped", "pairs", "imbalance"]
# (q heads, kv heads, head dim) per mask: tiny heads where the work is quadratic; the sliding window
# (little work) gets wide ones, so the sequence-sized tensors dominate memory and its O(L / P) shows.
SHAPES = {"causal": (1, 1, 16), "document": (1, 1, 16), "sliding_window": (8, 8, 64)}
WINDOW = 256


def document_lengths(seq_len: int) -> List[int]:
    """Packed documents of random lengths (mean seq_len / 8), the same on every rank."""
    generator = torch.Generator().manual_seed(seq_len)
    lengths, total = [], 0
    while total < seq_len:
        length = int(torch.randint(seq_len // 32, seq_len // 5, (1,), generator=generator))
        length = min(length, seq_len - total)
        lengths.append(length)
        total += length
    return lengths


def problem_mods(mask: str, seq_len: int):
    from triton_attn.masks import and_masks, causal_mask, document_mask, sliding_window_mask

    if mask == "causal":
        return causal_mask, None
    if mask == "sliding_window":
        return sliding_window_mask(WINDOW), None
    lengths = document_lengths(seq_len)
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    return and_masks(causal_mask, document_mask(ids)), lengths


def memory_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def reset_peak_memory() -> None:
    # Hand freed heap back to the OS first, so memory cached from an earlier problem is not reused
    # unseen, then reset the high-water mark to the current resident size.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # resets VmHWM to the current resident size


def run_problem(rank: int, procs: int, seq_len: int, mask: str, load_balance: str, backward: bool) -> Dict:
    from triton_attn.distributed import PerDocumentBalancer, context_parallel_attention, layout_positions
    from triton_attn.distributed.balance import resolve_load_balance
    from triton_attn.distributed.plan import plan_steps
    from triton_attn.distributed.report import allowed_pairs

    mask_mod, lengths = problem_mods(mask, seq_len)
    balancer = resolve_load_balance(PerDocumentBalancer(lengths) if load_balance == "per_document" else load_balance)
    generator = torch.Generator().manual_seed(rank)
    local = seq_len // procs
    q_heads, kv_heads, head_dim = SHAPES[mask]
    q = torch.randn(1, q_heads, local, head_dim, generator=generator)
    k, v = (torch.randn(1, kv_heads, local, head_dim, generator=generator) for _ in range(2))

    def call(q_, k_, v_):
        return context_parallel_attention(q_, k_, v_, mask_mod=mask_mod, load_balance=balancer)

    dist.barrier()
    reset_peak_memory()
    resident = memory_kb("VmRSS")
    start = time.perf_counter()
    positions = layout_positions(balancer, seq_len, procs)
    plan = plan_steps(mask_mod, 1, q_heads, positions, rank, balancer.key(), balancer.alignment(seq_len, procs),
                      q.device)
    plan_s = time.perf_counter() - start
    dist.barrier()
    start = time.perf_counter()
    out = call(q, k, v)
    fwd_s = time.perf_counter() - start
    peak_mb = (memory_kb("VmHWM") - resident) / 1024
    del out
    fwd_bwd_s = peak_bwd_mb = None
    if backward:
        dist.barrier()
        reset_peak_memory()
        resident = memory_kb("VmRSS")
        leaves = [t.requires_grad_(True) for t in (q, k, v)]
        start = time.perf_counter()
        call(*leaves).sum().backward()
        fwd_bwd_s = time.perf_counter() - start
        peak_bwd_mb = (memory_kb("VmHWM") - resident) / 1024
    # What the plan says this rank computed (the same numbers record_ring_stats reports).
    computed = [m for m in plan.masks if m is not None]
    return dict(plan_s=plan_s, fwd_s=fwd_s, fwd_bwd_s=fwd_bwd_s, peak_mb=peak_mb, peak_bwd_mb=peak_bwd_mb,
                skipped=len(plan.skipped), pairs=sum(allowed_pairs(m, 1, q_heads) for m in computed))


def rank_main(rank: int, procs: int, port: int, problems: List[Dict], out_path: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=procs,
                            timeout=datetime.timedelta(minutes=30))
    rows = []
    for problem in problems:
        result = run_problem(rank, procs, **problem)
        gathered = [None] * procs
        dist.all_gather_object(gathered, result)
        if rank == 0:
            pairs = [r["pairs"] for r in gathered]
            mean = sum(pairs) / len(pairs)
            row = dict(procs=procs, seq_len=problem["seq_len"], mask=problem["mask"],
                       load_balance=problem["load_balance"],
                       plan_s=round(max(r["plan_s"] for r in gathered), 3),
                       fwd_s=round(max(r["fwd_s"] for r in gathered), 3),
                       fwd_bwd_s=None if gathered[0]["fwd_bwd_s"] is None
                       else round(max(r["fwd_bwd_s"] for r in gathered), 3),
                       rank_fwd_s=[round(r["fwd_s"], 3) for r in gathered],
                       peak_mb=[round(r["peak_mb"], 1) for r in gathered],
                       peak_bwd_mb=None if gathered[0]["peak_bwd_mb"] is None
                       else [round(r["peak_bwd_mb"], 1) for r in gathered],
                       skipped=[r["skipped"] for r in gathered], pairs=pairs,
                       imbalance=round(max(pairs) / mean, 3) if mean else 1.0)
            print(json.dumps(row), flush=True)
            rows.append(row)
    if rank == 0:
        Path(out_path).write_text(json.dumps(rows))
    dist.destroy_process_group()


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def problems_for(args, procs: int) -> List[Dict]:
    problems = []
    for seq_len in args.lengths:
        for mask in args.masks:
            balances = ["none", "head_tail"] + (["per_document"] if mask == "document" else [])
            if procs == 1:  # one rank holds everything, whatever the balancer
                balances = ["none"]
            for load_balance in balances:
                # The blockwise CPU backward over 8 heads of 64 takes minutes: forward only there.
                problems.append(dict(seq_len=seq_len, mask=mask, load_balance=load_balance,
                                     backward=seq_len in args.backward_lengths and mask != "sliding_window"))
    return problems


def versions() -> Dict[str, str]:
    return {"torch": torch.__version__.split("+")[0], "python": platform.python_version()}


def write_results(rows: List[Dict], args) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M")
    device = f"cpu-{platform.machine().replace('_', '-')}-x{os.cpu_count()}"
    stem = f"context_parallel_{stamp}_{device}_torch{versions()['torch']}"  # no Path.with_suffix: "2.13.0"
    RESULTS.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = RESULTS / f"{stem}.csv", RESULTS / f"{stem}.md"
    temporary = RESULTS / f"{stem}.csv.tmp"
    with open(temporary, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["date", "device", "torch", "python"] + FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({"date": stamp, "device": device, **versions(),
                             **{k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()}})
    os.replace(temporary, csv_path)
    lines = [f"# Context parallelism on CPU (gloo), {stamp}",
             "",
             f"Device: {device} ({os.cpu_count()} cores); torch {versions()['torch']}, Python {versions()['python']}.",
             "Problems: B=1, float32, backend torch, one intra-op thread per rank; (Hq, Hkv, D) per mask: "
             + ", ".join(f"{mask} {shape}" for mask, shape in SHAPES.items())
             + f"; sliding window {WINDOW} tokens; document = causal within packed documents (mean L/8).",
             "",
             f"Note: {max(args.procs)} processes on a {os.cpu_count()}-core machine oversubscribe it, and the machine "
             "was shared with other jobs while this ran: times measure correctness of the overlap and the "
             "balance, not speed-up. Per-rank peak memory and pairs are the meaningful scaling numbers.",
             "",
             "| procs | L | mask | balance | plan s | fwd s | fwd+bwd s | fwd s per rank | fwd peak MB per rank "
             "| fwd+bwd peak MB per rank | skipped per rank | pairs per rank | imbalance |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append("| " + " | ".join(str(row[f]) if row[f] is not None else "-" for f in FIELDS) + " |")
    temporary = RESULTS / f"{stem}.md.tmp"
    temporary.write_text("\n".join(lines) + "\n")
    os.replace(temporary, md_path)
    return RESULTS / stem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768, 65536])
    parser.add_argument("--masks", nargs="+", default=["causal", "document", "sliding_window"], choices=list(SHAPES))
    parser.add_argument("--backward-lengths", type=int, nargs="*", default=[16384])
    parser.add_argument("--no-save", action="store_true", help="print only, write nothing under bench/results")
    args = parser.parse_args()
    # Fixed mmap threshold (read by glibc when each rank starts): tensors of 1 MiB or more are mapped
    # and unmapped, so resident memory follows the live tensors instead of a fragmented heap.
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    rows = []
    for procs in args.procs:
        problems = problems_for(args, procs)
        with tempfile.TemporaryDirectory() as folder:
            out_path = os.path.join(folder, "rows.json")
            mp.spawn(rank_main, args=(procs, free_port(), problems, out_path), nprocs=procs, join=True)
            rows += json.loads(Path(out_path).read_text())
    if not args.no_save:
        print(f"wrote {write_results(rows, args)}.csv/.md")


if __name__ == "__main__":
    main()
