"""A delta-rule state carried beside another state that does not read it: fla's preconditioned gated
delta rule, whose ATK scan A_t = e^{g_atk} A_{t-1} + β_atk k_t² scales the written key by a squash of
A_t.  The delta state becomes one seqfuse.delta (the written key the stacked k ⊙ M(A_t), the read key
k), the preconditioner's loop stays in the graph for the loops pass (a seqfuse.scan); outputs, both
final states and every gradient equal eager's.  A second state that reads the delta state is a near
miss, run as written."""
import pytest
import torch
import torch.nn.functional as F

import seqfuse

from helpers import check_against_eager

precond = pytest.importorskip("fla.ops.precond_gated_delta_rule.naive")


def _operands(B=2, T=9, H=2, HV=2, K=6, V=5, h0=False):
    gen = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=gen)  # noqa: E731
    ops = dict(q=r(B, T, H, K), k=r(B, T, H, K), v=r(B, T, HV, V), g_atk=-torch.rand(B, T, H, generator=gen),
               g=-torch.rand(B, T, HV, generator=gen), beta_atk=torch.rand(B, T, H, generator=gen),
               beta=torch.rand(B, T, HV, generator=gen))
    if h0:
        ops["initial_state"] = r(B, HV, K, V)
        ops["initial_A_state"] = torch.rand(B, H, K, generator=gen)
    return {n: x.requires_grad_() for n, x in ops.items()}


def _one_delta_and_one_scan(report):
    assert report.count("delta") == 1 and report.count("scan") == 1, str(report)
    assert not [m for m in report.near_misses if m.kind == "delta"], str(report)
    (ir,) = [x.ir for x in report.rewrites if x.kind == "delta"]
    # the read key is k, the written (and erased) key the preconditioned one
    assert "p=%" in ir and "e=%" not in ir and "gate=scalar" in ir, ir
    return ir


@pytest.mark.parametrize("final,h0,HV", [(True, False, 2), (False, False, 2), (True, True, 4)])
def test_fla_preconditioned_gated_delta_rule_is_one_delta_op_beside_its_scan(final, h0, HV):
    ops = _operands(HV=HV, h0=h0)
    names = list(ops)

    def fn(*xs):
        o, S, A = precond.naive_recurrent_precond_gated_delta_rule(**dict(zip(names, xs)),
                                                                   output_final_state=final)
        return (o, S, A) if final else o
    seqfuse.reset_counters()
    report = check_against_eager(fn, *ops.values())
    _one_delta_and_one_scan(report)
    counts = seqfuse.counters()
    assert counts["delta"]["cpu"] >= 1 and counts["delta_backward"]["cpu"] >= 1, counts


def _two_states(q, k, v, beta, g, ga, ba, variant):
    """A gated delta rule beside a per-key scan A that scales its written key (spelled here); ``variant``:
    "after" the key reads this step's A (independent: lifted), "before" the previous step's A, "coupled" A's
    update reads the delta state."""
    B, T, H, K = k.shape
    S = q.new_zeros(B, H, K, v.shape[-1])
    A = q.new_zeros(B, H, K)
    outs = []
    for t in range(T):
        kt = k[:, t]
        A_new = A * ga[:, t].exp()[..., None] + ba[:, t, :, None] * kt * kt
        if variant == "coupled":
            A_new = A_new + 0.1 * S.sum(-1)
        kp = kt * torch.sigmoid(A if variant == "before" else A_new)
        A = A_new
        S = S * g[:, t].exp()[..., None, None]
        u = (v[:, t] - torch.einsum("bhkv,bhk->bhv", S, kt)) * beta[:, t, :, None]
        S = S + kp[..., None] * u[..., None, :]
        outs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(outs, 1), S, A


def _spelled_operands(B=2, T=8, H=2, K=4, V=5):
    gen = torch.Generator().manual_seed(1)
    q, v = torch.randn(B, T, H, K, generator=gen), torch.randn(B, T, H, V, generator=gen)
    k = F.normalize(torch.randn(B, T, H, K, generator=gen), dim=-1)
    beta, ba = torch.rand(B, T, H, generator=gen), torch.rand(B, T, H, generator=gen)
    g, ga = -torch.rand(B, T, H, generator=gen), -torch.rand(B, T, H, generator=gen)
    return [x.requires_grad_() for x in (q, k, v, beta, g, ga, ba)]


def test_a_key_scaled_by_this_steps_scan_is_lifted():
    report = check_against_eager(lambda *xs: _two_states(*xs, "after"), *_spelled_operands())
    _one_delta_and_one_scan(report)


def test_a_key_scaled_by_the_previous_steps_state_is_lifted_too():
    # sigmoid(A_{t-1}) is a value of step t as much as sigmoid(A_t): its steps are stacked for the op (the
    # scan's loop, which now hands its previous state to a stack, stays unrolled: a scan near miss)
    report = check_against_eager(lambda *xs: _two_states(*xs, "before"), *_spelled_operands())
    assert report.count("delta") == 1, str(report)
    assert not [m for m in report.near_misses if m.kind == "delta"], str(report)


def test_a_second_state_that_reads_the_delta_state_is_a_near_miss():
    # A's update reads S: the two states are one coupled recurrence, which the delta op does not compute
    report = check_against_eager(lambda *xs: _two_states(*xs, "coupled"), *_spelled_operands())
    assert report.count("delta") == 0, str(report)
    misses = [m.reason for m in report.near_misses if m.kind == "delta"]
    assert misses and "the loop carries 2 values" in misses[0], str(report)
