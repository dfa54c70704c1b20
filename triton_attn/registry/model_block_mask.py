"""``ModelBlockMask``: the BlockMask our mask function returns to a model, and the tensor operations a model
may apply to it.

Most models hand the mask straight to the attention function. A few fold a bias into the prepared mask
first, treating it as the tensor sdpa's mask function would return (bool ``[B, 1, Lq, Lkv]``, True =
attend). Falcon with ALiBi does::

    if mask.dtype == torch.bool:
        mask = torch.where(mask, torch.full((), 0.0), min_dtype)     # the additive form
    mask = torch.masked_fill(alibi / sqrt(head_dim), mask < -1, min_dtype)

A ``ModelBlockMask`` answers these operations exactly, without a dense tensor: it is one of three *views*
of the same block layout,

- ``"allowed"``: the bool mask, True = attend (what the mask function returns; ``dtype`` torch.bool);
- ``"blocked"``: its negation, True = masked (``~mask``, ``additive < threshold``);
- ``"additive"``: 0 on allowed positions and a very negative fill on blocked ones, plus ``bias`` (a tensor
  broadcastable to ``[B, H, Lq, Lkv]``) on the allowed positions (``dtype`` a float dtype),

and the operations move between views or add to ``bias``: ``torch.where(allowed, x, fill)``,
``torch.masked_fill(x, blocked, fill)``, ``x + additive``, comparisons of an additive view with a
threshold between its fill and 0, ``~``, ``.to(dtype / device)``. The attention function takes the
allowed or the additive view and adds ``bias`` to the scores inside the kernel (a Falcon ALiBi bias
``[B, H, 1, Lkv]`` is read per key: no ``[Lq, Lkv]`` tensor is formed). Any other tensor operation is a
``TypeError`` naming it: a model that computes attention itself from the mask (MPT, BLOOM: their attention
never calls transformers' AttentionInterface) cannot run on triton_attn.
"""

from __future__ import annotations

import numbers
from typing import Optional

import torch

from ..masks import BlockMask

__all__ = ["ModelBlockMask", "BLOCK_MASK_FIELDS", "MASKING_FILL"]

BLOCK_MASK_FIELDS = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
                     "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")
# A fill value at or below this masks a position (softmax weight exp(fill - max) is 0 in float32; float16's
# most negative value is -65504). Values above it would be real scores, not masking.
MASKING_FILL = -1.0e4


def _scalar(value) -> Optional[float]:
    """``value`` as a float when it is a Python number or a one-element tensor, else None."""
    if isinstance(value, numbers.Number) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value.reshape(()).item())
    return None


def _operation_name(func) -> str:
    return getattr(func, "__name__", None) or repr(func)


