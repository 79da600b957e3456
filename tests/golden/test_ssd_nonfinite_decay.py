"""A non-finite log-decay in a program whose decays are *differences* runs the program as written.

Programs that form the decay as exp(G_i - G_j) of one cumulative sum G (the quadratic ``segsum``
written as ``cs[:, None] - cs[None, :]``, the Mamba-2 listing's ``exp(A_cs[-1] - A_cs)``, GLA's and
RWKV-6's per-channel forms) or as exp(w·(i - j)) with a tensor w compute -inf - (-inf) = NaN (or
-inf·0) after a -inf log-decay, where every ssd algorithm resets the state exactly.  The recognizers
mark such an op ``finite_only=true``; a call whose ``a`` is not finite refuses
(``seqfuse.runtime.ProgramRequired``) and the compiled graph runs the program unrewritten, so the
outputs, every gradient and the NaN positions are the program's (docs/reliability.md, "NaN and
inf").  With every log-decay finite the op runs as before (no fallback).  A spelling that sums a
masked copy of a (the stable segsum, transformers' segment_sum) is exact at -inf in the program too:
no mark, no fallback, finite values equal to eager's."""
import functools

import pytest
import torch

import seqfuse
from helpers import check_nans_against_eager
from test_ssd_channel_decay import gla, operands as channel_operands, rwkv6
from test_ssd_stable_segsum import inputs as listing_inputs, listing, ssd_quadratic


def difference_segsum(x):
    """The segment sum as a difference of one cumulative sum (the "unstable" spelling)."""
    t = x.size(-1)
    cs = torch.cumsum(x, dim=-1)
    seg = cs[..., :, None] - cs[..., None, :]
    return seg.masked_fill(~torch.tril(torch.ones(t, t, dtype=torch.bool, device=x.device)), -torch.inf)


def log_gamma(q, k, v, w):
    """γ^(i-j) written exp(log γ·(i - j)) with a per-head log γ (RetNet-style): -inf·0 = NaN on the diagonal."""
    n = torch.arange(q.shape[-2], dtype=q.dtype)
    return (q @ k.mT * torch.exp(w.view(-1, 1, 1) * (n[:, None] - n[None, :])).tril()) @ v


def _poison(x: torch.Tensor, index, value=-torch.inf) -> torch.Tensor:
    x = x.detach().clone()
    x[index] = value
    return x.requires_grad_()


def scalar_case(t0):
    X, A, B, C = listing_inputs(t=32)
    return [X, _poison(A, (1, t0, 2)), B, C]


def channel_case(t0):
    q, k, v, w = channel_operands()
    return [q, k, v, _poison(w, (0, 1, t0, 2))]


def gamma_case(_):
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, 8, 4, generator=gen).requires_grad_() for _ in range(3))
    w = torch.tensor([-0.5, -torch.inf, -0.1]).requires_grad_()
    return [q, k, v, w]


# name -> (program, operands with a -inf at step t0, the index of the log-decay operand)
CASES = {
    "quadratic_difference": (functools.partial(ssd_quadratic, segsum=difference_segsum), scalar_case, 1),
    "chunked_listing": (listing(8), scalar_case, 1),
    "chunked_listing_difference": (listing(8, difference_segsum), scalar_case, 1),
    "gla_channel_decay": (gla, channel_case, 3),
    "rwkv6_exclusive": (rwkv6, channel_case, 3),
    "log_gamma_per_head": (log_gamma, gamma_case, 3),
}


def ssd_ir(report) -> str:
    assert report.count("ssd") == 1, str(report)
    return next(r for r in report.rewrites if r.kind == "ssd").ir


def graph_fallbacks(report) -> int:
    return sum(report.fallbacks.get("graph", {}).values())


@pytest.mark.parametrize("runtime", ["auto", "eager"])
@pytest.mark.parametrize("name", list(CASES))
def test_a_minus_inf_log_decay_runs_the_program_as_written(name, runtime):
    fn, make, decay_index = CASES[name]
    operands = make(5)
    report, caught = check_nans_against_eager(fn, operands, {"runtime": runtime})
    assert "finite_only=true" in ssd_ir(report)
    assert graph_fallbacks(report) == 1, report.fallbacks
    assert any("ran the graph without seqfuse's rewrites" in m for m in caught), caught
    # the program's own NaNs are there (else this test could not tell a reset from the program)
    eager_out = fn(*[x.detach() for x in operands])
    assert (eager_out[0] if isinstance(eager_out, tuple) else eager_out).isnan().any()


