"""Toeplitz matrix products (passes/toeplitz.py): ``T @ u`` with T built from a kernel k by index
arithmetic, ``unfold``, ``as_strided`` or a masked gather is one causal ``seqfuse.long_conv``;
outputs and gradients equal eager (the graph after the pass: tests/filecheck/test_toeplitz_pass.py).  Matrices that are not the causal Toeplitz matrix of their kernel
are near misses with the reason."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import check_against_eager


def gather_mask(u, k):                      # u (B, C, L), k (C, L): per-channel kernel
    L = u.shape[-1]
    i = torch.arange(L)
    idx = i[:, None] - i[None, :]
    T = k[:, idx.clamp(min=0)] * (idx >= 0)
    return torch.einsum("cij,bcj->bci", T, u)


def pad_unfold_flip(u, k):
    L = u.shape[-1]
    T = F.pad(k, (L - 1, 0)).unfold(-1, L, 1).flip(-1)    # T[c, i, j] = k[c, i - j]
    return (T @ u.unsqueeze(-1)).squeeze(-1)


def shared_kernel_where(u, k):              # k (L,): one kernel for every channel, u (B, L, C)
    L = u.shape[1]
    i = torch.arange(L)
    idx = i[:, None] - i[None, :]
    T = torch.where(idx >= 0, k[idx.clamp(min=0)], 0.0)
    return torch.einsum("ij,bjc->bic", T, u)


def short_kernel_tril(u, k):                # a 5-tap kernel (Lk < L): zero beyond its length
    L = u.shape[-1]
    kp = F.pad(k, (0, L - k.shape[-1]))                   # (C, L)
    i = torch.arange(L)
    T = kp[:, (i[:, None] - i[None, :]).clamp(min=0)].tril()
    return torch.einsum("cij,bcj->bci", T, u)


SPELLINGS = {"gather_mask": (gather_mask, (2, 3, 12), (3, 12)),
             "pad_unfold_flip": (pad_unfold_flip, (2, 3, 12), (3, 12)),
             "shared_kernel_where": (shared_kernel_where, (2, 12, 3), (12,)),
             "short_kernel_tril": (short_kernel_tril, (2, 3, 12), (3, 5))}


@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_toeplitz_product_is_one_long_conv(name):
    fn, us, ks = SPELLINGS[name]
    u, k = torch.randn(us, requires_grad=True), torch.randn(ks, requires_grad=True)
    report = check_against_eager(fn, u, k)
    assert report.count("long_conv") == 1, str(report)
    (ir,) = [r.ir for r in report.rewrites]
    assert "causal=true" in ir, ir
    assert not report.near_misses, str(report)


def anti_causal(u, k):                      # T[i, j] = k[j - i]: reads the future
    L = u.shape[-1]
    i = torch.arange(L)
    idx = i[None, :] - i[:, None]
    return torch.einsum("cij,bcj->bci", k[:, idx.clamp(min=0)] * (idx >= 0), u)


def scaled_matrix(u, k):                    # 0.5·Toep(k): a product with a constant is not the matrix
    L = u.shape[-1]
    i = torch.arange(L)
    idx = i[:, None] - i[None, :]
    return torch.einsum("cij,bcj->bci", k[:, idx.clamp(min=0)] * (idx >= 0) * 0.5, u)


def circulant(u, k):                        # wraps around: T[i, j] = k[(i - j) mod L]
    L = u.shape[-1]
    i = torch.arange(L)
    return torch.einsum("cij,bcj->bci", k[:, (i[:, None] - i[None, :]) % L], u)


@pytest.mark.parametrize("fn", [anti_causal, scaled_matrix, circulant])
def test_other_matrices_are_near_misses(fn):
    """Matrices moved out of a kernel that are not its causal Toeplitz matrix: not rewritten,
    reported with the reason, still equal to eager."""
    u, k = torch.randn(2, 3, 12, requires_grad=True), torch.randn(3, 12, requires_grad=True)
    report = check_against_eager(fn, u, k)
    assert report.count("long_conv") == 0, str(report)
    assert any("not its causal Toeplitz matrix" in m.reason for m in report.near_misses), str(report)


def test_product_of_two_inputs_is_left_alone():
    """An ordinary matrix product (the matrix is an input): no rewrite, no near miss."""
    def fn(m, u):
        return torch.einsum("cij,bcj->bci", m, u)
    report = check_against_eager(fn, torch.randn(3, 12, 12, requires_grad=True), torch.randn(2, 3, 12))
    assert report.count("long_conv") == 0 and not report.near_misses, str(report)
