"""Packed sequences in one row run as varlen attention (triton_attn/registry/packed.py).

transformers describes a packed batch ``[1, L]`` by ``position_ids`` restarting at every sequence (then its mask
creation asks our mask function for the pattern within each sequence) or by FlashAttention's keywords
``cu_seq_lens_q/k`` and ``max_length_q/k`` (``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``).
Our attention function must then run ``flash_attn_varlen_func`` -- no ``[L, L]`` mask built anywhere -- with the
result of running every sequence alone; and keep the mask path wherever varlen would not be exactly that.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers.masking_utils import and_masks as hf_and_masks  # noqa: E402
from transformers.masking_utils import (  # noqa: E402
    bidirectional_mask_function,
    causal_mask_function,
    find_packed_sequence_indices,
    packed_sequence_mask_function,
    remap_positions_for_packed_sequence,
    sliding_window_causal_mask_function,
)

import triton_attn.masks.closed_form as closed_form  # noqa: E402
from tests.helpers.numerics import assert_matches_golden  # noqa: E402
from triton_attn import create_block_mask, create_mask  # noqa: E402
from triton_attn.masks import and_masks, causal_mask, document_mask, sliding_window_mask, softcap_score  # noqa: E402
from triton_attn.registry import (  # noqa: E402
    attention_functions,
    make_attention_function,
    make_mask_function,
    masking,
    packed,
)

pytestmark = pytest.mark.usefixtures("transformers_registered")  # tests/registry/conftest.py

VOCAB = 128
LENGTHS = [5, 23, 60, 11]  # packed row of 99 tokens
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, initializer_range=0.3, max_position_embeddings=128,
              pad_token_id=0, eos_token_id=None, bos_token_id=None)
ATOL = 2e-4  # float32 logits of magnitude ~3 after two layers; observed differences are ~1e-5


class Module(torch.nn.Module):
    def __init__(self, groups: int = 2, is_causal: bool = True):
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, is_causal


@pytest.fixture
def spies(monkeypatch):
    """Records varlen calls, sequence derivations (device reads) and every mask build that could be [L, L]."""
    record = {"varlen": [], "derived": 0, "mask_builds": []}
    real_varlen, real_derive = packed.flash_attn_varlen_func, packed._derive_boundaries

    def varlen(*args, **kwargs):
        record["varlen"].append(kwargs)
        return real_varlen(*args, **kwargs)

    def derive(positions):
        record["derived"] += 1
        return real_derive(positions)

    def mask_builder(name, real):
        def build(*args, **kwargs):
            record["mask_builds"].append((name, args[1:5]))
            return real(*args, **kwargs)
        return build

    monkeypatch.setattr(packed, "flash_attn_varlen_func", varlen)
    monkeypatch.setattr(packed, "_derive_boundaries", derive)
    for module, name in ((masking, "create_block_mask"), (masking, "create_mask"),
                         (attention_functions, "create_block_mask"), (closed_form, "window_block_maps")):
        monkeypatch.setattr(module, name, mask_builder(f"{module.__name__}.{name}", getattr(module, name)))
    return record


def _positions(lengths) -> torch.Tensor:
    return torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)


def _cu(lengths) -> torch.Tensor:
    return torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)


def _hf_packed_pattern(pattern, positions):
    """transformers' packed-sequence mask_function, as create_causal_mask builds it."""
    ids = find_packed_sequence_indices(positions)
    return hf_and_masks(remap_positions_for_packed_sequence(pattern, positions), packed_sequence_mask_function(ids))


