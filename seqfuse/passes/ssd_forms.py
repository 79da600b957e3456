"""Loop-free faces of linear recurrences (cumsum, chunked, quadratic masked, associative_scan) -> ssd / scan.

(Under construction: the recurrence issue fills this in.)
"""
from __future__ import annotations

from seqfuse.passes.registry import Pass, PassContext


class SSDFormsPass(Pass):
    """Recognize the closed forms of linear recurrences."""

    name = "ssd_forms"

    def run(self, ctx: PassContext) -> None:
        return None
