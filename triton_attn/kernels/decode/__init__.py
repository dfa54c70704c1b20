"""Split-KV decode and paged attention kernels: ``kernel.py`` (``@triton.jit`` source), ``launch.py``
(packing, splits, arguments, the combine step), ``configs.py`` (the config table and heuristics)."""
