"""Compiled autograd (``torch._dynamo.config.compiled_autograd``, as torchtitan can train): the backward
graph, captured when ``.backward()`` runs inside the compiled step, reaches seqfuse too.  It takes its
tensors boxed in one list, which the compiled graph must clear as it reads them; seqfuse's re-trace
flattened that list, and with aot_eager downstream the step raised ("Expected inputs_idx_to_clear ==
[0]").  Such a graph is now left to the downstream compiler, with a near miss saying so: the forward's
attention is fused, and every gradient equals eager's."""
import math

import torch
import torch.nn.functional as F

import seqfuse
from seqfuse.compiler.report import collecting
from helpers import rel_err


class Attention(torch.nn.Module):
    def __init__(self, d=32, heads=4):
        super().__init__()
        self.qkv, self.o, self.heads = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d), heads

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        s = (q @ k.transpose(-1, -2) / math.sqrt(d // self.heads))
        s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
        return self.o(F.gelu((s.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)))


def test_backward_graph_through_seqfuse_gives_eager_gradients():
    torch.manual_seed(0)
    model = Attention()
    x = torch.randn(2, 16, 32, requires_grad=True)
    model(x).square().sum().backward()
    expected = [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]
    model.zero_grad(set_to_none=True)
    x.grad = None

    torch._dynamo.reset()

    def step(x):
        y = model(x)
        y.square().sum().backward()
        return y

    report = seqfuse.Report()
    # config.patch, not monkeypatch: undoing a monkeypatch deletes the key from torch's config module,
    # and every later compile in the process then fails ("compiled_autograd does not exist"); and
    # around torch.compile too, which keeps the config it was called under
    with torch._dynamo.config.patch(compiled_autograd=True), collecting(report):
        y = torch.compile(step, backend="seqfuse", options={"downstream": "aot_eager"})(x)
    torch._dynamo.reset()
    assert len(report.graphs) == 2, report     # the forward and the compiled backward
    assert [r.kind for r in report.rewrites] == ["attention"], report
    assert [m.kind for m in report.near_misses] == ["graph"], report
    assert "compiled autograd" in report.near_misses[0].reason
    assert torch._dynamo.config.compiled_autograd is False
    assert rel_err(y, model(x)) < 1e-6
    got = [p.grad for p in model.parameters()] + [x.grad]
    for g, e in zip(got, expected):
        assert rel_err(g, e) < 1e-5
