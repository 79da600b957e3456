"""One fuzz case, judged: the program run eagerly, through ``backend="seqfuse"``, and on fp64
copies of its inputs (the oracle), outputs and gradients compared.

``run_case(case)`` is the whole check; docs/reliability.md states the rules it implements:

- If eager raises, the compiled program must raise too (else ``eager_error_mismatch``).
- Outputs: same count, dtype and shape; NaN / +inf / -inf positions as the NaN rule of the
  case's family says (``NAN_RULES``; the default is identical positions); values at the
  positions where all three are finite judged against the fp64 oracle, so that precision is
  told from bugs: seqfuse's error may exceed eager's by at most ``FACTOR`` plus a floor of
  ``FLOOR[dtype]`` units of roundoff (relative RMS error, and max error relative to the
  largest oracle value).  Without an oracle (the program fails on fp64 copies) seqfuse is
  judged against eager with the floor alone.
- Gradients: backward of ``sum(out * R)`` (R fixed random per output, from the case's seed)
  for every input with ``requires_grad``, compared the same way, ``None`` vs a tensor included.

Pipeline failures fall back (SEQFUSE_STRICT is unset while a case runs); their warnings,
the near misses and the runtime paths not taken are recorded in ``Outcome.detail``.
"""
from __future__ import annotations

import contextlib
import os
import traceback
import warnings
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: seqfuse's error vs the oracle may be at most FACTOR x eager's ...
FACTOR = 4.0
#: ... plus FLOOR[dtype] x the unit roundoff of the result's dtype (or of the least precise floating
#: input's, where coarser: the dtype the program rounds in).  The floor stands for the
#: reassociation of sums (recursive summation of n terms is off by up to n·u): fp64 / fp32
#: programs are often as exact as their dtype allows, so their floor admits a different
#: summation order over ~10³ / ~10² terms; fp16 / bf16 programs carry their own rounding at
#: every step (eager's error is already many u) and seqfuse accumulates in fp32, so a floor
#: of a few roundings of the result suffices.
FLOOR = {torch.float64: 1024, torch.float32: 256, torch.bfloat16: 4, torch.float16: 4,
         torch.complex128: 1024, torch.complex64: 256}
UNIT_ROUNDOFF = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8,
                 torch.float16: 2.0 ** -11, torch.complex128: 2.0 ** -53, torch.complex64: 2.0 ** -24}

FAILING = ("wrong", "crash", "eager_error_mismatch")

#: a value's conditioning: the fp64 program rerun SENSITIVITY_RUNS times on its differentiable inputs
#: each rounded at random by up to one unit roundoff of their dtype; the largest move of each output
#: and gradient element is its sensitivity s (what rounding the inputs alone does to that value).  A
#: program's rounding of its own intermediates moves a value by about as much per rounding on its
#: path, so where a case is judged wrong, the part of seqfuse's error within SENSITIVITY_FACTOR·s of
#: the oracle is forgiven element by element.  A well-conditioned value has s ≈ u·|value|, far below
#: the floor; an ill-conditioned one (a sum whose terms cancel a thousandfold) has s up to u·Σ|terms|.
SENSITIVITY_RUNS = 3
SENSITIVITY_FACTOR = 16.0


@dataclass
class Case:
    family: str            # "attention" | "ssd" | "scan" | "long_conv" | "map" | "triangular" | "delta"
    name: str              # the spelling, e.g. "masked_fill_tril"
    fn: Callable           # the program: fn(*inputs) -> Tensor or tuple of Tensors
    inputs: tuple          # tensors (some with requires_grad) and Python scalars
    expect: str | None     # IR op kind that should be found (e.g. "attention"; "ssd|scan": either), None if not required
    options: dict          # seqfuse options, e.g. {"runtime": "triton"} or {}; downstream defaults to aot_eager
    seed: int


