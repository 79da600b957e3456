"""IR ops, the printer (deterministic text) and the verifier (bad ops rejected, naming op and field)."""
import math

import pytest
import torch
import torch.fx

import seqfuse
from seqfuse.ir import (Attention, IRVerificationError, LongConv, Scan, SSD, format_graph, format_node, format_op,
                        ir_marker, ir_of, verify_graph, verify_op)
from seqfuse.ir.printer import format_type, format_value

F32 = torch.float32


class G:
    """A small FX graph whose placeholders carry meta-device values, to hang IR ops on."""

    def __init__(self, **specs):
        self.graph = torch.fx.Graph()
        self.nodes = {}
        for name, spec in specs.items():
            shape, dtype = spec if isinstance(spec, tuple) and isinstance(spec[-1], torch.dtype) else (spec, F32)
            n = self.graph.placeholder(name)
            n.meta["val"] = torch.empty(shape, dtype=dtype, device="meta")
            self.nodes[name] = n

    def __getattr__(self, name):
        return self.__dict__["nodes"][name]

    def add_ir(self, op, name, shape, dtype=F32):
        values = [v for _, v in op.operands() + op.attributes() if isinstance(v, torch.fx.Node)]
        node = self.graph.create_node("call_function", ir_marker, tuple(values), name=name)
        node.meta["seqfuse_ir"] = op
        node.meta["val"] = torch.empty(shape, dtype=dtype, device="meta")
        return node


def qkv_graph(q=(2, 4, 16, 8), k=(2, 4, 16, 8), v=(2, 4, 16, 8), **extra):
    return G(q=q, k=k, v=v, **extra)


def attention(g, **attrs):
    return Attention(q=g.q, k=g.k, v=g.v, **attrs)


# --- printer -------------------------------------------------------------------------

CAUSAL = ("%o = seqfuse.attention(%q, %k, %v) {scale=0.125, mask=causal, diag=0, window=0, fill=-inf, "
          "bias_after_mask=false, gqa_groups=1, softcap=none, dropout=0.0, empty_rows=nan, algo=fused}")


def test_format_op_golden():
    g = qkv_graph()
    op = attention(g, scale=0.125, mask="causal", algorithm="fused")
    assert format_op(op, "o") == CAUSAL
    assert format_op(op, "o") == format_op(op, "o")  # same text twice


def test_format_op_optional_operands_and_all_attributes():
    g = qkv_graph(k=(2, 2, 16, 8), v=(2, 2, 16, 8), b=(1, 1, 16, 16), m=((2, 1, 1, 16), torch.bool))
    op = Attention(q=g.q, k=g.k, v=g.v, bias=g.b, keep=g.m, scale=None, mask="window", diag=-2, window=4,
                   fill=-10000.0, bias_after_mask=True, gqa_groups=2, softcap=30.0, dropout=0.1)
    assert format_op(op) == (
        "%out = seqfuse.attention(%q, %k, %v, bias=%b, keep=%m) {scale=none, mask=window, diag=-2, window=4, "
        "fill=-10000.0, bias_after_mask=true, gqa_groups=2, softcap=30.0, dropout=0.1, empty_rows=nan, algo=auto}")
    # an absent optional operand is not printed at all
    op2 = Attention(q=g.q, k=g.k, v=g.v, keep=g.m)
    assert "bias=" not in format_op(op2) and "(%q, %k, %v, keep=%m)" in format_op(op2)


def test_format_op_symbolic_scale_prints_as_a_value():
    g = qkv_graph(s=((), F32))
    assert "{scale=%s," in format_op(attention(g, scale=g.s))


def test_format_other_ops():
    g = G(a=(2, 16, 4), b=(2, 16, 4), c=(2, 16, 4), x=(2, 16, 3, 8), u=(2, 3, 32), kk=(3, 32), d=(3,))
    assert format_op(Scan(a=g.a, b=g.b, c=g.c), "y") == \
        "%y = seqfuse.scan(%a, %b, c=%c) {reverse=false, algo=auto}"
    long_conv = format_op(LongConv(u=g.u, k=g.kk, d=g.d, fft_size=64, algorithm="fft"), "y")
    assert long_conv.startswith("%y = seqfuse.long_conv(%u, %kk, d=%d) {causal=true, fft_size=64")
    assert long_conv.endswith(", algo=fft}")
    assert format_op(SSD(x=g.x, a=g.a, b=g.b, c=g.c, chunk=16), "y").startswith(
        "%y = seqfuse.ssd(%x, %b, %c, a=%a) {decay=scalar, chunk=16, algo=auto}")


