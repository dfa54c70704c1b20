"""The custom ops (triton_attn/ops.py), the launch path without device reads, the CPU fast path's
handling of masked-out NaN keys, and meta tensors."""

import contextlib
import inspect

import pytest
import torch

import triton_attn as ta
from tests.helpers.numerics import random_qkv
from triton_attn import ops
from triton_attn.masks import and_masks, causal_mask, document_mask, padding_mask, sliding_window_mask, softcap_score
from triton_attn.mod_table import register_mod, resolve_mod
from triton_attn.reference import dense_attention

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _op_args(q, k, v, block_mask, score_mod=None, route="torch/blockwise/blockwise"):
    """The forward op's arguments; ``route``: the ``dispatch.Route`` token (backend/family/backward)."""
    layout, ints = ops.flatten_block_mask(block_mask)
    mask_key, mask_captured = register_mod(block_mask.mask_mod, "mask")
    score_key, score_captured = register_mod(score_mod, "score")
    return (q, k, v, layout, ints, mask_key, mask_captured, score_key, score_captured, 0.25, route, -1)


CASES = ("causal", "document_softcap", "sliding")


def _case(name, device="cpu"):
    """(mask_mod, score_mod) of a named case."""
    if name == "causal":
        return causal_mask, None
    if name == "sliding":
        return sliding_window_mask(9), None
    ids = torch.tensor([0] * 20 + [1] * 30 + [2] * 14, device=device)
    return and_masks(causal_mask, document_mask(ids)), softcap_score(3.0)


@pytest.mark.parametrize("name", CASES)
def test_opcheck_forward_and_backward_torch_backend(name):
    mask_mod, score_mod = _case(name)
    q, k, v = random_qkv(1, 2, 1, 64, 64, 16)
    block_mask = ta.create_block_mask(mask_mod, None, None, 64, 64, BLOCK_SIZE=16)
    args = _op_args(*(t.requires_grad_() for t in (q, k, v)), block_mask, score_mod)
    torch.library.opcheck(torch.ops.triton_attn.attention_forward.default, args)
    out, lse, stats = torch.ops.triton_attn.attention_forward(*args)
    assert stats.numel() == 0  # the torch backend's backward recomputes everything
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    backward_args = (*(t.detach() for t in (q, k, v, out, lse)), grad_out, grad_lse, *args[3:], stats)
    torch.library.opcheck(torch.ops.triton_attn.attention_backward.default, backward_args,
                          test_utils=("test_schema", "test_faketensor"))


def test_opcheck_interpret_backend():
    q, k, v = random_qkv(1, 2, 2, 32, 32, 16)
    block_mask = ta.create_block_mask(causal_mask, None, None, 32, 32, BLOCK_SIZE=16)
    for save_stats in (False, True):  # with the Triton backward, the softmax statistics are a third output
        route = "interpret/prefill/kernels" if save_stats else "interpret/prefill/none"
        args = _op_args(q, k, v, block_mask, softcap_score(3.0), route=route)
        torch.library.opcheck(torch.ops.triton_attn.attention_forward.default, args,
                              test_utils=("test_schema", "test_faketensor"))
        assert torch.ops.triton_attn.attention_forward(*args)[2].shape == ((1, 2, 32, 2) if save_stats else (0,))


def _kernels_have_dropout() -> bool:
    from triton_attn.kernels import entry

    return "dropout" in inspect.signature(entry.prefill_forward).parameters


