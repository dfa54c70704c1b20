"""The Triton side: code generation, the forward kernel, its launcher and autograd wrapper.

Importing this package does not import Triton; the modules that need it import it lazily, so
``triton_attn`` stays importable (and the ``torch`` backend usable) without a working Triton.

- ``configs``: ``KernelConfig``, the ``FORWARD_CONFIGS`` table, ``default_config``.
- ``forward``: the kernel source template. ``codegen``: graph -> specialized module -> kernel.
- ``launch``: grid, strides, allocation. ``autograd``: ``triton_attention`` (what ``attention`` calls).
- ``fallback``: bitmasks for untraceable mask_mods. ``aot``: ahead-of-time compilation checks.
- ``backward``: the backward kernel templates (delta, dK/dV, dQ); ``derivative``: d score_mod / d score;
  ``backward_codegen`` / ``backward_launch``: their specialization and launch; ``backward_aot``.
- ``refine``: the mask compiler's tile refinement on CUDA (per-tile counts of the inlined predicate).
- ``autotune`` / ``tuning_cache``: the config search and its JSON cache on disk.
"""
