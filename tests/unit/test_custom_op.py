"""seqfuse::attention and seqfuse::attention_backward as custom ops: opcheck, gradients, dropout RNG."""
import math

import pytest
import torch
import torch.nn.functional as F

import seqfuse
import seqfuse.lowering.attention_op  # noqa: F401  (registers the ops)
from helpers import rel_err
from seqfuse.lowering.aten.attention import supports
from seqfuse.lowering.reference.attention import attention_reference

ATTRS = ("scale", "mask", "diag", "window", "fill", "bias_after_mask", "gqa_groups", "softcap", "dropout",
         "empty_rows")
DEFAULTS = dict(scale=None, mask="none", diag=0, window=0, fill=-math.inf, bias_after_mask=False, gqa_groups=1,
                softcap=None, dropout=0.0, empty_rows="nan")
NONCE = 0  # the forward op's CSE guard argument (see seqfuse/lowering/attention_op.py)


def attrs_tuple(**over):
    a = {**DEFAULTS, **over}
    return tuple(a[n] for n in ATTRS)


def call(q, k, v, bias=None, keep=None, runtime="auto", **attrs):
    """seqfuse::attention with the attributes by name; returns (out, lse, rng_state)."""
    return torch.ops.seqfuse.attention(q, k, v, bias, keep, *attrs_tuple(**attrs), NONCE, runtime)


def make(b=2, h=4, hkv=None, lq=8, lk=8, d=8, dv=8, bias_shape=None, keep_shape=None, grad=True):
    hkv = hkv or h
    q = torch.randn(b, h, lq, d, requires_grad=grad)
    k = torch.randn(b, hkv, lk, d, requires_grad=grad)
    v = torch.randn(b, hkv, lk, dv, requires_grad=grad)
    bias = torch.randn(*bias_shape, requires_grad=grad) if bias_shape else None
    keep = None
    if keep_shape:
        keep = torch.rand(*keep_shape) < 0.7
        keep[..., 0] = True
    return q, k, v, bias, keep


# --- opcheck ---------------------------------------------------------------------------

OPCHECK_CASES = [
    (dict(), dict(mask="causal")),
    (dict(hkv=2, bias_shape=(1, 4, 8, 8)), dict(scale=0.3, mask="window", diag=1, window=3, gqa_groups=2)),
    (dict(keep_shape=(2, 1, 1, 8), bias_shape=(8, 8)), dict(fill=-5.0, bias_after_mask=True, softcap=4.0)),
    (dict(lq=5, lk=7, dv=3), dict(dropout=0.25)),
]


@pytest.mark.parametrize("kw, attrs", OPCHECK_CASES)
def test_opcheck_attention(kw, attrs):
    q, k, v, bias, keep = make(**kw)
    args = (q, k, v, bias, keep, *attrs_tuple(**attrs), NONCE, "auto")
    torch.library.opcheck(torch.ops.seqfuse.attention.default, args)


@pytest.mark.parametrize("kw, attrs", OPCHECK_CASES[:3])
def test_opcheck_attention_backward(kw, attrs):
    q, k, v, bias, keep = make(grad=False, **kw)
    out, lse, rng = call(q, k, v, bias, keep, **attrs)
    grad_out = torch.randn_like(out)
    need_dbias = bias is not None
    args = (grad_out, q, k, v, bias, keep, out, lse, rng, *attrs_tuple(**attrs), "auto", need_dbias)
    torch.library.opcheck(torch.ops.seqfuse.attention_backward.default, args)
    dq, dk, dv, dbias, dsink = torch.ops.seqfuse.attention_backward(*args)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert dbias.shape == (bias.shape if need_dbias else (0,))
    assert dsink.shape == (0,)


def test_opcheck_attention_with_a_sink():
    # the sink comes last (optional): forward, backward (its gradient the fifth result) and autograd
    q, k, v, bias, keep = make(grad=False)
    sink = torch.randn(q.shape[-3], 1)
    attrs = dict(mask="causal")
    args = (q, k, v, None, None, *attrs_tuple(**attrs), NONCE, "auto", sink)
    torch.library.opcheck(torch.ops.seqfuse.attention.default, args)
    out, lse, rng = torch.ops.seqfuse.attention(*args)
    ref, ref_lse = attention_reference(q, k, v, return_lse=True, sink=sink, **{**DEFAULTS, **attrs})
    assert rel_err(out, ref) < 1e-5 and rel_err(lse, ref_lse) < 1e-5
    grad_out = torch.randn_like(out)
    bargs = (grad_out, q, k, v, None, None, out, lse, rng, *attrs_tuple(**attrs), "auto", False, sink)
    torch.library.opcheck(torch.ops.seqfuse.attention_backward.default, bargs)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, sink)]
    ref = attention_reference(*leaves[:3], sink=leaves[3], **{**DEFAULTS, **attrs})
    want = torch.autograd.grad(ref, leaves, grad_out)
    got = torch.ops.seqfuse.attention_backward(*bargs)
    for g, w in zip((*got[:3], got[4]), want):
        assert rel_err(g, w) < 1e-5


