"""Attention sinks (gpt-oss): a learned logit per head concatenated to the scores, the softmax taken,
the sink's column dropped: one seqfuse.attention with a ``sink`` operand (docs/ir.md).

transformers' own ``eager_attention_forward`` of gpt-oss (with its row-max subtraction) and a tiny
GptOss model in training: FileCheck on the graph after the attention pass, outputs and every
gradient (the sinks' included) against eager; spellings without the max or with ``amax``; the
triton kernels through the interpreter; forms that are not sinks stay as written.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "filecheck"))
from fc import run_filecheck  # noqa: E402  (tests/filecheck/fc.py)
from helpers import Logits, check_against_eager  # noqa: E402

from seqfuse.runtime.counters import counters  # noqa: E402

transformers = pytest.importorskip("transformers")
from transformers.models.gpt_oss import modeling_gpt_oss  # noqa: E402

AOT = {"downstream": "aot_eager"}


def attention_dump(report) -> str:
    paths = [p for p in report.dumps if os.path.basename(p).split("_", 2)[-1] == "attention.txt"]
    assert len(paths) == 1, report.dumps
    with open(paths[0]) as f:
        return f.read()


class _Module(torch.nn.Module):
    """What gpt-oss' eager_attention_forward reads off its module: sinks and the GQA group count."""

    def __init__(self, heads, groups):
        super().__init__()
        self.sinks = torch.nn.Parameter(torch.randn(heads))
        self.num_key_value_groups = groups

    def forward(self, q, k, v, mask):
        return modeling_gpt_oss.eager_attention_forward(self, q, k, v, mask, scaling=0.3, dropout=0.0)[0]


def _inputs(b=2, h=4, hk=2, lq=7, d=8):
    torch.manual_seed(0)
    q = torch.randn(b, h, lq, d, requires_grad=True)
    k, v = (torch.randn(b, hk, lq, d, requires_grad=True) for _ in range(2))
    mask = torch.full((lq, lq), float("-inf")).triu(1)[None, None].expand(b, 1, lq, lq)
    return q, k, v, mask


SINK_CHECKS = """
CHECK: seqfuse.attention({{.*}}sink=%{{.*}}gqa_groups=2
CHECK-NOT: aten.cat
CHECK-NOT: aten.softmax
"""


def test_gpt_oss_eager_attention_forward(tmp_path):
    m = _Module(4, 2).train()
    report = check_against_eager(m, *_inputs(), options={**AOT, "dump_dir": str(tmp_path)})
    assert report.count("attention") == 1, str(report)
    run_filecheck(attention_dump(report), SINK_CHECKS)
    assert counters()["attention"]["eager"] == 1  # ATen's kernels have no sink: refused on CPU


def test_gpt_oss_eager_attention_forward_on_triton(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    m = _Module(4, 2).train()
    report = check_against_eager(m, *_inputs(lq=19, d=16), options={**AOT, "runtime": "triton"})
    assert report.count("attention") == 1, str(report)
    assert counters()["attention"]["triton"] == 1 and counters()["attention_backward"]["triton"] == 1


def _sink_amax(q, k, v, sink):
    s = q @ k.mT * 0.25
    c = torch.cat([s, sink[None, :, None, None].expand(q.shape[0], -1, q.shape[2], 1)], dim=-1)
    c = c - c.amax(-1, keepdim=True)
    return c.softmax(-1)[..., :-1] @ v


def _sink_plain(q, k, v, sink):
    s = q @ k.mT * 0.25
    c = torch.cat([s, sink[None, :, None, None].expand(q.shape[0], -1, q.shape[2], 1)], dim=-1)
    return c.softmax(-1)[..., : s.shape[-1]] @ v


@pytest.mark.parametrize("fn", [_sink_amax, _sink_plain])
def test_sink_spellings(fn):
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 3, 9, 8, requires_grad=True) for _ in range(3))
    sink = torch.randn(3, requires_grad=True)
    report = check_against_eager(fn, q, k, v, sink)
    assert report.count("attention") == 1, str(report)
    assert "sink=" in report.rewrites[0].ir


def _sink_first(q, k, v, sink):
    # the sink in front and the keys' probabilities taken as [..., 1:]: not the form the op has
    s = q @ k.mT * 0.25
    c = torch.cat([sink[None, :, None, None].expand(q.shape[0], -1, q.shape[2], 1), s], dim=-1)
    return c.softmax(-1)[..., 1:] @ v


