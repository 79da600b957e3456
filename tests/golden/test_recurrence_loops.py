"""Unrolled recurrence loops as libraries and papers write them: compiled with seqfuse each
becomes one seqfuse.scan / seqfuse.ssd and equals eager (outputs, final states, gradients);
nonlinear or coupled cells (LSTM, GRU, tanh, h·h) are near misses and left alone."""
import time

import pytest
import torch
import torch.nn.functional as F

import seqfuse
from golden.test_no_silent_rejection import loop
from helpers import check_against_eager, rel_err

T = 12


def rand(*shape, scale=1.0, positive=False):
    x = torch.rand(*shape) if positive else torch.randn(*shape)
    return (x * scale).requires_grad_()


def only(report, kind, n=1):
    assert report.count(kind) == n, str(report)
    assert report.count("scan") + report.count("ssd") == n, str(report)
    return [r.ir for r in report.rewrites if r.kind == kind]


# --- Mamba-1 (diagonal state, readout folded) -------------------------------------------

def hf_mamba_slow(hidden, dt, A, B, C, D, z):
    """transformers' MambaMixer.slow_forward after the convolution (hidden, dt, z: (b, d, l))."""
    batch, dim, seq_len = hidden.shape
    dtype = hidden.dtype
    discrete_A = torch.exp(A[None, :, None, :] * dt[:, :, :, None])
    deltaB_u = dt[:, :, :, None] * B[:, None, :, :].float() * hidden[:, :, :, None].float()
    ssm_state = torch.zeros(batch, dim, A.shape[1], dtype=dtype)
    scan_outputs = []
    for i in range(seq_len):
        ssm_state = discrete_A[:, :, i, :] * ssm_state + deltaB_u[:, :, i, :]
        scan_output = torch.matmul(ssm_state.to(dtype), C[:, i, :].unsqueeze(-1))
        scan_outputs.append(scan_output[:, :, 0])
    scan_output = torch.stack(scan_outputs, dim=-1)
    scan_output = scan_output + (hidden * D[None, :, None])
    scan_output = scan_output * F.silu(z)
    return scan_output, ssm_state


def test_hf_mamba_slow_path():
    b, d, n = 2, 6, 4
    args = (rand(b, d, T), F.softplus(torch.randn(b, d, T)).requires_grad_(), -rand(d, n, positive=True),
            rand(b, T, n), rand(b, T, n), rand(d), rand(b, d, T))
    report = check_against_eager(hf_mamba_slow, *args)
    (ir,) = only(report, "scan")
    assert "c=%" in ir, ir


def selective_scan_ref(u, delta, A, B, C, D, z):
    """mamba_ssm's selective_scan_ref loop (u, delta, z: (b, d, l); B, C: (b, n, l))."""
    batch, dim, dstate = u.shape[0], A.shape[0], A.shape[1]
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    deltaB_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    x = A.new_zeros((batch, dim, dstate))
    ys = []
    for i in range(u.shape[2]):
        x = deltaA[:, :, i] * x + deltaB_u[:, :, i]
        y = torch.einsum("bdn,bn->bd", x, C[:, :, i])
        ys.append(y)
    y = torch.stack(ys, dim=2)
    out = y + u * D[:, None]
    out = out * F.silu(z)
    return out, x


def test_mamba_ssm_selective_scan_ref():
    b, d, n = 2, 6, 4
    args = (rand(b, d, T), F.softplus(torch.randn(b, d, T)).requires_grad_(), -rand(d, n, positive=True),
            rand(b, n, T), rand(b, n, T), rand(d), rand(b, d, T))
    report = check_against_eager(selective_scan_ref, *args)
    (ir,) = only(report, "scan")
    assert "c=%" in ir, ir


# --- gated RNNs with a diagonal state --------------------------------------------------

def hgrn(x, g):
    """fla's naive HGRN: h = exp(g_t)·h + x_t, o[:, t] = h."""
    B, L, D = x.shape
    h = torch.zeros(B, D)
    o = torch.zeros_like(x)
    for i in range(L):
        h = g[:, i].exp() * h + x[:, i]
        o[:, i] = h
    return o, h


def test_hgrn():
    report = check_against_eager(hgrn, rand(2, T, 8), -rand(2, T, 8, positive=True))
    only(report, "scan")


def hgrn_h0_reversed(x, g, h0):
    h = h0
    o = torch.zeros_like(x)
    for i in range(x.shape[1] - 1, -1, -1):
        h = g[:, i].exp() * h + x[:, i]
        o[:, i] = h
    return o, h


def test_initial_state_and_reversed_loop():
    report = check_against_eager(hgrn_h0_reversed, rand(2, T, 8), -rand(2, T, 8, positive=True), rand(2, 8))
    (ir,) = only(report, "scan")
    assert "reverse=true" in ir and "h0=%" in ir, ir


def lru(u, nu_log, theta_log, B_re, B_im, C_re, C_im):
    """LRU: complex diagonal decay lam = exp(-exp(nu) + i·exp(theta)); y_t = Re(C h_t)."""
    lam = torch.exp(torch.complex(-torch.exp(nu_log), torch.exp(theta_log)))
    Bu = torch.einsum("nd,btd->btn", torch.complex(B_re, B_im), u.to(torch.complex64))
    C = torch.complex(C_re, C_im)
    h = torch.zeros(u.shape[0], lam.shape[0], dtype=torch.complex64)
    ys = []
    for t in range(u.shape[1]):
        h = lam * h + Bu[:, t]
        ys.append((h @ C).real)
    return torch.stack(ys, 1)


