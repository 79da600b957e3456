"""Reliability regressions of the ssd / scan / long_conv ops found by the differential fuzzer
(tests/fuzz): each compiled program equals eager (outputs, gradients, NaN / inf positions by
the rule of docs/reliability.md) and the report shows the rewrite."""
import math

import pytest
import torch
from torch._higher_order_ops.associative_scan import associative_scan

from helpers import check_against_eager


def _linear(left, right):
    a_l, b_l = left
    a_r, b_r = right
    return a_l * a_r, a_r * b_l + b_r


# --- issue 13 / defect 12: associative_scan 1-D / 2-D with algorithm={"scan": "chunked"} -------
# The chunked (and the eager recurrent) reference returned the last state as a view of the
# states: for a 1-D / 2-D scan the view has the result's own layout, so the custom op returned
# two aliasing outputs (RuntimeError from torch.library's aliasing check).

@pytest.mark.parametrize("shape,dim", [((11,), 0), ((3, 9), 1), ((9, 3), 0), ((1,), 0)])
@pytest.mark.parametrize("options", [{"algorithm": {"scan": "chunked"}},
                                     {"algorithm": {"scan": "recurrent"}, "runtime": "eager"}])
def test_associative_scan_low_rank_forced_algorithm(shape, dim, options):
    a = torch.rand(*shape).mul(0.5).add(0.5).requires_grad_()
    b = torch.randn(*shape, requires_grad=True)

    def fn(a, b):
        return associative_scan(_linear, (a, b), dim=dim, combine_mode="generic")[1]

    report = check_against_eager(fn, a, b, options=options)
    if shape[dim] > 1:
        assert report.count("scan") == 1, str(report)
        assert f"algo={options['algorithm']['scan']}" in report.rewrites[0].ir, report.rewrites[0].ir


# --- issue 13 / defect 11: an FFT conv with a fixed n on a length-0 signal -------------------
# The program works (an empty result); the direct algorithm (chosen for kernels of at most 64
# taps, here 0) reshaped an empty signal to (-1, 1, 0): "cannot reshape tensor of 0 elements".

def fft_conv_fixed_n(u, k):
    n = 8
    return torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n)[..., :u.shape[-1]]


@pytest.mark.parametrize("L,Lk", [(0, 0), (0, 3), (5, 0)])
@pytest.mark.parametrize("options", [{}, {"runtime": "eager"}, {"algorithm": {"long_conv": "direct"}},
                                     {"algorithm": {"long_conv": "fft"}},
                                     {"algorithm": {"long_conv": "direct"}, "runtime": "eager"}])
def test_fft_conv_fixed_n_empty_signal_or_kernel(L, Lk, options):
    u = torch.randn(2, 3, L, requires_grad=True)
    k = torch.randn(3, Lk, requires_grad=True)
    report = check_against_eager(fft_conv_fixed_n, u, k, options=options)
    assert report.count("long_conv") == 1, str(report)


# --- fuzzer finding: the eager ssd backward (quadratic / recurrent) when only c, or only d,
# needs a gradient: the final state does not depend on it, and differentiating the reference
# again through (y, h) raised "element 1 of tensors does not require grad".

def masked_fill_linear_attention(q, k, v):
    t = q.shape[-2]
    return (q @ k.mT).masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), 0.0) @ v


@pytest.mark.parametrize("algo,runtime", [("quadratic", "auto"), ("recurrent", "eager")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ssd_eager_backward_when_only_c_needs_a_gradient(algo, runtime, dtype):
    q = torch.randn(1, 3, 9, 4, dtype=dtype, requires_grad=True)
    k, v = torch.randn(1, 3, 9, 4, dtype=dtype), torch.randn(1, 3, 9, 5, dtype=dtype)
    report = check_against_eager(masked_fill_linear_attention, q, k, v,
                                 options={"algorithm": {"ssd": algo}, "runtime": runtime})
    assert report.count("ssd") == 1 and f"algo={algo}" in report.rewrites[0].ir, str(report)


# --- issue 13 / defect 7: NaN and inf (docs/reliability.md, "NaN and inf") -------------------
# The rule: an element that reads a non-finite input and is non-finite in the program is
# non-finite in seqfuse; every finite element of seqfuse is correct; a finite value the program
# computes from a non-finite input (a log-decay of -inf resets the state) is kept; elements that
# do not read the non-finite input may be NaN in either (spread by a mask's exact zero or an FFT).

from fuzz.check import Case, containment_nan_rule, run_case  # noqa: E402


def ssd_loop(q, k, v, g):
    S = q.new_zeros(q.shape[0], q.shape[1], q.shape[-1], v.shape[-1])
    outs = []
    for t in range(q.shape[2]):
        S = S * g[:, :, t].exp()[..., None, None] + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append((q[:, :, t, :, None] * S).sum(-2))
    return torch.stack(outs, 2), S


def ssd_loop_vector(q, k, v, g):
    S = q.new_zeros(q.shape[0], q.shape[1], q.shape[-1], v.shape[-1])
    outs = []
    for t in range(q.shape[2]):
        S = S * g[:, :, t].exp()[..., None] + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append((q[:, :, t, :, None] * S).sum(-2))
    return torch.stack(outs, 2), S


def ssd_quadratic_program(q, k, v, g):
    t = q.shape[-2]
    return (q @ k.transpose(-1, -2) * torch.tril(torch.ones(t, t, dtype=q.dtype))) @ v


def fft_conv(u, k):
    n = 2 * u.shape[-1]
    return torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n)[..., :u.shape[-1]]


def _qkvg(T=12, vector=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 2, T, 3, generator=gen) for _ in range(3))
    g = torch.nn.functional.logsigmoid(torch.randn(2, 2, T, *((3,) if vector else ()), generator=gen))
    return q, k, v, g


