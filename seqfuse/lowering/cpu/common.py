"""Helpers shared by the CPU kernels' Python wrappers: dtypes, strides, pointers, threads."""
from __future__ import annotations

import ctypes

import torch

#: dtypes the C kernels compute in (fp16 / bf16 operands are upcast to fp32 and cast back)
KERNEL_DTYPES = {torch.float32: ("float", "f32"), torch.float64: ("double", "f64")}
UPCAST = (torch.float16, torch.bfloat16)
#: below this many state updates a call runs on one thread (thread wake-up costs more)
PARALLEL_MIN_WORK = 1 << 15

I64 = ctypes.c_int64
PTR = ctypes.c_void_p


def check_tensors(tensors: dict) -> str | None:
    """None if every given tensor is a real floating CPU tensor the kernels take, else the reason."""
    for name, t in tensors.items():
        if t is None or not isinstance(t, torch.Tensor):
            continue
        if t.device.type != "cpu":
            return f"operand {name} is on {t.device.type}, the C kernels run on CPU"
        if t.is_complex():
            return f"operand {name} is complex ({t.dtype}); the C kernels are real"
        if not t.is_floating_point():
            return f"operand {name} has dtype {t.dtype}, not floating point"
        if t.dtype not in KERNEL_DTYPES and t.dtype not in UPCAST:
            return f"operand {name} has dtype {t.dtype}"
    return None


def broadcast_shape(*shapes) -> tuple[int, ...]:
    """The broadcast of ``shapes`` (torch's rules; raises ValueError naming them when they do not
    broadcast).  Plain tuples: much cheaper per call than torch.broadcast_shapes."""
    ndim = max((len(s) for s in shapes), default=0)
    out = [1] * ndim
    for shape in shapes:
        for i, n in enumerate(shape, ndim - len(shape)):
            if n != 1:
                if out[i] != 1 and out[i] != n:
                    raise ValueError(f"shapes {[tuple(s) for s in shapes]} do not broadcast")
                out[i] = n
    return tuple(out)


def cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``t`` in ``dtype`` (itself when it already is)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def compute_dtype(*tensors) -> tuple[torch.dtype, torch.dtype]:
    """(dtype the kernel computes in, dtype of the results): the promoted dtype of the
    operands; fp16/bf16 compute in fp32."""
    out = None
    for t in tensors:
        if t is not None:
            out = t.dtype if out is None else torch.promote_types(out, t.dtype)
    return (torch.float32 if out in UPCAST else out), out


def check_status(status: int, op: str, which: str) -> None:
    """Raise for a kernel's non-zero return code (1: out of memory, 2: N > MAX_N, 4: the call is not
    the variant its library was built for: a bug in choosing the variant, never run as another)."""
    if status == 1:
        raise MemoryError(f"seqfuse.{op} (cpu): the {which} kernel could not allocate its scratch")
    if status != 0:
        raise RuntimeError(f"seqfuse.{op} (cpu): the {which} kernel refused the call (status {status})")


def i64_array(values) -> ctypes.Array:
    values = [int(v) for v in values]
    return (I64 * max(1, len(values)))(*values)


def pointer(t: torch.Tensor | None, elem_offset: int = 0) -> PTR:
    """Address of ``t``'s first element (plus ``elem_offset`` elements), or NULL."""
    if t is None:
        return PTR(None)
    return PTR(t.data_ptr() + elem_offset * t.element_size())


def threads_for(work: int) -> int:
    """OpenMP threads for a call of ``work`` element updates: torch's intra-op thread count,
    or 1 for small calls."""
    return 1 if work < PARALLEL_MIN_WORK else max(1, torch.get_num_threads())


def merge_row_dims(sizes: list[int], strides: list[list[int]]) -> tuple[list[int], list[list[int]]]:
    """Drop size-1 row dims and merge adjacent row dims that every buffer walks as one
    (stride[d] == stride[d+1]·size[d+1] in all of them), so the kernel's per-row offset
    arithmetic is short; the rows' order is unchanged."""
    keep = [d for d, s in enumerate(sizes) if s != 1]
    sizes = [sizes[d] for d in keep]
    strides = [[st[d] for d in keep] for st in strides]
    d = len(sizes) - 2
    while d >= 0:
        if all(st[d] == st[d + 1] * sizes[d + 1] for st in strides):
            for st in strides:
                st[d] = st[d + 1]
                del st[d + 1]
            sizes[d] *= sizes[d + 1]
            del sizes[d + 1]
        d -= 1
    return sizes, strides
