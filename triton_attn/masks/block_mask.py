"""``BlockMask``: which tiles of the attention matrix are empty, full, or partial.

The fields and their meaning follow ``torch.nn.attention.flex_attention.BlockMask``:

- ``kv_num_blocks``: int32 ``[B, H, num_q_blocks]``, partial KV blocks per query block row.
- ``kv_indices``: int32 ``[B, H, num_q_blocks, width]``, their column indices, ascending, valid
  entries first (the rest is padding); ``1 <= width <= num_kv_blocks`` (``create_block_mask``'s lists
  are as wide as the grid; closed-form layouts such as ``masks/varlen.py`` make them narrower, as Flex
  allows: kernels read only the first ``num`` entries of a row).
- ``full_kv_num_blocks`` / ``full_kv_indices``: the same for full blocks (the mask_mod is
  known to be True on every in-bounds element, so kernels skip evaluating it), the same shape.
- ``q_num_blocks`` / ``q_indices`` / ``full_q_num_blocks`` / ``full_q_indices``: the transposed
  layout (``[B, H, num_kv_blocks]`` and ``[B, H, num_kv_blocks, width_q]``) for the backward pass.

The tile grid (``num_blocks``) is the lists' row counts, ``ceil(Q_LEN / Q_BLOCK_SIZE)`` by
``ceil(KV_LEN / KV_BLOCK_SIZE)``, never the index width.

``B`` or ``H`` is 1 when the mask was built with ``B=None`` / ``H=None`` (broadcast).
A block in a ragged tail (lengths not multiples of the block size) counts as full when the
mask_mod is True on all of its in-bounds elements; kernels always bound-check the tail.

The block-list helpers and the methods that exist for FlexAttention's sake (``from_flex``,
``from_kv_blocks``, ``_adjust``, ``as_tuple``, query-block indexing) live in ``block_mask_flex.py``; the
ASCII pictures of ``to_string`` in ``pictures.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple, Union

import torch

from .block_mask_flex import (
    BlockSize,
    FlexMethods,
    block_list_problems,
    dense_from_ordered,
    is_leading_run,
    normalize_block_size,
    ordered_from_dense,
    raise_problems,
    select_positions,
)
from .library import full_mask
from .pictures import picture_grid, render_block_pictures


@dataclass(frozen=True)
class LaunchPlan:
    """What a kernel launch needs to know about a BlockMask as Python values, fixed when it is built.

    ``max_partial_blocks`` / ``max_full_blocks``: the most partial / full KV blocks in one query
    block row; ``max_partial_q_blocks`` / ``max_full_q_blocks``: the same for the transposed layout
    (key block columns, the backward pass). ``exact`` is False when some of them are upper bounds
    (taken from the shapes alone for a mask built under ``torch.compile`` or on meta tensors, whose
    values are not known: then every phase counts as present). Reading the plan never touches the device, so a
    launch that uses it can be captured in a CUDA graph.
    """

    max_partial_blocks: int
    max_full_blocks: int
    max_partial_q_blocks: int
    max_full_q_blocks: int
    exact: bool = True
    computed_blocks: int = -1  # partial + full blocks over all (b, h) (-1: not known)
    # Whether the later half of the query block rows visits clearly more KV blocks than the earlier half
    # (causal-like: the kernels launch heavy tiles first); None when not known.
    heavy_tiles_last: Optional[bool] = None

    @property
    def has_partial_blocks(self) -> bool:
        """Whether any tile needs the mask_mod (else kernels run without the predicate)."""
        return self.max_partial_blocks > 0

    @property
    def phases(self) -> Tuple[str, ...]:
        """The KV phases a query block row can have: ``"partial"`` and/or ``"full"``, in launch order."""
        return tuple(name for name, most in (("partial", self.max_partial_blocks), ("full", self.max_full_blocks))
                     if most > 0)

    @classmethod
    def upper_bound(cls, num_blocks: Tuple[int, int]) -> "LaunchPlan":
        """A plan from the block grid alone: every row may hold every block of either kind."""
        nq, nkv = num_blocks
        return cls(nkv, nkv, nq, nq, exact=False)


def values_unknown(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``'s values cannot be read here: meta, fake (``torch.compile``), or being traced."""
    if tensor.device.type == "meta" or torch.compiler.is_compiling():
        return True
    # A FakeTensor (shape propagation outside torch.compile, e.g. under FakeTensorMode) by its type name:
    # torch's own predicate lives in a private module.
    return any(cls.__name__ == "FakeTensor" for cls in type(tensor).__mro__)


