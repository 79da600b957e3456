"""Differential fuzz of the Triton step-loop kernels of seqfuse.delta against the fp64 step loop.

    python -m tests.fuzz.delta_kernels --n 200 --seed 8

Draws calls of :mod:`seqfuse.lowering.triton.delta_recurrent` (forward and backward) with random
shapes (B 1-2, T 1-30, H 1-3, K 1-20, V 1-40), every gate, read key / erase key / read, h0 or not,
each operand fp32 or the case's low precision (bf16 / fp16) and sometimes a strided view, and a
random subset of gradients asked for; compares y, h and every gradient with the fp64 reference
(``delta_recurrent`` under autograd) by relative RMS error, less the error of the reference rounded to
the result's dtype, against the bound of the lowest precision among the operands
(tests/kernels/kernel_checks.py's).  Without CUDA the kernels run in the Triton
interpreter (about a second a call).  Prints every case over its bound and exits 1 if any.
"""
from __future__ import annotations

import argparse
import os
import random
import sys

def _operand(rng, gen, shape, kind, low):
    import torch
    if kind == "beta":
        x = torch.rand(*shape, generator=gen) * 1.5
    elif kind == "gate":
        x = -torch.rand(*shape, generator=gen) * rng.choice([0.1, 2.0, 20.0])
    else:
        x = torch.randn(*shape, generator=gen)
        if kind == "unit":
            x = torch.nn.functional.normalize(x, dim=-1)
    x = x.to(rng.choice([torch.float32, low]))
    if rng.random() < 0.3:            # a strided view (the first and last axes swapped in memory)
        x = x.transpose(0, -1).contiguous().transpose(0, -1)
    return x


def one_case(rng: random.Random):
    """(description, {result: relative error}, bound) of one random call."""
    import torch
    from seqfuse.lowering.reference.delta import delta_recurrent
    from tests.kernels.kernel_checks import BOUND
    from seqfuse.lowering.triton import delta_recurrent as R
    B, T, H, K, V = rng.randint(1, 2), rng.randint(1, 30), rng.randint(1, 3), rng.randint(1, 20), rng.randint(1, 40)
    gate = rng.choice(["none", "scalar", "vector"])
    keys = [x for x in ("p", "e") if rng.random() < 0.5]
    read = rng.choice(["decayed", "previous"])
    low = rng.choice([torch.float32, torch.float32, torch.bfloat16, torch.float16])
    gen = torch.Generator().manual_seed(rng.randrange(2 ** 31))
    mk = lambda shape, kind="randn": _operand(rng, gen, shape, kind, low)  # noqa: E731
    ops = dict(q=mk((B, T, H, K)), k=mk((B, T, H, K), "unit"), v=mk((B, T, H, V)), beta=mk((B, T, H), "beta"),
               g={"none": None, "scalar": mk((B, T, H), "gate"), "vector": mk((B, T, H, K), "gate")}[gate],
               h0=mk((B, H, K, V)) if rng.random() < 0.6 else None,
               p=mk((B, T, H, K), "unit") if "p" in keys else None, e=mk((B, T, H, K), "unit") if "e" in keys else None)
    a = dict(gate=gate, scale=rng.choice([1.0, 0.3]), chunk=64, algorithm="recurrent", read=read,
             needs=[ops[n] is not None and rng.random() < 0.8 for n in R._OPERANDS])
    dtypes = sorted({str(x.dtype).split(".")[1] for x in ops.values() if x is not None})
    desc = f"B={B} T={T} H={H} K={K} V={V} gate={gate} keys={keys} read={read} dtypes={dtypes}"
    why = R.supports(ops, a)
    if why:
        raise AssertionError(f"{desc}: refused: {why}")
    y, h = R.forward(*ops.values(), a)
    leaves = {n: None if x is None else x.detach().double().requires_grad_() for n, x in ops.items()}
    yr, hr = delta_recurrent(*list(leaves.values())[:6], gate=gate, scale=a["scale"], p=leaves["p"], e=leaves["e"],
                             read=read)
    gy = torch.randn(yr.shape, generator=gen).to(y.dtype)
    gh = torch.randn(hr.shape, generator=gen).to(y.dtype)
    given = [x for x in leaves.values() if x is not None]
    grads = iter(torch.autograd.grad((yr * gy.double()).sum() + (hr * gh.double()).sum(), given))
    ref = {n: None if x is None else next(grads) for n, x in leaves.items()}
    got = R.backward(gy, gh, *ops.values(), a)

    def rel(x, w):
        """x's relative error beyond what rounding the exact result to x's dtype costs (a gradient of
        norm 1e-5 in fp16 is subnormal: its rounding alone is 1e-2)"""
        norm = w.norm().clamp_min(1e-30)
        return ((x.double() - w).norm() / norm).item() - ((w.to(x.dtype).double() - w).norm() / norm).item()
    errs = {"y": rel(y, yr), "h": rel(h, hr)}
    for (name, x), gr, need in zip(ops.items(), got, a["needs"]):
        if x is None or not need:
            assert gr is None, f"{desc}: d{name} returned though not asked for"
            continue
        assert gr.shape == x.shape and gr.dtype == x.dtype, f"{desc}: d{name} {gr.shape} {gr.dtype}"
        errs["d" + name] = rel(gr, ref[name])
    return desc, errs, max(BOUND[getattr(torch, d)] for d in dtypes)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100, help="calls to draw")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
    import triton.language  # noqa: F401  (jitted for the mode set above)
    rng = random.Random(args.seed)
    over, worst = 0, {}
    for i in range(args.n):
        desc, errs, bound = one_case(rng)
        key = desc.split("dtypes=")[1]
        worst[key] = max(worst.get(key, 0.0), max(errs.values()))
        bad = {k: f"{v:.2e}" for k, v in errs.items() if v > bound}
        if bad:
            over += 1
            print(f"case {i}: OVER the bound {bound:g}: {desc}: {bad}", flush=True)
        if (i + 1) % 25 == 0:
            print(f"[delta kernels] {i + 1}/{args.n}, {over} over their bound", flush=True)
    print(f"seed {args.seed}: {args.n} calls, {over} over their bound; worst relative error by operand dtypes: "
          + ", ".join(f"{k} {v:.1e}" for k, v in sorted(worst.items())))
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
