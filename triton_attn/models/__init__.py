"""Small demo/reference models over ``triton_attn.registry``, for code outside transformers (and our tests).

```python
from triton_attn.models import ModelConfig, ReferenceDecoder

decoder = ReferenceDecoder(ModelConfig(num_kv_heads=2, sliding_window=8)).eval()
tokens = decoder.generate(torch.randint(0, 128, (1, 12)), max_new_tokens=3, cache="paged")
decoder.set_attn_implementation("sdpa")   # any name of triton_attn.registry.AttentionInterface
```

Files: ``config`` (``ModelConfig``: sizes, layer types, attention options), ``layers`` (rotary positions,
the contiguous ``KVCache``, ``Attention`` looking its function up by name at every call, ``DecoderLayer``),
``base`` (``AttentionModel``: ``set_attn_implementation`` over a model and its sub-models), ``decoder``
(``ReferenceDecoder``: masks per layer type through ``AttentionMaskInterface``, contiguous or paged cache,
greedy ``generate``), ``vlm`` (``ReferenceVisionLanguageModel``: a vision encoder and a text decoder).
Nothing here is imported by ``triton_attn`` or ``triton_attn.registry``; import it explicitly.
"""

from .base import AttentionModel, check_implementation
from .config import LAYER_TYPES, ModelConfig
from .decoder import DecoderOutput, ReferenceDecoder
from .layers import Attention, DecoderLayer, KVCache, rotary_embedding
from .vlm import ReferenceVisionLanguageModel, VisionLanguageConfig

__all__ = ["ModelConfig", "Attention", "DecoderLayer", "ReferenceDecoder", "ReferenceVisionLanguageModel",
           "VisionLanguageConfig", "KVCache", "DecoderOutput", "AttentionModel", "LAYER_TYPES", "check_implementation",
           "rotary_embedding"]
