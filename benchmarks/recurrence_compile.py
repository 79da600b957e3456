"""Compile time of a Python loop over time, as the loop grows: is it linear in T?

    python benchmarks/recurrence_compile.py                          # HF Mamba, T = 512 ... 4096
    python benchmarks/recurrence_compile.py --model scan             # one selective-scan loop, no transformers
    python benchmarks/recurrence_compile.py --lengths 64 128 --inductor-max-length 128

Dynamo unrolls a ``for t in range(T)`` loop into T copies of its body, so every stage
before seqfuse's loop re-roller (Dynamo's trace, the pre-dispatch ATen trace) sees a graph
that grows with T; after the re-roller it is one ``scan`` op per loop.  For each T this
prints seqfuse's compile time (the first call through ``seqfuse.explain``: Dynamo with a
fresh cache, seqfuse's pipeline, inductor on the rest, and one run), that time per step of
the loop, and the scan / ssd ops found.  A time per step that stays flat as T doubles
means compile time grows linearly with the loop length.

With ``--inductor-max-length N`` inductor compiles the same program for the lengths
<= N too (it is much slower on unrolled loops: minutes at T = 512).

Models:
  mamba  Hugging Face MambaModel, 2 layers, d_model 64, state 16, batch 1, inference
         forward: each layer's ``mamba_selective_scan`` runs a Python loop over T.
  scan   one selective-scan loop written like Mamba's reference (h = exp(Δ·A)·h + Δ·B·x,
         y = h·C), channels 128, state 16; needs only torch.
"""

import argparse
import datetime
import gc
import os
import platform
import sys
import time

import torch
import torch._functorch.config
import torch._inductor.config
import torch._inductor.utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import seqfuse  # noqa: E402


def selective_scan_loop(u, delta, A, B, C, D):
    """u, delta: (batch, D, L); A: (D, N); B, C: (batch, N, L); D: (D,) -> y (batch, D, L)."""
    dA = torch.exp(delta.unsqueeze(-1) * A.unsqueeze(1))                          # (b, d, l, n)
    dBu = delta.unsqueeze(-1) * B.transpose(1, 2).unsqueeze(1) * u.unsqueeze(-1)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        h = dA[:, :, t] * h + dBu[:, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))
    return torch.stack(ys, dim=-1) + u * D.unsqueeze(-1)


def build(model, length):
    """-> (fn, args, description) for a loop of ``length`` steps."""
    torch.manual_seed(0)
    if model == "mamba":
        from workloads import MambaHidden, tiny_mamba

        net = MambaHidden(tiny_mamba())
        ids = torch.randint(0, net.model.config.vocab_size, (1, length))
        return net, (ids,), "HF MambaModel, 2 layers, d_model 64, state 16, batch 1"
    channels, state = 128, 16
    u = torch.randn(1, channels, length)
    delta = torch.nn.functional.softplus(torch.randn(1, channels, length) - 2)
    A = -torch.rand(channels, state) - 0.5
    B, C = torch.randn(1, state, length), torch.randn(1, state, length)
    D = torch.randn(channels)
    return selective_scan_loop, (u, delta, A, B, C, D), f"one selective-scan loop, {channels} channels, state {state}"


def fresh():
    torch._dynamo.reset()
    torch._inductor.utils.clear_inductor_caches()
    gc.collect()


def first_call_seqfuse(fn, args):
    fresh()
    start = time.perf_counter()
    with torch.no_grad():
        report = seqfuse.explain(fn, *args)
    return time.perf_counter() - start, report


def first_call_inductor(fn, args):
    fresh()
    compiled = torch.compile(fn, backend="inductor")
    start = time.perf_counter()
    with torch.no_grad():
        compiled(*args)
    return time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["mamba", "scan"], default="mamba")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--inductor-max-length", type=int, default=0,
                   help="also compile with inductor for lengths <= this (default: never)")
    args = p.parse_args(argv)
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False

    fn, fargs, desc = build(args.model, 8)
    print(f"seqfuse recurrence compile time  {datetime.datetime.now().isoformat(timespec='seconds')}  "
          f"torch {torch.__version__}  threads {torch.get_num_threads()}  "
          f"load avg {os.getloadavg()[0]:.1f}/{os.cpu_count()} cores  {platform.machine()}")
    print(f"model: {desc}; compile = first call (fresh Dynamo cache), downstream inductor, torch.no_grad()")

    # warm up: import and initialize the compiler stack once, outside the measurements
    first_call_seqfuse(fn, fargs)

    header = f"{'T':>6}  {'seqfuse s':>10}  {'ms / step':>10}  {'scan':>5}  {'ssd':>4}  {'inductor s':>11}  {'ind/sf':>7}"
    print(header, flush=True)
    rows = []
    for T in args.lengths:
        fn, fargs, _ = build(args.model, T)
        sf_s, report = first_call_seqfuse(fn, fargs)
        ind_s = first_call_inductor(fn, fargs) if T <= args.inductor_max_length else None
        rows.append((T, sf_s))
        print(f"{T:>6}  {sf_s:>10.2f}  {1e3 * sf_s / T:>10.2f}  {report.count('scan'):>5}  {report.count('ssd'):>4}  "
              f"{'-' if ind_s is None else format(ind_s, '.1f'):>11}  "
              f"{'-' if ind_s is None else format(ind_s / sf_s, '.1f'):>7}", flush=True)
    if len(rows) >= 2:
        (t0, s0), (t1, s1) = rows[0], rows[-1]
        print(f"\nT x{t1 / t0:g} -> seqfuse compile time x{s1 / s0:.2f} (linear: x{t1 / t0:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
