"""seqfuse.delta: the IR op (printer, verifier), the references (recurrent, chunked WY form) and the
custom op (fake impl, autograd, opcheck) against a plain Python loop oracle in fp64."""
import pytest
import torch
import torch.fx
import torch.nn.functional as F

from seqfuse.ir import IRVerificationError, format_op, verify_op
from seqfuse.ir.ops import OP_CLASSES, Delta
from seqfuse.lowering import delta_op  # noqa: F401  (registers seqfuse::delta)
from seqfuse.lowering.reference.delta import delta_chunked, delta_recurrent
from seqfuse.passes.select import choose_delta


def oracle(q, k, v, beta, g, h0, gate, scale, p=None, e=None, read="decayed"):
    """The delta rule one (batch, head, step) at a time, as the papers write it:
    S ← diag(α)·S, S ← S + k ⊗ β(v − Sᵀk), y = scale·Sᵀq (with a read key p: S ← S + k ⊗ β(v − Sᵀp); with
    an erase key e: S ← S + β k ⊗ v − β e ⊗ Rᵀp, R the decayed state or, read="previous", the one before)."""
    B, T, H, K = k.shape
    V = v.shape[-1]
    S = [[(h0[b, h].clone() if h0 is not None else torch.zeros(K, V, dtype=q.dtype)) for h in range(H)]
         for b in range(B)]
    y = torch.zeros(B, T, H, V, dtype=q.dtype)
    for t in range(T):
        for b in range(B):
            for h in range(H):
                s = prev = S[b][h]
                if gate == "scalar":
                    s = s * g[b, t, h].exp()
                elif gate == "vector":
                    s = s * g[b, t, h].exp()[:, None]
                kk = k[b, t, h]
                pp = kk if p is None else p[b, t, h]
                ee = kk if e is None else e[b, t, h]
                c = (s if read == "decayed" else prev).T @ pp
                s = s + beta[b, t, h] * (torch.outer(kk, v[b, t, h]) - torch.outer(ee, c))
                S[b][h] = s
                y[b, t, h] = scale * (s.T @ q[b, t, h])
    return y, torch.stack([torch.stack(row) for row in S])


def operands(B=2, T=7, H=3, K=4, V=5, gate="scalar", h0=True, dtype=torch.float64, grad=False):
    q = torch.randn(B, T, H, K, dtype=dtype)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, dtype=dtype), dim=-1)
    v = torch.randn(B, T, H, V, dtype=dtype)
    beta = torch.rand(B, T, H, dtype=dtype)
    g = {"none": None, "scalar": -torch.rand(B, T, H, dtype=dtype),
         "vector": -torch.rand(B, T, H, K, dtype=dtype)}[gate]
    s = torch.randn(B, H, K, V, dtype=dtype) if h0 else None
    out = [q, k, v, beta, g, s]
    return [x.requires_grad_(grad) if x is not None else None for x in out]


GATES = ["none", "scalar", "vector"]


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("fn,chunk", [(delta_recurrent, 64), (delta_chunked, 3), (delta_chunked, 64)])
def test_references_equal_the_oracle(gate, fn, chunk):
    ops = operands(gate=gate)
    want = oracle(*ops, gate, 0.5)
    got = fn(*ops, gate=gate, scale=0.5, chunk=chunk)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_chunked_is_exact_with_strong_decay_and_long_chunks():
    # log-decays of -30 per step: exp of a cumulative sum relative to the chunk start overflows
    # (e^{+γ}) in a naive form; the masked differences never do
    q, k, v, beta, g, h0 = operands(T=40, gate="vector")
    g = g * 30
    y, h = delta_chunked(q, k, v, beta, g, h0, gate="vector", chunk=16)
    yr, hr = delta_recurrent(q, k, v, beta, g, h0, gate="vector")
    assert torch.isfinite(y).all() and torch.isfinite(h).all()
    torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h, hr, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("gate", ["scalar", "vector"])
@pytest.mark.parametrize("T", [9, 40])      # 40: the eager backward differentiates the chunked form
def test_chunked_keeps_a_reset_exact(gate, T):
    # a log-decay of -inf (exp(-inf) = 0: the state is reset) in the middle of a chunk: every exponent
    # γ_i - γ_j across it is -inf, not -inf - (-inf) = NaN; outputs and gradients equal the oracle's
    ops = operands(T=T, gate=gate, grad=False)
    g = ops[4].clone()
    g[1, 5, 2] = -torch.inf
    g[0, T - 2, 0] = -torch.inf
    ops[4] = g
    ops = [x.requires_grad_() if x is not None else None for x in ops]
    y, h = torch.ops.seqfuse.delta(*ops, gate, 0.5, 4, "chunked", "eager")
    gy, gh = torch.randn_like(y), torch.randn_like(h)
    got = torch.autograd.grad((y, h), ops, (gy, gh))
    ref = [x.detach().clone().requires_grad_() for x in ops]
    yr, hr = oracle(*ref, gate, 0.5)
    want = torch.autograd.grad((yr, hr), ref, (gy, gh))
    assert torch.isfinite(y).all() and torch.isfinite(h).all()
    torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h, hr, rtol=1e-10, atol=1e-10)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("algorithm", ["recurrent", "chunked"])
