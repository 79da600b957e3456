"""RWKV-4's WKV (transformers' ``rwkv_linear_attention_cpu``, the loop with a running-maximum
stabilizer) is lifted to two scans, the numerator and the denominator of the ratio the stabilized
loop computes (seqfuse/passes/loop_stabilized.py).  The unstabilized form exponentiates the keys
and time_first on their own, so they (and the values) are read through ``seqfuse::within``: a call
outside the bounds runs the program as written.  Outputs and every gradient equal eager (the whole
model included); a changed copy of the loop is a near miss naming its running maximum."""
import pytest
import torch

import seqfuse
import seqfuse.runtime.dispatch as dispatch
from helpers import BOUND, check_against_eager, check_nans_against_eager, rel_err
from seqfuse.lowering.guards import within
from seqfuse.runtime import ProgramRequired

rwkv = pytest.importorskip("transformers.models.rwkv.modeling_rwkv")


def wkv(decay, first, k, v):
    return rwkv.rwkv_linear_attention_cpu(decay, first, k, v)[0]


def operands(T=16, C=5, seed=4):
    g = torch.Generator().manual_seed(seed)
    k, v = torch.randn(2, T, C, generator=g), torch.randn(2, T, C, generator=g)
    decay, first = torch.randn(C, generator=g), torch.randn(C, generator=g)
    return [x.requires_grad_() for x in (decay, first, k, v)]


def scans(report):
    return [r.ir for r in report.rewrites if r.kind == "scan"]


@pytest.mark.parametrize("T", [6, 16])
def test_wkv_is_two_scans(T):
    report = check_against_eager(wkv, *operands(T))
    assert len(scans(report)) == 2 and report.count("scan") == 2, str(report)
    assert not report.near_misses, str(report)
    assert sum(report.fallbacks.get("graph", {}).values()) == 0


def test_wkv_dynamic_batch_and_channels():
    report = check_against_eager(wkv, *operands(12, C=6), dynamic=True)
    assert report.count("scan") == 2, str(report)


@pytest.mark.parametrize("where,value", [("k", 50.0), ("k", -45.0), ("first", 40.0), ("k", float("nan")),
                                         ("v", 1e7), ("decay", float("nan"))])
def test_values_beyond_the_bounds_run_the_program(where, value):
    # e^{k + u} of a key of 50 overflows nothing in the program (it subtracts the running maximum
    # first); the unstabilized form would: the guard refuses the call and the graph runs as written
    ops = operands(16)
    i = {"decay": 0, "first": 1, "k": 2, "v": 3}[where]
    x = ops[i].detach().clone()
    x.view(-1)[3] = value
    ops[i] = x.requires_grad_()
    report, caught = check_nans_against_eager(wkv, ops, {})
    assert report.count("scan") == 2, str(report)
    assert sum(report.fallbacks["graph"].values()) == 1, report.fallbacks
    assert any("seqfuse.within" in m for m in caught), caught


def changed_wkv(time_decay, time_first, key, value):
    """rwkv_linear_attention_cpu with one piece changed: the output's key term leaves time_first out."""
    num = torch.zeros_like(key[:, 0])
    den = torch.zeros_like(key[:, 0])
    mx = torch.zeros_like(key[:, 0]) - 1e38
    time_decay = -torch.exp(time_decay)
    out = torch.zeros_like(key)
    for t in range(key.shape[1]):
        k, v = key[:, t], value[:, t]
        mo = torch.maximum(mx, k + time_first)
        e1, e2 = torch.exp(mx - mo), torch.exp(k - mo)          # changed: k, not k + time_first
        out[:, t] = (e1 * num + e2 * v) / (e1 * den + e2)
        ms = torch.maximum(mx + time_decay, k)
        e1, e2 = torch.exp(mx + time_decay - ms), torch.exp(k - ms)
        num, den, mx = e1 * num + e2 * v, e1 * den + e2, ms
    return out


def test_a_changed_copy_is_a_near_miss_naming_its_running_maximum():
    report = check_against_eager(changed_wkv, *operands(8))
    assert report.count("scan") == report.count("ssd") == 0, str(report)
    reasons = [m.reason for m in report.near_misses]
    assert any("aten.maximum" in r and "running maximum" in r for r in reasons), reasons


