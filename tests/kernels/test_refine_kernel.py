"""The Triton tile-refinement kernel (kernels/refine.py), under the interpreter on CPU.

For random compositions of the mask library (captured tensors included), odd lengths and both
block-size forms, the kernel's (partial, full) must equal ``compiler.refine_tiles``'s on the same
tile list; with the kernel registered as the compiler's refiner, ``create_block_mask`` must give
exactly the BlockMask it gives without. Plus an ahead-of-time build for sm_80 of one variant.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.helpers.toolchain import nvidia_toolchain_available

pytest.importorskip("triton")

import triton_attn as ta  # noqa: E402
from triton_attn.kernels import refine  # noqa: E402
from triton_attn.kernels.jit import functions  # noqa: E402
from triton_attn.masks import (  # noqa: E402
    and_masks,
    causal_mask,
    chunked_mask,
    compiler,
    document_mask,
    full_mask,
    not_mask,
    or_masks,
    padding_mask,
    prefix_lm_mask,
    sliding_window_mask,
)
from triton_attn.masks.tracing import trace_mask_mod  # noqa: E402


def cdiv(a, b):
    return -(-a // b)


def pair(block_size):
    return (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)


# ---------------------------------------------------------------------------------------------
# random compositions of the mask library
# ---------------------------------------------------------------------------------------------
@st.composite
def mask_tree(draw, Bn, Hn, Qn, KVn, depth=2):
    """A mask_mod over [Bn, Hn, Qn, KVn] built from the library (and a few hand-written leaves)."""
    if depth == 0 or draw(st.booleans()):
        kind = draw(st.sampled_from(["causal", "full", "window", "chunk", "prefix", "prefix_b", "doc", "doc1d",
                                     "pad", "pad_bool", "head_window", "signed", "batch_head"]))
        S = max(Qn, KVn)
        if kind == "causal":
            return causal_mask
        if kind == "full":
            return full_mask
        if kind == "window":
            return sliding_window_mask(draw(st.integers(1, 70)))
        if kind == "chunk":
            return chunked_mask(draw(st.integers(1, 70)))
        if kind == "prefix":
            return prefix_lm_mask(draw(st.integers(0, 90)))
        if kind == "prefix_b":
            return prefix_lm_mask(torch.tensor(draw(st.lists(st.integers(0, 90), min_size=Bn, max_size=Bn))))
        if kind in ("doc", "doc1d"):
            rows = 1 if kind == "doc1d" else Bn
            bounds = [sorted(draw(st.lists(st.integers(0, S), max_size=5))) for _ in range(rows)]
            ids = torch.stack([torch.bucketize(torch.arange(S), torch.tensor(bd, dtype=torch.long), right=True)
                               for bd in bounds])
            dtype = draw(st.sampled_from([torch.int64, torch.int32]))
            return document_mask((ids[0] if kind == "doc1d" else ids).to(dtype))
        if kind in ("pad", "pad_bool"):
            seed = draw(st.integers(0, 2 ** 16))
            am = torch.rand(Bn, KVn, generator=torch.Generator().manual_seed(seed)) < 0.8
            return padding_mask(am if kind == "pad_bool" else am.long())
        if kind == "head_window":
            windows = torch.tensor(draw(st.lists(st.integers(1, 60), min_size=Hn, max_size=Hn)))

            def head_window(b, h, q_idx, kv_idx):
                return (q_idx >= kv_idx) & (q_idx - kv_idx < windows[h])

            return head_window
        if kind == "signed":  # floor // and % of negative operands
            period = draw(st.integers(2, 9))

            def signed(b, h, q_idx, kv_idx):
                return ((q_idx - kv_idx) // period % 3 != 1) & (torch.abs(q_idx - kv_idx) < 50)

            return signed
        # kind == "batch_head": a predicate that is one scalar per program

        def batch_head(b, h, q_idx, kv_idx):
            return (b + h) % 2 == 0

        return batch_head
    op = draw(st.sampled_from(["and", "or", "not"]))
    if op == "not":
        return not_mask(draw(mask_tree(Bn, Hn, Qn, KVn, depth - 1)))
    mods = draw(st.lists(mask_tree(Bn, Hn, Qn, KVn, depth - 1), min_size=2, max_size=3))
    return (and_masks if op == "and" else or_masks)(*mods)


block_sizes = st.one_of(st.sampled_from([16, 32, 64]),
                        st.sampled_from([(16, 64), (64, 16), (32, 48), (48, 32)]))


def tile_list(B, H, nq, nkv, count, seed):
    """``count`` distinct tiles (b, h, row, col) drawn from the grid, always with the last (ragged) one."""
    total = B * H * nq * nkv
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(total, generator=g)[: max(1, min(count, total))]
    flat = torch.unique(torch.cat([flat, torch.tensor([total - 1])]))
    b, rest = flat // (H * nq * nkv), flat % (H * nq * nkv)
    h, rest = rest // (nq * nkv), rest % (nq * nkv)
    return b, h, rest // nkv, rest % nkv


def assert_same_refinement(mod, B, H, Q, KV, block_size, tiles):
    block_size = pair(block_size)
    b, h, rows, cols = tiles
    want_partial, want_full = compiler.refine_tiles(mod, b, h, rows, cols, Q, KV, block_size)
    got_partial, got_full = refine.refine_tiles_triton(trace_mask_mod(mod), b, h, rows, cols, Q, KV, block_size,
                                                       interpret=True)
    what = f"{mod.__name__} B={B} H={H} Q={Q} KV={KV} BLOCK_SIZE={block_size}"
    for name, got, want in (("partial", got_partial, want_partial), ("full", got_full, want_full)):
        assert got.dtype == torch.bool and got.shape == want.shape, f"{name}: {got.dtype} {got.shape}: {what}"
        diff = (got != want).nonzero().flatten()
        assert diff.numel() == 0, (f"{name} differs at tile (b, h, row, col) = "
                                   f"{tuple(int(t[diff[0]]) for t in tiles)}: kernel {bool(got[diff[0]])}: {what}")


@given(data=st.data(), Bn=st.integers(1, 2), Hn=st.integers(1, 2), Qn=st.integers(1, 200),
       KVn=st.integers(1, 200), block_size=block_sizes, seed=st.integers(0, 2 ** 16))
@settings(max_examples=60)
def test_random_compositions_kernel_equals_refine_tiles(data, Bn, Hn, Qn, KVn, block_size, seed):
    mod = data.draw(mask_tree(Bn, Hn, Qn, KVn))
    q_bs, kv_bs = pair(block_size)
    tiles = tile_list(Bn, Hn, cdiv(Qn, q_bs), cdiv(KVn, kv_bs), 24, seed)
    assert_same_refinement(mod, Bn, Hn, Qn, KVn, block_size, tiles)


@pytest.mark.parametrize("sub_tile", ["whole_block", "compiled"])
@pytest.mark.parametrize("block_size", [32, (16, 48), (64, 100)])
def test_every_tile_of_a_composed_mask(block_size, sub_tile, monkeypatch):
    if sub_tile == "compiled":  # the interpreter walks the sub-tiles a compiled launch uses (32 x 64)
        monkeypatch.setattr(refine, "INTERPRETED_SUB_TILE", refine.COMPILED_SUB_TILE)
    B, H, Q, KV = 2, 2, 75, 101
    ids = torch.tensor([[0] * 20 + [1] * 41 + [2] * 40, [0] * 60 + [1] * 41])
    mod = or_masks(and_masks(causal_mask, document_mask(ids)), prefix_lm_mask(torch.tensor([5, 17])),
                   and_masks(sliding_window_mask(9), not_mask(chunked_mask(13))))
    q_bs, kv_bs = pair(block_size)
    nq, nkv = cdiv(Q, q_bs), cdiv(KV, kv_bs)
    grid = torch.stack(torch.meshgrid(*(torch.arange(n) for n in (B, H, nq, nkv)), indexing="ij")).reshape(4, -1)
    assert_same_refinement(mod, B, H, Q, KV, block_size, tuple(grid))


def test_empty_tile_list_and_known_counts():
    traced = trace_mask_mod(causal_mask)
    none = torch.zeros(0, dtype=torch.long)
    partial, full = refine.refine_tiles_triton(traced, none, none, none, none, 10, 10, (16, 16), interpret=True)
    assert partial.shape == full.shape == (0,)
    # Q = KV = 40, blocks of 16: tile (2, 2) has 8 x 8 in-bounds positions, 36 allowed (causal).
    zero = torch.zeros(3, dtype=torch.long)
    counts = refine.tile_counts_triton(traced, zero, zero, torch.tensor([2, 2, 0]), torch.tensor([2, 0, 2]),
                                       40, 40, (16, 16), interpret=True)
    assert counts.tolist() == [36, 8 * 16, 0]


def test_constant_predicate():
    """A mask_mod that traces to a constant: ``mask_keep = True`` is a Python bool in the kernel."""
    def constant(b, h, q_idx, kv_idx):
        return True

    assert_same_refinement(constant, 1, 2, 37, 21, (16, 32), tile_list(1, 2, 3, 1, 6, 0))


def test_kernel_is_reused_for_new_captured_values():
    """Cache key = graph structure (+ dtype and rank of captured tensors), never the values."""
    ids_a = torch.tensor([0] * 30 + [1] * 20)
    ids_b = torch.tensor([0] * 5 + [1] * 45)
    predicate_a = functions.mod_functions(trace_mask_mod(document_mask(ids_a)), None).mask_fn
    predicate_b = functions.mod_functions(trace_mask_mod(document_mask(ids_b)), None).mask_fn
    assert predicate_a is predicate_b
    tiles = tile_list(1, 1, 4, 4, 16, 0)
    assert_same_refinement(document_mask(ids_b), 1, 1, 50, 50, 16, tiles)


def test_refine_kernel_calls_the_generated_predicate():
    """The kernel is real source; only the mask_mod's function is generated, and it is the one called."""
    import inspect

    traced = trace_mask_mod(and_masks(causal_mask, sliding_window_mask(7)))
    source = functions.mod_functions(traced, None).path.read_text()
    assert "def mask_mod(" in source and "tl.sum" not in source
    assert "MASK_FN(batch, head, q_idx, kv_idx, *mask_captured)" in inspect.getsource(refine.refine_tiles_kernel.fn)