def test_custom_op_outputs_and_gradients_equal_the_oracle(gate, algorithm):
    ops = operands(T=9, gate=gate, grad=True)
    y, h = torch.ops.seqfuse.delta(*ops, gate, 0.5, 4, algorithm, "eager")
    gy, gh = torch.randn_like(y), torch.randn_like(h)
    leaves = [x for x in ops if x is not None]
    got = torch.autograd.grad((y, h), leaves, (gy, gh))
    ref = [x.detach().clone().requires_grad_() if x is not None else None for x in ops]
    yr, hr = oracle(*ref, gate, 0.5)
    want = torch.autograd.grad((yr, hr), [x for x in ref if x is not None], (gy, gh))
    torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h, hr, rtol=1e-10, atol=1e-10)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_backward_of_a_long_sequence_goes_through_the_chunked_form():
    # T > RECURRENT_BACKWARD_MAX_T: the eager backward differentiates the chunked reference
    ops = operands(B=1, T=40, H=2, gate="vector", grad=True)
    y, h = torch.ops.seqfuse.delta(*ops, "vector", 1.0, 16, "recurrent", "eager")
    gy, gh = torch.randn_like(y), torch.randn_like(h)
    got = torch.autograd.grad((y, h), ops, (gy, gh))
    ref = [x.detach().clone().requires_grad_() for x in ops]
    want = torch.autograd.grad(delta_recurrent(*ref, gate="vector"), ref, (gy, gh))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("gate", GATES)
def test_gradcheck(gate):
    ops = operands(B=1, T=4, H=1, K=2, V=3, gate=gate, grad=True)
    idx = [i for i, x in enumerate(ops) if x is not None]

    def fn(*xs):
        full = list(ops)
        for i, x in zip(idx, xs):
            full[i] = x
        return torch.ops.seqfuse.delta(*full, gate, 0.7, 2, "chunked", "eager")
    assert torch.autograd.gradcheck(fn, [ops[i] for i in idx])


@pytest.mark.parametrize("gate", ["scalar", "vector"])
def test_opcheck(gate):
    ops = operands(B=1, T=5, H=2, gate=gate, dtype=torch.float32, grad=True)
    torch.library.opcheck(torch.ops.seqfuse.delta.default, (*ops, gate, 1.0, 2, "chunked", "eager"))
    ops[5] = None
    torch.library.opcheck(torch.ops.seqfuse.delta.default, (*ops, gate, 1.0, 64, "recurrent", "eager"))


def test_results_in_the_promoted_dtype_computed_in_fp32():
    q, k, v, beta, g, h0 = operands(dtype=torch.float32)
    y, h = torch.ops.seqfuse.delta(q.bfloat16(), k.bfloat16(), v.bfloat16(), beta.bfloat16(), g.bfloat16(), None,
                                   "scalar", 1.0, 4, "chunked", "eager")
    assert y.dtype == h.dtype == torch.bfloat16
    y2, _ = torch.ops.seqfuse.delta(q, k, v, beta, g, None, "scalar", 1.0, 4, "chunked", "eager")
    assert y2.dtype == torch.float32


def test_bad_arguments_raise_naming_them():
    q, k, v, beta, g, h0 = operands()
    with pytest.raises(ValueError, match="beta must be"):
        torch.ops.seqfuse.delta(q, k, v, beta[..., None], g, h0, "scalar", 1.0, 4, "chunked", "eager")
    with pytest.raises(ValueError, match="gate='vector' needs g"):
        torch.ops.seqfuse.delta(q, k, v, beta, g, h0, "vector", 1.0, 4, "chunked", "eager")
    with pytest.raises(ValueError, match="algorithm"):
        torch.ops.seqfuse.delta(q, k, v, beta, g, h0, "scalar", 1.0, 4, "auto", "eager")
    with pytest.raises(ValueError, match="h0 must be"):
        torch.ops.seqfuse.delta(q, k, v, beta, g, h0[:, :, :1], "scalar", 1.0, 4, "chunked", "eager")


# --- a read key p: the correction reads the state with p, the writes use k (Comba, GDN-2) --------------

