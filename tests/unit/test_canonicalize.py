"""Canonicalization: every contraction spelling becomes one aten.einsum on the base tensors,
every constant-fill mask spelling becomes where.ScalarOther(keep, x, fill); values unchanged."""
import pytest
import torch

import seqfuse
from seqfuse.compiler.canonicalize import canonicalize, normalize_contractions, normalize_masks, trace_pre_dispatch
from seqfuse.ir import format_graph

aten = torch.ops.aten


def capture(fn, *args):
    """Dynamo's graph of ``fn`` and its example inputs (in the graph's placeholder order)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append((gm, example_inputs))
        return gm.forward

    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    assert len(graphs) == 1
    return graphs[0]


def run(gm, inputs):
    out = gm(*inputs)
    return out[0] if isinstance(out, (tuple, list)) else out


def targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def placeholders(gm):
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


q4, k4 = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 6, 4)
q3, k3 = torch.randn(6, 5, 4), torch.randn(6, 6, 4)

# name -> (function, inputs, expected equation on (q, k) in that order)
CONTRACTIONS = {
    "matmul_operator": (lambda q, k: q @ k.transpose(-2, -1), (q4, k4), "abcd,abed->abce"),
    "bmm": (lambda q, k: torch.bmm(q, k.transpose(1, 2)), (q3, k3), "abc,adc->abd"),
    "mm": (lambda q, k: torch.mm(q, k.t()), (q3[0], k3[0]), "ab,cb->ac"),
    "einsum": (lambda q, k: torch.einsum("bhid,bhjd->bhij", q, k), (q4, k4), "abcd,abed->abce"),
    "broadcast_mul_sum": (lambda q, k: (q.unsqueeze(-2) * k.unsqueeze(-3)).sum(-1), (q4, k4), "abcd,abed->abce"),
    "permuted_operands": (lambda q, k: q.permute(0, 2, 1, 3) @ k.permute(0, 2, 3, 1),
                          (q4.transpose(1, 2).contiguous(), k4.transpose(1, 2).contiguous()), "abcd,aecd->acbe"),
}


PARAMS = sorted(CONTRACTIONS)


@pytest.mark.parametrize("name", PARAMS)
def test_contractions_become_one_einsum(name):
    fn, (q, k), equation = CONTRACTIONS[name]
    gm, inputs = capture(fn, q, k)
    traced = trace_pre_dispatch(gm, inputs)
    normalize_contractions(traced)
    einsums = [n for n in traced.graph.nodes if n.target is aten.einsum.default]
    assert len(einsums) == 1, format_graph(traced.graph)
    (node,) = einsums
    by_name = {p.name: p for p in placeholders(traced)}
    # the view chains are folded into the equation: the operands are the inputs themselves
    assert node.args[1] == [by_name["l_q_"], by_name["l_k_"]], format_graph(traced.graph)
    assert node.args[0] == equation
    assert not any(t in targets(traced) for t in (aten.matmul.default, aten.bmm.default, aten.mm.default,
                                                  aten.transpose.int, aten.permute.default, aten.sum.dim_IntList))
    torch.testing.assert_close(run(traced, inputs), fn(q, k), rtol=1e-6, atol=1e-6)


def test_baddbmm_with_zero_beta_keeps_alpha_as_a_scale():
    def fn(q, k):
        return torch.baddbmm(torch.zeros(6, 5, 6), q, k.transpose(1, 2), beta=0, alpha=0.5)

    gm, inputs = capture(fn, q3, k3)
    traced = trace_pre_dispatch(gm, inputs)
    assert normalize_contractions(traced) == 1
    text = format_graph(traced.graph)
    assert "aten.einsum(abc,adc->abd, [%l_q_, %l_k_])" in text and "aten.mul.Tensor(%einsum_default, 0.5)" in text
    torch.testing.assert_close(run(traced, inputs), fn(q3, k3))


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_baddbmm_with_a_bias_is_an_einsum_plus_the_bias(beta):
    """Bloom's ALiBi scores, baddbmm(alibi, q, kᵀ, beta, alpha): the contraction becomes an einsum
    (scaled by alpha) and beta·alibi an additive term the recognizers read as a bias."""
    def fn(bias, q, k):
        return torch.baddbmm(bias, q, k.transpose(1, 2), beta=beta, alpha=0.25)

    bias = torch.randn(6, 1, 6)
    gm, inputs = capture(fn, bias, q3, k3)
    traced = trace_pre_dispatch(gm, inputs)
    assert normalize_contractions(traced) == 1
    text = format_graph(traced.graph)
    assert "aten.baddbmm" not in text and "aten.einsum(abc,adc->abd, [%l_q_, %l_k_])" in text, text
    assert "aten.add.Tensor" in text, text
    torch.testing.assert_close(run(traced, inputs), fn(bias, q3, k3))


def test_contraction_count_and_idempotence():
    def fn(q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1), -1) @ v

    gm, inputs = capture(fn, q4, k4, torch.randn(2, 3, 6, 7))
    traced = trace_pre_dispatch(gm, inputs)
    assert normalize_contractions(traced) == 2
    first = format_graph(traced.graph)
    assert normalize_contractions(traced) == 0  # already canonical
    assert format_graph(traced.graph) == first


def test_vector_products_are_left_alone():
    gm, inputs = capture(lambda a, b: torch.matmul(a, b), torch.randn(4), torch.randn(4, 3))
    traced = trace_pre_dispatch(gm, inputs)
    assert normalize_contractions(traced) == 0


def test_a_sum_over_an_axis_one_factor_broadcasts_stays_a_mul_and_a_sum():
    """(x[:, None, :] * y).sum(1) = Σ_c x·y_c: torch.einsum would compute x·Σ_c y_c, which is ±inf
    where x is inf and the program's inf·y_1 + inf·y_2 is NaN (found by the map fuzz family, seed
    113, #44 and #84).  A sum over an axis both factors have is still a contraction."""
    def factored(x, y):
        return (x[:, None, :] * y).sum(1)

    x, y = torch.randn(3, 4), torch.tensor([[1.0, -1.0, 2.0, 0.5]] * 3)[..., None].expand(3, 4, 4).contiguous()
    x[1, 2] = float("inf")
    gm, inputs = capture(factored, x, y)
    traced = trace_pre_dispatch(gm, inputs)
    assert normalize_contractions(traced) == 0, format_graph(traced.graph)
    want = factored(x, y)
    assert want[1, 2].isnan()
    assert torch.equal(run(traced, inputs).isnan(), want.isnan())
    compiled = torch.compile(factored, backend="seqfuse", options={"downstream": "eager"})
    assert torch.equal(compiled(x, y).isnan(), want.isnan())

    gm, inputs = capture(lambda q, k: (q[:, :, None] * k[:, None]).sum(-1), q3, k3)
    traced = trace_pre_dispatch(gm, inputs)
    assert normalize_contractions(traced) == 1


