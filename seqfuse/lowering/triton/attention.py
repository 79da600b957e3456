"""seqfuse.attention on generated Triton kernels (the "triton" runtime path).

The generator: :func:`specialize` turns one call's attributes and tensors into
a :class:`KernelSpec` — the compile-time flags of the kernels in
:mod:`seqfuse.lowering.triton.attention_kernels` (mask kind, optional bias /
keep inputs, fill handling, softcap, GQA group size, head dims, dtype) — and
Triton compiles one kernel per distinct spec.  The launch config (tile sizes,
warps, stages) comes from the kernel cache in :mod:`seqfuse.runtime.cache`:
timed once per spec on CUDA, a fixed small tile under the interpreter.

Contract (see :mod:`seqfuse.lowering.attention_op`):

    supports(t, a) -> None | reason
    forward(q, k, v, bias, keep, a) -> (out (*B, Lq, Dv) in v's dtype, lse (*B, Lq) fp32)
    backward(grad_out, q, k, v, bias, keep, out, lse, rng_state, a) -> (dq, dk, dv, dbias)

Inputs are viewed as (Z, H, L, D) with their own strides (q of rank 3 or 4);
k/v hold H / gqa_groups heads, and query head h reads kv head h // gqa_groups.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch

from seqfuse.lowering.aten.attention import call_reason, scale_of
from seqfuse.lowering.triton.common import KernelModule
from seqfuse.runtime import Impl, all_finite, register_impl
from seqfuse.runtime.cache import ConfigCache, autotune, make_key, time_cuda

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_MASK_CODES = {"none": 0, "causal": 1, "window": 2}
_MAX_HEAD_DIM = 256
_MAX_POSITION = 2 ** 30  # |diag|, window and lengths stay far from int32 overflow in index arithmetic
_MAX_GRID_Y = 65535  # CUDA's limit on a grid's second axis, where the kernels put batch · heads

#: tiles used under the interpreter (TRITON_INTERPRET=1), per kernel: small and unequal, so that
#: tests at L=33 cross tile edges on both axes (the interpreter's cost is per tile, not per element)
INTERPRETER_CONFIGS = {
    "fwd": {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1},
    "dkdv": {"BLOCK_M": 32, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1},
    "dq": {"BLOCK_M": 16, "BLOCK_N": 32, "num_warps": 4, "num_stages": 1},
}

_CACHE = ConfigCache("attention-configs")

#: |lse| beyond which the backward recomputes each row's max and sum (EXACT_STATS) instead of
#: reading P = exp(s - lse) off the fp32 lse (its rounding, 2^-24·|lse|, scales a whole row of P)
_EXACT_STATS_LSE = 256.0


# --- the kernels (imported on first use) -----------------------------------------

_kernels = KernelModule("attention_kernels")


# --- the generator: attributes -> compile-time specialization ----------------------

@dataclass(frozen=True)
class KernelSpec:
    """Everything the kernels are specialized on (their UPPER_CASE constexpr flags) for one call."""

    MASK: int
    HAS_BIAS: bool
    HAS_KEEP: bool
    BIAS_AFTER_MASK: bool
    NEG_INF_FILL: bool
    SOFTCAP: bool
    EMPTY_ZERO: bool
    GROUPS: int
    HEAD_DIM: int
    HEAD_DIM_V: int
    BLOCK_D: int
    BLOCK_DV: int
    DOT_PRECISION: str
    DOT_FP32: bool
    EXACT_STATS: bool
    EXACT_DELTA: bool
    HAS_SINK: bool
    dtype: str

    def constexprs(self, kernel: str) -> dict:
        """Keyword arguments of a launch of ``kernel`` ("fwd", "dq", "dkdv"); the dtype is the pointers'."""
        d = asdict(self)
        d.pop("dtype")
        if kernel == "fwd":
            d.pop("EXACT_STATS")
        if kernel != "dq":
            d.pop("EXACT_DELTA")
        if kernel == "dkdv":  # reads the row statistics (lse / STATS), which include the sink
            d.pop("HAS_SINK")
        return d


def _fp32(x: float) -> float:
    """``x`` rounded to fp32, as the reference's fp32 arithmetic sees it (may become ±inf)."""
    return float(torch.tensor(float(x), dtype=torch.float32))


