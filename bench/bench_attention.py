"""The attention benchmark suite: forward and backward, side by side, in one run.

Implementations: ``ours`` (``triton_attn.attention``: the Triton kernel on CUDA, the ``torch`` backend on
CPU), ``sdpa`` (``F.scaled_dot_product_attention``: ``is_causal`` for causal, a dense boolean mask where a
mask is needed, n/a for softcap), ``flex`` (``torch.compile(flex_attention)``, run in a worker process per
(dtype, head_dim) group with a timeout per problem, because its first call compiles: ~9-25 s on CPU with a
cold Inductor cache, a few seconds with a warm one), ``flash`` (``flash_attn_func`` when installed, on
CUDA: none, causal, sliding window and softcap).

Masks: none, causal, sliding_window (window max(64, min(1024, L/8))), document (causal within L/1024 >= 2
documents), prefix_lm (prefix L/4), softcap (causal + ``20 * tanh(s / 20)``).

Work counted: ``4 * B * H * D * (allowed (q, kv) pairs)`` forward -- ``4*B*H*L*L*D`` without a mask, about
half for causal -- and 2.5x that backward. TFLOP/s = work / steady-state time.

Per (problem, implementation, pass) we record the first call (compilation, caches) and the steady state
(median of ``--repeats`` calls). Results go to ``bench/results/attention_<date>_<device>_torch<v>_triton<v>``
as ``.csv`` (one row per measurement, every row stamped with date, device and versions), ``.png`` (one
panel per mask and pass) and ``.md`` (a summary with the CPU targets checked).

Usage::

    python bench/bench_attention.py                 # the default suite for this machine (GPU or CPU)
    python bench/bench_attention.py --quick         # a small smoke run
    triton-attn bench --mask causal document --seq-len 1024 4096
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

ROOT = Path(__file__).resolve().parent.parent
for _path in (ROOT, ROOT / "bench"):  # run from a checkout, installed or not; loaded by path (`triton-attn bench`)
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402  (after the sys.path line: a checkout's triton_attn)
import torch.nn.functional as F  # noqa: E402  (idem)
from attention_report import (  # noqa: E402  (bench/ is on sys.path when this script runs)
    IMPLS,
    MASKS,
    PASSES,
    cpu_targets,
    output_stem,
    sdpa_parity,
    write_csv,
    write_png,
    write_summary,
)

RESULTS = ROOT / "bench" / "results"


@dataclass
class Problem:
    mask: str
    seq_len: int
    dtype: str
    head_dim: int
    batch: int
    heads: int
    device: str

    @property
    def torch_dtype(self):
        return getattr(torch, self.dtype)

    @property
    def label(self) -> str:
        return f"{self.mask} L={self.seq_len} {self.dtype} D={self.head_dim} B={self.batch} H={self.heads}"


def window_for(seq_len: int) -> int:
    return max(64, min(1024, seq_len // 8))


def named_mask(problem: Problem):
    from triton_attn.cli import library_mask

    return library_mask(problem.mask, problem.seq_len, window=window_for(problem.seq_len), device=problem.device)


def make_inputs(problem: Problem, requires_grad: bool = False):
    """Seeded q, k, v ``[B, H, L, D]`` (the same values in every process) and a seeded output gradient."""
    generator = torch.Generator().manual_seed(0)
    shape = (problem.batch, problem.heads, problem.seq_len, problem.head_dim)
    tensors = [torch.randn(*shape, generator=generator).to(problem.device, problem.torch_dtype) for _ in range(4)]
    q, k, v, grad = tensors
    if requires_grad:
        q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    return q, k, v, grad


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> Tuple[float, Any]:
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return (time.perf_counter() - start) * 1e3, result


def first_and_steady(fn: Callable[[], Any], device: str, repeats: int) -> Tuple[float, float, Optional[float]]:
    """(first call ms, steady-state ms, steady-state process CPU ms or None).

    Steady state: on CUDA ``triton.testing.do_bench`` (warm-up, L2 flush, median); on CPU the median of
    ``repeats`` further calls, plus the median process CPU time of those calls (all threads; much less
    sensitive than wall time to other processes competing for the cores)."""
    first, _ = timed(fn, device)
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench

        return first, float(do_bench(fn, warmup=10, rep=max(50, 20 * repeats), return_mode="median")), None
    walls, cpus = [], []
    for _ in range(repeats):
        cpu_start = time.process_time()
        walls.append(timed(fn, device)[0])
        cpus.append((time.process_time() - cpu_start) * 1e3)
    return first, statistics.median(walls), statistics.median(cpus)


def measure_passes(forward: Callable[[bool], Any], grad: torch.Tensor, inputs: Sequence[torch.Tensor], device: str,
                   repeats: int, passes: Sequence[str]) -> Dict[str, Tuple[float, float, Optional[float]]]:
    """{pass: (first_ms, steady_ms, steady_cpu_ms)}. ``forward(requires_grad)`` returns the output.

    Backward is timed alone: one forward, then ``backward(retain_graph=True)`` repeated; if the graph
    cannot be reused, each repeat runs forward + backward and the forward time is subtracted.
    """
    results = {}
    if "fwd" in passes:
        with torch.no_grad():
            results["fwd"] = first_and_steady(lambda: forward(False), device, repeats)
    if "bwd" in passes:
        def zero():
            for t in inputs:
                t.grad = None

        out = forward(True)
        first, _ = timed(lambda: out.backward(grad, retain_graph=True), device)
        zero()
        try:
            _, steady, cpu = first_and_steady(lambda: out.backward(grad, retain_graph=True), device, repeats)
        except RuntimeError:  # a graph that cannot be backpropagated twice
            _, both, both_cpu = first_and_steady(lambda: forward(True).backward(grad), device, repeats)
            fwd = results.get("fwd") or first_and_steady(lambda: forward(False), device, repeats)
            steady = max(0.0, both - fwd[1])
            cpu = None if both_cpu is None else max(0.0, both_cpu - fwd[2])
        zero()
        results["bwd"] = (first, steady, cpu)
        del out
    return results


# -- implementations (in this process) ----------------------------------------------------------------------

def run_ours(problem: Problem, repeats: int, passes: Sequence[str]) -> Tuple[float, Dict[str, Tuple[float, float]]]:
    import triton_attn as ta
    from triton_attn.masks.standard import full_block_mask

    named = named_mask(problem)
    q, k, v, grad = make_inputs(problem, requires_grad=True)
    if named.mask_mod is None:
        mask_ms, block_mask = timed(lambda: full_block_mask(1, 1, problem.seq_len, problem.seq_len, problem.device),
                                    problem.device)
    else:
        def build():
            return ta.create_block_mask(named.mask_mod, None, None, problem.seq_len, problem.seq_len,
                                        device=problem.device)

        mask_ms, block_mask = timed(build, problem.device)

    def forward(requires_grad: bool):
        args = (q, k, v) if requires_grad else (q.detach(), k.detach(), v.detach())
        return ta.attention(*args, block_mask=block_mask, score_mod=named.score_mod)

    return mask_ms, measure_passes(forward, grad, (q, k, v), problem.device, repeats, passes)


def sdpa_mask(problem: Problem, named) -> Tuple[float, Optional[torch.Tensor], bool]:
    """(build ms, dense mask or None, is_causal)."""
    from triton_attn.masks import create_mask

    if named.mask_mod is None:
        return 0.0, None, False
    if problem.mask in ("causal", "softcap"):
        return 0.0, None, True
    ms, dense = timed(lambda: create_mask(named.mask_mod, 1, 1, problem.seq_len, problem.seq_len,
                                          device=problem.device),
                      problem.device)
    return ms, dense, False


def run_sdpa(problem: Problem, repeats: int, passes: Sequence[str]) -> Tuple[float, Dict[str, Tuple[float, float]]]:
    if problem.mask == "softcap":
        raise NotImplementedError("SDPA has no score_mod (softcap)")
    named = named_mask(problem)
    mask_ms, dense, is_causal = sdpa_mask(problem, named)
    q, k, v, grad = make_inputs(problem, requires_grad=True)

    def forward(requires_grad: bool):
        args = (q, k, v) if requires_grad else (q.detach(), k.detach(), v.detach())
        return F.scaled_dot_product_attention(*args, attn_mask=dense, is_causal=is_causal)

    return mask_ms, measure_passes(forward, grad, (q, k, v), problem.device, repeats, passes)


def run_flash(problem: Problem, repeats: int, passes: Sequence[str]) -> Tuple[float, Dict[str, Tuple[float, float]]]:
    if torch.device(problem.device).type != "cuda":
        raise NotImplementedError("flash-attn runs on CUDA only")
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        raise NotImplementedError("flash-attn is not installed") from None
    if problem.mask not in ("none", "causal", "sliding_window", "softcap"):
        raise NotImplementedError(f"flash_attn_func has no {problem.mask} mask")
    window = (window_for(problem.seq_len) - 1, 0) if problem.mask == "sliding_window" else (-1, -1)
    kwargs = dict(causal=problem.mask != "none", window_size=window)
    if problem.mask == "softcap":
        kwargs["softcap"] = 20.0
    q, k, v, grad = make_inputs(problem, requires_grad=True)
    # flash-attn's layout is [B, L, H, D]: transposed views of the same tensors
    grad_t = grad.transpose(1, 2).contiguous()

    def forward(requires_grad: bool):
        args = [t.transpose(1, 2).contiguous() for t in (q, k, v)]
        if not requires_grad:
            args = [t.detach() for t in args]
        return flash_attn_func(*args, **kwargs)

    return 0.0, measure_passes(forward, grad_t, (q, k, v), problem.device, repeats, passes)


# -- FlexAttention, in a subprocess with a timeout ----------------------------------------------------------

def flex_in_process(problem: Problem, repeats: int,
                    passes: Sequence[str]) -> Tuple[float, Dict[str, Tuple[float, float]]]:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    named = named_mask(problem)
    if torch.device(problem.device).type == "cpu" and "bwd" in passes:
        passes = [p for p in passes if p != "bwd"]  # FlexAttention has no backward on CPU
    q, k, v, grad = make_inputs(problem, requires_grad="bwd" in passes)
    mask_ms, block_mask = 0.0, None
    if named.mask_mod is not None:
        mask_ms, block_mask = timed(lambda: create_block_mask(named.mask_mod, None, None, problem.seq_len,
                                                              problem.seq_len, device=problem.device), problem.device)
    compiled = torch.compile(flex_attention, dynamic=False)

    def forward(requires_grad: bool):
        args = (q, k, v) if requires_grad else (q.detach(), k.detach(), v.detach())
        return compiled(*args, block_mask=block_mask, score_mod=named.score_mod)

    return mask_ms, measure_passes(forward, grad, (q, k, v), problem.device, repeats, passes)


def run_flex_group(problems: Sequence[Problem], repeats: int, passes: Sequence[str],
                   timeout_each: float) -> List[Any]:
    """FlexAttention for a group of problems in one fresh Python process (its first calls compile; a hang
    cannot stall us: the process gets ``timeout_each`` seconds per problem). Returns, per problem,
    ``(mask_ms, {pass: (first, steady, cpu)})`` or the exception that stands for its failure."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps([asdict(p) for p in problems]),
               "--repeats", str(repeats), "--passes", ",".join(passes), "--threads", str(torch.get_num_threads())]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    timed_out = False
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_each * len(problems), env=env)
        stdout, stderr = done.stdout, done.stderr
    except subprocess.TimeoutExpired as expired:
        timed_out = True
        stdout = (expired.stdout.decode(errors="replace") if isinstance(expired.stdout, bytes)
                  else (expired.stdout or ""))
        stderr = ""
    found = {}
    for line in stdout.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                data = json.loads(line)
                found[data.get("index")] = data
    tail = (stderr.strip().splitlines() or ["no output"])[-1][:200]
    results = []
    for index in range(len(problems)):
        data = found.get(index)
        if data is None:
            if timed_out:
                results.append(TimeoutError(f"FlexAttention did not finish within {timeout_each:.0f} s per problem "
                                            "(compile + runs)"))
            else:
                results.append(RuntimeError(f"FlexAttention worker failed: {tail}"))
        elif "error" in data:
            results.append(RuntimeError(data["error"]))
        else:
            results.append((data["mask_ms"], {p: tuple(v) for p, v in data["passes"].items()}))
    return results


