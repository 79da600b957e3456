"""The triton attention kernels against the reference: forward, lse and every gradient.

Without CUDA the kernels run on CPU tensors through the Triton interpreter
(TRITON_INTERPRET=1, set for each test by tests/kernels/conftest.py), at small
shapes; with CUDA the same tests run compiled, and the ``gpu`` tests run at
real shapes.
Errors are relative RMS errors with per-dtype bounds for a single kernel.
"""
import math

import pytest
import torch

triton = pytest.importorskip("triton")

import seqfuse  # noqa: E402
from seqfuse.lowering.reference.attention import attention_reference  # noqa: E402
from seqfuse.lowering.triton import attention as ta  # noqa: E402
from seqfuse.lowering.triton import common as triton_common  # noqa: E402
from kernel_checks import compile_offline  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# relative RMS error bounds of one kernel against the fp32 reference (never widened to pass)
KBOUND = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
# the interpreter's numpy reports 0/0 and log(0) of padded / empty rows; those are intended
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")]

ATTRS = dict(scale=None, mask="none", diag=0, window=0, fill=-math.inf, bias_after_mask=False, gqa_groups=1,
             softcap=None, dropout=0.0, empty_rows="nan")


def attrs(**kw):
    a = dict(ATTRS)
    a.update(kw)
    return a


