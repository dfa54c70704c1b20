"""Model families whose attention calls go beyond a mask: relative position biases (T5 family), ALiBi folded
into the mask (Falcon), per-query sinks, and sliding-window / chunked models under torch.compile.

Tiny random models built offline from configs, compared with transformers' own reference implementations
(sdpa / eager) on the same weights; biases are scaled up so that a dropped bias shows.
"""

from __future__ import annotations

import inspect
import pathlib
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tests.helpers.numerics import BACKWARD_FACTOR, FORWARD_FACTOR, compare  # noqa: E402
from triton_attn.masks import causal_mask  # noqa: E402
from triton_attn.registry import (  # noqa: E402
    ModelBlockMask,
    attention_functions,  # noqa: E402
    make_attention_function,
    make_mask_function,
    register_attention,
)

VOCAB = 64
ATOL = 2e-4


pytestmark = pytest.mark.usefixtures("transformers_registered")  # tests/registry/conftest.py


@pytest.fixture
def received(monkeypatch):
    """The attention_mask and keywords of every call of triton_attn.attention made by our attention functions."""
    calls = []
    real = attention_functions.attention

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(attention_functions, "attention", recording)
    return calls


def _grads(model, loss_of):
    model.zero_grad(set_to_none=True)
    loss_of(model).backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def _assert_grads_close(ours: dict, expected: dict, rtol: float = 1e-3):
    assert ours.keys() == expected.keys(), sorted(ours.keys() ^ expected.keys())
    floor = 1e-4 * max(g.abs().max().item() for g in expected.values())
    for name, g in expected.items():
        error = (ours[name] - g).abs().max().item()
        assert error <= rtol * g.abs().max().item() + floor, f"{name}: gradients differ by {error:.3g}"


# ---------------------------------------------------------------------------------------------------------
# Item 4: position_bias (T5 family) and the keyword table
# ---------------------------------------------------------------------------------------------------------

def _t5_family(kind: str):
    config_class, model_class = {"t5": (transformers.T5Config, transformers.T5ForConditionalGeneration),
                                 "umt5": (transformers.UMT5Config, transformers.UMT5ForConditionalGeneration)}[kind]
    config = config_class(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                          num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                          dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=None)
    torch.manual_seed(0)
    model = model_class._from_config(config, attn_implementation="triton_attn")
    with torch.no_grad():  # a relative bias of a few units: dropping it changes the logits by far more than ATOL
        for name, parameter in model.named_parameters():
            if "relative_attention_bias" in name:
                parameter.normal_(0.0, 2.0)
    return model


@pytest.mark.parametrize("kind", ["t5", "umt5"])
def test_t5_family_position_bias_matches_sdpa_with_gradients(kind):
    model = _t5_family(kind)
    input_ids = torch.randint(1, VOCAB, (2, 10))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, 7:] = 0  # right-padded encoder input
    decoder_input_ids = torch.randint(1, VOCAB, (2, 6))
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids)
    probe = torch.randn(2, 6, VOCAB)

    logits, grads = {}, {}
    for implementation in ("triton_attn", "sdpa"):
        model.set_attn_implementation(implementation)
        model.eval()
        with torch.no_grad():
            logits[implementation] = model(**inputs).logits
        model.train()
        grads[implementation] = _grads(model, lambda m: (m(**inputs).logits * probe).sum())
    torch.testing.assert_close(logits["triton_attn"], logits["sdpa"], atol=ATOL, rtol=1e-4)
    biases = [name for name in grads["sdpa"] if "relative_attention_bias" in name]
    assert biases and all(name in grads["triton_attn"] for name in biases)  # the bias gets its gradient
    _assert_grads_close(grads["triton_attn"], grads["sdpa"])

    model.eval()
    generated = {}
    for implementation in ("triton_attn", "sdpa"):  # decode steps: the bias of one query at an offset
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            generated[implementation] = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=5,
                                                       min_new_tokens=5, do_sample=False)
    assert torch.equal(generated["triton_attn"], generated["sdpa"])