def test_forward_returns_the_log_sum_exp():
    q, k, v, bias, keep = make(grad=False, hkv=2, bias_shape=(8, 8))
    a = dict(mask="causal", gqa_groups=2, scale=0.4)
    for runtime in ("auto", "eager"):
        out, lse, rng = call(q, k, v, bias, keep, runtime=runtime, **a)
        ref, ref_lse = attention_reference(q, k, v, bias, keep, return_lse=True, **{**DEFAULTS, **a})
        assert lse.dtype == torch.float32 and lse.shape == q.shape[:-1] and rng.numel() == 0
        assert rel_err(out, ref) < 1e-5 and rel_err(lse, ref_lse) < 1e-5, runtime
    assert seqfuse.counters()["attention"] == {"triton": 0, "cpu": 0, "aten": 1, "eager": 1}


# --- gradients through the op vs autograd through the reference ---------------------------

GRAD_CASES = {
    "causal": (dict(), dict(mask="causal")),
    "bias": (dict(bias_shape=(1, 4, 8, 8)), dict(scale=0.5)),
    "bias_broadcast_keep": (dict(bias_shape=(8, 8), keep_shape=(2, 1, 1, 8)), dict(mask="window", window=4)),
    "bias_after_finite_fill": (dict(bias_shape=(2, 4, 8, 8), keep_shape=(2, 1, 1, 8)),
                               dict(fill=-2.0, bias_after_mask=True)),
    "gqa": (dict(hkv=2), dict(gqa_groups=2, mask="causal")),
    "gqa_bias_softcap": (dict(hkv=1, bias_shape=(1, 1, 8, 8)), dict(gqa_groups=4, softcap=3.0)),
    "lq_ne_lk": (dict(lq=5, lk=9), dict(mask="causal", diag=4)),
}


@pytest.mark.parametrize("runtime", ["auto", "eager"])
@pytest.mark.parametrize("name", sorted(GRAD_CASES))
def test_gradients_match_reference(name, runtime):
    kw, attrs = GRAD_CASES[name]
    q, k, v, bias, keep = make(**kw)
    leaves = [x for x in (q, k, v, bias) if x is not None]
    out, lse, rng = call(q, k, v, bias, keep, runtime=runtime, **attrs)
    assert rng.numel() == 0  # no dropout, no RNG state
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, g)
    ref = attention_reference(q, k, v, bias, keep, **{**DEFAULTS, **attrs})
    want = torch.autograd.grad(ref, leaves, g)
    assert rel_err(out, ref) < 1e-5
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.shape == b.shape
        assert rel_err(a, b) < 1e-5, f"gradient {i}"
    fast = supports(dict(q=q, k=k, v=v, bias=bias, keep=keep), {**DEFAULTS, **attrs}) is None
    expected_path = "aten" if runtime == "auto" and fast else "eager"
    assert seqfuse.counters()["attention"][expected_path] == 1


def test_bias_without_grad_gets_none():
    q, k, v, _, _ = make(d=16, dv=16)  # (an fp32 backward below 16 value channels runs the reference)
    bias = torch.randn(8, 8)
    out, _, _ = call(q, k, v, bias)
    out.sum().backward()
    assert bias.grad is None and q.grad is not None
    # the bias gradient was not computed, so the backward could run on the aten path
    assert seqfuse.counters()["attention_backward"]["aten"] == 1


# --- dropout -------------------------------------------------------------------------

def test_dropout_forward_is_F_dropout_with_the_same_seed():
    q, k, v, _, _ = make(grad=False)
    torch.manual_seed(7)
    state = torch.get_rng_state()
    out, _, rng = call(q, k, v, mask="causal", dropout=0.3)
    assert torch.equal(rng, state)  # the generator state the dropout mask was drawn from
    s = (q @ k.transpose(-2, -1) / math.sqrt(8)).masked_fill(~torch.ones(8, 8, dtype=torch.bool).tril(),
                                                             -math.inf)
    torch.manual_seed(7)
    expected = F.dropout(torch.softmax(s, -1), 0.3, training=True) @ v
    assert rel_err(out, expected) < 1e-5
    # a different seed draws a different mask
    torch.manual_seed(8)
    other, _, _ = call(q, k, v, mask="causal", dropout=0.3)
    assert rel_err(other, expected) > 1e-2
    assert seqfuse.counters()["attention"] == {"triton": 0, "cpu": 0, "aten": 0, "eager": 2}


@pytest.mark.parametrize("kw, attrs", [(dict(), dict(dropout=0.4)),
                                       (dict(hkv=2, bias_shape=(1, 4, 8, 8)), dict(dropout=0.2, gqa_groups=2))])
