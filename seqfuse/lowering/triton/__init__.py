"""Generated Triton kernels, one module per IR op (attention arrives with the kernel issue)."""
