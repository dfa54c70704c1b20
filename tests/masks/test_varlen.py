"""FlashAttention-2's packed variable-length sequences as a BlockMask (``masks/varlen.py``).

The rule is evaluated directly (Python loops over sequences, queries and keys); the layout is checked for
safety (every visible pair lies in a visited tile, every full tile is visible everywhere), against the
general compiler's classification (the closed form is exact), and for its index width (a bound from host
ints, not the grid); attention over the packed tensors is compared with a float64 reference computed
sequence by sequence. Building the mask reads nothing from the device.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import pytest
import torch

import triton_attn as ta
from tests.helpers.host_reads import HostReadError, no_host_reads
from tests.helpers.numerics import BACKWARD_FACTOR, FORWARD_FACTOR, compare
from triton_attn.masks import create_block_mask, create_mask, softcap_score
from triton_attn.masks.varlen import index_widths, sequences_per_block, varlen_block_mask, varlen_layout
from triton_attn.reference import dense_attention, lse_dtype

Window = Tuple[int, int]


def cumulative(lengths: Sequence[int]) -> torch.Tensor:
    """int32 ``[S + 1]`` cumulative lengths from 0."""
    return torch.tensor([0] + torch.tensor(list(lengths)).cumsum(0).tolist(), dtype=torch.int32)


def effective_window(causal: bool, window: Window) -> Window:
    return (window[0], 0) if causal else window


def rule_mask(lens_q: Sequence[int], lens_k: Sequence[int], causal: bool, window: Window) -> torch.Tensor:
    """Bool ``[total_q, total_k]``: FlashAttention-2's rule, evaluated pair by pair in plain Python."""
    left, right = effective_window(causal, window)
    cu_q, cu_k = cumulative(lens_q).tolist(), cumulative(lens_k).tolist()
    visible = torch.zeros(cu_q[-1], cu_k[-1], dtype=torch.bool)
    for s in range(len(lens_q)):
        for q in range(cu_q[s], cu_q[s + 1]):
            diagonal = q + cu_k[s + 1] - cu_q[s + 1]
            for kv in range(cu_k[s], cu_k[s + 1]):
                visible[q, kv] = (left < 0 or diagonal - left <= kv) and (right < 0 or kv <= diagonal + right)
    return visible


def build(lens_q, lens_k, causal=False, window=(-1, -1), block=128, hints=False, same=False):
    """The layout of these lengths (max_seqlen from the lengths; min_seqlen hints when ``hints``; with ``same``
    one ``cu_seqlens`` tensor for queries and keys, self-attention's packing, which needs equal lengths)."""
    def shortest(lengths):
        return min([n for n in lengths if n > 0], default=1) if hints else 1
    cu_q = cumulative(lens_q)
    cu_k = cu_q if same else cumulative(lens_k)
    return varlen_layout(cu_q, cu_k, max(lens_q), max(lens_k), total_q=sum(lens_q), total_k=sum(lens_k),
                         causal=causal, window=window, BLOCK_SIZE=block, min_seqlen_q=shortest(lens_q),
                         min_seqlen_k=shortest(lens_k))


# Named cases: (lengths of the query sequences, of the key sequences, causal, window, BLOCK_SIZE).
CASES = {
    "self_causal": ([70, 5, 130, 1, 44], [70, 5, 130, 1, 44], True, (-1, -1), 32),
    "more_keys_causal": ([10, 33, 1, 60], [90, 40, 77, 61], True, (-1, -1), 32),      # chunked prefill
    "more_queries_causal": ([90, 40, 30], [10, 33, 60], True, (-1, -1), (16, 32)),    # rows that see nothing
    "empty_sequences": ([40, 0, 25, 31, 0, 9], [0, 20, 48, 31, 15, 9], False, (-1, -1), 16),
    "window_both_sides": ([64, 100, 7], [80, 50, 7], False, (9, 4), 16),
    "causal_left_window": ([120, 60], [100, 140], True, (17, -1), (32, 16)),
    "right_window_only": ([50, 50, 50], [30, 90, 50], False, (-1, 6), 16),
    "bidirectional": ([33, 64, 15], [70, 12, 15], False, (-1, -1), 32),
    "narrow_lists": ([70, 64, 80, 60], [70, 64, 80, 60], True, (-1, -1), 16),    # lists 13 of 18 blocks wide
    "decode_step": ([1, 2, 1, 1, 3], [40, 70, 3, 90, 20], True, (-1, -1), 32),    # the decode kernel's family
}