def read_key(B=2, T=7, H=3, K=4, dtype=torch.float64, grad=False):
    return F.normalize(torch.randn(B, T, H, K, dtype=dtype), dim=-1).requires_grad_(grad)


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("fn,chunk", [(delta_recurrent, 64), (delta_chunked, 3), (delta_chunked, 64)])
def test_read_key_references_equal_the_oracle(gate, fn, chunk):
    ops, p = operands(gate=gate), read_key()
    want = oracle(*ops, gate, 0.5, p=p)
    got = fn(*ops, gate=gate, scale=0.5, chunk=chunk, p=p)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # and it is another function than the delta rule reading with k
    assert not torch.allclose(got[0], oracle(*ops, gate, 0.5)[0])


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("algorithm,T", [("recurrent", 9), ("chunked", 9), ("chunked", 40)])
def test_read_key_custom_op_outputs_and_gradients_equal_the_oracle(gate, algorithm, T):
    # T = 40: the eager backward differentiates the chunked form; dp is the seventh gradient
    ops, p = operands(T=T, gate=gate, grad=True), read_key(T=T, grad=True)
    y, h = torch.ops.seqfuse.delta(*ops, gate, 0.5, 4, algorithm, "eager", False, p)
    gy, gh = torch.randn_like(y), torch.randn_like(h)
    leaves = [x for x in ops if x is not None] + [p]
    got = torch.autograd.grad((y, h), leaves, (gy, gh))
    ref = [x.detach().clone().requires_grad_() if x is not None else None for x in ops]
    pr = p.detach().clone().requires_grad_()
    yr, hr = oracle(*ref, gate, 0.5, p=pr)
    want = torch.autograd.grad((yr, hr), [x for x in ref if x is not None] + [pr], (gy, gh))
    torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h, hr, rtol=1e-10, atol=1e-10)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("algorithm", ["recurrent", "chunked"])
def test_read_key_gradcheck_and_opcheck(algorithm):
    ops = operands(B=1, T=4, H=1, K=2, V=3, gate="vector", grad=True)
    p = read_key(B=1, T=4, H=1, K=2, grad=True)

    def fn(*xs):
        return torch.ops.seqfuse.delta(*xs[:6], "vector", 0.7, 2, algorithm, "eager", False, xs[6])
    assert torch.autograd.gradcheck(fn, [*ops, p])
    f32 = [x.detach().float().requires_grad_() for x in (*ops, p)]
    torch.library.opcheck(torch.ops.seqfuse.delta.default, (*f32[:6], "vector", 1.0, 2, algorithm, "eager", False,
                                                             f32[6]))


def test_read_key_of_another_shape_raises_naming_it():
    ops = operands()
    with pytest.raises(ValueError, match="read key p must have k's shape"):
        torch.ops.seqfuse.delta(*ops, "scalar", 1.0, 4, "chunked", "eager", False, read_key(K=3))
    n = _nodes(q=(2, 8, 3, 4), k=(2, 8, 3, 4), v=(2, 8, 3, 5), beta=(2, 8, 3), p=(2, 8, 3, 2))
    with pytest.raises(IRVerificationError, match="p must have k's shape"):
        verify_op(Delta(q=n["q"], k=n["k"], v=n["v"], beta=n["beta"], p=n["p"], gate="none"))


def test_read_key_is_printed_and_select_gives_it_the_c_kernel_on_cpu():
    # the C kernel takes p: on CPU a long sequence gets the step loop; without the kernel (meta), the chunked form
    n = _nodes(q=(1, 512, 2, 4), k=(1, 512, 2, 4), v=(1, 512, 2, 5), beta=(1, 512, 2), g=(1, 512, 2),
               p=(1, 512, 2, 4))
    op = Delta(q=n["q"], k=n["k"], v=n["v"], beta=n["beta"], g=n["g"], p=n["p"], gate="scalar")
    verify_op(op)
    assert format_op(op, "d") == "%d = seqfuse.delta(%q, %k, %v, %beta, g=%g, p=%p) {gate=scalar, scale=1.0, " \
                                 "chunk=64, algo=auto}"
    assert choose_delta(op) == "recurrent"
    for node in n.values():
        node.meta["val"] = node.meta["val"].to("meta")
    assert choose_delta(op) == "chunked" and op.chunk == 64


# --- an erase key e and a read of the state before its decay (IPLR, DPLR, RWKV-7) -------------------------

@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("read", ["decayed", "previous"])
@pytest.mark.parametrize("fn,chunk", [(delta_recurrent, 64), (delta_chunked, 3), (delta_chunked, 64)])
def test_erase_key_and_previous_read_references_equal_the_oracle(gate, read, fn, chunk):
    ops, p, e = operands(gate=gate), read_key(), read_key() * 0.8
    for keys in (dict(e=e), dict(p=p, e=e), dict(p=p)):
        want = oracle(*ops, gate, 0.5, read=read, **keys)
        got = fn(*ops, gate=gate, scale=0.5, chunk=chunk, read=read, **keys)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    if gate != "none":   # reading before the decay is another function (without a decay it is the same)
        assert not torch.allclose(oracle(*ops, gate, 0.5, e=e, read="previous")[0], oracle(*ops, gate, 0.5, e=e)[0])


