"""Lowering: IR ops as torch.library custom ops with fake impls and autograd, and their implementations.

- ``attention_op``, ``long_conv_op``, ``ssd_op``, ``scan_op``: the custom ops (``torch.ops.seqfuse.*``)
- ``reference/``: readable eager implementations (fallback and test oracle)
- ``aten/``: implementations on ATen fused kernels where the attributes fit
- ``triton/``: generated Triton kernels
- ``guards``: ``seqfuse::within``, a value guard a rewrite may read its operands through
"""
from seqfuse.lowering.lower import lower_graph
from seqfuse.lowering import cpu  # noqa: F401,E402  (registers the generated C kernels: the "cpu" path of scan / ssd)
from seqfuse.lowering import guards  # noqa: F401,E402  (registers seqfuse::within, the in-graph value guard)

__all__ = ["lower_graph"]
