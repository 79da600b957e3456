"""seqfuse.attention on ATen's fused attention kernels.

Used where the op's attributes fit them exactly.  On CPU this is the fast
path: ATen's flash-attention CPU kernel, forward (which also returns the
log-sum-exp) and its fused backward.  On other devices it uses
``F.scaled_dot_product_attention`` until the Triton kernels take over there.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from seqfuse.ir.masks import position_mask

# A finite fill value at or below this behaves like -inf for the softmax as long
# as every row keeps at least one position: exp(fill - rowmax) underflows to 0.
_FILL_AS_NEG_INF = -1.0e4

_flash_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_cpu_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _rows_nonempty(lq: int, lk: int, mask: str, diag: int, window: int) -> bool:
    if mask == "none":
        return True
    if mask == "causal":
        return diag >= 0 and lk > 0
    return diag >= 0 and window >= 1 and (lq - 1 + diag - window + 1) <= lk - 1


def supports(t: dict, a: dict) -> str | None:
    """None if the ATen kernels compute exactly this call, else the reason they do not."""
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
        if t["bias"] is not None:
            return f"fill={a['fill']} with a bias that can bring allowed scores down to the fill"
    zero_rows = a.get("empty_rows") == "zero"  # the fused kernels' own rule for rows with no key
    if not zero_rows and not _rows_nonempty(q.shape[-2], k.shape[-2], a["mask"], a["diag"], a["window"]):
        return "a structural mask that leaves rows empty"
    if q.device.type == "cpu" and t["v"].shape[-1] != q.shape[-1]:
        return "value head dim differs from the query head dim (the CPU flash kernel needs them equal)"
    if not zero_rows and _tensor_mask_empties_a_row(q, k, t["bias"], t["keep"], a):
        return "a mask tensor leaves a row empty (the fused kernels return 0 there, the program NaN)"
    if a["gqa_groups"] > 1 and q.dim() != 4:
        return "GQA needs rank-4 inputs"
    kv_batch = list(k.shape[:-2])
    if kv_batch:
        kv_batch[-1] *= a["gqa_groups"]
    if kv_batch != list(q.shape[:-2]) or t["v"].shape[:-2] != k.shape[:-2]:
        return "k/v batch axes broadcast against q's"
    return None


def _tensor_mask_empties_a_row(q, k, bias, keep, a) -> bool:
    """Whether the keep / bias tensors (with the structural mask) mask every key of some query."""
    if keep is None and bias is None:
        return False
    allowed = _cached_position_mask(q.shape[-2], k.shape[-2], a["mask"], a["diag"], a["window"], q.device)
    if keep is not None:
        allowed = keep if allowed is None else allowed & keep
    if bias is not None:
        finite = bias > -math.inf
        allowed = finite if allowed is None else allowed & finite
    return not bool(allowed.any(dim=-1).all())


_MASK_CACHE: dict = {}


def _cached_position_mask(lq, lk, mask, diag, window, device):
    key = (lq, lk, mask, diag, window, str(device))
    m = _MASK_CACHE.get(key)
    if m is None:
        if len(_MASK_CACHE) > 32:
            _MASK_CACHE.clear()
        m = _MASK_CACHE[key] = position_mask(lq, lk, mask, diag, window, device)
    return m


def _sdpa_mask(q, k, bias, keep, mask, diag, window):
    """(is_causal, attn_mask) for SDPA: the structural mask, keep mask and bias combined."""
    if mask == "causal" and diag == 0 and bias is None and keep is None:
        return True, None
    allowed = _cached_position_mask(q.shape[-2], k.shape[-2], mask, diag, window, q.device)
    if keep is not None:
        allowed = keep if allowed is None else allowed & keep
    if bias is None:
        return False, allowed
    attn_mask = bias.to(q.dtype)
    if allowed is not None:
        attn_mask = attn_mask.masked_fill(~allowed, -math.inf)
    return False, attn_mask


def _to4d(x):
    return x if x is None or x.dim() >= 4 else x.reshape((1,) * (4 - x.dim()) + tuple(x.shape))


def attention_sdpa(q, k, v, bias=None, keep=None, *, scale=None, mask="none", diag=0, window=0,
                   fill=-math.inf, bias_after_mask=False, gqa_groups=1, softcap=None, dropout=0.0,
                   empty_rows="nan"):
    """Same contract as ``attention_reference`` (out only), restricted to what ``supports`` accepts."""
    is_causal, attn_mask = _sdpa_mask(q, k, bias, keep, mask, diag, window)
    squeeze = q.dim() == 3
    if squeeze:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
        attn_mask = _to4d(attn_mask)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                                         enable_gqa=gqa_groups > 1)
    return out.squeeze(0) if squeeze else out


def _flash_inputs(q, k, v, bias, keep, a):
    """4-D inputs, GQA expanded, and an additive float mask, as the CPU flash kernel wants them."""
    is_causal, m = _sdpa_mask(q, k, bias, keep, a["mask"], a["diag"], a["window"])
    if m is not None and m.dtype == torch.bool:
        m = torch.zeros(m.shape, dtype=q.dtype, device=q.device).masked_fill_(~m, -math.inf)
    g = a["gqa_groups"]
    q4, k4, v4 = _to4d(q), _to4d(k), _to4d(v)
    if g > 1:
        k4, v4 = k4.repeat_interleave(g, dim=1), v4.repeat_interleave(g, dim=1)
    return q4, k4, v4, is_causal, _to4d(m)


def forward(q, k, v, bias, keep, a):
    """(out, lse) of one call; lse (*B, Lq) fp32."""
    if q.device.type == "cpu":
        q4, k4, v4, is_causal, m = _flash_inputs(q, k, v, bias, keep, a)
        out, lse = _flash_cpu(q4, k4, v4, 0.0, is_causal, attn_mask=m, scale=a["scale"])
        return out.reshape(*q.shape[:-1], v.shape[-1]), lse.reshape(q.shape[:-1])
    # other devices: SDPA for the output; the log-sum-exp from the scores (interim, O(Lq·Lk) memory)
    from seqfuse.lowering.reference.attention import attention_reference
    names = ("scale", "mask", "diag", "window", "fill", "bias_after_mask", "gqa_groups", "softcap", "dropout",
             "empty_rows")
    out = attention_sdpa(q, k, v, bias, keep, **{n: a[n] for n in names})
    _, lse = attention_reference(q, k, v, bias, keep, return_lse=True, **{n: a[n] for n in names})
    return out, lse


def backward(grad_out, q, k, v, bias, keep, out, lse, a):
    """(dq, dk, dv) with the CPU flash backward; None where this device has no fused backward."""
    if q.device.type != "cpu":
        return None
    q4, k4, v4, is_causal, m = _flash_inputs(q, k, v, bias, keep, a)
    o4, g4 = _to4d(out.to(q.dtype)), _to4d(grad_out.to(q.dtype))
    lse4 = lse.reshape(q4.shape[:-1])
    dq, dk, dv = _flash_cpu_backward(g4.contiguous(), q4, k4, v4, o4, lse4, 0.0, is_causal, attn_mask=m,
                                     scale=a["scale"])
    g = a["gqa_groups"]
    if g > 1:
        dk = dk.unflatten(1, (-1, g)).sum(2)
        dv = dv.unflatten(1, (-1, g)).sum(2)
    return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape)