def checkpointed(case: Case, selective: bool = False) -> Case:
    """``case`` with its program run inside ``torch.utils.checkpoint.checkpoint`` (eager and compiled
    alike): seqfuse must find the mixer inside the region and keep the program's numbers, while the
    backward recomputes the region.  ``selective``: with a policy (tests.helpers.save_matmuls), so the
    region stays a call whose body seqfuse rewrites in place."""
    from torch.utils.checkpoint import checkpoint
    spelling, plus, tags = case.name.partition("+")   # the summary groups by the spelling before the tags
    if selective and spelling.startswith("hop_scan"):
        # eager has no oracle there: torch's scan op has no rule for the selective checkpoint's
        # dispatch mode ("no rule registered for HigherOrderOperator scan"), so the program runs as is
        return case
    context = {}
    if selective:
        from tests.helpers import selective_checkpointing
        context = {"context_fn": selective_checkpointing}

    def fn(*inputs):
        return checkpoint(case.fn, *inputs, use_reentrant=False, **context)
    kind = "selective" if selective else "checkpoint"
    return replace(case, name=f"{spelling}/{kind}{plus}{tags}", fn=fn)


@dataclass
class Outcome:
    status: str            # "ok" | "both_raised" | "wrong" | "crash" | "eager_error_mismatch" | "not_rewritten"
    detail: str
    rewritten: bool
    #: the failing comparisons, one line each (also in detail)
    problems: list = field(default_factory=list)


# --------------------------------------------------------------------------- inputs

def _copy(x, dtype_map=None):
    """A fresh leaf copy of tensor ``x`` (same requires_grad), widened by ``dtype_map``."""
    if not isinstance(x, torch.Tensor):
        return x
    y = x.detach().clone()
    if dtype_map is not None:
        y = y.to(dtype_map(y.dtype))
    if x.requires_grad:
        y.requires_grad_(True)
    return y


def _wide(dtype: torch.dtype) -> torch.dtype:
    if dtype.is_complex:
        return torch.complex128
    if dtype.is_floating_point:
        return torch.float64
    return dtype


def _flat(x) -> list:
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for e in x for t in _flat(e)]
    return []


def _leaves(inputs) -> list:
    return [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]


def _weights(outs: list, seed: int) -> list:
    """The fixed random R of each output (generated in fp64 from the case's seed)."""
    g = torch.Generator().manual_seed(seed * 7919 + 17)
    rs = []
    for o in outs:
        if o.dtype.is_complex:
            rs.append(torch.randn(o.shape, generator=g, dtype=torch.complex128))
        else:
            rs.append(torch.randn(o.shape, generator=g, dtype=torch.float64))
    return rs


def _grads(outs: list, leaves: list, seed: int):
    """d/d leaves of sum(out * R); None for a leaf the outputs do not reach."""
    if not leaves:
        return []
    rs = _weights(outs, seed)
    loss = None
    for o, r in zip(outs, rs):
        if not (o.requires_grad and (o.is_floating_point() or o.is_complex())):
            continue
        term = (o * r.to(o.dtype)).sum()
        term = term.real if term.is_complex() else term
        loss = term if loss is None else loss + term.to(loss.dtype)
    if loss is None:
        return [None] * len(leaves)
    return list(torch.autograd.grad(loss, leaves, allow_unused=True))