@pytest.mark.parametrize("gate", ["scalar", "vector"])
def test_previous_read_chunked_keeps_a_reset_exact(gate):
    # a log-decay of -inf read before the decay: e^{γ_{i-1} − γ_j} is a shifted row of the exact e^{γ_i − γ_j}
    ops, e = operands(T=20, gate=gate), read_key(T=20)
    ops[4][1, 5, 2] = -torch.inf
    ops[4][0, 7, 0] = -torch.inf
    want = oracle(*ops, gate, 0.5, e=e, read="previous")
    got = delta_chunked(*ops, gate=gate, scale=0.5, chunk=4, e=e, read="previous")
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("algorithm,T", [("recurrent", 9), ("chunked", 40)])
def test_erase_key_custom_op_gradients_equal_the_oracle(algorithm, T):
    ops = operands(T=T, gate="vector", grad=True)
    p, e = read_key(T=T, grad=True), (read_key(T=T) * 0.8).requires_grad_()
    y, h = torch.ops.seqfuse.delta(*ops, "vector", 0.5, 4, algorithm, "eager", False, p, e, "previous")
    gy, gh = torch.randn_like(y), torch.randn_like(h)
    got = torch.autograd.grad((y, h), [*ops, p, e], (gy, gh))
    ref = [x.detach().clone().requires_grad_() for x in (*ops, p, e)]
    yr, hr = oracle(*ref[:6], "vector", 0.5, p=ref[6], e=ref[7], read="previous")
    want = torch.autograd.grad((yr, hr), ref, (gy, gh))
    torch.testing.assert_close(y, yr, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h, hr, rtol=1e-10, atol=1e-10)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("algorithm", ["recurrent", "chunked"])
def test_erase_key_gradcheck_and_opcheck(algorithm):
    ops = operands(B=1, T=4, H=1, K=2, V=3, gate="scalar", grad=True)
    e = read_key(B=1, T=4, H=1, K=2, grad=True)

    def fn(*xs):
        return torch.ops.seqfuse.delta(*xs[:6], "scalar", 0.7, 2, algorithm, "eager", False, None, xs[6], "previous")
    assert torch.autograd.gradcheck(fn, [*ops, e])
    f32 = [x.detach().float().requires_grad_() for x in (*ops, e)]
    torch.library.opcheck(torch.ops.seqfuse.delta.default, (*f32[:6], "scalar", 1.0, 2, algorithm, "eager", False,
                                                             None, f32[6], "previous"))


def test_erase_key_and_read_arguments_raise_naming_them():
    ops = operands()
    with pytest.raises(ValueError, match="erase key e must have k's shape"):
        torch.ops.seqfuse.delta(*ops, "scalar", 1.0, 4, "chunked", "eager", False, None, read_key(K=3))
    with pytest.raises(ValueError, match="read must be one of"):
        torch.ops.seqfuse.delta(*ops, "scalar", 1.0, 4, "chunked", "eager", False, None, None, "before")
    n = _nodes(q=(2, 8, 3, 4), k=(2, 8, 3, 4), v=(2, 8, 3, 5), beta=(2, 8, 3), e=(2, 8, 3, 4))
    op = Delta(q=n["q"], k=n["k"], v=n["v"], beta=n["beta"], e=n["e"], gate="none", read="previous")
    verify_op(op)
    assert format_op(op, "d") == "%d = seqfuse.delta(%q, %k, %v, %beta, e=%e) {gate=none, scale=1.0, chunk=64, " \
                                 "read=previous, algo=auto}"
    assert choose_delta(op) == "recurrent"     # on CPU: the C kernel's step loop
    with pytest.raises(IRVerificationError, match="read must be"):
        verify_op(Delta(q=n["q"], k=n["k"], v=n["v"], beta=n["beta"], gate="none", read="later"))


# --- the IR op ---------------------------------------------------------------------------

def _nodes(**shapes):
    g = torch.fx.Graph()
    out = {}
    for name, shape in shapes.items():
        n = g.placeholder(name)
        n.meta["val"] = torch.empty(shape) if shape is not None else None
        out[name] = n
    return out