def test_dropout_backward_regenerates_the_mask(kw, attrs):
    q, k, v, bias, keep = make(**kw)
    leaves = [x for x in (q, k, v, bias) if x is not None]
    torch.manual_seed(11)
    out, _, _ = call(q, k, v, bias, keep, **attrs)
    torch.randn(1000)  # the global generator moves on before the backward
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, g)
    torch.manual_seed(11)
    ref = attention_reference(q, k, v, bias, keep, **{**DEFAULTS, **attrs})
    want = torch.autograd.grad(ref, leaves, g)
    assert rel_err(out, ref) < 1e-6
    for i, (a, b) in enumerate(zip(got, want)):
        assert rel_err(a, b) < 1e-5, f"gradient {i}"
    # with another mask the gradients would differ: the check above can fail
    torch.manual_seed(12)
    ref2 = attention_reference(q, k, v, bias, keep, **{**DEFAULTS, **attrs})
    assert rel_err(torch.autograd.grad(ref2, leaves[:1], g)[0], got[0]) > 1e-2


def test_fake_implementation_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        q, k, v = torch.empty(2, 4, 6, 8), torch.empty(2, 2, 10, 8), torch.empty(2, 2, 10, 3, dtype=torch.float32)
        out, lse, rng = call(q, k, v, gqa_groups=2)
        out_d, _, rng_d = call(q, k, v, gqa_groups=2, dropout=0.5)
    assert out.shape == (2, 4, 6, 3) and rng.numel() == 0
    assert lse.shape == (2, 4, 6) and lse.dtype == torch.float32
    assert out_d.shape == (2, 4, 6, 3) and rng_d.numel() == torch.get_rng_state().numel()


def test_recompute_grads_skips_outputs_that_need_no_gradient():
    """An output that depends on no wanted input (here: the second reads only y, which needs none)
    adds nothing; autograd.grad used to raise "element 1 of tensors does not require grad"."""
    from seqfuse.lowering.autograd import recompute_grads
    x, y = torch.randn(3), torch.randn(3)
    gx, gy = recompute_grads(lambda a, b: (a.sin() * 2, b.cos()), (torch.ones(3), torch.ones(3)), [x, y],
                             [True, False])
    torch.testing.assert_close(gx, 2 * x.cos())
    assert gy is None
    (gx,) = recompute_grads(lambda a: (a.detach() * 3,), (torch.ones(3),), [x], [True])
    torch.testing.assert_close(gx, torch.zeros(3))  # no path to x at all: a zero gradient


@pytest.mark.parametrize("runtime", ["auto", "eager"])
def test_output_is_contiguous_whatever_q_strides_in_fake_and_real_calls(runtime):
    # the program's p @ v is contiguous, and a dropout after the attention draws its mask in memory
    # order: a (B, L, H, D) q seen as (B, H, L, D) (ATen's flash kernel would follow it) still gives
    # a contiguous output, in the fake implementation and on every path
    B, L, H, D, Dv = 2, 6, 3, 8, 4
    q, k = (torch.randn(B, L, H, D).transpose(1, 2) for _ in range(2))
    v = torch.randn(B, L, H, Dv).transpose(1, 2)
    out = call(q, k, v, runtime=runtime, mask="causal")[0]
    assert out.is_contiguous()
    assert rel_err(out, attention_reference(q, k, v, **{**DEFAULTS, "mask": "causal"})) < 1e-5
    with torch._subclasses.FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        assert call(fq, fk, fv, runtime=runtime, mask="causal")[0].is_contiguous()


@pytest.mark.parametrize("runtime", ["auto", "eager"])
@pytest.mark.parametrize("q_layout", ["bhld", "blhd"])
def test_out_transposed_gives_blhd_memory_in_fake_and_real_calls(runtime, q_layout):
    # out_transposed=True (set by the pass when the program only transposes the output back and
    # makes it contiguous): (B, L, H, Dv) memory seen as (B, H, L, Dv), whatever q's strides, in the
    # fake implementation and on every path; the values and gradients are the reference's
    B, L, H, D, Dv = 2, 6, 3, 8, 4
    make = (lambda *s: torch.randn(*s)) if q_layout == "bhld" else \
        (lambda b, h, l, d: torch.randn(b, l, h, d).transpose(1, 2))
    q, k, v = make(B, H, L, D).requires_grad_(), make(B, H, L, D).requires_grad_(), make(B, H, L, Dv).requires_grad_()
    want = torch.empty(B, L, H, Dv).transpose(1, 2).stride()
    args = (q, k, v, None, None, *attrs_tuple(mask="causal"), NONCE, runtime, None, False, True)
    out = torch.ops.seqfuse.attention(*args)[0]
    assert out.stride() == want and out.transpose(1, 2).is_contiguous()
    ref = attention_reference(q, k, v, **{**DEFAULTS, "mask": "causal"})
    assert rel_err(out, ref) < 1e-5
    g = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v), g)
    grads_ref = torch.autograd.grad(ref, (q, k, v), g)
    assert max(rel_err(a, b) for a, b in zip(grads, grads_ref)) < 1e-5
    plain = [t.detach() for t in (q, k, v)]
    with torch._subclasses.FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in plain)
        fargs = (fq, fk, fv, *args[3:])
        assert torch.ops.seqfuse.attention(*fargs)[0].stride() == want
