"""The triton chunked-SSD kernel (seqfuse.ssd) against the eager reference: forward for each decay
kind (none / scalar / vector), with the d skip, h0, the final state, odd T (several chunks plus a
partial one), b shared by all heads (stride 0), fp32 / fp16 / bf16; the backward kernels (decay
none / scalar, and vector) directly and through the custom op; what ``supports`` refuses; and
deliberately wrong launches (forward and backward) that the checks must catch.

Without CUDA the kernel runs on CPU tensors through the Triton interpreter (TRITON_INTERPRET=1,
set per test by conftest.py) at tiny shapes; the ``gpu`` tests run it compiled at real shapes.
Errors are relative RMS errors against the fp32 recurrent reference with fixed per-dtype bounds
(kernel_checks.py).
"""
import pytest
import torch

triton = pytest.importorskip("triton")

import kernel_checks  # noqa: E402
from kernel_checks import DEVICE, IGNORE_NDIM_WARNING, assert_close, compile_offline, rel_err  # noqa: E402
from seqfuse.lowering.reference.ssd import ssd_recurrent  # noqa: E402
from seqfuse.lowering.triton import ssd as tssd  # noqa: E402

pytestmark = [IGNORE_NDIM_WARNING]

# this file's fp32 bound is 2e-5 (fp32 tiles go through tf32x3 dots on a GPU, fp32-accurate); the
# fp16 / bf16 bounds are the shared ones
BOUND = {**kernel_checks.BOUND, torch.float32: 2e-5}