def test_ir_prints_and_verifies():
    n = _nodes(q=(2, 8, 3, 4), k=(2, 8, 3, 4), v=(2, 8, 3, 5), beta=(2, 8, 3), g=(2, 8, 3), h0=(2, 3, 4, 5))
    op = Delta(q=n["q"], k=n["k"], v=n["v"], beta=n["beta"], g=n["g"], h0=n["h0"], gate="scalar")
    assert OP_CLASSES["delta"] is Delta
    verify_op(op)
    assert format_op(op, "delta") == \
        "%delta = seqfuse.delta(%q, %k, %v, %beta, g=%g, h0=%h0) {gate=scalar, scale=1.0, chunk=64, algo=auto}"
    op2 = Delta(q=n["q"], k=n["k"], v=n["v"], beta=n["beta"], gate="none", scale=0.5)
    verify_op(op2)
    assert format_op(op2, "d") == "%d = seqfuse.delta(%q, %k, %v, %beta) {gate=none, scale=0.5, chunk=64, algo=auto}"


@pytest.mark.parametrize("change,match", [
    (dict(gate="vector"), "gate=vector needs g of rank 4"),
    (dict(gate="diag"), "gate must be"),
    (dict(chunk=0), "chunk must be"),
    (dict(beta="g_bad"), "beta must be"),
    (dict(k="k_bad"), "q and k must have one shape"),
])
def test_verifier_rejects(change, match):
    n = _nodes(q=(2, 8, 3, 4), k=(2, 8, 3, 4), v=(2, 8, 3, 5), beta=(2, 8, 3), g=(2, 8, 3),
               g_bad=(2, 8, 3, 1), k_bad=(2, 8, 3, 6))
    kw = dict(q=n["q"], k=n["k"], v=n["v"], beta=n["beta"], g=n["g"], gate="scalar")
    for key, value in change.items():
        kw[key] = n[value] if isinstance(value, str) and value in n else value
    with pytest.raises(IRVerificationError, match=match):
        verify_op(Delta(**kw))


def test_select_chooses_the_c_kernel_on_cpu_and_chunked_for_long_sequences_elsewhere():
    # meta tensors stand for a device without the C kernel: recurrent only for a few steps
    for device, T, gate, K, want, chunk in [("meta", 1, "scalar", 4, "recurrent", None),
                                            ("meta", 512, "scalar", 4, "chunked", 64),
                                            ("meta", 512, "vector", 4, "chunked", 16),
                                            ("meta", 512, "none", 4, "chunked", 64),
                                            ("cpu", 512, "vector", 4, "recurrent", None),
                                            ("cpu", 512, "scalar", 300, "chunked", 64)]:   # K > the kernel's MAX_D
        n = _nodes(q=(1, T, 2, K), k=(1, T, 2, K), v=(1, T, 2, 4), beta=(1, T, 2),
                   g=(1, T, 2) if gate == "scalar" else (1, T, 2, K))
        for node in n.values():
            node.meta["val"] = node.meta["val"].to(device)
        op = Delta(q=n["q"], k=n["k"], v=n["v"], beta=n["beta"], g=None if gate == "none" else n["g"], gate=gate)
        assert choose_delta(op) == want, (device, T, gate, K)
        if chunk:
            assert op.chunk == chunk


# --- the C kernel (cpu path) ---------------------------------------------------------------

cpu_delta = pytest.importorskip("seqfuse.lowering.cpu.delta")
needs_cc = pytest.mark.skipif(cpu_delta.available() is not None, reason="no C compiler for the cpu kernels")


@needs_cc
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_c_kernel_forward_and_backward_equal_the_reference(gate, dtype, tol):
    # operands are strided views ((B, H, T, ·) tensors transposed), h0 given, T not a square
    B, T, H, K, V = 2, 11, 3, 4, 5
    q, k, v = torch.randn(B, H, T, K, dtype=dtype), torch.randn(B, H, T, K, dtype=dtype), torch.randn(B, H, T, V, dtype=dtype)
    k = F.normalize(k, dim=-1)
    beta = torch.rand(B, H, T, dtype=dtype)
    g = {"none": None, "scalar": -torch.rand(B, H, T, dtype=dtype), "vector": -torch.rand(B, H, T, K, dtype=dtype)}[gate]
    ops = [x.transpose(1, 2) if x is not None else None for x in (q, k, v, beta, g)] + \
        [torch.randn(B, H, V, K, dtype=dtype).transpose(-1, -2)]
    y, h = cpu_delta.delta_forward(*ops, gate=gate, scale=0.7)
    leaves = [x.detach().clone().requires_grad_() if x is not None else None for x in ops]
    yr, hr = delta_recurrent(*leaves, gate=gate, scale=0.7)
    gy, gh = torch.randn_like(yr), torch.randn_like(hr)
    want = torch.autograd.grad((yr, hr), [x for x in leaves if x is not None], (gy, gh))
    got = [x for x in cpu_delta.delta_backward(gy, gh, *ops, gate=gate, scale=0.7) if x is not None]
    torch.testing.assert_close(y, yr, rtol=tol, atol=tol)
    torch.testing.assert_close(h, hr, rtol=tol, atol=tol)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@needs_cc
