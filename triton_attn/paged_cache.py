"""``PagedKVCache``: keys and values of many sequences in fixed-size pages, for ``paged_attention``.

Every layer has its own ``key_cache`` ``[num_pages, Hkv, page_size, D]`` and ``value_cache``
``[num_pages, Hkv, page_size, Dv]``; the layers share one page allocation (a sequence's logical page
``j`` is the same physical page in every layer), so the bookkeeping is per sequence:

    cache = PagedKVCache(num_pages=64, page_size=16, num_kv_heads=2, head_dim=32, num_layers=2)
    seqs = cache.allocate(4)                    # four empty sequences
    cache.reserve(seqs, 7)                      # they grow by 7 tokens (pages taken from the free list)
    cache.write(0, seqs, key, value)            # layer 0's keys/values of those 7 tokens, [4, Hkv, 7, D]
    out = paged_attention(q, *cache.layer(0), cache.page_table(seqs), cache.kv_lens(seqs))
    cache.free(seqs[2])                         # its pages go back to the free list

``append(seqs, key, value)`` is ``reserve`` + ``write`` for a one-layer cache. ``batch(seqs)`` binds a
list of sequences into the object ``ReferenceDecoder`` takes as its cache.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch


class PagedKVCache:
    """A pool of ``num_pages`` pages of ``page_size`` tokens per layer, and the sequences living in it."""

    def __init__(self, num_pages: int, page_size: int, num_kv_heads: int, head_dim: int, *,
                 value_dim: Optional[int] = None, num_layers: int = 1, dtype: torch.dtype = torch.float32,
                 device=None):
        for name, value in (("num_pages", num_pages), ("page_size", page_size), ("num_kv_heads", num_kv_heads),
                            ("head_dim", head_dim), ("num_layers", num_layers)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"PagedKVCache: {name} must be a positive int, got {value!r}")
        if page_size % 16:
            raise ValueError(f"PagedKVCache: page_size must be a multiple of 16, got {page_size}")
        value_dim = head_dim if value_dim is None else value_dim
        self.page_size, self.num_pages = page_size, num_pages
        self.keys = [torch.zeros(num_pages, num_kv_heads, page_size, head_dim, dtype=dtype, device=device)
                     for _ in range(num_layers)]
        self.values = [torch.zeros(num_pages, num_kv_heads, page_size, value_dim, dtype=dtype, device=device)
                       for _ in range(num_layers)]
        self._free: List[int] = list(range(num_pages))
        self._pages: Dict[int, List[int]] = {}
        self._lengths: Dict[int, int] = {}
        self._next_id = 0

    # -- sequences ----------------------------------------------------------------------------------
    @property
    def free_pages(self) -> int:
        return len(self._free)

    def shuffle_free_pages(self, generator: Optional[torch.Generator] = None) -> None:
        """Put the free list in random order, so that sequences get scattered pages (as after many
        allocations and frees): for tests and benchmarks."""
        order = torch.randperm(len(self._free), generator=generator).tolist()
        self._free = [self._free[i] for i in order]

    def allocate(self, count: int = 1) -> List[int]:
        """``count`` new empty sequences; returns their ids."""
        ids = list(range(self._next_id, self._next_id + count))
        self._next_id += count
        for seq in ids:
            self._pages[seq], self._lengths[seq] = [], 0
        return ids

    def _check(self, seqs: Sequence[int]) -> None:
        unknown = [s for s in seqs if s not in self._pages]
        if unknown:
            raise KeyError(f"PagedKVCache: unknown sequence id(s) {unknown}; allocate() them first")

    def free(self, seq: int) -> None:
        """Drop sequence ``seq``; its pages return to the free list."""
        self._check([seq])
        self._free.extend(self._pages.pop(seq))
        del self._lengths[seq]

    def reserve(self, seqs: Sequence[int], num_tokens: int) -> None:
        """Grow each sequence by ``num_tokens``, taking pages from the free list as needed."""
        self._check(seqs)
        needed = {s: -(-(self._lengths[s] + num_tokens) // self.page_size) - len(self._pages[s]) for s in seqs}
        total = sum(needed.values())
        if total > len(self._free):
            raise RuntimeError(f"PagedKVCache: out of pages ({total} needed, {len(self._free)} free of "
                               f"{self.num_pages}); free sequences or allocate a larger cache")
        for s in seqs:
            for _ in range(needed[s]):
                self._pages[s].append(self._free.pop(0))
            self._lengths[s] += num_tokens

    def _slots(self, seqs: Sequence[int], num_tokens: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Physical (page, offset) ``[B, num_tokens]`` of the last ``num_tokens`` positions of each sequence."""
        pages, offsets = [], []
        for s in seqs:
            start = self._lengths[s] - num_tokens
            if start < 0:
                raise ValueError(f"PagedKVCache: sequence {s} holds {self._lengths[s]} tokens, cannot write "
                                 f"{num_tokens}; reserve() them first")
            positions = range(start, self._lengths[s])
            pages.append([self._pages[s][p // self.page_size] for p in positions])
            offsets.append([p % self.page_size for p in positions])
        device = self.keys[0].device
        return (torch.tensor(pages, dtype=torch.long, device=device),
                torch.tensor(offsets, dtype=torch.long, device=device))

    def write(self, layer: int, seqs: Sequence[int], key: torch.Tensor, value: torch.Tensor) -> None:
        """Store ``key`` ``[B, Hkv, S, D]`` / ``value`` ``[B, Hkv, S, Dv]`` as the last S tokens of each sequence."""
        self._check(seqs)
        if (key.dim() != 4 or key.shape[0] != len(seqs)
                or key.shape[1:2] + key.shape[3:] != self.keys[layer].shape[1:2] + self.keys[layer].shape[3:]):
            raise ValueError(f"PagedKVCache.write: key must be [B={len(seqs)}, Hkv={self.keys[layer].shape[1]}, S, "
                             f"D={self.keys[layer].shape[3]}], got {tuple(key.shape)}")
        if value.shape[:3] != key.shape[:3] or value.shape[3] != self.values[layer].shape[3]:
            raise ValueError(f"PagedKVCache.write: value must be [B, Hkv, S, Dv={self.values[layer].shape[3]}] like "
                             f"key, got {tuple(value.shape)}")
        pages, offsets = self._slots(seqs, key.shape[2])
        # Advanced indices on dims 0 and 2 around a slice: the indexed view is [B, S, Hkv, D].
        self.keys[layer][pages, :, offsets] = key.transpose(1, 2).to(self.keys[layer].dtype)
        self.values[layer][pages, :, offsets] = value.transpose(1, 2).to(self.values[layer].dtype)

    def append(self, seqs: Sequence[int], key: torch.Tensor, value: torch.Tensor, layer: int = 0) -> None:
        """``reserve`` the tokens of ``key`` ``[B, Hkv, S, D]`` and ``write`` them (one-layer caches)."""
        self.reserve(seqs, key.shape[2])
        self.write(layer, seqs, key, value)

    # -- what paged_attention takes -------------------------------------------------------------------
    def layer(self, layer: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(key_cache, value_cache)`` of one layer."""
        return self.keys[layer], self.values[layer]

    def seq_length(self, seq: int) -> int:
        self._check([seq])
        return self._lengths[seq]

    def page_table(self, seqs: Sequence[int], max_pages: Optional[int] = None) -> torch.Tensor:
        """int32 ``[B, max_pages]``: the physical pages of each sequence in logical order, 0-padded."""
        self._check(seqs)
        width = max_pages or max(1, max(len(self._pages[s]) for s in seqs))
        table = [self._pages[s] + [0] * (width - len(self._pages[s])) for s in seqs]
        return torch.tensor(table, dtype=torch.int32, device=self.keys[0].device)

    def kv_lens(self, seqs: Sequence[int]) -> torch.Tensor:
        """int32 ``[B]``: the length of each sequence."""
        self._check(seqs)
        return torch.tensor([self._lengths[s] for s in seqs], dtype=torch.int32, device=self.keys[0].device)

    def batch(self, seqs: Sequence[int]) -> "PagedBatch":
        return PagedBatch(self, list(seqs))


class PagedBatch:
    """A ``PagedKVCache`` seen through one batch of sequences (row b of a call is ``seqs[b]``).

    What a model's attention layers need each step: ``seq_length``, ``reserve`` the step's tokens,
    ``write`` a layer's keys/values, then the page table and lengths to attend with.
    """

    def __init__(self, cache: PagedKVCache, seqs: List[int]):
        self.cache, self.seqs = cache, seqs

    def seq_length(self, layer_idx: int = 0) -> int:
        """Tokens held by the batch's sequences (they grow together; the longest if they differ)."""
        return max(self.cache.seq_length(s) for s in self.seqs)

    def reserve(self, num_tokens: int) -> None:
        self.cache.reserve(self.seqs, num_tokens)

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        self.cache.write(layer, self.seqs, key, value)

    def attention_inputs(self, layer: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(key_cache, value_cache, page_table, kv_lens)`` for ``paged_attention``."""
        key_cache, value_cache = self.cache.layer(layer)
        return key_cache, value_cache, self.cache.page_table(self.seqs), self.cache.kv_lens(self.seqs)
