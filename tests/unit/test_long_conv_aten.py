"""The ATen path of seqfuse.long_conv against the reference: the forward's result layout and the written-out
backward of the direct causal convolution of a transposed signal (values and every gradient, fp64)."""
import pytest
import torch

import seqfuse
from seqfuse.lowering.aten import long_conv as aten_long_conv
from seqfuse.lowering.reference.long_conv import long_conv_reference

C, L = 6, 16


def attrs(**kw):
    a = dict(causal=True, fft_size=0, scale=1.0, activation="none", algorithm="direct", bias=None)
    a.update(kw)
    return a


def transposed(B, dtype=torch.float64):
    return torch.randn(B, L, C, dtype=dtype).transpose(1, 2)   # (B, C, L) laid (B, L, C)


def reference_grads(grad, u, k, d, gate, a):
    leaves = [None if x is None else x.detach().requires_grad_() for x in (u, k, d, gate, a["bias"])]
    y = long_conv_reference(*leaves[:4], bias=leaves[4], **{n: a[n] for n in ("causal", "fft_size", "scale",
                                                                             "activation", "algorithm")})
    present = [x for x in leaves if x is not None]
    got = iter(torch.autograd.grad(y, present, grad))
    return [None if x is None else next(got) for x in leaves]


CASES = {
    "plain": dict(),
    "silu": dict(activation="silu"),
    "scale_bias_silu": dict(scale=0.5, activation="silu", bias=True),
    "skip_gate": dict(d=True, gate=True),
    "all": dict(scale=-1.5, activation="silu", bias=True, d=True, gate=True),
}


@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kshape", [(C, 4), (1, C, 3), (C, 20)])   # a kernel longer than the signal too
@pytest.mark.parametrize("grad_layout", ["like_u", "contiguous"])
def test_backward_of_the_transposed_direct_convolution_equals_the_reference(B, case, kshape, grad_layout):
    torch.manual_seed(0)
    spec = CASES[case]
    u, k = transposed(B), torch.randn(*kshape, dtype=torch.float64)
    d = torch.randn(C, 1, dtype=torch.float64) if spec.get("d") else None
    gate = transposed(B) if spec.get("gate") else None
    a = attrs(scale=spec.get("scale", 1.0), activation=spec.get("activation", "none"),
              bias=torch.randn(C, 1, dtype=torch.float64) if spec.get("bias") else None)
    grad = transposed(B)
    if grad_layout == "contiguous":
        grad = grad.contiguous()
    a["needs"] = [True, True, d is not None, gate is not None, a["bias"] is not None]
    assert aten_long_conv.writes_backward(grad.shape, u, k, a)
    got = aten_long_conv.backward(grad, u, k, d, gate, a)
    want = reference_grads(grad, u, k, d, gate, a)
    for name, g, w in zip(("du", "dk", "dd", "dgate", "dbias"), got, want):
        assert (g is None) == (w is None), name
        if g is not None:
            assert g.shape == w.shape and g.dtype == w.dtype, name
            assert (g - w).abs().max() <= 1e-10 * (1 + w.abs().max()), name
    assert got[0].stride() == u.stride()   # laid like u: the op returns it without a copy


def test_backward_leaves_out_what_is_not_needed_and_keeps_dtypes():
    u = transposed(2, torch.float32)
    k = torch.randn(C, 4, dtype=torch.float64)
    a = attrs(activation="silu", needs=[False, True, False, False, False])
    grad = transposed(2, torch.float64)
    du, dk, *rest = aten_long_conv.backward(grad, u, k, None, None, a)
    assert du is None and rest == [None, None, None] and dk.dtype == torch.float64
    want = reference_grads(grad, u, k, None, None, a)[1]
    assert (dk - want).abs().max() < 1e-4 * want.abs().max()


@pytest.mark.parametrize("why", ["contiguous", "fft", "not_causal", "broadcast_result"])
def test_backward_refuses_other_calls(why):
    u, k = transposed(2), torch.randn(C, 4, dtype=torch.float64)
    a, shape = attrs(needs=[True] * 5), u.shape
    if why == "contiguous":
        u = u.contiguous()
    elif why == "fft":
        a["algorithm"] = "fft"
    elif why == "not_causal":
        a.update(causal=False, fft_size=32)
    else:
        shape = (4, *u.shape)
    assert not aten_long_conv.writes_backward(shape, u, k, a)
    assert aten_long_conv.backward(torch.randn(shape, dtype=u.dtype), u, k, None, None, a) is None


