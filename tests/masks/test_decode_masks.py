"""Closed-form layouts of the model mask families (masks/closed_form.py) and the decode-step mask path."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import triton_attn as ta
from triton_attn.masks import and_masks, causal_mask, document_mask, padding_mask, sliding_window_mask
from triton_attn.masks.closed_form import window_block_mask


def _family_mask_mod(causal, window, padding, ids, q_offset, kv_offset):
    """The same family as an ordinary mask_mod over local indices, for the general compiler."""
    parts = []
    if window is not None:
        parts.append(sliding_window_mask(window))
    elif causal:
        parts.append(causal_mask)
    if padding is not None:
        parts.append(padding_mask(padding))
    if ids is not None:
        parts.append(document_mask(ids))
    pattern = and_masks(*parts) if parts else (lambda b, h, q_idx, kv_idx: kv_idx >= 0)

    def local(b, h, q_idx, kv_idx):
        return pattern(b, h, q_idx + q_offset, kv_idx + kv_offset)

    return local


def _assert_same_layout(closed, general):
    torch.testing.assert_close(closed.partial_blocks().expand_as(general.partial_blocks()), general.partial_blocks())
    torch.testing.assert_close(closed.full_blocks().expand_as(general.full_blocks()), general.full_blocks())


@settings(max_examples=40, deadline=None)
@given(data=st.data(), q_length=st.integers(1, 70), kv_length=st.integers(1, 150), block=st.sampled_from([8, 16, 32]),
       family=st.sampled_from(["causal", "window", "full"]), padded=st.booleans(), docs=st.booleans(),
       batch=st.integers(1, 3))
def test_closed_form_equals_general_compiler(data, q_length, kv_length, block, family, padded, docs, batch):
    kv_offset = data.draw(st.integers(0, 40), label="kv_offset")
    q_offset = data.draw(st.integers(0, kv_offset + kv_length), label="q_offset")
    window = data.draw(st.integers(1, 60), label="window") if family == "window" else None
    total = max(q_offset + q_length, kv_offset + kv_length)
    padding = ids = None
    if padded:  # left padding of random lengths plus a few random holes
        starts = torch.tensor(data.draw(st.lists(st.integers(0, total), min_size=batch, max_size=batch), label="pads"))
        padding = torch.arange(total).view(1, -1) >= starts.view(-1, 1)
        padding &= torch.rand(batch, total) > 0.1
    if docs:  # packed documents: non-decreasing ids
        ids = torch.cumsum(torch.rand(batch, total) < 0.08, dim=1)
    mod = _family_mask_mod(family != "full", window, padding, ids, q_offset, kv_offset)
    closed = window_block_mask(mod, batch, q_length, kv_length, q_offset=q_offset, kv_offset=kv_offset,
                               causal=family != "full", window=window, padding=padding, document_ids=ids,
                               BLOCK_SIZE=block)
    general = ta.create_block_mask(mod, batch, None, q_length, kv_length, BLOCK_SIZE=block)
    _assert_same_layout(closed, general)
    # The row maxima agree (block counts are per stored (b, h): the closed form stores one batch entry
    # when nothing depends on the batch, the compiler B of them).
    per_row = lambda plan: dataclasses.replace(plan, computed_blocks=-1)  # noqa: E731
    assert per_row(closed.launch_plan) == per_row(general.launch_plan)
    assert closed.sparsity() == pytest.approx(general.sparsity())


def test_closed_form_accepts_tensor_offsets():
    """A static cache hands its position over as a 0-d tensor: the layout is built without reading it."""
    mod = _family_mask_mod(True, None, None, None, 300, 0)
    as_int = window_block_mask(mod, 1, 1, 512, q_offset=300, BLOCK_SIZE=64)
    as_tensor = window_block_mask(mod, 1, 1, 512, q_offset=torch.tensor(300), BLOCK_SIZE=64)
    _assert_same_layout(as_int, as_tensor)


def _decode_step_mask(batch=2, cache=4096, position=4095, pad=100):
    """What a model's mask function returns for one decode step: 1 query row against a static cache."""
    from triton_attn.registry.masking import make_mask_function

    attention_mask = torch.ones(batch, cache, dtype=torch.long)
    attention_mask[0, :pad] = 0
    return make_mask_function()(batch, 1, cache, position, 0, None, attention_mask)


