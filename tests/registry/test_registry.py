"""The registries, the mask function and the attention function of ``triton_attn.registry``.

No transformers needed here (see test_transformers_integration.py for real models); the README
section's examples run at the end (their transformers parts skip without transformers).
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import triton_attn as ta
from triton_attn.masks import alibi_score, document_mask, sliding_window_mask
from triton_attn.registry import (ALL_ATTENTION_FUNCTIONS, ALL_MASK_ATTENTION_FUNCTIONS, AttentionInterface,
                                  AttentionMaskInterface, MissingMaskFunctionWarning, ModelBlockMask,
                                  eager_attention_function, make_attention_function, make_mask_function,
                                  register_attention)

ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("restore_registries")


def ok_attention(module, query, key, value, attention_mask, **kwargs):
    return query.transpose(1, 2), None


def ok_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None, attention_mask=None,
            **kwargs):
    return None


# ---------------------------------------------------------------------------------------------------------------
# Import isolation
# ---------------------------------------------------------------------------------------------------------------

def test_importing_triton_attn_does_not_import_transformers():
    code = ("import sys, triton_attn, triton_attn.registry, triton_attn.registry.layers\n"
            "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
            "assert 'triton_attn' in triton_attn.registry.ALL_ATTENTION_FUNCTIONS\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr


def test_registry_uses_public_api_only():
    """Layering: registry/ imports triton_attn's top level and triton_attn.masks, never kernels or internals."""
    for path in (ROOT / "triton_attn" / "registry").glob("*.py"):
        for source in re.findall(r"^\s*from\s+(\S+)\s+import", path.read_text(), re.M):
            if source.startswith(".."):
                assert source in ("..", "..masks"), f"{path.name} imports from {source}"
            assert "kernels" not in source, f"{path.name} imports from {source}"


# ---------------------------------------------------------------------------------------------------------------
# Registries
# ---------------------------------------------------------------------------------------------------------------

def test_defaults_and_dict_behaviour():
    for name in ("triton_attn", "sdpa", "eager"):
        assert name in ALL_ATTENTION_FUNCTIONS and name in ALL_MASK_ATTENTION_FUNCTIONS
        assert ALL_ATTENTION_FUNCTIONS.get(name) is ALL_ATTENTION_FUNCTIONS[name]
    assert set(ALL_ATTENTION_FUNCTIONS.keys()) >= {"triton_attn", "sdpa", "eager"}
    assert ALL_ATTENTION_FUNCTIONS.valid_keys() == list(ALL_ATTENTION_FUNCTIONS)
    assert len(ALL_ATTENTION_FUNCTIONS) == len(list(ALL_ATTENTION_FUNCTIONS))
    assert ALL_ATTENTION_FUNCTIONS.get("nope") is None
    assert "nope" not in ALL_ATTENTION_FUNCTIONS
    with pytest.raises(KeyError, match="registered names: .*triton_attn"):
        ALL_ATTENTION_FUNCTIONS["nope"]
    assert isinstance(ALL_ATTENTION_FUNCTIONS, AttentionInterface)
    assert isinstance(ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface)


def test_global_register_and_per_instance_override():
    AttentionInterface.register("mine", ok_attention, mask_function=ok_mask)
    mine, other = AttentionInterface(), AttentionInterface()
    assert mine["mine"] is ok_attention and ALL_ATTENTION_FUNCTIONS["mine"] is ok_attention
    assert AttentionMaskInterface()["mine"] is ok_mask

    def local(module, query, key, value, attention_mask, **kwargs):
        return query, None

    mine["sdpa"] = local                      # this instance only
    assert mine["sdpa"] is local
    assert other["sdpa"] is not local and ALL_ATTENTION_FUNCTIONS["sdpa"] is not local
    mine["only_here"] = local
    assert "only_here" in mine and "only_here" not in other and "only_here" in list(mine.keys())
    del mine["sdpa"]
    assert mine["sdpa"] is ALL_ATTENTION_FUNCTIONS["sdpa"]
    with pytest.raises(KeyError, match="no per-instance override"):
        del mine["eager"]                     # global entries are not deleted through an instance
    AttentionInterface.unregister("mine")
    assert "mine" not in mine