def specialize(q: torch.Tensor, v: torch.Tensor, bias, keep, a: dict, groups: int) -> KernelSpec:
    """The kernel specialization of one call."""
    fill = _fp32(a["fill"])
    d, dv = q.shape[-1], v.shape[-1]
    mask = _MASK_CODES[a["mask"]]
    # the interpreter's tl.dot (triton 3.6) multiplies bf16 operands' raw bits: widen them to fp32
    # (exact products; P and dS are still rounded to bf16 first, as on the GPU)
    dot_fp32 = q.dtype == torch.bfloat16 and _kernels().INTERPRETED
    return KernelSpec(
        MASK=mask,
        HAS_BIAS=bias is not None,
        HAS_KEEP=keep is not None,
        BIAS_AFTER_MASK=bool(a["bias_after_mask"]) and bias is not None,
        # with fill = -inf a tile the structural mask empties adds exp(-inf) = 0 and is skipped
        NEG_INF_FILL=fill == -math.inf,
        SOFTCAP=a["softcap"] is not None,
        EMPTY_ZERO=a.get("empty_rows", "nan") == "zero",
        GROUPS=groups,
        HEAD_DIM=d,
        HEAD_DIM_V=dv,
        BLOCK_D=max(16, 1 << (d - 1).bit_length()),
        BLOCK_DV=max(16, 1 << (dv - 1).bit_length()),
        # fp32 inputs get fp32 products (no TF32), as the fp32 reference computes them
        DOT_PRECISION="ieee" if q.dtype == torch.float32 or dot_fp32 else "tf32",
        DOT_FP32=dot_fp32,
        # a bias or a finite fill can put a whole row at a magnitude where fp32 lse = m + log l
        # drops log l: the backward then recomputes each row's max and sum
        EXACT_STATS=bias is not None or fill != -math.inf,
        # Δ = rowsum(dO ∘ O) read off a 16-bit output carries O's rounding (2^-9 relative in bf16), and
        # dQ = Σ_j P_ij (dP_ij - Δ_i) k_j multiplies that error by the mean key where the exact terms
        # cancel; a wide value head dim averages it out, a narrow one does not (fuzzer: head dim 1, dQ
        # 10x eager's error).  Below 16 (where the tiles are padded to 16 anyway) the dQ kernel computes
        # Δ = Σ_j P_ij dP_ij from the fp32 probabilities instead, at the cost of one more pass over keys.
        EXACT_DELTA=q.dtype in (torch.float16, torch.bfloat16) and dv < 16,
        HAS_SINK=a.get("sink") is not None,
        dtype=str(q.dtype).replace("torch.", ""),
    )


def _runtime_args(q, a) -> tuple:
    """Kernel scalars: scale, fill, softcap, diag, window (fp32-rounded as the reference's arithmetic)."""
    scale = a["scale"] if a["scale"] is not None else 1.0 / math.sqrt(q.shape[-1])
    softcap = a["softcap"] if a["softcap"] is not None else 1.0
    fill = _fp32(a["fill"])
    return float(scale), fill, float(softcap), int(a["diag"]), int(a["window"])


# --- views -----------------------------------------------------------------

def _as4d(x: torch.Tensor) -> torch.Tensor:
    """(Z, H, L, D) view of a rank-3 or rank-4 tensor (no copy)."""
    return x if x.dim() == 4 else x.unsqueeze(0)


def _kv_layout(q: torch.Tensor, k: torch.Tensor, g: int) -> str | None:
    """None if k's batch axes map onto q's by h -> h // g (or broadcast), else why not."""
    zq, hq = _as4d(q).shape[:2]
    zk, hk = _as4d(k).shape[:2]
    if zk not in (1, zq):
        return f"k/v batch {zk} does not broadcast against q's {zq}"
    if hk * g == hq:
        return None
    if hk == 1 and g == 1:
        return None
    return f"k/v have {hk} heads, q has {hq} with gqa_groups={g}"


def _expand_kv(q4, x4, g):
    """k or v as (Z, H // g, L, D); broadcast axes become stride-0 (no copy)."""
    z, h = q4.shape[:2]
    hk = x4.shape[1] if x4.shape[1] * g == h else h
    return x4.expand(z, hk, x4.shape[2], x4.shape[3])