def test_decode_step_mask_defers_its_block_lists_on_cpu():
    """A CPU decode step's mask builds no index lists: the CPU path evaluates its mask_mod densely
    (exact layout), so attention runs and the mask is still unbuilt; built later, the lists equal the
    general compiler's. (Its cost per step: bench/bench_generate.py.)"""
    block_mask = _decode_step_mask(cache=300, position=290, pad=37)
    assert block_mask.is_deferred() and block_mask.exact_layout
    assert block_mask.shape == (2, 1, 1, 300) and block_mask.num_blocks == (1, 3)
    assert block_mask.device == torch.device("cpu") and block_mask.is_trusted()
    assert block_mask.validate() is block_mask and block_mask.is_deferred()
    q, k, v = (torch.randn(2, heads, length, 32) for heads, length in ((4, 1), (2, 300), (2, 300)))
    with torch.no_grad():
        out = ta.attention(q, k, v, block_mask=block_mask, enable_gqa=True)
    assert block_mask.is_deferred()
    general = ta.create_block_mask(block_mask.mask_mod, 2, None, 1, 300)
    with torch.no_grad():
        torch.testing.assert_close(out, ta.attention(q, k, v, block_mask=general, enable_gqa=True))
    _assert_same_layout(block_mask, general)  # reads the lists: built now
    assert not block_mask.is_deferred() and block_mask.is_trusted()


def test_decode_step_mask_on_a_4k_cache_equals_the_general_compiler():
    block_mask = _decode_step_mask()
    _assert_same_layout(block_mask, ta.create_block_mask(block_mask.mask_mod, 2, None, 1, 4096))


def test_deferred_closed_form_mask_checks_batch_sizes_when_made():
    with pytest.raises(ValueError, match="padding / document_ids have batch size 3; expected 1 or batch=2"):
        window_block_mask(causal_mask, 2, 1, 64, q_offset=63, padding=torch.ones(3, 64, dtype=torch.bool),
                          BLOCK_SIZE=16)


def test_closed_form_masks_are_built_at_once_where_a_launch_needs_them():
    """Only CPU masks outside torch.compile wait: a CUDA launch (perhaps captured in a CUDA graph) needs
    the lists before it runs."""
    cpu = window_block_mask(causal_mask, 1, 1, 64, q_offset=63, BLOCK_SIZE=16)
    meta = window_block_mask(causal_mask, 1, 1, 64, q_offset=63, BLOCK_SIZE=16, device="meta")
    assert cpu.is_deferred() and not meta.is_deferred()
    assert meta.kv_indices.shape == cpu.kv_indices.shape


def test_model_mask_mods_are_traced_once_per_structure(monkeypatch):
    """A model builds a new mask_mod object every decode step; its graph is traced once per structure
    and bound to each step's own tensors (offsets, padding, a registered mod's captured ids)."""
    from triton_attn.masks import tracing
    from triton_attn.registry.masking import ModelMaskMod

    calls = []
    original = tracing._trace_now
    monkeypatch.setattr(tracing, "_trace_now", lambda *a: calls.append(a) or original(*a))
    ids = torch.arange(96) // 30
    user = document_mask(ids)
    user_tensors = tuple(tracing.trace_mask_mod(user).captured)
    calls.clear()
    for position, padded_to in ((40, 3), (41, 17), (77, 0)):
        padding = torch.arange(96).view(1, -1) >= torch.tensor([padded_to, 5]).view(-1, 1)
        mod = ModelMaskMod((True, 24), torch.tensor(position), torch.tensor(0), padding, user_mod=user,
                           user_tensors=user_tensors)
        traced = tracing.trace_mask_mod(mod)
        assert traced.captured[:1] != [] and all(any(t is own for own in mod.tensors()) for t in traced.captured)
        block_mask = ta.create_block_mask(mod, 2, None, 3, 96, BLOCK_SIZE=16)  # from the bound graph
        calls_before = len(calls)
        fresh = ta.create_block_mask(lambda b, h, q_idx, kv_idx: mod(b, h, q_idx, kv_idx), 2, None, 3, 96,
                                     BLOCK_SIZE=16)  # a plain closure: traced anew
        del calls[calls_before:]
        _assert_same_layout(block_mask, fresh)
    assert len(calls) == 1, [getattr(args[0], "__name__", args[0]) for args in calls]
