"""Block-mask build time and peak memory: triton_attn's compiler vs PyTorch FlexAttention's.

    python bench/bench_block_mask.py                 # the full run (CSV + PNG under bench/results/)
    python bench/bench_block_mask.py --sizes 4096 16384 --impls ours torch_eager

Every case runs in its own subprocess, so that its peak memory is its own: the worker builds the
inputs, warms the implementation up on a 1k-token mask, resets the peak-RSS counter
(``/proc/self/clear_refs``), builds the mask once, and reports the wall time and the peak RSS
(``VmHWM``), both absolute and above the RSS just before the build. Torch's allocations are
invisible to tracemalloc, hence RSS.

Implementations:

- ``ours``: ``triton_attn.create_block_mask`` (interval analysis + exact refinement; a
  ``CompactBlockMask`` above 4M tiles).
- ``torch_eager``: ``torch.nn.attention.flex_attention.create_block_mask`` as is. It evaluates
  the mask_mod on the whole Q x KV grid; cases whose int64 index temporaries (Q * KV * 8 bytes)
  exceed ``--eager-limit-gib`` are not run but recorded as ``skipped: would allocate N GiB``.
- ``torch_compiled``: ``torch.compile(create_block_mask)``; the reported time is a second call
  (the first, with compilation, is in ``compile_s``). A case that times out or fails is recorded
  as such, and larger sizes of that mask are then skipped.

Masks (all B = H = None): causal; sliding window of 1024; document = causal within packed
documents of 512..8192 tokens (seeded); prefix-LM with a prefix of a quarter of the sequence.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
MASKS = ("causal", "sliding_window", "document", "prefix_lm")
SIZES = (4096, 16384, 65536, 131072, 1048576)
IMPLS = ("ours", "torch_eager", "torch_compiled")
FIELDS = ("mask", "seq_len", "impl", "status", "time_s", "compile_s", "peak_rss_mb", "extra_rss_mb",
          "mask_bytes", "layout", "speedup_vs_eager", "note")


# ------------------------------------------------------------------------------------------------
# worker (one case per process)
# ------------------------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def make_mask_mod(kind: str, seq_len: int):
    import torch

    from triton_attn.masks import and_masks, causal_mask, document_mask, prefix_lm_mask, sliding_window_mask

    if kind == "causal":
        return causal_mask
    if kind == "sliding_window":
        return sliding_window_mask(1024)
    if kind == "prefix_lm":
        return prefix_lm_mask(seq_len // 4)
    if kind == "document":
        gen = torch.Generator().manual_seed(seq_len)
        lengths = torch.randint(512, 8193, (seq_len // 512 + 1,), generator=gen)
        ids = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)[:seq_len].contiguous()
        return and_masks(causal_mask, document_mask(ids))
    raise ValueError(kind)


def _mask_bytes(block_mask) -> int:
    if hasattr(block_mask, "nbytes"):
        return int(block_mask.nbytes())
    total = 0
    for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                 "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices"):
        t = getattr(block_mask, name, None)
        if t is not None:
            total += t.numel() * t.element_size()
    return total


def worker(impl: str, kind: str, seq_len: int, layout: str) -> dict:
    import warnings

    import torch

    warnings.simplefilter("ignore")
    sys.path.insert(0, str(ROOT))
    import triton_attn as ta

    mod = make_mask_mod(kind, seq_len)
    result = {"compile_s": ""}
    if impl == "ours":
        build = lambda n: ta.create_block_mask(mod, None, None, n, n, layout=layout)  # noqa: E731
    else:
        from torch.nn.attention.flex_attention import create_block_mask as flex_create

        fn = torch.compile(flex_create) if impl == "torch_compiled" else flex_create
        build = lambda n: fn(mod, None, None, n, n, device="cpu")  # noqa: E731
    if impl == "torch_compiled":
        start = time.perf_counter()
        build(seq_len)
        result["compile_s"] = round(time.perf_counter() - start, 4)
    else:
        build(1024 if kind != "document" else min(seq_len, 1024))  # warm-up: lazy imports, thread pools
    rss_before = _status_kb("VmRSS")
    reset = _reset_peak()
    start = time.perf_counter()
    block_mask = build(seq_len)
    elapsed = time.perf_counter() - start
    peak = _status_kb("VmHWM")  # since the reset (or, where it is unavailable, since the start)
    result.update(time_s=round(elapsed, 4), peak_rss_mb=round(peak / 1024, 1),
                  extra_rss_mb=round((peak - rss_before) / 1024, 1), mask_bytes=_mask_bytes(block_mask),
                  layout=type(block_mask).__name__, note="" if reset else "peak RSS not reset: includes warm-up")
    return result


# ------------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------------
def run_case(impl: str, kind: str, seq_len: int, timeout: float, layout: str = "auto") -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", impl, kind, str(seq_len), layout]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"status": f"timeout after {timeout:.0f} s"}
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()
        reason = tail[-1] if tail else f"exit code {done.returncode}"
        if done.returncode in (-9, 137) or "out of memory" in reason.lower() or "DefaultCPUAllocator" in reason:
            reason = "OOM: " + reason
        return {"status": f"failed: {reason[:200]}"}
    for line in reversed(done.stdout.strip().splitlines()):
        if line.startswith("{"):
            out = json.loads(line)
            out["status"] = "ok"
            return out
    return {"status": "failed: no result"}


def machine_header() -> dict:
    import torch

    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = "n/a"
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{socket.gethostname()} / {cpu} / {os.cpu_count()} cores / {platform.system()}",
        "torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "ours_compiler_threads": _compiler_threads(),
        "load_average_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def _compiler_threads():
    sys.path.insert(0, str(ROOT))
    from triton_attn.masks import compiler

    return compiler.COMPILER_THREADS


def plot(rows, header, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(MASKS), figsize=(4.2 * len(MASKS), 7.5), sharex=True)
    styles = {"ours": ("tab:green", "o-"), "torch_eager": ("tab:red", "s-"), "torch_compiled": ("tab:blue", "^-")}
    for col, kind in enumerate(MASKS):
        for impl, (color, style) in styles.items():
            points = [(r["seq_len"], r["time_s"], r["peak_rss_mb"]) for r in rows
                      if r["mask"] == kind and r["impl"] == impl and r["status"] == "ok"]
            if not points:
                continue
            xs, ts, ms = zip(*points)
            axes[0][col].plot(xs, ts, style, color=color, label=impl)
            axes[1][col].plot(xs, ms, style, color=color, label=impl)
            for r in rows:  # mark cases that did not finish
                if r["mask"] == kind and r["impl"] == impl and r["status"] != "ok":
                    axes[0][col].annotate("x", (r["seq_len"], max(ts)), color=color, ha="center")
        axes[0][col].set_title(kind)
        for row in (0, 1):
            axes[row][col].set_xscale("log", base=2)
            axes[row][col].set_yscale("log")
            axes[row][col].grid(True, which="both", alpha=0.3)
        axes[1][col].set_xlabel("sequence length (tokens)")
    axes[0][0].set_ylabel("build time (s)")
    axes[1][0].set_ylabel("peak RSS of the process (MB)")
    axes[0][0].legend(loc="upper left", fontsize=8)
    fig.suptitle(f"create_block_mask on CPU, BLOCK_SIZE 128 -- {header['date']}, {header['machine']}, "
                 f"torch {header['torch']}, triton {header['triton']} (x = did not finish)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=4, metavar=("IMPL", "MASK", "SEQ_LEN", "LAYOUT"), help=argparse.SUPPRESS)
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES))
    parser.add_argument("--masks", nargs="+", default=list(MASKS), choices=MASKS)
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per case (default 180)")
    parser.add_argument("--eager-limit-gib", type=float, default=8.0,
                        help="skip torch_eager cases whose Q*KV int64 temporaries exceed this (default 8)")
    parser.add_argument("--out", type=Path, default=None,
                        help="CSV path (default: bench/results/block_mask_<date>_<host>.csv)")
    args = parser.parse_args(argv)

    if args.worker:
        impl, kind, seq_len, layout = args.worker
        print(json.dumps(worker(impl, kind, int(seq_len), layout)), flush=True)
        return 0

    header = machine_header()
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M")
    out = args.out or RESULTS / f"block_mask_{stamp}_{socket.gethostname()}_cpu{os.cpu_count()}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for kind in args.masks:
        gave_up = {}
        eager_times = {}
        for seq_len in sorted(args.sizes):
            for impl in args.impls:
                row = {"mask": kind, "seq_len": seq_len, "impl": impl}
                would_allocate = seq_len * seq_len * 8 / 2**30
                if impl == "torch_eager" and would_allocate > args.eager_limit_gib:
                    row["status"] = f"skipped: would allocate {would_allocate:,.0f} GiB"
                elif impl in gave_up:
                    row["status"] = f"skipped: {gave_up[impl]} at a smaller size"
                else:
                    row.update(run_case(impl, kind, seq_len, args.timeout))
                    if row["status"] != "ok" and impl != "ours":
                        gave_up[impl] = row["status"].split(":")[0]
                if impl == "torch_eager" and row.get("status") == "ok":
                    eager_times[seq_len] = row["time_s"]
                if impl == "ours" and row.get("status") == "ok" and seq_len in eager_times:
                    row["speedup_vs_eager"] = round(eager_times[seq_len] / max(row["time_s"], 1e-9), 1)
                rows.append(row)
                shown = {k: row.get(k, "") for k in ("time_s", "peak_rss_mb", "extra_rss_mb", "layout", "status")}
                print(f"{kind:15s} {seq_len:>8d} {impl:15s} {shown}", flush=True)
    # ours runs before torch_eager at each size: fill in the speedups afterwards
    eager = {(r["mask"], r["seq_len"]): r["time_s"] for r in rows if r["impl"] == "torch_eager" and r["status"] == "ok"}
    for r in rows:
        if r["impl"] == "ours" and r["status"] == "ok" and (r["mask"], r["seq_len"]) in eager:
            r["speedup_vs_eager"] = round(eager[(r["mask"], r["seq_len"])] / max(r["time_s"], 1e-9), 1)
    # the compact layout's size, for the docs
    compact_notes = []
    if "ours" in args.impls and "causal" in args.masks:
        for seq_len in (131072, 1048576):
            if seq_len in args.sizes:
                extra = run_case("ours", "causal", seq_len, args.timeout, layout="compact")
                if extra.get("status") == "ok":
                    compact_notes.append(f"compact causal {seq_len}: {extra['mask_bytes']} bytes "
                                         f"(built in {extra['time_s']} s)")
    header["load_average_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    with open(out, "w", newline="") as f:
        for key, value in header.items():
            f.write(f"# {key}: {value}\n")
        for note in compact_notes:
            f.write(f"# {note}\n")
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in FIELDS})
    plot(rows, header, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png')}")
    for note in compact_notes:
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