def test_a_slot_read_after_its_write_reads_the_written_value():
    from seqfuse.compiler.canonicalize import forward_slot_reads

    def carried(x):
        h = torch.zeros(2, 4, 3)
        h[:, 1] = x
        return h[:, 1] * 2 + h[:, 2]       # slot 1 reads x; slot 2 was never written

    x = torch.randn(2, 3)
    gm, inputs = capture(carried, x)
    traced = trace_pre_dispatch(gm, inputs)
    assert forward_slot_reads(traced) == 1, format_graph(traced.graph)
    torch.testing.assert_close(run(traced, inputs), carried(x))


def test_a_slot_written_again_through_a_view_is_read_from_the_buffer():
    # between the write of slot 1 and its second read, a view of the whole buffer writes slot 1 again:
    # only the first read may take the written value
    from seqfuse.compiler.canonicalize import forward_slot_reads

    def rewritten(x, y):
        h = torch.zeros(2, 4, 3)
        h[:, 1] = x
        a = h[:, 1] * 2
        h.view(2, 12)[:, 3:6] = y
        return a + h[:, 1] * 3

    x, y = torch.randn(2, 3), torch.randn(2, 3)
    gm, inputs = capture(rewritten, x, y)
    traced = trace_pre_dispatch(gm, inputs)
    assert forward_slot_reads(traced) == 0, format_graph(traced.graph)
    torch.testing.assert_close(run(traced, inputs), rewritten(x, y))
    compiled = torch.compile(rewritten, backend="seqfuse", options={"downstream": "eager"})
    torch.testing.assert_close(compiled(x, y), rewritten(x, y))