@contextlib.contextmanager
def _not_strict():
    saved = os.environ.pop("SEQFUSE_STRICT", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["SEQFUSE_STRICT"] = saved


class _Dtypes(TorchDispatchMode):
    """Records the dtypes that eager's run casts floating data down to (a program that casts its fp64 inputs
    to fp32 inside, as flash-linear-attention's references do, rounds in fp32).  Only explicit casts count:
    a float32 mask multiplied into fp64 values is promoted, and the program still computes in fp64.
    Higher-order ops (scan, associative_scan) run as they are, unrecorded inside."""

    supports_higher_order_operators = True

    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and args and isinstance(args[0], torch.Tensor) \
                and isinstance(out, torch.Tensor) and args[0].dtype in UNIT_ROUNDOFF and out.dtype in UNIT_ROUNDOFF \
                and UNIT_ROUNDOFF[out.dtype] > UNIT_ROUNDOFF[args[0].dtype]:
            self.seen.add(out.dtype)
        return out


def _run(fn, inputs, seed):
    """(outputs, grads, exception) of the program on ``inputs``; grads None if forward raised."""
    torch.manual_seed(seed)
    try:
        out = fn(*inputs)
        outs = _flat(out)
    except Exception as exc:  # noqa: BLE001 - the program's own error is data here
        return None, None, exc
    try:
        grads = _grads(outs, _leaves(inputs), seed)
    except Exception as exc:  # noqa: BLE001
        return outs, None, exc
    return outs, grads, None


# --------------------------------------------------------------------------- comparison

def _classes(t: torch.Tensor):
    """(nan, +inf, -inf) masks of ``t`` (complex: NaN if either part is, inf if either part is)."""
    if t.is_complex():
        re, im = t.real, t.imag
        nan = re.isnan() | im.isnan()
        return nan, (re.isposinf() | im.isposinf()) & ~nan, (re.isneginf() | im.isneginf()) & ~nan
    if not t.is_floating_point():
        z = torch.zeros(t.shape, dtype=torch.bool)
        return z, z, z
    return t.isnan(), t.isposinf(), t.isneginf()


def exact_nan_rule(got: torch.Tensor, eager: torch.Tensor, oracle: torch.Tensor | None, ctx: dict):
    """The default rule: NaN, +inf and -inf at exactly the program's positions, except where the
    program overflowed (eager non-finite where the fp64 oracle is finite and every input is
    finite): there seqfuse may give a finite value (judged against the oracle) or the same class.

    Returns (problem or None, mask of the positions whose values are compared, the eager and
    oracle tensors they are compared with)."""
    gn, gp, gm = _classes(got)
    en, ep, em = _classes(eager)
    g_bad, e_bad = gn | gp | gm, en | ep | em
    overflow = torch.zeros_like(e_bad)
    if oracle is not None and ctx.get("inputs_finite", True):
        on, op, om = _classes(oracle)
        overflow = e_bad & ~(on | op | om)
    same = (gn == en) & (gp == ep) & (gm == em)
    allowed = same | (overflow & ~g_bad)
    bad = ~allowed
    if bad.any():
        return (f"non-finite positions differ at {int(bad.sum())} of {bad.numel()} elements "
                f"(seqfuse NaN {int(gn.sum())} +inf {int(gp.sum())} -inf {int(gm.sum())}; "
                f"eager NaN {int(en.sum())} +inf {int(ep.sum())} -inf {int(em.sum())})"), None, None, None
    return None, ~g_bad & ~e_bad | (overflow & ~g_bad), eager, oracle


#: how far apart (relative to the RMS of the output) the program's results with the non-finite
#: inputs replaced by 0 and by 1 must be for an element to count as reading them: far above an
#: fp64 FFT's rounding noise (~1e-16), far below any real dependence the fuzzer's inputs create
READS_TOLERANCE = 1e-7


def containment_nan_rule(got: torch.Tensor, eager: torch.Tensor, oracle: torch.Tensor | None, ctx: dict):
    """docs/reliability.md, "NaN and inf", for ssd / scan / long_conv.  With all inputs finite, the
    default rule.  With a NaN or inf among the inputs, an element *reads* them when the program's
    fp64 result there changes as they are replaced by 0 or by 1 (or is then non-finite), and:

    - where seqfuse is finite, it is correct: judged against the program where the program is
      finite there; where the program is not, the element must not read a non-finite input (a NaN
      or inf never disappears) and is judged against the program with them replaced;
    - where seqfuse is NaN or ±inf and the program is finite, the element must not read a
      non-finite input: only a NaN spread by an exact zero of a mask or through an FFT may land
      where the program has a finite value, never one that replaces a finite value the program
      computes from the non-finite input (exp(-inf) = 0 resetting a state);
    - where both are non-finite the classes may differ (NaN vs inf: order of operations), but
      two infinities agree in sign.
    """
    rep = ctx.get("replaced")
    if ctx.get("inputs_finite", True) or rep is None:
        return exact_nan_rule(got, eager, oracle, ctx)
    z0, z1, ze = rep
    if z0 is None or z1 is None or z0.shape != got.shape or z1.shape != got.shape:
        return exact_nan_rule(got, eager, oracle, ctx)
    g_bad = torch.stack(_classes(got)).any(0)
    en, ep, em = _classes(eager)
    e_bad = en | ep | em
    z0_bad, z1_bad = torch.stack(_classes(z0)).any(0), torch.stack(_classes(z1)).any(0)
    wide = torch.complex128 if z0.is_complex() else torch.float64
    d0, d1 = z0.detach().to(wide), z1.detach().to(wide)
    ok = ~z0_bad & ~z1_bad
    scale = d0[ok].abs().pow(2).mean().sqrt().item() if ok.any() else 0.0
    diff = torch.where(ok, (d0 - d1).abs(), torch.zeros((), dtype=torch.float64))
    # a program that computes in fp32 itself (x.float(), or fla's references' .to(torch.float) on fp64 copies)
    # has fp32 rounding noise in its "fp64" result
    fp64 = z0.dtype in (torch.float64, torch.complex128) and not ctx.get("fp64_downcasts")
    tol = READS_TOLERANCE if fp64 else 1e-4
    reads = z0_bad | z1_bad | (diff > tol * max(scale, 1e-300))
    vanished = ~g_bad & e_bad & reads
    if vanished.any():
        return (f"seqfuse is finite at {int(vanished.sum())} of {vanished.numel()} elements that read a "
                f"non-finite input where the program is not (a NaN/inf vanished)"), None, None, None
    lost = g_bad & ~e_bad & reads
    if lost.any():
        return (f"seqfuse is non-finite at {int(lost.sum())} of {lost.numel()} elements where the program "
                f"computes a finite value from the non-finite input"), None, None, None
    _, gp, gm = _classes(got)
    flipped = (gp & em) | (gm & ep)
    if flipped.any():
        return f"+inf vs -inf at {int(flipped.sum())} elements", None, None, None
    if ze is not None and ze.shape != got.shape:
        ze = None
    # values: where the program is finite against the program itself, elsewhere against the
    # program with the non-finite inputs replaced (those elements read none of them)
    mask = ~g_bad
    e_ref = torch.where(e_bad, ze, eager) if ze is not None else torch.where(e_bad, torch.nan, eager)
    o_ref = None
    if oracle is not None and oracle.shape == got.shape:
        o_ref = torch.where(e_bad, z0.to(oracle.dtype), oracle)
    elif ze is not None:
        o_ref = None
    return None, mask, e_ref, o_ref


#: family -> rule(got, eager, oracle, ctx) -> (problem, compare mask, eager ref, oracle ref)
NAN_RULES: dict[str, Callable] = {"ssd": containment_nan_rule, "scan": containment_nan_rule,
                                  "long_conv": containment_nan_rule, "triangular": containment_nan_rule,
                                  "delta": containment_nan_rule}
#: the rules that need the program run again with the non-finite inputs replaced
NEEDS_REPLACED = {containment_nan_rule}


def _numerically_zero(oracle: torch.Tensor, mask: torch.Tensor, floor: float, case_scale: float) -> float | None:
    """``case_scale`` when the oracle's values over ``mask`` are all below floor·case_scale (the
    error any value of the case may carry: a quantity the math makes zero, up to rounding — an
    fp64 program's oracle is the program itself and keeps its rounding noise), else None."""
    if case_scale <= 0:
        return None
    values = oracle.detach()[mask]
    if values.numel() == 0:
        return None
    return case_scale if values.abs().max().item() <= floor * case_scale else None


def case_scale(tensors) -> float:
    """The largest RMS over the finite elements of a case's outputs and gradients (fp64)."""
    best = 0.0
    for t in tensors:
        if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) and t.numel():
            v = t.detach().to(torch.complex128 if t.is_complex() else torch.float64)
            v = v[torch.isfinite(v)]
            if v.numel():
                best = max(best, v.abs().pow(2).mean().sqrt().item())
    return best