def rel_err(out, ref):
    """Relative RMS error over the entries that are finite in the reference; NaN/inf must agree exactly."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out.shape == ref.shape, f"shape {tuple(out.shape)} vs reference {tuple(ref.shape)}"
    bad_ref, bad_out = ~torch.isfinite(ref), ~torch.isfinite(out)
    assert torch.equal(bad_ref, bad_out), \
        f"non-finite entries differ: {int((bad_ref ^ bad_out).sum())} of {ref.numel()}"
    assert torch.equal(ref[bad_ref].nan_to_num(), out[bad_out].nan_to_num()), "infinities differ"
    out, ref = out.masked_fill(bad_out, 0), ref.masked_fill(bad_ref, 0)
    den = ref.norm().item()
    return (out - ref).norm().item() / (den if den > 0 else 1.0)


def make(shape, dtype, layout="bhld", requires_grad=False):
    """A (B, H, L, D) tensor; layout "blhd" gives a transposed view of a (B, L, H, D) buffer."""
    if layout == "blhd" and len(shape) == 4:
        b, h, l, d = shape
        x = torch.randn(b, l, h, d, device=DEVICE).to(dtype).transpose(1, 2)
    else:
        x = torch.randn(shape, device=DEVICE).to(dtype)
    return x.requires_grad_(requires_grad)


def check(q, k, v, bias=None, keep=None, *, need_dbias=None, **kw):
    """Run the triton forward/backward and the reference (autograd) on the same inputs; assert that
    out, lse, dq, dk, dv (and dbias, by default whenever there is a bias) agree."""
    a = attrs(**kw)
    t = dict(q=q, k=k, v=v, bias=bias, keep=keep)
    reason = ta.supports(t, a)
    assert reason is None, reason
    bound = KBOUND[q.dtype]
    need_dbias = bias is not None and bias.is_floating_point() if need_dbias is None else need_dbias
    # reference, with autograd
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    # the kernels add a 16-bit bias to fp32 scores; the op's reference rounds s + bias to the bias's
    # dtype as the program does (supports() bounds the difference): the kernels are checked against
    # the computation they implement, the reference with the bias widened to fp32
    rb = bias.detach().clone() if bias is not None else None
    if rb is not None and rb.dtype in (torch.float16, torch.bfloat16):
        rb = rb.float()
    rb = rb.requires_grad_(need_dbias) if rb is not None else None
    ref_out, ref_lse = attention_reference(*leaves, rb, keep, return_lse=True, **a)
    # kernels
    out, lse = ta.forward(q, k, v, bias, keep, a)
    assert out.dtype == v.dtype and lse.dtype == torch.float32
    e = rel_err(out, ref_out)
    assert e < bound, f"out: relative error {e:.3g} >= {bound:g}"
    e = rel_err(lse, ref_lse)
    assert e < KBOUND[torch.float32], f"lse: relative error {e:.3g}"  # fp32 for every input dtype
    g = torch.randn_like(ref_out)
    inputs = leaves + ([rb] if need_dbias else [])
    ref_grads = torch.autograd.grad(ref_out, inputs, g, allow_unused=True)
    got = ta.backward(g, q, k, v, bias, keep, out, lse, None, dict(a, need_dbias=need_dbias))
    names = ["dq", "dk", "dv", "dbias"]
    for name, x, r, y in zip(names, [q, k, v, bias], ref_grads, got):
        if r is None:
            r = torch.zeros_like(x)
        assert y.shape == x.shape and y.dtype == x.dtype, f"{name}: {tuple(y.shape)} {y.dtype}"
        e = rel_err(y, r)
        assert e < bound, f"{name}: relative error {e:.3g} >= {bound:g}"
    if not need_dbias:
        assert got[3].numel() == 0


# --- mask kinds ----------------------------------------------------------------

@pytest.mark.parametrize("mask,diag,window,lq,lk", [
    ("none", 0, 0, 33, 33),
    ("causal", 0, 0, 33, 33),
    ("causal", 7, 0, 33, 40),        # bottom-right aligned: diag = Lk - Lq
    ("causal", 3, 0, 7, 64),
    ("causal", -5, 0, 33, 33),       # rows 0..4 see no key: NaN rows, as the reference
    ("window", 0, 5, 33, 33),
    ("window", 7, 16, 33, 40),
    ("window", -2, 3, 33, 33),       # empty rows at the top
    # several tiles the mask allows whole (the forward's FULL runs) between edge and diagonal tiles
    ("causal", 0, 0, 100, 100),
    ("causal", 20, 0, 80, 100),
    ("window", 0, 45, 100, 100),
])
def test_structural_masks(mask, diag, window, lq, lk):
    q = make((1, 2, lq, 16), torch.float32)
    k = make((1, 2, lk, 16), torch.float32)
    v = make((1, 2, lk, 16), torch.float32)
    check(q, k, v, mask=mask, diag=diag, window=window)


# Offsets that put a mask boundary exactly on a tile edge of the interpreter's tiles
# (16 / 32 rows and keys): an off-by-one in the block-skipping bounds changes the result here.
@pytest.mark.parametrize("mask,diag,window", [
    ("causal", 1, 0), ("causal", 17, 0), ("causal", -15, 0),
    ("window", 0, 2), ("window", 1, 1), ("window", 17, 17), ("window", 7, 9),
])
def test_tile_edges(mask, diag, window):
    q, k, v = (make((1, 1, 64, 16), torch.float32) for _ in range(3))
    check(q, k, v, mask=mask, diag=diag, window=window)


def test_empty_rows_give_nan_like_the_reference():
    q, k, v = (make((1, 2, 33, 16), torch.float32) for _ in range(3))
    out, lse = ta.forward(q, k, v, None, None, attrs(mask="causal", diag=-3))
    assert torch.isnan(out[:, :, :3]).all() and torch.isfinite(out[:, :, 3:]).all()
    assert (lse[:, :, :3] == -math.inf).all()


@pytest.mark.parametrize("shape", [(1, 1, 1, 40), (1, 2, 33, 40), (40,)])
def test_keep_mask(shape):
    q = make((1, 2, 33, 16), torch.float32)
    k = make((1, 2, 40, 16), torch.float32)
    v = make((1, 2, 40, 16), torch.float32)
    keep = torch.rand(shape, device=DEVICE) > 0.3
    keep[..., 0] = True
    check(q, k, v, keep=keep, mask="causal", diag=7)


def test_keep_mask_with_fully_masked_rows():
    q, k, v = (make((1, 2, 33, 16), torch.float32) for _ in range(3))
    keep = torch.rand(1, 2, 33, 33, device=DEVICE) > 0.5
    keep[:, :, 5] = False                     # row 5 attends nothing: NaN out, zero dq row, NaN dv
    check(q, k, v, keep=keep)
    check(q, k, v, keep=keep, mask="causal")


# (a bias constant along the key axis has zero gradient, so every shape here varies along it)
@pytest.mark.parametrize("shape", [(2, 2, 33, 40), (2, 1, 1, 40), (33, 40), (1, 2, 1, 40)])
def test_bias(shape):
    q = make((2, 2, 33, 16), torch.float32)
    k = make((2, 2, 40, 16), torch.float32)
    v = make((2, 2, 40, 16), torch.float32)
    bias = torch.randn(shape, device=DEVICE)
    check(q, k, v, bias=bias)


def test_bias_with_causal_and_keep_no_dbias():
    q, k, v = (make((1, 2, 33, 16), torch.float32) for _ in range(3))
    bias = torch.randn(1, 2, 33, 33, device=DEVICE)
    keep = torch.rand(1, 1, 33, 33, device=DEVICE) > 0.2
    check(q, k, v, bias=bias, keep=keep, mask="causal", need_dbias=False)


def test_bias_with_neg_inf_entries():
    q, k, v = (make((1, 2, 33, 16), torch.float32) for _ in range(3))
    bias = torch.randn(1, 2, 33, 33, device=DEVICE)
    bias[:, :, :, 20:] = -math.inf            # an additive padding mask
    bias[:, :, 4] = -math.inf                 # and one row that sees nothing
    check(q, k, v, bias=bias, mask="causal", need_dbias=False)


@pytest.mark.parametrize("case", ["structural", "keep", "bias"])
def test_empty_rows_zero(case):
    """empty_rows="zero": a row with every score -inf outputs 0 and passes no gradient (no NaN anywhere)."""
    q, k, v = (make((1, 2, 33, 16), torch.float32) for _ in range(3))
    kw = dict(empty_rows="zero", mask="causal", diag=-3)
    if case == "keep":
        keep = torch.rand(1, 2, 33, 33, device=DEVICE) > 0.3
        keep[:, :, 10] = False
        check(q, k, v, keep=keep, **kw)
    elif case == "bias":                       # the row statistics are recomputed (EXACT_STATS)
        bias = torch.randn(1, 2, 33, 33, device=DEVICE)
        bias[:, :, 12] = -math.inf
        check(q, k, v, bias=bias, need_dbias=False, **kw)
        check(q, k, v, bias=bias, need_dbias=False, bias_after_mask=True, **kw)
    else:
        check(q, k, v, **kw)
    out, _ = ta.forward(q, k, v, None, None, attrs(**kw))
    assert (out[:, :, :3] == 0).all() and torch.isfinite(out).all()


# --- fill semantics --------------------------------------------------------------

@pytest.mark.parametrize("bias_after_mask", [False, True])
@pytest.mark.parametrize("fill", [-5.0, torch.finfo(torch.float32).min])
def test_finite_fill(fill, bias_after_mask):
    q, k, v = (make((1, 2, 33, 16), torch.float32) for _ in range(3))
    bias = torch.randn(1, 2, 33, 33, device=DEVICE)
    check(q, k, v, bias=bias, mask="causal", diag=-2, fill=fill, bias_after_mask=bias_after_mask)


def test_finite_fill_fully_masked_rows_are_uniform():
    q, k, v = (make((1, 2, 33, 16), torch.float32) for _ in range(3))
    keep = torch.rand(1, 2, 33, 33, device=DEVICE) > 0.5
    keep[:, :, 3] = False
    check(q, k, v, keep=keep, fill=-1e4, mask="window", window=9)


def test_neg_inf_fill_bias_after_mask_with_empty_rows():
    q, k, v = (make((1, 2, 33, 16), torch.float32) for _ in range(3))
    bias = torch.randn(1, 2, 33, 33, device=DEVICE)
    check(q, k, v, bias=bias, mask="causal", diag=-3, bias_after_mask=True)


# --- GQA / MQA -----------------------------------------------------------------

@pytest.mark.parametrize("hk", [2, 1])
def test_gqa_mqa(hk):
    q = make((1, 4, 33, 16), torch.float32)
    k = make((1, hk, 40, 16), torch.float32)
    v = make((1, hk, 40, 16), torch.float32)
    check(q, k, v, gqa_groups=4 // hk, mask="causal", diag=7)


@pytest.mark.parametrize("limit", [5, 3, 1])
def test_batches_beyond_one_launch_grid(monkeypatch, limit):
    """batch · heads past the grid's second axis (65535 on CUDA; lowered here) is split into launches
    over ranges of batches: every slice's tensors, the last range ragged, dK/dV (kv heads) cut apart from
    dQ (query heads)."""
    monkeypatch.setattr(ta, "_MAX_GRID_Y", 4 * limit)
    launches = []
    kernels = ta._kernels()
    for name in ("attention_fwd", "attention_bwd_dq", "attention_bwd_dkdv"):
        kernel = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, _Counted(kernel, name, launches))
    q = make((5, 4, 21, 16), torch.float32)
    k, v = make((5, 2, 21, 16), torch.float32), make((5, 2, 21, 16), torch.float32)
    bias = torch.randn(5, 1, 21, 21, device=DEVICE)
    keep = torch.rand(5, 4, 1, 21, device=DEVICE) > 0.2
    keep[..., 0] = True
    sink = torch.randn(4, 1, device=DEVICE)
    check(q, k, v, bias=bias, keep=keep, gqa_groups=2, mask="causal", diag=3, sink=sink)
    parts = -(-5 // limit)
    assert launches.count("attention_fwd") == parts and launches.count("attention_bwd_dq") == parts
    assert launches.count("attention_bwd_dkdv") == -(-5 // (2 * limit))


class _Counted:
    """A kernel that records each launch's name, then launches."""

    def __init__(self, kernel, name, launches):
        self.kernel, self.name, self.launches = kernel, name, launches

    def __getitem__(self, grid):
        assert grid[1] <= ta._MAX_GRID_Y, grid
        self.launches.append(self.name)
        return self.kernel[grid]


