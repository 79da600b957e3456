"""Generated Triton kernels, one module per IR op: attention (flash-style forward and backward) and long_conv (direct and FFT-as-matmul)."""