def _errors(x: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, absolute: bool = False):
    """(relative RMS error, max error / max |ref|) of x vs ref over ``mask`` (both absolute when
    ``absolute``)."""
    wide = torch.complex128 if (x.is_complex() or ref.is_complex()) else torch.float64
    x = x.detach().to(wide)[mask]
    ref = ref.detach().to(wide)[mask]
    if ref.numel() == 0:
        return 0.0, 0.0
    diff = (x - ref).abs()
    if absolute:
        return diff.pow(2).mean().sqrt().item(), diff.max().item()
    scale_rms = ref.abs().pow(2).mean().sqrt().item()
    scale_max = ref.abs().max().item()
    rms = diff.pow(2).mean().sqrt().item()
    mx = diff.max().item()
    return (rms / scale_rms if scale_rms > 0 else rms), (mx / scale_max if scale_max > 0 else mx)


def _compare(label: str, got, eager, oracle, ctx: dict, rule: Callable) -> tuple[str | None, str]:
    """Compare one output (or gradient); returns (problem or None, a short summary)."""
    if eager is None or got is None:
        if eager is None and got is None:
            return None, f"{label}: None"
        if eager is None and not (got.detach() != 0).any():
            return None, f"{label}: None vs zeros"
        return (f"{label}: eager gives {'None' if eager is None else 'a tensor'}, seqfuse gives "
                f"{'None' if got is None else 'a tensor'}"), ""
    if got.dtype != eager.dtype:
        return f"{label}: dtype {got.dtype} vs eager {eager.dtype}", ""
    if got.shape != eager.shape:
        return f"{label}: shape {tuple(got.shape)} vs eager {tuple(eager.shape)}", ""
    if not (got.is_floating_point() or got.is_complex()):
        if not torch.equal(got, eager):
            return f"{label}: {got.dtype} values differ from eager", ""
        return None, f"{label}: equal"
    if oracle is not None and oracle.shape != eager.shape:
        oracle = None
    problem, mask, eager, oracle = rule(got.detach(), eager.detach(), None if oracle is None else oracle.detach(),
                                        ctx)
    if problem:
        return f"{label}: {problem}", ""
    # the floor of the least precise dtype the program computes in: a result in fp64 written from bf16
    # values (a bf16 program that accumulates into an fp64 buffer) carries bf16's rounding, and so does one
    # whose eager run computes any value in a coarser dtype than its inputs (fp64 inputs cast to fp32)
    dtypes = [got.dtype] + [x.dtype for x in ctx.get("inputs", ()) if isinstance(x, torch.Tensor)
                            and (x.is_floating_point() or x.is_complex()) and x.dtype in UNIT_ROUNDOFF] \
        + sorted(ctx.get("computed", ()), key=str)
    coarse = max(dtypes, key=lambda d: UNIT_ROUNDOFF.get(d, 2.0 ** -24))
    u = UNIT_ROUNDOFF.get(coarse, 2.0 ** -24)
    floor = FLOOR.get(coarse, 256) * u
    if oracle is not None:
        omask = mask & ~torch.stack(_classes(oracle)).any(0)
        sens = ctx.get("sensitivity")
        if sens is not None and sens.shape == got.shape:
            got = _within_sensitivity(got, oracle, sens)
        es_rms, es_max = _errors(got, oracle, omask)
        if eager is not None:
            omask = omask & ~torch.stack(_classes(eager)).any(0)
            es_rms, es_max = _errors(got, oracle, omask)
            ee_rms, ee_max = _errors(eager, oracle, omask)
        else:
            ee_rms = ee_max = 0.0
        lim_rms, lim_max = FACTOR * ee_rms + floor, FACTOR * ee_max + floor
        summary = (f"{label}: err {es_rms:.2g} (max {es_max:.2g}) vs eager's {ee_rms:.2g} (max {ee_max:.2g})")
        zero = _numerically_zero(oracle, omask, floor, ctx.get("case_scale", 0.0))
        if zero is not None:
            # a value the math makes 0 (its fp64 oracle is below the error floor at the case's scale:
            # Lk = 1 makes dq, dk exactly 0) carries only rounding noise, which has no relative
            # error to speak of: its absolute error is judged against the case's scale instead
            es_rms, es_max = _errors(got, oracle, omask, absolute=True)
            ee_rms, ee_max = _errors(eager, oracle, omask, absolute=True) if eager is not None else (0.0, 0.0)
            lim_rms, lim_max = FACTOR * ee_rms + floor * zero, FACTOR * ee_max + floor * zero
            summary = (f"{label}: numerically zero (case scale {zero:.2g}): abs err {es_rms:.2g} (max {es_max:.2g}) "
                       f"vs eager's {ee_rms:.2g} (max {ee_max:.2g})")
    elif eager is None:
        return None, f"{label}: non-finite inputs, no oracle: classes checked only"
    else:
        es_rms, es_max = _errors(got, eager, mask)
        lim_rms = lim_max = floor
        summary = f"{label}: err vs eager {es_rms:.2g} (max {es_max:.2g}), no oracle"
    if oracle is not None and ctx.get("sensitivity") is not None:
        summary += " (the part within its sensitivity to rounding forgiven)"
    if not (es_rms <= lim_rms and es_max <= lim_max):
        return (f"{summary}; allowed {lim_rms:.2g} (max {lim_max:.2g})"), summary
    return None, summary


