"""The triton recurrent forward and backward of seqfuse.delta (the step loop: the plain rule and the
generalized step with a read key p, an erase key e, read="previous") against the fp64 recurrence.

Without CUDA the kernels run on CPU tensors through the Triton interpreter (TRITON_INTERPRET=1, set
per test by conftest.py) at tiny shapes that still cross several checkpoint chunks (CHUNK = ⌊√T⌋,
the last one ragged) and value blocks (BLOCK_V = 16); the offline test compiles them for sm_90 and
counts register spills.  Errors are relative RMS errors against the fp64 recurrence with the shared
fixed per-dtype bounds (kernel_checks.py).
"""
import math

import pytest
import torch

triton = pytest.importorskip("triton")

from kernel_checks import BOUND, DEVICE, IGNORE_NDIM_WARNING, assert_close, compile_offline  # noqa: E402
from seqfuse.lowering.reference.delta import delta_recurrent  # noqa: E402
from seqfuse.lowering.triton import delta as tdelta, delta_recurrent as rdelta  # noqa: E402

pytestmark = [IGNORE_NDIM_WARNING]

NAMES = ("q", "k", "v", "beta", "g", "h0", "p", "e")


def _operands(B, T, H, K, V, gate, keys=(), h0=True, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    unit = lambda: torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)  # noqa: E731
    ops = dict(q=torch.randn(B, T, H, K, generator=gen), k=unit(), v=torch.randn(B, T, H, V, generator=gen),
               beta=torch.rand(B, T, H, generator=gen),
               g={"none": None, "scalar": -torch.rand(B, T, H, generator=gen) * 2,
                  "vector": -torch.rand(B, T, H, K, generator=gen) * 2}[gate],
               h0=torch.randn(B, H, K, V, generator=gen) if h0 else None,
               p=unit() if "p" in keys else None, e=unit() if "e" in keys else None)
    return [None if ops[n] is None else ops[n].to(DEVICE, dtype) for n in NAMES]


def _attrs(gate, read="decayed", scale=0.7, needs=None):
    a = dict(gate=gate, scale=scale, chunk=64, algorithm="recurrent", read=read)
    if needs is not None:
        a["needs"] = needs
    return a


def _reference(ops, gate, read, scale, gy, gh):
    """fp64 (y, h, grads) through the recurrence (grads None for a None operand)."""
    leaves = [None if x is None else x.detach().double().requires_grad_() for x in ops]
    y, h = delta_recurrent(*leaves[:6], gate=gate, scale=scale, p=leaves[6], e=leaves[7], read=read)
    given = [x for x in leaves if x is not None]
    grads = iter(torch.autograd.grad((y * gy.double()).sum() + (h * gh.double()).sum(), given))
    return y, h, [None if x is None else next(grads) for x in leaves]


# every flag of the step appears with each gate, both reads and both dtypes at least once
CASES = [("none", (), "decayed", torch.float32),          # DeltaNet decoding
         ("scalar", (), "decayed", torch.bfloat16),       # Gated DeltaNet
         ("vector", (), "previous", torch.float32),
         ("scalar", ("p",), "decayed", torch.float32),    # Comba, GDN-2
         ("vector", ("e",), "previous", torch.bfloat16),
         ("none", ("p", "e"), "previous", torch.float32),
         ("vector", ("p", "e"), "previous", torch.float32),   # RWKV-7
         ("scalar", ("e",), "decayed", torch.float32)]     # IPLR


@pytest.mark.parametrize("gate,keys,read,dtype", CASES)
def test_forward_and_backward_match_the_recurrence(gate, keys, read, dtype):
    # T = 13: checkpoint chunks of 3 (the last one of 1 step); V = 20: two value blocks of 16; K = 8 < BLOCK_K
    B, T, H, K, V = 2, 13, 2, 8, 20
    ops = _operands(B, T, H, K, V, gate, keys, dtype=dtype)
    a = _attrs(gate, read, needs=[x is not None for x in ops])
    assert tdelta.supports(dict(zip(NAMES, ops)), a) is None
    y, h = tdelta._impl_forward(*ops, a)
    assert y.dtype == dtype and h.dtype == dtype and y.shape == (B, T, H, V) and h.shape == (B, H, K, V)
    gen = torch.Generator().manual_seed(1)
    gy = torch.randn(B, T, H, V, generator=gen).to(DEVICE, dtype)
    gh = torch.randn(B, H, K, V, generator=gen).to(DEVICE, dtype)
    yr, hr, want = _reference(ops, gate, read, 0.7, gy, gh)
    assert_close("y", y, yr, BOUND[dtype])
    assert_close("h", h, hr, BOUND[dtype])
    got = tdelta._impl_backward(gy, gh, *ops, a)
    for name, x, gr, w in zip(NAMES, ops, got, want):
        if x is None:
            assert gr is None, name
            continue
        assert gr.dtype == x.dtype and gr.shape == x.shape, name
        assert_close("d" + name, gr, w, BOUND[dtype])


