"""Load balancers: which global sequence positions each rank holds.

A balancer maps ``(seq_len, world_size)`` to ``positions``: int64 ``[world_size, seq_len // world_size]``,
row ``r`` the global positions of rank ``r``'s shard. Every position appears exactly once, every rank
holds the same number of tokens (the ring exchanges equal-sized shards), and positions come in
contiguous runs whose local offsets are multiples of the balancer's ``alignment``: the ring picks
tiles that divide it, so a tile stays inside one run and the block layout of a (query shard, key
shard) pair is as sparse as the mask allows.

- ``"none"``: rank ``r`` holds the contiguous slice ``[r * L / P, (r + 1) * L / P)``. Under a causal
  mask the last rank does P times the work of the first.
- ``"head_tail"``: the sequence is cut into ``2P`` chunks and rank ``r`` holds chunks ``r`` and
  ``2P - 1 - r`` (a cheap early chunk with an expensive late one), so causal work is even.
- ``PerDocumentBalancer``: for packed documents under a document-causal mask, head-tail inside
  every document (in pieces of whole tiles), so each rank gets an even share of every document's work.
"""

from __future__ import annotations

from typing import List, Sequence, Union

import torch

LOAD_BALANCE_NAMES = ("none", "head_tail")


def check_sequence_length(seq_len: int, world_size: int, what: str) -> None:
    """Every balancer needs ``seq_len`` divisible by ``2 * world_size`` (two chunks per rank)."""
    if seq_len % (2 * world_size):
        raise ValueError(f"{what} is {seq_len}, which is not divisible by 2 x world size = {2 * world_size}; "
                         f"context parallelism splits the sequence into 2 chunks per rank: pad it to a multiple "
                         f"of {2 * world_size}")


def head_tail_positions(seq_len: int, world_size: int) -> torch.Tensor:
    """``[world_size, seq_len // world_size]``: rank r holds chunks r and 2P - 1 - r of 2P."""
    chunk = seq_len // (2 * world_size)
    chunks = torch.arange(seq_len).view(2 * world_size, chunk)
    ranks = torch.arange(world_size)
    return torch.cat([chunks[ranks], chunks[2 * world_size - 1 - ranks]], dim=1)


class LoadBalancer:
    """Base of the balancers: subclasses define ``positions`` and a ``key`` for caches."""

    name = "custom"

    def positions(self, seq_len: int, world_size: int) -> torch.Tensor:
        """int64 ``[world_size, seq_len // world_size]``: the global positions of each rank's shard."""
        raise NotImplementedError

    def key(self) -> str:
        """Equal for balancers that produce the same layout (part of the step-mask cache key)."""
        return self.name

    def alignment(self, seq_len: int, world_size: int) -> int:
        """Every run of consecutive positions starts at a local offset that is a multiple of this."""
        return 1

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.key()})"


