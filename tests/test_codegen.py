"""Code generation: graph -> Triton source, the module cache, and recompilation behaviour."""

from __future__ import annotations

import ast
import warnings

import pytest
import torch

import triton_attn as ta
from numerics import assert_matches_golden, random_qkv
from triton_attn.kernels import codegen
from triton_attn.kernels.fallback import UntraceableMaskWarning
from triton_attn.masks import (alibi_score, and_masks, causal_mask, chunked_mask, document_mask, not_mask, or_masks,
                               padding_mask, prefix_lm_mask, sliding_window_mask, softcap_score)
from triton_attn.masks.tracing import Node, TracedMod, trace_mask_mod, trace_score_mod

pytest.importorskip("triton")


def _library():
    ids = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 2, 2]])
    return [causal_mask, sliding_window_mask(3), chunked_mask(2), prefix_lm_mask(2), prefix_lm_mask(torch.tensor([1, 3])),
            document_mask(ids), document_mask(ids[0]), padding_mask(ids > 0),
            and_masks(causal_mask, document_mask(ids)), or_masks(causal_mask, chunked_mask(4)), not_mask(causal_mask)]


@pytest.mark.parametrize("index", range(len(_library())))
def test_library_masks_generate_valid_source(index):
    mask_mod = _library()[index]
    traced = trace_mask_mod(mask_mod)
    generated = codegen.generate_source(codegen.KernelSpec(codegen.MASK_TRACED, traced, None))
    tree = ast.parse(generated.source)
    functions = [node for node in tree.body if isinstance(node, ast.FunctionDef)]
    assert [f.name for f in functions] == [generated.kernel_name]
    params = [a.arg for a in functions[0].args.args]
    for captured in generated.captured:  # every captured tensor is a pointer + sizes + strides argument
        assert set(captured.arg_names()) <= set(params)
    assert len(generated.captured) == len(traced.captured)
    assert "mask_keep = " in generated.source


@pytest.mark.parametrize("score_mod", [softcap_score(20.0), alibi_score(8)])
def test_score_mods_generate_valid_source(score_mod):
    spec = codegen.KernelSpec(codegen.MASK_NONE, None, trace_score_mod(score_mod))
    source = codegen.generate_source(spec).source
    ast.parse(source)
    assert "score = qk * score_scale" in source and "logits = " in source


def test_constants_are_folded():
    # Constant subgraphs (rare in traced mods, common in hand-built graphs) become literals,
    # and a where() with a constant condition keeps only the chosen branch.
    const = lambda value, kind: Node("const", (value,), kind)  # noqa: E731
    q_idx, kv_idx = Node("arg", ("q_idx",), "int"), Node("arg", ("kv_idx",), "int")
    condition = Node("eq", (Node("floordiv", (const(-7, "int"), const(2, "int")), "int"), const(-4, "int")), "bool")
    graph = Node("where", (condition, Node("ge", (q_idx, kv_idx), "bool"), Node("lt", (q_idx, kv_idx), "bool")), "bool")
    source = codegen.generate_source(
        codegen.KernelSpec(codegen.MASK_TRACED, TracedMod("mask", graph, [], "folded"), None)).source
    assert "tl.where" not in source.split("# @@")[0].split("mask_keep")[0].split("if phase == 0:")[-1]
    assert "mask_v0 = (q_idx >= kv_idx)" in source


def check_interpreted(mask_mod=None, score_mod=None, q_len=50, kv_len=60, block_size=16, dtype=torch.float32):
    q, k, v = random_qkv(1, 2, 2, q_len, kv_len, 16, dtype=dtype)
    block_mask = ta.create_block_mask(mask_mod, None, None, q_len, kv_len, BLOCK_SIZE=block_size) if mask_mod else None
    assert_matches_golden(
        lambda q_, k_, v_: ta.attention(q_, k_, v_, block_mask=block_mask, score_mod=score_mod, return_lse=True,
                                        backend="interpret"),
        q, k, v, mask_mod=mask_mod, score_mod=score_mod, backward=False)