def _worker(problems_json: str, repeats: int, passes: Sequence[str], threads: int) -> int:
    torch.set_num_threads(threads)
    for index, fields in enumerate(json.loads(problems_json)):
        problem = Problem(**fields)
        torch._dynamo.reset()  # a fresh compile per problem: never FlexAttention's eager fallback after recompiles
        try:
            mask_ms, results = flex_in_process(problem, repeats, passes)
        except Exception as error:  # reported to the parent as one line
            message = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
            print(json.dumps({"index": index, "error": message}), flush=True)
            continue
        print(json.dumps({"index": index, "mask_ms": mask_ms, "passes": results}), flush=True)
    return 0


# -- the suite ----------------------------------------------------------------------------------------------

def density(problem: Problem) -> float:
    """Share of (q, kv) pairs the mask allows (exact, from the dense mask)."""
    named = named_mask(problem)
    if named.mask_mod is None:
        return 1.0
    length = problem.seq_len
    if problem.mask in ("causal", "softcap"):
        return (length + 1) / (2 * length)
    from triton_attn.masks import create_mask

    dense = create_mask(named.mask_mod, 1, 1, length, length, device=problem.device)
    return float(dense.sum()) / (length * length)


def work_flops(problem: Problem, dens: float, pass_name: str) -> float:
    forward = 4.0 * problem.batch * problem.heads * problem.head_dim * problem.seq_len * problem.seq_len * dens
    return forward * (2.5 if pass_name == "bwd" else 1.0)