def test_rwkv_model_logits_and_every_gradient_equal_eager():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.RwkvConfig(vocab_size=64, hidden_size=32, attention_hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, context_length=64)
    model = transformers.RwkvForCausalLM(cfg)

    class Logits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = model

        def forward(self, ids):
            return self.m(ids, use_cache=False).logits
    report = check_against_eager(Logits(), torch.randint(0, 64, (2, 16)))
    assert report.count("scan") == 4, str(report)      # two a layer


def test_the_guard_called_directly_names_its_range():
    x = torch.tensor([0.5, -2.0, 3.0])
    assert torch.equal(within(x, -3.0, 3.0), x)
    with pytest.raises(ProgramRequired, match=r"outside \[-1, 1\]"):
        within(x, -1.0, 1.0)
    with pytest.raises(ProgramRequired):
        within(torch.tensor([float("nan")]), -1.0, 1.0)


def test_while_a_cuda_graph_is_captured_the_guard_poisons_instead_of_reading(monkeypatch):
    # reading the range check would end a CUDA graph capture: the guard multiplies its copy by
    # 1 + (0 or NaN) instead (the same mechanism as an ssd's finite_only check): in range the copy is
    # bit for bit the input, out of range every value is NaN (loud), and nothing is raised
    monkeypatch.setattr(dispatch, "_capturing", lambda t: True)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.tensor([0.5, -2.0, 3.0, -float("inf")], dtype=dtype)
        same = within(x, -float("inf"), 3.0)
        assert same.dtype == dtype and torch.equal(same, x)
        out = within(x, -1.0, 1.0)
        assert out.dtype == dtype and bool(out.isnan().all())


def plain_wkv(time_decay, time_first, key, value, start=-1e38):
    """rwkv_linear_attention_cpu without its casts to fp32: the stabilized loop in the inputs' own dtype,
    its running maximum starting at ``start`` (-1e38, which fp16 rounds to -inf)."""
    num, den = torch.zeros_like(key[:, 0]), torch.zeros_like(key[:, 0])
    mx = torch.zeros_like(key[:, 0]) + start
    w = -torch.exp(time_decay)
    out = torch.zeros_like(key)
    for t in range(key.shape[1]):
        k, v = key[:, t], value[:, t]
        mo = torch.maximum(mx, k + time_first)
        e1, e2 = torch.exp(mx - mo), torch.exp(k + time_first - mo)
        out[:, t] = (e1 * num + e2 * v) / (e1 * den + e2)
        ms = torch.maximum(mx + w, k)
        e1, e2 = torch.exp(mx + w - ms), torch.exp(k - ms)
        num, den, mx = e1 * num + e2 * v, e1 * den + e2, ms
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sixteen_bit_keys_that_fp16_cannot_exponentiate(dtype):
    # keys of 8 to 14: e^k overflows fp16 (e^11.1 > 65504) though the program never forms it, so the
    # linear form runs in fp32 and casts its outputs back; judged against the fp64 program (eager's
    # 16-bit rounding is the larger error), outputs and every gradient, all finite
    g = torch.Generator().manual_seed(7)
    k = torch.rand(2, 12, 5, generator=g, dtype=torch.float64) * 6 + 8
    v, decay, first = torch.randn(2, 12, 5, generator=g, dtype=torch.float64), \
        torch.randn(5, generator=g, dtype=torch.float64), torch.randn(5, generator=g, dtype=torch.float64)
    low = [x.to(dtype).requires_grad_() for x in (decay, first, k, v)]
    wide = [x.detach().double().requires_grad_() for x in low]
    report = seqfuse.explain(plain_wkv, *low, options={"downstream": "aot_eager"})
    assert report.count("scan") == 2, str(report)
    assert sum(report.fallbacks.get("graph", {}).values()) == 0, report.fallbacks
    out, ref = report.output, plain_wkv(*wide)
    assert out.dtype == dtype and bool(out.isfinite().all())
    bound = 4 * BOUND[dtype]
    assert rel_err(out, ref) < bound, rel_err(out, ref)
    dy = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(out, low, dy.to(dtype))
    want = torch.autograd.grad(ref, wide, dy)
    for name, a, b in zip(("decay", "first", "k", "v"), got, want):
        assert bool(a.isfinite().all()) and rel_err(a, b) < bound, (name, rel_err(a, b))


