"""What the corpus's case families share: building a case, running it eager / in fp64 / through seqfuse,
judging the errors, and printing one result.

A case is either a transformers causal LM (``model_case``) or a library function on given operands
(``function_case``); each result is a dict with the op kinds expected and found, the near misses, the
worst output and gradient errors and the seconds of the compiled run.  ``status`` turns it into
ok / MISS / WRONG / CRASH: ``ok`` when it equals eager and every expected op kind was found as often as
expected, ``MISS`` when it equals eager but an expected kind was found fewer (or more) times.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import time
from typing import Callable, Iterator

BOUND = 1e-5
#: environment variable (set by ``--checkpointing``): train the models with gradient checkpointing,
#: "1" plain, "selective" with a policy (tests.helpers.save_matmuls)
CHECKPOINTING = "SEQFUSE_CORPUS_CHECKPOINTING"


def maybe_checkpoint(model) -> None:
    """``model.gradient_checkpointing_enable()`` when the run asked for it (``--checkpointing``), with
    the selective policy for ``--checkpointing selective``."""
    import os
    mode = os.environ.get(CHECKPOINTING)
    if mode not in ("1", "selective") or not getattr(model, "supports_gradient_checkpointing", False):
        return
    if mode == "selective":
        from tests.helpers import selective_checkpointing
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False, "context_fn": selective_checkpointing})
    else:
        model.gradient_checkpointing_enable()


class _Float64Torch:
    """``torch`` as a library module sees it while the fp64 oracle runs: ``torch.float32`` / ``torch.float``
    are float64."""

    def __init__(self, torch):
        self._torch = torch

    def __getattr__(self, name):
        return self._torch.float64 if name in ("float32", "float") else getattr(self._torch, name)


@contextlib.contextmanager
def fp64(*module_names):
    """Keep the casts to fp32 of the modules ``module_names`` (``.to(torch.float32)``, ``torch.float``,
    ``.float()``) in fp64 while the oracle runs."""
    import torch
    mods = [importlib.import_module(m) for m in module_names]
    saved = [m.torch for m in mods]
    saved_float = torch.Tensor.float
    for m in mods:
        m.torch = _Float64Torch(torch)
    torch.Tensor.float = lambda self, *a, **k: self if self.is_floating_point() else saved_float(self, *a, **k)
    try:
        yield
    finally:
        for m, t in zip(mods, saved):
            m.torch = t
        torch.Tensor.float = saved_float


@contextlib.contextmanager
def torch_path(module, names):
    """Point a transformers modeling module at its reference PyTorch functions ``names`` (the hub / fla
    kernel wrappers undone) for the duration."""
    previous = {}
    for name in names:
        fn = previous[name] = getattr(module, name)
        while hasattr(fn, "__wrapped__"):
            fn = fn.__wrapped__
        setattr(module, name, fn)
    try:
        yield
    finally:
        for name, fn in previous.items():
            setattr(module, name, fn)


def function(module, name):
    """``module.name`` with its hub / fla kernel wrappers undone (transformers' torch path)."""
    fn = getattr(importlib.import_module(module), name)
    while hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    return fn


def _err(a, b):
    """Relative RMS error of ``a`` against ``b`` (0 when both are None, inf when only one is)."""
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    den = b.double().norm().item()
    return (a.double() - b.double()).norm().item() / (den if den > 0 else 1.0)


def judge(outs, ref_outs, grads, ref_grads, oracle_grads, names):
    """(worst output error, worst gradient error, name of the worst gradient) under the corpus's rule: a
    gradient eager itself computes no better in fp32 is judged against the fp64 oracle instead (seqfuse's
    distance to it at most 4x eager's plus 256 fp32 roundings of the largest gradient)."""
    out_err = max((_err(a, b) for a, b in zip(outs, ref_outs)), default=0.0)
    scale = max((g.double().pow(2).mean().sqrt().item() for g in oracle_grads if g is not None), default=0.0)

    def grad_err(g, r, o):
        e = _err(g, r)
        if e < BOUND or g is None or o is None:
            return e
        ours, theirs = (g.double() - o).norm().item(), (r.double() - o).norm().item()
        floor = 256 * 2.0 ** -24 * scale * o.numel() ** 0.5
        return 0.0 if ours <= 4 * theirs + floor else e

    errs = {n: grad_err(g, r, o) for n, g, r, o in zip(names, grads, ref_grads, oracle_grads)}
    worst = max(errs, key=errs.get) if errs else "-"
    return out_err, errs.get(worst, 0.0), worst


def _compiled(fn, run):
    """Run ``run(compiled fn)`` under a fresh dynamo and a collecting seqfuse report: (result, report, s)."""
    import torch

    import seqfuse
    from seqfuse.compiler.report import collecting
    report = seqfuse.Report()
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="seqfuse", options={"downstream": "eager"})
    start = time.perf_counter()
    with collecting(report):
        result = run(compiled)
    return result, report, time.perf_counter() - start


def _result(name, expected, report, judged, n_grads, seconds) -> dict:
    kinds = [r.kind for r in report.rewrites]
    out_err, grad_err, worst = judged
    return {"case": name, "expected": expected, "found": {k: report.count(k) for k in expected},
            "rewrites": {k: kinds.count(k) for k in sorted(set(kinds))},
            "near_misses": sorted({f"{m.kind}: {m.reason}" for m in report.near_misses}),
            "out_err": out_err, "grad_err": grad_err, "worst_grad": worst, "n_grads": n_grads, "seconds": seconds}


