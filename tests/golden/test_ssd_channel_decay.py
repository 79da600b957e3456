"""Quadratic forms with a decay per key channel inside q·k (GLA's and RWKV-6's chunked intra-chunk terms):

    y[i] = Σ_{j ≤ i} Σ_n q[i, n]·k[j, n]·exp(G[i, n] - G[j, n])·v[j],     G = cumsum_t(a)

is the ssd with ``decay=vector`` and a[t, n] (the decay moves inside the contraction over n).  The strictly
causal mask [j < i] reads S_{t-1}: the ssd of the keys and values one step later, the factor exp(a_s) on
the keys; with RWKV-6's exclusive exponent G_i - a_i - G_j the decay is shifted too.  Each lifted form
equals eager in outputs and every gradient; look-alikes leave a near miss naming what differs."""
import pytest
import torch
import torch.nn.functional as F

from helpers import check_against_eager

B, H, T, D, P = 1, 2, 8, 4, 5


def operands(seed=0, t=T):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, t, D, generator=gen).requires_grad_() for _ in range(2))
    v = torch.randn(B, H, t, P, generator=gen).requires_grad_()
    w = F.logsigmoid(torch.randn(B, H, t, D, generator=gen)).requires_grad_()
    return q, k, v, w


def scores(q, k, e):
    """Σ_n q[i, n]·k[j, n]·exp(e[i, j, n]), written as RWKV-6's chunked form writes it."""
    return (q[..., :, None, :] * k[..., None, :, :] * e.exp()).sum(-1)


def gla(q, k, v, w):
    g = w.cumsum(-2)
    return scores(q, k, g[..., :, None, :] - g[..., None, :, :]).tril() @ v


def rwkv6(q, k, v, w):
    g = w.cumsum(-2)
    t = q.shape[-2]
    keep = torch.arange(t)[None, :] < torch.arange(t)[:, None]
    return scores(q, k, g[..., :, None, :] - w[..., :, None, :] - g[..., None, :, :]).masked_fill(~keep, 0) @ v


def strict_inclusive(q, k, v, w):
    g = w.cumsum(-2)
    return scores(q, k, g[..., :, None, :] - g[..., None, :, :]).tril(-1) @ v


def stable_exclusive(q, k, v, w):
    # the mask applied to the exponent before exp (-inf above the diagonal: nothing overflows in eager either)
    g = w.cumsum(-2)
    t = q.shape[-2]
    e = g[..., :, None, :] - w[..., :, None, :] - g[..., None, :, :]
    e = e.masked_fill(~torch.tril(torch.ones(t, t, dtype=torch.bool), -1)[..., None], -torch.inf)
    return scores(q, k, e) @ v


def einsum_spelling(q, k, v, w):
    g = w.cumsum(-2)
    decay = torch.exp(g[..., :, None, :] - g[..., None, :, :])
    a = torch.einsum("bhin,bhjn,bhijn->bhij", q, k, decay)
    return torch.einsum("bhij,bhjp->bhip", a.tril(), v)


def ssd_misses(report):
    return [m.reason for m in report.near_misses if m.kind in ("ssd", "scan")]


@pytest.mark.parametrize("fn", [gla, rwkv6, strict_inclusive, stable_exclusive, einsum_spelling])
def test_channel_decay_forms_are_one_vector_ssd(fn):
    report = check_against_eager(fn, *operands())
    assert report.count("ssd") == 1 and not ssd_misses(report), str(report)
    assert "decay=vector" in report.rewrites[0].ir, report.rewrites[0].ir


def test_channel_decay_dynamic_length():
    report = check_against_eager(rwkv6, *operands(t=12), dynamic=True)
    assert report.count("ssd") == 1 and "decay=vector" in report.rewrites[0].ir, str(report)


def test_strong_decays_stay_exact():
    # a ≈ -30 per step: exp(G_i - G_j) underflows below the diagonal as in the program, and the op never forms
    # the program's exp(+30·(j - i)) = inf above it.  Outputs only: eager's own gradients are NaN there (the
    # masked inf times a zero gradient), the op's are finite
    q, k, v, w = operands(seed=1)
    w = (w.detach() * 30).requires_grad_()
    report = check_against_eager(rwkv6, q, k, v, w, grads=False)
    assert report.count("ssd") == 1, str(report)
    assert bool(torch.isfinite(report.output).all())


def key_decay_of_another_sum(q, k, v, w):
    g, h = w.cumsum(-2), (2 * w).cumsum(-2)
    return scores(q, k, g[..., :, None, :] - h[..., None, :, :]).tril() @ v


def per_key_gate(q, k, v, w):
    g = w.cumsum(-2)
    return scores(q, k, g[..., :, None, :] - g[..., None, :, :] + w[..., None, :, :]).tril() @ v


def cumsum_over_channels(q, k, v, w):
    g = w.cumsum(-1)
    return scores(q, k, g[..., :, None, :] - g[..., None, :, :]).tril() @ v


def exclusive_with_the_diagonal(q, k, v, w):
    g = w.cumsum(-2)
    return scores(q, k, g[..., :, None, :] - w[..., :, None, :] - g[..., None, :, :]).tril() @ v


def banded(q, k, v, w):
    g = w.cumsum(-2)
    return scores(q, k, g[..., :, None, :] - g[..., None, :, :]).tril().triu(-2) @ v


@pytest.mark.parametrize("fn,reason", [
    (key_decay_of_another_sum, "segment sum G_i - G_j of one cumulative sum"),
    (per_key_gate, "per-key term"),
    (cumsum_over_channels, "not along the time axis"),
    (exclusive_with_the_diagonal, "the mask keeps the diagonal"),
    (banded, "read through triu"),
])
def test_look_alikes_are_near_misses(fn, reason):
    report = check_against_eager(fn, *operands(seed=2))
    assert report.count("ssd") == 0, str(report)
    misses = ssd_misses(report)
    assert misses and any(reason in m for m in misses), misses