class ModelBlockMask(BlockMask):
    """A ``BlockMask`` for one attention call of a model, remembering where its rows and columns start.

    ``q_offset`` / ``kv_offset``: absolute position of query row 0 / key column 0. ``q_positions``:
    ``[q_length]`` absolute query positions when they are not contiguous (transformers 4.5x
    ``cache_position``), else None. The attention function uses them to give score_mods absolute
    positions, the same ones the mask_mod saw. ``view``, ``fill`` and ``bias``: see the module docstring.
    """

    q_offset: int = 0
    kv_offset: int = 0
    q_positions: Optional[torch.Tensor] = None
    # transformers treats a mask with ndim 4 as prepared and passes it back to the mask function (e.g.
    # generate() with a static cache builds the mask once per step and hands it to the model's forward).
    ndim = 4
    view: str = "allowed"
    fill: Optional[float] = None                # the additive view's value on blocked positions
    additive_dtype: Optional[torch.dtype] = None
    bias: Optional[torch.Tensor] = None         # additive view: added to the scores of allowed positions

    @classmethod
    def wrap(cls, block_mask: BlockMask, q_offset: int, kv_offset: int,
             q_positions: Optional[torch.Tensor] = None) -> "ModelBlockMask":
        if block_mask.is_deferred():  # keep it so: its fields are built when first read
            wrapped = cls.__new__(cls)
            wrapped.__dict__.update({k: v for k, v in block_mask.__dict__.items() if k != "_derived"})
            wrapped.q_offset, wrapped.kv_offset, wrapped.q_positions = int(q_offset), int(kv_offset), q_positions
            return wrapped
        fields = {name: getattr(block_mask, name) for name in BLOCK_MASK_FIELDS}
        wrapped = cls(**fields, BLOCK_SIZE=block_mask.BLOCK_SIZE, seq_lengths=block_mask.seq_lengths,
                      mask_mod=block_mask.mask_mod, launch_plan=block_mask.launch_plan)
        wrapped.q_offset, wrapped.kv_offset, wrapped.q_positions = int(q_offset), int(kv_offset), q_positions
        wrapped.exact_layout = block_mask.exact_layout
        if torch.compiler.is_compiling() or not block_mask.is_trusted():  # versions unknown while compiling
            return wrapped
        return wrapped.trusted()  # same lists: no new validation

    # -- views ------------------------------------------------------------------------------------
    def _with(self, **changes) -> "ModelBlockMask":
        """A copy sharing the layout (the same index tensors, deferred or not) with some attributes changed."""
        copy = type(self).__new__(type(self))
        copy.__dict__.update({k: v for k, v in self.__dict__.items() if k != "_derived"})
        copy.__dict__.update(changes)
        return copy

    @property
    def dtype(self) -> torch.dtype:
        """torch.bool for the allowed / blocked views, the float dtype of the additive view."""
        return self.additive_dtype if self.view == "additive" else torch.bool

    def dim(self) -> int:
        return 4

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # a deferred mask's fields
        except AttributeError:
            if not name.startswith("__") and hasattr(torch.Tensor, name):  # (an AttributeError: hasattr works)
                raise AttributeError(self._refusal(f".{name}", "a tensor attribute a ModelBlockMask does not have"))
            raise

    def _refusal(self, operation: str, why: str = "") -> str:
        return (f"{operation} on a triton_attn ModelBlockMask ({self.view} view){': ' + why if why else ''}. The "
                f"model uses its attention mask as a tensor; triton_attn supports only folding a bias into it "
                f"(torch.where(mask, bias, min), torch.masked_fill(bias, ~mask, min), bias + additive mask). Models "
                f"whose attention does not call transformers' AttentionInterface (MPT, BLOOM) cannot use "
                f"attn_implementation='triton_attn': use 'eager' or 'sdpa'. A model that computes with its mask "
                f"before calling attention gets a tensor mask once its config's model_type is listed in "
                f"triton_attn.registry.tensor_mask_models.TENSOR_MASK_MODELS")

    def _refuse(self, operation: str, why: str = ""):
        raise TypeError(self._refusal(operation, why))

    def _additive(self, fill, dtype: torch.dtype, bias) -> "ModelBlockMask":
        value = _scalar(fill)
        if value is None or value > MASKING_FILL:
            self._refuse("filling masked positions", f"the fill value {fill!r} is not a masking value "
                         f"(a number <= {MASKING_FILL:g}, e.g. torch.finfo(dtype).min)")
        if not (dtype.is_floating_point):
            self._refuse("an additive mask", f"of non-float dtype {dtype}")
        if bias is not None:
            constant = _scalar(bias) if not isinstance(bias, torch.Tensor) or bias.numel() == 1 else None
            if constant == 0.0:
                bias = None  # the additive form itself: no bias
            elif not isinstance(bias, torch.Tensor):
                bias = torch.tensor(float(bias))
        if bias is not None:
            if bias.dim() > 4:
                self._refuse("a bias", f"of shape {tuple(bias.shape)} (more than 4 dimensions)")
            bias = bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))
        return self._with(view="additive", fill=value, additive_dtype=dtype, bias=bias)

    def _bool_view(self, view: str) -> "ModelBlockMask":
        return self._with(view=view, fill=None, additive_dtype=None, bias=None)

    def __invert__(self) -> "ModelBlockMask":
        if self.view == "additive":
            self._refuse("~ (logical not)", "the additive view is not a bool mask")
        return self._bool_view("blocked" if self.view == "allowed" else "allowed")

    def _compare(self, operation: str, threshold, blocked_when_below: bool) -> "ModelBlockMask":
        value = _scalar(threshold)
        if self.view != "additive" or self.bias is not None or value is None or not (self.fill < value < 0):
            self._refuse(f"comparison {operation} {threshold!r}",
                         "only an additive mask without bias compares, with a threshold between its fill and 0")
        return self._bool_view("blocked" if blocked_when_below else "allowed")

    def __lt__(self, other):
        return self._compare("<", other, True)

    def __le__(self, other):
        return self._compare("<=", other, True)

    def __gt__(self, other):
        return self._compare(">", other, False)

    def __ge__(self, other):
        return self._compare(">=", other, False)

    def __add__(self, other):
        if self.view != "additive" or isinstance(other, ModelBlockMask):
            self._refuse("+", "only an additive mask takes a bias, and only one mask")
        if not isinstance(other, torch.Tensor) and _scalar(other) is None:
            return NotImplemented
        added = other if self.bias is None else self.bias + other
        return self._additive(self.fill, torch.result_type(torch.zeros((), dtype=self.additive_dtype), other),
                              added)

    __radd__ = __add__

    def bool(self) -> "ModelBlockMask":
        return self.to(torch.bool)

    def to(self, *args, **kwargs) -> "ModelBlockMask":
        """``.to(device)``, ``.to(dtype)``, ``.to(device, dtype)``, ``.to(tensor)``: the same view (and bias)
        on another device; bool of an additive view without bias is its blocked view (nonzero = masked),
        float of an additive view the same view in that dtype."""
        device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
        kwargs.pop("non_blocking", None), kwargs.pop("copy", None)
        if kwargs:
            self._refuse(f".to(**{sorted(kwargs)})")
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            elif isinstance(arg, torch.Tensor):
                device, dtype = arg.device, arg.dtype
            elif isinstance(arg, (str, torch.device, int)):
                device = arg
            else:
                self._refuse(f".to({arg!r})")
        mask = self
        if device is not None and torch.device(device) != self.device:
            moved = BlockMask.to(self, device)
            mask = self._with(**{name: getattr(moved, name) for name in BLOCK_MASK_FIELDS})
            mask.__dict__.pop("_pending", None)
            if self.bias is not None:
                mask.bias = self.bias.to(device)
            if self.q_positions is not None:
                mask.q_positions = self.q_positions.to(device)
        if dtype is None or dtype == mask.dtype:
            return mask
        if dtype == torch.bool and mask.view == "additive" and mask.bias is None:
            return mask._bool_view("blocked")
        if dtype.is_floating_point and mask.view == "additive":
            return mask._with(additive_dtype=dtype, bias=None if mask.bias is None else mask.bias.to(dtype))
        self._refuse(f".to({dtype})", "a bool mask as numbers would be 0 / 1 weights, not an additive mask")

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        """torch functions with a ModelBlockMask argument: ``where``, ``masked_fill``, ``add``,
        ``logical_not`` / ``bitwise_not`` (see the module docstring); anything else is refused."""
        kwargs = dict(kwargs or {})
        name = _operation_name(func).strip("_")
        values = list(args) + list(kwargs.values())
        masks = [value for value in values if isinstance(value, ModelBlockMask)]
        if len(masks) != 1:
            raise TypeError(f"torch.{name} with {len(masks)} triton_attn ModelBlockMasks among its top-level "
                            "arguments: only operations on one mask (folding a bias into it) are supported")
        mask = masks[0]
        if name == "where":
            condition, if_true, if_false = _bind(args, kwargs, ("condition", "input", "other"))
            if condition is mask and mask.view == "allowed":
                return mask._additive(if_false, torch.result_type(if_true, if_false), if_true)
            if condition is mask and mask.view == "blocked":
                return mask._additive(if_true, torch.result_type(if_true, if_false), if_false)
        if name == "masked_fill":
            target, where, fill = _bind(args, kwargs, ("input", "mask", "value"))
            if where is mask and isinstance(target, torch.Tensor) and mask.view == "blocked":
                return mask._additive(fill, target.dtype, target)
        if name in ("add", "radd") and len(values) == 2:
            return mask.__add__(values[1] if values[0] is mask else values[0])
        if name in ("logical_not", "bitwise_not", "invert") and len(values) == 1:
            return ~mask
        mask._refuse(f"torch.{name}")


def _bind(args: tuple, kwargs: dict, names: tuple) -> list:
    """The arguments of a call by position then by name, in the order of ``names`` (None where missing)."""
    bound = list(args[:len(names)]) + [None] * max(0, len(names) - len(args))
    for index, name in enumerate(names):
        if name in kwargs:
            bound[index] = kwargs[name]
    return bound
