"""Random map loops: a buffer written slice by slice, one independent value per step (the loop_map
pass), with the variations that decide whether vectorizing is exact: the buffer's kind and the
axis written (select or width-1 slice, negative axes), forward or reversed or partial index ranges,
einsums with an ellipsis, broadcasting and casting writes, values that read an outer loop's slice,
in-place updates of temporaries, and the look-alikes that must stay loops: a step that reads the
buffer (a recurrence through it) or code that reads it between the writes.  Nothing is required to
be rewritten; every program must equal eager (outputs, gradients, NaN positions)."""
from __future__ import annotations

import random
from typing import Iterator

import torch

from .check import Case
from .common import DTYPES, Maker, poison, size


def _program(r: random.Random):
    """(fn, description) of one random map-loop program over x (B, C, D), y (B, C, D)."""
    axis = r.choice((1, -2))                       # the step axis of the buffer (C)
    form = r.choice(("select", "select", "slice"))
    init = r.choice(("zeros", "zeros_like", "new_zeros", "empty_full"))
    order = r.choice(("forward", "forward", "reversed", "partial"))
    value = r.choice(("einsum", "pointwise", "reduce", "outer_slice", "inplace", "index_mask", "index_scale"))
    cmp = r.choice(("lt", "le", "lt1"))
    trap = r.choice((None, None, None, "reads_buffer", "reads_between"))
    cast = r.random() < 0.2

    def fn(x, y):
        B, C, D = x.shape
        if init == "zeros":
            A = torch.zeros(B, C, D, dtype=x.dtype)
        elif init == "zeros_like":
            A = torch.zeros_like(x)
        elif init == "new_zeros":
            A = x.new_zeros(B, C, D)
        else:
            A = torch.empty_like(x).fill_(0.25)
        if cast:
            A = A.double()
        idx = list(range(C))
        if order == "reversed":
            idx = idx[::-1]
        elif order == "partial":
            idx = idx[1:-1] if C > 2 else idx
        seen = []
        for i in idx:
            xi = x[:, i] if form == "select" else x[:, i:i + 1].squeeze(1)
            if value == "einsum":      # (B, 1): broadcast over the buffer's last axis
                v = torch.einsum("... c d, ... d -> ...", y * (x - x[:, i:i + 1]).exp(), xi)[..., None]
            elif value == "pointwise":
                v = xi.sin() * y[:, i] + 1.5
            elif value == "reduce":
                v = (xi[:, None, :] * y).sum(1)
            elif value == "outer_slice":
                v = xi * y[:, 0] - y[:, -1].tanh()
            elif value == "index_mask":   # a mask built from the Python loop index (fla's rwkv6)
                pos = torch.arange(C)
                keep = pos < i if cmp == "lt" else (pos <= i if cmp == "le" else pos < i + 1)
                v = (x * keep[None, :, None]).sum(1) + xi
            elif value == "index_scale":  # the loop index as a number
                v = xi * i + (i - 1)
            else:
                v = xi * 2
                v += y[:, i].exp()
            if trap == "reads_buffer" and i != idx[0]:
                v = v + A[:, idx[0]] * 0.5
            if form == "select":
                if axis == 1:
                    A[:, i] = v
                else:
                    A.select(axis, i).copy_(v)
            else:
                A[:, i:i + 1] = v[:, None]
            if trap == "reads_between":
                seen.append(A.sum())
        out = A * 3 - 1
        return (out, torch.stack(seen)) if seen else out
    what = f"{form}/{init}/{order}/{value}" + (f"-{cmp}" if value == "index_mask" else "") + (f"/{trap}" if trap else "") + ("/cast" if cast else "")
    return fn, what


def cases(rng: random.Random, n: int, triton: bool) -> Iterator[Case]:
    for _ in range(n):
        seed = rng.randrange(2 ** 31)
        r = random.Random(seed)
        fn, what = _program(r)
        B, C, D = size(r, 1, 3), size(r, 2, 12, (2, 3, 7)), size(r, 1, 5)
        m = Maker(r, r.choice(DTYPES))
        x, y = m.randn(B, C, D), m.randn(B, C, D, scale=0.5)
        tag = poison(r, [x, y])
        yield Case("map", what + (f"+{tag}" if tag else ""), fn, (x, y), None, {}, seed)


def _forward_substitution(r: random.Random):
    """(fn, description): (I + strictly_lower(M))⁻¹ by an in-place forward substitution (the triangular
    pass), in fla's and transformers' spellings, applied to a right-hand side; sometimes broken so that
    it must stay a loop."""
    spelling = r.choice(("fla", "qwen"))
    mask = r.choice(("masked_fill", "tril", "where"))
    broken = r.choice((None, None, None, "sign", "reads"))

    def fn(M, X):
        C = M.shape[-1]
        if mask == "masked_fill":
            N = -M.masked_fill(torch.triu(torch.ones(C, C, dtype=torch.bool), diagonal=0), 0)
        elif mask == "tril":
            N = -M.tril(-1)
        else:
            N = -torch.where(torch.ones(C, C, dtype=torch.bool).tril(-1), M, 0.0)
        extra = None
        for i in range(1, C):
            if spelling == "fla":
                upd = (N[..., i, :, None].clone() * N[..., :, :i].clone()).sum(-2)
                N[..., i, :i] = N[..., i, :i].clone() + (-upd if broken == "sign" else upd)
            else:
                row = N[..., i, :i].clone()
                sub = N[..., :i, :i].clone()
                upd = (row.unsqueeze(-1) * sub).sum(-2)
                N[..., i, :i] = row + (-upd if broken == "sign" else upd)
            if broken == "reads" and i == 1:
                extra = N.sum()
        T = N + torch.eye(C, dtype=M.dtype)
        out = T @ X
        return (out, extra) if extra is not None else out
    return fn, f"forward_substitution/{spelling}/{mask}" + (f"/{broken}" if broken else "")


def triangular_cases(rng: random.Random, n: int, triton: bool) -> Iterator[Case]:
    for _ in range(n):
        seed = rng.randrange(2 ** 31)
        r = random.Random(seed)
        fn, what = _forward_substitution(r)
        lead = [size(r, 1, 3) for _ in range(r.choice((0, 1, 3)))]
        C, D = size(r, 2, 12, (2, 3, 7)), size(r, 1, 5)
        m = Maker(r, r.choice(DTYPES))
        M, X = m.randn(*lead, C, C, scale=0.4), m.randn(*lead, C, D)
        tag = poison(r, [M, X])
        yield Case("triangular", what + (f"+{tag}" if tag else ""), fn, (M, X), None, {}, seed)