def _slot_program(r):
    """A random sequence of whole-slot writes and reads of a (2, 4, 4) buffer along axis 1 or 2, and in
    a third of the programs writes the forwarding must see through (a view's slice, +=, a 2-slot slice)."""
    mixed = r.random() < 0.3
    ops = [(r.choice(["write", "write", "read", "read", "read"] + (["view", "iadd", "pair"] if mixed else [])),
            r.choice([1, 2]), r.randrange(4), r.random()) for _ in range(r.randint(3, 10))]

    def fn(x):
        h, acc = torch.zeros(2, 4, 4), torch.zeros(2, 4)
        for n, (kind, d, i, c) in enumerate(ops):
            v = x * (n + 1) + c
            slot = (slice(None), i) if d == 1 else (slice(None), slice(None), i)
            if kind == "write":
                h[slot] = v
            elif kind == "read":
                acc = acc + h[slot] * (n + 2)
            elif kind == "view":
                h.view(2, 16)[:, 4 * i:4 * i + 4] = v
            elif kind == "iadd":
                h[slot] += v
            else:
                h[:, i:i + 2] = v[:, None]
        return acc + h.sum(1)
    return fn


def test_slot_forwarding_keeps_random_programs_equal_to_eager(monkeypatch):
    import random

    import seqfuse.compiler.pipeline as pipeline
    counts = []
    forward = pipeline.forward_slot_reads
    monkeypatch.setattr(pipeline, "forward_slot_reads", lambda gm: counts.append(forward(gm)) or counts[-1])
    for seed in range(40):
        fn = _slot_program(random.Random(seed))
        x = torch.randn(2, 4, generator=torch.Generator().manual_seed(seed))
        torch._dynamo.reset()
        got = torch.compile(fn, backend="seqfuse", options={"downstream": "eager"})(x)
        torch.testing.assert_close(got, fn(x), msg=f"program {seed}")
    assert sum(1 for c in counts if c) >= 5, counts      # the forwarding did happen


@pytest.mark.parametrize("downstream", ["eager", "aot_eager", "inductor"])
def test_mixed_dtype_broadcast_product_is_not_an_einsum(downstream):
    """mul promotes fp32 * fp16 to fp32; aten.einsum does not (it raises): the sum of the
    product keeps its own ops, and the compiled program gives eager's fp32 result."""
    def fn(x, y):
        return (x[:, :, None] * y[:, None]).sum(-1)

    x, y = torch.randn(3, 4, 5), torch.randn(3, 6, 5, dtype=torch.float16)
    gm, inputs = capture(fn, x, y)
    traced = trace_pre_dispatch(gm, inputs)
    assert normalize_contractions(traced) == 0, format_graph(traced.graph)
    torch._dynamo.reset()
    got = torch.compile(fn, backend="seqfuse", options={"downstream": downstream})(x, y)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, fn(x, y))


s4 = torch.randn(2, 3, 5, 5)
m2 = torch.rand(5, 5) > 0.5

# name -> (function, keep is the mask itself (True) or its negation (False), fill)
MASKS = {
    "masked_fill": (lambda s, m: s.masked_fill(m, float("-inf")), False, float("-inf")),
    "masked_fill_of_negation": (lambda s, m: s.masked_fill(~m, -1e4), True, -1e4),
    "where_x_fill": (lambda s, m: torch.where(m, s, float("-inf")), True, float("-inf")),
    "where_fill_x": (lambda s, m: torch.where(m, -1e4, s), False, -1e4),
    "where_tensor_fill": (lambda s, m: torch.where(m, s, torch.tensor(float("-inf"))), True, float("-inf")),
}


@pytest.mark.parametrize("name", sorted(MASKS))
def test_masks_become_where_scalar_other(name):
    fn, keep_is_mask, fill = MASKS[name]
    gm, inputs = capture(fn, s4, m2)
    traced = trace_pre_dispatch(gm, inputs)
    normalize_masks(traced)
    wheres = [n for n in traced.graph.nodes if n.op == "call_function" and n.target is not aten.logical_not.default
              and "where" in str(n.target) or "masked_fill" in str(n.target)]
    assert [n.target for n in wheres] == [aten.where.ScalarOther], format_graph(traced.graph)
    keep, x, got_fill = wheres[0].args
    mask = next(p for p in placeholders(traced) if p.name == "l_m_")
    if keep_is_mask:
        assert keep is mask
    else:
        assert keep.target is aten.logical_not.default and keep.args[0] is mask
    assert x.name == "l_s_" and got_fill == fill and isinstance(got_fill, float)
    assert torch.equal(run(traced, inputs), fn(s4, m2))


