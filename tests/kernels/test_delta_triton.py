"""The triton chunked forward and backward of seqfuse.delta (gate none / scalar / vector) against the recurrence.

Without CUDA the kernel runs on CPU tensors through the Triton interpreter (TRITON_INTERPRET=1,
set per test by conftest.py) at tiny shapes that still cross several chunks (BLOCK_T = 16) and
value blocks (BLOCK_V = 16); the offline test compiles it for sm_90.  Errors are relative RMS
errors against the fp32 recurrence (gradients: fp64 autograd through it) with the shared fixed
per-dtype bounds (kernel_checks.py).
"""
import math

import pytest
import torch

triton = pytest.importorskip("triton")

from kernel_checks import BOUND, DEVICE, IGNORE_NDIM_WARNING, assert_close, compile_offline  # noqa: E402
from seqfuse.lowering.reference.delta import delta_recurrent  # noqa: E402
from seqfuse.lowering.triton import delta as tdelta  # noqa: E402

pytestmark = [IGNORE_NDIM_WARNING]


def _operands(B, T, H, K, V, dtype, gate, h0=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=g)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
    v = torch.randn(B, T, H, V, generator=g)
    beta = torch.rand(B, T, H, generator=g)
    gg = {"none": None, "scalar": -torch.rand(B, T, H, generator=g) * 3,
          "vector": -torch.rand(B, T, H, K, generator=g) * 3}[gate]
    s0 = torch.randn(B, H, K, V, generator=g) if h0 else None
    return tuple(None if x is None else x.to(DEVICE, dtype) for x in (q, k, v, beta, gg, s0))


