"""``triton_attn.settings``: every TRITON_ATTN_* variable read at call time, one cache-directory rule,
and caches that cannot be written (read-only, a file, corrupt modules) or are shared between users."""

from __future__ import annotations

import os
import stat
import warnings
from pathlib import Path

import pytest
import torch

import triton_attn as ta
from triton_attn import settings


def test_variables_are_read_at_call_time(monkeypatch):
    monkeypatch.delenv(settings.BACKEND, raising=False)
    monkeypatch.delenv(settings.AUTOTUNE, raising=False)
    assert settings.backend() is None and settings.autotune() is False and settings.gpu_refine() is True
    monkeypatch.setenv(settings.BACKEND, "interpret")
    monkeypatch.setenv(settings.AUTOTUNE, "yes")
    monkeypatch.setenv(settings.GPU_REFINE, "0")
    assert settings.backend() == "interpret" and settings.autotune() is True and settings.gpu_refine() is False
    # ...and by the API, on the next call
    from triton_attn.dispatch import choose_backend

    assert choose_backend(None, torch.device("cpu")) == "interpret"
    monkeypatch.setenv(settings.BACKEND, "torch")
    assert choose_backend(None, torch.device("cpu")) == "torch"


def test_one_cache_dir_rule_for_kernels_and_tuning(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(settings.CACHE_DIR, raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert settings.cache_dir() == tmp_path / "home" / ".cache" / "triton_attn"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert settings.cache_dir() == tmp_path / "xdg" / "triton_attn"
    monkeypatch.setenv(settings.CACHE_DIR, str(tmp_path / "explicit"))
    assert settings.cache_dir() == tmp_path / "explicit"
    # kernels and tuning follow the same rule
    monkeypatch.delenv(settings.CACHE_DIR)
    from triton_attn.kernels.jit.modules import cache_dir as modules_dir
    from triton_attn.kernels.tuning.cache import TuningCache

    assert modules_dir() == tmp_path / "xdg" / "triton_attn" / "kernels"
    assert TuningCache().path == tmp_path / "xdg" / "triton_attn" / "autotune.json"


def _fresh_mask(tag: int):
    """A causal-like mask_mod whose graph no other test generates (so a module must be written now)."""
    def fresh(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) | (kv_idx == 7919 + tag)

    return fresh


def _interpreted_attention(mask_mod):
    q, k, v = (torch.randn(1, 1, 32, 16) for _ in range(3))
    block_mask = ta.create_block_mask(mask_mod, None, None, 32, 32, BLOCK_SIZE=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # not the one under test: caught separately below
        dense = ta.create_mask(mask_mod, 1, 1, 32, 32)
    expected = torch.softmax((q @ k.transpose(-1, -2) / 4.0).masked_fill(~dense, float("-inf")), -1) @ v
    out = ta.attention(q, k, v, block_mask=block_mask, backend="interpret")
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["a file", "read-only"])
def test_unusable_cache_dir_falls_back_to_a_private_dir_with_one_warning(kind, tmp_path, monkeypatch):
    pytest.importorskip("triton")
    target = tmp_path / "cache"
    if kind == "a file":
        target.write_text("not a directory")
    else:
        target.mkdir()
        target.chmod(stat.S_IRUSR | stat.S_IXUSR)
        if os.access(target, os.W_OK):  # root ignores permission bits
            pytest.skip("the permission bits do not stop this user (root) from writing")
    monkeypatch.setenv(settings.CACHE_DIR, str(target))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _interpreted_attention(_fresh_mask(1 if kind == "a file" else 2))
        _interpreted_attention(_fresh_mask(3 if kind == "a file" else 4))  # a second module: no second warning
    cache_warnings = [w for w in caught if issubclass(w.category, settings.CacheDirWarning)]
    assert len(cache_warnings) == 1, [str(w.message) for w in caught]
    assert "TRITON_ATTN_CACHE_DIR" in str(cache_warnings[0].message) and str(target) in str(cache_warnings[0].message)
    if kind == "a file":
        assert target.read_text() == "not a directory"


@pytest.mark.parametrize("garbage", [b"\xff\xfe\x00 not utf-8 \x80\x81", b"def mask_mod(:\n", b""])
def test_corrupt_generated_module_is_rewritten(garbage, tmp_path, monkeypatch):
    pytest.importorskip("triton")
    from triton_attn.kernels.jit import functions
    from triton_attn.masks.tracing import trace_mask_mod

    monkeypatch.setenv(settings.CACHE_DIR, str(tmp_path))
    traced = trace_mask_mod(_fresh_mask(10 + len(garbage)))
    key = functions.functions_key(functions.MASK_TRACED, traced, None, False)
    path = tmp_path / "kernels" / f"mods_{key}.py"
    path.parent.mkdir(parents=True)
    path.write_bytes(garbage)  # what a crash or a disk error left behind
    _interpreted_attention(_fresh_mask(10 + len(garbage)))
    assert path.read_text(encoding="utf-8") == functions.module_source(functions.MASK_TRACED, traced, None, False)[0]


def test_cache_files_respect_the_umask(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    from triton_attn.kernels.tuning.cache import TuningCache

    monkeypatch.setenv(settings.CACHE_DIR, str(tmp_path / "shared"))
    previous = os.umask(0o002)  # a group-shared cache
    try:
        _interpreted_attention(_fresh_mask(20))
        TuningCache().put("key", {"BLOCK_M": 64}, ms=1.0)
    finally:
        os.umask(previous)
    files = [p for p in (tmp_path / "shared").rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert any(p.suffix == ".py" for p in files) and any(p.name == "autotune.json" for p in files)
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o664, f"{path}: {oct(path.stat().st_mode)}"


def test_suite_writes_no_cache_into_home():
    """The autouse session fixture of conftest.py points every cache at a temporary folder."""
    home_cache = Path(os.path.expanduser("~")) / ".cache" / "triton_attn"
    assert settings.cache_dir() != home_cache
    assert not str(settings.cache_dir()).startswith(os.path.expanduser("~") + os.sep + ".cache")
