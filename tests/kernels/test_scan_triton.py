"""The triton selective-scan kernels (seqfuse.scan) against the eager reference: forward and every
gradient, with and without a readout, c shared through an expand (stride 0), h0, reverse, odd T
(several blocks plus a partial one), fp32 / fp16 / bf16; the discretized form (decay exp(dt·a),
input b·dt·u, formed in the kernels) at Mamba-1's broadcast shapes and others, against an oracle
that materializes them in torch; states rounded to bf16 / fp16 before the readout (readout_dtype,
transformers' Mamba in bf16: h.to(bf16) @ C) against the reference and the eager program; what
``supports`` refuses; and a deliberately wrong kernel config that the checks must catch.

Without CUDA the kernels run on CPU tensors through the Triton interpreter (TRITON_INTERPRET=1,
set per test by conftest.py) at tiny shapes; the ``gpu`` test runs compiled kernels at real shapes.
Errors are relative RMS errors against an fp64 reference with fixed per-dtype bounds.
"""
import pytest
import torch

triton = pytest.importorskip("triton")

from kernel_checks import BOUND, DEVICE, IGNORE_NDIM_WARNING, assert_close, compile_offline, rel_err  # noqa: E402
from seqfuse.lowering.reference.scan import out_dtype, scan_backward_reference, scan_reference  # noqa: E402
from seqfuse.lowering.triton import scan as tscan  # noqa: E402

pytestmark = [IGNORE_NDIM_WARNING]


def make(R, T, N, dtype, *, readout=True, shared_c=False, h0=False):
    """Mamba-1-like operands: a = exp(Δ·A) in (0, 1), b, c, h0; c shared over the last row dim."""
    g = torch.Generator().manual_seed(0)
    a = torch.exp(-torch.rand(*R, T, N, generator=g) * 0.5).to(DEVICE, dtype)
    b = torch.randn(*R, T, N, generator=g).to(DEVICE, dtype)
    c = None
    if readout:
        if shared_c:  # (B, 1, T, N) expanded over channels: stride 0
            c = torch.randn(R[0], 1, T, N, generator=g).to(DEVICE, dtype).expand(*R, T, N)
        else:
            c = torch.randn(*R, T, N, generator=g).to(DEVICE, dtype)
    h = torch.randn(*R, N, generator=g).to(DEVICE, dtype) if h0 else None
    return a, b, c, h


def oracle(a, b, c, h0, dt=None, u=None, reverse=False):
    """(y, h) of the call in torch autograd: the decays exp(a·dt) and inputs b·dt·u materialized."""
    if dt is not None:
        a = torch.exp(a * dt)
    for f in (dt, u):
        if f is not None:
            b = b * f
    return scan_reference(a, b, c, h0, reverse=reverse)


