"""The generated C kernels of the "cpu" path (seqfuse/lowering/cpu) against fp64 Python loops
written here (the scan's discretized form against the reference run on exp(dt·a), b·dt·u
materialized in torch), and against the eager references through the custom ops; the disk cache
of built libraries; the fallback when no C compiler is found.

Skipped (with the reason) only on a machine without a C compiler.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from seqfuse.lowering import scan_op, ssd_op  # noqa: F401  (register the custom ops)
from seqfuse.lowering.cpu import build
from seqfuse.lowering.cpu import scan as cpu_scan
from seqfuse.lowering.cpu import ssd as cpu_ssd
from seqfuse.lowering.cpu.common import PARALLEL_MIN_WORK
from seqfuse.lowering.reference import scan as reference_scan
from seqfuse.lowering.reference.scan import scan_reference
from seqfuse.runtime import choose, counters, fallbacks, reset_counters

if shutil.which(build.COMPILER) is None:
    pytest.skip(f"no C compiler ({build.COMPILER!r} not on PATH)", allow_module_level=True)

#: relative error bounds (Frobenius norm) against the fp64 loops
BOUND = {torch.float32: 2e-5, torch.float64: 1e-12}


def rel(x, ref):
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-300)).item()


# ---------------------------------------------------------------------------------------------
# oracles: plain fp64 loops over time


def scan_loop(a, b, c=None, h0=None, reverse=False):
    """(y, h) of h_t = a_t·h_{t-1} + b_t, y_t = Σ_n c_t·h_t (or h_t), one step at a time, in fp64."""
    shapes = [a.shape, b.shape] + ([c.shape] if c is not None else [])
    full = torch.broadcast_shapes(*shapes, *([(*h0.shape[:-1], 1, h0.shape[-1])] if h0 is not None else []))
    a, b = a.double().expand(full), b.double().expand(full)
    c = c.double().expand(full) if c is not None else None
    h = h0.double().expand(*full[:-2], full[-1]) if h0 is not None else torch.zeros(*full[:-2], full[-1],
                                                                                     dtype=torch.float64)
    T = full[-2]
    ys = [None] * T
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        h = a[..., t, :] * h + b[..., t, :]
        ys[t] = (h * c[..., t, :]).sum(-1) if c is not None else h
    if T == 0:
        return torch.zeros(full[:-1] if c is not None else full, dtype=torch.float64), h
    return torch.stack(ys, -1 if c is not None else -2), h


def ssd_loop(x, b, c, a, d, h0, decay):
    """(y, h) of S_t = exp(a_t)⊙S_{t-1} + x_t⊗b_t, y_t = S_t·c_t + d·x_t, one step at a time, in fp64."""
    B, T, H, P = x.shape
    N = b.shape[-1]
    S = h0.double() if h0 is not None else torch.zeros(B, H, P, N, dtype=torch.float64)
    ys = []
    for t in range(T):
        if decay == "scalar":
            S = a[:, t].double().exp()[..., None, None] * S
        elif decay == "vector":
            S = a[:, t].double().exp()[:, :, None, :] * S
        S = S + x[:, t].double()[..., :, None] * b[:, t].double()[..., None, :]
        y = (S * c[:, t].double()[:, :, None, :]).sum(-1)
        if d is not None:
            y = y + (d.double()[:, None] if d.dim() == 1 else d.double()) * x[:, t].double()
        ys.append(y)
    return torch.stack(ys, 1), S


def loop_grads(fn, operands, grad_y, grad_h):
    """Gradients of <fn(operands), (grad_y, grad_h)> w.r.t. the given operands, by autograd in fp64."""
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in operands]
    y, h = fn(*leaves)
    used = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad((y * grad_y.double()).sum() + (h * grad_h.double()).sum(), used))
    return [next(grads) if t is not None else None for t in leaves]


# ---------------------------------------------------------------------------------------------
# scan


def _scan_case(case, dtype, gen):
    """Operands (a, b, c, h0) of one layout case; R=(2, 3) rows, T=37, N=5 unless stated."""
    B, D, T, N = 2, 3, 37, 5
    r = lambda *s: torch.randn(*s, dtype=dtype, generator=gen)  # noqa: E731
    decay = lambda *s: torch.rand(*s, dtype=dtype, generator=gen) * 0.6 + 0.4  # noqa: E731
    if case == "readout_expand_c_const_a":  # Mamba-1/S4D: c shared over channels, a constant over T
        return decay(D, 1, N), r(B, D, T, N), r(B, 1, T, N).expand(B, D, T, N), r(D, N)
    if case == "states_full":  # no readout, every operand full, no h0
        return decay(B, D, T, N), r(B, D, T, N), None, None
    if case == "rows_3":  # R = 3, one row dim
        return decay(3, T, N), r(3, T, N), r(3, T, N), r(3, N)
    if case == "strided":  # b stored (T, R, N), c stored (R, N, T), a broadcast over n, h0 over channels
        return decay(B, D, T, 1), r(T, B, D, N).permute(1, 2, 0, 3), r(B, D, N, T).transpose(-1, -2), r(B, 1, N)
    if case == "t1":  # a single step
        return decay(B, 1, N), r(B, 1, N), None, r(B, N)
    raise ValueError(case)


SCAN_CASES = ["readout_expand_c_const_a", "states_full", "rows_3", "strided", "t1"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("case", SCAN_CASES)
def test_scan_forward_backward_match_loop(case, reverse, dtype):
    gen = torch.Generator().manual_seed(SCAN_CASES.index(case) * 2 + reverse)
    a, b, c, h0 = _scan_case(case, dtype, gen)
    y, h = cpu_scan.scan_forward(a, b, c, h0, reverse=reverse)
    y_ref, h_ref = scan_loop(a, b, c, h0, reverse)
    assert y.shape == y_ref.shape and h.shape == h_ref.shape and y.dtype == dtype
    assert rel(y, y_ref) < BOUND[dtype] and rel(h, h_ref) < BOUND[dtype]
    grad_y = torch.randn(y.shape, dtype=dtype, generator=gen)
    grad_h = torch.randn(h.shape, dtype=dtype, generator=gen)
    grads = cpu_scan.scan_backward(grad_y, grad_h, a, b, c, h0, reverse=reverse)
    refs = loop_grads(lambda *o: scan_loop(*o, reverse=reverse), (a, b, c, h0), grad_y, grad_h)
    for name, g, ref, op in zip("a b c h0".split(), grads, refs, (a, b, c, h0)):
        if op is None:
            assert g is None, name
            continue
        assert g.shape == op.shape and g.dtype == op.dtype, name
        assert rel(g, ref) < BOUND[dtype], (name, rel(g, ref))


def test_scan_backward_needs_and_no_final_grad():
    gen = torch.Generator().manual_seed(1)
    a, b, c, h0 = _scan_case("readout_expand_c_const_a", torch.float64, gen)
    grad_y = torch.randn(2, 3, 37, dtype=torch.float64, generator=gen)
    da, db, dc, dh0 = cpu_scan.scan_backward(grad_y, None, a, b, c, h0, needs=(True, False, False, True))
    assert db is None and dc is None
    ref = loop_grads(scan_loop, (a, b, c, h0), grad_y, torch.zeros(3 * 2 * 5, dtype=torch.float64).view(2, 3, 5))
    assert rel(da, ref[0]) < 1e-12 and rel(dh0, ref[3]) < 1e-12


@pytest.mark.parametrize("shape", [(7, 3), (5, 1), (2, 0, 3), (0, 5, 3)])
def test_scan_edge_shapes(shape):
    """No row dims, N = 1, T = 0 (the final state is h0; only h0 gets a gradient), no rows."""
    gen = torch.Generator().manual_seed(6)
    a = torch.rand(*shape, dtype=torch.float64, generator=gen)
    b, c = torch.randn(*shape, dtype=torch.float64, generator=gen), torch.randn(*shape, dtype=torch.float64,
                                                                              generator=gen)
    h0 = torch.randn(*shape[:-2], shape[-1], dtype=torch.float64, generator=gen)
    y, h = cpu_scan.scan_forward(a, b, c, h0)
    y_ref, h_ref = scan_loop(a, b, c, h0)
    assert y.shape == y_ref.shape and torch.allclose(y, y_ref) and torch.allclose(h, h_ref)
    gy, gh = torch.randn(y.shape, dtype=torch.float64, generator=gen), torch.randn(h.shape, dtype=torch.float64,
                                                                                    generator=gen)
    grads = cpu_scan.scan_backward(gy, gh, a, b, c, h0)
    if shape[-2] == 0:
        assert all(g.shape == op.shape and not g.any() for g, op in zip(grads[:3], (a, b, c)))
        assert torch.equal(grads[3], gh)
    elif shape[0] > 0:
        refs = loop_grads(scan_loop, (a, b, c, h0), gy, gh)
        assert all(rel(g, r) < 1e-12 for g, r in zip(grads, refs))


def test_scan_multithreaded_rows():
    """Enough work for the OpenMP path (the unit tests otherwise run one thread)."""
    gen = torch.Generator().manual_seed(2)
    R, T, N = 64, 64, 9
    assert R * T * N >= PARALLEL_MIN_WORK
    a = torch.rand(R, T, N, generator=gen, dtype=torch.float64) * 0.5 + 0.5
    b, c = torch.randn(R, T, N, generator=gen, dtype=torch.float64), torch.randn(1, T, N, generator=gen,
                                                                                  dtype=torch.float64)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        y, h = cpu_scan.scan_forward(a, b, c)
        gy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
        grads = cpu_scan.scan_backward(gy, torch.zeros_like(h), a, b, c)
    finally:
        torch.set_num_threads(before)
    y_ref, _ = scan_loop(a, b, c)
    assert rel(y, y_ref) < 1e-12
    refs = loop_grads(scan_loop, (a, b, c), gy, torch.zeros_like(h))
    assert all(rel(g, r) < 1e-12 for g, r in zip(grads, refs))


def test_scan_half_upcast():
    """bf16 operands are computed in fp32 and the results cast back."""
    gen = torch.Generator().manual_seed(3)
    a = (torch.rand(4, 20, 6, generator=gen) * 0.5 + 0.5).bfloat16()
    b = torch.randn(4, 20, 6, generator=gen).bfloat16()
    y, h = cpu_scan.scan_forward(a, b)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.bfloat16
    y_ref, _ = scan_loop(a, b)
    assert rel(y, y_ref) < 1e-2


# ---------------------------------------------------------------------------------------------
# scan, discretized form (dt, u): decay exp(dt·a), input b·dt·u formed inside the kernel


def disc_oracle(a, b, c, h0, dt, u, reverse=False):
    """The discretized scan with its factors materialized in torch, on the plain-form reference."""
    decay = torch.exp(a * dt) if dt is not None else a
    inp = b
    for f in (dt, u):
        if f is not None:
            inp = inp * f
    return scan_reference(decay, inp, c, h0, reverse=reverse)


def _disc_case(case, dtype, gen):
    """Operands (a, b, c, h0, dt, u) of one discretized layout; B=2, D=3 channels, T=37 (odd), N=5."""
    B, D, T, N = 2, 3, 37, 5
    r = lambda *s: torch.randn(*s, generator=gen).to(dtype)  # noqa: E731
    pos = lambda *s: (torch.rand(*s, generator=gen) * 0.5 + 0.05).to(dtype)  # noqa: E731  (dt > 0)
    logdecay = lambda *s: (-torch.rand(*s, generator=gen) * 2).to(dtype)  # noqa: E731  (Mamba's A < 0)
    if case == "mamba":  # A (D,1,N), dt and u (B,D,T,1), B and C shared over channels (B,1,T,N)
        return logdecay(D, 1, N), r(B, 1, T, N), r(B, 1, T, N), None, pos(B, D, T, 1), r(B, D, T, 1)
    if case == "mamba_h0_no_readout":  # as Mamba, no readout (every state out), an initial state
        return logdecay(D, 1, N), r(B, 1, T, N), None, r(B, D, N), pos(B, D, T, 1), r(B, D, T, 1)
    if case == "dt_full":  # dt over every (t, n), a full, u per channel
        return logdecay(B, D, T, N), r(B, D, T, N), r(B, D, T, N), r(D, N), pos(B, D, T, N), r(B, D, T, 1)
    if case == "only_u":  # decays a given directly (no dt), input b·u
        return (torch.rand(D, 1, N, generator=gen) * 0.6 + 0.4).to(dtype), r(B, 1, T, N), r(B, 1, T, N), None, \
            None, r(B, D, T, 1)
    if case == "only_dt":  # input b·dt, b full
        return logdecay(D, 1, N), r(B, D, T, N), r(B, 1, T, N), r(B, D, N), pos(B, D, T, 1), None
    if case == "u_full_strided":  # u over every n, b stored (T, N)-transposed: the general kernel copy
        return logdecay(D, 1, N), r(B, D, N, T).transpose(-1, -2), r(B, 1, T, N), None, pos(B, D, T, 1), \
            r(B, D, T, N)
    raise ValueError(case)


DISC_CASES = ["mamba", "mamba_h0_no_readout", "dt_full", "only_u", "only_dt", "u_full_strided"]
#: bf16 operands (computed in fp32, results rounded to bf16): the bound test_scan_half_upcast uses
DISC_BOUND = {**BOUND, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("case", DISC_CASES)
def test_scan_discretized_matches_materialized_oracle(case, reverse, dtype):
    gen = torch.Generator().manual_seed(100 + DISC_CASES.index(case) * 2 + reverse)
    ops = _disc_case(case, dtype, gen)
    a, b, c, h0, dt, u = ops
    y, h = cpu_scan.scan_forward(a, b, c, h0, reverse=reverse, dt=dt, u=u)
    y_ref, h_ref = disc_oracle(*(t.double() if t is not None else None for t in ops), reverse=reverse)
    assert y.shape == y_ref.shape and h.shape == h_ref.shape and y.dtype == dtype and h.dtype == dtype
    assert rel(y, y_ref) < DISC_BOUND[dtype] and rel(h, h_ref) < DISC_BOUND[dtype]
    grad_y = torch.randn(y.shape, generator=gen).to(dtype)
    grad_h = torch.randn(h.shape, generator=gen).to(dtype)
    grads = cpu_scan.scan_backward(grad_y, grad_h, a, b, c, h0, reverse=reverse, dt=dt, u=u)
    refs = loop_grads(lambda *o: disc_oracle(*o, reverse=reverse), ops, grad_y, grad_h)
    assert len(grads) == 6
    for name, g, ref, op in zip("a b c h0 dt u".split(), grads, refs, ops):
        if op is None:
            assert g is None, name
            continue
        assert g.shape == op.shape and g.dtype == op.dtype, name
        assert rel(g, ref) < DISC_BOUND[dtype], (name, rel(g, ref))


def test_scan_discretized_backward_needs_subsets():
    """Each gradient alone (the adjoint runs the same; only the requested buffers are written)."""
    gen = torch.Generator().manual_seed(7)
    ops = _disc_case("mamba", torch.float64, gen)
    a, b, c, h0, dt, u = ops
    y, h = cpu_scan.scan_forward(a, b, c, h0, dt=dt, u=u)
    gy = torch.randn(y.shape, dtype=torch.float64, generator=gen)
    refs = loop_grads(disc_oracle, ops, gy, torch.zeros_like(h))
    for i in (0, 1, 2, 4, 5):
        needs = [j == i for j in range(6)]
        grads = cpu_scan.scan_backward(gy, None, a, b, c, h0, needs=needs, dt=dt, u=u)
        assert all(g is None for j, g in enumerate(grads) if j != i)
        assert rel(grads[i], refs[i]) < 1e-12, i
    # the old four-entry needs: (da, db, dc, dh0), dt and u get none
    assert len(cpu_scan.scan_backward(gy, None, a, b, c, h0, needs=(True,) * 4, dt=dt, u=u)) == 4


def test_scan_discretized_multithreaded_and_extreme_decays():
    """Enough rows for the OpenMP path; dt·a down to -200 (decays that underflow to 0 in fp32)."""
    gen = torch.Generator().manual_seed(8)
    B, D, T, N = 2, 32, 64, 16
    assert B * D * T * N >= PARALLEL_MIN_WORK
    a = -torch.rand(D, 1, N, generator=gen, dtype=torch.float64) * 20
    dt = torch.rand(B, D, T, 1, generator=gen, dtype=torch.float64) * 10
    b, c = (torch.randn(B, 1, T, N, generator=gen, dtype=torch.float64) for _ in range(2))
    u = torch.randn(B, D, T, 1, generator=gen, dtype=torch.float64)
    ops = (a, b, c, None, dt, u)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        y, h = cpu_scan.scan_forward(a, b, c, dt=dt, u=u)
        y32, _ = cpu_scan.scan_forward(*(t.float() for t in (a, b, c)), dt=dt.float(), u=u.float())
        gy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
        grads = cpu_scan.scan_backward(gy, None, a, b, c, dt=dt, u=u)
    finally:
        torch.set_num_threads(before)
    y_ref, _ = disc_oracle(*ops)
    assert rel(y, y_ref) < 1e-12 and rel(y32, y_ref) < BOUND[torch.float32]
    refs = loop_grads(disc_oracle, ops, gy, torch.zeros_like(h))
    assert all(rel(g, r) < 1e-12 for g, r in zip(grads, refs) if r is not None)


def test_ops_cpu_path_runs_discretized_natively(monkeypatch):
    """Through torch.ops.seqfuse.scan on the "cpu" path: matches the oracle, and the factors are
    never materialized (the reference's discretize / discretize_backward would raise)."""
    gen = torch.Generator().manual_seed(9)
    ops = _disc_case("mamba", torch.float32, gen)
    a, b, c, h0, dt, u = ops
    attrs = dict(reverse=False, algorithm="recurrent")
    assert choose("scan", "auto", dict(a=a, b=b, c=c, h0=h0, dt=dt, u=u), attrs).path == "cpu"

    def refuse(*args, **kwargs):
        raise AssertionError("the cpu path materialized exp(dt·a) / b·dt·u")

    monkeypatch.setattr(reference_scan, "discretize", refuse)
    monkeypatch.setattr(reference_scan, "discretize_backward", refuse)
    assert cpu_scan.IMPL.forward is cpu_scan._impl_forward and cpu_scan.IMPL.backward is cpu_scan._impl_backward
    reset_counters()
    leaves = [t.detach().requires_grad_() for t in (a, b, c, dt, u)]
    la, lb, lc, ldt, lu = leaves
    y, h = torch.ops.seqfuse.scan(la, lb, lc, None, True, "recurrent", "cpu", ldt, lu)
    gy, gh = torch.randn(y.shape, generator=gen), torch.randn(h.shape, generator=gen)
    grads = torch.autograd.grad((y * gy).sum() + (h * gh).sum(), leaves)
    calls = counters()
    assert calls["scan"]["cpu"] == 1 and calls["scan"]["eager"] == 0, calls
    assert calls["scan_backward"]["cpu"] == 1 and calls["scan_backward"]["eager"] == 0, calls
    monkeypatch.undo()
    reset_counters()
    y_ref, h_ref = disc_oracle(*(t.double() if t is not None else None for t in ops), reverse=True)
    refs = loop_grads(lambda *o: disc_oracle(*o, reverse=True), (a, b, c, None, dt, u), gy, gh)
    assert rel(y, y_ref) < BOUND[torch.float32] and rel(h, h_ref) < BOUND[torch.float32]
    for g, ref in zip(grads, [refs[i] for i in (0, 1, 2, 4, 5)]):
        assert rel(g, ref) < BOUND[torch.float32]


# ---------------------------------------------------------------------------------------------
# scan with readout_dtype: the readout reads the states rounded (h.to(bf16) @ C)

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32


def test_scan_readout_rounding_is_bit_exact():
    """With a = 0, c = 1, N = 1 and T = 1 (one row per value) the readout is round(b): the kernel's bf16 (bit pattern), fp16
    (_Float16) and fp32 rounding against torch's casts, bit for bit, over ties, subnormals,
    overflow, inf and NaN, from fp32 and fp64 states (fp64 goes through float, as torch's does)."""
    gen = torch.Generator().manual_seed(21)
    special = [0.0, -0.0, 1.0, 1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -11, 1 + 3 * 2 ** -11, 1 + 2 ** -8 + 2 ** -40,
               1 + 2 ** -11 + 2 ** -40, 65504.0, 65519.0, 65520.0, 1e5, -1e5, 6e-8, 2.9e-8, 3e-8, 1e-6, -4e-6,
               3.3895e38, 3.4e38, -3.4e38, 1e-40, float("inf"), float("-inf"), float("nan")]
    for dtype in (torch.float32, torch.float64):
        vals = torch.cat([torch.tensor(special, dtype=torch.float64),
                          torch.randn(4000, generator=gen, dtype=torch.float64)
                          * torch.logspace(-30, 30, 4000, dtype=torch.float64)]).to(dtype)
        b = vals.view(-1, 1, 1)
        a, c = torch.zeros_like(b), torch.ones_like(b)
        for rd in (BF16, F16, F32):
            y, h = cpu_scan.scan_forward(a, b, c, readout_dtype=rd)
            assert y.dtype == dtype and h.dtype == dtype
            want = vals.to(rd).to(dtype)
            assert torch.equal(y[:, 0].isnan(), want.isnan()), rd
            same = (y[:, 0] == want) | want.isnan()
            assert bool(same.all()), (dtype, rd, vals[~same][:5], y[:, 0][~same][:5], want[~same][:5])
            assert torch.equal(h.nan_to_num(), b[:, -1].nan_to_num())  # the final state is not rounded


def _readout_case(c_dtype, disc, h0, gen, B=2, D=3, T=13, N=16):
    """Mamba-1 layouts (A (D, 1, N), dt and u (B, D, T, 1), B and C (B, 1, T, N)) with states large
    enough that rounding them changes y; c in ``c_dtype``."""
    if disc:
        a = -torch.rand(D, 1, N, generator=gen) - 0.2
        dt = torch.rand(B, D, T, 1, generator=gen) * 0.5 + 0.05
        u = torch.randn(B, D, T, 1, generator=gen) * 3
    else:
        a, dt, u = torch.rand(B, D, T, N, generator=gen) * 0.4 + 0.6, None, None
    b = torch.randn(B, 1, T, N, generator=gen) * 3
    c = torch.randn(B, 1, T, N, generator=gen).to(c_dtype)
    h0 = torch.randn(B, D, N, generator=gen) * 3 if h0 else None
    return a, b, c, h0, dt, u


def _eager_program(a, b, c, h0, dt, u, rd, reverse):
    """The program the rounded readout stands for, in torch with autograd: the states (fp32), then
    y = h.to(rd) @ c in promote(rd, c.dtype) (``h.to(bf16) @ C`` when both are bf16)."""
    if dt is not None:
        a = torch.exp(a * dt)
        b = b * dt * u
    full = torch.broadcast_shapes(a.shape, b.shape, c.shape)
    a, b = a.expand(full), b.expand(full)
    h = h0 if h0 is not None else torch.zeros(*full[:-2], full[-1])
    hs = [None] * full[-2]
    for t in (range(full[-2] - 1, -1, -1) if reverse else range(full[-2])):
        h = a[..., t, :] * h + b[..., t, :]
        hs[t] = h
    states = torch.stack(hs, -2)
    p = torch.promote_types(rd, c.dtype)
    y = (states.to(rd).to(p).unsqueeze(-2) @ c.to(p).unsqueeze(-1)).squeeze(-1).squeeze(-1)
    return y, h


def _ulps(x, ref):
    """|x - ref| in units of ref's dtype spacing at ref."""
    ref64 = ref.double()
    ulp = (torch.nextafter(ref.float().abs(), torch.tensor(float("inf"))).to(ref.dtype).double() - ref64.abs())
    if ref.dtype == torch.bfloat16:  # bf16 spacing: the next representable bf16
        ulp = 2.0 ** (torch.floor(torch.log2(ref64.abs().clamp_min(1e-30))) - 7)
    return ((x.double() - ref64).abs() / ulp.clamp_min(1e-300)).max().item()


@pytest.mark.parametrize("rd", [BF16, F16, F32])
@pytest.mark.parametrize("c_dtype", [BF16, F32])
@pytest.mark.parametrize("disc", [False, True])
@pytest.mark.parametrize("reverse,h0", [(False, False), (True, True)])
def test_scan_readout_dtype_matches_reference_and_eager(rd, c_dtype, disc, reverse, h0):
    gen = torch.Generator().manual_seed(31)
    a, b, c, h0, dt, u = _readout_case(c_dtype, disc, h0, gen)
    y, h = cpu_scan.scan_forward(a, b, c, h0, reverse, dt=dt, u=u, readout_dtype=rd)
    y_ref, h_ref = scan_reference(a, b, c, h0, dt=dt, u=u, reverse=reverse, readout_dtype=rd)
    assert y.dtype == y_ref.dtype == reference_scan.y_dtype(torch.float32, c, rd) and h.dtype == torch.float32
    torch.testing.assert_close(h, h_ref, rtol=2e-5, atol=1e-5)
    scale = (c.float().abs() * 10).sum(-1).expand(y.shape)  # |y| up to Σ|c·h|: the sum's own rounding
    if y.dtype == torch.float32:
        assert ((y - y_ref).abs() <= 1e-6 * scale).all()
    else:
        assert _ulps(y, y_ref) <= 1, _ulps(y, y_ref)
    y_plain, _ = cpu_scan.scan_forward(a, b, c, h0, reverse, dt=dt, u=u)
    if rd != F32:  # the rounding shows: the unrounded readout is measurably different
        assert (y.float() - y_plain.float()).abs().max() > 1e-3
    else:
        torch.testing.assert_close(y, y_plain.to(y.dtype), rtol=1e-6, atol=1e-5)

    # backward: the reference (the plain one lifted to the discretized form) and eager autograd
    gen2 = torch.Generator().manual_seed(32)
    gy, gh = torch.randn(y.shape, generator=gen2).to(y.dtype), torch.randn(h.shape, generator=gen2)
    grads = cpu_scan.scan_backward(gy, gh, a, b, c, h0, reverse, dt=dt, u=u, readout_dtype=rd)
    _, backward6 = reference_scan.with_discretization(scan_op._reference_forward, scan_op._reference_backward)
    attrs = dict(reverse=reverse, algorithm="recurrent", readout_dtype=rd, needs=[True] * 6)
    refs = backward6(gy, gh, a, b, c, h0, dt, u, attrs)
    leaves = [t.detach().requires_grad_() if t is not None else None for t in (a, b, c, h0, dt, u)]
    ye, he = _eager_program(*leaves, rd, reverse)
    assert ye.dtype == y.dtype
    assert _ulps(y, ye) <= 1 if y.dtype != torch.float32 else ((y - ye).abs() <= 1e-6 * scale).all()
    given = [t for t in leaves if t is not None]
    eager = iter(torch.autograd.grad((ye.float() * gy.float()).sum() + (he * gh).sum(), given))
    eager = [next(eager) if t is not None else None for t in leaves]
    for name, g, r, e, t in zip(("a", "b", "c", "h0", "dt", "u"), grads, refs, eager, leaves):
        if t is None:
            assert g is None
            continue
        assert g.dtype == t.dtype and g.shape == t.shape, name
        bound = 1e-5 if t.dtype == torch.float32 else 1e-2
        assert rel(g, r) < bound, (name, rel(g, r))
        assert rel(g, e) < bound, (name, rel(g, e))
    if rd != F32:  # dc read the rounded states
        dc_plain = cpu_scan.scan_backward(gy, gh, a, b, c, h0, reverse, dt=dt, u=u)[2]
        assert rel(grads[2], dc_plain) > 1e-4


def test_scan_readout_dtype_fp64_states():
    """fp64 states rounded to fp32 / bf16 (through float, as torch) for the readout: y in fp64."""
    gen = torch.Generator().manual_seed(41)
    a, b, c, h0, dt, u = (t.double() if t is not None else None for t in _readout_case(F32, True, True, gen))
    for rd in (BF16, F16, F32):
        y, h = cpu_scan.scan_forward(a, b, c, h0, dt=dt, u=u, readout_dtype=rd)
        y_ref, h_ref = scan_reference(a, b, c, h0, dt=dt, u=u, readout_dtype=rd)
        assert y.dtype == h.dtype == torch.float64
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(h, h_ref, rtol=1e-12, atol=1e-12)
        gy = torch.randn(y.shape, generator=gen, dtype=torch.float64)
        grads = cpu_scan.scan_backward(gy, None, a, b, c, h0, dt=dt, u=u, readout_dtype=rd)
        _, backward6 = reference_scan.with_discretization(scan_op._reference_forward, scan_op._reference_backward)
        refs = backward6(gy, torch.zeros_like(h), a, b, c, h0, dt, u,
                         dict(reverse=False, algorithm="recurrent", readout_dtype=rd, needs=[True] * 6))
        assert all(rel(g, r) < 1e-12 for g, r in zip(grads, refs))


def test_ops_cpu_path_runs_readout_dtype():
    """torch.ops.seqfuse.scan(..., "cpu", dt, u, torch.bfloat16), forward and backward, on the C
    kernel (no eager fallback), against the reference."""
    gen = torch.Generator().manual_seed(51)
    a, b, c, h0, dt, u = _readout_case(BF16, True, True, gen)
    attrs = dict(reverse=False, algorithm="recurrent", readout_dtype=BF16)
    assert cpu_scan.supports(dict(a=a, b=b, c=c, h0=h0, dt=dt, u=u), attrs) is None
    reset_counters()
    leaves = [t.detach().requires_grad_() for t in (a, b, c, h0, dt, u)]
    la, lb, lc, lh0, ldt, lu = leaves
    y, h = torch.ops.seqfuse.scan(la, lb, lc, lh0, False, "recurrent", "cpu", ldt, lu, torch.bfloat16)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    gy, gh = torch.randn(y.shape, generator=gen).to(y.dtype), torch.randn(h.shape, generator=gen)
    grads = torch.autograd.grad((y.float() * gy.float()).sum() + (h * gh).sum(), leaves)
    calls = counters()
    assert calls["scan"]["cpu"] == 1 and calls["scan"]["eager"] == 0, calls
    assert calls["scan_backward"]["cpu"] == 1 and calls["scan_backward"]["eager"] == 0, calls
    reset_counters()
    y_ref, h_ref = scan_reference(a, b, c, h0, dt=dt, u=u, readout_dtype=BF16)
    assert _ulps(y, y_ref) <= 1
    torch.testing.assert_close(h, h_ref, rtol=2e-5, atol=1e-5)
    _, backward6 = reference_scan.with_discretization(scan_op._reference_forward, scan_op._reference_backward)
    refs = backward6(gy, gh, a, b, c, h0, dt, u, dict(attrs, needs=[True] * 6))
    for g, r in zip(grads, refs):
        assert rel(g, r) < (1e-5 if g.dtype == torch.float32 else 1e-2)


# ---------------------------------------------------------------------------------------------
# ssd (recurrent)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("extras", ["plain", "d_h0", "dP_bshared"])
@pytest.mark.parametrize("decay", ["none", "scalar", "vector"])
def test_ssd_forward_backward_match_loop(decay, extras, dtype):
    gen = torch.Generator().manual_seed(len(decay) * 10 + len(extras))
    B, T, H, P, N = 2, 37, 3, 5, 7
    r = lambda *s: torch.randn(*s, dtype=dtype, generator=gen)  # noqa: E731
    x, c = r(B, T, H, P), r(B, T, H, N)
    b = r(B, T, 1, N).expand(B, T, H, N) if extras == "dP_bshared" else r(B, T, H, N)
    a = {"none": None, "scalar": -torch.rand(B, T, H, dtype=dtype, generator=gen),
         "vector": -torch.rand(B, T, H, N, dtype=dtype, generator=gen)}[decay]
    d = {"plain": None, "d_h0": r(H), "dP_bshared": r(H, P)}[extras]
    h0 = r(B, H, P, N) if extras == "d_h0" else None
    y, h = cpu_ssd.ssd_forward(x, b, c, a, d, h0, decay=decay)
    y_ref, h_ref = ssd_loop(x, b, c, a, d, h0, decay)
    assert y.shape == (B, T, H, P) and h.shape == (B, H, P, N) and y.dtype == dtype
    assert rel(y, y_ref) < BOUND[dtype] and rel(h, h_ref) < BOUND[dtype]
    grad_y, grad_h = r(B, T, H, P), r(B, H, P, N)
    operands = (x, b, c, a, d, h0)
    grads = cpu_ssd.ssd_backward(grad_y, grad_h, *operands, decay=decay)
    refs = loop_grads(lambda *o: ssd_loop(*o, decay), operands, grad_y, grad_h)
    for name, g, ref, op in zip("x b c a d h0".split(), grads, refs, operands):
        if op is None:
            assert g is None, name
            continue
        assert g.shape == op.shape and g.dtype == op.dtype, name
        assert rel(g, ref) < BOUND[dtype], (name, rel(g, ref))


@pytest.mark.parametrize("N", [64, 128])
@pytest.mark.parametrize("decay", ["scalar", "vector"])
def test_ssd_specialized_state_sizes_match_loop(decay, N):
    # N = 64 and 128 run bodies compiled for that size; T = 11: checkpointed chunks of 4, one ragged
    gen = torch.Generator().manual_seed(N + len(decay))
    B, T, H, P = 1, 11, 2, 3
    r = lambda *s: torch.randn(*s, dtype=torch.float64, generator=gen)  # noqa: E731
    x, b, c, h0, d = r(B, T, H, P), r(B, T, H, N), r(B, T, H, N), r(B, H, P, N), r(H)
    a = -torch.rand(*((B, T, H) if decay == "scalar" else (B, T, H, N)), dtype=torch.float64, generator=gen)
    y, h = cpu_ssd.ssd_forward(x, b, c, a, d, h0, decay=decay)
    y_ref, h_ref = ssd_loop(x, b, c, a, d, h0, decay)
    assert rel(y, y_ref) < 1e-12 and rel(h, h_ref) < 1e-12
    gy, gh = r(B, T, H, P), r(B, H, P, N)
    grads = cpu_ssd.ssd_backward(gy, gh, x, b, c, a, d, h0, decay=decay)
    refs = loop_grads(lambda *o: ssd_loop(*o, decay), (x, b, c, a, d, h0), gy, gh)
    for name, g, ref in zip("x b c a d h0".split(), grads, refs):
        assert rel(g, ref) < 1e-12, (name, rel(g, ref))


def test_ssd_multithreaded_heads():
    gen = torch.Generator().manual_seed(4)
    B, T, H, P, N = 2, 40, 4, 16, 16
    r = lambda *s: torch.randn(*s, dtype=torch.float64, generator=gen)  # noqa: E731
    x, b, c, a = r(B, T, H, P), r(B, T, H, N), r(B, T, H, N), -torch.rand(B, T, H, N, dtype=torch.float64,
                                                                          generator=gen)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        y, h = cpu_ssd.ssd_forward(x, b, c, a, None, None, decay="vector")
        gy, gh = r(B, T, H, P), r(B, H, P, N)
        grads = cpu_ssd.ssd_backward(gy, gh, x, b, c, a, None, None, decay="vector")
    finally:
        torch.set_num_threads(before)
    y_ref, h_ref = ssd_loop(x, b, c, a, None, None, "vector")
    assert rel(y, y_ref) < 1e-12 and rel(h, h_ref) < 1e-12
    refs = loop_grads(lambda *o: ssd_loop(*o, "vector"), (x, b, c, a, None, None), gy, gh)
    assert all(rel(g, ref) < 1e-12 for g, ref in zip(grads[:4], refs[:4]))


# ---------------------------------------------------------------------------------------------
# through the custom ops: the "cpu" path agrees with the eager reference


def test_ops_cpu_path_matches_eager_reference():
    gen = torch.Generator().manual_seed(5)
    a, b, c, h0 = _scan_case("readout_expand_c_const_a", torch.float32, gen)
    t = dict(a=a, b=b, c=c, h0=h0)
    assert choose("scan", "auto", t, dict(reverse=True, algorithm="recurrent")).path == "cpu"
    results = {}
    for runtime in ("cpu", "eager"):
        leaves = [x.detach().requires_grad_() for x in (a, b, c, h0)]
        y, h = torch.ops.seqfuse.scan(*leaves, True, "recurrent", runtime)
        grads = torch.autograd.grad((y * y).sum() + h.sum(), leaves)
        results[runtime] = (y, h, *grads)
    assert all(rel(u, v) < 1e-5 for u, v in zip(results["cpu"], results["eager"]))

    B, T, H, P, N = 2, 30, 4, 8, 8
    x, bb, cc = (torch.randn(B, T, H, k, generator=gen) for k in (P, N, N))
    la = -torch.rand(B, T, H, generator=gen)
    d, s0 = torch.randn(H, generator=gen), torch.randn(B, H, P, N, generator=gen)
    t = dict(x=x, b=bb, c=cc, a=la, d=d, h0=s0)
    assert choose("ssd", "auto", t, dict(decay="scalar", chunk=16, algorithm="recurrent")).path == "cpu"
    for runtime in ("cpu", "eager"):
        leaves = [v.detach().requires_grad_() for v in (x, bb, cc, la, d, s0)]
        y, h = torch.ops.seqfuse.ssd(*leaves, "scalar", 16, "recurrent", runtime)
        grads = torch.autograd.grad((y * y).sum() + h.sum(), leaves)
        results[runtime] = (y, h, *grads)
    assert all(rel(u, v) < 1e-5 for u, v in zip(results["cpu"], results["eager"]))


# ---------------------------------------------------------------------------------------------
# supports(): refusals with reasons


def test_supports_refuses_with_reasons(monkeypatch, tmp_path):
    a, b = torch.rand(2, 8, 4), torch.randn(2, 8, 4)
    attrs = dict(reverse=False, algorithm="recurrent")
    assert cpu_scan.supports(dict(a=a, b=b, c=None, h0=None), attrs) is None
    reason = cpu_scan.supports(dict(a=a.to(torch.complex64), b=b, c=None, h0=None), attrs)
    assert reason and "complex" in reason
    big = torch.rand(1, 4, cpu_scan.MAX_N + 1)
    assert "N=" in cpu_scan.supports(dict(a=big, b=big, c=None, h0=None), attrs)
    assert "chunked" in cpu_scan.supports(dict(a=a, b=b, c=None, h0=None), dict(attrs, algorithm="chunked"))
    assert "meta" in cpu_scan.supports(dict(a=a.to("meta"), b=b, c=None, h0=None), attrs)
    dt, u = torch.rand(2, 8, 1), torch.randn(2, 8, 1)
    assert cpu_scan.supports(dict(a=a, b=b, c=None, h0=None, dt=dt, u=u), attrs) is None
    assert "complex" in cpu_scan.supports(dict(a=a, b=b, c=None, h0=None, dt=dt.to(torch.complex64), u=u), attrs)
    assert "meta" in cpu_scan.supports(dict(a=a, b=b, c=None, h0=None, dt=dt, u=u.to("meta")), attrs)
    assert "broadcast" in cpu_scan.supports(dict(a=a, b=b, c=None, h0=None, dt=torch.rand(3, 8, 1), u=None), attrs)
    for rd in (torch.bfloat16, torch.float16, torch.float32):  # states rounded for the readout
        assert cpu_scan.supports(dict(a=a, b=b, c=b, h0=None), dict(attrs, readout_dtype=rd)) is None
    assert "readout_dtype" in cpu_scan.supports(dict(a=a, b=b, c=b, h0=None), dict(attrs, readout_dtype=torch.int8))
    # a compiler without _Float16 (the predefined macro that announces it removed): the fp16 rounding
    # variant does not build, and says why; the others still do
    cc = shutil.which(build.COMPILER)
    no_f16 = tmp_path / "cc-no-f16"
    no_f16.write_text(f'#!/bin/sh\nexec {cc} -U__FLT16_MAX__ "$@"\n')
    no_f16.chmod(0o755)
    monkeypatch.setattr(build, "COMPILER", str(no_f16))
    monkeypatch.setenv("SEQFUSE_CACHE_DIR", str(tmp_path / "cache"))
    assert "_Float16" in cpu_scan.supports(dict(a=a, b=b, c=b, h0=None), dict(attrs, readout_dtype=torch.float16))
    assert cpu_scan.supports(dict(a=a, b=b, c=b, h0=None), dict(attrs, readout_dtype=torch.bfloat16)) is None
    monkeypatch.undo()
    x, bc = torch.randn(1, 4, 2, 3), torch.randn(1, 4, 2, 5)
    ssd_attrs = dict(decay="none", chunk=16, algorithm="recurrent")
    assert cpu_ssd.supports(dict(x=x, b=bc, c=bc, a=None, d=None, h0=None), ssd_attrs) is None
    assert "quadratic" in cpu_ssd.supports(dict(x=x, b=bc, c=bc, a=None, d=None, h0=None),
                                           dict(ssd_attrs, algorithm="quadratic"))


# ---------------------------------------------------------------------------------------------
# build: disk cache, missing compiler


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty kernel cache directory and no library loaded in this process."""
    monkeypatch.setenv("SEQFUSE_CACHE_DIR", str(tmp_path))
    build.forget()
    yield tmp_path
    build.forget()


PROBE = "int seqfuse_probe(int x) { return 3 * x; }\n"  # a tiny source: the cache, not a kernel, is tested


def test_disk_cache_is_reused(fresh_cache, capsys):
    before = build.compile_count
    lib = build.load("probe", PROBE)
    assert lib.seqfuse_probe(5) == 15
    assert build.compile_count == before + 1
    built = list((fresh_cache / "cpu_kernels").glob("probe-*.so"))
    assert len(built) == 1
    assert "seqfuse: building C kernel 'probe'" in capsys.readouterr().err
    mtime = built[0].stat().st_mtime_ns
    assert build.load("probe", PROBE) is lib and build.compile_count == before + 1  # in memory
    build.forget()  # as in a new process: nothing in memory, the library on disk
    assert build.load("probe", PROBE).seqfuse_probe(2) == 6
    assert build.compile_count == before + 1  # no compiler run
    assert built[0].stat().st_mtime_ns == mtime
    assert capsys.readouterr().err == ""
    # another source is another library
    build.load("probe", PROBE + "/* another */\n")
    assert build.compile_count == before + 2
    assert len(list((fresh_cache / "cpu_kernels").glob("probe-*.so"))) == 2


def test_corrupt_library_is_rebuilt(fresh_cache):
    """A file that does not load (say truncated by a full disk) is rebuilt.  (A source never
    loaded in this process: the dynamic loader would hand back a loaded library by its name.)"""
    source = PROBE + "/* corrupt-file test */\n"
    compiler = build._compiler_identity(shutil.which(build.COMPILER))
    key = build._key(source, compiler, build.BASE_FLAGS + build.CPU_FLAGS + build.FLAG_VARIANTS[0])
    (fresh_cache / "cpu_kernels").mkdir()
    (fresh_cache / "cpu_kernels" / f"probe-{key}.so").write_bytes(b"not a shared library")
    before = build.compile_count
    assert build.load("probe", source).seqfuse_probe(1) == 3
    assert build.compile_count > before  # rebuilt (more than once where -fopenmp is refused)


def _load_in_subprocess(cache: Path, source: str) -> subprocess.CompletedProcess:
    """Load ``source``'s library in a fresh interpreter (a fault there kills only that process)."""
    code = ("import sys; from seqfuse.lowering.cpu import build\n"
            "lib = build.load('probe', sys.argv[1])\n"
            "print(lib.seqfuse_probe(7), build.compile_count)\n")
    env = dict(os.environ, SEQFUSE_CACHE_DIR=str(cache))
    return subprocess.run([sys.executable, "-c", code, source], env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("damage", ["truncated", "foreign", "no_digest", "stale_digest"])
def test_damaged_library_is_rebuilt_not_mapped(fresh_cache, damage):
    """A library that is not the one the build wrote is never handed to the dynamic loader:
    a shared object truncated to half its size (a full disk, a killed copy) used to be
    mapped and kill the process with SIGBUS."""
    source = PROBE + f"/* damaged-library test: {damage} */\n" + "int pad[4096] = {1};\n"
    built = _load_in_subprocess(fresh_cache, source)
    assert built.returncode == 0 and built.stdout.split() == ["21", "1"], built.stderr
    (lib,) = (fresh_cache / "cpu_kernels").glob("probe-*.so")
    digest = lib.with_name(lib.name + ".sha256")
    data = lib.read_bytes()
    if damage == "truncated":
        lib.write_bytes(data[: len(data) // 2])
    elif damage == "foreign":  # a whole library, but not this source's
        other = _load_in_subprocess(fresh_cache / "other", PROBE + "/* foreign */\n")
        assert other.returncode == 0, other.stderr
        (foreign,) = (fresh_cache / "other" / "cpu_kernels").glob("probe-*.so")
        lib.write_bytes(foreign.read_bytes())
    elif damage == "no_digest":
        digest.unlink()
    else:
        digest.write_text("12 " + "0" * 64 + "\n")
    again = _load_in_subprocess(fresh_cache, source)
    assert again.returncode == 0, f"the loading process died (rc {again.returncode}): {again.stderr[-500:]}"
    assert again.stdout.split() == ["21", "1"], again.stdout  # rebuilt once, then loaded
    assert lib.read_bytes() != data[: len(data) // 2] and build._verified(lib)
    # and the rebuilt library is reused without the compiler
    third = _load_in_subprocess(fresh_cache, source)
    assert third.returncode == 0 and third.stdout.split() == ["21", "0"], third.stdout


def test_read_only_cache_with_a_whole_library_loads_it(fresh_cache):
    source = PROBE + "/* read-only cache test */\n"
    assert _load_in_subprocess(fresh_cache, source).returncode == 0
    kdir = fresh_cache / "cpu_kernels"
    mode = kdir.stat().st_mode
    kdir.chmod(0o555)
    try:
        got = _load_in_subprocess(fresh_cache, source)
    finally:
        kdir.chmod(mode)
    assert got.returncode == 0 and got.stdout.split() == ["21", "0"], got.stderr


def test_threads_loading_one_library_build_it_once(fresh_cache):
    import threading
    source = PROBE + "/* threads test */\n"
    before = build.compile_count
    results, errors = [], []

    def work():
        try:
            results.append(build.load("probe", source).seqfuse_probe(3))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [9] * 4
    assert build.compile_count == before + 1


def test_unwritable_cache_dir_builds_in_temp_dir(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("SEQFUSE_CACHE_DIR", str(blocker / "cache"))  # under a file: mkdir fails
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    build.forget()
    try:
        assert build.load("probe", PROBE).seqfuse_probe(4) == 12
        assert list((tmp_path / "tmp").glob("seqfuse-*/cpu_kernels/probe-*.so"))
    finally:
        build.forget()


def test_build_error_is_a_reason(fresh_cache):
    lib, reason = build.try_load("broken", "this is not C;\n")
    assert lib is None and "did not build" in reason and "broken" in reason


def test_missing_compiler_falls_back_with_reason(fresh_cache, monkeypatch):
    monkeypatch.setattr(build, "COMPILER", "seqfuse-no-such-cc")
    a, b = torch.rand(2, 8, 4), torch.randn(2, 8, 4)
    tensors, attrs = dict(a=a, b=b, c=None, h0=None), dict(reverse=False, algorithm="recurrent")
    reason = cpu_scan.supports(tensors, attrs)
    assert reason is not None and "seqfuse-no-such-cc" in reason
    reset_counters()
    assert choose("scan", "auto", tensors, attrs).path == "eager"
    assert any("seqfuse-no-such-cc" in r for r in fallbacks()["scan"])
    y, h = torch.ops.seqfuse.scan(a, b, None, None, False, "recurrent", "auto")
    y_ref, h_ref = scan_loop(a, b)
    assert rel(y, y_ref) < 1e-5
    reset_counters()


@pytest.mark.parametrize("flags, want", [("fpu sse2 avx avx2 fma bmi2", True), ("fpu sse2 avx fma", False),
                                         ("fpu sse2", False)])
def test_avx2_flags_only_where_the_cpu_lists_avx2_and_fma(tmp_path, monkeypatch, flags, want):
    monkeypatch.setattr(build.platform, "machine", lambda: "x86_64")
    monkeypatch.delenv("SEQFUSE_CPU_BASELINE", raising=False)
    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert build._cpu_flags(str(info)) == (build.AVX2_FLAGS if want else ())
    monkeypatch.setenv("SEQFUSE_CPU_BASELINE", "1")
    assert build._cpu_flags(str(info)) == ()
    assert build._cpu_flags(str(tmp_path / "missing")) == ()


# ---------------------------------------------------------------------------------------------
# kernel variants: one small library per specialization a call needs


def _variant_case(variant, gen):
    """Operands (a, b, c, h0, dt, u) whose call is kernel ``variant``: 2×3 rows, T = 9, N = 4; the
    strided (general) layout stores b (T, N)-transposed."""
    B, D, T, N, dtype = 2, 3, 9, 4, variant.dtype

    def r(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)
    disc, scaled = variant.form == "disc", variant.form != "plain"
    a = -torch.rand(D, 1, N, generator=gen).to(dtype) if disc else (torch.rand(D, 1, N, generator=gen) * 0.6 + 0.4).to(dtype)
    b = r(B, D, T, N) if variant.unit else r(B, D, N, T).transpose(-1, -2)
    c = None if variant.readout is None else r(B, 1, T, N)
    dt = (torch.rand(B, D, T, 1, generator=gen) * 0.5 + 0.05).to(dtype) if disc else None
    u = r(B, D, T, 1) if scaled else None
    return a, b, c, r(B, D, N), dt, u


_RD = {None: None, 0: None, 1: BF16, 2: F16, 3: F32}
VARIANTS = [cpu_scan.Variant(dtype, False, form, readout, unit) for dtype in cpu_scan.KERNEL_DTYPES
            for form in cpu_scan.FORMS for readout in (None, 0, 1, 2, 3) for unit in (True, False)]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: v.name)
def test_every_scan_variant_matches_the_reference(variant):
    """Each variant's forward and backward library (what a call of that dtype, form, readout
    rounding and layout builds and runs: the name says so) against the eager reference in the
    same dtype: y, the final state and every operand's gradient."""
    gen = torch.Generator().manual_seed(VARIANTS.index(variant))
    ops = a, b, c, h0, dt, u = _variant_case(variant, gen)
    rd = _RD[variant.readout]
    views = {k: cpu_scan._as_full(t, cpu_scan._full_shape(a, b, c, h0, dt, u), variant.dtype)
             for k, t in zip(("a", "b", "c", "dt", "u"), (a, b, c, dt, u))}
    assert cpu_scan._unit_layout(views) == variant.unit
    assert cpu_scan.call_variant(dict(zip(("a", "b", "c", "h0", "dt", "u"), ops)), dict(readout_dtype=rd)) == variant
    tol = 1e-5 if variant.dtype == torch.float32 else 1e-11
    for reverse in (False, True):
        y, h = cpu_scan.scan_forward(a, b, c, h0, reverse, dt=dt, u=u, readout_dtype=rd)
        y_ref, h_ref = scan_reference(a, b, c, h0, dt=dt, u=u, reverse=reverse, readout_dtype=rd)
        assert y.dtype == y_ref.dtype and y.shape == y_ref.shape and h.dtype == h_ref.dtype
        assert rel(y, y_ref) < tol and rel(h, h_ref) < tol, (rel(y, y_ref), rel(h, h_ref))
        gy, gh = torch.randn(y.shape, generator=gen).to(y.dtype), torch.randn(h.shape, generator=gen).to(h.dtype)
        grads = cpu_scan.scan_backward(gy, gh, a, b, c, h0, reverse, dt=dt, u=u, readout_dtype=rd)
        _, backward6 = reference_scan.with_discretization(scan_op._reference_forward, scan_op._reference_backward)
        refs = backward6(gy, gh, a, b, c, h0, dt, u,
                         dict(reverse=reverse, algorithm="recurrent", readout_dtype=rd, needs=[True] * 6))
        for name, g, r, t in zip(("a", "b", "c", "h0", "dt", "u"), grads, refs, ops):
            assert (g is None) == (t is None), name
            if t is not None:
                assert g.dtype == t.dtype and g.shape == t.shape, name
                assert rel(g, r) < tol, (name, rel(g, r))
    loaded = {k[0] for k in build._BY_SOURCE}
    assert variant.name in loaded and dataclasses.replace(variant, backward=True).name in loaded


def test_a_call_builds_only_its_variant(fresh_cache):
    """A first call compiles one small library, its variant's, forward then backward; a second call
    of the same variant compiles nothing (and an ssd call builds its own one)."""
    gen = torch.Generator().manual_seed(7)
    variant = cpu_scan.Variant(torch.float32, False, "disc", 0)
    a, b, c, h0, dt, u = _variant_case(variant, gen)
    before = build.compile_count
    y, _ = cpu_scan.scan_forward(a, b, c, None, dt=dt, u=u)
    cpu_scan.scan_forward(a, b * 2, c, None, dt=dt, u=u, reverse=True)
    assert build.compile_count == before + 1
    built = lambda: sorted(p.name.split("-")[0] for p in (fresh_cache / "cpu_kernels").glob("*.so"))  # noqa: E731
    assert built() == ["scan_f32_fwd_disc_readout"]
    cpu_scan.scan_backward(torch.ones_like(y), None, a, b, c, None, dt=dt, u=u)
    assert built() == ["scan_f32_bwd_disc_readout", "scan_f32_fwd_disc_readout"]
    assert build.compile_count == before + 2
    x, bc = torch.randn(1, 4, 2, 3), torch.randn(1, 4, 2, 5)
    cpu_ssd.ssd_forward(x, bc, bc, None, None, None, decay="none")
    assert built() == ["scan_f32_bwd_disc_readout", "scan_f32_fwd_disc_readout", "ssd_f32_fwd_none"]


def _scan_with_readout(a, b, c):  # h_t = a_t·h_{t-1} + b_t, y_t = Σ_n c_t·h_t -> seqfuse.scan with a readout
    h = torch.zeros_like(b[:, 0])
    ys = []
    for t in range(a.shape[1]):
        h = a[:, t] * h + b[:, t]
        ys.append((h * c[:, t]).sum(-1))
    return torch.stack(ys, 1)


def _selective_scan_with_readout(a, b, c):
    from torch.utils.checkpoint import checkpoint
    from helpers import selective_checkpointing
    return checkpoint(_scan_with_readout, a, b, c, use_reentrant=False, context_fn=selective_checkpointing)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("region", [False, True])
def test_compile_prefetches_exactly_the_graphs_variants(fresh_cache, grad, region):
    """The backend builds, while the rest of the graph compiles, only the variants the lowered graph's
    ops call (fp32, plain form, readout, unit layout; the backward too where an operand requires
    grad) -- and the call then compiles nothing more.  ``region``: the scan sits in a selective
    checkpoint region's body, a subgraph of the lowered graph."""
    import seqfuse
    from seqfuse.compiler import backend
    from seqfuse.lowering.cpu import graph_variants

    a, b, c = torch.rand(2, 6, 3), torch.randn(2, 6, 3), torch.randn(2, 6, 3)
    a.requires_grad_(grad)
    seen = []
    real_prefetch = backend.prefetch_cpu_kernels

    def prefetch(report, inputs, runtime, gm=None):
        seen.append(graph_variants(gm, inputs))
        thread = real_prefetch(report, inputs, runtime, gm)
        thread.join(timeout=300)
        return thread
    torch._dynamo.reset()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(backend, "prefetch_cpu_kernels", prefetch)
        report = seqfuse.explain(_selective_scan_with_readout if region else _scan_with_readout, a, b, c,
                                 options={"downstream": "eager"})
    assert report.count("scan") == 1, str(report)
    fwd = cpu_scan.Variant(torch.float32, False, "plain", 0)
    want = [fwd, dataclasses.replace(fwd, backward=True)] if grad else [fwd]
    assert seen == [{"scan": want, "ssd": []}]
    built = sorted(p.name.split("-")[0] for p in (fresh_cache / "cpu_kernels").glob("*.so"))
    assert built == sorted(v.name for v in want)
    assert report.runtime["scan"]["cpu"] == 1
    torch._dynamo.reset()