def test_canonicalize_runs_both_normalizations():
    def fn(q, k, m):
        return (q @ k.transpose(-2, -1)).masked_fill(m, float("-inf"))

    m = torch.rand(5, 6) > 0.5
    gm, inputs = capture(fn, q4, k4, m)
    canon = canonicalize(gm, inputs)
    assert aten.einsum.default in targets(canon) and aten.where.ScalarOther in targets(canon)
    assert aten.masked_fill.Scalar not in targets(canon) and aten.matmul.default not in targets(canon)
    torch.testing.assert_close(run(canon, inputs), fn(q4, k4, m))


def test_source_locations_survive_tracing():
    def fn(q, k):
        return q @ k.transpose(-2, -1)

    gm, inputs = capture(fn, q4, k4)
    traced = trace_pre_dispatch(gm, inputs)
    normalize_contractions(traced)
    (node,) = [n for n in traced.graph.nodes if n.target is aten.einsum.default]
    assert "test_canonicalize.py" in node.meta.get("stack_trace", "")


def _generic_scan(a, b):
    from torch._higher_order_ops.associative_scan import associative_scan

    def combine(left, right):
        return left[0] * right[0], right[0] * left[1] + right[1]

    return associative_scan(combine, (a, b), dim=1, combine_mode="generic")[1].sum(-1)


def _functorch_calls(gm):
    return [n for n in gm.graph.nodes if n.op == "call_function" and "functorch" in (n.target.__module__ or "")]


def test_noop_vmaps_are_removed_before_tracing():
    # Dynamo inlines associative_scan(combine_mode="generic") as vmapped odd/even steps of an
    # elementwise combine at one batch axis: batching is the identity, so the levels are removed
    a, b = torch.rand(2, 8, 3), torch.randn(2, 8, 3)
    gm, inputs = capture(_generic_scan, a, b)
    before = len(gm.graph.nodes)
    assert _functorch_calls(gm)
    traced = trace_pre_dispatch(gm, inputs)
    assert not _functorch_calls(traced) and not [n for n in traced.graph.nodes if n.op == "get_attr"]
    torch.testing.assert_close(run(traced, [a, b]), _generic_scan(a, b), rtol=0, atol=0)
    assert len(gm.graph.nodes) == before and _functorch_calls(gm)     # Dynamo's graph is not changed


@pytest.mark.parametrize("name", ["matmul", "broadcast", "captured", "out_dim"])
def test_other_vmaps_stay_untraceable(name):
    from seqfuse.compiler.canonicalize import Untraceable

    w, v0 = torch.randn(4, 4), torch.randn(3, 4)
    x, y = torch.randn(5, 3, 4), torch.randn(5, 4)
    fn, args, reason = {
        "matmul": (lambda x: torch.vmap(lambda r: r @ w)(x), (x,), "not elementwise"),
        "broadcast": (lambda x, y: torch.vmap(lambda u, v: u * v)(x, y), (x, y), "differ in shape"),
        # a captured (unbatched) tensor: refused even where broadcasting would agree
        "captured": (lambda x: torch.vmap(lambda u: u * v0)(x), (x,), "not batched"),
        "out_dim": (lambda x: torch.vmap(lambda u: u + 1, out_dims=1)(x), (x,), "batch axis"),
    }[name]
    gm, inputs = capture(fn, *args)
    with pytest.raises(Untraceable, match="torch.func transforms") as info:
        trace_pre_dispatch(gm, inputs)
    assert reason in str(info.value)
    report = seqfuse.explain(fn, *args, options={"downstream": "aot_eager"})
    assert [m.kind for m in report.near_misses] == ["graph"], str(report)
    torch.testing.assert_close(report.output, fn(*args))


def test_masked_fill_that_overflows_its_dtype_is_kept():
    """fp16 masked_fill(-1e9) raises in eager ("cannot be converted to Half"); as a where it would
    round the fill to -inf and return a tensor: the masked_fill stays, and so does the error."""
    def fn(s, m):
        return s.masked_fill(m, -1e9)

    for dtype, kept in ((torch.float16, True), (torch.float32, False)):
        torch._dynamo.reset()
        graphs = []

        def backend(gm, example_inputs):
            graphs.append((gm, example_inputs))
            return gm.forward
        try:
            torch.compile(fn, backend=backend, fullgraph=True)(torch.randn(2, 4, 4, dtype=dtype), m2[:4, :4])
        except RuntimeError as exc:  # the fp16 program raises when it runs; its graph is captured first
            assert dtype == torch.float16 and "Half" in str(exc)
        (gm, inputs), = graphs
        traced = trace_pre_dispatch(gm, inputs)
        assert normalize_masks(traced) == (0 if kept else 1)
        assert (aten.masked_fill.Scalar in targets(traced)) == kept, format_graph(traced.graph)


