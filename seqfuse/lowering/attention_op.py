"""seqfuse::attention as a torch.library custom op: fake impl, autograd, runtime dispatch.

    seqfuse::attention(q, k, v, bias?, keep?, <attributes>, nonce, runtime, sink?) -> (out, lse, rng_state)
    seqfuse::attention_backward(grad_out, q, k, v, bias?, keep?, out, lse, rng_state, <attributes>,
                                runtime, need_dbias, sink?) -> (dq, dk, dv, dbias, dsink)

``nonce`` differs between the dropout calls of one graph, so common-subexpression
elimination (which knows ATen's random ops, not ours) cannot merge two of them into
one dropout mask.  ``lse`` (*B, Lq, fp32; fp64 for fp64 inputs) is the log-sum-exp of each row of final scores, kept for
the backward.  ``rng_state`` is the generator state captured before dropout
(empty when dropout is 0), so the backward regenerates the same dropout mask.
dbias is an empty tensor unless requested.  ``sink`` (per-row logits, broadcastable to (*B, Lq)) is
one more term of each row's softmax denominator with no value (attention sinks); it comes last so
that calls without it keep their arguments, reaches the implementations as ``attrs["sink"]``
(``supports`` sees it in ``tensors``), and its gradient is computed here for every path:
dsink = -Σ_rows exp(sink - lse)·Δ with Δ = rowsum(dO·O), since ∂p_ij/∂sink = -p_ij·p_sink.

Implementations, one per runtime path, are registered with the dispatcher:
``forward(q, k, v, bias, keep, attrs) -> (out, lse)`` and
``backward(grad_out, q, k, v, bias, keep, out, lse, rng_state, attrs) -> (dq, dk, dv, dbias)``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from seqfuse.ir.masks import fill_dominates
from seqfuse.lowering.aten import attention as aten_attention
from seqfuse.lowering.autograd import as_result, autograd_inside_op
from seqfuse.lowering.reference.attention import attention_reference
from seqfuse.runtime import Impl, all_finite, below_pos_inf, register_impl, run
from seqfuse.runtime.counters import count_fallback

ATTR_NAMES = ("scale", "mask", "diag", "window", "fill", "bias_after_mask", "gqa_groups", "softcap", "dropout",
              "empty_rows")


def _attrs(scale, mask, diag, window, fill, bias_after_mask, gqa_groups, softcap, dropout, empty_rows) -> dict:
    return dict(scale=scale, mask=mask, diag=diag, window=window, fill=fill, bias_after_mask=bias_after_mask,
                gqa_groups=gqa_groups, softcap=softcap, dropout=dropout, empty_rows=empty_rows)


def _rng_state(device: torch.device) -> Tensor:
    if device.type == "cuda":
        return torch.cuda.get_rng_state(device)
    return torch.get_rng_state()


def _rng_numel(device: torch.device) -> int:
    return 16 if device.type == "cuda" else torch.get_rng_state().numel()


@torch.library.custom_op("seqfuse::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], keep: Optional[Tensor],
              scale: Optional[float], mask: str, diag: int, window: int, fill: float, bias_after_mask: bool,
              gqa_groups: int, softcap: Optional[float], dropout: float, empty_rows: str, nonce: int,
              runtime: str, sink: Optional[Tensor] = None, bias_mask: bool = False,
              out_transposed: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Fused attention; see seqfuse.ir.ops.Attention for the math.  Returns (out, lse, rng_state)."""
    a = _attrs(scale, mask, diag, window, fill, bias_after_mask, gqa_groups, softcap, dropout, empty_rows)
    a["sink"] = sink
    a["out_transposed"] = out_transposed
    if bias_mask:
        bias, keep, a = resolve_bias_mask(q, k, v, bias, keep, a)
    rng = _rng_state(q.device) if dropout > 0.0 else torch.empty(0, dtype=torch.uint8)
    t = dict(q=q, k=k, v=v, bias=bias, keep=keep, sink=sink)
    out, lse = run("attention", "forward", runtime, t, a, q, k, v, bias, keep, a)
    # the layouts the fake implementation promises
    return as_result(out.to(v.dtype), empty_out(q, v, out_transposed), (q, k, v)), \
        lse.to(lse_dtype(q)).contiguous(), rng