@pytest.mark.parametrize("route", ["torch/blockwise/blockwise", "interpret/prefill/kernels"])
def test_opcheck_with_dropout(route):
    """The dropout arguments (p as a float, the seed as an int64 [1] tensor), forward and backward: the
    backward op regenerates the forward's keep decisions, so its gradients are those of the forward."""
    if route.startswith("interpret") and not _kernels_have_dropout():
        pytest.skip("the Triton kernels have no dropout yet (kernels/entry.py)")
    q, k, v = random_qkv(1, 2, 1, 48, 48, 16)
    block_mask = ta.create_block_mask(causal_mask, None, None, 48, 48, BLOCK_SIZE=16)
    seed = torch.tensor([20251207], dtype=torch.int64)
    args = (*_op_args(*(t.requires_grad_() for t in (q, k, v)), block_mask, softcap_score(3.0), route=route), 0.3, seed)
    torch.library.opcheck(torch.ops.triton_attn.attention_forward.default, args)
    out, lse, stats = torch.ops.triton_attn.attention_forward(*args)
    no_dropout, _, _ = torch.ops.triton_attn.attention_forward(*args[:-2])
    assert not torch.equal(out, no_dropout)
    grad_out = torch.randn_like(out)
    backward_args = (*(t.detach() for t in (q, k, v, out, lse)), grad_out, None, *args[3:-2], stats, 0.3, seed)
    torch.library.opcheck(torch.ops.triton_attn.attention_backward.default, backward_args,
                          test_utils=("test_schema", "test_faketensor"))
    expected = torch.autograd.grad(out, (q, k, v), grad_out)
    for got, want in zip(torch.ops.triton_attn.attention_backward(*backward_args), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@needs_cuda
@pytest.mark.parametrize("name", CASES)
def test_opcheck_triton_backend(name):
    mask_mod, score_mod = _case(name, "cuda")
    q, k, v = (t.cuda() for t in random_qkv(1, 2, 1, 64, 64, 16))
    block_mask = ta.create_block_mask(mask_mod, None, None, 64, 64, BLOCK_SIZE=16, device="cuda")
    args = _op_args(*(t.requires_grad_() for t in (q, k, v)), block_mask, score_mod, route="triton/prefill/kernels")
    torch.library.opcheck(torch.ops.triton_attn.attention_forward.default, args)


def test_mods_of_one_structure_share_a_key_and_take_their_own_tensors():
    """Two document masks over different ids: one table entry, and each call sees its own ids."""
    first, second = torch.arange(64) // 16, torch.arange(64) // 40
    key_a, captured_a = register_mod(document_mask(first), "mask")
    key_b, captured_b = register_mod(document_mask(second), "mask")
    assert key_a == key_b and captured_a[0] is first and captured_b[0] is second
    q, k, v = random_qkv(1, 2, 2, 64, 64, 16)
    for ids in (first, second):
        block_mask = ta.create_block_mask(document_mask(ids), None, None, 64, 64, BLOCK_SIZE=16)
        out = ta.attention(q, k, v, block_mask=block_mask)
        golden, _ = dense_attention(q, k, v, mask_mod=document_mask(ids), compute_dtype=torch.float64)
        torch.testing.assert_close(out.double(), golden, rtol=0, atol=1e-5)


def test_bound_mod_evaluates_the_graph_with_new_tensors():
    ids = torch.arange(40) // 10
    key, _ = register_mod(document_mask(ids), "mask")
    other = torch.arange(40) // 25
    bound = resolve_mod(key, [other])
    grid = (torch.zeros(1, 1, 1, 1, dtype=torch.long),) * 2 + (torch.arange(40).view(1, 1, -1, 1),
                                                              torch.arange(40).view(1, 1, 1, -1))
    torch.testing.assert_close(bound(*grid), document_mask(other)(*grid))


class _ThresholdMod(ta.masks.StructuredMod):
    """An untraceable StructuredMod (a tensor method the tracer does not know): evaluated eagerly."""

    def __init__(self, threshold):
        self.threshold = threshold

    def __call__(self, b, h, q_idx, kv_idx):
        return kv_idx.float().nextafter(kv_idx.float()) <= q_idx + self.threshold  # nextafter(x, x) == x

    def structure(self):
        return ()

    def tensors(self):
        return (self.threshold,)

    @classmethod
    def build(cls, structure, tensors):
        return cls(tensors[0])


def test_an_untraceable_structured_mod_carries_its_tensors_and_is_rebuilt_over_new_ones():
    """Keyed by identity (no trace), yet its tensors travel: resolve_mod rebuilds it over the ones it is given."""
    mod, other = _ThresholdMod(torch.tensor(1)), torch.tensor(0)
    key, captured = register_mod(mod, "mask")
    assert "/eager/" in key and captured[0] is mod.threshold
    assert resolve_mod(key, captured) is mod
    rebuilt = resolve_mod(key, [other])
    assert isinstance(rebuilt, _ThresholdMod) and rebuilt.threshold is other
    q_idx, kv_idx = torch.arange(8).view(-1, 1), torch.arange(8).view(1, -1)
    assert torch.equal(rebuilt(0, 0, q_idx, kv_idx), kv_idx <= q_idx)


# ---------------------------------------------------------------------------------------------
# No device reads on the launch path
# ---------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _raise_on_device_reads(monkeypatch):
    """Make ``Tensor.item``/``int()``/``float()``/``bool()``/``tolist`` raise (CPU stand-in for a sync)."""
    reads = []

    def refuse(name):
        def read(self, *args, **kwargs):
            reads.append(name)
            raise AssertionError(f"Tensor.{name} called on the launch path")
        return read

    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "__int__", "__float__", "__bool__", "__index__"):
            patch.setattr(torch.Tensor, name, refuse(name))
        yield reads


