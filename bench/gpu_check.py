"""GPU check of the Triton kernels: correctness of every kernel family, and speed, within a time budget.

On a CUDA or ROCm machine, on any supported target (``triton_attn.kernels.targets``: NVIDIA sm_80 to sm_120,
AMD gfx90a, gfx942, gfx950). Sections, in run order (``--sections`` picks some):

- ``forward`` (``gpu_check_forward.py``): correctness per mask family at head_dim 64 and 128, judged like the
  numerics rule against a float32 SDPA reference; TFLOP/s at 4k and 16k tokens vs SDPA;
- ``backward`` (``gpu_check_backward.py``): dQ/dK/dV vs float32 SDPA (3x rule), determinism, TFLOP/s vs SDPA;
  a comparison that fails or raises is a FAIL row and the run goes on;
- ``decode`` and ``paged`` (``gpu_check_decode.py``): one decode step at B 1/16, caches 4k/32k, Hq 32 / Hkv 8,
  D 128; us per call and GB/s; paged_attention vs the contiguous decode;
- ``cuda_graph`` (``gpu_check_graphs.py``): a 4-layer paged decode step (``ta.plan_paged`` + ``ta.write_paged_kv``)
  and a prefill forward + backward step captured in CUDA graphs, replayed on new inputs, checked each replay;
- ``efficiency`` (``gpu_check_efficiency.py``): forward and backward TFLOP/s of issue 12's cases; last, and cut
  short by the budget.
- ``flash`` (``gpu_check_flash.py``; not in the default run, whose budget it would overrun by about two minutes:
  ``--sections flash``, about 3 minutes alone): the FlashAttention-2 drop-ins -- ``flash_attn_func`` (causal with
  Lq != Lk, window, softcap, ALiBi, GQA; D 64 and 128; forward + backward), ``flash_attn_varlen_func`` (a packed
  causal batch), ``flash_attn_with_kvcache`` (paged, a decode step and a 16-token chunk, the in-place append) and
  dropout (against the returned keep-mask, same seed bitwise equal) vs float64; then ms / TFLOP/s against SDPA,
  dropout 0.1 vs 0.0, and packed vs padded varlen.

``--quick`` (about 2 minutes, budget 180 s) checks every kernel family once at one small shape in bf16 and
float32 (``gpu_check_quick.py``: prefill forward, backward dQ/dK/dV, decode split + combine, paged decode, the
tile refiner) and captures the decode step in a CUDA graph; PASS/FAIL rows, exit code 1 on any failure.

Time: ``gpu_check_plan.py`` estimates each section's seconds on one H100 from its shapes (kernel compiles
dominate); the default run's estimates sum to at most 480 s, ``--quick``'s to at most 180 s. ``--plan``
prints the plan and exits; every run prints it first, and a line per section with its measured and
estimated seconds. ``--budget SECONDS`` (default 480, 180 with ``--quick``; counted from the start) is
enforced at run time: a section whose estimate no longer fits in what is left becomes one skipped row; the
efficiency table and the quick checks consult it between their rows and skip the rest.
Compiled FlexAttention is opt-in (``--flex``: each shape compiles for tens of seconds, so raise ``--budget`` as
the plan says) and timed where speed is the point, the efficiency and decode sections; it is compiled once per
shape with dynamo's recompile limit raised, and a row whose calls did not run compiled says so
(``gpu_check_flex.py``).

Rows go to ``OUT/gpu_check[_quick]_<date>_<device>_torch<v>_triton<v>.csv`` (``--out``, default
``bench/results``, created if missing; nothing is written elsewhere), each naming the device (as torch reports
it) and its target ("sm_90", "gfx942"; "interpreter" in a dry run). ``pct_peak``: TFLOP/s as a percentage of
the device's peak dense 16-bit tensor-core rate, GB/s of its peak memory bandwidth, both the vendor's numbers
from ``gpu_peaks.py`` by device name; ``--peak-tflops`` / ``--copy-bandwidth`` override them. A device the
table does not know leaves the column empty (never a guessed peak).

    python bench/gpu_check.py                 # the full check on a CUDA or ROCm GPU (<= 8 minutes on an H100)
    python bench/gpu_check.py --quick         # every kernel family once (<= 3 minutes)
    python bench/gpu_check.py --plan          # the plan, with estimated seconds per section
    python bench/gpu_check.py --sections flash  # the FlashAttention-2 drop-ins (<= 4 minutes)
    python bench/gpu_check.py --dry-run       # CPU smoke run through the Triton interpreter at tiny sizes
"""