def test_a_maximum_starting_above_the_keys_is_left_alone():
    # from M = 0 the program's first e^{k+u-M} underflows for keys far below 0 (0 / 0 = NaN) where the
    # linear form would give v: the loop stays as written, with its near miss
    def from_zero(time_decay, time_first, key, value):
        return plain_wkv(time_decay, time_first, key, value, start=0.0)
    ops = operands(8)
    with torch.no_grad():
        ops[2][0, 0, 1] = -29.0
        ops[1][1] = -29.0              # e^{-58} at the first step: fine in fp32, but not rewritten
    report = check_against_eager(from_zero, *ops)
    assert report.count("scan") == 0, str(report)
    assert any("running maximum" in m.reason for m in report.near_misses), str(report)


def _lowered(report) -> str:
    lowered = [p for p in report.dumps if p.endswith("_lowered.txt")]
    assert lowered, report.dumps
    return open(lowered[-1]).read()


def test_a_returned_final_state_is_rebuilt_from_the_linear_form(tmp_path):
    # transformers returns (num, den, max) with use_cache=True: num_T = N_T·e^{-M_T}, den_T = D_T·e^{-M_T}
    # with M_T one reduction over the keys (the closed form of the chain of maxima); no step of the
    # stabilized loop is left (one maximum in the lowered graph, where the loop has two a step)
    def with_state(decay, first, k, v):
        out, state = rwkv.rwkv_linear_attention_cpu(decay, first, k, v, return_state=True)
        return (out, *state)
    report = check_against_eager(with_state, *operands(12), options={"dump_dir": str(tmp_path)})
    assert report.count("scan") == 2 and not report.near_misses, str(report)
    assert _lowered(report).count("aten.maximum(") == 1


def given_state(seed=5, m0=None):
    g = torch.Generator().manual_seed(seed)
    n0, d0 = torch.randn(2, 5, generator=g), torch.rand(2, 5, generator=g) + 0.5
    m0 = torch.randn(2, 5, generator=g) * 3 if m0 is None else torch.full((2, 5), m0)
    return [x.requires_grad_() for x in (n0, d0, m0)]


def from_state(decay, first, k, v, n0, d0, m0):
    out, state = rwkv.rwkv_linear_attention_cpu(decay, first, k, v, state=[n0, d0, m0], return_state=True)
    return (out, *state)


def test_a_given_state_starts_the_linear_form():
    # a state passed in (a later chunk of a sequence): N0 = num0·e^{M0}, D0 = den0·e^{M0}; outputs, the
    # returned state and the gradients of all seven operands (the given state's included) equal eager
    report = check_against_eager(from_state, *operands(12), *given_state())
    assert report.count("scan") == 2 and not report.near_misses, str(report)
    assert sum(report.fallbacks.get("graph", {}).values()) == 0, report.fallbacks


@pytest.mark.parametrize("m0", [40.0, float("nan")])
def test_a_given_state_beyond_the_bounds_runs_the_program(m0):
    # e^{M0} of a start of 40 would leave the guards' margin: the call runs the program as written
    report, caught = check_nans_against_eager(from_state, [*operands(12), *given_state(m0=m0)], {})
    assert report.count("scan") == 2, str(report)
    assert sum(report.fallbacks["graph"].values()) == 1, report.fallbacks
    assert any("seqfuse.within" in m for m in caught), caught


