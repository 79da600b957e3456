"""seqfuse.attention on ATen's fused kernel (F.scaled_dot_product_attention).

Used where the op's attributes fit SDPA exactly; on CPU this is the fast path
(a flash-style kernel), on GPU it stands in until the Triton kernel of the
next issue takes over.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from seqfuse.ir.masks import position_mask

# A finite fill value at or below this behaves like -inf for the softmax as long
# as every row keeps at least one position: exp(fill - rowmax) underflows to 0.
_FILL_AS_NEG_INF = -1.0e4


def _rows_nonempty(lq: int, lk: int, mask: str, diag: int, window: int) -> bool:
    if mask == "none":
        return True
    if mask == "causal":
        return diag >= 0 and lk > 0
    return diag >= 0 and window >= 1 and (lq - 1 + diag - window + 1) <= lk - 1


def supports(t: dict, a: dict) -> str | None:
    """None if SDPA computes exactly this call, else the reason it does not."""
    q, k = t["q"], t["k"]
    if a["dropout"] > 0.0:
        return "dropout runs on the reference to follow the program's RNG stream"
    if a["softcap"] is not None:
        return "softcap is not supported by scaled_dot_product_attention"
    if q.dim() not in (3, 4):
        return f"rank {q.dim()} inputs"
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or not (q.dtype == k.dtype == t["v"].dtype):
        return f"dtypes {q.dtype}/{k.dtype}/{t['v'].dtype}"
    if a["fill"] != -math.inf:
        if a["fill"] > _FILL_AS_NEG_INF or t["keep"] is not None:
            return f"fill={a['fill']} with a mask that may empty a row"
    if not _rows_nonempty(q.shape[-2], k.shape[-2], a["mask"], a["diag"], a["window"]):
        return "a structural mask that leaves rows empty"
    if a["gqa_groups"] > 1 and q.dim() != 4:
        return "GQA needs rank-4 inputs"
    return None


_MASK_CACHE: dict = {}


def _cached_position_mask(lq, lk, mask, diag, window, device):
    key = (lq, lk, mask, diag, window, str(device))
    m = _MASK_CACHE.get(key)
    if m is None:
        if len(_MASK_CACHE) > 32:
            _MASK_CACHE.clear()
        m = _MASK_CACHE[key] = position_mask(lq, lk, mask, diag, window, device)
    return m


def attention_sdpa(q, k, v, bias=None, keep=None, *, scale=None, mask="none", diag=0, window=0,
                   fill=-math.inf, bias_after_mask=False, gqa_groups=1, softcap=None, dropout=0.0):
    """Same contract as ``attention_reference``, restricted to what ``supports`` accepts."""
    lq, lk = q.shape[-2], k.shape[-2]
    is_causal = mask == "causal" and diag == 0 and bias is None and keep is None
    attn_mask = None
    if not is_causal:
        allowed = _cached_position_mask(lq, lk, mask, diag, window, q.device)
        if keep is not None:
            allowed = keep if allowed is None else allowed & keep
        if bias is not None:
            attn_mask = bias.to(q.dtype)
            if allowed is not None:
                attn_mask = attn_mask.masked_fill(~allowed, -math.inf)
        else:
            attn_mask = allowed
    squeeze = q.dim() == 3
    if squeeze:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
        attn_mask = attn_mask.unsqueeze(0) if attn_mask is not None and attn_mask.dim() == 3 else attn_mask
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                         enable_gqa=gqa_groups > 1)
    return out.squeeze(0) if squeeze else out
