"""Backends: how a planned call runs (``torch``: plain PyTorch; the Triton kernels live in ``kernels/``)."""