def _within_sensitivity(got: torch.Tensor, oracle: torch.Tensor, sens: torch.Tensor) -> torch.Tensor:
    """``got`` with each finite element moved toward the oracle by up to SENSITIVITY_FACTOR x its
    sensitivity ``sens`` (stopping at the oracle): what is left is the error the value's conditioning
    does not explain.  A non-finite sensitivity forgives nothing."""
    wide = torch.complex128 if (got.is_complex() or oracle.is_complex()) else torch.float64
    g, o = got.detach().to(wide), oracle.detach().to(wide)
    allowed = torch.nan_to_num(sens.detach().to(torch.float64), nan=0.0, posinf=0.0) * SENSITIVITY_FACTOR
    diff = g - o
    size = diff.abs()
    keep = torch.clamp(size - allowed, min=0.0) / torch.where(size > 0, size, torch.ones_like(size))
    return torch.where(torch.isfinite(g) & torch.isfinite(o), o + diff * keep.to(diff.dtype), g)


def sensitivities(case: Case, o_outs: list, o_grads: list | None) -> tuple[list, list] | None:
    """(per output, per gradient) the largest move of each element of the fp64 program's results when
    its differentiable floating inputs are each rounded at random by up to one unit roundoff of their
    own dtype (``SENSITIVITY_RUNS`` draws, seeded by the case); None if a rerun raises or changes a
    result's shape.  Only inputs with ``requires_grad`` move: they are the values the program
    computes with; masks, positions and sizes stay exact."""
    g = torch.Generator().manual_seed(case.seed * 104729 + 3)
    s_outs = [torch.zeros(o.shape, dtype=torch.float64) for o in o_outs]
    s_grads = [None if x is None else torch.zeros(x.shape, dtype=torch.float64) for x in (o_grads or [])]

    def widen(acc, new, ref):
        if acc is None or new is None or ref is None:
            return True
        if new.shape != ref.shape:
            return False
        acc.copy_(torch.maximum(acc, (new.detach() - ref.detach()).abs().to(torch.float64)))
        return True

    for _ in range(SENSITIVITY_RUNS):
        inputs = []
        for x in case.inputs:
            y = _copy(x, _wide)
            if isinstance(x, torch.Tensor) and x.requires_grad and x.dtype in UNIT_ROUNDOFF and not x.is_complex():
                eps = (torch.rand(x.shape, generator=g, dtype=torch.float64) * 2 - 1) * UNIT_ROUNDOFF[x.dtype]
                with torch.no_grad():
                    y.mul_(1 + eps)
            inputs.append(y)
        torch._dynamo.reset()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            outs, grads, exc = _run(case.fn, tuple(inputs), case.seed)
        if exc is not None or len(outs) != len(o_outs) or (o_grads is not None and grads is None):
            return None
        pairs = list(zip(s_outs, outs, o_outs)) + list(zip(s_grads, grads or [], o_grads or []))
        if not all(widen(*p) for p in pairs):
            return None
    return s_outs, s_grads