def test_lru_complex_decay():
    n, d = 6, 4
    report = check_against_eager(lru, rand(2, T, d), rand(n, scale=0.5), rand(n, scale=0.5), rand(n, d), rand(n, d),
                                 rand(n, d), rand(n, d))
    only(report, "scan")


def test_lru_with_one_sequence_and_one_input_channel_stays_a_scan():
    # fuzz scan #74 (seed 101): with batch 1 and one input channel the vector state (1, N) and the readout
    # h @ C (N, 1) read as an ssd whose value axis was the batch axis, with the complex decay's log summed
    # in real arithmetic: output error 0.43.  A complex decay is a scan's (and the ssd verifier refuses
    # one), and a kept unit axis of c's is read only for states with batch axes before (P, N)
    n = 2
    report = check_against_eager(lru, rand(1, T, 1), rand(n, scale=0.5), rand(n, scale=0.5), rand(n, 1), rand(n, 1),
                                 rand(n, 1), rand(n, 1))
    only(report, "scan")


def s4d_recurrent(u, log_dt, A_re, A_im, B_re, B_im, C_re, C_im):
    """S4D in recurrent mode: ZOH-discretized complex diagonal A, constant over time."""
    dt = torch.exp(log_dt)[:, None]                       # (H, 1)
    A = torch.complex(-torch.exp(A_re), A_im)             # (H, N)
    dA = torch.exp(dt * A)
    dB = (dA - 1) / A * torch.complex(B_re, B_im)
    C = torch.complex(C_re, C_im)
    h = torch.zeros(u.shape[0], A.shape[0], A.shape[1], dtype=torch.complex64)
    ys = []
    for t in range(u.shape[-1]):
        h = dA * h + dB * u[:, :, t, None]
        ys.append(2 * (C * h).sum(-1).real)
    return torch.stack(ys, -1)


def test_s4d_recurrent_mode():
    H, N = 4, 3
    args = (rand(2, H, T), rand(H, scale=0.1), rand(H, N), rand(H, N), rand(H, N), rand(H, N), rand(H, N), rand(H, N))
    report = check_against_eager(s4d_recurrent, *args)
    only(report, "scan")


# --- matrix states: SSD ------------------------------------------------------------------

def naive_recurrent_gla(q, k, v, gk, scale=None):
    """fla's naive_recurrent_gla ((B, H, T, K) layout, fp32 state, outputs in a preallocated buffer)."""
    dtype = q.dtype
    q, k, v, gk = map(lambda x: x.float(), (q, k, v, gk))
    B, H, L, K, V = *q.shape, v.shape[-1]
    o = torch.zeros_like(v)
    scale = K ** -0.5 if scale is None else scale
    h = q.new_zeros(B, H, K, V, dtype=torch.float32)
    for i in range(L):
        q_i = q[:, :, i] * scale
        k_i = k[:, :, i]
        v_i = v[:, :, i]
        gk_i = gk[:, :, i].exp()
        kv_i = k_i[..., None] * v_i[..., None, :]
        h = h * gk_i[..., None] + kv_i
        o_i = (q_i[..., None] * h).sum(-2)
        o[:, :, i] = o_i
    return o.to(dtype), h


def test_naive_recurrent_gla():
    q, k, v = rand(2, 3, T, 4), rand(2, 3, T, 4), rand(2, 3, T, 5)
    gk = F.logsigmoid(torch.randn(2, 3, T, 4)).requires_grad_()
    report = check_against_eager(naive_recurrent_gla, q, k, v, gk)
    (ir,) = only(report, "ssd")
    assert "decay=vector" in ir, ir


def naive_recurrent_simple_gla(q, k, v, g, h0):
    """Simple GLA: one gate per head (scalar decay), initial state given."""
    B, H, L, K = q.shape
    o = torch.zeros_like(v)
    h = h0
    for i in range(L):
        h = h * g[:, :, i].exp()[..., None, None] + k[:, :, i, :, None] * v[:, :, i, None, :]
        o[:, :, i] = torch.einsum("bhk,bhkv->bhv", q[:, :, i] * K ** -0.5, h)
    return o, h


def test_naive_recurrent_simple_gla_with_h0():
    q, k, v = rand(2, 3, T, 4), rand(2, 3, T, 4), rand(2, 3, T, 5)
    g = F.logsigmoid(torch.randn(2, 3, T)).requires_grad_()
    report = check_against_eager(naive_recurrent_simple_gla, q, k, v, g, rand(2, 3, 4, 5))
    (ir,) = only(report, "ssd")
    assert "decay=scalar" in ir and "h0=%" in ir, ir


