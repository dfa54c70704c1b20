"""Shared test setup: Hypothesis profiles, seeding, temporary caches.

Tests are a package (``tests/__init__.py``), so pytest puts the repository root on ``sys.path``:
test modules import the checkout's ``triton_attn`` and the shared ``tests.helpers``.

Hypothesis profiles (select with ``HYPOTHESIS_PROFILE=<name>``; default ``ci``):

- ``ci``: the default; few enough examples that the whole suite stays fast on 2 cores.
- ``dev``: fewer still, for a quick local loop.
- ``thorough``: many more examples, for a nightly run or when hunting a bug.

Every profile has ``deadline=None``: the first call of a test pays for imports and
warm-up, and timing noise on shared CI machines must not fail tests.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
               print_blob=True)
settings.register_profile("ci", max_examples=30, **_COMMON)
settings.register_profile("dev", max_examples=10, **_COMMON)
settings.register_profile("thorough", max_examples=300, **_COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# CPU tests stay on few threads: pytest -n 2 runs two workers side by side.
torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))


@pytest.fixture(autouse=True)
def _seed_torch():
    """Each test draws its own fresh random inputs, reproducibly."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def no_backend_env(monkeypatch):
    """Tests that rely on the default backend choice must not see a developer's TRITON_ATTN_BACKEND."""
    monkeypatch.delenv("TRITON_ATTN_BACKEND", raising=False)
    return monkeypatch


@pytest.fixture
def restore_registries():
    """Tests register names globally; put the class-wide mappings back afterwards."""
    from triton_attn.registry import AttentionInterface, AttentionMaskInterface

    saved = dict(AttentionInterface._global_mapping), dict(AttentionMaskInterface._global_mapping)
    yield
    for cls, mapping in zip((AttentionInterface, AttentionMaskInterface), saved):
        cls._global_mapping.clear()
        cls._global_mapping.update(mapping)


@pytest.fixture(scope="session", autouse=True)
def _private_caches(tmp_path_factory):
    """The whole session writes generated modules and tuning results into one temporary folder,
    never into ``~/.cache`` (tests that need another folder point ``TRITON_ATTN_CACHE_DIR`` elsewhere).
    torch.compile's and Triton's caches too: a compiled graph cached in the machine-wide ``/tmp/torchinductor_*``
    by an earlier checkout keys no custom-op schema, so it would replay that checkout's op calls."""
    root = tmp_path_factory.mktemp("caches")
    names = ("TRITON_ATTN_CACHE_DIR", "XDG_CACHE_HOME", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
    saved = {name: os.environ.get(name) for name in names}
    os.environ["TRITON_ATTN_CACHE_DIR"] = str(root / "triton_attn")
    os.environ["XDG_CACHE_HOME"] = str(root / "xdg")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(root / "triton")
    yield root
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
