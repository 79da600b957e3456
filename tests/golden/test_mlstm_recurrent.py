"""xLSTM's recurrent mLSTM (transformers' ``mlstm_recurrent_sequence_native``: a Python loop over time
calling the stabilized step ``mlstm_recurrent_step_native``, unrolled by Dynamo) is lifted to one ssd over
the sequence with x = e^I·[v, 1] and the closed form of its running maximum, the form ssd_stabilized builds
for the chunkwise kernel (seqfuse/passes/mlstm_loop.py).  Outputs and every gradient equal eager, a given
initial state and the returned final state included; the unstabilized sums read I (and q, k, v, a given
state) through ``seqfuse::within``, so a call beyond the bounds runs the program as written, and so does a
reset (a -inf forget gate: finite_only); one changed piece of the step or a 16-bit dtype leave it as
written with a near miss, inside transformers' arbitrary-length wrapper the remainder's loop is lifted
beside the chunkwise part."""
import pytest
import torch

import seqfuse
from fuzz.recurrence import MLSTM_LOOP_BREAKS, mlstm_recurrent
from helpers import assert_as_accurate_as_eager, check_against_eager, check_nans_against_eager

xlstm = pytest.importorskip("transformers.models.xlstm.modeling_xlstm")
pytestmark = pytest.mark.skipif(not hasattr(xlstm, "mlstm_recurrent_sequence_native"),
                                reason="transformers' native recurrent mLSTM kernel")

PREFIX = "a stabilized recurrent form (xLSTM's mLSTM step loop): "