def _broadcast4(x: torch.Tensor, q: torch.Tensor, lk: int) -> torch.Tensor:
    """bias/keep as a stride-0-broadcast (Z, H, Lq, Lk) view."""
    shape = (*q.shape[:-1], lk)
    x = x.reshape((1,) * (len(shape) - x.dim()) + tuple(x.shape)).expand(shape)
    return _as4d(x)


def _rows3(sink: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor | None:
    """The sink logits as a stride-0-broadcast (Z, H, Lq) view."""
    if sink is None:
        return None
    rows = tuple(q.shape[:-1])
    x = sink.reshape((1,) * (len(rows) - sink.dim()) + tuple(sink.shape)).expand(rows)
    return x if x.dim() == 3 else x.unsqueeze(0)


def _strides3(x: torch.Tensor | None) -> tuple:
    return tuple(x.stride()) if x is not None else (0, 0, 0)


def _strides(x: torch.Tensor | None) -> tuple:
    return tuple(x.stride()) if x is not None else (0, 0, 0, 0)


# --- supports ----------------------------------------------------------------

def supports(t: dict, a: dict) -> str | None:
    """None when the triton kernels compute exactly this call, else the reason they do not."""
    q, k, v, bias, keep = t["q"], t["k"], t["v"], t["bias"], t["keep"]
    reason = _kernels.availability(q.device)
    if reason:
        return reason
    if a["dropout"] > 0.0:
        return "dropout runs on the reference to follow the program's RNG stream"
    if a["mask"] not in _MASK_CODES:
        return f"mask kind {a['mask']!r}"
    if a.get("empty_rows", "nan") not in ("nan", "zero"):
        return f"empty_rows={a['empty_rows']!r}"
    if q.dim() not in (3, 4):
        return f"rank {q.dim()} inputs (the kernels take rank 3 or 4)"
    if k.dim() != q.dim() or v.dim() != q.dim():
        return f"q, k, v of ranks {q.dim()}, {k.dim()}, {v.dim()}"
    if q.dtype not in _DTYPES or not (q.dtype == k.dtype == v.dtype):
        return f"dtypes {q.dtype}/{k.dtype}/{v.dtype}"
    if any(x.device != q.device for x in (k, v, bias, keep) if x is not None):
        return "inputs on different devices"
    d, dv = q.shape[-1], v.shape[-1]
    if k.shape[-1] != d or not (1 <= d <= _MAX_HEAD_DIM and 1 <= dv <= _MAX_HEAD_DIM):
        return f"head dims q {d}, k {k.shape[-1]}, v {dv} (the kernels take 1..{_MAX_HEAD_DIM})"
    lq, lk = q.shape[-2], k.shape[-2]
    if lq == 0 or lk == 0 or q.numel() == 0 or k.numel() == 0:
        return "empty inputs"
    if v.shape[:-1] != k.shape[:-1]:
        return f"k {tuple(k.shape)} and v {tuple(v.shape)} disagree"
    g = a["gqa_groups"]
    if not isinstance(g, int) or g < 1:
        return f"gqa_groups={g!r}"
    reason = _kv_layout(q, k, g)
    if reason:
        return reason
    if max(lq, lk, abs(a["diag"]), abs(a["window"])) >= _MAX_POSITION:
        return "lengths or mask offsets beyond 2**30"
    if _as4d(q).shape[1] > _MAX_GRID_Y:
        return f"{_as4d(q).shape[1]} heads in one batch entry (a launch's grid takes {_MAX_GRID_Y})"
    target = (*q.shape[:-1], lk)
    for name, x in (("bias", bias), ("keep", keep)):
        if x is None:
            continue
        if x.dim() > len(target) or any(s not in (1, e) for s, e in zip(reversed(x.shape), reversed(target))):
            return f"{name} {tuple(x.shape)} does not broadcast to {target}"
    if bias is not None and not bias.is_floating_point():
        return f"bias dtype {bias.dtype}"
    sink = t.get("sink")
    if sink is not None:
        rows = tuple(q.shape[:-1])
        if not sink.is_floating_point() or sink.device != q.device:
            return f"sink of dtype {sink.dtype} on {sink.device}"
        if sink.dim() > len(rows) or any(s not in (1, e) for s, e in zip(reversed(sink.shape), reversed(rows))):
            return f"sink {tuple(sink.shape)} does not broadcast to the rows {rows}"
        if not bool(all_finite(sink)):
            return "a NaN or inf sink logit"
    if keep is not None and keep.dtype != torch.bool:
        return f"keep dtype {keep.dtype}"
    if not isinstance(a["scale"], (int, float, type(None))) or not math.isfinite(scale_of(q, a)):
        return f"scale={a['scale']!r}"
    if "need_dbias" in a and q.dtype == torch.float32 and dv < 16:
        # a backward call: dS = P·(dP − Δ) cancels in fp32 where a row is nearly one-hot, and fewer than
        # 16 value channels average nothing (fuzzer seed 101 #21, head dim 1: dQ 2800x eager's error);
        # the reference differentiates the program's own softmax there
        return "fp32 backward with a value head dim below 16 (dP − Δ cancels on near one-hot rows)"
    from seqfuse.lowering.attention_op import ATTR_NAMES, sdpa_decides  # (here: attention_op imports this module)
    if t.get("sink") is None and sdpa_decides(q, k, v, bias, keep, {n: a[n] for n in ATTR_NAMES}):
        return "a lifted SDPA call that SDPA itself must run (is_causal with scale <= 0: its NaN rows)"
    # the values: NaN / inf inputs, rounded 16-bit biases, rows a tensor mask empties
    return call_reason(t, a, empty_rows_exact=True)


# --- launch configs ------------------------------------------------------------

def _candidates(kernel: str, spec: KernelSpec) -> list[dict]:
    """A small config space per kernel (each candidate costs a compile), trimmed for wide heads."""
    wide = max(spec.BLOCK_D, spec.BLOCK_DV) >= 256
    if kernel == "fwd":   # (BLOCK_M, BLOCK_N, num_warps, num_stages)
        space = [(64, 32, 4, 2), (64, 64, 4, 2), (64, 32, 8, 1)] if wide else \
            [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 2), (128, 128, 8, 2)]
    elif kernel == "dkdv":
        space = [(32, 32, 4, 1), (16, 64, 4, 1), (32, 64, 8, 1)] if wide else \
            [(32, 64, 4, 2), (64, 64, 8, 2), (32, 128, 8, 2), (64, 32, 4, 3), (32, 32, 4, 3)]
    else:                 # dq
        space = [(32, 32, 4, 1), (64, 16, 4, 1), (64, 32, 8, 1)] if wide else \
            [(64, 32, 4, 2), (64, 64, 8, 2), (128, 32, 8, 2), (128, 64, 8, 2), (32, 64, 4, 3)]
    return [{"BLOCK_M": m, "BLOCK_N": n, "num_warps": w, "num_stages": st} for m, n, w, st in space]


