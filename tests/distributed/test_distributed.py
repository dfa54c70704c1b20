"""Context parallelism (triton_attn.distributed) on 2 and 4 CPU processes joined by gloo.

Process start-up dominates, so each test starts its ranks once and runs a group of cases there.
Every rank draws the same full inputs from a seeded generator, runs ``context_parallel_attention``
on its shards, and checks its own rows against the float64 golden result under the numerics rule
(tests/helpers/numerics.py) and against single-process ``attention()`` on the unsharded tensors. The loss
uses both out and lse, so the lse path of the backward pass is checked too.
"""

from __future__ import annotations

import pytest
import torch

import triton_attn as ta
from tests.helpers.distributed_harness import run_ranks
from tests.helpers.numerics import BACKWARD_FACTOR, FORWARD_FACTOR, compare, random_qkv
from triton_attn.distributed import (
    PerDocumentBalancer,
    context_parallel_attention,
    layout_positions,
    record_ring_stats,
    shard_sequence,
    unshard_sequence,
    work_report,
)
from triton_attn.masks import and_masks, causal_mask, document_mask, prefix_lm_mask, sliding_window_mask, softcap_score
from triton_attn.reference import dense_attention

SEQ_LEN = 128


def packed_document_ids(seq_len: int, generator: torch.Generator) -> torch.Tensor:
    """int64 [seq_len]: 4 documents of random lengths (same on every rank for the same generator)."""
    cuts = torch.randperm(seq_len - 1, generator=generator)[:3].sort().values + 1
    ids = torch.zeros(seq_len, dtype=torch.long)
    ids[cuts] = 1
    return ids.cumsum(0)


def case_mods(name: str, generator: torch.Generator):
    """(mask_mod, score_mod, document ids or None) of a named test case."""
    if name == "causal":
        return causal_mask, None, None
    if name == "sliding_window":
        return sliding_window_mask(24), None, None
    if name == "document":
        ids = packed_document_ids(SEQ_LEN, generator)
        return and_masks(causal_mask, document_mask(ids)), None, ids
    if name == "prefix_lm":
        return prefix_lm_mask(40), None, None
    if name == "softcap":
        return causal_mask, softcap_score(4.0), None
    raise ValueError(name)


def attention_losses(q, k, v, grad_out, grad_lse, fn):
    """Run ``fn(q, k, v) -> (out, lse)`` and return (out, lse, dq, dk, dv) for the loss
    sum(out * grad_out) + sum(lse * grad_lse) over rows that attend to something."""
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    out, lse = fn(*leaves)
    finite_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    loss = (out.double() * grad_out.double()).sum() + (finite_lse.double() * grad_lse.double()).sum()
    grads = torch.autograd.grad(loss, leaves)
    return (out.detach(), lse.detach(), *grads)


