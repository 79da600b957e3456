"""fla's Gated DeltaProduct reference (``naive_recurrent_gated_delta_product``): n Householder steps per
token, k / v / β laid over T·n steps, one decay and one readout per token.

With n = 1 it is the gated delta rule and becomes one seqfuse.delta.  With n > 1 the loop reads n slices of
k, v and β per slice of q: the loop finder's steps would be sub-steps of the program's, so it is not
re-rolled, and the near miss says so (not "a value computed two or more steps before").  Every program
equals eager in its outputs, final state and every gradient."""
import pytest
import torch
import torch.nn.functional as F

from helpers import check_against_eager

naive = pytest.importorskip("fla.ops.gated_delta_product.naive")


def _operands(n, B=2, T=7, H=2, K=6, V=5, gate=True, h0=False):
    gen = torch.Generator().manual_seed(n)
    ops = dict(q=torch.randn(B, T, H, K, generator=gen),
               k=F.normalize(torch.randn(B, T * n, H, K, generator=gen), dim=-1),
               v=torch.randn(B, T * n, H, V, generator=gen),
               g=-torch.rand(B, T, H, generator=gen) if gate else None,
               beta=torch.rand(B, T * n, H, generator=gen),
               initial_state=torch.randn(B, H, K, V, generator=gen) if h0 else None)
    return {name: x.requires_grad_() for name, x in ops.items() if x is not None}


def _run(ops, n):
    names = list(ops)

    def fn(*xs):
        kw = dict(zip(names, xs))
        K = kw["q"].shape[-1]
        return naive.naive_recurrent_gated_delta_product(
            kw["q"], kw["k"], kw["v"], kw.get("g"), kw["beta"], K ** -0.5,
            initial_state=kw.get("initial_state"), output_final_state=True, num_householder=n)
    return check_against_eager(fn, *ops.values())


@pytest.mark.parametrize("gate,h0", [(True, False), (False, True), (True, True)])
def test_one_householder_step_is_one_delta_op(gate, h0):
    report = _run(_operands(1, gate=gate, h0=h0), 1)
    assert report.count("delta") == 1, str(report)
    (ir,) = [r.ir for r in report.rewrites if r.kind == "delta"]
    assert ("gate=scalar" if gate else "gate=none") in ir and ("h0=" in ir) == h0, ir
    assert not report.near_misses, str(report)


@pytest.mark.parametrize("n", [2, 3])
def test_several_householder_steps_are_a_near_miss_naming_the_sub_steps(n):
    report = _run(_operands(n, h0=True), n)
    assert report.count("delta") == 0 and report.count("scan") == 0, str(report)
    reasons = [m.reason for m in report.near_misses if m.kind == "scan" and "not re-rolled" in m.reason]
    assert len(reasons) == 1, str(report)
    assert f"reads {n} slices of" in reasons[0] and f"{n} Householder steps per token" in reasons[0], reasons[0]


def test_a_scan_reading_two_slices_per_step_names_them():
    """The same reason for any loop reading one input twice as often as another: h_t = a_t·h + x_2t + x_2t+1."""
    gen = torch.Generator().manual_seed(0)
    a = torch.rand(3, 8, 4, generator=gen).requires_grad_()
    x = torch.randn(3, 16, 4, generator=gen).requires_grad_()

    def fn(a, x):
        h = torch.zeros_like(a[:, 0])
        out = []
        for t in range(a.shape[1]):
            h = a[:, t] * h + x[:, 2 * t] + x[:, 2 * t + 1]
            out.append(h)
        return torch.stack(out, 1)
    report = check_against_eager(fn, a, x)
    reasons = [m.reason for m in report.near_misses if "not re-rolled" in m.reason]
    assert len(reasons) == 1 and "reads 2 slices of" in reasons[0] and "per slice of" in reasons[0], str(report)
