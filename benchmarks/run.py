"""Speed and compile time of seqfuse against eager and inductor, in one run.

    python benchmarks/run.py                              # every workload, full size (hours on 2 CPU cores)
    python benchmarks/run.py --quick                      # tiny shapes, a smoke test (17 min for nine workloads on
                                                          # 2 busy CPU cores: a process per pair, compiles cold)
    python benchmarks/run.py --workload naive_causal_attention --repeats 20
    python benchmarks/run.py --workload mamba_loop --seqfuse-options '{"passes": {"scan_discretize": false}}'
    python benchmarks/run.py --quick --plot ratios.png    # also draw the ratios per workload (needs matplotlib)
    python benchmarks/run.py --quick --trials 3           # 3 cold compiles per backend, interleaved: the fastest

For each workload and each of eager, torch.compile (inductor) and
torch.compile(backend="seqfuse"): compile seconds (wall time of the
``torch.compile(...)`` call plus the first call, which includes that call's run: inductor
imports its compiler in the former, seqfuse in the latter) and run milliseconds (median of
--repeats calls after warmup, under torch.no_grad(); with --train, forward and backward
of the sum of the outputs).

Compiles are cold: each (workload, backend) pair runs in a fresh Python process, with
empty inductor and seqfuse caches (TORCHINDUCTOR_CACHE_DIR and SEQFUSE_CACHE_DIR point at
new temporary directories; inductor's FX graph and AOT autograd caches are off), so every
compile traces, lowers, generates and builds its code as on a user's first run; imports of
torch and seqfuse happen before the clock starts. The seqfuse compile is split into Dynamo's
share, seqfuse's own pipeline, the downstream compile of the rewritten graphs (inductor, as
seqfuse's backend saw it: part of the backward may come later) and the C compiler's seconds for
the CPU path's kernels (the "dynamo s", "sf pipe s", "downstr s" and "C build s" columns; the
build runs in a background thread beside the downstream compile, so it adds to the compile time
only where it outlasts it; the rest is the first call's run). --warm-caches keeps the on-disk caches
of this user instead (what a second run of the same program costs).  --trials N compiles each
compiled backend N times, alternating which goes first, and keeps each one's fastest compile
(on a shared machine the load of other processes moves a single cold compile by tens of
percent; the minimum is the least disturbed measurement of each).

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
import subprocess
import sys
import tempfile
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


def _dynamo_seconds():
    """Dynamo's frame-compile seconds so far, minus the time its backend calls took (its own share)."""
    from torch._dynamo.utils import compilation_time_metrics as m
    return sum(m.get("_compile.compile_inner", ())) - sum(m.get("OutputGraph.call_user_compiler", ()))


def measure(backend, workload, repeats, warmup, device, name="", options=None, train=False):
    """-> (compile seconds or None, median run ms, output of the first call); ``options`` are
    seqfuse's (docs/options.md), for the seqfuse backend only; ``train``: forward and backward
    (else forward under torch.no_grad())."""
    fn = workload.fn
    wrap_s = 0.0
    if backend != "eager":
        torch._dynamo.reset()
        torch._inductor.utils.clear_inductor_caches()  # in-memory kernel caches (a fresh process has none)
        # torch.compile(...) itself is part of the user's wait: for backend="inductor" it imports
        # inductor's compiler (~0.7 s), which seqfuse imports in its first call instead
        start = time.perf_counter()
        fn = torch.compile(fn, backend=backend, options=options if backend == "seqfuse" and options else None)
        wrap_s = time.perf_counter() - start
    progress(f"[{name}] {backend}: first call{' (compiles)' if backend != 'eager' else ''} ...")
    if train:
        fn = training_step(fn)
    with (torch.enable_grad() if train else torch.no_grad()):
        out, first = timed_call(fn, workload.args, device)
        progress(f"[{name}] {backend}: first call took {first:.1f} s; timing {repeats} calls")
        for _ in range(warmup):
            fn(*workload.args)
        times = [timed_call(fn, workload.args, device)[1] for _ in range(repeats)]
    compile_s = None if backend == "eager" else wrap_s + first
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


