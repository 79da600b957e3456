"""Lowerings onto ATen fused kernels."""
