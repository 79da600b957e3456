"""seqfuse.long_conv on Triton kernels (the "triton" runtime path).

Contract (see :mod:`seqfuse.lowering.long_conv_op`):

    supports(t, a) -> None | reason
    forward(u, k, d, gate, a) -> y            y (*B, L) = act(scale·(u ⊛ k) + d·u) · gate
    backward(grad, u, k, d, gate, a) -> [du, dk, dd, dgate]   (None where a["needs"][i] is False)

Shapes: u (*B, L) with rank ≥ 2; k broadcastable to (*B, Lk); d broadcastable
to u; gate broadcastable to y.  Only the causal convolution is computed:
y[t] = Σ_{0≤s≤t, s<Lk} k[s]·u[t-s] (taps s ≥ L never reach an output).

Algorithms (kernels in :mod:`seqfuse.lowering.triton.long_conv_kernels`):

* ``a["algorithm"] == "direct"``: the blocked Toeplitz kernel, O(L·Lk) per row,
  any length.
* anything else ("fft"): the four-step FFT of size N = max(256, next_pow2(L + min(Lk, L) - 1)),
  N ≤ MAX_FFT_SIZE; bigger sizes are refused (the eager torch.fft reference runs).
  The kernel's spectrum is computed by two separate launches of the same FFT
  kernels on k's own rows (once per forward and once per backward call, shared by
  the whole batch; not torch.fft); the signal goes through three launches —
  columns DFT; row DFT · spectrum · row inverse DFT; columns inverse DFT +
  epilogue — with the N1×N2 intermediates in fp32 scratch buffers (rows, N).

Backward (both algorithms): dz = ∂L/∂z, z = scale·conv + d·u, comes from the
fused backward epilogue (which recomputes the convolution when the activation
is SiLU or ∂gate is needed; otherwise dz = grad·gate needs no convolution).  Then
du = scale·Σ_s k[s]·dz[t+s] + d·dz and dk[s] = scale·Σ_t u[t]·dz[t+s] are
correlations, run by the same kernels: the Toeplitz kernel in correlation mode,
or spectral products with a conjugate (conj(K̂)·Ĝ, conj(Û)·Ĝ).  Sums over the
batch dims an operand was broadcast on (dk, dd, dgate, du of a broadcast u) are
torch reductions of per-row results (for the FFT dk: of the spectra, before one
inverse transform per row of k).

Precision: every product accumulates in fp32.  fp32 operands use
``FP32_DOT_PRECISION`` ("tf32x3": fp32-accurate on tensor cores) on a GPU; the
direct kernel multiplies fp16/bf16 signals by same-dtype taps natively (exact
products).  DFT matrices and twiddles are computed in fp64 and stored in fp32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from seqfuse.lowering.triton.common import Rows as _Rows, KernelModule
from seqfuse.runtime import Impl, register_impl

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: the four-step FFT keeps N1 ≤ 256, N2 ≤ 128 (one N1×BLOCK or BLOCK×N2 tile per program)
MAX_FFT_SIZE = 32768
#: N1, N2 ≥ 16: the smallest tile of tl.dot on a GPU (any N ≥ L + Lk - 1 computes the same convolution)
MIN_FFT_SIZE = 256
_MAX_LEN = 2 ** 30  # lengths stay far from int32 overflow in the kernels' index arithmetic
#: tl.dot input precision for fp32 operands on a GPU ("ieee" is exact but off the tensor cores)
FP32_DOT_PRECISION = "tf32x3"
ACTIVATIONS = ("none", "silu")

#: launch configs: the direct kernel's tile is BLOCK_A blocks of M samples; the FFT kernels' blocks
#: (cols: N1×BLOCK, rows: BLOCK×N2, contraction in BLOCK chunks).  The interpreter's are small so
#: that tests at L ≤ 256 cross tile edges and run every loop more than once.
GPU_CONFIG = {"direct": {"BLOCK_A": 32, "M": 32, "num_warps": 4},
              "fft": {"BLOCK": 32, "num_warps": 8}}
INTERPRETER_CONFIG = {"direct": {"BLOCK_A": 16, "M": 16, "num_warps": 4},
                      "fft": {"BLOCK": 16, "num_warps": 4}}


# --- the kernels (imported on first use) -----------------------------------------

_kernels = KernelModule("long_conv_kernels")


def fft_size(length: int, kernel_length: int) -> int:
    """The FFT size the triton path uses: a power of two ≥ L + min(Lk, L) - 1 and ≥ MIN_FFT_SIZE."""
    n = MIN_FFT_SIZE
    while n < length + min(kernel_length, length) - 1:
        n *= 2
    return n


def _uses_fft(a: dict) -> bool:
    # the reference's convention: "direct" is the direct algorithm, anything else the FFT
    return a.get("algorithm") != "direct"


def supports(t: dict, a: dict) -> str | None:
    """None when the triton kernels compute exactly this call, else the reason they do not."""
    u, k, d, gate = t["u"], t["k"], t.get("d"), t.get("gate")
    reason = _kernels.availability(u.device)
    if reason:
        return reason
    if t.get("bias") is not None:
        return "a conv bias is not fused into the triton kernels yet"
    if not a.get("causal", True):
        return "circular (non-causal) convolution: the triton kernels compute causal convolutions only"
    if a.get("activation", "none") not in ACTIVATIONS:
        return f"activation {a.get('activation')!r} (the kernels fuse {', '.join(ACTIVATIONS)})"
    named = [("u", u), ("k", k), ("d", d), ("gate", gate)]
    for name, x in named:
        if x is not None and x.dtype not in _DTYPES:
            return f"{name} dtype {x.dtype} (the kernels take float32, float16, bfloat16)"
    if any(x is not None and x.device != u.device for _, x in named):
        return "inputs on different devices"
    if u.dim() < 2:
        return f"u of rank {u.dim()} (the kernels take (*B, L) with at least one batch dim)"
    if k.dim() < 1:
        return "k of rank 0"
    if any(x is not None and x.numel() == 0 for _, x in named):
        return "empty inputs"
    try:
        shape = _out_shape(u, k, d, gate)
    except RuntimeError as exc:
        return f"shapes do not broadcast: {exc}"
    length = u.shape[-1]
    if max(length, k.shape[-1]) >= _MAX_LEN or math.prod(shape[:-1]) >= 2 ** 31:
        return "lengths beyond 2**30 or more than 2**31 rows"
    for name, x in (("d", d), ("gate", gate)):
        if x is not None and x.shape[-1] not in (1, length):
            return f"{name} of shape {tuple(x.shape)} does not broadcast along time"
    if _uses_fft(a):
        n = fft_size(length, k.shape[-1])
        if n > MAX_FFT_SIZE:
            return (f"FFT size {n} for L={length}, Lk={k.shape[-1]} exceeds {MAX_FFT_SIZE} "
                    "(the four-step kernels take N1 ≤ 256, N2 ≤ 128)")
    return None


# --- shapes and row layouts ----------------------------------------------------------

def _out_shape(u, k, d, gate) -> torch.Size:
    shape = torch.broadcast_shapes(u.shape, (*k.shape[:-1], u.shape[-1]))
    for x in (d, gate):
        if x is not None:
            shape = torch.broadcast_shapes(shape, x.shape)
    return shape


def _out_dtype(u, k, d, gate) -> torch.dtype:
    dtype = torch.promote_types(u.dtype, k.dtype)
    for x in (d, gate):
        if x is not None:
            dtype = torch.promote_types(dtype, x.dtype)
    return dtype


def _expand(x, lead, last=None):
    """``x`` as a (*lead, T) view: stride 0 on broadcast dims (time too, when ``last`` is given)."""
    return None if x is None else x.expand(*lead, x.shape[-1] if last is None else last)


@dataclass
class _Call:
    """One call: shapes, the operands as (*lead, T) views, and their coalesced row layout."""

    u: torch.Tensor
    k: torch.Tensor
    d: torch.Tensor | None
    gate: torch.Tensor | None
    grad: torch.Tensor | None
    spec: tuple | None           # the kernel's spectrum (re, im) as (*lead, N) views, FFT only
    rows: _Rows
    shape: torch.Size
    length: int
    taps: int                    # min(Lk, L): taps that reach an output
    scale: float
    silu: bool


def _prepare(u, k, d, gate, grad, a, spec=None) -> _Call:
    shape = _out_shape(u, k, d, gate)
    lead = shape[:-1]
    views = [_expand(u, lead), _expand(k, lead), _expand(d, lead, shape[-1]), _expand(gate, lead, shape[-1]),
             _expand(grad, lead)]
    if spec is not None:
        views += [_expand(s, lead) for s in spec]
    rows = _Rows(lead, [v for v in views if v is not None])
    if not rows.ok:  # more than three batch dims that do not merge: materialize the broadcasts
        views = [None if v is None else v.contiguous() for v in views]
        rows = _Rows(lead, [v for v in views if v is not None])
    uv, kv, dv, gv, grv = views[:5]
    return _Call(uv, kv, dv, gv, grv, tuple(views[5:]) if spec is not None else None, rows, shape,
                 u.shape[-1], min(k.shape[-1], u.shape[-1]), float(a.get("scale", 1.0)),
                 a.get("activation", "none") == "silu")


def _st(rows: _Rows, x) -> tuple:
    """The three row strides and the time stride of an operand (zeros when absent)."""
    return (0, 0, 0, 0) if x is None else (*rows.strides(x), x.stride(-1))


def _config(kind: str) -> dict:
    return dict(INTERPRETER_CONFIG[kind] if _kernels().INTERPRETED else GPU_CONFIG[kind])


def _precision() -> str:
    return "ieee" if _kernels().INTERPRETED else FP32_DOT_PRECISION


# --- direct algorithm: the Toeplitz kernel ------------------------------------------------

def _toeplitz(c: _Call, x, taps, klen, out_len, out, *, correlate, silu=False, d=None, gate=None, grad=None,
              ga=None, dzu=None):
    """Launch the Toeplitz kernel on every row of ``c``: out[t] = epilogue(Σ_s taps[s]·x[t ∓ s])."""
    cfg = _config("direct")
    block_a, m = cfg["BLOCK_A"], cfg["M"]
    dummy = out
    lowp = (not _kernels().INTERPRETED and x.dtype == taps.dtype and x.dtype in (torch.float16, torch.bfloat16))
    grid = (c.rows.count, triton_cdiv(out_len, block_a * m))
    _kernels().toeplitz_kernel[grid](
        x, taps, d if d is not None else dummy, gate if gate is not None else dummy,
        grad if grad is not None else dummy, out, ga if ga is not None else dummy,
        dzu if dzu is not None else dummy,
        c.length, klen, out_len, c.rows.sizes[1], c.rows.sizes[2],
        *_st(c.rows, x), *_st(c.rows, taps), *_st(c.rows, d), *_st(c.rows, gate), *_st(c.rows, grad),
        c.scale,
        CORRELATE=correlate, HAS_D=d is not None, HAS_GATE=gate is not None, SILU=silu,
        BACKWARD=grad is not None, STORE_GA=ga is not None, STORE_DZU=dzu is not None, LOWP=lowp,
        PRECISION=_precision(), BLOCK_A=block_a, M=m, num_warps=cfg["num_warps"])


# --- FFT algorithm: the four-step kernels -------------------------------------------------

@dataclass(frozen=True)
class _Plan:
    """DFT matrices F_N1, F_N2 and twiddles T (N1×N2) of an FFT of size N = N1·N2, fp32 re/im."""

    n1: int
    n2: int
    f1: tuple
    f2: tuple
    tw: tuple


_PLANS: dict = {}


def _dft(rows: int, cols: int, n: int, device) -> tuple:
    # exp(-2πi·(a·b mod n)/n) in fp64 (the reduction keeps the angle small), stored in fp32
    a = torch.arange(rows, dtype=torch.int64).unsqueeze(1)
    b = torch.arange(cols, dtype=torch.int64).unsqueeze(0)
    ang = (a * b % n).double() * (-2.0 * math.pi / n)
    return (torch.cos(ang).float().contiguous().to(device), torch.sin(ang).float().contiguous().to(device))


def _plan(n: int, device) -> _Plan:
    key = (n, str(device))
    if key not in _PLANS:
        m = n.bit_length() - 1
        n2 = 1 << (m // 2)
        n1 = n // n2
        _PLANS[key] = _Plan(n1, n2, _dft(n1, n1, n1, device), _dft(n2, n2, n2, device), _dft(n1, n2, n, device))
    return _PLANS[key]


def _fft_cols(p: _Plan, rows: _Rows, x, length):
    """Steps 1-2 of the DFT of every row of ``x`` ((*lead, T) view, first ``length`` samples) -> (re, im)."""
    cfg = _config("fft")
    blk = cfg["BLOCK"]
    out_r = torch.empty(rows.count, p.n1 * p.n2, device=x.device, dtype=torch.float32)
    out_i = torch.empty_like(out_r)
    grid = (rows.count, p.n2 // min(blk, p.n2))
    _kernels().fft_cols_kernel[grid](
        x, out_r, out_i, *p.f1, *p.tw, length, rows.sizes[1], rows.sizes[2], *_st(rows, x),
        N1=p.n1, N2=p.n2, PRECISION=_precision(), BLOCK_N=min(blk, p.n2), BLOCK_K=min(blk, p.n1),
        num_warps=cfg["num_warps"])
    return out_r, out_i


def _fft_rows(p: _Plan, rows: _Rows, x, *, forward, spectrum=None, conj_x=False, conj_s=False, inverse=False):
    """The row-local middle phases (see ``fft_rows_kernel``) of (rows, N) buffers ``x`` into new ones
    (never in place: no program may overwrite what another warp of it still reads); ``spectrum``
    is a pair of (*lead, N) views multiplied in."""
    out = (torch.empty_like(x[0]), torch.empty_like(x[1]))
    cfg = _config("fft")
    blk = cfg["BLOCK"]
    sr, si = spectrum if spectrum is not None else x
    s_st = rows.strides(sr) if spectrum is not None else (0, 0, 0)
    grid = (rows.count, p.n1 // min(blk, p.n1))
    _kernels().fft_rows_kernel[grid](
        *x, *out, sr, si, *p.f2, *p.tw, rows.sizes[1], rows.sizes[2], *s_st,
        N1=p.n1, N2=p.n2, FORWARD=forward, MULT=spectrum is not None, CONJ_X=conj_x, CONJ_S=conj_s,
        INVERSE=inverse, PRECISION=_precision(), BLOCK_M=min(blk, p.n1), BLOCK_K=min(blk, p.n2),
        num_warps=cfg["num_warps"])
    return out


def _ifft_cols(p: _Plan, rows: _Rows, e, out_len, out, scale, *, silu=False, x=None, d=None, gate=None,
               grad=None, ga=None, dzu=None):
    """Step 3 of the inverse DFT of every row of ``e``, then the epilogue, into ``out`` (rows, out_len)."""
    cfg = _config("fft")
    blk = cfg["BLOCK"]
    dummy = out
    grid = (rows.count, p.n2 // min(blk, p.n2))
    _kernels().ifft_cols_kernel[grid](
        *e, *p.f1, x if x is not None else dummy, d if d is not None else dummy,
        gate if gate is not None else dummy, grad if grad is not None else dummy, out,
        ga if ga is not None else dummy, dzu if dzu is not None else dummy,
        out_len, rows.sizes[1], rows.sizes[2],
        *_st(rows, x), *_st(rows, d), *_st(rows, gate), *_st(rows, grad), scale,
        HAS_D=d is not None, HAS_GATE=gate is not None, SILU=silu, BACKWARD=grad is not None,
        STORE_GA=ga is not None, STORE_DZU=dzu is not None,
        N1=p.n1, N2=p.n2, PRECISION=_precision(), BLOCK_N=min(blk, p.n2), BLOCK_K=min(blk, p.n1),
        num_warps=cfg["num_warps"])
    return out


def _kernel_spectrum(p: _Plan, k, taps):
    """K̂ of every row of k (its first ``taps`` samples), in the D layout: (re, im) of shape (*k.lead, N).
    A separate pair of launches on k's own rows: k is shared by the batch it broadcasts over."""
    kk = k.reshape(-1, k.shape[-1])
    rows = _Rows((kk.shape[0],), [kk])
    xr, xi = _fft_rows(p, rows, _fft_cols(p, rows, kk, taps), forward=True)
    n = p.n1 * p.n2
    return xr.view(*k.shape[:-1], n), xi.view(*k.shape[:-1], n)


