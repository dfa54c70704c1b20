"""The transformers model types whose own code computes with the attention mask as a tensor.

Most models hand the prepared mask straight to the attention function, and ours gets a ``ModelBlockMask``
(no dense ``[Lq, Lkv]`` tensor). The models below read, slice, concatenate or extend the mask themselves
before calling attention (a sparse-attention indexer scores keys under it, a decoder concatenates self- and
cross-attention masks, ...), which a ``ModelBlockMask`` cannot answer exactly. For them the mask function
returns what transformers' sdpa mask function returns (never its "no mask, is_causal" skip): a dense bool
``[B, 1 or H, Lq, Lkv]`` tensor, True = attend; or, for a model without sdpa, what its eager mask function
returns (the additive float form). Our attention function takes both (``DenseMaskMod``; an additive bias).

Keyed by the ``model_type`` of the config the model passes to the mask function (a sub-config's, for the
text or decoder part of a composite model). Hand-maintained: the architecture sweep
(``tests/registry/architecture_sweep.py``) fails loudly for a new model that uses the mask as a tensor
(``ModelBlockMask`` refuses every other tensor operation by name), and it is added here.
"""

from __future__ import annotations

from typing import Dict, NamedTuple

import torch

__all__ = ["TensorMaskModel", "TENSOR_MASK_MODELS", "tensor_mask_form", "as_tensor_mask_form"]


class TensorMaskModel(NamedTuple):
    """How a model that computes with its mask gets it: ``form`` ``"bool"`` (sdpa's mask: True = attend) or
    ``"additive"`` (eager's: 0 where allowed, the dtype's minimum elsewhere, for a model that has no sdpa and
    whose code assumes eager's float mask), and why the model needs a tensor."""

    form: str
    reason: str


_DSA = TensorMaskModel("bool", "DeepSeek sparse attention: its indexer scores keys under attention_mask[:, 0, :, :]")

# model_type -> how and why the model gets a tensor mask.
TENSOR_MASK_MODELS: Dict[str, TensorMaskModel] = {
    **{model_type: _DSA for model_type in ("axk2", "deepseek_v32", "glm_moe_dsa", "hy_v4")},
    **{model_type: TensorMaskModel("bool", "its sparse-attention indexer reads attention_mask[:, 0] and its dtype")
       for model_type in ("dots3_note", "dots3_note_text")},
    "kolibri1_1": TensorMaskModel("bool", "its indexer reads attention_mask[:, 0].clone() and folds its selection "
                                  "into the mask"),
    **{model_type: TensorMaskModel("bool", "its QSA indexer calls torch.nonzero on the mask and folds its selection "
                                   "into it") for model_type in ("qwen4_exp", "qwen4_exp_text")},
    "doge": TensorMaskModel("bool", "its dynamic mask slices attention_mask[..., :kv_len] and adds a learned bias"),
    "deepseek_v4": TensorMaskModel("additive", "it appends compressed keys and extends a tensor mask with the "
                                   "compressor's additive block_bias cast to the mask's dtype (no sdpa: eager's "
                                   "float mask is the form its code is written for)"),
    "t5gemma2_decoder": TensorMaskModel("bool", "its decoder concatenates self- and cross-attention masks: "
                                        "torch.cat(..., dim=-1)"),
}


def tensor_mask_form(config):
    """``"bool"`` / ``"additive"`` when the model of ``config`` (the ``config`` keyword of a mask request; None:
    unknown) needs a dense tensor mask (``TENSOR_MASK_MODELS``), else None (it gets a ``ModelBlockMask``)."""
    entry = TENSOR_MASK_MODELS.get(getattr(config, "model_type", None))
    return None if entry is None else entry.form


def as_tensor_mask_form(allowed: torch.Tensor, form: str, dtype=None) -> torch.Tensor:
    """A bool mask ``allowed`` (True = attend) in ``form``: itself, or eager's additive float mask of ``dtype``
    (default float32: 0 where allowed, ``torch.finfo(dtype).min`` elsewhere)."""
    if form == "bool":
        return allowed
    dtype = torch.float32 if dtype is None else dtype
    return torch.where(allowed, torch.zeros((), dtype=dtype, device=allowed.device), torch.finfo(dtype).min)
