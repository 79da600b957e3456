"""Sequence parallelism for ``ssd`` and ``scan``: one sequence split across the ranks of a group.

Rank r of W holds the contiguous slice r of the time axis.  A linear recurrence composes
over slices: the state entering slice r is

    S_in(r) = Σ_{j<r} (Π_{j<i<r} A_i) ⊙ h_j

with h_j slice j's final state computed from a zero state (slice 0: from the op's h0) and
A_j the product of slice j's decays.  So each rank

1. runs the op on its slice from a zero state:                     (y_loc, h_loc)
2. all-gathers the small pair (h_loc, log A) -- one collective, O(state), independent of T
3. folds the earlier ranks' pairs into S_in (later ranks' for a reversed scan)
4. corrects its outputs: y_t += c_t · (Π_{s<=t} a_s) ⊙ S_in, and its final state
   h = A ⊙ S_in + h_loc (a rank's final state is the state after its own slice; the
   last rank's is the whole sequence's).

Autograd differentiates the correction (torch ops) and the local op (its own backward);
the all-gather's backward is one all-reduce of the gathered pairs' gradients: one
collective per layer in the backward too.  Every rank's outputs depend on the gathered table
(the first rank's through a zero state), so every rank that differentiates through the op runs
the backward collective; as with DDP, every rank must differentiate through the same ops.  Both collectives are custom ops, opaque to the
downstream compiler, so a compiled graph keeps them in order on every rank.

The group is named by ``group_name`` (``ProcessGroup.group_name``; ``""`` for the default
group).  ``payload_bytes()`` counts the bytes this process sent through these collectives
(tests assert it does not grow with T).
"""
from __future__ import annotations

import threading
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from seqfuse.lowering import scan_op, ssd_op  # noqa: F401  (register torch.ops.seqfuse.ssd / scan)

_BYTES = threading.local()


class SequenceParallelUnsupported(ValueError):
    """The graph holds a mixer that seqfuse cannot run over a split sequence."""


def payload_bytes() -> int:
    """Bytes this thread has sent through the sequence-parallel collectives (forward and backward)."""
    return getattr(_BYTES, "n", 0)


def reset_payload_bytes() -> None:
    _BYTES.n = 0


def _count(t: Tensor) -> None:
    _BYTES.n = payload_bytes() + t.numel() * t.element_size()


def resolve_group(group_name: str):
    """The process group named ``group_name`` ("" is the default group)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("seqfuse sequence parallelism needs an initialized torch.distributed process group")
    if not group_name:
        return dist.group.WORLD
    from torch.distributed.distributed_c10d import _resolve_process_group
    return _resolve_process_group(group_name)


def group_name_of(group) -> str:
    """The name ``resolve_group`` takes back: "" for None / the default group."""
    if group is None or group is dist.group.WORLD:
        return ""
    return group.group_name


# --- the collective: all-gather forward, all-reduce backward ------------------------------

@torch.library.custom_op("seqfuse::sp_all_gather", mutates_args=())
def sp_all_gather(t: Tensor, group_name: str) -> Tensor:
    """(W, *t.shape): every rank's ``t``, in rank order."""
    group = resolve_group(group_name)
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    t = t.contiguous()
    _count(t)
    dist.all_gather(parts, t, group=group)
    return torch.stack(parts)


@sp_all_gather.register_fake
def _(t, group_name):
    world = dist.get_world_size(resolve_group(group_name))
    return t.new_empty((world, *t.shape))


@torch.library.custom_op("seqfuse::sp_all_gather_backward", mutates_args=())
def sp_all_gather_backward(grad: Tensor, group_name: str) -> Tensor:
    """The gradient of this rank's gathered slot: Σ over ranks of their gradient for it."""
    group = resolve_group(group_name)
    total = grad.contiguous().clone()
    _count(total)
    dist.all_reduce(total, group=group)
    return total[dist.get_rank(group)].clone()


@sp_all_gather_backward.register_fake
def _(grad, group_name):
    return grad.new_empty(grad.shape[1:])


