"""Context-parallel (ring) attention across processes: shard, attend, backpropagate, gather.

Run on CPUs (gloo) or one GPU per process (NCCL)::

    torchrun --nproc-per-node 2 examples/context_parallel.py

Every rank builds the same full q/k/v (same seed), keeps its shard, and runs causal attention over
the whole sequence with key/value shards travelling around the ring. Rank 0 checks the gathered
output and gradients against single-process ``attention()``.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout, installed or not
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import triton_attn as ta  # noqa: E402
from triton_attn.distributed import context_parallel_attention, record_ring_stats, shard_sequence, unshard_sequence  # noqa: E402
from triton_attn.masks import causal_mask  # noqa: E402

BATCH, HEADS, SEQ_LEN, HEAD_DIM = 1, 4, 2048, 32
LOAD_BALANCE = "head_tail"


def main() -> None:
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count()) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    generator = torch.Generator().manual_seed(0)  # the same full tensors on every rank
    q, k, v = (torch.randn(BATCH, HEADS, SEQ_LEN, HEAD_DIM, generator=generator).to(device) for _ in range(3))

    # This rank's shards: with head_tail, chunks r and 2P - 1 - r of 2P (even causal work).
    q_local, k_local, v_local = (shard_sequence(t, dim=2, load_balance=LOAD_BALANCE).requires_grad_(True)
                                 for t in (q, k, v))
    with record_ring_stats() as stats:
        out_local = context_parallel_attention(q_local, k_local, v_local, mask_mod=causal_mask,
                                               load_balance=LOAD_BALANCE)
        out_local.sum().backward()  # gradients come back to the shards that own them

    out = unshard_sequence(out_local, dim=2, load_balance=LOAD_BALANCE)
    grad_q = unshard_sequence(q_local.grad, dim=2, load_balance=LOAD_BALANCE)
    print(f"rank {rank}/{world_size}: {q_local.shape[2]} of {SEQ_LEN} tokens, ring steps computed "
          f"{stats.forward_steps_computed}, skipped {stats.forward_steps_skipped}, "
          f"allowed (q, kv) pairs {stats.allowed_pairs}", flush=True)

    if rank == 0:  # the same attention on one process, for comparison
        q_full = q.clone().requires_grad_(True)
        block_mask = ta.create_block_mask(causal_mask, None, None, SEQ_LEN, SEQ_LEN, device=device)
        reference = ta.attention(q_full, k, v, block_mask=block_mask)
        reference.sum().backward()
        print(f"max |out - attention()| = {(out - reference).abs().max().item():.2e}, "
              f"max |dq - attention() dq| = {(grad_q - q_full.grad).abs().max().item():.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