# --- in-place ops on temporaries ---------------------------------------------------------------------

def _inplace_cases():
    a, b = torch.randn(3, 4), torch.randn(3, 4)

    def temp_add(a, b):
        s = a * 2
        s += b.exp()
        return s * 3

    def temp_fill(a, b):
        s = a * b
        s.masked_fill_(b > 0, 0.0)
        return s.sum(-1)

    def view_add(a, b):            # the target is a view of a: a changes too
        s = a * 2
        v = s[0]
        v += b[0]
        return s

    def read_twice(a, b):          # the temporary is read again after the write (through s itself)
        s = a * 2
        t = s + 1
        s += b
        return s, t

    def promotes(a, b):            # fp32 += fp64 stays fp32 in place; out of place it would promote
        s = a * 2
        s += b.double()
        return s

    def input_add(a, b):           # an input is not a temporary
        a += b
        return a * 1
    return a, b, [(temp_add, 1), (temp_fill, 1), (view_add, 0), (read_twice, 0), (promotes, 0), (input_add, 0)]


@pytest.mark.parametrize("case", range(6))
def test_inplace_on_a_temporary_becomes_out_of_place(case):
    from seqfuse.compiler.canonicalize import normalize_inplace
    a, b, cases = _inplace_cases()
    fn, expected = cases[case]
    gm, inputs = capture(fn, a.clone(), b.clone())
    traced = trace_pre_dispatch(gm, inputs)
    assert normalize_inplace(traced) == expected
    mutating = [t for t in targets(traced) if isinstance(t, torch._ops.OpOverload) and t._schema.is_mutable]
    assert bool(mutating) == (expected == 0), targets(traced)
    ref = fn(*[x.clone() for x in inputs])     # (the capture ran fn on them: input_add changed its a)
    got = traced(*[x.clone() for x in inputs])
    ref, got = (ref if isinstance(ref, tuple) else (ref,)), (got if isinstance(got, (tuple, list)) else (got,))
    for r, g in zip(ref, got):
        assert r.dtype == g.dtype and torch.equal(r, g)


def _dt_proj(w, x, b, z):
    # HF Mamba's time-step projection: W @ x.transpose(1, 2) is contiguous (B, D, T) memory, the
    # einsum it becomes a permuted (D, B, T) product; softplus's backward then meets a layout its
    # meta function and its kernel lay out differently
    t = w @ x.transpose(1, 2)
    return (torch.nn.functional.softplus(t + b[:, None]) * z).sum()


def _dt_proj_inputs():
    torch.manual_seed(0)
    return (torch.randn(64, 2, requires_grad=True), torch.randn(2, 16, 2, requires_grad=True),
            torch.randn(64, requires_grad=True), torch.randn(2, 64, 16))


def test_an_unconsumed_einsum_gets_the_users_layout_back():
    from seqfuse.compiler.canonicalize import restore_layouts
    gm, inputs = capture(_dt_proj, *_dt_proj_inputs())
    traced = canonicalize(gm, inputs)
    einsum = [n for n in traced.graph.nodes if n.target is aten.einsum.default]
    assert len(einsum) == 1
    assert restore_layouts(traced) == 1
    (copy,) = einsum[0].users
    assert copy.target is aten.clone.default and copy.kwargs["memory_format"] is torch.contiguous_format
    assert restore_layouts(traced) == 0        # the einsum's one user is the copy: nothing left to restore
    torch.testing.assert_close(run(traced, inputs), run(gm, inputs))


def test_a_contiguous_einsum_gets_no_copy():
    from seqfuse.compiler.canonicalize import restore_layouts
    gm, inputs = capture(lambda a, b: torch.softmax(a @ b.transpose(-1, -2), -1), q4, k4)
    traced = canonicalize(gm, inputs)
    assert aten.einsum.default in targets(traced)
    assert restore_layouts(traced) == 0 and aten.clone.default not in targets(traced)