def naive_recurrent_linear_attn(q, k, v):
    """Linear attention, (B, T, H, D) layout, einsum outer product and readout, empty_like buffer."""
    B, L, H, K = q.shape
    o = torch.empty_like(v)
    S = torch.zeros(B, H, K, v.shape[-1])
    for t in range(L):
        S = S + torch.einsum("bhk,bhv->bhkv", k[:, t], v[:, t])
        o[:, t] = torch.einsum("bhk,bhkv->bhv", q[:, t] * K ** -0.5, S)
    return o, S


def test_naive_recurrent_linear_attn():
    report = check_against_eager(naive_recurrent_linear_attn, rand(2, T, 3, 4), rand(2, T, 3, 4), rand(2, T, 3, 5))
    (ir,) = only(report, "ssd")
    assert "decay=none" in ir, ir


def retnet_recurrent(q, k, v):
    """RetNet's recurrent form: a constant decay gamma per head, S = γ·S + kᵀv, o = q·S."""
    B, H, L, K = q.shape
    gamma = 1 - 2 ** (-5 - torch.arange(H, dtype=torch.float32))
    S = torch.zeros(B, H, K, v.shape[-1])
    outs = []
    for t in range(L):
        S = gamma[None, :, None, None] * S + k[:, :, t].unsqueeze(-1) * v[:, :, t].unsqueeze(-2)
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], S))
    return torch.stack(outs, 2), S


def test_retnet_recurrent():
    report = check_against_eager(retnet_recurrent, rand(2, 3, T, 4), rand(2, 3, T, 4), rand(2, 3, T, 5))
    (ir,) = only(report, "ssd")
    assert "decay=scalar" in ir, ir


def mamba2_recurrent(x, dt, A, B, C):
    """Mamba-2's recurrent step: h = exp(dt·A)·h + x ⊗ B (B, C shared by heads), y = h·C."""
    batch, L, H, P = x.shape
    dA = torch.exp(dt * A)                      # (b, L, H)
    h = torch.zeros(batch, H, P, B.shape[-1])
    ys = []
    for t in range(L):
        h = h * dA[:, t, :, None, None] + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, None, None, :]
        ys.append(torch.einsum("bhpn,bn->bhp", h, C[:, t]))
    return torch.stack(ys, 1), h


def test_mamba2_recurrent():
    args = (rand(2, T, 3, 4), F.softplus(torch.randn(2, T, 3)).requires_grad_(), -rand(3, positive=True),
            rand(2, T, 5), rand(2, T, 5))
    report = check_against_eager(mamba2_recurrent, *args)
    (ir,) = only(report, "ssd")
    assert "decay=scalar" in ir, ir


def reversed_linear_attn(q, k, v):
    o = torch.zeros_like(v)
    S = torch.zeros(q.shape[0], q.shape[1], q.shape[-1], v.shape[-1])
    for t in range(q.shape[2] - 1, -1, -1):
        S = 0.9 * S + k[:, :, t, :, None] * v[:, :, t, None, :]
        o[:, :, t] = torch.einsum("bhk,bhkv->bhv", q[:, :, t], S)
    return o, S


def test_reversed_matrix_state():
    report = check_against_eager(reversed_linear_attn, rand(2, 3, T, 4), rand(2, 3, T, 4), rand(2, 3, T, 5))
    only(report, "ssd")


# --- several carried values, bidirectional ---------------------------------------------

def two_scans(x, a1, a2):
    h1 = torch.zeros(x.shape[0], x.shape[2])
    h2 = torch.zeros(x.shape[0], x.shape[2])
    ys = []
    for t in range(x.shape[1]):
        h1 = torch.sigmoid(a1[:, t]) * h1 + x[:, t]
        h2 = torch.sigmoid(a2[:, t]) * h2 - 0.5 * x[:, t]
        ys.append(h1 * h2)
    return torch.stack(ys, 1), h1, h2


def test_two_carried_values():
    report = check_against_eager(two_scans, rand(2, T, 5), rand(2, T, 5), rand(2, T, 5))
    only(report, "scan", 2)


def bidirectional(x, g):
    """Hydra/Caduceus style: a forward and a reversed scan over the same sequence."""
    hf = torch.zeros(x.shape[0], x.shape[2])
    hb = torch.zeros(x.shape[0], x.shape[2])
    fw, bw = [], []
    for t in range(x.shape[1]):
        hf = torch.sigmoid(g[:, t]) * hf + x[:, t]
        fw.append(hf)
    for t in range(x.shape[1] - 1, -1, -1):
        hb = torch.sigmoid(g[:, t]) * hb + x[:, t]
        bw.append(hb)
    return torch.stack(fw, 1) + torch.stack(bw[::-1], 1)


def test_bidirectional_pair():
    report = check_against_eager(bidirectional, rand(2, T, 5), rand(2, T, 5))
    irs = only(report, "scan", 2)
    assert sum("reverse=true" in ir for ir in irs) == 1, irs


# --- negatives: nonlinear or coupled cells stay as they are ---------------------------------

def lstm_cell_loop(x, W, U, b):
    h = torch.zeros(x.shape[0], U.shape[0])
    c = torch.zeros(x.shape[0], U.shape[0])
    outs = []
    for t in range(x.shape[1]):
        i, f, g, o = (x[:, t] @ W + h @ U + b).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs, 1), h, c


