"""The Triton side, by kernel family. Importing this package (or its subpackages) does not import Triton;
the modules holding ``@triton.jit`` code do, and they are imported lazily by the launchers.

- ``jit/``: from a traced mod to Triton -- ``expressions`` (graph -> Triton expressions), ``derivative``
  (d score_mod / d score), ``functions`` (the generated ``@triton.jit`` mask/score functions every kernel
  takes as constexpr arguments: the only generated source), ``predicates`` (the fixed ones: no mask,
  bitmask fallback), ``modules`` (module files in the cache dir, import, memo, running a kernel compiled
  or under the interpreter).
- ``host.py``: the host-side helpers every launcher shares (mask plan, traced score_mod, strides and
  block-layout arguments, 64-bit rows, fast tanh). It imports no launcher.
- ``attention/``: the prefill kernels -- ``forward.py`` and ``backward.py`` (real ``@triton.jit`` source),
  ``blocks.py`` (the shared block walk), launchers (``forward_launch``, ``backward_launch``: configs,
  named arguments, grid), ``tiling`` (the constexprs and grid both launchers share), ``configs``,
  ``fallback`` (bitmasks for untraceable mask_mods), ``aot`` (ahead-of-time builds of these kernels).
- ``decode/``: the split-KV decode and paged kernels.
- ``refine.py``: the mask compiler's tile-refinement kernel (CUDA).
- ``tuning/``: ``search`` (key, space, pruning, timing; imports no kernel), ``cache`` (the JSON cache),
  ``aot`` (compile for sm_80/sm_90 without a GPU + the ptxas report).
- ``tuned.py``: the tuned config of each family (cache lookup, a search when asked, AOT pruning).
- ``entry.py``: the entry points, one per family (tuned config, then launch).

Imports point one way: host and configs <- launchers <- AOT builds <- ``tuned`` <- ``entry``. A launcher
decides no route (decode or prefill is the caller's choice) and does no tuning: it takes a
``choose_config`` callable (``tuned.*_chooser``) from the caller instead.
"""