def test_format_value_and_type():
    assert [format_value(x) for x in (None, True, False, -math.inf, math.inf, 0.5, 3, "causal", [1, None])] == \
        ["none", "true", "false", "-inf", "inf", "0.5", "3", "causal", "[1, none]"]
    assert format_value(torch.bfloat16) == "bf16" and format_value(torch.device("cpu")) == "cpu"
    assert format_type(torch.empty(2, 3, dtype=torch.float16, device="meta")) == "f16[2, 3]"
    assert format_type(torch.empty(4, dtype=torch.bool, device="meta")) == "i1[4]"
    assert format_type(None) == ""


def build_graph():
    g = qkv_graph()
    mul = g.graph.call_function(torch.ops.aten.mul.Tensor, (g.q, 2.0))
    mul.meta["val"] = torch.empty(2, 4, 16, 8, device="meta")
    op = Attention(q=mul, k=g.k, v=g.v, scale=0.125, mask="causal", algorithm="fused")
    node = g.add_ir(op, "attention", (2, 4, 16, 8))
    g.graph.output((node,))
    return g.graph, node


GOLDEN_GRAPH = """\
graph(%q: f32[2, 4, 16, 8], %k: f32[2, 4, 16, 8], %v: f32[2, 4, 16, 8]):
  %mul_tensor = aten.mul.Tensor(%q, 2.0) : f32[2, 4, 16, 8]
  %attention = seqfuse.attention(%mul_tensor, %k, %v) {scale=0.125, mask=causal, diag=0, window=0, fill=-inf, \
bias_after_mask=false, gqa_groups=1, softcap=none, dropout=0.0, empty_rows=nan, algo=fused} : f32[2, 4, 16, 8]
  return (%attention)
"""


def test_format_graph_golden_and_deterministic():
    graph, node = build_graph()
    assert format_graph(graph) == GOLDEN_GRAPH
    assert format_graph(build_graph()[0]) == format_graph(graph)  # a second build prints the same text
    assert format_node(node) == GOLDEN_GRAPH.splitlines()[2].strip()
    assert format_graph(graph, name="fwd").startswith("fwd(%q: f32")


def test_printed_ir_is_deterministic_through_compile(tmp_path):
    def f(q, k, v):
        L = q.shape[-2]
        s = q @ k.transpose(-2, -1) * 0.25
        s = s.masked_fill(torch.triu(torch.ones(L, L, dtype=torch.bool), 1), float("-inf"))
        return torch.softmax(s, dim=-1) @ v

    q, k, v = (torch.randn(2, 4, 16, 8) for _ in range(3))
    texts = []
    for run in range(2):
        torch._dynamo.reset()
        report = seqfuse.explain(f, q, k, v, options={"downstream": "eager", "dump_dir": str(tmp_path / str(run))})
        stages = {p.rsplit("/", 1)[-1].split("_", 2)[2][:-4]: open(p).read() for p in report.dumps
                  if "dynamo" not in p and p.endswith(".txt")}  # (the .dot picture of the IR stage aside)
        texts.append((report.rewrites[0].ir, stages))
    assert texts[0] == texts[1]
    ir, stages = texts[0]
    assert ir == ("%attention = seqfuse.attention(%l_q_, %l_k_, %l_v_) {scale=0.25, mask=causal, diag=0, window=0, "
                  "fill=-inf, bias_after_mask=false, gqa_groups=1, softcap=none, dropout=0.0, empty_rows=nan, algo=fused}")
    assert stages["ir"] == ir + "\n"
    assert "aten.einsum" in stages["contractions"]
    assert "aten.where.ScalarOther" in stages["masks"]
    assert ir in stages["attention"] and "aten.softmax" not in stages["attention"]


# --- verifier ------------------------------------------------------------------------