# ---------------------------------------------------------------------------------------------
# the compiler hook, end to end
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def interpreted_refiner_on_cpu(monkeypatch):
    """Route the compiler's refinement of traced mods on CPU through the interpreted kernel.

    Uses the compiler's ``TILE_REFINERS`` hook when it has one; otherwise replaces its
    ``refine_tiles`` call by the equivalent (trace, then the kernel). Yields the call log.
    """
    calls = []

    def counting(traced, *args):
        calls.append(args[2].numel())
        return refine.interpreted_refiner(traced, *args)

    if hasattr(compiler, "TILE_REFINERS"):
        monkeypatch.setitem(compiler.TILE_REFINERS, "cpu", counting)
    else:
        def refine_tiles(mask_mod, b, h, rows, cols, Q_LEN, KV_LEN, block_size, budget=None, sub_tiles=None):
            return counting(trace_mask_mod(mask_mod), b, h, rows, cols, Q_LEN, KV_LEN, block_size)

        monkeypatch.setattr(compiler, "refine_tiles", refine_tiles)
    return calls


def _block_mask_fields(bm):
    return {name: getattr(bm, name) for name in ("kv_num_blocks", "kv_indices", "full_kv_num_blocks",
                                                 "full_kv_indices", "q_num_blocks", "q_indices",
                                                 "full_q_num_blocks", "full_q_indices")}