def model_case(name: str, module_name: str, cfg_name: str, model_name: str, kernelized, config: dict,
               shape: tuple[int, int], expected: dict) -> dict:
    """A transformers causal LM (``transformers.models.<module_name>``) with ``config``, in training mode on
    ``shape`` = (batch, length) tokens, its ``kernelized`` functions sent back to their torch paths: the
    logits and the gradient of every parameter against eager (and an fp64 oracle); ``expected`` maps op
    kinds to the number of rewrites expected."""
    import torch
    import transformers as T
    modeling = f"transformers.models.{module_name}.modeling_{module_name}"
    mod = importlib.import_module(modeling)
    cfg = getattr(T, cfg_name)(**config)
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"   # MoE experts as a loop of matmuls: grouped_mm has no fp64 (oracle)
    torch.manual_seed(0)
    model = getattr(T, model_name)(cfg).train()
    maybe_checkpoint(model)
    batch, seq_len = shape
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(3))

    def run(m):
        params = [p for p in m.parameters() if p.requires_grad]
        m.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        out = m(tokens, use_cache=False)
        logits = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
        g = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        logits.backward(g.to(logits.dtype))
        return [logits.detach()], [None if p.grad is None else p.grad.clone() for p in params]

    with torch_path(mod, kernelized):
        ref, ref_grads = run(model)
        model64 = copy.deepcopy(model).double()
        with fp64(modeling):
            _, oracle_grads = run(model64)
        (out, grads), report, seconds = _compiled(model, run)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    judged = judge(out, ref, grads, ref_grads, oracle_grads, names)
    return _result(name, expected, report, judged, len(names), seconds)


def function_case(name: str, module: str, fn_name: str, ops: dict, call: Callable, expected: dict) -> dict:
    """``module.fn_name`` (its wrappers undone) called as ``call(fn, ops)`` on the operands ``ops`` (name ->
    tensor): its outputs and the gradient of every operand that requires grad against eager (and an fp64
    oracle, the module's fp32 casts kept in fp64); ``expected`` maps op kinds to rewrites expected.  What
    is compiled is the call, as a model calls the function: outputs it does not keep (an attention matrix
    returned for inspection) are dead code in the graph."""
    import torch
    fn = function(module, fn_name)
    names = [n for n, x in ops.items() if x.requires_grad]
    gen = torch.Generator().manual_seed(5)

    def outputs(xs):
        res = call(fn, xs)
        return tuple(o for o in ((res,) if isinstance(res, torch.Tensor) else res) if o is not None)

    def run(f, xs=ops):
        for x in xs.values():
            x.grad = None
        outs = f(xs)
        if names:
            loss = sum((o * torch.randn(o.shape, generator=gen.manual_seed(5 + i), dtype=torch.float64).to(o.dtype))
                       .sum() for i, o in enumerate(outs))
            loss.backward()
        return [o.detach() for o in outs], [xs[n].grad for n in names]

    ref, ref_grads = run(outputs)
    ops64 = {n: x.detach().double().requires_grad_(x.requires_grad) for n, x in ops.items()}
    with fp64(module):
        _, oracle_grads = run(outputs, ops64)
    (out, grads), report, seconds = _compiled(outputs, lambda f: run(f))
    judged = judge(out, ref, grads, ref_grads, oracle_grads, names)
    return _result(name, expected, report, judged, len(names), seconds)


def child(names, run_case: Callable[[str], dict]) -> Iterator[dict]:
    """Run the cases ``names`` in this process with ``run_case``, each guarded on its own; yields one result
    dict per case (``error`` set where it raised)."""
    import traceback
    for name in names:
        try:
            yield run_case(name)
        except Exception as e:  # noqa: BLE001 - a case that raises is reported, the others still run
            tb = traceback.format_exc().strip().splitlines()
            yield {"case": name, "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300],
                   "where": tb[-3][:200] if len(tb) >= 3 else ""}


def status(res: dict) -> str:
    """ok / MISS / WRONG / CRASH of one result."""
    if "error" in res:
        return "CRASH"
    if not (res["out_err"] < BOUND and res["grad_err"] < BOUND):
        return "WRONG"
    return "ok" if res["found"] == res["expected"] else "MISS"


def line(res: dict) -> list[str]:
    """The printed lines of one result: the case's row, then one line per near miss."""
    name = res["case"]
    st = status(res)
    if st == "CRASH":
        return [f"{name:26s} CRASH  {res['error']}" + (f"  [{res['where'].strip()}]" if res.get("where") else "")]
    found = "  ".join(f"{k} {res['found'][k]}/{n}" for k, n in res["expected"].items())
    others = ", ".join(f"{k} x{n}" for k, n in res["rewrites"].items() if k not in res["expected"])
    rows = [f"{name:26s} {st:5s} {found}  out {res['out_err']:.1e}  "
            f"grads {res['grad_err']:.1e} (worst {res['worst_grad']}, {res['n_grads']})  {res['seconds']:.1f} s"
            + (f"  also: {others}" if others else "")]
    rows += [f"{'':26s}   near miss  {m}" for m in res["near_misses"]]
    return rows