from __future__ import annotations

import argparse
import csv
import datetime
import re
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Optional, Sequence

import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
for _path in (ROOT, BENCH):  # the package from this checkout; the section modules beside this file
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from gpu_check_backward import backward_section  # noqa: E402
from gpu_check_efficiency import run_efficiency  # noqa: E402
from gpu_check_flash import run_flash  # noqa: E402
from gpu_check_flex import CompiledFlex, flex_limits  # noqa: E402

# mask_families: the forward section's masks, which tests read from this module.
from gpu_check_forward import mask_families, run_forward  # noqa: E402, F401
from gpu_check_graphs import run_cuda_graph  # noqa: E402
from gpu_check_plan import DEFAULT_BUDGET, QUICK_BUDGET, Budget, build_plan, format_plan  # noqa: E402
from gpu_check_quick import run_quick  # noqa: E402

FIELDS = ["date", "device", "target", "torch", "triton", "section", "mask", "seq", "head_dim", "dtype", "impl", "ms",
          "tflops", "max_error", "bound", "ok", "batch", "gb_s", "pct_peak", "note"]


def percent_of_peak(row: dict, peak_tflops: Optional[float], peak_gb_s: Optional[float]) -> str:
    """``pct_peak`` of a row: its TFLOP/s over ``peak_tflops``, else its GB/s over ``peak_gb_s``, as a
    percentage (three significant digits); "" when the row has neither or the peak is not known. Sections
    hand the rates over unrounded (floats): ``write_row`` rounds them for the CSV after this."""
    for key, peak in (("tflops", peak_tflops), ("gb_s", peak_gb_s)):
        value = row.get(key)
        if value not in (None, "") and peak:
            return f"{100.0 * float(value) / peak:.3g}"
    return ""


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_")


def results_path(out: Path, stamp: str, device_name: str, versions: Sequence[tuple] = (), mode: str = "") -> Path:
    """``out/gpu_check[_mode]_<stamp>_<device>[_<name><version>...].csv``: the device name and the versions
    (``(("torch", "2.11.0"), ("triton", "3.6.0"))``) reduced to a safe file name (ROCm reports names like
    "AMD Instinct MI250X/MI250")."""
    parts = ["gpu_check" + (f"_{mode}" if mode else ""), stamp, _safe(device_name) or "device"]
    parts += [_safe(f"{name}{version}") for name, version in versions]
    return Path(out) / ("_".join(parts) + ".csv")


def flex_available(device) -> bool:
    """Whether compiled FlexAttention can be offered on ``device``: a CUDA / ROCm device and a torch that
    has it (each use still catches its own failures)."""
    if torch.device(device).type != "cuda":
        return False
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def backward_csv_row(row: dict, head_dim: int) -> dict:
    """A ``backward_section`` row as a CSV row (NaN numbers left empty; ``ok`` None: empty)."""
    def number(value, spec):
        return "" if value is None or value != value else format(value, spec)

    ok, tflops = row.get("ok"), row.get("tflops")
    return dict(section="backward", mask=row["mask"], seq=row["seq_len"], head_dim=head_dim, impl=row["impl"],
                ms=number(row.get("ms"), ".3f"), tflops="" if tflops is None or tflops != tflops else float(tflops),
                max_error=number(row.get("max_grad_error"), ".3e"), bound=number(row.get("bound"), ".3e"),
                ok="" if ok is None else ok, note=row.get("note", ""))


def run_backward(args, device, dtype, writer_row) -> bool:
    """Backward: gradients vs a float32 SDPA reference (3x rule), determinism, TFLOP/s vs SDPA and FlexAttention."""
    all_ok = True
    for head_dim in args.head_dims:
        rows = backward_section(device=device.type, dtype=dtype, batch=args.batch, q_heads=args.heads,
                                kv_heads=args.heads, head_dim=head_dim, seq_lens=args.backward_seqs,
                                repeats=3 if args.dry_run else 10,
                                backend="interpret" if args.dry_run else "triton", log=lambda line: None)
        for row in rows:
            all_ok &= row.get("ok") is not False or row["impl"] != "ours"
            writer_row(backward_csv_row(row, head_dim))
    return all_ok


