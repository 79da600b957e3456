"""The cost model (passes/select): every IR op left at algorithm="auto" gets a known algorithm."""
import torch
import torch.fx

import seqfuse
from seqfuse.compiler.report import GraphReport
from seqfuse.ir import Attention, format_op, ir_of
from seqfuse.passes import PassContext, SelectPass
from seqfuse.passes.select import ATTENTION_ALGORITHMS, choose_attention


def graph_with_attention(*algorithms):
    g = torch.fx.Graph()
    q = g.placeholder("q")
    q.meta["val"] = torch.empty(2, 4, 16, 8, device="meta")
    nodes = []
    for algo in algorithms:
        node = g.call_function(seqfuse.ir.ir_marker, (q, q, q))
        node.meta["seqfuse_ir"] = Attention(q=q, k=q, v=q, mask="causal", algorithm=algo)
        node.meta["val"] = q.meta["val"]
        nodes.append(node)
    g.output(tuple(nodes))
    return torch.fx.GraphModule(torch.nn.Module(), g), nodes


def test_choose_attention_returns_a_known_algorithm():
    gm, (node,) = graph_with_attention("auto")
    assert choose_attention(ir_of(node)) in ATTENTION_ALGORITHMS


def test_select_fills_auto_and_keeps_explicit_choices():
    gm, (auto, forced) = graph_with_attention("auto", "custom")
    report = GraphReport()
    SelectPass().run(PassContext(gm, report))
    assert ir_of(auto).algorithm in ATTENTION_ALGORITHMS
    assert ir_of(forced).algorithm == "custom"  # a choice made earlier is not overridden
    assert format_op(ir_of(auto)).endswith(f"algo={ir_of(auto).algorithm}}}")
    assert report.rewrites == [] and report.near_misses == []  # selection is not a rewrite


def test_compiled_attention_reports_the_selected_algorithm():
    def f(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1), dim=-1) @ v

    report = seqfuse.explain(f, *(torch.randn(1, 2, 8, 4) for _ in range(3)), options={"downstream": "eager"})
    (rewrite,) = report.rewrites
    assert rewrite.algorithm in ATTENTION_ALGORITHMS and rewrite.algorithm != "auto"
    assert rewrite.ir.endswith(f"algo={rewrite.algorithm}}}")


# --- ssd, scan, and the user's override ------------------------------------------------------

from seqfuse.compiler.options import Options  # noqa: E402
from seqfuse.ir import SSD, LongConv, Scan  # noqa: E402
from seqfuse.passes.select import (SCAN_ALGORITHMS, SSD_ALGORITHMS, SSD_CHUNK, choose_scan,  # noqa: E402
                                   choose_ssd)


def ir_graph(make_op, **shapes):
    """A graph of placeholders with meta values (a tensor, or a shape) and one IR node."""
    g = torch.fx.Graph()
    nodes = {}
    for name, spec in shapes.items():
        nodes[name] = g.placeholder(name)
        nodes[name].meta["val"] = spec if isinstance(spec, torch.Tensor) else torch.empty(spec, device="meta")
    op = make_op(nodes)
    node = g.call_function(seqfuse.ir.ir_marker, tuple(v for _, v in seqfuse.ir.ops.graph_values(op)))
    node.meta["seqfuse_ir"] = op
    g.output(node)
    return torch.fx.GraphModule(torch.nn.Module(), g), op


def ssd_op(T, decay="scalar", algorithm="auto", x=None, P=32, N=16):
    """An ssd op on meta tensors (the eager references' rules), or on CPU with ``x`` given."""
    a_shape = {"scalar": (2, T, 4), "vector": (2, T, 4, N)}.get(decay)
    shapes = dict(x=x if x is not None else (2, T, 4, P), b=(2, T, 4, N), c=(2, T, 4, N))
    if a_shape:
        shapes["a"] = a_shape
    return ir_graph(lambda n: SSD(x=n["x"], b=n["b"], c=n["c"], a=n.get("a"), decay=decay, chunk=999,
                                  algorithm=algorithm), **shapes)