def test_gqa_with_bias_and_keep():
    q = make((2, 4, 33, 16), torch.float32)
    k, v = make((2, 2, 33, 16), torch.float32), make((2, 2, 33, 16), torch.float32)
    bias = torch.randn(2, 1, 33, 33, device=DEVICE)
    keep = torch.rand(2, 1, 1, 33, device=DEVICE) > 0.3
    keep[..., 0] = True
    check(q, k, v, bias=bias, keep=keep, gqa_groups=2)


def test_kv_batch_broadcast():
    q = make((2, 2, 33, 16), torch.float32)
    k, v = make((1, 2, 33, 16), torch.float32), make((1, 2, 33, 16), torch.float32)
    check(q, k, v, mask="causal")


# --- dtypes, head dims, layouts, lengths ----------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mask", ["none", "causal"])
def test_half_dtypes(dtype, mask):
    q = make((1, 2, 33, 64), dtype)
    k = make((1, 2, 40, 64), dtype)
    v = make((1, 2, 40, 64), dtype)
    check(q, k, v, mask=mask, diag=7)


@pytest.mark.parametrize("d,dv", [(16, 16), (64, 64), (96, 96), (128, 128), (24, 40), (256, 200)])
def test_head_dims(d, dv):
    q = make((1, 2, 33, d), torch.float32)
    k = make((1, 2, 33, d), torch.float32)
    v = make((1, 2, 33, dv), torch.float32)
    check(q, k, v, mask="causal")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes_with_bias_keep_and_gqa(dtype):
    q = make((1, 4, 33, 64), dtype)
    k, v = make((1, 2, 40, 64), dtype), make((1, 2, 40, 64), dtype)
    bias = torch.randn(1, 4, 33, 40, device=DEVICE).to(dtype)
    keep = torch.rand(1, 1, 1, 40, device=DEVICE) > 0.2
    keep[..., 0] = True
    check(q, k, v, bias=bias, keep=keep, gqa_groups=2, mask="causal", diag=7)


