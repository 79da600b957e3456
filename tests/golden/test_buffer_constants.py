"""Module buffers read as constants under a run-time value guard (seqfuse/compiler/constants.py).

nanoGPT keeps its causal mask as a buffer (``self.bias = tril(ones(N, N))``, read as
``bias[:, :, :T, :T] == 0``).  Dynamo lifts the buffer to a graph input, so without a value
guard the mask is an arbitrary keep tensor.  With one, the attention op gets ``mask=causal`` and
no keep operand, and each call checks the buffer still holds the value it was compiled with:
a changed buffer runs the graph without the rewrite (still equal to eager), counted in the report.
"""
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import seqfuse  # noqa: F401 - registers the backend
from seqfuse.runtime.counters import counting
from helpers import call_past_a_changed_guard, check_against_eager, rel_err


class CausalSelfAttention(nn.Module):
    """nanoGPT's attention (model.py, its non-flash path), sizes small."""

    def __init__(self, n_embd=32, n_head=4, block_size=16, mask=None):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.n_head, self.n_embd = n_head, n_embd
        if mask is None:
            mask = torch.tril(torch.ones(block_size, block_size))
        self.register_buffer("bias", mask.view(1, 1, block_size, block_size))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


def _model_and_copy():
    """The attention module and an eager copy of it with the same weights and buffer."""
    torch.manual_seed(0)
    m, ref = CausalSelfAttention(), CausalSelfAttention()
    ref.load_state_dict(m.state_dict())
    return m, ref


def _attention_ir(report) -> str:
    assert report.count("attention") == 1, str(report)
    return report.rewrites[0].ir


def test_a_tril_mask_buffer_is_a_causal_mask_under_a_value_guard():
    torch.manual_seed(0)
    m = CausalSelfAttention()
    report = check_against_eager(m, torch.randn(2, 12, 32, requires_grad=True))
    ir = _attention_ir(report)
    assert "mask=causal" in ir and "keep=" not in ir, ir
    assert [g for graph in report.graphs for g in graph.guards] == ["l_self_buffers_bias_"], str(report)
    assert "value guards" in str(report)


def test_a_buffer_that_is_not_a_structural_mask_stays_a_keep_operand_without_a_guard():
    # a random 0/1 pattern: no structure to read, so the buffer stays an operand and nothing is guarded
    torch.manual_seed(0)
    mask = (torch.rand(16, 16) > 0.3).float()
    mask.fill_diagonal_(1.0)
    m = CausalSelfAttention(mask=mask)
    report = check_against_eager(m, torch.randn(2, 12, 32, requires_grad=True))
    ir = _attention_ir(report)
    assert "mask=none" in ir and "keep=" in ir, ir
    assert not [g for graph in report.graphs for g in graph.guards], str(report)


def test_a_changed_buffer_runs_the_graph_unrewritten():
    m, ref = _model_and_copy()
    compiled = torch.compile(m, backend="seqfuse", options={"downstream": "aot_eager"})
    x = torch.randn(2, 12, 32)
    with counting() as tally:
        assert rel_err(compiled(x), ref(x)) < 1e-5
        # the same buffer again: the rewrite runs (no fallback counted)
        assert rel_err(compiled(x), ref(x)) < 1e-5
        assert not tally.fallbacks().get("graph"), tally.fallbacks()
        # the mask changed in place (no longer causal: every key visible): the unrewritten graph runs
        with torch.no_grad():
            m.bias.fill_(1.0)
            ref.bias.fill_(1.0)
        out = call_past_a_changed_guard(compiled, x)
        assert rel_err(out, ref(x)) < 1e-5
        assert sum(tally.fallbacks().get("graph", {}).values()) == 1, tally.fallbacks()
        # a buffer replaced by a new tensor holding the compile-time value: the rewrite runs again
        m.bias = torch.tril(torch.ones(16, 16)).view(1, 1, 16, 16)
        ref.bias = m.bias.clone()
        assert rel_err(compiled(x), ref(x)) < 1e-5
        assert sum(tally.fallbacks().get("graph", {}).values()) == 1, tally.fallbacks()


def test_training_through_a_guarded_graph_gives_eager_gradients_before_and_after_the_buffer_changes():
    m, ref = _model_and_copy()
    compiled = torch.compile(m, backend="seqfuse", options={"downstream": "aot_eager"})
    x = torch.randn(2, 12, 32)
    for step in range(2):
        if step == 1:
            with torch.no_grad():
                m.bias.copy_(torch.ones(16, 16).triu().view(1, 1, 16, 16))     # anti-causal
                ref.bias.copy_(m.bias)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = compiled(x)
        want = ref(x)
        assert rel_err(out, want) < 1e-5
        g = torch.randn_like(want)
        got = torch.autograd.grad(out, list(m.parameters()), g)
        exp = torch.autograd.grad(want, list(ref.parameters()), g)
        for (name, _), a, b in zip(m.named_parameters(), got, exp):
            assert rel_err(a, b) < 1e-5, f"step {step}: gradient of {name}"


@pytest.mark.parametrize("requires_grad", [False, True])
def test_a_mask_passed_as_an_argument_or_a_parameter_is_not_read_as_a_constant(requires_grad):
    # only module buffers are snapshotted: a mask argument can change between calls with no
    # recompile, and a parameter is trained
    def f(q, k, v, mask):
        s = (q @ k.mT).masked_fill(mask == 0, float("-inf"))
        return s.softmax(-1) @ v
    q, k, v = (torch.randn(2, 4, 8, 8, requires_grad=True) for _ in range(3))
    mask = torch.tril(torch.ones(8, 8)).requires_grad_(requires_grad)
    report = check_against_eager(f, q, k, v, mask)
    ir = _attention_ir(report)
    assert "mask=none" in ir and "keep=" in ir, ir


def test_dynamic_lengths_read_the_buffer_once_and_fall_back_at_any_length():
    # dynamic=True: one graph for every length, the buffer sliced to a symbolic T; the fallback
    # graph is compiled for the inputs of the call that found the buffer changed
    m, ref = _model_and_copy()
    report = seqfuse.explain(m, torch.randn(2, 12, 32), dynamic=True, options={"downstream": "aot_eager"})
    assert "mask=causal" in _attention_ir(report) and [g.guards for g in report.graphs] == [["l_self_buffers_bias_"]]
    compiled = torch.compile(m, backend="seqfuse", dynamic=True, options={"downstream": "aot_eager"})
    for t in (12, 7):
        x = torch.randn(2, t, 32)
        assert rel_err(compiled(x), ref(x)) < 1e-5
    with torch.no_grad():
        m.bias.copy_(torch.ones(16, 16).triu().view(1, 1, 16, 16))
        ref.bias.copy_(m.bias)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in (9, 16):
            x = torch.randn(2, t, 32)
            assert rel_err(compiled(x), ref(x)) < 1e-5
