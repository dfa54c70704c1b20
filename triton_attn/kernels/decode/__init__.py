"""Decode kernels: split-KV decode and paged attention (one or a few query rows per sequence).

They take the user's mods as the generated ``@triton.jit`` functions of ``kernels.jit.functions``
(``MASK_FN`` / ``SCORE_FN`` constexpr arguments with captured tuples), like the prefill kernels of
``kernels.attention``, and tune through ``kernels.tuning``. Files: ``kernel.py`` (the ``@triton.jit``
source: split kernel and combine kernel), ``launch.py`` (packing, splits, arguments, the combine
step), ``configs.py`` (the config table and heuristics), ``aot.py`` (ahead-of-time builds).
"""
