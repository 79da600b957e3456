"""IR op declarations.

Each IR op is a dataclass whose fields are either *operands* (graph values:
``torch.fx.Node`` or ``None`` for an absent optional input) or *attributes*
(plain Python values; a few may be symbolic ``Node`` values such as a scale
that depends on a dynamic head dimension).  An op lives in the canonical FX
graph as a ``call_function`` node whose target is the op's marker function
(:func:`ir_marker`) and whose ``meta["seqfuse_ir"]`` holds the dataclass; the
lowering stage later retargets that node to the matching custom op.

The printed form (see :mod:`seqfuse.ir.printer`) is the contract FileCheck
tests rely on::

    %o = seqfuse.attention(%q, %k, %v) {scale=0.125, mask=causal, diag=0, ...}
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch.fx

KINDS = ("attention", "ssd", "scan", "long_conv")


def operand(optional: bool = False):
    """Declare a dataclass field as a graph operand (an fx.Node)."""
    if optional:
        return field(default=None, metadata={"role": "operand", "optional": True})
    return field(metadata={"role": "operand", "optional": False})


def attr(default: Any):
    """Declare a dataclass field as an attribute with a default value."""
    return field(default=default, metadata={"role": "attr"})


@dataclass
class IROp:
    """Base class of all IR ops: operands, attributes and the chosen algorithm."""

    kind: ClassVar[str] = ""
    #: names of the op's results, in order (used by the printer)
    results: ClassVar[tuple[str, ...]] = ("out",)
    #: algorithm chosen by ``passes/select`` (or the recognizer's default)
    algorithm: str = field(default="auto", metadata={"role": "algorithm"}, kw_only=True)

    def operands(self) -> list[tuple[str, torch.fx.Node | None]]:
        """(name, value) for every operand field, optional ones included."""
        return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)
                if f.metadata.get("role") == "operand"]

    def attributes(self) -> list[tuple[str, Any]]:
        """(name, value) for every attribute field, in declaration order."""
        return [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)
                if f.metadata.get("role") == "attr"]

    @classmethod
    def operand_fields(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if f.metadata.get("role") == "operand"]

    @classmethod
    def attr_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls) if f.metadata.get("role") == "attr"]


@dataclass
class Attention(IROp):
    """softmax(mask(scale·q·kᵀ [softcapped] + bias)) · v, with dropout on the probabilities.

    Operands: q (*B, Lq, D); k (*Bkv, Lk, D); v (*Bkv, Lk, Dv); optional
    ``bias`` (float, broadcastable to (*B, Lq, Lk)) and ``keep`` (bool, True =
    attend, broadcastable to (*B, Lq, Lk)).  With ``gqa_groups = g`` the head
    axis (the last batch axis) of k/v has H/g entries; q head h reads kv head h // g.

    Attributes:
      scale       float, or a symbolic value node; None means 1/sqrt(D)
      mask        "none" | "causal" | "window": a structural mask on positions
      diag        key j may be attended from query i iff j <= i + diag
      window      for mask="window": also j > i + diag - window
      fill        value that masked scores are replaced with (-inf by default)
      bias_after_mask  the bias is added after the masked fill (only matters for finite fill)
      gqa_groups  query heads per key/value head
      softcap     c·tanh(s/c) applied to the scaled scores, or None
      dropout     dropout probability applied to the probabilities
      empty_rows  what a query whose every key is masked gets: "nan" (the softmax of all -inf,
                  as hand-written attention gives) or "zero" (F.scaled_dot_product_attention's rule)
    """

    kind: ClassVar[str] = "attention"
    q: torch.fx.Node = operand()
    k: torch.fx.Node = operand()
    v: torch.fx.Node = operand()
    bias: torch.fx.Node | None = operand(optional=True)
    keep: torch.fx.Node | None = operand(optional=True)
    scale: Any = attr(None)
    mask: str = attr("none")
    diag: int = attr(0)
    window: int = attr(0)
    fill: float = attr(-math.inf)
    bias_after_mask: bool = attr(False)
    gqa_groups: int = attr(1)
    softcap: float | None = attr(None)
    dropout: float = attr(0.0)
    empty_rows: str = attr("nan")


@dataclass
class SSD(IROp):
    """y = (L ∘ C·Bᵀ)·X, the structured-state-space-duality family (declared; recognized in a later issue).

    Operands: x (B, T, H, P); a (B, T, H) log-decay per step (or (B, T, H, N) for
    vector gates); b (B, T, H, N); c (B, T, H, N); optional d (H,) skip and
    initial state h0 (B, H, P, N).  Results: y (B, T, H, P) and the final state.
    """

    kind: ClassVar[str] = "ssd"
    results: ClassVar[tuple[str, ...]] = ("y", "h")
    x: torch.fx.Node = operand()
    a: torch.fx.Node = operand()
    b: torch.fx.Node = operand()
    c: torch.fx.Node = operand()
    d: torch.fx.Node | None = operand(optional=True)
    h0: torch.fx.Node | None = operand(optional=True)
    decay: str = attr("scalar_per_head")
    chunk: int = attr(64)


@dataclass
class Scan(IROp):
    """h_t = a_t ⊙ h_{t-1} + b_t along ``dim``, with optional readout y_t = Σ_n c_t·h_t (declared).

    Operands: a, b of the same shape (…, T, …); optional c (readout) and h0.
    """

    kind: ClassVar[str] = "scan"
    a: torch.fx.Node = operand()
    b: torch.fx.Node = operand()
    c: torch.fx.Node | None = operand(optional=True)
    h0: torch.fx.Node | None = operand(optional=True)
    dim: int = attr(1)
    state: str = attr("diagonal")
    reverse: bool = attr(False)


@dataclass
class LongConv(IROp):
    """y = act(scale·(u ⊛ k)[..., :L] + bias + d·u) · gate: a long (or short) convolution along the last axis.

    Operands: u (*B, L); k broadcastable to (*B, Lk) (per channel, shared, or per batch);
    optional ``d`` (skip, broadcastable to u), ``gate`` (broadcastable to y) and ``bias``
    (a conv1d's per-channel bias, broadcastable to y, e.g. (C, 1)).

    Attributes:
      causal      True: y[t] = Σ_{s<=t} k[s]·u[t-s] (linear convolution, any FFT size ≥ L+Lk-1
                  or the direct algorithm computes it); False: circular convolution of size fft_size
      fft_size    the program's FFT length N (0 when it was written as a direct convolution)
      scale       constant factor of the program's normalization (1.0 for a plain convolution)
      activation  "none" | "silu", applied after the skip, before the gate
    """

    kind: ClassVar[str] = "long_conv"
    u: torch.fx.Node = operand()
    k: torch.fx.Node = operand()
    d: torch.fx.Node | None = operand(optional=True)
    gate: torch.fx.Node | None = operand(optional=True)
    bias: torch.fx.Node | None = operand(optional=True)
    causal: bool = attr(True)
    fft_size: Any = attr(0)
    scale: float = attr(1.0)
    activation: str = attr("none")


OP_CLASSES: dict[str, type[IROp]] = {c.kind: c for c in (Attention, SSD, Scan, LongConv)}


def ir_marker(*args, **kwargs):
    """Target of an un-lowered IR node.  Running it is a bug: lowering retargets every IR node."""
    raise RuntimeError("seqfuse: an IR node reached execution without being lowered")


def graph_values(op: IROp) -> list[tuple[str, torch.fx.Node]]:
    """(field, node) for every graph value the op reads (operands, then symbolic attributes),
    in the order they are the arguments of the op's node."""
    return [(k, v) for k, v in op.operands() + op.attributes() if isinstance(v, torch.fx.Node)]


def ir_of(node: torch.fx.Node) -> IROp | None:
    """The IR op a graph node carries, or None.

    The node's arguments are the source of truth for the values it reads (passes may
    replace them, e.g. when an operand is itself rewritten into an IR op): the op's
    fields are brought up to date from them before the op is returned.
    """
    op = node.meta.get("seqfuse_ir")
    if op is not None and node.target is ir_marker:
        values = graph_values(op)
        if len(values) == len(node.args):
            for (name, _), arg in zip(values, node.args):
                setattr(op, name, arg)
    return op
