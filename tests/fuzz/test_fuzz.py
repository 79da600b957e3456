"""The differential fuzzer in CI: a bounded, deterministic set of programs of every family
(and a few with runtime="triton" through the interpreter) must give 0 wrong, 0 crash and 0
eager_error_mismatch; the NaN rules and the runner are checked on their own."""
import math
import os
import subprocess
import sys

import pytest
import torch

from .check import FAILING, Case, containment_nan_rule, describe, exact_nan_rule, run_case
from .__main__ import CHECKPOINT, FAMILIES, generator, iter_cases

#: programs per family on the default runtime / with runtime="triton" (interpreted: slow)
N_DEFAULT = {"attention": 16, "ssd": 24, "scan": 24, "long_conv": 30, "map": 16, "triangular": 12, "delta": 10}
N_TRITON = {"attention": 3, "ssd": 4, "scan": 4, "long_conv": 4}     # (map, triangular: no IR op, no kernel)
SEED = 2026
#: programs per family run inside torch.utils.checkpoint
N_CHECKPOINT = 5
#: ... and inside a selective checkpoint (a policy)
N_SELECTIVE = 3


def _run_family(family, n, triton):
    if generator(family) is None:
        pytest.skip(f"tests/fuzz/{FAMILIES[family][0]}.py is not present")
    failures, statuses = [], {}
    for i, case in enumerate(iter_cases(family, SEED, n, triton)):
        o = run_case(case)
        statuses[o.status] = statuses.get(o.status, 0) + 1
        if o.status in FAILING:
            failures.append(f"[{family} {i}] {o.status}: {describe(case)}\n{o.detail}")
    assert not failures, "\n\n".join(failures)
    assert sum(statuses.values()) == n, statuses
    return statuses


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family(family, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _run_family(family, N_DEFAULT[family], triton=False)


@pytest.mark.parametrize("family", [f for f in FAMILIES if f in N_TRITON])
def test_family_triton(family, triton_interpreter):
    _run_family(family, N_TRITON[family], triton=True)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("mode", ["1", "selective"])
def test_family_checkpointed(family, mode, monkeypatch):
    """Each program inside torch.utils.checkpoint (``--checkpoint``; ``--checkpoint selective``: with a
    policy): plain regions are inlined and recomputed, selective ones rewritten in place, and no
    program may come out wrong."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv(CHECKPOINT, mode)
    n = N_CHECKPOINT if mode == "1" else N_SELECTIVE
    statuses = _run_family(family, n, triton=False)
    assert statuses.get("ok", 0) >= n // 2, statuses   # most are still found inside the region


# --- the checker itself ---------------------------------------------------------------------

def _cumsum(x):
    return x.cumsum(-1)


def test_checker_flags_a_wrong_value(monkeypatch):
    # a program whose compiled form differs from eager: run_case must say "wrong"
    x = torch.randn(3, 5, requires_grad=True)
    def fn(x):
        # only the compiled run is off
        return x * (1.001 if torch.compiler.is_compiling() else 1.0)

    o = run_case(Case("scan", "off_by_1e-3", fn, (x,), None, {}, 0))
    assert o.status == "wrong", o.detail
    assert "output 0" in o.detail


def test_checker_raise_for_raise():
    def fn(x):
        return x[10]
    o = run_case(Case("scan", "index_error", fn, (torch.randn(2),), None, {}, 0))
    assert o.status == "both_raised", o.detail


def _rule_ctx(z0, z1, ze):
    return {"inputs_finite": False, "replaced": (z0, z1, ze)}


def test_containment_rule():
    nan, inf = math.nan, math.inf
    prog = torch.tensor([nan, nan, 3.0, nan])      # the program: NaN spread to 0, 1; element 3 reads it
    z0 = torch.tensor([1.0, 2.0, 3.0, 4.0])        # ... with the non-finite input replaced by 0
    z1 = torch.tensor([1.0, 2.0, 3.0, 5.0])        # ... and by 1: only element 3 reads it
    ctx = _rule_ctx(z0.double(), z1.double(), z0)
    # causal seqfuse: finite and correct where the element does not read the NaN
    problem, mask, e_ref, o_ref = containment_nan_rule(torch.tensor([1.0, 2.0, 3.0, nan]), prog, prog.double(), ctx)
    assert problem is None and mask.tolist() == [True, True, True, False]
    assert o_ref[:3].tolist() == [1.0, 2.0, 3.0]
    # a NaN that vanished from an element that reads it
    problem, *_ = containment_nan_rule(torch.tensor([1.0, 2.0, 3.0, 4.0]), prog, prog.double(), ctx)
    assert "vanished" in problem
    # seqfuse NaN where the program is finite but does not read the NaN: spread, allowed
    prog2 = torch.tensor([1.0, 2.0, 3.0, nan])
    problem, *_ = containment_nan_rule(torch.tensor([nan, nan, nan, nan]), prog2, prog2.double(), ctx)
    assert problem is None
    # ... but not where the program computes a finite value from the non-finite input
    prog3 = torch.tensor([1.0, 2.0, 3.0, 0.0])     # e.g. exp(-inf) = 0 reset the state
    problem, *_ = containment_nan_rule(torch.tensor([1.0, 2.0, 3.0, nan]), prog3, prog3.double(), ctx)
    assert "finite value from the non-finite input" in problem
    # opposite infinities
    prog4 = torch.tensor([1.0, 2.0, 3.0, inf])
    problem, *_ = containment_nan_rule(torch.tensor([1.0, 2.0, 3.0, -inf]), prog4, prog4.double(), ctx)
    assert "+inf vs -inf" in problem


def test_exact_rule_allows_only_overflow():
    inf = math.inf
    prog = torch.tensor([1.0, inf], dtype=torch.float16)
    oracle = torch.tensor([1.0, 70000.0], dtype=torch.float64)      # fp16 overflowed, fp64 did not
    problem, mask, *_ = exact_nan_rule(torch.tensor([1.0, 65000.0], dtype=torch.float16), prog, oracle,
                                       {"inputs_finite": True})
    assert problem is None and mask.tolist() == [True, True]
    problem, *_ = exact_nan_rule(torch.tensor([1.0, 2.0]), torch.tensor([1.0, math.nan]), None, {"inputs_finite": True})
    assert "non-finite positions differ" in problem


def test_runner_reports_a_summary(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "SEQFUSE_STRICT"}
    p = subprocess.run([sys.executable, "-m", "tests.fuzz", "--family", "scan", "--n", "2", "--seed", "5",
                        "--failures", str(tmp_path / "f.txt")], cwd=root, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "summary" in p.stdout and "2 programs" in p.stdout, p.stdout


def test_cases_are_reproducible():
    a = [describe(c) for c in iter_cases("ssd", 3, 5, False)]
    b = [describe(c) for c in iter_cases("ssd", 3, 5, False)]
    assert a == b



def test_numerically_zero_values_are_judged_at_the_case_scale():
    """A gradient the math makes 0 (Lk = 1 makes dq, dk exactly 0) holds only rounding noise in eager
    and in its fp64 oracle: an exact 0 (or other noise) from seqfuse is right.  A small gradient that
    is not zero keeps the relative measure: 2x off is wrong."""
    from .check import _compare
    noise = torch.full((4, 3), 1e-16, dtype=torch.float64)
    ctx = {"case_scale": 8.0}
    problem, summary = _compare("grad", torch.zeros_like(noise), noise, noise, ctx, exact_nan_rule)
    assert problem is None and "numerically zero" in summary, summary
    small = torch.full((4, 3), 1e-3, dtype=torch.float64)
    problem, _ = _compare("grad", 2 * small, small, small, ctx, exact_nan_rule)
    assert problem is not None
    problem, _ = _compare("grad", torch.zeros_like(noise), noise, noise, {}, exact_nan_rule)
    assert problem is not None  # without a case scale the relative measure stands


def test_attention_seed61_case904_fp16_backward_precision():
    """Found by `python -m tests.fuzz --family attention --n 1000 --seed 61`: fp16, head dim 1, key
    padding: the CPU flash backward's δ = rowsum(dO·O) from the output rounded to fp16 gave dq 5.5x
    eager's error (0.01 vs 0.0018 against fp64).  16-bit backwards now run the reference."""
    import itertools
    case = next(itertools.islice(iter_cases("attention", 61, 1000, False), 904, None))
    outcome = run_case(case)
    assert outcome.status == "ok", outcome.detail
    assert "16-bit flash backward" in outcome.detail, outcome.detail


def _dot_with_offset(terms, offset):
    """sum(w · terms) with ``offset`` added to the compiled run only (an injected error)."""
    def fn(w):
        return (w * terms).sum() + (offset if torch.compiler.is_compiling() else 0.0)
    return fn


def test_an_error_within_the_values_conditioning_is_ill_conditioned_not_wrong():
    """A sum whose terms cancel 40000-fold (1e4 - 1e4 + 0.5): rounding its inputs at fp32's unit
    roundoff moves it by ~u·2e4 ≈ 1e-3, so a compiled result 6e-4 off (0.12% of the value, far above
    the floor) is within what its conditioning explains: status ill_conditioned, not wrong.  The same
    error on a well-conditioned sum (1 + 1 + 0.5), or 100x that error on the cancelling one, is wrong.
    Eager's fp32 sum of these exact terms is exact, so FACTOR x eager's error forgives nothing."""
    from .check import FAILING, SENSITIVITY_FACTOR, UNIT_ROUNDOFF
    u = UNIT_ROUNDOFF[torch.float32]
    offset = u * 1e4
    cancelling = torch.tensor([1e4, -1e4, 0.5])
    w = torch.ones(3, requires_grad=True)
    o = run_case(Case("map", "cancelling_dot", _dot_with_offset(cancelling, offset), (w,), None, {}, 0))
    assert o.status == "ill_conditioned" and o.status not in FAILING, o.detail
    assert "output 0" in o.detail and f"within {SENSITIVITY_FACTOR:g}x" in o.detail, o.detail
    o = run_case(Case("map", "cancelling_dot_far_off", _dot_with_offset(cancelling, 100 * offset), (w,), None, {}, 0))
    assert o.status == "wrong", o.detail
    o = run_case(Case("map", "plain_dot", _dot_with_offset(torch.tensor([1.0, 1.0, 0.5]), offset), (w,), None, {}, 0))
    assert o.status == "wrong", o.detail


def test_sensitivity_moves_only_differentiable_inputs():
    """The perturbed reruns round only inputs that require grad: a float position tensor compared
    with itself (i >= j) would flip its mask under a perturbation and fake a huge sensitivity."""
    from .check import sensitivities, _copy, _run, _wide
    pos = torch.arange(6.0)
    x = torch.randn(6, requires_grad=True)
    def fn(x, pos):
        return torch.where(pos[:, None] >= pos[None, :], x[None, :], 0.0).sum(-1)
    case = Case("map", "positions", fn, (x, pos), None, {}, 0)
    o_outs, o_grads, _ = _run(fn, tuple(_copy(t, _wide) for t in case.inputs), 0)
    (s_out,), (s_grad,) = sensitivities(case, o_outs, o_grads)
    u = 2.0 ** -24
    # each output sums at most 6 values of |x| < 5: its move is a few u·Σ|x|, never a flipped mask's O(1)
    assert float(s_out.max()) <= 6 * u * float(x.detach().abs().sum()) and float(s_out.max()) > 0
    assert float(s_grad.max()) == 0.0      # the gradient of a sum of selected x does not depend on x
