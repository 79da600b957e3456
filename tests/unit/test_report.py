"""seqfuse.explain's report (rewrites, near misses, runtime), dump_dir files, and verify=True."""
import dataclasses
import threading
import inspect
import math
import os

import pytest
import torch
import torch.nn.functional as F

import seqfuse
from helpers import rel_err
from seqfuse.runtime import dispatch

EAGER = {"downstream": "eager"}


def two_attentions(q, k, v, logits):
    a = torch.softmax(q @ k.transpose(-2, -1) * 0.5, dim=-1) @ v  # ATTN-1
    b = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # ATTN-2
    gate = torch.softmax(logits, dim=-1)  # a softmax that is not attention
    return (a + b) * gate[..., :1]


def returns_probabilities(q, k, v):
    p = torch.softmax(q @ k.transpose(-2, -1), dim=-1)  # NEAR-MISS
    return p @ v, p


def line_of(fn, marker):
    lines, start = inspect.getsourcelines(fn)
    return start + next(i for i, text in enumerate(lines) if marker in text)


def inputs():
    return [torch.randn(2, 2, 8, 4) for _ in range(3)] + [torch.randn(2, 2, 8, 3)]


def test_report_of_two_attentions():
    args = inputs()
    report = seqfuse.explain(two_attentions, *args, options=EAGER)
    assert rel_err(report.output, two_attentions(*args)) < 1e-5
    assert report.count("attention") == 2 and report.count("ssd") == 0
    assert len(report.graphs) == 1
    first, second = report.rewrites
    assert (first.kind, second.kind) == ("attention", "attention")
    assert first.algorithm == second.algorithm == "fused"
    assert first.ir.startswith("%attention = seqfuse.attention(%l_q_, %l_k_, %l_v_) {scale=0.5, mask=none,")
    assert second.ir.startswith("%attention_1 = seqfuse.attention(%l_q_, %l_k_, %l_v_) {scale=none, mask=causal,")
    assert first.location == f"test_report.py:{line_of(two_attentions, 'ATTN-1')} in two_attentions"
    assert second.location == f"test_report.py:{line_of(two_attentions, 'ATTN-2')} in two_attentions"
    assert report.near_misses == []  # the gate softmax is not mistaken for attention
    assert report.runtime == {"attention": {"triton": 0, "cpu": 0, "aten": 2, "eager": 0}}
    assert all(r.startswith("triton") for rs in report.fallbacks.values() for r in rs)  # aten took both


def test_count_rejects_a_non_string_kind():
    report = seqfuse.explain(returns_probabilities, *inputs()[:3], options=EAGER)
    with pytest.raises(TypeError, match="kind must be a string"):
        report.count(seqfuse.ir.Attention)


def test_near_miss_has_reason_and_location():
    q, k, v, _ = inputs()
    report = seqfuse.explain(returns_probabilities, q, k, v, options=EAGER)
    assert report.count("attention") == 0 and report.runtime == {}
    (miss,) = report.near_misses
    assert miss.kind == "attention"
    assert "probabilities are used 2 times" in miss.reason
    assert miss.location == f"test_report.py:{line_of(returns_probabilities, 'NEAR-MISS')} in returns_probabilities"
    out, p = report.output
    ref_out, ref_p = returns_probabilities(q, k, v)
    assert rel_err(out, ref_out) < 1e-6 and rel_err(p, ref_p) < 1e-6


def test_str_has_the_tables():
    report = seqfuse.explain(two_attentions, *inputs(), options=EAGER)
    text = str(report)
    assert text.startswith("seqfuse report: 1 graph(s), 2 rewrite(s), 0 near miss(es)")
    lines = text.splitlines()
    header = lines.index("rewrites:")
    assert lines[header + 1].split() == ["kind", "algorithm", "location", "ir"]
    rows = lines[header + 2:header + 4]
    assert all(r.split()[:2] == ["attention", "fused"] and "test_report.py:" in r and "seqfuse.attention(" in r
               for r in rows)
    runtime = lines.index("runtime calls:")
    assert lines[runtime + 1].split() == ["op", "triton", "cpu", "aten", "eager"]
    assert lines[runtime + 2].split() == ["attention", "0", "0", "2", "0"]
    assert lines[-1].startswith("pipeline seconds: ") and "trace " in lines[-1] and "attention " in lines[-1]
    assert set(report.seconds) >= {"trace", "canonicalize", "loops", "attention", "select", "lower"}
    assert all(t >= 0 for t in report.seconds.values())
    assert repr(report) == text
    miss = str(seqfuse.explain(returns_probabilities, *inputs()[:3], options=EAGER))
    assert "near misses:" in miss and "the probabilities are used 2 times" in miss
    assert miss.splitlines()[2].split() == ["kind", "location", "reason"]