def check(a, b, c, h0, reverse=False, grads=True, bound=None, dt=None, u=None):
    """The triton forward and backward (every gradient) of one call against :func:`oracle` on fp64
    copies of the operands."""
    attrs = dict(reverse=reverse, algorithm="chunked")
    ops = [a, b, c, h0, dt, u]
    names = ("a", "b", "c", "h0", "dt", "u")
    reason = tscan.supports(dict(zip(names, ops)), attrs)
    assert reason is None, reason
    dtype = a.dtype
    bound = bound or BOUND[dtype]
    leaves = [x.detach().double().requires_grad_(True) if x is not None else None for x in ops]
    ry, rh = oracle(*leaves, reverse=reverse)
    y, h = tscan.forward(a, b, c, h0, dt, u, attrs)
    assert y.dtype == dtype and h.dtype == dtype
    for name, got, ref in (("y", y, ry), ("h", h, rh)):
        assert_close(name, got, ref, bound)
    if not grads:
        return
    gy = torch.randn(ry.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    gh = torch.randn(rh.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE, dtype)
    needs = [x is not None for x in ops]
    wanted = [x for x in leaves if x is not None]
    ref_grads = iter(torch.autograd.grad((ry, rh), wanted, (gy.double(), gh.double())))
    got = tscan.backward(gy, gh, a, b, c, h0, dt, u, dict(attrs, needs=needs))
    assert len(got) == 6
    for name, x, gx in zip(names, ops, got):
        if x is None:
            assert gx is None, name
            continue
        r = next(ref_grads)
        assert gx.shape == x.shape and gx.dtype == x.dtype, f"d{name}: {gx.shape} {gx.dtype}"
        assert_close("d" + name, gx, r, bound)


@pytest.mark.parametrize("readout,shared_c,h0,reverse", [
    (True, False, False, False),
    (True, True, True, False),
    (True, True, True, True),
    (False, False, True, False),
    (False, False, False, True),
])
def test_scan_fp32(readout, shared_c, h0, reverse):
    # T = 37: four full blocks of the interpreter's 8 steps and a partial one; N = 12: a partial N block
    check(*make((1, 2), 37, 12, torch.float32, readout=readout, shared_c=shared_c, h0=h0), reverse=reverse)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_scan_low_precision(dtype):
    check(*make((1, 2), 21, 8, dtype, readout=True, shared_c=True, h0=True), reverse=False)


def test_scan_broadcast_a_over_batch():
    # a shared by the batch (Δ·A with Δ per channel only): the stride-0 gradient is summed back
    a, b, c, h0 = make((2, 2), 13, 5, torch.float32, h0=True)
    check(a[:1].expand_as(b), b, c, h0)
    check(a[:1], b, c, h0)


def test_scan_detects_a_wrong_kernel(monkeypatch):
    # a kernel that drops the state carried across blocks must fail the same check
    kern = tscan._kernels()
    orig = kern.scan_fwd_kernel

    class Broken:
        def __getitem__(self, grid):
            def launch(A, B, C, H0, DT, U, Y, HT, T, *args, **kw):
                return orig[grid](A, B, C, H0, DT, U, Y, HT, min(T, kw["BLOCK_T"]), *args, **kw)
            return launch
    monkeypatch.setattr(kern, "scan_fwd_kernel", Broken())
    with pytest.raises(AssertionError, match="relative error|non-finite"):
        check(*make((1, 2), 20, 4, torch.float32), grads=False)


def test_scan_supports_refusals():
    a, b, c, h0 = make((1, 2), 5, 4, torch.float32)
    attrs = dict(reverse=False, algorithm="recurrent")
    assert tscan.supports(dict(a=a, b=b, c=c, h0=None), attrs) is None
    ac = torch.complex(a.float(), a.float())
    assert "complex" in tscan.supports(dict(a=ac, b=b, c=None, h0=None), attrs)
    assert "float64" in tscan.supports(dict(a=a.double(), b=b, c=None, h0=None), attrs)
    big = torch.zeros(1, 2, 5, tscan.MAX_N_READOUT + 1, device=DEVICE)
    assert "N=" in tscan.supports(dict(a=big, b=big, c=big, h0=None), attrs)


def test_scan_refused_without_interpreter(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CUDA tensors run compiled kernels")
    monkeypatch.delenv("TRITON_INTERPRET")
    a, b, c, h0 = make((1, 2), 5, 4, torch.float32)
    assert "TRITON_INTERPRET" in tscan.supports(dict(a=a, b=b, c=c, h0=None), dict(reverse=False))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (real shapes, compiled kernels)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scan_gpu_mamba_shapes(dtype):
    # Mamba-1 130m-like: (B, D) rows, T = 2048, N = 16, C shared over channels
    check(*make((2, 768), 2048, 16, dtype, readout=True, shared_c=True, h0=True))
    check(*make((2, 64), 1000, 80, dtype, readout=False, h0=True), reverse=True)
    # a readout over a large state (one program per row: 16x256 tiles, 8 warps)
    check(*make((1, 32), 777, 256, dtype, readout=True, h0=True), reverse=True)
    # the discretized form at Mamba-1 130m's shapes: A (D, 1, N), dt and x (B, D, T, 1), B and C (B, 1, T, N)
    check_mamba(make_mamba(2, 768, 2048, 16, dtype, h0=True, dt_shape=(2, 768, 2048, 1)))


def test_scan_custom_op_runs_triton_path():
    # through torch.ops.seqfuse.scan with runtime="triton": a refusal would warn (turned into an error)
    import importlib
    import warnings

    importlib.import_module("seqfuse.lowering.scan_op")  # registers the op and its paths
    a, b, c, h0 = make((1, 2), 11, 4, torch.float32, shared_c=True, h0=True)
    leaves = [x.detach().clone().requires_grad_(True) for x in (a, b, h0)]
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="seqfuse")
        y, h = torch.ops.seqfuse.scan(leaves[0], leaves[1], c, leaves[2], False, "chunked", "triton")
        (y.square().sum() + h.sum()).backward()
    ref = [x.detach().clone().requires_grad_(True) for x in (a, b, h0)]
    ry, rh = scan_reference(ref[0], ref[1], c, ref[2])
    (ry.square().sum() + rh.sum()).backward()
    assert rel_err(y, ry) < BOUND[torch.float32] and rel_err(h, rh) < BOUND[torch.float32]
    for got, want in zip(leaves, ref):
        assert rel_err(got.grad, want.grad) < BOUND[torch.float32]


def test_scan_layouts():
    # four row dims that do not coalesce (a permuted a), h0 broadcast over rows, a shared over time
    g = torch.Generator().manual_seed(1)
    R = (2, 2, 2, 2)
    b = torch.randn(*R, 6, 3, generator=g).to(DEVICE)
    a = torch.rand(*R, 6, 3, generator=g).to(DEVICE).permute(3, 2, 1, 0, 4, 5)   # row strides reversed
    assert not tscan._Rows(R, [a, b]).ok
    h0 = torch.randn(3, generator=g).to(DEVICE)
    check(a, b, None, h0)
    a_t = torch.rand(*R, 1, 3, generator=g).to(DEVICE)          # stride 0 along T after the expand
    c = torch.randn(*R, 6, 3, generator=g).to(DEVICE)
    check(a_t, b, c, h0, reverse=True)


def test_scan_empty_time():
    a = torch.rand(2, 0, 4, device=DEVICE)
    h0 = torch.randn(2, 4, device=DEVICE)
    y, h = tscan.forward(a, a, None, h0, None, None, dict(reverse=False))
    assert y.shape == (2, 0, 4) and torch.equal(h, h0)


# --- the discretized form: decay exp(dt·a), input b·dt·u, formed in the kernels ----------------

def make_mamba(Bt, D, T, N, dtype, *, readout=True, h0=False, dt_shape=None, u=True, seed=0):
    """Mamba-1's selective-scan operands: a = A (D, 1, N) log-decays (< 0), dt (B, D, T, 1) > 0,
    b = B (B, 1, T, N), u = x (B, D, T, 1), c = C (B, 1, T, N), h0 (B, D, N); ``dt_shape`` another
    shape for dt (None: no dt), ``u`` False: no u."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, lo=None, hi=None):
        x = torch.randn(*shape, generator=g) if lo is None else lo + (hi - lo) * torch.rand(*shape, generator=g)
        return x.to(DEVICE, dtype)

    a = rand(D, 1, N, lo=-1.5, hi=-0.1)
    dt = rand(*dt_shape, lo=0.05, hi=0.6) if dt_shape is not None else None
    b = rand(Bt, 1, T, N)
    x = rand(Bt, D, T, 1) if u else None
    c = rand(Bt, 1, T, N) if readout else None
    h = rand(Bt, D, N) if h0 else None
    return dict(a=a, b=b, c=c, h0=h, dt=dt, u=x)


def check_mamba(ops, reverse=False, bound=None):
    check(ops["a"], ops["b"], ops["c"], ops["h0"], reverse=reverse, bound=bound, dt=ops["dt"], u=ops["u"])


@pytest.mark.parametrize("T,readout,h0,reverse", [
    (37, True, False, False),       # four full blocks of the interpreter's 8 steps and a partial one
    (11, True, True, True),
    (11, False, True, False),
])
def test_scan_discretized_mamba_shapes(T, readout, h0, reverse):
    # N = 12: two N blocks in the backward (dt and x's gradients summed per block, then by the host)
    Bt, D, N = 2, 3, 12
    check_mamba(make_mamba(Bt, D, T, N, torch.float32, readout=readout, h0=h0, dt_shape=(Bt, D, T, 1)),
                reverse=reverse)


@pytest.mark.parametrize("case", ["dt_full", "only_u", "only_dt", "dt_per_channel"])
def test_scan_discretized_other_shapes(case):
    Bt, D, T, N = 2, 2, 11, 5
    if case == "dt_full":           # dt per state entry too: no broadcast to sum in the kernel
        ops = make_mamba(Bt, D, T, N, torch.float32, h0=True, dt_shape=(Bt, D, T, N))
    elif case == "only_u":          # a plain decay in (0, 1), shared over time, with an input factor
        ops = make_mamba(Bt, D, T, N, torch.float32, readout=False, dt_shape=None)
        ops["a"] = torch.exp(ops["a"])
    elif case == "only_dt":         # exp(dt·a), input b·dt with a full b
        ops = make_mamba(Bt, D, T, N, torch.float32, h0=True, dt_shape=(Bt, D, T, 1), u=False)
        ops["b"] = ops["b"].expand(Bt, D, T, N).contiguous()
    else:                           # dt one per (batch, channel): summed over T and N in the kernel
        ops = make_mamba(Bt, D, T, N, torch.float32, dt_shape=(Bt, D, 1, 1))
    check_mamba(ops, reverse=case == "only_u")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_scan_discretized_low_precision(dtype):
    check_mamba(make_mamba(2, 2, 21, 8, dtype, h0=True, dt_shape=(2, 2, 21, 1)))


def test_scan_discretized_is_not_materialized(monkeypatch):
    # the chunked path must form exp(dt·a) and b·dt·u in the kernels, never through discretize()
    def refuse(*args, **kwargs):
        raise AssertionError("the chunked triton path materialized the discretized operands")
    monkeypatch.setattr(tscan, "discretize", refuse)
    check_mamba(make_mamba(1, 2, 9, 4, torch.float32, h0=True, dt_shape=(1, 2, 9, 1)))


def test_scan_discretized_custom_op_runs_triton_path():
    # torch.ops.seqfuse.scan with dt and u, forward and backward on the triton path, no fallback
    import importlib
    import warnings

    import seqfuse
    importlib.import_module("seqfuse.lowering.scan_op")
    ops = make_mamba(2, 3, 13, 6, torch.float32, h0=True, dt_shape=(2, 3, 13, 1))
    order = ("a", "b", "c", "h0", "dt", "u")
    for reverse in (False, True):
        seqfuse.reset_counters()
        leaves = {k: ops[k].detach().clone().requires_grad_(True) for k in order}
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="seqfuse")
            y, h = torch.ops.seqfuse.scan(leaves["a"], leaves["b"], leaves["c"], leaves["h0"], reverse, "chunked",
                                          "triton", leaves["dt"], leaves["u"])
            (y.square().sum() + h.sum()).backward()
        calls = seqfuse.counters()
        assert calls["scan"]["triton"] == 1 and calls["scan_backward"]["triton"] == 1, calls
        assert not seqfuse.fallbacks().get("scan"), seqfuse.fallbacks()
        ref = {k: ops[k].detach().double().requires_grad_(True) for k in order}
        ry, rh = oracle(*(ref[k] for k in order), reverse=reverse)
        (ry.square().sum() + rh.sum()).backward()
        assert_close("y", y, ry, BOUND[torch.float32])
        assert_close("h", h, rh, BOUND[torch.float32])
        for k in order:
            assert leaves[k].grad.shape == ops[k].shape
            assert_close("d" + k, leaves[k].grad, ref[k].grad, BOUND[torch.float32])


def test_scan_discretized_recurrent_forward():
    # "recurrent" runs the decode kernel on materialized decays and inputs, in the promoted dtype
    ops = make_mamba(2, 3, 3, 5, torch.bfloat16, h0=True, dt_shape=(2, 3, 3, 1))
    attrs = dict(reverse=False, algorithm="recurrent")
    assert tscan.supports(ops, attrs) is None
    y, h = tscan.forward(*(ops[k] for k in ("a", "b", "c", "h0", "dt", "u")), attrs)
    ry, rh = oracle(*(ops[k].double() if ops[k] is not None else None for k in ("a", "b", "c", "h0", "dt", "u")))
    assert y.dtype == h.dtype == torch.bfloat16
    assert_close("y", y, ry, BOUND[torch.bfloat16])
    assert_close("h", h, rh, BOUND[torch.bfloat16])


def test_scan_discretized_supports():
    ops = make_mamba(1, 2, 5, 4, torch.float32, dt_shape=(1, 2, 5, 1))
    attrs = dict(reverse=False, algorithm="chunked")
    assert tscan.supports(ops, attrs) is None
    assert "float64" in tscan.supports(dict(ops, dt=ops["dt"].double()), attrs)
    assert "complex" in tscan.supports(dict(ops, u=torch.complex(ops["u"], ops["u"])), attrs)
    assert "broadcast" in tscan.supports(dict(ops, dt=ops["dt"][..., :3, :]), attrs)


# --- states rounded before the readout: readout_dtype (transformers' Mamba in bf16: h.to(bf16) @ C) ----

ORDER = ("a", "b", "c", "h0", "dt", "u")


def eager_rounded(ops, readout_dtype, reverse=False):
    """(y, h) of the program a readout_dtype stands for, in torch autograd: every state (the scan
    without a readout), rounded ``.to(readout_dtype)``, then a matmul with C in
    promote(readout_dtype, c) (bf16 @ bf16 for a bf16 c)."""
    hs, h = scan_reference(ops["a"], ops["b"], None, ops.get("h0"), dt=ops.get("dt"), u=ops.get("u"), reverse=reverse)
    ydt = torch.promote_types(readout_dtype, ops["c"].dtype)
    y = torch.matmul(hs.to(readout_dtype).to(ydt).unsqueeze(-2), ops["c"].to(ydt).unsqueeze(-1))
    return y[..., 0, 0], h


def check_rounded(ops, readout_dtype, reverse=False):
    """The triton forward and backward of a call whose readout reads the states rounded to
    ``readout_dtype``, against the reference (scan_reference with readout_dtype and autograd through
    it; scan_backward_reference without dt, u) on fp32 copies and against :func:`eager_rounded` (c
    in its own dtype), each result within the bound of its dtype.  Returns the names of the results
    where the check can tell a kernel that does not round: the unrounded reference is off by more
    than the bound."""
    attrs = dict(reverse=reverse, algorithm="chunked", readout_dtype=readout_dtype)
    args = [ops.get(k) for k in ORDER]
    assert tscan.supports(dict(zip(ORDER, args)), attrs) is None
    y, h = tscan.forward(*args, attrs)
    assert y.dtype == torch.promote_types(readout_dtype, ops["c"].dtype) and h.dtype == out_dtype(*args)
    g = torch.Generator().manual_seed(2)
    gy = torch.randn(y.shape, generator=g).to(DEVICE, y.dtype)
    gh = torch.randn(h.shape, generator=g).to(DEVICE, h.dtype)
    grads = tscan.backward(gy, gh, *args, dict(attrs, needs=[x is not None for x in args]))
    got = {"y": y, "h": h, **{"d" + k: gx for k, gx in zip(ORDER, grads) if ops.get(k) is not None}}

    def run(program, own_c=False):
        leaves = {k: ops[k].detach().to(ops[k].dtype if own_c and k == "c" else torch.float32).requires_grad_(True)
                  for k in ORDER if ops.get(k) is not None}
        ry, rh = program(leaves)
        dl = torch.autograd.grad((ry, rh), list(leaves.values()), (gy.to(ry.dtype), gh.to(rh.dtype)))
        return {"y": ry, "h": rh, **{"d" + k: d for k, d in zip(leaves, dl)}}

    def reference(rd):
        return lambda L: scan_reference(L["a"], L["b"], L["c"], L.get("h0"), dt=L.get("dt"), u=L.get("u"),
                                        reverse=reverse, readout_dtype=rd)
    ref = run(reference(readout_dtype))
    eager = run(lambda L: eager_rounded(L, readout_dtype, reverse), own_c=True)
    plain = run(reference(None))
    if ops.get("dt") is None and ops.get("u") is None:
        f32 = [x.float() if x is not None else None for x in args[:4]]
        written = scan_backward_reference(gy, gh, *f32, reverse=reverse, readout_dtype=readout_dtype)
        ref.update({"d" + k: d for k, d in zip(ORDER, written) if d is not None})
    matters = set()
    for name, x in got.items():
        bound = BOUND[x.dtype]
        assert_close(name, x, ref[name], bound)
        assert_close(name + " vs eager", x, eager[name], bound)
        if rel_err(plain[name], ref[name]) > bound:
            matters.add(name)
    return matters


def fp32_ops(R, T, N, c_dtype, h0=True):
    a, b, c, hh = make(R, T, N, torch.float32, h0=h0)
    return dict(a=a, b=b, c=c.to(c_dtype), h0=hh)


@pytest.mark.parametrize("readout_dtype,c_dtype,reverse", [
    (torch.bfloat16, torch.float32, False),
    (torch.bfloat16, torch.bfloat16, True),
    (torch.float16, torch.float32, True),
], ids=str)
def test_scan_rounded_readout(readout_dtype, c_dtype, reverse):
    # fp32 operands, T = 21: two full blocks of 8 and a partial one
    matters = check_rounded(fp32_ops((1, 2), 21, 8, c_dtype), readout_dtype, reverse=reverse)
    # a kernel that skipped the rounding would fail: y (fp32 with an fp32 c) and dc from the states,
    # da, db, dh0 from the rounded gradient reaching them through the readout
    assert {"da", "db", "dh0"} <= matters, matters
    if c_dtype == torch.float32:
        assert {"y", "dc"} <= matters, matters


@pytest.mark.parametrize("readout_dtype,dtype,T,reverse", [
    (torch.bfloat16, torch.float32, 37, True),      # four full blocks and a partial one
    (torch.float16, torch.float32, 13, False),
    (torch.bfloat16, torch.bfloat16, 13, False),    # transformers' Mamba in bf16
], ids=str)
def test_scan_rounded_readout_discretized(readout_dtype, dtype, T, reverse):
    ops = make_mamba(2, 3, T, 4, dtype, h0=True, dt_shape=(2, 3, T, 1))
    if dtype == torch.float32:
        ops["c"] = ops["c"].to(torch.bfloat16)          # Mamba's C in bf16, the rest in fp32
    matters = check_rounded(ops, readout_dtype, reverse=reverse)
    if dtype == torch.float32:
        assert {"da", "db", "ddt", "du", "dh0"} <= matters, matters


def test_scan_rounded_readout_fp32_is_unrounded():
    # fp32 states rounded to fp32: the plain readout (the kernels' ROUND 0)
    assert tscan.round_code(torch.float32) == tscan.round_code(None) == 0
    a, b, c, h0 = make((1, 2), 9, 4, torch.float32, h0=True)
    y, _ = tscan.forward(a, b, c, h0, None, None, dict(reverse=False, readout_dtype=torch.float32))
    assert_close("y", y, scan_reference(a, b, c, h0)[0], BOUND[torch.float32])


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")   # 3e38, 7e4 to fp16: inf
def test_scan_round_matches_torch(monkeypatch):
    # the kernels' rounding (bf16 on the bits, fp16 by a cast) against torch's casts, ties, specials
    import sys

    import triton.language as tl
    from seqfuse.lowering.triton import scan_kernels as K
    monkeypatch.setattr(sys.modules[__name__], "K", K, raising=False)   # the interpreted kernel's global

    @triton.jit
    def round_kernel(X, Y, n, ROUND: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        x = tl.load(X + offs, mask=offs < n, other=0.0)
        tl.store(Y + offs, K._round(x, ROUND), mask=offs < n)

    one = 1.0
    x = torch.tensor([one + 2 ** -8, one + 3 * 2 ** -8, -(one + 2 ** -8), one + 2 ** -8 + 2 ** -20, 3.0e38, 7.0e4,
                      -0.0, 1e-40, 1e-7, float("inf"), -float("inf"), float("nan")], device=DEVICE)
    x = torch.cat([x, torch.randn(52, generator=torch.Generator().manual_seed(4)).to(DEVICE) * 100])
    for code, dtype in ((K.ROUND_BF16, torch.bfloat16), (K.ROUND_FP16, torch.float16)):
        y = torch.empty_like(x)
        round_kernel[(1,)](x, y, x.numel(), ROUND=code, BLOCK=64)
        want = x.to(dtype).float()
        assert torch.equal(y.isnan(), want.isnan()), dtype
        assert torch.equal(y[~want.isnan()], want[~want.isnan()]), (dtype, y, want)


def test_scan_rounded_readout_custom_op_runs_triton_path():
    # torch.ops.seqfuse.scan(..., readout_dtype=bf16) with dt and u: forward and backward on the
    # triton path (no fallback), against the eager program h.to(bf16) @ C
    import importlib
    import warnings

    import seqfuse
    importlib.import_module("seqfuse.lowering.scan_op")
    ops = make_mamba(2, 3, 11, 4, torch.float32, h0=True, dt_shape=(2, 3, 11, 1))
    ops["c"] = ops["c"].to(torch.bfloat16)
    g = torch.Generator().manual_seed(5)
    wy, wh = torch.randn(2, 3, 11, generator=g).to(DEVICE), torch.randn(2, 3, 4, generator=g).to(DEVICE)

    def loss(y, h):   # linear in y: the same gradient reaches both programs (a square's would differ
        return (y.float() * wy).sum() + (h * wh).sum()   # where their bf16 y do by an ulp)
    seqfuse.reset_counters()
    leaves = {k: ops[k].detach().clone().requires_grad_(True) for k in ORDER}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="seqfuse")
        y, h = torch.ops.seqfuse.scan(leaves["a"], leaves["b"], leaves["c"], leaves["h0"], False, "chunked", "triton",
                                      leaves["dt"], leaves["u"], torch.bfloat16)
        loss(y, h).backward()
    calls = seqfuse.counters()
    assert calls["scan"]["triton"] == 1 and calls["scan_backward"]["triton"] == 1, calls
    assert not seqfuse.fallbacks().get("scan"), seqfuse.fallbacks()
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    ref = {k: ops[k].detach().clone().requires_grad_(True) for k in ORDER}
    ry, rh = eager_rounded(ref, torch.bfloat16)
    loss(ry, rh).backward()
    assert_close("y", y, ry, BOUND[torch.bfloat16])
    assert_close("h", h, rh, BOUND[torch.float32])
    for k in ORDER:
        assert_close("d" + k, leaves[k].grad, ref[k].grad, BOUND[ops[k].dtype])


_OFFLINE_COMPILE = r"""
import os
os.environ.pop("TRITON_INTERPRET", None)
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from seqfuse.lowering.triton import scan as S, scan_kernels as K
assert not K.INTERPRETED
F32 = {"CKPT", "DA", "DB", "DC", "DH0", "DDT", "DU"}
PTR = {"A", "B", "C", "H0", "DT", "U", "Y", "HT", "DY", "DHT"} | F32
def build(fn, consts, warps):
    sig = {n: "constexpr" if n in consts else "*fp32" if n in F32 else "*bf16" if n in PTR else "i32"
           for n in fn.arg_names}
    kernel = compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                     options=dict(num_warps=warps))
    assert ".entry " + fn.__name__ in kernel.asm["ptx"]
    n = spill_stores(kernel)
    if n is not None:
        print(fn.__name__, consts, "spill stores", n)