_CONFIGS: dict = {}  # this process's choices, so the hot path builds no cache key


def _config(kernel: str, spec: KernelSpec, device: torch.device, lk: int, launch) -> dict:
    """The launch config of ``kernel`` for ``spec``: fixed under the interpreter, else autotuned and cached."""
    if _kernels().INTERPRETED or device.type != "cuda":
        return dict(INTERPRETER_CONFIGS[kernel.split("_")[0]])
    bucket = min(1 << max(lk - 1, 0).bit_length(), 16384)
    memo = (kernel, spec, bucket, str(device))
    config = _CONFIGS.get(memo)
    if config is None:
        key = make_key(f"attention.{kernel}", {**asdict(spec), "lk_bucket": bucket}, device)
        config = autotune(_CACHE, key, _candidates(kernel, spec), lambda c: time_cuda(lambda: launch(c)))
        _CONFIGS[memo] = config
    return config


def _launch_opts(config: dict) -> dict:
    return {"BLOCK_M": config["BLOCK_M"], "BLOCK_N": config["BLOCK_N"], "num_warps": config["num_warps"],
            "num_stages": config["num_stages"]}


# --- forward -----------------------------------------------------------------

def _prepare(q, k, v, bias, keep, a):
    """4-D views, the specialization, and the dummy pointers for absent optional inputs."""
    g = a["gqa_groups"]
    q4 = _as4d(q)
    k4, v4 = _expand_kv(q4, _as4d(k), g), _expand_kv(q4, _as4d(v), g)
    groups = q4.shape[1] // k4.shape[1]
    lk = k.shape[-2]
    b4 = _broadcast4(bias, q, lk) if bias is not None else None
    c4 = _broadcast4(keep, q, lk).view(torch.uint8) if keep is not None else None
    spec = specialize(q, v, bias, keep, a, groups)
    return q4, k4, v4, b4, c4, spec