@pytest.mark.parametrize("K,V", [(64, 64), (128, 128), (64, 128)])
def test_c_kernel_specialized_head_sizes_equal_the_reference(K, V):
    # K = V = 64 and 128 run bodies compiled for those sizes (64, 128 the generic one); T = 13: chunks of 4
    torch.manual_seed(3)
    B, T, H = 1, 13, 2
    dtype = torch.float64
    q, k, v = (torch.randn(B, T, H, d, dtype=dtype) for d in (K, K, V))
    ops = [q, F.normalize(k, dim=-1), v, torch.rand(B, T, H, dtype=dtype), -torch.rand(B, T, H, K, dtype=dtype),
           torch.randn(B, H, K, V, dtype=dtype)]
    y, h = cpu_delta.delta_forward(*ops, gate="vector", scale=K ** -0.5)
    leaves = [x.clone().requires_grad_() for x in ops]
    yr, hr = delta_recurrent(*leaves, gate="vector", scale=K ** -0.5)
    gy, gh = torch.randn_like(yr), torch.randn_like(hr)
    want = torch.autograd.grad((yr, hr), leaves, (gy, gh))
    got = cpu_delta.delta_backward(gy, gh, *ops, gate="vector", scale=K ** -0.5)
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h, hr, rtol=1e-12, atol=1e-12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


@needs_cc
def test_c_kernel_long_sequence_checkpoints_and_missing_gradients():
    # T = 50: 8 checkpointed chunks of 7 steps; no h0, no final-state gradient, only dk and dg asked for
    ops = operands(B=1, T=50, H=2, gate="vector", h0=False)
    y, h = cpu_delta.delta_forward(*ops, gate="vector")
    leaves = [x.clone().requires_grad_() if x is not None else None for x in ops]
    yr, _ = delta_recurrent(*leaves, gate="vector")
    gy = torch.randn_like(yr)
    want = torch.autograd.grad(yr, [leaves[1], leaves[4]], gy)
    got = cpu_delta.delta_backward(gy, None, *ops, gate="vector", needs=(False, True, False, False, True, False))
    assert got[0] is None and got[2] is None and got[3] is None and got[5] is None
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    for a, b in zip((got[1], got[4]), want):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)


@needs_cc
@pytest.mark.parametrize("gate", ["scalar", "vector"])
def test_custom_op_runs_the_c_kernel_on_the_cpu_path(gate):
    import seqfuse
    ops = operands(B=1, T=9, H=2, gate=gate, grad=True)
    y, h = torch.ops.seqfuse.delta(*ops, gate, 0.5, 64, "recurrent", "auto")
    gy, gh = torch.randn_like(y), torch.randn_like(h)
    got = torch.autograd.grad((y, h), ops, (gy, gh))
    counts = seqfuse.counters()
    assert counts["delta"]["cpu"] == 1 and counts["delta_backward"]["cpu"] == 1, counts
    ref = [x.detach().clone().requires_grad_() for x in ops]
    want = torch.autograd.grad(oracle(*ref, gate, 0.5), ref, (gy, gh))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    torch.library.opcheck(torch.ops.seqfuse.delta.default, (*ops, gate, 0.5, 64, "recurrent", "cpu"))


def test_c_kernel_supports_refuses_what_it_does_not_compute():
    q, k, v, beta, g, h0 = operands(dtype=torch.float32)
    t = dict(q=q, k=k, v=v, beta=beta, g=g, h0=h0)
    ok = dict(gate="scalar", scale=1.0, chunk=64, algorithm="recurrent")
    assert cpu_delta.supports({**t, "p": k, "e": k}, {**ok, "read": "previous"}) is None   # the generalized step
    assert "read 'later'" in cpu_delta.supports(t, {**ok, "read": "later"})
    assert "algorithm 'chunked'" in cpu_delta.supports(t, {**ok, "algorithm": "chunked"})
    assert "complex" in cpu_delta.supports({**t, "v": v.to(torch.complex64)}, ok)
    assert "gate 'vector' with g" not in (cpu_delta.supports(t, ok) or "")
    big = dict(t, k=torch.randn(2, 7, 3, 300), q=torch.randn(2, 7, 3, 300))
    assert "MAX_D" not in (cpu_delta.supports(t, ok) or "") and "> 256" in cpu_delta.supports(big, ok)
    assert "gate 'none' with g given" in cpu_delta.supports(t, {**ok, "gate": "none"})
    assert "not finite" in cpu_delta.supports(t, {**ok, "scale": float("inf")})


# --- the C kernel's generalized step: a read key p, an erase key e, read="previous" ----------------

