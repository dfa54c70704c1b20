"""``plan_paged`` / ``PagedDecodePlan.run`` / ``update`` and ``write_paged_kv``: serving-ready paged decode.

- Plan once, run every layer: the same result as ``paged_attention`` and the float64 golden result.
- ``run`` reads no tensor value on the host (``tests/helpers/host_reads.py``: what a CUDA graph capture
  rejects), on the ``interpret`` backend (the Triton kernel) and on the ``torch`` backend with the plan's lengths.
- A CUDA graph replays the launches it captured with the same tensors: here the kernel launches of one
  ``run`` are recorded, the plan is moved to the next step with ``update`` and the new inputs copied into
  the captured buffers, and the recorded launches are replayed: they must give the next step's result.
"""

from __future__ import annotations

import pytest
import torch

import triton_attn as ta
from tests.helpers.host_reads import HostReadError, no_host_reads
from tests.helpers.numerics import assert_matches_golden
from tests.helpers.paged_cases import contiguous_kv, logical_mask, logical_score, make_paged
from triton_attn.masks import sliding_window_mask, softcap_score

triton = pytest.importorskip("triton")


def golden_check(out_and_lse, inputs, *, mask_mod=None, score_mod=None, context=""):
    """Compare a result computed already with the golden result of ``inputs``."""
    key, value = contiguous_kv(inputs)
    q_len = inputs.query.shape[2]
    return assert_matches_golden(lambda q_, k_, v_: out_and_lse, inputs.query, key, value, backward=False,
                                 mask_mod=logical_mask(mask_mod, inputs.kv_lens, q_len),
                                 score_mod=logical_score(score_mod, inputs.kv_lens, q_len), context=context)


def layers_of(inputs, count: int):
    """``count`` layers sharing one page table: fresh random queries and caches shaped like ``inputs``'."""
    return [(torch.randn_like(inputs.query), torch.randn_like(inputs.key_cache), torch.randn_like(inputs.value_cache))
            for _ in range(count)]


@pytest.mark.parametrize("backend", ["interpret", "torch"])
@pytest.mark.parametrize("mods", ["default", "window_softcap"])
def test_plan_once_run_every_layer_matches_the_golden_result(backend, mods):
    mask_mod, score_mod = (None, None) if mods == "default" else (sliding_window_mask(40), softcap_score(20.0))
    inputs = make_paged([150, 37, 96], 2, 4, 2, 16, 16, dtype=torch.float32)
    plan = ta.plan_paged(inputs.page_table, inputs.kv_lens, inputs.key_cache, inputs.value_cache, num_q_heads=4,
                         q_len=2, mask_mod=mask_mod, score_mod=score_mod, backend=backend)
    for layer, (query, key_cache, value_cache) in enumerate(layers_of(inputs, 2)):
        layer_inputs = type(inputs)(query, key_cache, value_cache, inputs.page_table, inputs.kv_lens)
        result = plan.run(query, key_cache, value_cache, return_lse=True)
        golden_check(result, layer_inputs, mask_mod=mask_mod, score_mod=score_mod, context=f"layer {layer}")
        direct = ta.paged_attention(*layer_inputs.args, mask_mod=mask_mod, score_mod=score_mod, backend=backend)
        torch.testing.assert_close(plan.run(query, key_cache, value_cache), direct, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["interpret", "torch"])
def test_run_reads_nothing_back_from_the_device(backend):
    inputs = make_paged([130, 20, 64], 1, 8, 2, 16, 16, dtype=torch.float32)
    plan = ta.plan_paged(inputs.page_table, inputs.kv_lens, inputs.key_cache, inputs.value_cache, num_q_heads=8,
                         score_mod=softcap_score(30.0), backend=backend)
    with no_host_reads():
        results = [plan.run(q, k, v, return_lse=True) for q, k, v in layers_of(inputs, 2)]
        result = plan.run(inputs.query, inputs.key_cache, inputs.value_cache, return_lse=True)
    assert len(results) == 2
    golden_check(result, inputs, score_mod=softcap_score(30.0))


def test_the_harness_catches_a_host_read():
    """The check above is real: ``paged_attention`` validates values on the host, and that is caught."""
    inputs = make_paged([40, 20], 1, 2, 2, 16, 16, dtype=torch.float32)
    with no_host_reads(), pytest.raises(HostReadError, match="triton_attn"):
        ta.paged_attention(*inputs.args, backend="interpret")


