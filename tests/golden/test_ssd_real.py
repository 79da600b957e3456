"""Linear recurrences as real libraries write them (issue 15), called through the libraries' own
functions: flash-linear-attention's ``naive_chunk_simple_gla`` (fla.ops.simple_gla.naive) at its
default chunk size 64.  Each program equals eager in outputs, the final state and every gradient;
the report shows the rewrite, or the near miss with its reason where the program is not lifted."""
import pytest
import torch

from helpers import check_against_eager

naive = pytest.importorskip("fla.ops.simple_gla.naive")


def simple_gla(q, k, v, g, h0):
    """fla's chunked simple GLA at its default chunk_size (64), with an initial and a final state."""
    return naive.naive_chunk_simple_gla(q, k, v, g, initial_state=h0, output_final_state=True)


def gla_inputs(t, b=1, h=2, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, t, h, d, generator=gen).requires_grad_() for _ in range(3))
    g = torch.nn.functional.logsigmoid(torch.randn(b, t, h, generator=gen)).requires_grad_()
    h0 = (0.5 * torch.randn(b, h, d, d, generator=gen)).requires_grad_()
    return q, k, v, g, h0


def test_simple_gla_default_chunk_three_chunks_is_one_ssd():
    # T = 192: three chunks of 64, the loop over chunks re-rolled into a scan, then one ssd over the
    # sequence with the gate as its scalar decay and h0 / the final state as the op's
    report = check_against_eager(simple_gla, *gla_inputs(192))
    assert report.count("ssd") == 1 and not report.near_misses, str(report)
    ir = report.rewrites[0].ir
    assert "decay=scalar" in ir and "a=%" in ir and "h0=%" in ir, ir


def test_simple_gla_default_chunk_two_chunks():
    # T = 128 at fla's default chunk 64: a loop of two steps, re-rolled (two-step loops were left
    # alone before; each step's intra-chunk term read L_mask[:, :, i] and stayed a near miss)
    report = check_against_eager(simple_gla, *gla_inputs(128))
    assert report.count("ssd") == 1 and not report.near_misses, str(report)


def simple_gla_output_only(q, k, v, g):
    """fla's chunked simple GLA as a model calls it: no initial state, no final state asked for."""
    return naive.naive_chunk_simple_gla(q, k, v, g)[0]


@pytest.mark.parametrize("t", [128, 192, 320], ids=["two_chunks", "three_chunks", "five_chunks"])
def test_simple_gla_without_final_state_is_one_ssd(t):
    # without output_final_state the function drops S after the loop, so Dynamo removed the last
    # chunk's state update as dead code: the last step of the loop lacks it.  The loop pass matches the
    # rest of that step and rebuilds the update (loop_reroll.rebuild_dropped); with two chunks the
    # template step is the one lacking it, and takes the first chunk's update instead
    q, k, v, g, _ = gla_inputs(t, b=2, h=3, d=8)
    report = check_against_eager(simple_gla_output_only, q, k, v, g)
    assert report.count("ssd") == 1 and not report.near_misses, str(report)
    assert "decay=scalar" in report.rewrites[0].ir, report.rewrites[0].ir


def test_simple_gla_two_chunks_with_initial_state_only():
    # h0 given, no final state: the first chunk's update reads h0 as its carried value
    q, k, v, g, h0 = gla_inputs(128, b=1, h=2, d=8, seed=3)
    report = check_against_eager(lambda *a: naive.naive_chunk_simple_gla(*a[:4], initial_state=a[4])[0],
                                 q, k, v, g, h0)
    assert report.count("ssd") == 1 and not report.near_misses, str(report)
    assert "h0=%" in report.rewrites[0].ir, report.rewrites[0].ir


# --- a per-head decay rate (a buffer or a parameter) -------------------------------------------
# MiniMax's lightning attention (transformers models/minimax/modeling_minimax.py) decays the
# scores by exp(-slope_h·(i - j)) on the lower triangle, slope_h a per-head rate.  It precomputes
# the whole mask in __init__ as a buffer (diagonal_decay), which Dynamo lifts as an input whose
# values nothing proves: a near miss (below).  Computed in forward from the per-head rate, with the
# integer positions cast to float, it is an ssd whose a is -rate at every step (the op reads the
# rate at run time: no value is assumed when compiling).

class RateDecay(torch.nn.Module):
    """(q·kᵀ ∘ exp(-rate_h·(i - j)).tril())·v with rate a (H, 1, 1) buffer or parameter."""

    def __init__(self, learnable: bool, heads: int = 2):
        super().__init__()
        rate = (1 / 2 ** (8 / heads)) ** (torch.arange(heads) + 1.0)     # MiniMax's get_slope_rate
        if learnable:
            self.rate = torch.nn.Parameter(rate[:, None, None])
        else:
            self.rate = torch.nn.Buffer(rate[:, None, None])

    def forward(self, q, k, v):
        t = q.shape[2]
        i = torch.arange(t, device=q.device)
        dist = (i[:, None] - i[None, :]).to(q.dtype)
        decay = torch.exp(-self.rate * dist).tril()
        return (q @ k.transpose(-1, -2) * decay) @ v


@pytest.mark.parametrize("learnable", [False, True], ids=["buffer", "parameter"])
def test_per_head_rate_decay_is_one_ssd(learnable):
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 16, 4, generator=gen).requires_grad_() for _ in range(3))
    report = check_against_eager(RateDecay(learnable), q, k, v)      # the rate's gradient included
    assert report.count("ssd") == 1 and not report.near_misses, str(report)
    assert "decay=scalar" in report.rewrites[0].ir, report.rewrites[0].ir


def test_precomputed_decay_buffer_is_a_near_miss():
    # the mask itself a buffer (MiniMax's diagonal_decay): a decay matrix's numbers are not read
    class Precomputed(RateDecay):
        def __init__(self):
            super().__init__(False)
            i = torch.arange(16)
            self.mask = torch.nn.Buffer(torch.exp(-self.rate * (i[:, None] - i[None, :])).tril())

        def forward(self, q, k, v):
            return (q @ k.transpose(-1, -2) * self.mask) @ v

    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(1, 2, 16, 4, generator=gen).requires_grad_() for _ in range(3))
    report = check_against_eager(Precomputed(), q, k, v)
    misses = [m.reason for m in report.near_misses if m.kind == "ssd"]
    assert report.count("ssd") == 0 and any("precomputed module buffer" in r for r in misses), str(report)