@needs_cc
@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("read", ["decayed", "previous"])
@pytest.mark.parametrize("keys", ["p", "e", "pe", ""])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
def test_c_kernel_generalized_step_equals_the_oracle(gate, read, keys, dtype, tol):
    # strided views (operands transposed from (B, H, T, ·)), h0 given, T = 11: checkpointed chunks of 4
    torch.manual_seed(5)
    B, T, H, K, V = 2, 11, 3, 4, 5

    def key():
        return F.normalize(torch.randn(B, H, T, K, dtype=dtype), dim=-1).transpose(1, 2)
    ops = [x.transpose(1, 2) if x is not None else None for x in (
        torch.randn(B, H, T, K, dtype=dtype), F.normalize(torch.randn(B, H, T, K, dtype=dtype), dim=-1),
        torch.randn(B, H, T, V, dtype=dtype), torch.rand(B, H, T, dtype=dtype),
        {"none": None, "scalar": -torch.rand(B, H, T, dtype=dtype),
         "vector": -torch.rand(B, H, T, K, dtype=dtype)}[gate])] + [torch.randn(B, H, V, K, dtype=dtype).mT]
    p = key() if "p" in keys else None
    e = 0.8 * key() if "e" in keys else None
    y, h = cpu_delta.delta_forward(*ops, gate=gate, scale=0.7, p=p, e=e, read=read)
    leaves = [x.detach().double().requires_grad_() if x is not None else None for x in (*ops, p, e)]
    yr, hr = oracle(*leaves[:6], gate, 0.7, p=leaves[6], e=leaves[7], read=read)
    gy, gh = torch.randn_like(yr), torch.randn_like(hr)
    given = [x for x in leaves if x is not None]
    want = torch.autograd.grad((yr, hr), given, (gy, gh))
    got = [x for x in cpu_delta.delta_backward(gy.to(dtype), gh.to(dtype), *ops, gate=gate, scale=0.7, p=p, e=e,
                                               read=read) if x is not None]
    torch.testing.assert_close(y, yr.to(dtype), rtol=tol, atol=tol)
    torch.testing.assert_close(h, hr.to(dtype), rtol=tol, atol=tol)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.dtype == dtype
        torch.testing.assert_close(a, b.to(dtype), rtol=tol, atol=tol)


@needs_cc
def test_c_kernel_generalized_step_at_the_specialized_size_with_a_reset():
    # K = V = 64 runs a body compiled for that size; a -inf log-decay (a reset) read before and after the decay
    torch.manual_seed(6)
    B, T, H, K = 1, 10, 2, 64
    ops = operands(B=B, T=T, H=H, K=K, V=K, gate="vector")
    ops[4][0, 3, 1, :7] = -torch.inf
    p, e = read_key(B=B, T=T, H=H, K=K), read_key(B=B, T=T, H=H, K=K) * 0.8
    for read in ("decayed", "previous"):
        y, h = cpu_delta.delta_forward(*ops, gate="vector", scale=K ** -0.5, p=p, e=e, read=read)
        leaves = [x.clone().requires_grad_() for x in (*ops, p, e)]
        yr, hr = oracle(*leaves[:6], "vector", K ** -0.5, p=leaves[6], e=leaves[7], read=read)
        gy, gh = torch.randn_like(yr), torch.randn_like(hr)
        want = torch.autograd.grad((yr, hr), leaves, (gy, gh))
        got = cpu_delta.delta_backward(gy, gh, *ops, gate="vector", scale=K ** -0.5, p=p, e=e, read=read)
        assert torch.isfinite(y).all() and torch.isfinite(h).all()
        torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(h, hr, rtol=1e-12, atol=1e-12)
        for name, a, b in zip("q k v beta g h0 p e".split(), got, want):
            # the reset's own log-decay gradient is 0 · -inf-ish in eager too: compare where eager is finite
            fin = torch.isfinite(b)
            assert torch.equal(fin, torch.isfinite(a)), name
            torch.testing.assert_close(a[fin], b[fin], rtol=1e-11, atol=1e-11, msg=name)