def plan_from_counts(counts: Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                     num_blocks: Tuple[int, int]) -> LaunchPlan:
    """The plan of four block-count tensors (partial kv, full kv, partial q, full q): one device read."""
    if any(values_unknown(t) for t in counts):
        return LaunchPlan.upper_bound(num_blocks)
    zero = torch.zeros((), dtype=torch.int64, device=counts[0].device)
    values = [t.max().to(torch.int64) if t.numel() else zero for t in counts]
    values.append(counts[0].sum(dtype=torch.int64) + counts[1].sum(dtype=torch.int64))
    # KV blocks visited by the early and the late half of the query block rows, summed over (b, h).
    rows = counts[0].shape[-1] if counts[0].dim() else 0
    half = rows // 2
    for part in (slice(0, half), slice(rows - half, rows)):
        values.append(sum(t[..., part].sum(dtype=torch.int64) for t in counts[:2]) if half else zero)
    *maxima, computed, early, late = torch.stack(values).tolist()
    return LaunchPlan(*(int(m) for m in maxima), computed_blocks=int(computed),
                      heavy_tiles_last=bool(half > 0 and late > 1.25 * early))


def _index_map(positions: torch.Tensor):
    """A function local index -> original index: affine when ``positions`` is an arithmetic run
    (so it traces and runs on any device), else a lookup in ``positions``."""
    if positions.numel() == 1 or bool((positions.diff() == positions[1] - positions[0]).all()):
        start = int(positions[0])
        step = int(positions[1] - positions[0]) if positions.numel() > 1 else 1
        return lambda local: local * step + start
    return lambda local: positions[local]


def sliced_mask_mod(mask_mod: Callable, batch_map: torch.Tensor, head_map: torch.Tensor) -> Callable:
    """The mask_mod of a sliced BlockMask: local (b, h) map back to the original ones (``mask_mod``
    itself when they are the same: leading entries, as when a mask broadcasts to a smaller batch)."""
    if is_leading_run(batch_map) and is_leading_run(head_map):
        return mask_mod
    batch_of, head_of = _index_map(batch_map), _index_map(head_map)

    def sliced(b, h, q_idx, kv_idx):
        return mask_mod(batch_of(b), head_of(h), q_idx, kv_idx)

    sliced.__name__ = getattr(mask_mod, "__name__", "mask_mod") + "[sliced]"
    return sliced


def batch_head_maps(index, sizes: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor]:
    """``mask[index]`` over (batch, head) as two position maps; an int keeps its dimension (size 1).

    Semantics are a tensor's: ints (negative from the end) and index tensors must be in range,
    slices are clipped to the dimension. A selection that would leave a dimension empty is an
    ``IndexError`` naming the index and the valid range (an empty BlockMask cannot be used).
    """
    index = index if isinstance(index, tuple) else (index,)
    if len(index) > 2:
        raise IndexError(f"BlockMask can be indexed over [batch, head] only, got {len(index)} indices")
    index = tuple(index) + (slice(None),) * (2 - len(index))
    return (select_positions(index[0], sizes[0], "batch"), select_positions(index[1], sizes[1], "head"))


