"""Context parallelism over torch.distributed: ring attention for any mask_mod, with load balancing.

```python
from triton_attn.distributed import shard_sequence, unshard_sequence, context_parallel_attention
q_local = shard_sequence(q, dim=2, load_balance="head_tail")          # same for k, v
out_local = context_parallel_attention(q_local, k_local, v_local, mask_mod=causal_mask)
out = unshard_sequence(out_local, dim=2, load_balance="head_tail")
```
"""

from .balance import ContiguousBalancer, HeadTailBalancer, LoadBalancer, PerDocumentBalancer, layout_positions
from .report import RingStats, WorkReport, record_ring_stats, work_report
from .ring import context_parallel_attention
from .sharding import shard_sequence, unshard_sequence

__all__ = [
    "shard_sequence", "unshard_sequence", "context_parallel_attention",
    "LoadBalancer", "ContiguousBalancer", "HeadTailBalancer", "PerDocumentBalancer", "layout_positions",
    "work_report", "WorkReport", "record_ring_stats", "RingStats",
]