def test_head_dim_96_half():
    q, k, v = (make((1, 2, 33, 96), torch.float16) for _ in range(3))
    check(q, k, v, mask="causal")


@pytest.mark.parametrize("lq,lk", [(1, 1), (1, 33), (7, 7), (64, 64), (33, 7)])
def test_lengths(lq, lk):
    q = make((1, 2, lq, 16), torch.float32)
    k = make((1, 2, lk, 16), torch.float32)
    v = make((1, 2, lk, 16), torch.float32)
    check(q, k, v, mask="causal", diag=lk - lq)


def test_blhd_strides():
    q = make((2, 2, 33, 16), torch.float32, layout="blhd")
    k = make((2, 2, 40, 16), torch.float32, layout="blhd")
    v = make((2, 2, 40, 16), torch.float32, layout="blhd")
    assert not q.is_contiguous()
    check(q, k, v, mask="causal", diag=7)
    # the kernel writes the output in the layout the op promises (contiguous), so the op returns it
    # without a copy
    from seqfuse.lowering.attention_op import empty_out
    out = ta.forward(q, k, v, None, None, attrs(mask="causal", diag=7))[0]
    assert out.stride() == empty_out(q, v).stride() and out.is_contiguous()
    # with out_transposed (the program only transposes the output back): (B, L, H, D) memory, the
    # same values
    out_t = ta.forward(q, k, v, None, None, {**attrs(mask="causal", diag=7), "out_transposed": True})[0]
    assert out_t.stride() == empty_out(q, v, True).stride() and out_t.transpose(1, 2).is_contiguous()
    assert torch.equal(out_t, out)