def _sink_kept(q, k, v, sink):
    # the sink's probability is kept (a column of p times a zero value row would be needed)
    s = q @ k.mT * 0.25
    c = torch.cat([s, sink[None, :, None, None].expand(q.shape[0], -1, q.shape[2], 1)], dim=-1)
    return c.softmax(-1)[..., 1:] @ v


def test_fp64_sink_gradient_keeps_fp64():
    # found by the attention fuzzer (seed 4005, #142): the op kept its log-sum-exp in fp32, so the sink's
    # gradient exp(sink − lse)·Δ of an fp64 program was 5e-8 off eager's; the lse is fp64 for fp64 now
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 3, 9, 8, dtype=torch.float64) for _ in range(3))
    sink = torch.randn(3, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 3, 9, 8, dtype=torch.float64)
    (want,) = torch.autograd.grad(_sink_plain(q, k, v, sink), sink, grad)
    (got,) = torch.autograd.grad(torch.compile(_sink_plain, backend="seqfuse")(q, k, v, sink), sink, grad)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fn", [_sink_first, _sink_kept])
def test_other_concatenations_are_left_as_written(fn):
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 2, 5, 4, requires_grad=True) for _ in range(3))
    sink = torch.randn(2, requires_grad=True)
    report = check_against_eager(fn, q, k, v, sink)
    assert report.count("attention") == 0, str(report)
    # never silent: q·kᵀ scores beside a column are reported
    reasons = [m.reason for m in report.near_misses if m.kind == "attention"]
    assert len(reasons) == 1 and "concatenated with a column (an attention sink)" in reasons[0], str(report)


class _Inkling2Module(torch.nn.Module):
    """What inkling2's eager_attention_forward reads off its module: the GQA group count."""

    def __init__(self, groups):
        super().__init__()
        self.num_key_value_groups = groups
        self.training = True

    def forward(self, q, k, v, mask, position_bias, sinks):
        inkling2 = pytest.importorskip("transformers.models.inkling2.modeling_inkling2")
        return inkling2.eager_attention_forward(self, q, k, v, mask, scaling=0.3, position_bias=position_bias,
                                                sinks=sinks)[0]


def _inkling2_inputs(dtype, b=2, h=4, hk=2, lq=7, d=8):
    torch.manual_seed(3)
    q, k, v, mask = _inputs(b, h, hk, lq, d)
    bias = torch.randn(b, h, lq, lq)
    sinks = torch.randn(b, h, lq, 1)       # per query: sink_proj(hidden_states) in the model
    return [x.detach().to(dtype).requires_grad_(x is not mask) for x in (q, k, v, mask, bias, sinks)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inkling2_per_query_sinks_through_float_casts(dtype):
    # transformers' inkling2: cat([scores + position bias + mask, sinks (B, H, L, 1)]).float(), softmax,
    # [..., :-1].to(q.dtype): the casts keep every value (fp32: no-ops; bf16: widening), so one attention
    # with a per-query sink; outputs and every gradient (the sinks' and the bias's) equal eager's
    report = check_against_eager(_Inkling2Module(2), *_inkling2_inputs(dtype))
    assert report.count("attention") == 1, str(report)
    assert "sink=" in report.rewrites[0].ir and "bias=" in report.rewrites[0].ir, report.rewrites[0].ir


def test_inkling2_sinks_in_fp64_narrowed_by_float_is_a_near_miss():
    # fp64 logits cast to fp32 before the softmax: the op would compute them in fp64, so the program stays
    report = check_against_eager(_Inkling2Module(2), *_inkling2_inputs(torch.float64))
    assert report.count("attention") == 0, str(report)
    reasons = [m.reason for m in report.near_misses if m.kind == "attention"]
    assert len(reasons) == 1 and "cast from torch.float64 to torch.float32 before the softmax" in reasons[0], \
        str(report)


def test_gpt_oss_model_trains_like_eager():
    cfg = transformers.GptOssConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=2,
                                    num_experts_per_tok=1, sliding_window=8, attn_implementation="eager")
    torch.manual_seed(0)
    model = Logits(transformers.GptOssForCausalLM(cfg)).train()
    report = check_against_eager(model, torch.randint(0, 64, (2, 12)), options=AOT)
    assert report.count("attention") == 2, str(report)
    assert all("sink=" in r.ir for r in report.rewrites if r.kind == "attention")