# --- forward / backward ---------------------------------------------------------------

def _conv(c: _Call, p: _Plan | None, out, *, ga=None, dzu=None):
    """The convolution of the call with its fused epilogue (forward, or the backward's first step
    when ``c.grad`` is set) into ``out`` (rows, L)."""
    if p is None:
        _toeplitz(c, c.u, c.k, c.taps, c.length, out, correlate=False, silu=c.silu, d=c.d, gate=c.gate,
                  grad=c.grad, ga=ga, dzu=dzu)
        return out
    # phase A: Û (steps 1-2); phase B: step 3, · K̂, inverse steps 1-2; phase C: inverse step 3 + epilogue
    x = _fft_cols(p, c.rows, c.u, c.length)
    x = _fft_rows(p, c.rows, x, forward=True, spectrum=c.spec, inverse=True)
    return _ifft_cols(p, c.rows, x, c.length, out, c.scale, silu=c.silu, x=c.u, d=c.d, gate=c.gate,
                      grad=c.grad, ga=ga, dzu=dzu)


def forward(u, k, d, gate, a):
    """y = act(scale·(u ⊛ k)[..., :L] + d·u) · gate on the triton kernels; y of the broadcast shape
    (*B, L) in the promoted dtype of the inputs."""
    p = _plan(fft_size(u.shape[-1], k.shape[-1]), u.device) if _uses_fft(a) else None
    spec = _kernel_spectrum(p, k, min(k.shape[-1], u.shape[-1])) if p is not None else None
    c = _prepare(u, k, d, gate, None, a, spec)
    y = torch.empty(c.shape, device=u.device, dtype=_out_dtype(u, k, d, gate))
    _conv(c, p, y.view(c.rows.count, c.length))
    return y