def test_rank3_inputs():
    q = make((2, 33, 16), torch.float32)
    k = make((2, 40, 16), torch.float32)
    v = make((2, 40, 16), torch.float32)
    check(q, k, v, mask="window", window=8, diag=7)


def test_scale():
    q, k, v = (make((1, 2, 33, 16), torch.float32) for _ in range(3))
    check(q, k, v, scale=0.37)


# --- softcap -----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_softcap(dtype):
    q, k, v = (make((1, 2, 33, 16), dtype) * 3 for _ in range(3))
    bias = torch.randn(1, 1, 33, 33, device=DEVICE)
    check(q, k, v, bias=bias, mask="causal", softcap=5.0)


# --- supports: what goes elsewhere, and why -----------------------------------------

def _reason(q=None, k=None, v=None, bias=None, keep=None, **kw):
    q = q if q is not None else make((1, 2, 8, 16), torch.float32)
    k = k if k is not None else make((1, 2, 8, 16), q.dtype)
    v = v if v is not None else make((1, 2, 8, 16), q.dtype)
    return ta.supports(dict(q=q, k=k, v=v, bias=bias, keep=keep), attrs(**kw))


def test_supports_accepts_a_plain_call():
    assert _reason() is None


@pytest.mark.parametrize("case,expected", [
    (dict(dropout=0.1), "dropout runs on the reference"),
    (dict(q=torch.randn(1, 1, 2, 8, 16)), "rank 5"),
    (dict(q=torch.randn(8, 16), k=torch.randn(8, 16), v=torch.randn(8, 16)), "rank 2"),
    (dict(q=torch.randn(1, 2, 8, 16, dtype=torch.float64)), "dtypes torch.float64"),
    (dict(k=torch.randn(1, 2, 8, 16, dtype=torch.float16)), "dtypes"),
    (dict(q=torch.randn(1, 2, 8, 512), k=torch.randn(1, 2, 8, 512)), "head dims"),
    (dict(v=torch.randn(1, 2, 8, 300)), "head dims"),
    (dict(k=torch.randn(1, 3, 8, 16), v=torch.randn(1, 3, 8, 16)), "k/v have 3 heads"),
    (dict(k=torch.randn(1, 1, 8, 16), v=torch.randn(1, 1, 8, 16), gqa_groups=4), "gqa_groups=4"),
    (dict(k=torch.randn(1, 2, 0, 16), v=torch.randn(1, 2, 0, 16)), "empty inputs"),
    (dict(keep=torch.ones(1, 2, 8, 8)), "keep dtype torch.float32"),
    (dict(bias=torch.zeros(1, 2, 8, 8, dtype=torch.int32)), "bias dtype"),
    (dict(bias=torch.zeros(3, 8, 8)), "does not broadcast"),
    (dict(mask="banded"), "mask kind"),
    # rank 3: every row of the first axis is a head of one batch entry, and one launch's grid takes 65535
    (dict(q=torch.randn(1, 8, 16).expand(65536, 8, 16), k=torch.randn(1, 8, 16).expand(65536, 8, 16),
          v=torch.randn(1, 8, 16).expand(65536, 8, 16)), "65536 heads in one batch entry"),
])
def test_supports_refusals(case, expected):
    kw = {n: case.pop(n) for n in list(case) if n not in ("q", "k", "v", "bias", "keep")}
    tensors = {n: x.to(DEVICE) for n, x in case.items()}
    reason = _reason(**tensors, **kw)
    assert reason is not None and expected in reason, reason


def test_supports_without_triton(monkeypatch):
    monkeypatch.setattr(triton_common, "triton_installed", lambda: False)
    assert _reason() == "triton is not installed"


