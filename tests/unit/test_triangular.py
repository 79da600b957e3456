"""seqfuse.passes.triangular.whole_write: a fresh buffer read as the one value copied over all of it, and only
then (a read before the write, a partial, broadcasting or casting write, a second write: None)."""
import pytest
import torch

from seqfuse.compiler.canonicalize import trace_pre_dispatch
from seqfuse.passes.triangular import whole_write

aten = torch.ops.aten


def graph_of(fn, *args):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(trace_pre_dispatch(gm, example_inputs))
        return gm.forward

    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return graphs[0]


def buffer(gm):
    return next(n for n in gm.graph.nodes if n.target in (aten.zeros.default, aten.empty.memory_format))


def whole(x):
    A = torch.zeros(2, 3)
    A[:, 0:3] = x.sin()      # (traced as copy_(A, sin): the full slice is A itself)
    return A * 2


def read_before(x):
    A = torch.zeros(2, 3)
    s = A.sum()
    A[:, 0:3] = x.sin()
    return A * s


def partial(x):
    A = torch.zeros(2, 3)
    A[:, 0:2] = x.sin()[:, :2]
    return A * 2


def broadcast(x):           # traced with the broadcast explicit: copy_(A, expand(...)), that value
    A = torch.zeros(2, 3)
    A[:, 0:3] = x.sin()[:1]
    return A * 2


def cast(x):
    A = torch.zeros(2, 3, dtype=torch.float64)
    A[:, 0:3] = x.sin()
    return A * 2


def twice(x):
    A = torch.zeros(2, 3)
    A[:, 0:3] = x.sin()
    A[:, 0:1] = x[:, :1]
    return A * 2


@pytest.mark.parametrize("fn,ok", [(whole, True), (read_before, False), (partial, False), (broadcast, True),
                                   (cast, False), (twice, False)])
def test_whole_write(fn, ok):
    gm = graph_of(fn, torch.randn(2, 3))
    src = whole_write(buffer(gm))
    assert (src is not None) == ok, gm.graph
    if ok:
        assert src.target in (aten.sin.default, aten.expand.default)


def test_whole_write_through_a_full_slice():
    # loop_map writes a vectorized loop as copy_(slice(A, d, 0, n), value): the same whole write
    from torch._subclasses.fake_tensor import FakeTensorMode
    g = torch.fx.Graph()
    x = g.placeholder("x")
    A = g.call_function(aten.zeros.default, ([2, 4],))
    dest = g.call_function(aten.slice.Tensor, (A, 1, 0, 4))
    src = g.call_function(aten.sin.default, (x,))
    g.call_function(aten.copy_.default, (dest, src))
    g.output(g.call_function(aten.mul.Tensor, (A, 2)))
    with FakeTensorMode() as mode:
        xv = mode.from_tensor(torch.randn(2, 4))
        for n, v in ((x, xv), (A, torch.zeros(2, 4)), (dest, torch.zeros(2, 4)), (src, xv.sin())):
            n.meta["val"] = v
    assert whole_write(A) is src
    dest.args = (A, 1, 0, 3)          # a partial write
    assert whole_write(A) is None