def test_dump_dir_writes_every_stage(tmp_path):
    report = seqfuse.explain(two_attentions, *inputs(), options={**EAGER, "dump_dir": tmp_path})
    names = [os.path.basename(p) for p in report.dumps]
    # the graph before the pipeline, after each canonicalization step, after each enabled pass
    # (in run order), the IR listing, and the lowered graph
    stages = ["dynamo", "pre_dispatch", "contractions", "masks",
              *[p.name for p in seqfuse.registered_passes() if p.enabled_by_default], "ir", "lowered"]
    ir_step = stages.index("ir")
    expected = [f"g0_{i:02d}_{stage}.txt" for i, stage in enumerate(stages)]
    expected.insert(ir_step + 1, f"g0_{ir_step:02d}_ir.dot")  # the graph with its IR ops, for graphviz
    assert names == expected
    assert sorted(os.listdir(tmp_path)) == sorted(names)  # every file written is listed, and only those
    assert all(os.path.dirname(p) == str(tmp_path) for p in report.dumps)
    text = {n.split("_", 2)[2][:-4]: open(p).read() for n, p in zip(names, report.dumps) if n.endswith(".txt")}
    assert text["ir"] == "\n".join(r.ir for r in report.rewrites) + "\n"
    assert "aten.softmax" in text["masks"] and "aten.scaled_dot_product_attention" in text["masks"]
    assert "torch.ops.seqfuse.attention" in text["lowered"] or "seqfuse.attention(" in text["lowered"]
    after = text["attention"]
    assert after.count("seqfuse.attention(") == 2 and after.count("aten.softmax") == 1  # only the gate is left
    assert "torch.ops.seqfuse.attention" not in after
    # a second compile into the same directory gets its own prefix
    torch._dynamo.reset()
    again = seqfuse.explain(two_attentions, *inputs(), options={**EAGER, "dump_dir": str(tmp_path)})
    assert [os.path.basename(p) for p in again.dumps][0] == "g1_00_dynamo.txt"
    assert len(os.listdir(tmp_path)) == 2 * len(expected)


def test_dump_dir_writes_the_graph_as_dot(tmp_path):
    report = seqfuse.explain(two_attentions, *inputs(), options={**EAGER, "dump_dir": tmp_path})
    [dot] = [p for p in report.dumps if p.endswith(".dot")]
    text = open(dot).read()
    assert text.startswith('digraph "g0_ir" {') and text.rstrip().endswith("}")
    ir_nodes = [line for line in text.splitlines() if "seqfuse.attention" in line]
    assert len(ir_nodes) == 2 and all('fillcolor="#f4a460"' in line for line in ir_nodes)  # highlighted
    assert "algo=fused" in ir_nodes[0]
    assert text.count('fillcolor="#f4a460"') == 2  # nothing else is
    nodes = {line.split()[0] for line in text.splitlines() if "[label=" in line}
    edges = [line.split() for line in text.splitlines() if " -> " in line]
    assert edges and all(e[0] in nodes and e[2].rstrip(";") in nodes for e in edges)
    assert text.count("[label=") == len(nodes)
    # balanced quotes on every line: labels are escaped
    assert all(line.replace('\\"', "").count('"') % 2 == 0 for line in text.splitlines())


def test_no_dumps_without_dump_dir():
    assert seqfuse.explain(two_attentions, *inputs(), options=EAGER).dumps == []


@pytest.mark.parametrize("downstream", ["eager", "aot_eager", "inductor"])
def test_verify_passes_on_a_correct_model(downstream):
    args = inputs()
    report = seqfuse.explain(two_attentions, *args, options={"downstream": downstream, "verify": True})
    assert report.count("attention") == 2
    assert rel_err(report.output, two_attentions(*args)) < 1e-5


@pytest.mark.parametrize("downstream", ["eager", "aot_eager", "inductor"])
def test_verify_raises_on_a_wrong_result(monkeypatch, downstream):
    def off_by_one(impl):
        def forward(*args):
            out, lse = impl.forward(*args)
            return out + 1.0, lse
        return dataclasses.replace(impl, forward=forward)

    for path in ("aten", "eager"):
        monkeypatch.setitem(dispatch._IMPLS["attention"], path, off_by_one(dispatch._IMPLS["attention"][path]))
    with pytest.raises(seqfuse.VerificationError, match="output 0 relative RMS error"):
        seqfuse.explain(two_attentions, *inputs(), options={"downstream": downstream, "verify": True})