def versions() -> Dict[str, str]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {"torch": torch.__version__, "triton": triton_version, "python": platform.python_version()}


def device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU {platform.machine()} x{os.cpu_count()}"


def default_plan(device: str, quick: bool) -> Dict[str, Any]:
    if torch.device(device).type == "cuda":
        if quick:
            return dict(seq_len=[1024, 4096], dtype=["bfloat16"], head_dim=[128], heads=16, batch=None)
        return dict(seq_len=[1024, 2048, 4096, 8192, 16384, 32768], dtype=["bfloat16", "float16"],
                    head_dim=[64, 128], heads=16, batch=None)
    if quick:
        return dict(seq_len=[512], dtype=["float32"], head_dim=[64], heads=4, batch=1)
    return dict(seq_len=[1024, 8192], dtype=["float32"], head_dim=[64], heads=8, batch=1)


def plan_problems(args) -> List[Problem]:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    plan = default_plan(device, args.quick)
    seq_lens = args.seq_len or plan["seq_len"]
    dtypes = [_canonical_dtype(d) for d in (args.dtype or plan["dtype"])]
    head_dims = args.head_dim or plan["head_dim"]
    heads = args.heads or plan["heads"]
    problems = []
    for dtype in dtypes:
        for head_dim in head_dims:
            for seq_len in seq_lens:
                # GPU default: 32k tokens per batch (B = 32768 / L), so short sequences still fill the GPU.
                batch = args.batch or plan["batch"] or max(1, 32768 // seq_len)
                for mask in args.mask or MASKS:
                    problems.append(Problem(mask, seq_len, dtype, head_dim, batch, heads, device))
    return problems


def _canonical_dtype(name: str) -> str:
    table = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
             "half": "float16", "fp32": "float32", "float32": "float32"}
    if name.lower() not in table:
        raise ValueError(f"unknown dtype {name!r}; use bf16, fp16 or fp32")
    return table[name.lower()]


