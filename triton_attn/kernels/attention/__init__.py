"""Prefill attention: the forward and backward kernels (``@triton.jit`` source), their launchers,
the autograd function (``autograd.triton_attention``), configs, the bitmask fallback, AOT builds."""