class BlockMask(FlexMethods):
    """Block-sparse layout of a mask over ``[B, H, Q_LEN, KV_LEN]`` in tiles of ``BLOCK_SIZE``.

    Build it with ``create_block_mask``; see the module docstring for the fields.
    """

    _TENSOR_FIELDS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                      "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")

    def __init__(self, *, kv_num_blocks: torch.Tensor, kv_indices: torch.Tensor,
                 full_kv_num_blocks: torch.Tensor, full_kv_indices: torch.Tensor,
                 q_num_blocks: torch.Tensor, q_indices: torch.Tensor,
                 full_q_num_blocks: torch.Tensor, full_q_indices: torch.Tensor,
                 BLOCK_SIZE: Tuple[int, int], seq_lengths: Tuple[int, int], mask_mod: Callable,
                 launch_plan: Optional[LaunchPlan] = None):
        self.kv_num_blocks = kv_num_blocks
        self.kv_indices = kv_indices
        self.full_kv_num_blocks = full_kv_num_blocks
        self.full_kv_indices = full_kv_indices
        self.q_num_blocks = q_num_blocks
        self.q_indices = q_indices
        self.full_q_num_blocks = full_q_num_blocks
        self.full_q_indices = full_q_indices
        self.BLOCK_SIZE = normalize_block_size(BLOCK_SIZE)
        self.seq_lengths = (int(seq_lengths[0]), int(seq_lengths[1]))
        self.mask_mod = mask_mod if mask_mod is not None else full_mask
        # Computed now, at build time, so that no launch ever reads the device to plan itself.
        self._launch_plan = launch_plan if launch_plan is not None else self.compute_launch_plan()

    # -- launch plan and derived data ---------------------------------------------------------
    def compute_launch_plan(self) -> LaunchPlan:
        """The ``LaunchPlan`` of this mask's block counts (one device read; see ``launch_plan``)."""
        return plan_from_counts((self.kv_num_blocks, self.full_kv_num_blocks, self.q_num_blocks,
                                 self.full_q_num_blocks), self.num_blocks)

    @property
    def launch_plan(self) -> LaunchPlan:
        """Max blocks per row, has-partial-blocks and the phase list as Python values (built once)."""
        plan = self.__dict__.get("_launch_plan")  # (not yet for a deferred mask: computed once its lists exist)
        if plan is None:
            plan = self._launch_plan = self.compute_launch_plan()
        return plan

    def derived(self, name: str, make: Callable[[], object]):
        """``make()`` once per mask and ``name``: data a backend derives from the mask and reuses on every
        call (e.g. the dense additive bias of the CPU fast path, shared by all layers of a model)."""
        cache: Dict[str, object] = self.__dict__.setdefault("_derived", {})
        if name not in cache:
            cache[name] = make()
        return cache[name]

    # -- deferred fields ----------------------------------------------------------------------
    # A mask whose layout is known in closed form (``masks/closed_form.py``) need not build its index
    # lists until a kernel reads them: the CPU fast path of a decode step reads none of them (it
    # evaluates the mask_mod densely, see ``exact_layout``), and building them is most of the cost
    # of a step's mask. Only CPU masks outside torch.compile are deferred: on CUDA the lists must
    # exist before a launch is captured in a CUDA graph (building them reads the device).
    exact_layout = False  # True: empty tiles allow nothing and full tiles everything under mask_mod

    @classmethod
    def deferred(cls, build: Callable[[], Dict[str, torch.Tensor]], *, batch_heads: Tuple[int, int],
                 BLOCK_SIZE: BlockSize, seq_lengths: Tuple[int, int], mask_mod: Callable,
                 device: torch.device) -> "BlockMask":
        """A mask whose index fields are ``build()`` (the eight ``_TENSOR_FIELDS``, consistent by
        construction), called on first access to any of them. ``batch_heads``: the (B, H) the fields
        will have, so that ``shape`` / ``num_blocks`` / ``device`` need no fields."""
        made = cls.__new__(cls)
        made.BLOCK_SIZE = normalize_block_size(BLOCK_SIZE)
        made.seq_lengths = (int(seq_lengths[0]), int(seq_lengths[1]))
        made.mask_mod = mask_mod if mask_mod is not None else full_mask
        made._pending = (build, (int(batch_heads[0]), int(batch_heads[1])), torch.device(device))
        return made

    def is_deferred(self) -> bool:
        """Whether the index fields are still to be built (``deferred``)."""
        return "_pending" in self.__dict__

    def __getattr__(self, name: str):
        # Called only for attributes not set on the instance: a deferred mask's fields.
        pending = self.__dict__.get("_pending")
        if pending is None or name not in self._TENSOR_FIELDS:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        fields = pending[0]()
        del self.__dict__["_pending"]
        for field in self._TENSOR_FIELDS:
            setattr(self, field, fields[field])
        if not torch.compiler.is_compiling():  # (a compiled region knows no tensor versions)
            self.trusted()
        return getattr(self, name)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_block_maps(cls, partial: torch.Tensor, full: torch.Tensor, *, BLOCK_SIZE: BlockSize,
                        seq_lengths: Tuple[int, int], mask_mod: Optional[Callable]) -> "BlockMask":
        """From bool block maps ``partial``/``full`` ``[B, H, num_q_blocks, num_kv_blocks]``."""
        if partial.shape != full.shape or partial.dim() != 4:
            raise ValueError(f"block maps must both be [B, H, NQ, NKV], got {tuple(partial.shape)} and "
                             f"{tuple(full.shape)}")
        if not values_unknown(partial) and bool((partial & full).any()):
            raise ValueError("a block cannot be both partial and full")
        kv_num, kv_idx = ordered_from_dense(partial)
        full_kv_num, full_kv_idx = ordered_from_dense(full)
        q_num, q_idx = ordered_from_dense(partial.transpose(-2, -1))
        full_q_num, full_q_idx = ordered_from_dense(full.transpose(-2, -1))
        made = cls(kv_num_blocks=kv_num, kv_indices=kv_idx, full_kv_num_blocks=full_kv_num,
                   full_kv_indices=full_kv_idx, q_num_blocks=q_num, q_indices=q_idx,
                   full_q_num_blocks=full_q_num, full_q_indices=full_q_idx,
                   BLOCK_SIZE=BLOCK_SIZE, seq_lengths=seq_lengths, mask_mod=mask_mod)
        return made.trusted()

    @classmethod
    def plain_class(cls) -> type:
        """The class with FlexAttention's dense fields (``BlockMask``, for subclasses too): what cropping
        and query-block selection return."""
        return BlockMask

    # -- validation ---------------------------------------------------------------------------
    def trusted(self) -> "BlockMask":
        """Mark the current fields as consistent by construction (derived from block maps, or a
        slice / copy of a validated mask): ``validate`` then checks shapes only, with no device
        sync. Replacing or modifying a field drops the mark. Returns ``self``."""
        self._trusted = self.layout_signature()
        return self

    def layout_signature(self) -> tuple:
        """Identity and in-place version of every field: changes when a field is replaced or modified.
        (A plain loop: this runs on every call with a mask, and nested generators cost 4x as much.)"""
        signature = []
        for name in self._TENSOR_FIELDS:
            tensor = getattr(self, name)
            signature.append(id(tensor))
            signature.append(getattr(tensor, "_version", 0))
        return tuple(signature)

    def validate(self) -> "BlockMask":
        """Check the block lists against ``seq_lengths`` and ``BLOCK_SIZE`` before a kernel reads them.

        Rows must cover the sequence (``ceil(Q_LEN / Q_BLOCK_SIZE)`` query block rows, KV likewise
        for the transposed lists), a list's width be 1 to the blocks across (its partial and full lists
        alike), counts must fit the index width, indices must name blocks inside
        the sequence, no block may be listed twice or as both partial and full, and the transposed
        (``q_*``) lists must match the ``kv_*`` ones. Raises ``ValueError`` naming the field. The
        value checks cost one device sync, once per mask: the result is cached on the mask until
        a field is replaced or modified in place. Returns ``self``.
        """
        if self.is_deferred():  # built consistent when first read
            return self
        signature = self.layout_signature()
        if getattr(self, "_validated", None) == signature:
            return self
        self._check_block_lists()
        self._validated = signature
        return self

    def _check_block_lists(self) -> None:
        (q_len, kv_len), (q_bs, kv_bs) = self.seq_lengths, self.BLOCK_SIZE
        nq, nkv = -(-q_len // q_bs), -(-kv_len // kv_bs)
        batch_heads = tuple(self.kv_num_blocks.shape[:2]) if self.kv_num_blocks.dim() == 3 else ()
        for what, rows, cols, rows_of in (("kv", nq, nkv, "Q_LEN"), ("q", nkv, nq, "KV_LEN")):
            for prefix in ("", "full_"):
                indices = getattr(self, f"{prefix}{what}_indices")
                if indices.dim() == 4 and indices.shape[-2] != rows:
                    raise ValueError(
                        f"block_mask.{prefix}{what}_indices has {indices.shape[-2]} block rows but seq_lengths "
                        f"{self.seq_lengths} with BLOCK_SIZE {self.BLOCK_SIZE} needs {rows} (one per block of "
                        f"{rows_of}); rebuild the mask with create_block_mask, crop it with "
                        "block_mask._adjust(Q_LEN, KV_LEN), or (a mask indexed on query blocks) set its seq_lengths")
                if indices.dim() == 4 and not 1 <= indices.shape[-1] <= max(cols, 1):
                    raise ValueError(f"block_mask.{prefix}{what}_indices has width {indices.shape[-1]}, expected 1 "
                                     f"to {cols} (at most the number of blocks across); use BlockMask.from_flex for "
                                     "FlexAttention-style lists")
            partial, full = getattr(self, f"{what}_indices"), getattr(self, f"full_{what}_indices")
            if partial.dim() == full.dim() == 4 and partial.shape[-1] != full.shape[-1]:
                raise ValueError(f"block_mask.{what}_indices has width {partial.shape[-1]}, expected "
                                 f"{full.shape[-1]} (that of full_{what}_indices: kernels read a row's partial "
                                 "and full lists with the same strides)")
        if getattr(self, "_trusted", None) == self.layout_signature() or self.device.type == "meta":
            return
        problems, maps = [], {}
        for what, rows, cols in (("kv", nq, nkv), ("q", nkv, nq)):
            for prefix in ("", "full_"):
                name = prefix + what
                found, maps[name] = block_list_problems(name, getattr(self, f"{name}_num_blocks"),
                                                        getattr(self, f"{name}_indices"), batch_heads, rows, cols)
                problems += found
        if maps["kv"] is not None:
            problems += [
                ((maps["kv"] & maps["full_kv"]).any(), "block_mask lists a block as both partial (kv_indices) and "
                                                       "full (full_kv_indices)"),
                ((maps["q"].transpose(-1, -2) != maps["kv"]).any(),
                 "block_mask.q_num_blocks / q_indices are not the transpose of kv_num_blocks / kv_indices"),
                ((maps["full_q"].transpose(-1, -2) != maps["full_kv"]).any(),
                 "block_mask.full_q_num_blocks / full_q_indices are not the transpose of full_kv_num_blocks / "
                 "full_kv_indices"),
            ]
        raise_problems(problems)  # in order: a list's own problems come before cross-list ones

    # -- views --------------------------------------------------------------------------------
    @property
    def shape(self) -> Tuple[int, int, int, int]:
        """``(B, H, Q_LEN, KV_LEN)``; B/H are 1 where the mask broadcasts."""
        pending = self.__dict__.get("_pending")
        batch, heads = pending[1] if pending is not None else self.kv_num_blocks.shape[:2]
        return (batch, heads) + self.seq_lengths

    @property
    def num_blocks(self) -> Tuple[int, int]:
        """``(num_q_blocks, num_kv_blocks)``: the tile grid, read from the row counts of the kv lists and of the
        transposed q lists, not from the index width (narrower lists are allowed). For a mask that validates
        it is ``ceil(Q_LEN / Q_BLOCK_SIZE), ceil(KV_LEN / KV_BLOCK_SIZE)``; a mask indexed on query blocks
        keeps its selected rows."""
        if self.is_deferred():
            (q_len, kv_len), (q_bs, kv_bs) = self.seq_lengths, self.BLOCK_SIZE
            return -(-q_len // q_bs), -(-kv_len // kv_bs)
        return self.kv_num_blocks.shape[-1], self.q_num_blocks.shape[-1]

    @property
    def device(self) -> torch.device:
        pending = self.__dict__.get("_pending")
        return pending[2] if pending is not None else self.kv_num_blocks.device

    def row_layout(self, row: int, device=None):
        """Query block row ``row`` as ``((num, indices), (full_num, full_indices))``: partial then full
        blocks, ``num`` int32 ``[Bm, Hm]`` and ``indices`` ``[Bm, Hm, NKV]`` (the first ``num`` valid),
        ``Bm``/``Hm`` the mask's own sizes (1 when it broadcasts). The compact layout overrides this
        to read its compressed rows without building the dense fields."""
        def pick(t):
            return t[:, :, row] if device is None else t[:, :, row].to(device)
        return ((pick(self.kv_num_blocks), pick(self.kv_indices)),
                (pick(self.full_kv_num_blocks), pick(self.full_kv_indices)))

    def partial_blocks(self) -> torch.Tensor:
        """Bool ``[B, H, NQ, NKV]``: blocks where the mask_mod must be evaluated."""
        return dense_from_ordered(self.kv_num_blocks, self.kv_indices, self.num_blocks[1])

    def full_blocks(self) -> torch.Tensor:
        """Bool ``[B, H, NQ, NKV]``: blocks that are entirely True."""
        return dense_from_ordered(self.full_kv_num_blocks, self.full_kv_indices, self.num_blocks[1])

    def to_dense(self) -> torch.Tensor:
        """Int32 ``[B, H, NQ, NKV]``: 1 for every block that is computed (partial or full)."""
        return (self.partial_blocks() | self.full_blocks()).to(torch.int32)

    def numel(self) -> int:
        """Number of (b, h, q, kv) elements of ``shape``, not counting sparsity (FlexAttention's)."""
        batch, heads, q_len, kv_len = self.shape
        return batch * heads * q_len * kv_len

    def sparsity(self) -> float:
        """Percentage of blocks that are never computed (0 = dense, 100 = nothing attends)."""
        computed = self.launch_plan.computed_blocks  # counted when the mask was built: no device read
        if computed < 0:
            computed = int(self.kv_num_blocks.sum()) + int(self.full_kv_num_blocks.sum())
        batch, heads = self.shape[:2]
        total = batch * heads * self.num_blocks[0] * self.num_blocks[1]
        return 100.0 * (1.0 - computed / total) if total else 0.0

    def to_string(self, grid_size: Union[int, Tuple[int, int]] = (20, 20), limit: int = 4) -> str:
        """An ASCII picture per (b, h): ``█`` full, ``░`` partial, blank empty.

        Larger maps are summarized: a character stands for a group of blocks (``█`` only when
        all are full, blank only when all are empty). ``grid_size=-1`` shows every block.
        """
        row_step, col_step, group_size = picture_grid(self.num_blocks, grid_size)
        grid_rows, grid_cols = group_size.shape
        nq, nkv = self.num_blocks

        def per_group(blocks: torch.Tensor) -> torch.Tensor:  # [Bm, Hm, NQ, NKV] bool -> block counts per group
            padded = torch.nn.functional.pad(blocks.int().cpu(), (0, grid_cols * col_step - nkv,
                                                                   0, grid_rows * row_step - nq))
            return padded.view(*blocks.shape[:2], grid_rows, row_step, grid_cols, col_step).sum((3, 5))

        full, partial = per_group(self.full_blocks()), per_group(self.partial_blocks())
        return render_block_pictures(lambda b, h: (full[b, h], partial[b, h]), group_size, *full.shape[:2], limit)

    def __str__(self) -> str:
        return f"BlockMask(shape={self.shape}, sparsity={self.sparsity():.2f}%,\n{self.to_string()}\n)"

    def __repr__(self) -> str:
        name = getattr(self.mask_mod, "__name__", "mask_mod")
        return (f"BlockMask(shape={self.shape}, BLOCK_SIZE={self.BLOCK_SIZE}, sparsity={self.sparsity():.2f}%, "
                f"mask_mod={name}, device={self.device})")

    def to(self, device: Union[str, torch.device]) -> "BlockMask":
        """A copy with every index tensor on ``device`` (the mask_mod is shared)."""
        moved = {name: getattr(self, name).to(device) for name in self._TENSOR_FIELDS}
        copy = BlockMask(**moved, BLOCK_SIZE=self.BLOCK_SIZE, seq_lengths=self.seq_lengths, mask_mod=self.mask_mod,
                         launch_plan=self.launch_plan)
        copy.exact_layout = self.exact_layout  # the same layout
        return copy.trusted() if self.is_trusted() else copy

    def is_trusted(self) -> bool:
        """Whether the fields were validated (or built consistent) and not changed since."""
        if self.is_deferred():
            return True
        signature = self.layout_signature()
        return signature in (getattr(self, "_trusted", None), getattr(self, "_validated", None))

    def __getitem__(self, index) -> "BlockMask":
        """Select batches / heads / query block rows: ``mask[b]``, ``mask[b, h]``, ``mask[b, h, i]``;
        ints, slices or index tensors (FlexAttention's indexing).

        Integer indices keep the dimension (size 1). Over batch and head, the sliced mask's
        ``mask_mod`` maps its local ``b``/``h`` back to the original ones, so it stays usable in
        ``attention``. Selecting query block rows keeps ``seq_lengths`` and replaces the mask_mod
        with one that refuses to run, as in Flex: the rows no longer start at query 0, so set
        ``mask_mod`` (with the rows' query offset) and ``seq_lengths`` before attending with it.
        """
        index = index if isinstance(index, tuple) else (index,)
        if len(index) > 3:
            raise IndexError(f"BlockMask can be indexed over [batch, head, query block] at most, got "
                             f"{len(index)} indices")
        batch_map, head_map = batch_head_maps(index[:2], self.shape[:2])
        if len(index) == 3:
            return self.select_query_blocks(batch_map, head_map, index[2])
        fields = {}
        for name in self._TENSOR_FIELDS:
            value = getattr(self, name)
            fields[name] = value[batch_map.to(value.device)][:, head_map.to(value.device)].contiguous()
        sliced = BlockMask(**fields, BLOCK_SIZE=self.BLOCK_SIZE, seq_lengths=self.seq_lengths,
                           mask_mod=sliced_mask_mod(self.mask_mod, batch_map, head_map))
        sliced.exact_layout = self.exact_layout  # the same layouts, each (b, h) at its own
        return sliced.trusted() if self.is_trusted() else sliced
