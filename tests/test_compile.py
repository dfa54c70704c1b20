"""torch.compile(fullgraph=True) around attention(), create_block_mask, the closed-form model masks and model masks
with a registered mask_mod.

Compiling is slow on a small CPU machine: shapes are tiny, and the mask builders use the
``aot_eager`` backend (dynamo's full-graph capture is what is checked; Inductor adds only time).
"""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import triton_attn as ta
from tests.helpers.numerics import random_qkv
from triton_attn.masks import (
    and_masks,
    causal_mask,
    document_mask,
    padding_mask,
    sliding_window_mask,
    softcap_score,
    window_block_mask,
)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _no_graph_break(fn, *args):
    explanation = torch._dynamo.explain(fn)(*args)
    assert explanation.graph_break_count == 0, [str(reason.reason) for reason in explanation.break_reasons]


@pytest.mark.parametrize("case", ["causal", "document_softcap"])
def test_attention_compiles_fullgraph_and_matches_eager(case):
    q, k, v = random_qkv(2, 2, 1, 64, 64, 16)
    if case == "causal":
        block_mask, score_mod = ta.create_block_mask(causal_mask, None, None, 64, 64, BLOCK_SIZE=16), None
    else:
        ids = torch.arange(64).view(1, -1).expand(2, -1) // torch.tensor([[20], [40]])
        block_mask = ta.create_block_mask(and_masks(causal_mask, document_mask(ids)), 2, None, 64, 64, BLOCK_SIZE=16)
        score_mod = softcap_score(3.0)

    def run(q, k, v, block_mask):
        return ta.attention(q, k, v, block_mask=block_mask, score_mod=score_mod, enable_gqa=True, return_lse=True)

    _no_graph_break(run, q, k, v, block_mask)
    compiled = torch.compile(run, fullgraph=True, backend="inductor" if case == "causal" else "aot_eager")
    out, lse = compiled(q, k, v, block_mask)
    eager_out, eager_lse = run(q, k, v, block_mask)
    torch.testing.assert_close(out, eager_out, rtol=0, atol=0)
    torch.testing.assert_close(lse, eager_lse, rtol=0, atol=0)


def test_compiled_attention_sees_new_captured_tensors():
    """A new mask over other data (another batch's document ids) is a new tensor input, not a stale constant."""
    q, k, v = random_qkv(1, 2, 2, 48, 48, 16)

    def run(q, k, v, block_mask):
        return ta.attention(q, k, v, block_mask=block_mask)

    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    for ids in (torch.arange(48) // 16, torch.arange(48) // 30):
        block_mask = ta.create_block_mask(document_mask(ids), None, None, 48, 48, BLOCK_SIZE=16)
        torch.testing.assert_close(compiled(q, k, v, block_mask), run(q, k, v, block_mask), rtol=0, atol=0)


def test_attention_compiles_with_gradients():
    q, k, v = (t.requires_grad_() for t in random_qkv(1, 2, 2, 32, 32, 16))
    block_mask = ta.create_block_mask(causal_mask, None, None, 32, 32, BLOCK_SIZE=16)

    def loss(q, k, v):
        return ta.attention(q, k, v, block_mask=block_mask, score_mod=softcap_score(2.0)).square().sum()

    compiled_grads = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend="aot_eager")(q, k, v), (q, k, v))
    eager_grads = torch.autograd.grad(loss(q, k, v), (q, k, v))
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "training"])
def test_attention_with_dropout_compiles_fullgraph_and_draws_a_fresh_seed_per_call(grad):
    """The seed is drawn inside the graph (torch.randint): each compiled call drops other probabilities, and
    under one torch.manual_seed the compiled call drops what the eager one drops (outputs agree to rounding:
    eager takes the dense route, the compiled graph the blockwise op, over the same keep decisions)."""
    q, k, v = (t.requires_grad_(grad) for t in random_qkv(1, 2, 2, 48, 48, 16))
    block_mask = ta.create_block_mask(causal_mask, None, None, 48, 48, BLOCK_SIZE=16)

    def run(q, k, v):
        return ta.attention(q, k, v, block_mask=block_mask, dropout_p=0.3)

    _no_graph_break(run, q, k, v)
    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    first, second = compiled(q, k, v), compiled(q, k, v)
    assert not torch.equal(first, second)
    outs, grads = [], []
    for fn in (compiled, run):
        torch.manual_seed(11)
        out = fn(q, k, v)
        outs.append(out)
        if grad:
            grads.append(torch.autograd.grad(out.square().sum(), (q, k, v)))
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-5)
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_create_block_mask_compiles_for_model_mask_families():
    ids = torch.arange(64) // 20
    keep = torch.arange(64).view(1, -1) >= torch.tensor([0, 10]).view(-1, 1)
    document, sliding_padded = and_masks(causal_mask, document_mask(ids)), and_masks(sliding_window_mask(20),
                                                                                      padding_mask(keep))

    def build():
        masks = (ta.create_block_mask(document, None, None, 64, 64, BLOCK_SIZE=16, device="cpu"),
                 ta.create_block_mask(sliding_padded, 2, None, 64, 64, BLOCK_SIZE=16, device="cpu"))
        return [getattr(m, name) for m in masks for name in ta.BlockMask._TENSOR_FIELDS]

    _no_graph_break(build)
    for got, want in zip(torch.compile(build, fullgraph=True, backend="aot_eager")(), build()):
        assert torch.equal(got, want)