@pytest.mark.parametrize("vector", [False, True])
@pytest.mark.parametrize("algo,runtime", [("quadratic", "auto"), ("chunked", "auto"), ("recurrent", "auto"),
                                          ("recurrent", "eager")])
def test_log_decay_minus_inf_resets_the_state(vector, algo, runtime):
    # exp(-inf) = 0: the loop resets its state (a document boundary in a packed sequence); the
    # quadratic and chunked algorithms took -inf - (-inf) = NaN as segment sums
    q, k, v, g = _qkvg(T=20, vector=vector)
    with torch.no_grad():
        g[0, 1, 5] = -torch.inf
        g[1, 0, 13] = -torch.inf
        g[1, 0, 14] = -torch.inf
    args = [t.requires_grad_() for t in (q, k, v, g)]
    report = check_against_eager(ssd_loop_vector if vector else ssd_loop, *args,
                                 options={"algorithm": {"ssd": algo}, "runtime": runtime})
    assert report.count("ssd") == 1 and f"algo={algo}" in report.rewrites[0].ir, str(report)


@pytest.mark.parametrize("vector", [False, True])
@pytest.mark.parametrize("chunk", [1, 3, 4, 64])
def test_chunked_reference_and_backward_with_resets(vector, chunk):
    # several chunks, resets at a chunk's first / last step and inside: forward and the written-out
    # adjoint against the recurrence differentiated by autograd
    from seqfuse.lowering.reference.ssd import ssd_chunked_backward, ssd_reference
    gen = torch.Generator().manual_seed(3)
    B, T, H, P, N = 2, 13, 2, 3, 4
    x, b, c = torch.randn(B, T, H, P, generator=gen), torch.randn(B, T, H, N, generator=gen), \
        torch.randn(B, T, H, N, generator=gen)
    a = torch.nn.functional.logsigmoid(torch.randn(B, T, H, *((N,) if vector else ()), generator=gen))
    h0 = torch.randn(B, H, P, N, generator=gen)
    for t in (0, 3, 4, 8, 12):
        a[t % B, t, t % H] = -torch.inf
    decay = "vector" if vector else "scalar"
    ops = [t.double().requires_grad_() for t in (x, b, c, a, h0)]
    y_ref, h_ref = ssd_reference(ops[0], ops[1], ops[2], ops[3], None, ops[4], decay=decay, algorithm="recurrent")
    y, h = ssd_reference(*(t.detach() for t in ops[:4]), None, ops[4].detach(), decay=decay, chunk=chunk,
                         algorithm="chunked")
    assert torch.isfinite(y).all() and torch.isfinite(h).all()
    torch.testing.assert_close(y, y_ref.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h, h_ref.detach(), rtol=1e-10, atol=1e-10)
    gy, gh = torch.randn_like(y), torch.randn_like(h)
    want = torch.autograd.grad((y_ref, h_ref), ops, (gy, gh))
    got = ssd_chunked_backward(gy, gh, *(t.detach() for t in ops[:4]), None, ops[4].detach(), decay=decay,
                               chunk=chunk)
    for name, g_got, g_want in zip(("dx", "db", "dc", "da", "dh0"), [got[i] for i in (0, 1, 2, 3, 5)], want):
        assert torch.isfinite(g_got).all(), name
        torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-9, msg=name)


def _poisoned(fn, value, where, *args):
    args = [t.clone() for t in args]
    with torch.no_grad():
        args[where[0]][where[1:]] = value
    return args


