"""seqfuse.compiler.vmap.fold_shape_only_vmaps: vmap levels computed from sizes alone become constants;
a level that reads an input of the graph (a size included) or writes a tensor made outside it stays."""
import pytest
import torch

from seqfuse.compiler import vmap


def _dynamo_graph(fn, *xs, dynamic=None) -> torch.fx.GraphModule:
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm
    torch._dynamo.reset()
    torch.compile(fn, backend=backend, dynamic=dynamic)(*xs)
    assert len(graphs) == 1
    return graphs[0]


def _rows(i):
    return torch.cumsum(torch.arange(4.0) * i, 0)   # not elementwise: not a no-op level


def shape_only(x):
    return x + torch.vmap(_rows)(torch.arange(3.0))


def reads_input(x):
    return torch.vmap(_rows)(x[:, 0])


def test_a_level_from_sizes_alone_becomes_constants():
    x = torch.randn(3, 4)
    gm = _dynamo_graph(shape_only, x)
    folded, count = vmap.fold_shape_only_vmaps(gm)
    assert count == 1 and not vmap.has_vmap(folded) and vmap.has_vmap(gm)   # gm itself unchanged
    (const,) = [n.target for n in folded.graph.nodes if n.op == "get_attr"]
    assert const.startswith(vmap.FOLDED)
    y = torch.randn(3, 4)
    torch.testing.assert_close(folded(y)[0], shape_only(y))


@pytest.mark.parametrize("dynamic", [None, True])
def test_a_level_reading_an_input_stays(dynamic):
    x = torch.randn(3, 4)
    fn = reads_input if dynamic is None else (lambda x: x + torch.vmap(_rows)(torch.arange(x.shape[0]) * 1.0))
    gm = _dynamo_graph(fn, x, dynamic=dynamic)
    folded, count = vmap.fold_shape_only_vmaps(gm)
    assert count == 0 and folded is gm


def test_a_level_writing_a_tensor_made_outside_stays():
    def writes(x):
        buf = torch.zeros(3)

        def f(i):
            buf.add_(1.0)
            return i * 2
        return x + torch.vmap(f)(torch.arange(3.0))
    gm = _dynamo_graph(writes, torch.randn(3))
    _, count = vmap.fold_shape_only_vmaps(gm)
    assert count == 0
