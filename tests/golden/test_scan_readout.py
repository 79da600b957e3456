"""A scan whose states are only read out with c (and whose last state is read) takes c as its
readout (seqfuse.passes.scan_readout): one seqfuse.scan with ``c=%``, the (*R, T, N) states never
materialized.  Outputs and gradients equal eager; any other use of the states leaves the scan
without a readout (still equal to eager)."""
import pytest
import torch
from torch._higher_order_ops.associative_scan import associative_scan

from helpers import check_against_eager, rel_err


def linear(left, right):
    a_l, b_l = left
    a_r, b_r = right
    return a_l * a_r, a_r * b_l + b_r


def all_states(a, b, dim=2, reverse=False):
    return associative_scan(linear, (a, b), dim=dim, reverse=reverse, combine_mode="generic")[1]


def mamba_inputs(B=2, D=6, T=10, N=4):
    """HF Mamba's layout: a, b (B, D, T, N) scanned along dim 2, C (B, T, N)."""
    a = torch.rand(B, D, T, N).mul(0.5).add(0.5).requires_grad_()
    b = torch.randn(B, D, T, N, requires_grad=True)
    c = torch.randn(B, T, N, requires_grad=True)
    return a, b, c


def one_scan_ir(report, readout=True):
    assert report.count("scan") == 1, str(report)
    assert not report.near_misses, str(report)
    ir = report.rewrites[0].ir
    assert ("c=%" in ir) == readout, ir
    return ir


def hf_mamba(a, b, C):
    # transformers' modeling_mamba.py, use_associative_scan: the matmul readout and the last state
    states = all_states(a, b)
    y = torch.matmul(states.transpose(1, 2).to(torch.float32), C.unsqueeze(-1))
    y = y.squeeze(-1).transpose(1, 2)
    return y, states[:, :, -1]


def test_hf_mamba_readout_and_last_state():
    ir = one_scan_ir(check_against_eager(hf_mamba, *mamba_inputs()))
    assert "reverse=false" in ir


def test_hf_mamba_readout_batch_of_one():
    # B = 1: the batch axis has size 1 everywhere (the benchmark's shape)
    one_scan_ir(check_against_eager(hf_mamba, *mamba_inputs(B=1, T=7)))


def test_einsum_readout():
    def fn(a, b, C):
        return torch.einsum("bdtn,btn->bdt", all_states(a, b), C)

    one_scan_ir(check_against_eager(fn, *mamba_inputs()))


def test_einsum_readout_to_another_layout_and_last_state_slice():
    # the output puts time first; the last state is read with a size-1 slice
    def fn(a, b, C):
        h = all_states(a, b)
        return torch.einsum("bdtn,btn->tbd", h, C), h[:, :, -1:]

    one_scan_ir(check_against_eager(fn, *mamba_inputs()))


def test_mul_sum_readout():
    # (h·C).sum(-1): canonicalization makes the broadcast product and sum one einsum
    def fn(a, b, C):
        return (all_states(a, b) * C.unsqueeze(1)).sum(-1)

    one_scan_ir(check_against_eager(fn, *mamba_inputs()))


def test_readout_per_channel():
    # c with every axis of the states (no broadcast over rows)
    a, b, _ = mamba_inputs()
    c = torch.randn(2, 6, 10, 4, requires_grad=True)
    one_scan_ir(check_against_eager(lambda a, b, c: torch.einsum("bdtn,bdtn->bdt", all_states(a, b), c), a, b, c))


def test_reverse_scan_last_state_is_t0():
    # associative_scan(reverse=True) scans the flipped inputs and flips the states back: the last
    # state computed is the one at t = 0, and the readout reads C time-reversed
    def fn(a, b, C):
        h = all_states(a, b, reverse=True)
        return torch.einsum("bdtn,btn->bdt", h, C), h[:, :, 0]

    one_scan_ir(check_against_eager(fn, *mamba_inputs()))


def test_reverse_scan_first_time_step_is_not_the_last_state():
    # in a reverse scan h[T-1] is the first state computed, not the final one: no fold
    def fn(a, b, C):
        h = all_states(a, b, reverse=True)
        return torch.einsum("bdtn,btn->bdt", h, C), h[:, :, -1]

    one_scan_ir(check_against_eager(fn, *mamba_inputs()), readout=False)