flags = dict(HAS_C=True, HAS_H0=True, REVERSE=True)
for has in (False, True):
    disc = dict(HAS_DT=has, HAS_U=has)
    for N in ((16, 256) if has else ()):                # with a readout: all of N in one program
        cfg = S._launch(N, True)
        build(K.scan_fwd_kernel, dict(flags, **disc, BLOCK_T=cfg["BLOCK_T"], BLOCK_N=cfg["BLOCK_N"],
                                      ROUND=K.ROUND_NONE), cfg["num_warps"])
    needs = dict(NEED_DA=True, NEED_DB=True, NEED_DC=True, NEED_DH0=True, NEED_DDT=has, NEED_DU=has)
    # Mamba's A summed over time, dt over N, u over both (a gradient to every buffer layout)
    sums = dict(SUM_A=K.SUM_T, SUM_B=0, SUM_C=0, SUM_DT=K.SUM_N, SUM_U=K.SUM_N | K.SUM_T)
    for N in (16, 32):
        cfg = S._launch(N, False, discretized_backward=has)
        build(K.scan_bwd_kernel, dict(flags, **disc, **needs, **sums, BLOCK_T=cfg["BLOCK_T"],
                                      BLOCK_N=cfg["BLOCK_N"], ROUND=K.ROUND_NONE), cfg["num_warps"])
