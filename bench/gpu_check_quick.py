"""``--quick`` section of ``bench/gpu_check.py``: every kernel family once, at one small shape, in bf16 and float32.

``quick_checks(args)`` lists the checks (``QuickCheck``: the kernel families each runs, its dtype, and what
it costs for the plan); ``run_quick`` runs them and writes one PASS/FAIL row per check:

- ``prefill_forward``: ``attention()`` (forward kernel) with a causal document BlockMask, GQA 2:1, a ragged
  last tile; out and lse;
- ``prefill_backward``: the same call's dQ, dK, dV (delta preprocess, dQ and dK/dV kernels; at head_dim 128
  in bf16 Hopper's split dK/dV launches);
- ``decode``: one query row over a 4k-token cache (split-KV kernel with several splits, then the combine);
- ``paged``: ``paged_attention`` over shuffled pages with ragged lengths (paged split kernel + combine);
- ``refiner``: the mask compiler's Triton tile refiner against the eager refinement on every tile.

Each is judged by the numerics rule of docs/design.md: max error against a float64 golden result at most 2x
(forward) / 3x (backward) that of plain PyTorch in the same dtype against it, plus ``FLOOR[dtype]`` x
max(1, max|golden|) (``rule``); the refiner must agree exactly. A check that raises is a FAIL row with the
error. ``--dry-run`` runs the same checks on CPU through the Triton interpreter at tinier shapes.
"""

from __future__ import annotations

from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch

import triton_attn as ta
from triton_attn.masks import and_masks, causal_mask, document_mask, sliding_window_mask
from triton_attn.reference import dense_attention

FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}
FAMILIES = ("prefill_forward", "delta_preprocess", "dq", "dkdv", "decode_split", "decode_combine", "paged_split",
            "refiner")
DTYPES = (torch.bfloat16, torch.float32)
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float32: "fp32", torch.float16: "fp16", None: "-"}


class QuickCheck(NamedTuple):
    """One check of ``--quick``: ``run(context) -> dict`` of row fields (max_error, bound, ok, note, ...)."""

    name: str
    families: Tuple[str, ...]
    dtype: Optional[torch.dtype]  # None: the check has no floating-point inputs (the refiner)
    compiles: Tuple[str, ...]  # gpu_check_plan.COSTS kinds of the kernels it compiles
    checks: int
    run: Callable[["Context"], dict]

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES.get(self.dtype, str(self.dtype))


class Context(NamedTuple):
    device: torch.device
    backend: str  # "triton", or "interpret" in the dry run
    tiny: bool
    dtype: Optional[torch.dtype]


# -- numerics -------------------------------------------------------------------------------------------------

def max_error(actual: torch.Tensor, golden: torch.Tensor) -> float:
    """max |actual - golden| over golden's finite entries (float64); inf when the non-finite entries differ."""
    actual, golden = actual.double(), golden.double()
    finite = torch.isfinite(golden)
    if not torch.equal(torch.isfinite(actual), finite) or not torch.equal(actual[~finite], golden[~finite]):
        return float("inf")
    return float((actual[finite] - golden[finite]).abs().max()) if finite.any() else 0.0


def rule(pairs: Sequence[Tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, float]], dtype: torch.dtype) -> dict:
    """The numerics rule over ``(name, actual, baseline, golden, factor)`` tuples: row fields for the worst
    (largest error / bound) of them; ok when every one is within its bound."""
    worst, all_ok = None, True
    for name, actual, baseline, golden, factor in pairs:
        finite = golden[torch.isfinite(golden)]
        magnitude = float(finite.abs().max()) if finite.numel() else 0.0
        error = max_error(actual, golden)
        bound = factor * max_error(baseline, golden) + FLOOR[dtype] * max(1.0, magnitude)
        all_ok &= error <= bound
        if worst is None or error / bound > worst[1] / worst[2]:
            worst = (name, error, bound)
    name, error, bound = worst
    return dict(max_error=f"{error:.3e}", bound=f"{bound:.3e}", ok=all_ok, note=f"worst: {name}")


# -- inputs ---------------------------------------------------------------------------------------------------

def randn(*shape, dtype, device, generator: torch.Generator) -> torch.Tensor:
    """Fresh normal values drawn on the CPU (the same on every device), then moved."""
    return torch.randn(*shape, generator=generator).to(device=device, dtype=dtype)


