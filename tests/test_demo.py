"""`triton-attn demo`: the main job runs end to end on CPU and checks itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_ATTN_BACKEND", None)
    return subprocess.run([sys.executable, "-m", "triton_attn.cli", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_demo_runs_checks_and_prints_table():
    result = _run("demo", "--seq-len", "300", "--heads", "2", "--head-dim", "32", "--repeats", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("causal", "sliding window", "document", "prefix-LM"):
        assert name in result.stdout
    assert "SDPA ms" in result.stdout and "FAIL" not in result.stdout
    assert result.stdout.count(" ok") >= 4


def test_demo_bad_argument_is_one_line_exit_2():
    result = _run("demo", "--seq-len", "-5")
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "error" in result.stderr