def test_choose_ssd_by_sequence_length_and_decay():
    for T, decay, want in [(1, "scalar", "recurrent"), (2, "scalar", "quadratic"), (64, "scalar", "quadratic"),
                           (65, "scalar", "chunked"), (4096, "none", "chunked"), (16, "vector", "quadratic"),
                           (17, "vector", "chunked")]:
        _, op = ssd_op(T, decay)
        assert choose_ssd(op) == want, (T, decay)
        assert op.chunk == (SSD_CHUNK[decay] if want == "chunked" else 999)  # chunk only set for chunked
    _, op = ssd_op(1024, "vector")
    choose_ssd(op)
    assert op.chunk == 8 < SSD_CHUNK["scalar"]  # the (Q, Q, N) exponent tile wants short chunks


def test_choose_ssd_on_cpu_runs_the_c_kernel_for_states_it_is_fastest_on():
    def cpu(T, P, N, decay="scalar", dtype=torch.float32):
        _, op = ssd_op(T, decay, x=torch.empty(2, T, 4, P, dtype=dtype), P=P, N=N)
        return choose_ssd(op)
    assert cpu(4096, 32, 32) == "recurrent" and cpu(64, 64, 64) == "recurrent"
    assert cpu(4096, 64, 128) == "recurrent"                   # Mamba-2's heads (P·N = 8192): the loop
    assert cpu(4096, 64, 256) == "recurrent" and cpu(4096, 256, 64) == "recurrent"   # P·N = 16384
    assert cpu(4096, 128, 256) == "chunked"                    # P·N = 32768: the matmuls catch up
    assert cpu(4096, 64, 128, dtype=torch.float64) == "recurrent"   # fp64 matmuls at half speed: the loop
    assert cpu(4096, 8, 512, dtype=torch.float64) == "chunked"      # N beyond the C kernel's local state
    assert cpu(4096, 64, 128, "vector") == "recurrent"         # the (Q, Q, N) tiles lose to the loop
    assert cpu(4096, 8, 512, "vector") == "chunked"            # N beyond the C kernel's local state


def test_choose_ssd_with_a_dynamic_length_is_chunked():
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
    mode = FakeTensorMode(shape_env=ShapeEnv())
    dims = [DimDynamic.STATIC, DimDynamic.DYNAMIC, DimDynamic.STATIC, DimDynamic.STATIC]
    x = mode.from_tensor(torch.empty(2, 2, 4, 32, device="meta"),
                         symbolic_context=StatelessSymbolicContext(dynamic_sizes=dims))
    _, op = ssd_op(2, x=x)  # short example length, but the next call may be long (the eager rules: not CPU)
    assert choose_ssd(op) == "chunked"


def scan_op(device="meta", algorithm="auto"):
    return ir_graph(lambda n: Scan(a=n["a"], b=n["b"], c=n["c"], algorithm=algorithm),
                    a=torch.empty(1, 128, 512, 16, device=device), b=(1, 128, 512, 16), c=(1, 1, 512, 16))


def test_choose_scan_is_sequential_on_cpu():
    _, op = scan_op("cpu")
    assert choose_scan(op) == "recurrent"
    assert set(SCAN_ALGORITHMS) == {"recurrent", "chunked"} and set(SSD_ALGORITHMS) == {
        "recurrent", "quadratic", "chunked"}


