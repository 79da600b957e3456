"""Pre-dispatch tracing by replay (seqfuse/compiler/replay.py) builds the graph the plain tracer builds."""
import pytest
import torch

from seqfuse.compiler import replay
from seqfuse.compiler.canonicalize import trace_pre_dispatch
from seqfuse.ir import format_graph


def dynamo_graph(fn, *args, dynamic=False):
    """Dynamo's FX graph of ``fn`` and its example inputs."""
    seen = []

    def capture(gm, example_inputs):
        seen.append((gm, example_inputs))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=capture, dynamic=dynamic)(*args)
    assert len(seen) == 1, "expected one graph"
    return seen[0]


def selective_scan(x, dt, A, B, C):
    dA = torch.exp(A[None, :, None, :] * dt[..., None])
    dBu = dt[..., None] * B[:, None] * x[..., None]
    h = torch.zeros(x.shape[0], x.shape[1], A.shape[-1])
    ys = []
    for i in range(x.shape[2]):
        h = dA[:, :, i] * h + dBu[:, :, i]
        ys.append(torch.matmul(h, C[:, i, :].unsqueeze(-1))[:, :, 0])
    return torch.stack(ys, dim=-1), h


def gla(q, k, v, gk):
    B, H, T, K = q.shape
    o = torch.zeros_like(v)
    h = q.new_zeros(B, H, K, v.shape[-1])
    for i in range(T):
        kv = k[:, :, i][..., None] * v[:, :, i][..., None, :]
        h = h * gk[:, :, i].exp()[..., None] + kv
        o[:, :, i] = (q[:, :, i][..., None] * h).sum(-2)
    return o, h


def sliced_rnn(x, w):
    # x[:, t:t+1] slices (start and stop both follow t) and a reversed loop
    h = x[:, -1:] * 0
    outs = []
    for t in range(x.shape[1] - 1, -1, -1):
        h = torch.tanh(h * w + x[:, t:t + 1])
        outs.append(h)
    return torch.cat(outs[::-1], dim=1)


CASES = {
    "selective_scan": (selective_scan, lambda: (torch.randn(1, 4, 24), torch.rand(1, 4, 24), -torch.rand(4, 3),
                                                torch.randn(1, 24, 3), torch.randn(1, 24, 3))),
    "gla_setitem": (gla, lambda: tuple(torch.randn(1, 2, 20, 4, requires_grad=True) for _ in range(4))),
    "sliced_reversed": (sliced_rnn, lambda: (torch.randn(2, 30), torch.randn(2, 1))),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_replay_builds_the_plain_graph(name):
    fn, make = CASES[name]
    gm, example_inputs = dynamo_graph(fn, *make())
    plain = trace_pre_dispatch(gm, example_inputs, replay=False)
    replayed = trace_pre_dispatch(gm, example_inputs, replay=True)
    assert format_graph(replayed.graph) == format_graph(plain.graph)
    # and it computes the same (on the real example inputs, in the graph's input order)
    torch.testing.assert_close(replayed(*example_inputs), plain(*example_inputs), rtol=0, atol=0)
    # the user's source lines survive
    lines = [n.meta.get("stack_trace") for n in replayed.graph.nodes if n.op == "call_function"]
    assert all(lines) and any("test_replay.py" in s for s in lines)


def test_eligibility():
    fn, make = CASES["selective_scan"]
    gm, _ = dynamo_graph(fn, *make())
    assert not replay.eligible(gm)                     # 24 steps: too small to pay off
    gm, _ = dynamo_graph(fn, *(torch.randn(1, 4, 128), torch.rand(1, 4, 128), -torch.rand(4, 3),
                               torch.randn(1, 128, 3), torch.randn(1, 128, 3)))
    assert replay.eligible(gm)                         # 128 steps of the same body
    gm, _ = dynamo_graph(fn, *make(), dynamic=True)
    assert not any(n.op == "call_function" and "sym_size" in str(n.target) for n in gm.graph.nodes) or \
        not replay.eligible(gm)                        # symbolic shapes are never replayed


def test_unsupported_node_is_refused():
    def with_no_grad(x):
        with torch.no_grad():
            y = x * 2
        return y + x

    gm, example_inputs = dynamo_graph(with_no_grad, torch.randn(3, requires_grad=True))
    with pytest.raises(replay.Unsupported):
        trace_pre_dispatch(gm, example_inputs, replay=True)
    # the default path decides by itself and falls back to the plain tracer
    assert format_graph(trace_pre_dispatch(gm, example_inputs).graph) == \
        format_graph(trace_pre_dispatch(gm, example_inputs, replay=False).graph)