@pytest.mark.parametrize("gate", ["none", "scalar", "vector"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,T,H,K,V,h0", [(2, 37, 2, 8, 20, True), (1, 16, 1, 16, 16, False), (1, 5, 3, 4, 33, True)])
def test_forward_matches_the_recurrence(gate, dtype, B, T, H, K, V, h0):
    ops = _operands(B, T, H, K, V, dtype, gate, h0)
    a = dict(gate=gate, scale=0.7, chunk=64, algorithm="chunked")
    t = dict(zip(("q", "k", "v", "beta", "g", "h0"), ops))
    assert tdelta.supports(t, a) is None
    y, h = tdelta.forward(*ops, a)
    assert y.dtype == dtype and h.dtype == dtype and y.shape == (B, T, H, V) and h.shape == (B, H, K, V)
    yr, hr = delta_recurrent(*(None if x is None else x.float() for x in ops), gate=gate, scale=0.7)
    assert_close("y", y, yr, BOUND[dtype])
    assert_close("h", h, hr, BOUND[dtype])


@pytest.mark.parametrize("gate", ["scalar", "vector"])
def test_strong_decay_does_not_overflow(gate):
    ops = list(_operands(1, 40, 2, 8, 16, torch.float32, gate))
    ops[4] = ops[4] * 40.0  # log-decays down to -120 per step: e^{γ} underflows, no exponent grows
    a = dict(gate=gate, scale=1.0, chunk=64, algorithm="chunked")
    y, h = tdelta.forward(*ops, a)
    yr, hr = delta_recurrent(*ops, gate=gate)
    assert_close("y", y, yr, BOUND[torch.float32])
    assert_close("h", h, hr, BOUND[torch.float32])


@pytest.mark.parametrize("gate", ["none", "scalar", "vector"])
def test_the_op_runs_the_kernels_forward_and_backward(gate):
    import seqfuse
    import seqfuse.lowering.delta_op  # noqa: F401  (registers the op and its paths)
    ops = [None if x is None else x.requires_grad_() for x in _operands(1, 20, 2, 8, 16, torch.float32, gate)]
    given = [x for x in ops if x is not None]
    seqfuse.reset_counters()
    y, h = torch.ops.seqfuse.delta(*ops, gate, 0.5, 64, "chunked", "triton")
    assert seqfuse.counters()["delta"]["triton"] == 1
    gy, gh = torch.randn_like(y), torch.randn_like(h)
    grads = torch.autograd.grad((y * gy).sum() + (h * gh).sum(), given)
    assert seqfuse.counters()["delta_backward"]["triton"] == 1
    ref = [w for w in _reference_grads(ops, gy, gh, gate, 0.5) if w is not None]
    yr, _ = delta_recurrent(*(None if x is None else x.detach().double() for x in ops), gate=gate, scale=0.5)
    assert_close("y", y, yr, 1e-5)
    names = [n for n, x in zip(_GRAD_NAMES, ops) if x is not None]
    for name, got, want in zip(names, grads, ref):
        assert_close(name, got, want, 1e-5)


def _reference_grads(ops, gy, gh, gate, scale):
    """fp64 autograd gradients of Σ y·gy + Σ h·gh through the recurrence (None for a None operand)."""
    leaves = [None if x is None else x.detach().double().requires_grad_() for x in ops]
    yr, hr = delta_recurrent(*leaves, gate=gate, scale=scale)
    given = [x for x in leaves if x is not None]
    grads = iter(torch.autograd.grad((yr * gy.double()).sum() + (hr * gh.double()).sum(), given))
    return [None if x is None else next(grads) for x in leaves]


_GRAD_NAMES = ("dq", "dk", "dv", "dbeta", "dg", "dh0")


@pytest.mark.parametrize("gate", ["none", "scalar", "vector"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,T,H,K,V,h0", [(2, 37, 2, 8, 20, True), (1, 5, 3, 4, 33, False)])
def test_backward_matches_the_recurrence(gate, dtype, B, T, H, K, V, h0):
    # T = 37: three chunks of 16, the last ragged; V = 20 / 33: two / three value blocks of 16
    ops = _operands(B, T, H, K, V, dtype, gate, h0)
    gen = torch.Generator().manual_seed(1)
    gy = torch.randn(B, T, H, V, generator=gen).to(DEVICE, dtype)
    gh = torch.randn(B, H, K, V, generator=gen).to(DEVICE, dtype)
    a = dict(gate=gate, scale=0.7, chunk=64, algorithm="chunked", needs=[x is not None for x in ops])
    assert tdelta.supports(dict(zip(("q", "k", "v", "beta", "g", "h0"), ops)), a) is None
    got = tdelta.backward(gy, gh, *ops, a)
    want = _reference_grads(ops, gy, gh, gate, 0.7)
    for name, x, gr, w in zip(_GRAD_NAMES, ops, got, want):
        if x is None:
            assert gr is None, name
            continue
        assert gr.dtype == dtype and gr.shape == x.shape, name
        assert_close(name, gr, w, BOUND[dtype])


@pytest.mark.parametrize("gate", ["scalar", "vector"])
def test_backward_strong_decay_and_needs_subset(gate):
    ops = list(_operands(1, 40, 2, 8, 16, torch.float32, gate))
    ops[4] = ops[4] * 40.0  # log-decays down to -120 per step
    gen = torch.Generator().manual_seed(2)
    gy, gh = torch.randn(1, 40, 2, 16, generator=gen), torch.randn(1, 2, 8, 16, generator=gen)
    want = _reference_grads(ops, gy, gh, gate, 1.0)
    needs = [False, True, False, True, True, False]
    a = dict(gate=gate, scale=1.0, chunk=64, algorithm="chunked", needs=needs)
    got = tdelta.backward(gy, gh, *ops, a)
    for name, n, gr, w in zip(_GRAD_NAMES, needs, got, want):
        if not n:
            assert gr is None, name
        else:
            assert_close(name, gr, w, BOUND[torch.float32])


def test_refusals_name_the_reason():
    ops = _operands(1, 8, 1, 8, 8, torch.float32, "scalar")
    t = dict(zip(("q", "k", "v", "beta", "g", "h0"), ops))
    a = dict(gate="scalar", scale=1.0, chunk=64, algorithm="chunked")
    assert tdelta.supports(t, dict(a, algorithm="recurrent")) is None   # the step-loop kernels (own tests)
    assert "auto" in tdelta.supports(t, dict(a, algorithm="auto"))
    assert "read key" in tdelta.supports(dict(t, p=t["k"]), a)          # the chunked kernels do not read with p,
    assert "erase key" in tdelta.supports(dict(t, e=t["k"]), a)         # erase along e
    assert "previous" in tdelta.supports(t, dict(a, read="previous"))   # or read the state before its decay
    vec = dict(t, g=torch.zeros(1, 8, 1, 8))
    assert tdelta.supports(vec, dict(a, gate="vector")) is None
    assert "shapes" in tdelta.supports(t, dict(a, gate="vector"))       # a per-head g for gate="vector"
    nan = dict(t, v=t["v"].clone().fill_(math.nan))
    assert "NaN or inf" in tdelta.supports(nan, a)
    back = dict(a, needs=[True] * 6)
    assert tdelta.supports(t, back) is None
    assert "NaN or inf" in tdelta.supports(dict(t, k=t["k"].clone().fill_(math.inf)), back)
    assert tdelta.supports(vec, dict(back, gate="vector")) is None


_OFFLINE_COMPILE = r"""
import os
os.environ.pop("TRITON_INTERPRET", None)
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from seqfuse.lowering.triton import delta_kernels as K
assert not K.INTERPRETED
PTR = dict(Q="bf16", K="bf16", V="bf16", BETA="bf16", G="fp32", H0="fp32", Y="bf16", HT="bf16")
PTR.update(ST="fp32", DY="bf16", DHT="bf16", DQ="fp32", DK="fp32", DV="fp32", DB="fp32", DG="fp32", DH0="fp32")
for fn, gate, store in ((K.delta_chunked_fwd, 1, True), (K.delta_chunked_fwd, 2, False),
                        (K.delta_chunked_bwd, 1, None), (K.delta_chunked_bwd, 2, None)):
    consts = dict(GATE=gate, BLOCK_T=32, BLOCK_K=128, BLOCK_V=64, DOT_PRECISION="tf32x3")
    if store is not None:
        consts.update(HAS_H0=True, STORE_STATES=store)
    sig = {n: "constexpr" if n in consts else "*" + PTR[n] if n in PTR else "fp32" if n == "scale" else "i32"
           for n in fn.arg_names}
    kernel = compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                     options=dict(num_warps=4, num_stages=1))
    assert ".entry " + fn.__name__ in kernel.asm["ptx"]
print("compiled")
"""


def test_kernel_compiles_for_a_gpu_without_one(tmp_path):
    compile_offline(_OFFLINE_COMPILE, tmp_path)