@pytest.mark.parametrize("shapes, attrs", [
    ({}, {}),
    ({}, dict(mask="causal", diag=-3)),
    ({}, dict(mask="window", diag=2, window=5, fill=-1e4, bias_after_mask=True, softcap=20.0, dropout=0.5)),
    (dict(k=(2, 2, 16, 8), v=(2, 2, 16, 8)), dict(gqa_groups=2)),
    (dict(k=(2, 1, 16, 8), v=(2, 1, 16, 8)), dict(gqa_groups=4)),
    (dict(q=(2, 5, 8), k=(2, 9, 8), v=(2, 9, 3)), {}),                      # rank 3, Lq != Lk, Dv != D
])
def test_valid_ops_pass(shapes, attrs):
    g = qkv_graph(**shapes)
    assert verify_op(attention(g, **attrs)) is None


def test_valid_op_with_bias_and_keep_passes():
    g = qkv_graph(b=(1, 1, 16, 16), m=((2, 1, 1, 16), torch.bool))
    verify_op(Attention(q=g.q, k=g.k, v=g.v, bias=g.b, keep=g.m))


@pytest.mark.parametrize("shapes, attrs, field", [
    (dict(q=(16, 8)), {}, "operand q must have rank >= 3"),
    (dict(v=(16, 8)), {}, "operand v must have rank >= 3"),
    (dict(k=(4, 16, 8)), {}, "ranks differ"),
    (dict(k=(2, 4, 16, 16)), {}, "q and k head dims differ: 8 vs 16"),
    (dict(v=(2, 4, 12, 8)), {}, "k and v lengths differ"),
    (dict(q=((2, 4, 16, 8), torch.int64)), {}, "q must be floating point"),
    (dict(k=(2, 3, 16, 8), v=(2, 3, 16, 8)), dict(gqa_groups=2), "gqa_groups=2"),
    (dict(k=(2, 2, 16, 8), v=(2, 2, 16, 8)), dict(gqa_groups=3), "gqa_groups=3"),
    (dict(k=(2, 2, 16, 8), v=(2, 4, 16, 8)), dict(gqa_groups=2), "k has 2 heads and v has 4"),
    ({}, dict(gqa_groups=0), "gqa_groups must be >= 1"),
    ({}, dict(gqa_groups=1.5), "gqa_groups must be >= 1"),
    ({}, dict(mask="diagonal"), "mask must be none|causal|window"),
    ({}, dict(mask="window", window=0), "window must be a positive int"),
    ({}, dict(mask="window", window=2.5), "window must be a positive int"),
    ({}, dict(diag=0.5), "diag must be an int"),
    ({}, dict(dropout=1.0), "dropout must be in [0, 1)"),
    ({}, dict(dropout=-0.1), "dropout must be in [0, 1)"),
    ({}, dict(dropout=None), "dropout must be in [0, 1)"),
    ({}, dict(fill=math.nan), "fill must be a float"),
    ({}, dict(fill=-1), "fill must be a float"),
    ({}, dict(softcap=0.0), "softcap must be"),
    ({}, dict(softcap=-5.0), "softcap must be"),
    ({}, dict(softcap="30"), "softcap must be"),
    ({}, dict(scale="0.1"), "scale must be"),
])
def test_bad_ops_are_rejected_naming_op_and_field(shapes, attrs, field):
    g = qkv_graph(**shapes)
    with pytest.raises(IRVerificationError) as info:
        verify_op(attention(g, **attrs))
    msg = str(info.value)
    assert msg.startswith("seqfuse.attention: ")
    assert field in msg


def test_bad_optional_operands_are_rejected():
    g = qkv_graph(b=((1, 1, 16, 16), torch.int32), m=((1, 1, 16, 16), torch.float32))
    with pytest.raises(IRVerificationError, match=r"seqfuse\.attention: keep mask must be bool, got torch.float32"):
        verify_op(Attention(q=g.q, k=g.k, v=g.v, keep=g.m))
    with pytest.raises(IRVerificationError, match=r"seqfuse\.attention: bias must be floating point"):
        verify_op(Attention(q=g.q, k=g.k, v=g.v, bias=g.b))


