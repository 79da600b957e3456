"""Teach seqfuse a new mixer: the causal running mean.

    y[t] = (x[0] + x[1] + ... + x[t]) / (t + 1)      along the sequence dim

Written naively it is `torch.cumsum(x, dim) / torch.arange(1, L + 1)`. This
script defines a custom op for it, writes a pass that finds the naive spelling
and replaces it with the op, registers the pass, and checks the compiled model
against eager. docs/writing_a_pass.md walks through it.

    python examples/writing_a_pass.py
"""

import torch
import torch.nn as nn

import seqfuse
from seqfuse.passes import Pass

aten = torch.ops.aten


# 1. The op. A custom op is opaque to the downstream compiler; it needs a real
#    implementation, a fake one (shapes only) and a backward formula.


def _counts(x, dim):
    """1, 2, ..., L laid along `dim`, shaped to broadcast against x."""
    shape = [1] * x.dim()
    shape[dim] = x.shape[dim]
    return torch.arange(1, x.shape[dim] + 1, dtype=x.dtype, device=x.device).view(shape)


@torch.library.custom_op("mylib::causal_mean", mutates_args=())
def causal_mean(x: torch.Tensor, dim: int) -> torch.Tensor:
    """x: floating point, any shape -> y, same shape: y[t] = mean(x[0..t]) along dim."""
    return x.cumsum(dim) / _counts(x, dim)


@causal_mean.register_fake
def _(x, dim):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    ctx.dim = inputs[1]


def _backward(ctx, grad):
    # y[t] = sum_{s<=t} x[s] / (t+1)  =>  dx[s] = sum_{t>=s} grad[t] / (t+1): a reversed cumsum
    g = grad / _counts(grad, ctx.dim)
    return g.flip(ctx.dim).cumsum(ctx.dim).flip(ctx.dim), None


causal_mean.register_autograd(_backward, setup_context=_setup_context)


# 2. The pass. It runs on the canonical graph (pre-dispatch ATen), where
#    `torch.cumsum(h, dim=1) / torch.arange(1, L + 1).unsqueeze(-1)` reads
#        cumsum = aten.cumsum.default(h, 1)
#        arange = aten.arange.start(1, L + 1, ...)
#        unsqueeze = aten.unsqueeze.default(arange, -1)
#        div = aten.div.Tensor(cumsum, unsqueeze)


def is_counts_along(node, dim, x_shape):
    """True if `node` is arange(1, L + 1), L = x_shape[dim], and broadcasts against x along dim only."""
    src = node
    while isinstance(src, torch.fx.Node) and src.target in (aten.unsqueeze.default, aten.view.default):
        src = src.args[0]
    if not isinstance(src, torch.fx.Node) or src.target != aten.arange.start:
        return False
    if list(src.args[:2]) != [1, x_shape[dim] + 1]:
        return False
    shape = list(node.meta["val"].shape)
    shape = [1] * (len(x_shape) - len(shape)) + shape  # right-align, as broadcasting does
    return shape == [n if d == dim else 1 for d, n in enumerate(x_shape)]


class CausalMeanPass(Pass):
    # cumsum(x, d) / arange(1, L+1) laid along d  ->  mylib.causal_mean(x, d)
    name = "causal_mean"

    def run(self, ctx):
        graph = ctx.graph
        for div in list(graph.nodes):
            if div.target != aten.div.Tensor:
                continue
            cumsum, divisor = div.args
            if not isinstance(cumsum, torch.fx.Node) or cumsum.target != aten.cumsum.default:
                continue
            x = cumsum.args[0]
            x_val, y_val = x.meta["val"], div.meta["val"]
            dim = cumsum.args[1] % x_val.dim()
            if y_val.dtype != x_val.dtype:
                ctx.report.add_near_miss("causal_mean", f"the division promotes {x_val.dtype} to {y_val.dtype}", div)
                continue
            if not is_counts_along(divisor, dim, x_val.shape):
                ctx.report.add_near_miss("causal_mean", f"divisor is not arange(1, L + 1) along dim {dim}", div)
                continue

            with graph.inserting_before(div):
                mean = graph.call_function(torch.ops.mylib.causal_mean.default, (x, dim))
            mean.meta.update(div.meta)  # shapes for the downstream compiler, source location for the report
            div.replace_all_uses_with(mean)
            graph.erase_node(div)
            ctx.report.add_rewrite("causal_mean", f"%{mean.name} = mylib.causal_mean(%{x.name}) {{dim={dim}}}", mean)
        graph.eliminate_dead_code()  # the cumsum and arange nodes, now unused


# 3. A model that uses the mixer, and a variant the pass does not match.


class RunningMeanMixer(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.proj_in = nn.Linear(dim, dim)
        self.proj_out = nn.Linear(dim, dim)

    def forward(self, x):  # x: (B, L, dim)
        h = self.proj_in(x)
        L = h.shape[1]
        mean = torch.cumsum(h, dim=1) / torch.arange(1, L + 1, device=h.device).unsqueeze(-1)
        return x + self.proj_out(mean)


class ShiftedCountMixer(RunningMeanMixer):
    def forward(self, x):  # the same numbers, another spelling: a near miss
        h = self.proj_in(x)
        L = h.shape[1]
        mean = torch.cumsum(h, dim=1) / (torch.arange(L, device=h.device) + 1).unsqueeze(-1)
        return x + self.proj_out(mean)


# 4. Register the pass, compile, and check against eager.


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def main(tol=1e-5):
    seqfuse.register_pass(CausalMeanPass())

    torch.manual_seed(0)
    model = RunningMeanMixer(16)
    x = torch.randn(2, 10, 16, requires_grad=True)

    report = seqfuse.explain(model, x)
    print(report)

    def output_and_grads(fn):
        model.zero_grad()
        x.grad = None
        y = fn(x)
        y.square().sum().backward()
        return [y.detach(), x.grad] + [p.grad for p in model.parameters()]

    expected = output_and_grads(model)
    actual = output_and_grads(torch.compile(model, backend="seqfuse"))
    err = max(rel_err(a, e) for a, e in zip(actual, expected))
    print(f"output and gradients, worst rel. error vs eager: {err:.2e}")

    print(seqfuse.explain(ShiftedCountMixer(16), x))

    if report.count("causal_mean") != 1 or not err < tol:
        raise SystemExit("FAIL")
    print("OK")


if __name__ == "__main__":
    main()
