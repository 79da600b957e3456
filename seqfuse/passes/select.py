"""Algorithm selection: a cost model over each IR op's shapes picks how it runs.

Runs after every recognizer (it needs all IR ops) and before lowering.  For
attention there is one algorithm, "fused" (online softmax, no (Lq, Lk) matrix in
memory on the fast paths); long convolutions choose FFT or direct by cost; ssd
chooses recurrent / quadratic / chunked (and the chunk length); scan chooses
recurrent or chunked.
Users force a choice with ``options={"algorithm": {kind: name}}``: it wins over the
cost model and over a choice a recognizer made.
"""
from __future__ import annotations

import importlib.util

import torch

from seqfuse.ir.ops import SSD, Attention, Delta, LongConv, Scan, ir_of
from seqfuse.passes.pattern import val
from seqfuse.passes.registry import Pass, PassContext

ATTENTION_ALGORITHMS = ("fused",)


def choose_attention(op: Attention) -> str:
    """The attention algorithm for ``op``'s shapes."""
    return "fused"


LONG_CONV_ALGORITHMS = ("fft", "direct")
#: kernels up to this length run the direct algorithm; longer ones the FFT.  Measured with the
#: eager references on CPU (B·H = 256 rows, L = 256…4096): direct wins up to Lk ≈ 64-128, the
#: FFT from there on (at Lk = 256 it is 1.1x–40x faster).
DIRECT_MAX_KERNEL = 64


def _hint(x) -> int:
    if isinstance(x, torch.SymInt):
        from seqfuse.passes.pattern import concrete_sym
        return concrete_sym(x)
    return int(x)


def choose_long_conv(op: LongConv) -> str:
    """FFT or direct for ``op``: circular convolutions need the FFT; causal ones with a kernel
    of at most DIRECT_MAX_KERNEL taps (at the example sizes) run direct."""
    if not op.causal:
        return "fft"
    lk = min(_hint(val(op.k).shape[-1]), _hint(val(op.u).shape[-1]))
    return "direct" if lk <= DIRECT_MAX_KERNEL else "fft"


def _static(x) -> int | None:
    """The size ``x`` if it is static, None if it is symbolic (a dynamic dimension)."""
    if isinstance(x, torch.SymInt):
        if x.node.expr.free_symbols:
            return None
        return _hint(x)
    return int(x)