def make(B, T, H, P, N, decay, dtype, *, d=False, h0=False, shared_b=False, strong=False):
    """Mamba-2 / GLA-like operands; a is a log-decay <= 0 (``strong``: steps down to -30)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, H, P, generator=g)
    b = torch.randn(B, T, 1 if shared_b else H, N, generator=g) / N ** 0.5
    c = torch.randn(B, T, H, N, generator=g) / N ** 0.5
    scale = 30.0 if strong else 0.5
    a = None
    if decay == "scalar":
        a = -torch.rand(B, T, H, generator=g) * scale
    elif decay == "vector":
        a = -torch.rand(B, T, H, N, generator=g) * scale
    dd = torch.randn(H, generator=g) if d else None
    hh = torch.randn(B, H, P, N, generator=g) if h0 else None
    to = (lambda t: None if t is None else t.to(DEVICE, dtype))
    b = to(b)
    if shared_b:
        b = b.expand(B, T, H, N)
    return to(x), b, to(c), None if a is None else a.to(DEVICE), None if dd is None else dd.to(DEVICE), to(hh)


def check(x, b, c, a, d, h0, decay, bound=None):
    attrs = dict(decay=decay, chunk=16, algorithm="chunked")
    reason = tssd.supports(dict(x=x, b=b, c=c, a=a, d=d, h0=h0), attrs)
    assert reason is None, reason
    dtype = torch.promote_types(torch.promote_types(x.dtype, b.dtype), c.dtype)
    bound = bound or BOUND[dtype]
    f = (lambda t: None if t is None else t.float())
    ry, rh = ssd_recurrent(f(x), f(b), f(c), f(a), f(d), f(h0), decay=decay)
    y, h = tssd.forward(x, b, c, a, d, h0, attrs)
    assert y.dtype == dtype and h.dtype == dtype
    for name, got, ref in (("y", y, ry), ("h", h, rh)):
        assert_close(name, got, ref, bound)


@pytest.mark.parametrize("decay,d,h0", [
    ("none", False, False),
    ("none", True, True),
    ("scalar", False, False),
    ("scalar", True, True),
    ("vector", False, True),
    ("vector", True, False),
])
def test_ssd_forward_fp32(decay, d, h0):
    # T = 37: four chunks of the interpreter's 8 steps and a partial one; P = 12: two P blocks
    check(*make(1, 37, 2, 12, 6, decay, torch.float32, d=d, h0=h0), decay)


@pytest.mark.parametrize("decay", ["scalar", "vector"])
def test_ssd_forward_strong_decay_shared_b(decay):
    # log-decays down to -30 per step: a q·exp(cum) / k·exp(-cum) factoring would overflow in fp32
    check(*make(2, 19, 2, 4, 5, decay, torch.float32, h0=True, shared_b=True, strong=True), decay)


@pytest.mark.parametrize("dtype,decay", [(torch.float16, "scalar"), (torch.bfloat16, "vector"),
                                         (torch.bfloat16, "none")])
def test_ssd_forward_low_precision(dtype, decay):
    check(*make(1, 21, 1, 8, 8, decay, dtype, d=True, h0=True), decay)


def test_ssd_detects_a_wrong_kernel(monkeypatch):
    # a launch that drops the state passed between chunks must fail the same check
    kern = tssd._kernels()
    orig = kern.ssd_chunked_fwd_kernel

    class Broken:
        def __getitem__(self, grid):
            def launch(X, Bm, Cm, A, D, H0, Y, HT, T, *args, **kw):
                y = orig[grid](X, Bm, Cm, A, D, H0, Y, HT, min(T, kw["BLOCK_T"]), *args, **kw)
                Y[:, kw["BLOCK_T"]:] = 0
                return y
            return launch
    monkeypatch.setattr(kern, "ssd_chunked_fwd_kernel", Broken())
    with pytest.raises(AssertionError, match="relative error"):
        check(*make(1, 20, 1, 4, 4, "scalar", torch.float32), "scalar")


def test_ssd_custom_op_forward_and_backward():
    # through torch.ops.seqfuse.ssd with runtime="triton": forward and backward kernels; a refusal
    # or a failing kernel would warn (turned into an error)
    import importlib
    import warnings

    importlib.import_module("seqfuse.lowering.ssd_op")  # registers the op and its paths
    from seqfuse.runtime import counters, reset_counters
    x, b, c, a, d, h0 = make(1, 13, 2, 4, 4, "scalar", torch.float32, d=True, h0=True)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, b, c, a, d, h0)]
    ref = [t.detach().clone().requires_grad_(True) for t in (x, b, c, a, d, h0)]
    reset_counters()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="seqfuse")
        y, h = torch.ops.seqfuse.ssd(*leaves, "scalar", 8, "chunked", "triton")
        (y.square().sum() + h.sum()).backward()
    calls = counters()
    assert calls["ssd"]["triton"] >= 1 and calls["ssd_backward"]["triton"] >= 1, calls
    ry, rh = ssd_recurrent(*ref, decay="scalar")
    (ry.square().sum() + rh.sum()).backward()
    assert rel_err(y, ry) < BOUND[torch.float32] and rel_err(h, rh) < BOUND[torch.float32]
    for name, got, want in zip(("x", "b", "c", "a", "d", "h0"), leaves, ref):
        e = rel_err(got.grad, want.grad)
        assert e < 1e-4, f"d{name}: relative error {e:.3g}"


def test_ssd_supports_refusals():
    x, b, c, a, d, h0 = make(1, 5, 1, 4, 4, "scalar", torch.float32)
    t = dict(x=x, b=b, c=c, a=a, d=None, h0=None)
    ok = dict(decay="scalar", chunk=8, algorithm="chunked")
    assert tssd.supports(t, ok) is None
    assert "algorithm" in tssd.supports(t, dict(ok, algorithm="quadratic"))
    assert "float64" in tssd.supports(dict(t, x=x.double()), ok)
    assert "complex" in tssd.supports(dict(t, x=torch.complex(x, x)), ok)
    big = torch.zeros(1, 5, 1, tssd.MAX_N_VECTOR + 1, device=DEVICE)
    assert "N=" in tssd.supports(dict(t, b=big, c=big, a=big), dict(ok, decay="vector"))
    # the backward kernels: vector decay up to MAX_N_VECTOR (any P); the others up to MAX_PN_BACKWARD
    assert "N=" in tssd.backward_kernel_reason(x, big, big, None, "vector")
    wide = torch.zeros(1, 5, 1, tssd.MAX_PN_BACKWARD + 1, device=DEVICE)
    assert tssd.backward_kernel_reason(wide, b, c, None, "vector") is None
    assert "P=" in tssd.backward_kernel_reason(wide, b, c, None, "scalar")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (real shapes, compiled kernel)")
@pytest.mark.parametrize("decay", ["none", "scalar", "vector"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ssd_gpu_shapes(decay, dtype):
    # Mamba-2-like: T = 1000 (partial last chunk), H = 8, P = 64, N = 64 (vector: GLA-like)
    check(*make(2, 1000, 8, 64, 64, decay, dtype, d=True, h0=True), decay)
    if decay != "vector":  # the N <= 128 config (16x16 tiles); P = 80: a partial P block
        check(*make(1, 333, 4, 80, 128, decay, dtype, h0=True), decay)


def test_ssd_forward_layouts():
    # x a transposed view, b shared by the batch (stride 0), d per (H, P), scalar decay
    x, b, c, a, _, h0 = make(2, 11, 3, 5, 4, "scalar", torch.float32, h0=True)
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)
    d = torch.randn(3, 5, device=DEVICE)
    check(xt, b[:1], c, a, d, h0, "scalar")


def check_backward(x, b, c, a, d, h0, decay, bound=None):
    """The backward kernel's gradients against autograd through the fp32 recurrent reference."""
    assert tssd.backward_kernel_reason(x, b, c, h0, decay) is None
    ops = [x, b, c, a, d, h0]
    dtype = torch.promote_types(torch.promote_types(x.dtype, b.dtype), c.dtype)
    bound = bound or BOUND[dtype]
    leaves = [t.detach().float().requires_grad_(True) if t is not None else None for t in ops]
    ry, rh = ssd_recurrent(*leaves, decay=decay)
    gy, gh = torch.randn_like(ry).to(dtype), torch.randn_like(rh).to(dtype)
    needs = [t is not None for t in ops]
    ref = iter(torch.autograd.grad((ry, rh), [t for t in leaves if t is not None], (gy.float(), gh.float())))
    got = tssd.backward(gy, gh, x, b, c, a, d, h0, dict(decay=decay, chunk=16, algorithm="chunked", needs=needs))
    for name, t, g in zip(("dx", "db", "dc", "da", "dd", "dh0"), ops, got):
        if t is None:
            assert g is None
            continue
        assert g.shape == t.shape and g.dtype == t.dtype, f"{name}: {g.shape} {g.dtype}"
        assert_close(name, g, next(ref), bound)