def gru_cell_loop(x, W, U):
    h = torch.zeros(x.shape[0], U.shape[0])
    outs = []
    for t in range(x.shape[1]):
        xr, xz, xn = (x[:, t] @ W).chunk(3, -1)
        hr, hz, hn = (h @ U).chunk(3, -1)
        r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
        n = torch.tanh(xn + r * hn)
        h = (1 - z) * n + z * h
        outs.append(h)
    return torch.stack(outs, 1)


def tanh_rnn(x, a):
    h = torch.zeros(x.shape[0], x.shape[2])
    outs = []
    for t in range(x.shape[1]):
        h = torch.tanh(a * h + x[:, t])
        outs.append(h)
    return torch.stack(outs, 1)


def square_rnn(x):
    h = torch.zeros(x.shape[0], x.shape[2])
    outs = []
    for t in range(x.shape[1]):
        h = h * h * 0.1 + x[:, t]
        outs.append(h)
    return torch.stack(outs, 1)


@pytest.mark.parametrize("fn,args,reason", [
    (lstm_cell_loop, lambda: (rand(2, T, 3), rand(3, 16), rand(4, 16), rand(16)), "coupled"),
    (gru_cell_loop, lambda: (rand(2, T, 3), rand(3, 12), rand(4, 12)), "not"),
    (tanh_rnn, lambda: (rand(2, T, 4), rand(4)), "tanh"),
    (square_rnn, lambda: (rand(2, T, 4, scale=0.3),), "multiplied by itself"),
])
def test_nonlinear_cells_are_near_misses(fn, args, reason):
    report = check_against_eager(fn, *args())
    assert report.count("scan") == 0 and report.count("ssd") == 0, str(report)
    misses = [m for m in report.near_misses if m.kind == "scan"]
    assert misses and reason in misses[0].reason, str(report)
    assert misses[0].location != "?", str(report)


# --- linear compile time --------------------------------------------------------------

def test_long_loop_is_one_op_and_pass_is_fast():
    """T = 512 unrolled steps (~5k nodes) become one op; the pass's own time is printed."""
    from seqfuse.passes.loops import LoopPass
    spent = []
    run = LoopPass.run

    def timed(self, ctx):
        t0 = time.perf_counter()
        run(self, ctx)
        spent.append(time.perf_counter() - t0)

    LoopPass.run = timed
    try:
        x, g = torch.randn(1, 512, 4), -torch.rand(1, 512, 4)
        report = seqfuse.explain(hgrn, x, g, options={"downstream": "eager"})
    finally:
        LoopPass.run = run
    assert report.count("scan") == 1, str(report)
    print(f"loops pass at T=512: {spent[0] * 1e3:.1f} ms")
    ref = hgrn(x, g)
    for a, b in zip(report.output, ref):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def retnet_learned_decay(q, k, v, gamma):
    S = torch.zeros(q.shape[0], q.shape[1], q.shape[-1], v.shape[-1])
    outs = []
    for t in range(q.shape[2]):
        S = gamma[None, :, None, None] * S + k[:, :, t].unsqueeze(-1) * v[:, :, t].unsqueeze(-2)
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], S))
    return torch.stack(outs, 2), S


def test_unknown_gate_sign_is_a_scan_and_a_near_miss():
    # gamma is a plain input: its log is not known to exist, so no ssd; the scan over the whole
    # (K, V) state is still exact
    report = check_against_eager(retnet_learned_decay, rand(2, 3, T, 4), rand(2, 3, T, 4), rand(2, 3, T, 5),
                                 rand(3, positive=True))
    only(report, "scan")
    assert any("gate sign unknown" in m.reason for m in report.near_misses), str(report)


# --- dynamic=True: symbolic batch / channel sizes, T specialized by Dynamo's unrolling ----------

DYNAMIC_CASES = {
    "hf_mamba_slow": (hf_mamba_slow, lambda: (
        rand(2, 6, T), F.softplus(torch.randn(2, 6, T)).requires_grad_(), -rand(6, 4, positive=True),
        rand(2, T, 4), rand(2, T, 4), rand(6), rand(2, 6, T)), "scan", 1, ["c=%"]),
    "gla": (naive_recurrent_gla, lambda: (
        rand(2, 3, T, 4), rand(2, 3, T, 4), rand(2, 3, T, 5),
        F.logsigmoid(torch.randn(2, 3, T, 4)).requires_grad_()), "ssd", 1, ["decay=vector"]),
    "linear_attn": (naive_recurrent_linear_attn, lambda: (
        rand(2, T, 3, 4), rand(2, T, 3, 4), rand(2, T, 3, 5)), "ssd", 1, ["decay=none"]),
    "simple_gla_h0": (naive_recurrent_simple_gla, lambda: (
        rand(2, 3, T, 4), rand(2, 3, T, 4), rand(2, 3, T, 5), F.logsigmoid(torch.randn(2, 3, T)).requires_grad_(),
        rand(2, 3, 4, 5)), "ssd", 1, ["decay=scalar", "h0=%"]),
    "mamba2": (mamba2_recurrent, lambda: (
        rand(2, T, 3, 4), F.softplus(torch.randn(2, T, 3)).requires_grad_(), -rand(3, positive=True),
        rand(2, T, 5), rand(2, T, 5)), "ssd", 1, ["decay=scalar"]),
    "two_carried": (two_scans, lambda: (rand(2, T, 5), rand(2, T, 5), rand(2, T, 5)), "scan", 2, []),
    "reversed": (reversed_linear_attn, lambda: (
        rand(2, 3, T, 4), rand(2, 3, T, 4), rand(2, 3, T, 5)), "ssd", 1, []),
    "hgrn_h0_reversed": (hgrn_h0_reversed, lambda: (
        rand(2, T, 4), -rand(2, T, 4, positive=True), rand(2, 4)), "scan", 1, ["reverse=true"]),
}


