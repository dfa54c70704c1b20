"""Code generation: graph -> generated ``@triton.jit`` functions, the module cache, recompilation."""

from __future__ import annotations

import ast

import pytest
import torch

import triton_attn as ta
from tests.helpers.numerics import assert_matches_golden, random_qkv
from triton_attn.kernels.attention.fallback import UntraceableMaskWarning
from triton_attn.kernels.jit import functions
from triton_attn.masks import (
    alibi_score,
    and_masks,
    causal_mask,
    chunked_mask,
    document_mask,
    not_mask,
    or_masks,
    padding_mask,
    prefix_lm_mask,
    sliding_window_mask,
    softcap_score,
)
from triton_attn.masks.tracing import Node, TracedMod, trace_mask_mod, trace_score_mod

pytest.importorskip("triton")


def _library():
    ids = torch.tensor([[0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 2, 2]])
    return [causal_mask, sliding_window_mask(3), chunked_mask(2), prefix_lm_mask(2),
            prefix_lm_mask(torch.tensor([1, 3])), document_mask(ids), document_mask(ids[0]), padding_mask(ids > 0),
            and_masks(causal_mask, document_mask(ids)), or_masks(causal_mask, chunked_mask(4)), not_mask(causal_mask)]


def _defined_functions(source: str):
    tree = ast.parse(source)
    return {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}


@pytest.mark.parametrize("index", range(len(_library())))
def test_library_masks_generate_only_the_predicate(index):
    """The generated module of a mask_mod holds one ``@triton.jit`` function, the predicate, and no kernel."""
    traced = trace_mask_mod(_library()[index])
    source, _ = functions.module_source(functions.MASK_TRACED, traced, None, False)
    defined = _defined_functions(source)
    assert list(defined) == ["mask_mod"]
    params = [a.arg for a in defined["mask_mod"].args.args]
    # the index arguments, then pointer + sizes + strides of every captured tensor (the tuple's order)
    assert params == ["batch", "head", "q_idx", "kv_idx"] + functions.captured_params(traced.captured)
    assert [d.attr for d in defined["mask_mod"].decorator_list] == ["jit"]
    assert "tl.program_id" not in source and "tl.store" not in source and "tl.dot" not in source


@pytest.mark.parametrize("score_mod", [softcap_score(20.0), alibi_score(8)])
def test_generated_module_holds_only_mask_score_and_derivative_functions(score_mod):
    traced_score = trace_score_mod(score_mod)
    source, constant = functions.module_source(functions.MASK_TRACED, trace_mask_mod(causal_mask), traced_score, True)
    defined = _defined_functions(source)
    expected = ["mask_mod", "score_mod"] + (["score_mod_and_grad"] if score_mod.__name__.startswith("softcap") else [])
    assert list(defined) == expected
    assert constant == 1.0  # alibi's derivative; unused (1.0) when the derivative varies
    tree = ast.parse(source)
    assert all(isinstance(node, (ast.FunctionDef, ast.Import, ast.Expr)) for node in tree.body)
    for name in ("score_mod", "score_mod_and_grad"):
        if name in defined:
            assert [a.arg for a in defined[name].args.args][:5] == ["score", "batch", "head", "q_idx", "kv_idx"]
    assert "tl.program_id" not in source and "tl.store" not in source and "tl.dot" not in source


def test_constants_are_folded():
    # Constant subgraphs (rare in traced mods, common in hand-built graphs) become literals,
    # and a where() with a constant condition keeps only the chosen branch.
    const = lambda value, kind: Node("const", (value,), kind)  # noqa: E731
    q_idx, kv_idx = Node("arg", ("q_idx",), "int"), Node("arg", ("kv_idx",), "int")
    condition = Node("eq", (Node("floordiv", (const(-7, "int"), const(2, "int")), "int"), const(-4, "int")), "bool")
    graph = Node("where", (condition, Node("ge", (q_idx, kv_idx), "bool"), Node("lt", (q_idx, kv_idx), "bool")), "bool")
    source = functions.mask_source(TracedMod("mask", graph, [], "folded"))
    assert "tl.where" not in source
    assert "v0 = (q_idx >= kv_idx)" in source


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
        return (score * torch.sigmoid(score) + torch.sqrt((q_idx + 1).float()) * 0.1
                - torch.log((kv_idx + 2).float()) ** 2)

    check_interpreted(float_band, score_math)


def test_bool_captured_tensor_and_min_max():
    keep = torch.rand(1, 60) > 0.2

    def clamped(b, h, q_idx, kv_idx):
        return keep[b, kv_idx] & (torch.minimum(q_idx, torch.tensor(30)) >= torch.maximum(kv_idx - 5, kv_idx * 0))

    check_interpreted(clamped)


def test_untraceable_score_mod_runs_on_the_blockwise_backend_with_a_warning():
    from triton_attn.dispatch import ScoreModFallbackWarning

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
    before = functions.generated_count()
    for _ in range(3):
        _attend(sliding_window_mask(4099))  # a fresh closure object every time, same graph
    assert functions.generated_count() - before == 1
    keys = {trace_mask_mod(sliding_window_mask(4099)).key for _ in range(3)}
    assert len(keys) == 1


def test_new_captured_values_and_sizes_reuse_the_kernel():
    before = functions.generated_count()
    kernels = set()
    for length, seed in ((48, 0), (48, 1), (40, 2)):
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, 3, (1, length), generator=generator).cumsum(1) * 7 + 12345  # values unique to this test
        mask_mod = and_masks(document_mask(ids), chunked_mask(9973))
        kernels.add(functions.mod_functions(trace_mask_mod(mask_mod), None).path)
        out, (q, k, v) = _attend(mask_mod, length)
        dense = ta.create_mask(mask_mod, 1, 1, length, length)
        expected = torch.softmax((q @ k.transpose(-1, -2) / 4.0).masked_fill(~dense, float("-inf")), -1) @ v
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)  # the new values were used
    assert len(kernels) == 1
    assert functions.generated_count() - before == 1


def test_module_written_atomically_into_the_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_ATTN_CACHE_DIR", str(tmp_path))
    traced = trace_mask_mod(chunked_mask(8191))
    mods = functions.mod_functions(traced, None)
    assert mods.path.parent == tmp_path / "kernels"
    assert mods.path.read_text() == functions.module_source(functions.MASK_TRACED, traced, None, False)[0]
    assert [p.name for p in mods.path.parent.iterdir()] == [mods.path.name]  # no temporary left behind
    import inspect

    assert inspect.getsource(mods.mask_fn.fn).startswith("@triton.jit\ndef mask_mod(")