def _cases():
    ids2 = torch.tensor([[0] * 50 + [1] * 60 + [2] * 77, [0] * 100 + [1] * 87])
    ids1 = torch.tensor([0] * 33 + [1] * 100 + [2] * 54)
    pad = torch.ones(2, 187, dtype=torch.bool)
    pad[0, 150:] = False
    pad[1, 7] = False
    return {
        "causal_document_2d": (and_masks(causal_mask, document_mask(ids2)), 2, None),
        "window_or_prefix_per_batch": (or_masks(sliding_window_mask(40), prefix_lm_mask(torch.tensor([9, 70]))), 2, 2),
        "chunked_padding_not": (and_masks(causal_mask, chunked_mask(37), padding_mask(pad),
                                          not_mask(document_mask(ids1))), 2, 1),
    }


@pytest.mark.parametrize("block_size", [32, (16, 64)], ids=["32", "16x64"])
@pytest.mark.parametrize("name", list(_cases()))
def test_create_block_mask_same_with_triton_refiner(name, block_size, request):
    mod, B, H = _cases()[name]
    Q, KV = 187, 173
    want = ta.create_block_mask(mod, B, H, Q, KV, BLOCK_SIZE=block_size)
    calls = request.getfixturevalue("interpreted_refiner_on_cpu")
    got = ta.create_block_mask(mod, B, H, Q, KV, BLOCK_SIZE=block_size)
    assert calls and sum(calls) > 0, "the Triton refiner was never called"
    assert got.BLOCK_SIZE == want.BLOCK_SIZE and got.seq_lengths == want.seq_lengths
    for field, value in _block_mask_fields(want).items():
        assert torch.equal(_block_mask_fields(got)[field], value), f"{field} differs: {name} {block_size}"


