"""Attention and mask registries and the transformers integration (our own models: ``triton_attn.models``).

Importing this package registers nothing: the built-in names (``triton_attn``, ``sdpa``, ``eager``) are made on
the first lookup, so ``ALL_ATTENTION_FUNCTIONS["triton_attn"]`` just works (``defaults`` says more).

```python
from triton_attn.masks import document_mask
from triton_attn.registry import register_attention

register_attention("doc_causal", mask_mod=document_mask(doc_ids))   # ours + transformers' registries
model = AutoModelForCausalLM.from_config(config, attn_implementation="doc_causal")
```

Files: ``interface`` (the registries, signature checks), ``masking`` (mask functions: a model's mask
request -> BlockMask), ``mask_patterns`` (transformers' mask_function closures read: closed-form families,
packed sequences), ``model_block_mask`` (the ``ModelBlockMask`` they return, and the tensor operations a
model may apply to it), ``attention_functions`` (the model-facing attention functions), ``packed``
(sequences packed in one row run as varlen attention), ``keywords`` (every keyword models pass to attention
functions: implemented, harmless or refused), ``tensor_mask_models`` (the model types whose own code
computes with the mask: they get a dense mask), ``defaults`` (the built-in names, made on first lookup),
``registration`` (``register_attention``, ``register_transformers``).

Importing this package does not import transformers; ``register_attention`` and
``register_transformers`` import it when they register there.
"""

from .attention_functions import eager_attention_function, make_attention_function, sdpa_attention_function
from .interface import (
                        ALL_ATTENTION_FUNCTIONS,
                        ALL_MASK_ATTENTION_FUNCTIONS,
                        AttentionInterface,
                        AttentionMaskInterface,
                        MissingMaskFunctionWarning,
)
from .masking import ModelBlockMask, dense_mask_function, make_mask_function
from .registration import DEFAULT_NAME, RegisteredAttention, register_attention, register_transformers

__all__ = [
    "AttentionInterface", "AttentionMaskInterface", "ALL_ATTENTION_FUNCTIONS", "ALL_MASK_ATTENTION_FUNCTIONS",
    "MissingMaskFunctionWarning", "register_attention", "register_transformers", "RegisteredAttention",
    "make_attention_function", "make_mask_function", "ModelBlockMask", "dense_mask_function",
    "eager_attention_function", "sdpa_attention_function", "DEFAULT_NAME",
]