def test_strided_views_strong_decay_and_one_step():
    # p a transposed view, v a slice, h0 a permuted copy; log-decays down to -60 (e^g underflows to 0);
    # T = 1 (one token of decoding: one chunk of one step)
    B, T, H, K, V = 1, 11, 3, 16, 24
    ops = _operands(B, T, H, K, V, "vector", ("p", "e"))
    ops[4] = ops[4] * 30.0
    ops[6] = ops[6].transpose(1, 2).contiguous().transpose(1, 2)
    ops[2] = torch.randn(B, T, H, 2 * V).to(DEVICE)[..., ::2]
    ops[5] = ops[5].permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)
    assert not (ops[2].is_contiguous() or ops[5].is_contiguous() or ops[6].is_contiguous())
    for T_ in (T, 1):
        cut = [x if name == "h0" else x[:, :T_] for name, x in zip(NAMES, ops)]
        a = _attrs("vector", "previous", needs=[True] * 8)
        gy, gh = torch.randn(B, T_, H, V).to(DEVICE), torch.randn(B, H, K, V).to(DEVICE)
        yr, hr, want = _reference(cut, "vector", "previous", 0.7, gy, gh)
        y, h = rdelta.forward(*cut, a)
        assert_close("y", y, yr, BOUND[torch.float32])
        assert_close("h", h, hr, BOUND[torch.float32])
        for name, gr, w in zip(NAMES, rdelta.backward(gy, gh, *cut, a), want):
            assert_close("d" + name, gr, w, BOUND[torch.float32])


def test_the_op_runs_the_kernels_forward_and_backward_and_only_the_gradients_asked_for():
    import seqfuse
    import seqfuse.lowering.delta_op  # noqa: F401  (registers the op and its paths)
    ops = _operands(1, 9, 2, 8, 16, "scalar", ("p", "e"))
    q, k, v, beta, g, h0, p, e = ops
    leaves = [x.clone().requires_grad_() for x in (k, beta, p)]      # dk, dbeta, dp only
    seqfuse.reset_counters()
    y, h = torch.ops.seqfuse.delta(q, leaves[0], v, leaves[1], g, h0, "scalar", 0.5, 64, "recurrent", "triton",
                                   False, leaves[2], e, "previous")
    assert seqfuse.counters()["delta"]["triton"] == 1
    gy, gh = torch.randn_like(y), torch.randn_like(h)
    grads = torch.autograd.grad((y * gy).sum() + (h * gh).sum(), leaves)
    assert seqfuse.counters()["delta_backward"]["triton"] == 1
    yr, _, want = _reference([q, leaves[0], v, leaves[1], g, h0, leaves[2], e], "scalar", "previous", 0.5, gy, gh)
    assert_close("y", y, yr, BOUND[torch.float32])
    for name, got, w in zip(("dk", "dbeta", "dp"), grads, (want[1], want[3], want[6])):
        assert_close(name, got, w, BOUND[torch.float32])
    a = _attrs("scalar", "previous", scale=0.5, needs=[False, True, False, True, False, False, True, False])
    got = rdelta.backward(gy, gh, *ops, a)
    assert [x is not None for x in got] == a["needs"]


def test_refusals_name_the_reason():
    ops = _operands(1, 8, 1, 8, 8, "scalar", ("p",))
    t = dict(zip(NAMES, ops))
    a = _attrs("scalar")
    assert tdelta.supports(t, a) is None
    assert "read key" in tdelta.supports(t, dict(a, algorithm="chunked"))     # the chunked kernels: plain rule
    assert "NaN or inf" in tdelta.supports(dict(t, p=t["p"].clone().fill_(math.nan)), a)
    assert "NaN or inf" in tdelta.supports(dict(t, g=t["g"].clone().fill_(-math.inf)), a)
    assert "dtype torch.float64" in tdelta.supports(dict(t, e=t["k"].double()), a)
    assert "shapes" in tdelta.supports(dict(t, e=t["k"][..., :4]), a)
    big = _operands(1, 2, 1, rdelta.MAX_K + 1, 4, "scalar")
    assert "key size" in tdelta.supports(dict(zip(NAMES, big)), a)
    assert "gate" in tdelta.supports(t, dict(a, gate="diag"))


_OFFLINE_COMPILE = r"""
import os
os.environ.pop("TRITON_INTERPRET", None)
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from seqfuse.lowering.triton import delta_recurrent as R, delta_recurrent_kernels as K
assert not K.INTERPRETED
F32 = {"G", "H0", "CK", "SCR", "DQ", "DK", "DV", "DB", "DG", "DP", "DE", "DH0"}
PTR = {"Q", "K", "V", "BETA", "P", "E", "Y", "HT", "DY", "DHT"} | F32
def build(fn, consts, warps):
    sig = {n: "constexpr" if n in consts else "*fp32" if n in F32 else "*bf16" if n in PTR else
           "fp32" if n == "scale" else "i32" for n in fn.arg_names}
    kernel = compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                     options=dict(num_warps=warps))
    assert ".entry " + fn.__name__ in kernel.asm["ptx"]
    n = spill_stores(kernel)
    if n is not None:
        print(fn.__name__, consts, "spill stores", n)
for K_, gate, p, e, prev in ((64, 1, False, False, False), (128, 2, True, True, True), (64, 2, False, True, True),
                             (256, 1, True, False, False)):
    block_k, block_v, _, warps = R._layout(K_, 128, 4096)
    flags = dict(GATE=gate, HAS_P=p, HAS_E=e, PREVIOUS=prev, BLOCK_K=block_k, BLOCK_V=block_v)
    for store in (False, True):
        build(K.delta_recurrent_fwd, dict(flags, HAS_H0=True, STORE_STATES=store), warps)
    build(K.delta_recurrent_bwd, flags, warps)
print("compiled")
"""


def test_kernels_compile_for_a_gpu_without_one_and_do_not_spill(tmp_path):
    """The forward alone, the forward keeping checkpoints and the backward, at the GPU layout for
    K = 64, 128, 256 and the flags of the plain rule, Comba and RWKV-7, to PTX; ptxas (bundled with
    triton) counts spills."""
    import re
    out = compile_offline(_OFFLINE_COMPILE, tmp_path)
    spills = [int(n) for n in re.findall(r"spill stores (\d+)", out)]
    assert all(n == 0 for n in spills), out