@needs_cc
def test_c_kernel_generalized_step_gives_only_the_gradients_asked_for():
    # T = 20 (chunks of 5), no h0, no final-state gradient; only dk and de asked for (e's own, not added to k's)
    ops = operands(B=1, T=20, H=2, gate="scalar", h0=False)
    e = read_key(B=1, T=20, H=2) * 0.8
    gy = torch.randn(1, 20, 2, 5, dtype=torch.float64)
    got = cpu_delta.delta_backward(gy, None, *ops, gate="scalar", e=e, read="previous",
                                   needs=(False, True, False, False, False, False, False, True))
    assert [x is None for x in got] == [True, False, True, True, True, True, True, False]
    leaves = [x.clone().requires_grad_() if x is not None else None for x in ops]
    e_leaf = e.clone().requires_grad_()
    yr, _ = oracle(*leaves[:6], "scalar", 1.0, e=e_leaf, read="previous")
    dk, de = torch.autograd.grad(yr, [leaves[1], e_leaf], gy)
    torch.testing.assert_close(got[1], dk, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(got[7], de, rtol=1e-11, atol=1e-11)


@needs_cc
def test_custom_op_runs_the_generalized_step_on_the_c_kernel():
    import seqfuse
    ops = operands(B=1, T=9, H=2, gate="vector", grad=True)
    p, e = read_key(B=1, T=9, H=2, grad=True), (read_key(B=1, T=9, H=2) * 0.8).requires_grad_()
    y, h = torch.ops.seqfuse.delta(*ops, "vector", 0.5, 64, "recurrent", "auto", False, p, e, "previous")
    gy, gh = torch.randn_like(y), torch.randn_like(h)
    got = torch.autograd.grad((y, h), [*ops, p, e], (gy, gh))
    counts = seqfuse.counters()
    assert counts["delta"]["cpu"] == 1 and counts["delta_backward"]["cpu"] == 1, counts
    ref = [x.detach().clone().requires_grad_() for x in (*ops, p, e)]
    yr, hr = oracle(*ref[:6], "vector", 0.5, p=ref[6], e=ref[7], read="previous")
    want = torch.autograd.grad((yr, hr), ref, (gy, gh))
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    f32 = [x.detach().float().requires_grad_() for x in (*ops, p, e)]
    torch.library.opcheck(torch.ops.seqfuse.delta.default, (*f32[:6], "vector", 0.5, 64, "recurrent", "cpu", False,
                                                             f32[6], f32[7], "previous"))


@needs_cc
@pytest.mark.parametrize("poison", ["beta", "k", "p", "e", "v", "g"])
@pytest.mark.parametrize("bad", [float("inf"), -float("inf"), float("nan")])
def test_c_kernel_generalized_step_keeps_the_references_non_finite_values(poison, bad):
    # the forward writes in the reference's order (k ⊗ β(v − r) without an erase key, β(k ⊗ v − e ⊗ r) with
    # one): its NaN, +inf and -inf are exactly eager's; the backward's non-finite elements are eager's (NaN or
    # inf: docs/reliability.md, "NaN and inf") and every finite one is eager's value
    torch.manual_seed(11)
    for read in ("decayed", "previous"):
        for keys in ("p", "e", "pe"):
            if poison in "pe" and poison not in keys:
                continue
            ops = dict(zip(("q", "k", "v", "beta", "g", "h0"), operands(B=1, T=6, H=2, K=3, V=2, gate="vector")))
            ops["p"] = read_key(B=1, T=6, H=2, K=3) if "p" in keys else None
            ops["e"] = read_key(B=1, T=6, H=2, K=3) if "e" in keys else None
            t = ops[poison]
            t.view(-1)[t.numel() // 3] = bad
            names = [n for n in ops if ops[n] is not None]
            y, h = cpu_delta.delta_forward(*(ops[n] for n in ("q", "k", "v", "beta", "g", "h0")), gate="vector",
                                           scale=0.5, p=ops["p"], e=ops["e"], read=read)
            leaves = {n: ops[n].clone().requires_grad_() for n in names}
            yr, hr = delta_recurrent(*(leaves.get(n) for n in ("q", "k", "v", "beta", "g", "h0")), gate="vector",
                                     scale=0.5, p=leaves.get("p"), e=leaves.get("e"), read=read)
            for a, b in ((y, yr), (h, hr)):
                for cls in (torch.isnan, torch.isposinf, torch.isneginf):
                    assert torch.equal(cls(a), cls(b)), (read, keys, cls.__name__)
                fin = torch.isfinite(b)
                torch.testing.assert_close(a[fin], b[fin].detach(), rtol=1e-10, atol=1e-10)
            gy, gh = torch.randn_like(yr), torch.randn_like(hr)
            want = torch.autograd.grad((yr, hr), [leaves[n] for n in names], (gy, gh))
            got = dict(zip(("q", "k", "v", "beta", "g", "h0", "p", "e"), cpu_delta.delta_backward(
                gy, gh, *(ops[n] for n in ("q", "k", "v", "beta", "g", "h0")), gate="vector", scale=0.5, p=ops["p"],
                e=ops["e"], read=read)))
            for n, b in zip(names, want):
                a, fin = got[n], torch.isfinite(b)
                assert torch.equal(torch.isfinite(a), fin), (read, keys, n)
                torch.testing.assert_close(a[fin], b[fin], rtol=1e-9, atol=1e-9, msg=f"d{n} ({read}, {keys})")
