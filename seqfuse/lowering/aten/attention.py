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


#: 16-bit dtypes: a bias in one of them was added to the scores in that dtype (docs/ir.md, "Rounded
#: scores"); the fused kernels add it in fp32, which differs from the program's rounded sum by more
#: than the program's own rounding error once the row's largest allowed bias is this large
_ROUNDED_BIAS_LIMIT = {torch.bfloat16: 32.0, torch.float16: 256.0}


def scale_of(q, a) -> float:
    """The call's score scale as a Python float (1/√D when the op's scale is None)."""
    return float(a["scale"]) if a["scale"] is not None else 1.0 / math.sqrt(q.shape[-1])


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a check reduces ``x`` in: fp32, fp64 for an fp64 x (a narrowing reduction raises)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def max_row_norm(x: torch.Tensor) -> float:
    """max over rows of ‖x[..., i, :]‖ in fp32 (fp64 for an fp64 x): NaN or inf when x has a NaN or
    inf (or overflows)."""
    return float(torch.linalg.vector_norm(x, dim=-1, dtype=_acc_dtype(x)).amax())


def finite_sum(x: torch.Tensor) -> bool:
    """Whether the sum of x (fp32, fp64 for an fp64 x) is finite: False when x has a NaN or inf (or
    the sum overflows, a conservative answer)."""
    return math.isfinite(float(x.sum(dtype=_acc_dtype(x))))


def call_reason(t: dict, a: dict, fill_as_neg_inf: float | None = None, empty_rows_exact: bool = False) -> str | None:
    """What every fused kernel (ATen's, seqfuse's Triton) assumes about one call's *values*, checked
    against the op's semantics (docs/ir.md), or None when the call meets it.  The kernels skip tiles
    the structural mask empties and add masks instead of replacing scores, so:

    - a NaN / inf in q, k or v: the program propagates it (NaN rows, 0·inf products with masked
      keys' values, inf + -inf at an additive mask); the kernels may drop it: refused (one fp32
      norm per row of q and k and a sum of v: O(L·D) next to the kernels' O(L²·D));
    - a NaN or +inf in the bias: refused for the same reason (-inf is a mask and fine);
    - a finite ``fill`` that the kernel treats as -inf (``fill_as_neg_inf``): only when no allowed
      score can come within exp-underflow of it, |s| <= |scale|·max‖q_i‖·max‖k_j‖;
    - a bias added in a 16-bit dtype (the program rounds s + bias there): only while every row's
      largest allowed bias is small enough for the rounding to stay at the program's own level;
    - rows the keep / bias tensors empty: the kernels return 0 there, the program NaN
      (unless ``empty_rows="zero"``, the rule of SDPA, or the kernel follows the op's rule:
      ``empty_rows_exact``).
    """
    check_empty = a.get("empty_rows") != "zero" and not empty_rows_exact
    q, k, v, bias, keep = t["q"], t["k"], t["v"], t["bias"], t["keep"]
    qn, kn = max_row_norm(q), max_row_norm(k)
    if not (math.isfinite(qn) and math.isfinite(kn) and math.isfinite(float(v.sum(dtype=torch.float32)))):
        return "q, k or v holds a NaN or inf (the program propagates it; the kernels skip masked tiles)"
    bound = abs(scale_of(q, a)) * qn * kn          # |s[i, j]| <= bound
    if fill_as_neg_inf is not None and a["fill"] != -math.inf:
        if a["fill"] + 2.0 * bound > -110.0:
            return f"fill={a['fill']} is within exp-underflow range of the scores (|s| <= {bound:.3g})"
    if bias is None and keep is None:
        return None
    allowed = _cached_position_mask(q.shape[-2], k.shape[-2], a["mask"], a["diag"], a["window"], q.device)
    if keep is not None:
        allowed = keep if allowed is None else allowed & keep
    if bias is not None:
        top = bias.amax() if bias.numel() else None
        if top is not None and not bool(top < math.inf):
            return "the bias holds a NaN or +inf"
        b = bias if allowed is None else torch.where(allowed, bias, -math.inf)
        row_max = b.amax(dim=-1) if b.shape[-1] else b.new_full(b.shape[:-1], -math.inf)
        if check_empty and bool((row_max == -math.inf).any()):
            return "a mask tensor leaves a row empty (the fused kernels return 0 there, the program NaN)"
        limit = _ROUNDED_BIAS_LIMIT.get(bias.dtype)
        if limit is not None and a["fill"] != -math.inf:
            return f"a finite fill with a {bias.dtype} bias (the program rounds the filled scores plus the bias)"
        if limit is not None:
            finite = row_max[row_max > -math.inf]
            if finite.numel() and float(finite.abs().amax()) > limit:
                return (f"a {bias.dtype} bias up to {float(finite.abs().amax()):.3g} on a row's allowed keys: "
                        "the program rounds s + bias to that dtype")
    elif check_empty and not bool(allowed.any(dim=-1).all()):
        return "a mask tensor leaves a row empty (the fused kernels return 0 there, the program NaN)"
    return None


