"""The triton long-convolution kernels (direct Toeplitz and four-step FFT) against the reference:
forward and every gradient, over kernel layouts, epilogues, dtypes and strides; what ``supports``
refuses; and a Hyena-style function compiled with seqfuse running on the triton path.

Without CUDA the kernels run on CPU tensors through the Triton interpreter
(TRITON_INTERPRET=1, set for each test by tests/kernels/conftest.py rather than at
import, so that the other test directories keep their CPU paths), at small shapes;
with CUDA the ``gpu`` tests run the compiled kernels at real shapes.
Errors are relative RMS errors against the fp32 reference with per-dtype bounds.
"""
import pytest
import torch

triton = pytest.importorskip("triton")

import seqfuse  # noqa: E402
from seqfuse.lowering.reference.long_conv import long_conv_reference  # noqa: E402
from seqfuse.lowering.triton import long_conv as tlc  # noqa: E402
from seqfuse.lowering.triton import common as triton_common  # noqa: E402
from kernel_checks import DEVICE, rel_err  # noqa: E402

# the interpreter's numpy: exp overflow in sigmoid of large |z| (the result is exact), and its scalar casts
pytestmark = [pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:Conversion of an array with ndim:DeprecationWarning")]

# relative RMS error bounds of the kernels against the fp32 reference (never widened to pass); fp16
# tighter than kernel_checks.BOUND
KBOUND = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def attrs(algorithm, scale=1.0, activation="none", causal=True):
    return dict(causal=causal, fft_size=0, scale=scale, activation=activation, algorithm=algorithm)


def rnd(*shape, dtype=torch.float32, std=1.0):
    return (torch.randn(*shape, device=DEVICE) * std).to(dtype)


def check(u, k, d=None, gate=None, *, algorithm, scale=1.0, activation="none", needs=None, grads=True,
          bound=None):
    """Triton forward/backward vs the reference (fp32, autograd) on the same inputs."""
    a = attrs(algorithm, scale, activation)
    t = dict(u=u, k=k, d=d, gate=gate)
    reason = tlc.supports(t, a)
    assert reason is None, reason
    dtype = torch.promote_types(u.dtype, k.dtype)
    bound = bound or KBOUND[dtype]
    # the oracle: fp32 copies of the (possibly low-precision) inputs.  Taps at s ≥ L reach no
    # output; the reference's FFT path wraps them around, so those cases use its direct algorithm
    ref_alg = "direct" if k.shape[-1] > u.shape[-1] else algorithm
    ops = [u, k, d, gate]
    needs = needs or [x is not None for x in ops]
    leaves = [x.detach().float().requires_grad_(n) if x is not None else None for x, n in zip(ops, needs)]
    ref = long_conv_reference(*leaves, **{**a, "algorithm": ref_alg})
    y = tlc.forward(u, k, d, gate, a)
    assert y.dtype == long_conv_reference(u, k, d, gate, **a).dtype
    e = rel_err(y, ref)
    assert e < bound, f"y: relative error {e:.3g} >= {bound:g}"
    if not grads:
        return
    g = torch.randn_like(ref).to(y.dtype)  # the upstream gradient comes in the output's dtype
    wanted = [x for x, n in zip(leaves, needs) if n]
    ref_grads = iter(torch.autograd.grad(ref, wanted, g.float()))
    got = tlc.backward(g, u, k, d, gate, {**a, "needs": needs})
    assert len(got) == 4
    for name, x, n, gx in zip(("du", "dk", "dd", "dgate"), ops, needs, got):
        if not n:
            assert gx is None, f"{name} returned though not needed"
            continue
        r = next(ref_grads)
        assert gx.shape == x.shape and gx.dtype == x.dtype, f"{name}: {gx.shape} {gx.dtype}"
        e = rel_err(gx, r)
        assert e < bound, f"{name}: relative error {e:.3g} >= {bound:g}"


B, H = 2, 2
ALGORITHMS = ["direct", "fft"]
# (kernel layout, L, Lk): per channel, shared, per batch; Lk < L and Lk = L; L not a power of two
KERNELS = [("per_channel", 100, 100), ("per_channel", 200, 37), ("shared", 77, 77), ("per_batch", 130, 50)]


def kernel_of(layout, lk, dtype=torch.float32):
    shape = {"per_channel": (H, lk), "shared": (lk,), "per_batch": (B, H, lk)}[layout]
    return rnd(*shape, dtype=dtype, std=lk ** -0.5)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("layout,length,lk", KERNELS)
def test_plain_convolution(algorithm, layout, length, lk):
    check(rnd(B, H, length), kernel_of(layout, lk), algorithm=algorithm)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("layout,length,lk", KERNELS)
def test_fused_epilogue(algorithm, layout, length, lk):
    # y = silu(0.25·conv + d·u)·gate: d per channel (broadcast over batch and time), gate per element
    u, k = rnd(B, H, length), kernel_of(layout, lk)
    check(u, k, rnd(H, 1), rnd(B, H, length), algorithm=algorithm, scale=0.25, activation="silu")


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision(algorithm, dtype):
    u, k = rnd(B, H, 150, dtype=dtype), kernel_of("per_channel", 150, dtype)
    check(u, k, rnd(H, 1, dtype=dtype), rnd(B, H, 150, dtype=dtype), algorithm=algorithm, scale=0.5,
          activation="silu")


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_mixed_dtypes_promote(algorithm):
    # fp16 signal, fp32 kernel and gate: y in fp32
    check(rnd(B, H, 90, dtype=torch.float16), kernel_of("per_channel", 40), None, rnd(B, H, 90),
          algorithm=algorithm, bound=KBOUND[torch.float16])


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("case", ["gate_no_recompute", "only_dk", "only_du_silu", "dgate_only"])
def test_partial_gradients(algorithm, case):
    # without SiLU and without ∂gate the backward needs no recomputed convolution (dz = grad·gate)
    u, k, d, gate = rnd(B, H, 60), kernel_of("per_channel", 20), rnd(H, 1), rnd(B, H, 60)
    act, needs = {"gate_no_recompute": ("none", [True, True, True, False]),
                  "only_dk": ("none", [False, True, False, False]),
                  "only_du_silu": ("silu", [True, False, False, False]),
                  "dgate_only": ("none", [False, False, False, True])}[case]
    check(u, k, d, gate, algorithm=algorithm, scale=2.0, activation=act, needs=needs)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_broadcasts_and_strides(algorithm):
    # u shared by the batch (du summed over it), k per batch, d with a time axis, gate broadcast
    # over time; u read through a transposed view (time stride H)
    u = rnd(50, H).t()
    check(u, rnd(B, H, 30, std=0.2), rnd(H, 50), rnd(B, H, 1), algorithm=algorithm, activation="silu")


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_many_batch_dims(algorithm):
    # (2, 2, 2, L) with k (2, 1, Lk): batch dims that do not coalesce into one
    check(rnd(2, 2, 2, 40), rnd(2, 1, 40, std=0.2), rnd(2, 1, 1, 1), algorithm=algorithm)
    # four batch dims whose broadcast pattern leaves four groups: the operands are materialized
    # (the FFT's backward over broadcast kernels is covered above; forward only here, for time)
    check(rnd(2, 2, 2, 2, 24), rnd(2, 1, 2, 1, 8, std=0.3), None, rnd(1, 2, 1, 2, 24), algorithm=algorithm,
          activation="silu", grads=algorithm == "direct")


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_kernel_longer_than_signal(algorithm):
    # taps at s ≥ L reach no output and get zero gradient
    u, k = rnd(B, H, 40), rnd(H, 57, std=0.2)
    check(u, k, algorithm=algorithm)
    dk = tlc.backward(rnd(B, H, 40), u, k, None, None, {**attrs(algorithm), "needs": [False, True, False, False]})[1]
    assert dk[:, 40:].abs().max().item() == 0 and dk[:, :40].abs().max().item() > 0


def test_short_kernel_and_tiny_lengths():
    # Mamba-style 4-tap conv; one-sample signal; one-tap kernel
    check(rnd(B, H, 33), rnd(H, 4), rnd(H, 1), None, algorithm="direct", activation="silu")
    for algorithm in ALGORITHMS:
        check(rnd(B, H, 1), rnd(H, 1), algorithm=algorithm)
        check(rnd(B, H, 19), rnd(H, 1), rnd(H, 1), algorithm=algorithm)


def test_direct_tiles_cross(monkeypatch):
    # tiles of 2·16 samples: a row spans several tiles and each tile several lag blocks
    monkeypatch.setitem(tlc.INTERPRETER_CONFIG, "direct", {"BLOCK_A": 2, "M": 16, "num_warps": 4})
    monkeypatch.setitem(tlc.GPU_CONFIG, "direct", {"BLOCK_A": 16, "M": 16, "num_warps": 4})
    check(rnd(B, H, 150), kernel_of("per_channel", 70), rnd(H, 1), rnd(B, H, 150), algorithm="direct",
          scale=0.5, activation="silu")


def test_fft_larger_sizes():
    # N = 2048 = 64·32: every contraction loop of the four-step kernels runs several blocks
    length = 600
    assert tlc.fft_size(length, length) == 2048
    check(rnd(1, 2, length), rnd(2, length, std=0.05), rnd(2, 1), rnd(1, 2, length), algorithm="fft",
          scale=0.5, activation="silu")


def test_fft_largest_size(monkeypatch):
    # N = 32768 = 256·128 (L = Lk = 16384), forward only, with the GPU's block size
    monkeypatch.setitem(tlc.INTERPRETER_CONFIG, "fft", dict(tlc.GPU_CONFIG["fft"]))
    length = 16384
    assert tlc.fft_size(length, length) == tlc.MAX_FFT_SIZE
    check(rnd(1, 1, length), rnd(1, length, std=length ** -0.5), algorithm="fft", grads=False)


# --- what the kernels refuse --------------------------------------------------

def reason(u, k, d=None, gate=None, **a):
    return tlc.supports(dict(u=u, k=k, d=d, gate=gate), attrs(**{"algorithm": "fft", **a}))


def test_supports_refusals(monkeypatch):
    u, k = rnd(B, H, 16), rnd(H, 16)
    assert reason(u, k) is None and reason(u, k, algorithm="direct") is None
    assert "circular" in reason(u, k, causal=False)
    assert "float64" in reason(u.double(), k)
    assert "int64" in reason(u, k, rnd(H, 1).long())
    assert "rank 1" in reason(rnd(16), rnd(16))
    assert "gelu" in reason(u, k, activation="gelu")
    assert "empty" in reason(rnd(0, H, 16), k)
    big = rnd(1, 1, 20000)
    assert "exceeds 32768" in reason(big, rnd(1, 20000))
    assert reason(big, rnd(1, 20000), algorithm="direct") is None  # the direct kernel has no size limit
    assert reason(big, rnd(1, 3)) is None  # N = next_pow2(L + 2) = 32768
    monkeypatch.setattr(triton_common, "triton_installed", lambda: False)
    assert reason(u, k) == "triton is not installed"


@pytest.mark.skipif(DEVICE != "cpu", reason="the interpreter gate concerns CPU tensors")
def test_supports_needs_interpreter_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "TRITON_INTERPRET" in reason(rnd(B, H, 16), rnd(H, 16))


def test_refused_call_runs_the_reference_with_its_reason():
    u, k = rnd(B, H, 16), rnd(H, 16)
    with pytest.warns(UserWarning, match="circular"):
        y = torch.ops.seqfuse.long_conv(u, k, None, None, None, False, 16, 1.0, "none", "fft", "triton")
    torch.testing.assert_close(y, long_conv_reference(u, k, causal=False, fft_size=16))
    assert seqfuse.counters()["long_conv"] == {"triton": 0, "cpu": 0, "aten": 0, "eager": 1}
    assert any("circular" in r for r in seqfuse.fallbacks()["long_conv"])


# --- end to end -----------------------------------------------------------------

def hyena(u, k, D, v):
    n = 2 * u.shape[-1]
    y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n) / n, n=n, norm="forward")[..., :u.shape[-1]]
    return v * (y + u * D.unsqueeze(-1))