def test_a_state_read_before_the_last_step_leaves_the_loop_as_written(tmp_path):
    # num after step 3 read outside the loop: the stabilized loop would have to run anyway
    def peek(time_decay, time_first, key, value):
        num, den = torch.zeros_like(key[:, 0]), torch.zeros_like(key[:, 0])
        mx = torch.zeros_like(key[:, 0]) - 1e38
        w = -torch.exp(time_decay)
        outs, seen = [], None
        for t in range(key.shape[1]):
            k, v = key[:, t], value[:, t]
            mo = torch.maximum(mx, k + time_first)
            e1, e2 = torch.exp(mx - mo), torch.exp(k + time_first - mo)
            outs.append((e1 * num + e2 * v) / (e1 * den + e2))
            ms = torch.maximum(mx + w, k)
            e1, e2 = torch.exp(mx + w - ms), torch.exp(k - ms)
            num, den, mx = e1 * num + e2 * v, e1 * den + e2, ms
            if t == 3:
                seen = num
        return torch.stack(outs, 1), seen
    report = check_against_eager(peek, *operands(12), options={"dump_dir": str(tmp_path)})
    assert report.count("scan") == 0, str(report)
    assert any("before its last step" in m.reason for m in report.near_misses), str(report)
    assert "within" not in _lowered(report), "a guard (the linear form) was left beside the loop"


def test_rwkv_model_with_use_cache_lifts_every_layer():
    # use_cache=True (transformers' default in eval): each layer reads its state from slices of five
    # buffers the model allocates (zeros; the maxima at -1e30) and writes its final state back into them.
    # The per-layer slices of those buffers form runs across layers that overlap every layer's loop:
    # loops lifts the loops of one length on their own (loops._by_length).  Under no_grad: with
    # gradients, aot_eager (downstream) itself fails on this model's in-place state writes (torch 2.13)
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.RwkvConfig(vocab_size=64, hidden_size=32, attention_hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, context_length=64)
    model = transformers.RwkvForCausalLM(cfg).eval()

    def logits_and_state(ids):
        out = model(ids, use_cache=True)
        return (out.logits, *out.state)
    ids = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        report = seqfuse.explain(logits_and_state, ids, options={"downstream": "aot_eager"})
        want = logits_and_state(ids)
    assert report.count("scan") == 4 and not report.near_misses, str(report)
    for i, (a, b) in enumerate(zip(report.output, want)):
        assert rel_err(a, b) < BOUND[torch.float32], (i, rel_err(a, b))


def test_one_dominant_key_keeps_every_gradient_as_accurate_as_eager():
    # keys from -20.9 to 16.8 in one channel (fuzz: scan_loop_rwkv4, case seed 705442991): in fp32 the
    # linear form's backward cancels terms of size e^k and time_decay's gradient came out 7.1e-5 off
    # the fp64 program, eager's 9.4e-7; in fp64 (loop_stabilized) it is more accurate than eager's
    keys = [-4.99, 2.19, -13.12, -5.07, 5.64, 15.95, 8.92, -2.70, 1.85, -18.07, -2.08, 16.76, -12.84, 6.80,
            7.12, -20.89]
    g = torch.Generator().manual_seed(0)
    k = torch.tensor(keys, dtype=torch.float64).view(1, 16, 1)
    v, w = torch.randn(1, 16, 1, generator=g, dtype=torch.float64), torch.randn(1, 16, 1, generator=g, dtype=torch.float64)
    decay, first = torch.tensor([0.3836], dtype=torch.float64), torch.tensor([0.1789], dtype=torch.float64)
    wide = [x.clone().requires_grad_() for x in (decay, first, k, v)]
    low = [x.float().requires_grad_() for x in (decay, first, k, v)]
    plain = [x.float().requires_grad_() for x in (decay, first, k, v)]
    report = seqfuse.explain(wkv, *low, options={"downstream": "aot_eager"})
    assert report.count("scan") == 2, str(report)
    got = torch.autograd.grad((report.output * w.float()).sum(), low)
    eager = torch.autograd.grad((wkv(*plain) * w.float()).sum(), plain)
    exact = torch.autograd.grad((wkv(*wide) * w).sum(), wide)
    for name, a, b, c in zip(("decay", "first", "k", "v"), got, eager, exact):
        err = lambda x: ((x.double() - c).abs().max() / c.abs().max()).item()  # noqa: E731
        assert err(a) <= 4 * err(b) + 256 * 2.0 ** -24, (name, err(a), err(b))
