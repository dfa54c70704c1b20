"""The plan of a ``bench/gpu_check.py`` run: seconds per section on one H100, and the run's wall-clock budget.

A GPU check's time goes mostly to compiling kernels: each Triton kernel variant (mask_mod or score_mod,
head_dim, dtype, GQA, layout, forward with or without the softmax statistics, backward) compiles once, on a
fresh machine with a cold cache, and each compiled FlexAttention graph costs tens of seconds of inductor.
``estimate(section, args, ledger)`` counts a section's work from its shapes and repeat counts: a compile for
each kernel variant the run has not compiled yet (``Ledger``, shared by the sections of one plan in their
order: the backward section's kernels are the efficiency section's at 4k), a timing per measured call and a
check per correctness comparison, at the unit costs of ``COSTS``. The costs are upper estimates: a variant
is counted as new whenever a constant it might be specialized on differs (sliding windows per length, page
size, batch and cache length of a decode pick), though many of them share one compiled kernel.

``Budget`` enforces the budget at run time: a section starts only when its estimate still fits in what is
left (``admits``); otherwise it becomes one skipped row saying so. Sections that can be cut short (the
efficiency table, the quick checks) also consult it between their rows.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Set

# Unit costs in seconds on one H100 (torch 2.11, Triton 3.6), rounded up.
COSTS: Dict[str, float] = {
    "setup": 20.0,  # process start to the first launch: imports, CUDA context, Triton's compiler loaded
    "forward_compile": 4.0,  # one forward kernel variant
    "backward_compile": 12.0,  # delta preprocess + dQ + dK/dV (two launches at D 128 on Hopper) of one variant
    "decode_compile": 4.0,  # split-KV kernel + combine kernel of one variant (contiguous or paged)
    "refine_compile": 2.0,  # the tile refiner of one mask graph
    "flex_compile": 30.0,  # a FlexAttention forward graph (dynamo + inductor + its Triton kernels)
    "flex_backward_compile": 45.0,  # a FlexAttention forward + backward graph
    "timing": 0.5,  # one do_bench (25 ms warm-up, 100 ms of calls) with its host work, calls < 10 ms
    "long_timing": 1.0,  # the same at 16k tokens (calls up to ~50 ms: fewer of them, longer warm-up)
    "check": 0.3,  # one correctness comparison at <= 1k tokens: the call and its float32/float64 reference
    "large_check": 0.8,  # the same at 4k tokens or a 32k-token cache (reference backward in float32)
    "graph_step": 0.2,  # one CUDA-graph replay step: update, copies, replay and a float64 reference
}
DEFAULT_BUDGET = 480.0
QUICK_BUDGET = 180.0


class Ledger:
    """The kernel variants a plan has compiled so far: ``compile(kind, *key)`` returns the cost of compiling
    that variant (``COSTS[kind]``) the first time, 0 after."""

    def __init__(self):
        self.seen: Set[tuple] = set()

    def compile(self, kind: str, *key) -> float:
        if (kind, *key) in self.seen:
            return 0.0
        self.seen.add((kind, *key))
        return COSTS[kind]


class Estimate(NamedTuple):
    """One line of the plan: the section, its estimated seconds, and what they are made of."""

    section: str
    seconds: float
    detail: str


def timing(seq: int) -> float:
    return COSTS["long_timing"] if seq > 4096 else COSTS["timing"]


def check(seq: int) -> float:
    return COSTS["large_check"] if seq > 1024 else COSTS["check"]


# Mask variants as the sections build them: the constants that may be compiled into a kernel, per length.
def forward_family_key(name: str, length: int) -> tuple:
    """gpu_check_forward.mask_families: window length // 8, chunks and prefix length // 4."""
    divisor = {"sliding_window": 8, "chunked_causal": 4, "prefix_lm": 4}.get(name)
    return (name, length // divisor) if divisor else (name,)


def shared_mask_key(name: str, length: int) -> tuple:
    """The masks the backward and efficiency sections share (gpu_check_backward.shared_masks)."""
    if name == "sliding_window":
        return (name, min(1024, max(16, length // 4)))
    return (name,)


def kernel_cost(ledger: Ledger, mask: tuple, head_dim: int, *, inference: bool = False, training: bool = False,
                score: str = "", gqa: bool = False, layout: str = "bhsd", dtype: str = "bf16") -> float:
    """Seconds to compile what a call needs that the plan has not compiled yet: the inference forward, or the
    training forward (it also stores the softmax statistics) and the backward kernels. The key holds every
    constant a kernel might be specialized on (the mask's, the score_mod, head_dim, GQA, layout, dtype)."""
    key = (mask, score, head_dim, gqa, layout, dtype)
    cost = ledger.compile("forward_compile", *key) if inference else 0.0
    if training:
        cost += ledger.compile("forward_compile", *key, "train") + ledger.compile("backward_compile", *key)
    return cost


FORWARD_FAMILIES = ("causal", "sliding_window", "chunked_causal", "prefix_lm", "document_causal", "padding")
REFINED = ("document_causal", "padding")  # captured tensors: interval analysis leaves tiles to the refiner
BACKWARD_MASKS = ("none", "causal", "sliding_window", "document", "softcap_causal")


def estimate_forward(args, ledger: Ledger) -> Estimate:
    seconds, compiles = 0.0, 0
    for head_dim in args.head_dims:
        for name in FORWARD_FAMILIES:
            key = forward_family_key(name, args.check_seq)
            cost = kernel_cost(ledger, key, head_dim, inference=True)
            if name in REFINED:
                cost += ledger.compile("refine_compile", key[0])
            compiles += cost > 0
            seconds += cost + check(args.check_seq)
    timings = 0
    for length in args.seqs:
        for head_dim in args.speed_head_dims:
            for name in args.perf_masks:
                key = forward_family_key(name, length)
                cost = kernel_cost(ledger, key, head_dim, inference=True)
                compiles += cost > 0
                timings += 2
                seconds += cost + 2 * timing(length) + check(length)  # + building the masks
    return Estimate("forward", seconds, f"{len(FORWARD_FAMILIES)} masks x D {_list(args.head_dims)} checked at "
                                        f"{args.check_seq}; {len(args.perf_masks)} masks x L {_list(args.seqs)} "
                                        f"x D {_list(args.speed_head_dims)} timed; {compiles} new variants, "
                                        f"{timings} timings")


def estimate_backward(args, ledger: Ledger) -> Estimate:
    seconds, compiles = 0.0, 0
    for head_dim in args.head_dims:
        for length in args.backward_seqs:
            for name in BACKWARD_MASKS:
                key = shared_mask_key("causal" if name == "softcap_causal" else name, length)
                cost = kernel_cost(ledger, key, head_dim, training=True,
                                   score="softcap" if name == "softcap_causal" else "")
                impls = 1 + (name != "softcap_causal")  # ours, SDPA (none for a score_mod)
                compiles += cost > 0
                # two backward passes (determinism), the float32 SDPA reference and bf16 yardstick, the timings
                seconds += cost + 2 * check(length) + impls * timing(length)
    return Estimate("backward", seconds, f"{len(BACKWARD_MASKS)} masks x L {_list(args.backward_seqs)} x D "
                                         f"{_list(args.head_dims)}: gradients vs float32 SDPA, determinism, "
                                         f"timings; {compiles} new variants")


def estimate_efficiency(args, ledger: Ledger) -> Estimate:
    from gpu_check_efficiency import efficiency_cases

    seconds, rows, compiles = 0.0, 0, 0
    for case in efficiency_cases(False):
        variant = dict(score="" if case["score"] is None else "softcap", gqa=case["kv_heads"] != case["q_heads"])
        for length in case["lengths"]:
            key = shared_mask_key(case["mask"], length) + (("ragged",) if length % 128 else ())
            name = key + (variant["score"],)
            cost = kernel_cost(ledger, key, case["head_dim"], inference=True, training=True, **variant)
            impls = 1 + (case["score"] is None)
            if args.with_flex:
                cost += ledger.compile("flex_backward_compile", name, *variant.values(), case["layout"], length)
                impls += 1
            compiles += cost > 0
            rows += 2 * impls
            seconds += cost + 2 * impls * timing(length) + check(length)
    return Estimate("efficiency", seconds, f"{rows} fwd/bwd timings over {len(efficiency_cases(False))} cases; "
                                           f"{compiles} new variants (cut short by the budget)")


def estimate_decode(args, ledger: Ledger) -> Estimate:
    seconds = 0.0
    for batch in args.decode_batches:
        for cache in args.decode_caches:
            seconds += ledger.compile("decode_compile", "contiguous", batch, cache, "bf16")
            impls = 3
            if args.with_flex:
                seconds += ledger.compile("flex_compile", "decode", batch, cache)
                impls += 1
            seconds += check(cache) + impls * COSTS["timing"]  # decode calls take < 1 ms even at 32k
    shapes = len(args.decode_batches) * len(args.decode_caches)
    return Estimate("decode", seconds, f"{shapes} shapes (B {_list(args.decode_batches)} x cache "
                                       f"{_list(args.decode_caches)}): check + {3 + args.with_flex} timings each")


def estimate_paged(args, ledger: Ledger) -> Estimate:
    seconds = 0.0
    for batch in args.decode_batches:
        for cache in args.decode_caches:
            seconds += ledger.compile("decode_compile", "contiguous", batch, cache, "bf16")
            for page_size in args.page_sizes:
                seconds += ledger.compile("decode_compile", "paged", batch, cache, page_size, "bf16")
                seconds += (1 + (batch > 1)) * check(cache) + 2 * COSTS["timing"]
    shapes = len(args.decode_batches) * len(args.decode_caches) * len(args.page_sizes)
    return Estimate("paged", seconds, f"{shapes} shapes (page sizes {_list(args.page_sizes)}): checks + paged and "
                                      "contiguous timings")


def estimate_cuda_graph(args, ledger: Ledger) -> Estimate:
    from gpu_check_graphs import graph_shapes

    decode, prefill = graph_shapes(args)
    seconds = ledger.compile("decode_compile", "paged", decode["batch"], decode["capacity"], decode["page_size"],
                             "bf16")
    seconds += (decode["steps"] + 3) * COSTS["graph_step"] + 2 * COSTS["timing"]  # + warm-up and capture
    parts = [f"decode step of {decode['layers']} layers, {decode['steps']} replays"]
    if prefill is not None:
        seconds += kernel_cost(ledger, ("causal",), prefill["head_dim"], training=True)
        seconds += (prefill["steps"] + 3) * check(prefill["seq"]) + 2 * COSTS["timing"]
        parts.append(f"prefill forward + backward at {prefill['seq']}, {prefill['steps']} replays")
        for name in FORWARD_FAMILIES:  # (c): the forward section's kernels, captured and replayed
            seconds += kernel_cost(ledger, forward_family_key(name, args.check_seq), args.head_dims[0],
                                   inference=True) + 2 * COSTS["check"]
        parts.append(f"forward of {len(FORWARD_FAMILIES)} mask families")
    return Estimate("cuda_graph", seconds, "; ".join(parts))


def estimate_quick(args, ledger: Ledger) -> Estimate:
    from gpu_check_quick import quick_checks

    checks = quick_checks(args)
    seconds = 0.0
    for item in checks:
        seconds += sum(ledger.compile(kind, item.name, item.dtype_name) for kind in item.compiles) + item.checks * \
            COSTS["check"]
    return Estimate("quick", seconds, f"{len(checks)} checks: " + ", ".join(f"{c.name} {c.dtype_name}"
                                                                            for c in checks))


def estimate_flash(args, ledger: Ledger) -> Estimate:
    """gpu_check_flash: flash_attn_func cases per head_dim (training: forward with statistics + backward), the
    packed varlen batch, the kvcache decode step and chunk (paged decode kernels), dropout (its own training
    variant and the keep-mask kernel), then the timings at B 4, H 16, L 2048, D 128: the causal kernels are the
    backward and efficiency sections' (strides are arguments, not constants: the [B, L, H, D] views share them),
    the dropout ones the dropout check's, the packed batch's a new varlen variant."""
    from gpu_check_flash import FUNC_CASES, flash_shapes

    shape = flash_shapes(args)
    seconds, compiles, checks = 0.0, 0, 0
    for head_dim in shape["head_dims"]:
        for case in FUNC_CASES:
            cost = kernel_cost(ledger, ("flash", case, shape["kv_len"] - shape["q_len"]), head_dim, training=True,
                               score=case, gqa=True, layout="bshd")
            compiles += cost > 0
            seconds += cost + 2 * check(shape["kv_len"])  # the call, its float64 and bf16 references
            checks += 1
    varlen = ("varlen", "causal", tuple(shape["varlen_lengths"]))
    cost = kernel_cost(ledger, varlen, shape["varlen_dim"], training=True, layout="packed")
    for q_len in (1, shape["chunk"]):
        cost += ledger.compile("decode_compile", "flash_kvcache", q_len, shape["page_size"], "bf16")
    dropout = ("causal", "dropout")
    cost += kernel_cost(ledger, dropout, shape["dropout"]["head_dim"], training=True, layout="bshd")
    cost += ledger.compile("forward_compile", "dropout_keep_mask", shape["dropout"]["head_dim"])
    compiles += 4
    seconds += cost + 2 * check(max(shape["varlen_lengths"])) + 2 * check(max(shape["cache_lengths"])) \
        + 3 * check(shape["dropout"]["seq"])  # dropout: two seeded calls and the references
    checks += 4
    timings = 0
    if shape["timing"] is not None:
        size = shape["timing"]
        causal = shared_mask_key("causal", size["seq"])
        seconds += kernel_cost(ledger, causal, size["head_dim"], inference=True, training=True)
        seconds += kernel_cost(ledger, dropout, size["head_dim"], inference=True, training=True, layout="bshd")
        seconds += kernel_cost(ledger, ("varlen", "causal", tuple(size["varlen_lengths"])), size["head_dim"],
                               inference=True, training=True, layout="packed")
        timings = 10  # func / sdpa / dropout x fwd / fwd_bwd, varlen packed / padded x fwd / fwd_bwd
        seconds += timings * timing(size["seq"])
    return Estimate("flash", seconds, f"flash_attn_func {len(FUNC_CASES)} cases x D {_list(shape['head_dims'])}, "
                                      f"varlen, kvcache x 2, dropout: {checks} checks, {compiles} new variants; "
                                      f"{timings} timings")


ESTIMATORS: Dict[str, Callable] = {
    "quick": estimate_quick, "forward": estimate_forward, "backward": estimate_backward, "decode": estimate_decode,
    "paged": estimate_paged, "cuda_graph": estimate_cuda_graph, "flash": estimate_flash,
    "efficiency": estimate_efficiency}


def build_plan(args, sections: Iterable[str]) -> List[Estimate]:
    """The setup line, then one ``Estimate`` per section in run order (compiles counted once across them)."""
    ledger = Ledger()
    plan = [Estimate("setup", COSTS["setup"], "imports, CUDA context, Triton's compiler")]
    return plan + [ESTIMATORS[name](args, ledger) for name in sections]


def format_plan(plan: List[Estimate], budget: Optional[float]) -> str:
    total = sum(entry.seconds for entry in plan)
    lines = ["plan (estimated seconds on one H100, cold caches; upper estimates):"]
    lines += [f"  {entry.section:<11}{entry.seconds:>6.0f} s  {entry.detail}" for entry in plan]
    over = "" if budget is None or total <= budget else "  OVER: sections past the budget will be skipped"
    lines.append(f"  {'total':<11}{total:>6.0f} s  (budget {'none' if budget is None else f'{budget:.0f} s'})"
                 + over)
    return "\n".join(lines)


def admits(elapsed: float, estimate: float, budget: Optional[float]) -> bool:
    """Whether a step of ``estimate`` seconds, started ``elapsed`` seconds into the run, ends within ``budget``
    (None: no budget)."""
    return budget is None or elapsed + estimate <= budget


class Budget:
    """The run's wall-clock budget (seconds; None: none), counted from its creation."""

    def __init__(self, seconds: Optional[float], clock: Callable[[], float] = time.monotonic):
        self.seconds, self.clock, self.started = seconds, clock, clock()

    def elapsed(self) -> float:
        return self.clock() - self.started

    def remaining(self) -> float:
        return float("inf") if self.seconds is None else self.seconds - self.elapsed()

    def admits(self, estimate: float) -> bool:
        return admits(self.elapsed(), estimate, self.seconds)

    def skip_note(self, estimate: float) -> str:
        return (f"skipped: over the {self.seconds:.0f} s budget ({self.elapsed():.0f} s spent, "
                f"~{estimate:.0f} s needed; --budget raises it)")


def _list(values) -> str:
    return "/".join(str(v) for v in values)