def test_hyena_compiled_runs_on_triton():
    ins = [rnd(B, 3, 48).requires_grad_(), rnd(3, 48, std=0.2).requires_grad_(), rnd(3).requires_grad_(),
           rnd(B, 3, 48).requires_grad_()]
    ref = hyena(*ins)
    g = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, ins, g)
    f = torch.compile(hyena, backend="seqfuse", options={"runtime": "triton", "downstream": "aot_eager"})
    out = f(*ins)
    grads = torch.autograd.grad(out, ins, g)
    calls = seqfuse.counters()
    assert calls["long_conv"]["triton"] >= 1 and calls["long_conv"]["eager"] == 0, calls
    assert calls["long_conv_backward"]["triton"] >= 1 and calls["long_conv_backward"]["eager"] == 0, calls
    e = rel_err(out, ref)
    assert e < KBOUND[torch.float32], f"output: relative error {e:.3g}"
    for name, a, r in zip(("u", "k", "D", "v"), grads, ref_grads):
        e = rel_err(a, r)
        assert e < KBOUND[torch.float32], f"grad {name}: relative error {e:.3g}"


# --- real sizes on a GPU ------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("length", [4096, 8192, 16384])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_real_sizes(length, algorithm, dtype):
    bsz, heads = 4, 256
    lk = length if algorithm == "fft" else 256  # the direct kernel serves short and medium kernels
    u = rnd(bsz, heads, length, dtype=dtype)
    k = rnd(heads, lk, dtype=dtype, std=lk ** -0.5)
    check(u, k, rnd(heads, 1, dtype=dtype), rnd(bsz, heads, length, dtype=dtype), algorithm=algorithm,
          scale=0.5, activation="silu")


@pytest.mark.gpu
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_gpu_full_length_direct_and_shared_kernel(algorithm):
    length = 4096
    check(rnd(4, 256, length), rnd(length, std=length ** -0.5), rnd(256, 1), None, algorithm=algorithm)
