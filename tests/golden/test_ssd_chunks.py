"""Chunked programs of linear recurrences (the Mamba-2 SSD algorithm and chunked linear attention)
become one seqfuse.ssd over the whole sequence: each equals eager (outputs, the final state and
all gradients); the report shows exactly one ssd (not the intra-chunk term alone) with the
expected decay and initial state.  Programs that are almost chunked forms (a wrong shift, other
operands in the chunk states, a wrongly padded chunk decay) are not fused: a near miss says why,
the intra-chunk term alone becomes an ssd, and the result still equals eager."""
import pytest
import torch
import torch.nn.functional as F

from helpers import check_against_eager

Q = 8          # chunk length of the test programs
CHUNKED = "chunked form not fused"


def segsum(x):
    """Σ_{j<s<=i} x_s over the last axis, -inf above the diagonal, as the difference cs_i - cs_j of one
    cumulative sum (the naive, less stable form; the listing's stable masked-cumsum segsum of
    mamba_ssm/modules/ssd_minimal.py is in test_ssd_stable_segsum.py)."""
    t = x.size(-1)
    cs = torch.cumsum(x, dim=-1)
    seg = cs[..., :, None] - cs[..., None, :]
    return seg.masked_fill(~torch.tril(torch.ones(t, t, dtype=torch.bool)), -torch.inf)


def ssd_listing(X, A, Bm, C, h0=None, *, shift="ok", states_x=None, pad=(1, 0), order="h0_first"):
    """The chunked SSD of the Mamba-2 paper: X (b, t, h, p), A (b, t, h), Bm / C (b, t, h, n).
    The keyword arguments break one step each (for the negatives)."""
    b, t = X.shape[:2]
    X, A, Bm, C = (z.reshape(b, t // Q, Q, *z.shape[2:]) for z in (X, A, Bm, C))
    A = A.permute(0, 3, 1, 2)                                   # (b, h, chunks, Q)
    A_cumsum = torch.cumsum(A, dim=-1)
    Y_diag = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, Bm, torch.exp(segsum(A)), X)
    decay_states = torch.exp(A_cumsum[:, :, :, -1:] - A_cumsum)
    states = torch.einsum("bclhn,bhcl,bclhp->bchpn", Bm, decay_states, X if states_x is None else X * states_x)
    first = torch.zeros_like(states[:, :1]) if h0 is None else h0[:, None]
    states = torch.cat([first, states] if order == "h0_first" else [states, first], dim=1)
    decay_chunk = torch.exp(segsum(F.pad(A_cumsum[:, :, :, -1], pad)))
    new_states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    entering = new_states[:, :-1] if shift == "ok" else new_states[:, 1:]
    final = new_states[:, -1]
    Y_off = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, entering, torch.exp(A_cumsum))
    return (Y_diag + Y_off).reshape(b, t, *Y_off.shape[3:]), final


def broadcast_sum_form(x, dt_A, Bm, C):
    """The same algorithm written as transformers' Mamba-2 torch path writes it: padding to a
    multiple of the chunk, broadcast-multiply + sum instead of einsum, a masked-cumsum segment sum."""
    b, t, h, p = x.shape
    pad = (Q - t % Q) % Q

    def chunks(z):
        z = F.pad(z, (0, 0) * (z.dim() - 2) + (0, pad))
        return z.reshape(b, -1, Q, *z.shape[2:])

    def segment_sum(a):
        q = a.size(-1)
        a = a[..., None].expand(*a.size(), q).masked_fill(~torch.tril(torch.ones(q, q, dtype=torch.bool), -1), 0)
        return torch.cumsum(a, dim=-2).masked_fill(~torch.tril(torch.ones(q, q, dtype=torch.bool)), -torch.inf)

    x, A, Bm, C = chunks(x), chunks(dt_A).permute(0, 3, 1, 2), chunks(Bm), chunks(C)
    A_cumsum = torch.cumsum(A, dim=-1)
    L = torch.exp(segment_sum(A))
    G = (C[:, :, :, None, :, :] * Bm[:, :, None, :, :, :]).sum(-1)
    M = (G[..., None] * L.permute(0, 2, 3, 4, 1)[..., None]).sum(-1)
    Y_diag = (M[..., None] * x[:, :, None]).sum(3)
    decay_states = torch.exp(A_cumsum[:, :, :, -1:] - A_cumsum)
    B_decay = Bm * decay_states.permute(0, -2, -1, 1)[..., None]
    states = (B_decay[..., None, :] * x[..., None]).sum(dim=2)
    states = torch.cat([torch.zeros_like(states[:, :1]), states], dim=1)
    decay_chunk = torch.exp(segment_sum(F.pad(A_cumsum[:, :, :, -1], (1, 0)))).transpose(1, 3)
    new_states = (decay_chunk[..., None, None] * states[:, :, None, ...]).sum(dim=1)
    states, final = new_states[:, :-1], new_states[:, -1]
    Y_off = (C[..., None, :] * states[:, :, None, ...]).sum(-1) * torch.exp(A_cumsum).permute(0, 2, 3, 1)[..., None]
    y = (Y_diag + Y_off).reshape(b, -1, h, p)[:, :t]
    return y, final


