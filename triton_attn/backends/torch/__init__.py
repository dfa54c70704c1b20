"""The PyTorch backend: blockwise attention over a BlockMask, its fused-CPU and SDPA routes, paged attention."""
