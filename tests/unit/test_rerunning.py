"""seqfuse.compiler.constants.mutates: which Dynamo graphs write into their inputs in place (a graph an
op refused cannot be run again as written after such a write), and which only write tensors they create."""
import pytest
import torch

from seqfuse.compiler.constants import mutates


def dynamo_graph(fn, *args):
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward
    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    (gm,) = graphs
    return gm


def add_(x, buf):
    buf.add_(1)
    return x * 2


def setitem(x, buf):
    buf[0] = x.sum()
    return x * 2


def iadd(x, buf):
    buf += 1
    return x * 2


def through_a_view(x, buf):
    buf.view(-1)[:2].mul_(2)
    return x * 2


def copy_into(x, buf):
    buf.copy_(x)
    return x * 2


def own_tensor(x, buf):
    y = x.clone()
    y[0] = 0
    y.mul_(2)
    z = torch.zeros_like(x)
    z += x
    return y + z + buf


@pytest.mark.parametrize("fn,want", [(add_, True), (setitem, True), (iadd, True), (through_a_view, True),
                                     (copy_into, True), (own_tensor, False)])
def test_mutates_sees_writes_into_inputs_only(fn, want):
    x, buf = torch.randn(4), torch.zeros(4)
    assert mutates(dynamo_graph(fn, x, buf)) is want