@pytest.mark.parametrize("mask", ["causal_softcap", "none"])
def test_interpret_launch_path_reads_no_tensor_values(monkeypatch, mask):
    """The forward launch (plan, kernel choice, arguments, grid) reads no tensor value: the kernel
    itself is replaced, so the patched reads see only the launch code (the interpreter's own
    numpy conversions are not a device sync)."""
    pytest.importorskip("triton")
    from triton_attn.kernels.attention import forward_launch
    from triton_attn.kernels.tuning import search

    q, k, v = random_qkv(1, 2, 2, 48, 48, 16)
    block_mask = ta.create_block_mask(causal_mask, None, None, 48, 48, BLOCK_SIZE=16) if mask != "none" \
        else ta.masks.standard.default_block_mask(48, 48, q.device)
    score_mod = softcap_score(3.0) if mask != "none" else None
    forward_launch.attention_forward(q, k, v, block_mask, score_mod=score_mod, scale=0.25, interpret=True)  # warm
    launches = []
    monkeypatch.setattr(forward_launch, "launch", lambda kernel, grid, arguments, **options: launches.append(grid))
    layout, ints = ops.flatten_block_mask(block_mask)
    with _raise_on_device_reads(monkeypatch) as reads:
        forward_launch.attention_forward(q, k, v, block_mask, score_mod=score_mod, scale=0.25, interpret=True)
        # The op rebuilds the mask from its tensors and ints on every call; the CUDA launch's tuning
        # key (sparsity class) must not read it either.
        rebuilt = ops.unflatten_block_mask(layout, ints, block_mask.mask_mod)
        search.make_key(q, k, v, rebuilt)
    assert not reads and len(launches) == 1


def test_launch_plan_is_computed_at_build_time():
    block_mask = ta.create_block_mask(causal_mask, None, None, 100, 100, BLOCK_SIZE=16)
    plan = block_mask.__dict__["_launch_plan"]
    assert plan.exact and plan.has_partial_blocks and plan.max_full_blocks == 6 and plan.max_partial_blocks == 1
    assert plan.phases == ("partial", "full")
    assert (ta.masks.standard.default_block_mask(100, 100, "cpu")
            is ta.masks.standard.default_block_mask(100, 100, "cpu"))


# ---------------------------------------------------------------------------------------------
# Masked-out NaN keys stay out of the rows that cannot see them (float32 inference fast path)
# ---------------------------------------------------------------------------------------------
def _nan_case(route, monkeypatch):
    """(q, k, v, mask_mod, batch of the mask) with NaN in keys the mask hides from some rows."""
    from triton_attn.backends.torch import cpu_flash

    if route.startswith("blockwise"):
        monkeypatch.setattr(cpu_flash, "DENSE_BIAS_ELEMENTS", 0)
    q, k, v = random_qkv(2, 2, 2, 96, 96, 16)
    if route.endswith("padding"):
        keep = torch.ones(2, 96, dtype=torch.bool)
        keep[0, :37] = False                                   # left padding of sequence 0
        k[0, :, 5] = float("nan")
        k[0, :, 30] = float("inf")
        return q, k, v, and_masks(causal_mask, padding_mask(keep)), 2
    k[:, :, 3] = float("nan")                                  # hidden from rows 0-2 by causality
    k[:, :, 50] = float("nan")
    return q, k, v, causal_mask, None


@pytest.mark.parametrize("route", ["dense", "dense_padding", "blockwise", "blockwise_padding"])
def test_nan_in_hidden_keys_does_not_leak(monkeypatch, route):
    q, k, v, mask_mod, mask_batch = _nan_case(route, monkeypatch)
    block_mask = ta.create_block_mask(mask_mod, mask_batch, None, 96, 96, BLOCK_SIZE=32)
    with torch.no_grad():
        out, lse = ta.attention(q, k, v, block_mask=block_mask, return_lse=True)
    golden, golden_lse = dense_attention(q, k, v, mask_mod=mask_mod, compute_dtype=torch.float64)
    # NaN exactly where the golden result has it (rows that see a NaN key), nowhere else.
    assert torch.equal(torch.isnan(out), torch.isnan(golden))
    clean = ~torch.isnan(golden)
    assert clean.any()
    torch.testing.assert_close(out[clean].double(), golden[clean], rtol=0, atol=1e-5)
    assert torch.equal(torch.isnan(lse), torch.isnan(golden_lse))