def shuffled_table(lengths: Sequence[int], page_size: int, max_pages: int, generator: torch.Generator,
                   spare_pages: int = 0) -> Tuple[torch.Tensor, List[int], int]:
    """A page table over shuffled pages for sequences of ``lengths``: (int32 ``[B, max_pages]`` on the CPU, the
    free pages, the number of pages). Entries past a sequence's pages are -1; ``spare_pages`` pages more than
    the sequences use stay free (for sequences that grow)."""
    used = [-(-n // page_size) for n in lengths]
    num_pages = sum(used) + spare_pages
    order = torch.randperm(num_pages, generator=generator).tolist()
    table = torch.full((len(lengths), max_pages), -1, dtype=torch.int32)
    for b, pages in enumerate(used):
        for j in range(pages):
            table[b, j] = order.pop()
    return table, order, num_pages


def fill_pages(tensor: torch.Tensor, table: torch.Tensor, lengths: Sequence[int], page_size: int,
               num_pages: int) -> torch.Tensor:
    """``[num_pages, H, page_size, D]`` holding sequence b's first ``lengths[b]`` positions of ``tensor``
    ``[B, H, L, D]`` in the pages ``table`` (CPU int32 ``[B, max_pages]``) gives them; the rest zero."""
    cache = torch.zeros(num_pages, tensor.shape[1], page_size, tensor.shape[3], dtype=tensor.dtype,
                        device=tensor.device)
    for b, length in enumerate(lengths):
        for j in range(-(-length // page_size)):
            stop = min(length, (j + 1) * page_size)
            cache[int(table[b, j]), :, :stop - j * page_size] = tensor[b, :, j * page_size:stop]
    return cache


def gather_pages(cache: torch.Tensor, table: torch.Tensor, b: int, length: int) -> torch.Tensor:
    """``[H, length, D]``: sequence b's first ``length`` positions read back through the page table."""
    page_size = cache.shape[2]
    pages = cache[table[b, :-(-length // page_size)].long()]  # [n, H, page_size, D]
    return pages.transpose(0, 1).reshape(cache.shape[1], -1, cache.shape[3])[:, :length]


def length_mask(lengths: Sequence[int], capacity: int, device) -> torch.Tensor:
    """bool ``[B, 1, 1, capacity]``: position < the sequence's length."""
    return (torch.arange(capacity, device=device).view(1, 1, 1, -1)
            < torch.tensor(list(lengths), device=device).view(-1, 1, 1, 1))


# -- the checks -----------------------------------------------------------------------------------------------

def _prefill_problem(context: Context, generator: torch.Generator):
    batch, q_heads, kv_heads, length = (1, 2, 1, 40) if context.tiny else (2, 4, 2, 300)
    head_dim = 16 if context.tiny else (128 if context.dtype == torch.bfloat16 else 64)
    ids = (torch.arange(length) * 3 // length).to(context.device)  # three documents
    mask_mod = and_masks(causal_mask, document_mask(ids))
    q = randn(batch, q_heads, length, head_dim, dtype=context.dtype, device=context.device, generator=generator)
    k, v = (randn(batch, kv_heads, length, head_dim, dtype=context.dtype, device=context.device,
                  generator=generator) for _ in range(2))
    block_mask = ta.create_block_mask(mask_mod, None, None, length, length, device=context.device)
    return q, k, v, mask_mod, block_mask


def check_prefill_forward(context: Context) -> dict:
    q, k, v, mask_mod, block_mask = _prefill_problem(context, torch.Generator().manual_seed(1))
    route = ta.explain(q, k, v, block_mask=block_mask, enable_gqa=True, backend=context.backend)
    out, lse = ta.attention(q, k, v, block_mask=block_mask, enable_gqa=True, return_lse=True, backend=context.backend)
    golden = dense_attention(q, k, v, mask_mod=mask_mod, compute_dtype=torch.float64)
    baseline = dense_attention(q, k, v, mask_mod=mask_mod)
    row = rule([("out", out, baseline[0], golden[0], 2.0), ("lse", lse, baseline[1], golden[1], 2.0)], q.dtype)
    return _with_route(row, route, "prefill", q)


def check_prefill_backward(context: Context) -> dict:
    generator = torch.Generator().manual_seed(2)
    q, k, v, mask_mod, block_mask = _prefill_problem(context, generator)
    grad_out = randn(*q.shape, dtype=q.dtype, device=q.device, generator=generator)

    def grads(function, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        out = function(*leaves)
        return (out.detach(), *torch.autograd.grad(out, leaves, grad_out.to(dtype)))

    ours = grads(lambda *t: ta.attention(*t, block_mask=block_mask, enable_gqa=True, backend=context.backend), q.dtype)
    golden = grads(lambda *t: dense_attention(*t, mask_mod=mask_mod)[0], torch.float64)
    baseline = grads(lambda *t: dense_attention(*t, mask_mod=mask_mod)[0], q.dtype)
    with torch.enable_grad():
        route = ta.explain(*(t.detach().requires_grad_() for t in (q, k, v)), block_mask=block_mask,
                           enable_gqa=True, backend=context.backend)
    names, factors = ("out", "dq", "dk", "dv"), (2.0, 3.0, 3.0, 3.0)
    row = rule(list(zip(names, ours, baseline, golden, factors)), q.dtype)
    return _with_route(row, route, "prefill", q, backward="kernels")


def check_decode(context: Context) -> dict:
    generator = torch.Generator().manual_seed(3)
    batch, q_heads, kv_heads, cache = (2, 4, 2, 80) if context.tiny else (2, 8, 2, 4096)
    head_dim = 16 if context.tiny else (128 if context.dtype == torch.bfloat16 else 64)
    q = randn(batch, q_heads, 1, head_dim, dtype=context.dtype, device=context.device, generator=generator)
    k, v = (randn(batch, kv_heads, cache, head_dim, dtype=context.dtype, device=context.device, generator=generator)
            for _ in range(2))
    route = ta.explain(q, k, v, enable_gqa=True, backend=context.backend)
    out, lse = ta.attention(q, k, v, enable_gqa=True, return_lse=True, backend=context.backend)
    golden = dense_attention(q, k, v, compute_dtype=torch.float64)
    baseline = dense_attention(q, k, v)
    row = rule([("out", out, baseline[0], golden[0], 2.0), ("lse", lse, baseline[1], golden[1], 2.0)], q.dtype)
    row = dict(_with_route(row, route, "decode", q), seq=cache)
    try:  # how many splits the combine merged (the launcher's own decision; for the note only)
        from triton_attn.kernels.decode.launch import plan_decode
        from triton_attn.masks.standard import full_block_mask

        plan = plan_decode(q, kv_heads, head_dim, full_block_mask(1, 1, 1, cache, context.device))
        row["note"] += f"; splits={plan.num_splits}" + ("" if plan.num_splits > 1 else " (the combine did not run)")
    except Exception as error:  # an internal API that moved: the check itself stands
        row["note"] += f"; splits unknown ({type(error).__name__})"
    return row


def check_paged(context: Context) -> dict:
    generator = torch.Generator().manual_seed(4)
    q_heads, kv_heads, page_size = 8, 2, 16
    lengths = (40, 17, 5) if context.tiny else (1000, 517, 33)
    head_dim = 16 if context.tiny else (128 if context.dtype == torch.bfloat16 else 64)
    batch, max_pages = len(lengths), -(-max(lengths) // page_size)
    capacity = max_pages * page_size
    q = randn(batch, q_heads, 1, head_dim, dtype=context.dtype, device=context.device, generator=generator)
    k, v = (randn(batch, kv_heads, capacity, head_dim, dtype=context.dtype, device=context.device,
                  generator=generator) for _ in range(2))
    table, _, num_pages = shuffled_table(lengths, page_size, max_pages, generator)
    key_cache, value_cache = (fill_pages(t, table, lengths, page_size, num_pages) for t in (k, v))
    table = table.to(context.device)
    kv_lens = torch.tensor(lengths, dtype=torch.int32, device=context.device)
    out, lse = ta.paged_attention(q, key_cache, value_cache, table, kv_lens, return_lse=True, backend=context.backend)
    keep = length_mask(lengths, capacity, context.device)
    golden = dense_attention(q, k, v, mask=keep, compute_dtype=torch.float64)
    baseline = dense_attention(q, k, v, mask=keep)
    row = rule([("out", out, baseline[0], golden[0], 2.0), ("lse", lse, baseline[1], golden[1], 2.0)], q.dtype)
    return dict(row, seq=max(lengths), head_dim=head_dim, note=f"{row['note']}; lengths {list(lengths)}")


def check_refiner(context: Context) -> dict:
    """The Triton tile refiner (``kernels/refine.py``) against the eager ``compiler.refine_tiles``, every tile."""
    try:
        from triton_attn.kernels.refine import refine_tiles_triton
        from triton_attn.masks.compiler import refine_tiles
        from triton_attn.masks.tracing import trace_mask_mod
    except ImportError as error:
        return dict(ok="", note=f"skipped: the refiner is not reachable here ({error})")
    batch, length, block = (2, 75, (32, 32)) if context.tiny else (2, 300, (64, 64))
    ids = torch.tensor([[0] * (length // 3) + [1] * (length - length // 3),
                        [0] * (length // 2) + [1] * (length - length // 2)], device=context.device)
    mask_mod = and_masks(causal_mask, document_mask(ids), sliding_window_mask(length // 3))
    blocks = [-(-length // size) for size in block]
    grid = torch.stack(torch.meshgrid(torch.arange(batch), torch.arange(1), torch.arange(blocks[0]),
                                      torch.arange(blocks[1]), indexing="ij")).reshape(4, -1).to(context.device)
    want = refine_tiles(mask_mod, *grid, length, length, block)
    got = refine_tiles_triton(trace_mask_mod(mask_mod), *grid, length, length, block,
                              interpret=context.backend == "interpret")
    differing = sum(int((g.to(w.device) != w).sum()) for g, w in zip(got, want))
    return dict(seq=length, ok=differing == 0, max_error=str(differing),
                note=f"{grid.shape[1]} tiles; {differing} (partial, full) flags differ from the eager refinement")


def _with_route(row: dict, route, family: str, q: torch.Tensor, backward: Optional[str] = None) -> dict:
    """A check whose call took another kernel family (or backward) did not check it: FAIL, saying which it took."""
    took = f"route {route.token}"
    if route.family != family or (backward is not None and route.backward != backward):
        row = dict(row, ok=False)
        took += f" (expected the {family} family" + (f" and the {backward} backward)" if backward else ")")
    return dict(row, seq=q.shape[2], head_dim=q.shape[3], note=f"{row['note']}; {took}")


def quick_checks(args) -> List[QuickCheck]:
    """Every kernel family once per dtype (``FAMILIES`` x ``DTYPES``), the refiner once."""
    checks = []
    for dtype in DTYPES:
        checks += [
            QuickCheck("prefill_forward", ("prefill_forward",), dtype, ("forward_compile",), 1, check_prefill_forward),
            QuickCheck("prefill_backward", ("prefill_forward", "delta_preprocess", "dq", "dkdv"), dtype,
                       ("forward_compile", "backward_compile"), 2, check_prefill_backward),
            QuickCheck("decode", ("decode_split", "decode_combine"), dtype, ("decode_compile",), 1, check_decode),
            QuickCheck("paged", ("paged_split", "decode_combine"), dtype, ("decode_compile",), 1, check_paged),
        ]
    checks.append(QuickCheck("refiner", ("refiner",), None, ("refine_compile",), 1, check_refiner))
    return checks


def covered(checks: Sequence[QuickCheck]) -> Dict[str, set]:
    """family -> the dtypes (names) its checks run it in."""
    found: Dict[str, set] = {}
    for item in checks:
        for family in item.families:
            found.setdefault(family, set()).add(item.dtype_name)
    return found


def run_quick(args, device, dtype, writer_row) -> bool:
    """One row per quick check (PASS/FAIL); a check the budget cannot hold is a skipped row."""
    from gpu_check_plan import COSTS, Budget

    clock = getattr(args, "budget_clock", None) or Budget(None)
    backend = "interpret" if args.dry_run else "triton"
    all_ok = True
    for item in quick_checks(args):
        label = dict(section="quick", mask=item.name, impl="+".join(item.families), dtype=item.dtype_name)
        needs = sum(COSTS[kind] for kind in item.compiles) + item.checks * COSTS["check"]
        if not clock.admits(needs):
            writer_row(dict(label, ok="", note=clock.skip_note(needs)))
            continue
        context = Context(device, backend, args.dry_run, item.dtype)
        try:
            row = item.run(context)
        except Exception as error:  # a FAIL row with the error; the other checks still run
            row = dict(ok=False, note=f"error: {type(error).__name__}: {error}"[:200])
        all_ok &= row.get("ok") is not False
        writer_row(dict(label, **row))
    return all_ok
