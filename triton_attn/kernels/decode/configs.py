"""Launch configurations of the decode kernel: the table, the heuristic, and the split count.

A decode config is a ``KernelConfig`` read differently from prefill: ``BLOCK_M`` is the *largest*
tile of packed rows (GQA heads x query rows) a program holds -- the launcher shrinks it to the
next power of two of the packed rows -- and ``BLOCK_N`` the keys per step (shrunk to divide the
BlockMask's KV block). Decode is bound by reading K/V, so the tiles are short in M and the
pipelining (``num_stages``) matters more than the M tile.

``choose_splits`` decides how many programs share one row of the KV range: enough programs to
fill the GPU about twice (``SPLIT_OCCUPANCY`` waves of its SMs), never more than the row has
non-empty blocks, at most ``MAX_SPLITS``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Dict, List, Optional, Tuple

import torch

from ..attention.configs import KernelConfig, fit_tile, next_power_of_two, padded_head_dim
from ..host import INT32_LIMIT

# The query lengths the decode kernel is meant for (up to 16 rows, so at most 16 x the GQA group after
# packing): the caller (``dispatch.py``) sends inference calls this short to it; the launcher takes any length.
MAX_DECODE_Q_LEN = 16
MAX_PACKED_ROWS = 64     # rows of one program: GQA heads x query rows (8 x 8, 4 x 16, ...)
MAX_SPLITS = 64
# The decode grid puts its (row tile, head tile) programs on axis 0 (up to MAX_GRID_X) and the splits, at most
# MAX_SPLITS, on axis 1 (CUDA's grid limits: ``attention.configs``).
SPLIT_OCCUPANCY = 2      # programs per SM the splits aim for
INTERPRETER_SMS = 4      # what the CPU interpreter pretends to have (so tests see several splits)

# The table: the AOT tests compile every entry; the autotuner searches a wider space (autotune.py).
# Three stages (where they fit): at two, Triton keeps one K/V buffer and waits for each copy before its dot (TTGIR:
# ``async_wait {num = 0}``), so a memory-bound decode step never overlaps its loads; at three the next
# step's K/V tiles are in flight during this step's dots (tests/kernels/test_decode_serving_aot.py).
DECODE_CONFIGS: List[KernelConfig] = [
    KernelConfig(16, 64, 4, 3, max_head_dim=128),     # main config: MHA / small groups, 16-bit, D <= 128
    KernelConfig(64, 64, 4, 3, max_head_dim=128),     # main config: packed GQA groups (up to 64 rows)
    KernelConfig(16, 128, 4, 3, max_head_dim=128),    # longer key steps (autotuning candidate)
    KernelConfig(64, 32, 8, 3, max_head_dim=256),     # head_dim 256
    # head_dim 256, few rows; float32 inputs. Two stages: three need 167,936 B at float32 D = 256 (over sm_80's).
    KernelConfig(16, 32, 4, 2, max_head_dim=256),
]
MAIN_DECODE_CONFIGS = DECODE_CONFIGS[:2]
# The heuristic's picks by case (a target's ``KernelTables.decode`` has the same four keys): "few_rows" and
# "packed" for 16-bit inputs at D <= 128 (up to 16 packed rows, or more), "wide_packed" for D > 128 with
# more than 16 rows, "wide" for the rest (D > 128 with few rows, and float32).
DECODE_PICKS: Dict[str, KernelConfig] = {"few_rows": DECODE_CONFIGS[0], "packed": DECODE_CONFIGS[1],
                                         "wide_packed": DECODE_CONFIGS[3], "wide": DECODE_CONFIGS[4]}


def default_decode_config(head_dim: int, head_dim_v: int, dtype: torch.dtype, packed_rows: int, *,
                          target=None) -> KernelConfig:
    """The heuristic config for these shapes (before ``fit_decode``); ``target``: a ``kernels.targets.Target``
    whose tables to read (None: sm_80's, also the interpreter's)."""
    picks = target.tables.decode if target is not None else DECODE_PICKS
    width = max(padded_head_dim(head_dim), padded_head_dim(head_dim_v))
    if width > 128 or dtype == torch.float32:
        return picks["wide_packed"] if packed_rows > 16 and dtype != torch.float32 else picks["wide"]
    return picks["packed"] if packed_rows > 16 else picks["few_rows"]


def fit_decode(config: KernelConfig, packed_rows: int, kv_block_size: int) -> KernelConfig:
    """``config`` with ``BLOCK_M`` shrunk to the packed rows (>= 16) and ``BLOCK_N`` dividing the KV block."""
    block_m = min(config.BLOCK_M, max(16, next_power_of_two(packed_rows)))
    return replace(config, BLOCK_M=block_m, BLOCK_N=fit_tile(config.BLOCK_N, kv_block_size))


def multiprocessor_count(device: torch.device) -> int:
    """SMs of the CUDA device (``INTERPRETER_SMS`` for CPU tensors, which run under the interpreter)."""
    if device.type != "cuda":
        return INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def choose_splits(programs: int, max_visits: int, sm_count: int) -> int:
    """Splits of each row's KV range: fill ``SPLIT_OCCUPANCY`` programs per SM, given ``programs``
    programs without splitting and at most ``max_visits`` non-empty blocks per row (a split with no
    block to visit would only cost a launch slot and a combine term)."""
    wanted = -(-SPLIT_OCCUPANCY * sm_count // max(1, programs))
    return max(1, min(wanted, max_visits, MAX_SPLITS))


def _reach(tensor: Optional[torch.Tensor], dims: Tuple[int, ...]) -> int:
    """The largest offset ``sum((size - 1) * |stride|)`` over ``dims`` of ``tensor`` (0 for None or empty)."""
    if tensor is None or tensor.numel() == 0:
        return 0
    return sum((tensor.shape[d] - 1) * abs(tensor.stride(d)) for d in dims)


def needs_64bit_rows(query: torch.Tensor, out: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     part_out: Optional[torch.Tensor], *, paged: bool) -> bool:
    """The split kernel's ``ROW_OFFSETS_64``: whether an offset it computes per row or per key, from a
    64-bit per-program base, can reach 2**31. Those are: a packed row's head and query row inside one
    sequence of ``query`` / ``out`` [B, Hq, Lq, D] (a long paged Lq); a key's position inside one (sequence,
    KV head) of contiguous ``key`` / ``value`` [B, Hkv, L, D], or its page and row inside the page pool
    [num_pages, Hkv, page_size, D] when ``paged`` (a big cache); a row of one (split, sequence) of
    ``part_out`` [S, B, Hq, Lq, Dv] (None: unsplit)."""
    reaches = [_reach(query, (1, 2, 3)), _reach(out, (1, 2, 3)), _reach(part_out, (2, 3, 4))]
    kv_dims = (0, 2, 3) if paged else (2, 3)
    reaches += [_reach(key, kv_dims), _reach(value, kv_dims)]
    return max(reaches) >= INT32_LIMIT