def _decode_rows(section: str, rows, writer_row) -> bool:
    all_ok = True
    for row in rows:
        ok = row.get("ok")
        all_ok &= ok is not False
        writer_row(dict(section=f"{section}_{row['check']}", mask=row.get("mask", "causal"), seq=row["seq"],
                        head_dim=row["head_dim"], impl=row["impl"], batch=row["batch"],
                        ms=f"{row['us'] / 1e3:.4f}" if "us" in row else "",
                        gb_s=float(row["gb_s"]) if "gb_s" in row else "",
                        max_error=f"{row['max_error']:.3e}" if "max_error" in row else "",
                        bound=f"{row['bound']:.3e}" if "bound" in row else "", ok="" if ok is None else ok,
                        note=row.get("note", "")))
    return all_ok


def _decode_options(args, device) -> dict:
    if args.dry_run:
        return dict(device="cpu", backend="interpret", batches=(1, 2), cache_lens=(64,), q_heads=4, kv_heads=2,
                    head_dim=16, repeats=1, peak_bandwidth=args.peak_gb_s)
    return dict(device=device.type, backend="triton", batches=tuple(args.decode_batches),
                cache_lens=tuple(args.decode_caches), peak_bandwidth=args.peak_gb_s)


def run_decode(args, device, dtype, writer_row) -> bool:
    """Decode step (Lq = 1, Hq 32 / Hkv 8, D 128): correctness, split count, us and GB/s vs SDPA and FlexAttention."""
    from gpu_check_decode import decode_section

    rows = decode_section(dtype=dtype, flex=getattr(args, "flex_compiled", None), **_decode_options(args, device))
    return _decode_rows("decode", rows, writer_row)


def run_paged(args, device, dtype, writer_row) -> bool:
    """paged_attention over shuffled pages vs the contiguous decode kernel: correctness (ragged too), us, GB/s."""
    from gpu_check_decode import paged_section

    rows = paged_section(dtype=dtype, page_sizes=tuple(args.page_sizes), **_decode_options(args, device))
    return _decode_rows("paged", rows, writer_row)


SECTIONS: Dict[str, Callable] = {"quick": run_quick, "forward": run_forward, "backward": run_backward,
                                 "decode": run_decode, "paged": run_paged, "cuda_graph": run_cuda_graph,
                                 "flash": run_flash, "efficiency": run_efficiency}