@pytest.mark.parametrize("decay,d,h0", [("none", True, True), ("scalar", False, False), ("scalar", True, True)])
def test_ssd_backward_kernel_fp32(decay, d, h0):
    check_backward(*make(1, 37, 2, 12, 6, decay, torch.float32, d=d, h0=h0), decay)


def test_ssd_constant_decay_per_head_retnet():
    # RetNet: one decay γ_h per head, the log-decay an expand of (H,) over batch and time (stride 0,
    # never materialized); forward and the backward kernel, whose da sums back to the (H,) base
    x, b, c, _, _, h0 = make(2, 23, 3, 6, 5, "scalar", torch.float32, h0=True)
    gamma = torch.tensor([0.9, 0.97, 0.995], device=DEVICE)
    a = gamma.log().expand(2, 23, 3)
    check(x, b, c, a, None, h0, "scalar")
    check_backward(x, b, c, a, None, h0, "scalar")


def test_ssd_backward_kernel_shared_b_bf16():
    check_backward(*make(2, 19, 2, 4, 5, "scalar", torch.float32, h0=True, shared_b=True), "scalar")
    check_backward(*make(1, 21, 1, 8, 8, "scalar", torch.bfloat16, d=True, h0=True), "scalar")


def test_ssd_backward_detects_a_wrong_kernel(monkeypatch):
    # a launch that skips the first chunk of the adjoint must fail the same check (and the kernel,
    # not the reference, must be what ran)
    kern = tssd._kernels()
    orig = kern.ssd_chunked_bwd_kernel
    launches = []

    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                launches.append(grid)
                args = list(args)
                args[19] -= 1   # NCHUNK
                return orig[grid](*args, **kw)
            return launch
    monkeypatch.setattr(kern, "ssd_chunked_bwd_kernel", Broken())
    with pytest.raises(AssertionError, match="relative error"):
        check_backward(*make(1, 20, 1, 4, 4, "scalar", torch.float32), "scalar")
    assert launches


