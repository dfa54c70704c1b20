"""Prefill attention: the forward and backward kernels (``@triton.jit`` source), their launchers and
what both share (``tiling``), configs, the bitmask fallback, AOT builds. Their autograd is
``backends/run.py``'s (one backward for the custom ops and the direct route)."""