def forward(q, k, v, bias, keep, a):
    """(out (*B, Lq, Dv) in v's dtype, lse (*B, Lq) fp32) of one call."""
    kern = _kernels()
    q4, k4, v4, b4, c4, spec = _prepare(q, k, v, bias, keep, a)
    s3 = _rows3(a.get("sink"), q)
    z, h, lq, _ = q4.shape
    lk = k4.shape[2]
    from seqfuse.lowering.attention_op import empty_out  # (here: attention_op imports this module)
    # in the op's promised layout: no copy after
    out = empty_out(q, v, a.get("out_transposed", False)).view(z, h, lq, v.shape[-1])
    lse = torch.empty((z, h, lq), dtype=torch.float32, device=q.device)
    scale, fill, softcap, diag, window = _runtime_args(q, a)

    tensors = (q4, k4, v4, b4 if b4 is not None else q4, c4 if c4 is not None else q4, out, lse,
               s3 if s3 is not None else lse)

    def launch(config):
        for part, zs in _batch_parts(tensors, z, h):
            kern.attention_fwd[(_cdiv(lq, config["BLOCK_M"]), zs * h)](
                *part, *q4.stride(), *k4.stride(), *v4.stride(), *_strides(b4), *_strides(c4), *out.stride(), *_strides3(s3),
                h, lq, lk, scale, fill, softcap, diag, window, **spec.constexprs("fwd"), **_launch_opts(config))

    launch(_config("fwd", spec, q.device, lk, launch))
    return out.reshape(*q.shape[:-1], v.shape[-1]), lse.reshape(q.shape[:-1])


# --- backward ----------------------------------------------------------------