def test_supports_interpreter_that_cannot_run(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("compiled kernels on CUDA do not use the interpreter")
    monkeypatch.setattr(triton_common, "interpreter_problem", lambda: "the triton 3.6 interpreter needs numpy < 2.4")
    assert _reason() == "the triton 3.6 interpreter needs numpy < 2.4"


def test_supports_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    q = torch.randn(1, 2, 8, 16)
    assert ta.supports(dict(q=q, k=q, v=q, bias=None, keep=None), attrs()) == \
        "tensors are on cpu and TRITON_INTERPRET is not set"


# --- through the custom op and the dispatcher ------------------------------------------

def test_runtime_triton_runs_the_kernels_and_auto_takes_them_only_on_cuda():
    import seqfuse.lowering.attention_op  # noqa: F401  (registers the implementations)
    from seqfuse.runtime import dispatch
    q, k, v = (make((1, 2, 33, 16), torch.float32) for _ in range(3))
    t, a = dict(q=q, k=k, v=v, bias=None, keep=None), attrs(mask="causal")
    assert dispatch.choose("attention", "triton", t, a).path == "triton"
    out, lse = dispatch.run("attention", "forward", "triton", t, a, q, k, v, None, None, a)
    assert seqfuse.counters()["attention"] == {"triton": 1, "cpu": 0, "aten": 0, "eager": 0}
    assert rel_err(out, attention_reference(q, k, v, mask="causal")) < KBOUND[torch.float32]
    seqfuse.reset_counters()
    if DEVICE == "cpu":
        # the interpreter is orders of magnitude slower than every other path: "auto" takes the next one
        # (TRITON_INTERPRET=1 is also what flash-linear-attention's import wants on a CPU machine)
        assert dispatch.choose("attention", "auto", t, a).path != "triton"
        assert any("interpreted" in r and r.startswith("triton: ") for r in seqfuse.fallbacks()["attention"])
    else:
        assert dispatch.choose("attention", "auto", t, a).path == "triton"
    # a call the kernels refuse goes on to the next path, with the reason recorded
    a = attrs(mask="causal", dropout=0.5)
    assert dispatch.choose("attention", "auto", t, a).path != "triton"
    assert any(r.startswith("triton: dropout") for r in seqfuse.fallbacks()["attention"])


def naive_causal(q, k, v):
    L = q.shape[-2]
    s = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    s = s.masked_fill(torch.triu(torch.ones(L, L, dtype=torch.bool, device=q.device), 1), float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def test_compiled_naive_attention_runs_on_triton():
    from helpers import check_against_eager
    q, k, v = (make((2, 2, 33, 16), torch.float32, requires_grad=True) for _ in range(3))
    report = check_against_eager(naive_causal, q, k, v, options={"runtime": "triton", "downstream": "aot_eager"},
                                 bound=KBOUND[torch.float32])
    assert report.count("attention") == 1
    assert seqfuse.counters()["attention"]["triton"] == 1
    assert seqfuse.counters()["attention_backward"]["triton"] == 1
    assert seqfuse.counters()["attention"]["eager"] == 0


class _BrokenKernel:
    """Stands in for a kernel whose compilation fails."""

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            import ast
            raise triton.CompilationError(None, ast.parse("pass").body[0], "injected: PTX assembly failed")
        return launch


def test_kernel_compile_error_falls_back_to_eager_with_a_warning(monkeypatch):
    from helpers import check_against_eager
    kernels = ta._kernels()
    monkeypatch.setattr(kernels, "attention_fwd", _BrokenKernel())
    q, k, v = (make((1, 2, 33, 16), torch.float32, requires_grad=True) for _ in range(3))
    with pytest.warns(UserWarning) as record:
        check_against_eager(naive_causal, q, k, v, options={"runtime": "triton", "downstream": "aot_eager"},
                            bound=KBOUND[torch.float32])
    messages = [str(w.message) for w in record]
    assert any(m.startswith("seqfuse.attention: triton raised CompilationError") and "injected" in m
               and "falling back to the eager reference" in m for m in messages), messages
    c = seqfuse.counters()
    assert c["attention"] == {"triton": 0, "cpu": 0, "aten": 0, "eager": 1}
    # the backward kernels still compile: they ran (on the eager forward's out and lse)
    assert c["attention_backward"]["triton"] == 1
    assert any("triton raised CompilationError" in r for r in seqfuse.fallbacks()["attention"])


# --- the compiled (GPU) path, checked without a GPU ---------------------------------------

_OFFLINE_COMPILE = r"""
import os
os.environ.pop("TRITON_INTERPRET", None)
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, compile
from seqfuse.lowering.triton import attention_kernels as K
assert not K.INTERPRETED
PTR = dict(Q="fp16", K="fp16", V="fp16", BIAS="fp32", KEEP="u8", OUT="fp16", LSE="fp32", DO="fp16",
           DELTA="fp32", STATS="fp32", DQ="fp16", DK="fp16", DV="fp16", DBIAS="fp32", SINK="fp16")
def signature(fn, consts):
    return {n: "constexpr" if n in consts else "*" + PTR[n] if n in PTR else
            "fp32" if n in ("scale", "fill", "softcap") else "i32" for n in fn.arg_names}
flags = dict(HEAD_DIM=64, HEAD_DIM_V=64, BLOCK_D=64, BLOCK_DV=64, GROUPS=2, MASK=2, HAS_BIAS=True, HAS_KEEP=True,
             BIAS_AFTER_MASK=False, NEG_INF_FILL=True, SOFTCAP=True, EMPTY_ZERO=True, DOT_PRECISION="tf32",
             DOT_FP32=False)
for fn, extra in [(K.attention_fwd, dict(BLOCK_M=128, BLOCK_N=64, HAS_SINK=True)),
                  (K.attention_bwd_dq, dict(BLOCK_M=64, BLOCK_N=32, NEED_DBIAS=True, EXACT_STATS=True,
                                            EXACT_DELTA=True, HAS_SINK=True)),
                  (K.attention_bwd_dkdv, dict(BLOCK_M=32, BLOCK_N=64, EXACT_STATS=True))]:
    consts = dict(flags, **extra)
    kernel = compile(ASTSource(fn=fn, signature=signature(fn, consts), constexprs=consts),
                     target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=2))
    assert ".entry " + fn.__name__ in kernel.asm["ptx"]
print("compiled")
"""


def test_kernels_compile_for_a_gpu_without_one(tmp_path):
    """The interpreter runs the kernels as Python; this compiles them (every optional flag on) for
    sm_90 down to a cubin, which needs no GPU, so compiled-mode errors show up in CI too."""
    compile_offline(_OFFLINE_COMPILE, tmp_path)


# --- real shapes on a GPU ----------------------------------------------------------

GPU_CASES = [
    # (B, H, Hkv, Lq, Lk, D, attributes)
    (2, 8, 8, 1024, 1024, 64, dict(mask="causal")),
    (2, 16, 4, 2048, 2048, 128, dict(mask="causal")),
    (1, 8, 1, 1000, 1536, 128, dict(mask="causal", diag=536)),
    (2, 8, 8, 1024, 1024, 64, dict(mask="window", window=256)),
    (1, 8, 2, 777, 777, 96, dict()),
    (1, 4, 4, 1024, 1024, 256, dict(mask="causal", softcap=30.0)),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,h,hk,lq,lk,d,kw", GPU_CASES)
def test_gpu_real_shapes(b, h, hk, lq, lk, d, kw, dtype, tmp_path, monkeypatch):
    monkeypatch.setenv("SEQFUSE_CACHE_DIR", str(tmp_path))
    q = make((b, h, lq, d), dtype, layout="blhd")
    k = make((b, hk, lk, d), dtype, layout="blhd")
    v = make((b, hk, lk, d), dtype, layout="blhd")
    check(q, k, v, gqa_groups=h // hk, **kw)


@pytest.mark.gpu
def test_gpu_autotuned_configs_are_stored_and_reused(tmp_path, monkeypatch):
    import json
    monkeypatch.setenv("SEQFUSE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(ta, "_CONFIGS", {})
    ta._CACHE.clear_memory()
    q, k, v = (make((1, 4, 512, 64), torch.float16) for _ in range(3))
    check(q, k, v, mask="causal", diag=3)
    entries = json.loads((tmp_path / "attention-configs.json").read_text())["entries"]
    kinds = sorted(json.loads(key)["kind"] for key in entries)
    assert kinds == ["attention.dkdv", "attention.dq", "attention.fwd"]
    # a new process (memory forgotten) reads the configs back instead of timing again
    monkeypatch.setattr(ta, "_CONFIGS", {})
    ta._CACHE.clear_memory()

    def no_timing(fn):
        raise AssertionError("autotuned again despite the on-disk cache")
    monkeypatch.setattr(ta, "time_cuda", no_timing)
    check(q, k, v, mask="causal", diag=3)


@pytest.mark.gpu
def test_gpu_fp32_bias_keep_dbias(tmp_path, monkeypatch):
    monkeypatch.setenv("SEQFUSE_CACHE_DIR", str(tmp_path))
    q, k, v = (make((2, 8, 512, 64), torch.float32) for _ in range(3))
    bias = torch.randn(2, 8, 512, 512, device=DEVICE)
    keep = torch.rand(2, 1, 1, 512, device=DEVICE) > 0.1
    keep[..., 0] = True
    check(q, k, v, bias=bias, keep=keep, mask="causal")
    check(q, k, v, bias=bias, mask="causal", fill=-1e4, bias_after_mask=True)


# --- attention sinks -------------------------------------------------------------------

@pytest.mark.parametrize("dtype,d,kw", [
    (torch.float32, 16, dict(mask="causal")),
    (torch.float32, 16, dict(mask="window", window=5, gqa_groups=2)),
    (torch.float32, 16, dict(mask="causal", diag=-4)),            # rows with no key: the sink takes all
    (torch.float32, 16, dict(mask="causal", fill=-1e4, bias=True)),  # EXACT_STATS recomputes with the sink
    (torch.bfloat16, 8, dict(mask="causal")),                       # EXACT_DELTA recomputes with the sink
    (torch.float16, 32, dict()),
])
def test_sinks(dtype, d, kw):
    """A per-head sink logit in every row's softmax: out, lse, dq, dk, dv against the reference (the
    sink as one more softmax column), and the sink's gradient from attention_op.sink_grad."""
    from seqfuse.lowering.attention_op import sink_grad
    kw = dict(kw)
    use_bias = kw.pop("bias", False)
    g = kw.get("gqa_groups", 1)
    q = make((2, 4, 21, d), dtype)
    k, v = make((2, 4 // g, 21, d), dtype), make((2, 4 // g, 21, d), dtype)
    sink = (torch.randn(4, 1, device=DEVICE) * 2).to(dtype)
    bias = torch.randn(21, 21, device=DEVICE) if use_bias else None
    a = attrs(sink=sink, **kw)
    assert ta.supports(dict(q=q, k=k, v=v, bias=bias, keep=None, sink=sink), a) is None
    bound = KBOUND[dtype]
    leaves = [x.detach().clone().requires_grad_(True) for x in (q, k, v, sink)]
    ref_out, ref_lse = attention_reference(*leaves[:3], bias, None, return_lse=True, **{**a, "sink": leaves[3]})
    out, lse = ta.forward(q, k, v, bias, None, a)
    assert rel_err(out, ref_out) < bound
    assert rel_err(lse, ref_lse) < KBOUND[torch.float32]
    assert torch.isfinite(lse).all()  # no row is empty with a sink
    go = torch.randn_like(ref_out)
    ref_grads = torch.autograd.grad(ref_out, leaves, go)
    got = ta.backward(go, q, k, v, bias, None, out, lse, None, dict(a, need_dbias=False))[:3]
    got = (*got, sink_grad(go, out, lse, sink, 0.0))
    for name, x, r, y in zip(["dq", "dk", "dv", "dsink"], (q, k, v, sink), ref_grads, got):
        assert y.shape == x.shape, name
        e = rel_err(y, r)
        assert e < bound, f"{name}: relative error {e:.3g} >= {bound:g}"


def test_sinks_are_refused_where_they_cannot_run():
    q = make((1, 2, 5, 8), torch.float32)
    t = dict(q=q, k=q, v=q, bias=None, keep=None, sink=torch.tensor([[math.nan], [0.0]]))
    assert "NaN or inf sink" in ta.supports(t, attrs(sink=t["sink"]))
    t["sink"] = torch.zeros(3, 1)
    assert "does not broadcast" in ta.supports(t, attrs(sink=t["sink"]))