def chunked_linear_attention(q, k, v):
    """Causal linear attention by chunks (b, h, t, d): per-chunk kᵀv, an exclusive cumulative sum
    over the chunks, plus the masked intra-chunk product."""
    b, h, t, d = q.shape
    q, k, v = (z.reshape(b, h, t // Q, Q, d) for z in (q * d ** -0.5, k, v))
    kv = (k.transpose(-1, -2) @ v).cumsum(2)
    kv = torch.cat([torch.zeros_like(kv[:, :, :1]), kv[:, :, :-1]], dim=2)
    intra = (q @ k.transpose(-1, -2)).masked_fill(torch.triu(torch.ones(Q, Q, dtype=torch.bool), 1), 0) @ v
    return (q @ kv + intra).reshape(b, h, t, d)


def ssd_inputs(t=32, b=2, h=2, p=4, n=3, h0=True):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(b, t, h, p, generator=g)
    A = -torch.rand(b, t, h, generator=g) * 2       # strong enough that the chunk decays matter
    Bm, C = torch.randn(b, t, h, n, generator=g), torch.randn(b, t, h, n, generator=g)
    out = [X, A, Bm, C] + ([torch.randn(b, h, p, n, generator=g)] if h0 else [])
    return [z.requires_grad_() for z in out]


def line_of(fn, text):
    """The source line number of ``text`` in ``fn``."""
    import inspect
    lines, first = inspect.getsourcelines(fn)
    return first + next(k for k, line in enumerate(lines) if text in line)


def one_whole_sequence_ssd(report, decay, fn, sum_text):
    """Exactly one ssd, fused (no near miss), located at the program's Y_diag + Y_off."""
    assert report.count("ssd") == 1, str(report)
    assert not [m for m in report.near_misses if m.kind == "ssd"], str(report)
    r = next(r for r in report.rewrites if r.kind == "ssd")
    assert f"decay={decay}" in r.ir, r.ir
    assert f"test_ssd_chunks.py:{line_of(fn, sum_text)}" in r.location, (r.location, line_of(fn, sum_text))
    return r.ir


def test_ssd_listing_with_initial_state_is_one_ssd():
    report = check_against_eager(ssd_listing, *ssd_inputs())
    ir = one_whole_sequence_ssd(report, "scalar", ssd_listing, "(Y_diag + Y_off)")
    assert "h0=%l_h0_" in ir and "a=%" in ir, ir


def test_ssd_listing_batch_of_one():
    """A batch of one: the final state's size-1 batch axis is named like the program's (it once
    failed the build: a pipeline error, the program left unchanged)."""
    report = check_against_eager(ssd_listing, *ssd_inputs(b=1))
    one_whole_sequence_ssd(report, "scalar", ssd_listing, "(Y_diag + Y_off)")


def test_ssd_listing_zero_initial_state():
    report = check_against_eager(ssd_listing, *ssd_inputs(h0=False))
    ir = one_whole_sequence_ssd(report, "scalar", ssd_listing, "(Y_diag + Y_off)")
    assert "h0=" not in ir, ir


@pytest.mark.parametrize("t", [32, 27], ids=["multiple", "padded"])
def test_broadcast_sum_spelling_with_padding(t):
    X, A, Bm, C = ssd_inputs(t=t, h0=False)
    report = check_against_eager(broadcast_sum_form, X, A, Bm, C)
    one_whole_sequence_ssd(report, "scalar", broadcast_sum_form, "(Y_diag + Y_off)")


def test_chunked_linear_attention_is_one_ssd():
    q, k, v = (torch.randn(2, 3, 32, 4, requires_grad=True) for _ in range(3))
    report = check_against_eager(chunked_linear_attention, q, k, v)
    one_whole_sequence_ssd(report, "none", chunked_linear_attention, "q @ kv + intra")


def test_dynamic_length_one_graph():
    """No Python loop: one graph serves several numbers of chunks, each call runs one ssd."""
    from torch._dynamo.utils import counters
    import seqfuse
    counters.clear()
    seqfuse.reset_counters()
    f = torch.compile(ssd_listing, backend="seqfuse", dynamic=True, options={"downstream": "aot_eager"})
    for t in (16, 24, 40):
        args = [z.detach() for z in ssd_inputs(t=t)]
        for got, want in zip(f(*args), ssd_listing(*args)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert counters["stats"]["unique_graphs"] == 1
    assert sum(seqfuse.counters().get("ssd", {}).values()) == 3, seqfuse.counters()


@pytest.mark.parametrize("broken,reason", [
    (dict(shift="wrong"), "all but the last chunk"),
    (dict(states_x=2.0), "b and x"),
    (dict(pad=(0, 1)), "one zero in front"),
    (dict(order="h0_last"), "initial state"),
], ids=["entering_shifted_the_wrong_way", "states_of_other_x", "decay_padded_behind", "h0_after_the_states"])
def test_almost_chunked_forms_are_not_fused(broken, reason):
    def fn(X, A, Bm, C, h0):
        return ssd_listing(X, A, Bm, C, h0, **broken)

    report = check_against_eager(fn, *ssd_inputs())
    misses = [m.reason for m in report.near_misses if m.kind == "ssd"]
    assert any(CHUNKED in r and reason in r for r in misses), misses
    # only the intra-chunk term became an ssd: over the chunks as a batch, without h0
    assert report.count("ssd") == 1, str(report)
    assert "h0=" not in report.rewrites[0].ir


def test_single_chunk_is_left_to_the_intra_chunk_term():
    """One chunk (t == Q): the chunk axis has size 1; the program still equals eager."""
    report = check_against_eager(ssd_listing, *ssd_inputs(t=Q))
    assert report.count("ssd") == 1 and "h0=" not in report.rewrites[0].ir, str(report)
    assert any("single chunk" in m.reason for m in report.near_misses), str(report)


def chunk_loop_gla(q, k, v, g, h0=None, *, read_after_update=False, state_decay=-1):
    """Simple GLA by chunks in a Python loop: q, k (b, h, t, dk), v (b, h, t, dv), g (b, h, t) log
    decays, h0 (b, h, dk, dv).  The state S (dk, dv) entering chunk i is read out, then updated
    S <- S·exp(G_last) + Σ_s exp(G_last - G_s) k_s ⊗ v_s.  t is padded to a multiple of Q (zero
    q, k, v and log decay in the padding).  ``read_after_update`` reads the state after the update,
    ``state_decay=0`` decays the state by the chunk's first cumulative decay (other programs: the
    negatives)."""
    b, h, t, dk = q.shape
    pad = (Q - t % Q) % Q
    q, k, v = (F.pad(z, (0, 0, 0, pad)) for z in (q, k, v))
    n = (t + pad) // Q
    q, k, v = (z.reshape(b, h, n, Q, z.shape[-1]) for z in (q, k, v))
    G = F.pad(g, (0, pad)).reshape(b, h, n, Q).cumsum(-1)
    L = torch.exp((G[..., :, None] - G[..., None, :]).tril()).tril()
    S = q.new_zeros(b, h, dk, v.shape[-1]) if h0 is None else h0
    o = torch.zeros_like(v)
    for i in range(n):
        qi, ki, vi, Gi = q[:, :, i], k[:, :, i], v[:, :, i], G[:, :, i]
        if read_after_update:
            S = S * Gi[..., -1, None, None].exp() + (ki * (Gi[..., -1:] - Gi).exp()[..., None]).transpose(-1, -2) @ vi
        o[:, :, i] = (qi * Gi[..., None].exp()) @ S + (qi @ ki.transpose(-1, -2) * L[:, :, i]) @ vi
        if not read_after_update:
            S = S * Gi[..., state_decay, None, None].exp() + \
                (ki * (Gi[..., -1:] - Gi).exp()[..., None]).transpose(-1, -2) @ vi
    return o.reshape(b, h, n * Q, -1)[:, :, :t], S


def gla_inputs(t=32, b=2, h=2, dk=4, dv=3, h0=True):
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(b, h, t, dk, generator=gen), torch.randn(b, h, t, dk, generator=gen)
    v = torch.randn(b, h, t, dv, generator=gen)
    g = -torch.rand(b, h, t, generator=gen)
    out = [q, k, v, g] + ([torch.randn(b, h, dk, dv, generator=gen)] if h0 else [])
    return [z.requires_grad_() for z in out]


@pytest.mark.parametrize("t", [32, 29], ids=["multiple", "padded"])
@pytest.mark.parametrize("h0", [True, False], ids=["h0", "zero_h0"])
def test_chunk_loop_is_one_ssd(t, h0):
    """The loop over chunks is re-rolled (a scan over the chunks of the flattened state), then
    the program (intra-chunk term + the scan's entering states) is one ssd over the sequence."""
    report = check_against_eager(chunk_loop_gla, *gla_inputs(t=t, h0=h0))
    ir = one_whole_sequence_ssd(report, "scalar", chunk_loop_gla, "o[:, :, i] = ")
    assert report.count("scan") == 0, str(report)
    assert ("h0=%" in ir) == h0, ir   # h0 (dk, dv) is the ssd's (p, n) = (dv, dk): a permute of it


def test_chunk_loop_batch_of_one():
    report = check_against_eager(chunk_loop_gla, *gla_inputs(b=1))
    one_whole_sequence_ssd(report, "scalar", chunk_loop_gla, "o[:, :, i] = ")


def test_chunk_loop_reading_the_updated_state_is_not_fused():
    """Reading the state after the chunk's update is another program (each chunk sees its own
    keys twice), not one ssd over the sequence: the loop is a scan over the chunks, and each chunk an
    ssd over its positions entered with the state the scan computed for it (h0 per chunk, the chunks a
    batch axis); the result still equals eager."""
    def fn(q, k, v, g, h0):
        return chunk_loop_gla(q, k, v, g, h0, read_after_update=True)

    report = check_against_eager(fn, *gla_inputs())
    assert report.count("scan") == 1 and report.count("ssd") == 1, str(report)
    ssd = next(r for r in report.rewrites if r.kind == "ssd")
    assert "h0=" in ssd.ir and f"test_ssd_chunks.py:{line_of(chunk_loop_gla, 'o[:, :, i] = ')}" in ssd.location, \
        str(report)


def test_chunk_loop_decaying_the_state_by_the_first_position_is_not_fused():
    """S·exp(G[first]) instead of S·exp(G[last]): the scan's decay over the chunks is not the one the
    chunked algorithm needs; a near miss says so, and the result still equals eager."""
    def fn(q, k, v, g, h0):
        return chunk_loop_gla(q, k, v, g, h0, state_decay=0)

    report = check_against_eager(fn, *gla_inputs())
    misses = [m.reason for m in report.near_misses if m.kind == "ssd"]
    assert any(CHUNKED in r and "another entry than the chunk's last" in r for r in misses), misses
    assert report.count("scan") == 1 and report.count("ssd") == 1, str(report)


def chunk_loop_linear_attention(q, k, v, h0=None, Q=4):
    """Causal linear attention by chunks in a Python loop, no decay: each chunk reads the state
    entering it, its own masked scores ``(q_i·k_iᵀ).tril()·v_i``, then adds ``k_iᵀ·v_i`` to the state;
    the outputs are concatenated along the sequence."""
    b, h, t, dk = q.shape
    qc, kc, vc = (z.reshape(b, h, t // Q, Q, z.shape[-1]) for z in (q, k, v))
    S = q.new_zeros(b, h, dk, v.shape[-1]) if h0 is None else h0
    outs = []
    for i in range(t // Q):
        qi, ki, vi = qc[:, :, i], kc[:, :, i], vc[:, :, i]
        outs.append(qi @ S + (qi @ ki.mT).tril() @ vi)
        S = S + ki.mT @ vi
    return torch.cat(outs, 2), S


@pytest.mark.parametrize("h0", [True, False], ids=["h0", "zero_h0"])
def test_chunk_loop_without_decay_is_one_ssd(h0):
    # the per-chunk tril(q_i·k_iᵀ) is vectorized over the chunks (loop_vectorize: tril / triu act on the
    # last two axes), and the scan over chunks whose decay is the constant 1 fuses with it (ssd_chunks)
    q, k, v, _, *rest = gla_inputs(t=16, h0=h0)
    report = check_against_eager(chunk_loop_linear_attention, q, k, v, *rest)
    ir = one_whole_sequence_ssd(report, "none", chunk_loop_linear_attention, "outs.append(")
    assert report.count("scan") == 0 and ("h0=%" in ir) == h0, str(report)


def test_chunk_loop_without_decay_but_a_decayed_state_is_not_fused():
    # S·exp(g_i) + k_iᵀ·v_i: the state decays between chunks while the intra-chunk term does not: not
    # one recurrence.  The loop is a scan over chunks (a = exp(g_i)) beside an undecayed intra-chunk
    # ssd; a near miss says why they are not fused, and the program still equals eager
    def fn(q, k, v, g):
        b, h, t, dk = q.shape
        qc, kc, vc = (z.reshape(b, h, t // 4, 4, z.shape[-1]) for z in (q, k, v))
        S = q.new_zeros(b, h, dk, v.shape[-1])
        outs = []
        for i in range(t // 4):
            qi, ki, vi = qc[:, :, i], kc[:, :, i], vc[:, :, i]
            outs.append(qi @ S + (qi @ ki.mT).tril() @ vi)
            S = S * g[:, :, i, None, None].exp() + ki.mT @ vi
        return torch.cat(outs, 2)

    q, k, v, _ = gla_inputs(t=16, h0=False)
    g = (-torch.rand(2, 2, 4, generator=torch.Generator().manual_seed(2))).requires_grad_()
    report = check_against_eager(fn, q, k, v, g)
    misses = [m.reason for m in report.near_misses if m.kind == "ssd"]
    assert any("a scan over chunks with a decay but an intra-chunk term without one" in r for r in misses), \
        str(report)
    assert report.count("scan") == 1, str(report)


# --- lightning attention: a constant decay rate per head -------------------------------------------
# Lightning Attention-2 / MiniMax write the decay of a chunk loop as powers of one rate w = -s per head:
# the intra-chunk mask exp(w·(i - j)) on the lower triangle, the inter-chunk read q_i·exp(w·(l + 1)),
# the chunk states k_s·exp(w·(Q - 1 - s)), the state decay between chunks exp(w·Q), updated after the
# chunk's readout.  That is the recurrence with a_t = w at every step: one ssd over the sequence.

def lightning_chunk_loop(q, k, v, s, *, entry=1, states=0, block=0, states_rate=1.0):
    """q, k, v (b, h, t, d); s (h, 1, 1) > 0.  The keyword arguments break one decay each (negatives):
    ``entry``/``states``/``block`` offset the exponent of Y_off / the chunk states / the state decay,
    ``states_rate`` scales the chunk states' rate."""
    b, h, t, d = q.shape
    qc, kc, vc = (z.reshape(b, h, t // Q, Q, d) for z in (q, k, v))
    pos = torch.arange(Q) + 1
    q_decay = torch.exp(-s * (pos[:, None] + entry - 1))
    k_decay = torch.exp(-s * states_rate * (Q - pos[:, None] + states))
    diag = torch.exp(-s * (pos[:, None] - pos[None, :])).tril()
    kv = torch.zeros(b, h, d, d)
    outs = []
    for i in range(t // Q):
        qi, ki, vi = qc[:, :, i], kc[:, :, i], vc[:, :, i]
        intra = ((qi @ ki.transpose(-1, -2)) * diag) @ vi
        inter = (qi * q_decay) @ kv
        outs.append(inter + intra)
        kv = kv * torch.exp(-s * (Q + block)) + (ki * k_decay).transpose(-1, -2) @ vi
    return torch.cat(outs, -2)


def lightning_inputs(t=32):
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 3, t, 4, generator=g).requires_grad_() for _ in range(3))
    s = (0.05 + 0.4 * torch.rand(3, 1, 1, generator=g)).requires_grad_()
    return q, k, v, s


@pytest.mark.parametrize("t", [16, 32])
def test_lightning_attention_chunk_loop_is_one_ssd(t):
    # the state update after the readout stays in its chunk's step (the loops pass), the four decays are
    # read as exp(w·(α·l + β)) of one rate w (ssd_chunks): one ssd with a = -s at every step
    report = check_against_eager(lightning_chunk_loop, *lightning_inputs(t))
    ir = one_whole_sequence_ssd(report, "scalar", lightning_chunk_loop, "outs.append(")
    assert report.count("scan") == 0 and "h0=" not in ir, str(report)


@pytest.mark.parametrize("broken,reason", [
    (dict(entry=0), "the inter-chunk decay is not exp(w·(l + 1))"),
    (dict(states=1), "the chunk states' decay is not exp(w·(Q - 1 - s))"),
    (dict(block=-1), "the scan's decay over chunks is not exp(w·Q)"),
    (dict(states_rate=2.0), "the chunk states' decay is not exp(w·(Q - 1 - s))"),
], ids=["entry", "states", "block", "rate"])
def test_lightning_attention_with_a_wrong_decay_is_not_fused(broken, reason):
    report = check_against_eager(lambda *a: lightning_chunk_loop(*a, **broken), *lightning_inputs(16))
    misses = [m.reason for m in report.near_misses if m.kind == "ssd"]
    assert any(CHUNKED in r and reason in r for r in misses), misses
    assert report.count("ssd") == 1 and report.count("scan") == 1, str(report)


# --- one chunk entered with a state ----------------------------------------------------------------
# y = ((q·kᵀ) ∘ M)·v + (q·exp(G_l))·S0 over one chunk: the masked term plus the read of a state carried in
# (a cache, the ragged last block of a loop over blocks) is the ssd with h0 = S0.

def one_chunk_with_state(q, k, v, g, S0, *, entry_shift=0):
    """q, k (b, h, Q, n), v (b, h, Q, p), g (b, h, Q) log decays, S0 (b, h, n, p)."""
    G = torch.cumsum(g, -1)
    L = torch.exp(G[..., :, None] - G[..., None, :]).tril()
    intra = ((q @ k.transpose(-1, -2)) * L) @ v
    entry = torch.exp(G if not entry_shift else G - g)[..., None]
    return intra + (q * entry) @ S0


def state_inputs(q_len=Q):
    gen = torch.Generator().manual_seed(11)
    q, k = (torch.randn(2, 3, q_len, 4, generator=gen).requires_grad_() for _ in range(2))
    v = torch.randn(2, 3, q_len, 5, generator=gen).requires_grad_()
    g = F.logsigmoid(torch.randn(2, 3, q_len, generator=gen) + 2).requires_grad_()
    S0 = torch.randn(2, 3, 4, 5, generator=gen).requires_grad_()
    return q, k, v, g, S0


def test_one_chunk_entered_with_a_state_is_an_ssd_with_h0():
    report = check_against_eager(one_chunk_with_state, *state_inputs())
    ir = one_whole_sequence_ssd(report, "scalar", one_chunk_with_state, "return intra + ")
    assert "h0=%" in ir, ir


def test_one_chunk_entered_with_a_state_decayed_wrongly_is_not_fused():
    # exp(G_l - g_l): the state decays by one step less than the chunk's positions: not the recurrence
    fn = lambda *a: one_chunk_with_state(*a, entry_shift=1)  # noqa: E731
    report = check_against_eager(fn, *state_inputs())
    misses = [m.reason for m in report.near_misses if m.kind == "ssd"]
    assert any(CHUNKED in r for r in misses), str(report)
    assert report.count("ssd") == 1 and "h0=" not in report.rewrites[0].ir, str(report)


@pytest.mark.parametrize("return_state", [False, True], ids=["state_dropped", "state_returned"])
def test_a_chunk_loop_continued_by_one_chunk_is_one_ssd(return_state):
    # a chunk loop (one ssd with a final state) and one more chunk entered with that state (an ssd with h0):
    # one ssd over all the steps when nothing else reads the loop's final state; two when the program
    # returns it too (the concatenated ssd has no state at that step)
    def fn(q, k, v, g, q2, k2, v2, g2):
        o, S = chunk_loop_gla(q, k, v, g)
        o2 = one_chunk_with_state(q2, k2, v2, g2, S)
        return (o, o2, S) if return_state else (o, o2)

    q, k, v, g = gla_inputs(t=16, dk=4, dv=5, h=3, h0=False)
    q2, k2, v2, g2, _ = state_inputs()
    report = check_against_eager(fn, q, k, v, g, q2, k2, v2, g2)
    assert report.count("scan") == 0 and not [m for m in report.near_misses if m.kind == "ssd"], str(report)
    assert report.count("ssd") == (2 if return_state else 1), str(report)