def _gather_setup(ctx, inputs, output):
    ctx.group_name = inputs[1]


def _gather_backward(ctx, grad):
    return torch.ops.seqfuse.sp_all_gather_backward(grad, ctx.group_name), None


sp_all_gather.register_autograd(_gather_backward, setup_context=_gather_setup)


def _rank_world(group_name: str) -> tuple[int, int]:
    group = resolve_group(group_name)
    return dist.get_rank(group), dist.get_world_size(group)


def _zero_state(h_all: Tensor) -> Tensor:
    """A zero state that still depends on the gathered table: every rank's outputs then reach the
    all-gather, so every rank runs its backward collective (the first rank too, whose incoming
    state is zero), and the ranks' collectives stay matched.  Exactly zero even where the table
    holds inf or NaN (a select, not a product with 0)."""
    return torch.where(torch.zeros((), dtype=torch.bool, device=h_all.device), h_all[0], 0)


def _fold(h_all: Tensor, logA_all: Tensor, ranks) -> Tensor:
    """S ← A_j ⊙ S + h_j over ``ranks`` in order, from S = 0 (see ``_zero_state``)."""
    S = _zero_state(h_all)
    for j in ranks:
        S = torch.exp(logA_all[j]) * S + h_all[j]
    return S


# --- ssd ------------------------------------------------------------------------------------

def ssd_sequence_parallel(x: Tensor, b: Tensor, c: Tensor, a: Optional[Tensor], d: Optional[Tensor],
                          h0: Optional[Tensor], decay: str, chunk: int, algorithm: str, runtime: str,
                          finite_only: bool = False, group_name: str = "") -> tuple[Tensor, Tensor]:
    """``seqfuse.ssd`` on this rank's slice of a sequence split over the group (see the module doc).

    x (B, T_r, H, P); b, c (B, T_r, H, N); a (B, T_r, H) or (B, T_r, H, N) log-decays or None;
    d (H,); h0 (B, H, P, N) -- the whole sequence's initial state, used on rank 0 only.
    Returns y (B, T_r, H, P) and the state after this rank's slice (B, H, P, N).
    """
    rank, world = _rank_world(group_name)
    y_loc, h_loc = torch.ops.seqfuse.ssd(x, b, c, a, d, h0 if rank == 0 else None, decay, chunk, algorithm,
                                         runtime, finite_only)
    if world == 1:
        return y_loc, h_loc
    B, T, H, P = x.shape
    N = b.shape[-1]
    f32 = torch.float32
    # the decays' running sum over this slice: (B, T, H, 1) scalar, (B, T, H, N) vector
    if a is None:
        cum = x.new_zeros((B, T, H, 1), dtype=f32)
    else:
        cum = torch.cumsum(a.to(f32), dim=1)
        cum = cum.unsqueeze(-1) if decay == "scalar" else cum
    logA = cum[:, -1] if T > 0 else x.new_zeros((B, H, cum.shape[-1]), dtype=f32)   # (B, H, 1|N)
    # one collective: every rank's (final state from zero, log of the slice's decay product)
    packed = torch.cat([h_loc.to(f32).flatten(), logA.flatten()])
    gathered = torch.ops.seqfuse.sp_all_gather(packed, group_name)
    h_all = gathered[:, :h_loc.numel()].reshape(world, B, H, P, N)
    logA_all = gathered[:, h_loc.numel():].reshape(world, B, H, 1, cum.shape[-1])
    S_in = _fold(h_all, logA_all, range(rank))                                        # (B, H, P, N)
    # y_t += Σ_n c_t[n] · exp(cum_t[n]) · S_in[p, n]
    corr = torch.einsum("bthn,bhpn->bthp", c.to(f32) * torch.exp(cum), S_in)
    y = (y_loc.to(f32) + corr).to(y_loc.dtype)
    h = (torch.exp(logA_all[rank]) * S_in + h_loc.to(f32)).to(h_loc.dtype)
    return y, h


# --- scan -----------------------------------------------------------------------------------

