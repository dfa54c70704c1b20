"""The ahead-of-time matrix: every kernel family x head_dim x dtype x mask, built for every target.

Each ``Case`` is one default build, the one a launch on that target would make with nothing tuned:
the target's own config table (``kernels.targets``), its dot precision and compile options. A build
passes (``Row.ok``) when it compiles, its shared memory (LDS) is within the target's limit -- checked
here, since Triton's AMD backend does not check LDS at compile time --, its registers are within the
target's, it does not spill unless the target lists that spill (``Target.known_spills``, with its size
and why), and its products run on the target's tensor cores (``Row.instructions``: wgmma on sm_90,
mfma on AMD; every dot kernel uses some tensor-core instruction).

``cases(targets, fast=True)`` is the subset CI builds (one case per target and family, the hardest
common one: D = 128, bf16, causal); ``triton-attn check --targets all`` builds the whole matrix and
prints the table (``format_table``). ``cases(..., dropout=True)`` gives the attention-dropout variants
instead (``DROPOUT_FAMILIES``: forward, dQ, dK/dV on the tiles a dropout launch takes, and the keep-mask
kernel), judged by the same rules. No GPU is needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Iterable, List, Optional, Sequence

import torch

from . import targets as targets_module
from .targets import Target

FAMILIES = ("forward", "preprocess", "dq", "dkdv", "decode", "combine", "refine")
HEAD_DIMS = (64, 128, 256)
DTYPES = ("float16", "bfloat16", "float32")
MASKS = ("none", "causal", "document", "softcap")
# Families whose build depends on the mods (the others get mask "none" only).
MOD_FAMILIES = ("forward", "dq", "dkdv", "decode")
DOT_FAMILIES = ("forward", "dq", "dkdv", "decode")
# The families with an attention-dropout variant; "dropout_mask" (the keep-mask kernel) exists only there.
DROPOUT_FAMILIES = ("forward", "dq", "dkdv", "dropout_mask")
# Example lengths: long enough that the launch's bounds checks and 64-bit decisions are the usual ones.
SEQ_LEN = 4096
DECODE_ROWS = 32


@dataclass(frozen=True)
class Case:
    """One default build: ``family`` on ``target`` at ``head_dim`` / ``dtype`` with ``mask`` (``dropout``: the
    attention-dropout variant, on the tiles a dropout launch takes)."""

    target: str
    family: str
    head_dim: int = 128
    dtype: str = "bfloat16"
    mask: str = "causal"
    dropout: bool = False

    @property
    def label(self) -> str:
        dropout = " dropout" if self.dropout else ""
        return f"{self.target} {self.family} D={self.head_dim} {self.dtype} {self.mask}{dropout}"

    @property
    def mask_label(self) -> str:
        """The mask column of the table: the mask, marked "+drop" for a dropout variant."""
        return f"{self.mask}+drop" if self.dropout else self.mask


@dataclass
class Row:
    """What one kernel build of a case gave, and whether it passes (``ok``; ``problems`` says why not)."""

    case: Case
    kernel: str                  # "forward", "dk", "dv", "dkdv", "dq", "preprocess", "decode", "combine", "refine"
    config: str = ""
    shared: int = 0
    shared_limit: int = 0
    registers: int = 0
    register_limit: int = 0
    spill_bytes: int = 0
    instructions: str = ""       # the tensor-core instruction families found ("" for kernels without dots)
    error: Optional[str] = None
    known_spill: str = ""        # why a listed spill is accepted
    problems: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _mods(mask: str, seq_len: int):
    from ..masks import causal_mask, document_mask, softcap_score

    if mask == "causal":
        return causal_mask, None
    if mask == "document":
        generator = torch.Generator().manual_seed(0)
        lengths = torch.randint(64, 1024, (64,), generator=generator).cumsum(0)
        ids = torch.searchsorted(lengths, torch.arange(seq_len), right=True)
        return document_mask(ids), None
    if mask == "softcap":
        return causal_mask, softcap_score(30.0)
    return None, None


def cases(targets: Optional[Iterable] = None, *, fast: bool = False, families: Optional[Sequence[str]] = None,
          head_dims: Sequence[int] = HEAD_DIMS, dtypes: Sequence[str] = DTYPES,
          masks: Sequence[str] = MASKS, dropout: bool = False) -> List[Case]:
    """The matrix's cases for ``targets`` (names or ``Target``s; default all). ``fast``: one case per target
    and family (D = 128, bf16, causal; no mask for the families without mods). ``families``: default
    ``FAMILIES``, or ``DROPOUT_FAMILIES`` with ``dropout``: the attention-dropout variants (families
    without one are left out)."""
    chosen = [targets_module.get(t) for t in (targets if targets is not None else targets_module.TARGETS)]
    if families is None:
        families = DROPOUT_FAMILIES if dropout else FAMILIES
    if dropout:
        return [replace(case, dropout=True)
                for case in cases(chosen, fast=fast, families=[f for f in families if f in DROPOUT_FAMILIES],
                                  head_dims=head_dims, dtypes=dtypes, masks=masks)]
    found: List[Case] = []
    for target in chosen:
        for family in families:
            if fast:
                found.append(_fast_case(target, family))
                continue
            if family == "dropout_mask":
                found.append(Case(target.name, family, 0, "", "none"))
            elif family == "refine":
                found += [Case(target.name, family, 0, "", mask) for mask in ("causal", "document")]
            elif family == "combine":
                found += [Case(target.name, family, d, "float32", "none") for d in head_dims]
            elif family == "preprocess":
                found += [Case(target.name, family, d, t, "none") for d in head_dims for t in dtypes]
            else:
                found += [Case(target.name, family, d, t, m) for d in head_dims for t in dtypes for m in masks]
    return found


def _fast_case(target: Target, family: str) -> Case:
    if family == "dropout_mask":
        return Case(target.name, family, 0, "", "none")
    if family == "refine":
        return Case(target.name, family, 0, "", "causal")
    if family == "combine":
        return Case(target.name, family, 128, "float32", "none")
    return Case(target.name, family, 128, "bfloat16", "causal" if family in MOD_FAMILIES else "none")


def _build(case: Case, target: Target):
    """{kernel name: (config name, AotResult)} of one case."""
    from ..masks.tracing import trace_mask_mod, trace_score_mod
    from .attention import aot as attention_aot
    from .attention.configs import default_backward_config, default_config
    from .decode import aot as decode_aot
    from .decode.configs import default_decode_config

    dtype = getattr(torch, case.dtype) if case.dtype else torch.bfloat16
    mask_mod, score_mod = _mods(case.mask, SEQ_LEN)
    if case.family == "refine":
        from .refine import compile_refine

        result = compile_refine(trace_mask_mod(mask_mod), arch=target)
        return {"refine": ("", result)}
    if case.family == "dropout_mask":
        return {"dropout_mask": ("", attention_aot.compile_dropout_mask(arch=target))}
    if case.family == "combine":
        return {"combine": ("", decode_aot.compile_combine(arch=target, head_dim_v=case.head_dim))}
    if case.family == "preprocess":
        return {"preprocess": ("", attention_aot.compile_preprocess(arch=target, dtype=dtype,
                                                                     head_dim_v=case.head_dim))}
    if case.family == "decode":
        # 4 query rows x a GQA group of 8 = 32 packed rows: the "packed" / "wide_packed" picks at full size.
        config = default_decode_config(case.head_dim, case.head_dim, dtype, DECODE_ROWS, target=target)
        result = decode_aot.compile_decode(config, arch=target, dtype=dtype, head_dim=case.head_dim, q_heads=32,
                                           kv_heads=4, q_len=DECODE_ROWS // 8, mask_mod=mask_mod,
                                           score_mod=score_mod, kv_len=SEQ_LEN)
        return {"decode": (config.name, result)}
    mods = dict(mask=trace_mask_mod(mask_mod) if mask_mod is not None else None,
                score=trace_score_mod(score_mod) if score_mod is not None else None)
    shapes = dict(arch=target, dtype=dtype, head_dim=case.head_dim, q_len=SEQ_LEN, kv_len=SEQ_LEN,
                  dropout=case.dropout, **mods)
    if case.family == "forward":
        config = default_config(case.head_dim, case.head_dim, dtype, (128, 128), SEQ_LEN, target=target,
                                dropout=case.dropout)
        return {"forward": (config.name, attention_aot.compile_forward(config, **shapes))}
    config = default_backward_config(case.head_dim, case.head_dim, dtype, (128, 128), SEQ_LEN, SEQ_LEN,
                                     target=target, dropout=case.dropout)
    results = attention_aot.compile_backward(config, only=case.family, **shapes)
    tiles = config.dq if case.family == "dq" else config.dkdv
    return {name: (tiles.name, result) for name, result in results.items()}


def run_case(case: Case) -> List[Row]:
    """Build one case and judge each of its kernels (a build that raises gives one row with the error)."""
    target = targets_module.get(case.target)
    limits = dict(shared_limit=target.shared_memory, register_limit=target.max_registers)
    try:
        built = _build(case, target)
    except Exception as error:  # a case that does not compile is a row that fails, not a crash
        text = (str(error).strip().splitlines() or [type(error).__name__])[0]
        row = Row(case, case.family, error=f"{type(error).__name__}: {text}"[:300], **limits)
        row.problems.append(f"does not compile: {row.error}")
        return [row]
    rows = []
    for kernel, (config, result) in built.items():
        found = [name for name in ("wgmma", "tcgen05", "mma.sync", "mfma") if result.uses(name)]
        row = Row(case, kernel, config, shared=result.shared_bytes, registers=result.registers,
                  spill_bytes=result.spill_bytes, instructions="+".join(found), **limits)
        _judge(row, target)
        rows.append(row)
    return rows


def _judge(row: Row, target: Target) -> None:
    case = row.case
    if row.shared > row.shared_limit:
        row.problems.append(f"shared memory {row.shared} B > {row.shared_limit} B")
    if row.registers > row.register_limit:
        row.problems.append(f"{row.registers} registers > {row.register_limit}")
    if row.spill_bytes:
        known = target.known_spill(row.kernel, case.head_dim, getattr(torch, case.dtype)) if case.dtype else None
        if known is not None and row.spill_bytes <= known.spill_bytes:
            row.known_spill = known.why
        else:
            listed = f" (listed up to {known.spill_bytes} B)" if known is not None else " (not in the target's table)"
            row.problems.append(f"spills {row.spill_bytes} B{listed}")
    if case.family in DOT_FAMILIES:
        if not row.instructions:
            row.problems.append("no tensor-core instruction")
        elif _required(case, target) and _required(case, target) not in row.instructions.split("+"):
            row.problems.append(f"no {_required(case, target)} (found {row.instructions})")


def _required(case: Case, target: Target) -> Optional[str]:
    """The instruction family a dot kernel must use: mfma on AMD, wgmma for the 16-bit prefill kernels on
    sm_90 (decode's 16-row tiles are below wgmma's 64-row minimum, and sm_90's float32 path is 3xTF32 on
    whatever Triton picks)."""
    if target.is_amd:
        return "mfma"
    if target.name == "sm_90" and case.family != "decode" and case.dtype != "float32":
        return "wgmma"
    return None


def run(cases_to_run: Sequence[Case], *, jobs: int = 1, progress=None) -> List[Row]:
    """Build every case (``jobs`` processes; each case is independent) and return the rows in case order.
    ``progress(case)`` is called as each case finishes."""
    if jobs <= 1:
        rows = []
        for case in cases_to_run:
            rows += run_case(case)
            if progress is not None:
                progress(case)
        return rows
    import concurrent.futures
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # no forked copy of torch's threads
    by_case = {}
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = {pool.submit(run_case, case): case for case in cases_to_run}
        for future in concurrent.futures.as_completed(futures):
            by_case[futures[future]] = future.result()
            if progress is not None:
                progress(futures[future])
    return [row for case in cases_to_run for row in by_case[case]]


def format_table(rows: Sequence[Row]) -> str:
    """The matrix as a fixed-width table, one line per kernel build."""
    header = (f"{'target':<7} {'family':<10} {'kernel':<10} {'D':>3} {'dtype':<8} {'mask':<8} {'config':<18} "
              f"{'shared':>14} {'regs':>8} {'spill':>5} {'tensor':<9} result")
    lines = [header, "-" * len(header)]
    for row in rows:
        case = row.case
        if row.error:
            lines.append(f"{case.target:<7} {case.family:<10} {row.kernel:<10} {case.head_dim:>3} {case.dtype:<8} "
                         f"{case.mask_label:<8} FAIL {row.error}")
            continue
        verdict = "ok" if row.ok else "FAIL " + "; ".join(row.problems)
        if row.ok and row.known_spill:
            verdict = f"ok (known spill: {row.known_spill})"
        lines.append(f"{case.target:<7} {case.family:<10} {row.kernel:<10} {case.head_dim:>3} {case.dtype:<8} "
                     f"{case.mask_label:<8} {row.config:<18} {row.shared:>6}/{row.shared_limit:<7} "
                     f"{row.registers:>3}/{row.register_limit:<4} {row.spill_bytes:>5} {row.instructions:<9} {verdict}")
    return "\n".join(lines)


def summary(rows: Sequence[Row]) -> str:
    failed = [row for row in rows if not row.ok]
    targets_seen = sorted({row.case.target for row in rows}, key=list(targets_module.TARGETS).index)
    return (f"{len(rows) - len(failed)}/{len(rows)} builds pass on {', '.join(targets_seen)}"
            + (f"; {len(failed)} FAIL" if failed else ""))


def markdown_table(rows: Sequence[Row] = (), measured: Optional[dict] = None) -> str:
    """The README's "Supported GPUs" table: one line per target (limits, tensor cores, how many matrix builds
    pass in ``rows``, and ``measured[name]``: the committed GPU run, if any), then the listed spills."""
    measured = measured or {}
    lines = ["| target | GPUs | tensor cores (Triton 3.9) | shared memory / LDS per block | warp | "
             "proven ahead of time | measured on a GPU |",
             "|---|---|---|---|---|---|---|"]
    for target in targets_module.TARGETS.values():
        own = [row for row in rows if row.case.target == target.name]
        passed = sum(row.ok for row in own)
        proven = f"{passed}/{len(own)} builds pass" if own else "not built"
        lines.append(f"| {target.name} | {target.devices} | {target.tensor_instructions} | "
                     f"{target.shared_memory:,} B | {target.warp_size} | {proven} | "
                     f"{measured.get(target.name, 'not yet')} |")
    spills = [(target, spill) for target in targets_module.TARGETS.values() for spill in target.known_spills]
    if spills:
        lines += ["", "Listed spills (default builds that spill, accepted with their size):", ""]
        lines += [f"- {target.name} {spill.kernel} D={spill.head_dim} {spill.dtype}: up to {spill.spill_bytes} B "
                  f"({spill.why})" for target, spill in spills]
    return "\n".join(lines)