def _replace_nonfinite(x, value, dtype_map=None):
    y = _copy(x, dtype_map)
    if isinstance(y, torch.Tensor) and (y.is_floating_point() or y.is_complex()):
        with torch.no_grad():
            bad = ~torch.isfinite(y)
            if bad.any():
                y[bad] = value
    return y


def _replaced_runs(case: Case):
    """([(outs, grads) of the fp64 program with the non-finite inputs replaced by 0, by 1, and of the
    program in its own dtypes with them replaced by 0], the dtypes the fp64 runs cast floating data down
    to) — None if any of them raises."""
    runs, downcasts = [], set()
    for value, dmap in ((0.0, _wide), (1.0, _wide), (0.0, None)):
        inputs = tuple(_replace_nonfinite(x, value, dmap) for x in case.inputs)
        torch._dynamo.reset()       # see run_case: torch's scan after a run under a dispatch mode
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            casts = _Dtypes()
            with casts if dmap is _wide else contextlib.nullcontext():
                outs, grads, exc = _run(case.fn, inputs, case.seed)
        if exc is not None:
            return None
        runs.append((outs, grads))
        if dmap is _wide:
            downcasts |= casts.seen
    return runs, downcasts


def _finite(inputs) -> bool:
    for x in inputs:
        if isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex()):
            if not torch.isfinite(x.detach()).all():
                return False
    return True


