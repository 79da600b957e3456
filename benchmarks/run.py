"""Speed and compile time of seqfuse against eager and inductor, in one run.

    python benchmarks/run.py                              # every workload, full size
    python benchmarks/run.py --quick                      # tiny shapes, a smoke test (< 60 s on CPU)
    python benchmarks/run.py --workload naive_causal_attention --repeats 20
    python benchmarks/run.py --workload mamba_loop --seqfuse-options '{"passes": {"scan_discretize": false}}'

For each workload and each of eager, torch.compile (inductor) and
torch.compile(backend="seqfuse"): compile seconds (wall time of the first
call, which includes that call's run) and run milliseconds (median of
--repeats calls after warmup, under torch.no_grad(); with --train, forward and backward
of the sum of the outputs).

Compiles are cold-ish: before each, torch._dynamo.reset() and inductor's
in-memory caches are cleared, and its whole-graph caches (FX graph cache, AOT
autograd cache) are off, so every compile traces, lowers and generates code
again. Built kernels stay cached on disk, so the first run on a machine also
pays for building them: compile times are comparable from the second run on.

The table gives ratios: run time eager/seqfuse and inductor/seqfuse (above 1
means seqfuse is faster) and compile time seqfuse/inductor (above 1 means
seqfuse compiles slower), the relative error of seqfuse's output against
eager, and the runtime paths the seqfuse ops took. Timings on a busy machine
mean little: the header prints the load average.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import traceback

import torch
import torch._functorch.config
import torch._inductor.config
import torch._inductor.utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from workloads import WORKLOADS  # noqa: E402

import seqfuse  # noqa: E402

BACKENDS = ("eager", "inductor", "seqfuse")


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_call(fn, args, device):
    start = time.perf_counter()
    out = fn(*args)
    sync(device)
    return out, time.perf_counter() - start


def progress(msg):
    """A line on stderr, so a long compile is not a silent wait (the table goes to stdout)."""
    print(f"  {datetime.datetime.now().strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def training_step(fn):
    """fn, then the backward of the sum of its floating outputs (parameters get gradients)."""
    def step(*args):
        out = fn(*args)
        loss = sum(t.float().sum() for t in _tensors(out) if t.is_floating_point() and t.requires_grad)
        loss.backward()
        return out
    return step


def measure(backend, workload, repeats, warmup, device, name="", options=None, train=False):
    """-> (compile seconds or None, median run ms, output of the first call); ``options`` are
    seqfuse's (docs/options.md), for the seqfuse backend only; ``train``: forward and backward
    (else forward under torch.no_grad())."""
    fn = workload.fn
    if backend != "eager":
        torch._dynamo.reset()
        torch._inductor.utils.clear_inductor_caches()  # in-memory kernel caches; the disk ones stay
        fn = torch.compile(fn, backend=backend, options=options if backend == "seqfuse" and options else None)
    progress(f"[{name}] {backend}: first call{' (compiles)' if backend != 'eager' else ''} ...")
    if train:
        fn = training_step(fn)
    with (torch.enable_grad() if train else torch.no_grad()):
        out, first = timed_call(fn, workload.args, device)
        progress(f"[{name}] {backend}: first call took {first:.1f} s; timing {repeats} calls")
        for _ in range(warmup):
            fn(*workload.args)
        times = [timed_call(fn, workload.args, device)[1] for _ in range(repeats)]
    compile_s = None if backend == "eager" else first
    return compile_s, 1e3 * statistics.median(times), out


def _tensors(x):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for e in x for t in _tensors(e)]
    if hasattr(x, "values") and callable(x.values):  # dict-like model outputs
        return [t for e in x.values() for t in _tensors(e)]
    return []


def rel_err(a, b):
    """Largest relative error over the output tensors (a workload may return a tuple)."""
    pairs = list(zip(_tensors(a), _tensors(b)))
    assert pairs and len(_tensors(a)) == len(_tensors(b)), "outputs differ in structure"
    return max(((x.float() - y.float()).norm() / y.float().norm()).item() for x, y in pairs)


def seqfuse_paths():
    """'attention:aten' style summary of the runtime paths the seqfuse ops took."""
    paths = [f"{op}:{path}" for op, by_path in seqfuse.counters().items() for path, n in by_path.items() if n]
    return ",".join(paths) or "none"


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def warm_up_compilers(device, backends=BACKENDS):
    """Compile the tiny attention workload once per backend, so the first measured
    compile does not also pay for importing and initializing the compiler stack."""
    tiny = WORKLOADS["naive_causal_attention"](True, device)
    for backend in [b for b in BACKENDS[1:] if b in backends]:
        torch._dynamo.reset()
        with torch.no_grad():
            torch.compile(tiny.fn, backend=backend)(*tiny.args)


def run_workload(name, args):
    progress(f"[{name}] building")
    try:
        workload = WORKLOADS[name](args.quick, args.device)
    except ImportError as e:  # transformers / flash-linear-attention are optional
        print(f"[{name}] skipped: {e}", file=sys.stderr)
        return {"workload": name, "shape": f"skipped ({e})", "failed": True, "paths": "-",
                **{f"{b}_{k}": None for b in BACKENDS for k in ("compile_s", "ms")}}
    row = {"workload": name, "shape": workload.shape}
    outputs = {}
    for backend in BACKENDS:
        if backend not in args.backend:
            row[f"{backend}_compile_s"] = row[f"{backend}_ms"] = None
            continue
        if backend == "seqfuse":
            seqfuse.reset_counters()
        try:
            row[f"{backend}_compile_s"], row[f"{backend}_ms"], outputs[backend] = measure(
                backend, workload, args.repeats, args.warmup, args.device, name, args.seqfuse_options, args.train
            )
        except Exception:
            print(f"[{name}] {backend} failed:", file=sys.stderr)
            traceback.print_exc()
            row["failed"] = True
            row[f"{backend}_compile_s"] = row[f"{backend}_ms"] = None
    row["paths"] = seqfuse_paths() if "seqfuse" in args.backend else "-"
    if "seqfuse" in outputs and "eager" in outputs:
        row["err"] = rel_err(outputs["seqfuse"], outputs["eager"])
    return row


COLUMNS = [  # header, width, value of a row
    ("workload", 24, lambda r: r["workload"]),
    ("eager ms", 10, lambda r: fmt(r["eager_ms"], ".2f")),
    ("inductor ms", 12, lambda r: fmt(r["inductor_ms"], ".2f")),
    ("seqfuse ms", 11, lambda r: fmt(r["seqfuse_ms"], ".2f")),
    ("eager/sf", 9, lambda r: fmt(ratio(r["eager_ms"], r["seqfuse_ms"]), ".2f")),
    ("ind/sf", 7, lambda r: fmt(ratio(r["inductor_ms"], r["seqfuse_ms"]), ".2f")),
    ("ind comp s", 11, lambda r: fmt(r["inductor_compile_s"], ".1f")),
    ("sf comp s", 10, lambda r: fmt(r["seqfuse_compile_s"], ".1f")),
    ("sf/ind comp", 12, lambda r: fmt(ratio(r["seqfuse_compile_s"], r["inductor_compile_s"]), ".2f")),
    ("rel err", 9, lambda r: fmt(r.get("err"), ".1e")),
    ("seqfuse paths", 0, lambda r: r["paths"]),
]


def print_table(rows):
    print("  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w, _) in enumerate(COLUMNS)))
    for r in rows:
        print("  ".join(f(r).rjust(w) if i else f(r).ljust(w) for i, (_, w, f) in enumerate(COLUMNS)))
    print()
    for r in rows:
        print(f"{r['workload']}: {r['shape']}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", action="append", choices=list(WORKLOADS), help="repeatable; default: all")
    p.add_argument("--repeats", type=int, default=None, help="timed calls per backend (default 10, --quick 3)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls after the first (default 2, --quick 1)")
    p.add_argument("--backend", action="append", choices=BACKENDS,
                   help="repeatable; default: all three (ratios need all three in one run)")
    p.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test, not a measurement")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--train", action="store_true", help="time forward + backward (default: forward, no_grad)")
    p.add_argument("--seqfuse-options", type=json.loads, default=None, metavar="JSON",
                   help="seqfuse's options as a JSON object (docs/options.md), e.g. to turn a pass off")
    args = p.parse_args(argv)
    if args.seqfuse_options is not None and not isinstance(args.seqfuse_options, dict):
        p.error(f"--seqfuse-options must be a JSON object, got {args.seqfuse_options!r}")
    args.backend = args.backend or list(BACKENDS)
    args.repeats = args.repeats or (3 if args.quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False

    print(
        f"seqfuse benchmark  {datetime.datetime.now().isoformat(timespec='seconds')}  "
        f"torch {torch.__version__}  threads {torch.get_num_threads()}  "
        f"load avg {os.getloadavg()[0]:.1f}/{os.cpu_count()} cores  device {args.device}  "
        f"{platform.machine()} {platform.processor() or ''}".rstrip()
    )
    print(f"median of {args.repeats} calls after {args.warmup} warmup, "
          f"{'forward + backward' if args.train else 'torch.no_grad()'}"
          f"{'  (--quick: tiny shapes, ratios mean little)' if args.quick else ''}"
          f"{f'  seqfuse options {json.dumps(args.seqfuse_options)}' if args.seqfuse_options else ''}\n")

    warm_up_compilers(args.device, args.backend)
    rows = [run_workload(name, args) for name in args.workload or WORKLOADS]
    print_table(rows)
    return 1 if any(r.get("failed") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