def test_verify_is_off_by_default(monkeypatch):
    impl = dispatch._IMPLS["attention"]["aten"]
    monkeypatch.setitem(dispatch._IMPLS["attention"], "aten",
                        dataclasses.replace(impl, forward=lambda *a: tuple(x + 1.0 for x in impl.forward(*a))))
    args = inputs()
    report = seqfuse.explain(two_attentions, *args, options=EAGER)  # no error: nothing checks
    assert rel_err(report.output, two_attentions(*args)) > 0.1


def test_chained_attentions():
    def chained(q, k, v):
        a = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1) @ v
        return F.scaled_dot_product_attention(a, k, v, is_causal=True)

    args = inputs()[:3]
    report = seqfuse.explain(chained, *args, options=EAGER)
    assert report.count("attention") == 2
    assert rel_err(report.output, chained(*args)) < 1e-5


def test_explain_says_where_the_compile_time_went():
    torch._dynamo.reset()
    report = seqfuse.explain(two_attentions, *inputs(), options=EAGER)
    cs = report.compile_seconds
    assert list(cs) == ["first_call", "dynamo", "seqfuse", "downstream"]
    assert cs["dynamo"] is not None and cs["dynamo"] > 0  # torch reports its frame compile times
    assert cs["seqfuse"] == pytest.approx(sum(report.seconds.values()))
    assert 0 <= cs["downstream"] and cs["dynamo"] + cs["seqfuse"] + cs["downstream"] <= cs["first_call"] * 1.05
    line = next(s for s in str(report).splitlines() if s.startswith("compile seconds: "))
    assert "dynamo" in line and "seqfuse" in line and "downstream" in line


def diagonal_scan(a, b):  # h_t = a_t * h_{t-1} + b_t over dim 1 -> seqfuse.scan
    h = torch.zeros_like(b[:, 0])
    out = []
    for t in range(a.shape[1]):
        h = a[:, t] * h + b[:, t]
        out.append(h)
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("runtime, prefetched", [("auto", True), ("cpu", True), ("eager", False)])
def test_cpu_kernels_are_built_while_the_rest_compiles(monkeypatch, runtime, prefetched):
    """A graph with a scan on CPU starts building the C kernels before the downstream compile,
    in a background thread (so a cold build overlaps it), not at the first call."""
    from seqfuse.compiler import backend
    from seqfuse.lowering.cpu import scan as cpu_scan

    events = []
    real_available = cpu_scan.available
    monkeypatch.setattr(cpu_scan, "available",
                        lambda *a: events.append(("build", threading.current_thread().name)) or real_available(*a))
    real_downstream = backend.compile_downstream

    def downstream(*args, **kwargs):
        events.append(("downstream", threading.current_thread().name))
        return real_downstream(*args, **kwargs)

    monkeypatch.setattr(backend, "compile_downstream", downstream)
    started = []
    real_prefetch = backend.prefetch_cpu_kernels
    monkeypatch.setattr(backend, "prefetch_cpu_kernels",
                        lambda *a: started.append(real_prefetch(*a)) or started[-1])
    torch._dynamo.reset()
    a, b = torch.rand(2, 6, 3), torch.randn(2, 6, 3)
    report = seqfuse.explain(diagonal_scan, a, b, options={**EAGER, "runtime": runtime})
    assert report.count("scan") == 1, str(report)
    if not prefetched:
        assert started == [None] and ("build", "seqfuse-cpu-kernels") not in events
        return
    [thread] = started
    thread.join(timeout=300)
    assert ("build", "seqfuse-cpu-kernels") in events, events
    assert [e for e in events if e[0] == "downstream"] == [("downstream", threading.current_thread().name)]
    assert report.runtime["scan"]["cpu"] == 1, report.runtime  # the prefetched library runs the call


def test_no_prefetch_without_cpu_kernel_ops():
    from seqfuse.compiler import backend
    report = seqfuse.compiler.GraphReport()
    report.add_rewrite("attention", "%a = ...", None, "fused")
    report.add_rewrite("ssd", "%s = ...", None, "chunked")
    assert backend.prefetch_cpu_kernels(report, [torch.ones(1)], "auto") is None
    report.add_rewrite("ssd", "%t = ...", None, "recurrent")
    assert backend.prefetch_cpu_kernels(report, [torch.ones(1), 3], "aten") is None
    assert backend.prefetch_cpu_kernels(report, [torch.ones(1, device="meta")], "auto") is None
    thread = backend.prefetch_cpu_kernels(report, [torch.ones(1), 3], "auto")
    assert thread is not None and thread.name == "seqfuse-cpu-kernels"
    thread.join(timeout=300)