def test_scan_hop_states_with_readout():
    # torch.ops.higher_order.scan (ssd_forms) emits a scan without c too
    from torch._higher_order_ops.scan import scan

    def step(h, xs):
        a, b = xs
        h = a * h + b
        return h, h.clone()

    def fn(a, b, C):
        # a, b (T, B, N), C (T, B, N)
        h_last, hs = scan(step, torch.zeros_like(a[0]), (a, b))
        return torch.einsum("tbn,tbn->tb", hs, C), h_last

    a = torch.rand(9, 3, 4).mul(0.5).add(0.5).requires_grad_()
    b = torch.randn(9, 3, 4, requires_grad=True)
    c = torch.randn(9, 3, 4, requires_grad=True)
    one_scan_ir(check_against_eager(fn, a, b, c))


# --- not only a readout: left as a scan of all states, still equal to eager ------------

def test_states_also_returned():
    def fn(a, b, C):
        h = all_states(a, b)
        return torch.einsum("bdtn,btn->bdt", h, C), h

    one_scan_ir(check_against_eager(fn, *mamba_inputs()), readout=False)


def test_other_position_read():
    def fn(a, b, C):
        h = all_states(a, b)
        return torch.einsum("bdtn,btn->bdt", h, C), h[:, :, 3]

    one_scan_ir(check_against_eager(fn, *mamba_inputs()), readout=False)


def test_contraction_over_a_row_axis_reads_the_scan_with_that_axis_last():
    # Σ_d h·c over the channel axis d keeps n: the elementwise scan is the same with d and n swapped,
    # and then this is its readout (a, b permuted; nothing else reads the states)
    a, b, _ = mamba_inputs()
    w = torch.randn(6, 10, requires_grad=True)
    ir = one_scan_ir(check_against_eager(lambda a, b, w: torch.einsum("bdtn,dt->btn", all_states(a, b), w), a, b, w),
                     readout=True)
    assert "permute" in ir, ir


def test_contraction_over_state_and_time_is_a_near_miss():
    # Σ_t Σ_n h·c sums time as well: nearly a readout, reported
    def fn(a, b, C):
        return torch.einsum("bdtn,btn->bd", all_states(a, b), C)

    report = check_against_eager(fn, *mamba_inputs())
    assert report.count("scan") == 1 and "c=%" not in report.rewrites[0].ir, str(report)
    assert [m.kind for m in report.near_misses] == ["scan"], str(report)
    assert "another axis than the state axis" in report.near_misses[0].reason


def test_several_readouts_per_step_are_refused():
    # c with an extra axis k of size 3: three readouts of each state, not one
    a, b, _ = mamba_inputs()
    c = torch.randn(2, 10, 4, 3, requires_grad=True)
    one_scan_ir(check_against_eager(lambda a, b, c: torch.einsum("bdtn,btnk->bdtk", all_states(a, b), c), a, b, c),
                readout=False)


def test_detached_states_are_refused():
    def fn(a, b, C):
        return torch.einsum("bdtn,btn->bdt", all_states(a, b).detach(), C)

    one_scan_ir(check_against_eager(fn, *mamba_inputs()), readout=False)


def rounding_error(fn, unrounded, *args):
    """(error of seqfuse against eager, error of the unrounded program against eager), relative."""
    ref = fn(*args)
    got = torch.compile(fn, backend="seqfuse", options={"downstream": "eager"})(*args)
    plain = unrounded(*args)
    flat = (lambda x: torch.cat([t.double().flatten() for t in (x if isinstance(x, tuple) else (x,))]))
    return rel_err(flat(got), flat(ref)), rel_err(flat(plain), flat(ref))


def test_states_rounded_before_the_readout_take_readout_dtype():
    # float64 states cast to float32 before the readout (HF's .to(input_dtype) in a float32 model
    # with float64 states): the scan rounds them the same way (readout_dtype=f32)
    a, b, c = mamba_inputs()
    a, b = (x.detach().double().requires_grad_() for x in (a, b))

    def fn(a, b, C):
        return torch.einsum("bdtn,btn->bdt", all_states(a, b).to(torch.float32), C)

    report = check_against_eager(fn, a, b, c)
    ir = one_scan_ir(report)
    assert "readout_dtype=f32" in ir, ir