# --- vector decay (GLA): ssd_vector_bwd_kernel -------------------------------------------

def spy_vector_bwd(monkeypatch, edit=None):
    """Wrap the vector backward kernel: record each launch's grid; ``edit(grid, args, kw)`` may
    return a changed (grid, args) to launch instead (a deliberately wrong kernel)."""
    kern = tssd._kernels()
    orig = kern.ssd_vector_bwd_kernel
    launches = []

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                launches.append(grid)
                g, a = (grid, list(args)) if edit is None else edit(grid, list(args), kw)
                return orig[g](*a, **kw)
            return launch
    monkeypatch.setattr(kern, "ssd_vector_bwd_kernel", Spy())
    return launches


@pytest.mark.parametrize("case", ["fp32", "fp32_strong_shared_b", "fp16", "bf16_strong"])
def test_ssd_backward_kernel_vector(case, monkeypatch):
    launches = spy_vector_bwd(monkeypatch)
    if case == "fp32":
        # T = 37: four chunks of the interpreter's 8 steps and a partial one; P = 12 and N = 6: two
        # P blocks (of 8) and two N blocks (of 4), so the host's sums over blocks are exercised
        check_backward(*make(1, 37, 2, 12, 6, "vector", torch.float32, d=True, h0=True), "vector")
    elif case == "fp32_strong_shared_b":
        # log-decays down to -30 per step (a q·exp(cum) / k·exp(-cum) factoring would overflow);
        # b shared by the heads (stride 0, its gradient summed back); no d
        check_backward(*make(2, 19, 2, 4, 5, "vector", torch.float32, h0=True, shared_b=True, strong=True),
                       "vector")
    else:
        # a in the operands' dtype too; d per (H, P)
        dtype = torch.float16 if case == "fp16" else torch.bfloat16
        x, b, c, a, _, h0 = make(1, 21, 2, 8, 8, "vector", dtype, h0=True, strong=case == "bf16_strong")
        d = torch.randn(2, 8, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
        check_backward(x, b, c, a.to(dtype), d, h0, "vector")
    assert launches, "the vector backward kernel did not run"


@pytest.mark.parametrize("bug", ["drops_grad_h", "one_p_block"])
def test_ssd_vector_backward_detects_a_wrong_kernel(bug, monkeypatch):
    # a launch that ignores ∂L/∂(final state), or that runs only the first P block (so the sums of
    # db, dc, da over the P blocks miss one; outputs zeroed first, so nothing depends on garbage),
    # must fail the same check
    def edit(grid, args, kw):
        if bug == "drops_grad_h":
            args[7] = torch.zeros_like(args[7])          # DHT
            return grid, args
        for out in args[9:15]:                           # DX, DB, DC, DA, DD, DH0
            out.zero_()
        return (grid[0], 1, grid[2]), args
    launches = spy_vector_bwd(monkeypatch, edit)
    with pytest.raises(AssertionError, match="relative error"):
        check_backward(*make(1, 20, 1, 12, 4, "vector", torch.float32, d=True, h0=True), "vector")
    assert launches


def test_ssd_custom_op_vector_backward_runs_the_kernel(monkeypatch):
    # through torch.ops.seqfuse.ssd with runtime="triton" and decay="vector": the backward must be
    # the triton kernel (launched, and counted on the triton path), not the reference's adjoint
    import importlib
    import warnings

    importlib.import_module("seqfuse.lowering.ssd_op")  # registers the op and its paths
    from seqfuse.runtime import counters, reset_counters
    launches = spy_vector_bwd(monkeypatch)
    x, b, c, a, d, h0 = make(1, 13, 2, 4, 4, "vector", torch.float32, d=True, h0=True)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, b, c, a, d, h0)]
    ref = [t.detach().clone().requires_grad_(True) for t in (x, b, c, a, d, h0)]
    reset_counters()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="seqfuse")
        y, h = torch.ops.seqfuse.ssd(*leaves, "vector", 8, "chunked", "triton")
        (y.square().sum() + h.sum()).backward()
    calls = counters()
    assert calls["ssd"]["triton"] >= 1 and calls["ssd_backward"]["triton"] >= 1, calls
    assert len(launches) == 1, launches
    ry, rh = ssd_recurrent(*ref, decay="vector")
    (ry.square().sum() + rh.sum()).backward()
    for name, got, want in zip(("x", "b", "c", "a", "d", "h0"), leaves, ref):
        assert_close("d" + name, got.grad, want.grad, BOUND[torch.float32])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (real shapes, compiled kernel)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ssd_gpu_vector_backward(dtype):
    # GLA-like: T = 1000 (partial last chunk), P = N = 64; then P = 80 (a partial P block), N = 48
    check_backward(*make(2, 1000, 4, 64, 64, "vector", dtype, d=True, h0=True), "vector")
    check_backward(*make(1, 333, 2, 80, 48, "vector", dtype, h0=True), "vector")