def lse_dtype(q: Tensor) -> torch.dtype:
    """The dtype of the log-sum-exp the op keeps for its backward: fp32, fp64 for fp64 inputs (an fp32 lse
    would round exp(s - lse) and the sink's gradient to fp32 in an fp64 program)."""
    return torch.promote_types(q.dtype, torch.float32)


def empty_out(q: Tensor, v: Tensor, transposed: bool = False) -> Tensor:
    """The output buffer every path returns (the fake implementation's promise): (*B, Lq, Dv),
    contiguous as the program's ``p @ v`` returns it; with ``transposed`` (the op's
    ``out_transposed``, 4-D only), (B, Lq, H, Dv) memory seen as (B, H, Lq, Dv).  The layout depends
    on the op's attributes only, never on the inputs' strides (inductor may hand the op inputs with
    other strides than it traced), and is the program's wherever a consumer could see the memory
    order (a ``F.dropout`` on the output draws its mask in memory order)."""
    if transposed:
        b, h, l, _ = q.shape
        return q.new_empty((b, l, h, v.shape[-1]), dtype=v.dtype).transpose(1, 2)
    return q.new_empty([*q.shape[:-1], v.shape[-1]], dtype=v.dtype)


@attention.register_fake
def _(q, k, v, bias, keep, scale, mask, diag, window, fill, bias_after_mask, gqa_groups, softcap, dropout,
      empty_rows, nonce, runtime, sink=None, bias_mask=False, out_transposed=False):
    n = _rng_numel(q.device) if dropout > 0.0 else 0
    out = empty_out(q, v, out_transposed)
    lse = q.new_empty(q.shape[:-1], dtype=lse_dtype(q))
    return out, lse, torch.empty(n, dtype=torch.uint8)


