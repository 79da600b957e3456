"""seqfuse::ssd and seqfuse::scan as custom ops: results against loops written out by hand,
gradients (gradcheck in fp64, through y and the final state), opcheck, lowering of IR nodes."""
import operator

import pytest
import torch
import torch.fx

import seqfuse.lowering  # noqa: F401  (registers the ops)
from helpers import rel_err
from seqfuse.ir.ops import SSD, Scan, ir_marker
from seqfuse.lowering import lower_graph
from seqfuse.lowering.reference.scan import ALGORITHMS as SCAN_ALGORITHMS
from seqfuse.lowering.reference.ssd import ALGORITHMS as SSD_ALGORITHMS

F64 = torch.float64


# runtime "eager": the references behind the op; "auto" also tries the C kernels (recurrent algorithm)
def ssd_op(x, b, c, a=None, d=None, h0=None, decay="scalar", chunk=4, algorithm="recurrent", runtime="eager"):
    return torch.ops.seqfuse.ssd(x, b, c, a, d, h0, decay, chunk, algorithm, runtime)


def scan_op(a, b, c=None, h0=None, reverse=False, algorithm="recurrent", runtime="eager"):
    return torch.ops.seqfuse.scan(a, b, c, h0, reverse, algorithm, runtime)


def ssd_loop(x, b, c, a, d, h0, decay):
    """The ssd recurrence element by element in fp64, one (batch, head) at a time."""
    B, T, H, P = x.shape
    N = b.shape[-1]
    y = torch.zeros(B, T, H, P, dtype=F64)
    hT = torch.zeros(B, H, P, N, dtype=F64)
    for i in range(B):
        for j in range(H):
            S = h0[i, j].double().clone() if h0 is not None else torch.zeros(P, N, dtype=F64)
            for t in range(T):
                if decay == "scalar":
                    S = S * torch.exp(a[i, t, j].double())
                elif decay == "vector":
                    S = S * torch.exp(a[i, t, j].double())[None, :]
                S = S + torch.outer(x[i, t, j].double(), b[i, t, j].double())
                y[i, t, j] = S @ c[i, t, j].double()
                if d is not None:
                    y[i, t, j] += d[j].double() * x[i, t, j].double()
            hT[i, j] = S
    return y, hT


def ssd_inputs(B=2, T=7, H=3, P=4, N=5, decay="scalar", d=True, h0=True, dtype=torch.float32, grad=False):
    g = torch.Generator().manual_seed(0)
    r = lambda *s, k=1.0: (k * torch.randn(*s, generator=g, dtype=dtype)).requires_grad_(grad)  # noqa: E731
    a = None
    if decay == "scalar":
        a = (-torch.rand(B, T, H, generator=g, dtype=dtype)).requires_grad_(grad)
    elif decay == "vector":
        a = (-torch.rand(B, T, H, N, generator=g, dtype=dtype)).requires_grad_(grad)
    return (r(B, T, H, P), r(B, T, H, N, k=0.5), r(B, T, H, N, k=0.5), a, r(H) if d else None,
            r(B, H, P, N) if h0 else None)


# --- ssd ---------------------------------------------------------------------------------

@pytest.mark.parametrize("runtime", ["eager", "auto"])
@pytest.mark.parametrize("algorithm", SSD_ALGORITHMS)
@pytest.mark.parametrize("decay", ["none", "scalar", "vector"])
def test_ssd_matches_the_loop(decay, algorithm, runtime):
    x, b, c, a, d, h0 = ssd_inputs(decay=decay)
    y, h = ssd_op(x, b, c, a, d, h0, decay=decay, chunk=3, algorithm=algorithm, runtime=runtime)
    y_ref, h_ref = ssd_loop(x, b, c, a, d, h0, decay)
    assert y.dtype == torch.float32 and h.dtype == torch.float32
    assert rel_err(y, y_ref) < 1e-5 and rel_err(h, h_ref) < 1e-5