_OFFLINE_COMPILE = r"""
import os
os.environ.pop("TRITON_INTERPRET", None)
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from seqfuse.lowering.triton import ssd as S, ssd_kernels as K
assert not K.INTERPRETED
fn = K.ssd_vector_bwd_kernel
block_t, block_p, block_n, warps = S.VECTOR_BWD_GPU_CONFIG
consts = dict(HAS_D=True, HAS_H0=True, PRECISION=S.FP32_DOT_PRECISION, BLOCK_T=block_t, BLOCK_P=block_p,
              BLOCK_N=block_n)
ptr = {"X", "Bm", "Cm", "A", "D", "H0", "DY", "DHT", "CKPT", "DX", "DB", "DC", "DA", "DD", "DH0"}
sig = {n: "constexpr" if n in consts else "*fp32" if n in ptr else "i64" if n.startswith("SPLIT") else "i32"
       for n in fn.arg_names}
kernel = compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                 options=dict(num_warps=warps))
assert ".entry " + fn.__name__ in kernel.asm["ptx"]
n = spill_stores(kernel)
if n is not None:
    print("spill stores", n)
print("compiled")
"""


def test_ssd_vector_backward_compiles_for_a_gpu_without_one(tmp_path):
    """The interpreter runs the kernel as Python; this compiles the vector backward (fp32 operands,
    tf32x3 dots, d and h0: its largest variant) at the GPU launch config for sm_90 down to PTX, and
    with ptxas (bundled with triton) checks its register spills stay small."""
    import re
    out = compile_offline(_OFFLINE_COMPILE, tmp_path)
    spills = re.search(r"spill stores (\d+)", out)
    # ptxas -v, sm_90, this triton: 204 bytes at (16, 64, 16, 8 warps) (564 at BLOCK_N = 32 since the
    # reset-exact log-decay counts; 348 before them); BLOCK_N = 64 spills over 1 KB
    assert spills is None or int(spills.group(1)) <= 512, out