DEFAULT_SECTIONS = ["forward", "backward", "decode", "paged", "cuda_graph", "efficiency"]
# Registered, run on request (``--sections flash``): the default plan with it is ~600 s, over DEFAULT_BUDGET (and a
# lent GPU's 10-minute command limit); with --quick's ~250 s, over QUICK_BUDGET.
OPTIONAL_SECTIONS = ["flash"]
# Sections that consult the budget between their rows (``args.budget_clock``): they start when a first slice of
# them fits, and write what the budget cannot hold as skipped rows.
CUT_SHORT = {"efficiency": 15.0, "quick": 15.0}
QUICK_SECTIONS = ["quick", "cuda_graph"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU smoke run through the Triton interpreter at tiny sizes (after the GPU run's plan)")
    parser.add_argument("--quick", action="store_true",
                        help="every kernel family once at one small shape, bf16 and float32, and one CUDA graph")
    parser.add_argument("--plan", action="store_true", help="print the plan (estimated seconds per section), exit")
    parser.add_argument("--sections", nargs="+", default=None, choices=list(SECTIONS),
                        help=f"default {' '.join(DEFAULT_SECTIONS)}; with --quick {' '.join(QUICK_SECTIONS)}; "
                             f"on request: {' '.join(OPTIONAL_SECTIONS)}")
    parser.add_argument("--budget", type=float, default=None,
                        help=f"wall-clock seconds (default {DEFAULT_BUDGET:.0f}, {QUICK_BUDGET:.0f} with --quick, "
                             "none in --dry-run): a section whose estimate no longer fits is skipped, with a row")
    parser.add_argument("--flex", action="store_true",
                        help="also time compiled FlexAttention (tens of seconds of compile per shape: raise --budget)")
    parser.add_argument("--no-flex", action="store_true", help="no FlexAttention (the default; kept for old scripts)")
    parser.add_argument("--seqs", type=int, nargs="+", default=None, help="forward speed lengths (default 4096 16384)")
    parser.add_argument("--backward-seqs", type=int, nargs="+", default=None, help="backward lengths (default 4096)")
    parser.add_argument("--check-seq", type=int, default=None, help="correctness length (default 1024)")
    parser.add_argument("--head-dims", type=int, nargs="+", default=None, help="correctness head dims (default 64 128)")
    parser.add_argument("--speed-head-dims", type=int, nargs="+", default=None,
                        help="forward speed head dims (default 64: the efficiency section times 128)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=None, help="default 16")
    parser.add_argument("--perf-masks", nargs="+", default=["causal", "sliding_window", "document_causal"])
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[1, 16], help="decode/paged batch sizes")
    parser.add_argument("--decode-caches", type=int, nargs="+", default=[4096, 32768],
                        help="decode/paged cache lengths")
    parser.add_argument("--page-sizes", type=int, nargs="+", default=[16],
                        help="paged section page sizes (default 16; the cuda_graph decode step uses 64)")
    parser.add_argument("--copy-bandwidth", type=float, default=None,
                        help="GB/s the decode/paged rows are compared with (default: the device's peak memory "
                             "bandwidth from bench/gpu_peaks.py)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="TFLOP/s the forward/backward/efficiency rows are compared with (default: the device's "
                             "peak dense 16-bit tensor-core rate from bench/gpu_peaks.py)")
    parser.add_argument("--efficiency-budget", type=float, default=None,
                        help="seconds for the efficiency section alone (default: what the run's budget leaves)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="folder of the results")
    return parser


def parse_args(argv=None, *, gpu_sizes: bool = False):
    """The arguments with the run's sizes settled: the dry run's tiny ones, or (``gpu_sizes``, or no
    ``--dry-run``) a GPU run's; ``budget_seconds`` is the budget enforced (None: none)."""
    args = build_parser().parse_args(argv)
    tiny = args.tiny = args.dry_run and not gpu_sizes
    args.seqs = args.seqs or ([64] if tiny else [4096, 16384])
    args.backward_seqs = args.backward_seqs or ([64] if tiny else [4096])
    args.check_seq = args.check_seq or (48 if tiny else 1024)
    args.head_dims = args.head_dims or ([16] if tiny else [64, 128])
    args.speed_head_dims = args.speed_head_dims or ([16] if tiny else [64])
    args.heads = args.heads or (2 if tiny else 16)
    args.page_sizes = [16] if tiny else args.page_sizes
    args.sections = args.sections or list(QUICK_SECTIONS if args.quick else DEFAULT_SECTIONS)
    # What ``main`` settles from the device (a section called on these args alone gets the overrides).
    args.with_flex = args.flex and not args.no_flex and not tiny
    args.peak_gb_s = args.copy_bandwidth
    default_budget = QUICK_BUDGET if args.quick else DEFAULT_BUDGET
    args.budget_seconds = args.budget if args.budget is not None else (None if tiny else default_budget)
    return args


def identify_device(device):
    """(name as torch reports it, target name, SM / CU count, ``DevicePeaks`` or None) of ``device``;
    a CPU device (the dry run) is ("cpu-interpreter", "interpreter", None, None)."""
    if device.type != "cuda":
        return "cpu-interpreter", "interpreter", None, None
    from gpu_peaks import lookup

    from triton_attn.kernels.targets import device_target

    multiprocessors = torch.cuda.get_device_properties(device).multi_processor_count
    target = device_target(device).name  # an unknown GPU: the nearest target, with its one warning
    name = torch.cuda.get_device_name(device) or f"unnamed {target} device"
    return name, target, multiprocessors, lookup(name, multiprocessors)


def settle_peaks(args, peaks) -> list:
    """Set ``args.peak_tflops`` and ``args.peak_gb_s``, what ``pct_peak`` divides by: the override flag
    when given, else the table's number, else None; return one line per peak saying which and whence."""
    lines = []
    for attr, override, flag, field, what, unit in (
            ("peak_tflops", args.peak_tflops, "--peak-tflops", "tflops", "peak dense 16-bit tensor-core rate",
             "TFLOP/s"),
            ("peak_gb_s", args.copy_bandwidth, "--copy-bandwidth", "gb_s", "peak memory bandwidth", "GB/s")):
        table = None if peaks is None else getattr(peaks, field)
        value = override if override is not None else table
        setattr(args, attr, value)
        whence = flag if override is not None else "" if peaks is None else f"{peaks.model}: {peaks.source}"
        lines.append(f"{what}: {value:g} {unit} ({whence})" if value
                     else f"{what}: not known for this device, pct_peak left empty ({flag} sets it)")
    return lines


def row_status(row: dict) -> str:
    """PASS / FAIL / SKIP for a row that judges something (its ``ok``), "" for a measurement."""
    ok = row.get("ok")
    if ok is True or ok == "True":
        return "PASS"
    if ok is False or ok == "False":
        return "FAIL"
    return "SKIP" if str(row.get("note", "")).lower().startswith("skip") else ""


def run_sections(args, plan: Dict[str, float], device, dtype, write_row, clock: Budget,
                 log: Callable[[str], None] = print) -> bool:
    """Run ``args.sections`` in order; one whose estimate (``plan``: section -> seconds; for a ``CUT_SHORT``
    section its first slice) no longer fits in the budget is one skipped row instead. False when a section
    reported a failure (or raised)."""
    ok = True
    for section in args.sections:
        estimate = plan.get(section, 0.0)
        if not clock.admits(min(estimate, CUT_SHORT.get(section, estimate))):
            write_row(dict(section=section, impl="all", ok="", note=clock.skip_note(estimate)))
            continue
        started = clock.elapsed()
        try:
            ok &= bool(SECTIONS[section](args, device, dtype, write_row))
        except Exception as error:  # a section that raised: a FAIL row, and the next section still runs
            write_row(dict(section=section, impl="all", ok=False, note=f"error: {type(error).__name__}: {error}"[:300]))
            ok = False
        log(f"-- {section}: {clock.elapsed() - started:.0f} s (estimated {estimate:.0f} s); "
            f"{clock.elapsed():.0f} s into the run")
    return ok


def main(argv=None) -> int:
    clock_start = time.monotonic()
    args = parse_args(argv)
    plan_args = parse_args(argv, gpu_sizes=True)  # the plan is the GPU run's, also in a dry run
    plan = build_plan(plan_args, plan_args.sections)
    print(format_plan(plan, plan_args.budget_seconds))
    if args.plan:
        return 0
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA or ROCm device; run with --dry-run for the CPU smoke run", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    dtype = torch.bfloat16
    device_name, target, multiprocessors, peaks = identify_device(device)
    args.with_flex = args.with_flex and flex_available(device)
    runtime = (f"HIP {torch.version.hip}" if torch.version.hip else
               f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU build")
    units = "" if multiprocessors is None else f", {multiprocessors} {'CUs' if torch.version.hip else 'SMs'}"
    print(f"gpu_check on {device_name} (target {target}{units}; torch {torch.__version__}, {runtime})")
    for line in settle_peaks(args, peaks):
        print(f"  {line}")
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    path = results_path(args.out, stamp, device_name, (("torch", torch.__version__), ("triton", triton_version)),
                        mode="quick" if args.quick else "")
    common = dict(date=stamp, device=device_name, target=target, torch=torch.__version__, triton=triton_version,
                  dtype="bf16")
    clock = Budget(args.budget_seconds)
    clock.started = clock_start  # the budget counts the setup too
    args.budget_clock = clock
    counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}
    with open(path, "w", newline="") as stream, flex_limits():
        writer = csv.DictWriter(stream, fieldnames=FIELDS)
        writer.writeheader()
        args.flex_compiled = CompiledFlex() if args.with_flex else None

        def write_row(row):
            full = {**common, **row}
            full["pct_peak"] = percent_of_peak(full, args.peak_tflops, args.peak_gb_s)
            for key, spec in (("tflops", ".1f"), ("gb_s", ".0f")):  # rounded as the CSV always had them
                if isinstance(full.get(key), float):
                    full[key] = format(full[key], spec)
            writer.writerow({key: full.get(key, "") for key in FIELDS})
            stream.flush()
            status = row_status(full)
            counts[status] = counts.get(status, 0) + 1
            print(f"{status or '    '} " + ", ".join(
                f"{key}={full[key]}" for key in ("section", "mask", "batch", "seq", "head_dim", "dtype", "impl", "ms",
                                                 "tflops", "gb_s", "pct_peak", "max_error", "bound", "note")
                if full.get(key, "") != ""))

        ok = run_sections(args, {entry.section: entry.seconds for entry in plan}, device, dtype, write_row, clock)
    print(f"wrote {path} in {clock.elapsed():.0f} s; {counts['PASS']} passed, {counts['FAIL']} failed, "
          f"{counts['SKIP']} skipped; {'all checks passed' if ok else 'SOME CHECKS FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