# states rounded before the readout (readout_dtype): bf16 on the bits, fp16 by a cast
disc = dict(HAS_DT=True, HAS_U=True)
needs = dict(NEED_DA=True, NEED_DB=True, NEED_DC=True, NEED_DH0=True, NEED_DDT=True, NEED_DU=True)
for rnd in (K.ROUND_BF16, K.ROUND_FP16):
    cfg = S._launch(16, True)
    build(K.scan_fwd_kernel, dict(flags, **disc, ROUND=rnd, BLOCK_T=cfg["BLOCK_T"], BLOCK_N=cfg["BLOCK_N"]),
          cfg["num_warps"])
    cfg = S._launch(16, False, discretized_backward=True)
    build(K.scan_bwd_kernel, dict(flags, **disc, **needs, **sums, ROUND=rnd, BLOCK_T=cfg["BLOCK_T"],
                                  BLOCK_N=cfg["BLOCK_N"]), cfg["num_warps"])
from seqfuse.lowering.triton import decode as D, decode_kernels as DK
block_r, block_n, warps = D._scan_launch(4096, 16, True)
build(DK.scan_decode_kernel, dict(HAS_C=True, HAS_H0=True, REVERSE=False, ROUND=K.ROUND_BF16, BLOCK_R=block_r,
                                  BLOCK_N=block_n), warps)
print("compiled")
"""


def test_scan_kernels_compile_for_a_gpu_without_one(tmp_path):
    """The interpreter runs the kernels as Python; this compiles them for sm_90 (the discretized
    forward at N = 16 and 256 with a readout, the backward with and without dt and u, every gradient
    and every summed layout, at the GPU launch configs; both with the states rounded to bf16 and fp16
    before the readout, and the decode kernel with bf16 rounding) down to PTX, and with ptxas (bundled with
    triton) checks that they do not spill registers."""
    import re
    out = compile_offline(_OFFLINE_COMPILE, tmp_path)
    # ptxas -v, sm_90, triton 3.6: no spill stores for any of these (the discretized backward needs
    # its 8 warps from 1024-element tiles: at 4 warps the (64, 16) tile spills 160 bytes)
    spills = [int(n) for n in re.findall(r"spill stores (\d+)", out)]
    assert all(n <= 64 for n in spills), out
