"""``triton-attn demo``: the library's main job on an embedded default problem.

Runs causal, sliding-window, document and prefix-LM attention on the best backend available,
checks each against the float64 golden result, and prints each mask's block picture and a table
(mask, sparsity, max error, time, time of SDPA with a dense mask).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

from .api import attention, choose_backend
from .masks import (
    and_masks,
    causal_mask,
    create_block_mask,
    create_mask,
    document_mask,
    prefix_lm_mask,
    sliding_window_mask,
)
from .reference import dense_attention


@dataclass
class DemoRow:
    mask: str
    sparsity: float
    max_error: float
    error_bound: float
    ours_ms: float
    sdpa_ms: float

    @property
    def ok(self) -> bool:
        return self.max_error <= self.error_bound


def _median_ms(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()  # warm-up: first calls compile kernels / fill caches
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def demo_masks(seq_len: int, device: torch.device):
    """The four mask families of the demo, as (label, mask_mod) on ``device``."""
    generator = torch.Generator().manual_seed(0)
    boundaries = torch.randint(1, seq_len, (3,), generator=generator).sort().values
    document_ids = torch.bucketize(torch.arange(seq_len), boundaries, right=True).to(device)
    return [
        ("causal", causal_mask),
        (f"sliding window {seq_len // 8}", sliding_window_mask(seq_len // 8)),
        ("document (causal, 4 docs)", and_masks(causal_mask, document_mask(document_ids))),
        (f"prefix-LM {seq_len // 4}", prefix_lm_mask(seq_len // 4)),
    ]


def run_demo(seq_len: Optional[int] = None, heads: int = 4, head_dim: int = 64, device: Optional[str] = None,
             backend: Optional[str] = None, repeats: int = 3, print_fn: Callable[[str], None] = print) -> List[DemoRow]:
    """Run the demo and print its report; returns the table rows (``ok`` tells pass/fail)."""
    for name, value in (("--seq-len", seq_len), ("--heads", heads), ("--head-dim", head_dim), ("--repeats", repeats)):
        if value is not None and value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    if seq_len is not None and seq_len < 8:
        raise ValueError(f"--seq-len must be at least 8 so that every mask family has structure, got {seq_len}")
    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        raise ValueError(f"--device must be cpu or cuda[:N], got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA GPU is available on this machine")
    chosen = choose_backend(backend, dev)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    seq_len = seq_len or (4096 if dev.type == "cuda" else 1024)
    torch.manual_seed(0)
    query = torch.randn(1, heads, seq_len, head_dim, device=dev, dtype=dtype)
    key = torch.randn(1, heads, seq_len, head_dim, device=dev, dtype=dtype)
    value = torch.randn(1, heads, seq_len, head_dim, device=dev, dtype=dtype)
    print_fn(f"triton-attn demo: backend={chosen}, device={dev}, dtype={str(dtype).replace('torch.', '')}, "
             f"B=1, H={heads}, L={seq_len}, D={head_dim}")
    rows = []
    for label, mask_mod in demo_masks(seq_len, dev):
        block_mask = create_block_mask(mask_mod, None, None, seq_len, seq_len, device=dev)
        print_fn(f"\n{label}: {block_mask.sparsity():.1f}% of blocks skipped")
        print_fn(block_mask.to_string(grid_size=16, limit=1).split("\n", 1)[1])
        out = attention(query, key, value, block_mask=block_mask, backend=chosen)
        golden, _ = dense_attention(query.double(), key.double(), value.double(), mask_mod=mask_mod,
                                    compute_dtype=torch.float64)
        plain, _ = dense_attention(query, key, value, mask_mod=mask_mod)
        error = (out.double() - golden).abs().max().item()
        plain_error = (plain.double() - golden).abs().max().item()
        # The numerics rule of docs/design.md: within 2x the error of plain same-dtype PyTorch, plus a floor.
        bound = 2 * plain_error + (1e-5 if dtype == torch.float32 else 1e-2)
        dense_mask = create_mask(mask_mod, 1, 1, seq_len, seq_len, device=dev)
        ours_ms = _median_ms(lambda: attention(query, key, value, block_mask=block_mask, backend=chosen), dev, repeats)
        sdpa_ms = _median_ms(lambda: F.scaled_dot_product_attention(query, key, value, attn_mask=dense_mask),
                             dev, repeats)
        rows.append(DemoRow(label, block_mask.sparsity(), error, bound, ours_ms, sdpa_ms))
    print_fn("")
    header = f"{'mask':<28} {'sparsity':>9} {'max error':>10} {'bound':>9} {'ours ms':>9} {'SDPA ms':>9}  check"
    print_fn(header)
    print_fn("-" * len(header))
    for row in rows:
        print_fn(f"{row.mask:<28} {row.sparsity:>8.1f}% {row.max_error:>10.2e} {row.error_bound:>9.1e} "
                 f"{row.ours_ms:>9.2f} {row.sdpa_ms:>9.2f}  {'ok' if row.ok else 'FAIL'}")
    print_fn("\nmax error: against the float64 golden result; bound: 2x plain same-dtype PyTorch error + floor.")
    print_fn("SDPA: torch.nn.functional.scaled_dot_product_attention with the dense boolean mask.")
    return rows
