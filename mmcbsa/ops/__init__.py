"""Compiled kernels (optional; every one has a PyTorch fallback with the same results)."""
