"""Shared helpers for golden tests: compile with seqfuse, compare with eager (outputs and gradients)."""
from __future__ import annotations

import warnings

import torch

import seqfuse

# relative RMS error bounds per dtype (outputs and gradients vs eager)
BOUND = {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def save_matmuls(ctx, op, *args, **kwargs):
    """A selective activation checkpointing policy of torchtitan's kind: save what the matmuls
    compute, recompute every other op (seqfuse's fused ops included) in the backward."""
    from torch.utils.checkpoint import CheckpointPolicy
    aten = torch.ops.aten
    matmuls = (aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default)
    return CheckpointPolicy.MUST_SAVE if op in matmuls else CheckpointPolicy.PREFER_RECOMPUTE


def selective_checkpointing():
    """A ``context_fn`` for ``torch.utils.checkpoint.checkpoint``: the :func:`save_matmuls` policy."""
    from torch.utils.checkpoint import create_selective_checkpoint_contexts
    return create_selective_checkpoint_contexts(save_matmuls)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative RMS error ‖out - ref‖ / ‖ref‖ in fp64 (complex128 for complex tensors)."""
    wide = torch.complex128 if (out.is_complex() or ref.is_complex()) else torch.float64
    out, ref = out.detach().to(wide), ref.detach().to(wide)
    den = ref.norm().item()
    return (out - ref).norm().item() / (den if den > 0 else 1.0)


def _clone(x):
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.detach().clone().requires_grad_(x.requires_grad)
    return x


def _flat(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for e in x for t in _flat(e)]
    return []


def check_against_eager(fn, *inputs, options=None, dynamic=None, grads=True, bound=None, **kwargs):
    """Run ``fn`` eagerly and through ``seqfuse.explain``; assert outputs and gradients
    (of every input that requires grad, and of module parameters) agree.  Returns the report.

    Inputs that should get gradients must have ``requires_grad=True``.  Without an explicit
    ``downstream`` option the rest of the graph runs on "aot_eager" (fast to compile, the same
    autograd path as inductor); tests that want inductor ask for it.
    """
    options = dict(options or {})
    options.setdefault("downstream", "aot_eager")
    ref_in = [_clone(x) for x in inputs]
    cmp_in = [_clone(x) for x in inputs]
    params = list(fn.parameters()) if isinstance(fn, torch.nn.Module) else []
    torch.manual_seed(1234)
    ref = fn(*ref_in, **kwargs)
    ref_grads = None
    ref_outs = _flat(ref)
    if grads:
        g = [torch.randn_like(o) for o in ref_outs]
        leaves = [x for x in ref_in if isinstance(x, torch.Tensor) and x.requires_grad] + params
        ref_grads = torch.autograd.grad(ref_outs, leaves, g, allow_unused=True)
    torch.manual_seed(1234)
    report = seqfuse.explain(fn, *cmp_in, options=options, dynamic=dynamic, **kwargs)
    outs = _flat(report.output)
    assert len(outs) == len(ref_outs)
    for i, (o, r) in enumerate(zip(outs, ref_outs)):
        b = bound or BOUND.get(r.dtype, 1e-5)
        assert o.shape == r.shape, f"output {i}: shape {tuple(o.shape)} vs eager {tuple(r.shape)}"
        e = rel_err(o, r)
        assert e < b, f"output {i}: relative error {e:.3g} >= {b:g}"
    if grads:
        leaves = [x for x in cmp_in if isinstance(x, torch.Tensor) and x.requires_grad] + params
        got = torch.autograd.grad(outs, leaves, g, allow_unused=True)
        for i, (a, r) in enumerate(zip(got, ref_grads)):
            if r is None:
                assert a is None or not a.abs().any(), f"gradient {i}: eager has none, seqfuse has one"
                continue
            assert a is not None, f"gradient {i}: eager has one, seqfuse has none (grad=None)"
            b = bound or BOUND.get(r.dtype, 1e-5)
            e = rel_err(a, r)
            assert e < b, f"gradient {i}: relative error {e:.3g} >= {b:g}"
    return report


class Logits(torch.nn.Module):
    """input_ids (B, L) -> logits (B, L, vocab) of a transformers causal LM, without a cache."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids):
        return self.lm(input_ids, use_cache=False).logits


def assert_as_accurate_as_eager(fn, operands, grad_out: torch.Tensor, options=None) -> None:
    """``fn`` compiled with seqfuse (``options``; default downstream aot_eager), called on fp32 copies of
    ``operands``, is at least as close to ``fn`` run in fp64 as eager's fp32 call, for the output and
    every operand's gradient (the output's cotangent ``grad_out``), within 1e-7 relative at least."""
    compiled = torch.compile(fn, backend="seqfuse", options=options or {"downstream": "aot_eager"})
    results = {}
    for name, f, dtype in (("eager", fn, torch.float32), ("seqfuse", compiled, torch.float32),
                           ("oracle", fn, torch.float64)):
        xs = [x.detach().to(dtype).requires_grad_() for x in operands]
        y = f(*xs)
        results[name] = [y, *torch.autograd.grad(y, xs, grad_out.to(dtype))]
    for j, (got, ref, exact) in enumerate(zip(results["seqfuse"], results["eager"], results["oracle"])):
        e_ours, e_eager = rel_err(got.double(), exact), rel_err(ref.double(), exact)
        assert e_ours <= max(e_eager, 1e-7), f"result {j}: {e_ours:.2g} vs eager's {e_eager:.2g}"


def assert_training_follows_eager(ref: torch.nn.Module, compiled, params, tokens, steps: int = 3, lr: float = 0.1):
    """``steps`` SGD steps of next-token cross-entropy on ``ref`` (eager) and ``compiled`` (whose
    parameters are ``params``, starting equal to ref's) give the same losses (rel. 1e-5)."""
    opts = [torch.optim.SGD(ref.parameters(), lr=lr), torch.optim.SGD(params, lr=lr)]
    for _ in range(steps):
        losses = []
        for fn, opt in ((ref, opts[0]), (compiled, opts[1])):
            opt.zero_grad()
            logits = fn(tokens)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.roll(-1, 1).flatten())
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert abs(losses[0] - losses[1]) < 1e-5 * abs(losses[0]), losses