def _packed_mask_mod(lengths, causal=True, window=None):
    """Each sequence alone: the pattern (causal, causal window, bidirectional window |q - kv| < window, or
    everything) within the document of every token."""
    ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    documents = document_mask(ids)
    if causal:
        return and_masks(causal_mask if window is None else sliding_window_mask(window), documents)
    if window is None:
        return documents

    def bidirectional_window(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() < window

    return and_masks(bidirectional_window, documents)


# -- the mask function and the attention function ---------------------------------------------------------
@pytest.mark.parametrize("pattern, causal, window", [(causal_mask_function, True, None),
                                                     (sliding_window_causal_mask_function(7), True, 7),
                                                     (bidirectional_mask_function, False, None)])
def test_mask_function_recognises_packed_sequences(pattern, causal, window, spies):
    positions = _positions(LENGTHS)
    length = positions.shape[1]
    mask = make_mask_function()(1, length, length, mask_function=_hf_packed_pattern(pattern, positions))
    packing = mask.packed_sequences
    assert (packing.causal, packing.window) == (causal, window)
    assert mask.is_deferred() and not spies["mask_builds"]  # closed form, nothing built on CPU
    expected = _packed_mask_mod(LENGTHS, causal, window)
    assert torch.equal(create_mask(mask.mask_mod, 1, None, length, length),
                       create_mask(expected, 1, None, length, length))
    # Its block layout (built on first read) is the general compiler's.
    general = create_block_mask(expected, 1, None, length, length, BLOCK_SIZE=16)
    small = make_mask_function(block_size=16)(1, length, length, mask_function=_hf_packed_pattern(pattern, positions))
    assert torch.equal(small.to_dense(), general.to_dense())


@pytest.mark.parametrize("source, causal, window, softcap", [
    ("mask", True, None, None), ("mask", True, 9, 3.0), ("mask", False, None, 3.0),
    ("position_ids", True, None, None), ("position_ids", False, 5, 3.0),
    ("keywords", True, 9, 3.0), ("keywords", False, None, None)])
def test_attention_function_runs_packed_sequences_as_varlen(source, causal, window, softcap, spies):
    """The packed call against the float64 golden result of each sequence alone (document mask), gradients too.
    With a mask the pattern is the mask's; without, the module's flags (``is_causal``, ``sliding_window``)."""
    lengths, scale = [7, 30, 1, 19], 0.3
    positions, length = _positions(lengths), sum(lengths)
    q = torch.randn(1, 4, length, 16) * 2
    k, v = torch.randn(1, 2, length, 16) * 2, torch.randn(1, 2, length, 16)
    keywords = {}
    if source == "mask":
        if causal:
            pattern = causal_mask_function if window is None else sliding_window_causal_mask_function(window)
        else:
            pattern = bidirectional_mask_function
        mask = make_mask_function()(1, length, length, mask_function=_hf_packed_pattern(pattern, positions))
        keywords["position_ids"] = positions
    else:
        mask = None
        if source == "position_ids":
            keywords["position_ids"] = positions
        else:
            keywords = dict(cu_seq_lens_q=_cu(lengths), cu_seq_lens_k=_cu(lengths), max_length_q=max(lengths),
                            max_length_k=torch.tensor(max(lengths)))
    fn = make_attention_function()

    def candidate(q_, k_, v_):
        out, _ = fn(Module(is_causal=causal), q_, k_, v_, mask, scaling=scale, sliding_window=window,
                    softcap=softcap, **keywords)
        assert out.shape == (1, length, 4, 16) and out.is_contiguous()
        return out.transpose(1, 2)

    assert_matches_golden(candidate, q, k, v, mask_mod=_packed_mask_mod(lengths, causal, window),
                          score_mod=None if softcap is None else softcap_score(softcap), scale=scale)
    assert len(spies["varlen"]) == 1
    reach = -1 if window is None else window - 1  # our window includes the current token
    call = spies["varlen"][0]
    assert call["window_size"] == (reach, 0 if causal else reach) and call["causal"] is causal
    assert spies["derived"] == (0 if source == "keywords" else 1)  # remembered per positions tensor
    assert not [build for build in spies["mask_builds"] if length in build[1]]


def test_packed_varlen_on_the_interpret_backend(spies):
    """The Triton kernels (interpreted) over the varlen layout, forward and backward, from a packed sliding mask."""
    lengths, window = [9, 40, 3, 21], 6
    positions, length = _positions(lengths), sum(lengths)
    q, k, v = torch.randn(1, 4, length, 16) * 2, torch.randn(1, 2, length, 16) * 2, torch.randn(1, 2, length, 16)
    pattern = _hf_packed_pattern(sliding_window_causal_mask_function(window), positions)
    mask = make_mask_function()(1, length, length, mask_function=pattern)
    fn = make_attention_function(backend="interpret")
    assert_matches_golden(lambda q_, k_, v_: fn(Module(), q_, k_, v_, mask, softcap=2.0)[0].transpose(1, 2), q, k, v,
                          mask_mod=_packed_mask_mod(lengths, True, window), score_mod=softcap_score(2.0))
    assert [call["backend"] for call in spies["varlen"]] == ["interpret"]
    assert not [build for build in spies["mask_builds"] if length in build[1]]


def test_calls_that_varlen_would_change_keep_the_mask_path(spies):
    lengths = [6, 10, 4]
    positions, length = _positions(lengths), sum(lengths)
    q, k, v = torch.randn(1, 4, length, 16), torch.randn(1, 2, length, 16), torch.randn(1, 2, length, 16)
    mask_function = make_mask_function()
    packed_mask = mask_function(1, length, length, mask_function=_hf_packed_pattern(causal_mask_function, positions))
    plain_mask = mask_function(1, length, length, mask_function=causal_mask_function)
    fn = make_attention_function()
    keywords = dict(cu_seq_lens_q=_cu(lengths), cu_seq_lens_k=_cu(lengths), max_length_q=10, max_length_k=10)
    # A plain causal mask is what the model asked for (sdpa follows it too): the keywords do not override it.
    out, _ = fn(Module(), q, k, v, plain_mask, **keywords)
    assert not spies["varlen"]
    expected = create_mask(causal_mask, 1, None, length, length)
    torch.testing.assert_close(out, attention_functions.eager_attention_function(
        Module(), q, k, v, expected)[0], atol=1e-5, rtol=1e-5)
    # Sinks and position biases are not part of varlen attention: the packed mask runs as a mask.
    for extra in ({"s_aux": torch.randn(4)}, {"position_bias": torch.randn(1, 4, length, length)}):
        fn(Module(), q, k, v, packed_mask, position_ids=positions, **extra)
    assert not spies["varlen"]
    # float64 stays on the mask path as well (FlashAttention takes 16-bit and float32 only).
    fn(Module(), q.double(), k.double(), v.double(), packed_mask, position_ids=positions)
    assert not spies["varlen"]
    # One sequence (position_ids not restarting) and no mask: the plain pattern, no varlen call.
    fn(Module(), q, k, v, None, position_ids=torch.arange(length).unsqueeze(0))
    assert not spies["varlen"]


def test_keywords_that_disagree_with_position_ids_are_an_error():
    lengths = [6, 10, 4]
    positions, length = _positions(lengths), sum(lengths)
    q, k, v = torch.randn(1, 4, length, 16), torch.randn(1, 2, length, 16), torch.randn(1, 2, length, 16)
    mask = make_mask_function()(1, length, length, mask_function=_hf_packed_pattern(causal_mask_function, positions))
    wrong = _cu([6, 8, 6])
    with pytest.raises(ValueError, match="cu_seq_lens_q .* does not describe the packed sequences"):
        make_attention_function()(Module(), q, k, v, mask, cu_seq_lens_q=wrong, cu_seq_lens_k=wrong, max_length_q=8,
                                  max_length_k=8)
    with pytest.raises(ValueError, match="cu_seq_lens_k must be an int32 tensor"):
        make_attention_function()(Module(), q, k, v, None, cu_seq_lens_q=_cu(lengths), cu_seq_lens_k=[0, 20],
                                  max_length_q=10, max_length_k=10)


# -- real transformers models ------------------------------------------------------------------------------
def _model(kind: str):
    if kind == "llama":
        config, cls, reference = transformers.LlamaConfig(**COMMON), transformers.LlamaForCausalLM, "sdpa"
    elif kind == "qwen2":  # a sliding-window layer and a full one: two masks per forward
        config = transformers.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=6,
                                          layer_types=["sliding_attention", "full_attention"])
        cls, reference = transformers.Qwen2ForCausalLM, "sdpa"
    else:  # gemma2: logit softcapping, query_pre_attn_scalar scaling, sliding and full layers
        config = transformers.Gemma2Config(**COMMON, sliding_window=6, attn_logit_softcapping=2.0,
                                           final_logit_softcapping=None, query_pre_attn_scalar=16)
        cls, reference = transformers.Gemma2ForCausalLM, "eager"
    torch.manual_seed(0)
    return cls._from_config(config, attn_implementation="triton_attn").eval(), reference


