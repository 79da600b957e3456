"""Counters of which runtime path ran each IR op, and why a faster path was not taken."""
from __future__ import annotations

from collections import Counter, defaultdict

# kind -> path -> calls ; kind -> reason -> calls.  The only process-wide state of
# the runtime besides the kernel cache (DESIGN.md §4.9).
_CALLS: dict[str, Counter] = defaultdict(Counter)
_FALLBACKS: dict[str, Counter] = defaultdict(Counter)


def count_call(kind: str, path: str) -> None:
    """Record that one call of IR op ``kind`` ran on ``path`` ("triton", "cpu", "aten", "eager")."""
    _CALLS[kind][path] += 1


def count_fallback(kind: str, reason: str) -> None:
    """Record why a call of ``kind`` did not run on the preferred path."""
    _FALLBACKS[kind][reason] += 1


def counters() -> dict[str, dict[str, int]]:
    """Calls per IR op kind and runtime path since the last reset, e.g.
    ``{"attention": {"triton": 0, "cpu": 0, "aten": 4, "eager": 0}}`` (every path listed)."""
    from seqfuse.runtime.dispatch import PATHS  # dispatch imports this module
    return {k: {p: c[p] for p in PATHS} for k, c in sorted(_CALLS.items())}


def fallbacks() -> dict[str, dict[str, int]]:
    """Reasons a faster path was skipped, per IR op kind, with call counts."""
    return {k: dict(c) for k, c in sorted(_FALLBACKS.items())}


def reset_counters() -> None:
    """Zero all counters."""
    _CALLS.clear()
    _FALLBACKS.clear()


def snapshot() -> tuple[dict, dict]:
    """(counters(), fallbacks()) at this moment, for computing a difference later."""
    return counters(), fallbacks()
