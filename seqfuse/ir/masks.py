"""The structural masks an attention op's attributes describe (shared by passes and lowerings)."""
from __future__ import annotations

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
