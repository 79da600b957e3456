"""Rewrite passes: the registry, pattern helpers, one recognizer per mixer family, and select.

Built-in recognizers are registered here, in the order they run.
"""
from seqfuse.passes.attention import AttentionPass
from seqfuse.passes.long_conv import LongConvPass
from seqfuse.passes.registry import (Pass, PassContext, enabled_passes, register_pass, registered_passes,
                                     unregister_pass)
from seqfuse.passes.select import SelectPass

register_pass(AttentionPass())
register_pass(LongConvPass())

__all__ = ["Pass", "PassContext", "register_pass", "unregister_pass", "registered_passes", "enabled_passes",
           "AttentionPass", "LongConvPass", "SelectPass"]