def test_closed_form_decode_mask_compiles_with_a_tensor_offset():
    keep = torch.arange(256).view(1, -1) >= torch.tensor([0, 37]).view(-1, 1)

    def decode_mask(keep, position):
        mask = window_block_mask(causal_mask, 2, 1, 256, q_offset=position, padding=keep, BLOCK_SIZE=64)
        return mask.kv_num_blocks, mask.kv_indices, mask.full_kv_num_blocks, mask.full_kv_indices

    _no_graph_break(decode_mask, keep, torch.tensor(200))
    compiled = torch.compile(decode_mask, fullgraph=True, backend="aot_eager")
    for position in (200, 63):
        for got, want in zip(compiled(keep, torch.tensor(position)), decode_mask(keep, position)):
            assert torch.equal(got, want)


@pytest.fixture
def tiny_llama():
    """A 1-layer Llama on "triton_attn", left-padded inputs; transformers' registries restored afterwards."""
    transformers = pytest.importorskip("transformers")
    from triton_attn.registry import register_transformers

    mappings = [transformers.AttentionInterface._global_mapping, transformers.AttentionMaskInterface._global_mapping]
    saved = [dict(mapping) for mapping in mappings]
    register_transformers()
    yield _tiny_llama(transformers)
    for mapping, old in zip(mappings, saved):
        mapping.clear()
        mapping.update(old)


def _tiny_llama(transformers):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      max_position_embeddings=64, initializer_range=0.3, pad_token_id=0,
                                      eos_token_id=None, bos_token_id=None, attn_implementation="triton_attn")
    model = transformers.LlamaForCausalLM(config).eval()
    input_ids = torch.randint(1, 64, (2, 16))
    padding = torch.ones_like(input_ids)
    padding[1, :5] = 0  # left padding: the model mask is causal AND padding, built inside the graph
    return model, input_ids, padding


def test_compiled_llama_with_triton_attn_matches_eager(tiny_llama):
    model, input_ids, padding = tiny_llama

    def logits(input_ids, padding):
        return model(input_ids=input_ids, attention_mask=padding).logits

    with torch.no_grad():
        _no_graph_break(logits, input_ids, padding)
        compiled = torch.compile(logits, fullgraph=True, backend="aot_eager")
        got, want = compiled(input_ids, padding), logits(input_ids, padding)
        # Another padding of the same shape: new tensor values, same graph and mod key.
        padding[0, :3] = 0
        got_again, want_again = compiled(input_ids, padding), logits(input_ids, padding)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_again, want_again, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got_again[0], got[0])  # the new padding was seen


def _linear_bias(score, b, h, q_idx, kv_idx):
    """An ALiBi-like registered score_mod without tensors, over absolute positions."""
    return score - 0.1 * (q_idx - kv_idx)


def _per_head_slopes(slopes: torch.Tensor):
    """A registered score_mod reading a captured per-head slope tensor ``[H]``."""
    def sloped(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx)

    return sloped


