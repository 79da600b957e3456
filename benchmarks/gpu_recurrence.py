"""GPU linear recurrences: seqfuse's Triton ssd / scan vs mamba_ssm and fla chunk kernels vs eager.

    python benchmarks/gpu_recurrence.py                # bf16, T = 512 … 16k, forward
    python benchmarks/gpu_recurrence.py --backward     # forward + backward
    python benchmarks/gpu_recurrence.py --quick        # T in {512, 4096}

Rows (milliseconds per call, triton.testing.do_bench; "-" where a peer failed or ran out of memory):

* ssd/{none,scalar,vector}: seqfuse::ssd on the triton path (chunked algorithm) vs
  - scalar: mamba_ssm's ``mamba_chunk_scan_combined`` (fed x·dt as x and dt·A as the log-decay,
    so it computes the same function) and fla's ``chunk_simple_gla``;
  - vector: fla's ``chunk_gla``;  none: fla's ``chunk_linear_attn``;
  - eager: seqfuse's chunked reference (torch ops).
  Shapes: B = 2, H = 8, P = N = 64 (vector: N = 64 too).
* scan: seqfuse::scan in its discretized form (Mamba-1's selective scan: decay exp(Δ·A) and
  input Δ·B·u formed in the kernel from A (D, 1, N), B (B, 1, T, N), Δ and u (B, D, T, 1), with
  the readout C shared over channels), the same work as mamba_ssm's ``selective_scan_fn``, vs
  that and the eager reference (which materializes the products).  Shapes: B = 2, D = 512, N = 16.

The seqfuse columns call the custom ops with runtime="triton" directly (a refusal or a failing
kernel warns and would time the eager reference: warnings are printed).  Ratios are
seqfuse / peer (above 1: seqfuse faster).  Backward: the seqfuse ssd backward is a
kernel for decay none / scalar with P, N <= 64, the chunked reference's adjoint (torch ops)
otherwise (vector decay here).  Needs a CUDA GPU; prints why and exits 1
otherwise.  No numbers are committed with this script: run it on the machine you care about.
"""
from __future__ import annotations

import argparse
import sys
import warnings

import torch


def bench(fn, backward):
    from triton.testing import do_bench

    if not backward:
        return do_bench(fn, warmup=5, rep=20)

    def step():
        out = fn()
        out = out[0] if isinstance(out, (tuple, list)) else out
        out.backward(torch.ones_like(out))
    return do_bench(step, warmup=5, rep=20)


def timed(fn, backward):
    """Milliseconds, or None (printed as "-") when the implementation fails or runs out of memory."""
    try:
        return bench(fn, backward)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return None
    except Exception as exc:  # a peer's API drift must not stop the table
        print(f"    ({type(exc).__name__}: {str(exc)[:120]})", file=sys.stderr)
        return None


def optional(module: str, name: str):
    """A peer kernel, or None (why it does not import is printed: a broken install is not "not installed")."""
    try:
        mod = __import__(module, fromlist=[name])
        return getattr(mod, name)
    except Exception as exc:
        print(f"{module}.{name}: unavailable ({type(exc).__name__}: {str(exc)[:160]})")
        return None


def ssd_inputs(T, decay, dtype, backward, B=2, H=8, P=64, N=64, dev="cuda"):
    g = dict(device=dev, dtype=dtype, requires_grad=backward)
    x = torch.randn(B, T, H, P, **g)
    b = (torch.randn(B, T, H, N, device=dev) / N ** 0.5).to(dtype).requires_grad_(backward)
    c = (torch.randn(B, T, H, N, device=dev) / N ** 0.5).to(dtype).requires_grad_(backward)
    a = None
    if decay == "scalar":
        a = (-torch.rand(B, T, H, device=dev) * 0.1).requires_grad_(backward)
    elif decay == "vector":
        a = (-torch.rand(B, T, H, N, device=dev) * 0.1).requires_grad_(backward)
    return x, b, c, a


def ssd_row(T, decay, dtype, backward, peers):
    import seqfuse.lowering.ssd_op  # noqa: F401  (registers the op and its triton path)
    from seqfuse.lowering.reference.ssd import ssd_chunked
    x, b, c, a = ssd_inputs(T, decay, dtype, backward)
    out = {}
    out["seqfuse"] = timed(lambda: torch.ops.seqfuse.ssd(x, b, c, a, None, None, decay, 64, "chunked", "triton"),
                           backward)
    out["eager"] = timed(lambda: ssd_chunked(x, b, c, a, decay=decay, chunk=64), backward)
    if decay == "scalar" and peers["mamba_chunk"] is not None:
        out["mamba_ssm"] = timed(lambda: _mamba_ssd(peers["mamba_chunk"], x, b, c, a), backward)
    fla_name = {"none": "fla_linear", "scalar": "fla_simple_gla", "vector": "fla_gla"}[decay]
    if peers[fla_name] is not None:
        out["fla"] = timed(lambda: _fla(peers[fla_name], decay, x, b, c, a), backward)
    return out