def _reduce(x_rows, c: _Call, like: torch.Tensor, last: int):
    """Per-row results (rows, last) summed over the dims ``like`` was broadcast on, in its dtype."""
    x = x_rows.view(*c.rows.lead, last)
    target = (*like.shape[:-1], last)
    if tuple(x.shape) != target:
        x = x.sum_to_size(target)
    return x.to(like.dtype)


def backward(grad, u, k, d, gate, a):
    """[du, dk, dd, dgate] of :func:`forward` for upstream ``grad`` (the output's shape); None
    where ``a["needs"][i]`` is False."""
    needs = [bool(n) and x is not None for n, x in zip(a["needs"], (u, k, d, gate))]
    if not any(needs):
        return [None] * 4
    p = _plan(fft_size(u.shape[-1], k.shape[-1]), u.device) if _uses_fft(a) else None
    spec = _kernel_spectrum(p, k, min(k.shape[-1], u.shape[-1])) if p is not None else None
    c = _prepare(u, k, d, gate, grad, a, spec)
    rows, n_rows, length, dev = c.rows, c.rows.count, c.length, u.device
    f32 = dict(device=dev, dtype=torch.float32)

    # 1. dz = grad · gate · act'(z): the fused backward epilogue, recomputing the convolution
    #    when SiLU or ∂gate needs z; else an elementwise product
    ga = dzu = None
    if c.silu or needs[3]:
        dz = torch.empty(n_rows, length, **f32)
        ga = torch.empty(n_rows, length, **f32) if needs[3] else None
        dzu = torch.empty(n_rows, length, **f32) if needs[2] else None
        _conv(c, p, dz, ga=ga, dzu=dzu)
    else:
        dz = grad.float() if gate is None else grad.float() * gate.float()
        dz = dz.expand(c.shape).reshape(n_rows, length).contiguous()
        if needs[2]:
            dzu = (dz.view(c.shape) * c.u.float()).reshape(n_rows, length)
    dz_v = dz.view(c.shape)
    du = dk = dd = dgate = None

    if p is None:
        # 2. du[t] = scale·Σ_s k[s]·dz[t+s] + d·dz: the Toeplitz kernel as a correlation
        if needs[0]:
            out = torch.empty(n_rows, length, device=dev, dtype=u.dtype if u.shape == c.shape else torch.float32)
            _toeplitz(c, dz_v, c.k, c.taps, length, out, correlate=True, d=c.d)
            du = _reduce(out, c, u, length)
        # 3. dk[s] = scale·Σ_t u[t]·dz[t+s], per row, then summed over k's broadcast dims
        if needs[1]:
            out = torch.empty(n_rows, c.taps, **f32)
            _toeplitz(c, dz_v, c.u, length, c.taps, out, correlate=True)
            dk = _reduce(out, c, k, c.taps)
    else:
        # 2. Ĝ = DFT(dz), shared by du and dk
        g_hat = _fft_rows(p, rows, _fft_cols(p, rows, dz_v, length), forward=True)
        # 3. du = IDFT(Ĝ·conj(K̂))[:L]·scale + d·dz
        if needs[0]:
            x = _fft_rows(p, rows, g_hat, forward=False, spectrum=c.spec, conj_s=True, inverse=True)
            out = torch.empty(n_rows, length, device=dev, dtype=u.dtype if u.shape == c.shape else torch.float32)
            _ifft_cols(p, rows, x, length, out, c.scale, x=dz_v, d=c.d)
            du = _reduce(out, c, u, length)
        # 4. dk = IDFT(Σ_batch conj(Û)·Ĝ)[:Lk]·scale: the spectra are summed over k's broadcast dims
        if needs[1]:
            n = p.n1 * p.n2
            x = _fft_rows(p, rows, _fft_cols(p, rows, c.u, length), forward=True,
                          spectrum=tuple(g.view(*rows.lead, n) for g in g_hat), conj_x=True)
            del g_hat
            ks = (*k.shape[:-1], n)
            pr, pi = (t.view(*rows.lead, n).sum_to_size(ks).reshape(-1, n).contiguous() for t in x)
            k_rows = _Rows((pr.shape[0],), [pr])
            e = _fft_rows(p, k_rows, (pr, pi), forward=False, inverse=True)
            out = torch.empty(pr.shape[0], c.taps, **f32)
            _ifft_cols(p, k_rows, e, c.taps, out, c.scale)
            dk = out.view(*k.shape[:-1], c.taps).to(k.dtype)
    if dk is not None and c.taps < k.shape[-1]:  # taps beyond L reach no output
        dk = torch.cat([dk, dk.new_zeros(*k.shape[:-1], k.shape[-1] - c.taps)], dim=-1)
    # 5. ∂d and ∂gate: the per-element products of step 1, summed over their broadcast dims
    if needs[2]:
        dd = dzu.view(c.shape).sum_to_size(d.shape).to(d.dtype)
    if needs[3]:
        dgate = ga.view(c.shape).sum_to_size(gate.shape).to(gate.dtype)
    return [du, dk, dd, dgate]


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def register() -> None:
    """Register the triton implementation of seqfuse.long_conv with the runtime dispatcher."""
    register_impl("long_conv", Impl("triton", supports, forward, backward))
