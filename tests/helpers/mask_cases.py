"""The mask library as named test cases, shared by the kernel test files."""

from __future__ import annotations

from typing import Callable, Dict

import torch
from hypothesis import strategies as st

from triton_attn.masks import (
    and_masks,
    causal_mask,
    chunked_mask,
    document_mask,
    not_mask,
    or_masks,
    padding_mask,
    prefix_lm_mask,
    sliding_window_mask,
)


def document_ids(batch: int, length: int) -> torch.Tensor:
    """[B, S] int64 ids of random-length documents (four per sequence), different per sequence."""
    ids = []
    for _ in range(batch):
        bounds = torch.sort(torch.randint(1, length, (3,))).values
        ids.append(torch.bucketize(torch.arange(length), bounds, right=True))
    return torch.stack(ids)


def library_mask_cases(batch: int, length: int) -> Dict[str, Callable]:
    """Every mask family of the library (captured tensors drawn fresh), sized for ``length`` tokens."""
    ids = document_ids(batch, length)
    keep = torch.rand(batch, length) > 0.3
    keep[:, 0] = True
    return {
        "causal": causal_mask,
        "sliding_window": sliding_window_mask(max(1, length // 4)),
        "chunked": chunked_mask(max(1, length // 3)),
        "prefix_lm": prefix_lm_mask(length // 4),
        "prefix_lm_per_batch": prefix_lm_mask(torch.tensor([10, length // 2 + 1])[:batch]),
        "document_2d": document_mask(ids),
        "document_1d": document_mask(ids[0]),
        "padding": padding_mask(keep),
        "causal_document": and_masks(causal_mask, document_mask(ids)),
        "window_or_prefix": or_masks(sliding_window_mask(16), prefix_lm_mask(8)),
        "not_causal": not_mask(causal_mask),
    }

def _primitive_mask(draw, length):
    kind = draw(st.sampled_from(["causal", "window", "chunked", "prefix", "document", "padding", "modular"]))
    if kind == "causal":
        return causal_mask
    if kind == "window":
        return sliding_window_mask(draw(st.integers(1, length)))
    if kind == "chunked":
        return chunked_mask(draw(st.integers(1, length)))
    if kind == "prefix":
        return prefix_lm_mask(draw(st.integers(0, length)))
    if kind == "document":
        cuts = sorted(draw(st.lists(st.integers(1, length - 1), max_size=4)))
        return document_mask(torch.bucketize(torch.arange(length), torch.tensor(cuts, dtype=torch.long), right=True))
    if kind == "padding":
        valid = draw(st.integers(1, length))
        keep = torch.arange(length) < valid
        return padding_mask(keep[None, :])
    modulus = draw(st.integers(2, 7))

    def modular(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx) % modulus != 1

    return modular


@st.composite
def composed_masks(draw, length):
    """A random and/or/not composition of up to three library masks over ``length`` tokens."""
    mask = _primitive_mask(draw, length)
    for _ in range(draw(st.integers(0, 2))):
        combine = draw(st.sampled_from(["and", "or", "not"]))
        if combine == "not":
            mask = not_mask(mask)
        elif combine == "and":
            mask = and_masks(mask, _primitive_mask(draw, length))
        else:
            mask = or_masks(mask, _primitive_mask(draw, length))
    return mask
