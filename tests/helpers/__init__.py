"""Shared test helpers: numerics rule, mask cases, toolchain checks, process harness."""
