"""From a traced mask_mod / score_mod to Triton: expressions, derivatives, generated ``@triton.jit``
functions (``functions.mod_functions``: the interface kernels use), module files, interpreter glue."""
