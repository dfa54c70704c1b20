"""Options of the registry tests.

``--sweep-all``: run every check of every architecture in ``test_architecture_sweep.py`` (by default:
every architecture's logits, and gradients and generate for a hashed sample). The environment variable
``TRITON_ATTN_SWEEP=all`` does the same, also where this option is not registered: pytest registers a
conftest's options only when its folder is on the command line (``pytest tests/registry --sweep-all``).
Both are read by ``architecture_sweep.sweep_everything``.
"""

from __future__ import annotations


def pytest_addoption(parser):
    parser.addoption("--sweep-all", action="store_true", default=False,
                     help="architecture sweep: every check of every transformers architecture (also "
                          "TRITON_ATTN_SWEEP=all); default: logits of all, gradients and generate of a hashed sample")