@pytest.mark.parametrize("name", list(DYNAMIC_CASES))
def test_dynamic_shapes_same_rewrite_as_static(name):
    # with dynamic=True the batch / head / channel sizes are symbols (T is a Python int: Dynamo
    # unrolls the loop); the loop is re-rolled to the same op as with static shapes, and outputs,
    # final states and gradients equal eager
    fn, make, kind, n, attrs = DYNAMIC_CASES[name]
    static = seqfuse.explain(fn, *make(), options={"downstream": "eager"})
    report = check_against_eager(fn, *make(), dynamic=True)
    assert report.count(kind) == static.count(kind) == n, (str(static), str(report))
    assert report.count("scan") + report.count("ssd") == n, str(report)
    assert not [m for m in report.near_misses if m.kind in ("scan", "ssd")], str(report)
    for ir in [r.ir for r in report.rewrites if r.kind == kind]:
        for a in attrs:
            assert a in ir, (a, ir)


@pytest.mark.parametrize("fn,shapes,kind", [
    (hgrn, [(T, 8), (T, 8)], "scan"),
    (naive_recurrent_gla, [(3, T, 4), (3, T, 4), (3, T, 5), (3, T, 4)], "ssd"),
], ids=["hgrn_scan", "gla_ssd"])
def test_dynamic_loop_is_one_graph_for_two_batch_sizes(fn, shapes, kind):
    # one compiled graph serves both batch sizes (the rewrite adds no guard on the symbols), and
    # the IR op, not the unrolled loop, runs at each call
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    seqfuse.reset_counters()
    compiled = torch.compile(fn, backend="seqfuse", dynamic=True, options={"downstream": "eager"})
    for calls, batch in enumerate((2, 7), 1):   # sizes no other axis has (duck sizing would tie them)
        args = [torch.randn(batch, *s) for s in shapes]
        args[-1] = -args[-1].abs()          # a decay: exp of a non-positive gate
        for got, want in zip(compiled(*args), fn(*args)):
            torch.testing.assert_close(got, want)
        assert sum(seqfuse.counters().get(kind, {}).values()) == calls, seqfuse.counters()
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def chunked_simple_gla(q, k, v, g, chunk=16):
    """A chunked simple-GLA program as fla's naive_chunk_simple_gla writes it (BHTD, T a
    multiple of ``chunk``): a loop over chunks carrying the state S."""
    B, H, T, K = q.shape
    q, k, v, g = (x.reshape(B, H, T // chunk, chunk, -1) for x in (q, k, v, g.unsqueeze(-1)))
    decay = g.squeeze(-1).cumsum(-1)
    L = (decay.unsqueeze(-1) - decay.unsqueeze(-2)).tril().exp().tril()
    S = k.new_zeros(B, H, K, v.shape[-1])
    o = torch.zeros_like(v)
    for i in range(T // chunk):
        q_i, k_i, v_i = q[:, :, i], k[:, :, i], v[:, :, i]
        attn = q_i @ k_i.transpose(-1, -2) * L[:, :, i]
        o[:, :, i] = (q_i * decay[:, :, i, :, None].exp()) @ S + attn @ v_i
        S = S * decay[:, :, i, -1, None, None].exp() + \
            (k_i * (decay[:, :, i, -1, None] - decay[:, :, i]).exp()[..., None]).transpose(-1, -2) @ v_i
    return o.reshape(B, H, T, -1), S


def test_chunk_loop_with_a_partial_last_step_is_one_ssd():
    # 8 chunks: the re-roller once indexed past a shorter step's carried values (IndexError,
    # a pipeline failure); the chunk loop is re-rolled (a scan over the chunks) and the whole
    # program is one ssd over the sequence (ssd_chunks), equal to eager
    q, k, v = (torch.randn(1, 2, 128, 8, requires_grad=True) for _ in range(3))
    g = (-torch.rand(1, 2, 128)).requires_grad_()
    report = check_against_eager(chunked_simple_gla, q, k, v, g)
    assert not report.near_misses, str(report)
    assert report.count("ssd") == 1 and report.count("scan") == 0, str(report)


def readout_through_a_view_per_step(a, b, C):
    # ``C[:, None, i]``: Dynamo unrolls it into a new unsqueeze(C, 1) at every step, then the select
    h = torch.zeros_like(b[:, :, 0])
    ys = []
    for i in range(b.shape[2]):
        h = a[:, :, i] * h + b[:, :, i]
        ys.append((h * C[:, None, i]).sum(-1))
    return torch.stack(ys, dim=-1), h


def test_slices_of_a_view_recomputed_per_step():
    report = check_against_eager(readout_through_a_view_per_step, rand(2, 3, T, 4, positive=True),
                                 rand(2, 3, T, 4), rand(2, T, 4))
    (ir,) = only(report, "scan")
    assert "c=%" in ir, ir


def test_hf_mamba_slow_path_in_bf16_rounds_the_states_for_the_readout(monkeypatch):
    # a bf16 model: fp32 states (A and the .float() casts), matmul(h.to(bf16), C_t): the scan takes
    # readout_dtype=bf16 and rounds the states as the program does
    b, d, n = 2, 6, 4
    bf = torch.bfloat16
    args = (rand(b, d, T).to(bf), F.softplus(torch.randn(b, d, T)).to(bf).requires_grad_(),
            -rand(d, n, positive=True), rand(b, T, n).to(bf), rand(b, T, n).to(bf).requires_grad_(), rand(d),
            rand(b, d, T).to(bf))
    report = check_against_eager(hf_mamba_slow, *args)
    (ir,) = only(report, "scan")
    assert "readout_dtype=bf16" in ir and "c=%" in ir, ir
    # the rounding is what makes the outputs agree: the same fold without it is measurably further
    with torch.no_grad():
        ref = hf_mamba_slow(*args)[0].double()
        got = torch.compile(hf_mamba_slow, backend="seqfuse", options={"downstream": "eager"})(*args)[0]
        torch._dynamo.reset()
        monkeypatch.setattr("seqfuse.passes.loops.readout_rounding", lambda *a: None)
        plain = torch.compile(hf_mamba_slow, backend="seqfuse", options={"downstream": "eager"})(*args)[0]
        torch._dynamo.reset()
    assert (plain.double() - ref).abs().max() > 4 * (got.double() - ref).abs().max()


# --- loops of two or three steps --------------------------------------------------------

def matrix_state_loop(q, k, v, g, reverse=False, scale=1.0, stacked_after=False):
    """S = S·exp(g_t) + k_t ⊗ v_t, o_t = q_t·S (fla's naive recurrent GLA with a scalar gate), outputs
    gathered by a stack after the loop (then transposed and scaled: code after the loop in the last step)."""
    S = q.new_zeros(q.shape[0], q.shape[1], q.shape[-1], v.shape[-1])
    outs = []
    for t in (reversed(range(q.shape[2])) if reverse else range(q.shape[2])):
        S = S * g[:, :, t].exp()[..., None, None] + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append((q[:, :, t, :, None] * S).sum(-2))
    o = torch.stack(outs[::-1] if reverse else outs, 2)
    return (o.transpose(1, 2) * scale if stacked_after else o), S


@pytest.mark.parametrize("steps", [2, 3])
@pytest.mark.parametrize("reverse,after", [(False, False), (True, False), (False, True)],
                         ids=["forward", "reversed", "transposed_after"])
def test_two_and_three_step_matrix_state_loops(steps, reverse, after):
    # with two steps the template is the last step, which also holds the stack gathering both steps'
    # outputs (code after the loop): it is left out of the template (silent before: neither rewritten
    # nor a near miss)
    g = torch.Generator().manual_seed(steps)
    q, k = (torch.randn(1, 2, steps, 4, generator=g).requires_grad_() for _ in range(2))
    v = torch.randn(1, 2, steps, 3, generator=g).requires_grad_()
    a = (-torch.rand(1, 2, steps, generator=g)).requires_grad_()
    report = check_against_eager(lambda *x: matrix_state_loop(*x, reverse=reverse, scale=2.0, stacked_after=after),
                                 q, k, v, a)
    only(report, "ssd")


def test_two_step_loop_with_a_value_dim_of_1_is_a_scan():
    # the fuzzer's crash (ssd case 64, seed 71): the stack right after the body was the anchor before
    # which the rewrite emits; it was erased (replaced by the whole vector) before the final state's
    # select was emitted before it, which left that select linked forward only: AOTAutograd's
    # interpreter then failed ("referenced nonexistent value")
    g = torch.Generator().manual_seed(5)
    q, k = (torch.randn(2, 1, 2, 5, generator=g).requires_grad_() for _ in range(2))
    v = torch.randn(2, 1, 2, 1, generator=g).requires_grad_()

    def const_decay(q, k, v):
        S = q.new_zeros(q.shape[0], q.shape[1], q.shape[-1], v.shape[-1])
        outs = []
        for t in range(q.shape[2]):
            S = 0.9 * S + torch.einsum("bhk,bhv->bhkv", k[:, :, t], v[:, :, t])
            outs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], S))
        return torch.stack(outs, 2), S

    report = check_against_eager(const_decay, q, k, v)
    # one op (a value dim of 1: the loops pass may read it as a scan or an ssd), no near miss
    assert report.count("scan") + report.count("ssd") == 1 and not report.near_misses, str(report)