def check_case(rank: int, world_size: int, name: str, load_balance, dtype=torch.float32, kv_heads: int = 2,
               seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    mask_mod, score_mod, ids = case_mods(name, generator)
    if load_balance == "per_document":
        load_balance = PerDocumentBalancer(ids, granule=4)  # small: these documents are ~32 tokens
    q, k, v = random_qkv(2, 4, kv_heads, SEQ_LEN, SEQ_LEN, 16, dtype=dtype, generator=generator)
    grad_out = torch.randn(q.shape, generator=generator).to(dtype)
    grad_lse = torch.randn(q.shape[:3], generator=generator)
    gqa = kv_heads != q.shape[1]

    def dense(compute_dtype):
        return lambda q_, k_, v_: dense_attention(q_, k_, v_, mask_mod=mask_mod, score_mod=score_mod,
                                                  compute_dtype=compute_dtype)

    golden = attention_losses(q.double(), k.double(), v.double(), grad_out, grad_lse, dense(torch.float64))
    baseline = attention_losses(q, k, v, grad_out, grad_lse, dense(dtype))
    block_mask = ta.create_block_mask(mask_mod, None, None, SEQ_LEN, SEQ_LEN)
    single = attention_losses(q, k, v, grad_out, grad_lse, lambda q_, k_, v_: ta.attention(
        q_, k_, v_, block_mask=block_mask, score_mod=score_mod, enable_gqa=gqa, return_lse=True))

    def shard(t):
        return shard_sequence(t, dim=2, load_balance=load_balance)

    local = attention_losses(shard(q), shard(k), shard(v), shard(grad_out), shard(grad_lse),
                             lambda q_, k_, v_: context_parallel_attention(
                                 q_, k_, v_, mask_mod=mask_mod, score_mod=score_mod, load_balance=load_balance,
                                 enable_gqa=gqa, return_lse=True))
    assert local[0].dtype == dtype and local[1].dtype == torch.float32
    for index, what in enumerate(("out", "lse", "dq", "dk", "dv")):
        factor = FORWARD_FACTOR if index < 2 else BACKWARD_FACTOR
        result = compare(what, local[index], shard(baseline[index]), shard(golden[index]), factor, dtype)
        context = f"{name}/{load_balance}/{dtype}/rank {rank} of {world_size}"
        assert result.error <= result.bound, f"{context}: {result}"
        single_result = compare(what, shard(single[index]), shard(baseline[index]), shard(golden[index]), factor, dtype)
        # Ring and single-process attention() agree to within the rule's bound of each other.
        gap = (local[index].double() - shard(single[index]).double()).nan_to_num(0.0, 0.0, 0.0).abs().max()
        assert float(gap) <= result.bound + single_result.error, f"{context}: {what} differs from attention() by {gap}"


def check_interpreted_kernels(rank: int, world_size: int) -> None:
    """The Triton kernels (under the interpreter) inline the wrapped mods: captured global positions
    and document ids are loads in the kernel, and the result matches single-process attention()."""
    seq_len = 64
    generator = torch.Generator().manual_seed(3)
    ids = torch.repeat_interleave(torch.arange(3), torch.tensor([20, 30, 14]))
    mask_mod, score_mod = and_masks(causal_mask, document_mask(ids)), softcap_score(4.0)
    q, k, v = random_qkv(1, 2, 1, seq_len, seq_len, 16, generator=generator)
    out, lse = context_parallel_attention(*(shard_sequence(t) for t in (q, k, v)), mask_mod=mask_mod,
                                          score_mod=score_mod, enable_gqa=True, return_lse=True, backend="interpret")
    golden_out, golden_lse = dense_attention(q, k, v, mask_mod=mask_mod, score_mod=score_mod,
                                             compute_dtype=torch.float64)
    base_out, base_lse = dense_attention(q, k, v, mask_mod=mask_mod, score_mod=score_mod)
    for what, got, base, gold in (("out", out, base_out, golden_out), ("lse", lse, base_lse, golden_lse)):
        result = compare(what, got, shard_sequence(base), shard_sequence(gold), FORWARD_FACTOR, torch.float32)
        assert result.error <= result.bound, f"interpret, rank {rank}: {result}"


def check_learnable_score_mod(rank: int, world_size: int) -> None:
    """A bias table captured by the score_mod gets this rank's share of the gradient: the shares
    summed over ranks equal the single-process gradient."""
    generator = torch.Generator().manual_seed(4)
    bias = torch.randn(SEQ_LEN, generator=generator).requires_grad_(True)

    def key_bias(score, b, h, q_idx, kv_idx):
        return score + bias[kv_idx]

    q, k, v = random_qkv(1, 2, 2, SEQ_LEN, SEQ_LEN, 16, generator=generator)
    grad_out = torch.randn(q.shape, generator=generator)
    out = context_parallel_attention(*(shard_sequence(t) for t in (q, k, v)), mask_mod=causal_mask, score_mod=key_bias)
    (share,) = torch.autograd.grad(out, bias, shard_sequence(grad_out))
    torch.distributed.all_reduce(share)
    block_mask = ta.create_block_mask(causal_mask, None, None, SEQ_LEN, SEQ_LEN)
    (expected,) = torch.autograd.grad(ta.attention(q, k, v, block_mask=block_mask, score_mod=key_bias), bias, grad_out)
    assert torch.allclose(share, expected, atol=1e-5, rtol=1e-4), float((share - expected).abs().max())


def check_balancing_and_errors(rank: int, world_size: int) -> None:
    """Shard/unshard round trips, skipped steps as the layout predicts, the length error."""
    generator = torch.Generator().manual_seed(1)  # the same full tensors on every rank
    x = torch.randn(2, 3, SEQ_LEN, 5, generator=generator)
    for load_balance in ("none", "head_tail", PerDocumentBalancer([50, 14, 64], granule=4)):
        shard = shard_sequence(x, dim=2, load_balance=load_balance)
        assert shard.shape == (2, 3, SEQ_LEN // world_size, 5)
        positions = layout_positions(load_balance, SEQ_LEN, world_size)[rank]
        assert torch.equal(shard, x[:, :, positions])
        assert torch.equal(unshard_sequence(shard, dim=2, load_balance=load_balance), x)

    # Causal: a step is skipped exactly when every query of this rank precedes every visiting key.
    q, k, v = random_qkv(1, 2, 2, SEQ_LEN, SEQ_LEN, 16, generator=generator)
    for load_balance in ("none", "head_tail"):
        positions = layout_positions(load_balance, SEQ_LEN, world_size)
        predicted = [step for step in range(world_size)
                     if positions[rank].max() < positions[(rank - step) % world_size].min()]
        leaves = [shard_sequence(t, load_balance=load_balance).requires_grad_(True) for t in (q, k, v)]
        with record_ring_stats() as stats:
            out = context_parallel_attention(*leaves, mask_mod=causal_mask, load_balance=load_balance)
            out.sum().backward()
        assert stats.skipped_steps == [predicted], (load_balance, stats.skipped_steps, predicted)
        assert stats.forward_steps_skipped == stats.backward_steps_skipped == len(predicted)
        assert stats.forward_steps_computed == world_size - len(predicted)
        expected_skips = world_size * (world_size - 1) // 2 if load_balance == "none" else 0
        assert sum(work_report(causal_mask, SEQ_LEN, world_size, load_balance=load_balance).steps_skipped) \
            == expected_skips
        report = work_report(causal_mask, SEQ_LEN, world_size, load_balance=load_balance)
        assert stats.allowed_pairs == report.allowed_pairs[rank] * 2  # two heads
        # Deterministic for a fixed world size: a second backward pass gives the same bits.
        first = [leaf.grad.clone() for leaf in leaves]
        for leaf in leaves:
            leaf.grad = None
        context_parallel_attention(*leaves, mask_mod=causal_mask, load_balance=load_balance).sum().backward()
        assert all(torch.equal(a, leaf.grad) for a, leaf in zip(first, leaves))

    bad = torch.randn(1, 1, 2 * world_size * 8 + 2, 4)
    with pytest.raises(ValueError, match=r"not divisible by 2 x world size"):
        shard_sequence(bad, dim=2)
    odd = torch.randn(1, 1, 7, 4)
    with pytest.raises(ValueError, match=r"global sequence length .* not divisible by 2 x world size"):
        context_parallel_attention(odd, odd, odd, mask_mod=causal_mask)


def check_rank_that_attends_to_nothing(rank: int, world_size: int) -> None:
    """Queries in the second half of the sequence attend to nothing: with "none" balancing the
    ranks holding them skip every step and return 0 / -inf with zero gradients."""
    half = SEQ_LEN // 2

    def first_half_causal(b, h, q_idx, kv_idx):
        return (q_idx < half) & (q_idx >= kv_idx)

    q, k, v = random_qkv(1, 2, 2, SEQ_LEN, SEQ_LEN, 16, generator=torch.Generator().manual_seed(2))
    leaves = [shard_sequence(t, load_balance="none").requires_grad_(True) for t in (q, k, v)]
    with record_ring_stats() as stats:
        out, lse = context_parallel_attention(*leaves, mask_mod=first_half_causal, load_balance="none",
                                              return_lse=True)
        (out.sum() + torch.where(torch.isfinite(lse), lse, 0.0).sum()).backward()
    if rank >= world_size // 2:
        assert stats.forward_steps_computed == 0
        assert torch.equal(out, torch.zeros_like(out))
        assert torch.isneginf(lse).all()
        assert torch.equal(leaves[0].grad, torch.zeros_like(leaves[0]))
    else:
        assert torch.isfinite(lse).all()
    for leaf in leaves:
        assert torch.isfinite(leaf.grad).all()


def two_rank_cases(rank: int, world_size: int) -> None:
    for name in ("causal", "sliding_window", "document", "prefix_lm", "softcap"):
        for load_balance in ("none", "head_tail"):
            check_case(rank, world_size, name, load_balance)
    check_case(rank, world_size, "document", "per_document")
    check_case(rank, world_size, "causal", "head_tail", dtype=torch.bfloat16, kv_heads=4)
    check_balancing_and_errors(rank, world_size)
    check_learnable_score_mod(rank, world_size)
    check_interpreted_kernels(rank, world_size)


def four_rank_cases(rank: int, world_size: int) -> None:
    # Two ranks run every (mask, balance) pair; four ranks one balance per mask (both for causal),
    # so the file stays fast on a loaded 2-core machine.
    for name, load_balance in (("causal", "none"), ("causal", "head_tail"), ("sliding_window", "head_tail"),
                               ("document", "per_document"), ("prefix_lm", "none"), ("softcap", "head_tail")):
        check_case(rank, world_size, name, load_balance, kv_heads=1)
    check_balancing_and_errors(rank, world_size)
    check_rank_that_attends_to_nothing(rank, world_size)


def test_two_ranks_match_single_process_attention():
    run_ranks(two_rank_cases, 2)


def test_four_ranks_match_single_process_attention():
    run_ranks(four_rank_cases, 4)


def test_work_report_balances_causal_and_packed_documents():
    """On one process: head_tail evens causal work; the per-document balancer evens packed documents."""
    none = work_report(causal_mask, 256, 4, load_balance="none")
    head_tail = work_report(causal_mask, 256, 4, load_balance="head_tail")
    assert sum(none.allowed_pairs) == sum(head_tail.allowed_pairs) == 256 * 257 // 2
    assert none.steps_skipped == [3, 2, 1, 0] and head_tail.steps_skipped == [0, 0, 0, 0]
    assert head_tail.imbalance == 1.0 and none.imbalance > 1.7
    ids = torch.repeat_interleave(torch.arange(4), torch.tensor([100, 28, 60, 68]))
    documents = and_masks(causal_mask, document_mask(ids))
    per_document = work_report(documents, 256, 4, load_balance=PerDocumentBalancer(ids, granule=2))
    assert per_document.imbalance < 1.05 < work_report(documents, 256, 4, load_balance="head_tail").imbalance
    assert sum(per_document.allowed_pairs) == int(ta.create_mask(documents, 1, 1, 256, 256).sum())


def test_errors_without_process_group():
    x = torch.randn(1, 1, 8, 4)
    with pytest.raises(RuntimeError, match="init_process_group"):
        context_parallel_attention(x, x, x)
    with pytest.raises(ValueError, match="load_balance must be one of"):
        layout_positions("zigzag", 8, 2)
    with pytest.raises(ValueError, match="documents cover 10 tokens but the sequence has 8"):
        layout_positions(PerDocumentBalancer([4, 6]), 8, 2)


def test_per_document_balancer_deals_every_document_head_tail():
    generator = torch.Generator().manual_seed(5)
    for world_size in (1, 2, 3, 4):
        for _ in range(5):
            cuts = torch.randperm(383, generator=generator)[:6].sort().values + 1
            lengths = torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([384])])).tolist()
            seq_len = sum(lengths)
            for granule in (1, 8):
                balancer = PerDocumentBalancer(lengths, granule=granule)
                positions = layout_positions(balancer, seq_len, world_size)  # checks a permutation
                assert positions.shape == (world_size, seq_len // world_size)
                start = 0
                for length in lengths:  # each rank holds at least its two head-tail pieces of every document
                    held = ((positions >= start) & (positions < start + length)).sum(1)
                    assert int(held.min()) >= 2 * (length // (2 * world_size * granule) * granule)
                    start += length
                # Runs of consecutive positions start at local offsets that are multiples of the granule,
                # up to the leftover part at the end of each row.
                aligned = sum(2 * (n // (2 * world_size * granule) * granule) for n in lengths)
                breaks = (positions[:, 1:aligned] - positions[:, :aligned - 1] != 1).nonzero()[:, 1] + 1
                assert bool((breaks % granule == 0).all())
    with pytest.raises(ValueError, match=r"document ids \[L\]"):
        PerDocumentBalancer(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="positive document lengths"):
        PerDocumentBalancer([3, 0])
    with pytest.raises(ValueError, match="granule must be a positive int"):
        PerDocumentBalancer([3, 5], granule=0)


def test_step_plans_are_cached_by_captured_tensor_identity_not_values(monkeypatch):
    """A layer's call finds its rank's step masks without reading the mask's tensor values (a host copy on
    CUDA); writing new values into a captured tensor in place, or a new tensor, gives a new plan."""
    from triton_attn.distributed import plan as plans
    from triton_attn.masks import closure

    positions = layout_positions("head_tail", 128, 2)
    ids = torch.arange(128) // 40
    mask_mod = and_masks(causal_mask, document_mask(ids))
    first = plans.plan_steps(mask_mod, 1, 1, positions, 0, "head_tail", 32, "cpu")
    value_reads = []
    original = closure.mod_fingerprint
    monkeypatch.setattr(plans, "mod_fingerprint",
                        lambda fn, include_tensor_values=True: value_reads.append(include_tensor_values)
                        or original(fn, include_tensor_values))
    assert plans.plan_steps(mask_mod, 1, 1, positions, 0, "head_tail", 32, "cpu") is first
    assert not any(value_reads)

    ids.copy_(torch.arange(128) // 16)  # in place: same object, new version
    second = plans.plan_steps(mask_mod, 1, 1, positions, 0, "head_tail", 32, "cpu")
    assert second is not first
    for step, source in zip(second.masks, second.sources):
        want = ta.create_mask(mask_mod, 1, 1, 128, 128)[0, 0][positions[0]][:, positions[source]]
        got = ta.create_mask(step.mask_mod, 1, 1, 64, 64)[0, 0] if step is not None else torch.zeros_like(want)
        assert torch.equal(got, want)