def test_get_interface_falls_back_only_for_eager():
    interface = AttentionInterface()
    assert interface.get_interface("triton_attn", ok_attention) is ALL_ATTENTION_FUNCTIONS["triton_attn"]
    with pytest.raises(KeyError, match="nope"):
        interface.get_interface("nope", ok_attention)
    del AttentionInterface._global_mapping["eager"]
    assert interface.get_interface("eager", ok_attention) is ok_attention


@pytest.mark.parametrize("fn, message", [
    (lambda module, query, key, value, attention_mask: None, r"\*\*kwargs"),
    (lambda module, query, key, **kwargs: None, "5 positional"),
    (lambda module, query, key, value, attention_mask, extra, **kwargs: None, "'extra' has no default"),
    (lambda module, query, key, value, attention_mask, *, must, **kwargs: None, "'must' needs a default"),
    ("not callable", "must be callable"),
])
def test_attention_signature_checked_at_registration(fn, message):
    with pytest.raises(TypeError, match=message):
        AttentionInterface.register("bad", fn, mask_function=ok_mask)
    with pytest.raises(TypeError, match=message):
        AttentionInterface()["bad"] = fn
    assert "bad" not in ALL_ATTENTION_FUNCTIONS and "bad" not in ALL_MASK_ATTENTION_FUNCTIONS


def test_attention_return_annotation_checked():
    def returns_tensor(module, query, key, value, attention_mask, **kwargs) -> torch.Tensor:
        return query

    with pytest.raises(TypeError, match=r"\(attn_output, attn_weights\)"):
        AttentionInterface.register("bad", returns_tensor, mask_function=ok_mask)

    def star_args(*args, **kwargs) -> "tuple[torch.Tensor, None]":
        return args[1], None

    AttentionInterface.register("star", star_args, mask_function=ok_mask)


@pytest.mark.parametrize("fn, message", [
    (lambda batch_size, q_length, mask_function, attention_mask: None, "kv_length"),
    (lambda batch_size, kv_length, mask_function, attention_mask: None, "q_length .* or cache_position"),
    (lambda batch_size, q_length, kv_length, mask_function, attention_mask, extra: None, "'extra' has no default"),
])
def test_mask_signature_checked_at_registration(fn, message):
    with pytest.raises(TypeError, match=message):
        AttentionMaskInterface.register("bad", fn)
    assert "bad" not in ALL_MASK_ATTENTION_FUNCTIONS


def test_mask_signature_accepts_both_transformers_forms():
    def v4(batch_size, cache_position, kv_length, kv_offset=0, mask_function=None, attention_mask=None, **kwargs):
        return None

    AttentionMaskInterface.register("v4", v4)
    AttentionMaskInterface.register("v5", ok_mask)
    AttentionMaskInterface.register("anything", lambda **kwargs: None)


@pytest.mark.parametrize("name", ["", None, 3])
def test_bad_names(name):
    with pytest.raises(TypeError, match="non-empty str"):
        AttentionInterface.register(name, ok_attention, mask_function=ok_mask)


def test_missing_mask_function_warns_loudly():
    with pytest.warns(MissingMaskFunctionWarning, match=r"attention_mask=None.*register_attention"):
        AttentionInterface.register("lonely", ok_attention)
    assert "lonely" in ALL_ATTENTION_FUNCTIONS
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AttentionMaskInterface.register("paired", ok_mask)
        AttentionInterface.register("paired", ok_attention)  # mask first: no warning


