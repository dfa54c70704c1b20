"""The registries of ``triton_attn.registry`` (``interface``), their built-in names (``defaults``: made on the
first lookup, never at import), and ``register_attention`` (no transformers needed; see
test_transformers_integration.py for real models)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from triton_attn.masks import alibi_score, sliding_window_mask
from triton_attn.registry import (
    ALL_ATTENTION_FUNCTIONS,
    ALL_MASK_ATTENTION_FUNCTIONS,
    AttentionInterface,
    AttentionMaskInterface,
    MissingMaskFunctionWarning,
    eager_attention_function,
    register_attention,
)

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

def _run_fresh(code: str) -> None:
    """Run ``code`` in a fresh interpreter (nothing of triton_attn imported yet); fail with its stderr."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr


def test_importing_triton_attn_does_not_import_transformers():
    _run_fresh("""
        import sys, triton_attn, triton_attn.registry, triton_attn.models
        assert 'transformers' not in sys.modules, 'transformers was imported'
        assert 'triton_attn' in triton_attn.registry.ALL_ATTENTION_FUNCTIONS
    """)


def test_importing_the_registry_registers_nothing_until_the_first_lookup():
    """Import has no side effect on the registries; the first lookup by a built-in name makes the built-ins,
    as transformers users expect of ``AttentionInterface()[name]``, and they compute attention."""
    _run_fresh("""
        import sys
        import torch
        import triton_attn.registry as registry

        assert "triton_attn.models" not in sys.modules, "the registry imported the models built on it"
        assert registry.AttentionInterface._global_mapping == {}, registry.AttentionInterface._global_mapping
        assert registry.AttentionMaskInterface._global_mapping == {}, registry.AttentionMaskInterface._global_mapping
        from triton_attn.registry import defaults
        assert not defaults.builtins_made()
        ours = registry.AttentionInterface()["triton_attn"]            # the first lookup, by name
        assert defaults.builtins_made()
        assert registry.ALL_ATTENTION_FUNCTIONS["triton_attn"] is ours  # made once
        assert registry.ALL_MASK_ATTENTION_FUNCTIONS["sdpa"] is registry.dense_mask_function
        assert set(registry.ALL_MASK_ATTENTION_FUNCTIONS) == {"triton_attn", "sdpa", "eager"}
        assert registry.AttentionInterface._global_mapping == {}      # built-ins are not registrations

        class Layer(torch.nn.Module):
            num_key_value_groups, is_causal = 2, True

        query, key, value = torch.randn(2, 4, 12, 16), torch.randn(2, 2, 12, 16), torch.randn(2, 2, 12, 16)
        out, _ = ours(Layer(), query, key, value, None, scaling=0.25)
        expected, _ = registry.ALL_ATTENTION_FUNCTIONS["sdpa"](Layer(), query, key, value, None, scaling=0.25)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    """)


def test_a_registration_made_before_the_first_lookup_wins_over_the_builtin():
    _run_fresh("""
        import warnings
        from triton_attn.registry import (ALL_ATTENTION_FUNCTIONS, ALL_MASK_ATTENTION_FUNCTIONS, AttentionInterface,
                                          dense_mask_function)

        def mine(module, query, key, value, attention_mask, **kwargs):
            return query.transpose(1, 2), None

        warnings.simplefilter("error")              # the built-in mask function stays paired: no warning
        AttentionInterface.register("sdpa", mine)
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is mine
        assert ALL_MASK_ATTENTION_FUNCTIONS["sdpa"] is dense_mask_function
        AttentionInterface.unregister("sdpa")       # back to the built-in
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is not mine
    """)


def test_registry_uses_public_api_only():
    """Layering: registry/ imports triton_attn's top level and triton_attn.masks, never kernels or internals,
    and never the models built on it (triton_attn.models)."""
    for path in (ROOT / "triton_attn" / "registry").glob("*.py"):
        text = path.read_text()
        for source in re.findall(r"^\s*from\s+(\S+)\s+import", text, re.M):
            if source.startswith(".."):
                assert source in ("..", "..masks"), f"{path.name} imports from {source}"
            assert "kernels" not in source, f"{path.name} imports from {source}"
            assert not re.match(r"(\.\.|triton_attn\.)models\b", source), f"{path.name} imports from {source}"
        assert not re.search(r"^\s*import\s+triton_attn\.models", text, re.M), f"{path.name} imports models"


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
    assert interface.get_interface("eager", ok_attention) is eager_attention_function  # built in
    with pytest.raises(KeyError, match="nope"):
        interface.get_interface("nope", ok_attention)

    class WithoutBuiltins(AttentionInterface):  # as transformers' interface, which has no "eager" entry
        _global_mapping = {}

        @classmethod
        def builtins(cls):
            return {}

    bare = WithoutBuiltins()
    assert "eager" not in bare and bare.get_interface("eager", ok_attention) is ok_attention
    with pytest.raises(KeyError, match="triton_attn"):
        bare.get_interface("triton_attn", ok_attention)


def test_builtins_cannot_be_unregistered_but_can_be_shadowed():
    builtin = ALL_ATTENTION_FUNCTIONS["sdpa"]
    with pytest.raises(KeyError, match="'sdpa' is not registered .*built in: register another function"):
        AttentionInterface.unregister("sdpa")
    AttentionInterface.register("sdpa", ok_attention)
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is ok_attention and AttentionInterface()["sdpa"] is ok_attention
    AttentionInterface.unregister("sdpa")
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is builtin
    assert list(ALL_ATTENTION_FUNCTIONS).count("sdpa") == 1


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