@pytest.mark.parametrize("decay", ["none", "scalar", "vector"])
def test_ssd_gradcheck(decay):
    x, b, c, a, d, h0 = ssd_inputs(B=1, T=4, H=2, P=2, N=3, decay=decay, dtype=F64, grad=True)
    for algorithm in SSD_ALGORITHMS:
        fn = lambda *t: ssd_op(*t, decay=decay, chunk=3, algorithm=algorithm)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x, b, c, a, d, h0), fast_mode=True)


def test_ssd_gradient_through_the_final_state_only():
    x, b, c, a, d, h0 = ssd_inputs(B=1, T=3, H=1, P=2, N=2, dtype=F64, grad=True)
    assert torch.autograd.gradcheck(lambda *t: ssd_op(*t)[1], (x, b, c, a, d, h0), fast_mode=True)
    # and c, which only reaches y, gets a zero gradient from the state alone
    ssd_op(x, b, c, a, d, h0)[1].sum().backward()
    assert torch.equal(c.grad, torch.zeros_like(c))


def test_ssd_low_precision_inputs_give_their_dtype():
    x, b, c, a, d, h0 = ssd_inputs(decay="scalar")
    y, h = ssd_op(x.bfloat16(), b.bfloat16(), c.bfloat16(), a, d, h0)
    y_ref, h_ref = ssd_loop(x.bfloat16(), b.bfloat16(), c.bfloat16(), a, d, h0, "scalar")
    assert y.dtype == torch.bfloat16 and h.dtype == torch.bfloat16
    assert rel_err(y, y_ref) < 1e-2 and rel_err(h, h_ref) < 1e-2


def test_ssd_bad_arguments_are_named():
    x, b, c, a, d, h0 = ssd_inputs(decay="scalar")
    with pytest.raises(ValueError, match="decay='vector' needs a"):
        ssd_op(x, b, c, a, decay="vector")
    with pytest.raises(ValueError, match="algorithm must be one of"):
        ssd_op(x, b, c, a, algorithm="auto")
    with pytest.raises(ValueError, match="x must be"):
        ssd_op(x[0], b, c, a)


@pytest.mark.parametrize("decay", ["none", "vector"])  # a absent; a of rank 4 (every optional present)
def test_opcheck_ssd(decay):
    x, b, c, a, d, h0 = ssd_inputs(B=1, T=5, H=2, P=2, N=3, decay=decay, grad=True)
    torch.library.opcheck(torch.ops.seqfuse.ssd.default, (x, b, c, a, d, h0, decay, 2, "chunked", "auto"))


# --- scan --------------------------------------------------------------------------------

def scan_loop(a, b, c, h0, reverse):
    """The scan recurrence step by step in fp64 / complex128 on fully broadcast operands."""
    shapes = [a.shape, b.shape] + ([c.shape] if c is not None else [])
    full = torch.broadcast_shapes(*shapes)
    wide = torch.complex128 if any(t is not None and t.is_complex() for t in (a, b, c, h0)) else F64
    a, b = a.to(wide).expand(full), b.to(wide).expand(full)
    h = h0.to(wide).expand(*full[:-2], full[-1]) if h0 is not None else torch.zeros(*full[:-2], full[-1], dtype=wide)
    ys = [None] * full[-2]
    order = range(full[-2] - 1, -1, -1) if reverse else range(full[-2])
    for t in order:
        h = a[..., t, :] * h + b[..., t, :]
        ys[t] = (h * c[..., t, :].to(wide)).sum(-1) if c is not None else h
    return torch.stack(ys, dim=-2 if c is None else -1), h