def _packed_batch(with_flash_keywords: bool):
    """A [1, 99] row of four sequences from transformers' own collator (position_ids restarting at 0)."""
    features = [{"input_ids": torch.randint(1, VOCAB, (n,)).tolist()} for n in LENGTHS]
    batch = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=with_flash_keywords,
                                                    return_tensors="pt")(features)
    batch.pop("labels")
    if with_flash_keywords:
        assert batch["cu_seq_lens_q"].tolist() == _cu(LENGTHS).tolist() and batch["max_length_q"] == 60
    return dict(batch)


def _each_sequence_alone(model, reference, input_ids):
    model.set_attn_implementation(reference)
    start, logits = 0, []
    with torch.no_grad():
        for n in LENGTHS:
            logits.append(model(input_ids=input_ids[:, start:start + n], use_cache=False).logits)
            start += n
    model.set_attn_implementation("triton_attn")
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma2"])
@pytest.mark.parametrize("with_flash_keywords", [False, True], ids=["position_ids", "flash_keywords"])
def test_packed_model_logits_equal_each_sequence_alone(kind, with_flash_keywords, spies):
    model, reference = _model(kind)
    batch = _packed_batch(with_flash_keywords)
    length = batch["input_ids"].shape[1]
    expected = _each_sequence_alone(model, reference, batch["input_ids"])
    with torch.no_grad():
        ours = model(**batch, use_cache=False).logits
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=1e-4)
    layers = model.config.num_hidden_layers
    assert len(spies["varlen"]) == layers  # every layer ran varlen attention
    assert all(call["dropout_p"] == 0.0 for call in spies["varlen"])
    assert not [build for build in spies["mask_builds"] if length in build[1]]  # no [L, L] mask anywhere
    assert spies["derived"] == 1  # one device read per forward, even with two masks (on CPU also the check)


def test_packed_training_gradients_and_dropout(spies):
    """Training on a packed row: parameter gradients equal those of the sequences run alone (sdpa), and the
    attention dropout probability reaches the varlen call."""
    model, _ = _model("llama")
    batch = _packed_batch(with_flash_keywords=False)
    weights = torch.randn(1, batch["input_ids"].shape[1], VOCAB)
    model.train()
    (model(**batch, use_cache=False).logits * weights).sum().backward()
    ours = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    model.set_attn_implementation("sdpa")
    start = 0
    for n in LENGTHS:
        logits = model(input_ids=batch["input_ids"][:, start:start + n], use_cache=False).logits
        (logits * weights[:, start:start + n]).sum().backward()
        start += n
    for name, p in model.named_parameters():
        torch.testing.assert_close(ours[name], p.grad, atol=1e-3, rtol=1e-3, msg=name)
    model.set_attn_implementation("triton_attn")
    model.config.attention_dropout = 0.25
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.25
    spies["varlen"].clear()
    model(**batch, use_cache=False)
    assert [call["dropout_p"] for call in spies["varlen"]] == [0.25] * model.config.num_hidden_layers
