"""Our own models (``triton_attn.models``): the Attention module, the reference decoder and the
vision-language model, all dispatching through the registries (no transformers needed)."""

from __future__ import annotations

import pytest
import torch

from triton_attn.models import (
    KVCache,
    ModelConfig,
    ReferenceDecoder,
    ReferenceVisionLanguageModel,
    VisionLanguageConfig,
)
from triton_attn.registry import (
    ALL_ATTENTION_FUNCTIONS,
    AttentionInterface,
    AttentionMaskInterface,
    MissingMaskFunctionWarning,
    ModelBlockMask,
)

ATOL = 1e-4


pytestmark = pytest.mark.usefixtures("restore_registries")


def _config(**kwargs):
    defaults = dict(initializer_range=0.3, num_kv_heads=2)
    defaults.update(kwargs)
    return ModelConfig(**defaults)


CONFIGS = {
    "gqa": dict(),
    "mixed_sliding": dict(sliding_window=5, layer_types=["sliding_attention", "full_attention"]),
    "softcap_sinks": dict(sliding_window=5, softcap=2.0, attention_sinks=True),
}


def _left_padded(batch=2, length=20):
    input_ids = torch.randint(0, 128, (batch, length))
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[0, :6] = 0
    return input_ids, attention_mask


def _logits(model, implementation, *args, **kwargs):
    model.set_attn_implementation(implementation)
    with torch.no_grad():
        return model(*args, **kwargs).logits


class Spy:
    """An attention function that records its calls and delegates to a registered one."""

    def __init__(self, target="triton_attn"):
        self.target, self.calls = target, []

    def __call__(self, module, query, key, value, attention_mask, **kwargs):
        self.calls.append(dict(layer=getattr(module, "layer_idx", None), q_len=query.shape[2], kv_len=key.shape[2],
                               mask=attention_mask, kwargs=kwargs))
        # The tests' marker keywords stop here: triton_attn refuses keywords it does not know.
        forwarded = {name: v for name, v in kwargs.items() if name not in ("my_new_kwarg", "extra_flag")}
        return ALL_ATTENTION_FUNCTIONS[self.target](module, query, key, value, attention_mask, **forwarded)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_decoder_matches_eager_with_left_padding_and_generate(name):
    model = ReferenceDecoder(_config(**CONFIGS[name])).eval()
    input_ids, attention_mask = _left_padded()
    ours = _logits(model, "triton_attn", input_ids, attention_mask=attention_mask)
    eager = _logits(model, "eager", input_ids, attention_mask=attention_mask)
    real = attention_mask.bool()
    torch.testing.assert_close(ours[real], eager[real], atol=ATOL, rtol=1e-4)
    tokens = {}
    for implementation in ("triton_attn", "eager"):
        model.set_attn_implementation(implementation)
        tokens[implementation] = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=6)
    assert torch.equal(tokens["triton_attn"], tokens["eager"])


def test_sdpa_reference_matches_eager():
    model = ReferenceDecoder(_config(**CONFIGS["mixed_sliding"])).eval()
    input_ids, attention_mask = _left_padded()
    real = attention_mask.bool()
    torch.testing.assert_close(_logits(model, "sdpa", input_ids, attention_mask=attention_mask)[real],
                               _logits(model, "eager", input_ids, attention_mask=attention_mask)[real],
                               atol=ATOL, rtol=1e-4)


def test_sliding_window_matters():
    """Negative control: the window changes the result, so the comparisons above can fail."""
    config = _config(**CONFIGS["mixed_sliding"])
    model = ReferenceDecoder(config).eval()
    input_ids = torch.randint(0, 128, (1, 20))
    windowed = _logits(model, "triton_attn", input_ids)
    config.sliding_window = 100
    assert (windowed - _logits(model, "triton_attn", input_ids)).abs().max() > 1e-2


def test_decode_steps_equal_full_forward():
    model = ReferenceDecoder(_config(**CONFIGS["softcap_sinks"])).eval()
    input_ids, attention_mask = _left_padded(length=14)
    with torch.no_grad():
        full = model(input_ids, attention_mask=attention_mask).logits
        cache = KVCache()
        model(input_ids[:, :10], attention_mask=attention_mask[:, :10], cache=cache)
        for step in range(10, 14):
            out = model(input_ids[:, step:step + 1], attention_mask=attention_mask[:, :step + 1], cache=cache).logits
            torch.testing.assert_close(out[:, 0], full[:, step], atol=ATOL, rtol=1e-4)
    assert cache.seq_length() == 14


def test_packed_documents_equal_separate_runs():
    model = ReferenceDecoder(_config(**CONFIGS["mixed_sliding"])).eval()
    lengths = [6, 9, 3]
    input_ids = torch.randint(0, 128, (1, sum(lengths)))
    document_ids = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)]).unsqueeze(0)
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    for implementation in ("triton_attn", "eager"):
        packed = _logits(model, implementation, input_ids, position_ids=position_ids, document_ids=document_ids)
        start = 0
        for n in lengths:
            alone = _logits(model, implementation, input_ids[:, start:start + n])
            torch.testing.assert_close(packed[:, start:start + n], alone, atol=ATOL, rtol=1e-4)
            start += n


def test_training_gradients_match_eager():
    model = ReferenceDecoder(_config(**CONFIGS["softcap_sinks"]))
    input_ids = torch.randint(0, 128, (2, 12))
    grads = {}
    for implementation in ("triton_attn", "eager"):
        model.set_attn_implementation(implementation)
        model.zero_grad()
        logits = model(input_ids).logits
        torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128), input_ids[:, 1:].reshape(-1)).backward()
        attention = model.layers[0].self_attn
        grads[implementation] = [attention.sinks.grad.clone(), attention.k_proj.weight.grad.clone()]
    for ours, eager in zip(grads["triton_attn"], grads["eager"]):
        torch.testing.assert_close(ours, eager, atol=1e-5, rtol=1e-3)


