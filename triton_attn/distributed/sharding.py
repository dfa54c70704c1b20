"""Cutting a full-sequence tensor into this rank's shard, and putting the shards back together."""

from __future__ import annotations

from typing import Tuple

import torch
import torch.distributed as dist

from .balance import check_sequence_length, layout_positions


def group_rank_and_size(group) -> Tuple[int, int]:
    """(rank, world size) of this process in ``group`` (None: the default group)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("context parallelism needs torch.distributed: call torch.distributed.init_process_group "
                           "(or launch with torchrun) first")
    return dist.get_rank(group), dist.get_world_size(group)


def _sequence_dim(tensor: torch.Tensor, dim: int, what: str) -> int:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{what}: tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -tensor.dim() <= dim < tensor.dim():
        raise ValueError(f"{what}: dim must be an int in [{-tensor.dim()}, {tensor.dim()}) for a tensor of shape "
                         f"{tuple(tensor.shape)}, got {dim!r}")
    return dim % tensor.dim()


def shard_sequence(tensor: torch.Tensor, dim: int = 2, group=None, load_balance="head_tail") -> torch.Tensor:
    """This rank's shard of a full-sequence tensor (the same full tensor on every rank).

    tensor: e.g. q ``[B, H, L, D]`` with ``dim=2``; L must be divisible by 2 x world size.
    Returns ``[B, H, L / P, D]``: the positions ``load_balance`` assigns to this rank, in the order of
    ``layout_positions``. Differentiable (gradients flow back into the full tensor's slots).
    """
    dim = _sequence_dim(tensor, dim, "shard_sequence")
    rank, world_size = group_rank_and_size(group)
    check_sequence_length(tensor.shape[dim], world_size, f"shard_sequence: tensor.shape[{dim}]")
    positions = layout_positions(load_balance, tensor.shape[dim], world_size)[rank]
    return tensor.index_select(dim, positions.to(tensor.device))


def unshard_sequence(tensor: torch.Tensor, dim: int = 2, group=None, load_balance="head_tail") -> torch.Tensor:
    """The full-sequence tensor from every rank's shard (an all-gather; every rank gets it).

    tensor: this rank's shard, e.g. out ``[B, H, L / P, Dv]`` or lse ``[B, H, L / P]`` with ``dim=2``.
    Returns ``[B, H, L, Dv]`` in global order. Not differentiable: compute the loss on the shards.
    """
    dim = _sequence_dim(tensor, dim, "unshard_sequence")
    rank, world_size = group_rank_and_size(group)
    local = tensor.detach().contiguous()
    shards = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(shards, local, group=group)
    seq_len = local.shape[dim] * world_size
    check_sequence_length(seq_len, world_size, f"unshard_sequence: tensor.shape[{dim}] x world size")
    positions = layout_positions(load_balance, seq_len, world_size).flatten().to(tensor.device)
    full = torch.empty(*local.shape[:dim], seq_len, *local.shape[dim + 1:], dtype=local.dtype, device=local.device)
    return full.index_copy_(dim, positions, torch.cat(shards, dim=dim))