def call_past_a_changed_guard(compiled, *args):
    """Call ``compiled`` once its graph's value guard no longer holds (a guarded buffer changed): assert
    the call warned that it runs the graph unrewritten, and return its output."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = compiled(*args)
    assert any("value guard" in str(w.message) for w in caught), [str(w.message) for w in caught]
    return out


def _grad_leaves(xs):
    return [x for x in xs if isinstance(x, torch.Tensor) and x.requires_grad]


def assert_same(got: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """NaN and ±inf exactly where ``ref`` has them, the finite values within fp32 rounding."""
    assert got is not None, f"{what}: no gradient"
    assert torch.equal(got.isnan(), ref.isnan()), \
        f"{what}: NaN at {got.isnan().sum().item()} elements, the program at {ref.isnan().sum().item()}"
    assert torch.equal(got.isinf(), ref.isinf()) and torch.equal(got[got.isinf()], ref[ref.isinf()]), \
        f"{what}: infinities differ"
    finite = ref.isfinite()
    if finite.any():
        assert rel_err(got[finite], ref[finite]) < 1e-5, f"{what}: finite values differ"


def check_nans_against_eager(fn, operands, options):
    """Run ``fn`` eagerly and through ``seqfuse.explain`` (downstream aot_eager) on ``operands``, which may
    hold NaN / inf: assert outputs and the gradients of every operand agree, NaN and inf positions
    exactly (``assert_same``).  Returns the report and the warnings the compiled call raised."""
    ref_in, cmp_in = [_clone(x) for x in operands], [_clone(x) for x in operands]
    ref = _flat(fn(*ref_in))
    grads_out = [torch.randn_like(r) for r in ref]
    ref_grads = torch.autograd.grad(ref, _grad_leaves(ref_in), grads_out, allow_unused=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = seqfuse.explain(fn, *cmp_in, options={"downstream": "aot_eager", **options})
    got = _flat(report.output)
    for i, (g, r) in enumerate(zip(got, ref)):
        assert_same(g, r, f"output {i}")
    got_grads = torch.autograd.grad(got, _grad_leaves(cmp_in), grads_out, allow_unused=True)
    for i, (g, r) in enumerate(zip(got_grads, ref_grads)):
        assert_same(g, r, f"gradient of operand {i}")
    return report, [str(w.message) for w in caught]
