"""Decode kernels: split-KV decode and paged attention (one or a few query rows per sequence).

They take the user's mods as the generated ``@triton.jit`` functions of ``kernels.jit.functions``
(``MASK_FN`` / ``SCORE_FN`` constexpr arguments with captured tuples), like the prefill kernels of
``kernels.attention``, and tune through ``kernels.tuning``.
"""