def test_fast_path_is_taken_for_batch_dependent_padding(monkeypatch):
    from triton_attn.backends.torch import cpu_flash

    calls = []
    original = cpu_flash.fused_attention
    monkeypatch.setattr(cpu_flash, "fused_attention", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    q, k, v = random_qkv(2, 4, 2, 80, 80, 16)
    keep = torch.arange(80).view(1, -1) >= torch.tensor([0, 30]).view(-1, 1)
    mod = and_masks(causal_mask, padding_mask(keep))
    for elements in (cpu_flash.DENSE_BIAS_ELEMENTS, 0):
        monkeypatch.setattr(cpu_flash, "DENSE_BIAS_ELEMENTS", elements)
        with torch.no_grad():
            out, lse = ta.attention(q, k, v, block_mask=ta.create_block_mask(mod, 2, None, 80, 80, BLOCK_SIZE=16),
                                    return_lse=True, enable_gqa=True)
        golden, golden_lse = dense_attention(q, k, v, mask_mod=mod, compute_dtype=torch.float64)
        torch.testing.assert_close(out.double(), golden, rtol=0, atol=1e-5)
        torch.testing.assert_close(lse.double(), golden_lse.double(), rtol=0, atol=1e-5)
    assert len(calls) == 2


# ---------------------------------------------------------------------------------------------
# Meta tensors: shape inference
# ---------------------------------------------------------------------------------------------
def test_attention_on_meta_tensors_infers_shapes():
    q = torch.empty(2, 4, 300, 64, device="meta")
    kv = torch.empty(2, 2, 300, 64, device="meta")
    out, lse = ta.attention(q, kv, kv[..., :32], score_mod=softcap_score(20.0), enable_gqa=True, return_lse=True)
    assert out.device.type == "meta" and out.shape == (2, 4, 300, 32) and out.dtype == q.dtype
    assert lse.shape == (2, 4, 300) and lse.dtype == torch.float32


def test_attention_with_dropout_on_meta_tensors_infers_shapes():
    q = torch.empty(2, 4, 300, 64, device="meta")
    kv = torch.empty(2, 2, 300, 64, device="meta")
    out = ta.attention(q.requires_grad_(), kv, kv, enable_gqa=True, dropout_p=0.1)
    assert out.device.type == "meta" and out.shape == (2, 4, 300, 64)


def test_create_block_mask_on_meta_infers_shapes():
    block_mask = ta.create_block_mask(causal_mask, 2, None, 300, 200, device="meta", BLOCK_SIZE=64)
    assert block_mask.shape == (2, 1, 300, 200) and block_mask.device.type == "meta"
    assert block_mask.kv_indices.shape == (2, 1, 5, 4) and block_mask.q_indices.shape == (2, 1, 4, 5)
    assert not block_mask.launch_plan.exact
    q = torch.empty(2, 2, 300, 16, device="meta")
    k = torch.empty(2, 2, 200, 16, device="meta")
    assert ta.attention(q, k, k, block_mask=block_mask).shape == (2, 2, 300, 16)


@pytest.mark.parametrize("route", ["dense", "dense_padding", "blockwise_padding"])
def test_nan_in_hidden_values_does_not_leak(monkeypatch, route):
    """0 * nan: a NaN value the mask hides gets weight 0, which must not turn into NaN in the output
    (the fast paths see the NaN output and take the exact loop, which keeps it out)."""
    from triton_attn.backends.torch import cpu_flash

    if route.startswith("blockwise"):
        monkeypatch.setattr(cpu_flash, "DENSE_BIAS_ELEMENTS", 0)
    q, k, v = random_qkv(2, 2, 2, 96, 96, 16)
    mask_mod, mask_batch = causal_mask, None
    v[:, :, 40, 3] = float("nan")                               # hidden from rows 0-39 by causality
    if route.endswith("padding"):
        keep = torch.ones(2, 96, dtype=torch.bool)
        keep[0, :37] = False
        v[0, :, 5] = float("nan")                               # padding: hidden from every row
        mask_mod, mask_batch = and_masks(causal_mask, padding_mask(keep)), 2
    block_mask = ta.create_block_mask(mask_mod, mask_batch, None, 96, 96, BLOCK_SIZE=32)
    with torch.no_grad():
        out, lse = ta.attention(q, k, v, block_mask=block_mask, return_lse=True)
    bad = torch.isnan(v)
    golden, golden_lse = dense_attention(q, k, v.masked_fill(bad, 0.0), mask_mod=mask_mod,
                                         compute_dtype=torch.float64)
    # Expected NaN: the rows that may attend to a NaN value, in that value's columns.
    visible = ta.create_mask(mask_mod, 2, 1, 96, 96).double()                      # [B, 1, Lq, Lkv]
    expected_nan = (visible @ bad.double()) > 0                                     # [B, H, Lq, Dv]
    assert expected_nan.any() and not expected_nan.all()
    assert torch.equal(torch.isnan(out), expected_nan)
    clean = ~expected_nan
    torch.testing.assert_close(out[clean].double(), golden[clean], rtol=0, atol=1e-5)
    torch.testing.assert_close(lse.double(), golden_lse.double(), rtol=0, atol=1e-5)