def child_main(args):
    """One (workload, backend) pair in this fresh process: print one RESULT line of JSON and save
    the first call's output tensors to ``args.child_out`` (for the relative error)."""
    name, backend = args.child
    torch._inductor.config.fx_graph_cache = False
    torch._functorch.config.enable_autograd_cache = False
    workload = WORKLOADS[name](args.quick, args.device)
    dynamo_before = _dynamo_seconds()
    report = seqfuse.Report()
    from seqfuse.compiler.report import collecting
    with collecting(report):
        compile_s, ms, out = measure(backend, workload, args.repeats, args.warmup, args.device, name,
                                     args.seqfuse_options, args.train)
    build = sys.modules.get("seqfuse.lowering.cpu.build")
    result = {"compile_s": compile_s, "ms": ms, "shape": workload.shape,
              "dynamo_s": None if backend == "eager" else _dynamo_seconds() - dynamo_before,
              "pipeline_s": sum(report.seconds.values()) if backend == "seqfuse" else None,
              "downstream_s": sum(g.downstream_seconds for g in report.graphs) if backend == "seqfuse" else None,
              # the C compiler's wall seconds for the CPU path's kernels (in a background thread,
              # overlapping the downstream compile; 0 with warm caches)
              "cbuild_s": (build.compile_seconds if build else 0.0) if backend == "seqfuse" else None,
              "paths": seqfuse_paths() if backend == "seqfuse" else "-"}
    torch.save([t.detach().cpu() for t in _tensors(out)], args.child_out)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


def _child_command(name, backend, args, out_path):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, backend, "--child-out", out_path,
           "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--device", args.device]
    if args.quick:
        cmd.append("--quick")
    if args.train:
        cmd.append("--train")
    if args.seqfuse_options is not None:
        cmd += ["--seqfuse-options", json.dumps(args.seqfuse_options)]
    return cmd