@pytest.mark.parametrize("passes", [[], None], ids=["no_passes", "default_passes"])
def test_aot_eager_backward_under_dynamic_shapes_with_the_canonical_layout(passes):
    # before restore_layouts: "view size is not compatible with input tensor's size and stride" in
    # aot_eager's backward (plain aot_eager, which sees the matmul, runs)
    ref = _dt_proj_inputs()
    _dt_proj(*ref).backward()
    got = _dt_proj_inputs()
    options = {"downstream": "aot_eager"} | ({} if passes is None else {"passes": passes})
    torch._dynamo.reset()
    compiled = torch.compile(_dt_proj, backend="seqfuse", dynamic=True, options=options)
    out = compiled(*got)
    out.backward()
    torch.testing.assert_close(out, _dt_proj(*ref).detach())
    for a, b in zip(got[:3], ref[:3]):
        torch.testing.assert_close(a.grad, b.grad)


# --- per-step pieces: unbind / split / narrow -----------------------------------------------

def pieces_program(x):
    a, b, c = x.unbind(1)                 # (select 0, 1, 2)
    p, r = x.split(2, 2)                  # (slice 0:2, 2:3 on a length-3 axis)
    n = x.narrow(2, 1, 1)
    return a * 2 + b.exp() + c, p.sum(-1) + r[..., 0], n


def test_unbind_split_and_narrow_pieces_become_selects_and_slices():
    x = torch.randn(2, 3, 3)
    gm, inputs = capture(pieces_program, x)
    canon = canonicalize(gm, inputs)
    ts = targets(canon)
    assert aten.unbind.int not in ts and aten.split.Tensor not in ts and aten.narrow.default not in ts, ts
    selects = [n.args[1:] for n in canon.graph.nodes if n.target is aten.select.int]
    slices = [n.args[1:] for n in canon.graph.nodes if n.target is aten.slice.Tensor]
    # unbind's pieces: selects; split's piece of 2: a slice; pieces of one step (split's last, the narrow):
    # unsqueeze(select), the per-step slice whose unit axis contractions fold away
    assert {(1, 0), (1, 1), (1, 2), (2, 2), (2, 1)} <= set(selects), selects
    assert slices == [(2, 0, 2)], slices
    unit = [n for n in canon.graph.nodes if n.target is aten.unsqueeze.default and n.args[0].target is aten.select.int]
    assert sorted(n.args[0].args[1:] for n in unit) == [(2, 1), (2, 2)], unit
    for got, want in zip(canon(*inputs), pieces_program(x)):
        assert torch.equal(got, want)
    # each unbind / split piece sits right before its first use (so a loop's steps read their own slices)
    order = {n: i for i, n in enumerate(canon.graph.nodes)}
    split_unit = [n for n in unit if n.args[0].args[1:] == (2, 2)]      # (the narrow stays where it was)
    pieces = [n for n in canon.graph.nodes if (n.target is aten.select.int and n.args[1] == 1)
              or (n.target is aten.slice.Tensor and n.args[1:] == (2, 0, 2)) or n in split_unit]
    assert len(pieces) == 5
    for n in pieces:
        assert order[min(n.users, key=order.__getitem__)] == order[n] + 1, n



