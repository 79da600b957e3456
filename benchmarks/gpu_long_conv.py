"""Long convolutions on a GPU: seqfuse's triton kernels (direct and FFT) against the torch.fft
program run eagerly and compiled by inductor.

    python benchmarks/gpu_long_conv.py                      # L = 1024 … 16384, B=4, H=256, fp32
    python benchmarks/gpu_long_conv.py --lengths 4096 --dtype bfloat16 --repeats 50
    python benchmarks/gpu_long_conv.py --smoke              # tiny shapes on CPU via the triton
                                                            # interpreter: checks the script, times nothing

Two programs, written as models write them (the kernel k is an input, full length Lk = L):

  hyena  y = v · (irfft(rfft(u, 2L) · rfft(k, 2L) / 2L, norm="forward")[:L] + u·D)   (gated, D skip)
  s4d    y = irfft(rfft(u, 2L) · rfft(k, 2L))[:L] + u·D                               (S4D convolution mode)

Variants: "eager" (the torch.fft program), "inductor" (torch.compile of it), and
"triton-fft" / "triton-direct" (the program's seqfuse.long_conv op called with that
algorithm on the triton runtime, with its autograd).  For each: forward milliseconds
(under no_grad) and forward+backward milliseconds (gradients of u, k, D and v), the
median of --repeats timed calls after warmup, and ratios eager/variant and
inductor/variant (above 1: the variant is faster).  err is the relative RMS error of
the variant's output against eager.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch


def hyena(u, k, D, v):
    n = 2 * u.shape[-1]
    y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n) / n, n=n, norm="forward")[..., :u.shape[-1]]
    return v * (y + u * D.unsqueeze(-1))


def s4d(u, k, D):
    n = 2 * u.shape[-1]
    y = torch.fft.irfft(torch.fft.rfft(u, n=n) * torch.fft.rfft(k, n=n), n=n)[..., :u.shape[-1]]
    return y + u * D.unsqueeze(-1)


def upcast(program):
    """The program on fp32 copies of its low-precision inputs, its result cast back."""
    def fn(*args):
        return program(*(a.float() for a in args)).to(args[0].dtype)
    return fn


def seqfuse_op(program: str, algorithm: str):
    """The program as one seqfuse.long_conv call on the triton runtime, with ``algorithm``."""
    import seqfuse.lowering.long_conv_op  # noqa: F401  (registers the op and the triton implementation)

    if program == "hyena":
        def fn(u, k, D, v):
            return torch.ops.seqfuse.long_conv(u, k, D.unsqueeze(-1), v, None, True, 0, 1.0, "none", algorithm, "triton")
    else:
        def fn(u, k, D):
            return torch.ops.seqfuse.long_conv(u, k, D.unsqueeze(-1), None, None, True, 0, 1.0, "none", algorithm,
                                               "triton")
    return fn


DEVICE = "cuda"


def inputs(program, batch, heads, length, dtype):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    mk = lambda *s, std=1.0: (torch.randn(*s, device=DEVICE, generator=g) * std).to(dtype)  # noqa: E731
    args = [mk(batch, heads, length), mk(heads, length, std=length ** -0.5), mk(heads)]
    if program == "hyena":
        args.append(mk(batch, heads, length))
    return args


def cuda_ms(fn, repeats, warmup):
    if DEVICE != "cuda":  # --smoke: wall time of one call
        import time
        start = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - start)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(fn, args, repeats, warmup):
    """(forward ms, forward+backward ms, output)."""
    with torch.no_grad():
        out = fn(*args)
        fwd = cuda_ms(lambda: fn(*args), repeats, warmup)
    leaves = [a.detach().requires_grad_(True) for a in args]
    grad = torch.randn_like(out)

    def step():
        y = fn(*leaves)
        torch.autograd.grad(y, leaves, grad)

    both = cuda_ms(step, repeats, warmup)
    return fwd, both, out


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=256)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--programs", nargs="+", default=["hyena", "s4d"], choices=["hyena", "s4d"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on CPU through the triton interpreter")
    opts = parser.parse_args()
    if opts.smoke:
        global DEVICE
        import os
        os.environ["TRITON_INTERPRET"] = "1"
        DEVICE = "cpu"
        opts.lengths, opts.batch, opts.heads, opts.repeats = [48, 100], 1, 2, 1
    elif not torch.cuda.is_available():
        print("gpu_long_conv: this benchmark needs a CUDA GPU (torch.cuda.is_available() is False); "
              "the CPU path of the triton kernels is the interpreter, which is for tests, not timing.")
        return 1
    dtype = getattr(torch, opts.dtype)
    device_name = torch.cuda.get_device_name() if DEVICE == "cuda" else \
        "cpu (interpreter smoke run; 'inductor' is aot_eager; one untimed-quality call each)"
    print(f"# {device_name}  torch {torch.__version__}  B={opts.batch} H={opts.heads} "
          f"{opts.dtype}  median of {opts.repeats}")
    header = (f"{'program':8} {'L':>6} {'variant':14} {'fwd ms':>9} {'f+b ms':>9} {'eager/x':>8} {'ind/x':>8} "
              f"{'eager/x f+b':>11} {'ind/x f+b':>9} {'err':>9}")
    print(header)
    print("-" * len(header))
    for program in opts.programs:
        base = hyena if program == "hyena" else s4d
        # torch.fft has no bf16 (cuFFT) and only power-of-two fp16: a user upcasts, so the baselines do
        program_fn = base if dtype == torch.float32 else upcast(base)
        for length in opts.lengths:
            args = inputs(program, opts.batch, opts.heads, length, dtype)
            torch._dynamo.reset()
            inductor = torch.compile(program_fn) if DEVICE == "cuda" else torch.compile(program_fn, backend="aot_eager")
            variants = [("eager", program_fn), ("inductor", inductor),
                        ("triton-fft", seqfuse_op(program, "fft")), ("triton-direct", seqfuse_op(program, "direct"))]
            import seqfuse
            seqfuse.reset_counters()
            rows, ref = {}, None
            for name, fn in variants:
                try:
                    fwd, both, out = measure(fn, args, opts.repeats, opts.warmup)
                except Exception as exc:  # a variant that fails is reported, not fatal
                    print(f"{program:8} {length:>6} {name:14} failed: {type(exc).__name__}: {exc}")
                    continue
                ref = out if name == "eager" else ref
                rows[name] = (fwd, both, out)
            for name, (fwd, both, out) in rows.items():
                e, i = rows.get("eager"), rows.get("inductor")
                ratio = lambda r, j: f"{r[j] / (fwd, both)[j]:.2f}" if r else "-"  # noqa: E731
                err = f"{rel_err(out, ref):.1e}" if ref is not None else "-"
                print(f"{program:8} {length:>6} {name:14} {fwd:9.3f} {both:9.3f} {ratio(e, 0):>8} {ratio(i, 0):>8} "
                      f"{ratio(e, 1):>11} {ratio(i, 1):>9} {err:>9}")
            paths = seqfuse.counters().get("long_conv", {})
            if paths.get("eager"):
                print(f"# note: {paths['eager']} long_conv calls fell back to eager: {seqfuse.fallbacks()}")
            seqfuse.reset_counters()
    return 0


if __name__ == "__main__":
    sys.exit(main())