@pytest.mark.parametrize("steps", [2, 3, 8])
def test_state_started_as_zeros_like_a_slice(steps):
    # zeros_like(x[:, 0]) reads step 0's slice for its shape: an invariant, not a node of step 0 (which
    # then lacked the carried read, and loops of 2-3 steps were silent); the second x[:, 0] of step 0
    # reads the first
    g = torch.Generator().manual_seed(steps)
    a, x = torch.rand(2, steps, 3, generator=g).requires_grad_(), torch.randn(2, steps, 3, generator=g).requires_grad_()
    report = check_against_eager(loop, a, x)   # h starts as zeros_like(x[:, 0])
    only(report, "scan")


def buffer_carried(a, x):
    """h[:, t + 1] = a_t·h[:, t] + x_t: the state carried through a buffer, written one index ahead."""
    h = torch.zeros(x.shape[0], x.shape[1] + 1, x.shape[2])
    for t in range(x.shape[1]):
        h[:, t + 1] = a[:, t] * h[:, t] + x[:, t]
    return h[:, 1:]


def buffer_carried_h0(a, x, h0):
    """h[:, 0] = h0, then h[:, t + 1] = a_t·h[:, t] + x_t; every state returned, the initial one too."""
    h = x.new_zeros(x.shape[0], x.shape[1] + 1, x.shape[2])
    h[:, 0] = h0
    for t in range(x.shape[1]):
        h[:, t + 1] = a[:, t] * h[:, t] + x[:, t]
    return h


