"""Autotuning: ``search`` (tuning key, search space, AOT pruning, timing, the autotuner; it imports no
kernel -- launchers hand it candidates and run/compile callables), ``cache`` (the JSON cache on disk),
``aot`` (ahead-of-time compile for NVIDIA targets without a GPU and the ptxas report)."""
