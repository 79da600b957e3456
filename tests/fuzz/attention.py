"""Random softmax-attention programs in every spelling the docs claim (README "Recognized now",
docs/ir.md "attention"): ``q @ kᵀ``, ``matmul``, ``einsum``, ``bmm`` over reshaped heads,
``baddbmm``; scale on the scores or on q, by multiplication or division, of either sign;
``masked_fill`` / ``torch.where`` with ``tril`` / ``triu`` / ``arange`` masks, additive ``-inf`` and
``finfo.min`` masks, masks held as module buffers (nanoGPT's ``bias[:, :, :T, :T] == 0``), key padding
(bool and HF-style ``(1 - m) * min`` biases), sliding windows,
fully masked rows; ``F.softmax(dtype=)`` and ``.float()`` / ``.to(q.dtype)`` round trips; a softmax
normalized after the value contraction (``exp(s - max) @ v / Σ``, with or without a per-head sink logit in
the max and the sum, as fla's ``naive_parallel_attn(sink_bias=)``); a sink column concatenated to the
scores and dropped after the softmax (gpt-oss; per query and behind ``.float()`` as inkling2); SDPA calls
(masks, ``is_causal``, ``enable_gqa``, scale); GQA through ``repeat_interleave`` / ``expand``;
soft-capping; sizes 1, odd, non-multiples of the kernels' tiles; fp64 / fp32 / bf16 / fp16;
strided views; random requires_grad subsets; NaN / inf inputs.
"""
from __future__ import annotations

import math
import random
from typing import Iterator

import torch
import torch.nn.functional as F

from .check import Case
from .common import DTYPES, Maker, poison, size

SPELLINGS = ("matmul", "at", "einsum", "bmm", "baddbmm")
MASKS = ("none", "causal_fill", "causal_where", "causal_additive", "causal_arange", "window", "padding_bool",
         "padding_bias", "causal_padding", "finite_fill", "empty_rows", "kv_cache", "fill_and_padding_bias",
         "bias_tensor", "alibi_causal", "hf_causal", "hf_window", "hf_padding", "buffer")
#: the patterns of a mask held as a module buffer (read by value under a value guard) and how it is read
BUFFER_PATTERNS = ("tril", "tril", "band", "random", "triu", "ones")
BUFFER_READS = ("eq0", "bool_where", "additive")


def _sizes(r, triton):
    if triton:
        return size(r, 1, 2), size(r, 1, 2), size(r, 1, 20, (1, 7, 17)), size(r, 1, 20, (1, 5, 17)), \
            r.choice((1, 4, 8, 16))
    return (size(r, 1, 3), size(r, 1, 4), size(r, 1, 70, (1, 2, 7, 33, 64, 65)),
            size(r, 1, 70, (1, 7, 33, 65)), r.choice((1, 3, 4, 8, 16, 32, 64)))


def _scores(spelling, q, k, scale, scale_on_q, div):
    """scale·q·kᵀ (B, H, Lq, Lk) in one of the spellings."""
    if scale_on_q:
        q = q / (1.0 / scale) if div else q * scale
    if spelling == "matmul":
        s = torch.matmul(q, k.transpose(-2, -1))
    elif spelling == "at":
        s = q @ k.mT
    elif spelling == "einsum":
        s = torch.einsum("bhid,bhjd->bhij", q, k)
    elif spelling == "bmm":
        b, h, lq, d = q.shape
        s = torch.bmm(q.reshape(b * h, lq, d), k.reshape(b * h, k.shape[-2], d).transpose(1, 2))
    else:
        b, h, lq, d = q.shape
        base = torch.zeros(b * h, lq, k.shape[-2], dtype=q.dtype)
        # beta=0: the spelling canonicalization claims (beta=1 adds its input: Bloom's ALiBi, a near miss)
        s = torch.baddbmm(base, q.reshape(b * h, lq, d), k.reshape(b * h, k.shape[-2], d).transpose(1, 2),
                          beta=0.0)
    if not scale_on_q:
        s = s / (1.0 / scale) if div else s * scale
    return s


