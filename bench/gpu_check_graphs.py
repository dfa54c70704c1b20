"""``cuda_graph`` section of ``bench/gpu_check.py``: whole steps captured in CUDA graphs and replayed on new inputs.

(a) A decode step of ``layers`` layers over one paged cache layout: per layer ``ta.write_paged_kv`` appends the
step's new key/value through the page table, then ``plan.run`` (a ``ta.plan_paged`` plan: the paged split
kernel and the combine) attends the new query over the layer's pages. Each later step is prepared outside
the graph -- the lengths advanced by one in place, a page appended to the table in place where a sequence
crosses into a new page, ``plan.update(page_table, kv_lens)``, the new query/key/value copied into the static
buffers -- and ``graph.replay()`` runs it. Every replay is compared with a float64 golden result over the
keys a reference copy of the cache holds (``dense_attention``; the numerics rule: at most 2x the error of
the same computation in the input dtype, plus the floor), the pages read back through the table must equal
that copy exactly, and the eager ``ta.paged_attention`` on the same pages is reported beside it.

(b) A prefill training step: ``ta.attention`` with a causal BlockMask built before the capture, ``loss =
(out * grad_out).sum()``, ``loss.backward()`` inside the graph (the gradients are the graph's static
``.grad`` tensors); replayed on new q/k/v/grad_out and compared with the float64 golden result (2x / 3x) and,
bit for bit, with the eager step on the same inputs (same kernels, deterministic backward).

(c) The forward of every mask family of the forward section (``gpu_check_forward.mask_families``, at its
correctness length and first head_dim: kernels it compiled), captured once per family and replayed on new
inputs, bit-identical to the eager call.

All follow the PyTorch CUDA-graphs recipe: warm-up on a side stream, then capture; capture and replay run
under ``torch.cuda.set_sync_debug_mode("error")`` (a host sync raises). Rows: PASS/FAIL per replay with the
max error, and the replay time per step against the eager step's (us). Without CUDA (``--dry-run``) the same
steps run eagerly (no capture, no timing) through the interpreter. A checkout without ``ta.plan_paged`` /
``ta.write_paged_kv`` gets one skipped row for (a).
"""

from __future__ import annotations

import contextlib
from typing import Callable, List, Optional, Tuple

import torch
from gpu_check_quick import fill_pages, gather_pages, length_mask, randn, rule, shuffled_table

import triton_attn as ta
from triton_attn.masks import causal_mask
from triton_attn.reference import dense_attention


