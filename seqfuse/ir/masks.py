"""The structural masks an attention op's attributes describe (shared by passes and lowerings)."""
from __future__ import annotations

import math

import torch


def position_mask(lq: int, lk: int, mask: str, diag: int = 0, window: int = 0, device=None) -> torch.Tensor | None:
    """Bool (Lq, Lk) tensor, True where query i may attend key j; None for mask="none".

    causal: j <= i + diag;  window: i + diag - window < j <= i + diag.
    """
    if mask == "none":
        return None
    if mask not in ("causal", "window"):
        raise ValueError(f"position_mask: mask must be none|causal|window, got {mask!r}")
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    allowed = j <= i + diag
    if mask == "window":
        allowed &= j > i + diag - window
    return allowed


def classify_mask(allowed: torch.Tensor) -> tuple[str, int, int] | None:
    """(kind, diag, window) when the bool (Lq, Lk) matrix is exactly a none / causal /
    sliding-window mask; None otherwise (then it stays a tensor mask)."""
    if allowed.dim() != 2 or allowed.dtype != torch.bool:
        return None
    lq, lk = allowed.shape
    if bool(allowed.all()):
        return ("none", 0, 0)
    rows = allowed.any(dim=1)
    if not bool(rows.any()):
        return None
    idx = torch.arange(lk)
    hi = torch.where(allowed, idx, -1).max(dim=1).values   # last allowed key per row
    lo = torch.where(allowed, idx, lk).min(dim=1).values   # first allowed key per row
    # the diagonal offset from a row whose upper end is not clipped by Lk
    unclipped = torch.nonzero(rows & (hi < lk - 1)).flatten()
    if unclipped.numel() == 0:
        return None
    r = int(unclipped[0])
    diag = int(hi[r]) - r
    if torch.equal(allowed, position_mask(lq, lk, "causal", diag)):
        return ("causal", diag, 0)
    last = int(torch.nonzero(rows).flatten()[-1])
    window = last + diag - int(lo[last]) + 1
    if window >= 1 and torch.equal(allowed, position_mask(lq, lk, "window", diag, window)):
        return ("window", diag, window)
    return None


# exp(x) is exactly 0 in fp32 (the widest dtype a fused path accumulates softmax in)
# for every x below this; fp16/bf16 exp underflows earlier.
_EXP_ZERO_BELOW = -110.0


def finite_fill_is_structural(scale: float, head_dim: int, q_absmax: float, k_absmax: float,
                              fill: float, dtype: torch.dtype) -> str | None:
    """Why an additive finite-fill mask (0 where kept, ``fill`` where masked, added to the
    scores in ``dtype``) may NOT be replaced by a structural mask for one call; None when it may.

    The program computes ``t = round_dtype(s + fill)`` at masked positions, not a replacement.
    Given finite q and k with ``|s| <= B = |scale|·head_dim·q_absmax·k_absmax`` (Cauchy-Schwarz
    per element), ``t <= fill + B + ulp(fill)`` (or ``-inf`` on overflow), and every kept score is
    ``>= -B``; so ``t - rowmax <= fill + 2B + ulp`` and ``exp`` of it is exactly 0 when that is
    below ``_EXP_ZERO_BELOW``.  This holds only for rows that keep at least one key: the caller
    must also know no row is fully masked (a fully masked row is a uniform softmax in the program).

    scale, fill: Python floats; head_dim: int; q_absmax, k_absmax: max |q|, max |k| of the call
    (floats, NaN or inf when the operands are not finite); dtype: the dtype ``s + fill`` is summed in.
    """
    if not (math.isfinite(q_absmax) and math.isfinite(k_absmax) and math.isfinite(scale)):
        return "q, k or the scale is not finite (s + fill keeps NaN / inf where a mask would drop it)"
    return fill_dominates(abs(scale) * head_dim * q_absmax * k_absmax, fill, dtype)


def fill_dominates(bound: float, fill: float, dtype: torch.dtype) -> str | None:
    """The rule of :func:`finite_fill_is_structural` for a known bound ``|s| <= bound`` on every
    score of the call (any valid bound: ``|scale|·max_i‖q_i‖·max_j‖k_j‖`` is the tight one a runtime
    check computes); None when ``exp(round_dtype(s + fill) - rowmax)`` is exactly 0 for every masked
    score of every row that keeps a key, else the reason it may not be."""
    if not math.isfinite(fill) or fill >= 0:
        return f"fill {fill!r} is not a finite negative number"
    if not math.isfinite(bound):
        return "q, k or the scale is not finite (s + fill keeps NaN / inf where a mask would drop it)"
    if dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        return f"s + fill summed in {dtype}"
    info = torch.finfo(dtype)
    if bound >= info.max / 4:
        return f"scores bound {bound:.3g} may overflow {dtype}"
    ulp = abs(fill) * info.eps  # spacing of dtype near |fill| (an upper bound)
    if fill + 2 * bound + ulp >= _EXP_ZERO_BELOW:
        return f"scores bound {bound:.3g} too close to |fill| {abs(fill):.3g} in {dtype}"
    return None