def test_floor_division_and_modulo_of_negative_values_follow_python():
    def negative_arithmetic(b, h, q_idx, kv_idx):
        distance = q_idx - kv_idx  # negative above the diagonal
        return ((distance // 7) % 3 == 2) | (distance % 5 == 3) | ((-distance) // 4 == -2)

    check_interpreted(negative_arithmetic)


def test_negative_index_into_captured_tensor_wraps_like_torch():
    marks = torch.randint(0, 3, (60,))

    def previous_token(b, h, q_idx, kv_idx):
        return marks[q_idx - 1] == marks[kv_idx]  # q_idx = 0 reads marks[-1]

    check_interpreted(previous_token, q_len=60, kv_len=60)


def test_float_arithmetic_in_mask_and_score():
    def float_band(b, h, q_idx, kv_idx):
        return torch.floor(q_idx.float() / 3.0) >= torch.ceil(kv_idx * 0.5) - 4

    def score_math(score, b, h, q_idx, kv_idx):
        return score * torch.sigmoid(score) + torch.sqrt((q_idx + 1).float()) * 0.1 - torch.log((kv_idx + 2).float()) ** 2

    check_interpreted(float_band, score_math)


def test_bool_captured_tensor_and_min_max():
    keep = torch.rand(1, 60) > 0.2

    def clamped(b, h, q_idx, kv_idx):
        return keep[b, kv_idx] & (torch.minimum(q_idx, torch.tensor(30)) >= torch.maximum(kv_idx - 5, kv_idx * 0))

    check_interpreted(clamped)


def test_untraceable_score_mod_runs_on_the_blockwise_backend_with_a_warning():
    from triton_attn.api import ScoreModFallbackWarning

    def bad_score(score, b, h, q_idx, kv_idx):
        return torch.special.erfcx(score)

    q, k, v = random_qkv(1, 1, 1, 16, 16, 16)
    with pytest.warns(ScoreModFallbackWarning, match="bad_score.*erfcx"):
        out = ta.attention(q, k, v, score_mod=bad_score, backend="interpret")
    torch.testing.assert_close(out, ta.attention(q, k, v, score_mod=bad_score, backend="torch"))


def test_mask_that_codegen_cannot_express_falls_back():
    def signed_power(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx) ** (kv_idx % 2) >= 0  # pow of a maybe-negative base, non-constant exponent

    with pytest.warns(UntraceableMaskWarning, match="pow"):
        check_interpreted(signed_power)


# -- caching and recompilation -----------------------------------------------------------------

def _attend(mask_mod, length=48):
    q, k, v = random_qkv(1, 1, 1, length, length, 16)
    block_mask = ta.create_block_mask(mask_mod, 1, None, length, length, BLOCK_SIZE=16)
    return ta.attention(q, k, v, block_mask=block_mask, backend="interpret"), (q, k, v)


def test_same_mask_mod_rebuilt_in_a_loop_generates_once():
    before = codegen.generated_kernel_count()
    for _ in range(3):
        _attend(sliding_window_mask(4099))  # a fresh closure object every time, same graph
    assert codegen.generated_kernel_count() - before == 1
    keys = {trace_mask_mod(sliding_window_mask(4099)).key for _ in range(3)}
    assert len(keys) == 1


def test_new_captured_values_and_sizes_reuse_the_kernel():
    before = codegen.generated_kernel_count()
    kernels = set()
    for length, seed in ((48, 0), (48, 1), (40, 2)):
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, 3, (1, length), generator=generator).cumsum(1) * 7 + 12345  # values unique to this test
        mask_mod = and_masks(document_mask(ids), chunked_mask(9973))
        kernels.add(codegen.kernel_for(codegen.KernelSpec(codegen.MASK_TRACED, trace_mask_mod(mask_mod), None)).path)
        out, (q, k, v) = _attend(mask_mod, length)
        dense = ta.create_mask(mask_mod, 1, 1, length, length)
        expected = torch.softmax((q @ k.transpose(-1, -2) / 4.0).masked_fill(~dense, float("-inf")), -1) @ v
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)  # the new values were used
    assert len(kernels) == 1
    assert codegen.generated_kernel_count() - before == 1


def test_module_written_atomically_into_the_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_ATTN_CACHE_DIR", str(tmp_path))
    spec = codegen.KernelSpec(codegen.MASK_TRACED, trace_mask_mod(chunked_mask(8191)), None)
    kernel = codegen.kernel_for(spec)
    assert kernel.path.parent == tmp_path / "kernels"
    assert kernel.path.read_text() == codegen.generate_source(spec).source
    assert [p.name for p in kernel.path.parent.iterdir()] == [kernel.path.name]  # no temporary left behind
    import inspect

    assert inspect.getsource(kernel.function).startswith(f"def {kernel.kernel_name}(")
