"""``ReferenceVisionLanguageModel``: a vision encoder and a text decoder as two sub-models (Llava-style), so
that ``set_attn_implementation({"vision": "sdpa", "text": "triton_attn", "": ...})`` sets each backbone."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..registry import ALL_ATTENTION_FUNCTIONS, AttentionInterface, AttentionMaskInterface
from .base import AttentionModel, Implementation
from .config import ModelConfig
from .decoder import DecoderOutput, ReferenceDecoder

__all__ = ["VisionLanguageConfig", "ReferenceVisionLanguageModel"]


@dataclass
class VisionLanguageConfig:
    """A vision encoder (``vision``, bidirectional, takes patch features) and a text decoder (``text``)."""

    vision: ModelConfig = field(default_factory=lambda: ModelConfig(vocab_size=None, causal=False))
    text: ModelConfig = field(default_factory=ModelConfig)
    patch_dim: int = 48
    attn_implementation: str = "triton_attn"  # the "" entry: the model itself has no attention layer


class ReferenceVisionLanguageModel(AttentionModel):
    """Llava-style: encode patches, project them, put them before the text tokens, decode.

    ``set_attn_implementation({"vision": "sdpa", "text": "triton_attn"})`` sets each backbone.
    attn_implementation (constructor): a str or such a dict, applied after construction.
    """

    sub_model_names = ("vision", "text")

    def __init__(self, config: VisionLanguageConfig, attn_implementation: Optional[Implementation] = None,
                 attention_interface: Optional[AttentionInterface] = None,
                 mask_interface: Optional[AttentionMaskInterface] = None):
        super().__init__()
        if config.vision.vocab_size is not None or config.vision.causal:
            raise ValueError("VisionLanguageConfig.vision must be an encoder: vocab_size=None, causal=False")
        self.config = config
        self.attention_interface = attention_interface if attention_interface is not None else ALL_ATTENTION_FUNCTIONS
        self.patch_embed = nn.Linear(config.patch_dim, config.vision.hidden_size)
        self.vision = ReferenceDecoder(config.vision, attention_interface, mask_interface)
        self.projector = nn.Linear(config.vision.hidden_size, config.text.hidden_size)
        self.text = ReferenceDecoder(config.text, attention_interface, mask_interface)
        if attn_implementation is not None:
            self.set_attn_implementation(attn_implementation)

    def forward(self, input_ids: torch.Tensor, patches: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                **kwargs) -> DecoderOutput:
        """input_ids [B, S]; patches [B, N, patch_dim]; attention_mask [B, S] for the text part (0 = padding)."""
        image = self.vision(inputs_embeds=self.patch_embed(patches), **kwargs).hidden_states
        embeds = torch.cat([self.projector(image), self.text.embed_tokens(input_ids)], dim=1)
        if attention_mask is not None:
            attention_mask = torch.cat([attention_mask.new_ones(attention_mask.shape[0], image.shape[1]),
                                        attention_mask], dim=1)
        return self.text(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)