def test_register_attention_registers_both():
    result = register_attention("doc_x", mask_mod=sliding_window_mask(4), score_mod=alibi_score(2),
                                transformers=False)
    assert result.name == "doc_x" and not result.in_transformers
    assert ALL_ATTENTION_FUNCTIONS["doc_x"] is result.attention_function
    assert ALL_MASK_ATTENTION_FUNCTIONS["doc_x"] is result.mask_function
    assert "doc_x" in result.attention_function.__name__


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(name="sdpa"), ValueError, "transformers' own"),
    (dict(name="paged|mine"), ValueError, "transformers' own"),
    (dict(name="x", combine="xor"), ValueError, "combine must be one of"),
    (dict(name="x", mask_mod=3), TypeError, "mask_mod must be a callable"),
    (dict(name="x", score_mod="s"), TypeError, "score_mod must be a callable"),
    (dict(name="x", transformers="yes"), TypeError, "transformers must be True, False or None"),
    (dict(name="x", mask_heads=0), ValueError, "mask_heads must be a positive int"),
])
def test_register_attention_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        register_attention(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Mask function: both transformers signatures, padding, offsets
# ---------------------------------------------------------------------------------------------------------------

def _dense(block_mask, batch: int, heads: int = 1) -> torch.Tensor:
    q_len, kv_len = block_mask.seq_lengths
    return ta.create_mask(block_mask.mask_mod, batch, heads, q_len, kv_len)


def _expected(batch, q_positions, kv_positions, padding=None, window=None):
    q = torch.as_tensor(q_positions).view(-1, 1)
    kv = torch.as_tensor(kv_positions).view(1, -1)
    allowed = kv <= q
    if window is not None:
        allowed &= q - kv < window
    allowed = allowed.expand(batch, 1, -1, -1).clone()
    if padding is not None:
        allowed &= padding.bool()[:, kv_positions].view(batch, 1, 1, -1)
    return allowed


def test_mask_function_v5_prefill_with_left_padding():
    mask_fn = make_mask_function()
    padding = torch.ones(2, 11, dtype=torch.long)
    padding[0, :3] = 0
    bm = mask_fn(batch_size=2, q_length=11, kv_length=11, q_offset=0, kv_offset=0,
                 mask_function=sliding_window_mask(4), attention_mask=padding, dtype=torch.float32, config=None,
                 allow_is_causal_skip=True, use_vmap=False, device="cpu")
    assert isinstance(bm, ModelBlockMask) and bm.seq_lengths == (11, 11) and bm.shape[:2] == (2, 1)
    assert torch.equal(_dense(bm, 2), _expected(2, range(11), range(11), padding, window=4))


@pytest.mark.parametrize("q_offset_type", [int, torch.tensor])
def test_mask_function_v5_decode_offsets(q_offset_type):
    """Decode: one query at position 9 over a cache of 10 keys whose window starts at 4."""
    mask_fn = make_mask_function()
    padding = torch.ones(2, 10, dtype=torch.bool)
    padding[1, :6] = False
    bm = mask_fn(2, 1, 6, q_offset_type(9), 4, sliding_window_mask(4), padding)  # positional 5.x
    assert bm.seq_lengths == (1, 6) and (bm.q_offset, bm.kv_offset) == (9, 4)
    assert torch.equal(_dense(bm, 2), _expected(2, [9], range(4, 10), padding, window=4))


def test_mask_function_v4_cache_position_keyword_and_positional():
    mask_fn = make_mask_function()
    padding = torch.ones(2, 12, dtype=torch.long)
    padding[0, :2] = 0
    cache_position = torch.arange(8, 12)
    expected = _expected(2, range(8, 12), range(12), padding)
    by_keyword = mask_fn(batch_size=2, cache_position=cache_position, kv_length=12, kv_offset=0,
                         mask_function=ta.masks.causal_mask, attention_mask=padding, local_size=None)
    by_position = mask_fn(2, cache_position, 12, 0, ta.masks.causal_mask, padding)
    for bm in (by_keyword, by_position):
        assert bm.seq_lengths == (4, 12)
        assert torch.equal(_dense(bm, 2), expected)


def test_mask_function_short_padding_and_no_padding():
    mask_fn = make_mask_function()
    short = torch.ones(1, 5, dtype=torch.long)          # a static cache longer than the mask: unseen = padding
    bm = mask_fn(batch_size=1, q_length=5, kv_length=8, mask_function=ta.masks.causal_mask, attention_mask=short)
    assert not _dense(bm, 1)[..., 5:].any()
    full = mask_fn(batch_size=1, q_length=5, kv_length=5, mask_function=ta.masks.causal_mask,
                   attention_mask=torch.ones(1, 5))
    assert torch.equal(_dense(full, 1), _expected(1, range(5), range(5)))
    default = mask_fn(batch_size=1, q_length=3, kv_length=3)  # no mask_function: causal
    assert torch.equal(_dense(default, 1), _expected(1, range(3), range(3)))


def test_mask_function_passes_a_prepared_mask_through():
    mask_fn = make_mask_function()
    prepared = mask_fn(batch_size=1, q_length=4, kv_length=4)
    assert prepared.ndim == 4  # what transformers checks to recognise a prepared mask
    assert mask_fn(batch_size=1, q_length=4, kv_length=4, attention_mask=prepared) is prepared


@pytest.mark.parametrize("combine", ["and", "or", "replace"])
def test_mask_function_combines_user_mask_mod(combine):
    ids = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2]])
    doc = document_mask(ids)
    bm = make_mask_function(doc, combine=combine)(batch_size=1, q_length=8, kv_length=8,
                                                  mask_function=ta.masks.causal_mask, attention_mask=None)
    causal = _expected(1, range(8), range(8))
    same_doc = (ids[0].view(-1, 1) == ids[0].view(1, -1)).expand(1, 1, 8, 8)
    expected = {"and": causal & same_doc, "or": causal | same_doc, "replace": same_doc}[combine]
    assert torch.equal(_dense(bm, 1), expected)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(batch_size=2, q_length=4, kv_length=4, attention_mask=torch.ones(2, 1, 4, 4)), ValueError, "2-D padding"),
    (dict(batch_size=2, q_length=4, kv_length=4, attention_mask=torch.ones(3, 4)), ValueError, "batch size 3"),
    (dict(batch_size=2, kv_length=4), TypeError, "q_length .* or cache_position"),
    (dict(batch_size=2, q_length=4), TypeError, "kv_length is required"),
    (dict(batch_size=2, q_length=4, kv_length=4, q_offset=-1), ValueError, "q_offset must be >= 0"),
    (dict(batch_size=2, q_length=4, kv_length=4, mask_function=5), TypeError, "mask_function must be a callable"),
])
def test_mask_function_errors(kwargs, error, message):
    with pytest.raises(error, match=message):
        make_mask_function()(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Attention function contract, against a float64 golden computed here
# ---------------------------------------------------------------------------------------------------------------

class Module(torch.nn.Module):
    def __init__(self, groups=1, is_causal=True):
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, is_causal


def golden(q, k, v, allowed=None, scale=None, softcap=None, sinks=None, bias=None):
    """float64 reference: [B, H, Lq, D] -> [B, Lq, H, Dv]."""
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q @ k.transpose(-1, -2) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias.double()
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        scores = torch.cat([scores, sinks.double().view(1, -1, 1, 1).expand(*scores.shape[:3], 1)], -1)
    weights = torch.softmax(scores, -1).nan_to_num(0.0)
    if sinks is not None:
        weights = weights[..., :-1]
    return (weights @ v).transpose(1, 2)


def _qkv(batch=2, q_heads=4, kv_heads=2, q_len=9, kv_len=9, dim=16, scale=1.0):
    return (torch.randn(batch, q_heads, q_len, dim) * scale, torch.randn(batch, kv_heads, kv_len, dim) * scale,
            torch.randn(batch, kv_heads, kv_len, dim))


def _causal(q_len, kv_len, window=None):
    q = torch.arange(q_len).view(-1, 1) + kv_len - q_len
    kv = torch.arange(kv_len).view(1, -1)
    allowed = kv <= q
    if window is not None:
        allowed &= q - kv < window
    return allowed


triton_fn = make_attention_function(ignore_keywords=("unknown_kwarg",))  # an opted-in unknown keyword


@pytest.mark.parametrize("q_len, kv_len", [(9, 9), (1, 9), (3, 9)])
@pytest.mark.parametrize("window", [None, 3])
def test_attention_function_causal_window_gqa(q_len, kv_len, window):
    q, k, v = _qkv(q_len=q_len, kv_len=kv_len, scale=2.0)
    out, weights = triton_fn(Module(groups=2), q, k, v, None, scaling=0.3, sliding_window=window, dropout=0.0,
                             unknown_kwarg=object())
    assert weights is None and out.shape == (2, q_len, 4, 16) and out.is_contiguous()
    torch.testing.assert_close(out.double(), golden(q, k, v, _causal(q_len, kv_len, window), scale=0.3),
                               atol=2e-5, rtol=1e-4)


def test_attention_function_not_causal():
    q, k, v = _qkv(scale=2.0)
    expected = golden(q, k, v)
    for module, kwargs in ((Module(2, is_causal=False), {}), (Module(2), {"is_causal": False})):
        out, _ = triton_fn(module, q, k, v, None, **kwargs)
        torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=1e-4)


