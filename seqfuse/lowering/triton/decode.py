"""The recurrent (decode) form of seqfuse.ssd and seqfuse.scan on Triton kernels.

The "triton" paths of :mod:`seqfuse.lowering.triton.ssd` and :mod:`seqfuse.lowering.triton.scan`
route a call whose ``attrs["algorithm"]`` is "recurrent" here.  passes/select chooses
"recurrent" on CUDA when T is static and at most its DECODE_MAX_T = 16 (decoding: T = 1, one
token per call with the state carried between calls); a user may force it at any T (the kernels
walk time sequentially, so they are correct at every length but only parallel over batch, heads
/ rows and state blocks).  Kernels: :mod:`seqfuse.lowering.triton.decode_kernels`.

    ssd_supports(t, a) -> None | reason        ssd_forward(x, b, c, a, d, h0, attrs) -> (y, h)
    scan_forward(a, b, c, h0, attrs) -> (y, h)    (refusals: scan.supports, which covers it;
                                                  attrs["readout_dtype"] rounds the readout's states)

Shapes and dtypes are the ops' contracts: ssd y (B, T, H, P) and final state (B, H, P, N) in the
promoted dtype of x, b, c; scan y (*R, T) with a readout else (*R, T, N), h (*R, N) in the
promoted dtype of a, b, c, h0.  The state lives in fp32 registers; operands may be fp32, fp16 or
bf16 (mixed), and broadcast operands are read through their stride-0 views.

Backward: none here.  The ssd / scan triton Impl's ``backward`` runs for a "recurrent" call as for
a "chunked" one, since both algorithms compute the same function: for ssd the chunked algorithm's
backward kernels where they apply (see ssd.py ``backward_kernel_reason``), else recomputation
through the chunked reference's written-out adjoint (torch ops on the call's device); for scan the
blocked backward kernel.  The forward is what matters for inference.
"""
from __future__ import annotations

import torch

from seqfuse.lowering.reference import scan as scan_ref
from seqfuse.lowering.triton.common import KernelModule, next_pow2 as _next_pow2
from seqfuse.lowering.triton.ssd import forward_launch, operand_reason

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: a program's state block (BLOCK_P, N) lives in registers, the whole N of a head in one program
MAX_N = 256
#: launch configs.  TILE: elements of a program's state block (ssd: BLOCK_P × BLOCK_N, scan:
#: BLOCK_R × BLOCK_N), reached by shrinking BLOCK_P (ssd) or growing BLOCK_R (scan); SCAN_BLOCK_N:
#: the N block of a scan without a readout.  On a GPU: 1024 fp32 per 4-warp program (8 registers a
#: thread) and many small programs, since a decode step is bound by reading and writing the state
#: (chosen by construction, not measured: no GPU here).  The interpreter's are small so that tests
#: at P, N, rows ≤ 12 cross several blocks.
GPU_CONFIG = {"TILE": 1024, "SCAN_BLOCK_N": 64, "num_warps": 4}
INTERPRETER_CONFIG = {"TILE": 16, "SCAN_BLOCK_N": 4, "num_warps": 1}

_kernels = KernelModule("decode_kernels")


def _config() -> dict:
    return INTERPRETER_CONFIG if _kernels().INTERPRETED else GPU_CONFIG


# --- ssd ---------------------------------------------------------------------------------

def ssd_supports(t: dict, a: dict) -> str | None:
    """None when the decode kernel computes this ssd call, else the reason it does not."""
    x = t["x"]
    reason = _kernels.availability(x.device)
    if reason:
        return reason
    reason, shapes = operand_reason(t, a.get("decay"))
    if reason:
        return reason
    B, T, H, P, N = shapes
    if N > MAX_N:
        return f"state size N={N} > {MAX_N} (the recurrent kernel holds a head's whole N in registers)"
    if B * T * H * max(P, N) >= 2 ** 31:
        return "2**31 elements or more"
    return None


def _ssd_launch(P: int, N: int) -> tuple[int, int, int]:
    """(BLOCK_P, BLOCK_N, num_warps): all of N, and P blocks that keep the state block near TILE."""
    cfg = _config()
    block_n = max(2, _next_pow2(N))
    block_p = max(1, min(_next_pow2(P), cfg["TILE"] // block_n))
    return block_p, block_n, cfg["num_warps"]


def ssd_forward(x, b, c, a, d, h0, attrs):
    """(y (B, T, H, P), h (B, H, P, N)) of seqfuse.ssd by the recurrence, on the decode kernel."""
    (B, T, H, P, N), y, h, args, flags = forward_launch(x, b, c, a, d, h0, attrs["decay"])
    if args is None:
        return y, h
    block_p, block_n, warps = _ssd_launch(P, N)
    grid = (B * H, -(-P // block_p))
    _kernels().ssd_decode_kernel[grid](*args, **flags, BLOCK_P=block_p, BLOCK_N=block_n, num_warps=warps)
    return y, h


# --- scan --------------------------------------------------------------------------------

def _scan_launch(rows: int, N: int, readout: bool) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_N, num_warps): all of N with a readout (else N blocks of SCAN_BLOCK_N), and
    as many rows per program as keep the block near TILE."""
    cfg = _config()
    block_n = max(2, _next_pow2(N))
    if not readout:
        block_n = min(cfg["SCAN_BLOCK_N"], block_n)
    block_r = max(1, min(_next_pow2(rows), cfg["TILE"] // block_n))
    return block_r, block_n, cfg["num_warps"]


def scan_forward(a, b, c, h0, attrs):
    """(y, h) of seqfuse.scan by the recurrence, on the decode kernel; y (*R, T) with a readout
    else (*R, T, N), h (*R, N) (the state at t = 0 when ``reverse``), in the promoted dtype (y in
    promote(readout_dtype, c) when ``attrs["readout_dtype"]`` rounds the states the readout reads)."""
    from seqfuse.lowering.triton.scan import _st, _views, round_code   # scan.py routes here (lazily)
    full, (av, bv, cv, hv), rows = _views(a, b, c, h0)
    *R, T, N = full
    dtype = scan_ref.out_dtype(a, b, c, h0)
    ydtype = scan_ref.y_dtype(dtype, c, attrs.get("readout_dtype"))
    y = torch.empty((*R, T) if c is not None else full, device=a.device, dtype=ydtype)
    h = torch.empty((*R, N), device=a.device, dtype=dtype)
    if rows.count == 0 or N == 0:
        return y, h
    block_r, block_n, warps = _scan_launch(rows.count, N, c is not None)
    grid = (-(-rows.count // block_r), -(-N // block_n))
    dummy = av
    _kernels().scan_decode_kernel[grid](
        av, bv, cv if cv is not None else dummy, hv if hv is not None else dummy, y, h,
        T, N, rows.count, rows.sizes[1], rows.sizes[2],
        *_st(rows, av), *_st(rows, bv), *_st(rows, cv), *_st(rows, hv, state=True),
        HAS_C=c is not None, HAS_H0=h0 is not None, REVERSE=bool(attrs.get("reverse", False)),
        ROUND=round_code(attrs.get("readout_dtype")), BLOCK_R=block_r, BLOCK_N=block_n, num_warps=warps)
    return y, h