def supports(t: dict, a: dict) -> str | None:
    """None if the ATen kernels compute exactly this call, else the reason they do not."""
    q, k, v = t["q"], t["k"], t["v"]
    if a["dropout"] > 0.0:
        return "dropout runs on the reference to follow the program's RNG stream"
    if a["softcap"] is not None:
        return "softcap is not supported by scaled_dot_product_attention"
    if q.dim() < 3:
        return f"rank {q.dim()} inputs"
    if k.dim() != q.dim() or v.dim() != q.dim():
        return f"q, k, v of ranks {q.dim()}, {k.dim()}, {v.dim()}"
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or not (q.dtype == k.dtype == v.dtype):
        return f"dtypes {q.dtype}/{k.dtype}/{v.dtype}"
    if t["bias"] is not None and t["bias"].dtype != q.dtype:
        return f"bias dtype {t['bias'].dtype} differs from q's {q.dtype} (the kernel adds it in q's dtype)"
    if q.shape[-2] == 0 or k.shape[-2] == 0 or q.shape[-1] == 0 or v.shape[-1] == 0 or q.numel() == 0 \
            or k.numel() == 0:
        return "empty inputs (the CPU flash kernel divides by zero)"
    if not isinstance(a["scale"], (int, float, type(None))) or scale_of(q, a) <= 0.0 or \
            not math.isfinite(scale_of(q, a)):
        return f"scale={a['scale']} is not positive (the flash kernel's causal tile skipping assumes it)"
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
    if t["v"].shape[:-2] != k.shape[:-2]:
        return "k and v batch axes differ"
    if a["gqa_groups"] > 1 and q.dim() < 4:
        return "GQA needs inputs of rank 4 or more (a batch and a head axis)"
    if _kv_batch(q, k, a["gqa_groups"]) is None:
        return "k/v batch axes do not broadcast to q's"
    if q.device.type != "cpu" and _folded(q, k, a["gqa_groups"]):
        return f"rank {q.dim()} or k/v broadcast over q's batch axes on {q.device.type} (folded for the CPU flash kernel only)"
    return call_reason(t, a, fill_as_neg_inf=_FILL_AS_NEG_INF)


def _kv_batch(q: torch.Tensor, k: torch.Tensor, g: int):
    """The batch axes k/v are expanded to for the flash kernels: q's, with the head axis divided by
    the GQA group size; None where k's do not broadcast to them (each axis 1 or the target's)."""
    target = list(q.shape[:-2])
    if g > 1:
        if q.dim() < 4 or target[-1] % g:
            return None
        target[-1] //= g
        kb = list(k.shape[:-2])
        if kb[-1] != target[-1]:  # the kv head axis is read by group, never broadcast
            return None
    kb = list(k.shape[:-2])
    if len(kb) != len(target) or any(c not in (1, b) for c, b in zip(kb, target)):
        return None
    return tuple(target)


def _fold(x: torch.Tensor, batch) -> torch.Tensor:
    """``x`` (*b, L, D) expanded to the batch axes ``batch`` (a copy only where it broadcasts) and
    viewed as the (N, H, L, D) the flash kernels take (5-D GQA programs, k/v broadcast over q's
    batch axes)."""
    x = x.expand(*batch, *x.shape[-2:])
    return x.reshape(-1, batch[-1], *x.shape[-2:]) if len(batch) >= 2 else x.reshape(1, -1, *x.shape[-2:])


def _folded(q: torch.Tensor, k: torch.Tensor, g: int) -> bool:
    """Whether the inputs need folding (rank above 4, or k/v broadcast over q's batch axes)."""
    return q.dim() > 4 or tuple(k.shape[:-2]) != _kv_batch(q, k, g)


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
    if _folded(q, k, g):
        kvb = _kv_batch(q, k, g)
        q4 = _unit_last(_fold(q, q.shape[:-2]))
        k4, v4 = _unit_last(_fold(k, kvb)), _unit_last(_fold(v, kvb))
        if m is not None:
            m = m.reshape((1,) * (q.dim() - m.dim()) + tuple(m.shape))
            if m.dim() > 4:
                m = m.expand(*q.shape[:-3], *m.shape[-3:]).reshape(-1, *m.shape[-3:])
    else:
        q4, k4, v4 = _to4d(_unit_last(q)), _to4d(_unit_last(k)), _to4d(_unit_last(v))
    if g > 1:
        k4, v4 = k4.repeat_interleave(g, dim=1), v4.repeat_interleave(g, dim=1)
    if m is not None:
        # the kernel reads the mask's rows with unit stride: a strided or key-broadcast mask is copied
        m = _to4d(m)
        if m.shape[-1] != k.shape[-2] or m.stride(-1) != 1:
            m = m.expand(*m.shape[:-1], k.shape[-2]).contiguous()
    return q4, k4, v4, is_causal, m


def _unit_last(x):
    """``x`` with a unit stride on its last axis (the CPU flash kernels read rows contiguously and
    return garbage for a sliced head dim such as ``x[..., ::2]``); a copy only when needed."""
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


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
    o4, g4 = (_unit_last(x.to(q.dtype)).reshape(*q4.shape[:-1], x.shape[-1]) for x in (out, grad_out))
    lse4 = lse.reshape(q4.shape[:-1])
    dq, dk, dv = _flash_cpu_backward(g4.contiguous(), q4, k4, v4, o4, lse4, 0.0, is_causal, attn_mask=m,
                                     scale=a["scale"])
    g = a["gqa_groups"]
    if g > 1:
        dk = dk.unflatten(1, (-1, g)).sum(2)
        dv = dv.unflatten(1, (-1, g)).sum(2)
    if _folded(q, k, g):  # k/v were expanded to their target batch axes: sum back over the broadcast ones
        kvb = _kv_batch(q, k, g)
        dk = dk.reshape(*kvb, *k.shape[-2:]).sum_to_size(k.shape)
        dv = dv.reshape(*kvb, *v.shape[-2:]).sum_to_size(v.shape)
    return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape)