def scan_inputs(shape=(2, 3, 9, 4), complex_=False, c="full", h0=True, dtype=torch.float32, grad=False):
    g = torch.Generator().manual_seed(1)
    R, N = shape[:-2], shape[-1]
    if complex_:
        ctype = torch.complex128 if dtype == F64 else torch.complex64
        mag, ph = 0.5 + 0.5 * torch.rand(shape, generator=g, dtype=dtype), torch.rand(shape, generator=g, dtype=dtype)
        a = torch.polar(mag, 3 * ph).requires_grad_(grad)
        b = torch.randn(shape, generator=g, dtype=ctype).requires_grad_(grad)
        hh = torch.randn(*R, N, generator=g, dtype=ctype).requires_grad_(grad) if h0 else None
    else:
        a = (2 * torch.rand(shape, generator=g, dtype=dtype) - 1).requires_grad_(grad)  # negative decays too
        b = torch.randn(shape, generator=g, dtype=dtype).requires_grad_(grad)
        hh = torch.randn(*R, N, generator=g, dtype=dtype).requires_grad_(grad) if h0 else None
    cc = None
    if c == "full":
        cc = torch.randn(shape, generator=g, dtype=dtype).requires_grad_(grad)
    elif c == "expand":  # Mamba-1's C: one (T, N) per batch, shared over channels through a stride-0 view
        one = list(shape)
        one[-3] = 1
        cc = torch.randn(one, generator=g, dtype=dtype).requires_grad_(grad).expand(shape)
    return a, b, cc, hh


SCAN_CASES = [dict(), dict(c=None), dict(c="expand"), dict(complex_=True), dict(complex_=True, c=None),
              dict(h0=False), dict(shape=(1, 65, 3))]


@pytest.mark.parametrize("runtime", ["eager", "auto"])
@pytest.mark.parametrize("algorithm", SCAN_ALGORITHMS)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("case", SCAN_CASES)
def test_scan_matches_the_loop(case, reverse, algorithm, runtime):
    a, b, c, h0 = scan_inputs(**case)
    y, h = scan_op(a, b, c, h0, reverse=reverse, algorithm=algorithm, runtime=runtime)
    y_ref, h_ref = scan_loop(a, b, c, h0, reverse)
    assert y.shape == y_ref.shape and h.shape == h_ref.shape
    assert y.dtype == (torch.complex64 if case.get("complex_") else torch.float32)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(h, h_ref) < 1e-5


def test_scan_broadcasts_a_over_the_batch():
    a, b, c, h0 = scan_inputs()
    a1 = a[:1, :1]  # (1, 1, T, N): one decay for every row
    y, h = scan_op(a1, b, c, h0)
    y_ref, h_ref = scan_loop(a1, b, c, h0, False)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(h, h_ref) < 1e-5


@pytest.mark.parametrize("case", [dict(), dict(c=None), dict(c="expand"), dict(complex_=True),
                                  dict(complex_=True, c=None)])
@pytest.mark.parametrize("reverse", [False, True])
def test_scan_gradcheck(case, reverse):
    a, b, c, h0 = scan_inputs(shape=(2, 5, 3), dtype=F64, grad=True, **case)
    if case.get("c") == "expand":  # gradcheck perturbs its inputs: give it the (1, T, N) base
        c = c[:1].detach().requires_grad_()
    # both algorithms' adjoints are checked against autograd in test_ssd_scan_reference.py
    def fn(a, b, c, h0):
        c = c.expand(b.shape) if c is not None else None  # a stride-0 view, as Mamba-1 gives
        return scan_op(a, b, c, h0, reverse=reverse, algorithm="chunked")
    assert torch.autograd.gradcheck(fn, (a, b, c, h0), fast_mode=True)


def test_scan_gradient_of_a_broadcast_decay_is_summed_back():
    a, b, c, h0 = scan_inputs(shape=(3, 6, 2), dtype=F64, grad=True)
    a1 = a[:1].detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda *t: scan_op(*t), (a1, b, c, h0), fast_mode=True)


def test_scan_bad_arguments_are_named():
    a, b, c, h0 = scan_inputs()
    with pytest.raises(ValueError, match="do not broadcast"):
        scan_op(a, b[..., :2, :], c, h0)
    with pytest.raises(ValueError, match="algorithm must be one of"):
        scan_op(a, b, c, h0, algorithm="auto")


@pytest.mark.parametrize("case", [dict(c=None, complex_=True), dict(c="expand", h0=False)])
def test_opcheck_scan(case):
    a, b, c, h0 = scan_inputs(shape=(2, 5, 3), grad=True, **case)
    torch.library.opcheck(torch.ops.seqfuse.scan.default, (a, b, c, h0, True, "chunked", "auto"))