# --------------------------------------------------------------------------- the check

def run_case(case: Case) -> Outcome:
    """Run ``case`` eagerly, compiled with seqfuse, and on fp64 copies; judge the compiled run."""
    import seqfuse
    from seqfuse.runtime.counters import counters, fallbacks

    torch._dynamo.reset()
    seqfuse.reset_counters()
    options = dict(case.options)
    options.setdefault("downstream", "aot_eager")
    notes: list[str] = []

    eager_in = tuple(_copy(x) for x in case.inputs)
    computed = _Dtypes()
    with computed:
        e_outs, e_grads, e_exc = _run(case.fn, eager_in, case.seed)

    # the compiled program
    sf_in = tuple(_copy(x) for x in case.inputs)
    report = None
    s_outs = s_grads = s_exc = None
    with _not_strict(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            report = seqfuse.explain(case.fn, *sf_in, options=options)
            torch.manual_seed(case.seed)
            s_outs = _flat(report.output)
        except Exception as exc:  # noqa: BLE001
            s_exc = exc
            s_tb = traceback.format_exc(limit=6)
        if s_exc is None:
            try:
                s_grads = _grads(s_outs, _leaves(sf_in), case.seed)
            except Exception as exc:  # noqa: BLE001
                s_exc = exc
                s_tb = traceback.format_exc(limit=6)
    msgs = sorted({str(w.message).splitlines()[0][:200] for w in caught if "seqfuse" in str(w.message)})
    notes += [f"warning: {m}" for m in msgs]
    rewritten = False
    if report is not None:
        kinds = [r.kind for r in report.rewrites]
        rewritten = any(k in case.expect.split("|") for k in kinds) if case.expect else bool(kinds)
        notes.append(f"rewrites: {kinds or 'none'}; algorithms: {[r.algorithm for r in report.rewrites]}")
        notes += [f"near miss ({m.kind}): {m.reason[:200]}" for m in report.near_misses]
    runtime, fb = counters(), fallbacks()
    ran = {k: {p: n for p, n in v.items() if n} for k, v in runtime.items()}
    if ran:
        notes.append(f"runtime: {ran}")
    if fb:
        notes.append(f"paths not taken: {fb}")

    def outcome(status, problems=()):
        head = "; ".join(problems) if problems else ""
        return Outcome(status, "\n".join(([head] if head else []) + notes), rewritten, list(problems))

    # errors: eager raised -> seqfuse must raise
    if e_exc is not None:
        where = "forward" if e_outs is None else "backward"
        if s_exc is None:
            return outcome("eager_error_mismatch",
                           [f"eager raised in {where} ({type(e_exc).__name__}: {str(e_exc)[:200]}), seqfuse did not"])
        notes.insert(0, f"both raised: eager {type(e_exc).__name__}: {str(e_exc)[:160]} | "
                        f"seqfuse {type(s_exc).__name__}: {str(s_exc)[:160]}")
        return outcome("both_raised")
    if s_exc is not None:
        return outcome("crash", [f"seqfuse raised {type(s_exc).__name__}: {str(s_exc)[:300]}\n{s_tb}"])

    # the oracle: the same program on fp64 copies.  Dynamo's caches are cleared first: torch's scan
    # HOP compiles its eager body with torch.compile, and a call after one under a dispatch mode (the
    # eager run's _Dtypes) fails in Dynamo ("torch.* op returned non-Tensor", torch 2.13)
    torch._dynamo.reset()
    o_outs = o_grads = None
    o_in = tuple(_copy(x, _wide) for x in case.inputs)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            o_outs, o_grads, o_exc = _run(case.fn, o_in, case.seed)
        if o_exc is not None:
            notes.append(f"no oracle: fp64 program raised {type(o_exc).__name__}: {str(o_exc)[:120]}")
            o_outs = o_grads = None
        elif len(o_outs) != len(e_outs):
            o_outs = o_grads = None
    except Exception as exc:  # noqa: BLE001
        notes.append(f"no oracle: {type(exc).__name__}")
        o_outs = o_grads = None

    ctx = {"case": case, "inputs_finite": _finite(case.inputs), "inputs": case.inputs, "computed": computed.seen,
           "case_scale": case_scale([*(o_outs or ()), *(o_grads or ())])}
    rule = NAN_RULES.get(case.family, exact_nan_rule)
    replaced = None
    if not ctx["inputs_finite"] and rule in NEEDS_REPLACED and o_outs is not None:
        got = _replaced_runs(case)
        replaced, ctx["fp64_downcasts"] = got if got is not None else (None, set())
        if replaced is None:
            notes.append("the program with its non-finite inputs replaced raised: classes judged by the exact rule")
    def judge(sens=None):
        problems, summaries = [], []
        if len(s_outs) != len(e_outs):
            return [f"{len(s_outs)} outputs vs eager's {len(e_outs)}"], summaries
        for i, (s, e) in enumerate(zip(s_outs, e_outs)):
            o = o_outs[i] if o_outs is not None else None
            rep = None if replaced is None else tuple(z[0][i] if z is not None and i < len(z[0]) else None
                                                      for z in replaced)
            c = dict(ctx, what=("output", i), replaced=rep, sensitivity=None if sens is None else sens[0][i])
            p, summ = _compare(f"output {i}", s, e, o, c, rule)
            (problems.append(p) if p else summaries.append(summ))
        names = [i for i, x in enumerate(case.inputs) if isinstance(x, torch.Tensor) and x.requires_grad]
        for j, (s, e) in enumerate(zip(s_grads, e_grads)):
            o = o_grads[j] if o_grads is not None else None
            rep = None if replaced is None else tuple(z[1][j] if z is not None and z[1] is not None else None
                                                      for z in replaced)
            c = dict(ctx, what=("grad", names[j]), replaced=rep,
                     sensitivity=None if sens is None or j >= len(sens[1]) else sens[1][j])
            p, summ = _compare(f"grad of input {names[j]}", s, e, o, c, rule)
            (problems.append(p) if p else summaries.append(summ))
        return problems, summaries

    problems, summaries = judge()
    if problems and o_outs is not None and ctx["inputs_finite"] and len(s_outs) == len(e_outs):
        # judged wrong: is the excess within what the values' conditioning explains?
        sens = sensitivities(case, o_outs, o_grads)
        if sens is not None:
            again, summaries_again = judge(sens)
            if not again:
                notes.insert(0, "; ".join(s for s in summaries_again if s))
                return outcome("ill_conditioned", [f"{p} (within {SENSITIVITY_FACTOR:g}x the values' "
                                                   f"sensitivity to rounding their inputs)" for p in problems])
    notes.insert(0, "; ".join(s for s in summaries if s))
    if problems:
        return outcome("wrong", problems)
    if case.expect and not rewritten:
        return outcome("not_rewritten", [f"expected a {case.expect} rewrite"])
    return outcome("ok")


def describe(case: Case) -> str:
    """One line naming the case and its inputs (shapes, dtypes, requires_grad, non-finite)."""
    parts = []
    for x in case.inputs:
        if isinstance(x, torch.Tensor):
            tag = f"{str(x.dtype).replace('torch.', '')}{list(x.shape)}"
            if x.requires_grad:
                tag += "*"
            if (x.is_floating_point() or x.is_complex()) and not torch.isfinite(x.detach()).all():
                tag += "!nonfinite"
            parts.append(tag)
        else:
            parts.append(repr(x))
    return f"{case.family}/{case.name} seed={case.seed} options={case.options} inputs=({', '.join(parts)})"


__all__ = ["Case", "Outcome", "run_case", "describe", "NAN_RULES", "exact_nan_rule", "FACTOR", "FLOOR",
           "UNIT_ROUNDOFF", "FAILING", "SENSITIVITY_FACTOR", "SENSITIVITY_RUNS", "sensitivities"]
