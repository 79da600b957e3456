"""Reference implementation of seqfuse.attention: the eager fallback and the test oracle."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from seqfuse.ir.masks import position_mask
from seqfuse.runtime.values import all_finite


def attention_reference(q, k, v, bias=None, keep=None, *, scale=None, mask="none", diag=0, window=0,
                        fill=-math.inf, bias_after_mask=False, gqa_groups=1, softcap=None, dropout=0.0,
                        empty_rows="nan", sink=None, return_lse=False):
    """softmax(masked(scale·q·kᵀ + bias))·v computed in fp32 (fp64 for fp64 inputs).

    Shapes: q (*B, Lq, D); k (*Bkv, Lk, D); v (*Bkv, Lk, Dv); bias and keep
    broadcastable to (*B, Lq, Lk).  Returns out (*B, Lq, Dv) in v's dtype, and with
    ``return_lse`` also lse (*B, Lq) fp32, the log-sum-exp of each row's final scores.
    A row whose every score is -inf gives NaN (``empty_rows="nan"``) or 0 (``"zero"``).
    ``sink`` (float, broadcastable to (*B, Lq)): one more logit per row in the softmax's
    denominator, with no value (gpt-oss' attention sinks): the probabilities of the keys sum to
    less than 1 and the lse includes it.
    Dropout draws from the global RNG exactly as ``F.dropout`` on the
    probabilities does in the user's program.
    """
    # 1. GQA: query head h reads key/value head h // gqa_groups
    if gqa_groups > 1:
        k = k.repeat_interleave(gqa_groups, dim=-3)
        v = v.repeat_interleave(gqa_groups, dim=-3)
    # 2. scores s[i, j] = scale · Σ_d q[i, d] k[j, d], accumulated in at least fp32
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    acc = torch.promote_types(q.dtype, torch.float32)  # fp32 accumulation, fp64 stays fp64
    # with a NaN / inf among 16-bit inputs the two products run in their dtype, as the program's do:
    # CPU GEMMs for bf16/fp16 spread a NaN row to the rows packed with it (forward and backward),
    # and the program's NaN positions are the contract
    as_program = q.dtype in (torch.float16, torch.bfloat16) and q.dtype == k.dtype == v.dtype and \
        not bool(all_finite(q, k, v))
    if as_program:
        s = torch.matmul(q, k.transpose(-2, -1)).to(acc) * scale
    else:
        s = torch.matmul(q.to(acc), k.to(acc).transpose(-2, -1)) * scale
    # 3. logit soft-capping
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    # 4. additive bias, then masked positions replaced by `fill` (or the other order).  A bias in a
    #    16-bit dtype was added in that dtype by the program: the scores and each sum are rounded to
    #    it (at -1e4 or finfo.min a bf16/fp16 sum keeps a few bits of s, or overflows to -inf)
    low = bias.dtype if bias is not None and bias.dtype in (torch.float16, torch.bfloat16) else None
    if low is not None:
        s = s.to(low)
        fill = float(torch.tensor(fill, dtype=torch.float64).to(low))  # as the program's fill (±inf past the range)
    if bias is not None and not bias_after_mask:
        s = s + bias.to(s.dtype)
    allowed = position_mask(q.shape[-2], k.shape[-2], mask, diag, window, q.device)
    if keep is not None:
        allowed = keep if allowed is None else allowed & keep
    if allowed is not None:
        s = s.masked_fill(~allowed, fill)
    if bias is not None and bias_after_mask:
        s = s + bias.to(s.dtype)
    s = s.to(acc)
    # 5. probabilities over keys, in fp32 (rows with no key left: NaN, or zero without NaN gradients);
    #    a sink is one more column of the softmax, dropped after it
    if sink is not None:
        column = sink.to(acc).unsqueeze(-1).expand(*s.shape[:-1], 1)
        s_all = torch.cat([s, column], dim=-1)
        lse = torch.logsumexp(s_all, dim=-1) if return_lse else None
        p = torch.softmax(s_all, dim=-1)[..., :-1]
        if dropout > 0.0:
            p = F.dropout(p, dropout, training=True)
        out = torch.matmul(p.to(v.dtype), v) if as_program else torch.matmul(p, v.to(acc)).to(v.dtype)
        return (out, lse) if return_lse else out
    lse = torch.logsumexp(s, dim=-1) if return_lse else None
    if empty_rows == "zero":
        empty = (s == -math.inf).all(dim=-1, keepdim=True)
        p = torch.softmax(s.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)
    else:
        p = torch.softmax(s, dim=-1)
    # 6. dropout on the probabilities
    if dropout > 0.0:
        p = F.dropout(p, dropout, training=True)
    # 7. out[i, e] = Σ_j p[i, j] v[j, e]
    if as_program:
        out = torch.matmul(p.to(v.dtype), v)
    else:
        out = torch.matmul(p, v.to(acc)).to(v.dtype)
    return (out, lse) if return_lse else out
