"""Re-roll Dynamo-unrolled Python loops over time and lift linear ones to scan / ssd.

(Under construction: the recurrence issue fills this in.)
"""
from __future__ import annotations

from seqfuse.passes.registry import Pass, PassContext


class LoopPass(Pass):
    """Find unrolled time loops; rewrite those whose carried update is linear in the state."""

    name = "loops"

    def run(self, ctx: PassContext) -> None:
        return None