def _mamba_ssd(fn, x, b, c, a):
    """mamba_chunk_scan_combined on our operands: dt = -a / A with A = -1 per head gives dt·A = a,
    and x / dt as its x makes its x·dt our x (dt > 0 for a < 0)."""
    H = x.shape[2]
    A = -torch.ones(H, device=x.device, dtype=torch.float32)
    dt = (-a).clamp_min(1e-6)
    return fn((x / dt[..., None].to(x.dtype)), dt, A, b, c, 64)


def _fla(fn, decay, x, b, c, a):
    """fla's chunk kernels in (B, T, H, ·) layout: q = c, k = b, v = x, g = a, scale 1."""
    if decay == "none":
        return fn(c, b, x, scale=1.0)
    return fn(c, b, x, a.to(x.dtype) if decay == "vector" else a, scale=1.0)


def scan_row(T, dtype, backward, peers, B=2, D=512, N=16):
    import seqfuse.lowering.scan_op  # noqa: F401
    from seqfuse.lowering.reference.scan import scan_reference
    dev = "cuda"
    delta = torch.nn.functional.softplus(torch.randn(B, D, T, device=dev) - 2)
    A = -torch.rand(D, N, device=dev)
    u = torch.randn(B, D, T, device=dev, dtype=dtype)
    Bm = torch.randn(B, N, T, device=dev, dtype=dtype)
    Cm = torch.randn(B, N, T, device=dev, dtype=dtype)
    # seqfuse's operands: the factors as broadcastable views (stride 0 where they broadcast)
    A_ = A[:, None, :].requires_grad_(backward)                               # (D, 1, N) log-decays
    dt = delta[..., None].to(dtype).requires_grad_(backward)                  # (B, D, T, 1)
    uu = u[..., None].clone().requires_grad_(backward)                        # (B, D, T, 1)
    b_ = Bm.transpose(1, 2)[:, None].clone().requires_grad_(backward)         # (B, 1, T, N)
    c = Cm.transpose(1, 2)[:, None]                                           # (B, 1, T, N)
    out = {"seqfuse": timed(lambda: torch.ops.seqfuse.scan(A_, b_, c, None, False, "chunked", "triton", dt, uu),
                            backward),
           "eager": timed(lambda: scan_reference(A_, b_, c, dt=dt, u=uu, algorithm="chunked"), backward)}
    if peers["mamba_scan"] is not None:
        args = [t.requires_grad_(backward) for t in (u.clone(), delta.to(dtype), A.clone(), Bm.clone(), Cm.clone())]
        out["mamba_ssm"] = timed(lambda: peers["mamba_scan"](*args), backward)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backward", action="store_true", help="time forward + backward")
    p.add_argument("--quick", action="store_true", help="T in {512, 4096} only")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("gpu_recurrence.py needs a CUDA GPU (the triton kernels are timed compiled); none found.")
        return 1
    dtype = getattr(torch, args.dtype)
    peers = {"mamba_chunk": optional("mamba_ssm.ops.triton.ssd_combined", "mamba_chunk_scan_combined"),
             "mamba_scan": optional("mamba_ssm.ops.selective_scan_interface", "selective_scan_fn"),
             "fla_simple_gla": optional("fla.ops.simple_gla", "chunk_simple_gla"),
             "fla_gla": optional("fla.ops.gla", "chunk_gla"),
             "fla_linear": optional("fla.ops.linear_attn", "chunk_linear_attn")}
    Ts = [512, 4096] if args.quick else [512, 1024, 2048, 4096, 8192, 16384]
    cols = ["seqfuse", "mamba_ssm", "fla", "eager"]
    print(f"{torch.cuda.get_device_name()}  dtype={args.dtype}  {'fwd+bwd' if args.backward else 'fwd'}  (ms)")
    print(f"{'op':<14}{'T':>7}" + "".join(f"{c:>11}" for c in cols) + f"{'vs mamba':>10}{'vs fla':>9}{'vs eager':>10}")
    for name in ("ssd/none", "ssd/scalar", "ssd/vector", "scan"):
        for T in Ts:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                row = scan_row(T, dtype, args.backward, peers) if name == "scan" else \
                    ssd_row(T, name.split("/")[1], dtype, args.backward, peers)
            ms = [row.get(c) for c in cols]
            ratio = [f"{row[c] / row['seqfuse']:.2f}" if row.get(c) and row.get("seqfuse") else "-"
                     for c in cols[1:]]
            print(f"{name:<14}{T:>7}" + "".join(f"{m:>11.3f}" if m else f"{'-':>11}" for m in ms)
                  + f"{ratio[0]:>10}{ratio[1]:>9}{ratio[2]:>10}")
            for w in caught:
                if "seqfuse" in str(w.message):
                    print(f"    warning: {w.message}")
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