# --- ssd ---------------------------------------------------------------------------------
#
# Measured with the eager references on this CPU (2 cores shared with other jobs, load ≈ 6, so
# ±30%; 1 intra-op thread, best of 7-15 runs, forward only, time.perf_counter around
# ssd_reference(..., algorithm=...)), in ms:
#   B=2 H=8 P=N=64, h0 given     T=1: recurrent 0.32 quadratic 0.41 chunked 0.57
#                                T=2: 0.71 / 0.45 / 0.50        T=4: 1.02 / 0.45 / 0.52
#   B=2 H=4 P=N=32 scalar decay  T=16: recurrent 1.9 quadratic 0.3 chunked16 0.5
#                                T=64: 16.7 / 0.8 / chunked32-64 0.9      T=128: 35.5 / 1.9 / chunked32 1.3
#                                T=256: 79.9 / 16.4 / chunked16 2.3, 32 1.7, 64 2.4, 128 8.4
#                                T=1024: - / 784 / chunked16 16.2, 32 16.0, 64 17.6, 128 39.9
#   B=1 H=8 P=64 N=128 scalar    T=64: quadratic 1.11 chunked64 1.47;  T=1024: chunked32 57 64 63 128 63
#   vector decay (GLA), B=2 H=4 P=N=32: T=16: quadratic 0.9 chunked16 1.2;  T=64: recurrent 16.3
#                                quadratic 22.2 chunked8 1.6, 16 2.3, 32 8.8;  T=1024: chunked4 132,
#                                8 149, 16 179, 32 471, 64 1051 (the (Q, Q, N) exponent tile dominates)
# So, for the eager references (CUDA without triton, or any device
# without the C kernels): the loop only for a single step (decoding); the whole-sequence
# quadratic form while T² is small (T <= 64 for a scalar decay; T <= 16 for vector decay, whose
# T²·N exponent grows fast); else chunked with Q = 64 (scalar: 32-64 within the noise, 64 halves
# the chunk loop of long sequences) or Q = 8 (vector).  A dynamic T gets chunked: safe at every length.
#
# On CPU the recurrent algorithm runs as a generated C kernel (seqfuse/lowering/cpu, N <= 256).
# Measured through the op (runtime "auto", 1 thread, best of 5; fwd / fwd+bwd, ms):
#   scalar (B, T, H, P, N) = (2, 64, 4, 32, 32):    C recurrent 0.56        quadratic 1.48  chunked 1.64
#          (2, 1024, 4, 32, 32):                    C recurrent 11.2        chunked 24.9
#          (2, 4096, 4, 32, 32):                    C recurrent 67 / 355    chunked 129 / 441
#          (1, 4096, 8, 64, 128):                   C recurrent 342 / 1930  chunked 292 / 1191
#          (1, 2048, 24, 64, 128):                  C recurrent 418 / 2117  chunked 414 / 1774
#   vector (2, 1024, 4, 32, 32):                    C recurrent 18          chunked 64
#          (2, 4096, 4, 64, 64):                    C recurrent 317 / 1317  chunked 788 / 3622
# The loop does P·N work per step and head with no matmul; the chunked form's matmuls catch up
# once the state is large.  So on CPU: recurrent for vector decay and for states up to
# CPU_RECURRENT_MAX_STATE; the rules above otherwise.  (Without a C compiler the
# recurrent call runs the eager loop, 2-5x slower than chunked at T >= 256: force
# {"ssd": "chunked"} there.)
# In fp64 the chunked form's matmuls run at half fp32's speed while the C loop barely slows, and the
# loop wins at every state size measured (2 threads, best of 3, fwd / fwd+bwd ms, session 36):
#   (1, 2048, 8, 64, 128) fp64: C recurrent 23 / 107   chunked 43 / 153   (fp32: 12 / 54, 19 / 77)
#   (2, 1024, 4, 32, 32)  fp64: C recurrent  2 / 10    chunked  8 / 27
#   xLSTM's lifted mLSTM (fp64 ssd, P = V + 1, N = K; B = 1, H = 4, T = 1024), fwd+bwd through the
#   compiled kernel: K = 32: 8.7 vs 31.7; 64: 15.9 vs 40.6; 128: 47.7 vs 88.5
# So fp64 takes the C kernel at any state it supports (N <= 256).
# The fp32 bound was P·N <= 4096 from the two rows at P·N = 8192 above.  Measured again (session 37,
# quiet machine, the op with runtime "auto", scalar decay, b and c per head, best of 4, fwd / fwd+bwd
# ms, 1 thread | 2 threads), the loop wins up to P·N = 16384 and the matmuls only at 32768:
#   (1, 2048, 8, 64, 128)   8192:  C recurrent 17.6 / 94.7   chunked 55.6 / 115.6  |  10.3 / 56.2   19.1 / 67.6
#   (1, 4096, 8, 64, 128)   8192:              38.9 / 181.1          65.0 / 218.8  |  21.1 / 105.9  39.4 / 142.4
#   (4, 256, 8, 64, 128)    8192:               8.0 / 36.5           15.0 / 53.0   |   4.2 / 22.2    8.8 / 31.9
#   (1, 1024, 8, 128, 128) 16384:              14.4 / 71.8           23.7 / 82.2   |   9.2 / 46.6   14.1 / 52.3
#   (1, 2048, 4, 64, 256)  16384:              19.2 / 87.7           24.6 / 99.6   |  11.9 / 52.0   14.8 / 53.4
#   (1, 2048, 4, 256, 64)  16384:              16.0 / 79.6           26.6 / 98.8   |   8.9 / 45.9   15.9 / 65.3
#   (1, 2048, 4, 128, 256) 32768:              35.2 / 162.4          36.6 / 135.2  |  24.3 / 88.6   23.3 / 82.6
# (b and c shared by the heads, Mamba-2's one group, favour the loop more: (1, 2048, 8, 64, 128)
# 17.7 / 84.4 vs 31.0 / 134.7 on 1 thread.)  The earlier rows were taken under load and before the C
# kernel's N = 64 / 128 specializations.
SSD_ALGORITHMS = ("recurrent", "quadratic", "chunked")
SSD_RECURRENT_MAX_T = 1
SSD_QUADRATIC_MAX_T = {"none": 64, "scalar": 64, "vector": 16}
SSD_CHUNK = {"none": 64, "scalar": 64, "vector": 8}
#: the C kernel's largest state dim (seqfuse/lowering/cpu MAX_N), and the largest P·N it is chosen for
CPU_KERNEL_MAX_N = 256
CPU_RECURRENT_MAX_STATE = 16384


# --- the recurrent (decode) form on CUDA ----------------------------------------------------
#
# With CUDA values and triton installed, an ssd or scan call whose T is static and at most
# DECODE_MAX_T runs "recurrent": the triton decode kernels (seqfuse/lowering/triton/decode.py),
# one launch that walks the T steps with the state in fp32 registers.  Chosen by construction, not
# measured (no GPU here): a decode step (T = 1, the state carried between calls) is bound by
# reading and writing the state once, and one step needs none of the chunk machinery; the chunked
# kernels pad T up to their tile (16-64 steps) and add the (Q, Q) score tiles and cumulative sums,
# and the eager "quadratic" form the T-rules below would pick runs as a dozen torch launches.
# DECODE_MAX_T = 16 is the chunked ssd kernel's smallest tile: up to it a chunk would be mostly
# padding.  Without triton the T-rules stay (the eager recurrent loop is ~4 launches per step).
DECODE_MAX_T = 16


