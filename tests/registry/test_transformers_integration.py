"""Real transformers models, built offline from tiny configs with random weights, on our implementation.

Each model's logits on real (non-padded) tokens must match transformers' own sdpa/eager within
float32 tolerance: with left padding, with packed sequences, and greedy generate() (KV cache, decode
steps with one query) must produce the same tokens. ``initializer_range`` is large so attention is far
from uniform and a wrong mask shows.
"""

from __future__ import annotations

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import triton_attn as ta  # noqa: E402
from triton_attn.masks import alibi_score, document_mask  # noqa: E402
from triton_attn.registry import (  # noqa: E402
    AttentionInterface,
    MissingMaskFunctionWarning,
    attention_functions,  # noqa: E402
    make_mask_function,
    register_attention,
    register_transformers,
)

HF_ATTENTION = transformers.AttentionInterface
HF_MASK = transformers.AttentionMaskInterface
VOCAB, SEQ = 128, 20
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, initializer_range=0.3, max_position_embeddings=128,
              pad_token_id=0, eos_token_id=None, bos_token_id=None)
ATOL = 2e-4  # float32 logits of magnitude ~3 after two layers; observed differences are ~1e-5


pytestmark = pytest.mark.usefixtures("transformers_registered")  # tests/registry/conftest.py


@pytest.fixture
def calls(monkeypatch):
    """Counts calls of triton_attn.attention made by our attention functions (proves they ran)."""
    count = {"n": 0}
    real = attention_functions.attention

    def counting(*args, **kwargs):
        count["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(attention_functions, "attention", counting)
    return count


def _config(kind: str):
    if kind == "llama":
        return transformers.LlamaConfig(**COMMON), transformers.LlamaForCausalLM, "sdpa"
    if kind == "mistral":
        return transformers.MistralConfig(**COMMON, sliding_window=6), transformers.MistralForCausalLM, "sdpa"
    if kind == "qwen2":
        config = transformers.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=6,
                                          layer_types=["sliding_attention", "full_attention"])
        return config, transformers.Qwen2ForCausalLM, "sdpa"
    if kind == "gemma2":
        config = transformers.Gemma2Config(**COMMON, sliding_window=6, attn_logit_softcapping=2.0,
                                           final_logit_softcapping=None, query_pre_attn_scalar=16)
        return config, transformers.Gemma2ForCausalLM, "eager"
    if kind == "gpt_oss":
        config = transformers.GptOssConfig(**COMMON, sliding_window=6, num_local_experts=2, num_experts_per_tok=1,
                                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        return config, transformers.GptOssForCausalLM, "eager"
    raise ValueError(kind)


MODELS = ["llama", "mistral", "qwen2", "gemma2", "gpt_oss"]


def _model(kind: str, implementation: str = "triton_attn"):
    config, cls, reference = _config(kind)
    torch.manual_seed(0)
    model = cls._from_config(config, attn_implementation=implementation).eval()
    if kind == "gpt_oss":  # sinks start at zero; make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_(0.0, 2.0)
    assert model.config._attn_implementation == implementation
    return model, reference


def _left_padded_batch():
    input_ids = torch.randint(1, VOCAB, (2, SEQ))
    attention_mask = torch.ones(2, SEQ, dtype=torch.long)
    attention_mask[0, :5] = 0
    input_ids[0, :5] = 0
    return input_ids, attention_mask


def _logits(model, implementation, **inputs):
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("kind", MODELS)
def test_left_padding_and_generate_match_reference(kind, calls):
    model, reference = _model(kind)
    input_ids, attention_mask = _left_padded_batch()
    ours = _logits(model, "triton_attn", input_ids=input_ids, attention_mask=attention_mask)
    assert calls["n"] == model.config.num_hidden_layers
    expected = _logits(model, reference, input_ids=input_ids, attention_mask=attention_mask)
    real = attention_mask.bool()
    torch.testing.assert_close(ours[real], expected[real], atol=ATOL, rtol=1e-4)

    generated = {}
    for implementation in ("triton_attn", reference):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            generated[implementation] = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=6,
                                                       do_sample=False, pad_token_id=0)
    assert calls["n"] == model.config.num_hidden_layers * 7  # prefill + 5 decode steps of one query each
    assert torch.equal(generated["triton_attn"], generated[reference])


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_generate_with_static_cache(kind):
    """A static cache: generate() prepares our BlockMask itself (q_offset as a tensor, kv_length the cache
    size) and hands it back to the model, whose mask creation must pass it through."""
    model, reference = _model(kind)
    input_ids, attention_mask = _left_padded_batch()
    generated = {}
    for implementation in ("triton_attn", reference):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            generated[implementation] = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=5,
                                                       do_sample=False, pad_token_id=0,
                                                       cache_implementation="static")
    assert torch.equal(generated["triton_attn"], generated[reference])


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma2", "gpt_oss"])
@pytest.mark.filterwarnings("error:.*cannot be traced")
def test_packed_sequences_match_separate_sequences(kind):
    """Position ids restarting inside a row: transformers detects packing; each document is independent."""
    model, reference = _model(kind)
    lengths = [7, 9, 4]
    input_ids = torch.randint(1, VOCAB, (1, sum(lengths)))
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    ours = _logits(model, "triton_attn", input_ids=input_ids, position_ids=position_ids, use_cache=False)
    expected = _logits(model, reference, input_ids=input_ids, position_ids=position_ids, use_cache=False)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=1e-4)
    if kind == "gpt_oss":
        return  # transformers' gpt-oss does not pass position_ids to its mask creation: no packing detected
    start = 0
    for n in lengths:  # the same as running each document alone
        alone = _logits(model, "triton_attn", input_ids=input_ids[:, start:start + n])
        torch.testing.assert_close(ours[:, start:start + n], alone, atol=ATOL, rtol=1e-4)
        start += n