@pytest.mark.parametrize("backend", ["torch", "interpret"])
def test_position_bias_and_per_query_sinks_match_inkling2_eager(backend):
    """position_bias [B, H, Lq, Lkv] and per-query sinks [B, H, Lq, 1], both learnable, with an additive mask:
    out and every gradient against transformers' own eager attention (Inkling 2) in float64, under the
    numerics rule (float32 eager as the yardstick)."""
    if backend == "interpret":
        pytest.importorskip("triton")
    from transformers.models.inkling2.modeling_inkling2 import eager_attention_forward

    class Module(torch.nn.Module):
        num_key_value_groups = 2

    module = Module().eval()
    batch, heads, q_len, kv_len, dim = 2, 4, 12, 20, 16
    q = torch.randn(batch, heads, q_len, dim)
    k, v = torch.randn(batch, heads // 2, kv_len, dim), torch.randn(batch, heads // 2, kv_len, dim)
    position_bias = 2.0 * torch.randn(batch, heads, q_len, kv_len)
    sinks = torch.randn(batch, heads, q_len, 1)
    keep = torch.rand(batch, 1, q_len, kv_len) > 0.3
    keep[..., 0] = True
    mask = torch.zeros(batch, 1, q_len, kv_len).masked_fill(~keep, torch.finfo(torch.float32).min)
    grad_out = torch.randn(batch, q_len, heads, dim)
    ours = make_attention_function(backend=backend)

    def run(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v, position_bias, sinks)]
        out = fn(module, *leaves[:3], mask.to(dtype), scaling=0.3, position_bias=leaves[3], sinks=leaves[4])[0]
        grads = torch.autograd.grad(out, leaves, grad_out.to(dtype))
        return [out.detach()] + list(grads)

    golden, baseline = run(eager_attention_forward, torch.float64), run(eager_attention_forward, torch.float32)
    got = run(ours, torch.float32)
    names = ["out", "dq", "dk", "dv", "d_position_bias", "d_sinks"]
    for name, actual, base, gold in zip(names, got, baseline, golden):
        comparison = compare(name, actual, base, gold, FORWARD_FACTOR if name == "out" else BACKWARD_FACTOR,
                             torch.float32)
        assert comparison.error <= comparison.bound, comparison


# ``name = ALL_ATTENTION_FUNCTIONS...`` / ``name: Callable = getattr(ALL_ATTENTION_FUNCTIONS, ...)`` at a line start.
_CALL_SITE_NAME = re.compile(r"^[ \t]*((?:self\.)?\w+)[ \t]*(?::[^=\n]*)?=\s*"
                             r"(?:getattr\(\s*)?ALL_ATTENTION_FUNCTIONS\b", re.MULTILINE)


def _call_arguments(text: str, open_paren: int) -> str:
    """The text between the parenthesis at ``open_paren`` and its match (quotes skipped)."""
    depth, index, quote = 0, open_paren, None
    while index < len(text):
        char = text[index]
        if quote:
            quote = None if char == quote and text[index - 1] != "\\" else quote
        elif char in "\"'":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
            if depth == 0:
                return text[open_paren + 1:index]
        index += 1
    raise ValueError("unbalanced call")


def _top_level_arguments(arguments: str):
    depth, start = 0, 0
    for index, char in enumerate(arguments + ","):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            piece = arguments[start:index].strip()
            if piece:
                yield piece
            start = index + 1


def _dict_keys(text: str, name: str):
    """Keys of ``name = {"a": ..., ...}`` or ``name = dict(a=...)`` in ``text``, or None when not found."""
    literal = re.search(rf"\b{name}\s*=\s*\{{([^}}]*)\}}", text)
    if literal:
        return re.findall(r"[\"'](\w+)[\"']\s*:", literal.group(1))
    call = re.search(rf"\b{name}\s*=\s*dict\(", text)
    if call:
        return [re.match(r"(\w+)\s*=", piece).group(1)
                for piece in _top_level_arguments(_call_arguments(text, call.end() - 1)) if "=" in piece]
    return None