def buffer_carried_state(q, k, v, g):
    """S[:, t + 1] = S[:, t]·g_t + k_t ⊗ v_t in a (B, T + 1, K, V) buffer, read out after the loop."""
    S = torch.zeros(k.shape[0], k.shape[1] + 1, k.shape[2], v.shape[-1])
    for t in range(k.shape[1]):
        S[:, t + 1] = S[:, t] * g[:, t, :, None] + k[:, t, :, None] * v[:, t, None, :]
    return torch.einsum("btk,btkv->btv", q, S[:, 1:])


def buffer_written_behind(a, x):
    """out[:, t - 1] = h_t for t >= 1: the writes one index behind the reads."""
    h = torch.zeros(x.shape[0], x.shape[2])
    out = torch.zeros(x.shape[0], x.shape[1] - 1, x.shape[2])
    for t in range(1, x.shape[1]):
        h = a[:, t] * h + x[:, t]
        out[:, t - 1] = h
    return out


def buffer_second_order(a, x):
    """h[:, t + 2] = a_t·h[:, t] + x_t: each step reads the state two steps back (not first order)."""
    h = torch.zeros(x.shape[0], x.shape[1] + 2, x.shape[2])
    for t in range(x.shape[1]):
        h[:, t + 2] = a[:, t] * h[:, t] + x[:, t]
    return h


def test_buffer_carried_recurrence_is_one_scan():
    # each step's read of h[:, t] is the previous step's write (canonicalize.forward_slot_reads), and
    # the writes one index ahead of the reads are the op's outputs at index + 1 (loop_reroll's write
    # offsets); h[:, 0], which no step writes, is the initial state.  Eager's own backward fails on
    # this program (h[:, t], saved by the product, is overwritten through h), so the values are
    # compared without gradients; the other tests below train
    a, x = torch.rand(2, 8, 3), torch.randn(2, 8, 3)
    report = check_against_eager(buffer_carried, a, x, grads=False)
    (ir,) = only(report, "scan")
    assert "h0=%select" in ir, ir


def test_buffer_carried_recurrence_with_an_initial_state_written_first_trains():
    # eager cannot differentiate the buffer program (see above); the compiled one can, and its
    # gradients are those of the same recurrence written with a list
    def listed(a, x, h0):
        hs = [h0]
        for t in range(x.shape[1]):
            hs.append(a[:, t] * hs[-1] + x[:, t])
        return torch.stack(hs, 1)

    g = torch.Generator().manual_seed(5)
    a = torch.rand(2, 8, 3, generator=g).requires_grad_()
    x, h0 = torch.randn(2, 8, 3, generator=g).requires_grad_(), torch.randn(2, 3, generator=g).requires_grad_()
    (ir,) = only(check_against_eager(buffer_carried_h0, a, x, h0, grads=False), "scan")
    assert "h0=%l_h0_" in ir, ir
    torch._dynamo.reset()
    out = torch.compile(buffer_carried_h0, backend="seqfuse", options={"downstream": "aot_eager"})(a, x, h0)
    want = listed(a, x, h0)
    w = torch.randn(want.shape, generator=g)
    got, exp = (torch.autograd.grad(o, (a, x, h0), w) for o in (out, want))
    assert rel_err(out, want) < 1e-6
    for name, p_, q_ in zip("a x h0".split(), got, exp):
        assert rel_err(p_, q_) < 1e-6, name


def test_buffer_carried_matrix_state_is_lifted():
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 6, n, generator=g) for n in (4, 4, 5))
    report = check_against_eager(buffer_carried_state, q, k, v, torch.rand(2, 6, 4, generator=g), grads=False)
    assert report.count("scan") + report.count("ssd") == 1 and not report.near_misses, str(report)


def test_writes_one_index_behind_the_reads_are_one_scan():
    g = torch.Generator().manual_seed(7)
    a, x = torch.rand(2, 8, 3, generator=g).requires_grad_(), torch.randn(2, 8, 3, generator=g).requires_grad_()
    only(check_against_eager(buffer_written_behind, a, x), "scan")