def test_attention_function_softcap_and_sinks():
    q, k, v = _qkv(scale=3.0)
    sinks = torch.randn(4) * 2
    out, _ = triton_fn(Module(2), q, k, v, None, softcap=2.5, s_aux=sinks)
    torch.testing.assert_close(out.double(), golden(q, k, v, _causal(9, 9), softcap=2.5, sinks=sinks),
                               atol=2e-5, rtol=1e-4)
    ref, _ = eager_attention_function(Module(2), q, k, v, None, softcap=2.5, s_aux=sinks)
    torch.testing.assert_close(ref.double(), golden(q, k, v, _causal(9, 9), softcap=2.5, sinks=sinks),
                               atol=2e-5, rtol=1e-4)


def test_attention_function_sinks_gradients():
    """Gradients reach q/k through the sink renormalisation (the lse) and reach the sinks themselves."""
    q, k, v = (t.requires_grad_() for t in _qkv(scale=2.0))
    sinks = (torch.randn(4) * 2).requires_grad_()
    grad = torch.randn(2, 9, 4, 16)
    ours = torch.autograd.grad((triton_fn(Module(2), q, k, v, None, s_aux=sinks)[0] * grad).sum(), (q, k, v, sinks))
    ref = torch.autograd.grad((golden(q, k, v, _causal(9, 9), sinks=sinks) * grad).sum(), (q, k, v, sinks))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.double(), b.double(), atol=5e-5, rtol=1e-4)


