"""Options of the registry tests.

``--sweep-all``: run every check of every architecture in ``test_architecture_sweep.py`` (by default:
every architecture's logits, and gradients and generate for a hashed sample). The environment variable
``TRITON_ATTN_SWEEP=all`` does the same, also where this option is not registered: pytest registers a
conftest's options only when its folder is on the command line (``pytest tests/registry --sweep-all``).
Both are read by ``architecture_sweep.sweep_everything``.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser):
    parser.addoption("--sweep-all", action="store_true", default=False,
                     help="architecture sweep: every check of every transformers architecture (also "
                          "TRITON_ATTN_SWEEP=all); default: logits of all, gradients and generate of a hashed sample")


@pytest.fixture
def transformers_registered():
    """"triton_attn" registered in transformers (and ours); every global mapping restored afterwards.
    Test modules that need it use it autouse: ``pytestmark = pytest.mark.usefixtures(...)``."""
    import transformers

    from triton_attn.registry import AttentionInterface, AttentionMaskInterface, register_transformers

    mappings = [transformers.AttentionInterface._global_mapping, transformers.AttentionMaskInterface._global_mapping,
                AttentionInterface._global_mapping, AttentionMaskInterface._global_mapping]
    saved = [dict(m) for m in mappings]
    register_transformers()
    yield
    for mapping, old in zip(mappings, saved):
        mapping.clear()
        mapping.update(old)