@torch.library.custom_op("seqfuse::attention_backward", mutates_args=())
def attention_backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor],
                       keep: Optional[Tensor], out: Tensor, lse: Tensor, rng_state: Tensor, scale: Optional[float],
                       mask: str, diag: int, window: int, fill: float, bias_after_mask: bool, gqa_groups: int,
                       softcap: Optional[float], dropout: float, empty_rows: str, runtime: str,
                       need_dbias: bool, sink: Optional[Tensor] = None,
                       bias_mask: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv, dbias, dsink) of seqfuse::attention; dbias is empty unless need_dbias,
    dsink empty without a sink."""
    a = _attrs(scale, mask, diag, window, fill, bias_after_mask, gqa_groups, softcap, dropout, empty_rows)
    if bias_mask:
        # decided again from the same tensors (the forward's choice unless the bias gradient is asked
        # for: then the bias is kept, so dbias below is laid out like the input bias)
        bias, keep, a = resolve_bias_mask(q, k, v, bias, keep, a, need_dbias, grad_out)
    a["need_dbias"] = need_dbias
    a["sink"] = sink
    t = dict(q=q, k=k, v=v, bias=bias, keep=keep, lse=lse, sink=sink)
    dq, dk, dv, dbias = run("attention", "backward", runtime, t, a, grad_out, q, k, v, bias, keep, out, lse,
                            rng_state, a)
    # gradients in the layouts the fake implementation promises (those of the inputs)
    like = lambda x, g: torch.empty_like(x).copy_(g)  # noqa: E731
    dsink = like(sink, sink_grad(grad_out, out, lse, sink, a["dropout"])) if sink is not None else q.new_empty(0)
    return like(q, dq), like(k, dk), like(v, dv), (like(bias, dbias) if need_dbias else q.new_empty(0)), dsink


def sink_grad(grad_out: Tensor, out: Tensor, lse: Tensor, sink: Tensor, dropout: float) -> Tensor:
    """d loss / d sink = -Σ exp(sink - lse)·Δ over the rows each sink logit reaches, Δ = rowsum(dO·O)
    in fp32 (fp64 for fp64); the probabilities of the keys are p_ij = exp(s_ij - lse_i), with the
    sink inside lse_i, so ∂p_ij/∂sink_i = -p_ij·exp(sink_i - lse_i) and Σ_j p_ij·dP_ij = Δ_i.
    With dropout, O is the dropped output and Δ = Σ_j (p_ij·keep_ij/(1-p))·dP_ij is still rowsum(dO·O)."""
    acc = torch.promote_types(out.dtype, torch.float32)
    delta = (grad_out.to(acc) * out.to(acc)).sum(-1)
    p_sink = torch.exp(sink.to(acc).expand(lse.shape) - lse.to(acc))
    return (-(p_sink * delta)).sum_to_size(sink.shape).to(sink.dtype)


@attention_backward.register_fake
def _(grad_out, q, k, v, bias, keep, out, lse, rng_state, scale, mask, diag, window, fill, bias_after_mask,
      gqa_groups, softcap, dropout, empty_rows, runtime, need_dbias, sink=None, bias_mask=False):
    dbias = torch.empty_like(bias) if (need_dbias and bias is not None) else q.new_empty(0)
    dsink = torch.empty_like(sink) if sink is not None else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dbias, dsink


def _setup_context(ctx, inputs, output):
    q, k, v, bias, keep, *attrs, nonce, runtime, sink, bias_mask, _out_transposed = inputs
    ctx.attrs = attrs
    ctx.runtime = runtime
    ctx.bias_mask = bias_mask
    ctx.save_for_backward(q, k, v, bias, keep, output[0], output[1], output[2], sink)


def _backward(ctx, grad_out, grad_lse, grad_rng):
    q, k, v, bias, keep, out, lse, rng, sink = ctx.saved_tensors
    need_dbias = bias is not None and ctx.needs_input_grad[3]
    # inputs: q, k, v, bias, keep, *attrs, nonce, runtime, sink, bias_mask, out_transposed: sink is not
    # the last input, so count from the front
    need_dsink = sink is not None and ctx.needs_input_grad[7 + len(ctx.attrs)]
    dq, dk, dv, dbias, dsink = torch.ops.seqfuse.attention_backward(
        grad_out.contiguous(), q, k, v, bias, keep, out, lse, rng, *ctx.attrs, ctx.runtime, need_dbias, sink,
        ctx.bias_mask)
    return (dq, dk, dv, (dbias if need_dbias else None), None, *([None] * (len(ctx.attrs) + 2)),
            dsink if need_dsink else None, None, None)


attention.register_autograd(_backward, setup_context=_setup_context)


# --- an additive mask that restates the structural mask (bias_mask) ------------

def resolve_bias_mask(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, keep: Optional[Tensor], a: dict,
                      need_dbias: bool = False,
                      grad_out: Optional[Tensor] = None) -> tuple[Optional[Tensor], Optional[Tensor], dict]:
    """The (bias, keep, attrs) one call of a ``bias_mask`` op runs with: the structural mask and keep
    with no bias where that gives the program's numbers (then every path may skip masked tiles), else
    the bias alone (``s + bias`` as the program adds it; mask and keep are restated by it).

    The program adds ``where(allowed, 0, fill)`` to the scores.  Replacing it by the mask is exact for
    this call when the masked probabilities are exactly 0 in the program (``ir.masks.fill_dominates``
    with the bound ``|s| <= |scale|·max‖q_i‖·max‖k_j‖``, finite q and k) and no row is fully masked
    (the program's softmax is uniform there), and when no NaN could reach a masked position: v (the
    program's ``0·inf`` at a masked key is NaN) and, in the backward, ``grad_out`` (its NaN reaches
    the masked scores' gradient through the bias, not through a mask) must be finite.  The other
    case is counted in ``seqfuse.fallbacks()``."""
    reason = "the bias gradient is requested" if need_dbias else _bias_mask_reason(q, k, v, bias, a, grad_out)
    if reason is None:
        return None, keep, a
    count_fallback("attention", f"mask: {reason}; the additive mask runs as a bias")
    return bias, None, dict(a, mask="none", diag=0, window=0)


def _bias_mask_reason(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, a: dict,
                      grad_out: Optional[Tensor]) -> str | None:
    if bias.numel() == 0 or q.numel() == 0 or k.numel() == 0:
        return "empty inputs"
    finite = aten_attention.finite_sum
    if not finite(v) or (grad_out is not None and not finite(grad_out)):
        return "v or the output gradient is not finite (the program's NaN reaches masked positions)"
    bound = abs(aten_attention.scale_of(q, a)) * aten_attention.max_row_norm(q) * aten_attention.max_row_norm(k)
    if a["softcap"] is not None and math.isfinite(bound):
        bound = min(bound, abs(float(a["softcap"])))
    # the bias is 0 where kept and one fill elsewhere (the pass proved it): its minimum is the fill
    reason = fill_dominates(bound, float(bias.amin()), bias.dtype)
    if reason is None and bool((bias.amax(dim=-1) < 0).any()):
        reason = "a row keeps no key (the program's softmax is uniform over all keys there)"
    return reason


# --- implementations, one per runtime path ---------------------------------

def _is_sdpa_call(q, k, v, bias, keep, scale=None, mask="none", diag=0, window=0, fill=-math.inf,
                  bias_after_mask=False, gqa_groups=1, softcap=None, dropout=0.0, empty_rows="nan") -> bool:
    """Whether the op is a lifted ``F.scaled_dot_product_attention`` call that SDPA can run as written
    (``empty_rows="zero"`` is set only by the lift, which keeps the program's mask tensor and is_causal)."""
    return (empty_rows == "zero" and dropout == 0.0 and softcap is None and fill == -math.inf
            and not bias_after_mask and mask in ("none", "causal") and diag == 0 and q.dim() >= 3
            and q.dim() == k.dim() == v.dim() and (mask == "none" or (bias is None and keep is None)))


def _nonfinite(q, k, v, bias) -> bool:
    ok = all_finite(q, k, v)
    if bias is not None:  # a -inf bias is a mask
        ok = ok & below_pos_inf(bias).to(ok.device)
    return not bool(ok)


def eager_attention(q, k, v, bias=None, keep=None, sink=None, **attrs):
    """The eager path (out only): the reference, except for a lifted SDPA call with a NaN or inf
    input, which runs SDPA itself: the program's SDPA decides where such values reach (its CPU
    kernels skip or add masked keys' scores), and no other formula reproduces that."""
    if sink is None and sdpa_decides(q, k, v, bias, keep, attrs):
        return aten_attention.attention_sdpa(q, k, v, bias, keep, **attrs)
    return attention_reference(q, k, v, bias, keep, sink=sink, **attrs)


def sdpa_decides(q, k, v, bias, keep, attrs) -> bool:
    """Whether a lifted SDPA call must run as SDPA itself: NaN / inf inputs, or is_causal with a
    scale <= 0 (SDPA's CPU kernel gives NaN rows there; the program is what SDPA returns)."""
    if not _is_sdpa_call(q, k, v, bias, keep, **attrs):
        return False
    scale = attrs["scale"]
    if attrs["mask"] == "causal" and scale is not None and float(scale) <= 0.0:
        return True
    return _nonfinite(q, k, v, bias)


def _reference_forward(q, k, v, bias, keep, a):
    attrs = {n: a[n] for n in ATTR_NAMES}
    out, lse = attention_reference(q, k, v, bias, keep, return_lse=True, sink=a.get("sink"), **attrs)
    if a.get("sink") is None and sdpa_decides(q, k, v, bias, keep, attrs):
        out = aten_attention.attention_sdpa(q, k, v, bias, keep, **attrs)
    return out, lse


def _recompute_backward(fn):
    """Backward by recomputation: rerun ``fn`` (out-only contract) under autograd with the
    forward's RNG state, then differentiate."""
    def backward(grad_out, q, k, v, bias, keep, out, lse, rng_state, a):
        need_dbias = a["need_dbias"]
        with autograd_inside_op():
            q_, k_, v_ = (x.detach().requires_grad_(True) for x in (q, k, v))
            b_ = bias.detach().requires_grad_(need_dbias) if bias is not None else None
            devices = [q.device] if q.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices, enabled=a["dropout"] > 0.0):
                if a["dropout"] > 0.0:
                    if q.device.type == "cuda":
                        torch.cuda.set_rng_state(rng_state, q.device)
                    else:
                        torch.set_rng_state(rng_state)
                extra = {"sink": a["sink"]} if a.get("sink") is not None else {}
                recomputed = fn(q_, k_, v_, b_, keep, **extra, **{n: a[n] for n in ATTR_NAMES})
            inputs = [q_, k_, v_] + ([b_] if need_dbias else [])
            grads = torch.autograd.grad(recomputed, inputs, grad_out, allow_unused=True)
        grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, inputs)]
        dbias = grads[3] if need_dbias else q.new_empty(0)
        return grads[0], grads[1], grads[2], dbias
    return backward