def test_dropout_applies_while_training_only():
    model = ReferenceDecoder(_config(attention_dropout=0.5)).train()
    input_ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        trained = model(input_ids).logits
        evaluated = model.eval()(input_ids).logits
        assert torch.equal(model(input_ids).logits, evaluated)
    assert (trained - evaluated).abs().max() > 1e-3


def test_kwargs_reach_every_attention_call():
    spy = Spy()
    AttentionInterface.register("spy", spy, mask_function=AttentionMaskInterface()["triton_attn"])
    model = ReferenceDecoder(_config(attn_implementation="spy", **CONFIGS["mixed_sliding"])).eval()
    with torch.no_grad():
        model(torch.randint(0, 128, (2, 9)), my_new_kwarg=3.5)
    assert [call["layer"] for call in spy.calls] == [0, 1]
    for call, window in zip(spy.calls, (5, None)):
        assert call["kwargs"]["my_new_kwarg"] == 3.5
        assert call["kwargs"]["sliding_window"] == window and call["kwargs"]["scaling"] == 16 ** -0.5
        assert isinstance(call["mask"], ModelBlockMask)


def test_per_instance_interface_override_only_affects_that_model():
    spy = Spy()
    local = AttentionInterface()
    local["triton_attn"] = spy
    mine = ReferenceDecoder(_config(), attention_interface=local).eval()
    other = ReferenceDecoder(_config()).eval()
    with torch.no_grad():
        other(torch.randint(0, 128, (1, 5)))
        assert spy.calls == []
        mine.generate(torch.randint(0, 128, (1, 5)), max_new_tokens=3)
    assert [(c["q_len"], c["kv_len"]) for c in spy.calls] == [(5, 5)] * 2 + [(1, 6)] * 2 + [(1, 7)] * 2
    assert ALL_ATTENTION_FUNCTIONS["triton_attn"] is not spy


def test_name_without_mask_function_gets_none():
    spy = Spy()
    with pytest.warns(MissingMaskFunctionWarning, match="attention_mask=None"):
        AttentionInterface.register("maskless", spy)
    model = ReferenceDecoder(_config(attn_implementation="maskless")).eval()
    with torch.no_grad():
        model(torch.randint(0, 128, (1, 6)))
    assert [call["mask"] for call in spy.calls] == [None, None]


def test_set_attn_implementation_validates_and_keeps_state_on_error():
    model = ReferenceDecoder(_config())
    with pytest.raises(ValueError, match="'nope' is not registered; valid: .*triton_attn"):
        model.set_attn_implementation("nope")
    with pytest.raises(KeyError, match="unknown sub-model"):
        model.set_attn_implementation({"vision": "sdpa"})
    assert model.attn_implementation == "triton_attn"
    with pytest.raises(ValueError, match="not registered"):
        ReferenceDecoder(_config(attn_implementation="nope"))


def test_vision_language_per_backbone_dict():
    vision_spy, text_spy = Spy(), Spy()
    AttentionInterface.register("vision_spy", vision_spy, mask_function=AttentionMaskInterface()["triton_attn"])
    AttentionInterface.register("text_spy", text_spy, mask_function=AttentionMaskInterface()["triton_attn"])
    config = VisionLanguageConfig(vision=ModelConfig(vocab_size=None, causal=False, initializer_range=0.3),
                                  text=_config())
    model = ReferenceVisionLanguageModel(config, attn_implementation={"vision": "sdpa", "text": "text_spy"}).eval()
    assert model.attn_implementation == {"": "triton_attn", "vision": "sdpa", "text": "text_spy"}
    input_ids, attention_mask = _left_padded(length=10)
    patches = torch.randn(2, 4, 48)
    expected = _logits(model, "eager", input_ids, patches, attention_mask=attention_mask)
    assert model.attn_implementation == {"": "eager", "vision": "eager", "text": "eager"}

    model.set_attn_implementation({"vision": "vision_spy", "text": "text_spy", "": "sdpa"})
    with torch.no_grad():
        ours = model(input_ids, patches, attention_mask=attention_mask, extra_flag=True).logits
    assert len(vision_spy.calls) == 2 and len(text_spy.calls) == 2
    assert all(call["kwargs"]["extra_flag"] is True for call in vision_spy.calls + text_spy.calls)
    assert all(call["kwargs"]["is_causal"] is False for call in vision_spy.calls)
    assert [call["kv_len"] for call in text_spy.calls] == [14, 14]  # 4 image tokens + 10 text tokens
    real = torch.cat([torch.ones(2, 4, dtype=torch.bool), attention_mask.bool()], dim=1)
    torch.testing.assert_close(ours[real], expected[real], atol=ATOL, rtol=1e-4)

    model.set_attn_implementation({"text": "triton_attn"})  # one backbone only
    assert model.attn_implementation == {"": "sdpa", "vision": "vision_spy", "text": "triton_attn"}
    with pytest.raises(ValueError, match="not registered"):
        model.set_attn_implementation({"vision": "sdpa", "text": "nope"})
    assert model.attn_implementation["vision"] == "vision_spy"  # nothing changed


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_heads=4, num_kv_heads=3), "multiple of num_kv_heads"),
    (dict(hidden_size=30, num_heads=4), "not divisible"),
    (dict(layer_types=["full_attention"]), "one of"),
    (dict(layer_types=["sliding_attention", "full_attention"]), "sliding_window is None"),
    (dict(sliding_window=0), "positive int or None"),
    (dict(num_layers=0), "positive int"),
])
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**kwargs)