def _row(problem: Problem, impl: str, pass_name: str, dens: float, mask_ms: float, results, status: str,
         note: str, stamp: str, info: Dict[str, str]) -> Dict[str, Any]:
    row = dict(date=stamp, device=device_name(problem.device), torch=info["torch"], triton=info["triton"],
               python=info["python"], threads=torch.get_num_threads(), impl=impl, mask=problem.mask,
               dtype=problem.dtype, batch=problem.batch, heads=problem.heads, head_dim=problem.head_dim,
               seq_len=problem.seq_len, density=round(dens, 6), mask_ms=round(mask_ms, 3))
    row["pass"] = pass_name
    if pass_name in results:
        first, steady, cpu = results[pass_name]
        row.update(first_ms=round(first, 3), steady_ms=round(steady, 3),
                   steady_cpu_ms="" if cpu is None else round(cpu, 3),
                   tflops=round(work_flops(problem, dens, pass_name) / (steady * 1e-3) / 1e12, 5) if steady > 0 else "",
                   status="ok")
    else:
        row.update(first_ms="", steady_ms="", steady_cpu_ms="", tflops="",
                   status=status if status != "ok" else (note or "n/a"))
    return row


def _status(error: BaseException) -> str:
    if isinstance(error, NotImplementedError):
        return f"n/a: {error}"
    if type(error).__name__ == "OutOfMemoryError":
        return "error: out of memory"
    return f"error: {type(error).__name__}: {' '.join(str(error).split())[:160]}"


