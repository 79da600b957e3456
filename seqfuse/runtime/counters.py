"""Counters of which runtime path ran each IR op, and why a faster path was not taken."""
from __future__ import annotations

import contextvars
from collections import Counter, defaultdict
from contextlib import contextmanager

from seqfuse import log

# kind -> path -> calls ; kind -> reason -> calls.  The only process-wide state of
# the runtime besides the kernel cache (DESIGN.md §4.9).
_CALLS: dict[str, Counter] = defaultdict(Counter)
_FALLBACKS: dict[str, Counter] = defaultdict(Counter)
#: per-context tallies (``seqfuse.explain`` opens one): (calls, fallbacks) pairs shaped like the above
_SINKS: contextvars.ContextVar[tuple] = contextvars.ContextVar("seqfuse_counter_sinks", default=())


def count_call(kind: str, path: str) -> None:
    """Record that one call of IR op ``kind`` ran on ``path`` ("triton", "cpu", "aten", "eager")."""
    calls = _CALLS[kind]
    if not calls[path]:  # the first such call since the last reset: say which path runs this op
        log.runtime.debug("%s runs on the %s path", kind, path)
    calls[path] += 1
    for sink, _ in _SINKS.get():
        sink[kind][path] += 1


def count_fallback(kind: str, reason: str) -> None:
    """Record why a call of ``kind`` did not run on the preferred path."""
    fbs = _FALLBACKS[kind]
    if not fbs[reason]:
        log.runtime.debug("%s: path not taken: %s", kind, reason)
    fbs[reason] += 1
    for _, sink in _SINKS.get():
        sink[kind][reason] += 1


def counters() -> dict[str, dict[str, int]]:
    """Calls per IR op kind and runtime path since the last reset, e.g.
    ``{"attention": {"triton": 0, "cpu": 0, "aten": 4, "eager": 0}}`` (every path listed)."""
    return _calls_table(_CALLS)


def _calls_table(calls: dict[str, Counter]) -> dict[str, dict[str, int]]:
    from seqfuse.runtime.dispatch import PATHS  # dispatch imports this module
    return {k: {p: c[p] for p in PATHS} for k, c in sorted(calls.items())}


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


class Tally:
    """The calls and fallbacks counted in one context (see :func:`counting`)."""

    def __init__(self):
        self._calls: dict[str, Counter] = defaultdict(Counter)
        self._fallbacks: dict[str, Counter] = defaultdict(Counter)

    def counters(self) -> dict[str, dict[str, int]]:
        return _calls_table(self._calls)

    def fallbacks(self) -> dict[str, dict[str, int]]:
        return {k: dict(c) for k, c in sorted(self._fallbacks.items())}


@contextmanager
def counting():
    """Within this block, the IR op calls made in this thread (or asyncio task) are also counted
    in the yielded :class:`Tally`, apart from other threads' calls (the process-wide
    ``counters()`` count everything)."""
    tally = Tally()
    token = _SINKS.set(_SINKS.get() + ((tally._calls, tally._fallbacks),))
    try:
        yield tally
    finally:
        _SINKS.reset(token)