def backward(grad_out, q, k, v, bias, keep, out, lse, rng_state, a):
    """(dq, dk, dv, dbias) of one call, recomputing probabilities from the saved lse;
    dbias is ``q.new_empty(0)`` unless ``a["need_dbias"]``."""
    kern = _kernels()
    need_dbias = bool(a.get("need_dbias")) and bias is not None
    q4, k4, v4, b4, c4, spec = _prepare(q, k, v, bias, keep, a)
    s3 = _rows3(a.get("sink"), q)
    if not spec.EXACT_STATS and lse.numel() and \
            float(lse.abs().masked_fill(lse.isinf(), 0).amax()) > _EXACT_STATS_LSE:
        # rows at a large magnitude: P = exp(s - lse) from the fp32 lse would be off by 2^-24·|lse|
        spec = replace(spec, EXACT_STATS=True)
    z, h, lq, _ = q4.shape
    hk, lk = k4.shape[1], k4.shape[2]
    do4 = _as4d(grad_out.reshape(*q.shape[:-1], v.shape[-1]))
    lse3 = lse.reshape(z, h, lq).float().contiguous()
    empty = lse3 == -math.inf  # rows whose every score is -inf
    if spec.EMPTY_ZERO:
        # such a row has P = 0: exp(s - (+inf)) = 0 in the kernels (and out = 0, so Δ = 0)
        lse3 = lse3.masked_fill(empty, math.inf)
    # Δ_i = Σ_e dO_ie · O_ie = Σ_j P_ij dP_ij, the softmax backward's row term (with EXACT_DELTA the
    # dQ kernel computes it from the probabilities and writes it here for the dK/dV kernel)
    if spec.EXACT_DELTA:
        delta = torch.empty((z, h, lq), dtype=torch.float32, device=q.device)
    else:
        delta = (do4.float() * _as4d(out.reshape(*q.shape[:-1], v.shape[-1])).float()).sum(-1).contiguous()
    scale, fill, softcap, diag, window = _runtime_args(q, a)
    # k/v gradients in the expanded (Z, H // g) layout; reduced to broadcast axes afterwards
    dq = torch.empty(q4.shape, dtype=q.dtype, device=q.device)
    expanded = tuple(k4.shape[:2]) != tuple(_as4d(k).shape[:2])
    acc_dtype = torch.float32 if expanded else k.dtype
    dk = torch.empty(k4.shape, dtype=acc_dtype, device=q.device)
    dv = torch.empty(v4.shape, dtype=acc_dtype, device=q.device)
    dbias = torch.zeros((z, h, lq, lk), dtype=torch.float32, device=q.device) if need_dbias else q4
    # (max, 1/sum) of every row, written by the dQ kernel when EXACT_STATS
    stats = torch.empty((z, h, 2, lq), dtype=torch.float32, device=q.device) if spec.EXACT_STATS else lse3
    bptr = b4 if b4 is not None else q4
    cptr = c4 if c4 is not None else q4
    common = (*q4.stride(), *k4.stride(), *v4.stride(), *_strides(b4), *_strides(c4), *do4.stride())
    scalars = (lq, lk, scale, fill, softcap, diag, window)

    dq_tensors = (q4, k4, v4, bptr, cptr, do4, lse3, delta, stats, dq, dbias, s3 if s3 is not None else lse3)
    dkdv_tensors = (q4, k4, v4, bptr, cptr, do4, lse3, delta, stats, dk, dv)

    def launch_dq(config):
        for part, zs in _batch_parts(dq_tensors, z, h):
            kern.attention_bwd_dq[(_cdiv(lq, config["BLOCK_M"]), zs * h)](
                *part, *common, *dq.stride(), *_strides3(s3), h, *scalars, **spec.constexprs("dq"),
                NEED_DBIAS=need_dbias, **_launch_opts(config))

    def launch_dkdv(config):
        for part, zs in _batch_parts(dkdv_tensors, z, hk):
            kern.attention_bwd_dkdv[(_cdiv(lk, config["BLOCK_N"]), zs * hk)](
                *part, *common, *dk.stride(), *dv.stride(), h, hk, *scalars, **spec.constexprs("dkdv"),
                **_launch_opts(config))

    # dQ first: with EXACT_STATS / EXACT_DELTA it writes the row statistics / Δ the dK/dV kernel reads
    launch_dq(_config("dq" + ("_dbias" if need_dbias else ""), spec, q.device, lk, launch_dq))
    launch_dkdv(_config("dkdv", spec, q.device, lk, launch_dkdv))

    if spec.NEG_INF_FILL and spec.MASK != 0 and not spec.EMPTY_ZERO:
        # A row that no key may reach has lse = -inf and P = exp(-inf - -inf) = NaN in every column;
        # the reference's dV (Pᵀ·dO) is then NaN for every key of that head, including the tiles the
        # kernels skipped, and so is its dbias row when the bias is added after the mask.
        dv.masked_fill_(empty.any(-1).reshape(z, hk, -1).any(-1)[..., None, None], math.nan)
        if need_dbias and spec.BIAS_AFTER_MASK:
            dbias.masked_fill_(empty[..., None], math.nan)
    dq = dq.reshape(q.shape)
    dk = dk.reshape(*q.shape[:-3], hk, lk, -1) if q.dim() == 4 else dk.reshape(hk, lk, -1)
    dv = dv.reshape(*q.shape[:-3], hk, lk, -1) if q.dim() == 4 else dv.reshape(hk, lk, -1)
    if expanded:
        dk = dk.sum_to_size(k.shape).to(k.dtype)
        dv = dv.sum_to_size(v.shape).to(v.dtype)
    if need_dbias:
        db = dbias.reshape(*q.shape[:-1], lk).sum_to_size(bias.shape).to(bias.dtype)
    else:
        db = q.new_empty(0)
    return dq, dk, dv, db


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _batch_parts(tensors: tuple, z: int, per_batch: int):
    """(the launch's tensors, its batch count) for each launch of a kernel whose grid's second axis is
    batch · ``per_batch``: one launch of the tensors themselves where that fits CUDA's limit, else one per
    range of batches, every tensor (each (Z, ...)) sliced to it, so 4096 decode rows of 32 heads still
    run here rather than failing at launch."""
    if z * per_batch <= _MAX_GRID_Y:
        yield tensors, z
        return
    step = _MAX_GRID_Y // per_batch  # >= 1: supports refuses more heads than the limit
    for z0 in range(0, z, step):
        yield tuple(t[z0:z0 + step] for t in tensors), min(step, z - z0)


# --- registration --------------------------------------------------------------

def register() -> None:
    """Register the kernels as the "triton" implementation of seqfuse.attention."""
    register_impl("attention", Impl("triton", supports, forward, backward))