def test_sliding_window_is_honoured():
    """Negative control: the Mistral window (6 < 20 tokens) changes the logits, and ours follow it."""
    model, _ = _model("mistral")
    input_ids, attention_mask = _left_padded_batch()
    windowed = _logits(model, "triton_attn", input_ids=input_ids, attention_mask=attention_mask)
    model.config.sliding_window = None
    full = _logits(model, "triton_attn", input_ids=input_ids, attention_mask=attention_mask)
    reference = _logits(model, "sdpa", input_ids=input_ids, attention_mask=attention_mask)
    real = attention_mask.bool()
    assert (windowed - full)[real].abs().max() > 1e-2
    torch.testing.assert_close(full[real], reference[real], atol=ATOL, rtol=1e-4)


@pytest.mark.filterwarnings("error:.*cannot be traced")
def test_our_mask_function_agrees_with_transformers_sdpa_mask():
    from transformers.masking_utils import (
        and_masks,
        causal_mask_function,
        packed_sequence_mask_function,
        sdpa_mask,
        sliding_window_causal_mask_function,
    )

    padding = torch.ones(2, 14, dtype=torch.bool)
    padding[0, :4] = False
    packed = torch.tensor([[0] * 5 + [1] * 9, [0] * 14])
    cases = [
        dict(q_length=14, kv_length=14, q_offset=0, kv_offset=0, mask_function=causal_mask_function),
        dict(q_length=1, kv_length=14, q_offset=13, kv_offset=0, mask_function=causal_mask_function),
        dict(q_length=3, kv_length=6, q_offset=11, kv_offset=8, mask_function=sliding_window_causal_mask_function(5)),
        dict(q_length=14, kv_length=14, q_offset=0, kv_offset=0,
             mask_function=and_masks(causal_mask_function, packed_sequence_mask_function(packed))),
    ]
    ours_fn = make_mask_function()
    for case in cases:
        expected = sdpa_mask(batch_size=2, attention_mask=padding, allow_is_causal_skip=False, **case)
        block_mask = ours_fn(batch_size=2, attention_mask=padding, **case)
        dense = ta.create_mask(block_mask.mask_mod, 2, 1, case["q_length"], case["kv_length"])
        assert torch.equal(dense, expected.expand_as(dense)), case