def _cuda_triton(x) -> bool:
    """Whether a call on ``x``'s device runs on the triton kernels (CUDA, real values, triton installed)."""
    return x.device.type == "cuda" and not x.is_complex() and importlib.util.find_spec("triton") is not None


def _cuda_decode(x, T) -> bool:
    """Whether a call on ``x``'s device with length ``T`` (None: dynamic) runs the triton decode kernels."""
    return T is not None and T <= DECODE_MAX_T and _cuda_triton(x)


def _cpu_recurrent(op: SSD) -> bool:
    """Whether the C kernel's sequential loop is the fastest way to run ``op`` on CPU."""
    x = val(op.x)
    if x.device.type != "cpu" or x.is_complex():
        return False
    P, N = _static(x.shape[-1]), _static(val(op.b).shape[-1])
    if P is None or N is None or N > CPU_KERNEL_MAX_N:
        return False
    return op.decay == "vector" or P * N <= CPU_RECURRENT_MAX_STATE or x.dtype == torch.float64


def choose_ssd(op: SSD, options=None) -> str:
    """The ssd algorithm for ``op``'s shapes and device (the user's ``options.algorithm["ssd"]``
    wins); sets ``op.chunk`` whenever the result is "chunked"."""
    forced = _forced("ssd", options)
    T = _static(val(op.x).shape[1])
    if forced is not None:
        algorithm = forced
    elif _cpu_recurrent(op) or _cuda_decode(val(op.x), T):
        algorithm = "recurrent"
    elif T is None or _cuda_triton(val(op.x)):
        # longer sequences on CUDA: the triton path runs "chunked" (one fused kernel); a
        # "quadratic" choice there would fall through to the eager reference
        algorithm = "chunked"
    elif T <= SSD_RECURRENT_MAX_T:
        algorithm = "recurrent"
    elif T <= SSD_QUADRATIC_MAX_T[op.decay]:
        algorithm = "quadratic"
    else:
        algorithm = "chunked"
    if algorithm == "chunked":
        op.chunk = SSD_CHUNK[op.decay]
    return algorithm


# --- scan --------------------------------------------------------------------------------
#
# Measured with the eager references on this CPU (1 thread, best of 7, forward, c an expand), ms:
#   (R.., T, N) = (1, 128, 512, 16):  recurrent 31.7   chunked16 59.8  32 56.9  128 62.7
#                 (2, 256, 1024, 16): recurrent 320    chunked16 793   32 1318
#                 (4, 64, 64, 16):    recurrent 2.1    chunked16 2.1
#                 (1, 64, 4096, 16):  recurrent 248    chunked16 272   64 361
# The log-depth scan does log2(Q) full passes over (*R, T, N): on CPU it never beats the
# sequential loop (whose generated C kernel, seqfuse/lowering/cpu, is faster still).  On CUDA
# the sequential loop is 2·T kernel launches, the chunked scan ~2·log2(Q) + 2·T/Q: chunked there
# (not measured: no GPU here), except for decoding (a static T <= DECODE_MAX_T with triton, see
# above): the triton decode kernel walks the few steps in one launch.
SCAN_ALGORITHMS = ("recurrent", "chunked")


def _scan_length(op: Scan) -> int | None:
    """The scan's static T (its operands broadcast along axis -2), None if dynamic."""
    sizes = [_static(val(v).shape[-2]) for v in (op.a, op.b, op.c, op.dt, op.u) if v is not None]
    return None if None in sizes else max(sizes)


def choose_scan(op: Scan, options=None) -> str:
    """The scan algorithm for ``op`` (the user's ``options.algorithm["scan"]`` wins)."""
    forced = _forced("scan", options)
    if forced is not None:
        return forced
    a = val(op.a)
    if a.device.type != "cuda":
        return "recurrent"
    return "recurrent" if _cuda_decode(a, _scan_length(op)) else "chunked"