def scan_sequence_parallel(a: Tensor, b: Tensor, c: Optional[Tensor], h0: Optional[Tensor], reverse: bool,
                           algorithm: str, runtime: str, dt: Optional[Tensor] = None, u: Optional[Tensor] = None,
                           readout_dtype: Optional[torch.dtype] = None,
                           group_name: str = "") -> tuple[Tensor, Tensor]:
    """``seqfuse.scan`` on this rank's slice of the time axis (-2) split over the group.

    Operands as seqfuse.scan's, sliced along T; h0 (*R, N) is the whole sequence's initial state,
    used on the rank that starts the sequence (rank 0, or the last rank when ``reverse``).
    Returns y and the state after this rank's slice (in the scan's direction).
    """
    if readout_dtype is not None:
        raise ValueError("seqfuse sequence parallelism: scan with readout_dtype (states rounded before the readout) "
                         "cannot be corrected exactly across slices; compile without sequence_parallel")
    rank, world = _rank_world(group_name)
    first = world - 1 if reverse else 0
    y_loc, h_loc = torch.ops.seqfuse.scan(a, b, c, h0 if rank == first else None, reverse, algorithm, runtime,
                                          dt, u)
    if world == 1:
        return y_loc, h_loc
    complex_ = y_loc.is_complex() or h_loc.is_complex() or a.is_complex()
    wide = torch.complex64 if complex_ else torch.float32
    if dt is not None:
        log_step = (dt.to(torch.float32) * a.to(torch.float32))
    else:
        log_step = None
    full = torch.broadcast_shapes(*(t.shape for t in (a, b, c, dt, u) if t is not None))
    T = full[-2]
    # running product of the decays in the scan's direction: P_t = Π_{s<=t} a_s  (*R, T, N)
    dims = (-2,)
    if log_step is not None:
        steps = log_step.expand(full)
        run_log = torch.cumsum(steps.flip(dims) if reverse else steps, dim=-2)
        run = torch.exp(run_log)
    else:
        steps = a.to(wide).expand(full)
        run = torch.cumprod(steps.flip(dims) if reverse else steps, dim=-2)
    run = run.flip(dims) if reverse else run
    total = (run[..., 0, :] if reverse else run[..., -1, :]) if T > 0 else torch.ones_like(h_loc, dtype=wide)
    # one collective: (final state from zero, the slice's decay product); a complex pair as real views
    pair = torch.stack([h_loc.to(wide).expand(total.shape), total.to(wide)])
    packed = torch.view_as_real(pair).flatten() if complex_ else pair.flatten()
    gathered = torch.ops.seqfuse.sp_all_gather(packed, group_name)
    if complex_:
        gathered = torch.view_as_complex(gathered.reshape(world, *pair.shape, 2))
    else:
        gathered = gathered.reshape(world, *pair.shape)
    h_all, A_all = gathered[:, 0], gathered[:, 1]
    earlier = range(world - 1, rank, -1) if reverse else range(rank)
    S_in = _zero_state(h_all)
    for j in earlier:
        S_in = A_all[j] * S_in + h_all[j]
    states_corr = run * S_in.unsqueeze(-2)                                              # (*R, T, N)
    if c is None:
        y = (y_loc.to(wide) + states_corr).to(y_loc.dtype)
    else:
        y = (y_loc.to(wide) + (c.to(wide) * states_corr).sum(-1)).to(y_loc.dtype)
    h = (A_all[rank] * S_in + h_loc.to(wide)).to(h_loc.dtype)
    return y, h


# --- long_conv (causal) ---------------------------------------------------------------------