def run_suite(problems: Sequence[Problem], impls: Sequence[str], *, repeats: int, flex_timeout: float,
              sdpa_max_len: Optional[int], progress=None, log: Callable[[str], None] = print) -> List[Dict[str, Any]]:
    """Measure every problem with every implementation. FlexAttention runs last, one worker process per
    (dtype, head_dim) group, so that Python, torch and Inductor start once per group."""
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    info = versions()
    densities: Dict[Tuple[str, int], float] = {}
    measured: Dict[Tuple[int, str], Tuple[float, Dict[str, Any], str, str]] = {}

    def record(index, impl, mask_ms, results, status, note=""):
        measured[(index, impl)] = (mask_ms, results, status, note)
        problem = problems[index]
        summary = ", ".join(f"{p} {results[p][1]:.1f} ms (first {results[p][0]:.0f})" for p in PASSES if p in results)
        log(f"{problem.label} {impl:<5}: {summary or status}")
        if progress is not None:
            progress.advance(f"{problem.mask} L={problem.seq_len} {impl}")

    for index, problem in enumerate(problems):
        key = (problem.mask, problem.seq_len)
        if key not in densities:
            densities[key] = density(problem)
        for impl in impls:
            if impl == "flex":
                continue
            passes, note = list(PASSES), ""
            try:
                if impl == "ours":
                    mask_ms, results = run_ours(problem, repeats, passes)
                elif impl == "sdpa":
                    if sdpa_max_len and problem.seq_len > sdpa_max_len and problem.mask not in ("none", "causal"):
                        passes = ["fwd"]
                        note = f"bwd skipped: dense-mask backward above L={sdpa_max_len} (memory)"
                    mask_ms, results = run_sdpa(problem, repeats, passes)
                elif impl == "flash":
                    mask_ms, results = run_flash(problem, repeats, passes)
                else:
                    raise ValueError(f"unknown implementation {impl!r}")
                status = "ok"
            except Exception as error:
                mask_ms, results, status = 0.0, {}, _status(error)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            record(index, impl, mask_ms, results, status, note)
    if "flex" in impls:
        groups: Dict[Tuple[str, int], List[int]] = {}
        for index, problem in enumerate(problems):
            groups.setdefault((problem.dtype, problem.head_dim), []).append(index)
        for indices in groups.values():
            outcomes = run_flex_group([problems[i] for i in indices], repeats, list(PASSES), flex_timeout)
            for index, outcome in zip(indices, outcomes):
                note = "bwd n/a: FlexAttention has no backward on CPU" if problems[index].device == "cpu" else ""
                if isinstance(outcome, BaseException):
                    record(index, "flex", 0.0, {}, _status(outcome))
                else:
                    record(index, "flex", outcome[0], outcome[1], "ok", note)
    rows = []
    for index, problem in enumerate(problems):
        for impl in impls:
            mask_ms, results, status, note = measured[(index, impl)]
            for pass_name in PASSES:
                rows.append(_row(problem, impl, pass_name, densities[(problem.mask, problem.seq_len)], mask_ms,
                                 results, status, note, stamp, info))
    return rows


