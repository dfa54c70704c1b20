"""The mask function and the attention function of ``triton_attn.registry`` (the registries themselves:
test_interface.py).

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
from pathlib import Path

import pytest
import torch

import triton_attn as ta
from triton_attn.masks import alibi_score, document_mask, sliding_window_mask
from triton_attn.registry import ModelBlockMask, eager_attention_function, make_attention_function, make_mask_function

ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("restore_registries")


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
    with pytest.raises(ValueError, match="dropout must be a probability"):
        triton_fn(training, q, k, v, None, dropout=1.5)
    plain = triton_fn(training, q, k, v, None, dropout=0.0)[0]
    # inference: dropout is off anyway; training: the dropout is applied (tests/registry/test_model_dropout.py)
    torch.testing.assert_close(triton_fn(Module(2).eval(), q, k, v, None, dropout=0.5)[0], plain)
    assert not torch.allclose(triton_fn(training, q, k, v, None, dropout=0.5)[0], plain)
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