def test_bf16_readout_of_fp32_states():
    # transformers' Mamba in bf16: fp32 states, h.to(bf16) @ C (bf16), the last state read in fp32;
    # the readout must round exactly like the program (checked against the error of not rounding)
    a, b, c = mamba_inputs(T=24)
    c = c.detach().to(torch.bfloat16).requires_grad_()

    def fn(a, b, C):
        states = all_states(a, b)
        y = torch.matmul(states.transpose(1, 2).to(torch.bfloat16), C.unsqueeze(-1)).squeeze(-1).transpose(1, 2)
        return y, states[:, :, -1]

    def unrounded(a, b, C):
        states = all_states(a, b)
        y = torch.matmul(states.transpose(1, 2), C.float().unsqueeze(-1)).squeeze(-1).transpose(1, 2)
        return y.to(torch.bfloat16), states[:, :, -1]

    report = check_against_eager(fn, a, b, c)
    ir = one_scan_ir(report)
    assert "readout_dtype=bf16" in ir, ir
    with torch.no_grad():
        err, plain = rounding_error(fn, unrounded, a, b, c)
    assert plain > 1e-3 and err < plain / 8, (err, plain)


def test_last_state_also_read_rounded_keeps_the_states():
    # both reads go through the bf16 cast: eager sums their gradients in bf16, which the folded op
    # would not reproduce, so the scan keeps returning its states (still equal to eager)
    a, b, c = mamba_inputs()
    c = c.detach().to(torch.bfloat16).requires_grad_()

    def fn(a, b, C):
        states = all_states(a, b).to(torch.bfloat16)
        return torch.einsum("bdtn,btn->bdt", states, C), states[:, :, -1]

    one_scan_ir(check_against_eager(fn, a, b, c), readout=False)


def test_two_roundings_are_a_near_miss():
    a, b, c = mamba_inputs()

    def fn(a, b, C):
        states = all_states(a, b).to(torch.float16).to(torch.bfloat16)
        return torch.einsum("bdtn,btn->bdt", states, C.to(torch.bfloat16))

    report = check_against_eager(fn, a, b, c)
    assert report.count("scan") == 1 and "c=%" not in report.rewrites[0].ir, str(report)
    assert [m.kind for m in report.near_misses] == ["scan"], str(report)
    assert "not one rounding" in report.near_misses[0].reason


# --- a readout over a row axis of the state ------------------------------------------------------
# S_t = γ·S_{t-1} + k_tᵀ·v_t over (K, V), read as o_t = q_t·S_t (MiniMax's cached per-step loop over
# x[:, :, t:t+1]): the loop is an elementwise scan laid out with V last, and the readout sums K.  The
# same scan with K and V swapped (a, b, h0 permuted) takes q as its readout; the final state is
# permuted back.

def matrix_state_loop(q, k, v, s, h0, *, readout="rows"):
    """q, k (b, h, t, K), v (b, h, t, V), s (h, 1, 1) > 0, h0 (b, h, K, V)."""
    S, outs = h0, []
    ratio = torch.exp(-s)
    for t in range(q.shape[2]):
        kv = torch.matmul(k[:, :, t:t + 1].transpose(-1, -2), v[:, :, t:t + 1])
        S = ratio * S + kv
        outs.append(torch.matmul(q[:, :, t:t + 1], S) if readout == "rows" else
                    torch.matmul(S, v[:, :, t:t + 1].transpose(-1, -2)).transpose(-1, -2))
    return torch.cat(outs, -2), S


def matrix_inputs(K=4, V=5):
    g = torch.Generator().manual_seed(3)
    q, k = (torch.randn(2, 3, 6, K, generator=g).requires_grad_() for _ in range(2))
    v = torch.randn(2, 3, 6, V, generator=g).requires_grad_()
    s = (0.1 + torch.rand(3, 1, 1, generator=g)).requires_grad_()
    h0 = torch.randn(2, 3, K, V, generator=g).requires_grad_()
    return q, k, v, s, h0


@pytest.mark.parametrize("K,V", [(4, 5), (5, 5)])
def test_a_readout_over_the_rows_of_a_matrix_state_swaps_the_scan_axes(K, V):
    report = check_against_eager(matrix_state_loop, *matrix_inputs(K, V))
    assert report.count("scan") + report.count("ssd") == 1 and not report.near_misses, str(report)
    ir = report.rewrites[0].ir
    assert report.count("ssd") == 1 or ("c=%" in ir and "h0=%" in ir), ir


def test_a_readout_of_v_over_the_value_axis_is_not_the_states_readout():
    # S·v_t sums the value axis, the scan's own last axis: the plain reading, no swap needed
    fn = lambda *a: matrix_state_loop(*a, readout="values")  # noqa: E731
    report = check_against_eager(fn, *matrix_inputs())
    assert report.count("scan") + report.count("ssd") == 1, str(report)