def test_transformers_combinators_become_traceable():
    """transformers' and_masks/or_masks (q_idx.new_ones, .to(device)) are rebuilt from ours, recursively,
    so the Triton backend can inline the pattern instead of falling back to bitmasks."""
    from transformers.masking_utils import (
        causal_mask_function,
        or_masks,
        padding_mask_function,
        remap_positions_for_packed_sequence,
        sliding_window_causal_mask_function,
    )

    from triton_attn.registry.masking import traceable

    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3]])
    padding = torch.ones(1, 7, dtype=torch.bool)
    for fn in (sliding_window_causal_mask_function(3),
               or_masks(causal_mask_function, padding_mask_function(padding)),
               remap_positions_for_packed_sequence(sliding_window_causal_mask_function(2), positions)):
        rebuilt = traceable(fn)
        assert rebuilt is not fn
        expected = ta.create_mask(fn, 1, 1, 7, 7)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*cannot be traced")
            block_mask = ta.create_block_mask(rebuilt, 1, 1, 7, 7, BLOCK_SIZE=4)
        assert torch.equal(ta.create_mask(block_mask.mask_mod, 1, 1, 7, 7), expected)
    assert traceable(causal_mask_function) is causal_mask_function


def test_user_mask_mod_and_score_mod_in_a_model():
    """register_attention with a document mask_mod (AND the model's causal mask) and an ALiBi score_mod:
    equal to eager with the equivalent 4-D additive mask, which transformers passes through as-is."""
    config, cls, _ = _config("llama")
    torch.manual_seed(0)
    model = cls._from_config(config, attn_implementation="eager").eval()
    doc_ids = torch.tensor([[0] * 8 + [1] * 8])
    registered = register_attention("doc_alibi", mask_mod=document_mask(doc_ids), score_mod=alibi_score(4))
    assert registered.in_transformers and "doc_alibi" in HF_MASK._global_mapping
    input_ids = torch.randint(1, VOCAB, (1, 16))
    ours = _logits(model, "doc_alibi", input_ids=input_ids)

    q, kv = torch.arange(16).view(-1, 1), torch.arange(16).view(1, -1)
    allowed = (kv <= q) & (doc_ids[0].view(-1, 1) == doc_ids[0].view(1, -1))
    slopes = torch.tensor([2 ** (-8 * (h + 1) / 4) for h in range(4)]).view(1, 4, 1, 1)
    bias = (slopes * (kv - q)).masked_fill(~allowed, torch.finfo(torch.float32).min)
    expected = _logits(model, "eager", input_ids=input_ids, attention_mask=bias)
    torch.testing.assert_close(ours, expected, atol=ATOL, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning")
def test_cached_decode_equals_full_forward_with_score_mod():
    """A score_mod over absolute positions must see the same positions during decode as in a full forward."""
    config, cls, _ = _config("llama")
    torch.manual_seed(0)
    model = cls._from_config(config, attn_implementation="eager").eval()
    register_attention("alibi_causal", score_mod=alibi_score(4))
    model.set_attn_implementation("alibi_causal")
    input_ids = torch.randint(1, VOCAB, (1, 13))
    with torch.no_grad():
        full = model(input_ids).logits[:, -1]
        prefill = model(input_ids[:, :12], use_cache=True)
        step = model(input_ids[:, 12:], past_key_values=prefill.past_key_values, use_cache=True).logits[:, -1]
    torch.testing.assert_close(step, full, atol=ATOL, rtol=1e-4)


def test_llava_per_backbone_dict(calls):
    text = transformers.LlamaConfig(**COMMON)
    vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=16, patch_size=4, initializer_range=0.3)
    config = transformers.LlavaConfig(text_config=text, vision_config=vision, image_token_index=VOCAB - 1,
                                      vision_feature_layer=-1, initializer_range=0.3)
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration._from_config(
        config, attn_implementation={"text_config": "triton_attn", "vision_config": "sdpa", "": "sdpa"}).eval()
    assert model.config.text_config._attn_implementation == "triton_attn"
    assert model.config.vision_config._attn_implementation == "sdpa"
    assert model.model.language_model.config._attn_implementation == "triton_attn"

    patches = (16 // 4) ** 2
    input_ids = torch.randint(1, VOCAB - 1, (2, patches + 8))
    input_ids[:, 2:2 + patches] = VOCAB - 1
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=torch.randn(2, 3, 16, 16))
    with torch.no_grad():
        text_only = model(**inputs).logits
    assert calls["n"] == 2  # the two text layers; the vision tower ran sdpa
    model.set_attn_implementation({"vision_config": "triton_attn"})
    assert model.config.vision_config._attn_implementation == "triton_attn"
    assert model.config.text_config._attn_implementation == "triton_attn"
    with torch.no_grad():
        both = model(**inputs).logits
    assert calls["n"] == 2 + 4
    expected = _logits(model, "sdpa", **inputs)
    assert model.config.text_config._attn_implementation == "sdpa"
    real = attention_mask.bool()
    torch.testing.assert_close(text_only[real], expected[real], atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(both[real], expected[real], atol=ATOL, rtol=1e-4)


def test_gpt_oss_training_gradients_match_eager():
    """Backward through sinks and sliding windows: gradients equal eager's."""
    model, _ = _model("gpt_oss")
    model.train()
    input_ids = torch.randint(1, VOCAB, (2, 12))
    grads = {}
    for implementation in ("triton_attn", "eager"):
        model.set_attn_implementation(implementation)
        model.zero_grad()
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        attention = model.model.layers[0].self_attn
        grads[implementation] = [attention.sinks.grad.clone(), attention.q_proj.weight.grad.clone()]
    for ours, expected in zip(grads["triton_attn"], grads["eager"]):
        torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-3)