def long_conv_sequence_parallel(u: Tensor, k: Tensor, d: Optional[Tensor], gate: Optional[Tensor],
                                bias: Optional[Tensor], causal: bool, fft_size: int, scale: float, activation: str,
                                algorithm: str, runtime: str, group_name: str = "") -> Tensor:
    """A causal ``seqfuse.long_conv`` on this rank's slice of the time axis (-1) split over the group.

    Output t of the slice reads inputs back to lag Lk-1, which may lie on earlier ranks: every rank
    all-gathers the last min(Lk-1, L_r) steps of its u (a halo; the whole slice when the kernel is
    longer than a slice), prepends the earlier ranks' part to its u, convolves, and drops the
    halo's outputs.  Payload: O(min(Lk, L_r) · channels) per rank; slices must be of equal length.
    Operands with a time axis (d, gate, bias of length L_r) are padded over the halo (its outputs
    are dropped).  A circular convolution (``causal=False``) is refused.
    """
    if not causal:
        raise SequenceParallelUnsupported("seqfuse: option 'sequence_parallel': a circular (non-causal) long_conv "
                                          "wraps around the whole sequence; only causal convolutions are supported")
    rank, world = _rank_world(group_name)
    L, Lk = u.shape[-1], k.shape[-1]
    halo = min(max(Lk - 1, 0), L)
    if world == 1 or halo == 0:
        return torch.ops.seqfuse.long_conv(u, k, d, gate, bias, causal, fft_size, scale, activation, algorithm,
                                           runtime)
    tails = torch.ops.seqfuse.sp_all_gather(u[..., L - halo:], group_name)            # (W, *B, halo)
    # the earlier ranks' tails in time order; the rank's own (and later ones) through a zero weight, so
    # that every rank's output depends on the gather (matched backward collectives, see _zero_state)
    earlier = [tails[j] for j in range(rank)]
    ext = torch.cat([*earlier, u + _zero_state(tails[rank:rank + 1, ..., :1]).to(u.dtype)], dim=-1)
    need = min(Lk - 1, ext.shape[-1] - L)
    ext = ext[..., ext.shape[-1] - L - need:]

    def pad(t):
        if t is None or t.dim() == 0 or t.shape[-1] != L or L == 1:
            return t
        return torch.cat([t.new_zeros((*t.shape[:-1], need)), t], dim=-1)
    y = torch.ops.seqfuse.long_conv(ext, k, pad(d), pad(gate), pad(bias), causal, 0, scale, activation, algorithm,
                                    runtime)
    return y[..., need:]


# --- in a compiled graph ---------------------------------------------------------------------

def apply_sequence_parallel(gm: torch.fx.GraphModule, group_name: str, where=None) -> int:
    """Turn the lowered ``seqfuse.ssd`` / ``seqfuse.scan`` calls of ``gm`` into their
    sequence-parallel forms over the group ``group_name``; returns how many.

    Causal ``seqfuse.long_conv`` calls gather the halo of inputs their kernel reaches back to.
    Raises :class:`SequenceParallelUnsupported` naming the op and its source location for a mixer
    whose result over a split sequence seqfuse does not compute (attention, delta; a circular
    long_conv).  ``where(node)`` gives the location text."""
    graph, n = gm.graph, 0
    swap = {torch.ops.seqfuse.ssd.default: ssd_sequence_parallel,
            torch.ops.seqfuse.scan.default: scan_sequence_parallel,
            torch.ops.seqfuse.long_conv.default: long_conv_sequence_parallel}
    unsupported = {torch.ops.seqfuse.attention.default: "attention"}
    delta = getattr(torch.ops.seqfuse, "delta", None)
    if delta is not None:
        unsupported[delta.default] = "delta"
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in unsupported:
            at = where(node) if where is not None else "?"
            raise SequenceParallelUnsupported(
                f"seqfuse: option 'sequence_parallel' supports the ssd, scan and causal long_conv ops; this graph "
                f"has a {unsupported[node.target]} op at {at}, whose result on a split sequence needs every "
                "earlier rank's keys; not supported yet. Compile that part without sequence_parallel.")
        fn = swap.get(node.target)
        if fn is None:
            continue
        if fn is long_conv_sequence_parallel and not node.args[5]:
            at = where(node) if where is not None else "?"
            raise SequenceParallelUnsupported(f"seqfuse: option 'sequence_parallel': the circular long_conv at {at} "
                                              "wraps around the whole sequence; only causal convolutions are supported")
        node.target = fn
        node.kwargs = {**node.kwargs, "group_name": group_name}
        n += 1
    if n:
        gm.recompile()
    return n