def test_select_honors_the_user_algorithm_for_every_kind():
    options = Options.from_dict({"algorithm": {"ssd": "recurrent", "scan": "chunked", "attention": "fused",
                                               "long_conv": "direct"}})
    ssd_gm, ssd = ssd_op(4096)
    scan_gm, scan = scan_op("cpu")
    att_gm, (att,) = graph_with_attention("custom")  # even over a recognizer's choice
    conv_gm, conv = ir_graph(lambda n: LongConv(u=n["u"], k=n["k"], fft_size=1024), u=(2, 512), k=(2, 512))
    for gm in (ssd_gm, scan_gm, att_gm, conv_gm):
        SelectPass().run(PassContext(gm, GraphReport(), options))
    assert (ssd.algorithm, scan.algorithm, ir_of(att).algorithm, conv.algorithm) == \
        ("recurrent", "chunked", "fused", "direct")
    # forcing "chunked" still gets the chunk length from the cost model
    forced_gm, forced = ssd_op(4096, "vector")
    SelectPass().run(PassContext(forced_gm, GraphReport(), Options.from_dict({"algorithm": {"ssd": "chunked"}})))
    assert forced.algorithm == "chunked" and forced.chunk == SSD_CHUNK["vector"]


def test_select_without_options_fills_ssd_and_scan():
    ssd_gm, ssd = ssd_op(4096)
    scan_gm, scan = scan_op("cpu")
    for gm in (ssd_gm, scan_gm):
        SelectPass().run(PassContext(gm, GraphReport()))  # ctx.options is None in unit tests
    assert ssd.algorithm == "chunked" and scan.algorithm == "recurrent"
    assert format_op(ssd).endswith("{decay=scalar, chunk=64, algo=chunked}")


# --- the recurrent (decode) form on CUDA -------------------------------------------------------

from seqfuse.passes.select import DECODE_MAX_T  # noqa: E402


def fake_cuda(*shape, dynamic_dim=None):
    """A fake CUDA tensor (no GPU needed); ``dynamic_dim`` makes that dimension symbolic."""
    from torch._dynamo.source import ConstantSource
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv
    env = ShapeEnv()
    shape = list(shape)
    if dynamic_dim is not None:
        n = shape[dynamic_dim]
        sym = env.create_symbol(n, source=ConstantSource("T"), dynamic_dim=DimDynamic.DYNAMIC)
        shape[dynamic_dim] = env.create_symintnode(sym, hint=n)
    with FakeTensorMode(shape_env=env):
        return torch.empty(*shape, device="cuda")


def test_choose_ssd_on_cuda_decodes_short_static_lengths():
    def cuda(T, decay, **kw):
        _, op = ssd_op(T, decay, x=fake_cuda(2, T, 4, 32, **kw))
        return choose_ssd(op), op.chunk
    for decay in ("none", "scalar", "vector"):
        for T in (1, 3, DECODE_MAX_T):
            assert cuda(T, decay) == ("recurrent", 999), (T, decay)   # no chunk set for the decode form
    # past the threshold: the triton path's chunked kernel (its "quadratic" would run the eager reference)
    assert cuda(DECODE_MAX_T + 1, "scalar") == ("chunked", SSD_CHUNK["scalar"])
    assert cuda(DECODE_MAX_T + 1, "vector") == ("chunked", SSD_CHUNK["vector"])
    assert cuda(4096, "none") == ("chunked", SSD_CHUNK["none"])
    assert cuda(2, "scalar", dynamic_dim=1)[0] == "chunked"            # a dynamic T may be long next call
    # forcing still wins
    _, op = ssd_op(1, "scalar", x=fake_cuda(2, 1, 4, 32))
    assert choose_ssd(op, Options.from_dict({"algorithm": {"ssd": "chunked"}})) == "chunked"


def test_choose_ssd_on_cuda_without_triton_keeps_the_length_rules(monkeypatch):
    import importlib.util
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "triton" else find_spec(name, *a))
    _, op = ssd_op(3, "scalar", x=fake_cuda(2, 3, 4, 32))
    assert choose_ssd(op) == "quadratic"                               # the eager loop would be ~12 launches
    _, op = ssd_op(1, "scalar", x=fake_cuda(2, 1, 4, 32))
    assert choose_ssd(op) == "recurrent"                               # the eager rule for one step