def test_poisoned_tiles_still_raise_as_in_the_exact_compiler():
    """An out-of-range captured index raises eagerly; the kernel would read 0 there, so the
    compiler must keep such (poisoned) tiles on the eager path even with a refiner installed."""
    if not hasattr(compiler, "TILE_REFINERS"):
        pytest.skip("masks.compiler has no TILE_REFINERS hook yet")
    short = torch.zeros(40, dtype=torch.long)

    def reads_past_the_end(b, h, q_idx, kv_idx):
        return short[kv_idx] == 0

    with pytest.raises(ValueError, match="IndexError"):  # eager errors come wrapped (masks/evaluate.py)
        ta.create_block_mask(reads_past_the_end, None, None, 64, 64, BLOCK_SIZE=16, device="cpu")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(compiler.TILE_REFINERS, "cpu", refine.interpreted_refiner)
        with pytest.raises(ValueError, match="IndexError"):
            ta.create_block_mask(reads_past_the_end, None, None, 64, 64, BLOCK_SIZE=16, device="cpu")


def test_install_registers_and_uninstall_removes():
    if not hasattr(compiler, "TILE_REFINERS"):
        with pytest.raises(RuntimeError, match="TILE_REFINERS"):
            refine.install("cpu", refine.interpreted_refiner)
        return
    before = dict(compiler.TILE_REFINERS)
    try:
        refine.install("cpu", refine.interpreted_refiner)
        assert compiler.TILE_REFINERS["cpu"] is refine.interpreted_refiner
        refine.install()
        assert compiler.TILE_REFINERS["cuda"] is refine.cuda_refiner
    finally:
        compiler.TILE_REFINERS.clear()
        compiler.TILE_REFINERS.update(before)


# ---------------------------------------------------------------------------------------------
# ahead-of-time build for NVIDIA targets (no GPU needed)
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not nvidia_toolchain_available(80), reason="Triton's NVIDIA backend is not installed")
@pytest.mark.parametrize("block_size", [(128, 128), (48, 100)], ids=["128", "48x100"])
def test_refine_kernel_compiles_for_sm80(block_size):
    ids = torch.tensor([[0] * 30 + [1] * 34, [0] * 60 + [1] * 4], dtype=torch.int32)
    mod = and_masks(sliding_window_mask(100), document_mask(ids), padding_mask(ids > 0),
                    prefix_lm_mask(torch.tensor([3, 9])))
    result = refine.compile_refine(trace_mask_mod(mod), arch=80, block_size=block_size)
    assert ".visible .entry refine_tiles_kernel" in result.ptx
    assert not result.spills, str(result)
