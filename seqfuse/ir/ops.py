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

KINDS = ("attention", "ssd", "scan", "long_conv", "delta")


def operand(optional: bool = False):
    """Declare a dataclass field as a graph operand (an fx.Node)."""
    if optional:
        return field(default=None, metadata={"role": "operand", "optional": True})
    return field(metadata={"role": "operand", "optional": False})


def attr(default: Any, omit_default: bool = False):
    """Declare a dataclass field as an attribute with a default value (``omit_default``: not printed
    while it has its default, for an attribute that only some ops of a kind carry)."""
    return field(default=default, metadata={"role": "attr", "omit_default": omit_default})


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
    attend, broadcastable to (*B, Lq, Lk)); optional ``sink`` (float, broadcastable to
    (*B, Lq)): attention sinks, one more logit per row in the softmax's denominator with no
    value (gpt-oss: a learned logit per head), so a row's key probabilities sum to less than 1
    and no row is empty.  With ``gqa_groups = g`` the head
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
      bias_mask   the bias restates the mask: it is 0 where ``mask`` and ``keep`` allow and one finite
                  negative fill elsewhere (transformers 5's eager ``where(keep, 0, finfo.min)``).  The op
                  computes ``s + bias`` alone (mask and keep are not applied again); a call may run the
                  mask instead of the bias where that is exact (docs/ir.md).  Printed only when true.
      out_transposed  the (B, H, Lq, Dv) result lies in (B, Lq, H, Dv) memory: set when the program
                  only transposes it back and makes that contiguous (``.transpose(1, 2).reshape(B, Lq,
                  H·Dv)``), which then costs no copy.  Printed only when true.
    """

    kind: ClassVar[str] = "attention"
    q: torch.fx.Node = operand()
    k: torch.fx.Node = operand()
    v: torch.fx.Node = operand()
    bias: torch.fx.Node | None = operand(optional=True)
    keep: torch.fx.Node | None = operand(optional=True)
    sink: torch.fx.Node | None = operand(optional=True)
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
    bias_mask: bool = attr(False, omit_default=True)
    out_transposed: bool = attr(False, omit_default=True)


@dataclass
class SSD(IROp):
    """A linear recurrence with a matrix state (the structured-state-space-duality family).

    Per batch b and head h, with the state S_t a (P, N) matrix::

        S_t = exp(a_t) ⊙ S_{t-1} + x_t ⊗ b_t        (S_{-1} = h0, or 0)
        y_t = S_t · c_t  (+ d ⊙ x_t)

    which is also y = (L ∘ C·Bᵀ)·X with L the 1-semiseparable decay mask
    L[t, s] = exp(a_{s+1} + … + a_t) for s <= t (DESIGN.md §2).

    Operands (printed in this order): x (B, T, H, P); b, c (B, T, H, N); a the log-decay: (B, T, H) for ``decay="scalar"`` (Mamba-2,
    RetNet, simple GLA), (B, T, H, N) for ``decay="vector"`` (GLA: a gate per key dim,
    multiplying S along N), or None for ``decay="none"`` (linear attention);
    optional d (H,) skip and h0 (B, H, P, N).
    Results (the IR node's value is the pair): y (B, T, H, P) and the final state (B, H, P, N),
    both in the promoted dtype of x, b, c.

    Attributes: ``decay`` (must agree with a's shape), ``chunk`` (chunk length of the chunked
    algorithm; set by passes/select).  Algorithms: "quadratic", "chunked", "recurrent".
    ``finite_only`` (printed only when true): the op equals the program it replaced only while ``a``
    is finite.  The program forms its decays as *differences* (``exp(G_i - G_j)`` of one cumulative
    sum G, ``w·(i - j)`` with a tensor w: ``-inf - (-inf) = NaN`` after a -inf log-decay, where every
    algorithm here resets the state exactly), or ``a`` is the log of a decay the program multiplies
    by (NaN for a negative one).  A call whose ``a`` is not finite refuses (``ProgramRequired``) and
    the compiled graph runs the program as written (docs/reliability.md, "NaN and inf").
    """

    kind: ClassVar[str] = "ssd"
    results: ClassVar[tuple[str, ...]] = ("y", "h")
    x: torch.fx.Node = operand()
    b: torch.fx.Node = operand()
    c: torch.fx.Node = operand()
    a: torch.fx.Node | None = operand(optional=True)
    d: torch.fx.Node | None = operand(optional=True)
    h0: torch.fx.Node | None = operand(optional=True)
    decay: str = attr("scalar")
    chunk: int = attr(64)
    finite_only: bool = attr(False, omit_default=True)


#: the dtypes a scan's states may be rounded to before its readout (Scan.readout_dtype)
READOUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def scan_y_dtype(dtype: torch.dtype, c_dtype: torch.dtype | None, readout_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of a scan's y: the operands' promoted ``dtype``, or, with a readout c whose
    states are rounded to ``readout_dtype`` first, promote(readout_dtype, c's dtype)."""
    if readout_dtype is None or c_dtype is None:
        return dtype
    return torch.promote_types(readout_dtype, c_dtype)


@dataclass
class Scan(IROp):
    """A diagonal (elementwise) linear recurrence along the time axis, which is axis -2::

        h_t = a_t ⊙ h_{t-1} + b_t                  h_t: (*R, N), h_{-1} = h0 or 0
        y_t = Σ_n c_t[n] · h_t[n]   with a readout c, else y_t = h_t

    Operands: a, b broadcastable to (*R, T, N) (a may be complex: LRU); optional c
    broadcastable to (*R, T, N) (Mamba-1's C, shared over channels through an expand) and
    h0 (*R, N).  Results (the IR node's value is the pair): y, (*R, T) with a readout, else
    (*R, T, N); and the final state h (*R, N) (the state at t = 0 when ``reverse``).

    The *discretized* (selective-scan) form keeps the (*R, T, N) decays and inputs factored:
    with the optional real operands dt and u (broadcastable to (*R, T, N)) the step's decay and
    input are::

        a_t ← exp(dt_t ⊙ a_t)    when dt is given (a then holds log-decays: Mamba's A)
        b_t ← b_t ⊙ dt_t ⊙ u_t   (a missing factor is 1)

    so Mamba-1's exp(Δ·A) and Δ·B·x are formed inside the kernels from (B, D, T), (D, N) and
    (B, T, N) operands instead of being materialized at (B, D, T, N) (passes/scan_discretize).

    ``readout_dtype`` (with a readout only; printed when set): the program rounds the states to
    this dtype before reading them out (transformers' Mamba in bf16: ``h.to(bf16) @ C``), so
    y_t = Σ_n c_t[n]·round(h_t[n]), accumulated in fp32, and y is in promote(readout_dtype,
    c.dtype); the final state keeps the promoted dtype of the operands.

    Attributes: ``reverse`` runs t = T-1 … 0.  Algorithms: "recurrent" (sequential; a
    generated C kernel on CPU), "chunked" (log-depth scan within chunks, a pass over chunks).
    """

    kind: ClassVar[str] = "scan"
    results: ClassVar[tuple[str, ...]] = ("y", "h")
    a: torch.fx.Node = operand()
    b: torch.fx.Node = operand()
    c: torch.fx.Node | None = operand(optional=True)
    h0: torch.fx.Node | None = operand(optional=True)
    dt: torch.fx.Node | None = operand(optional=True)
    u: torch.fx.Node | None = operand(optional=True)
    reverse: bool = attr(False)
    readout_dtype: torch.dtype | None = attr(None, omit_default=True)


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


@dataclass
class Delta(IROp):
    """The delta rule: a linear recurrence with a matrix state whose update is a rank-1 correction
    (DeltaNet, Gated DeltaNet in Qwen3-Next / OLMo hybrids, KDA in Kimi Linear; Comba and GDN-2 with a
    read key p; IPLR, DPLR and RWKV-7 with an erase key e).

    Per batch b and head h, with the state S_t a (K, V) matrix::

        S_t = α_t ⊙ S_{t-1}                               α_t = exp(g_t) (gate), rows of S for a vector gate
        S_t = S_t + k_t ⊗ β_t (v_t − S_tᵀ k_t)           = (I − β_t k_t k_tᵀ)·diag(α_t)·S_{t-1} + β_t k_t ⊗ v_t
        y_t = scale · S_tᵀ q_t                            (S_{-1} = h0, or 0)

    With a read key ``p`` the correction reads the state with p instead of k (Comba's ``p``, GDN-2's
    erase key ``b ⊙ k``)::

        S_t = S_t + k_t ⊗ β_t (v_t − S_tᵀ p_t)           = (I − β_t k_t p_tᵀ)·diag(α_t)·S_{t-1} + β_t k_t ⊗ v_t

    With an erase key ``e`` the correction writes along e instead of k (IPLR, DPLR, RWKV-7), and with
    ``read="previous"`` it reads the state before this step's decay (DPLR, RWKV-7)::

        S_t = α_t ⊙ S_{t-1} + β_t k_t ⊗ v_t − β_t e_t ⊗ (R_tᵀ p_t)     R_t = α_t ⊙ S_{t-1} | S_{t-1}

    Operands (printed in this order): q, k (B, T, H, K); v (B, T, H, V); beta (B, T, H); g the log-decay:
    (B, T, H) for ``gate="scalar"`` (Gated DeltaNet), (B, T, H, K) for ``gate="vector"`` (KDA), None for
    ``gate="none"`` (DeltaNet); optional h0 (B, H, K, V); optional p and e (B, T, H, K), None meaning k.
    Results (the IR node's value is the pair): y (B, T, H, V) and the final state (B, H, K, V), both in
    the promoted dtype of the operands.

    Attributes: ``gate`` (must agree with g's shape), ``scale`` (multiplies the readout), ``chunk``
    (chunk length of the chunked algorithm; set by passes/select).  Algorithms: "recurrent", "chunked".
    ``finite_only`` (printed only when true): as SSD's; the program is a chunked form whose decays are
    ``exp(γ_i - γ_j)`` of a cumulative sum, so a call whose g is not finite runs it as written.
    """

    kind: ClassVar[str] = "delta"
    results: ClassVar[tuple[str, ...]] = ("y", "h")
    q: torch.fx.Node = operand()
    k: torch.fx.Node = operand()
    v: torch.fx.Node = operand()
    beta: torch.fx.Node = operand()
    g: torch.fx.Node | None = operand(optional=True)
    h0: torch.fx.Node | None = operand(optional=True)
    p: torch.fx.Node | None = operand(optional=True)
    e: torch.fx.Node | None = operand(optional=True)
    gate: str = attr("scalar")
    scale: float = attr(1.0)
    chunk: int = attr(64)
    finite_only: bool = attr(False, omit_default=True)
    read: str = attr("decayed", omit_default=True)


OP_CLASSES: dict[str, type[IROp]] = {c.kind: c for c in (Attention, SSD, Scan, LongConv, Delta)}


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