# --- delta -------------------------------------------------------------------------------
#
# The delta rule (seqfuse/lowering/reference/delta.py) has two algorithms: the step loop
# ("recurrent", T sequential rank-1 updates of a (K, V) state) and the chunked WY / UT form
# ("chunked": one triangular solve and a few batched matmuls per chunk, a pass over T / C chunks).
# The chunked form's exponent tile of a vector gate (KDA) is (C, C, K) per chunk, so its chunk is
# shorter.  On CPU the recurrent algorithm runs as a generated C kernel (seqfuse/lowering/cpu/delta.py,
# K, V <= 256).  Measured through the op (1 thread, best of 3, B = 1, H = 4; ms, forward / forward +
# backward of y.sum() + h.sum()):
#   T=2048 K=V=128 scalar:  C recurrent 61 / 440    chunked (eager, C=64) 99 / 615
#                  vector:  C recurrent 67 / 450    chunked (C=16)       251 / 3748
#   T=2048 K=V=64  scalar:  17 / 102  vs  37 / 284;        vector: 13 / 125  vs  129 / 1688
#   T=1024 K=V=32  scalar:  1.8 / 18  vs  15 / 65;         vector: 2.2 / 19  vs  41 / 317
# The generalized step (a read key p, an erase key e, read="previous": Comba, DPLR, RWKV-7) on the kernel's
# second library against the general chunked form (eager), K = V = 64, an erase key, read="previous":
#   T=256   vector:  C recurrent 1.0 / 5.5     chunked (C=16) 15 / 76      scalar: 1.3 / 6.5  vs  120 / 316 (C=64)
#   T=2048  vector:  11 / 52                   328 / 1387                  scalar: 8.5 / 47   vs  1226 / 4642
# So on CPU: recurrent whenever the C kernel takes the shapes (without a C compiler the recurrent call
# runs the eager step loop: force {"delta": "chunked"} there); elsewhere recurrent for a few steps
# (decoding, the state carried through h0), chunked otherwise and for a dynamic T.  On CUDA the
# generalized step is recurrent at every length: its triton kernels are the step loop
# (seqfuse/lowering/triton/delta_recurrent.py), the chunked triton kernels take the plain rule only, and
# the general chunked form in torch ops is a few dozen small kernels per chunk (not measured: no GPU here).
DELTA_ALGORITHMS = ("recurrent", "chunked")
DELTA_RECURRENT_MAX_T = 16
DELTA_CHUNK = {"none": 64, "scalar": 64, "vector": 16}
#: the C kernel's largest key / value size (seqfuse/lowering/cpu/delta.py MAX_D)
CPU_DELTA_MAX_D = 256


def _cpu_delta_recurrent(op: Delta) -> bool:
    """Whether ``op`` runs on CPU in shapes the C kernel takes (K, V ≤ its MAX_D, known)."""
    k = val(op.k)
    if k.device.type != "cpu" or k.is_complex():
        return False
    K, V = _static(k.shape[-1]), _static(val(op.v).shape[-1])
    return K is not None and V is not None and K <= CPU_DELTA_MAX_D and V <= CPU_DELTA_MAX_D


def _cuda_generalized_delta(op: Delta) -> bool:
    """Whether ``op`` is the generalized step (a read key, an erase key or read="previous") on CUDA."""
    general = op.p is not None or op.e is not None or op.read != "decayed"
    return general and val(op.k).device.type == "cuda"


def choose_delta(op: Delta, options=None) -> str:
    """The delta algorithm for ``op``'s shapes and device (the user's ``options.algorithm["delta"]`` wins);
    sets ``op.chunk`` whenever the result is "chunked"."""
    forced = _forced("delta", options)
    T = _static(val(op.k).shape[1])
    if forced is not None:
        algorithm = forced
    elif _cpu_delta_recurrent(op) or _cuda_generalized_delta(op) or (T is not None and T <= DELTA_RECURRENT_MAX_T):
        algorithm = "recurrent"
    else:
        algorithm = "chunked"
    if algorithm == "chunked":
        op.chunk = DELTA_CHUNK[op.gate]
    return algorithm

def _forced(kind: str, options) -> str | None:
    """The algorithm the user forced for ``kind`` (``options.algorithm``), or None."""
    algorithms = getattr(options, "algorithm", None) or {}
    return algorithms.get(kind)


class SelectPass(Pass):
    """Set ``algorithm`` on every IR op left at "auto", and on every op of a kind whose algorithm
    the user forced (``options={"algorithm": {kind: name}}``)."""

    name = "select"

    def run(self, ctx: PassContext) -> None:
        options = ctx.options
        for node in ctx.graph.nodes:
            op = ir_of(node)
            if op is None:
                continue
            forced = _forced(op.kind, options)
            if isinstance(op, SSD) and (op.algorithm == "auto" or forced):
                op.algorithm = choose_ssd(op, options)
            elif isinstance(op, Scan) and (op.algorithm == "auto" or forced):
                op.algorithm = choose_scan(op, options)
            elif isinstance(op, Delta) and (op.algorithm == "auto" or forced):
                op.algorithm = choose_delta(op, options)
            elif forced is not None:
                op.algorithm = forced
            elif isinstance(op, Attention) and op.algorithm == "auto":
                op.algorithm = choose_attention(op)
            elif isinstance(op, LongConv) and op.algorithm == "auto":
                op.algorithm = choose_long_conv(op)