@pytest.mark.parametrize("program", [ssd_loop, ssd_quadratic_program])
@pytest.mark.parametrize("algo", ["quadratic", "chunked", "recurrent"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_inf_rule_ssd(program, algo, value):
    q, k, v, g = _qkvg()
    args = _poisoned(program, value, (2, 0, 1, 6, 2), q, k, v, g)        # v[0, 1, 6, 2]
    args = [t.requires_grad_() for t in args]
    case = Case("ssd", program.__name__, program, tuple(args), "ssd", {"algorithm": {"ssd": algo}}, 0)
    o = run_case(case)
    assert o.status == "ok", o.detail
    # the recurrent algorithm keeps the NaN causal: the steps before it are finite and equal to the
    # program's value without it (the program's quadratic form has NaN there)
    if algo == "recurrent":
        torch._dynamo.reset()
        import seqfuse
        y = seqfuse.explain(program, *[t.detach() for t in args], options={"algorithm": {"ssd": algo}})
        y = y.output[0] if isinstance(y.output, tuple) else y.output
        clean = [t.detach().clone() for t in args]
        clean[2][0, 1, 6, 2] = 0.0
        want = program(*clean)
        want = want[0] if isinstance(want, tuple) else want
        assert torch.isfinite(y[0, 1, :6]).all()
        torch.testing.assert_close(y[0, 1, :6], want[0, 1, :6], rtol=1e-5, atol=1e-5)
        assert not torch.isfinite(y[0, 1, 6:]).all(-1).any()                 # every later step reads it


@pytest.mark.parametrize("algo", ["fft", "direct"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nan_inf_rule_long_conv(algo, value):
    u, k = torch.randn(2, 3, 20), torch.randn(3, 20) / 4
    u = _poisoned(fft_conv, value, (0, 1, 2, 7), u)[0]
    case = Case("long_conv", "fft", fft_conv, (u.requires_grad_(), k.requires_grad_()), "long_conv",
                {"algorithm": {"long_conv": algo}}, 0)
    o = run_case(case)
    assert o.status == "ok", o.detail


def test_the_rule_refuses_a_vanished_nan():
    # the checker's side of the rule: a NaN that a reading element lost is a failure
    nan = float("nan")
    prog = torch.tensor([nan, 2.0, nan])
    z0, z1 = torch.tensor([1.0, 2.0, 3.0]).double(), torch.tensor([1.0, 2.0, 4.0]).double()
    problem, *_ = containment_nan_rule(torch.tensor([1.0, 2.0, 3.0]), prog, prog.double(),
                                       {"inputs_finite": False, "replaced": (z0, z1, z0.float())})
    assert problem and "vanished" in problem


# --- fuzzer finding: a decay mask computed in a narrower dtype than the product ------------------
# RetNet's γ^(i-j) mask built in fp32 and cast to fp64 for fp64 q, k, v: the program's decays are
# fp32-rounded, the lifted ssd computed them exactly (2e-8 off an fp64 result, where eager is exact).

def retention_fp32_mask(q, k, v):
    h, t = q.shape[1], q.shape[2]
    gamma = 1 - 2.0 ** (-5.0 - torch.arange(h, dtype=torch.float32))
    n = torch.arange(t, dtype=torch.float32)
    decay = torch.pow(gamma.view(-1, 1, 1), n[:, None] - n[None, :]) * (n[:, None] >= n[None, :])
    return (q @ k.mT * decay.to(q.dtype)) @ v


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_decay_mask_narrower_than_the_product_is_a_near_miss(dtype):
    q, k, v = (torch.randn(2, 3, 30, 4, dtype=dtype, requires_grad=True) for _ in range(3))
    bound = 1e-12 if dtype == torch.float64 else None
    report = check_against_eager(retention_fp32_mask, q, k, v, bound=bound)
    if dtype == torch.float64:
        assert report.count("ssd") == 0, str(report)
        assert any("narrower than the product" in m.reason for m in report.near_misses), str(report)
    else:
        assert report.count("ssd") == 1, str(report)


# --- fuzzer finding: an infinite input at a reset step, through the chunked adjoint --------------
# Mamba-2 with dt = +inf at one step: exp(dt·A) = 0 resets the state and dt·x is infinite there.
# The program's gradients of dt at the other steps are finite; the chunked adjoint's cumulative
# sums met inf - inf and made them NaN (docs/reliability.md, "NaN and inf", rule 3).

def mamba2_recurrent(x, dt, A, Bm, C):
    dA = torch.exp(dt * A)
    h = x.new_zeros(x.shape[0], x.shape[2], x.shape[3], Bm.shape[-1])
    ys = []
    for t in range(x.shape[1]):
        h = h * dA[:, t, :, None, None] + (dt[:, t, :, None] * x[:, t])[..., None] * Bm[:, t, None, None, :]
        ys.append(torch.einsum("bhpn,bn->bhp", h, C[:, t]))
    return torch.stack(ys, 1), h


@pytest.mark.parametrize("algo,runtime", [("chunked", "auto"), ("quadratic", "auto"), ("recurrent", "eager"),
                                          ("chunked", "triton")])
def test_infinite_input_at_a_reset_step_keeps_finite_gradients(algo, runtime, monkeypatch):
    if runtime == "triton":  # the triton backward refuses a non-finite operand: the recurrence runs it
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 11, 2, 5, generator=g)
    dt = torch.nn.functional.softplus(torch.randn(1, 11, 2, generator=g))
    dt[0, 6, 1] = torch.inf
    A = -torch.rand(2, generator=g) - 0.1
    Bm, C = torch.randn(1, 11, 6, generator=g), torch.randn(1, 11, 6, generator=g)
    args = tuple(t.requires_grad_() for t in (x, dt, A, Bm, C))
    o = run_case(Case("ssd", "mamba2_inf_dt", mamba2_recurrent, args, "ssd", {"algorithm": {"ssd": algo},
                                                                            "runtime": runtime}, 0))
    assert o.status == "ok", o.detail