def test_from_pretrained_with_attn_implementation(tmp_path, calls):
    model, _ = _model("llama", "sdpa")
    model.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="triton_attn").eval()
    assert loaded.config._attn_implementation == "triton_attn"
    input_ids, attention_mask = _left_padded_batch()
    with torch.no_grad():
        ours = loaded(input_ids=input_ids, attention_mask=attention_mask).logits
        expected = model(input_ids=input_ids, attention_mask=attention_mask).logits
    assert calls["n"] == 2
    real = attention_mask.bool()
    torch.testing.assert_close(ours[real], expected[real], atol=ATOL, rtol=1e-4)


def test_dropout_applies_in_training_only():
    """Attention dropout runs while training (its statistics: tests/registry/test_model_dropout.py)."""
    config, cls, _ = _config("llama")
    config.attention_dropout = 0.5
    model = cls._from_config(config, attn_implementation="triton_attn").train()
    input_ids = torch.randint(1, VOCAB, (1, 8))
    with torch.no_grad():
        trained = model(input_ids=input_ids).logits
        model.eval()
        evaluated = [model(input_ids=input_ids).logits for _ in range(2)]
    torch.testing.assert_close(evaluated[0], evaluated[1], atol=0, rtol=0)
    assert (trained - evaluated[0]).abs().max() > 1e-3


def test_new_kwargs_reach_the_attention_function():
    seen = []

    def spy(module, query, key, value, attention_mask, my_flag=None, **kwargs):
        seen.append((my_flag, type(attention_mask).__name__, kwargs.get("scaling")))
        return attention_functions.make_attention_function()(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("spy", spy, mask_function=make_mask_function())
    register_transformers("spy")
    assert "spy" in HF_ATTENTION._global_mapping and "spy" in HF_MASK._global_mapping
    model, _ = _model("llama", "spy")
    with torch.no_grad():
        model(input_ids=torch.randint(1, VOCAB, (1, 8)), my_flag="hello")
    assert seen == [("hello", "ModelBlockMask", 0.25)] * 2


def test_registration_errors_and_warnings():
    def lonely(module, query, key, value, attention_mask, **kwargs):
        return query.transpose(1, 2), None

    with pytest.warns(MissingMaskFunctionWarning):
        AttentionInterface.register("lonely", lonely)
    with pytest.warns(MissingMaskFunctionWarning, match="attention_mask=None"):
        register_transformers("lonely")
    assert "lonely" in HF_ATTENTION._global_mapping and "lonely" not in HF_MASK._global_mapping
    with pytest.raises(KeyError, match="not registered"):
        register_transformers("never_registered")
    with pytest.raises(ValueError, match="transformers' own"):
        register_transformers("sdpa")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        register_attention("quiet", transformers=True)
    assert "quiet" in HF_ATTENTION._global_mapping and "quiet" in HF_MASK._global_mapping
