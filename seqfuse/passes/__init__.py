"""Rewrite passes: the registry, pattern helpers, one recognizer per mixer family, and select.

Built-in recognizers are registered here, in the order they run.
"""
from seqfuse.passes.attention import AttentionPass
from seqfuse.passes.delta import DeltaPass
from seqfuse.passes.delta_blocks import DeltaBlocksPass
from seqfuse.passes.long_conv import LongConvPass
from seqfuse.passes.loop_map import MapLoopPass
from seqfuse.passes.loops import LoopPass
from seqfuse.passes.mlstm_loop import MLSTMLoopPass
from seqfuse.passes.registry import (Pass, PassContext, enabled_passes, register_pass, registered_passes,
                                     unregister_pass)
from seqfuse.passes.scan_discretize import ScanDiscretizePass
from seqfuse.passes.scan_readout import ScanReadoutPass
from seqfuse.passes.scan_tree import ScanTreePass
from seqfuse.passes.select import SelectPass
from seqfuse.passes.ssd_chunks import ChunkedSSDPass
from seqfuse.passes.ssd_forms import SSDFormsPass
from seqfuse.passes.ssd_stabilized import StabilizedChunksPass
from seqfuse.passes.toeplitz import ToeplitzPass
from seqfuse.passes.triangular import TriangularPass

# First: xLSTM's chunkwise mLSTM is proven as a whole program (its chunk loop, the buffers it fills, the
# intra-chunk form that reads them); the loop passes would otherwise report its stabilized loop as a near miss.
register_pass(StabilizedChunksPass())
# Its recurrent form (transformers' mLSTM step, unrolled over time) next, before the loop passes, which
# would report its stabilizer, a running maximum, as a near miss.
register_pass(MLSTMLoopPass())
# Map loops next (a buffer written slice by slice, nothing carried: fla builds its chunk matrices column
# by column): vectorized, an inner loop no longer splits the steps of the loop around it, which
# delta and loops then re-roll, and delta reads the matrices as whole-tensor expressions.
register_pass(MapLoopPass())
# Delta-rule loops before loops: their update is linear but not elementwise (a rank-1 correction
# read through a contraction with the key), which the loops pass would report as a near miss; this
# pass claims exactly the loops whose update it proves to be the delta rule and leaves every other
# loop (elementwise-linear or not delta-like) untouched for loops.
# DeltaNet's blocked (parallel) form carries no state, so no loop of it is the delta rule: its chunk
# pieces and its walk back over the earlier chunks are proven as a whole.  Before delta (which would
# report its unrolled loops as near misses) and triangular (it reads the UT inverse's forward
# substitution as the program writes it).
register_pass(DeltaBlocksPass())
register_pass(DeltaPass())
# Right after delta: a forward substitution (the UT inverse of a chunked WY program) that delta did not
# lift with its program becomes one triangular solve.
register_pass(TriangularPass())
# Loops first: re-rolling an unrolled time loop must see the loop body before any other
# recognizer rewrites a piece of one step (a step's readout is an einsum, for instance).
register_pass(LoopPass())
register_pass(AttentionPass())
register_pass(LongConvPass())
# After long_conv (its FFT and conv1d spellings are direct matches) and before the ssd passes,
# which read causal masked products: a Toeplitz matrix built from a kernel is a convolution.
register_pass(ToeplitzPass())
# After attention: a softmax-free (q·kᵀ ∘ M)·v is only an ssd once attention has declined it.
# Whole chunked programs first: ssd_forms would otherwise lift their intra-chunk term alone.
register_pass(ChunkedSSDPass())
register_pass(SSDFormsPass())
# Last: generic associative_scan's tree (step-2 slices, pointwise combines, cat, interleave) holds
# no einsum, softmax, conv, cumsum or HOP, so no recognizer above matches inside it; and the tree
# is proven node for node, so a piece rewritten by another pass would be a near miss, never wrong.
register_pass(ScanTreePass())
# After every scan producer (loops, ssd_forms' HOPs, scan_tree): a scan that returns all its states
# only for them to be contracted with c (and its last one read) takes c as its readout.
register_pass(ScanReadoutPass())
# Last of all: a scan from any producer whose decays exp(Δ·A) and inputs Δ·B·x are products only it
# reads keeps them factored (dt, u), so they are formed in the kernels, never at the state's size.
register_pass(ScanDiscretizePass())

__all__ = ["Pass", "PassContext", "register_pass", "unregister_pass", "registered_passes", "enabled_passes",
           "AttentionPass", "DeltaPass", "DeltaBlocksPass", "MapLoopPass", "LongConvPass", "ToeplitzPass", "LoopPass", "ChunkedSSDPass", "SSDFormsPass",
           "StabilizedChunksPass", "ScanTreePass",
           "ScanReadoutPass", "ScanDiscretizePass", "SelectPass", "TriangularPass"]
