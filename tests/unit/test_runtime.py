"""Runtime dispatch: counters of the path each call took, forced paths, and fallbacks to eager."""
import dataclasses
import math

import pytest
import torch

import seqfuse
import seqfuse.lowering.attention_op  # noqa: F401  (registers the implementations)
from helpers import check_against_eager, rel_err
from seqfuse.lowering.reference.attention import attention_reference
from seqfuse.runtime import dispatch

ATTRS = (None, "causal", 0, 0, -math.inf, False, 1, None, 0.0)  # scale ... dropout
EMPTY_ROWS, NONCE = "nan", 0  # the op's last attribute and its CSE guard argument


def call(q, k, v, runtime="auto", attrs=ATTRS, bias=None):
    return torch.ops.seqfuse.attention(q, k, v, bias, None, *attrs, EMPTY_ROWS, NONCE, runtime)


def causal(q, k, v):
    L = q.shape[-2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    s = s.masked_fill(torch.triu(torch.ones(L, L, dtype=torch.bool), 1), float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def qkv(grad=False):
    return [torch.randn(2, 2, 8, 16, requires_grad=grad) for _ in range(3)]


def not_triton(reasons: dict) -> dict:
    """Fallback reasons without the triton path's (CPU tensors never run on triton; whether
    its refusal is recorded depends on whether a triton implementation is registered)."""
    return {kind: {r: n for r, n in rs.items() if not r.startswith("triton")} for kind, rs in reasons.items()
            if any(not r.startswith("triton") for r in rs)}


def ref(q, k, v):
    return attention_reference(q, k, v, mask="causal")


def test_counters_count_each_path():
    q, k, v = qkv()
    assert seqfuse.counters() == {}
    call(q, k, v)
    call(q, k, v)
    call(q, k, v, runtime="eager")
    assert seqfuse.counters() == {"attention": {"triton": 0, "cpu": 0, "aten": 2, "eager": 1}}
    assert not_triton(seqfuse.fallbacks()) == {}
    seqfuse.reset_counters()
    assert seqfuse.counters() == {} and seqfuse.fallbacks() == {}


def test_backward_calls_are_counted_separately():
    q, k, v = qkv(grad=True)
    out, _, _ = call(q, k, v)
    out.sum().backward()
    c = seqfuse.counters()
    assert c["attention"]["aten"] == 1 and c["attention_backward"]["aten"] == 1


def test_unsupported_call_runs_eager_and_counts_the_reason():
    q, k, v = qkv()
    softcap = ATTRS[:7] + (5.0, 0.0)
    out, _, _ = call(q, k, v, attrs=softcap)
    assert rel_err(out, attention_reference(q, k, v, mask="causal", softcap=5.0)) < 1e-6
    assert seqfuse.counters()["attention"] == {"triton": 0, "cpu": 0, "aten": 0, "eager": 1}
    reasons = not_triton(seqfuse.fallbacks())["attention"]
    assert reasons == {"aten: softcap is not supported by scaled_dot_product_attention": 1}


def test_runtime_option_eager_forces_the_eager_path():
    q, k, v = qkv(grad=True)
    report = check_against_eager(causal, q, k, v, options={"downstream": "eager", "runtime": "eager"})
    assert report.count("attention") == 1
    assert report.runtime["attention"] == {"triton": 0, "cpu": 0, "aten": 0, "eager": 1}
    # the backward ran after explain returned: it is in the process-wide counters
    assert seqfuse.counters()["attention_backward"] == {"triton": 0, "cpu": 0, "aten": 0, "eager": 1}
    torch._dynamo.reset()
    report = check_against_eager(causal, *qkv(), options={"downstream": "eager"}, grads=False)
    assert report.runtime["attention"] == {"triton": 0, "cpu": 0, "aten": 1, "eager": 0}  # the default would use aten


def test_requested_path_that_cannot_run_warns():
    q, k, v = qkv()
    with pytest.warns(UserWarning, match=r"seqfuse\.attention: runtime='aten' requested but softcap"):
        call(q, k, v, runtime="aten", attrs=ATTRS[:7] + (5.0, 0.0))
    if "triton" not in dispatch._IMPLS["attention"]:
        with pytest.warns(UserWarning, match=r"runtime='triton' requested but no triton implementation"):
            out, _, _ = call(q, k, v, runtime="triton")
        assert rel_err(out, ref(q, k, v)) < 1e-6
        assert seqfuse.fallbacks()["attention"]["triton: not available"] == 1
    assert seqfuse.counters()["attention"]["eager"] == 2 - ("triton" in dispatch._IMPLS["attention"])


def test_unknown_runtime_is_rejected():
    with pytest.raises(ValueError, match="runtime must be one of"):
        call(*qkv(), runtime="cuda")


def test_register_impl_rejects_unknown_path():
    impl = dispatch._IMPLS["attention"]["eager"]
    with pytest.raises(ValueError, match="path must be one of"):
        dispatch.register_impl("attention", dataclasses.replace(impl, path="cpp"))


@pytest.fixture
def broken_aten(monkeypatch):
    """The aten implementation replaced by one whose forward and backward raise."""
    def boom(*args):
        raise RuntimeError("injected fault")

    impl = dispatch._IMPLS["attention"]["aten"]
    monkeypatch.setitem(dispatch._IMPLS["attention"], "aten", dataclasses.replace(impl, forward=boom, backward=boom))


def test_fault_in_aten_falls_back_to_eager_with_a_warning(broken_aten):
    q, k, v = qkv()
    with pytest.warns(UserWarning) as record:
        out, _, _ = call(q, k, v)
    messages = [str(w.message) for w in record]
    assert any("seqfuse.attention: aten raised RuntimeError: injected fault" in m and "eager" in m
               for m in messages), messages
    assert rel_err(out, ref(q, k, v)) < 1e-6
    assert seqfuse.counters()["attention"] == {"triton": 0, "cpu": 0, "aten": 0, "eager": 1}
    assert not_triton(seqfuse.fallbacks())["attention"] == {"aten raised RuntimeError: injected fault": 1}


def test_fault_in_compiled_model_falls_back_and_stays_correct(broken_aten):
    q, k, v = qkv(grad=True)
    with pytest.warns(UserWarning, match="aten raised RuntimeError: injected fault") as record:
        report = check_against_eager(causal, q, k, v, options={"downstream": "eager"})
    assert any("seqfuse.attention_backward: aten raised" in str(w.message) for w in record)
    assert report.runtime["attention"] == {"triton": 0, "cpu": 0, "aten": 0, "eager": 1}
    assert not_triton(report.fallbacks)["attention"] == {"aten raised RuntimeError: injected fault": 1}
    assert "aten raised RuntimeError: injected fault" in str(report)  # the "paths not taken" table
    # the backward ran after explain returned, and fell back too
    assert seqfuse.counters()["attention_backward"] == {"triton": 0, "cpu": 0, "aten": 0, "eager": 1}
    assert not_triton(seqfuse.fallbacks())["attention"] == {"aten raised RuntimeError: injected fault": 2}


def test_missing_eager_implementation_is_an_error(monkeypatch):
    monkeypatch.setitem(dispatch._IMPLS, "scan", {})
    with pytest.raises(RuntimeError, match="no eager implementation registered for IR op 'scan'"):
        dispatch.choose("scan", "auto", {}, {})