def test_attention_function_with_block_mask_from_mask_function():
    """Decode over a padded cache: the mask function's BlockMask drives the call; a user score_mod
    sees absolute positions (q_offset), the same ones the mask_mod saw."""
    q, k, v = _qkv(q_len=1, kv_len=10, scale=2.0)
    padding = torch.ones(2, 10, dtype=torch.bool)
    padding[0, :3] = False
    bm = make_mask_function()(batch_size=2, q_length=1, kv_length=10, q_offset=9, kv_offset=0,
                              mask_function=ta.masks.causal_mask, attention_mask=padding)
    alibi = alibi_score(4)
    fn = make_attention_function(alibi)
    out, _ = fn(Module(2), q, k, v, bm, sliding_window=2)  # the window kwarg is ignored: the mask decides
    slopes = torch.tensor([2 ** (-8 * (h + 1) / 4) for h in range(4)]).view(1, 4, 1, 1)
    bias = slopes * (torch.arange(10).view(1, 1, 1, -1) - 9)
    allowed = padding.view(2, 1, 1, 10)
    torch.testing.assert_close(out.double(), golden(q, k, v, allowed, bias=bias), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("q_len", [20, 1])
def test_attention_function_on_the_interpret_backend(q_len):
    """The same function on the Triton kernels (interpreter on CPU): padding + window from the mask
    function, GQA, softcap and sinks, prefill and one decode step."""
    pytest.importorskip("triton")
    q, k, v = _qkv(q_len=q_len, kv_len=20, scale=2.0)
    sinks = torch.randn(4)
    padding = torch.ones(2, 20, dtype=torch.bool)
    padding[0, :5] = False
    bm = make_mask_function()(batch_size=2, q_length=q_len, kv_length=20, q_offset=20 - q_len,
                              mask_function=sliding_window_mask(6), attention_mask=padding)
    out, _ = make_attention_function(backend="interpret")(Module(2), q, k, v, bm, softcap=3.0, s_aux=sinks)
    allowed = _causal(q_len, 20, window=6) & padding.view(2, 1, 1, 20)
    torch.testing.assert_close(out.double(), golden(q, k, v, allowed, softcap=3.0, sinks=sinks),
                               atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("q_len", [20, 1])
def test_attention_function_chains_softcap_bias_and_a_score_mod_on_the_interpret_backend(q_len):
    """softcap, then a dense float mask's bias, then a score_mod reading a captured tensor at absolute positions
    (queries are the last q_len keys), on the Triton kernels (interpreter on CPU)."""
    pytest.importorskip("triton")
    q, k, v = _qkv(q_len=q_len, kv_len=20, scale=2.0)
    slopes = torch.rand(4)

    def sloped(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    additive = torch.randn(2, 1, q_len, 20)
    additive[0, ..., :5] = -1e9  # padding: a large negative bias
    out, _ = make_attention_function(sloped, backend="interpret")(Module(2), q, k, v, additive, softcap=3.0)
    distance = torch.arange(20).view(1, -1) - torch.arange(20 - q_len, 20).view(-1, 1)
    bias = additive + slopes.view(1, 4, 1, 1) * distance
    torch.testing.assert_close(out.double(), golden(q, k, v, softcap=3.0, bias=bias), atol=2e-5, rtol=1e-4)


def test_attention_function_dense_masks():
    q, k, v = _qkv(scale=2.0)
    allowed = torch.rand(2, 1, 9, 9) > 0.3
    out, _ = triton_fn(Module(2), q, k, v, allowed)
    torch.testing.assert_close(out.double(), golden(q, k, v, allowed), atol=2e-5, rtol=1e-4)
    additive = torch.zeros(2, 1, 9, 9).masked_fill(~allowed, torch.finfo(torch.float32).min)
    out, _ = triton_fn(Module(2), q, k, v, additive)
    torch.testing.assert_close(out.double(), golden(q, k, v, allowed), atol=2e-5, rtol=1e-4)


def test_attention_function_errors():
    q, k, v = _qkv()
    training = Module(2).train()
    with pytest.raises(ValueError, match="dropout=0.1 is not supported"):
        triton_fn(training, q, k, v, None, dropout=0.1)
    triton_fn(Module(2).eval(), q, k, v, None, dropout=0.1)  # inference: dropout is off anyway
    triton_fn(training, q, k, v, None, dropout=0.0)
    with pytest.raises(ValueError, match="num_key_value_groups=3"):
        triton_fn(Module(3), q, k, v, None)
    with pytest.raises(ValueError, match="4-D tensor"):
        triton_fn(Module(2), q[0], k, v, None)
    with pytest.raises(TypeError, match="attention_mask must be a BlockMask"):
        triton_fn(Module(2), q, k, v, "causal")
    with pytest.raises(ValueError, match="s_aux must hold one sink logit per query head"):
        triton_fn(Module(2), q, k, v, None, s_aux=torch.zeros(3))


def test_output_attentions_warns_and_returns_none():
    q, k, v = _qkv()
    fn = make_attention_function()
    with pytest.warns(UserWarning, match="never materialise attention weights"):
        _, weights = fn(Module(2), q, k, v, None, output_attentions=True)
    assert weights is None


# ---------------------------------------------------------------------------------------------------------------
# README: the registry section's examples stay runnable
# ---------------------------------------------------------------------------------------------------------------

def readme_blocks():
    text = (ROOT / "README.md").read_text()
    section = re.search(r"<!-- registry:begin -->(.*?)<!-- registry:end -->", text, re.S)
    assert section, "README.md lacks the registry section markers"
    return [textwrap.dedent(block) for block in re.findall(r"```python\n(.*?)```", section.group(1), re.S)]


def test_readme_registry_examples_run():
    blocks = readme_blocks()
    assert len(blocks) >= 5, "the registry section should show the register / switch / per-backbone / " \
                             "kwargs / ALL_ATTENTION_FUNCTIONS / mask interface flows"
    has_transformers = importlib.util.find_spec("transformers") is not None
    runnable = [b for b in blocks if has_transformers or "transformers" not in b]
    script = "\n\n".join(f"# --- block {i}\n{block}" for i, block in enumerate(runnable))
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "2",
                                 "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"})
    assert result.returncode == 0, f"README example failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    if len(runnable) < len(blocks):
        pytest.skip(f"{len(blocks) - len(runnable)} README blocks need transformers")