def keywords_passed_to_attention_functions():
    """``({keyword: {model folder}}, call sites, unresolved ``**`` expansions)`` of every call of a function taken
    from ``ALL_ATTENTION_FUNCTIONS`` in the installed transformers' modeling files, found by text search."""
    root = pathlib.Path(transformers.__file__).parent / "models"
    found, sites, unresolved = {}, 0, []
    for path in sorted(root.glob("*/modeling_*.py")):
        text = path.read_text()
        if "ALL_ATTENTION_FUNCTIONS" not in text:
            continue
        for name in set(_CALL_SITE_NAME.findall(text)):
            calls = list(re.finditer(rf"(?<![\w.]){re.escape(name)}\s*\(", text))
            if not calls:
                unresolved.append(f"{path.parent.name}: {name} is never called by name")
            for call in calls:
                sites += 1
                for piece in _top_level_arguments(_call_arguments(text, call.end() - 1)):
                    keyword = re.match(r"(\w+)\s*=(?!=)", piece)
                    expanded = re.match(r"\*\*(\w+)$", piece)
                    names = [keyword.group(1)] if keyword else []
                    if expanded and expanded.group(1) != "kwargs":
                        names = _dict_keys(text, expanded.group(1))
                        if names is None:
                            unresolved.append(f"{path.parent.name}: {piece}")
                            names = []
                    for keyword_name in names:
                        found.setdefault(keyword_name, set()).add(path.parent.name)
    return found, sites, unresolved


def test_every_keyword_transformers_passes_to_attention_functions_is_classified():
    """A new transformers release that passes a new keyword to attention functions fails here: classify it in
    triton_attn.registry.keywords.ATTENTION_KEYWORDS (implemented, harmless or refused)."""
    from transformers.modeling_flash_attention_utils import FlashAttentionKwargs
    from transformers.utils.generic import TransformersKwargs

    from triton_attn.registry.keywords import ATTENTION_KEYWORDS

    found, sites, unresolved = keywords_passed_to_attention_functions()
    assert sites > 100 and {"scaling", "dropout", "position_bias"} <= found.keys()  # the search works
    assert not unresolved, f"call sites the search cannot read: {unresolved}"
    # The keywords every model forwards through **kwargs to its attention function.
    found.update({name: {"TransformersKwargs"} for name in TransformersKwargs.__annotations__})
    found.update({name: {"FlashAttentionKwargs"} for name in FlashAttentionKwargs.__annotations__})
    missing = {name: sorted(models)[:3] for name, models in found.items() if name not in ATTENTION_KEYWORDS}
    assert not missing, f"keywords passed to attention functions but not classified: {missing}"


def test_keyword_table_agrees_with_the_attention_function():
    from triton_attn.registry.keywords import ATTENTION_KEYWORDS, KINDS

    assert all(rule.kind in KINDS and rule.reason for rule in ATTENTION_KEYWORDS.values())
    parameters = set(inspect.signature(make_attention_function()).parameters) - {"kwargs"}
    implemented = {name for name, rule in ATTENTION_KEYWORDS.items() if rule.kind == "implemented"}
    assert implemented == parameters


def test_unknown_and_refused_keywords_are_errors_unless_ignored():
    class Module(torch.nn.Module):
        num_key_value_groups = 1

    q, k, v = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    fn = make_attention_function()
    expected = fn(Module(), q, k, v, None)[0]
    with pytest.raises(TypeError, match="'new_bias_kind' .*ignore_keywords=\\('new_bias_kind',\\)"):
        fn(Module(), q, k, v, None, new_bias_kind=torch.ones(1))
    with pytest.raises(ValueError, match=r"block_indices=<tensor of shape \(1, 6, 2\)> is not supported: sparse"):
        fn(Module(), q, k, v, None, block_indices=torch.zeros(1, 6, 2, dtype=torch.int32))
    # Harmless keywords, refused ones switched off, and an opted-in unknown keyword change nothing.
    quiet = make_attention_function(ignore_keywords="new_bias_kind")
    out = quiet(Module(), q, k, v, None, new_bias_kind=1, block_indices=None, position_ids=torch.arange(6),
                use_cache=True)
    torch.testing.assert_close(out[0], expected, rtol=0, atol=0)

    with pytest.raises(ValueError, match="'position_bias' is implemented"):
        make_attention_function(ignore_keywords=["position_bias"])
    with pytest.raises(ValueError, match="'block_indices' changes the attention result"):
        register_attention("sparse_ignored", ignore_keywords=("block_indices",))
    with pytest.raises(TypeError, match="identifiers"):
        make_attention_function(ignore_keywords=("not a name",))


