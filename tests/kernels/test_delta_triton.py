"""The triton chunked forward of seqfuse.delta (gate none / scalar / vector) against the recurrent reference.

Without CUDA the kernel runs on CPU tensors through the Triton interpreter (TRITON_INTERPRET=1,
set per test by conftest.py) at tiny shapes that still cross several chunks (BLOCK_T = 16) and
value blocks (BLOCK_V = 16); the offline test compiles it for sm_90.  Errors are relative RMS
errors against the fp32 recurrence with the shared fixed per-dtype bounds (kernel_checks.py).
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


@pytest.mark.parametrize("gate", ["scalar", "vector"])
def test_the_op_runs_the_kernel_forward_and_the_reference_backward(gate):
    import seqfuse
    import seqfuse.lowering.delta_op  # noqa: F401  (registers the op and its paths)
    ops = [x.requires_grad_() for x in _operands(1, 20, 2, 8, 16, torch.float32, gate)]
    seqfuse.reset_counters()
    y, h = torch.ops.seqfuse.delta(*ops, gate, 0.5, 64, "chunked", "triton")
    assert seqfuse.counters()["delta"]["triton"] == 1
    gy, gh = torch.randn_like(y), torch.randn_like(h)
    grads = torch.autograd.grad((y * gy).sum() + (h * gh).sum(), ops)
    leaves = [x.detach().double().requires_grad_() for x in ops]
    yr, hr = delta_recurrent(*leaves, gate=gate, scale=0.5)
    ref = torch.autograd.grad((yr * gy.double()).sum() + (hr * gh.double()).sum(), leaves)
    assert_close("y", y, yr, 1e-5)
    for name, got, want in zip(("dq", "dk", "dv", "dbeta", "dg", "dh0"), grads, ref):
        assert_close(name, got, want, 1e-5)


def test_refusals_name_the_reason():
    ops = _operands(1, 8, 1, 8, 8, torch.float32, "scalar")
    t = dict(zip(("q", "k", "v", "beta", "g", "h0"), ops))
    a = dict(gate="scalar", scale=1.0, chunk=64, algorithm="chunked")
    assert "recurrent" in tdelta.supports(t, dict(a, algorithm="recurrent"))
    vec = dict(t, g=torch.zeros(1, 8, 1, 8))
    assert tdelta.supports(vec, dict(a, gate="vector")) is None
    assert "shapes" in tdelta.supports(t, dict(a, gate="vector"))       # a per-head g for gate="vector"
    nan = dict(t, v=t["v"].clone().fill_(math.nan))
    assert "NaN or inf" in tdelta.supports(nan, a)


_OFFLINE_COMPILE = r"""
import os
os.environ.pop("TRITON_INTERPRET", None)
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from seqfuse.lowering.triton import delta_kernels as K
assert not K.INTERPRETED
PTR = dict(Q="bf16", K="bf16", V="bf16", BETA="bf16", G="fp32", H0="fp32", Y="bf16", HT="bf16")
fn = K.delta_chunked_fwd
for gate in (1, 2):  # scalar, vector
    consts = dict(GATE=gate, HAS_H0=True, BLOCK_T=32, BLOCK_K=128, BLOCK_V=64, DOT_PRECISION="tf32x3")
    sig = {n: "constexpr" if n in consts else "*" + PTR[n] if n in PTR else "fp32" if n == "scale" else "i32"
           for n in fn.arg_names}
    kernel = compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                     options=dict(num_warps=4, num_stages=1))
    assert ".entry " + fn.__name__ in kernel.asm["ptx"]
print("compiled")
"""


def test_kernel_compiles_for_a_gpu_without_one(tmp_path):
    compile_offline(_OFFLINE_COMPILE, tmp_path)