def hand_written(r, seed, triton):
    B, H, Lq, Lk, D = _sizes(r, triton)
    dt = r.choice(DTYPES)
    m = Maker(r, dt)
    spelling = r.choice(SPELLINGS)
    mask = r.choice(MASKS)
    if mask == "kv_cache":
        Lk = max(Lk, Lq)
    elif mask == "buffer":
        Lk = Lq                 # nanoGPT's bias[:, :, :T, :T]
    elif mask not in ("none", "padding_bool", "padding_bias", "hf_padding"):
        Lk = Lq if r.random() < 0.8 else Lk
    gqa = r.choice((1, 1, 1, 2)) if H % 2 == 0 else 1
    gqa_how = r.choice(("repeat_interleave", "expand"))
    Hk = H // gqa
    sign = r.random()
    scale = D ** -0.5 if sign < 0.7 else (r.choice((-0.5, 0.0, 1.0, 2.0, 1e-3)))
    scale_on_q, div = r.random() < 0.2, r.random() < 0.3
    softcap = r.choice((None,) * 6 + (5.0, 30.0))
    upcast = r.choice(("none", "none", "softmax_dtype", "float", "written_out", "post_normalized",
                       "post_normalized_sink", "cat_sink"))
    if upcast in ("post_normalized_sink", "cat_sink") and spelling in ("bmm", "baddbmm"):
        upcast = "post_normalized"
    # gpt-oss / inkling2's sink column: one logit per head expanded over the rows, or one per query (inkling2's
    # sink_proj of the hidden states); the logits cast with .float() before the softmax or not
    sink_per_query, sink_cast = (r.random() < 0.5, r.random() < 0.5) if upcast == "cat_sink" else (False, False)
    window = size(r, 1, max(1, Lq), (1, 2, 3))
    strided = r.random() < 0.15
    Dv = D if r.random() < 0.8 else size(r, 1, 16)
    tail = r.choice(("none", "none", "blhd"))   # the output transposed back to (B, L, H·Dv), as models do
    if strided:  # the program slices the head dim (stride 2): the op reads the views
        q = m.randn(B, H, Lq, 2 * D)
        k, v = m.randn(B, Hk, Lk, 2 * D), m.randn(B, Hk, Lk, 2 * Dv)
    else:
        q, k, v = m.randn(B, H, Lq, D), m.randn(B, Hk, Lk, D), m.randn(B, Hk, Lk, Dv)
    if r.random() < 0.1:
        q = (q.detach() * 30).requires_grad_(q.requires_grad)
    keep = torch.ones(B, Lk, dtype=torch.bool)
    for b in range(B):
        n = r.randint(0 if mask == "empty_rows" else 1, Lk)
        if r.random() < 0.5:
            keep[b, n:] = False
        else:
            keep[b, :Lk - n] = False
    pad = keep.to(dt)
    extra = [keep] if mask in ("padding_bool", "causal_padding", "empty_rows", "hf_padding") else \
        [pad] if mask in ("padding_bias", "fill_and_padding_bias") else []
    if mask == "bias_tensor":
        extra = [m.randn(r.choice((1, H)), Lq, Lk, scale=r.choice((0.5, 3.0)), grad=r.random() < 0.4)]
    elif mask == "alibi_causal":
        slopes = torch.tensor([2.0 ** (-8 * (h + 1) / H) for h in range(H)], dtype=torch.float64)
        extra = [(slopes[:, None, None] * (torch.arange(Lk)[None, :] - torch.arange(Lq)[:, None])).to(dt)]
    buffer = None
    if mask == "buffer":    # a module buffer N >= L long, read as buf[:L, :L] (nanoGPT's causal mask)
        pattern, how = r.choice(BUFFER_PATTERNS), r.choice(BUFFER_READS)
        n = Lq + r.choice((0, 0, 1, 5))
        ones = torch.ones(n, n)
        allowed = {"tril": ones.tril(), "band": ones.tril() * ones.triu(-window + 1), "triu": ones.triu(),
                   "ones": ones, "random": (torch.rand(n, n, generator=m.g) < 0.6).float()}[pattern]
        allowed.fill_diagonal_(1.0)
        buffer = {"eq0": allowed.view(1, 1, n, n), "bool_where": allowed.bool(),
                  "additive": torch.zeros(n, n).masked_fill(allowed == 0, float("-inf"))}[how]
    fill_value = r.choice((-1e4, -1e9, torch.finfo(dt).min, -65504.0, -3e38)) \
        if mask in ("finite_fill", "fill_and_padding_bias") else None
    tag = poison(r, [q, k, v])

    three_d = spelling in ("bmm", "baddbmm")

    def per_key(t):
        """A (B, Lk) key mask broadcast over the scores: (B, 1, 1, Lk), or (B·H, 1, Lk) for bmm."""
        return t.repeat_interleave(H, 0)[:, None, :] if three_d else t[:, None, None, :]

    def fn(q, k, v, *rest, buf=None):
        if strided:
            q, k, v = q[..., ::2], k[..., ::2], v[..., ::2]
        lq, lk = q.shape[-2], k.shape[-2]
        if gqa > 1:
            if gqa_how == "repeat_interleave":
                k, v = k.repeat_interleave(gqa, dim=1), v.repeat_interleave(gqa, dim=1)
            else:
                k = k[:, :, None].expand(k.shape[0], k.shape[1], gqa, lk, k.shape[-1]).reshape(
                    k.shape[0], k.shape[1] * gqa, lk, k.shape[-1])
                v = v[:, :, None].expand(v.shape[0], v.shape[1], gqa, lk, v.shape[-1]).reshape(
                    v.shape[0], v.shape[1] * gqa, lk, v.shape[-1])
        s = _scores(spelling, q, k, scale, scale_on_q, div)
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        future = torch.triu(torch.ones(lq, lk, dtype=torch.bool), 1 + lk - lq)
        if mask == "causal_fill":
            s = s.masked_fill(future, float("-inf"))
        elif mask == "causal_where":
            s = torch.where(torch.tril(torch.ones(lq, lk, dtype=torch.bool), lk - lq), s, float("-inf"))
        elif mask == "causal_additive":
            s = s + torch.full((lq, lk), float("-inf")).triu(1 + lk - lq)
        elif mask == "causal_arange":
            i, j = torch.arange(lq)[:, None], torch.arange(lk)[None, :]
            s = s.masked_fill(j > i + (lk - lq), float("-inf"))
        elif mask == "kv_cache":
            s = s.masked_fill(future, float("-inf"))
        elif mask == "window":
            i, j = torch.arange(lq)[:, None], torch.arange(lk)[None, :]
            s = s.masked_fill((j > i) | (j <= i - window), float("-inf"))
        elif mask in ("padding_bool", "empty_rows"):
            s = s.masked_fill(~per_key(rest[0]), float("-inf"))
        elif mask == "causal_padding":
            s = s.masked_fill(future, float("-inf"))
            s = s.masked_fill(~per_key(rest[0]), torch.finfo(s.dtype).min)
        elif mask == "padding_bias":
            s = s + (1 - per_key(rest[0])) * torch.finfo(s.dtype).min
        elif mask == "finite_fill":
            s = s.masked_fill(future, fill_value)
        elif mask == "fill_and_padding_bias":  # item 3 of issue 13: bf16 -1e4 fill, then a -1e4 padding bias
            s = s.masked_fill(future, fill_value)
            s = s + (1 - per_key(rest[0]).to(s.dtype)) * -1e4
        elif mask == "bias_tensor":
            s = s + (rest[0] if not three_d else rest[0].repeat(s.shape[0] // rest[0].shape[0], 1, 1))
        elif mask == "alibi_causal":
            b = rest[0] if not three_d else rest[0].repeat(s.shape[0] // rest[0].shape[0], 1, 1)
            s = (s + b).masked_fill(future, float("-inf"))
        elif mask in ("hf_causal", "hf_window", "hf_padding"):
            # transformers 5's eager mask: where(AND of position / padding terms, 0, finfo.min), expanded
            i, j = torch.arange(lq)[:, None], torch.arange(lk)[None, :]
            allowed = (j <= i + (lk - lq))[None, None]
            if mask == "hf_window":
                allowed = allowed & (j > i + (lk - lq) - window)[None, None]
            if mask == "hf_padding":
                allowed = allowed & rest[0][:, None, None, :]
            allowed = allowed.expand(q.shape[0], 1, lq, lk)
            bias = torch.where(allowed, torch.zeros((), dtype=s.dtype), torch.finfo(s.dtype).min)
            s = s + (bias if not three_d else bias.expand(q.shape[0], s.shape[0] // q.shape[0], lq, lk).reshape(
                s.shape[0], lq, lk))
        elif mask == "buffer":
            if how == "eq0":
                s = s.masked_fill(buf[:, :, :lq, :lk].reshape(-1, lq, lk) == 0 if three_d
                                  else buf[:, :, :lq, :lk] == 0, float("-inf"))
            elif how == "bool_where":
                s = torch.where(buf[:lq, :lk], s, float("-inf"))
            else:
                s = s + buf[:lq, :lk].to(s.dtype)
        if upcast == "softmax_dtype":
            p = F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype)
        elif upcast == "float":
            p = s.float().softmax(-1).to(q.dtype)
        elif upcast == "written_out":   # exp(s - max) / sum, as some reference code writes softmax
            e = torch.exp(s - s.amax(-1, keepdim=True))
            p = e / e.sum(-1, keepdim=True)
        elif upcast == "post_normalized":   # normalized after the contraction: z divides the output
            p = torch.exp(s - s.amax(-1, keepdim=True))
            z = p.sum(-1, keepdim=True)
        elif upcast == "post_normalized_sink":   # fla's sink form: the sink logit in the max and the sum
            c = rest[-1][:, None]                             # (H, 1): one logit per head, over the rows
            mx = torch.maximum(s.max(dim=-1).values, c)
            p = torch.exp(s - mx[..., None])
            z = (p.sum(-1) + torch.exp(c - mx))[..., None]
        elif upcast == "cat_sink":   # cat([s, column], -1), softmax, the column's probability dropped
            col = rest[-1]
            if col.dim() == 1:
                col = col[None, :, None, None].expand(s.shape[0], -1, s.shape[2], 1)
            c = torch.cat([s, col], dim=-1)
            p = F.softmax(c.float() if sink_cast else c, dim=-1)[..., :-1].to(q.dtype)
        else:
            p = s.softmax(dim=-1)
        if spelling == "einsum":
            o = torch.einsum("bhij,bhjd->bhid", p, v)
        elif three_d:  # (B·H, Lq, Lk) probabilities, values reshaped the same way, heads split after
            o = torch.bmm(p, v.reshape(-1, v.shape[-2], v.shape[-1]))
            o = (o / z if upcast == "post_normalized" else o).reshape(q.shape[0], -1, lq, v.shape[-1])
        else:
            o = p @ v
        if upcast.startswith("post_normalized") and not three_d:
            o = o / z
        return o.transpose(1, 2).reshape(o.shape[0], lq, -1) if tail == "blhd" else o

    if buffer is not None:
        mask = f"buffer_{pattern}_{how}"
        fn = _WithBuffer(fn, buffer)
    name = f"{spelling}+{mask}" + (f"+gqa{gqa}" if gqa > 1 else "") + ("+softcap" if softcap else "") + \
        ("+strided" if strided else "") + (f"+scale{scale}" if scale <= 0 else "") + \
        (f"+{upcast}" if upcast != "none" else "") + ("+blhd_out" if tail == "blhd" else "") + \
        ((("/per_query" if sink_per_query else "") + ("/float" if sink_cast else "")) if upcast == "cat_sink" else "")
    expect = "attention"
    if upcast.startswith("post_normalized") and dt == torch.float16:
        expect = None  # the unnormalized product can overflow in fp16 where softmax's does not: left alone
    elif upcast not in ("none", "post_normalized", "post_normalized_sink", "cat_sink") and dt == torch.float64:
        expect = None  # a narrowing cast of the scores: a near miss
    elif upcast == "cat_sink" and sink_cast and dt == torch.float64:
        expect = None
    if fill_value is not None and not math.isfinite(float(torch.tensor(fill_value, dtype=torch.float64).to(dt))):
        expect = None  # masked_fill raises
    inputs = [q, k, v, *extra]
    if upcast == "post_normalized_sink":   # one logit per head, after the mask's operand
        inputs.append(m.randn(H, grad=r.random() < 0.6))
    elif upcast == "cat_sink":
        inputs.append(m.randn(*((B, H, Lq, 1) if sink_per_query else (H,)), grad=r.random() < 0.6))
    return Case("attention", name + (f"+{tag}" if tag else ""), fn, tuple(inputs), expect,
                {"runtime": "triton"} if triton else _options(r), seed)


class _WithBuffer(torch.nn.Module):
    """A program whose mask is a module buffer: Dynamo lifts ``self.mask`` as a graph input from
    ``_buffers['mask']``, the spelling seqfuse reads by value under a value guard."""

    def __init__(self, fn, mask):
        super().__init__()
        self.fn = fn
        self.register_buffer("mask", mask)

    def forward(self, *args):
        return self.fn(*args, buf=self.mask)


def sdpa(r, seed, triton):
    B, H, Lq, Lk, D = _sizes(r, triton)
    dt = r.choice(DTYPES)
    m = Maker(r, dt)
    gqa = r.choice((1, 1, 2)) if H % 2 == 0 else 1
    causal = r.random() < 0.4
    kind = r.choice(("none", "bool", "float", "float32"))
    scale = r.choice((None, None, 0.3, -0.2))
    strided = r.random() < 0.15
    Dv = D if r.random() < 0.8 else size(r, 1, 16)
    if causal:
        kind = "none"
    q, k, v = m.randn(B, H, Lq, 2 * D if strided else D), m.randn(B, H // gqa, Lk, 2 * D if strided else D), \
        m.randn(B, H // gqa, Lk, 2 * Dv if strided else Dv)
    extra = []
    if kind == "bool":
        extra = [torch.rand(B, 1, Lq, Lk, generator=m.g) < 0.7]
    elif kind in ("float", "float32"):
        extra = [m.randn(B, 1, Lq, Lk, dtype=torch.float32 if kind == "float32" else dt, grad=r.random() < 0.3)]
    tag = poison(r, [q, k, v])

    def fn(q, k, v, *rest):
        if strided:
            q, k, v = q[..., ::2], k[..., ::2], v[..., ::2]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=rest[0] if rest else None, is_causal=causal,
                                              scale=scale, enable_gqa=gqa > 1)
    name = f"sdpa+{kind}" + ("+causal" if causal else "") + (f"+gqa{gqa}" if gqa > 1 else "") + \
        ("+strided" if strided else "")
    return Case("attention", name + (f"+{tag}" if tag else ""), fn, (q, k, v, *extra), None,
                {"runtime": "triton"} if triton else _options(r), seed)


def _options(r):
    return r.choice(({}, {}, {}, {"runtime": "aten"}, {"runtime": "eager"}))


def cases(rng: random.Random, n: int, triton: bool) -> Iterator[Case]:
    """``n`` random attention programs (tiny sizes and ``runtime="triton"`` when ``triton``)."""
    for i in range(n):
        seed = rng.randrange(2 ** 31)
        r = random.Random(seed)
        gen = hand_written if r.random() < 0.75 else sdpa
        yield gen(r, seed, triton)