# --- the discretized form: decay exp(dt·a), input b·dt·u -------------------------------------

def discretized_inputs(B=2, D=3, T=7, N=4, dtype=F64):
    """Mamba-1's factors: A (D, 1, N) log-decays, B (B, 1, T, N), C (B, 1, T, N), Δ and x (B, D, T, 1)."""
    torch.manual_seed(3)
    A = (-torch.rand(D, 1, N, dtype=dtype) - 0.2).requires_grad_()
    Bm = torch.randn(B, 1, T, N, dtype=dtype, requires_grad=True)
    Cm = torch.randn(B, 1, T, N, dtype=dtype, requires_grad=True)
    dt = torch.rand(B, D, T, 1, dtype=dtype).add(0.1).requires_grad_()
    x = torch.randn(B, D, T, 1, dtype=dtype, requires_grad=True)
    h0 = torch.randn(B, D, N, dtype=dtype, requires_grad=True)
    return A, Bm, Cm, h0, dt, x


@pytest.mark.parametrize("runtime, algorithm", [("eager", "recurrent"), ("eager", "chunked"), ("cpu", "recurrent")])
@pytest.mark.parametrize("factors", ["dt+u", "dt", "u"])
def test_discretized_scan_matches_the_materialized_products(runtime, algorithm, factors):
    A, Bm, Cm, h0, dt, x = discretized_inputs()
    dt_, u_ = (dt if "dt" in factors else None), (x if "u" in factors else None)
    leaves = [t for t in (A, Bm, Cm, h0, dt_, u_) if t is not None]
    y, h = torch.ops.seqfuse.scan(A if dt_ is not None else A.exp(), Bm, Cm, h0, False, algorithm, runtime,
                                  dt_, u_)
    got = torch.autograd.grad(y.square().sum() + h.sum(), leaves)
    a_ref = torch.exp(A * dt) if dt_ is not None else A.exp()
    b_ref = Bm * (dt if dt_ is not None else 1) * (x if u_ is not None else 1)
    y_ref, h_ref = scan_loop(a_ref, b_ref, Cm, h0, False)
    want = torch.autograd.grad(y_ref.square().sum() + h_ref.sum(), leaves)
    assert rel_err(y, y_ref) < 1e-12 and rel_err(h, h_ref) < 1e-12
    for g, w, t in zip(got, want, leaves):
        assert g.shape == t.shape and rel_err(g, w) < 1e-10


def test_discretized_scan_gradcheck():
    A, Bm, Cm, h0, dt, x = discretized_inputs(B=1, D=2, T=5, N=3)
    fn = lambda A, Bm, Cm, h0, dt, x: torch.ops.seqfuse.scan(A, Bm, Cm, h0, True, "recurrent", "eager", dt, x)
    assert torch.autograd.gradcheck(fn, (A, Bm, Cm, h0, dt, x), fast_mode=True)


def test_discretized_scan_gradient_of_dt_alone():
    # only Δ requires grad: its two uses (decay and input) are both differentiated
    A, Bm, Cm, h0, dt, x = (t.detach() for t in discretized_inputs())
    dt.requires_grad_()
    y, h = torch.ops.seqfuse.scan(A, Bm, Cm, h0, False, "recurrent", "eager", dt, x)
    (g,) = torch.autograd.grad(y.sum(), [dt])
    dt2 = dt.detach().requires_grad_()
    y2, _ = scan_loop(torch.exp(A * dt2), Bm * dt2 * x, Cm, h0, False)
    (w,) = torch.autograd.grad(y2.sum(), [dt2])
    assert rel_err(g, w) < 1e-10


