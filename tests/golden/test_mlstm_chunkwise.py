"""xLSTM's chunkwise mLSTM (transformers' ``mlstm_chunkwise_native_autograd``: a stabilized loop over
chunks filling state buffers, then the intra-chunk form reading them) is lifted to one ssd over the
sequence with x = e^I·[v, 1] and the closed form of its stabilizer (seqfuse/passes/ssd_stabilized.py).
Outputs and every gradient equal eager, a given initial state and the returned final state included;
the unstabilized sums read I (and q, k, v, a given state) through ``seqfuse::within``, so a call beyond
the bounds runs the program as written; one changed piece of the program, one chunk or a 16-bit dtype
leave it as written with a near miss."""
import pytest
import torch

from fuzz.recurrence import mlstm_chunkwise
from helpers import assert_as_accurate_as_eager, check_against_eager, check_nans_against_eager

xlstm = pytest.importorskip("transformers.models.xlstm.modeling_xlstm")
pytestmark = pytest.mark.skipif(not hasattr(xlstm, "mlstm_chunkwise_native_autograd"),
                                reason="transformers' native chunkwise mLSTM kernel")


def operands(nc=2, chunk=4, d=4, dv=5, seed=0, i_scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    t = nc * chunk
    q, k = (torch.randn(2, 2, t, d, generator=g, dtype=dtype) for _ in range(2))
    v = torch.randn(2, 2, t, dv, generator=g, dtype=dtype)
    i_gate = torch.randn(2, 2, t, generator=g, dtype=dtype) * i_scale
    f_gate = torch.randn(2, 2, t, generator=g, dtype=dtype) * 2 + 1
    return [x.requires_grad_() for x in (q, k, v, i_gate, f_gate)]


def kernel(chunk):
    return lambda *a: xlstm.mlstm_chunkwise_native_autograd(*a, chunk_size=chunk)


def misses(report):
    return [m.reason for m in report.near_misses if m.kind in ("ssd", "scan", "delta")]


@pytest.mark.parametrize("nc,chunk", [(2, 4), (3, 8), (4, 2)])
def test_transformers_chunkwise_kernel_is_one_ssd(nc, chunk):
    report = check_against_eager(kernel(chunk), *operands(nc, chunk))
    ssd, = [r.ir for r in report.rewrites if r.kind == "ssd"]
    assert "decay=scalar" in ssd and "finite_only=true" in ssd, ssd
    assert not misses(report), str(report)
    assert sum(report.fallbacks.get("graph", {}).values()) == 0, report.fallbacks


def test_fp64_program_is_lifted_exactly():
    report = check_against_eager(kernel(4), *operands(dtype=torch.float64), bound=1e-12)
    assert report.count("ssd") == 1, str(report)


def test_normalizer_and_stabilizer_returned_too():
    # mlstm_chunkwise_parallel_fw_H's other results (max(|den|, e^{-m}) and m) keep their own
    # program; the output is still the ssd's
    report = check_against_eager(lambda *a: mlstm_chunkwise(*a, chunk=4, extra=True), *operands())
    assert report.count("ssd") == 1, str(report)


def test_large_input_gates_keep_every_gradient_as_accurate_as_eager():
    # gates up to ±19 (inside the guard): the unstabilized sums span e^{±19}; in fp32 the ssd's
    # backward cancelled terms of that size (fuzz seed 1124077024: I's gradient 3.5e-5 off the fp64
    # program where eager's is 3e-7); the lifted form runs in fp64 and is ~2e-8 off
    ops = operands(nc=4, chunk=4, seed=3, i_scale=8.0)
    with torch.no_grad():
        ops[3].clamp_(-19.0, 19.0)
    fn = kernel(4)
    assert_as_accurate_as_eager(fn, ops, torch.randn(2, 2, 16, 5, generator=torch.Generator().manual_seed(9)))


@pytest.mark.parametrize("where,value", [("i", 25.0), ("i", -30.0), ("i", float("nan")), ("q", 1e7),
                                         ("v", float("inf"))])
def test_values_beyond_the_bounds_run_the_program(where, value):
    # e^{25} of an input gate is exponentiated on its own only by the lifted form: the guard refuses the
    # call and the graph runs the program as written (NaN / inf positions as eager's)
    ops = operands()
    i = {"q": 0, "v": 2, "i": 3}[where]
    x = ops[i].detach().clone()
    x.view(-1)[5] = value
    ops[i] = x.requires_grad_()
    report, caught = check_nans_against_eager(kernel(4), ops, {})
    assert report.count("ssd") == 1, str(report)
    assert sum(report.fallbacks["graph"].values()) == 1, report.fallbacks
    assert any("seqfuse.within" in m for m in caught), caught


def test_a_reset_forget_gate_runs_the_program():
    # f = -inf: logsigmoid = -inf, a hard reset; the program's B_i - B_j is then NaN, the ssd's decay not
    ops = operands()
    x = ops[4].detach().clone()
    x[0, 1, 6] = -float("inf")
    ops[4] = x.requires_grad_()
    report, _ = check_nans_against_eager(kernel(4), ops, {})
    assert report.count("ssd") == 1 and sum(report.fallbacks["graph"].values()) == 1, report.fallbacks


@pytest.mark.parametrize("broken,why", [
    ("strict_mask", "causal (lower triangular)"),
    ("m_start", "initial state m is the constant 1"),
    ("gate_sign", "A is not B[Q-1] - B + I"),
    ("no_state_decay", "the state's decay"),
    ("inter_scale", "the scores' scale"),
])
def test_a_changed_piece_is_a_near_miss_naming_it(broken, why):
    report = check_against_eager(lambda *a: mlstm_chunkwise(*a, chunk=4, broken=broken), *operands())
    assert report.count("ssd") == 0, str(report)
    found = [m for m in misses(report) if "stabilized chunkwise form" in m]
    assert len(found) == 1 and why in found[0], misses(report)


def states(m0=None, seed=5):
    g = torch.Generator().manual_seed(seed)
    c0, n0 = torch.randn(2, 2, 4, 5, generator=g), torch.randn(2, 2, 4, generator=g)
    m0 = torch.randn(2, 2, 1, generator=g) * 3 if m0 is None else torch.full((2, 2, 1), m0)
    return [x.requires_grad_() for x in (c0, n0, m0)]


def with_states(*a):
    """The kernel from a given state (C0, n0, m0), returning its final state (return_last_states=True)."""
    h, (c, n, m) = xlstm.mlstm_chunkwise_native_autograd(*a[:5], c_initial=a[5], n_initial=a[6], m_initial=a[7],
                                                         chunk_size=4, return_last_states=True)
    return h, c, n, m


def test_returned_final_state_is_the_ssds_scaled_by_the_last_maximum():
    # return_last_states=True from zeros (xLSTM's inference path passes zero states it allocates)
    def fn(*a):
        z = [torch.zeros(2, 2, 4, 5), torch.zeros(2, 2, 4), torch.zeros(2, 2, 1)]
        return with_states(*a, *z)
    report = check_against_eager(fn, *operands())
    assert report.count("ssd") == 1 and not misses(report), str(report)
    ssd, = [r.ir for r in report.rewrites if r.kind == "ssd"]
    assert "h0=" not in ssd, ssd


def test_given_state_enters_as_h0():
    report = check_against_eager(with_states, *operands(), *states())
    ssd, = [r.ir for r in report.rewrites if r.kind == "ssd"]
    assert "h0=" in ssd and not misses(report), str(report)
    assert sum(report.fallbacks.get("graph", {}).values()) == 0, report.fallbacks


def test_given_maximum_beyond_the_bound_runs_the_program():
    report, caught = check_nans_against_eager(with_states, [*operands(), *states(m0=30.0)], {})
    assert report.count("ssd") == 1 and sum(report.fallbacks["graph"].values()) == 1, report.fallbacks
    assert any("seqfuse.within" in m for m in caught), caught


def test_one_chunk_is_a_near_miss():
    report = check_against_eager(kernel(4), *operands(nc=1))
    assert report.count("ssd") == 0 and any("one chunk" in m for m in misses(report)), misses(report)


def test_sixteen_bit_program_is_a_near_miss():
    report = check_against_eager(kernel(4), *operands(dtype=torch.bfloat16), grads=False, bound=5e-2)
    assert report.count("ssd") == 0 and any("torch.bfloat16" in m for m in misses(report)), misses(report)


def test_dynamic_sizes_are_a_near_miss():
    # under dynamic=True the chunk loop is still unrolled for one chunk count, with symbolic sizes (and
    # eps a float input): named, not silently skipped
    # (inference, two chunks: compiling the unrewritten dynamic program for training took 30 s)
    report = check_against_eager(kernel(2), *(x.detach() for x in operands(nc=2, chunk=2)), dynamic=True,
                                 grads=False)
    assert report.count("ssd") == 0 and any("dynamic=True" in m for m in misses(report)), misses(report)