@pytest.mark.parametrize("name", list(CASES))
def test_finite_log_decays_keep_the_op(name):
    fn, make, decay_index = CASES[name]
    operands = make(5)
    operands[decay_index] = operands[decay_index].detach().nan_to_num(neginf=-3.0).requires_grad_()
    report, _ = check_nans_against_eager(fn, operands, {})
    assert "finite_only=true" in ssd_ir(report)
    assert graph_fallbacks(report) == 0, report.fallbacks


def test_a_minus_inf_at_the_last_step_of_the_exclusive_form():
    # the op's a is RWKV-6's w one step later: the program's G_{T-1} - w_{T-1} still reads w_{T-1}
    fn = rwkv6
    operands = channel_case(7)
    report, _ = check_nans_against_eager(fn, operands, {})
    assert graph_fallbacks(report) == 1, report.fallbacks


def test_the_stable_segment_sum_keeps_its_exact_reset():
    # the quadratic form with the listing's stable segsum (Σ over a masked copy of A): -inf is an exact
    # reset in the program too; the op keeps it, no mark.  (The chunked listing is marked: its
    # exp(A_cs[-1] - A_cs) is a difference.)
    operands = scalar_case(5)
    report, _ = check_nans_against_eager(ssd_quadratic, operands, {})
    ir = ssd_ir(report)
    assert "finite_only" not in ir
    assert graph_fallbacks(report) == 0, report.fallbacks
    assert bool(torch.isfinite(report.output[0]).all())


def test_a_graph_that_writes_its_inputs_raises_instead_of_running_twice():
    counter = torch.zeros(())

    def fn(X, A, B, C):
        counter.add_(1)
        return ssd_quadratic(X, A, B, C, segsum=difference_segsum)

    compiled = torch.compile(fn, backend="seqfuse", options={"downstream": "aot_eager"})
    finite = scalar_case(5)
    finite[1] = finite[1].detach().nan_to_num(neginf=-3.0)
    compiled(*finite)
    with pytest.raises(RuntimeError, match="writes its inputs in place"):
        compiled(*scalar_case(5))


def test_the_op_called_directly_names_the_refusal():
    x, b, c = torch.randn(1, 6, 2, 3), torch.randn(1, 6, 2, 4), torch.randn(1, 6, 2, 4)
    a = -torch.rand(1, 6, 2)
    a[0, 3, 1] = -torch.inf
    y, _ = torch.ops.seqfuse.ssd(x, b, c, a, None, None, "scalar", 4, "recurrent", "eager")
    assert bool(torch.isfinite(y).all())          # the op alone resets exactly
    with pytest.raises(seqfuse.runtime.ProgramRequired, match="non-finite log-decay a"):
        torch.ops.seqfuse.ssd(x, b, c, a, None, None, "scalar", 4, "recurrent", "eager", True)


def test_while_a_cuda_graph_is_captured_the_results_are_nan_instead(monkeypatch):
    # no value can be read during a capture: the op multiplies its results by 1 + (0 or NaN) instead of
    # raising (every result NaN: loud); with finite log-decays the results are the op's own, bit for bit
    import seqfuse.runtime.dispatch as dispatch
    x, b, c = torch.randn(1, 6, 2, 3), torch.randn(1, 6, 2, 4), torch.randn(1, 6, 2, 4)
    a = -torch.rand(1, 6, 2)
    plain = torch.ops.seqfuse.ssd(x, b, c, a, None, None, "scalar", 4, "recurrent", "eager")
    monkeypatch.setattr(dispatch, "_capturing", lambda t: True)
    same = torch.ops.seqfuse.ssd(x, b, c, a, None, None, "scalar", 4, "recurrent", "eager", True)
    assert all(torch.equal(p, s) for p, s in zip(plain, same))
    a[0, 3, 1] = -torch.inf
    y, h = torch.ops.seqfuse.ssd(x, b, c, a, None, None, "scalar", 4, "recurrent", "eager", True)
    assert bool(y.isnan().all()) and bool(h.isnan().all())
    q, k, v, beta = torch.randn(1, 6, 2, 4), torch.randn(1, 6, 2, 4), torch.randn(1, 6, 2, 3), torch.rand(1, 6, 2)
    y, h = torch.ops.seqfuse.delta(q, k, v, beta, a, None, "scalar", 1.0, 4, "recurrent", "eager", True)
    assert bool(y.isnan().all()) and bool(h.isnan().all())
