"""The test suite; its layout mirrors the triton_attn package."""