@pytest.mark.parametrize("B", [1, 2])
def test_the_op_runs_the_written_out_backward_on_a_transposed_signal(B):
    """Through the custom op on the ATen path: the result and du laid like u, gradients equal the reference's,
    the gradient counted on the aten path."""
    torch.manual_seed(1)
    x = torch.randn(B, L, C, dtype=torch.float64, requires_grad=True)
    k = torch.randn(C, 4, dtype=torch.float64, requires_grad=True)
    u = x.transpose(1, 2)
    seqfuse.reset_counters()
    y = torch.ops.seqfuse.long_conv(u, k, None, None, None, True, 0, 1.0, "silu", "direct", "aten")
    assert y.stride() == u.stride()
    grad = torch.randn(B, L, C, dtype=torch.float64).transpose(1, 2)
    got = torch.autograd.grad(y, (x, k), grad)
    want = torch.autograd.grad(long_conv_reference(u, k, activation="silu", algorithm="direct"), (x, k), grad)
    assert all((g - w).abs().max() < 1e-10 for g, w in zip(got, want))
    assert seqfuse.counters()["long_conv_backward"]["aten"] == 1


def column_slice(B, width=C + 5, dtype=torch.float64):
    """(B, C, L): channels 2 .. C+1 of a (B, L, width) projection, read transposed (Mamba-2's split)."""
    return torch.randn(B, L, width, dtype=dtype)[..., 2:2 + C].transpose(1, 2)


@pytest.mark.parametrize("B", [1, 2])
@pytest.mark.parametrize("case", ["silu", "all"])
def test_backward_of_a_column_slice_of_a_projection_equals_the_reference(B, case):
    torch.manual_seed(2)
    spec = CASES[case]
    u, k = column_slice(B), torch.randn(C, 4, dtype=torch.float64)
    assert not u.is_contiguous() and u.stride(2) == C + 5
    d = torch.randn(C, 1, dtype=torch.float64) if spec.get("d") else None
    gate = transposed(B) if spec.get("gate") else None
    a = attrs(scale=spec.get("scale", 1.0), activation="silu",
              bias=torch.randn(C, 1, dtype=torch.float64) if spec.get("bias") else None)
    a["needs"] = [True, True, d is not None, gate is not None, a["bias"] is not None]
    grad = transposed(B)
    got = aten_long_conv.backward(grad, u, k, d, gate, a)
    want = reference_grads(grad, u, k, d, gate, a)
    for name, g, w in zip(("du", "dk", "dd", "dgate", "dbias"), got, want):
        assert (g is None) == (w is None), name
        if g is not None:
            assert (g - w).abs().max() <= 1e-10 * (1 + w.abs().max()), name
    assert got[0].stride() == (L * C, 1, C)   # laid (B, L, C) densely


@pytest.mark.parametrize("B", [1, 2])
def test_the_op_lays_the_result_and_du_of_a_column_slice_as_b_l_c(B):
    """A column slice of a projection: the result and du laid (B, L, C) densely, in the op and in its fake
    values alike (inductor checks every extern result's strides); values and gradients equal the reference's."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    torch.manual_seed(3)
    proj = torch.randn(B, L, C + 5, dtype=torch.float64, requires_grad=True)
    k = torch.randn(C, 4, dtype=torch.float64, requires_grad=True)
    u = proj[..., 2:2 + C].transpose(1, 2)
    y = torch.ops.seqfuse.long_conv(u, k, None, None, None, True, 0, 1.0, "silu", "direct", "aten")
    assert y.stride() == (L * C, 1, C)
    grad = torch.randn(B, L, C, dtype=torch.float64).transpose(1, 2)
    grads = torch.ops.seqfuse.long_conv_backward(grad, u.detach(), k.detach(), None, None, None, True, 0, 1.0,
                                                 "silu", "direct", "aten", [True, True, False, False, False])
    assert grads[0].stride() == (L * C, 1, C)
    mode = FakeTensorMode()
    fu, fk, fg = (mode.from_tensor(x.detach()) for x in (u, k, grad))
    with mode:
        fy = torch.ops.seqfuse.long_conv(fu, fk, None, None, None, True, 0, 1.0, "silu", "direct", "aten")
        fgrads = torch.ops.seqfuse.long_conv_backward(fg, fu, fk, None, None, None, True, 0, 1.0, "silu",
                                                      "direct", "aten", [True, True, False, False, False])
    assert fy.stride() == y.stride() and fgrads[0].stride() == grads[0].stride()
    want = long_conv_reference(u, k, activation="silu", algorithm="direct")
    assert (y - want).abs().max() < 1e-12
    got = torch.autograd.grad(y, (proj, k), grad)
    ref = torch.autograd.grad(want, (proj, k), grad)
    assert all((g - r).abs().max() < 1e-10 for g, r in zip(got, ref))