def _run_child(name, backend, args, scratch, out_path):
    """One (workload, backend) child process; its RESULT, or None when it failed."""
    env = dict(os.environ)
    if not args.warm_caches:  # empty caches: a user's first compile
        env["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix=f"inductor.{name}.{backend}.", dir=scratch)
        env["SEQFUSE_CACHE_DIR"] = tempfile.mkdtemp(prefix=f"seqfuse.{name}.{backend}.", dir=scratch)
    try:
        proc = subprocess.run(_child_command(name, backend, args, out_path), env=env, stdout=subprocess.PIPE,
                              text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        # (the row shows the other backends; the message says how long this one ran)
        print(f"[{name}] {backend} timed out after {args.timeout:g} s (--timeout); no time for it", file=sys.stderr)
        return None
    result = next((json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines()
                   if line.startswith("RESULT ")), None)
    if proc.returncode != 0 or result is None:
        # an ImportError of an optional library (transformers / fla) is reported by the child on stderr
        print(f"[{name}] {backend} failed (exit {proc.returncode}); see its stderr above", file=sys.stderr)
        return None
    return result


def _schedule(backends, trials):
    """The order of the child processes: eager once, then the compiled backends ``trials`` times,
    alternating their order each trial (on a shared machine the load drifts: neither backend always
    runs first)."""
    compiled = [b for b in backends if b != "eager"]
    order = ["eager"] if "eager" in backends else []
    for trial in range(trials):
        order += compiled if trial % 2 == 0 else compiled[::-1]
    return order


def run_workload(name, args, scratch):
    """Each backend in its own fresh process (cold compiles), each compiled backend ``args.trials``
    times (the row keeps the trial with the fastest compile; ``compile_trials`` lists them all);
    the rows' relative error compares the outputs the processes saved."""
    progress(f"[{name}] building")
    row = {"workload": name, "shape": "-", "compile_trials": {}}
    outputs = {}
    best = {}
    for backend in BACKENDS:
        row[f"{backend}_compile_s"] = row[f"{backend}_ms"] = None
    for backend in _schedule([b for b in BACKENDS if b in args.backend], getattr(args, "trials", 1)):
        out_path = os.path.join(scratch, f"{name}.{backend}.pt")
        result = _run_child(name, backend, args, scratch, out_path)
        if result is None:
            row["failed"] = True
            continue
        row["shape"] = result["shape"]
        if backend != "eager":
            row["compile_trials"].setdefault(backend, []).append(result["compile_s"])
        if backend in best and result["compile_s"] >= best[backend]["compile_s"]:
            continue
        best[backend] = result
        row[f"{backend}_compile_s"], row[f"{backend}_ms"] = result["compile_s"], result["ms"]
        if backend == "seqfuse":
            row["paths"], row["dynamo_s"], row["pipeline_s"] = result["paths"], result["dynamo_s"], result["pipeline_s"]
            row["downstream_s"], row["cbuild_s"] = result.get("downstream_s"), result.get("cbuild_s")
        outputs[backend] = torch.load(out_path)
    row.setdefault("paths", "-")
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
    ("dynamo s", 9, lambda r: fmt(r.get("dynamo_s"), ".1f")),
    ("sf pipe s", 10, lambda r: fmt(r.get("pipeline_s"), ".2f")),
    ("downstr s", 10, lambda r: fmt(r.get("downstream_s"), ".1f")),
    ("C build s", 10, lambda r: fmt(r.get("cbuild_s"), ".1f")),
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


PLOT_SERIES = (  # label, value of a row; drawn per workload, log scale, a line at 1
    ("run: eager / seqfuse", lambda r: ratio(r.get("eager_ms"), r.get("seqfuse_ms"))),
    ("run: inductor / seqfuse", lambda r: ratio(r.get("inductor_ms"), r.get("seqfuse_ms"))),
    ("compile: inductor / seqfuse", lambda r: ratio(r.get("inductor_compile_s"), r.get("seqfuse_compile_s"))),
)


def matplotlib_problem():
    """None if matplotlib can draw here, else what to do about it."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "--plot needs matplotlib, which is not installed (pip install matplotlib)"
    return None


def plot_ratios(rows, path):
    """Grouped bars per workload: the run-time ratios eager/seqfuse and inductor/seqfuse, and the
    compile-time ratio inductor/seqfuse (above 1, seqfuse is faster), on a log scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["workload"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(rows) + 2), 4.5))
    width = 0.8 / len(PLOT_SERIES)
    for i, (label, value) in enumerate(PLOT_SERIES):
        xs = [j + (i - (len(PLOT_SERIES) - 1) / 2) * width for j in range(len(rows))]
        ys = [value(r) for r in rows]
        ax.bar([x for x, y in zip(xs, ys) if y], [y for y in ys if y], width, label=label)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylabel("ratio (above 1: seqfuse faster)")
    ax.set_title("seqfuse vs eager and inductor, per workload")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


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
    p.add_argument("--plot", metavar="PNG", help="also draw the ratios per workload into this image (matplotlib)")
    p.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    p.add_argument("--warm-caches", action="store_true",
                   help="keep this user's inductor / seqfuse disk caches (default: empty ones, a first run)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per (workload, backend) process")
    p.add_argument("--trials", type=int, default=1,
                   help="cold compiles per compiled backend, alternating inductor / seqfuse; the table keeps each "
                        "backend's fastest (a shared machine's load moves single runs by tens of percent), "
                        "--json lists every trial")
    p.add_argument("--child", nargs=2, metavar=("WORKLOAD", "BACKEND"), help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.seqfuse_options is not None and not isinstance(args.seqfuse_options, dict):
        p.error(f"--seqfuse-options must be a JSON object, got {args.seqfuse_options!r}")
    args.backend = args.backend or list(BACKENDS)
    args.repeats = args.repeats or (3 if args.quick else 10)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if args.child:
        return child_main(args)
    if args.plot and matplotlib_problem():
        p.error(matplotlib_problem() + "; nothing was run")

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

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="seqfuse-bench.") as scratch:
        rows = [run_workload(name, args, scratch) for name in args.workload or WORKLOADS]
    print_table(rows)
    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.plot:
        plot_ratios(rows, args.plot)
        print(f"plot: {args.plot}")
    return 1 if any(r.get("failed") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