def test_discretized_scan_bad_arguments_are_named():
    A, Bm, Cm, h0, dt, x = (t.detach() for t in discretized_inputs(dtype=torch.float32))
    with pytest.raises(ValueError, match="dt must be real"):
        torch.ops.seqfuse.scan(A, Bm, Cm, h0, False, "recurrent", "eager", dt.to(torch.complex64), x)
    with pytest.raises(ValueError, match="with dt, a holds real log-decays"):
        torch.ops.seqfuse.scan(A.to(torch.complex64), Bm, Cm, h0, False, "recurrent", "eager", dt, x)
    with pytest.raises(ValueError, match=r"u \(2, 3, 6, 1\)"):
        torch.ops.seqfuse.scan(A, Bm, Cm, h0, False, "recurrent", "eager", dt, x[..., :6, :])


def test_opcheck_discretized_scan():
    A, Bm, Cm, h0, dt, x = discretized_inputs(dtype=torch.float32)
    torch.library.opcheck(torch.ops.seqfuse.scan.default, (A, Bm, Cm, h0, False, "chunked", "auto"),
                          {"dt": dt, "u": x})


# --- lowering ----------------------------------------------------------------------------

def _graph(**specs):
    g = torch.fx.Graph()
    nodes = {}
    for name, t in specs.items():
        nodes[name] = g.placeholder(name)
        nodes[name].meta["val"] = t
    return g, nodes


def _ir_node(g, op, args, val):
    node = g.call_function(ir_marker, tuple(args))
    node.meta["seqfuse_ir"], node.meta["val"] = op, val
    y, h = g.call_function(operator.getitem, (node, 0)), g.call_function(operator.getitem, (node, 1))
    g.output((y, h))


def test_lowering_an_ssd_node_keeps_its_getitem_users():
    x, b, c, a, d, h0 = ssd_inputs(decay="scalar")
    g, n = _graph(x=x, b=b, c=c, a=a, d=d)
    op = SSD(x=n["x"], b=n["b"], c=n["c"], a=n["a"], d=n["d"], decay="scalar", chunk=4, algorithm="chunked")
    _ir_node(g, op, [n["x"], n["b"], n["c"], n["a"], n["d"]], (x, h0))
    gm = torch.fx.GraphModule(torch.nn.Module(), g)
    assert lower_graph(gm) == 1
    assert any(node.target is torch.ops.seqfuse.ssd.default for node in gm.graph.nodes)
    y, h = gm(x, b, c, a, d)
    y_ref, h_ref = ssd_loop(x, b, c, a, d, None, "scalar")
    assert rel_err(y, y_ref) < 1e-5 and rel_err(h, h_ref) < 1e-5


def test_lowering_a_scan_node_keeps_its_getitem_users():
    a, b, c, h0 = scan_inputs(c="expand")
    g, n = _graph(a=a, b=b, c=c)
    op = Scan(a=n["a"], b=n["b"], c=n["c"], reverse=True, algorithm="recurrent")
    _ir_node(g, op, [n["a"], n["b"], n["c"]], (c[..., 0], h0))
    gm = torch.fx.GraphModule(torch.nn.Module(), g)
    assert lower_graph(gm) == 1
    y, h = gm(a, b, c)
    y_ref, h_ref = scan_loop(a, b, c, None, True)
    assert rel_err(y, y_ref) < 1e-5 and rel_err(h, h_ref) < 1e-5


def test_lowering_an_unselected_op_never_passes_auto_to_the_custom_op():
    # only when the user turned passes/select off: the op still runs, on an algorithm safe at any length
    x, b, c, a, d, h0 = ssd_inputs(decay="none", d=False, h0=False)
    g, n = _graph(x=x, b=b, c=c)
    _ir_node(g, SSD(x=n["x"], b=n["b"], c=n["c"], decay="none"), [n["x"], n["b"], n["c"]], (x, None))
    gm = torch.fx.GraphModule(torch.nn.Module(), g)
    lower_graph(gm)
    (call,) = [node for node in gm.graph.nodes if node.target is torch.ops.seqfuse.ssd.default]
    assert call.args[8] == "chunked"
    y, h = gm(x, b, c)
    y_ref, h_ref = ssd_loop(x, b, c, None, None, None, "none")
    assert rel_err(y, y_ref) < 1e-5 and rel_err(h, h_ref) < 1e-5