_aten_recompute = _recompute_backward(aten_attention.attention_sdpa)


def _aten_backward(grad_out, q, k, v, bias, keep, out, lse, rng_state, a):
    fused = aten_attention.backward(grad_out, q, k, v, bias, keep, out, lse, a)
    if fused is None:
        return _aten_recompute(grad_out, q, k, v, bias, keep, out, lse, rng_state, a)
    return (*fused, q.new_empty(0))


#: largest |lse| the flash backward is trusted with: it recomputes P = exp(s - lse) from an fp32
#: lse, whose rounding (up to 2^-24·|lse|) scales a whole row of P; at |lse| = 256 that is 2^-17,
#: within the fp32 programs' own error, at 2500 (scores of 10³) ten times beyond it
_LSE_LIMIT = {torch.float32: 256.0, torch.float16: 16384.0, torch.bfloat16: 16384.0}


def _aten_supports(t: dict, a: dict) -> str | None:
    if t.get("sink") is not None:
        return "attention sinks (ATen's fused kernels have no sink logit in the softmax)"
    if a.get("need_dbias"):
        return "bias gradient runs on the reference"
    lse = t.get("lse")
    if lse is not None and t["q"].dtype == torch.float32 and t["v"].shape[-1] < 16:
        # dS = P·(dP − Δ) cancels on nearly one-hot rows and fewer than 16 value channels average
        # nothing (fuzzer seed 121 attention #188, head dim 3 with a window: dk 12x eager's error)
        return "fp32 flash backward with a value head dim below 16 (dP − Δ cancels on near one-hot rows)"
    if lse is not None and t["q"].dtype in (torch.float16, torch.bfloat16):
        # the backward's δ = rowsum(dO·O) reads the output rounded to 16 bits, and dp − δ cancels:
        # dq came out 5.5x eager's error (fuzzer, seed 61 attention #904, fp16 with head dim 1)
        return "16-bit flash backward: δ = rowsum(dO·O) from the rounded output loses dq's precision"
    if lse is not None and lse.numel():
        top = float(lse.abs().masked_fill(lse.isinf(), 0).amax())
        if top > _LSE_LIMIT.get(t["q"].dtype, 256.0):
            return f"row log-sum-exp up to {top:.3g}: the flash backward's P = exp(s - lse) would lose precision"
    return aten_attention.supports(t, a)


register_impl("attention", Impl("eager", lambda t, a: None, _reference_forward,
                                _recompute_backward(eager_attention)))
register_impl("attention", Impl("aten", _aten_supports, aten_attention.forward, _aten_backward))

# the generated Triton kernels, tried first (its ``supports`` refuses when triton cannot run the call)
from seqfuse.lowering.triton import attention as triton_attention  # noqa: E402

triton_attention.register()