def test_block_slices_become_selects_of_chunks_and_a_ragged_block_stays_a_slice():
    from seqfuse.compiler.canonicalize import block_slices

    def blocks(x):
        return x[:, 0:4] * 1 + x[:, 4:8] * 2, x[:, 8:10].sum(), x[:, 1:3]      # 2 blocks, a tail, another slice

    x = torch.randn(2, 10, 3)
    gm, inputs = capture(blocks, x)
    traced = trace_pre_dispatch(gm, inputs)
    assert block_slices(traced) == 2, format_graph(traced.graph)
    text = format_graph(traced.graph)
    assert "aten.reshape(%slice_tensor, [2, 2, 4, 3])" in text or "[2, 2, 4, 3]" in text, text
    assert text.count("aten.select.int(") == 2, text
    assert "aten.slice.Tensor(%l_x_, 1, 8, 10)" in text and "aten.slice.Tensor(%l_x_, 1, 1, 3)" in text, text
    for got, want in zip(traced(*inputs), blocks(x)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_block_slices_leave_written_tensors_and_single_blocks_alone():
    from seqfuse.compiler.canonicalize import block_slices

    def written(x):
        y = x.clone()
        y[:, 0:4] += 1
        return y[:, 0:4] + y[:, 4:8]

    def one_block(x):
        return x[:, 0:4] + x[:, 8:12]                   # [4, 8) missing: no run of blocks

    x = torch.randn(2, 12, 3)
    for fn in (written, one_block):
        gm, inputs = capture(fn, x)
        traced = trace_pre_dispatch(gm, inputs)
        assert block_slices(traced) == 0, format_graph(traced.graph)


class _Decays(torch.nn.Module):
    """A rate per head and decay tables built from it, as MiniMax keeps them (buffers)."""

    def __init__(self, perturb=False, table=None):
        super().__init__()
        rate = torch.tensor([0.5, 0.25, 0.125])[:, None, None]
        pos = torch.arange(6) + 1
        self.register_buffer("rate", rate)
        q = torch.exp(-rate * pos[:, None])
        d = rate * (pos[:, None] - pos[None, :])
        d = torch.exp(torch.where(d >= 0, -d, float("-inf")))
        if perturb:
            q[1, 2, 0] = torch.nextafter(q[1, 2, 0], torch.tensor(1.0))     # one ulp off: not the expression
        self.register_buffer("q_decay", q if table is None else table)
        self.register_buffer("diag", d)

    def forward(self, x):                                # x (3, 6, 6); the rate is read too, as MiniMax does
        return x * self.q_decay + x * self.diag[:, :4, :4].sum() + x * torch.exp(-self.rate * 6)


@pytest.mark.parametrize("perturb", [False, True], ids=["exact", "one_ulp_off"])
def test_decay_buffers_are_read_back_as_their_expressions_bit_for_bit(perturb):
    m = _Decays(perturb=perturb)
    x = torch.randn(3, 6, 6)
    report = seqfuse.explain(m, x, options={"downstream": "eager"})
    torch.testing.assert_close(report.output, m(x), rtol=0, atol=0)
    guards = sorted(g for graph in report.graphs for g in graph.guards)
    # the sliced diagonal table is always a power of the rate; the query table only when it is exact
    want = ["l_self_buffers_diag_", "l_self_buffers_rate_"] + ([] if perturb else ["l_self_buffers_q_decay_"])
    assert guards == sorted(want), guards


def test_a_positive_table_that_is_no_power_of_a_rate_is_left_alone():
    m = _Decays(table=torch.rand(3, 6, 1) + 0.1)
    m.diag = torch.rand(3, 6, 6)
    x = torch.randn(3, 6, 6)
    report = seqfuse.explain(m, x, options={"downstream": "eager"})
    torch.testing.assert_close(report.output, m(x), rtol=0, atol=0)
    assert not [g for graph in report.graphs for g in graph.guards], str(report)


def test_block_slices_keep_random_programs_bit_for_bit():
    # random sets of slices of one tensor (blocks of a width, ragged ends, overlapping and unrelated
    # slices, another axis), read into one result: the rewritten graph gives the same bits
    import random
    from seqfuse.compiler.canonicalize import block_slices, normalize_slices
    rng = random.Random(0)
    rewritten = 0
    for case in range(30):
        shape = [2, rng.randint(4, 13), 3]
        d = rng.choice((1, -2)) if rng.random() < 0.8 else 2
        n = shape[d]
        width = rng.randint(2, 4)
        spans = [(k * width, min(n, (k + 1) * width)) for k in range((n + width - 1) // width)]
        spans += [tuple(sorted(rng.sample(range(n + 1), 2))) for _ in range(rng.randint(0, 2))]
        rng.shuffle(spans)
        narrow = [rng.random() < 0.3 for _ in spans]

        def fn(x, spans=spans, d=d, narrow=narrow):
            out = 0
            for k, (a, b) in enumerate(spans):
                piece = x.narrow(d, a, b - a) if narrow[k] else (x[:, a:b] if d % 3 == 1 else x[:, :, a:b])
                out = out + (piece * (k + 1)).sum()
            return out

        x = torch.randn(*shape)
        torch._dynamo.reset()
        gm, inputs = capture(fn, x)
        traced = trace_pre_dispatch(gm, inputs)
        normalize_slices(traced)
        want = run(traced, inputs)
        rewritten += block_slices(traced)
        traced.graph.lint()
        assert torch.equal(run(traced, inputs), want), (case, spans, d)
    assert rewritten >= 20, rewritten