@pytest.mark.parametrize("implementation", ["triton_attn", "registered_mask_mod", "registered_score_mod"])
def test_static_cache_generate_with_a_compiled_forward_matches_eager(tiny_llama, implementation):
    from triton_attn.registry import register_attention

    model, input_ids, padding = tiny_llama
    if implementation != "triton_attn":
        mods = dict(mask_mod=document_mask(torch.arange(64) // 7)) if implementation == "registered_mask_mod" \
            else dict(score_mod=_per_head_slopes(torch.rand(4)))
        register_attention(implementation, **mods)
        model.set_attn_implementation(implementation)
    settings = dict(attention_mask=padding, max_new_tokens=4, do_sample=False, cache_implementation="static")
    with torch.no_grad():
        eager_tokens = model.generate(input_ids, **settings)
        model.forward = torch.compile(model.forward, fullgraph=True, backend="aot_eager")
        compiled_tokens = model.generate(input_ids, **settings)
    assert torch.equal(compiled_tokens, eager_tokens)


@pytest.mark.parametrize("case", ["window", "document", "score_mod", "score_mod_tensor"])
def test_compiled_llama_with_a_registered_mod_matches_eager(tiny_llama, case):
    """A registered mask_mod (combined with the model mask) or score_mod (over absolute positions): one graph,
    no break; new padding and new values of the mod's captured tensors (document ids, slopes) are seen."""
    from triton_attn.registry import register_attention

    model, input_ids, padding = tiny_llama
    ids, slopes = torch.arange(16) // 6, torch.rand(4)
    mods = {"window": dict(mask_mod=sliding_window_mask(5)), "document": dict(mask_mod=document_mask(ids)),
            "score_mod": dict(score_mod=_linear_bias), "score_mod_tensor": dict(score_mod=_per_head_slopes(slopes))}
    register_attention("ta_user", **mods[case])
    model.set_attn_implementation("ta_user")

    def logits(input_ids, padding):
        return model(input_ids=input_ids, attention_mask=padding).logits

    counter = CompileCounterWithBackend("aot_eager")
    with torch.no_grad():
        _no_graph_break(logits, input_ids, padding)
        torch._dynamo.reset()
        compiled = torch.compile(logits, fullgraph=True, backend=counter)
        got, want = compiled(input_ids, padding), logits(input_ids, padding)
        padding[0, :3] = 0  # new values of the same shapes: the same graph must see them
        ids.copy_(torch.arange(16) // 4)
        slopes.copy_(torch.rand(4) + 1.0)
        got_again, want_again = compiled(input_ids, padding), logits(input_ids, padding)
        model.set_attn_implementation("triton_attn")
        without_user_mod = logits(input_ids, padding)
    assert counter.frame_count == 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_again, want_again, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got_again[0], got[0])  # the new padding was seen
    if case in ("document", "score_mod_tensor"):
        assert not torch.allclose(got_again[1], got[1])  # row 1's padding is unchanged: the new ids / slopes were seen
    assert not torch.allclose(want_again, without_user_mod)  # the user mod is in effect


def test_compiled_mask_function_with_query_positions_and_a_mask_mod_matches_eager():
    """transformers 4.5x passes ``cache_position``: the model mask reads query positions from a tensor input."""
    from triton_attn.registry.attention_functions import make_attention_function
    from triton_attn.registry.masking import make_mask_function

    ids = torch.arange(40) // 9
    mask_function, attention_function = make_mask_function(document_mask(ids), block_size=16), make_attention_function()
    q, k, v = random_qkv(2, 2, 2, 8, 40, 16)
    keep = torch.ones(2, 40, dtype=torch.long)
    keep[1, :6] = 0

    def run(q, k, v, positions, keep):
        block_mask = mask_function(2, cache_position=positions, kv_length=40, attention_mask=keep)
        return attention_function(None, q, k, v, block_mask)[0]

    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    for positions in (torch.arange(20, 28), torch.tensor([3, 9, 10, 17, 18, 30, 31, 39])):
        torch.testing.assert_close(compiled(q, k, v, positions, keep), run(q, k, v, positions, keep),
                                   rtol=1e-6, atol=1e-6)


def test_compiled_mask_function_reads_a_pattern_outside_the_families_from_a_table():
    """A model pattern without a closed form (here a bidirectional window made outside the graph) and a mask_mod."""
    from triton_attn.registry.attention_functions import make_attention_function
    from triton_attn.registry.masking import make_mask_function

    def bidirectional_window(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx).abs() < 6

    mask_function = make_mask_function(document_mask(torch.arange(32) // 11), block_size=16)
    attention_function = make_attention_function()
    q, k, v = random_qkv(2, 2, 2, 32, 32, 16)
    keep = torch.ones(2, 32, dtype=torch.long)

    def run(q, k, v, keep):
        block_mask = mask_function(2, 32, 32, mask_function=bidirectional_window, attention_mask=keep)
        return attention_function(None, q, k, v, block_mask)[0]

    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    for padded in (0, 7):
        keep[1, :padded] = 0
        torch.testing.assert_close(compiled(q, k, v, keep), run(q, k, v, keep), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("case", ["softcap", "softcap_bias", "score_mod", "score_mod_tensor"])
def test_compiled_attention_function_with_a_model_score_mod_matches_eager(case):
    """The model's softcap, a dense float mask's bias and a registered score_mod (at the call's offsets) are one
    ModelScoreMod built inside the graph: no break, and new inputs (q/k/v, bias, slopes written in place)
    reuse the graph."""
    from triton_attn.registry.attention_functions import make_attention_function

    slopes = torch.rand(4)
    user_mod = {"score_mod": _linear_bias, "score_mod_tensor": _per_head_slopes(slopes)}.get(case)
    attention_function = make_attention_function(user_mod)
    softcap = 5.0 if case.startswith("softcap") else None
    q, k, v = random_qkv(2, 4, 2, 8, 24, 16)
    bias = torch.randn(2, 1, 8, 24) if case == "softcap_bias" else None

    def run(q, k, v, bias):
        return attention_function(None, q, k, v, bias, softcap=softcap)[0]

    _no_graph_break(run, q, k, v, bias)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(run, fullgraph=True, backend=counter)
    torch.testing.assert_close(compiled(q, k, v, bias), run(q, k, v, bias), rtol=1e-6, atol=1e-6)
    before = run(q, k, v, bias)
    if case == "score_mod_tensor":
        slopes.copy_(torch.rand(4) + 1.0)  # same q/k/v: only the captured tensor's new values change the output
    else:
        q, k, v = random_qkv(2, 4, 2, 8, 24, 16)
        bias = None if bias is None else torch.randn(2, 1, 8, 24)
    got = compiled(q, k, v, bias)
    torch.testing.assert_close(got, run(q, k, v, bias), rtol=1e-6, atol=1e-6)
    assert not torch.allclose(got, before)
    assert counter.frame_count == 1


def test_compiled_attention_function_with_a_4d_bool_mask_matches_eager():
    """A 4-D bool mask handed straight to the attention function becomes a DenseMaskMod inside the graph:
    no break, one graph for new mask values, and the compiled output equals eager."""
    from triton_attn.registry.attention_functions import make_attention_function

    attention_function = make_attention_function()
    q, k, v = random_qkv(2, 4, 2, 8, 24, 16)

    def run(q, k, v, mask):
        return attention_function(None, q, k, v, mask)[0]

    mask = torch.rand(2, 1, 8, 24) > 0.3
    _no_graph_break(run, q, k, v, mask)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(run, fullgraph=True, backend=counter)
    for _ in range(2):
        torch.testing.assert_close(compiled(q, k, v, mask), run(q, k, v, mask), rtol=1e-6, atol=1e-6)
        mask = torch.rand(2, 1, 8, 24) > 0.6
    assert counter.frame_count == 1


def test_compiled_model_score_mod_on_the_interpret_backend_matches_eager():
    """The Triton kernels (interpreter) under torch.compile: the score_mod's Triton fallback verdict is a constant
    of its structure, and the kernels read the ModelScoreMod's graph over the call's tensors."""
    pytest.importorskip("triton")
    from triton_attn.registry.attention_functions import make_attention_function

    attention_function = make_attention_function(_per_head_slopes(torch.rand(4)), backend="interpret")
    q, k, v = random_qkv(2, 4, 2, 16, 16, 16)
    bias = torch.randn(2, 1, 16, 16)

    def run(q, k, v, bias):
        return attention_function(None, q, k, v, bias, softcap=3.0)[0]

    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v, bias), run(q, k, v, bias), rtol=1e-6, atol=1e-6)


def test_compiled_attention_with_a_narrow_varlen_mask_on_the_interpret_backend_matches_eager_gradients():
    """A varlen mask's index lists are narrower than its block grid (masks/varlen.py). Under torch.compile the op
    rebuilds a plain BlockMask from the lists, whose grid -- the dK/dV kernel's launch over every key block --
    comes from its row counts, not the lists' width: the gradients are eager's."""
    pytest.importorskip("triton")
    from triton_attn.masks.varlen import varlen_block_mask

    cu_seqlens = torch.tensor([0, 40, 63, 113, 143], dtype=torch.int32)  # 4 sequences, self-attention
    block_mask = varlen_block_mask(cu_seqlens, cu_seqlens, 50, 50, total_q=143, total_k=143, causal=True,
                                   BLOCK_SIZE=16)
    assert block_mask.num_blocks == (9, 9)
    assert block_mask.kv_indices.shape[-1] < 9 and block_mask.q_indices.shape[-1] < 9  # narrow both ways
    q, k, v = (t.requires_grad_() for t in random_qkv(1, 2, 1, 143, 143, 16))

    def loss(q, k, v, block_mask):
        return ta.attention(q, k, v, block_mask=block_mask, enable_gqa=True, backend="interpret").square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    compiled_grads = torch.autograd.grad(compiled(q, k, v, block_mask), (q, k, v))
    eager_grads = torch.autograd.grad(loss(q, k, v, block_mask), (q, k, v))
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
