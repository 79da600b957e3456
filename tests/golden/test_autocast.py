"""Mixed-precision training (``torch.autocast``): the mixers are found inside the autocast region, the
outputs keep eager's dtype, and the output and every parameter gradient are as close to the fp64
program as eager's own autocast run is.

Under autocast eager rounds the scores and the probabilities to 16 bits (its matmuls run in the low
precision); seqfuse's fused ops keep them in fp32, so the two differ by about the low precision's
rounding, and only a comparison with fp64 says which one is right.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import seqfuse
from seqfuse.compiler.report import collecting
from helpers import rel_err

D, H = 32, 4


class Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(D, 3 * D)
        self.o = torch.nn.Linear(D, D)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, H, D // H).permute(2, 0, 3, 1, 4)
        s = (q @ k.transpose(-1, -2) / math.sqrt(D // H)).masked_fill(
            ~torch.ones(n, n, dtype=torch.bool, device=x.device).tril(), float("-inf"))
        return x + self.o((s.softmax(-1) @ v).transpose(1, 2).reshape(b, n, D))


class LinearAttention(Attention):
    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, H, D // H).permute(2, 0, 3, 1, 4)
        q, k = F.elu(q) + 1, F.elu(k) + 1
        s = (q @ k.transpose(-1, -2)).masked_fill(~torch.ones(n, n, dtype=torch.bool, device=x.device).tril(), 0.0)
        return x + self.o((s @ v).transpose(1, 2).reshape(b, n, D))


def _run(model, x, dtype):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
        y = model(x)
    y.double().square().mean().backward()
    return y.detach(), [p.grad.double() for p in model.parameters()]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("model_cls,kind", [(Attention, "attention"), (LinearAttention, "ssd")],
                         ids=["attention", "linear_attention"])
def test_autocast_training_is_as_accurate_as_eager(model_cls, kind, dtype):
    torch.manual_seed(0)
    model = model_cls()
    x = torch.randn(2, 48, D)
    exact, exact_grads = _run(copy.deepcopy(model).double(), x.double(), None)
    ref, ref_grads = _run(model, x, dtype)
    report = seqfuse.Report()
    compiled = torch.compile(model, backend="seqfuse", options={"downstream": "aot_eager"})
    with collecting(report):
        out, grads = _run(compiled, x, dtype)
    assert [r.kind for r in report.rewrites] == [kind], report
    assert out.dtype == ref.dtype
    for what, got, eager, truth in [("output", out, ref, exact), *[
            (f"gradient {i}", g, r, t) for i, (g, r, t) in enumerate(zip(grads, ref_grads, exact_grads))]]:
        ours, theirs = rel_err(got, truth), rel_err(eager, truth)
        assert ours <= 1.25 * theirs, f"{what}: {ours:.3g} from fp64 against eager's {theirs:.3g}"
