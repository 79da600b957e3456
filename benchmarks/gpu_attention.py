"""GPU attention throughput: seqfuse's Triton kernels vs SDPA (flash) vs FlexAttention vs inductor.

    python benchmarks/gpu_attention.py                 # bf16, D in {64, 128}, causal and not, L = 512 … 16k
    python benchmarks/gpu_attention.py --quick         # two shapes

Every configuration keeps 16k tokens per batch (B = 16384 / L) and H = 2048 / D heads.
TFLOP/s count 4·B·H·Lq·Lk·D for the forward (half of it when causal) and 2.5x that for
the backward.  The seqfuse column calls the ``seqfuse::attention`` op on the triton
path directly; the inductor column compiles the naive program
(``softmax(q·kᵀ·s + mask)·v``).  Ratios are seqfuse / peer (above 1: seqfuse faster).
Needs a CUDA GPU; prints why and exits 1 otherwise.
"""
import argparse
import datetime
import math
import sys

import torch
import torch.nn.functional as F


def naive(q, k, v, causal):
    s = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if causal:
        L = s.shape[-1]
        s = s.masked_fill(torch.triu(torch.ones(L, L, dtype=torch.bool, device=s.device), 1), float("-inf"))
    return torch.softmax(s.float(), -1).to(q.dtype) @ v


def bench(fn, backward):
    from triton.testing import do_bench

    if not backward:
        return do_bench(fn, warmup=5, rep=20)

    def step():
        out = fn()
        out.backward(torch.ones_like(out))
    return do_bench(step, warmup=5, rep=20)


def runners(B, H, L, D, causal, dtype):
    import seqfuse.lowering.attention_op  # noqa: F401
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    attrs = (None, "causal" if causal else "none", 0, 0, float("-inf"), False, 1, None, 0.0, "nan", 0, "triton")

    def seqfuse_fn():
        return torch.ops.seqfuse.attention(q, k, v, None, None, *attrs)[0]

    def sdpa_fn():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    block_mask = create_block_mask(lambda b, h, i, j: i >= j, None, None, L, L) if causal else None
    flex = torch.compile(flex_attention)
    inductor = torch.compile(naive)
    return {"seqfuse": seqfuse_fn, "sdpa-flash": sdpa_fn,
            "flex": lambda: flex(q, k, v, block_mask=block_mask),
            "inductor": lambda: inductor(q, k, v, causal)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_attention.py: no CUDA GPU here; this benchmark measures the Triton kernels on a GPU only.")
        return 1
    print(f"seqfuse gpu attention benchmark  {datetime.date.today()}  {torch.cuda.get_device_name()}  "
          f"torch {torch.__version__}  bf16")
    lengths = [2048, 8192] if args.quick else [512, 1024, 2048, 4096, 8192, 16384]
    names = ["seqfuse", "sdpa-flash", "flex", "inductor"]
    print(f"{'D':>4} {'causal':>6} {'L':>6} {'pass':>8} " + " ".join(f"{n + ' TF/s':>16}" for n in names)
          + "  sf/flash  sf/flex")
    for D in (64, 128):
        for causal in (False, True):
            for L in lengths:
                B, H = max(1, 16384 // L), 2048 // D
                fns = runners(B, H, L, D, causal, torch.bfloat16)
                flops = 4 * B * H * L * L * D * (0.5 if causal else 1.0)
                for backward, label, mult in ((False, "fwd", 1.0), (True, "fwd+bwd", 3.5)):
                    tf = {}
                    for n in names:
                        try:
                            ms = bench(fns[n], backward)
                            tf[n] = mult * flops / (ms * 1e-3) / 1e12
                        except Exception as exc:  # a peer that cannot run this shape
                            print(f"  {n} failed at D={D} L={L}: {type(exc).__name__}: {exc}", file=sys.stderr)
                            tf[n] = math.nan
                    print(f"{D:>4} {str(causal):>6} {L:>6} {label:>8} " + " ".join(f"{tf[n]:>16.1f}" for n in names)
                          + f"  {tf['seqfuse'] / tf['sdpa-flash']:>8.2f} {tf['seqfuse'] / tf['flex']:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
