"""Autograd helpers for custom-op implementations."""
from __future__ import annotations

import contextlib

import torch
from torch._C import DispatchKey, DispatchKeySet


@contextlib.contextmanager
def autograd_inside_op():
    """Re-enable autograd inside a custom op's kernel (the dispatcher runs kernels below
    autograd), so a backward can be computed by differentiating the forward again."""
    excluded = torch._C._dispatch_tls_local_exclude_set()
    autograd = DispatchKeySet(DispatchKey.AutogradFunctionality) | DispatchKeySet(DispatchKey.ADInplaceOrView)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), excluded - autograd), \
            torch.enable_grad():
        yield


def recompute_grads(fn, grad_out, inputs: list, needs: list[bool]):
    """Gradients of ``fn(*inputs)`` for the inputs whose ``needs`` is True (others: None),
    by running ``fn`` again under autograd."""
    with autograd_inside_op():
        leaves = [x.detach().requires_grad_(n) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                  for x, n in zip(inputs, needs)]
        out = fn(*leaves)
        wanted = [x for x, n in zip(leaves, needs) if n]
        # outputs that depend on no wanted input (no graph) contribute nothing: autograd.grad would raise
        outs, gouts = (list(out), list(grad_out)) if isinstance(out, (tuple, list)) else ([out], [grad_out])
        pairs = [(o, g) for o, g in zip(outs, gouts) if isinstance(o, torch.Tensor) and o.requires_grad]
        grads = iter(torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True)) \
            if wanted and pairs else iter([None] * len(wanted))
        result = []
        for x, n in zip(leaves, needs):
            if not n:
                result.append(None)
                continue
            g = next(grads)
            result.append(torch.zeros_like(x) if g is None else g)
    return result


def as_result(value: torch.Tensor, like: torch.Tensor, inputs) -> torch.Tensor:
    """``value`` as a custom op's result laid out like the fake impl's ``like`` (same shape, dtype
    and strides) and sharing no storage with ``inputs`` (a custom op's outputs may not alias
    its inputs).  Returned as is when it already is one — the common case for kernels that
    write fresh buffers — else copied into ``like``."""
    if (value.shape == like.shape and value.dtype == like.dtype and value.stride() == like.stride()
            and value.device == like.device):
        ptr = value.untyped_storage().data_ptr()
        if not any(isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() == ptr for t in inputs):
            return value
    return like.copy_(value)
