"""``detach`` is the same value but not the same gradient: no recognizer may look through it.

Each program reads a detached tensor inside a mixer; compiled with seqfuse it must give eager's
gradients (none for the detached input's path), whether or not the mixer is rewritten."""
import torch

from helpers import check_against_eager


def einsum_of_detached(x, w):
    return torch.einsum("ij,jk->ik", x.detach(), w) + x @ w


def linear_attention_detached_keys(q, k, v):
    return (q @ k.detach().mT).tril() @ v


def truncated_recurrence(a, b):
    # h = a_t·stopgrad(h) + b_t: the same values as the scan, other gradients (truncated BPTT)
    h = torch.zeros_like(b[:, 0])
    out = []
    for t in range(b.shape[1]):
        h = a[:, t] * h.detach() + b[:, t]
        out.append(h)
    return torch.stack(out, 1)


def test_einsum_of_a_detached_operand():
    x, w = torch.randn(5, 4, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    check_against_eager(einsum_of_detached, x, w)


def test_linear_attention_with_detached_keys():
    q, k, v = (torch.randn(2, 3, 8, 4, requires_grad=True) for _ in range(3))
    report = check_against_eager(linear_attention_detached_keys, q, k, v)
    assert report.count("ssd") == 1, str(report)    # still an ssd: its b operand is the detached k


def test_truncated_recurrence_is_not_a_scan_with_full_gradients():
    a = torch.rand(2, 6, 4, requires_grad=True)
    b = torch.randn(2, 6, 4, requires_grad=True)
    report = check_against_eager(truncated_recurrence, a, b)
    assert report.count("scan") == 0, str(report)
