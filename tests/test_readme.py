"""Every ```python block of README.md runs (each in a fresh interpreter, imports included).

Markers, an HTML comment on the line(s) just before a block:
- ``<!-- skip-test: REASON -->``: not run here (e.g. it needs CUDA or torchrun); the reason is reported.
- ``<!-- readme-test: continues -->``: the block goes on from the one before it (same interpreter).
Blocks are found automatically, so sections added later are covered without touching this file.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import List, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
FENCE = re.compile(r"^```python[^\n]*\n(.*?)^```", re.S | re.M)
SKIP = re.compile(r"<!--\s*skip-test:\s*(.*?)\s*-->")
CONTINUES = re.compile(r"<!--\s*readme-test:\s*continues\s*-->")


def readme_chains() -> List[Tuple[int, List[str], str]]:
    """[(line of the first block, [block sources], skip reason or "")]: blocks that continue one another
    form one chain."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    chains: List[Tuple[int, List[str], str]] = []
    for match in FENCE.finditer(text):
        before = text[:match.start()].rstrip().rsplit("\n", 3)[-3:]  # the few lines just above the fence
        lead = "\n".join(line for line in before if line.strip().startswith("<!--"))
        line = text.count("\n", 0, match.start()) + 1
        skip = SKIP.search(lead)
        if CONTINUES.search(lead) and chains:
            first, blocks, reason = chains[-1]
            chains[-1] = (first, blocks + [match.group(1)], reason or (skip.group(1) if skip else ""))
        else:
            chains.append((line, [match.group(1)], skip.group(1) if skip else ""))
    return chains


CHAINS = readme_chains()


def test_readme_has_python_examples():
    assert len(CHAINS) >= 3, "README.md should show runnable Python examples"


@pytest.mark.parametrize("first_line, blocks, skip", CHAINS, ids=[f"README.md:{c[0]}" for c in CHAINS])
def test_readme_block_runs(first_line, blocks, skip, tmp_path):
    if skip:
        pytest.skip(f"README.md:{first_line}: {skip}")
    if any("transformers" in block for block in blocks):
        pytest.importorskip("transformers")
    script = "\n\n".join(blocks)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "TRITON_ATTN_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("TRITON_ATTN_BACKEND", None)
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, (f"README.md:{first_line} failed:\n{result.stdout[-2000:]}\n"
                                    f"{result.stderr[-4000:]}")