def test_an_unchecked_plan_for_the_default_mask_reads_nothing_either():
    inputs = make_paged([100, 33], 1, 4, 2, 16, 16, dtype=torch.float32)
    with no_host_reads():
        plan = ta.plan_paged(inputs.page_table, inputs.kv_lens, inputs.key_cache, inputs.value_cache, num_q_heads=4,
                             backend="interpret", check=False)
        plan.update(inputs.page_table, inputs.kv_lens, check=False)
        result = plan.run(inputs.query, inputs.key_cache, inputs.value_cache, return_lse=True)
    golden_check(result, inputs)


def _next_step(inputs, grow: int = 1):
    """The same sequences one decode step later: every length + ``grow`` (pages appended where needed),
    new query rows; the caches keep their shapes (the pool has spare pages)."""
    page_size = inputs.key_cache.shape[2]
    lengths = (inputs.kv_lens + grow).tolist()
    table = inputs.page_table.clone()
    used = {int(p) for b, n in enumerate(inputs.kv_lens.tolist()) for p in table[b, :-(-n // page_size)].tolist()}
    free = [p for p in range(inputs.key_cache.shape[0]) if p not in used]
    for b, n in enumerate(lengths):
        for slot in range(-(-int(inputs.kv_lens[b]) // page_size), -(-n // page_size)):
            table[b, slot] = free.pop()
    return type(inputs)(torch.randn_like(inputs.query), inputs.key_cache, inputs.value_cache, table,
                        torch.tensor(lengths, dtype=torch.int32))


class LaunchRecorder:
    """Records the kernel launches of the decode path and replays them, as a CUDA graph does: the same
    kernels, grids and argument tensors (so the same output buffers)."""

    def __init__(self, monkeypatch):
        from triton_attn.kernels.decode import launch as decode_launch

        self.module, self.launches = decode_launch, []
        original = decode_launch.launch

        def record(kernel, grid, named, **options):
            self.launches.append((kernel, grid, dict(named), options))
            return original(kernel, grid, named, **options)

        self.original = original
        monkeypatch.setattr(decode_launch, "launch", record)

    def replay(self):
        for kernel, grid, named, options in self.launches:
            self.original(kernel, grid, named, **options)


@pytest.mark.parametrize("mask_mod", [None, sliding_window_mask(48)], ids=["causal", "window"])
def test_a_captured_step_replays_the_next_step_after_update(monkeypatch, mask_mod):
    inputs = make_paged([95, 31, 64], 1, 4, 2, 16, 16, dtype=torch.float32, spare_pages=8)
    plan = ta.plan_paged(inputs.page_table, inputs.kv_lens, inputs.key_cache, inputs.value_cache, num_q_heads=4,
                         mask_mod=mask_mod, backend="interpret")
    static_query = inputs.query.clone()
    recorder = LaunchRecorder(monkeypatch)
    out, lse = plan.run(static_query, inputs.key_cache, inputs.value_cache, return_lse=True)   # "capture"
    assert recorder.launches, "no kernel launch recorded"
    golden_check((out, lse), inputs, mask_mod=mask_mod, context="captured step")

    step = inputs
    for replay in range(2):
        step = _next_step(step, grow=1 + replay)
        step.key_cache.copy_(torch.randn_like(step.key_cache))   # new cache contents, same storage
        step.value_cache.copy_(torch.randn_like(step.value_cache))
        plan.update(step.page_table, step.kv_lens)
        static_query.copy_(step.query)
        recorder.replay()
        golden_check((out, lse), step, mask_mod=mask_mod, context=f"replay {replay}")


def test_update_keeps_every_buffer_a_launch_reads():
    inputs = make_paged([70, 20], 1, 2, 2, 16, 16, dtype=torch.float32, spare_pages=6)
    plan = ta.plan_paged(inputs.page_table, inputs.kv_lens, inputs.key_cache, inputs.value_cache, num_q_heads=2,
                         backend="interpret")
    prepared = plan._prepared
    before = [t.data_ptr() for t in (prepared.page_table, prepared.kv_lens, prepared.block_mask.kv_indices,
                                     prepared.block_mask.kv_num_blocks, prepared.block_mask.full_kv_num_blocks)]
    step = _next_step(inputs, grow=20)
    plan.update(step.page_table, step.kv_lens)
    after = [t.data_ptr() for t in (prepared.page_table, prepared.kv_lens, prepared.block_mask.kv_indices,
                                    prepared.block_mask.kv_num_blocks, prepared.block_mask.full_kv_num_blocks)]
    assert before == after
    torch.testing.assert_close(prepared.kv_lens, step.kv_lens)


def test_write_paged_kv_writes_each_new_token_at_its_logical_position():
    inputs = make_paged([40, 17, 33], 3, 4, 2, 16, 16, dtype=torch.float32)
    key = torch.randn(3, 2, 3, 16)
    value = torch.randn(3, 2, 3, 16)
    before_k, before_v = inputs.key_cache.clone(), inputs.value_cache.clone()
    with no_host_reads():
        ta.write_paged_kv(inputs.key_cache, inputs.value_cache, key, value, inputs.page_table, inputs.kv_lens)
    cached_k, cached_v = contiguous_kv(inputs)
    written = torch.zeros_like(before_k, dtype=torch.bool)
    for b, n in enumerate(inputs.kv_lens.tolist()):
        for i in range(3):
            torch.testing.assert_close(cached_k[b, :, n - 3 + i], key[b, :, i], rtol=0, atol=0)
            torch.testing.assert_close(cached_v[b, :, n - 3 + i], value[b, :, i], rtol=0, atol=0)
            position = n - 3 + i
            written[int(inputs.page_table[b, position // 16]), :, position % 16] = True
    assert torch.equal(inputs.key_cache[~written], before_k[~written])  # nothing else moved
    assert torch.equal(inputs.value_cache[~written], before_v[~written])


def test_plan_and_run_errors_name_the_argument():
    inputs = make_paged([40, 20], 2, 4, 2, 16, 16, dtype=torch.float32)
    args = (inputs.page_table, inputs.kv_lens, inputs.key_cache, inputs.value_cache)
    with pytest.raises(ValueError, match=r"Hq=3 must be a multiple of .*Hkv=2"):
        ta.plan_paged(*args, num_q_heads=3, q_len=2, backend="interpret")
    with pytest.raises(ValueError, match=r"kv_lens\[1\]=20 is shorter than the query \(Lq=30\)"):
        ta.plan_paged(*args, num_q_heads=4, q_len=30, backend="interpret")
    with pytest.raises(ValueError, match="num_q_heads"):
        ta.plan_paged(*args, num_q_heads=0, backend="interpret")
    plan = ta.plan_paged(*args, num_q_heads=4, q_len=2, backend="interpret")
    with pytest.raises(ValueError, match=r"query must have the plan's shape \[2, 4, 2, 16\], got \[2, 4, 1, 16\]"):
        plan.run(inputs.query[:, :, :1], inputs.key_cache, inputs.value_cache)
    with pytest.raises(TypeError, match="query must have the plan's dtype"):
        plan.run(inputs.query.double(), inputs.key_cache.double(), inputs.value_cache.double())
    with pytest.raises(ValueError, match=r"key_cache must have the plan's shape"):
        plan.run(inputs.query, inputs.key_cache[:-1], inputs.value_cache[:-1])
    with pytest.raises(ValueError, match=r"page_table must keep the plan's shape"):
        plan.update(inputs.page_table[:, :-1], inputs.kv_lens)
    bad = inputs.page_table.clone()
    bad[0, 0] = 10_000
    with pytest.raises(ValueError, match=r"page_table\[0, 0\]=10000 is not a page"):
        plan.update(bad, inputs.kv_lens)
    with pytest.raises(NotImplementedError, match="no backward pass on backend 'interpret'"):
        plan.run(inputs.query.clone().requires_grad_(), inputs.key_cache, inputs.value_cache)


def test_unchecked_plans_assert_their_values_on_the_device():
    """check=False reads nothing back, but a bad table or length still raises (at the next synchronization;
    on CPU at once): never a silent out-of-bounds read."""
    inputs = make_paged([40, 20], 1, 2, 2, 16, 16, dtype=torch.float32)
    bad_table = inputs.page_table.clone()
    bad_table[1, 0] = -3
    with pytest.raises(RuntimeError, match=r"every page a sequence uses in \[0, num_pages="):
        ta.plan_paged(bad_table, inputs.kv_lens, inputs.key_cache, inputs.value_cache, num_q_heads=2,
                      backend="interpret", check=False)
    plan = ta.plan_paged(inputs.page_table, inputs.kv_lens, inputs.key_cache, inputs.value_cache, num_q_heads=2,
                         backend="interpret", check=False)
    too_long = inputs.kv_lens.clone()
    too_long[0] = 10_000
    with pytest.raises(RuntimeError, match=r"kv_lens must lie in \[Lq=1, max_pages \* page_size"):
        plan.update(inputs.page_table, too_long, check=False)
