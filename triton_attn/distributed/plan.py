"""The per-step BlockMasks of the ring, built at global positions and cached.

At ring step ``s`` rank ``r`` holds the key/value shard of rank ``(r - s) mod P``. The step's
BlockMask covers this rank's query shard against that key shard in *local* indices; the user's
mods are wrapped so that they see *global* positions (``q_positions[q_idx]``). The wrappers only
index captured position tensors, so the library's tracer records them as loads: the fast mask
compiler classifies tiles by interval analysis (a tile inside one contiguous run of positions is
bounded exactly) and the Triton kernels inline the wrapped predicate.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from ..masks import create_block_mask
from ..masks.block_mask import BlockMask
from ..masks.closure import captured_tensors, mod_fingerprint
from ..masks.evaluate import mod_name

MAX_RING_BLOCK = 128
MIN_RING_BLOCK = 16
PLAN_CACHE_SIZE = 16  # step-mask plans kept per process (one per mask, shape and layout)


def ring_block_size(alignment: int) -> int:
    """Tile size of the step masks: the largest power of two in [16, 128] dividing the layout's
    ``alignment``, so no tile straddles two runs of positions (else 128: correct, less sparse)."""
    size = MAX_RING_BLOCK
    while size > MIN_RING_BLOCK and alignment % size:
        size //= 2
    return size if alignment % size == 0 else MAX_RING_BLOCK


def global_mask_mod(mask_mod: Callable, q_positions: torch.Tensor, kv_positions: torch.Tensor) -> Callable:
    """``mask_mod`` on local indices of a (query shard, key shard) pair, at their global positions.

    q_positions: int64 ``[Lq_local]``; kv_positions: int64 ``[Lkv_local]``.
    """
    def at_global_positions(b, h, q_idx, kv_idx):
        return mask_mod(b, h, q_positions[q_idx], kv_positions[kv_idx])

    at_global_positions.__name__ = at_global_positions.__qualname__ = f"{mod_name(mask_mod)}@global"
    return at_global_positions


def global_score_mod(score_mod: Callable, q_positions: torch.Tensor, kv_positions: torch.Tensor) -> Callable:
    """``score_mod`` on local indices of a (query shard, key shard) pair, at their global positions."""
    def at_global_positions(score, b, h, q_idx, kv_idx):
        return score_mod(score, b, h, q_positions[q_idx], kv_positions[kv_idx])

    at_global_positions.__name__ = at_global_positions.__qualname__ = f"{mod_name(score_mod)}@global"
    return at_global_positions


@dataclass
class StepMasks:
    """One rank's ring plan: ``masks[s]`` is the BlockMask of step s, None when the step is skipped
    (no non-empty tile) and ``FULL`` when there is no mask_mod (every step attends everywhere)."""

    sources: List[int]                    # sources[s]: the rank whose key/value shard is visited at step s
    masks: List[Optional[BlockMask]]
    positions: torch.Tensor               # int64 [P, L_local] on the tensors' device
    block_size: int

    @property
    def skipped(self) -> List[int]:
        return [step for step, mask in enumerate(self.masks) if mask is None]


FULL = "full"  # marker in StepMasks.masks: attend everywhere (no mask_mod)

_PLANS: "OrderedDict[tuple, tuple]" = OrderedDict()  # key -> (StepMasks, the captured tensors it was built from)


def step_block_mask(mask_mod: Callable, batch: int, heads: int, positions: torch.Tensor, rank: int, source: int,
                    block_size: int, device) -> Optional[BlockMask]:
    """The BlockMask of ``rank``'s queries against ``source``'s keys, None when it has no non-empty tile."""
    local_len = positions.shape[1]
    wrapped = global_mask_mod(mask_mod, positions[rank], positions[source])
    block_mask = create_block_mask(wrapped, batch, heads, local_len, local_len, device=device, BLOCK_SIZE=block_size)
    return None if block_mask.sparsity() == 100.0 else block_mask


def plan_steps(mask_mod: Optional[Callable], batch: int, heads: int, positions: torch.Tensor, rank: int,
               balance_key: str, alignment: int, device) -> StepMasks:
    """The step masks of ``rank`` (cached by the mask's code and captured tensors, shapes and layout).

    positions: int64 ``[P, L_local]`` from the load balancer (on any device); alignment: the
    balancer's (see ``LoadBalancer.alignment``).
    """
    world_size, local_len = positions.shape
    block_size = ring_block_size(alignment)
    # The mask by its code and constants, and its captured tensors by identity and in-place version: no
    # tensor values are read (on CUDA a host copy on every layer's call). The cached entry keeps those
    # tensors alive, so their ids cannot be reused by other tensors while it lives.
    captured = () if mask_mod is None else tuple(captured_tensors(mask_mod))
    key = (None if mask_mod is None else mod_fingerprint(mask_mod, include_tensor_values=False),
           tuple((id(t), t._version) for t in captured), batch, heads, world_size, local_len, rank,
           balance_key, block_size, str(device))
    if key in _PLANS:
        _PLANS.move_to_end(key)
        return _PLANS[key][0]
    positions = positions.to(device)
    sources = [(rank - step) % world_size for step in range(world_size)]
    if mask_mod is None:
        masks: List = [FULL] * world_size
    else:
        masks = [step_block_mask(mask_mod, batch, heads, positions, rank, source, block_size, device)
                 for source in sources]
    plan = StepMasks(sources=sources, masks=masks, positions=positions, block_size=block_size)
    _PLANS[key] = (plan, captured)
    while len(_PLANS) > PLAN_CACHE_SIZE:
        _PLANS.popitem(last=False)
    return plan