def test_an_unknown_keyword_from_a_model_fails_at_the_first_call():
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, pad_token_id=0,
                                      eos_token_id=None, bos_token_id=None)
    model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="triton_attn").eval()
    input_ids = torch.randint(1, VOCAB, (1, 8))
    with torch.no_grad(), pytest.raises(TypeError, match="keyword 'retrieval_bias' \\(from LlamaAttention\\)"):
        model(input_ids=input_ids, retrieval_bias=torch.ones(1))
    register_attention("triton_attn_lenient", ignore_keywords=("retrieval_bias",))
    model.set_attn_implementation("triton_attn_lenient")
    with torch.no_grad():
        model(input_ids=input_ids, retrieval_bias=torch.ones(1))


# ---------------------------------------------------------------------------------------------------------
# Item 5: ALiBi folded into the mask (Falcon); models that compute attention from the mask themselves
# ---------------------------------------------------------------------------------------------------------

def _falcon():
    config = transformers.FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       alibi=True, initializer_range=0.3, pad_token_id=0, eos_token_id=None,
                                       bos_token_id=None)
    torch.manual_seed(0)
    return transformers.FalconForCausalLM._from_config(config, attn_implementation="triton_attn")


def test_falcon_alibi_matches_eager_logits_gradients_and_generate(received):
    model = _falcon()
    input_ids = torch.randint(1, VOCAB, (2, 14))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :4] = 0  # left padding: ALiBi positions count real tokens only
    input_ids[0, :4] = 0
    real = attention_mask.bool()
    probe = torch.randn(int(real.sum()), VOCAB)
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask)

    logits, grads = {}, {}
    for implementation in ("triton_attn", "eager"):
        model.set_attn_implementation(implementation)
        model.eval()
        with torch.no_grad():
            logits[implementation] = model(**inputs).logits[real]
        model.train()
        grads[implementation] = _grads(model, lambda m: (m(**inputs).logits[real] * probe).sum())
    torch.testing.assert_close(logits["triton_attn"], logits["eager"], atol=ATOL, rtol=1e-4)
    _assert_grads_close(grads["triton_attn"], grads["eager"])
    # The ALiBi bias reached the kernel as a per-key bias [B, H, 1, Lkv] folded into our mask.
    assert received and all(call["score_mod"] is not None and call["score_mod"].bias.shape == (2, 4, 1, 14)
                            for call in received)

    model.eval()
    generated = {}
    for implementation in ("triton_attn", "eager"):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            generated[implementation] = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(generated["triton_attn"], generated["eager"])


@pytest.mark.parametrize("backend", ["torch", "interpret"])
def test_folding_a_bias_into_the_model_mask_equals_the_dense_mask(backend):
    """Falcon's sequence (where -> compare -> masked_fill) and the other folds give what the same operations
    on the dense bool mask give, passed to the attention function as a dense float mask (read per key in the
    kernel: the bias has no query dimension)."""
    if backend == "interpret":
        pytest.importorskip("triton")
    padding = torch.ones(2, 10, dtype=torch.bool)
    padding[1, :3] = False
    mask = make_mask_function()(batch_size=2, q_length=10, kv_length=10, mask_function=causal_mask,
                                attention_mask=padding)
    dense = torch.ones(2, 1, 10, 10, dtype=torch.bool).tril() & padding.view(2, 1, 1, 10)
    bias, minimum = torch.randn(2, 4, 1, 10), torch.finfo(torch.float32).min
    q, k, v = torch.randn(2, 4, 10, 16), torch.randn(2, 4, 10, 16), torch.randn(2, 4, 10, 16)
    fn = make_attention_function(backend=backend)

    assert mask.dtype == torch.bool and mask.ndim == 4
    additive = torch.where(mask, torch.full((), 0.0), minimum)
    assert additive.dtype == torch.float32 and (additive < -1).dtype == torch.bool
    folds = {"falcon": torch.masked_fill(bias, additive < -1, minimum),
             "where": torch.where(mask, bias, minimum),
             "masked_fill(~mask)": bias.masked_fill(~mask, minimum),
             "add": bias + additive}
    expected = fn(None, q, k, v, torch.where(dense, bias, minimum))[0]
    attending = dense[:, 0].any(-1)  # rows with an allowed key (the dense float mask gives the others a
    for name, folded in folds.items():  # uniform average, the block mask 0)
        assert isinstance(folded, ModelBlockMask) and folded.bias is not None, name
        torch.testing.assert_close(fn(None, q, k, v, folded)[0][attending], expected[attending], atol=1e-6,
                                   rtol=1e-5, msg=name)

    with pytest.raises(TypeError, match="torch.softmax on a triton_attn ModelBlockMask"):
        torch.softmax(additive, dim=-1)
    with pytest.raises(TypeError, match="not a masking value"):
        torch.where(mask, bias, 0.5)
    with pytest.raises(TypeError, match="0 / 1 weights"):
        mask.to(torch.float32)
    with pytest.raises(AttributeError, match="AttentionInterface"):
        mask.topk(3)