# -- command line -------------------------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--mask", nargs="+", choices=MASKS, default=None, metavar="MASK",
                        help=f"masks ({', '.join(MASKS)}; default all)")
    parser.add_argument("--impl", nargs="+", choices=IMPLS, default=None, metavar="IMPL",
                        help=f"implementations ({', '.join(IMPLS)}; default all that exist here)")
    parser.add_argument("--seq-len", nargs="+", type=int, default=None, metavar="L",
                        help="sequence lengths (default 1k..32k on GPU, 1024 8192 on CPU)")
    parser.add_argument("--dtype", nargs="+", default=None, help="bf16 fp16 (GPU default), fp32 (CPU default)")
    parser.add_argument("--head-dim", nargs="+", type=int, default=None, metavar="D",
                        help="default 64 128 on GPU, 64 on CPU")
    parser.add_argument("--heads", type=int, default=None, help="default 16 on GPU, 8 on CPU")
    parser.add_argument("--batch", type=int, default=None, help="default 32768 / L on GPU, 1 on CPU")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--repeats", type=int, default=None, help="steady-state repetitions (default 3 CPU, 10 GPU)")
    parser.add_argument("--flex-timeout", type=float, default=300.0,
                        help="seconds per problem for FlexAttention (compile + runs) in its worker process")
    parser.add_argument("--sdpa-bwd-max-len", type=int, default=None,
                        help="skip SDPA's dense-mask backward above this length (default 2048 on CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument("--out", default=str(RESULTS), help="results folder (default bench/results)")
    parser.add_argument("--note", default="", help="a line for the summary (e.g. 'machine shared, timings noisy')")


def _check_args(args) -> None:
    for flag, values in (("--seq-len", args.seq_len), ("--head-dim", args.head_dim)):
        for value in values or []:
            if value <= 0:
                raise ValueError(f"{flag} must be positive, got {value}")
    for flag, value in (("--heads", args.heads), ("--batch", args.batch), ("--repeats", args.repeats),
                        ("--threads", args.threads)):
        if value is not None and value <= 0:
            raise ValueError(f"{flag} must be a positive integer, got {value}")
    if args.device and torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA GPU is available on this machine")


def run_from_args(args, progress_factory=None, log: Callable[[str], None] = print) -> int:
    _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    problems = plan_problems(args)
    on_gpu = problems[0].device.startswith("cuda")
    impls = args.impl or [i for i in IMPLS if on_gpu or i != "flash"]
    repeats = args.repeats or (10 if on_gpu else 3)
    sdpa_max_len = args.sdpa_bwd_max_len if args.sdpa_bwd_max_len is not None else (None if on_gpu else 2048)
    log(f"triton-attn bench: {len(problems)} problems x {len(impls)} implementations on "
        f"{device_name(problems[0].device)}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    total = len(problems) * len(impls)
    if progress_factory is None:
        progress_factory = lambda total, text: _NoProgress()  # noqa: E731
    with progress_factory(total, "bench") as progress:
        rows = run_suite(problems, impls, repeats=repeats, flex_timeout=args.flex_timeout,
                         sdpa_max_len=sdpa_max_len, progress=progress, log=log)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = output_stem(rows, out_dir)
    write_csv(rows, stem.with_suffix(".csv"))
    wrote_png = write_png(rows, stem.with_suffix(".png"))
    write_summary(rows, stem.with_suffix(".md"), extra=args.note)
    for line in cpu_targets(rows) + sdpa_parity(rows):
        log(line)
    log(f"wrote {stem.with_suffix('.csv')}" + (f", {stem.with_suffix('.png').name}" if wrote_png else "")
        + f", {stem.with_suffix('.md').name}")
    return 0


class _NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def advance(self, step: str = "") -> None:
        return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--passes", default="fwd,bwd", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args.worker, args.repeats or 3, args.passes.split(","), args.threads or torch.get_num_threads())
    return run_from_args(args)


if __name__ == "__main__":
    sys.exit(main())