def buffer_read_behind(a, x):
    """h[:, t] = a_t·h[:, t - 1] + x_t for t >= 1 after h[:, 0] = x_0: the common spelling of a scan
    into a preallocated buffer (each step reads the slot the previous step wrote)."""
    h = torch.zeros_like(x)
    h[:, 0] = x[:, 0]
    for t in range(1, x.shape[1]):
        h[:, t] = a[:, t] * h[:, t - 1] + x[:, t]
    return h


def buffer_read_behind_last_axis(a, x):
    """The same along the last axis, the first step reading zeros_like(x[..., 0])."""
    h = torch.zeros_like(x)
    for t in range(x.shape[-1]):
        prev = h[..., t - 1] if t > 0 else torch.zeros_like(x[..., 0])
        h[..., t] = a[..., t] * prev + x[..., t]
    return h


def buffer_read_ahead_reversed(a, x):
    """The reversed scan: h[:, t] = a_t·h[:, t + 1] + x_t from the end."""
    h = torch.zeros_like(x)
    T = x.shape[1]
    h[:, T - 1] = x[:, T - 1]
    for t in range(T - 2, -1, -1):
        h[:, t] = a[:, t] * h[:, t + 1] + x[:, t]
    return h


@pytest.mark.parametrize("fn,reverse", [(buffer_read_behind, False), (buffer_read_behind_last_axis, False),
                                        (buffer_read_ahead_reversed, True)])
def test_a_buffer_read_one_slot_behind_its_write_is_one_scan(fn, reverse):
    # before forward_slot_reads: near misses ("a lag, not a recurrence"), or silent along the last axis
    g = torch.Generator().manual_seed(8)
    a, x = torch.rand(2, 8, 3, generator=g), torch.randn(2, 8, 3, generator=g)
    (ir,) = only(check_against_eager(fn, a, x, grads=False), "scan")
    assert f"reverse={'true' if reverse else 'false'}" in ir, ir


def test_a_second_order_recurrence_through_a_buffer_is_a_near_miss():
    a, x = torch.rand(2, 8, 3), torch.randn(2, 8, 3)
    report = check_against_eager(buffer_second_order, a, x, grads=False)
    assert report.count("scan") == 0 and report.count("ssd") == 0, str(report)
    assert any("two or more steps before" in m.reason for m in report.near_misses), str(report)


# --- loops over unbind / split / narrow pieces ------------------------------------------

def unbind_gla(q, k, v, g):
    """for q_t, k_t, ... in zip(q.unbind(2), ...): the steps read unbind's pieces."""
    S = q.new_zeros(q.shape[0], q.shape[1], q.shape[-1], v.shape[-1])
    outs = []
    for qt, kt, vt, gt in zip(q.unbind(2), k.unbind(2), v.unbind(2), g.unbind(2)):
        S = S * gt.exp()[..., None, None] + kt[..., None] * vt[..., None, :]
        outs.append((qt[..., None] * S).sum(-2))
    return torch.stack(outs, 2), S


def split_gla(q, k, v, g):
    """The steps read x.split(1, 2)'s pieces of length 1 (time kept as an axis)."""
    S = q.new_zeros(q.shape[0], q.shape[1], q.shape[-1], v.shape[-1])
    outs = []
    for qt, kt, vt, gt in zip(q.split(1, 2), k.split(1, 2), v.split(1, 2), g.split(1, 2)):
        S = S * gt.exp()[..., None] + kt.transpose(-1, -2) @ vt
        outs.append(qt @ S)
    return torch.cat(outs, 2)


def narrow_scan(a, x):
    h = torch.zeros_like(x[:, 0])
    ys = []
    for t in range(x.shape[1]):
        h = a.narrow(1, t, 1)[:, 0] * h + x.narrow(1, t, 1)[:, 0]
        ys.append(h)
    return torch.stack(ys, 1)


def gla_inputs(steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(1, 2, steps, 3, generator=g).requires_grad_() for _ in range(2))
    v = torch.randn(1, 2, steps, 4, generator=g).requires_grad_()
    return q, k, v, (-torch.rand(1, 2, steps, generator=g)).requires_grad_()


@pytest.mark.parametrize("steps", [2, 7])
def test_loop_over_unbind_pieces(steps):
    # silent before: unbind's pieces were no per-step slices, so no loop was found
    report = check_against_eager(unbind_gla, *gla_inputs(steps))
    only(report, "ssd")


def test_loop_over_unbind_pieces_dynamic():
    # Dynamo pins the unbound length (the count of pieces is Python-level), so the pieces are read at it
    report = check_against_eager(unbind_gla, *gla_inputs(6), dynamic=True)
    only(report, "ssd")


@pytest.mark.parametrize("steps", [3, 8])
def test_loop_over_split_pieces(steps):
    # the pieces of one step become unsqueeze(select): the update kᵀ·v over the unit axis is an outer
    # product, and the readout q_t·S keeps the unit axis (an ssd, not a scan over all states)
    report = check_against_eager(split_gla, *gla_inputs(steps, seed=1))
    only(report, "ssd")


def test_loop_over_narrow_slices():
    g = torch.Generator().manual_seed(2)
    a, x = torch.rand(2, 9, 3, generator=g).requires_grad_(), torch.randn(2, 9, 3, generator=g).requires_grad_()
    only(check_against_eager(narrow_scan, a, x), "scan")