def operands(t=8, d=4, dv=5, seed=0, i_scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(2, 2, t, d, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(2, 2, t, dv, generator=g, dtype=dtype)
    i_gate = torch.randn(2, 2, t, generator=g, dtype=dtype) * i_scale
    f_gate = torch.randn(2, 2, t, generator=g, dtype=dtype) * 2 + 1
    return [x.requires_grad_() for x in (q, k, v, i_gate, f_gate)]


def states(m0=None, seed=5, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    c0 = torch.randn(2, 2, 4, 5, generator=g, dtype=dtype)
    n0 = torch.randn(2, 2, 4, generator=g, dtype=dtype)
    m0 = torch.randn(2, 2, 1, generator=g, dtype=dtype).clamp(-1.6, 1.6) * 3 if m0 is None \
        else torch.full((2, 2, 1), m0, dtype=dtype)
    return [x.requires_grad_() for x in (c0, n0, m0)]


def sequence(*a):
    """transformers' kernel, its state in the operands' dtype (dtype_state, fp32 by default)."""
    return xlstm.mlstm_recurrent_sequence_native(*a, dtype_state=a[0].dtype)


def with_states(*a):
    """The kernel from a given state (C0, n0, m0), returning its final state (return_last_states=True)."""
    h, (c, n, m) = xlstm.mlstm_recurrent_sequence_native(*a[:5], c_initial=a[5], n_initial=a[6], m_initial=a[7],
                                                         return_last_states=True, dtype_state=a[0].dtype)
    return h, c, n, m


def misses(report):
    return [m.reason for m in report.near_misses if m.kind in ("ssd", "scan", "delta")]


def lifted(report):
    """The one ssd's IR text, after checking the program was lifted whole (no near miss, no fallback)."""
    ssds = [r.ir for r in report.rewrites if r.kind == "ssd"]
    assert len(ssds) == 1, str(report)
    assert not misses(report), str(report)
    assert sum(report.fallbacks.get("graph", {}).values()) == 0, report.fallbacks
    return ssds[0]


def near_miss(report):
    """The one near miss naming the recurrent form, after checking nothing was lifted."""
    assert report.count("ssd") == 0, str(report)
    found = [m for m in misses(report) if m.startswith(PREFIX)]
    assert len(found) == 1, misses(report)
    return found[0][len(PREFIX):]


@pytest.mark.parametrize("t", [3, 8, 17])
def test_transformers_recurrent_kernel_is_one_ssd(t):
    report = check_against_eager(xlstm.mlstm_recurrent_sequence_native, *operands(t))
    ssd = lifted(report)
    assert "decay=scalar" in ssd and "finite_only=true" in ssd, ssd


def test_fp64_program_is_lifted_exactly():
    report = check_against_eager(sequence, *operands(dtype=torch.float64), bound=1e-12)
    lifted(report)


def test_the_fuzzers_copy_is_transformers_kernel():
    # tests/fuzz/recurrence.py's mlstm_recurrent (the broken copies below change one piece of it) computes
    # transformers' kernel bit for bit, and is lifted the same way
    ops, st = operands(), states()
    with torch.no_grad():
        ref = xlstm.mlstm_recurrent_sequence_native(*ops, *st, return_last_states=True)
        got = mlstm_recurrent(*ops, *st, return_last_states=True)
    assert torch.equal(got[0], ref[0]) and all(torch.equal(a, b) for a, b in zip(got[1], ref[1]))
    lifted(check_against_eager(mlstm_recurrent, *operands()))


def test_returned_final_state_from_zeros():
    # return_last_states=True from the zeros the kernel allocates: (h, (C, n, m)), every one from the
    # lifted form; the loss reaches all four
    report = check_against_eager(lambda *a: xlstm.mlstm_recurrent_sequence_native(*a, return_last_states=True),
                                 *operands())
    ssd = lifted(report)
    assert "h0=" not in ssd, ssd


def test_given_state_enters_as_h0():
    report = check_against_eager(with_states, *operands(), *states())
    ssd = lifted(report)
    assert "h0=" in ssd, ssd


def test_large_input_gates_keep_every_gradient_as_accurate_as_eager():
    # gates up to ±19 (inside the guard): the unstabilized sums span e^{±19}; the lifted form runs in
    # fp64, so every result is as close to the fp64 program as eager's fp32 one
    ops = operands(t=16, seed=3, i_scale=8.0)
    with torch.no_grad():
        ops[3].clamp_(-19.0, 19.0)
    assert ops[3].abs().max() > 15
    assert_as_accurate_as_eager(sequence, ops, torch.randn(2, 2, 16, 5, generator=torch.Generator().manual_seed(9)))
    report = seqfuse.explain(sequence, *ops, options={"downstream": "aot_eager"})
    lifted(report)


@pytest.mark.parametrize("where,value", [("i", 25.0), ("i", -30.0), ("i", float("nan")), ("q", 1e7),
                                         ("v", float("inf")), ("m0", 30.0)])
def test_values_beyond_the_bounds_run_the_program(where, value):
    # e^{25} of an input gate is exponentiated on its own only by the lifted form: the guard refuses the
    # call and the graph runs the program as written (NaN / inf positions as eager's)
    if where == "m0":
        ops = [*operands(t=4), *states(m0=value)]
    else:
        ops = [*operands(t=4), *states()]
        i = {"q": 0, "v": 2, "i": 3}[where]
        x = ops[i].detach().clone()
        x.view(-1)[5] = value
        ops[i] = x.requires_grad_()
    report, caught = check_nans_against_eager(with_states, ops, {})
    assert report.count("ssd") == 1, str(report)
    assert sum(report.fallbacks["graph"].values()) == 1, report.fallbacks
    assert any("seqfuse.within" in m for m in caught), caught


def test_a_reset_forget_gate_runs_the_program():
    # f = -inf: logsigmoid = -inf, a hard reset; the ssd's decay is read with finite_only, so the call
    # runs the program as written
    ops = operands(t=4)
    x = ops[4].detach().clone()
    x[0, 1, 2] = -float("inf")
    ops[4] = x.requires_grad_()
    report, _ = check_nans_against_eager(xlstm.mlstm_recurrent_sequence_native, ops, {})
    assert report.count("ssd") == 1 and sum(report.fallbacks["graph"].values()) == 1, report.fallbacks


OUTPUT_FORM_BREAKS = ("max_val_scale", "eps_inside")


@pytest.mark.parametrize("broken", [b for b in MLSTM_LOOP_BREAKS if b not in OUTPUT_FORM_BREAKS])
def test_a_changed_piece_is_a_near_miss(broken):
    # m_min: the stabilizer updated with a minimum; num_scale: the numerator's queries scaled by 0.3, the
    # normalizer's by dhqk^-0.5; n_no_igate: the normalizer adds k without e^{I - m}; max_old_m: the
    # denominator's e^{-m} of the previous maximum
    report = check_against_eager(lambda *a: mlstm_recurrent(*a, broken=broken), *operands(t=4))
    near_miss(report)


@pytest.mark.parametrize("broken", OUTPUT_FORM_BREAKS)
def test_a_changed_output_form_is_not_the_mlstm(broken):
    # max_val_scale: e^{-m}·2; eps_inside: max(|qn + eps|, e^{-m}).  The output division
    # num / (max(|·|, e^{-m}) + eps) is what marks a step as the mLSTM's; without it the loop is some
    # other recurrence with a running maximum, which the loops pass names (pointing at mlstm_loop)
    report = check_against_eager(lambda *a: mlstm_recurrent(*a, broken=broken), *operands(t=4))
    assert report.count("ssd") == 0, str(report)
    assert not [m for m in misses(report) if m.startswith(PREFIX)], misses(report)
    assert any("running maximum" in m and "mlstm_loop" in m for m in misses(report)), misses(report)


@pytest.mark.parametrize("dtype,state", [(torch.bfloat16, None), (torch.float16, torch.float16)])
def test_sixteen_bit_program_is_a_near_miss(dtype, state):
    # bf16 operands with transformers' default fp32 state (xLSTM's inference_state_dtype), fp16 throughout
    kw = {} if state is None else {"dtype_state": state}
    report = check_against_eager(lambda *a: xlstm.mlstm_recurrent_sequence_native(*a, **kw),
                                 *operands(t=4, dtype=dtype), bound=5e-2)
    why = near_miss(report)
    assert "float16" in why, why


def test_state_dtype_other_than_the_operands_is_a_near_miss():
    # fp64 operands with transformers' default dtype_state=float32: the step casts between the two
    report = check_against_eager(xlstm.mlstm_recurrent_sequence_native, *operands(t=4, dtype=torch.float64),
                                 bound=1e-6)
    near_miss(report)


def test_one_step_is_left_alone():
    report = check_against_eager(xlstm.mlstm_recurrent_sequence_native, *operands(t=1))
    assert report.count("ssd") == 0, str(report)


def arbitrary_length(*a):
    """transformers' inference path: chunks of 4 by the chunkwise kernel, the rest by the recurrent one."""
    h, (c, n, m) = xlstm.wrap_chunkwise_arbitrary_sequence_length(
        mlstm_chunkwise_kernel=xlstm.mlstm_chunkwise_native_autograd,
        mlstm_sequence_kernel=xlstm.mlstm_recurrent_sequence_native,
        mlstm_step_kernel=xlstm.mlstm_recurrent_step_native,
        query=a[0], key=a[1], value=a[2], igate=a[3], fgate=a[4], return_last_states=True,
        autocast_kernel_dtype=torch.float32, chunk_size=4)
    return h, c, n, m


@pytest.mark.skipif(not hasattr(xlstm, "wrap_chunkwise_arbitrary_sequence_length"),
                    reason="transformers' arbitrary-length wrapper")
def test_arbitrary_length_wrapper_lifts_chunks_and_remainder():
    # T = 10: two chunks of 4 (ssd_stabilized), then a 2-step recurrent loop from their final state
    # (mlstm_loop): two ssds, the second's h0 the first's final state
    report = check_against_eager(arbitrary_length, *operands(t=10))
    assert report.count("ssd") == 2 and not misses(report), str(report)
    assert sum(report.fallbacks.get("graph", {}).values()) == 0, report.fallbacks


def test_dynamic_sizes_are_a_near_miss():
    # under dynamic=True the loop is still unrolled for one length, with symbolic sizes (and eps a float
    # input): named, not silently skipped (inference: the unrewritten dynamic program compiles faster)
    report = check_against_eager(xlstm.mlstm_recurrent_sequence_native, *(x.detach() for x in operands(t=4)),
                                 dynamic=True, grads=False)
    assert report.count("ssd") == 0 and any(m.startswith(PREFIX) and "dynamic=True" in m for m in misses(report)), \
        misses(report)