def test_operand_without_metadata_is_rejected():
    g = qkv_graph()
    del g.k.meta["val"]
    with pytest.raises(IRVerificationError, match=r"seqfuse\.attention: operand k has no tensor metadata"):
        verify_op(attention(g))


def test_other_ops_rules():
    g = G(a=(2, 16, 4), b=(2, 16, 4), a2=(2, 16), a3=(2, 15, 4), x=(2, 16, 3, 8), bn=(2, 16, 3, 4),
          u=(2, 3, 32), kk=(3, 32), g3=(2, 16, 3), gc=((2, 16, 3), torch.complex64))
    verify_op(Scan(a=g.a, b=g.b))
    verify_op(SSD(x=g.x, a=g.g3, b=g.bn, c=g.bn))
    verify_op(SSD(x=g.x, a=g.bn, b=g.bn, c=g.bn, decay="vector"))
    verify_op(SSD(x=g.x, a=None, b=g.bn, c=g.bn, decay="none"))
    for op, field in [(Scan(a=g.a3, b=g.b), "differ on the time axis"),
                      (Scan(a=g.a, b=g.b, reverse=1), "reverse must be a bool"),
                      (SSD(x=g.x, a=g.g3, b=g.bn, c=g.bn, decay="exp"), "unknown decay kind 'exp'"),
                      (SSD(x=g.x, a=g.g3, b=g.bn, c=g.bn, chunk=0), "chunk must be a positive int"),
                      (SSD(x=g.x, a=g.g3, b=g.bn, c=g.bn, decay="vector"), "decay=vector needs a of rank 4"),
                      (SSD(x=g.x, a=g.g3, b=g.b, c=g.bn), "x, b, c must be (B, T, H, P|N)"),
                      # the algorithms sum real log-decays: a complex decay would lose its phase
                      (SSD(x=g.x, a=g.gc, b=g.bn, c=g.bn), "a holds real log-decays; got torch.complex64"),
                      (LongConv(u=g.u, k=g.a2, causal="yes"), "causal must be a bool")]:
        with pytest.raises(IRVerificationError) as info:
            verify_op(op)
        assert str(info.value).startswith(f"seqfuse.{op.kind}: ") and field in str(info.value)


def test_verify_graph_counts_ir_ops():
    g = qkv_graph(k2=(2, 2, 16, 8), v2=(2, 2, 16, 8))
    first = g.add_ir(attention(g), "attention", (2, 4, 16, 8))
    g.add_ir(Attention(q=first, k=g.k2, v=g.v2, gqa_groups=2, mask="causal"), "attention_1", (2, 4, 16, 8))
    mul = g.graph.call_function(torch.ops.aten.mul.Tensor, (g.q, 2.0))
    mul.meta["val"] = torch.empty(2, 4, 16, 8, device="meta")
    assert verify_graph(g.graph) == 2
    assert verify_graph(qkv_graph().graph) == 0
    assert ir_of(first) is not None and ir_of(mul) is None
    g.add_ir(Attention(q=g.q, k=g.k2, v=g.v2, gqa_groups=3), "attention_2", (2, 4, 16, 8))
    with pytest.raises(IRVerificationError, match="gqa_groups=3"):
        verify_graph(g.graph)


def test_ir_marker_refuses_to_run():
    with pytest.raises(RuntimeError, match="without being lowered"):
        ir_marker(torch.zeros(1))


def test_pipeline_verifies_ops_before_lowering():
    """A recognizer that builds a malformed op makes the compile fail with the verifier's message."""
    class Corrupt(seqfuse.Pass):
        name = "test_ir_corrupt"

        def run(self, ctx):
            for node in ctx.graph.nodes:
                if ir_of(node) is not None:
                    ir_of(node).mask = "diagonal"

    def f(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v

    seqfuse.register_pass(Corrupt())
    try:
        with pytest.raises(Exception, match=r"seqfuse\.attention: mask must be none\|causal\|window"):
            torch.compile(f, backend="seqfuse", options={"downstream": "eager"})(
                *(torch.randn(1, 2, 8, 4) for _ in range(3)))
    finally:
        seqfuse.unregister_pass("test_ir_corrupt")