@pytest.mark.parametrize("name", list(CASES))
def test_the_mask_mod_is_flash_attention_2s_rule(name):
    lens_q, lens_k, causal, window, block = CASES[name]
    layout = build(lens_q, lens_k, causal, window, block)
    mask_mod = layout.block_mask.mask_mod
    dense = create_mask(mask_mod, 1, 1, sum(lens_q), sum(lens_k))[0, 0]
    assert torch.equal(dense, rule_mask(lens_q, lens_k, causal, window))
    left, right = effective_window(causal, window)
    expected = "varlen_causal" if causal else "varlen"
    if (left, right) not in ((-1, 0), (-1, -1)):
        expected += f"_window_{left}_{right}"
    assert mask_mod.__name__ == expected
    # The per-token tensors: each row's sequence and diagonal.
    cu_q, cu_k = cumulative(lens_q), cumulative(lens_k)
    seq = torch.repeat_interleave(torch.arange(len(lens_q)), torch.tensor(lens_q))
    assert torch.equal(layout.seq_of_query, seq.int())
    assert torch.equal(layout.diagonal, (torch.arange(sum(lens_q)) + (cu_k[1:] - cu_q[1:])[seq]).int())


def tile_view(dense: torch.Tensor, block: Tuple[int, int]) -> torch.Tensor:
    """``[Q, KV]`` bool -> ``[NQ, NKV, Bq, Bkv]``, padded with True (padding never decides a tile's kind
    here: the checks below use ``any`` of visible pairs and ``all`` of in-bounds pairs via ``inside``)."""
    q_bs, kv_bs = block
    rows, cols = -(-dense.shape[0] // q_bs), -(-dense.shape[1] // kv_bs)
    padded = torch.zeros(rows * q_bs, cols * kv_bs, dtype=torch.bool)
    padded[:dense.shape[0], :dense.shape[1]] = dense
    return padded.view(rows, q_bs, cols, kv_bs).permute(0, 2, 1, 3)


def check_layout(lens_q, lens_k, causal, window, block, hints=False, same=False):
    layout = build(lens_q, lens_k, causal, window, block, hints, same)
    block_mask = layout.block_mask
    block = tuple(block_mask.BLOCK_SIZE)
    visible = rule_mask(lens_q, lens_k, causal, window)
    inside = torch.ones_like(visible)
    visited = block_mask.to_dense()[0, 0].bool()
    full = block_mask.full_blocks()[0, 0]
    # Safety: every visible pair lies in a visited tile; every full tile allows each of its in-bounds pairs.
    assert not (tile_view(visible, block).flatten(2).any(-1) & ~visited).any()
    all_visible = (tile_view(visible, block) | ~tile_view(inside, block)).flatten(2).all(-1)
    assert not (full & ~all_visible).any()
    # Exact: the general compiler classifies every tile the same way.
    compiled = create_block_mask(block_mask.mask_mod, 1, 1, sum(lens_q), sum(lens_k), BLOCK_SIZE=block)
    assert torch.equal(block_mask.partial_blocks(), compiled.partial_blocks())
    assert torch.equal(block_mask.full_blocks(), compiled.full_blocks())
    # The lists hold every row's blocks, and the transposed lists are the transpose (the checks that an
    # untrusted mask runs, with one device read).
    assert bool(layout.fits)
    block_mask.__dict__.pop("_trusted")
    block_mask.validate()
    return layout


@pytest.mark.parametrize("name", list(CASES))
def test_the_layout_is_safe_and_exact(name):
    check_layout(*CASES[name])
    check_layout(*CASES[name], hints=True)
    if CASES[name][0] == CASES[name][1]:  # self-attention: one cu_seqlens tensor, the narrower bound
        check_layout(*CASES[name], same=True)


def random_case(generator: torch.Generator):
    count = int(torch.randint(1, 7, (1,), generator=generator))

    def lengths():
        # Lengths 0 to 120, with a bias toward the edges (0, 1) that make empty rows and blocks of many sequences.
        drawn = torch.randint(0, 121, (count,), generator=generator)
        edge = torch.rand(count, generator=generator) < 0.25
        return torch.where(edge, drawn % 2, drawn).tolist()

    lens_q, lens_k = lengths(), lengths()
    if sum(lens_q) == 0:
        lens_q[0] = 1
    if sum(lens_k) == 0:
        lens_k[-1] = 1
    causal = bool(torch.rand((), generator=generator) < 0.5)
    window = tuple(int(x) for x in torch.randint(-1, 40, (2,), generator=generator))
    block = tuple(int(x) * 8 for x in torch.randint(1, 5, (2,), generator=generator))
    return lens_q, lens_k, causal, window, block


@pytest.mark.parametrize("seed", range(12))
def test_random_lengths_windows_and_block_sizes(seed):
    generator = torch.Generator().manual_seed(1000 + seed)
    for _ in range(4):
        case = random_case(generator)
        check_layout(*case, hints=bool(seed % 2))


@pytest.mark.parametrize("seed", range(6))
def test_random_self_attention_packing_fits_the_same_sequences_bound(seed):
    """One cu_seqlens for queries and keys, no hints: the width from max_seqlen alone holds every row's blocks,
    whatever the lengths (many empty and one-token sequences included: a block then meets many sequences)."""
    generator = torch.Generator().manual_seed(2000 + seed)
    for _ in range(4):
        lens_q, _, causal, window, block = random_case(generator)
        layout = check_layout(lens_q, lens_q, causal, window, block, same=True)
        left, right = effective_window(causal, window)
        q_bs, kv_bs = block
        widths = [index_widths(rows, cols, -(-sum(lens_q) // cols), len(lens_q), max(lens_q), 1, before, after,
                               aligned=True)[0]
                  for rows, cols, before, after in ((q_bs, kv_bs, left, right), (kv_bs, q_bs, right, left))]
        assert layout.widths == tuple(widths)


def test_the_index_width_is_a_bound_from_host_ints_not_the_grid():
    lengths = [700, 1024, 513, 900, 2048, 640, 1500, 777] * 2          # 16 sequences, 16,882 tokens
    total = sum(lengths)
    blocks = -(-total // 128)
    hinted = build(lengths, lengths, causal=True, block=128, hints=True)
    partial_width, full_width = index_widths(128, 128, blocks, len(lengths), max(lengths), min(lengths), -1, 0)
    # A block of 128 rows meets at most 2 sequences of >= 513 tokens, each seeing at most 2048 keys.
    assert sequences_per_block(128, len(lengths), min(lengths)) == 2
    assert (partial_width, full_width) == ((2 * 2048 + 2 * 126) // 128 + 2, 2048 // 128 + 1) == (35, 17)
    block_mask = hinted.block_mask
    assert block_mask.kv_indices.shape == block_mask.full_kv_indices.shape == (1, 1, blocks, 35)
    assert block_mask.launch_plan.max_full_blocks == 17
    assert block_mask.q_indices.shape == (1, 1, blocks, 35) and block_mask.num_blocks == (blocks, blocks)
    widest = int((block_mask.kv_num_blocks + block_mask.full_kv_num_blocks).max())
    assert widest <= 35 < blocks
    # Without hints the width is proven for any lengths (a block may meet 128 one-token sequences), capped
    # by the grid; the lists are the same.
    plain = build(lengths, lengths, causal=True, block=128).block_mask
    assert plain.kv_indices.shape[-1] == blocks
    assert torch.equal(plain.to_dense(), block_mask.to_dense())
    assert torch.equal(plain.full_blocks(), block_mask.full_blocks())
    # A two-sided window bounds the width by the window, whatever the lengths: 16 sequences (no hint) whose
    # intervals span at most 128 + 16 * 127 keys, (2160 + 16 * 126) // 128 + 16 blocks; full: 128 // 128 + 1.
    windowed = build(lengths, lengths, window=(100, 27), block=128).block_mask
    assert windowed.kv_indices.shape[-1] == 48 < blocks and windowed.launch_plan.max_full_blocks == 2
    # One cu_seqlens tensor for both (self-attention): a block's keys lie within 2047 of its rows, before them
    # (causal), so (128 + 2047 + 126) // 128 + 1 = 18 blocks, narrower than the hinted 35, with no hint; with
    # the window, keys 100 before to 27 after the rows: (128 + 127 + 126) // 128 + 1 = 3.
    aligned = build(lengths, lengths, causal=True, block=128, same=True)
    assert aligned.widths == (18, 18) and aligned.block_mask.kv_indices.shape == (1, 1, blocks, 18)
    assert widest <= 18 and torch.equal(aligned.block_mask.to_dense(), block_mask.to_dense())
    assert build(lengths, lengths, window=(100, 27), block=128, same=True).widths == (3, 3)


def test_a_wrong_min_seqlen_hint_is_caught_on_the_device():
    # One query per sequence: a query block meets 100 sequences and sees their 30,000 keys, but the hint
    # claims at most two sequences per block (lists 8 blocks wide).
    lens_q, lens_k = [1] * 100, [300] * 100
    with pytest.raises(RuntimeError, match="min_seqlen"):
        varlen_layout(cumulative(lens_q), cumulative(lens_k), 1, 300, total_q=100, total_k=30000, causal=True,
                      BLOCK_SIZE=128, min_seqlen_q=200)
    # The same lengths without the hint: lists as wide as the grid, which hold them.
    layout = varlen_layout(cumulative(lens_q), cumulative(lens_k), 1, 300, total_q=100, total_k=30000,
                           causal=True, BLOCK_SIZE=128)
    assert bool(layout.fits) and int(layout.block_mask.kv_num_blocks.max()) == 235


@pytest.mark.parametrize("name", ["self_causal", "more_queries_causal", "window_both_sides"])
def test_building_reads_nothing_from_the_device(name):
    lens_q, lens_k, causal, window, block = CASES[name]
    with no_host_reads():
        layout = build(lens_q, lens_k, causal, window, block, hints=True)
        varlen_block_mask(cumulative(lens_q), cumulative(lens_k), max(lens_q), max(lens_k), total_q=sum(lens_q),
                          total_k=sum(lens_k), causal=causal, window=window, BLOCK_SIZE=block)
        plan = layout.block_mask.launch_plan
    assert not plan.exact and plan.heavy_tiles_last is False and plan.computed_blocks >= 0
    assert type(layout.block_mask) is ta.BlockMask and layout.block_mask.exact_layout


def test_copies_and_selections_keep_the_narrow_lists_readable():
    lengths = [300, 200, 420, 100]
    block_mask = build(lengths, lengths, causal=True, block=32, hints=True).block_mask
    assert block_mask.kv_indices.shape[-1] < block_mask.num_blocks[1]
    for copy in (block_mask.to("cpu"), block_mask[0], block_mask[0, 0]):
        assert copy.num_blocks == block_mask.num_blocks and copy.exact_layout
        assert copy.kv_indices.shape == block_mask.kv_indices.shape
        assert torch.equal(copy.to_dense(), block_mask.to_dense()) and copy.is_trusted()
    rows = block_mask[0, 0, 3:5]  # query block rows: a plain BlockMask of the grid's width
    assert torch.equal(rows.to_dense()[0, 0], block_mask.to_dense()[0, 0, 3:5])
    cropped = block_mask._adjust(500, 600)
    assert torch.equal(cropped.to_dense(), block_mask.to_dense()[..., :16, :19])
    assert 0.0 < block_mask.sparsity() < 100.0
    # FlexAttention's BlockMask (whose from_kv_blocks transposes lists as wide as the grid), and back.
    flex = block_mask.to_flex()
    assert torch.equal(flex.to_dense().int(), block_mask.to_dense())
    assert torch.equal(ta.BlockMask.from_flex(flex).full_blocks(), block_mask.full_blocks())
    assert torch.equal(flex.q_num_blocks + flex.full_q_num_blocks,
                       block_mask.q_num_blocks + block_mask.full_q_num_blocks)


# -- attention over the packed tensors --------------------------------------------------------------------

def per_sequence_attention(q, k, v, lens_q, lens_k, causal, window, compute_dtype, score_mod=None):
    """out ``[1, Hq, total_q, D]`` and lse: each sequence attended alone (bottom-right aligned), concatenated."""
    left, right = effective_window(causal, window)
    cu_q, cu_k = cumulative(lens_q).tolist(), cumulative(lens_k).tolist()
    outs: List[torch.Tensor] = []
    lses: List[torch.Tensor] = []
    for s, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        if lq == 0:
            continue
        q_s = q[:, :, cu_q[s]:cu_q[s + 1]]
        if lk == 0:  # nothing to see: output 0, lse -inf (the library's convention)
            outs.append(torch.zeros(q_s.shape, dtype=compute_dtype))
            lses.append(torch.full(q_s.shape[:3], float("-inf"), dtype=lse_dtype(compute_dtype)))
            continue

        def local(b, h, i, j, lq=lq, lk=lk):
            diagonal = i + (lk - lq)
            keep = j >= 0
            if left >= 0:
                keep = keep & (j >= diagonal - left)
            if right >= 0:
                keep = keep & (j <= diagonal + right)
            return keep

        out, lse = dense_attention(q_s, k[:, :, cu_k[s]:cu_k[s + 1]], v[:, :, cu_k[s]:cu_k[s + 1]], mask_mod=local,
                                   score_mod=score_mod, compute_dtype=compute_dtype)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def check_attention(backend: str, name: str, backward: bool, score_mod=None):
    lens_q, lens_k, causal, window, block = CASES[name]
    block_mask = build(lens_q, lens_k, causal, window, block, hints=True).block_mask
    q = torch.randn(1, 2, sum(lens_q), 32)
    k, v = torch.randn(1, 1, sum(lens_k), 32), torch.randn(1, 1, sum(lens_k), 32)
    grad_out = torch.randn(1, 2, sum(lens_q), 32)

    def run(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_(backward) for t in (q, k, v)]
        out, lse = fn(*leaves)
        grads = torch.autograd.grad(out, leaves, grad_out.to(out.dtype)) if backward else ()
        return out.detach(), lse.detach(), grads

    def reference(dtype):
        return lambda *t: per_sequence_attention(*t, lens_q, lens_k, causal, window, dtype, score_mod)

    gold, base = run(reference(torch.float64), torch.float64), run(reference(torch.float32), torch.float32)
    got = run(lambda *t: ta.attention(*t, block_mask=block_mask, score_mod=score_mod, enable_gqa=True,
                                      backend=backend, return_lse=True), torch.float32)
    comparisons = [compare(what, got[i], base[i], gold[i], FORWARD_FACTOR, torch.float32)
                   for i, what in enumerate(("out", "lse"))]
    comparisons += [compare(what, got[2][i], base[2][i], gold[2][i], BACKWARD_FACTOR, torch.float32)
                    for i, what in enumerate(("dq", "dk", "dv")) if backward]
    failed = [c for c in comparisons if not c.error <= c.bound]
    assert not failed, f"{backend} {name}: " + "; ".join(map(str, comparisons))


@pytest.mark.parametrize("name", list(CASES))
def test_torch_backend_matches_the_per_sequence_reference(name):
    # (Its fused routes evaluate the mask_mod densely: gradients for two cases suffice here.)
    check_attention("torch", name, backward=name in ("more_queries_causal", "empty_sequences"))


@pytest.mark.parametrize("name", ["more_queries_causal", "empty_sequences", "narrow_lists"])
def test_torch_blockwise_route_walks_the_lists(name):
    """With a score_mod the torch backend walks the index lists tile by tile (its fused routes evaluate the
    mask_mod densely instead, which an exact layout allows)."""
    lens_q, lens_k, causal, window, block = CASES[name]
    block_mask = build(lens_q, lens_k, causal, window, block, hints=True).block_mask
    q = torch.randn(1, 2, sum(lens_q), 32, requires_grad=True)
    k = torch.randn(1, 1, sum(lens_k), 32)
    assert ta.explain(q, k, k, block_mask=block_mask, score_mod=softcap_score(20.0), enable_gqa=True,
                      backend="torch").family == "blockwise"
    check_attention("torch", name, backward=True, score_mod=softcap_score(20.0))


@pytest.mark.parametrize("name", ["more_keys_causal", "more_queries_causal", "empty_sequences", "window_both_sides",
                                  "narrow_lists", "decode_step"])
def test_interpreted_kernels_match_the_per_sequence_reference(name):
    pytest.importorskip("triton")
    if name == "decode_step":  # 8 packed query rows: the split-KV decode kernel
        lens_q, lens_k, causal, window, block = CASES[name]
        q, k = torch.randn(1, 2, sum(lens_q), 32), torch.randn(1, 1, sum(lens_k), 32)
        block_mask = build(lens_q, lens_k, causal, window, block, hints=True).block_mask
        assert ta.explain(q, k, k, block_mask=block_mask, enable_gqa=True, backend="interpret").family == "decode"
    check_attention("interpret", name, backward=False)


def test_interpreted_backward_matches_the_per_sequence_reference():
    pytest.importorskip("triton")
    check_attention("interpret", "narrow_lists", backward=True)


def interpret_launch_without_reads(name: str, backward: bool):
    """A fresh mask's first kernel launch (forward, and backward) reads nothing back. The one read left is not
    the mask's: ``masks/safety.py`` proves once per mask_mod, on the device, that its captured-tensor
    indices are in range (here ``first_key[q_idx]``, in range by its shape); that proof is made first."""
    from triton_attn.masks.safety import check_mods

    lens_q, lens_k, causal, window, block = CASES[name]
    q, k, v = (torch.randn(1, 2, n, 32, requires_grad=backward) for n in (sum(lens_q), sum(lens_k), sum(lens_k)))
    with no_host_reads():
        block_mask = build(lens_q, lens_k, causal, window, block, hints=True).block_mask
    check_mods(None, block_mask, 1, 2, q.shape[2], k.shape[2], q.device)
    with no_host_reads():
        out = ta.attention(q, k, v, block_mask=block_mask, backend="interpret")
        if backward:
            out.backward(torch.randn_like(out))
    return out


@pytest.mark.parametrize("name", ["more_keys_causal", "decode_step"])
def test_a_first_interpreted_forward_reads_nothing(name):
    pytest.importorskip("triton")
    assert torch.isfinite(interpret_launch_without_reads(name, backward=False)).all()


def test_a_first_interpreted_backward_reads_nothing():
    pytest.importorskip("triton")
    interpret_launch_without_reads("more_keys_causal", backward=True)


@pytest.mark.xfail(strict=True, raises=HostReadError,
                   reason="the torch backend's CPU routes check values on the host (cpu_flash.dense_bias, "
                          "sdpa.attention's empty rows, blockwise's block counts): not the mask's reads")
def test_a_first_torch_backend_launch_reads_nothing():
    lens_q, lens_k, causal, window, block = CASES["self_causal"]
    q, k, v = (torch.randn(1, 2, n, 32) for n in (sum(lens_q), sum(lens_k), sum(lens_k)))
    with no_host_reads():
        block_mask = build(lens_q, lens_k, causal, window, block).block_mask
        ta.attention(q, k, v, block_mask=block_mask, backend="torch")


def test_same_sequences_true_asserts_equal_lengths_on_the_device():
    lengths = [70, 5, 130, 1, 44]
    cu = cumulative(lengths)
    layout = varlen_layout(cu, cu.clone(), 130, 130, total_q=250, total_k=250, causal=True, BLOCK_SIZE=32,
                           same_sequences=True)
    assert layout.widths == build(lengths, lengths, True, block=32, same=True).widths and bool(layout.fits)
    assert build(lengths, lengths, True, block=32).widths[0] > layout.widths[0]  # equal values, not the same tensor
    other = cumulative([70, 6, 129, 1, 44])
    with pytest.raises(RuntimeError, match="same_sequences=True"):
        varlen_layout(cu, other, 130, 130, total_q=250, total_k=250, causal=True, BLOCK_SIZE=32, same_sequences=True)
    with pytest.raises(ValueError, match="same_sequences must be None, True or False"):
        varlen_layout(cu, cu, 130, 130, total_q=250, total_k=250, same_sequences=1)
    unaligned = varlen_layout(cu, cu, 130, 130, total_q=250, total_k=250, causal=True, BLOCK_SIZE=32,
                              same_sequences=False)
    assert unaligned.widths == build(lengths, lengths, True, block=32).widths


def test_narrow_lists_compile_with_eager_gradients():
    """Under torch.compile the attention op rebuilds a plain BlockMask from the lists: its grid (the dK/dV launch
    over every key block) comes from the lists' row counts, not their width, so narrow lists give eager's
    gradients."""
    lens_q, lens_k, causal, window, block = CASES["narrow_lists"]
    q, k, v = (torch.randn(1, 2, n, 32, requires_grad=True) for n in (sum(lens_q), sum(lens_k), sum(lens_k)))

    def loss(q_, k_, v_, block_mask):
        return ta.attention(q_, k_, v_, block_mask=block_mask, backend="torch").square().sum()

    narrow = build(lens_q, lens_k, causal, window, block, hints=True).block_mask
    assert narrow.kv_indices.shape[-1] < narrow.num_blocks[1] and narrow.q_indices.shape[-1] < narrow.num_blocks[0]
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(q, k, v, narrow), (q, k, v))
    want = torch.autograd.grad(loss(q, k, v, narrow), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