class ContiguousBalancer(LoadBalancer):
    """``"none"``: rank r holds ``[r * L / P, (r + 1) * L / P)``."""

    name = "none"

    def positions(self, seq_len: int, world_size: int) -> torch.Tensor:
        check_sequence_length(seq_len, world_size, "the sequence length")
        return torch.arange(seq_len).view(world_size, seq_len // world_size)

    def alignment(self, seq_len: int, world_size: int) -> int:
        return seq_len // (2 * world_size)


class HeadTailBalancer(LoadBalancer):
    """``"head_tail"``: rank r holds chunks r and 2P - 1 - r of 2P equal chunks."""

    name = "head_tail"

    def positions(self, seq_len: int, world_size: int) -> torch.Tensor:
        check_sequence_length(seq_len, world_size, "the sequence length")
        return head_tail_positions(seq_len, world_size)

    def alignment(self, seq_len: int, world_size: int) -> int:
        return seq_len // (2 * world_size)


class PerDocumentBalancer(LoadBalancer):
    """Head-tail balancing inside every document of a packed sequence.

    ``documents``: int ``[L]`` document ids (a document is a run of equal consecutive ids), or a
    list of document lengths summing to L. ``granule``: pieces are whole multiples of it (default
    64 tokens, a tile of the ring's step masks), so tiles never straddle two pieces.

    Each document of length n is cut into ``2P`` pieces of ``n // (2P * granule) * granule`` tokens
    dealt head-tail (rank r gets pieces r and 2P - 1 - r). The tokens left at the end of each
    document go out in runs of at most a granule, the most expensive (causal work) first, each to
    the least loaded rank that has room, and sit after the aligned pieces; every rank ends with
    exactly L / P tokens.
    """

    name = "per_document"

    def __init__(self, documents: Union[torch.Tensor, Sequence[int]], granule: int = 64):
        self.lengths = self._lengths(documents)
        if isinstance(granule, bool) or not isinstance(granule, int) or granule <= 0:
            raise ValueError(f"PerDocumentBalancer: granule must be a positive int, got {granule!r}")
        self.granule = granule

    @staticmethod
    def _lengths(documents) -> List[int]:
        if isinstance(documents, torch.Tensor):
            if documents.dim() != 1 or documents.dtype.is_floating_point or documents.dtype == torch.bool:
                raise ValueError("PerDocumentBalancer: documents must be an integer tensor of document ids [L] (one "
                                 f"packed sequence), got dtype {documents.dtype} and shape {tuple(documents.shape)}")
            if documents.numel() == 0:
                raise ValueError("PerDocumentBalancer: documents must not be empty")
            _, counts = torch.unique_consecutive(documents.cpu(), return_counts=True)
            return [int(c) for c in counts]
        lengths = list(documents)
        if not lengths or any(isinstance(n, bool) or not isinstance(n, int) or n <= 0 for n in lengths):
            raise ValueError(f"PerDocumentBalancer: documents must be a list of positive document lengths "
                             f"or an id tensor [L], got {documents!r}")
        return lengths

    def key(self) -> str:
        return f"per_document/{self.granule}:{','.join(map(str, self.lengths))}"

    def alignment(self, seq_len: int, world_size: int) -> int:
        return self.granule

    def positions(self, seq_len: int, world_size: int) -> torch.Tensor:
        total = sum(self.lengths)
        if total != seq_len:
            raise ValueError(f"PerDocumentBalancer: the documents cover {total} tokens but the sequence has {seq_len}")
        check_sequence_length(seq_len, world_size, "the sequence length")
        pieces = 2 * world_size
        per_rank: List[List[torch.Tensor]] = [[] for _ in range(world_size)]
        work = [0] * world_size  # causal work within the document: the token at offset i sees i + 1 keys
        units = []  # leftover runs of at most one granule: (work, first position, offset in document, size)
        start = 0
        for length in self.lengths:
            piece = length // (pieces * self.granule) * self.granule
            if piece:
                chunks = torch.arange(start, start + piece * pieces).view(pieces, piece)
                for rank in range(world_size):
                    per_rank[rank] += [chunks[rank], chunks[pieces - 1 - rank]]
                    work[rank] += _run_work(rank * piece, piece) + _run_work((pieces - 1 - rank) * piece, piece)
            for offset in range(piece * pieces, length, self.granule):
                size = min(self.granule, length - offset)
                units.append((_run_work(offset, size), start + offset, offset, size))
            start += length
        # Leftovers, most expensive first, go to the least loaded rank with room (split where a run
        # does not fit), so every rank ends with exactly L / P tokens.
        room = [seq_len // world_size - sum(int(c.numel()) for c in chunks) for chunks in per_rank]
        extra: List[List[torch.Tensor]] = [[] for _ in range(world_size)]
        for _, first, offset, size in sorted(units, key=lambda unit: (-unit[0], unit[1])):
            while size:
                rank = min((r for r in range(world_size) if room[r]), key=lambda r: (work[r], r))
                take = min(size, room[rank])
                extra[rank].append(torch.arange(first, first + take))
                work[rank] += _run_work(offset, take)
                room[rank] -= take
                first, offset, size = first + take, offset + take, size - take
        rows = [torch.cat(chunks + [torch.cat(more).sort().values] if more else chunks)
                for chunks, more in zip(per_rank, extra)]
        return torch.stack(rows)


def _run_work(offset: int, size: int) -> int:
    """Causal pairs of ``size`` tokens starting at ``offset`` in their document: sum of offset + 1 .. offset + size."""
    return size * (2 * offset + size + 1) // 2


def resolve_load_balance(load_balance) -> LoadBalancer:
    """``"none"``, ``"head_tail"`` or a ``LoadBalancer`` instance, as a ``LoadBalancer``."""
    if isinstance(load_balance, LoadBalancer):
        return load_balance
    if load_balance == "none":
        return ContiguousBalancer()
    if load_balance == "head_tail":
        return HeadTailBalancer()
    raise ValueError(f"load_balance must be one of {', '.join(map(repr, LOAD_BALANCE_NAMES))} or a LoadBalancer "
                     f"(e.g. PerDocumentBalancer(document_ids)), got {load_balance!r}")


def layout_positions(load_balance, seq_len: int, world_size: int) -> torch.Tensor:
    """The checked ``[world_size, seq_len // world_size]`` positions of ``load_balance``."""
    balancer = resolve_load_balance(load_balance)
    positions = balancer.positions(seq_len, world_size)
    expected = (world_size, seq_len // world_size)
    if tuple(positions.shape) != expected:
        raise ValueError(f"{balancer!r} returned positions of shape {tuple(positions.shape)}, expected {expected}")
    if not torch.equal(positions.flatten().sort().values, torch.arange(seq_len)):
        raise ValueError(f"{balancer!r} must place every position 0..{seq_len - 1} exactly once")
    return positions.long()