@pytest.mark.parametrize("kind", ["mpt", "bloom"])
def test_alibi_models_outside_the_attention_interface_get_a_clear_error(kind):
    """MPT and BLOOM compute attention themselves (transformers never calls an attention function for them):
    with our mask they would be wrong, so the first tensor operation on it says why."""
    if kind == "mpt":
        config = transformers.MptConfig(vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=4, max_seq_len=32,
                                        pad_token_id=0)
        model_class = transformers.MptForCausalLM
    else:
        config = transformers.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=1, n_head=4, pad_token_id=0)
        model_class = transformers.BloomForCausalLM
    model = model_class._from_config(config, attn_implementation="triton_attn").eval()
    with torch.no_grad(), pytest.raises(TypeError, match="does not call transformers' AttentionInterface"):
        model(input_ids=torch.randint(1, VOCAB, (1, 8)))


# ---------------------------------------------------------------------------------------------------------
# Item 6: sliding-window and chunked models under torch.compile(fullgraph=True)
# ---------------------------------------------------------------------------------------------------------

COMPILE_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                      num_key_value_heads=1, head_dim=16, max_position_embeddings=64, initializer_range=0.3,
                      pad_token_id=0, eos_token_id=None, bos_token_id=None)


def _windowed(kind: str):
    """A tiny model with a window (chunk) of 5 < the 14 tokens: (model, reference implementation)."""
    mixed = ["sliding_attention", "full_attention"]
    if kind == "mistral":
        config, cls, ref = transformers.MistralConfig(**COMPILE_COMMON, num_hidden_layers=1, sliding_window=5), \
            transformers.MistralForCausalLM, "sdpa"
    elif kind == "gemma2":
        config, cls, ref = transformers.Gemma2Config(**COMPILE_COMMON, num_hidden_layers=1, sliding_window=5,
                                                     attn_logit_softcapping=2.0, final_logit_softcapping=None,
                                                     query_pre_attn_scalar=16), \
            transformers.Gemma2ForCausalLM, "eager"
    elif kind == "cohere2":
        config, cls, ref = transformers.Cohere2Config(**COMPILE_COMMON, num_hidden_layers=2, sliding_window=5,
                                                      layer_types=mixed), transformers.Cohere2ForCausalLM, "sdpa"
    else:  # llama4: chunked attention (chunks of 5 tokens, counted from each row's first real token)
        config = transformers.Llama4TextConfig(**COMPILE_COMMON, num_hidden_layers=2, attention_chunk_size=5,
                                               no_rope_layers=[1, 0], num_local_experts=2, num_experts_per_tok=1,
                                               intermediate_size_mlp=64,
                                               layer_types=["chunked_attention", "full_attention"])
        cls, ref = transformers.Llama4ForCausalLM, "sdpa"
    torch.manual_seed(0)
    return cls._from_config(config, attn_implementation="triton_attn").eval(), ref


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# Mistral: sliding window; Gemma 2: with softcap; Cohere 2: sliding and full layers; Llama 4: chunked (Qwen 2's
# masks are Mistral's and Cohere 2's).
@pytest.mark.parametrize("kind", ["mistral", "gemma2", "cohere2", "llama4"])
def test_windowed_models_compile_fullgraph_and_match_eager(kind, fresh_dynamo):
    model, reference = _windowed(kind)
    input_ids = torch.randint(1, VOCAB, (2, 14))
    padding = torch.ones_like(input_ids)
    padding[1, :4] = 0  # left padding: the window (chunks) over real tokens, built inside the graph

    def logits(input_ids, padding):
        return model(input_ids=input_ids, attention_mask=padding).logits

    real = padding.bool()
    with torch.no_grad():
        eager = logits(input_ids, padding)
        compiled = torch.compile(logits, fullgraph=True, backend="aot_eager")(input_ids, padding)
        model.set_attn_implementation(reference)
        expected = logits(input_ids, padding)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eager[real], expected[real], atol=ATOL, rtol=1e-4)