def graph_shapes(args) -> Tuple[dict, Optional[dict]]:
    """(decode step shape, prefill step shape or None under ``--quick``). Decode lengths are chosen so that
    most sequences cross into a new page during the replayed steps. ``args.tiny``: the dry run's sizes."""
    if getattr(args, "tiny", args.dry_run):
        decode = dict(batch=3, q_heads=4, kv_heads=2, head_dim=16, page_size=16, layers=2, steps=4,
                      lengths=(30, 14, 47))
        prefill = dict(batch=1, heads=2, seq=48, head_dim=16, steps=1)
    else:
        # Page size 64: the paged section runs 16 by default; 3 of the 4 sequences cross into a new page.
        decode = dict(batch=4, q_heads=32, kv_heads=8, head_dim=128, page_size=64, layers=4, steps=8,
                      lengths=(1021, 2047, 62, 500))
        prefill = dict(batch=1, heads=args.heads, seq=args.check_seq, head_dim=128, steps=3)
    pages = -(-(max(decode["lengths"]) + decode["steps"]) // decode["page_size"])
    decode["capacity"] = pages * decode["page_size"]
    return decode, None if getattr(args, "quick", False) else prefill


@contextlib.contextmanager
def sync_errors(enabled: bool):
    """A host-device sync raises inside the block (``set_sync_debug_mode("error")``) when ``enabled``."""
    if not enabled:
        yield
        return
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def capture(body: Callable[[], object], device, warmups: int = 3):
    """The PyTorch recipe: ``warmups`` calls of ``body`` on a side stream, then one captured call under
    ``sync_errors``; returns (graph, the captured call's outputs: static tensors each replay rewrites)."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmups):
            body()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        with sync_errors(True):
            outputs = body()
    return graph, outputs


def time_us(fn: Callable[[], object], iterations: int = 50) -> float:
    """Mean us per call of ``fn`` over ``iterations`` calls between two CUDA events, after two warm-up calls."""
    for _ in range(2):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iterations):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / iterations


class DecodeSteps:
    """The state of the decode-step check: paged caches per layer, a reference copy of every layer's keys and
    values (``[B, Hkv, capacity, D]``), the static buffers a captured step reads, and the host's lengths."""

    def __init__(self, shape: dict, device, dtype, generator: torch.Generator):
        self.shape, self.device, self.dtype, self.generator = shape, device, dtype, generator
        batch, kv_heads, dim, page = shape["batch"], shape["kv_heads"], shape["head_dim"], shape["page_size"]
        self.lengths = list(shape["lengths"])
        spare = batch * (-(-shape["steps"] // page) + 1)
        table, self.free_pages, num_pages = shuffled_table(self.lengths, page, shape["capacity"] // page, generator,
                                                           spare_pages=spare)
        self.reference = [[self._randn(batch, kv_heads, shape["capacity"], dim) for _ in range(2)]
                          for _ in range(shape["layers"])]
        self.caches = [[fill_pages(t, table, self.lengths, page, num_pages) for t in pair]
                       for pair in self.reference]
        self.page_table = table.to(device)
        self.kv_lens = torch.tensor(self.lengths, dtype=torch.int32, device=device)
        self.queries = [torch.empty(batch, shape["q_heads"], 1, dim, dtype=dtype, device=device)
                        for _ in range(shape["layers"])]
        self.new_kv = [[torch.empty(batch, kv_heads, 1, dim, dtype=dtype, device=device) for _ in range(2)]
                       for _ in range(shape["layers"])]
        self.grown = 0

    def _randn(self, *shape) -> torch.Tensor:
        return randn(*shape, dtype=self.dtype, device=self.device, generator=self.generator)

    def advance(self) -> None:
        """Host side of the next step: each sequence one token longer (a free page appended to the table in
        place where it needs one), ``kv_lens`` rewritten in place, fresh q/k/v in the static buffers, and the
        new key/value in the reference copy at their position."""
        page = self.shape["page_size"]
        for b in range(len(self.lengths)):
            self.lengths[b] += 1
            if (self.lengths[b] - 1) % page == 0:  # the new token is the first of a page: append one
                self.page_table[b, (self.lengths[b] - 1) // page] = self.free_pages.pop()
                self.grown += 1
        self.kv_lens.copy_(torch.tensor(self.lengths, dtype=torch.int32))
        with torch.no_grad():
            for layer in range(self.shape["layers"]):
                self.queries[layer].copy_(self._randn(*self.queries[layer].shape))
                for static, full in zip(self.new_kv[layer], self.reference[layer]):
                    static.copy_(self._randn(*static.shape))
                    for b, length in enumerate(self.lengths):
                        full[b, :, length - 1] = static[b, :, 0]

    def body(self, plan, write: Callable) -> List[torch.Tensor]:
        """The step a graph captures: per layer, append the new key/value, then attend; outputs per layer."""
        outs = []
        for layer, ((key_cache, value_cache), (key, value)) in enumerate(zip(self.caches, self.new_kv)):
            write(key_cache, value_cache, key, value, self.page_table, self.kv_lens)
            result = plan.run(self.queries[layer], key_cache, value_cache)
            outs.append(result[0] if isinstance(result, tuple) else result)
        return outs

    def compare(self, outs: List[torch.Tensor]) -> dict:
        """Row fields: the numerics rule over every layer's output, the pages read back through the table
        against the reference copy (exact), and the eager ``paged_attention``'s difference (note)."""
        keep = length_mask(self.lengths, self.shape["capacity"], self.device)
        pairs, pages_ok, eager_diff = [], True, 0.0
        for layer, (out, (keys, values)) in enumerate(zip(outs, self.reference)):
            query = self.queries[layer]
            golden = dense_attention(query, keys, values, mask=keep, compute_dtype=torch.float64)[0]
            baseline = dense_attention(query, keys, values, mask=keep)[0]
            pairs.append((f"layer {layer}", out, baseline, golden, 2.0))
            for cache, full in zip(self.caches[layer], (keys, values)):
                pages_ok &= all(torch.equal(gather_pages(cache, self.page_table, b, n), full[b, :, :n])
                                for b, n in enumerate(self.lengths))
            eager = ta.paged_attention(query, *self.caches[layer], self.page_table, self.kv_lens)
            eager_diff = max(eager_diff, float((eager.double() - out.double()).abs().max()))
        row = rule(pairs, self.dtype)
        note = (f"{row['note']}; lengths {self.lengths}; pages appended so far {self.grown}; "
                f"max |replay - eager paged_attention| {eager_diff:.2e}")
        if not pages_ok:
            note += "; PAGES DIFFER from the reference copy (write_paged_kv)"
        return dict(row, ok=row["ok"] and pages_ok, note=note)


def decode_step_rows(shape: dict, device, dtype, backend: Optional[str]) -> List[dict]:
    """Rows of check (a): one per replayed step, then (CUDA) the replay and eager step times."""
    label = dict(section="cuda_graph", mask="decode_step", batch=shape["batch"], head_dim=shape["head_dim"],
                 impl=f"{shape['layers']}_layers")
    plan_paged, write = getattr(ta, "plan_paged", None), getattr(ta, "write_paged_kv", None)
    if plan_paged is None or write is None:
        return [dict(label, ok="", note="SKIP: this checkout has no plan_paged / write_paged_kv")]
    steps = DecodeSteps(shape, device, dtype, torch.Generator().manual_seed(5))
    steps.advance()
    plan = plan_paged(steps.page_table, steps.kv_lens, *steps.caches[0], num_q_heads=shape["q_heads"], q_len=1,
                      backend=backend)
    on_cuda = device.type == "cuda"
    graph, static_outs = capture(lambda: steps.body(plan, write), device) if on_cuda else (None, None)
    rows = []
    for step in range(shape["steps"]):
        if step:
            steps.advance()
            plan.update(steps.page_table, steps.kv_lens)  # reads the table and lengths: outside the graph
        if on_cuda:
            with sync_errors(True):
                graph.replay()
            torch.cuda.synchronize(device)
            outs = static_outs
        else:
            outs = steps.body(plan, write)
        rows.append({**label, "seq": max(steps.lengths), **steps.compare(outs),
                     "impl": f"{shape['layers']}_layers_{'replay' if on_cuda else 'eager (no CUDA)'}_step{step}"})
    if on_cuda:
        replay = time_us(graph.replay)

        def eager_step():
            for (key_cache, value_cache), (key, value), query in zip(steps.caches, steps.new_kv, steps.queries):
                write(key_cache, value_cache, key, value, steps.page_table, steps.kv_lens)
                ta.paged_attention(query, key_cache, value_cache, steps.page_table, steps.kv_lens)

        eager = time_us(eager_step, iterations=20)
        rows.append(dict(label, seq=max(steps.lengths), impl="graph_replay_time", ms=f"{replay / 1e3:.4f}",
                         note=f"replay {replay:.1f} us per step vs eager step {eager:.1f} us "
                              f"(write_paged_kv + paged_attention per layer): {eager / replay:.1f}x"))
    return rows


def prefill_step_rows(shape: dict, device, dtype, backend: Optional[str]) -> List[dict]:
    """Rows of check (b): one per replayed training step, then (CUDA) the replay and eager step times."""
    generator = torch.Generator().manual_seed(6)
    size = (shape["batch"], shape["heads"], shape["seq"], shape["head_dim"])
    label = dict(section="cuda_graph", mask="prefill_fwd_bwd", seq=shape["seq"], head_dim=shape["head_dim"],
                 batch=shape["batch"])
    leaves = [torch.empty(size, dtype=dtype, device=device).requires_grad_() for _ in range(3)]
    grad_out = torch.empty(size, dtype=dtype, device=device)
    block_mask = ta.create_block_mask(causal_mask, None, None, shape["seq"], shape["seq"], device=device)

    def refill():
        with torch.no_grad():
            for static in (*leaves, grad_out):
                static.copy_(randn(*size, dtype=dtype, device=device, generator=generator))

    def body():
        out = ta.attention(*leaves, block_mask=block_mask, backend=backend)
        loss = (out * grad_out).sum()  # d loss / d out = grad_out, exactly
        loss.backward()
        return out

    def eager_step():
        for leaf in leaves:
            leaf.grad = None
        out = body()
        return (out.detach(), *(leaf.grad for leaf in leaves))

    refill()
    on_cuda = device.type == "cuda"
    graph = static = None
    if on_cuda:
        for leaf in leaves:  # the captured backward allocates the .grad tensors from the graph's pool
            leaf.grad = None
        graph, static_out = capture(lambda: eager_step()[0], device)
        static = (static_out, *(leaf.grad for leaf in leaves))
    rows = []
    for step in range(shape["steps"]):
        refill()
        if on_cuda:
            with sync_errors(True):
                graph.replay()
            torch.cuda.synchronize(device)
            got = [t.clone() for t in static]
        else:
            got = eager_step()
        eager = eager_step()  # the same kernels on the same inputs, outside any graph
        bitwise = all(torch.equal(a, b) for a, b in zip(got, eager))
        golden = _training_step(leaves, grad_out, torch.float64)
        baseline = _training_step(leaves, grad_out, dtype)
        names, factors = ("out", "dq", "dk", "dv"), (2.0, 3.0, 3.0, 3.0)
        row = rule(list(zip(names, got, baseline, golden, factors)), dtype)
        ok = row["ok"] and bitwise
        note = f"{row['note']}; {'bit-identical to' if bitwise else 'DIFFERS from'} the eager step"
        rows.append({**label, **row, "ok": ok, "note": note,
                     "impl": f"{'replay' if on_cuda else 'eager (no CUDA)'}_step{step}"})
    if on_cuda:
        replay, eager = time_us(graph.replay, 20), time_us(eager_step, 20)
        rows.append(dict(label, impl="graph_replay_time", ms=f"{replay / 1e3:.4f}",
                         note=f"replay {replay:.1f} us per step vs eager step {eager:.1f} us: {eager / replay:.2f}x"))
    return rows


def family_forward_rows(args, device, dtype, backend: Optional[str]) -> List[dict]:
    """Rows of check (c): per mask family, the captured forward replayed on new inputs vs the eager call."""
    from gpu_check_forward import mask_families

    generator = torch.Generator().manual_seed(7)
    length, head_dim = args.check_seq, args.head_dims[0]
    size = (args.batch, args.heads, length, head_dim)
    rows = []
    for name, mask_mod in mask_families(args.batch, length, device).items():
        label = dict(section="cuda_graph", mask=name, seq=length, head_dim=head_dim, batch=args.batch,
                     impl="forward_replay" if device.type == "cuda" else "forward_eager (no CUDA)")
        try:
            block_mask = ta.create_block_mask(mask_mod, args.batch, None, length, length, device=device)
            static = [torch.empty(size, dtype=dtype, device=device) for _ in range(3)]

            def refill():
                for tensor in static:
                    tensor.copy_(randn(*size, dtype=dtype, device=device, generator=generator))

            def body():
                return ta.attention(*static, block_mask=block_mask, backend=backend)

            refill()
            if device.type == "cuda":
                graph, out = capture(body, device)
                refill()
                with sync_errors(True):
                    graph.replay()
                got = out.clone()
            else:
                got = body()
            eager = body()
            same = torch.equal(got, eager)
            rows.append(dict(label, ok=same, max_error=f"{float((got.float() - eager.float()).abs().max()):.3e}",
                             note="bit-identical to the eager call" if same else "DIFFERS from the eager call"))
        except Exception as error:  # one family must not hide the others
            rows.append(dict(label, ok=False, note=f"error: {type(error).__name__}: {error}"[:300]))
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    return rows


def _training_step(leaves, grad_out, dtype) -> Tuple[torch.Tensor, ...]:
    """out, dq, dk, dv of causal attention over ``leaves`` in ``dtype`` (``dense_attention``)."""
    inputs = [leaf.detach().to(dtype).requires_grad_() for leaf in leaves]
    out = dense_attention(*inputs, mask_mod=causal_mask)[0]
    return (out.detach(), *torch.autograd.grad(out, inputs, grad_out.to(dtype)))


def run_cuda_graph(args, device, dtype, writer_row) -> bool:
    """Checks (a) and, without ``--quick``, (b) and (c); each failure (or exception) is a FAIL row, the others
    run."""
    backend = "interpret" if args.dry_run else "triton"
    decode, prefill = graph_shapes(args)
    checks = [("decode_step", lambda: decode_step_rows(decode, device, dtype, backend))]
    if prefill is not None:
        checks.append(("prefill_fwd_bwd", lambda: prefill_step_rows(prefill, device, dtype, backend)))
        checks.append(("forward_families", lambda: family_forward_rows(args, device, dtype, backend)))
    all_ok = True
    for name, check in checks:
        try:
            rows = check()
        except Exception as error:  # capture refused a sync, a kernel failed, ...: a row, and the next check runs
            rows = [dict(section="cuda_graph", mask=name, ok=False,
                         note=f"error: {type(error).__name__}: {error}"[:300])]
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        for row in rows:
            all_ok &= row.get("ok") is not False
            writer_row(row)
    return all_ok
