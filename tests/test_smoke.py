"""The backend registered by entry point, on the headline spelling (fast, no other tests needed)."""
import math

import torch

from helpers import check_against_eager


def naive_causal(q, k, v):
    L = q.shape[-2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    s = s.masked_fill(torch.triu(torch.ones(L, L, dtype=torch.bool), 1), float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def test_backend_name_resolves_without_import():
    from torch._dynamo.backends.registry import lookup_backend
    assert lookup_backend("seqfuse").__name__ == "seqfuse_backend"


def test_naive_causal_attention_is_rewritten():
    q, k, v = (torch.randn(2, 4, 16, 8, requires_grad=True) for _ in range(3))
    report = check_against_eager(naive_causal, q, k, v, options={"downstream": "aot_eager"})
    assert report.count("attention") == 1
    assert "mask=causal" in report.rewrites[0].ir
    assert report.runtime["attention"]["aten"] == 1
