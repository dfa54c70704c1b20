"""Attention and mask registries, the transformers integration, and our own attention layers.

```python
from triton_attn.masks import document_mask
from triton_attn.registry import register_attention

register_attention("doc_causal", mask_mod=document_mask(doc_ids))   # ours + transformers' registries
model = AutoModelForCausalLM.from_config(config, attn_implementation="doc_causal")
```

Files: ``interface`` (the registries, signature checks), ``masking`` (mask functions: a model's mask
request -> BlockMask), ``model_block_mask`` (the ``ModelBlockMask`` they return, and the tensor operations
a model may apply to it), ``attention_functions`` (the model-facing attention functions), ``keywords``
(every keyword models pass to attention functions: implemented, harmless or refused),
``tensor_mask_models`` (the model types whose own code computes with the mask: they get a dense mask),
``registration`` (``register_attention``, ``register_transformers``), ``layers`` (our nn.Modules).

Importing this package does not import transformers; ``register_attention`` and
``register_transformers`` import it when they register there.
"""

from .attention_functions import eager_attention_function, make_attention_function, sdpa_attention_function
from .interface import (ALL_ATTENTION_FUNCTIONS, ALL_MASK_ATTENTION_FUNCTIONS, AttentionInterface,
                        AttentionMaskInterface, MissingMaskFunctionWarning)
from .masking import ModelBlockMask, dense_mask_function, make_mask_function
from .registration import (DEFAULT_NAME, RegisteredAttention, register_attention, register_defaults,
                           register_transformers)
from .layers import (Attention, KVCache, ModelConfig, ReferenceDecoder, ReferenceVisionLanguageModel,
                     VisionLanguageConfig)

register_defaults()

__all__ = [
    "AttentionInterface", "AttentionMaskInterface", "ALL_ATTENTION_FUNCTIONS", "ALL_MASK_ATTENTION_FUNCTIONS",
    "MissingMaskFunctionWarning", "register_attention", "register_transformers", "RegisteredAttention",
    "make_attention_function", "make_mask_function", "ModelBlockMask", "dense_mask_function",
    "eager_attention_function", "sdpa_attention_function", "DEFAULT_NAME",
    "Attention", "KVCache", "ModelConfig", "ReferenceDecoder", "ReferenceVisionLanguageModel", "VisionLanguageConfig",
]