def fake_scan_op(T_a, T_b, **kw):
    return ir_graph(lambda n: Scan(a=n["a"], b=n["b"], algorithm="auto"),
                    a=fake_cuda(2, 64, T_a, 16, **kw), b=fake_cuda(2, 64, T_b, 16, **kw))


def test_choose_scan_on_cuda_decodes_short_static_lengths():
    for T in (1, 3, DECODE_MAX_T):
        assert choose_scan(fake_scan_op(T, T)[1]) == "recurrent", T
    assert choose_scan(fake_scan_op(DECODE_MAX_T + 1, DECODE_MAX_T + 1)[1]) == "chunked"
    assert choose_scan(fake_scan_op(1, 512)[1]) == "chunked"            # a broadcast along T: T is b's
    assert choose_scan(fake_scan_op(2, 2, dynamic_dim=2)[1]) == "chunked"
    _, op = scan_op("cpu")
    assert choose_scan(op) == "recurrent"                              # CPU unchanged


def test_choose_scan_reads_the_length_of_the_discretization_factors():
    # the discretized form: a = A (64, 1, 16) and b = B (2, 1, 1, 16) broadcast along T; only dt and
    # u carry it
    def op(T):
        return ir_graph(lambda n: Scan(a=n["a"], b=n["b"], dt=n["dt"], u=n["u"], algorithm="auto"),
                        a=fake_cuda(64, 1, 16), b=fake_cuda(2, 1, 1, 16), dt=fake_cuda(2, 64, T, 1),
                        u=fake_cuda(2, 64, T, 1))[1]

    assert choose_scan(op(DECODE_MAX_T)) == "recurrent"
    assert choose_scan(op(512)) == "chunked"


def fake_delta_op(T, gate="scalar", keys=(), read="decayed", dynamic=False):
    """A delta op on fake CUDA tensors; ``keys`` names the extra keys it carries ("p", "e")."""
    from seqfuse.ir.ops import Delta
    kw = dict(dynamic_dim=1) if dynamic else {}
    shapes = dict(q=fake_cuda(2, T, 4, 16, **kw), k=fake_cuda(2, T, 4, 16, **kw), v=fake_cuda(2, T, 4, 16, **kw),
                  beta=fake_cuda(2, T, 4, **kw), g=fake_cuda(2, T, 4, **kw))
    shapes.update({name: fake_cuda(2, T, 4, 16, **kw) for name in keys})
    return ir_graph(lambda n: Delta(q=n["q"], k=n["k"], v=n["v"], beta=n["beta"], g=n["g"], p=n.get("p"),
                                    e=n.get("e"), gate=gate, read=read), **shapes)[1]


def test_choose_delta_on_cuda_runs_the_generalized_step_recurrent_at_every_length():
    from seqfuse.passes.select import DELTA_RECURRENT_MAX_T, choose_delta
    # the plain rule: the chunked triton kernels past the decode lengths
    assert choose_delta(fake_delta_op(1)) == "recurrent"
    assert choose_delta(fake_delta_op(DELTA_RECURRENT_MAX_T)) == "recurrent"
    assert choose_delta(fake_delta_op(4096)) == "chunked"
    assert choose_delta(fake_delta_op(4, dynamic=True)) == "chunked"
    # a read key, an erase key, a read of the previous state: the recurrent triton kernels only
    for keys, read in ((("p",), "decayed"), (("e",), "previous"), ((), "previous"), (("p", "e"), "previous")):
        assert choose_delta(fake_delta_op(4096, keys=keys, read=read)) == "recurrent", (keys, read)
        assert choose_delta(fake_delta_op(4, keys=keys, read=read, dynamic=True)) == "recurrent", (keys, read)
    # forcing still wins
    op = fake_delta_op(4096, keys=("p",))
    assert choose_delta(op, Options.from_dict({"algorithm": {"delta": "chunked"}})) == "chunked"
